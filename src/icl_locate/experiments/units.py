"""Computing one work unit: a pure function of (worker, unit) that returns the rows to store.

A ``Worker`` holds what computing needs and is loaded once: the model, the task data, the token
limit and the engine choices asked for; the engine itself is chosen by measuring on the first
unit of each shape (``engines/calibrate.py``, cached per machine and model).
``Worker.compute(unit)`` decodes every (item, layer) row of the unit with the engine, scores each
layer with the task's metric and returns a ``UnitResult``; it writes nothing. Committing results
is the driver's job (``sweep.execute``), so an executor can run workers anywhere (this process,
Ray actors) and the store keeps one writer.
"""

from __future__ import annotations

import contextlib
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from ..core.conditions import MaskedPrompt, get_condition
from ..core.interventions import AblateLayers, HeadMask, MaskFrom, RowIntervention, mask_row
from ..core.models import LoadedModel, load_model
from ..engines.audit import audit_rows, sample_rows
from ..engines.base import Engine, ProgressCallback, StopRule
from ..engines.calibrate import Calibrator, build_engine
from ..engines.choices import Choices
from ..engines.request import EngineRequest
from ..tasks.items import build_items, labelled_task
from ..util.system import return_free_memory
from .common import check_context, masked_prompts, stop_rule
from .methods import METHOD_KINDS, MethodInputs, run_method
from .scoring import Decoded, prompt_rows, score_rows, span_lengths
from .settings import LoadedTasks, SweepConfig, WorkUnit, audit_per_unit, engine_request, load_task_data
from .unchanged import UnchangedGenerations, UnmaskedReadings


@dataclass
class UnitResult:
    """Everything the store keeps of one finished unit."""

    unit: WorkUnit
    seconds: float
    predictions: list[dict]
    scores: list[tuple[str, int, str, float]]  # (variant, layer, metric, value)
    context_tokens: float
    query_tokens: float
    choices: dict | None = None  # the engine's configuration and the measurements behind it (Choices)
    audit: list[dict] = field(default_factory=list)  # rows decoded again by the reference engine (audit.py)
    audit_seconds: float = 0.0
    prompts: list[dict] = field(default_factory=list)  # layer and head sweeps: each item's prompt (prompt_rows)


def row_interventions(unit: WorkUnit, n_layers: int, n_heads: int) -> dict[tuple[str, int], RowIntervention]:
    """(variant, layer) as stored -> the row intervention that computes it. Head sweeps store the head
    in the variant ("knockout/h3") and keep their references (baseline; restore: masked from j) beside."""
    if unit.kind == "mask":  # the condition's window: masked from j (the paper's), or below j
        return {("mask", j): mask_row(get_condition(unit.condition), j) for j in unit.layers}
    if unit.kind == "ablation":
        return {("ablate", j): AblateLayers(frozenset({j}) if j < n_layers else frozenset()) for j in unit.layers}
    rows: dict[tuple[str, int], RowIntervention] = {("mask", n_layers): MaskFrom(n_layers)}
    if unit.kind == "knockout":
        rows.update(
            {
                (f"knockout/h{h}", layer): HeadMask(frozenset({(layer, h)}))
                for layer in unit.layers
                for h in range(n_heads)
            }
        )
        return rows
    j = unit.from_layer
    assert j is not None  # a restoration unit has its layer (plan_units)
    hidden_from_j = {(layer, h) for layer in range(j, n_layers) for h in range(n_heads)}
    rows[("mask", j)] = MaskFrom(j)
    rows.update(
        {
            (f"restore/h{h}", layer): HeadMask(frozenset(hidden_from_j - {(layer, h)}))
            for layer in unit.layers
            for h in range(n_heads)
        }
    )
    return rows


AUDIT_SHARE = 0.05  # --audit auto: the audit's share of a worker's decoding time


