"""The Python API: icl-locate from a notebook or a script, over the same code the command line runs.

* ``load_model(spec)``: any ``--model`` spec (alias, hub id, directory, ``.gguf`` file, ``tiny:<family>``);
* ``prompts(lm, task, ...)``: a task's test items as prompts under a masking condition (``Item``: the
  prompt text, the reference, the token ids and the token ranges the condition hides);
* ``generate(lm, items, interventions)``: greedy generations under row interventions (``MaskFrom(j)``,
  ``MaskBelow(j)``, ``HeadMask``, ``AblateLayers``, ``UNCHANGED``): text, answer and token ids (``Output``);
* ``sweep(config, store)``: a grid into a resumable SQLite store, as ``icl-locate sweep`` (``SweepConfig``);
* ``plan(config)``: what that sweep will cost (units, rows, tokens, FLOPs, memory, time), no weights loaded;
* ``atlas(config, store)``: masking, task vectors, function vectors and the logit lens on one depth axis;
* ``run``, ``bench``, ``prune``, ``lora_sweep``, ``report``: the commands of the same names, from their
  settings (a dataclass of ``icl_locate.experiments.options`` or a dict of its fields);
* ``open_store(path)``: a ``Study``: the store's curves, recognition layers, head maps, generations, LoRA
  and pruning results as pandas DataFrames with tidy columns, and its figures as matplotlib Figures.

Nothing is computed here: each function hands its arguments to the code the commands use, and the
command line calls these functions, so the API and the command line give the same results (tested).
This module imports torch and pandas; the package exposes its names lazily (``icl_locate/__init__.py``),
so ``import icl_locate`` stays light.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from . import __all__ as __all__  # the public names, listed once in the package, which exposes them lazily
from .core import models
from .core.catalog import EMBEDDED
from .core.conditions import MaskedPrompt, get_condition
from .core.interventions import UNCHANGED as UNCHANGED  # re-exported: the row interventions generate takes
from .core.interventions import AblateLayers as AblateLayers
from .core.interventions import HeadMask as HeadMask
from .core.interventions import MaskBelow as MaskBelow
from .core.interventions import MaskFrom as MaskFrom
from .core.interventions import RowIntervention
from .core.models import LoadedModel
from .engines.base import DEFAULT_STOP, Engine, StopRule
from .engines.calibrate import Calibrator, build_engine
from .engines.reference import ReferenceEngine
from .engines.request import ENGINES, EngineRequest
from .experiments.atlas import AtlasResult, run_atlas
from .experiments.bench import BenchResult, run_bench
from .experiments.common import check_context, masked_prompts, stop_rule
from .experiments.decode import RunResult, run_decode
from .experiments.lora import lora_settings, run_lora_sweep
from .experiments.options import (
    BenchSettings,
    LoraRun,
    LoraSettings,
    PlanSettings,
    PruneSettings,
    RaySettings,
    ReportSettings,
    RunSettings,
)
from .experiments.plan import Plan, run_plan
from .experiments.prune import PruneResult, run_prune
from .experiments.settings import ModelAndData, SweepConfig, check_known, load_config, task_and_data
from .experiments.sweep import SweepResult, run_sweep
from .results.report import build_report
from .results.store import Store
from .results.study import Study
from .tasks.items import build_items, check_label_variant, labelled_task, post_process
from .tasks.spec import Task
from .util.errors import UserError


def load_model(spec: str = EMBEDDED, dtype: str | None = None, device: str | None = None) -> LoadedModel:
    """A model prepared for masking, by any ``--model`` spec: an alias (``icl-locate models``), a hub id,
    a checkpoint directory, a ``.gguf`` file or ``tiny:<family>`` (random, for tests).

    The result has ``.model`` (the torch module, eval mode), ``.tokenizer`` and ``.info`` (layers, heads,
    context length, dtype, device). ``dtype`` None: float32 on a CPU, bfloat16 on a GPU; ``device`` None:
    the GPU if there is one."""
    return models.load_model(spec, dtype=dtype, device=device)


# --------------------------------------------------------------------------- prompts and generations


@dataclass(frozen=True)
class Item:
    """One test item's prompt under a masking condition: what ``generate`` takes.

    ``prompt`` is what the engines take: the token ids (``prompt.ids``), the token spans of the prompt's
    parts (``prompt.spans``: bos, instructions, examples, query) and the token ranges [start, end) the
    condition hides (``prompt.hidden``). ``task`` is the task as scored: its stop strings, answer clean-up
    and metric.
    """

    id: str  # the test item's id in its data
    source: str  # the test input
    reference: str  # the expected answer (label variant "abstract": in the examples' symbols)
    text: str  # the whole prompt: instructions, examples, query
    prompt: MaskedPrompt = field(repr=False)
    task: Task = field(repr=False)
    example_ids: tuple[str, ...]  # the in-context examples, in prompt order

    @property
    def hidden_text(self) -> list[str]:
        """The prompt's text in each hidden token range, in order: what the condition hides."""
        offsets = self.prompt.encoded.offsets
        return [self.text[offsets[start][0] : offsets[end - 1][1]] for start, end in self.prompt.hidden]


