"""The reference engine: plain greedy decoding of one full prompt at a time.

Written to be obviously right; it is the oracle the fast engines are tested against.
Each step feeds the model the whole sequence so far (``use_cache=False``), or the prompt once
and then one token at a time through a plain ``DynamicCache`` (``use_cache=True``, the
default; tested equal). The cache is a plain DynamicCache, never a sliding-window one, so key
columns always keep their absolute positions and the hidden column indices stay valid.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn
from transformers import DynamicCache

from ..core.conditions import MaskedPrompt
from ..core.interventions import AttentionAblation, BatchIntervention, ColumnMask, RowIntervention
from ..core.structure import num_layers
from .base import DEFAULT_STOP, Generation, ProgressCallback, ResultKey, StopRule, eos_ids, forward
from .rows import row_plan


def batch_interventions(
    prompt: MaskedPrompt, row: RowIntervention, n_layers: int, item: int = 0
) -> tuple[BatchIntervention, ...]:
    """The one-row batch interventions that carry out ``row`` on ``prompt``, prompt number ``item`` of the
    request (its ``row_plan``)."""
    plan = row_plan(prompt, row, n_layers, item)
    out: list[BatchIntervention] = []
    if plan.mask_layers:
        out.append(ColumnMask([prompt.hidden], [plan.mask_layers], [plan.mask_heads], [plan.others_only]))
    if plan.ablate:
        out.append(AttentionAblation(plan.ablate))
    out.extend(plan.patches)  # one row, no padding: the prompt's columns are the batch's
    return tuple(out)


@torch.no_grad()
def greedy_decode(
    model: nn.Module,
    tokenizer,
    prompt_ids: Sequence[int],
    interventions: Sequence[BatchIntervention] = (),
    stop: StopRule = DEFAULT_STOP,
    use_cache: bool = True,
) -> Generation:
    """Greedy decoding of one prompt under one-row ``interventions``."""
    device = next(model.parameters()).device
    eos = eos_ids(model, tokenizer)
    ids = torch.tensor([list(prompt_ids)], device=device)
    cache = DynamicCache() if use_cache else None
    step_input = ids
    new: list[int] = []
    finish = "length"
    for _ in range(stop.max_new_tokens):
        out = forward(model, step_input, cache=cache, interventions=interventions, last_only=True)
        token = int(out.logits[0, -1].argmax())
        reason = stop.after(tokenizer, eos, new, token)
        if reason is not None:
            finish = reason
            break
        ids = torch.cat([ids, ids.new_tensor([[token]])], dim=1)
        step_input = ids[:, -1:] if use_cache else ids
    text = tokenizer.decode(new, skip_special_tokens=True) if tokenizer is not None else ""
    return Generation(token_ids=new, text=text, finish=finish)


class ReferenceEngine:
    """Every (prompt, intervention) pair decoded on its own, the full prompt every time."""

    def __init__(self, model: nn.Module, tokenizer, use_cache: bool = True):
        self.model, self.tokenizer, self.use_cache = model, tokenizer, use_cache
        self.n_layers = num_layers(model)

    def generate(
        self,
        prompts: Sequence[MaskedPrompt],
        interventions: Sequence[RowIntervention],
        stop: StopRule,
        progress: ProgressCallback | None = None,
    ) -> dict[ResultKey, Generation]:
        out: dict[ResultKey, Generation] = {}
        total = len(prompts) * len(interventions)
        for row in interventions:
            for i, prompt in enumerate(prompts):
                out[(i, row)] = greedy_decode(
                    self.model,
                    self.tokenizer,
                    prompt.ids,
                    batch_interventions(prompt, row, self.n_layers, i),
                    stop,
                    self.use_cache,
                )
                if progress is not None:
                    progress(len(out), total)
        return out
