"""Context-pruned inference: process the context only up to layer r, then drop it.

This is the deployable form of the paper's savings claim. Masking a context range from layer r
means that at layers >= r nothing reads that range's keys and values, so neither they nor the
range's own computation at layers >= r is needed. Here they are never computed:

1. the *head* (the tokens before the pruned range: BOS, and the instructions when only the
   examples are pruned) runs through every layer. It precedes the pruned range, so it does not
   depend on it;
2. the *pruned range* runs through layers < r only: the forward pass stops at layer r;
3. the *tail* (everything after the range: the query) and the generated tokens run through
   every layer; at layers >= r their cache holds only the head and themselves.

Generations equal the reference engine's with the same range masked from layer r
(tests/test_pruning.py), and no pruned token ever enters a layer >= r (tested by hooks).

How it fits transformers: cache layers >= r hold fewer columns than the prompt has, but report
the logical (unpruned) length, so positions and attention masks are built over prompt columns
as usual; the attention wrapper in core/attention.py drops the pruned columns from the mask at those
layers (``ColumnDrop``). Architectures without ``AttentionInterface`` (GPT-Neo, Bloom)
are not supported.

Each request is processed on its own, as a deployment without prefix caching would: a shared
context cached once (the fast engine's trick) makes the context almost free already, and
pruning then only shortens attention.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn
from transformers import DynamicCache
from transformers.cache_utils import DynamicLayer

from ..core import costs
from ..core.attention import inline_attention
from ..core.conditions import MaskedPrompt
from ..core.interventions import ColumnDrop, PruneFrom, RowIntervention
from ..core.structure import num_layers
from ..core.surgery import stop_before
from ..util.errors import UserError
from .base import Generation, ProgressCallback, ResultKey, StopRule, eos_ids, forward
from .decoding import PreallocatedLayer, decode_batch, right_aligned
from .head import CertifiedHead
from .rows import left_padding_mask

# --------------------------------------------------------------------------- what is pruned


@dataclass(frozen=True)
class PruneSplit:
    """One prompt cut into head [0, start), pruned range [start, end), tail [end, length)."""

    start: int
    end: int
    length: int

    @property
    def width(self) -> int:
        return self.end - self.start


def prune_split(prompt: MaskedPrompt) -> PruneSplit:
    """Where the prompt's condition cuts it; one contiguous range that leaves the last token visible."""
    ranges, length = prompt.hidden, len(prompt.ids)
    condition = prompt.condition
    if condition is not None and condition.window != "from":
        raise UserError(
            f"condition {condition.name!r} hides its columns below a layer only; "
            "context pruning drops a range from a layer on"
        )
    if len(ranges) == 0:
        return PruneSplit(length - 1, length - 1, length)  # nothing to prune (e.g. the baseline)
    assert condition is not None  # only a condition hides ranges
    if len(ranges) > 1:
        raise UserError(
            f"condition {condition.name!r} hides {len(ranges)} separate ranges; "
            "context pruning drops one contiguous range"
        )
    start, end = ranges[0]
    if end >= length:
        raise UserError(
            f"condition {condition.name!r} hides the last prompt token; "
            "context pruning needs it to start generating (use a context condition)"
        )
    return PruneSplit(start, end, length)


def check_supported(model: nn.Module) -> None:
    if inline_attention(model):
        raise UserError(
            f"context pruning needs a model that uses transformers' AttentionInterface; "
            f"{model.config.model_type} computes attention inline"  # pyright: ignore[reportAttributeAccessIssue]
        )


# --------------------------------------------------------------------------- cache layers


def offset_progress(progress: ProgressCallback | None, base: int, total: int) -> ProgressCallback | None:
    """``progress`` for one part of a larger job: the part's rows done count from ``base``, of ``total``."""
    if progress is None:
        return None
    return lambda done, _part_total: progress(base + done, total)


class _LogicalLayer(DynamicLayer):
    """A growing cache layer that may lack ``dropped`` columns but reports the logical length."""

    def __init__(self):
        super().__init__()
        self.dropped = 0

    def get_seq_length(self) -> int:
        return super().get_seq_length() + self.dropped


