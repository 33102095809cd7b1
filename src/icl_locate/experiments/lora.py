"""Single-layer LoRA fine-tuning sweep (the paper's last experiment).

For each layer l: a fresh LoRA adapter on that layer's attention output projection only,
trained on FLORES dev lines 1..N in the zero-shot format ``Q:{src}\\nA:{tgt}<eos>`` (loss on the
answer tokens, or on every position as the paper's code; see ``lora_batches``), early-stopped on
the same loss over dev lines 801-997, then evaluated by greedy zero-shot decoding (no
instructions, no examples) on devtest, with the engine measured fastest on the worker's machine (its
choices and the machine go into the run record). One unit per layer: an executor can run them anywhere.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import safetensors.torch
import torch
from torch import nn

from ..core.conditions import MaskedPrompt
from ..core.interventions import UNCHANGED
from ..core.models import LoadedModel, load_description, load_model
from ..core.prompts import EncodedPrompt, Example, render_query
from ..core.structure import attention_module, decoder_layers
from ..engines.base import Engine, StopRule
from ..engines.calibrate import Calibrator, build_engine
from ..engines.choices import Choices
from ..results.store import Store
from ..tasks.data import data_dir_or_default, flores_bitext, parse_pair
from ..tasks.metrics import translation_scores
from ..util.errors import UserError
from ..util.fileio import ensure_dir
from ..util.progress import Progress
from ..util.system import peak_rss_mb, reset_peak_rss
from .common import fingerprint
from .executors import Executor, LocalExecutor, RayExecutor
from .lora_batches import LOSSES, ZERO_SHOT, check_batching, encode_pairs
from .lora_loss import autocast_mode, check_autocast
from .lora_train import train
from .options import LoraRun, LoraSettings, RaySettings
from .settings import check_count, parse_layers

OUT_PROJ_NAMES = ("o_proj", "out_proj", "dense", "c_proj")  # llama-likes, gpt_neo, bloom/gpt_neox, gpt2


# ``--preset paper``: the paper's LoRA settings, loss included (its collator scores every position).
LORA_PRESETS: dict[str, dict] = {
    "paper": dict(
        train_size=800,
        val_size=197,
        patience=5,
        threshold=0.01,
        r=8,
        alpha=32,
        dropout=0.05,
        lr=1e-4,
        batch_size=32,
        max_epochs=100,
        loss="full",
    ),
}


def lora_settings(preset: str | None, overrides: dict) -> LoraSettings:
    """The preset's settings (or the defaults), then the options given (None: not given)."""
    if preset is not None and preset not in LORA_PRESETS:
        raise UserError(f"unknown LoRA preset {preset!r} (known: {', '.join(LORA_PRESETS)})")
    values = dict(LORA_PRESETS[preset]) if preset is not None else {}
    values.update({k: v for k, v in overrides.items() if v is not None})
    return LoraSettings(**values)


def check_sizes(settings: LoraSettings) -> None:
    """Training pairs come from dev lines 1-800, validation pairs from 801-997."""
    if not 0 < settings.train_size <= 800:
        raise UserError(
            f"--train-size must be in 1..800 (dev lines 1-800 are the training pool), got {settings.train_size}"
        )
    if not 0 < settings.val_size <= 197:
        raise UserError(f"--val-size must be in 1..197 (dev lines 801-997), got {settings.val_size}")


def resolve_autocast(settings: LoraSettings, device: str) -> LoraSettings:
    """The settings with ``autocast="auto"`` made explicit for the device (so the store and the
    unit id say what ran)."""
    return replace(settings, autocast=autocast_mode(settings.autocast, device))


def output_projection_name(model: nn.Module, layer: int) -> str:
    """Full module name of layer ``layer``'s attention output projection, for any architecture."""
    layers = decoder_layers(model)
    if not 0 <= layer < len(layers):
        raise UserError(f"layer {layer} out of range: the model has layers 0..{len(layers) - 1}")
    attn = attention_module(layers[layer])
    names = {id(m): n for n, m in model.named_modules()}
    for name, _module in attn.named_modules():
        if name.split(".")[-1] in OUT_PROJ_NAMES:
            return f"{names[id(attn)]}.{name}"
    raise UserError(f"no attention output projection ({', '.join(OUT_PROJ_NAMES)}) in layer {layer}")