def prompts(
    lm: LoadedModel,
    task: str = "flores",
    *,
    pair: str | None = "fra-eng",
    condition: str | None = "instructions+examples",
    k: int = 5,
    seed: int = 0,
    n_test: int | None = None,
    instructions: bool = True,
    labels: str = "gold",
    per_query_examples: bool = False,
    data_dir: str | Path | None = None,
    bank: str | None = None,
    test: str | None = None,
    src_lang: str | None = None,
    tgt_lang: str | None = None,
) -> list[Item]:
    """The first ``n_test`` test items of ``task`` (all if None) as prompts, exactly as a sweep builds them.

    ``task``: a built-in task (``icl-locate tasks``) or a task file; ``pair`` is for translation tasks
    (ignored by the others). ``condition``: the masking condition (``icl-locate conditions``; None: nothing
    hidden, for layer ablation). ``k`` examples drawn with ``seed`` (one set shared by every query, or one
    per query with ``per_query_examples``), with or without the task's ``instructions``; ``labels``: the
    examples' label variant (gold, random, shuffled, abstract). ``data_dir`` defaults to
    ``$ICL_LOCATE_DATA_DIR``; ``bank``/``test``/``src_lang``/``tgt_lang`` are the bitext task's files and
    languages. Raises ``UserError`` for a bad setting, before any decoding.
    """
    settings = ModelAndData(
        task=task,
        data_dir=None if data_dir is None else str(data_dir),
        bank=bank,
        test=test,
        src_lang=src_lang,
        tgt_lang=tgt_lang,
    )
    the_task, data = task_and_data(settings, pair)
    check_label_variant(the_task, labels)
    masking = get_condition(condition) if condition is not None else None
    built = build_items(the_task, data, lm.tokenizer, k, seed, n_test, instructions, per_query_examples, labels)
    scored = labelled_task(the_task, data, labels, seed)
    return [
        Item(it.item.id, it.item.source, it.item.target, it.prompt.text, masked, scored, tuple(it.encoded.example_ids))
        for it, masked in zip(built, masked_prompts(built, masking))
    ]


@dataclass(frozen=True)
class Output:
    """The greedy generation of one (prompt, intervention) pair."""

    item: int  # the prompt's index in what ``generate`` was given
    intervention: RowIntervention
    text: str  # the continuation as decoded (a stop string it hit included)
    answer: str  # what the task scores: ``text`` cut at the task's delimiters and trimmed
    token_ids: tuple[int, ...]  # the generated tokens (EOS not included)
    finish: str  # "stop" (a stop string), "eos" or "length" (the token limit)


