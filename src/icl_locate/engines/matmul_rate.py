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
from ..util.system import fit_threads_to_cpu_quota, hardware
from .calibration_cache import CalibrationCache
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
    kept_rates, name = CalibrationCache(cache if cache is not None else cache_dir() / "calibration"), f"matmul-{digest}"
    kept = (kept_rates.get(name) or {}).get("tflops")  # an entry that cannot be read, or not a rate: measured again
    if isinstance(kept, (int, float)) and not isinstance(kept, bool) and math.isfinite(kept) and kept > 0:
        return float(kept), "cached"
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
    kept_rates.put(name, dict(key=key, tflops=tflops, seconds=elapsed))  # a read-only cache: measured next time
    return tflops, f"measured in {elapsed:.1f}s"
