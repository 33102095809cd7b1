"""The README's main job: a small but real study on the embedded Gemma-3-270M, with its report.

fra->eng, 5 examples, seed 0, the first ``n_test`` devtest sentences; baseline plus
instructions+examples and examples-only masking from every layer; results in a SQLite store
(rerunning resumes). Then context-pruned inference at the recognition layer found for
instructions+examples (measured against full processing, kept in the same store), and the
HTML report. Each step is an ordinary command, printed so that it can be rerun alone.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

from ..core.catalog import EMBEDDED
from ..core.models import LoadedModel
from ..results.analysis import Curve, analyse_curve, load_curves, summary_lines
from ..results.report import build_report
from ..results.store import Store
from ..util.fileio import ensure_dir
from .options import DemoSettings, PruneSettings
from .prune import run_prune
from .settings import SweepConfig
from .sweep import prepare, run_sweep


def run_demo(s: DemoSettings, say: Callable[[str], None] = print) -> Path:
    """Sweep, summary, pruning at the recognition layer, report; returns the report's path."""
    out_dir = ensure_dir(s.out_dir)
    started = time.time()
    config = SweepConfig(
        model=EMBEDDED,
        task="flores",
        pairs=["fra-eng"],
        conditions=["instructions+examples", "examples"],
        instructions=[True],
        seeds=[0],
        ks=[5],
        layers="all",
        n_test=s.n_test,
        data_dir=s.data_dir,
    )
    store_path = out_dir / "study.sqlite"
    loaded = prepare(config)[0]  # loaded once for the sweep and the pruning
    run_sweep(config, store_path, f"icl-locate demo --n-test {s.n_test}", loaded=loaded)
    with Store(store_path, create=False) as store:
        curves = [analyse_curve(c) for c in load_curves(store)]
    for c in curves:
        say("")
        for line in summary_lines(c):
            say(line)
    prune_at_recognition_layer(store_path, curves, s, say, loaded)
    with Store(store_path, create=False) as store:
        report = build_report(store, out_dir / "report")
    say(f"\nmain job done in {time.time() - started:.0f}s; report: {report}")
    return report


def prune_at_recognition_layer(
    store_path: Path,
    curves: list[Curve],
    s: DemoSettings,
    say: Callable[[str], None],
    loaded: LoadedModel | None = None,
) -> None:
    """The deployable saving: drop the context after the recognition layer, measured (once per store)."""
    curve = next((c for c in curves if c.key.get("condition") == "instructions+examples"), None)
    with Store(store_path, create=False) as store:
        done = any(p["condition"] == "instructions+examples" for p in store.pruning_results())
    if curve is None or curve.recognition is None or curve.recognition >= curve.layers[-1]:
        say("\nno recognition layer below the last one: nothing to prune")
        return
    if done:
        say(f"\ncontext-pruned inference already measured in {store_path}")
        return
    settings = PruneSettings(layer=curve.recognition, n_test=s.n_test, store=str(store_path), data_dir=s.data_dir)
    command = f"icl-locate prune --layer {curve.recognition} --n-test {s.n_test} --store {store_path}" + (
        f" --data-dir {s.data_dir}" if s.data_dir else ""
    )
    say(f"\n$ {command}")
    say(run_prune(settings, command, log=say, loaded=loaded).table())