def generate(
    lm: LoadedModel,
    items: Sequence[Item] | Sequence[MaskedPrompt],
    interventions: RowIntervention | Sequence[RowIntervention],
    max_new_tokens: int | None = None,
    engine: str = "reference",
) -> list[Output]:
    """Greedy generations of every prompt under every intervention: items outer, interventions inner.

    ``items``: ``Item``s from ``prompts`` (one task: its stop strings and token limit apply), or
    ``MaskedPrompt``s (decoding stops at EOS or the limit). ``interventions``: one row intervention or
    several, e.g. ``MaskFrom(j)`` (the hidden columns hidden from every layer >= j; j = the number of
    layers hides nothing), ``MaskBelow(j)`` (below j, for "-below" conditions), ``HeadMask`` (from chosen
    (layer, head) pairs only), ``AblateLayers`` (whole attention sublayers removed), ``UNCHANGED``.
    ``max_new_tokens`` overrides the task's limit. ``engine``: "reference" (one prompt at a time: the
    oracle), "auto" (the engine a sweep would measure fastest for this work on this machine), "fast" or
    "tree"; all give the same tokens.
    """
    given = list(items)
    if not given:
        raise UserError("generate needs at least one prompt")
    rows = [interventions] if isinstance(interventions, RowIntervention) else list(interventions)
    task = _one_task(given)
    stop = stop_rule(task, max_new_tokens) if task else StopRule((), max_new_tokens or DEFAULT_STOP.max_new_tokens)
    masked = [it.prompt if isinstance(it, Item) else it for it in given]
    check_context(masked, lm, stop.max_new_tokens)
    gens = _engine_for(lm, engine, masked, rows, stop).generate(masked, rows, stop)
    return [
        Output(i, row, g.text, _answer(task, g.text), tuple(g.token_ids), g.finish)
        for i in range(len(masked))
        for row in rows
        for g in [gens[(i, row)]]
    ]


def _answer(task: Task | None, text: str) -> str:
    """What the task scores of a continuation (bare prompts: the continuation trimmed)."""
    return post_process(task, text) if task is not None else text.strip()


def _one_task(given: Sequence[Item | MaskedPrompt]) -> Task | None:
    """The task of the ``Item``s given (None for bare prompts); items of different tasks are refused."""
    tasks = [it.task for it in given if isinstance(it, Item)]
    if len(tasks) not in (0, len(given)) or any(t != tasks[0] for t in tasks):
        raise UserError("generate takes the items of one task (one prompts() call), or bare MaskedPrompts")
    return tasks[0] if tasks else None


def _engine_for(
    lm: LoadedModel, name: str, masked: Sequence[MaskedPrompt], rows: Sequence[RowIntervention], stop: StopRule
) -> Engine:
    """The reference engine, or the engine ``Calibrator`` chooses for this work (``name``: auto, fast, tree)."""
    model = lm.model
    if model is None:
        raise UserError(f"{lm.info.spec} was loaded without its weights; use load_model")
    if name == "reference":
        return ReferenceEngine(model, lm.tokenizer)
    if name not in ENGINES:
        raise UserError(f"engine must be 'reference' or one of {', '.join(ENGINES)}, got {name!r}")
    calibrator = Calibrator(model, lm.tokenizer, EngineRequest(engine=name))
    choices = calibrator.choose(masked, rows, stop, lm.info.as_dict())
    return build_engine(model, lm.tokenizer, choices, calibrator)


# --------------------------------------------------------------------------- sweeps


def sweep(
    config: SweepConfig | Mapping[str, Any] | None,
    store: str | Path,
    *,
    preset: str | None = None,
    ray: RaySettings | Mapping[str, Any] | None = None,
    command: str = "icl_locate.api.sweep",
) -> SweepResult:
    """Run a sweep into the SQLite ``store`` (created, or resumed: units it holds are skipped), as
    ``icl-locate sweep`` does with the same settings.

    ``config``: a ``SweepConfig``, or a dict of its fields (on top of ``preset``, e.g. "paper-mt"), as a
    ``--config`` YAML file holds them: ``{"model": "tiny:llama", "pairs": ["fra-eng"], "layers": "0,2,4"}``.
    ``ray``: ``RaySettings`` (or a dict of its fields) to compute units on Ray workers; None: here.
    ``command``: what the store's run record names as the command that wrote it.
    Returns the counts of units planned, skipped and run, and the summary lines the command prints.
    """
    return run_sweep(_sweep_config(config, preset), store, command, _ray(ray))


