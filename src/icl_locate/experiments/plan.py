"""``icl-locate plan``: what a sweep will cost, before any weights load.

The sweep's own planner gives the units (``planning.plan_units``) and each unit's rows
(``units.row_interventions``: item x layer x variant, as the sweep decodes and stores them; method units
as ``unit_costs`` describes), so rows are exact. Prompt tokens are counted with the model's tokenizer
where it loads without weights and without a network (tiny models, the embedded model once built, local
and cached hub checkpoints), else estimated from characters (``PlanSettings.chars_per_token``), and the
plan says which. FLOPs, KV-cache and activation bytes come from the cost model (``core/costs.py``) on
the model's shape (its config, or an alias's shipped numbers: ``core/shapes.py``). Time = FLOPs / a
throughput, measured here (a matmul of the model's sizes in the dtype, cached) or given (``--tflops``);
with N Ray workers the units go, in the sweep's order, to the worker free first, and the longest
worker's share counts.

Engines, per unit (padding left out; G generated tokens a row, G - 1 of them fed back):

* paper: every row runs its full prompt and its decoding through every layer;
* fast: the shared context once per prefix cache (one, plus one per row intervention that needs its
  own: ``rows.plan_rows``), then every row's query and decoding;
* tree: as fast, but at layer l the rows of a query that continue the shared context run one state
  for all rows whose divergence layer is above l (``rows.divergence_layer``). This assumes
  they keep one history: a lower bound, since rows that pick different tokens split towards fast.
"""

from __future__ import annotations

import heapq
import sys
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from huggingface_hub import try_to_load_from_cache
from transformers import AutoConfig

from ..core.catalog import ALIASES, DTYPE_NAMES, EMBEDDED
from ..core.checkpoints import built_embedded_checkpoint
from ..core.costs import shape_of_config
from ..core.models import load_description, load_model
from ..core.shapes import ALIAS_SHAPES, DTYPE_BYTES, ModelShape
from ..engines.matmul_rate import matmul_tflops
from ..results.store import Store
from ..util.errors import UserError
from ..util.fileio import check_writable, write_json_atomic
from ..util.system import hardware, hardware_line
from .common import stop_rule
from .options import PlanSettings, RaySettings
from .planning import plan_units
from .settings import SweepConfig, WorkUnit, load_task_data, sweep_task, validate
from .sweep import check_k, recognition_below
from .unit_costs import ENGINES, CharTokens, ItemSet, UnitCost, unit_cost, unit_items

HEAD_SLICE = 32_768  # vocabulary columns the LM head's product is timed on (as fast per FLOP, less memory)


# --------------------------------------------------------------------------- the model, without weights


@dataclass
class ModelView:
    """What plan knows of the model: its shape, and its tokenizer where one loads offline (None: estimate)."""

    spec: str
    source: str
    shape: ModelShape
    tokenizer: Any | None
    note: str  # where the sizes and the token counts come from


def describe_model(spec: str) -> ModelView:
    """The model's sizes and tokenizer from what this machine has: a tiny model is built (no data to
    load), a checkpoint's config and tokenizer are read, an alias not cached falls back to its numbers."""
    if spec.startswith("tiny:"):
        loaded = load_model(spec, dtype="float32", device="cpu")
        assert loaded.model is not None  # built here: a few thousand random weights
        params = sum(p.numel() for p in loaded.model.parameters())
        return ModelView(spec, spec, shape_of_config(loaded.model.config, params), loaded.tokenizer, "built here")
    source = offline_source(spec)
    if source is None:
        if spec not in ALIAS_SHAPES:
            raise UserError(f"no sizes known for {spec!r} offline")
        return ModelView(spec, ALIASES.get(spec, spec), ALIAS_SHAPES[spec], None, "the alias's shipped numbers")
    try:
        loaded = load_description(source, dtype="float32", device="cpu")
        config = AutoConfig.from_pretrained(loaded.info.source)
    except (UserError, OSError, ValueError) as err:
        if spec not in ALIAS_SHAPES:
            raise UserError(f"cannot read the config and tokenizer of {spec!r}: {err}") from None
        return ModelView(spec, source, ALIAS_SHAPES[spec], None, f"the alias's shipped numbers ({err})")
    known = ALIAS_SHAPES[spec].params if spec in ALIAS_SHAPES else None
    return ModelView(spec, loaded.info.source, shape_of_config(config, known), loaded.tokenizer, "its config")


def offline_source(spec: str) -> str | None:
    """Where the model's config and tokenizer load from without building or downloading anything:
    the built embedded checkpoint, a hub cache snapshot of an alias, or the spec itself (a local
    directory, a .gguf file, a hub id: loading it may download, as a sweep's driver does). None: an
    alias that is not on this machine."""
    if spec == EMBEDDED:
        built = built_embedded_checkpoint()
        return str(built) if built else None
    if spec in ALIASES:
        cached = try_to_load_from_cache(ALIASES[spec], "config.json")
        return str(Path(cached).parent) if isinstance(cached, str) else None
    return spec


