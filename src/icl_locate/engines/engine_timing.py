"""Which engine decodes the work faster here: a short run of the first query's rows on each.

The tree engine shares what a query's rows have in common (``tree.py``), with the head and drafts the
calibration chose for it; the fast engine decodes each row on its own, with the model's head. Which is
faster depends on how much the rows share (the condition, the rows' kinds), on that head and those drafts,
and on the machine. So both decode a spread of the first query's rows for a few tokens, continuing the
same prefix caches (every engine makes the same ones: they are not what differs), and the faster is used.
"""

from __future__ import annotations

from collections.abc import Sequence

from ..core.conditions import MaskedPrompt
from .base import StopRule
from .batch_rows import DecodingSteps
from .fast import FastEngine
from .timing import Timer, ratio
from .tree import TreeEngine

MINI_RUN_TOKENS = 3  # new tokens in the engine comparison: the query's prefill and two decoding steps
MINI_RUN_ROWS = 10  # at most this many rows of the first query (a spread of them) in the engine comparison
# The engines' mini-runs are timed once each; where the slower took less than this many times the faster, each
# runs once more in the other order and the faster of each engine's two runs counts (a near tie is where one
# run's noise, e.g. a first run's set-up or another process, would decide)
ENGINE_CLEAR = 1.25


def mini_run_rows(interventions: Sequence) -> list:
    """At most ``MINI_RUN_ROWS`` of a query's rows: a spread of them, the first and the last included."""
    rows = list(interventions)
    if len(rows) <= MINI_RUN_ROWS:
        return rows
    step = (len(rows) - 1) / (MINI_RUN_ROWS - 1)
    return list(dict.fromkeys(rows[round(i * step)] for i in range(MINI_RUN_ROWS)))


def time_engines(
    fast: FastEngine,
    tree: TreeEngine,
    prompt: MaskedPrompt,
    interventions: Sequence,
    stop: StopRule,
    steps: DecodingSteps | None,
    timer: Timer,
) -> tuple[str, str, dict[str, float]]:
    """The faster of ``fast`` and ``tree`` on a short run (``MINI_RUN_TOKENS``) of ``mini_run_rows`` of
    ``prompt``'s rows, the reason, and each engine's seconds ("engine/fast", "engine/tree"). Both continue the
    same prefix caches, made before the runs, untimed: a prefix needing no intervention of its own is read off
    the prompt's cache ``steps`` hold (``DecodingSteps.prefix_kv``: no forward), any other made once."""
    rows = mini_run_rows(interventions)
    short = StopRule(stop.stop_strings, min(stop.max_new_tokens, MINI_RUN_TOKENS))
    planned = fast.plan([prompt], rows)
    if steps is not None:
        keys = dict.fromkeys(row.prefix_key for row in planned if row.prefix_key[1] is None)
        plain = {key: steps.prefix_kv(key[0]) for key in keys}
        fast.known_prefixes = {key: kv for key, kv in plain.items() if kv is not None}
    made = fast.prefix_caches(planned)
    known = {row.prefix_key: made.get(row) for row in planned}
    engines = {"fast": fast, "tree": tree}
    for engine in engines.values():
        engine.known_prefixes = known
    runs = {
        f"engine/{name}": (lambda engine=engine: engine.generate([prompt], rows, short))
        for name, engine in engines.items()
    }
    seconds = {name: [timer(name, run)] for name, run in runs.items()}  # seconds of work: once each
    if max(s[0] for s in seconds.values()) < ENGINE_CLEAR * min(s[0] for s in seconds.values()):
        for name in reversed(runs):  # a near tie: each again, in the other order; noise only adds time
            seconds[name].append(timer(name, runs[name]))
    measured = {name: min(s) for name, s in seconds.items()}
    fast_seconds, tree_seconds = measured["engine/fast"], measured["engine/tree"]
    what = f"on {len(rows)} rows x {short.max_new_tokens} tokens after their prefix cache"
    if tree_seconds <= fast_seconds:
        return "tree", f"{ratio(fast_seconds, tree_seconds)} faster than the fast engine {what}", measured
    return "fast", f"{ratio(tree_seconds, fast_seconds)} faster than the tree engine {what}", measured
