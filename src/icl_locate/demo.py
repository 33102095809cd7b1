"""The README's main job: a small but real study on the embedded Gemma-3-270M, with its report.

fra->eng, 5 examples, seed 0, the first ``--n-test`` devtest sentences; baseline plus
instructions+examples and examples-only masking from every layer; results in a SQLite store
(rerunning resumes). Then context-pruned inference at the recognition layer found for
instructions+examples (measured against full processing, kept in the same store), and the
HTML report. Each step is an ordinary command, printed so that it can be rerun alone.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

from .errors import UserError


def run_demo(args) -> int:
    from .cli import run_sweep
    from .report import build_report
    from .store import Store
    from .sweep import SweepConfig

    out_dir = Path(args.out_dir)
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise UserError(f"cannot create {out_dir}: {err.strerror}") from None
    started = time.time()
    config = SweepConfig(model="gemma-3-270m", task="flores", pairs=["fra-eng"],
                         conditions=["instructions+examples", "examples"], instructions=[True], seeds=[0], ks=[5],
                         layers="all", n_test=args.n_test, data_dir=args.data_dir)
    store_path = out_dir / "study.sqlite"
    run_sweep(config, str(store_path), f"icl-locate demo --n-test {args.n_test}")
    curves = _print_summary(store_path)
    _prune_at_recognition_layer(store_path, curves, args)
    report = build_report(Store(store_path, create=False), out_dir / "report")
    print(f"\nmain job done in {time.time() - started:.0f}s; report: {report}")
    return 0


def _prune_at_recognition_layer(store_path: Path, curves: list, args) -> None:
    """The deployable saving: drop the context after the recognition layer, measured (once per store)."""
    from .cli import build_parser
    from .store import Store

    curve = next((c for c in curves if c.key.get("condition") == "instructions+examples"), None)
    store = Store(store_path, create=False)
    try:
        done = any(p["condition"] == "instructions+examples" for p in store.pruning_results())
    finally:
        store.close()
    if curve is None or curve.recognition is None or curve.recognition >= curve.layers[-1]:
        print("\nno recognition layer below the last one: nothing to prune")
        return
    if done:
        print(f"\ncontext-pruned inference already measured in {store_path}")
        return
    argv = ["prune", "--layer", str(curve.recognition), "--n-test", str(args.n_test), "--store", str(store_path)]
    if args.data_dir:
        argv += ["--data-dir", args.data_dir]
    prune = build_parser().parse_args(argv)
    prune.command_line = "icl-locate " + " ".join(argv)
    print(f"\n$ {prune.command_line}", flush=True)
    prune.func(prune)


def _print_summary(store_path: Path) -> list:
    """Print each analysed curve; return them."""
    from .analysis import analyse_curve, load_curves, savings
    from .store import Store

    store = Store(store_path, create=False)
    curves = [analyse_curve(c) for c in load_curves(store)]
    store.close()
    for c in curves:
        s = savings(c, c.layers[-1])
        print(f"\n{c.key['pair']} {c.label()}: baseline BLEU {c.baseline:.1f}; recognition layer {c.recognition} "
              f"(95% CI {c.recognition_ci[0]:.0f}-{c.recognition_ci[1]:.0f}) of {c.layers[-1]}; savings "
              f"{100 * s.paper_formula:.1f}% (paper formula), {100 * s.token_exact:.1f}% (exact tokens)")
        print("  BLEU by layer: " + " ".join(f"{l}:{v:.1f}" for l, v in zip(c.layers, c.score)))
    return curves
