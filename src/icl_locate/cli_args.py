"""The command line's arguments: one subparser per command. ``cli.py`` turns them into settings."""

from __future__ import annotations

import argparse

from .cli_options import (
    INSTRUCTIONS,
    MODEL_HELP,
    TASK_HELP,
    add_data_and_device_options,
    add_engine_options,
    add_executor_options,
    add_head_option,
    add_own_data_options,
    add_study_options,
    listed,
)
from .cli_values import Parser, default
from .core.labels import VARIANTS_HELP
from .experiments.options import (
    REPORT_FORMATS,
    BenchSettings,
    DemoSettings,
    LoraRun,
    LoraSettings,
    PruneSettings,
    ReportSettings,
    RunSettings,
    ScoreCodeSettings,
    StartupSettings,
)
from .experiments.presets import PRESETS
from .experiments.settings import METHODS, SweepConfig

# --------------------------------------------------------------------------- parsers

# lora-sweep's numeric options: flag, type, LoraSettings field, help (the default is appended)
LORA_NUMBERS = [
    ("--train-size", int, "train_size", "training pairs from dev 1-800"),
    ("--val-size", int, "val_size", "validation pairs from dev 801-997"),
    ("--epochs", int, "max_epochs", "maximum epochs; early stopping usually ends sooner"),
    ("--patience", int, "patience", "early stopping: epochs without improvement"),
    ("--threshold", float, "threshold", "early stopping: the least validation-loss gain that counts"),
    ("--r", int, "r", "LoRA rank"),
    ("--alpha", int, "alpha", "LoRA alpha"),
    ("--dropout", float, "dropout", "LoRA dropout"),
    ("--lr", float, "lr", "learning rate"),
    ("--batch-size", int, "batch_size", "examples per optimiser update"),
    ("--micro-batch", int, "micro_batch", "examples per forward (gradient accumulation)"),
    ("--seed", int, "seed", "training seed"),
]


def _add_run(sub) -> None:
    """``run``: one condition and layer, decoded by the reference engine and scored."""
    run = sub.add_parser("run", help="decode a test set under one masking condition and layer; score it")
    run.add_argument("--model", default=None, help=MODEL_HELP)
    run.add_argument("--task", default=None, help=TASK_HELP)
    run.add_argument("--pair", help="translation direction, e.g. fra-eng, fr-en, fra_Latn-eng_Latn")
    run.add_argument(
        "--condition",
        default=None,
        help=f"masking condition (see `icl-locate conditions`; default {default(RunSettings, 'condition')})",
    )
    run.add_argument(
        "--from-layer", type=int, default=None, help="mask in every layer >= this one; = number of layers masks nothing"
    )
    run.add_argument(
        "--k", type=int, default=None, help=f"number of in-context examples (default {default(RunSettings, 'k')})"
    )
    run.add_argument(
        "--seed",
        type=int,
        default=None,
        help=f"seed for sampling the examples (default {default(RunSettings, 'seed')})",
    )
    run.add_argument("--n-test", type=int, default=None, help="use the first N test items")
    run.add_argument("--no-instructions", action="store_true", help="drop the instruction header")
    run.add_argument("--per-query-examples", action="store_true", help="sample new examples for every query")
    run.add_argument("--labels", help=f"one of the {VARIANTS_HELP} (default {default(RunSettings, 'labels')})")
    run.add_argument("--max-new-tokens", type=int, default=None, help="default: the task's (50 for MT)")
    run.add_argument("--out", help="write one JSON line per prediction here")
    add_data_and_device_options(run)
    add_own_data_options(run)
    run.add_argument(
        "--workers",
        type=int,
        default=None,
        help=f"code tasks: sandbox workers (default {default(RunSettings, 'workers')})",
    )
    run.add_argument(
        "--timeout",
        type=float,
        default=None,
        help=f"code tasks: seconds per sample (default {default(RunSettings, 'timeout')})",
    )
    run.set_defaults(command_name="run")


def _add_bench(sub) -> None:
    """``bench``: the paper's method against the fast and the chosen engines."""
    bench = sub.add_parser("bench", help="time the paper's sweep method against the fast engine")
    add_study_options(bench, BenchSettings)
    bench.add_argument(
        "--layers", default=None, help=f"'all' (0..L) or a comma list [{default(BenchSettings, 'layers')}]"
    )
    bench.add_argument(
        "--batch-size",
        type=int,
        default=None,
        help="engine rows per batch (default: auto: the engines' memory rule, or a doubling or halving "
        "of its rows where the calibration measured it faster)",
    )
    bench.add_argument("--skip-paper", action="store_true", default=None, help="skip (a), the slowest")
    add_engine_options(bench)
    bench.add_argument(
        "--require-identical",
        type=float,
        default=None,
        help="exit 1 if fewer (sentence, layer) pairs than this fraction match (b), for (c) or (d)",
    )
    bench.add_argument("--json", help="write the measurements here (JSON)")
    add_data_and_device_options(bench)
    add_own_data_options(bench)
    bench.set_defaults(command_name="bench")