def plan(
    config: SweepConfig | Mapping[str, Any] | None,
    *,
    preset: str | None = None,
    ray: RaySettings | Mapping[str, Any] | None = None,
    tflops: float | None = None,
    settings: PlanSettings | None = None,
    log: Callable[[str], None] | None = None,
) -> Plan:
    """What ``sweep`` would cost with the same settings, without loading weights, as ``icl-locate plan``:
    a ``Plan`` with the units' rows, tokens, FLOPs per engine and memory, ``total(name)``, ``flops(engine)``,
    ``seconds(engine, workers)``, ``table()`` and ``as_dict()``. ``tflops``: a worker's throughput (None:
    measured here); ``settings``: every ``PlanSettings`` field instead (``--json``, ``--store``, ...).
    ``log``: where progress lines go (None: nowhere)."""
    if settings is not None and tflops is not None:
        raise UserError("give tflops inside the PlanSettings, not beside them")
    settings = settings or PlanSettings(tflops=tflops)
    return run_plan(_sweep_config(config, preset), settings, _ray(ray), log=log or _quiet)


def atlas(
    config: SweepConfig | Mapping[str, Any] | None,
    store: str | Path,
    out_dir: str | Path | None = None,
    *,
    preset: str | None = None,
    ray: RaySettings | Mapping[str, Any] | None = None,
    command: str = "icl_locate.api.atlas",
    log: Callable[[str], None] | None = None,
) -> AtlasResult:
    """The depth atlas of ``config``'s (model, task) cells, as ``icl-locate atlas``: runs into ``store``
    whichever of the masking, task-vector, function-vector and logit-lens units it lacks, then draws
    the atlas figures into ``out_dir`` (None: ``<store>_atlas/``). Returns the figures' paths, one
    line per cell and method (the layer it points to) and each method's decoding seconds."""
    out = out_dir if out_dir is not None else f"{Path(store).with_suffix('')}_atlas"
    return run_atlas(_sweep_config(config, preset), store, out, command, _ray(ray), log=log or _quiet)


# --------------------------------------------------------------------------- the other commands


def run(settings: RunSettings | Mapping[str, Any], *, log: Callable[[str], None] | None = None) -> RunResult:
    """One condition on a task's test items, decoded and scored, as ``icl-locate run`` (``RunSettings``:
    model, task, pair, condition, from_layer, k, seed, n_test, ..., ``out`` for a JSONL of predictions).
    Returns the predictions' rows, the metric's summary line and the decoding seconds."""
    return run_decode(_settings(RunSettings, settings, "run"), log=log or _quiet)


def bench(settings: BenchSettings | Mapping[str, Any], *, log: Callable[[str], None] | None = None) -> BenchResult:
    """The engines' benchmark, as ``icl-locate bench``: the paper's method, the fast engine and the
    chosen engine on the same prompts; ``.data`` holds the seconds, speed-ups, agreement and hardware."""
    return run_bench(_settings(BenchSettings, settings, "bench"), log=log or _quiet)


def prune(
    settings: PruneSettings | Mapping[str, Any],
    *,
    command: str = "icl_locate.api.prune",
    log: Callable[[str], None] | None = None,
) -> PruneResult:
    """The context pruned from layer ``r`` (``settings.layer``) against the full prompt, as
    ``icl-locate prune``: tokens, FLOPs and seconds saved, identical generations checked, stored in
    ``settings.store`` when given."""
    return run_prune(_settings(PruneSettings, settings, "prune"), command, log=log or _quiet)


