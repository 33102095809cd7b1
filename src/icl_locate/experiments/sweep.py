"""``icl-locate sweep``: plan the grid, check it, open the study store, execute, commit.

The order is the point: settings and data are validated before the model loads; units are
checked (k, context length) before the store is touched; an executor computes units on a worker
it is handed, and this driver alone writes the store, one transaction per unit.
"""

from __future__ import annotations

import sys
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

from ..core.models import LoadedModel, load_description, load_model
from ..results.analysis import (
    analyse_curve,
    analyse_head_map,
    audit_disagreement,
    head_summary_lines,
    load_curves,
    load_head_maps,
    summary_lines,
)
from ..results.store import Store
from ..util.errors import Interrupted, UserError
from ..util.fileio import not_a_directory
from ..util.progress import Progress
from .common import fingerprint, provenance
from .executors import Executor, LocalExecutor, RayExecutor
from .options import RaySettings
from .planning import plan_units
from .settings import (
    LoadedTasks,
    SweepConfig,
    WorkUnit,
    load_task_data,
    validate,
)
from .units import Worker, check_units


@dataclass
class SweepResult:
    planned: int
    skipped: int
    ran: int
    num_layers: int
    store: Path
    summary: list[str] = field(default_factory=list)  # per curve: the recognition layer, or why there is none
    audit_faults: int = 0  # audited rows that disagree with the reference engine beyond a near-tie


def check_store_path(path: str | Path) -> Path:
    store_file = Path(path).expanduser()
    if store_file.exists() and not store_file.is_file():
        raise UserError(f"store {store_file} is not a file")
    if not store_file.parent.is_dir():
        raise UserError(f"cannot create store {store_file}: {not_a_directory(store_file.parent)}")
    return store_file


def check_k(config: SweepConfig, tasks: LoadedTasks) -> None:
    for task, data in tasks.values():
        for k in config.ks:
            if k > len(data.bank):
                raise UserError(f"k={k} examples requested but the {task.name} prompt bank has {len(data.bank)}")


def recognition_below(store_file: Path | None):
    """restore_from(pair, condition, instructions, k) -> the layer below the recognition layer that the
    store's layer sweep of that cell shows (None where there is none)."""
    table: dict = {}
    if store_file is not None and store_file.is_file():
        with Store(store_file, create=False) as store:
            for c in load_curves(store):
                if c.key["kind"] == "mask":
                    c = analyse_curve(c, n_boot=SUMMARY_BOOTSTRAP)
                    table[(c.key["pair"], c.key["condition"], c.key["instructions"], c.key["k"])] = c.recognition

    def restore_from(pair: str, condition: str, instructions: bool, k: int) -> int | None:
        r = table.get((pair, condition, instructions, k))
        return None if r is None else max(0, r - 1)

    return restore_from


def prepare(
    config: SweepConfig, weights: bool = True, store_file: Path | None = None, loaded: LoadedModel | None = None
) -> tuple[LoadedModel, LoadedTasks, list[WorkUnit]]:
    """Validate, read the data, load the model (only its description and tokenizer without ``weights``;
    ``loaded``: loaded already, as ``config`` says), plan, check the units: everything that can fail before
    the store opens."""
    validate(config)
    tasks = load_task_data(config, log=lambda line: print(line, file=sys.stderr, flush=True))
    check_k(config, tasks)
    if loaded is None:
        loaded = (load_model if weights else load_description)(config.model, dtype=config.dtype, device=config.device)
    restore_from = recognition_below(store_file) if config.heads == "restore" and config.from_layer is None else None
    units = plan_units(config, loaded.info.num_layers, tasks, restore_from, loaded.info.num_heads)
    check_units(loaded, tasks, units, config.max_new_tokens)  # context length, before the store is touched
    return loaded, tasks, units


