"""Prompt formats of the paper, byte-identical, and the token spans of each prompt part.

prompt = header + sep + examples + sep + query      (header + sep + query when k = 0)
example = Q + src + A + tgt + " "                    (examples joined by sep)
query   = Q + src + A

Spans are character ranges of the prompt text; token spans come from the tokenizer's offset
mapping of the *full* prompt (never from re-tokenising the pieces, which can tokenise
differently at the seams). The separators around the examples belong to the examples span, as
in the paper's code (so with k = 0 the examples span is the lone separator); BOS is its own span
and is never hidden.

Each example also records where its input (the stripped source), its answer (the stripped target:
the label words of a classification task) and its whole text (answer and example suffix included,
the separators excluded) lie, so that conditions can hide parts *inside* the examples.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from ..util.errors import UserError

PARTS = ("instructions", "examples", "query")
EXAMPLE_PARTS = ("input", "answer", "example")  # spans recorded for each example
CharSpan = tuple[int, int]


@dataclass(frozen=True)
class PromptFormat:
    """A format of the paper's configs (configs/format/*.yaml)."""

    name: str
    header: str  # may hold <L1>/<L2>, replaced by language names
    q: str
    a: str
    sep: str = "\n"
    example_suffix: str = " "  # after each example's answer, as the paper's format has it


FORMATS: dict[str, PromptFormat] = {
    f.name: f
    for f in (
        PromptFormat("instr_machine_translation", "Translate <L1> to <L2>:", "Q:", "A:"),
        PromptFormat("instr_code_gen", "Write a program for the following task:\n", "Q:", "\nA:"),
        PromptFormat("instr_none_QA", "", "Q:", "\nA:"),
    )
}


@dataclass(frozen=True)
class Example:
    """One (source, target) pair with a stable id from its dataset."""

    id: str
    source: str
    target: str


@dataclass
class Prompt:
    text: str
    char_spans: dict[str, CharSpan | None]
    example_ids: list[str] = field(default_factory=list)
    example_spans: list[dict[str, CharSpan]] = field(default_factory=list)  # per example: EXAMPLE_PARTS


def render_header(fmt: PromptFormat, l1: str = "", l2: str = "") -> str:
    return fmt.header.replace("<L1>", l1).replace("<L2>", l2)


def render_query(fmt: PromptFormat, source: str) -> str:
    """One query: Q + src + A (a prompt ends here, where the answer begins)."""
    return f"{fmt.q}{source.strip()}{fmt.a}"


def render_answered(fmt: PromptFormat, example: Example) -> str:
    """One query and its answer: Q + src + A + tgt (no example suffix: what a fine-tuned model reads)."""
    return f"{render_query(fmt, example.source)}{example.target.strip()}"


def example_char_spans(fmt: PromptFormat, examples: Sequence[Example], start: int) -> list[dict[str, CharSpan]]:
    """Where each example's input, answer and whole text lie when the examples, joined by the separator,
    start at character ``start`` (lengths from the same renderers ``build_prompt`` joins)."""
    out = []
    for ex in examples:
        input_start = start + len(fmt.q)
        answer_start = start + len(render_query(fmt, ex.source))
        end = start + len(render_answered(fmt, ex)) + len(fmt.example_suffix)
        out.append(
            {
                "input": (input_start, input_start + len(ex.source.strip())),
                "answer": (answer_start, answer_start + len(ex.target.strip())),
                "example": (start, end),
            }
        )
        start = end + len(fmt.sep)
    return out


def build_prompt(fmt: PromptFormat, examples: Sequence[Example], query: str, header: str | None = None) -> Prompt:
    """Assemble the paper's prompt and remember where each part is.

    ``header`` overrides the format's header (after <L1>/<L2> substitution); pass "" for the
    no-instructions variant.
    """
    header = fmt.header if header is None else header
    shots = fmt.sep.join(f"{render_answered(fmt, ex)}{fmt.example_suffix}" for ex in examples)
    prefix = f"{header}{fmt.sep}{shots}" if shots else header
    query_text = render_query(fmt, query)
    text = f"{prefix}{fmt.sep}{query_text}"
    query_start = len(prefix) + len(fmt.sep)
    spans: dict[str, CharSpan | None] = {
        "instructions": (0, len(header)) if header else None,
        "examples": (len(header), query_start),  # with k = 0 just the separator, as the paper's code masks it
        "query": (query_start, len(text)),
    }
    return Prompt(
        text=text,
        char_spans=spans,
        example_ids=[ex.id for ex in examples],
        example_spans=example_char_spans(fmt, examples, len(header) + len(fmt.sep)),
    )


def sample_examples(bank: Sequence[Example], k: int, seed: int) -> list[Example]:
    """k examples drawn without replacement by a seeded RNG: same seed, same examples, any model."""
    if k < 0:
        raise UserError(f"number of examples must be >= 0, got {k}")
    if k > len(bank):
        raise UserError(f"{k} examples requested but the prompt bank has only {len(bank)}")
    rng = random.Random(seed)
    return [bank[i] for i in rng.sample(range(len(bank)), k)]


@dataclass
class PromptedItem:
    item: Example
    prompt: Prompt
    encoded: EncodedPrompt


