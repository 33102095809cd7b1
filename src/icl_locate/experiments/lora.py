"""Single-layer LoRA fine-tuning sweep (the paper's last experiment).

For each layer l: a fresh LoRA adapter on that layer's attention output projection only,
trained on FLORES dev lines 1..N in the zero-shot format ``Q:{src}\\nA:{tgt}<eos>`` with a
causal-LM loss (padding ignored), early-stopped on the loss over dev lines 801-997, then
evaluated by greedy zero-shot decoding (no instructions, no examples) on devtest.
"""

from __future__ import annotations

import hashlib
import json
import math
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Sequence

import torch
from torch import nn

from ..core.conditions import MaskedPrompt
from ..core.interventions import UNCHANGED
from ..core.models import LoadedModel, load_model
from ..core.prompts import EncodedPrompt, Example
from ..core.structure import attention_module, decoder_layers
from ..engines.base import Engine, StopRule
from ..engines.sweep import SweepEngine
from ..results.store import Store
from ..tasks.data import data_dir_or_default, flores_bitext, parse_pair
from ..tasks.metrics import translation_scores
from ..util.errors import UserError
from ..util.fileio import ensure_dir
from .common import fingerprint
from .settings import check_count, parse_layers

OUT_PROJ_NAMES = ("o_proj", "out_proj", "dense", "c_proj")  # llama-likes, gpt_neo, bloom/gpt_neox, gpt2


@dataclass
class LoraSettings:
    """The paper's defaults (configs/training + its LoRA script); every one overridable."""

    r: int = 8
    alpha: int = 32
    dropout: float = 0.05
    lr: float = 1e-4
    batch_size: int = 32
    micro_batch: int = 8  # gradient accumulation keeps memory bounded; the update sees batch_size
    val_size: int = 197  # validation pairs from dev 801-997
    max_epochs: int = 100
    patience: int = 5
    threshold: float = 0.01
    train_size: int = 800
    seed: int = 0


def output_projection_name(model: nn.Module, layer: int) -> str:
    """Full module name of layer ``layer``'s attention output projection, for any architecture."""
    layers = decoder_layers(model)
    if not 0 <= layer < len(layers):
        raise UserError(f"layer {layer} out of range: the model has layers 0..{len(layers) - 1}")
    attn = attention_module(layers[layer])
    names = {id(m): n for n, m in model.named_modules()}
    for name, module in attn.named_modules():
        if name.split(".")[-1] in OUT_PROJ_NAMES:
            return f"{names[id(attn)]}.{name}"
    raise UserError(f"no attention output projection ({', '.join(OUT_PROJ_NAMES)}) in layer {layer}")


def attach_adapter(model: nn.Module, layer: int, settings: LoraSettings):
    """A PEFT model with one fresh LoRA adapter on ``layer``'s output projection (base weights frozen)."""
    from peft import LoraConfig, get_peft_model  # lazy: peft's import takes seconds and only LoRA needs it

    target = output_projection_name(model, layer)
    config = LoraConfig(r=settings.r, lora_alpha=settings.alpha, lora_dropout=settings.dropout,
                        target_modules=[target], bias="none", task_type="CAUSAL_LM")
    torch.manual_seed(settings.seed)
    return get_peft_model(model, config), target


def encode_training_pairs(tokenizer, pairs, max_length: int = 512) -> list[list[int]]:
    """``Q:{src}\\nA:{tgt}`` + EOS, tokenised (BOS as the tokenizer adds it)."""
    out = []
    for ex in pairs:
        ids = tokenizer(f"Q:{ex.source.strip()}\nA:{ex.target.strip()}")["input_ids"][:max_length - 1]
        out.append(ids + [tokenizer.eos_token_id])
    return out