def run_sweep(
    config: SweepConfig,
    store_path: str | Path,
    command: str,
    ray: RaySettings | None = None,
    loaded: LoadedModel | None = None,
    worker: Worker | None = None,
) -> SweepResult:
    """Plan, validate, open the store, execute (here, or on Ray workers with ``ray``). Shared by ``sweep``, ``atlas``
    and ``demo``. ``loaded``: the model loaded already, as ``config`` names it (with its weights unless
    ``ray``; ``prepare`` gives it), so that several sweeps of one model load it once. ``worker``: the
    local worker to run on (made for a config that differs from ``config`` in its method at most: the
    atlas's four sweeps share one, its engines and the generations a later unit reuses).

    With Ray the driver loads no weights: each worker loads the model once; the driver plans, checks
    and commits.
    """
    store_file = check_store_path(store_path)
    executor: Executor
    if ray is not None:
        executor = RayExecutor(ray, Worker.load, config)  # Ray missing or bad settings: fails here, first
        loaded, tasks, units = prepare(config, weights=False, store_file=store_file, loaded=loaded)
    else:
        loaded, tasks, units = prepare(config, store_file=store_file, loaded=loaded)
        executor = LocalExecutor(worker if worker is not None else Worker.of(config, loaded, tasks))
    with Store.open(store_file, fingerprint(loaded, config.max_new_tokens)) as store:
        files = [f for _, data in tasks.values() for f in data.files]
        run_id = store.start_run(command, asdict(config), provenance(loaded, files))
        try:
            ran, skipped = execute(executor, store, units, run_id)
        except KeyboardInterrupt:
            raise Interrupted(
                f"interrupted; {len(store.done_units())} units are safely in {store_file}. "
                f"Rerun the same command to resume."
            ) from None
        lines = [
            line
            for curve in load_curves(store)
            for line in summary_lines(analyse_curve(curve, n_boot=SUMMARY_BOOTSTRAP), loaded.info.num_layers)
        ]
        lines += [
            line
            for m in load_head_maps(store)
            for line in head_summary_lines(analyse_head_map(m, n_boot=SUMMARY_BOOTSTRAP))
        ]
        audit_lines, faults = audit_summary(store)
    return SweepResult(len(units), skipped, ran, loaded.info.num_layers, store_file, lines + audit_lines, faults)


def audit_note(result) -> str:
    """'; audit 2/2 rows agree' (and the faults) for a unit's progress line."""
    if not result.audit:
        return ""
    agree = sum(r["agree"] for r in result.audit)
    faults = sum(r["fault"] for r in result.audit)
    fault_text = f", {faults} ENGINE FAULT(S)" if faults else ""
    return (
        f"; audit {agree}/{len(result.audit)} rows agree with the reference engine{fault_text} "
        f"({result.audit_seconds:.0f}s)"
    )


def audit_summary(store: Store) -> tuple[list[str], int]:
    """Lines on the store's audited rows (agreement; every disagreement with its margin), and the faults."""
    rows = store.audits()
    if not rows:
        return [], 0
    faults = [r for r in rows if r["fault"]]
    lines = [
        f"audit: {sum(r['agree'] for r in rows)}/{len(rows)} sampled rows agree with the reference engine; "
        f"{len(faults)} engine fault(s) (a disagreement at a margin above the dtype's threshold)"
    ]
    lines += [f"  unit {r['unit_id']}: {audit_disagreement(r)}" for r in rows if not r["agree"]]
    return lines, len(faults)


SUMMARY_BOOTSTRAP = 200  # replicates for the terminal summary; `report` uses 1000


def execute(executor: Executor, store: Store, units: Sequence[WorkUnit], run_id: int) -> tuple[int, int]:
    """Run the units the store does not hold yet through ``executor``; commit each as it comes back.

    Units are claimed as the executor pulls them (so concurrent sweeps on one host split the work),
    and the claims of units not finished are released on any exit. Returns (ran, skipped).
    """
    done = store.done_units()
    todo = [u for u in units if u.unit_id not in done]
    progress = Progress(len(todo), "sweep")
    progress.log(f"{len(units)} units planned, {len(units) - len(todo)} already in the store, {len(todo)} to run")
    claimed: dict[str, WorkUnit] = {}

    def claim_as_pulled() -> Iterator[WorkUnit]:
        for unit in todo:
            if store.claim(unit.unit_id):
                claimed[unit.unit_id] = unit
                yield unit
            else:
                progress.advance(f"{unit.label()}: done or running elsewhere, skipped")

    ran = 0
    seen_choices: list[dict] = []
    try:
        for result in executor.map(claim_as_pulled(), progress):
            if result.choices is not None and result.choices not in seen_choices:
                seen_choices.append(result.choices)  # each engine configuration once, with the machine
                store.add_run_engine(run_id, result.choices)
            store.commit_unit(
                result.unit.unit_id,
                run_id,
                asdict(result.unit),
                result.seconds,
                result.predictions,
                result.scores,
                result.context_tokens,
                result.query_tokens,
                result.audit,
                result.prompts,
            )
            claimed.pop(result.unit.unit_id, None)
            ran += 1
            progress.advance(f"{result.unit.label()}: {result.seconds:.0f}s{audit_note(result)}")
    finally:
        for unit_id in claimed:
            store.release(unit_id)
        progress.close()
    return ran, len(units) - len(todo)