def prompt_items(
    fmt: PromptFormat,
    bank: Sequence[Example],
    queries: Sequence[Example],
    tokenizer,
    k: int,
    seed: int,
    header: str,
    per_query_examples: bool = False,
    relabel: Callable[[list[Example], int], list[Example]] | None = None,
) -> list[PromptedItem]:
    """Each query's prompt, tokenised: k examples from ``bank`` then the query.

    As the paper: one set of k examples per seed shared by every query; with
    ``per_query_examples`` each query draws its own (seeded by seed and its index).
    ``relabel(examples, draw_seed)`` replaces the drawn examples' answers (a label variant,
    ``core/labels.py``), once per draw, so queries that share examples share their answers too.
    """

    def draw(draw_seed: int) -> list[Example]:
        shots = sample_examples(bank, k, draw_seed)
        return relabel(shots, draw_seed) if relabel is not None else shots

    shared = draw(seed)
    items = []
    for i, ex in enumerate(queries):
        shots = draw(seed * 1_000_003 + i) if per_query_examples else shared
        prompt = build_prompt(fmt, shots, ex.source, header=header)
        items.append(PromptedItem(item=ex, prompt=prompt, encoded=encode_prompt(tokenizer, prompt)))
    return items


# --------------------------------------------------------------------------- tokens


@dataclass
class EncodedPrompt:
    """A tokenised prompt: ids and token ranges [start, end) of bos/instructions/examples/query, and of
    each example's input/answer/whole example (``example_spans``, in prompt order)."""

    text: str
    ids: list[int]
    spans: dict[str, tuple[int, int] | None]
    example_ids: list[str] = field(default_factory=list)
    example_spans: list[dict[str, tuple[int, int] | None]] = field(default_factory=list)
    offsets: list[tuple[int, int]] = field(default_factory=list)  # character range of each token
    straddling: list[int] = field(default_factory=list)  # tokens that cross a part boundary

    def span_text(self, tokenizer, part: str) -> str:
        span = self.spans.get(part)
        return "" if span is None else tokenizer.decode(self.ids[span[0] : span[1]])


def encode_prompt(tokenizer, prompt: Prompt) -> EncodedPrompt:
    """Tokenise the full prompt once and map each part's characters to token ranges.

    A token belongs to the part that holds its first character (a token that crosses a part
    boundary, e.g. Gemma's single "\n\n" token after the code header, is listed in
    ``straddling`` and belongs to the part where it starts); the examples' own spans are mapped
    the same way and their boundaries count for ``straddling`` too; special tokens with empty
    offsets at the start are BOS. A tokenizer that appends special tokens (EOS) at the end has
    them dropped: a prompt must end where the answer begins.
    """
    enc = tokenizer(prompt.text, return_offsets_mapping=True, add_special_tokens=True)
    ids, offsets = list(enc["input_ids"]), [tuple(o) for o in enc["offset_mapping"]]
    special = set(tokenizer.all_special_ids)
    while ids and ids[-1] in special and offsets[-1] == (0, 0) and len(ids) > 1:
        ids.pop()
        offsets.pop()
    n_bos = 0
    while n_bos < len(ids) and ids[n_bos] in special and offsets[n_bos] == (0, 0):
        n_bos += 1
    spans: dict[str, tuple[int, int] | None] = {"bos": (0, n_bos) if n_bos else None}
    for part in PARTS:
        spans[part] = token_span(offsets, n_bos, prompt.char_spans.get(part))
    example_spans = [
        {part: token_span(offsets, n_bos, span) for part, span in ex.items()} for ex in prompt.example_spans
    ]
    char_spans = [*prompt.char_spans.values(), *(span for ex in prompt.example_spans for span in ex.values())]
    boundaries = {b for span in char_spans if span for b in span}
    straddling = [i for i, (a, b) in enumerate(offsets) if any(a < x < b for x in boundaries)]
    return EncodedPrompt(
        text=prompt.text,
        ids=ids,
        spans=spans,
        example_ids=list(prompt.example_ids),
        example_spans=example_spans,
        offsets=offsets,
        straddling=straddling,
    )


def token_span(offsets: Sequence[tuple[int, int]], n_bos: int, char_span: CharSpan | None) -> tuple[int, int] | None:
    """The tokens (after the ``n_bos`` BOS tokens) whose first character lies in ``char_span``; None if none do."""
    if char_span is None:
        return None
    lo, hi = char_span
    toks = [i for i in range(n_bos, len(offsets)) if lo <= offsets[i][0] < hi]
    return (toks[0], toks[-1] + 1) if toks else None


def answer_first_token(tokenizer, encoded: EncodedPrompt, target: str) -> int:
    """The first token of the answer ``target`` as it continues the prompt: tokenise prompt + answer (as an
    answered example is written) and take the token after the prompt's own, when the prompt's tokens
    stay as they were; where the answer merges into the prompt's last token, the answer's first token
    on its own. What the logit lens ranks and the function vector's indirect effect measures."""
    answer = target.strip()
    if not answer:
        raise ValueError("an empty answer has no first token")
    full = list(tokenizer(encoded.text + answer, add_special_tokens=True)["input_ids"])
    n = len(encoded.ids)
    if full[:n] == list(encoded.ids) and len(full) > n:
        return int(full[n])
    return int(tokenizer(answer, add_special_tokens=False)["input_ids"][0])
