"""What the calibration keeps between runs, in the cache directory: its choices for each shape of work,
and two verdicts that hold beyond the work they were measured on.

- The head's verdict, per machine, model and the rows a head call takes (to a power of two): which LM
  head is fastest (timed on one prompt's final states, whatever else the work is).
- A refusal of drafts, per machine, model, head and cache length to a power of two: a step fed
  1 + N tokens cost more than the drafts' limit times a step fed one, on R rows. A step's cost is
  a fixed part (launches, weights read once) plus a part per row: one that grows with the tokens fed
  (products, attention scores) and one that does not (the row's keys and values read). So the ratio
  of the two steps rises with the rows (its derivative in rows has the sign of the fixed part), and
  the refusal holds for any work of at least R rows over a cache of the same length. The cache's
  length moves both per-row parts, so the ratio can go either way with it: a refusal is not taken
  across lengths. Nor is one timed on a single row kept: a single row's products can run other
  kernels (matrix-vector ones) than those of several rows. Drafts taken (latency-bound decoding,
  where steps are fast) are measured again each time.
- The batch check's verdict where it found decoding not latency-bound (``batch_rows.compute_bound``),
  per machine, model, head, the rule's rows, one query's rows and cache length to a power of two: the
  check then times the rule's rows and its halvings down to one query's rows, steps over the same cache,
  so nothing else of the work moves it. A latency-bound verdict (doublings, bounded by the free KV memory
  and the work's own rows) is measured again each time.

An entry that is unreadable or malformed is measured again and overwritten.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import TypeGuard

import transformers

from .. import __version__
from ..util.fileio import write_json_atomic
from ..util.system import hardware

CALIBRATION_VERSION = 31  # part of every key: a change of the procedure re-measures


def digest(spec: dict) -> str:
    """A short stable hash of a JSON-able spec (the name of a cache entry)."""
    return hashlib.sha256(json.dumps(spec, sort_keys=True, default=str).encode()).hexdigest()[:24]


def calibration_identity(model, model_id: dict | None) -> dict:
    """What every timing depends on: the procedure, the machine, the model (``model_id``, else its class and
    config), its dtype and device, the library versions and the threads asked for."""
    param = next(model.parameters())
    return dict(
        version=CALIBRATION_VERSION,
        hardware=hardware(param.device),
        model=model_id or dict(type=type(model).__name__, config=model.config.to_json_string()),
        dtype=str(param.dtype),
        transformers=transformers.__version__,
        icl_locate=__version__,
        threads_env=os.environ.get("OMP_NUM_THREADS"),
    )


def verdict_key(kind: str, identity: dict, **shape) -> str:
    """The name of a verdict kept beyond the work it was measured on (``kind``: "head", "drafts", "batch"): the
    identity and what of the work's shape it depends on (the module docstring says what, for each)."""
    return f"{kind}-" + digest(identity | shape)


class CalibrationCache:
    """JSON entries by key in ``directory``; with ``enabled`` False nothing is read or written."""

    def __init__(self, directory: Path, enabled: bool = True):
        self.directory, self.enabled = directory, enabled

    def get(self, key: str) -> dict | None:
        """The entry kept under ``key``; None where there is none, it is unreadable or not a JSON object."""
        if not self.enabled:
            return None
        try:  # no existence check first: on a directory the process may not read, that check raises too
            data = json.loads((self.directory / f"{key}.json").read_text())
        except (OSError, ValueError):
            return None  # an unreadable entry (another user's in a shared cache, a torn disk): measure again
        return data if isinstance(data, dict) else None

    def put(self, key: str, data: dict) -> None:
        """Keep ``data`` under ``key``, written all or nothing (a cache that cannot be written is skipped)."""
        if not self.enabled:
            return
        try:
            self.directory.mkdir(parents=True, exist_ok=True)
            write_json_atomic(self.directory / f"{key}.json", data)
        except OSError:
            pass  # a read-only cache only costs the next run the measurement


def _number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _timings(value) -> bool:
    return isinstance(value, dict) and all(_number(v) for v in value.values())


def _explained(entry: dict) -> bool:
    """Whether a kept verdict carries its reason and its numeric timings (both go on the new run's record)."""
    return isinstance(entry.get("reason"), str) and _timings(entry.get("measured"))


def valid_head_verdict(verdict: dict | None, kinds: tuple[str, ...]) -> TypeGuard[dict]:
    """A head verdict as the calibration writes it: one of ``kinds``, a reason, numeric timings."""
    return verdict is not None and verdict.get("head") in kinds and _explained(verdict)


def valid_batch_verdict(verdict: dict | None) -> TypeGuard[dict]:
    """A batch verdict as the calibration writes it: a positive factor, a reason, numeric timings."""
    return verdict is not None and _number(verdict.get("scale")) and verdict["scale"] > 0 and _explained(verdict)


def length_bucket(tokens: int) -> int:
    """The power of two at or above ``tokens`` (at least 1): lengths within one share a cache entry (a work's
    first prompt, a refusal's cache)."""
    return 1 << max(tokens - 1, 0).bit_length()


def refusal_covers(refusal: dict | None, rows: int) -> TypeGuard[dict]:
    """Whether a kept drafts refusal (of this cache bucket) holds for steps of ``rows`` rows: it was timed on
    at least two rows and no more than these (the module docstring says why)."""
    return refusal is not None and _number(refusal.get("rows")) and _explained(refusal) and 2 <= refusal["rows"] <= rows
