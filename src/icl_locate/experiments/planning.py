"""Planning a sweep: its grid as ``WorkUnit``s with stable ids, once the model's layers are known.

Pure functions of a validated ``SweepConfig``: one unit = one (task, pair, condition or layer
ablation, instructions on/off, seed, k) over all requested layers and test items (head sweeps: over
the heads of the requested layers; other methods: ``methods.py``).
"""

from __future__ import annotations

from collections.abc import Callable

from ..core.conditions import get_condition
from ..util.errors import UserError
from .settings import LoadedTasks, SweepConfig, WorkUnit, parse_layers, sweep_task, task_pairs, validate

# Todd et al. use the top 10 heads of GPT-J's 28 x 16 = 448; the default keeps that share of a model's heads
REFERENCE_HEADS, REFERENCE_TOP = 448, 10
MIN_TOP_HEADS = 3


def default_top_heads(n_layers: int, n_heads: int) -> int:
    """K for the function vector when --top-heads is not given: Todd et al.'s share of heads (10 of 448),
    at least ``MIN_TOP_HEADS``."""
    return max(MIN_TOP_HEADS, round(REFERENCE_TOP * n_layers * n_heads / REFERENCE_HEADS))


def head_layers(config: SweepConfig, num_layers: int, from_layer: int | None) -> tuple[int, ...]:
    """The layers whose heads a head sweep visits: --layers (all: every layer; restore: from j on)."""
    first = 0
    if config.heads == "restore":
        assert from_layer is not None  # restoration starts at a layer (_plan_head_units)
        first = from_layer
        if not 0 <= first < num_layers:
            raise UserError(f"--from-layer must be in 0..{num_layers - 1}, got {first}")
    layers = range(first, num_layers) if config.layers == "all" else parse_layers(config.layers, num_layers - 1)
    bad = [layer for layer in layers if layer < first]
    if bad:
        raise UserError(f"restoration gives the context back at layers >= {first} (where it is hidden); got {bad}")
    return tuple(layers)


def plan_units(
    config: SweepConfig,
    num_layers: int,
    tasks: LoadedTasks | None = None,
    restore_from: Callable[[str, str, bool, int], int | None] | None = None,
    num_heads: int | None = None,
) -> list[WorkUnit]:
    """Expand the grid (``validate`` it first). ``tasks`` (the loaded data) gives user data its identity;
    ``restore_from(pair, condition, instructions, k)`` gives a restoration's default layer; ``num_heads``
    the function vector's default number of heads."""
    validate(config)
    task = sweep_task(config)
    if config.method != "mask":
        return _plan_method_units(config, task.name, num_layers, tasks, num_heads)
    if config.heads is not None:
        return _plan_head_units(config, task.name, num_layers, tasks, restore_from)
    layers = tuple(parse_layers(config.layers, num_layers))
    units = []
    for pair in task_pairs(config):
        for seed in config.seeds:
            for k in config.ks:
                data = tasks[(task.name, pair)][1].digest[:16] if tasks else ""
                for instr in config.instructions:
                    for cond in config.conditions:
                        for variant in config.labels:
                            units.append(
                                WorkUnit(
                                    task.name,
                                    pair,
                                    "mask",
                                    get_condition(cond).name,
                                    instr,
                                    seed,
                                    k,
                                    config.n_test,
                                    layers,
                                    data,
                                    labels=variant,
                                )
                            )
                if config.layer_ablation:
                    units.append(
                        WorkUnit(
                            task.name,
                            pair,
                            "ablation",
                            "",
                            True,
                            seed,
                            k,
                            config.n_test,
                            tuple(range(num_layers + 1)),
                            data,
                        )
                    )
    return list(dict.fromkeys(units))


def _plan_head_units(
    config: SweepConfig, task: str, num_layers: int, tasks: LoadedTasks | None, restore_from
) -> list[WorkUnit]:
    assert config.heads is not None  # a head sweep
    units = []
    for pair in task_pairs(config):
        for seed in config.seeds:
            for k in config.ks:
                data = tasks[(task, pair)][1].digest[:16] if tasks else ""
                for instr in config.instructions:
                    for cond in config.conditions:
                        name = get_condition(cond).name
                        j = None
                        if config.heads == "restore":
                            j = (
                                config.from_layer
                                if config.from_layer is not None
                                else (restore_from(pair, name, instr, k) if restore_from else None)
                            )
                            if j is None:
                                raise UserError(
                                    f"--heads restore needs --from-layer, or a layer sweep of {name} "
                                    f"({pair or task}, k={k}) in the store whose recognition layer it "
                                    f"starts below"
                                )
                        units.append(
                            WorkUnit(
                                task,
                                pair,
                                config.heads,
                                name,
                                instr,
                                seed,
                                k,
                                config.n_test,
                                head_layers(config, num_layers, j),
                                data,
                                j,
                            )
                        )
    return list(dict.fromkeys(units))


def _plan_method_units(
    config: SweepConfig, task: str, num_layers: int, tasks: LoadedTasks | None, num_heads: int | None
) -> list[WorkUnit]:
    """Units of a --method other than mask: vectors at layers 0..L-1, the lens at 0..L (L: the output)."""
    top = None
    if config.method == "function-vector":
        if config.top_heads is None and num_heads is None:
            raise UserError("the function vector's default number of heads needs the model's head count")
        top = config.top_heads if config.top_heads is not None else default_top_heads(num_layers, num_heads or 0)
    last = num_layers if config.method == "logit-lens" else num_layers - 1
    layers = tuple(range(last + 1)) if config.layers == "all" else tuple(parse_layers(config.layers, last))
    conditions = [get_condition(c).name for c in config.conditions] if config.method == "logit-lens" else [""]
    units = []
    for pair in task_pairs(config):
        data = tasks[(task, pair)][1].digest[:16] if tasks else ""
        for seed in config.seeds:
            for k in config.ks:
                for instr in config.instructions:
                    for condition in conditions:
                        units.append(
                            WorkUnit(
                                task,
                                pair,
                                config.method,
                                condition,
                                instr,
                                seed,
                                k,
                                config.n_test,
                                layers,
                                data,
                                top_heads=top,
                            )
                        )
    return list(dict.fromkeys(units))
