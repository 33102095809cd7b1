"""The masking conditions, and a prompt with the columns its condition hides.

A condition names the prompt parts hidden from attention: the paper's (instructions, examples,
query, or everything but BOS and the last token) and parts inside the examples (every example's
answer or input, or one whole example: ``example:<i>``, 1-based). Its *window* says at which
layers: "from" (the paper's, every layer >= j) or "below" (every layer < j; the name's ``-below``
suffix, e.g. ``answers-below``), carried out by the row interventions ``MaskFrom(j)`` and
``MaskBelow(j)``. ``MaskedPrompt`` pairs one encoded prompt with a condition and computes the
hidden token ranges once: engines read them from there and the store keeps them as they are, so
condition -> ranges is decided in exactly one place.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace

from ..util.errors import UserError
from .prompts import EncodedPrompt

Range = tuple[int, int]


@dataclass(frozen=True)
class Condition:
    """A named masking condition: which prompt parts are hidden, and at which layers (``window``)."""

    name: str
    paper_code: str
    parts: frozenset[str]  # subset of {"instructions", "examples", "query"}
    all_but_last: bool = False
    description: str = ""
    example_parts: frozenset[str] = frozenset()  # subset of {"input", "answer"}: hidden in every example
    example: int | None = None  # 1-based: this example hidden whole
    window: str = "from"  # "from": hidden in every layer >= j (the paper); "below": in every layer < j only


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
        Condition(
            "answers",
            "answers",
            frozenset(),
            example_parts=frozenset({"answer"}),
            description="hide every example's answer (its label words), inputs and query visible",
        ),
        Condition(
            "inputs",
            "inputs",
            frozenset(),
            example_parts=frozenset({"input"}),
            description="hide every example's input, answers and query visible",
        ),
    )
}
EXAMPLE_PREFIX = "example:"
BELOW_SUFFIX = "-below"
# Condition names built from a pattern, as `icl-locate conditions` lists them.
CONDITION_PATTERNS = {
    f"{EXAMPLE_PREFIX}<i>": "hide the i-th example of the prompt whole (1-based; its separators stay visible)",
    f"<condition>{BELOW_SUFFIX}": "the condition's context columns hidden from the other positions in the layers "
    "below j only (visible from j on)",
}


def get_condition(name: str) -> Condition:
    """Look a condition up by its name or by the paper's code (TTF, FTF, ...), ``example:<i>`` or
    either with the ``-below`` suffix."""
    base = name.removesuffix(BELOW_SUFFIX)
    cond = example_condition(base) if base.startswith(EXAMPLE_PREFIX) else named_condition(base)
    return below(cond) if base != name else cond


def named_condition(name: str) -> Condition:
    for cond in CONDITIONS.values():
        if name in (cond.name, cond.paper_code):
            return cond
    choices = ", ".join([*CONDITIONS, *CONDITION_PATTERNS])
    raise UserError(f"unknown condition {name!r}; choose from: {choices}")


def example_condition(name: str) -> Condition:
    """``example:<i>``: the i-th example (1-based) hidden whole."""
    number = name.removeprefix(EXAMPLE_PREFIX)
    if not (number.isascii() and number.isdigit()):
        raise UserError(f"condition {name!r}: write {EXAMPLE_PREFIX}<i> with i a positive integer, e.g. example:1")
    i = int(number)
    if i < 1:
        raise UserError(f"condition {name!r}: examples are numbered from 1 (example:1 is the first)")
    return Condition(
        f"{EXAMPLE_PREFIX}{i}", f"{EXAMPLE_PREFIX}{i}", frozenset(), example=i, description=f"hide example {i}"
    )


def below(cond: Condition) -> Condition:
    """``cond`` with the converse window: its columns hidden in the layers below j only, and from the
    positions outside them only (the hidden tokens still attend as usual, so their own states are what
    they are without the mask; what is held back below j is their reading by the rest). Only the
    context has such a window: a condition that hides the query is refused."""
    if "query" in cond.parts or cond.all_but_last:
        raise UserError(f"{cond.name}{BELOW_SUFFIX}: the converse window hides context only, not the query")
    return replace(
        cond,
        name=cond.name + BELOW_SUFFIX,
        paper_code=cond.paper_code + BELOW_SUFFIX,
        window="below",
        description=f"{cond.description}, in the layers below j only",
    )


def hidden_ranges(
    condition: Condition,
    spans: dict[str, Range | None],
    prompt_len: int,
    example_spans: Sequence[dict[str, Range | None]] = (),
) -> list[Range]:
    """Token ranges [start, end) hidden by ``condition`` for one prompt (whatever its window).

    ``spans`` maps "bos", "instructions", "examples", "query" to token ranges (None if absent);
    ``example_spans`` has, per example in prompt order, the token ranges of its "input", "answer"
    and whole "example". BOS is never hidden. An ``example:<i>`` beyond the prompt's examples is a
    ``UserError``.
    """
    if condition.all_but_last:
        bos = spans.get("bos")
        start = bos[1] if bos else 0
        return [(start, prompt_len - 1)] if prompt_len - 1 > start else []
    ranges = [spans.get(p) for p in ("instructions", "examples", "query") if p in condition.parts]
    ranges += [ex.get(p) for ex in example_spans for p in sorted(condition.example_parts)]
    if condition.example is not None:
        ranges.append(one_example(condition, example_spans)["example"])
    return merge_ranges([r for r in ranges if r and r[1] > r[0]])


def one_example(condition: Condition, example_spans: Sequence[dict[str, Range | None]]) -> dict[str, Range | None]:
    """The spans of the example ``condition`` names; refused where the prompt has no such example."""
    i, k = condition.example, len(example_spans)
    if i is None or not 1 <= i <= k:
        has = f"only {k} examples (example:1..example:{k})" if k else "no examples"
        raise UserError(f"condition {condition.name!r} names example {i} but the prompt has {has}")
    return example_spans[i - 1]


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
        if condition is None:
            return cls(encoded, condition, ())
        ranges = hidden_ranges(condition, encoded.spans, len(encoded.ids), encoded.example_spans)
        return cls(encoded, condition, tuple(ranges))

    @property
    def ids(self) -> list[int]:
        return self.encoded.ids

    @property
    def window(self) -> str:
        """The layers its hidden columns are masked at: "from" (>= j) or "below" (< j); no condition: "from"."""
        return self.condition.window if self.condition is not None else "from"

    @property
    def spans(self) -> dict:
        return self.encoded.spans

    def query_start(self) -> int:
        """Where the query starts: everything before it is context shared by the queries of one prompt set."""
        query = self.encoded.spans.get("query")
        if query is None:
            raise ValueError("prompt has no query span")
        return query[0]