def _add_prune(sub) -> None:
    """``prune``: context-pruned inference against full processing."""
    pr = sub.add_parser("prune", help="context-pruned inference: time, memory, FLOPs and quality vs full processing")
    add_study_options(pr, PruneSettings, condition="the context range to prune")
    pr.add_argument("--layer", type=int, required=True, help="r: the context is processed in layers < r only")
    pr.add_argument(
        "--per-query-examples", action="store_true", default=None, help="sample new examples for every query"
    )
    pr.add_argument(
        "--batch-size",
        type=int,
        default=None,
        help=f"requests decoded together [{default(PruneSettings, 'batch_size')}]",
    )
    add_head_option(pr, "LM head of the full and the pruned runs")
    pr.add_argument("--max-new-tokens", type=int, default=None, help="default: the task's (50 for MT)")
    pr.add_argument("--no-check", action="store_true", help="skip the check against masking from r")
    pr.add_argument("--json", help="write the measurements here")
    pr.add_argument("--store", help="also keep the measurement in this study store (shown by `report`)")
    add_data_and_device_options(pr)
    add_own_data_options(pr)
    pr.set_defaults(command_name="prune")


def _add_score_code(sub) -> None:
    """``score-code``: HumanEval completions run in the sandbox."""
    sc = sub.add_parser("score-code", help="run HumanEval completions in the sandbox; print pass@1")
    sc.add_argument("--samples", required=True, help='JSONL lines {"task_id": ..., "completion": ...}')
    sc.add_argument("--out", help="per-sample results (default: <samples>_results.jsonl)")
    sc.add_argument(
        "--workers", type=int, default=None, help=f"sandbox workers (default {default(ScoreCodeSettings, 'workers')})"
    )
    sc.add_argument(
        "--timeout",
        type=float,
        default=None,
        help=f"seconds per sample (default {default(ScoreCodeSettings, 'timeout')})",
    )
    sc.set_defaults(command_name="score-code")


def _add_listings(sub) -> None:
    """``tasks``, ``conditions``, ``models``: listings that load nothing."""
    sub.add_parser("tasks", help="list the registered tasks").set_defaults(command_name="tasks")
    sub.add_parser("conditions", help="list the masking conditions").set_defaults(command_name="conditions")
    sub.add_parser("models", help="list model aliases").set_defaults(command_name="models")


def _add_data(sub) -> None:
    """``data fetch``: download a public dataset."""
    data = sub.add_parser("data", help="datasets")
    data_sub = data.add_subparsers(dest="data_command", required=True, parser_class=Parser)
    fetch = data_sub.add_parser("fetch", help="download a public dataset (needs internet)")
    fetch.add_argument("dataset", choices=["flores"], help="the dataset to download: flores (FLORES-200)")
    fetch.add_argument("--data-dir", help="where to put it (default $ICL_LOCATE_DATA_DIR or the XDG data dir)")
    fetch.add_argument("--sha256", help="expected sha256 of the archive")
    fetch.set_defaults(command_name="data-fetch")


def _add_sweep(sub) -> None:
    """``sweep``: a grid of units into a resumable store."""
    sw = sub.add_parser("sweep", help="run a grid of conditions x layers x seeds into a results store")
    _add_grid_options(sw)
    _add_method_options(sw)
    sw.add_argument("--dry-run", action="store_true", help="print the planned units and exit")
    sw.set_defaults(command_name="sweep")


def _add_method_options(parser) -> None:
    """--method and --top-heads: which locating method a sweep (or its plan) runs."""
    parser.add_argument(
        "--method",
        choices=METHODS,
        default=None,
        help="mask: layer-from context masking (the paper); task-vector, function-vector, logit-lens: the same "
        f"depth axis by another method, one unit per grid cell [{default(SweepConfig, 'method')}]",
    )
    parser.add_argument(
        "--top-heads",
        type=int,
        default=None,
        help="function-vector: heads summed into the vector (default: Todd et al.'s 10 of 448 heads, scaled "
        "to the model's head count, at least 3)",
    )


def _add_plan(sub) -> None:
    """``plan``: a sweep's units, rows, tokens, FLOPs, memory and time, before any weights load."""
    pl = sub.add_parser(
        "plan",
        help="what a sweep (same flags) will cost: units, rows, tokens, FLOPs per engine, memory per worker, "
        "time here and on N Ray workers; loads no weights",
    )
    _add_grid_options(pl, store_required=False)
    _add_method_options(pl)
    pl.add_argument(
        "--tflops",
        type=float,
        default=None,
        help="one worker's throughput in TFLOP/s (default: a matmul of the model's sizes timed here, cached)",
    )
    pl.add_argument("--json", default=None, help="also write the plan here (JSON: totals and every unit)")
    pl.set_defaults(command_name="plan")


