"""Sweep settings and planning: presets, YAML configs, validation, and the grid as work units.

Everything here runs before any model loads, so a bad setting costs nothing: ``validate``
checks names, numbers and layer syntax; ``load_task_data`` reads the data (bad paths and
language codes fail here); ``planning.plan_units`` (pure) turns a config into ``WorkUnit``s with
stable ids once the model's number of layers is known. A unit = one (task, pair, condition or layer
ablation, instructions on/off, seed, k) over all requested layers and test items; the engine
decodes its (item, layer) rows together, and the store commits it in one transaction.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, fields
from types import UnionType
from typing import get_args, get_origin, get_type_hints

from ..core.catalog import EMBEDDED, check_dtype_name
from ..core.conditions import get_condition
from ..engines.request import EngineRequest, auto_or_count, parse_draft_tokens
from ..tasks.data import parse_pair
from ..tasks.items import check_label_variant
from ..tasks.loaders import load_data
from ..tasks.registry import get_task
from ..tasks.spec import Task, TaskData, TaskOptions
from ..util.errors import UserError
from ..util.fileio import read_yaml_mapping
from .presets import PRESETS


@dataclass(kw_only=True)
class ModelAndData:
    """Settings every experiment shares: the model, the task, where it runs and where the data is."""

    model: str = EMBEDDED  # the embedded Gemma-3-270M: runs offline, on a CPU
    task: str = "flores"  # a built-in task or a task file
    data_dir: str | None = None  # None: $ICL_LOCATE_DATA_DIR, else the XDG data directory
    dtype: str | None = None  # None: the device's default (float32 on a CPU, bfloat16 on a GPU)
    device: str | None = None  # None: a GPU where there is one
    bank: str | None = None  # bitext: your prompt bank and test files, and their languages
    test: str | None = None
    src_lang: str | None = None
    tgt_lang: str | None = None


@dataclass(kw_only=True)
class SweepConfig(ModelAndData):
    pairs: list[str] = field(default_factory=lambda: ["fra-eng"])  # the direction the embedded model translates
    conditions: list[str] = field(default_factory=lambda: ["instructions+examples"])  # the paper's main condition
    instructions: list[bool] = field(default_factory=lambda: [True])  # with the instruction header, as the paper
    # what the examples' answers say (core/labels.py): gold, random, shuffled, abstract; one unit each
    labels: list[str] = field(default_factory=lambda: ["gold"])
    seeds: list[int] = field(default_factory=lambda: [0])  # example draws: one per unit
    ks: list[int] = field(default_factory=lambda: [5])  # in-context examples: the paper's setting
    layers: str = "all"  # "all" = 0..L, or "0,4,8"
    layer_ablation: bool = False  # also run one unit per (pair, seed, k) ablating each layer's attention
    n_test: int | None = None  # None = the whole test set
    max_new_tokens: int | None = None  # None = the task's
    batch_size: int | None = None  # None: the engines' memory rule, scaled where the calibration measured it to pay
    # the engine, its LM head and drafts: "auto" measures each choice on this machine and model
    # (engines/calibrate.py); "tree" / "fast", a screen / "plain" and a number force one
    engine: str = "auto"
    head: str = "auto"
    draft_tokens: int | str = "auto"
    # after each unit, some of its (item, layer) rows are decoded again by the reference engine and
    # compared (engines/audit.py): "auto" as many as keep the audit within 5% of the decoding time
    # (at least one), or this many per unit (0: none)
    audit: int | str = "auto"
    audit_seed: int = 0  # the rows are drawn with this seed and the unit's id (stored with each row)
    heads: str | None = None  # "knockout" or "restore": head-level sweeps instead of layer-from masks
    from_layer: int | None = None  # restore: the context is hidden from this layer on (default: below recognition)
    # "mask": the layer sweeps above; "task-vector", "function-vector", "logit-lens": the same depth axis by
    # another method (experiments/methods.py), one unit per (pair, seed, k, instructions; lens: condition)
    method: str = "mask"
    top_heads: int | None = None  # function vectors: heads summed (None: Todd et al.'s share, methods.py)


HEAD_SWEEPS = ("knockout", "restore")
METHODS = ("mask", "task-vector", "function-vector", "logit-lens")  # "mask": the layer sweeps of --conditions


def audit_per_unit(setting: int | str | None) -> int | None:
    """--audit: 'auto' -> None (rows within the audit's share of the decoding time), else rows per unit."""
    return auto_or_count("--audit", setting)


def engine_request(config: SweepConfig) -> EngineRequest:
    """The engine choices the config forces (checked); "auto" ones are measured when the model is loaded."""
    request = EngineRequest(config.engine, config.head, parse_draft_tokens(config.draft_tokens), config.batch_size)
    request.check()
    return request


def load_config(preset: str | None = None, yaml_path: str | None = None, overrides: dict | None = None) -> SweepConfig:
    """Preset, then YAML file, then command-line overrides (None values ignored)."""
    values: dict = {}
    if preset:
        if preset not in PRESETS:
            raise UserError(f"unknown preset {preset!r}; available: {', '.join(PRESETS)}")
        values.update(PRESETS[preset])
    if yaml_path:
        values.update(
            read_yaml_mapping(yaml_path, "a sweep config holds a mapping of sweep settings", empty_ok=True)[0]
        )
    values.update({k: v for k, v in (overrides or {}).items() if v is not None})
    check_known(values, {f.name for f in fields(SweepConfig)}, "sweep")
    hints = get_type_hints(SweepConfig)
    for name, value in values.items():
        check_setting_type(name, value, hints[name])
    return SweepConfig(**values)


def check_known(values, known: set[str], what: str) -> None:
    """One error line naming the settings in ``values`` that are not ``known`` (and those that are)."""
    unknown = sorted(set(values) - known)
    if unknown:
        raise UserError(f"unknown {what} setting(s) {', '.join(unknown)}; known: {', '.join(sorted(known))}")


def _type_name(hint) -> str:
    if hint is type(None):
        return "null"
    if get_origin(hint) is list:
        return f"a list of {_type_name(get_args(hint)[0])}"
    return getattr(hint, "__name__", str(hint))


def check_setting_type(name: str, value, hint) -> None:
    """A setting from a dict or a YAML file must have its field's type (``ks: 2`` where a list is wanted, or
    ``n_test: "8"``, would fail later with a TypeError, or be taken apart character by character)."""
    options = get_args(hint) if isinstance(hint, UnionType) else (hint,)
    for option in options:
        if option is type(None) and value is None:
            return
        if get_origin(option) is list and isinstance(value, list):
            (element,) = get_args(option)
            if all(type(v) is element or (element is float and type(v) is int) for v in value):
                return
        elif option in (int, str, bool, float) and (type(value) is option or (option is float and type(value) is int)):
            return
    wanted = " or ".join(_type_name(o) for o in options)
    raise UserError(f"sweep setting {name} must be {wanted}, got {value!r}")


UNIT_FIELDS_ADDED = {
    "data": "",
    "from_layer": None,
    "labels": "gold",
    "top_heads": None,
}  # field -> the value older units had


@dataclass(frozen=True)
class WorkUnit:
    task: str
    pair: str
    kind: str  # "mask", "ablation", "knockout" or "restore"
    condition: str  # masking condition ("" for ablation)
    instructions: bool
    seed: int
    k: int
    n_test: int | None
    layers: tuple[int, ...]
    data: str = ""  # identity of user data (task file, files); "" for the built-in datasets
    from_layer: int | None = None  # restore: the layer from which the context is hidden
    labels: str = "gold"  # the examples' label variant (core/labels.py)
    top_heads: int | None = None  # function-vector units: the heads summed into the vector

    @property
    def unit_id(self) -> str:
        spec = asdict(self)
        for key, default in UNIT_FIELDS_ADDED.items():  # fields added later: ids of older kinds stay as they were
            if spec[key] == default:
                del spec[key]
        return hashlib.sha1(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:16]

    def label(self) -> str:
        what = {
            "mask": self.condition,
            "ablation": "layer ablation",
            "knockout": f"{self.condition} head knockout",
            "restore": f"{self.condition} head restoration from {self.from_layer}",
            "task-vector": "task vector",
            "function-vector": f"function vector of {self.top_heads} heads",
            "logit-lens": f"logit lens, {self.condition} visible and hidden",
        }[self.kind]
        labels = f" labels={self.labels}" if self.labels != "gold" else ""
        return (
            f"{self.task} {self.pair or ''} {what} {'instr' if self.instructions else 'no-instr'} "
            f"seed={self.seed} k={self.k}{labels}"
        ).replace("  ", " ")


def parse_layers(spec: str, n_layers: int | None = None) -> list[int]:
    """'all' -> 0..L (L = no mask); else a comma list like '0,6,12,18'. Without ``n_layers``
    (before the model is loaded) only the syntax is checked and 'all' gives []."""
    if spec == "all":
        return list(range(n_layers + 1)) if n_layers is not None else []
    try:
        layers = sorted({int(x) for x in spec.split(",") if x.strip()})
    except ValueError:
        raise UserError(f"--layers must be 'all' or a comma list of integers, got {spec!r}") from None
    if not layers or (n_layers is not None and any(not 0 <= x <= n_layers for x in layers)) or layers[0] < 0:
        raise UserError(f"--layers must lie in 0..{n_layers if n_layers is not None else 'L'}, got {spec!r}")
    return layers


def check_count(name: str, value: int | None, minimum: int = 1) -> None:
    if value is not None and value < minimum:
        raise UserError(f"{name} must be >= {minimum}, got {value}")


def validate(config: SweepConfig) -> None:
    """Every check that needs no data and no model: names, numbers, layer syntax."""
    task = sweep_task(config)
    for c in config.conditions:
        get_condition(c)
    if not config.conditions and not config.layer_ablation:
        raise UserError("nothing to run: no conditions and no layer ablation")
    if any(k < 0 for k in config.ks):
        raise UserError("k must be >= 0")
    if not config.seeds or not config.ks or not config.instructions or not config.labels:
        raise UserError("seeds, ks, instructions and labels must each hold at least one value")
    for variant in config.labels:
        check_label_variant(task, variant)
    if config.labels != ["gold"] and (config.heads is not None or config.layer_ablation):
        raise UserError("--labels other than gold are for layer-from masking sweeps (not --heads or --layer-ablation)")
    check_count("--n-test", config.n_test)
    if config.heads is not None:
        if config.heads not in HEAD_SWEEPS:
            raise UserError(f"--heads must be knockout or restore, got {config.heads!r}")
        if not config.conditions:
            raise UserError("--heads needs a condition (the columns hidden from the heads)")
        if config.layer_ablation:
            raise UserError("--heads and --layer-ablation are separate sweeps; run them one after the other")
        if any(get_condition(c).window != "from" for c in config.conditions):
            raise UserError("--heads hides the context from heads at layers >= j; drop the '-below' conditions")
    check_method(config)
    if config.from_layer is not None and config.heads != "restore":
        raise UserError("--from-layer is for --heads restore")
    check_count("--from-layer", config.from_layer, minimum=0)
    check_count("--max-new-tokens", config.max_new_tokens)
    audit_per_unit(config.audit)
    check_count("--batch-size", config.batch_size)
    engine_request(config)
    parse_layers(config.layers)
    check_dtype_name(config.dtype)
    if task.needs_pair:
        if not config.pairs:
            raise UserError(f"task {config.task} needs at least one language pair (--pairs)")
        for pair in config.pairs:
            parse_pair(pair)


def check_method(config: SweepConfig) -> None:
    """--method and what it can be combined with."""
    if config.method not in METHODS:
        raise UserError(f"--method must be one of {', '.join(METHODS)}, got {config.method!r}")
    check_count("--top-heads", config.top_heads)
    if config.top_heads is not None and config.method != "function-vector":
        raise UserError("--top-heads is for --method function-vector")
    if config.method == "mask":
        return
    if config.heads is not None or config.layer_ablation or config.labels != ["gold"]:
        raise UserError(f"--method {config.method} runs alone: drop --heads, --layer-ablation and --labels")
    if config.method == "function-vector" and any(k < 2 for k in config.ks):
        raise UserError("--method function-vector corrupts prompts by shuffling the examples' answers: --k >= 2")
    if config.method == "task-vector" and config.n_test == 1:
        raise UserError("--method task-vector reads each query's vector from another query's prompt: --n-test >= 2")
    if config.method == "task-vector" and any(k < 1 for k in config.ks):
        raise UserError("--method task-vector reads its vector from an ICL prompt: --k >= 1")


def task_pairs(config: SweepConfig) -> list[str]:
    """The language pairs of the grid ("" for tasks that take none: pairs only mean something for MT)."""
    return config.pairs if sweep_task(config).needs_pair else [""]


LoadedTasks = dict[tuple[str, str], tuple[Task, TaskData]]  # (task name, pair) -> the task and its data


def sweep_task(config: SweepConfig) -> Task:
    return get_task(config.task, config.src_lang, config.tgt_lang)


def task_and_data(
    settings: ModelAndData, pair: str | None, log: Callable[[str], None] = lambda line: None
) -> tuple[Task, TaskData]:
    """The settings' task (name or task file) and its data for ``pair``; bad paths or files fail here,
    before any model loads. "read N pairs from FILE" lines go to ``log``."""
    task = get_task(settings.task, settings.src_lang, settings.tgt_lang)
    data = load_data(
        task,
        TaskOptions(
            data_dir=settings.data_dir,
            pair=pair,
            bank_path=settings.bank,
            test_path=settings.test,
            src_lang=settings.src_lang,
            tgt_lang=settings.tgt_lang,
        ),
    )
    for note in data.notes:
        log(note)
    return task, data


def load_task_data(config: SweepConfig, log: Callable[[str], None] = lambda line: None) -> LoadedTasks:
    """Read each (task, pair) of the grid once (``task_and_data``)."""
    loaded = {}
    for pair in task_pairs(config):
        task, data = task_and_data(config, pair or None, log)
        loaded[(task.name, pair)] = (task, data)
    return loaded