def _batch(seqs: list[list[int]], pad_id: int, device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, s in enumerate(seqs):
        ids[i, :len(s)] = torch.tensor(s)
        mask[i, :len(s)] = 1
    labels = ids.masked_fill(mask == 0, -100)  # padding is ignored by the loss
    return ids.to(device), mask.to(device), labels.to(device)


def mean_loss(model, seqs, pad_id: int, micro_batch: int) -> float:
    model.eval()
    total, tokens = 0.0, 0
    seqs = sorted(seqs, key=len)  # similar lengths together: little padding
    with torch.no_grad():
        for i in range(0, len(seqs), micro_batch):
            ids, mask, labels = _batch(seqs[i:i + micro_batch], pad_id, next(model.parameters()).device)
            n = int((labels[:, 1:] != -100).sum())
            total += float(model(input_ids=ids, attention_mask=mask, labels=labels).loss) * n
            tokens += n
    return total / max(tokens, 1)


def train_adapter(peft_model, train: list[list[int]], val: list[list[int]], pad_id: int, settings: LoraSettings,
                  log: Callable[[str], None] = lambda m: None) -> dict:
    """AdamW on the adapter; early stopping on validation loss; the best adapter weights are kept."""
    params = [p for p in peft_model.parameters() if p.requires_grad]
    optim = torch.optim.AdamW(params, lr=settings.lr)
    gen = torch.Generator().manual_seed(settings.seed)
    device = next(peft_model.parameters()).device
    curve = {"train_loss": [], "val_loss": []}
    best, best_state, bad_epochs = math.inf, _adapter_state(peft_model), 0
    for epoch in range(settings.max_epochs):
        peft_model.train()
        order = torch.randperm(len(train), generator=gen).tolist()
        epoch_loss = []
        for start in range(0, len(order), settings.batch_size):
            batch = sorted((train[i] for i in order[start:start + settings.batch_size]), key=len)
            optim.zero_grad()
            n_tokens = sum(len(s) - 1 for s in batch)
            for m in range(0, len(batch), settings.micro_batch):
                ids, mask, labels = _batch(batch[m:m + settings.micro_batch], pad_id, device)
                part = int((labels[:, 1:] != -100).sum())
                loss = peft_model(input_ids=ids, attention_mask=mask, labels=labels).loss * part / n_tokens
                loss.backward()
                epoch_loss.append(float(loss.detach()) * n_tokens / max(part, 1))
            optim.step()
        curve["train_loss"].append(sum(epoch_loss) / max(len(epoch_loss), 1))
        val_loss = mean_loss(peft_model, val, pad_id, settings.micro_batch)
        curve["val_loss"].append(val_loss)
        log(f"    epoch {epoch + 1}: train {curve['train_loss'][-1]:.4f}  val {val_loss:.4f}")
        if val_loss < best - settings.threshold:
            best, best_state, bad_epochs = val_loss, _adapter_state(peft_model), 0
        else:
            bad_epochs += 1
            if bad_epochs >= settings.patience:
                break
    _load_adapter_state(peft_model, best_state)
    curve["best_val_loss"] = best
    return curve


def _adapter_state(peft_model) -> dict:
    return {k: v.detach().clone() for k, v in peft_model.named_parameters() if v.requires_grad}


def _load_adapter_state(peft_model, state: dict) -> None:
    with torch.no_grad():
        for k, v in peft_model.named_parameters():
            if k in state:
                v.copy_(state[k])


def zero_shot_prompts(tokenizer, test: Sequence[Example]) -> list[MaskedPrompt]:
    """Prompts ``Q:{src}\\nA:`` (no instructions, no examples), nothing hidden."""
    items = []
    for ex in test:
        text = f"Q:{ex.source.strip()}\nA:"
        ids = tokenizer(text)["input_ids"]
        bos = 1 if ids and ids[0] == tokenizer.bos_token_id else 0
        encoded = EncodedPrompt(text=text, ids=ids, spans={"bos": (0, bos) if bos else None, "instructions": None,
                                                           "examples": None, "query": (bos, len(ids))})
        items.append(MaskedPrompt.of(encoded, None))
    return items


ZERO_SHOT_STOP = StopRule(("\n", "Q:"), 50)


def evaluate_zero_shot(engine: Engine, tokenizer, test: Sequence[Example], language: str = "en") -> tuple[float, list[str]]:
    """Zero-shot BLEU of the model the engine runs (the adapter in place)."""
    prompts = zero_shot_prompts(tokenizer, test)
    gens = engine.generate(prompts, [UNCHANGED], ZERO_SHOT_STOP)
    texts = [gens[(i, UNCHANGED)].text.split("Q:")[0].strip() for i in range(len(prompts))]
    return translation_scores(texts, [ex.target for ex in test], language).bleu, texts


def lora_sweep(loaded: LoadedModel, data_dir: str | None, pair: str, layers: list[int], settings: LoraSettings,
               n_test: int | None, out_dir: Path, store: Store | None = None, run_id: int | None = None,
               log: Callable[[str], None] = lambda m: print(m, file=sys.stderr, flush=True)) -> list[dict]:
    src, tgt = parse_pair(pair)
    root = data_dir_or_default(data_dir)
    dev = flores_bitext(root, src, tgt, "dev")
    test = flores_bitext(root, src, tgt, "devtest")[:n_test] if n_test else flores_bitext(root, src, tgt, "devtest")
    if not 0 < settings.train_size <= 800:
        raise UserError(f"--train-size must be in 1..800 (dev lines 1-800 are the training pool), got "
                        f"{settings.train_size}")
    n_layers = len(decoder_layers(loaded.model))
    bad = [l for l in layers if not 0 <= l < n_layers]
    if bad:
        raise UserError(f"layers {bad} out of range: the model has layers 0..{n_layers - 1}")
    tok = loaded.tokenizer
    pad_id = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    train = encode_training_pairs(tok, dev[:settings.train_size])
    if not 0 < settings.val_size <= 197:
        raise UserError(f"--val-size must be in 1..197 (dev lines 801-997), got {settings.val_size}")
    val = encode_training_pairs(tok, dev[800:800 + settings.val_size])
    results = []
    for layer in layers:
        unit_id = lora_unit_id(pair, layer, settings, n_test)
        if store is not None and store.has_lora(unit_id):
            log(f"layer {layer}: already in the store, skipped")
            continue
        started = time.time()
        peft_model, target = attach_adapter(loaded.model, layer, settings)
        log(f"layer {layer}: LoRA on {target} ({sum(p.numel() for p in peft_model.parameters() if p.requires_grad)} "
            f"trainable parameters)")
        curve = train_adapter(peft_model, train, val, pad_id, settings, log)
        peft_model.eval()
        bleu, _ = evaluate_zero_shot(SweepEngine(peft_model, tok), tok, test, tgt.iso1 or "en")
        adapter_dir = out_dir / f"layer{layer:02d}"
        peft_model.save_pretrained(adapter_dir)
        result = dict(layer=layer, target=target, bleu=bleu, seconds=time.time() - started, curve=curve,
                      adapter=str(adapter_dir))
        results.append(result)
        log(f"layer {layer}: zero-shot BLEU {bleu:.2f} ({result['seconds']:.0f}s)")
        if store is not None:
            store.add_lora(unit_id, layer, bleu, dict(curve, pair=pair, settings=asdict(settings), n_test=n_test,
                                                      target=target), str(adapter_dir))
        peft_model.unload()  # back to the untouched base model for the next layer
    return results


def lora_unit_id(pair: str, layer: int, settings: LoraSettings, n_test) -> str:
    """Stable id of one (pair, layer, settings, test size): the store skips what it holds."""
    key = json.dumps(dict(pair=pair, layer=layer, settings=asdict(settings), n_test=n_test), sort_keys=True)
    return "lora-" + hashlib.sha1(key.encode()).hexdigest()[:12]


@dataclass
class LoraRun:
    """``icl-locate lora-sweep``: which model, pair and layers, where results go."""

    settings: LoraSettings
    model: str = "gemma-3-270m"
    pair: str = "fra-eng"
    layers: str = "all"
    n_test: int | None = None
    out_dir: str = "runs/lora"
    store: str | None = None
    data_dir: str | None = None
    dtype: str | None = None
    device: str | None = None


def validate_lora(run: LoraRun) -> None:
    """Settings checks that need neither data nor model."""
    s = run.settings
    if not 0 < s.train_size <= 800:
        raise UserError(f"--train-size must be in 1..800 (dev lines 1-800 are the training pool), got {s.train_size}")
    if not 0 < s.val_size <= 197:
        raise UserError(f"--val-size must be in 1..197 (dev lines 801-997), got {s.val_size}")
    check_count("--n-test", run.n_test)
    for name in ("r", "batch_size", "micro_batch", "max_epochs", "patience"):
        check_count(f"--{name.replace('_', '-')}", getattr(s, name))
    parse_layers(run.layers)
    parse_pair(run.pair)


def run_lora_sweep(run: LoraRun, command: str) -> tuple[list[dict], Path]:
    """Validate, load, train one adapter per layer into the store; returns the new results and the store path."""
    validate_lora(run)
    flores_bitext(data_dir_or_default(run.data_dir), *parse_pair(run.pair), "dev")  # data errors before the model
    loaded = load_model(run.model, dtype=run.dtype, device=run.device)
    n = loaded.info.num_layers
    layers = list(range(n)) if run.layers == "all" else parse_layers(run.layers, n - 1)
    out_dir = ensure_dir(run.out_dir)
    store_path = Path(run.store) if run.store else out_dir / "study.sqlite"
    store = Store.open(store_path, fingerprint(loaded), attach=store_path.exists())
    try:
        run_id = store.start_run(command, asdict(run.settings), {"model": loaded.info.as_dict()})
        results = lora_sweep(loaded, run.data_dir, run.pair, layers, run.settings, run.n_test, out_dir / "adapters",
                             store=store, run_id=run_id)
    finally:
        store.close()
    return results, store_path
