"""The one batched greedy loop and the cache buffers it writes into (the fast and pruned engines decode
with the loop; the tree engine, which runs its own, writes into ``SlotLayer``)."""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence

import torch
from torch import nn
from transformers.cache_utils import DynamicLayer

from ..core.interventions import Active, BatchIntervention, collect
from .base import Generation, StopRule, forward, last_hidden
from .head import CertifiedHead


def decode_batch(
    model: nn.Module,
    tokenizer,
    eos: set[int],
    cache,
    step_input: torch.Tensor,
    mask: torch.Tensor,
    interventions: Sequence[BatchIntervention | None],
    stop: StopRule,
    stats: dict | None = None,
    first_logits: Callable[[torch.Tensor], None] | None = None,
    times: dict | None = None,
    head: CertifiedHead | None = None,
) -> list[Generation]:
    """Greedy decoding of a batch whose prompts sit in ``cache`` up to ``step_input``.

    ``step_input`` ([B, t]) is the rest of each prompt (at least its last token); ``mask`` is the
    2D padding mask over cache + ``step_input``. A row leaves the batch as soon as ``stop`` ends it,
    and its rows leave every intervention with it; ``cache`` must support ``batch_select_indices``.
    ``first_logits`` receives the first step's logits [B, vocab] (for tests); ``times`` adds the
    seconds of the first forward (the query's prefill) and of the others (decoding). ``head``: a
    screened LM head picks the greedy tokens (the same as the model's own head's) from the final hidden
    states; None, or ``first_logits`` wanted: the model's own head.
    """
    n = step_input.shape[0]
    device = step_input.device
    state: Active = collect(interventions)
    alive = list(range(n))  # rows still decoding, aligned with the batch
    new_tokens: list[list[int]] = [[] for _ in range(n)]
    finish = ["length"] * n
    for step in range(stop.max_new_tokens):
        started = time.perf_counter()
        if head is not None and first_logits is None:
            hidden = last_hidden(model, step_input, attention_mask=mask, cache=cache, interventions=state.values())
            tokens = head.argmax(hidden[:, -1]).tolist()  # hidden [B, 1, d]
        else:
            logits = forward(
                model, step_input, attention_mask=mask, cache=cache, interventions=state.values(), last_only=True
            ).logits[:, -1]  # [B, vocab]
            tokens = logits.argmax(-1).tolist()
            if first_logits is not None and step == 0:
                first_logits(logits)
        if times is not None:
            times["query_prefill" if step == 0 else "decode_forward"] += time.perf_counter() - started
        if stats is not None:
            stats["tokens_forwarded"] += step_input.numel()
            stats["logit_rows"] += len(tokens)
            stats["steps"] += 1
        keep = []
        for pos, (b, token) in enumerate(zip(alive, tokens)):
            reason = stop.after(tokenizer, eos, new_tokens[b], token)
            if reason is None:
                keep.append(pos)
            else:
                finish[b] = reason
        if not keep:
            break
        if len(keep) < len(alive):
            index = torch.tensor(keep, device=device)
            cache.batch_select_indices(index)
            mask = mask[index]
            state = state.select_rows(keep)
            tokens = [tokens[p] for p in keep]
            alive = [alive[p] for p in keep]
        step_input = torch.tensor(tokens, device=device)[:, None]
        mask = torch.cat([mask, mask.new_ones(len(alive), 1)], dim=1)
    return [
        Generation(token_ids=t, text=tokenizer.decode(t, skip_special_tokens=True), finish=f)
        for t, f in zip(new_tokens, finish)
    ]


def right_aligned(
    tensors: list[torch.Tensor],
    keep: list[int],
    width: int,
    capacity: int,
    rows: int | None = None,
    only: Sequence[int | None] | None = None,
) -> torch.Tensor:
    """[rows, H, capacity, D] (rows: default B = len(tensors)): in the first ``width`` columns, row b < B
    holds the first keep[b] prefix positions of tensors[b], right-aligned; the rest is room for the tokens
    (and the rows) to come. ``only[b]`` (not None): row b gets column ``only[b]`` alone (-1: none), its other
    prefix columns left unwritten, for a row whose attention reads none of them (``core.narrow_attention``)."""
    first = tensors[0]
    out = first.new_empty(rows or len(tensors), first.shape[1], capacity, first.shape[3])
    for b, (t, k) in enumerate(zip(tensors, keep)):
        column = None if only is None else only[b]
        if column is None:
            out[b, :, : width - k] = 0  # padding columns are masked, but must not hold NaNs (0 x NaN = NaN)
            out[b, :, width - k : width] = t[0, :, :k]
        elif column >= 0:
            if not width - k <= column < width:
                raise ValueError(f"column {column} is not among row {b}'s {k} cached prefix columns")
            out[b, :, column] = t[0, :, column - (width - k)]
    return out