def attach_adapter(model: nn.Module, layer: int, settings: LoraSettings):
    """A PEFT model with one fresh LoRA adapter on ``layer``'s output projection (base weights frozen)."""
    from peft import LoraConfig, get_peft_model  # lazy: only LoRA needs peft, a heavy import

    target = output_projection_name(model, layer)
    config = LoraConfig(
        r=settings.r,
        lora_alpha=settings.alpha,
        lora_dropout=settings.dropout,
        target_modules=[target],
        bias="none",
        task_type="CAUSAL_LM",
    )
    torch.manual_seed(settings.seed)
    return get_peft_model(model, config), target


def zero_shot_prompts(tokenizer, test: Sequence[Example]) -> list[MaskedPrompt]:
    """Prompts ``Q:{src}\\nA:`` (no instructions, no examples), nothing hidden."""
    items = []
    for ex in test:
        text = render_query(ZERO_SHOT, ex.source)
        ids = tokenizer(text)["input_ids"]
        bos = 1 if ids and ids[0] == tokenizer.bos_token_id else 0
        encoded = EncodedPrompt(
            text=text,
            ids=ids,
            spans={"bos": (0, bos) if bos else None, "instructions": None, "examples": None, "query": (bos, len(ids))},
        )
        items.append(MaskedPrompt.of(encoded, None))
    return items


ZERO_SHOT_STOP = StopRule(("\n", "Q:"), 50)


def evaluate_zero_shot(
    engine: Engine, tokenizer, test: Sequence[Example], language: str = "en"
) -> tuple[float, list[str]]:
    """Zero-shot BLEU of the model the engine runs (the adapter in place)."""
    prompts = zero_shot_prompts(tokenizer, test)
    gens = engine.generate(prompts, [UNCHANGED], ZERO_SHOT_STOP)
    texts = [gens[(i, UNCHANGED)].text.split("Q:")[0].strip() for i in range(len(prompts))]
    return translation_scores(texts, [ex.target for ex in test], language).bleu, texts


@dataclass(frozen=True)
class LoraUnit:
    """One adapter to train: a layer of one pair under one setting (the store's unit)."""

    pair: str
    layer: int
    settings: LoraSettings
    n_test: int | None

    @property
    def unit_id(self) -> str:
        return lora_unit_id(self.pair, self.layer, self.settings, self.n_test)

    def label(self) -> str:
        return f"LoRA {self.pair} layer {self.layer}"


@dataclass
class LoraResult:
    """A trained adapter as it travels back to the driver: weights, config, curve, zero-shot BLEU."""

    unit: LoraUnit
    target: str
    bleu: float
    curve: dict
    seconds: float
    state: dict  # the adapter's tensors, as PEFT saves them
    config: Any  # its peft LoraConfig (peft is imported lazily)
    choices: dict | None = None  # the evaluation's engine, its measured reasons and the machine (Choices)


@dataclass
class LoraData:
    """Training, validation and test pairs of one language pair (FLORES dev 1-800 / 801-997 / devtest)."""

    train: list[Example]
    val: list[Example]
    test: list[Example]
    language: str

    @classmethod
    def load(cls, data_dir: str | None, pair: str, settings: LoraSettings, n_test: int | None) -> LoraData:
        src, tgt = parse_pair(pair)
        root = data_dir_or_default(data_dir)
        dev = flores_bitext(root, src, tgt, "dev")
        test = flores_bitext(root, src, tgt, "devtest")
        return cls(
            dev[: settings.train_size],
            dev[800 : 800 + settings.val_size],
            test[:n_test] if n_test else test,
            tgt.iso1 or "en",
        )


