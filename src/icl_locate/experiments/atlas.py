"""``icl-locate atlas``: every locating method for one (model, task) on one depth axis.

Runs what the store lacks of the four sweeps of a grid (layer-from context masking, the task
vector, the function vector, the logit lens: ``methods.py``), one after the other into one store
(each resumable as any sweep), then draws the depth atlas (``results/atlas.py``): one figure and
one table per cell, and the function vector's indirect-effect heat map.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path

from ..core.conditions import BELOW_SUFFIX, get_condition
from ..results.analysis import cell_key
from ..results.atlas import load_atlases
from ..results.figures import aie_figures, atlas_figures
from ..results.store import Store
from ..results.tables import atlas_rows
from ..util.errors import UserError
from .options import RaySettings
from .settings import METHODS, LoadedTasks, SweepConfig
from .sweep import check_store_path, prepare, run_sweep
from .units import Worker


@dataclass
class AtlasResult:
    store: Path
    figures: list[Path] = field(default_factory=list)
    lines: list[str] = field(default_factory=list)  # per cell and method: where it points
    seconds: dict[str, float] = field(default_factory=dict)  # per method: decoding seconds of its units


def run_atlas(
    config: SweepConfig,
    store_path: str | Path,
    out_dir: str | Path,
    command: str,
    ray: RaySettings | None = None,
    log: Callable[[str], None] = print,
) -> AtlasResult:
    """The four sweeps of ``config``'s grid (its ``method`` must be left at mask), then the atlas drawn into
    ``out_dir``."""
    if config.method != "mask" or config.heads is not None or config.layer_ablation or config.labels != ["gold"]:
        raise UserError(
            "atlas runs every method on gold labels itself: drop --method, --heads, --layer-ablation, --labels"
        )
    store_file = check_store_path(store_path)  # before the first sweep: a bad path fails before anything runs
    # the model loads once, after the settings and the data are checked, and one worker runs the four
    # sweeps: its engines serve them all, and the vector units reuse the masking unit's unmasked rows
    loaded, tasks, _ = prepare(replace(config, method=METHODS[0]), weights=ray is None, store_file=store_file)
    worker = Worker.of(config, loaded, tasks) if ray is None else None
    for method in METHODS:
        log(f"atlas: {method}")
        # each sweep audits within its own share of decoding time, as a sweep of its own would
        fresh = replace(worker, seconds=Worker.fresh_seconds()) if worker is not None else None
        conditions = stored_conditions(store_file, config, tasks) if method == "logit-lens" else config.conditions
        run_sweep(replace(config, method=method, conditions=conditions), store_path, command, ray, loaded, fresh)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    result = AtlasResult(Path(store_path))
    with Store(Path(store_path), create=False) as store:
        atlases = load_atlases(store)
        for unit in store.units():
            kind = unit["spec"]["kind"]
            result.seconds[kind] = result.seconds.get(kind, 0.0) + (unit["seconds"] or 0.0)
    result.figures = [path for _, path in atlas_figures(atlases, out) + aie_figures(atlases, out)]
    result.lines = [
        f"{r['cell']} {r['method']}: {r['what']} {r['point']} (95% {r['interval']}; baseline {r['baseline']})"
        for r in atlas_rows(atlases)
    ]
    return result


def stored_conditions(store_path: Path, config: SweepConfig, tasks: LoadedTasks) -> list[str]:
    """``config``'s masking conditions, then every other one the store holds a masking unit of in the atlas's
    cells (its tasks, pairs and data, test items, seeds, ks and instructions; gold labels): the lens reads
    under each, so that it shows when the answer appears with and without each context the store has
    masked. The lens hides a condition at every layer, so a ``-below`` one is its plain form there."""
    ours = [get_condition(c).name for c in config.conditions]
    data = {(name, pair, task_data.digest[:16]) for (name, pair), (_, task_data) in tasks.items()}
    with Store(store_path, create=False) as store:
        masks = [
            cell_key(u["spec"], (*MASKING_CELL, "condition", "labels"))
            for u in store.units()
            if u["spec"]["kind"] == "mask"
        ]
    masks = [spec for spec in masks if spec["labels"] == "gold" and (spec["task"], spec["pair"], spec["data"]) in data]
    cells = {masking_cell(spec) for spec in masks if spec["condition"] in ours and in_grid(spec, config)}
    found = [spec["condition"] for spec in masks if masking_cell(spec) in cells]
    # an ``example:i`` masked in a cell of k >= i is left out where the grid has a smaller k (no i-th example)
    found = [c for c in found if (get_condition(c).example or 0) <= min(config.ks)]
    return list(dict.fromkeys(c.removesuffix(BELOW_SUFFIX) for c in ours + found))


MASKING_CELL = ("task", "pair", "data", "n_test", "seed", "k", "instructions")  # what a lens unit shares with it


def masking_cell(spec: dict) -> tuple:
    """A stored masking unit's cell: what its lens unit shares with it but the condition."""
    return tuple(spec[key] for key in MASKING_CELL)


def in_grid(spec: dict, config: SweepConfig) -> bool:
    """Whether a stored unit is of ``config``'s grid (its seeds, ks, instructions and test items)."""
    return (
        spec["k"] in config.ks
        and spec["seed"] in config.seeds
        and spec["instructions"] in config.instructions
        and spec["n_test"] == config.n_test
    )