def lora_sweep(
    settings: LoraRun | Mapping[str, Any],
    *,
    ray: RaySettings | Mapping[str, Any] | None = None,
    command: str = "icl_locate.api.lora_sweep",
) -> tuple[list[dict], Path]:
    """One LoRA adapter per layer, trained and scored into a store, as ``icl-locate lora-sweep``
    (``LoraRun``: model, pair, layers, its ``LoraSettings``; ``experiments.lora.lora_settings`` builds
    those from a preset). A dict takes ``LoraRun``'s fields and ``LoraSettings``' beside them (or as a
    ``settings`` dict), on top of its ``preset``, as the command's options do. Returns the new results and
    the store's path."""
    return run_lora_sweep(_lora_run(settings), command, _ray(ray))


def report(store: str | Path, out_dir: str | Path | None = None, **options: Any) -> Path:
    """The store's report, as ``icl-locate report``: one self-contained HTML file (``format="md"``:
    Markdown) with its figures as PNG files beside it in ``out_dir`` (None: ``<store>_report/``);
    ``options``: the other ``ReportSettings`` fields (``format``, ``fraction``, ``bootstrap``).
    Returns the report's path."""
    given = {"store": str(store), "out_dir": None if out_dir is None else str(out_dir), **options}
    s = _settings(ReportSettings, given, "report")
    with Store(Path(s.store), create=False) as opened:
        return build_report(opened, s.output_dir(), fmt=s.format, fraction=s.fraction, n_boot=s.bootstrap)


def _quiet(line: str) -> None:
    """A log that drops its lines: an API call returns what its command prints (a sweep's per-unit progress
    still goes to stderr, as the command's does)."""


def _ray(ray: RaySettings | Mapping[str, Any] | None) -> RaySettings | None:
    return None if ray is None else _settings(RaySettings, ray, "ray")


def _lora_run(given: LoraRun | Mapping[str, Any]) -> LoraRun:
    """A ``LoraRun`` as given, or from a dict of its fields and of ``LoraSettings``' (flat, or in ``settings``)."""
    if isinstance(given, LoraRun):
        return given
    if not isinstance(given, Mapping):
        raise UserError(f"lora_sweep settings must be a LoraRun or a dict of its fields, not {type(given).__name__}")
    run_fields, values = set(LoraRun.__dataclass_fields__), dict(given)
    training = values.pop("settings", None)
    if not isinstance(training, LoraSettings):
        if not isinstance(training, (Mapping, type(None))):
            raise UserError(f"lora_sweep's settings must be LoraSettings or a dict, not {type(training).__name__}")
        chosen = {**(training or {}), **{k: values.pop(k) for k in list(values) if k not in run_fields}}
        unknown = sorted(set(chosen) - set(LoraSettings.__dataclass_fields__))
        if unknown:
            known = sorted(run_fields | set(LoraSettings.__dataclass_fields__))
            raise UserError(f"unknown lora_sweep setting(s) {', '.join(unknown)}; known: {', '.join(known)}")
        training = lora_settings(values.get("preset"), chosen)
    return _settings(LoraRun, {**values, "settings": training}, "lora_sweep")


def _settings(cls, given, command: str):
    """``given`` as the settings dataclass ``cls``: itself, or built from a dict of its fields."""
    if isinstance(given, cls):
        return given
    if not isinstance(given, Mapping):
        raise UserError(
            f"{command} settings must be a {cls.__name__} or a dict of its fields, not {type(given).__name__}"
        )
    check_known(given, set(cls.__dataclass_fields__), command)
    try:
        return cls(**given)
    except TypeError as error:  # a required field missing
        raise UserError(f"{command} settings: {error}") from None


def _sweep_config(config: SweepConfig | Mapping[str, Any] | None, preset: str | None) -> SweepConfig:
    """A ``SweepConfig`` as given, or from a dict of its fields on top of ``preset``."""
    if isinstance(config, SweepConfig):
        if preset is not None:
            raise UserError("a preset goes with a dict of settings, not with a SweepConfig")
        return config
    return load_config(preset, None, dict(config or {}))


def open_store(path: str | Path) -> Study:
    """The study store at ``path`` (written by ``sweep``, ``prune``, ``lora-sweep``), opened for reading."""
    return Study(path)