def _stderr(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


@dataclass
class Worker:
    """A loaded model with its task data and engine choices: computes units, writes nothing.

    ``engine`` given: every unit runs on it. Otherwise each shape of work (``Calibrator.key``: rows per
    query and their kinds, the condition, the prompts' length and number, the token limit) gets the engine
    ``Calibrator`` measures best for it, once, and says so through ``log``."""

    loaded: LoadedModel
    tasks: LoadedTasks
    request: EngineRequest = field(default_factory=EngineRequest)
    max_new_tokens: int | None = None
    audit: int | None = 0  # rows per unit decoded again by the reference engine; None: within AUDIT_SHARE
    audit_seed: int = 0
    engine: Engine | None = None
    log: Callable[[str], None] = _stderr
    choices: dict[str, Choices] = field(default_factory=dict)  # by the calibration's key (the shape of work)
    engines: dict[tuple, Engine] = field(default_factory=dict)  # by configuration: shapes that chose alike share one
    calibrator: Calibrator | None = None  # one for the worker (copies made by ``replace`` share it)
    unchanged: UnchangedGenerations = field(default_factory=UnchangedGenerations)  # rows a later unit reuses
    readings: UnmaskedReadings = field(default_factory=UnmaskedReadings)  # the ICL prompts' readings, likewise
    seconds: dict[str, float] = field(default_factory=lambda: Worker.fresh_seconds())

    def __post_init__(self):
        if self.engine is None and self.calibrator is None:
            self.calibrator = Calibrator(self.loaded.model, self.loaded.tokenizer, self.request)

    @staticmethod
    def fresh_seconds() -> dict[str, float]:
        """The decoding and audit totals of a worker that has run nothing (the audit's budget)."""
        return {"decoding": 0.0, "audit": 0.0, "audit_rows": 0}

    @classmethod
    def load(cls, config: SweepConfig) -> Worker:
        """A worker for ``config``'s sweep: its data, its model (dtype and device as configured)."""
        tasks = load_task_data(config)
        return cls.of(config, load_model(config.model, dtype=config.dtype, device=config.device), tasks)

    @classmethod
    def of(cls, config: SweepConfig, loaded: LoadedModel, tasks: LoadedTasks) -> Worker:
        """A worker for ``config``'s sweep on a model and data already loaded."""
        return cls(
            loaded,
            tasks,
            engine_request(config),
            config.max_new_tokens,
            audit_per_unit(config.audit),
            config.audit_seed,
        )

    def engine_for(
        self, prompts: Sequence[MaskedPrompt], rows: Sequence[RowIntervention], stop: StopRule
    ) -> tuple[Engine, Choices | None]:
        """The engine for this shape of work (the calibration's key): given, or measured on its first prompt
        (cached). Shapes that chose the same configuration share its engine, and one calibrator serves the
        worker, so a screen it built is built once."""
        if self.engine is not None:
            return self.engine, None
        model, tokenizer, model_id = self.loaded.model, self.loaded.tokenizer, self.loaded.info.as_dict()
        assert self.calibrator is not None  # __post_init__ makes it where no engine is given
        shape = self.calibrator.key(prompts, rows, model_id, stop)
        if shape not in self.choices:
            self.choices[shape] = self.calibrator.choose(prompts, rows, stop, model_id)
            self.log(self.choices[shape].line())
        choices = self.choices[shape]
        configuration = (choices.engine, choices.head, choices.draft_tokens, choices.batch_size, choices.batch_scale)
        if configuration not in self.engines:
            self.engines[configuration] = build_engine(model, tokenizer, choices, self.calibrator)
        return self.engines[configuration], choices

    def compute(self, unit: WorkUnit, progress: ProgressCallback | None = None) -> UnitResult:
        """The unit's rows decoded and scored; then the memory its batches took is handed back to the system
        (``return_free_memory``): between units a worker holds its model, engines and screens, not gigabytes
        of freed activations and caches."""
        try:
            result = (self.compute_method if unit.kind in METHOD_KINDS else self.compute_rows)(unit, progress)
        except BaseException:
            with contextlib.suppress(Exception):  # the unit's own error is the one to report
                return_free_memory()
            raise
        return_free_memory()
        return result

    def compute_rows(self, unit: WorkUnit, progress: ProgressCallback | None = None) -> UnitResult:
        """A unit of masked or ablated rows (layer sweeps, head sweeps)."""
        task, data, items = unit_items(self.loaded.tokenizer, self.tasks, unit)
        n_layers = self.loaded.info.num_layers
        condition = get_condition(unit.condition) if unit.kind != "ablation" else None
        prompts = masked_prompts(items, condition)
        rows = row_interventions(unit, n_layers, self.loaded.info.num_heads)
        stop = stop_rule(task, self.max_new_tokens)
        engine, choices = self.engine_for(prompts, list(rows.values()), stop)
        started = time.time()
        gens = engine.generate(prompts, list(rows.values()), stop, progress)
        seconds = time.time() - started
        audited, audit_seconds = self.audit_unit(unit, prompts, rows, gens, stop, seconds)
        disputed = {(a["item"], rows[(a["variant"], a["layer"])]) for a in audited if not a["agree"]}
        self.unchanged.keep(prompts, list(rows.values()), gens, stop, n_layers, disputed)
        decoded = {
            (kind, layer): Decoded(
                items,
                prompts,
                [gens[(i, row)] for i in range(len(items))],
                masked=condition is not None and (layer > 0 if condition.window == "below" else layer < n_layers),
            )
            for (kind, layer), row in rows.items()
        }
        predictions, scores = score_rows(task, data, decoded)
        result = self.result(unit, items, seconds, predictions, scores, choices, audited, audit_seconds)
        result.prompts = prompt_rows(items)  # every row of the unit was decoded from these prompts
        return result

    def compute_method(self, unit: WorkUnit, progress: ProgressCallback | None = None) -> UnitResult:
        """A task-vector, function-vector or logit-lens unit (``methods.py``), its rows on the engine given or
        measured best for them, as for any unit."""
        task, data, items = unit_items(self.loaded.tokenizer, self.tasks, unit)
        stop = stop_rule(task, self.max_new_tokens)
        started = time.time()
        chosen: list[Choices] = []
        calibrating = [0.0]  # seconds the engine's calibration took, left out of the unit's, as for a masking unit

        def engine(prompts: Sequence[MaskedPrompt], rows: Sequence[RowIntervention], stop: StopRule) -> Engine:
            asked = time.time()
            found, choices = self.engine_for(prompts, rows, stop)
            calibrating[0] += time.time() - asked
            chosen.extend([choices] if choices is not None else [])
            return found

        inputs = MethodInputs(self.loaded, engine, task, data, items, stop, progress, self.unchanged, self.readings)
        output = run_method(unit, inputs)
        seconds = time.time() - started - calibrating[0]
        predictions, scores = score_rows(task, data, output.decoded)
        audited, audit_seconds = [], 0.0
        if output.audit_rows:
            audited, audit_seconds = self.audit_unit(
                unit, output.audit_prompts, output.audit_rows, output.audit_generations, stop, seconds
            )
        return self.result(
            unit,
            items,
            seconds,
            predictions + output.predictions,
            scores + output.scores,
            chosen[0] if chosen else None,  # the patched rows' engine
            audited,
            audit_seconds,
        )

    @staticmethod
    def result(unit, items, seconds, predictions, scores, choices, audited, audit_seconds) -> UnitResult:
        lengths = [span_lengths(it.encoded.spans) for it in items]
        context = sum(n["n_instructions"] + n["n_examples"] for n in lengths) / len(items)
        query = sum(n["n_query"] for n in lengths) / len(items)
        return UnitResult(
            unit,
            seconds,
            predictions,
            scores,
            context,
            query,
            choices.as_dict() if choices is not None else None,
            audited,
            audit_seconds,
        )

    def audit_unit(
        self, unit: WorkUnit, prompts, rows: dict, gens, stop: StopRule, decode_seconds: float
    ) -> tuple[list[dict], float]:
        """Rows of the unit, drawn with the stored seed, decoded again by the reference engine: ``self.audit``
        of them, or (None) as many as keep this worker's audit within ``AUDIT_SHARE`` of its decoding
        time, at least one in its first unit."""
        self.seconds["decoding"] += decode_seconds
        if self.audit == 0:
            return [], 0.0
        assert self.loaded.model is not None  # a loaded model, not a description
        started = time.time()
        keys, interventions = list(rows), list(rows.values())
        seed = f"{self.audit_seed}:{unit.unit_id}"
        wanted = self.audit if self.audit is not None else len(prompts) * len(interventions)
        out = []
        for pair in sample_rows(len(prompts), interventions, wanted, seed):
            if self.audit is None and not self._audit_budget_left():
                break
            row_started = time.time()
            (r,) = audit_rows(self.loaded.model, self.loaded.tokenizer, prompts, interventions, gens, stop, [pair])
            self.seconds["audit"] += time.time() - row_started
            self.seconds["audit_rows"] += 1
            out.append(
                dict(
                    item=r.item,
                    variant=keys[pair[1]][0],
                    layer=keys[pair[1]][1],
                    agree=r.agree,
                    position=r.position,
                    margin=r.margin,
                    threshold=r.threshold,
                    fault=r.fault,
                    seed=seed,
                )
            )
        return out, time.time() - started

    def _audit_budget_left(self) -> bool:
        """Room for one more row (at its measured average cost) within AUDIT_SHARE of the decoding so far."""
        done = self.seconds["audit_rows"]
        if not done:
            return True
        return self.seconds["audit"] * (done + 1) / done <= AUDIT_SHARE * self.seconds["decoding"]


def unit_items(tokenizer, tasks: LoadedTasks, unit: WorkUnit):
    """The unit's task, data and prompted test items (deterministic: seeded example sampling)."""
    task, data = tasks[(unit.task, unit.pair)]
    items = build_items(task, data, tokenizer, unit.k, unit.seed, unit.n_test, unit.instructions, labels=unit.labels)
    return labelled_task(task, data, unit.labels, unit.seed), data, items


def check_units(loaded: LoadedModel, tasks: LoadedTasks, units: Sequence[WorkUnit], max_new_tokens: int | None) -> None:
    """Prompt + answer must fit the model's context in every unit, checked before any decoding
    (k against the bank was checked before the model loaded: ``sweep.check_k``)."""
    for unit in units:
        task, _, items = unit_items(loaded.tokenizer, tasks, unit)
        check_context(items, loaded, stop_rule(task, max_new_tokens).max_new_tokens, unit.label())
