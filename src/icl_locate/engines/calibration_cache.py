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

An entry that is unreadable or malformed is measured again and overwritten.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import TypeGuard

from ..util.fileio import write_json_atomic


def digest(spec: dict) -> str:
    """A short stable hash of a JSON-able spec (the name of a cache entry)."""
    return hashlib.sha256(json.dumps(spec, sort_keys=True, default=str).encode()).hexdigest()[:24]


class CalibrationCache:
    """JSON entries by key in ``directory``; with ``enabled`` False nothing is read or written."""

    def __init__(self, directory: Path, enabled: bool = True):
        self.directory, self.enabled = directory, enabled

    def get(self, key: str) -> dict | None:
        """The entry kept under ``key``; None where there is none, it is unreadable or not a JSON object."""
        path = self.directory / f"{key}.json"
        if not (self.enabled and path.is_file()):
            return None
        try:
            data = json.loads(path.read_text())
        except ValueError:
            return None  # an unreadable entry: measure again
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


def length_bucket(tokens: int) -> int:
    """The power of two at or above ``tokens`` (at least 1): lengths within one share a cache entry (a work's
    first prompt, a refusal's cache)."""
    return 1 << max(tokens - 1, 0).bit_length()


def refusal_covers(refusal: dict | None, rows: int) -> TypeGuard[dict]:
    """Whether a kept drafts refusal (of this cache bucket) holds for steps of ``rows`` rows: it was timed on
    at least two rows and no more than these (the module docstring says why)."""
    return refusal is not None and _number(refusal.get("rows")) and _explained(refusal) and 2 <= refusal["rows"] <= rows
