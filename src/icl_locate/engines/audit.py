"""Exactness where the user runs it: a sample of an engine's rows decoded again by the reference engine.

A fast engine batches rows, shares states and screens the LM head; the reference engine
(``reference.py``) decodes one prompt at a time with the model's own head. On the user's
hardware and dtype a different batch shape can pick a different kernel and accumulation order,
so two greedy paths may part where two logits (nearly) tie. The audit tells such a near-tie
from an engine fault: for each sampled row it stores whether the tokens agree, the first
position where they differ, and the reference's top-1 minus top-2 logit there. A difference
at a margin above ``margin_threshold(dtype)`` cannot come from rounding and is flagged as a fault.

Thresholds: a logit is a dot product of the final hidden state with a head row; reordering a
sum in a format with unit roundoff u moves it by about u times the summed magnitudes, and the
layers below add their own rounding. ``MARGIN_THRESHOLDS`` is 2^7 unit roundoffs of a logit of
size 100 (fp32 7.6e-4, fp16 0.098, bf16 0.78): a margin above it is two orders of magnitude
beyond one rounding of a typical logit (README, "Audit", has what was measured).
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn

from ..core.conditions import MaskedPrompt
from ..core.interventions import RowIntervention
from ..core.structure import num_layers
from .base import Generation, StopRule, forward
from .reference import batch_interventions, greedy_decode

MARGIN_THRESHOLDS = {torch.float32: 100 * 2.0**-17, torch.bfloat16: 100 * 2.0**-7, torch.float16: 100 * 2.0**-10}


def margin_threshold(dtype: torch.dtype) -> float:
    """Above this reference logit margin, a disagreement is an engine fault, not a near-tie."""
    return MARGIN_THRESHOLDS.get(dtype, MARGIN_THRESHOLDS[torch.float32])


@dataclass(frozen=True)
class AuditedRow:
    """One sampled row: the engine's tokens against the reference engine's."""

    item: int
    row: RowIntervention
    agree: bool
    position: int | None  # first differing new-token position (None: they agree)
    margin: float | None  # reference top-1 minus top-2 logit at that position
    threshold: float
    engine_tokens: int
    reference_tokens: int

    @property
    def fault(self) -> bool:
        return not self.agree and self.margin is not None and self.margin > self.threshold


def sample_rows(n_items: int, rows: Sequence[RowIntervention], n: int, seed: int | str) -> list[tuple[int, int]]:
    """``n`` distinct (item, row index) pairs drawn with ``seed`` (all of them when there are fewer)."""
    pairs = [(i, r) for i in range(n_items) for r in range(len(rows))]
    return sorted(random.Random(str(seed)).sample(pairs, min(n, len(pairs))))


@torch.no_grad()
def reference_margin(
    model: nn.Module, prompt: MaskedPrompt, row: RowIntervention, tokens: Sequence[int], item: int = 0
) -> float:
    """Top-1 minus top-2 logit of the reference forward after ``prompt + tokens`` (prompt number ``item``)
    under ``row``."""
    device = next(model.parameters()).device
    ids = torch.tensor([list(prompt.ids) + list(tokens)], device=device)
    logits = (
        forward(model, ids, interventions=batch_interventions(prompt, row, num_layers(model), item), last_only=True)
        .logits[0, -1]
        .float()
    )
    top = logits.topk(2).values
    return float(top[0] - top[1])


def audit_rows(
    model: nn.Module,
    tokenizer,
    prompts: Sequence[MaskedPrompt],
    rows: Sequence[RowIntervention],
    generations: dict[tuple[int, RowIntervention], Generation],
    stop: StopRule,
    picked: Sequence[tuple[int, int]],
) -> list[AuditedRow]:
    """Decode the ``picked`` (item, row index) pairs with the reference engine (batch of one, the
    model's own head, no sharing, same dtype and device) and compare with ``generations``."""
    threshold = margin_threshold(next(model.parameters()).dtype)
    n_layers = num_layers(model)
    out = []
    for item, index in picked:
        prompt, row = prompts[item], rows[index]
        reference = greedy_decode(model, tokenizer, prompt.ids, batch_interventions(prompt, row, n_layers, item), stop)
        ours = generations[(item, row)].token_ids
        theirs = reference.token_ids
        agree = ours == theirs and generations[(item, row)].finish == reference.finish
        position = margin = None
        if not agree:
            position = next((p for p, (a, b) in enumerate(zip(ours, theirs)) if a != b), min(len(ours), len(theirs)))
            margin = reference_margin(model, prompt, row, theirs[:position], item)
        out.append(AuditedRow(item, row, agree, position, margin, threshold, len(ours), len(theirs)))
    return out
