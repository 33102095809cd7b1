"""The paper's way of running a layer sweep, kept as a baseline for ``bench``.

Every (prompt, layer) re-encodes the full prompt and runs Hugging Face ``generate`` in batches
of 2 with left padding (as the paper's code does); ``stop`` None means no stopping criterion
but the token limit, as in the paper; a StopRule passes its stop strings to ``generate``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn
from transformers import DynamicCache

from ..core.conditions import MaskedPrompt
from ..core.interventions import ColumnMask, MaskFrom, intervene
from ..core.structure import num_layers
from .base import ProgressCallback, StopRule


def check_layer_from(prompts: Sequence[MaskedPrompt], rows: Sequence[MaskFrom]) -> None:
    """The paper's code masks from a layer on only: refuse other rows and "-below" conditions."""
    for row in rows:
        if not isinstance(row, MaskFrom):
            raise ValueError(f"the paper engine runs MaskFrom rows only, got {type(row).__name__}")
    for prompt in prompts:
        if prompt.window != "from":
            raise ValueError(f"the paper engine masks from a layer on; the prompt's condition masks {prompt.window}")


class PaperEngine:
    """Full prompts through ``model.generate``; returns raw token ids per (prompt index, MaskFrom)."""

    def __init__(self, model: nn.Module, tokenizer, batch_size: int = 2):
        self.model, self.tokenizer, self.batch_size = model, tokenizer, batch_size
        self.n_layers = num_layers(model)

    @torch.no_grad()
    def generate_ids(
        self,
        prompts: Sequence[MaskedPrompt],
        rows: Sequence[MaskFrom],
        max_new_tokens: int,
        stop: StopRule | None = None,
        progress: ProgressCallback | None = None,
    ) -> dict[tuple[int, MaskFrom], list[int]]:
        tok, n = self.tokenizer, self.n_layers
        check_layer_from(prompts, rows)
        model: Any = self.model  # a transformers model: generate() and .device are not nn.Module's
        out: dict[tuple[int, MaskFrom], list[int]] = {}
        for row in rows:
            for start in range(0, len(prompts), self.batch_size):
                batch = prompts[start : start + self.batch_size]
                width = max(len(p.ids) for p in batch)
                ids = torch.full((len(batch), width), tok.pad_token_id, dtype=torch.long)
                mask = torch.zeros_like(ids)
                pads = []
                for b, p in enumerate(batch):
                    pad = width - len(p.ids)
                    ids[b, pad:] = torch.tensor(p.ids)
                    mask[b, pad:] = 1
                    pads.append(pad)
                hidden = [p.hidden if row.layer < n else () for p in batch]
                column_mask = ColumnMask.from_layer(hidden, row.layer, n).shifted(pads)
                kwargs: dict[str, Any] = dict(
                    max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=tok.pad_token_id, cache=DynamicCache()
                )
                if stop is not None and stop.stop_strings:
                    kwargs.update(stop_strings=list(stop.stop_strings), tokenizer=tok)
                with intervene(self.model, column_mask):  # holds for every forward of generate
                    seqs = model.generate(ids.to(model.device), attention_mask=mask.to(model.device), **kwargs)
                for b in range(len(batch)):
                    out[(start + b, row)] = seqs[b, width:].tolist()
                if progress is not None:
                    progress(len(out), len(prompts) * len(rows))
        return out