class LoraWorker:
    """Trains one single-layer adapter per unit on its model; writes nothing (the driver saves and stores)."""

    def __init__(self, loaded: LoadedModel, data: LoraData, log: Callable[[str], None] = lambda m: None):
        self.loaded, self.data, self.log = loaded, data, log
        tok: Any = loaded.tokenizer
        self.pad_id = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
        self._encoded: dict[int, tuple[list, list]] = {}
        self.calibrator: Calibrator | None = None  # made at the first evaluation, on the model loaded by then
        self.choices: Choices | None = None  # the evaluation's engine, measured at the first unit

    @classmethod
    def load(cls, run: LoraRun) -> LoraWorker:
        """A worker for ``run`` (used by Ray actors: each loads the model once)."""
        loaded = load_model(run.model, dtype=run.dtype, device=run.device)
        return cls(loaded, LoraData.load(run.data_dir, run.pair, run.settings, run.n_test))

    def compute(self, unit: LoraUnit, progress=None) -> LoraResult:
        assert self.loaded.model is not None  # a loaded model, not a description
        started = time.time()
        tok, settings = self.loaded.tokenizer, unit.settings
        train_seqs = encode_pairs(tok, self.data.train[: settings.train_size])
        val_seqs = encode_pairs(tok, self.data.val[: settings.val_size])
        peft_model, target = attach_adapter(self.loaded.model, unit.layer, settings)
        try:
            self.log(
                f"layer {unit.layer}: LoRA on {target} "
                f"({sum(p.numel() for p in peft_model.parameters() if p.requires_grad)} trainable parameters)"
            )
            reset_peak_rss()
            curve = train(peft_model, train_seqs, val_seqs, unit.layer, self.pad_id, settings, self.log).as_dict()
            curve["peak_rss_mb"] = peak_rss_mb()
            peft_model.eval()
            bleu, _ = evaluate_zero_shot(self.evaluation_engine(), tok, self.data.test, self.data.language)
            from peft import get_peft_model_state_dict  # lazy: see attach_adapter

            state = {k: v.detach().cpu().clone() for k, v in get_peft_model_state_dict(peft_model).items()}
            config = peft_model.peft_config["default"]
        finally:
            peft_model.unload()  # back to the untouched base model for the next unit
        choices = self.choices.as_dict() if self.choices is not None else None
        return LoraResult(unit, target, bleu, curve, time.time() - started, state, config, choices)

    def evaluation_engine(self) -> Engine:
        """The engine that decodes the test set with the unit's adapter in place (PEFT puts it into the base
        model's layer), chosen by measuring on this machine at the first unit (``Calibrator``): an adapter
        changes one layer's projection, not which engine, head or batch is faster. Exact whatever is chosen."""
        model, tok = self.loaded.model, self.loaded.tokenizer
        if self.calibrator is None or self.choices is None:
            self.calibrator = Calibrator(model, tok)
            prompts = zero_shot_prompts(tok, self.data.test)
            with torch.no_grad():  # the adapter's weights require gradients: no graph for the measurements
                self.choices = self.calibrator.choose(prompts, [UNCHANGED], ZERO_SHOT_STOP, self.loaded.info.as_dict())
        return build_engine(model, tok, self.choices, self.calibrator)


