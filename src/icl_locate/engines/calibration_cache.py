"""What the calibration keeps between runs, in the cache directory: its choices for each shape of work,
and two verdicts that hold for a machine and model whatever the work.

- The head's verdict: which LM head is fastest (timed on one prompt's final states whatever the work).
- The drafts' refusal: a step fed 1 + N tokens cost more than the drafts' limit times a step fed one,
  on R rows over a cache of C tokens. A step's cost is a fixed part (launches, weights read once)
  plus a part that grows with rows x fed tokens; the fixed part is what makes drafts cheap, and it
  weighs less the more rows a step has and the shorter its cache (keys and values are read once per
  step whatever is fed). So the refusal holds for work of at least R rows over a cache of at most C
  tokens, and such work skips the drafts check. Drafts taken (latency-bound decoding, where steps
  are fast) are measured again each time.

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
        path = self.directory / f"{key}.json"
        if not (self.enabled and path.is_file()):
            return None
        try:
            data = json.loads(path.read_text())
        except ValueError:
            return None  # an unreadable entry: measure again
        return data if isinstance(data, dict) else None

    def put(self, key: str, data: dict) -> None:
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


def valid_head_verdict(verdict: dict | None, kinds: tuple[str, ...]) -> TypeGuard[dict]:
    """A head verdict as the calibration writes it: one of ``kinds``, a reason, numeric timings."""
    return (
        verdict is not None
        and verdict.get("head") in kinds
        and isinstance(verdict.get("reason"), str)
        and _timings(verdict.get("measured"))
    )


def refusal_covers(refusal: dict | None, rows: int, cache_tokens: int) -> TypeGuard[dict]:
    """Whether a kept drafts refusal holds for steps of ``rows`` rows over ``cache_tokens`` cached tokens:
    it was measured on no more rows and over a cache no shorter (the module docstring says why)."""
    return (
        refusal is not None
        and _number(refusal.get("rows"))
        and _number(refusal.get("cache_tokens"))
        and isinstance(refusal.get("reason"), str)
        and _timings(refusal.get("measured"))
        and refusal["rows"] <= rows
        and refusal["cache_tokens"] >= cache_tokens
    )
