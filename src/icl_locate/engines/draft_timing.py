"""Whether drafts pay here, and how long: a decoding step fed 1 + N tokens against one fed 1 token.

A draft (``drafts.py``) is verified by feeding its tokens with the last one, so a step with a draft of
N tokens computes 1 + N positions a row. That pays where decoding is latency-bound (a GPU: a step fed a
few more tokens costs about what one fed one does), not where it is compute-bound (a CPU: each token
costs). So the steps are timed over the work's first prompt (``batch_rows.DecodingSteps``), with the head
the engine will use at every fed position (verifying a draft needs the head at each).
"""

from __future__ import annotations

import torch

from .batch_rows import DecodingSteps
from .calibration_cache import CalibrationCache, refusal_covers
from .head import CertifiedHead
from .timing import REPEATS, Timer, interleaved

DRAFT_LENGTHS = (2, 4, 8)  # tried shortest first
# Drafts are taken where a step fed 1 + N tokens costs at most this many times a step fed one: decoding
# that is latency-bound (a GPU: about 1.0x), not compute-bound (a CPU: 1.3x to 1.5x). Drafts that are
# rarely accepted (short answers) then cost little; on a compute-bound machine they cost nearly the
# whole ratio, so the limit keeps a margin below where a noisy timing of a CPU can fall.
DRAFT_COST_LIMIT = 1.1
# A first round's ratio above this settles a length without more rounds (an outlier can only refuse drafts;
# a ratio this far above the limit takes a round slowed by nearly a third).
DRAFT_COST_CLEAR = 1.3 * DRAFT_COST_LIMIT
# Drafts are timed on this many rows first (fewer where the engine's batches are smaller): a step's fixed
# part weighs less the more rows it has (``calibration_cache.py``), so a refusal there holds for more rows;
# only drafts taken there are timed again on the engine's rows. (One row is not a probe: a single row's
# products can run other kernels, matrix-vector ones, than those of several rows.)
DRAFT_PROBE_ROWS = 16
# ends a drafts reason taken from an earlier refusal (``calibration_cache.py``: why it holds for this work)
DRAFTS_CACHED = "; measured before for this model here, on no more rows over a cache of about this length"


def choose_drafts(
    steps: DecodingSteps, rows: int, screen: CertifiedHead | None, timer: Timer, kept: CalibrationCache, key: str
) -> tuple[int, str, dict[str, float]]:
    """The draft length for the engine's steps of ``rows`` rows over ``steps``' cache, why, and the seconds that
    decided it: none where a refusal kept under ``key`` covers these rows (``calibration_cache.refusal_covers``),
    else measured (``time_drafts``) on ``DRAFT_PROBE_ROWS`` rows first, on ``rows`` only where drafts paid there.
    A refusal timed on more than one row is kept."""
    refusal = kept.get(key)
    if refusal_covers(refusal, rows):
        return 0, refusal["reason"] + DRAFTS_CACHED, refusal["measured"]
    for timed in dict.fromkeys((min(rows, DRAFT_PROBE_ROWS), rows)):  # the probe, then the engine's rows
        timings: dict[str, float] = {}  # the round that decides is recorded
        best, ratios = time_drafts(steps, timed, screen, timer, timings)
        if not (ratios and best):
            break  # refused (or not timeable) on these rows: on more rows too
    if not ratios:
        return 0, "the prompt is too short to time a draft's step over", timings
    n = best or min(ratios)
    reason = f"a step of {1 + n} tokens costs {ratios[n]:.1f}x one token's on {timed} rows here"
    if best:
        return best, reason, timings
    reason += f" (> {DRAFT_COST_LIMIT}x)"
    if timed > 1:
        kept.put(key, dict(rows=timed, reason=reason, measured=timings))
    return 0, reason + ("" if timed == rows else f"; more on the engine's {rows} rows"), timings


def time_drafts(
    steps: DecodingSteps, rows: int, screen: CertifiedHead | None, timer: Timer, measured: dict
) -> tuple[int, dict[int, float]]:
    """The longest draft length whose step of ``rows`` rows costs at most ``DRAFT_COST_LIMIT`` times a one-token
    step (0: none), and the ratio of each length timed (shortest first, up to the first above the limit); the
    seconds of each step timed go into ``measured`` ("step/1", "step/1+N")."""
    best, ratios = 0, {}
    for n in (n for n in DRAFT_LENGTHS if 1 + n <= len(steps.tokens)):  # against one token, in alternation
        with torch.no_grad():
            fns = {"step/1": steps.step(rows, screen), f"step/1+{n}": steps.step(rows, screen, 1 + n)}
            seconds = interleaved(
                timer,
                fns,
                REPEATS,
                lambda m, n=n: {f"step/1+{n}"} if m[f"step/1+{n}"] > DRAFT_COST_CLEAR * m["step/1"] else set(),
            )
        measured.update(seconds)
        ratios[n] = seconds[f"step/1+{n}"] / seconds["step/1"] if seconds["step/1"] > 0 else float("inf")
        if ratios[n] > DRAFT_COST_LIMIT:
            break  # longer drafts cost more still
        best = n
    steps.release()  # the buffers of these rows x 9 tokens (the batch check makes its own)
    if screen is not None:
        screen.release()
    return best, ratios
