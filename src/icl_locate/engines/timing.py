"""Timing for the calibration: one run of a piece of work, and pieces compared in alternation.

A host's speed drifts (other work, clocks), so timings compared with each other alternate between the
sides, after one warm-up of each (kernels chosen, memory touched); tests replace the ``Timer`` with fake
timings by name."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Mapping

import torch

Timer = Callable[[str, Callable[[], object]], float]  # (what is timed, the work) -> seconds of one run
REPEATS = 3  # timings compared with each other: the median of at most this many alternating rounds after a warm-up


def synchronizer(device: torch.device | str | None = None) -> Callable[[], None]:
    """What waits for the work queued on ``device`` (GPU work runs after the host queues it): that GPU's
    synchronisation, nothing on a CPU; with no device, every GPU this process has used."""
    if device is None:
        if not (torch.cuda.is_available() and torch.cuda.is_initialized()):
            return lambda: None

        def every_gpu() -> None:
            for gpu in range(torch.cuda.device_count()):
                torch.cuda.synchronize(gpu)

        return every_gpu
    place = torch.device(device)
    return (lambda: torch.cuda.synchronize(place)) if place.type == "cuda" else (lambda: None)


def measure_seconds(name: str, fn: Callable[[], object]) -> float:
    """Seconds one run of ``fn`` takes (GPU work synchronised, on every GPU in use: the work's device is not
    known here); ``name`` says what is timed (the ``Timer`` protocol: tests inject fake timings by name).
    Repeats and warm-ups are the caller's (``interleaved``)."""
    sync = synchronizer()
    sync()  # the work queued before is not this one's
    started = time.perf_counter()
    fn()
    sync()
    return time.perf_counter() - started


def interleaved(
    timer: Timer,
    fns: Mapping[str, Callable[[], object]],
    rounds: int,
    beaten: Callable[[dict[str, float]], set[str]] = lambda medians: set(),
    warmed: bool = False,
) -> dict[str, float]:
    """The median seconds of each of ``fns`` over up to ``rounds`` rounds that run each once in turn, after
    one warm-up of each (none where ``warmed``: each ran once just before, e.g. a check on the same input):
    a machine whose speed drifts during the measurement slows them alike. After a round, the names
    ``beaten`` picks from the medians so far (out of contention already: a ratio far from its limit) are
    timed no more; the rounds end where fewer than two are left to compare."""
    for fn in () if warmed else fns.values():
        fn()
    times: dict[str, list[float]] = {name: [] for name in fns}
    timed = list(fns)
    for _ in range(rounds):
        for name in timed:
            times[name].append(timer(name, fns[name]))
        out = beaten(medians(times))
        timed = [name for name in timed if name not in out]
        if len(timed) < 2:
            break
    return medians(times)


def drop_timings(measured: dict[str, float], prefix: str) -> None:
    """Remove the timings named ``prefix``... from ``measured`` (a choice measured again replaces them)."""
    for name in [name for name in measured if name.startswith(prefix)]:
        del measured[name]


def medians(times: dict[str, list[float]]) -> dict[str, float]:
    return {name: statistics.median(t) for name, t in times.items()}


def ratio(slow: float, fast: float) -> str:
    """How many times slower ``slow`` seconds are than ``fast``, as a reason says it."""
    return f"{slow / fast:.1f}x" if fast > 0 else "inf"