def save_adapter(result: LoraResult, directory: Path) -> Path:
    """The adapter in PEFT's own layout (``PeftModel.from_pretrained`` loads it), written atomically."""
    tmp = directory.with_name(f".{directory.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    safetensors.torch.save_file(result.state, str(tmp / "adapter_model.safetensors"))
    result.config.save_pretrained(str(tmp))
    shutil.rmtree(directory, ignore_errors=True)
    os.replace(tmp, directory)
    return directory


def lora_sweep(
    loaded: LoadedModel,
    data_dir: str | None,
    pair: str,
    layers: list[int],
    settings: LoraSettings,
    n_test: int | None,
    out_dir: Path,
    store: Store | None = None,
    run_id: int | None = None,
    log: Callable[[str], None] = lambda m: print(m, file=sys.stderr, flush=True),
    executor: Executor | None = None,
) -> list[dict]:
    """One adapter per layer, through ``executor`` (default: this process, on ``loaded``); adapters and
    results are written here, by the driver, as each comes back; layers the store holds are skipped."""
    check_sizes(settings)
    n_layers = loaded.info.num_layers
    bad = [layer for layer in layers if not 0 <= layer < n_layers]
    if bad:
        raise UserError(f"layers {bad} out of range: the model has layers 0..{n_layers - 1}")
    settings = resolve_autocast(settings, loaded.info.device)
    data = LoraData.load(data_dir, pair, settings, n_test)
    units = []
    for layer in layers:
        unit = LoraUnit(pair, layer, settings, n_test)
        if store is not None and store.has_lora(unit.unit_id):
            log(f"layer {layer}: already in the store, skipped")
        else:
            units.append(unit)
    executor = executor or LocalExecutor(LoraWorker(loaded, data, log))
    results = []
    seen_choices: list[dict] = []
    with Progress(len(units), "lora-sweep") as progress:
        for r in executor.map(units, progress):
            if r.choices is not None and r.choices not in seen_choices:
                seen_choices.append(r.choices)  # each evaluation engine once, with the machine it ran on
                log(f"evaluation {Choices.from_dict(r.choices).line()}")
                if store is not None and run_id is not None:
                    store.add_run_engine(run_id, r.choices)
            adapter_dir = save_adapter(r, out_dir / f"layer{r.unit.layer:02d}")
            result = dict(
                layer=r.unit.layer,
                target=r.target,
                bleu=r.bleu,
                seconds=r.seconds,
                curve=r.curve,
                adapter=str(adapter_dir),
            )
            results.append(result)
            progress.advance(f"layer {r.unit.layer}: zero-shot BLEU {r.bleu:.2f} ({r.seconds:.0f}s)")
            if store is not None:
                store.add_lora(
                    r.unit.unit_id,
                    r.unit.layer,
                    r.bleu,
                    dict(
                        r.curve, pair=pair, settings=asdict(settings), n_test=n_test, target=r.target, seconds=r.seconds
                    ),
                    str(adapter_dir),
                )
    return sorted(results, key=lambda r: r["layer"])


def lora_unit_id(pair: str, layer: int, settings: LoraSettings, n_test) -> str:
    """Stable id of one (pair, layer, settings, test size): the store skips what it holds. ``reuse``
    and ``activation_mb`` are left out (they change how, not what, is computed), and so is a setting at
    the value that matches results computed without it, so that ids already in a store stay valid."""
    values = asdict(settings)
    values.pop("reuse")
    values.pop("activation_mb")
    for name, old_default in (("loss", "full"), ("bucketing", False), ("autocast", "off")):
        if values[name] == old_default:  # the behaviour of results stored without this setting
            values.pop(name)
    key = json.dumps(dict(pair=pair, layer=layer, settings=values, n_test=n_test), sort_keys=True)
    return "lora-" + hashlib.sha1(key.encode()).hexdigest()[:12]


def validate_lora(run: LoraRun) -> None:
    """Settings checks that need neither data nor model."""
    s = run.settings
    check_sizes(s)
    check_count("--n-test", run.n_test)
    for name in ("r", "batch_size", "micro_batch", "max_epochs", "patience", "activation_mb"):
        check_count(f"--{name.replace('_', '-')}", getattr(s, name))
    if s.loss not in LOSSES:
        raise UserError(f"--loss must be one of {', '.join(LOSSES)}, got {s.loss!r}")
    check_batching(s.reuse, s.bucketing)
    check_autocast(s.autocast)
    parse_layers(run.layers)
    parse_pair(run.pair)


def run_lora_sweep(run: LoraRun, command: str, ray: RaySettings | None = None) -> tuple[list[dict], Path]:
    """Validate, load, train one adapter per layer into the store (here, or on Ray workers: one unit per
    layer); returns the new results and the store path."""
    validate_lora(run)
    executor = RayExecutor(ray, LoraWorker.load, run) if ray is not None else None  # Ray missing: fails here
    flores_bitext(data_dir_or_default(run.data_dir), *parse_pair(run.pair), "dev")  # data errors before the model
    loaded = (load_description if ray is not None else load_model)(run.model, dtype=run.dtype, device=run.device)
    n = loaded.info.num_layers
    layers = list(range(n)) if run.layers == "all" else parse_layers(run.layers, n - 1)
    out_dir = ensure_dir(run.out_dir)
    store_path = Path(run.store) if run.store else out_dir / "study.sqlite"
    settings = resolve_autocast(run.settings, loaded.info.device)
    store = Store.open(store_path, fingerprint(loaded), attach=store_path.exists())
    try:
        run_id = store.start_run(command, dict(asdict(settings), preset=run.preset), {"model": loaded.info.as_dict()})
        results = lora_sweep(
            loaded,
            run.data_dir,
            run.pair,
            layers,
            settings,
            run.n_test,
            out_dir / "adapters",
            store=store,
            run_id=run_id,
            executor=executor,
        )
    finally:
        store.close()
    return results, store_path