def makespan(costs: list[float], workers: int) -> float:
    """The longest worker's share when each unit, in order, goes to the worker free first."""
    free = [0.0] * workers
    for cost in costs:
        heapq.heappush(free, heapq.heappop(free) + cost)
    return max(free)


# --------------------------------------------------------------------------- the plan


@dataclass
class Plan:
    """A sweep's predicted cost: per unit, summed, and as time at a throughput (``table``, ``as_dict``)."""

    model: str
    source: str
    sizes_from: str  # "its config", "built here", "the alias's shipped numbers"
    tokens_counted: bool  # False: prompt tokens estimated from characters
    dtype: str
    device: str
    max_new_tokens: int
    shape: ModelShape
    units: list[UnitCost]
    done: int  # units already in the store, not costed
    tflops: float  # one worker's throughput, TFLOP/s
    tflops_from: str  # what was measured, or "given (--tflops)"
    workers: int  # Ray workers (1: the local executor)
    notes: list[str] = field(default_factory=list)

    def total(self, name: str) -> int:
        return sum(getattr(u, name) for u in self.units)

    def flops(self, engine: str, bound: bool = False) -> float:
        return sum((u.flops_bound if bound else u.flops)[engine] for u in self.units)

    def seconds(self, engine: str, workers: int = 1) -> float:
        """Wall time of the units on ``workers`` workers at ``tflops`` each, answers as estimated."""
        return makespan([u.flops[engine] / (self.tflops * 1e12) for u in self.units], workers)

    def weights_bytes(self) -> int:
        return self.shape.params * DTYPE_BYTES[self.dtype]

    def peak(self, name: str) -> int:
        return max((getattr(u, name) for u in self.units), default=0)

    def as_dict(self) -> dict:
        totals = dict(
            units=len(self.units),
            rows=self.total("rows"),
            prompt_tokens=self.total("prompt_tokens"),
            generated_tokens_upper_bound=self.total("generated_bound"),
            generated_tokens_estimate=self.total("generated_estimate"),
            weights_bytes=self.weights_bytes(),
            kv_bytes_per_worker=self.peak("kv_bytes"),
            kv_bytes_per_worker_tree=self.peak("tree_kv_bytes"),
            activation_bytes_per_worker_estimate=self.peak("activation_bytes"),
            flops={e: self.flops(e) for e in ENGINES},
            flops_upper_bound={e: self.flops(e, bound=True) for e in ENGINES},
            seconds_local={e: self.seconds(e) for e in ENGINES},
            seconds_workers={e: self.seconds(e, self.workers) for e in ENGINES},
        )
        return dict(asdict(self), totals=totals)

    def table(self) -> str:
        """The plan as the terminal shows it."""
        tokens = "counted with its tokenizer" if self.tokens_counted else "ESTIMATED (no tokenizer offline)"
        lines = [
            f"plan: {len(self.units)} units to run ({self.done} already in the store); model {self.model} "
            f"({self.source}; sizes: {self.sizes_from}), {self.dtype} on {self.device}",
            f"  rows (item x layer x variant)  {self.total('rows'):>16,}",
            f"  prompt tokens (every row's)    {self.total('prompt_tokens'):>16,}  {tokens}",
            f"  generated tokens, upper bound  {self.total('generated_bound'):>16,}  rows x {self.max_new_tokens} new",
            f"  generated tokens, estimate     {self.total('generated_estimate'):>16,}  "
            "each row as long as its reference + 1 (masked rows may run to the limit)",
            f"  weights                        {_gib(self.weights_bytes()):>17}  {self.shape.params:,} parameters",
            f"  KV cache per worker, fast      {_gib(self.peak('kv_bytes')):>17}  largest batch: "
            f"{self.peak('batch_rows')} rows",
            f"  KV cache per worker, tree      {_gib(self.peak('tree_kv_bytes')):>17}  largest batch: "
            f"{self.peak('tree_batch_rows')} rows, once all have split (they start sharing)",
            f"  activations per worker (est.)  {_gib(self.peak('activation_bytes')):>17}  one layer's working "
            "set of the largest forward",
            f"  {'engine':<12} {'TFLOP (est.)':>13} {'TFLOP (limit)':>14} {'1 worker':>10} {self.workers:>3} worker(s)",
        ]
        for engine in ENGINES:
            lines.append(
                f"  {engine:<12} {self.flops(engine) / 1e12:>13,.1f} {self.flops(engine, True) / 1e12:>14,.1f} "
                f"{_duration(self.seconds(engine)):>10} {_duration(self.seconds(engine, self.workers)):>12}"
            )
        lines.append(f"  time at {self.tflops:.3g} TFLOP/s per worker: {self.tflops_from}")
        return "\n".join(lines + [f"  note: {note}" for note in self.notes])


_gib = lambda n: f"{n / 2**30:,.2f} GiB" if n >= 2**30 else f"{n / 2**20:,.1f} MiB"
_duration = lambda s: f"{s:.1f}s" if s < 120 else (f"{s / 60:.0f}min" if s < 7200 else f"{s / 3600:.1f}h")