def _add_atlas(sub) -> None:
    """``atlas``: every locating method of a grid into a store, and the depth atlas drawn."""
    at = sub.add_parser(
        "atlas", help="run masking, task vectors, function vectors and the logit lens into a store; draw the atlas"
    )
    _add_grid_options(at)
    at.add_argument("--top-heads", type=int, default=None, help="function-vector heads (default: as sweep's)")
    at.add_argument("--out-dir", default=None, help="where the atlas figures go (default: <store>_atlas/)")
    at.set_defaults(command_name="atlas")


def _add_grid_options(sw, store_required: bool = True) -> None:
    """What ``sweep``, ``atlas`` and ``plan`` share: the store, the grid, the engine, the data and the executor."""
    if store_required:
        sw.add_argument("--store", required=True, help="SQLite results file (created if missing; reruns resume)")
    else:
        sw.add_argument("--store", default=None, help="a sweep's results file: the units it holds count as done")
    sw.add_argument("--preset", help=", ".join(PRESETS))
    sw.add_argument("--config", help="experiment YAML (keys as SweepConfig)")
    sw.add_argument("--model", default=None, help=MODEL_HELP)
    sw.add_argument("--task", default=None, help=TASK_HELP)
    sw.add_argument("--pairs", help=f"comma list, e.g. fra-eng,eng-fra [{listed('pairs')}]")
    sw.add_argument("--conditions", help=f"comma list of masking conditions [{listed('conditions')}]")
    sw.add_argument(
        "--instructions",
        choices=["yes", "no", "both"],
        default=None,
        help="with the instruction header, without, or both "
        f"[{INSTRUCTIONS[tuple(SweepConfig.__dataclass_fields__['instructions'].default_factory())]}]",
    )
    sw.add_argument("--labels", help=f"comma list of {VARIANTS_HELP} [{listed('labels')}]")
    sw.add_argument("--seeds", help=f"comma list of seeds for sampling the examples [{listed('seeds')}]")
    sw.add_argument("--ks", help=f"comma list of example counts [{listed('ks')}]")
    sw.add_argument("--layers", default=None, help=f"'all' or a comma list [{default(SweepConfig, 'layers')}]")
    sw.add_argument("--layer-ablation", action="store_true", help="also ablate each layer's attention")
    sw.add_argument(
        "--heads",
        choices=["knockout", "restore"],
        default=None,
        help="head-level sweeps: knockout hides the context from one head at one layer; restore hides "
        "it from --from-layer on but gives it back to one head",
    )
    sw.add_argument(
        "--from-layer",
        type=int,
        default=None,
        help="restore: hide the context from this layer on (default: the layer below the recognition "
        "layer of the store's layer sweep)",
    )
    sw.add_argument("--n-test", type=int, default=None, help="use the first N test items [all]")
    sw.add_argument("--max-new-tokens", type=int, default=None, help="default: the task's (50 for MT)")
    sw.add_argument(
        "--batch-size",
        type=int,
        default=None,
        help="engine rows per batch (default: auto: the engines' memory rule, or a doubling or halving "
        "of its rows where the calibration measured it faster)",
    )
    add_engine_options(sw)
    sw.add_argument(
        "--audit",
        default=None,
        help="after each unit, decode rows again with the reference engine and compare: auto (default: "
        "as many as keep it within 5%% of the decoding time, at least one) or N per unit (0: off)",
    )
    sw.add_argument(
        "--audit-strict",
        action="store_true",
        help="exit 1 when an audited row disagrees with the reference at a margin above the dtype's "
        "threshold (an engine fault, not a near-tie)",
    )
    add_data_and_device_options(sw)
    add_own_data_options(sw)
    add_executor_options(sw)


def _add_report(sub) -> None:
    """``report``: figures and a report from a store."""
    rep = sub.add_parser("report", help="figures and an HTML/Markdown report from a results store")
    rep.add_argument("store", help="SQLite results file of a sweep (or lora-sweep, prune --store)")
    rep.add_argument("--out-dir", default=None, help="default: <store>_report/")
    rep.add_argument(
        "--format",
        choices=REPORT_FORMATS,
        default=None,
        help=f"html (self-contained) or md [{default(ReportSettings, 'format')}]",
    )
    rep.add_argument(
        "--fraction",
        type=float,
        default=None,
        help=f"recognition threshold (share of baseline) [{default(ReportSettings, 'fraction')}]",
    )
    rep.add_argument(
        "--bootstrap", type=int, default=None, help=f"bootstrap replicates [{default(ReportSettings, 'bootstrap')}]"
    )
    rep.set_defaults(command_name="report")


