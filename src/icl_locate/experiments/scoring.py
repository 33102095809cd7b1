"""From generations to stored rows: one home for the prediction row and the task metric's scores.

Every unit kind ends here: a ``Decoded`` row of a unit (one variant at one layer) holds the items,
the prompts they were decoded from and the generations; ``score_rows`` scores each with the task's
metric and returns the prediction rows and corpus scores the store keeps.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass

from ..core.conditions import MaskedPrompt
from ..core.prompts import PromptedItem
from ..engines.base import Generation
from ..tasks.items import post_process
from ..tasks.spec import Task, TaskData


@dataclass
class Decoded:
    """One (variant, layer) row of a unit: the generation of every item from its prompt."""

    items: Sequence[PromptedItem]
    prompts: Sequence[MaskedPrompt]
    generations: Sequence[Generation]
    masked: bool = False  # the prompts' hidden columns were hidden (stored with each prediction)


def span_lengths(spans: dict) -> dict:
    length = lambda p: (spans[p][1] - spans[p][0]) if spans.get(p) else 0  # noqa: E731
    return dict(n_instructions=length("instructions"), n_examples=length("examples"), n_query=length("query"))


def prediction_row(
    index: int,
    it: PromptedItem,
    prompt: MaskedPrompt,
    variant: str,
    layer: int,
    *,
    masked: bool,
    raw: str,
    text: str,
    finish: str,
    score: float,
    stats: Sequence[float],
) -> dict:
    """The stored prediction of item ``index`` (a test item's prompt, what came out, its score)."""
    return dict(
        item=index,
        example_id=it.item.id,
        variant=variant,
        layer=layer,
        prompt_token_ids=json.dumps(prompt.ids),
        hidden_ranges=json.dumps(prompt.hidden if masked else []),
        in_context_ids=json.dumps(it.encoded.example_ids),
        raw_generation=raw,
        generation=text,
        reference=it.item.target,
        finish=finish,
        sentence_score=score,
        stats=json.dumps(list(stats)),
        **span_lengths(prompt.spans),
    )


def prompt_rows(items: Sequence[PromptedItem]) -> list[dict]:
    """Each test item's prompt as the store keeps it beside the prediction rows: its text and the character
    range of each token (special tokens: (0, 0)), so the report can mark the tokens a row hid."""
    return [
        dict(item=i, text=it.encoded.text, token_offsets=json.dumps([list(o) for o in it.encoded.offsets]))
        for i, it in enumerate(items)
    ]


def score_rows(
    task: Task, data: TaskData, decoded: dict[tuple[str, int], Decoded]
) -> tuple[list[dict], list[tuple[str, int, str, float]]]:
    """Each row's generations post-processed and scored with the task's metric: the prediction rows
    and the (variant, layer, metric, value) corpus scores, the primary metric first."""
    predictions, scores = [], []
    for (variant, layer), row in decoded.items():
        texts = [post_process(task, g.text) for g in row.generations]
        scored = task.metric.score(texts, [it.item for it in row.items], data)
        scores += [(variant, layer, metric, value) for metric, value in scored.corpus.items()]
        for i, (it, prompt, g, text) in enumerate(zip(row.items, row.prompts, row.generations, texts, strict=True)):
            predictions.append(
                prediction_row(
                    i,
                    it,
                    prompt,
                    variant,
                    layer,
                    masked=row.masked,
                    raw=g.text,
                    text=text,
                    finish=g.finish,
                    score=scored.sentence[i],
                    stats=scored.stats[i],
                )
            )
    return predictions, scores