NOTES = [  # what the engines' rows mean (module docstring), and what the time leaves out
    "paper: each row's full prompt and decoding; fast: the shared context once, then queries and decoding; "
    "tree: as fast, sharing a query's rows below their divergence layer (no history splits: a lower bound)",
    "time = FLOPs / the matmul rate: kernel launches, attention kernels, padding and Python come on top",
]


def run_plan(
    config: SweepConfig,
    settings: PlanSettings,
    ray: RaySettings | None = None,
    log: Callable[[str], None] | None = None,
) -> Plan:
    """The sweep ``config`` would run (with ``ray``: on its workers), costed without loading weights."""
    validate(config)
    if settings.json:
        check_writable(settings.json)
    if ray is not None:
        ray.check()
    tasks = load_task_data(config, log=log or (lambda line: print(line, file=sys.stderr, flush=True)))
    check_k(config, tasks)
    device, dtype = _device_and_dtype(config, ray)
    view = describe_model(config.model)
    store = Path(settings.store) if settings.store else None
    restore_from = recognition_below(store) if config.heads == "restore" and config.from_layer is None else None
    units = plan_units(config, view.shape.layers, tasks, restore_from, view.shape.heads)
    done = _done_units(store)
    max_new = stop_rule(sweep_task(config), config.max_new_tokens).max_new_tokens
    tokenizer = view.tokenizer or CharTokens(settings.chars_per_token)
    sets: dict[tuple, ItemSet] = {}
    costs = []
    for unit in (u for u in units if u.unit_id not in done):
        _check_context(unit_items(unit, tasks, tokenizer, max_new, sets), view.shape, max_new, unit)
        costs.append(unit_cost(unit, tasks, tokenizer, view.shape, max_new, config.batch_size, dtype, sets))
    notes = list(NOTES)
    tflops, tflops_from = _throughput(settings, view.shape, dtype, device, costs, notes)
    workers = ray.workers if ray is not None else 1
    plan = Plan(
        view.spec, view.source, view.note, view.tokenizer is not None, dtype, device, max_new, view.shape,
        costs, len(units) - len(costs), tflops, tflops_from, workers, notes,
    )  # fmt: skip
    if settings.json:
        write_json_atomic(settings.json, plan.as_dict())
    return plan


def _device_and_dtype(config: SweepConfig, ray: RaySettings | None) -> tuple[str, str]:
    """Where the units run and in which dtype, as a worker would load the model: a GPU if there is one
    (Ray: if workers get GPUs), float32 on a CPU and bfloat16 on a GPU unless --dtype says otherwise."""
    gpu = torch.cuda.is_available() or (ray is not None and ray.gpus_per_worker > 0)
    device = config.device or ("cuda" if gpu else "cpu")
    return device, DTYPE_NAMES[config.dtype] if config.dtype else (
        "bfloat16" if device.startswith("cuda") else "float32"
    )


def _throughput(
    settings: PlanSettings, shape: ModelShape, dtype: str, device: str, costs: list[UnitCost], notes: list[str]
) -> tuple[float, str]:
    """A worker's TFLOP/s, given or measured here (at the largest batch's rows), and what it is."""
    if settings.tflops is not None:
        return settings.tflops, "given (--tflops)"
    here = device if device == "cpu" or torch.cuda.is_available() else "cpu"
    if here != device:
        notes.append(f"the workers run on {device}, the rate was measured on this {here}: pass --tflops")
    # a decoding step's two kinds of product: a layer's (hidden x MLP width) and the LM head's
    rows, seconds = max((c.batch_rows for c in costs), default=1), settings.calibration_seconds
    sizes = [(shape.intermediate, 1 - shape.head_share()), (min(shape.vocab, HEAD_SLICE), shape.head_share())]
    rates = [(n, share, *matmul_tflops(rows, shape.hidden, n, dtype, here, seconds)) for n, share in sizes]
    parts = ", ".join(f"[{rows} x {shape.hidden}] @ [{shape.hidden} x {n}] {r:.3g} ({how})" for n, _, r, how in rates)
    return 1 / sum(share / r for _, share, r, _ in rates), (
        f"matmuls {parts}, weighted by their share of the FLOPs (LM head {100 * shape.head_share():.0f}%); "
        f"{dtype} on {hardware_line(hardware(here))}"
    )


def _done_units(store: Path | None) -> set[str]:
    if store is None or not store.is_file():
        return set()
    with Store(store, create=False) as opened:
        return set(opened.done_units())


def _check_context(items: ItemSet, shape: ModelShape, max_new: int, unit: WorkUnit) -> None:
    """Prompt + answer must fit the model's context (as the sweep checks before decoding)."""
    longest = int(items.prompt.max())
    if shape.context and longest + max_new > shape.context:
        raise UserError(
            f"{unit.label()}: prompt of {longest} tokens + {max_new} new tokens exceeds the model's context of "
            f"{shape.context}; use fewer examples (--k) or a shorter --max-new-tokens"
        )