# --------------------------------------------------------------------------- the engine


@dataclass
class _Prefilled:
    """One prompt in its own cache, all but its last token."""

    kv: list[tuple[torch.Tensor | None, torch.Tensor | None]]  # per layer, physical columns
    split: PruneSplit
    last_token: int


class PrunedEngine:
    """Greedy generation with a context range processed only below layer ``from_layer``.

    ``from_layer`` = number of layers is full processing through the very same code path,
    which is what the measurements compare against.
    """

    def __init__(
        self,
        model: nn.Module,
        tokenizer,
        batch_size: int = 8,
        keep_first_logits: bool = False,
        head: CertifiedHead | None = None,
    ):
        """``head``: a screened LM head for the greedy tokens (``head.py``: the same tokens as the model's
        own head, which None uses); full and pruned runs of one measurement take the same head."""
        check_supported(model)
        if batch_size < 1:
            raise UserError(f"batch size must be >= 1, got {batch_size}")
        self.model, self.tokenizer, self.batch_size, self.head = model, tokenizer, batch_size, head
        self.n_layers = num_layers(model)
        self.device = next(model.parameters()).device
        self.eos = eos_ids(model, tokenizer)
        self.stats = {
            "tokens_forwarded": 0,
            "logit_rows": 0,
            "steps": 0,
            "seconds_prefill": 0.0,
            "seconds_decode": 0.0,
            "kv_bytes_peak": 0,
            "token_layers": 0,
        }
        self.keep_first_logits = keep_first_logits
        self.first_logits: dict[int, torch.Tensor] = {}  # item -> logits of its first new token (tests)

    @torch.no_grad()
    def generate(
        self,
        prompts: Sequence[MaskedPrompt],
        interventions: Sequence[RowIntervention],
        stop: StopRule,
        progress: ProgressCallback | None = None,
    ) -> dict[ResultKey, Generation]:
        """Every prompt under every ``PruneFrom(r)``."""
        out: dict[ResultKey, Generation] = {}
        total = len(prompts) * len(interventions)
        for row in interventions:
            if not isinstance(row, PruneFrom):
                raise ValueError(f"the pruned engine runs PruneFrom rows only, got {type(row).__name__}")
            gens = self.generate_pruned(prompts, row.layer, stop, offset_progress(progress, len(out), total))
            out.update(((i, row), g) for i, g in enumerate(gens))
        return out

    @torch.no_grad()
    def generate_pruned(
        self, prompts: Sequence[MaskedPrompt], from_layer: int, stop: StopRule, progress: ProgressCallback | None = None
    ) -> list[Generation]:
        """Every prompt with its hidden range pruned from ``from_layer``, in prompt order."""
        if not 0 <= from_layer <= self.n_layers:
            raise UserError(f"pruning layer must be in 0..{self.n_layers}, got {from_layer}")
        splits = [prune_split(p) for p in prompts]
        # One batch holds rows with one pruned width, so every pruned layer's cache is rectangular.
        order = sorted(range(len(prompts)), key=lambda i: (splits[i].width, i))
        results: dict[int, Generation] = {}
        for lo in range(0, len(order), self.batch_size):
            chunk = order[lo : lo + self.batch_size]
            groups: dict[int, list[int]] = {}
            for i in chunk:
                groups.setdefault(splits[i].width, []).append(i)
            for rows in groups.values():
                started = time.perf_counter()
                prefilled = [self._prefill(prompts[i].ids, splits[i], from_layer) for i in rows]
                self.stats["seconds_prefill"] += time.perf_counter() - started
                started = time.perf_counter()
                gens = self._decode(prefilled, from_layer, stop, rows)
                self.stats["seconds_decode"] += time.perf_counter() - started
                results.update(zip(rows, gens))
            if progress is not None:
                progress(len(results), len(prompts))
        return [results[i] for i in range(len(prompts))]

    def _prefill(self, ids: Sequence[int], split: PruneSplit, r: int) -> _Prefilled:
        """Head through every layer, pruned range below r, tail (but its last token) through every layer."""
        cache = DynamicCache()
        layers = [_LogicalLayer() for _ in range(self.n_layers)]
        cache.layers = layers  # pyright: ignore[reportAttributeAccessIssue]  (list invariance)
        ids_t = torch.tensor([list(ids)], device=self.device)
        pruned = split.width > 0 and r < self.n_layers
        if split.start > 0:
            self._forward(ids_t[:, : split.start], cache, None, self.n_layers)
        if split.width > 0 and r > 0:
            if pruned:
                with stop_before(self.model, r):
                    self._forward(ids_t[:, split.start : split.end], cache, None, r)
            else:
                self._forward(ids_t[:, split.start : split.end], cache, None, self.n_layers)
        if pruned:
            for layer in layers[r:]:
                layer.dropped = split.width
        drop = ColumnDrop.from_layer([(split.start, split.end)], r, self.n_layers) if pruned else None
        if split.end < split.length - 1:
            self._forward(ids_t[:, split.end : -1], cache, drop, self.n_layers)
        kv = [(layer.keys, layer.values) if layer.is_initialized else (None, None) for layer in layers]
        return _Prefilled(kv=kv, split=split, last_token=int(ids[-1]))

    def _forward(self, ids: torch.Tensor, cache, drop: ColumnDrop | None, layers_run: int) -> None:
        # Counted first: a forward stopped before layer r ends in an exception.
        self.stats["token_layers"] += ids.numel() * layers_run
        forward(self.model, ids, cache=cache, interventions=(drop,), last_only=True)

    def _decode(self, rows: list[_Prefilled], r: int, stop: StopRule, items: list[int]) -> list[Generation]:
        """Stack the rows' caches right-aligned (left padding) and decode them together."""
        max_new_tokens = stop.max_new_tokens
        width = rows[0].split.width if r < self.n_layers else 0
        cached = [row.split.length - 1 for row in rows]  # logical columns already in each row's cache
        w = max(cached)
        pads = [w - c for c in cached]
        template = next((k for row in rows for k, _ in row.kv if k is not None and k.shape[-2] > 0), None)
        if template is None:
            raise UserError("nothing of the prompt is left to cache after pruning (no BOS, r = 0, one-token tail)")
        empty = template.new_zeros(1, template.shape[1], 0, template.shape[3])
        cache = DynamicCache()
        cache.layers = []
        for layer in range(self.n_layers):
            dropped = width if layer >= r else 0
            keys = [k if k is not None else empty for k, _ in (row.kv[layer] for row in rows)]
            values = [v if v is not None else empty for _, v in (row.kv[layer] for row in rows)]
            kept = [c - dropped for c in cached]
            capacity = w - dropped + max_new_tokens
            cache.layers.append(
                PreallocatedLayer(
                    right_aligned(keys, kept, w - dropped, capacity),
                    right_aligned(values, kept, w - dropped, capacity),
                    w - dropped,
                    dropped=dropped,
                )
            )
        kv_bytes = costs.kv_bytes((layer.buf_k, layer.buf_v) for layer in cache.layers)
        self.stats["kv_bytes_peak"] = max(self.stats["kv_bytes_peak"], kv_bytes)
        mask = left_padding_mask(pads, w + 1)  # [B, cached columns + the last prompt token]
        drop = None
        if width and r < self.n_layers:
            drop = ColumnDrop.from_layer(
                [(pad + row.split.start, pad + row.split.end) for pad, row in zip(pads, rows)], r, self.n_layers
            )
        step_input = torch.tensor([[row.last_token] for row in rows], device=self.device)
        before = self.stats["tokens_forwarded"]

        def keep(logits: torch.Tensor) -> None:
            self.first_logits.update(zip(items, logits.float().cpu()))

        gens = decode_batch(
            self.model,
            self.tokenizer,
            self.eos,
            cache,
            step_input,
            mask.to(self.device),
            (drop,),
            stop,
            self.stats,
            first_logits=keep if self.keep_first_logits else None,
            head=self.head,
        )
        self.stats["token_layers"] += (self.stats["tokens_forwarded"] - before) * self.n_layers
        return gens
