"""The paper's masking conditions, and a prompt with the columns its condition hides.

A condition names the prompt parts hidden from attention (instructions, examples, query, or
everything but BOS and the last token). ``MaskedPrompt`` pairs one encoded prompt with a
condition and computes the hidden token ranges once: engines read them from there and the
store keeps them as they are, so condition -> ranges is decided in exactly one place.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from ..util.errors import UserError
from .prompts import EncodedPrompt

Range = tuple[int, int]


@dataclass(frozen=True)
class Condition:
    """A named masking condition of the paper: which prompt parts are hidden."""

    name: str
    paper_code: str
    parts: frozenset[str]  # subset of {"instructions", "examples", "query"}
    all_but_last: bool = False
    description: str = ""


CONDITIONS: dict[str, Condition] = {
    c.name: c
    for c in (
        Condition("baseline", "baseline", frozenset(), description="nothing hidden"),
        Condition(
            "instructions+examples",
            "TTF",
            frozenset({"instructions", "examples"}),
            description="hide the instructions and the in-context examples",
        ),
        Condition("examples", "FTF", frozenset({"examples"}), description="hide the examples only"),
        Condition("query", "FFT", frozenset({"query"}), description="hide the test query only"),
        Condition(
            "instructions+examples+query",
            "TTT",
            frozenset({"instructions", "examples", "query"}),
            description="hide instructions, examples and query",
        ),
        Condition("instructions", "TF", frozenset({"instructions"}), description="hide the instructions only"),
        Condition(
            "all-but-last",
            "mask_all",
            frozenset(),
            all_but_last=True,
            description="hide every prompt token but BOS and the last one",
        ),
    )
}


def get_condition(name: str) -> Condition:
    """Look a condition up by its name or by the paper's code (TTF, FTF, ...)."""
    for cond in CONDITIONS.values():
        if name in (cond.name, cond.paper_code):
            return cond
    raise UserError(f"unknown condition {name!r}; choose from: {', '.join(CONDITIONS)}")


def hidden_ranges(condition: Condition, spans: dict[str, Range | None], prompt_len: int) -> list[Range]:
    """Token ranges [start, end) hidden by ``condition`` for one prompt.

    ``spans`` maps "bos", "instructions", "examples", "query" to token ranges (None if absent).
    BOS is never hidden.
    """
    if condition.all_but_last:
        bos = spans.get("bos")
        start = bos[1] if bos else 0
        return [(start, prompt_len - 1)] if prompt_len - 1 > start else []
    ranges = [spans.get(p) for p in ("instructions", "examples", "query") if p in condition.parts]
    return merge_ranges([r for r in ranges if r and r[1] > r[0]])


def merge_ranges(ranges: Sequence[Range]) -> list[Range]:
    """Sort and merge overlapping/adjacent ranges."""
    merged: list[list[int]] = []
    for start, end in sorted(ranges):
        if merged and start <= merged[-1][1]:
            merged[-1][1] = max(merged[-1][1], end)
        else:
            merged.append([start, end])
    return [(a, b) for a, b in merged]


@dataclass(frozen=True, eq=False)
class MaskedPrompt:
    """One encoded prompt and the token ranges its condition hides (computed once, here).

    ``condition`` None means no condition (zero-shot prompts, layer ablation): nothing hidden.
    """

    encoded: EncodedPrompt
    condition: Condition | None
    hidden: tuple[Range, ...]

    @classmethod
    def of(cls, encoded: EncodedPrompt, condition: Condition | None) -> MaskedPrompt:
        ranges = hidden_ranges(condition, encoded.spans, len(encoded.ids)) if condition is not None else []
        return cls(encoded, condition, tuple(ranges))

    @property
    def ids(self) -> list[int]:
        return self.encoded.ids

    @property
    def spans(self) -> dict:
        return self.encoded.spans

    def query_start(self) -> int:
        """Where the query starts: everything before it is context shared by the queries of one prompt set."""
        query = self.encoded.spans.get("query")
        if query is None:
            raise ValueError("prompt has no query span")
        return query[0]
