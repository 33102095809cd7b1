"""The rate of one matrix product on this machine (``icl-locate plan``: the products of a decoding step),
measured once per machine and shape and cached like the engine choices."""

from __future__ import annotations

import hashlib
import json
import math
import time
from pathlib import Path

import torch

from ..core.checkpoints import cache_dir
from ..util.fileio import write_json_atomic
from ..util.system import fit_threads_to_cpu_quota, hardware
from .timing import synchronizer

MATMUL_VERSION = 1  # part of the cache key: a change of the procedure measures again


def matmul_tflops(
    rows: int, k: int, n: int, dtype: str, device: str, seconds: float = 1.0, cache: Path | None = None
) -> tuple[float, str]:
    """TFLOP/s of a [rows x k] @ [k x n] product in ``dtype`` on ``device`` (``icl-locate plan``: the products
    of a decoding step), and "measured in Ns" or "cached". Timed for about ``seconds`` after a warm-up,
    once per machine and shape: cached like the engine choices."""
    if device == "cpu":
        fit_threads_to_cpu_quota()  # the threads a run's ``load_model`` leaves: what the rate is for
    key = dict(hardware(device), dtype=dtype, rows=rows, k=k, n=n, version=MATMUL_VERSION)
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]
    path = (cache if cache is not None else cache_dir() / "calibration") / f"matmul-{digest}.json"
    kept = _kept_rate(path)
    if kept is not None:
        return kept, "cached"
    a = torch.randn(rows, k, dtype=getattr(torch, dtype), device=device)  # [rows, k]
    b = torch.randn(k, n, dtype=getattr(torch, dtype), device=device)  # [k, n]
    sync = synchronizer(device)
    torch.mm(a, b)  # warm-up: kernels chosen, memory touched
    sync()
    started, repeats = time.perf_counter(), 0
    while (elapsed := time.perf_counter() - started) < seconds or repeats < 3:
        torch.mm(a, b)
        sync()
        repeats += 1
    tflops = 2 * rows * k * n * repeats / elapsed / 1e12
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        write_json_atomic(path, dict(key=key, tflops=tflops, seconds=elapsed))
    except OSError:
        pass  # a read-only cache only costs the next run the measurement
    return tflops, f"measured in {elapsed:.1f}s"


def _kept_rate(path: Path) -> float | None:
    """The rate kept at ``path``; None where there is none or it cannot be read as one (measured again)."""
    try:
        tflops = json.loads(path.read_text())["tflops"]
    except (OSError, ValueError, KeyError, TypeError):
        return None
    usable = isinstance(tflops, (int, float)) and not isinstance(tflops, bool) and math.isfinite(tflops) and tflops > 0
    return float(tflops) if usable else None
