"""``icl-locate startup``: where a command's first seconds go, each part measured in a fresh process.

- ``--help``: the whole command, start to exit (parsing imports no torch);
- imports: ``import icl_locate.cli`` alone, then what a model command imports on top: the API
  (``icl_locate.api``: torch, transformers, the engines and the experiments' code);
- model load: ``load_model`` (the embedded model: its cached checkpoint), after those imports;
- first token: one greedy token of a short prompt with the reference engine.

Every part runs ``repeats`` times in new Python processes (so nothing is imported already) and
the median is reported, beside the machine it ran on.
"""

from __future__ import annotations

import json
import statistics
import subprocess
import sys
import time

from ..util.errors import UserError
from ..util.system import fit_threads_to_cpu_quota, hardware, hardware_line
from .options import StartupSettings

# Runs in a fresh interpreter; prints one JSON line of seconds per phase.
_CHILD = """
import json, sys, time
started = time.perf_counter()
import icl_locate.cli
cli = time.perf_counter()
import icl_locate.api
from icl_locate.core.models import load_model
from icl_locate.engines.base import StopRule
from icl_locate.engines.reference import greedy_decode
stack = time.perf_counter()
loaded = load_model(sys.argv[1], dtype=sys.argv[2] or None, device=sys.argv[3] or None)
load = time.perf_counter()
ids = loaded.tokenizer("Q: Bonjour\\nA:")["input_ids"]
greedy_decode(loaded.model, loaded.tokenizer, ids, stop=StopRule((), 1))
first = time.perf_counter()
print(json.dumps(dict(imports_cli=cli - started, imports_model_stack=stack - cli, model_load=load - stack,
                      first_token=first - load, to_model_loaded=load - started)))
"""


def _seconds(argv: list[str]) -> float:
    started = time.perf_counter()
    done = subprocess.run(argv, capture_output=True, text=True)
    if done.returncode != 0:
        raise UserError(f"{' '.join(argv[:3])} ... failed: {(done.stderr.strip().splitlines() or ['?'])[-1]}")
    return time.perf_counter() - started


def _phases(s: StartupSettings) -> dict[str, float]:
    done = subprocess.run(
        [sys.executable, "-c", _CHILD, s.model, s.dtype or "", s.device or ""], capture_output=True, text=True
    )
    if done.returncode != 0:
        raise UserError(f"loading {s.model} failed: {(done.stderr.strip().splitlines() or ['?'])[-1]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def run_startup(s: StartupSettings, log=print) -> dict:
    """Median seconds of each phase over ``s.repeats`` fresh processes, and the machine."""
    if s.repeats < 1:
        raise UserError(f"--repeats must be >= 1, got {s.repeats}")
    log(f"startup: {s.repeats} fresh processes per measurement ...")
    _phases(s)  # builds the model cache on first use and warms the file cache: not counted
    helps = [_seconds([sys.executable, "-m", "icl_locate.cli", "--help"]) for _ in range(s.repeats)]
    runs = [_phases(s) for _ in range(s.repeats)]
    result: dict = {name: statistics.median(r[name] for r in runs) for name in runs[0]}
    result["help"] = statistics.median(helps)
    if (s.device or "cpu") == "cpu":
        fit_threads_to_cpu_quota()  # as each child's ``load_model`` did: the threads they ran with
    result["hardware"] = hardware(s.device or "cpu")
    result["model"] = s.model
    return result


def startup_table(result: dict) -> str:
    rows = [
        ("icl-locate --help (whole command)", "help"),
        ("import icl_locate.cli", "imports_cli"),
        ("import icl_locate.api (model stack)", "imports_model_stack"),
        ("load_model", "model_load"),
        ("first greedy token", "first_token"),
        ("start to model loaded", "to_model_loaded"),
    ]
    lines = [f"{'phase':<40} {'seconds':>8}"] + [f"{label:<40} {result[key]:8.2f}" for label, key in rows]
    lines.append(f"model {result['model']}; medians of fresh processes on {hardware_line(result['hardware'])}")
    return "\n".join(lines)