def _add_lora_sweep(sub) -> None:
    """``lora-sweep``: one LoRA adapter per layer."""
    lo = sub.add_parser("lora-sweep", help="train a LoRA adapter on one layer at a time; zero-shot BLEU per layer")
    lo.add_argument("--model", default=None, help=MODEL_HELP)
    lo.add_argument("--pair", default=None, help=f"translation direction [{default(LoraRun, 'pair')}]")
    lo.add_argument("--layers", default=None, help=f"'all' or a comma list [{default(LoraRun, 'layers')}]")
    lo.add_argument(
        "--preset",
        default=None,
        choices=["paper"],
        help="paper: the paper's settings (800 pairs, 197 validation pairs, patience 5, threshold 0.01, "
        "r 8, alpha 32, dropout 0.05, lr 1e-4, batch 32, loss on every position)",
    )
    # None = not given: the preset's value, else LoraSettings' default (shown in brackets)
    for flag, cast, field, text in LORA_NUMBERS:
        lo.add_argument(flag, type=cast, default=None, help=f"{text} [{default(LoraSettings, field)}]")
    lo.add_argument(
        "--loss",
        default=None,
        choices=["answer", "full"],
        help="answer: the answer tokens only [default]; full: every position, as the paper's code",
    )
    lo.add_argument(
        "--no-bucketing",
        dest="bucketing",
        action="store_const",
        const=False,
        default=None,
        help="shuffle examples into batches each epoch instead of fixed similar-length micro-batches",
    )
    lo.add_argument(
        "--no-reuse",
        dest="reuse",
        action="store_const",
        const=False,
        default=None,
        help="recompute the frozen layers below the adapter at every step (the old path; same results)",
    )
    lo.add_argument(
        "--autocast",
        default=None,
        choices=["auto", "off", "bf16"],
        help="forward passes under bf16 autocast [auto: bf16 on a GPU, off on a CPU]",
    )
    lo.add_argument(
        "--activation-mb",
        type=int,
        default=None,
        help="activations kept for backward per training piece, MiB; a micro-batch that needs more "
        "runs in row pieces (same results) [CPU: 512; GPU: a quarter of its free memory]",
    )
    lo.add_argument("--n-test", type=int, default=None, help="zero-shot BLEU on the first N devtest pairs [all]")
    lo.add_argument("--out-dir", default=None, help=f"adapters go here [{default(LoraRun, 'out_dir')}]")
    lo.add_argument("--store", default=None, help="results store (default <out-dir>/study.sqlite)")
    add_data_and_device_options(lo)
    add_executor_options(lo)
    lo.set_defaults(command_name="lora-sweep")


def _add_startup(sub) -> None:
    """``startup``: where a command's first seconds go."""
    st = sub.add_parser(
        "startup",
        help="where a command's first seconds go: imports, model load, first token (fresh processes, medians)",
    )
    st.add_argument("--model", default=None, help=MODEL_HELP)
    repeats = default(StartupSettings, "repeats")
    st.add_argument("--repeats", type=int, default=None, help=f"fresh processes per measurement (default {repeats})")
    st.add_argument("--json", default=None, help="also write the measurements here")
    st.add_argument("--dtype", default=None, help="float32 / bfloat16 / float16 (default: fp32 CPU, bf16 GPU)")
    st.add_argument("--device", default=None, help="cpu / cuda (default: cuda if available)")
    st.set_defaults(command_name="startup")


def _add_demo(sub) -> None:
    """``demo``: the main job on the embedded model."""
    demo = sub.add_parser("demo", help="the main job: a small real study on the embedded model")
    demo.add_argument("--out-dir", default=None, help=f"where the study goes [{default(DemoSettings, 'out_dir')}]")
    demo.add_argument(
        "--n-test", type=int, default=None, help=f"test sentences per unit [{default(DemoSettings, 'n_test')}]"
    )
    demo.add_argument("--data-dir", default=None, help="data directory (default $ICL_LOCATE_DATA_DIR)")
    demo.set_defaults(command_name="demo")


def build_parser() -> argparse.ArgumentParser:
    p = Parser(prog="icl-locate", description="Find where in-context learning happens inside a decoder LLM.")
    sub = p.add_subparsers(dest="command", required=True, parser_class=Parser)
    _add_run(sub)
    _add_bench(sub)
    _add_prune(sub)
    _add_score_code(sub)
    _add_listings(sub)
    _add_data(sub)
    _add_sweep(sub)
    _add_atlas(sub)
    _add_plan(sub)
    _add_report(sub)
    _add_lora_sweep(sub)
    _add_startup(sub)
    _add_demo(sub)
    return p