class PreallocatedLayer(DynamicLayer):
    """A cache layer that writes new keys/values into a preallocated buffer instead of concatenating
    (growing a DynamicCache by concatenation copies the whole batch's cache at every step).

    ``dropped``: prompt columns this layer does not store (context pruning); it still reports the
    full length, so that positions and masks are built over prompt columns.
    """

    def __init__(self, keys: torch.Tensor, values: torch.Tensor, length: int, dropped: int = 0):
        super().__init__()
        self.buf_k, self.buf_v, self.length, self.dropped = keys, values, length, dropped
        self.device = keys.device
        self.is_initialized = True
        self._views()

    def _views(self) -> None:
        self.keys, self.values = self.buf_k[:, :, : self.length], self.buf_v[:, :, : self.length]

    def get_seq_length(self) -> int:
        return self.length + self.dropped

    def update(self, key_states, value_states, *args, **kwargs):
        end = self.length + key_states.shape[-2]
        if end > self.buf_k.shape[-2]:
            raise RuntimeError(f"preallocated cache of {self.buf_k.shape[-2]} positions is full")
        rows = key_states.shape[0]  # the buffer may hold spare rows (the tree engine's slots)
        self.buf_k[:rows, :, self.length : end] = key_states
        self.buf_v[:rows, :, self.length : end] = value_states
        self.length = end
        self._views()
        return self.keys, self.values

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        """Keep the rows ``indices`` (ascending), compacted in place: rows only move to lower slots,
        so copying in order never overwrites a row still to move, and no second cache is allocated.
        Only the filled columns are copied."""
        for new, old in enumerate(indices.tolist()):
            if new != old:
                self.buf_k[new, :, : self.length].copy_(self.buf_k[old, :, : self.length])
                self.buf_v[new, :, : self.length].copy_(self.buf_v[old, :, : self.length])
        self.buf_k, self.buf_v = self.buf_k[: len(indices)], self.buf_v[: len(indices)]
        self._views()


class SlotLayer(PreallocatedLayer):
    """A cache layer whose rows are slots that come and go (``rearrange``): kept slots from later rows fill
    the places of dropped ones, new slots are copies of kept ones appended after them (the buffer grows
    when full). ``rows``: the slots the buffer holds now (default: all of its rows; the rest is room)."""

    def __init__(self, keys: torch.Tensor, values: torch.Tensor, length: int, rows: int | None = None):
        if rows is not None and not 0 <= rows <= keys.shape[0]:
            raise ValueError(f"{rows} slots in a buffer of {keys.shape[0]} rows")
        self.rows = keys.shape[0] if rows is None else rows
        super().__init__(keys, values, length)

    def _views(self) -> None:
        self.keys, self.values = self.buf_k[: self.rows, :, : self.length], self.buf_v[: self.rows, :, : self.length]

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        raise TypeError("a SlotLayer's slots are rearranged (rearrange), not selected")

    def rearrange(self, keep: list[int], copies: list[int]) -> None:
        """Row i takes old row ``keep[i]``, then copies of new rows ``copies`` are appended. A row that moves
        must come from a later row (``slot_order``), so that copying in order never overwrites a row still
        to move."""
        if any(old < new for new, old in enumerate(keep)) or len(set(keep)) < len(keep):
            raise ValueError("a kept row moves only from a later row, once")
        for new, old in enumerate(keep):
            if new != old:
                self.buf_k[new, :, : self.length].copy_(self.buf_k[old, :, : self.length])
                self.buf_v[new, :, : self.length].copy_(self.buf_v[old, :, : self.length])
        rows = len(keep) + len(copies)
        if rows > self.buf_k.shape[0]:
            grown = max(rows, 2 * self.buf_k.shape[0])
            self.buf_k = torch.cat(
                [self.buf_k[: len(keep)], self.buf_k.new_empty(grown - len(keep), *self.buf_k.shape[1:])]
            )
            self.buf_v = torch.cat(
                [self.buf_v[: len(keep)], self.buf_v.new_empty(grown - len(keep), *self.buf_v.shape[1:])]
            )
        for n, source in enumerate(copies):
            self.buf_k[len(keep) + n, :, : self.length].copy_(self.buf_k[source, :, : self.length])
            self.buf_v[len(keep) + n, :, : self.length].copy_(self.buf_v[source, :, : self.length])
        self.rows = rows
        self._views()

    def used_bytes(self) -> int:
        assert self.keys is not None  # _views() always sets it
        return 2 * self.keys.numel() * self.keys.element_size()
