"""The fast exact sweep engine: greedy generations for many (prompt, intervention) rows at once.

Exact shortcuts (each checked against the reference engine in tests/test_fast_engine.py):

* The context (BOS + instructions + examples) before the query does not depend on the query,
  so its KV cache is computed once per distinct prefix and shared by every query.
* Masking from layer j hides the masked columns at layers >= j, so their keys/values there
  are never read: the *unmasked* prefix cache is exact for every j as long as no visible
  prefix token comes after a hidden one (true for every paper condition except
  "instructions": the examples then see no instructions and need their own cache per j).
* Rows (query, j) for many queries and layers decode together in one batch; a finished row
  (stop string, EOS, token limit) leaves the batch at once.
* Logits are computed for the last position only.

Layout of a batch row: [left padding | prefix | query | generated...]. Padding columns are
excluded through the 2D attention mask; positions come from the mask's cumulative sum, so
every real token keeps the position it has in the full prompt.
"""

from __future__ import annotations

import time
from collections import Counter, defaultdict
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn
from transformers import DynamicCache

from ..core.conditions import MaskedPrompt, Range
from ..core.interventions import (
    AblateLayers,
    AttentionAblation,
    ColumnMask,
    HeadMask,
    MaskFrom,
    RowIntervention,
    Unchanged,
)
from ..core.structure import num_layers
from ..util.system import available_memory
from .base import Generation, Progress, ResultKey, StopRule, eos_ids, forward, head_timer
from .decoding import PreallocatedLayer, decode_batch, right_aligned


@dataclass
class _Row:
    item: int
    intervention: RowIntervention
    prefix_key: tuple  # which prefix cache this row continues: (prefix ids, intervention or None)
    query_ids: list[int]
    query_hidden: list[Range]  # hidden ranges inside the query, relative to the query start
    prefix_hidden: list[Range]  # hidden ranges inside the prefix
    mask_layers: frozenset[int]  # layers where this row hides its columns (empty: no mask)
    mask_heads: dict[int, frozenset[int]] | None  # per masked layer, the query heads that hide (None: all)
    ablate: frozenset[int]


def _needs_own_prefix_cache(prefix_hidden: Sequence[Range], prefix_len: int) -> bool:
    """True if some visible prefix token comes after a hidden one (its states then depend on j)."""
    if not prefix_hidden:
        return False
    first_hidden = min(a for a, _ in prefix_hidden)
    hidden = {i for a, b in prefix_hidden for i in range(a, b)}
    return any(i not in hidden for i in range(first_hidden, prefix_len))


class _PrefixCaches:
    """Prefix caches made when a batch first needs them and dropped once their last row is decoded."""

    def __init__(self, make, rows: list[_Row], stats: dict):
        self.make, self.stats = make, stats
        self.caches: dict[tuple, list] = {}
        self.pending = Counter(r.prefix_key for r in rows)

    def get(self, row: _Row) -> list[tuple[torch.Tensor, torch.Tensor]]:
        if row.prefix_key not in self.caches:
            self.caches[row.prefix_key] = self.make(row)
            self.stats["prefix_caches_alive_max"] = max(self.stats["prefix_caches_alive_max"], len(self.caches))
        return self.caches[row.prefix_key]

    def done(self, rows: list[_Row]) -> None:
        for row in rows:
            self.pending[row.prefix_key] -= 1
            if not self.pending[row.prefix_key]:
                self.caches.pop(row.prefix_key, None)


class SweepEngine:
    """Decode every (prompt, intervention) row; supports ``MaskFrom``, ``HeadMask``, ``AblateLayers``, ``UNCHANGED``."""

    def __init__(
        self,
        model: nn.Module,
        tokenizer,
        batch_size: int | None = None,
        max_batch_tokens: int = 32_000,
        kv_memory_fraction: float = 0.3,
    ):
        self.model = model
        self.tokenizer = tokenizer
        self.n_layers = num_layers(model)
        self.device = next(model.parameters()).device
        self.eos = eos_ids(model, tokenizer)
        self.batch_size = batch_size
        # Automatic batches are bounded in rows x (prefix + query + new) tokens, and their KV
        # cache in bytes by a fraction of the memory available when decoding starts.
        self.max_batch_tokens = max_batch_tokens
        self.kv_memory_fraction = kv_memory_fraction
        self.stats = {
            "prefix_forwards": 0,
            "prefix_tokens": 0,
            "tokens_forwarded": 0,
            "logit_rows": 0,
            "steps": 0,
            "prefix_caches_alive_max": 0,
        }
        # seconds: total, prefix (context caches), query_prefill, decode_forward, head (see base.time_breakdown)
        self.times: dict[str, float] = defaultdict(float)

    # ------------------------------------------------------------------ public

    @torch.no_grad()
    def generate(
        self,
        prompts: Sequence[MaskedPrompt],
        interventions: Sequence[RowIntervention],
        stop: StopRule,
        progress: Progress | None = None,
    ) -> dict[ResultKey, Generation]:
        started = time.perf_counter()
        rows = self._plan_rows(prompts, interventions)
        prefix_caches = _PrefixCaches(self._prefix_cache, rows, self.stats)
        results: dict[ResultKey, Generation] = {}
        with head_timer(self.model, self.times):
            for chunk in self._chunks(rows, prefix_caches, stop.max_new_tokens):
                for row, gen in zip(chunk, self._decode_chunk(chunk, prefix_caches, stop)):
                    results[(row.item, row.intervention)] = gen
                prefix_caches.done(chunk)
                if progress is not None:
                    progress(len(results), len(rows))
        self.times["total"] += time.perf_counter() - started
        return results

    # ------------------------------------------------------------------ planning

    def _row_settings(self, prompt: MaskedPrompt, row: RowIntervention):
        """(masked layers, head sets or None, ablated layers) of one row."""
        none: frozenset[int] = frozenset()
        if isinstance(row, MaskFrom):
            if not 0 <= row.layer <= self.n_layers:
                raise ValueError(f"from_layer {row.layer} outside 0..{self.n_layers}")
            return (frozenset(range(row.layer, self.n_layers)) if prompt.hidden else none), None, none
        if isinstance(row, HeadMask):
            heads = row.by_layer()
            if any(not 0 <= layer < self.n_layers for layer in heads):
                raise ValueError(f"head mask layers {sorted(heads)} outside 0..{self.n_layers - 1}")
            return (frozenset(heads) if prompt.hidden else none), (heads if prompt.hidden else None), none
        if isinstance(row, AblateLayers):
            return none, None, row.layers
        if isinstance(row, Unchanged):
            return none, None, none
        raise ValueError(f"the sweep engine does not run {type(row).__name__} rows")

    def _plan_rows(self, prompts: Sequence[MaskedPrompt], interventions: Sequence[RowIntervention]) -> list[_Row]:
        rows = []
        for i, prompt in enumerate(prompts):
            start = max(1, prompt.query_start())  # a prompt without BOS or context: share 1 token
            prefix, query = tuple(prompt.ids[:start]), list(prompt.ids[start:])
            for v in interventions:
                layers, heads, ablate = self._row_settings(prompt, v)
                ranges = prompt.hidden if layers else ()
                p_hidden = [(a, min(b, start)) for a, b in ranges if a < start]
                q_hidden = [(max(a, start) - start, b - start) for a, b in ranges if b > start]
                # A head mask lets other heads read the hidden columns, whose own states it changed:
                # such a row's context is computed under its own intervention.
                own = bool(ablate) or heads is not None or _needs_own_prefix_cache(p_hidden, start)
                key = (prefix, v) if own else (prefix, None)
                rows.append(_Row(i, v, key, query, q_hidden, p_hidden, layers, heads, ablate))
        return rows

    def _prefix_cache(self, row: _Row) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Per-layer (keys, values) of a row's prefix (batch of 1), under the row's own intervention
        when its prefix needs one."""
        prefix, own = row.prefix_key
        interventions = []
        if own is not None:
            if row.prefix_hidden:
                interventions.append(ColumnMask([row.prefix_hidden], [row.mask_layers], [row.mask_heads]))
            if row.ablate:
                interventions.append(AttentionAblation(row.ablate))
        cache = DynamicCache()
        ids = torch.tensor([list(prefix)], device=self.device)
        started = time.perf_counter()
        forward(self.model, ids, cache=cache, interventions=interventions, last_only=True)
        self.times["prefix"] += time.perf_counter() - started
        self.stats["prefix_forwards"] += 1
        self.stats["prefix_tokens"] += len(prefix)
        self.stats["tokens_forwarded"] += len(prefix)
        return [(layer.keys, layer.values) for layer in cache.layers]

    def _chunks(self, rows: list[_Row], prefix_caches: _PrefixCaches, max_new_tokens: int):
        """Batches of rows with one prefix length and one ablation each, bounded in rows x tokens
        and in KV bytes, and of even sizes (a small last batch would decode as long as a full one).
        Rows of one prefix cache stay together (then by query length), so that only a few caches
        are alive at a time: a head sweep has one per intervention."""
        for plen, group in self._groups(rows):
            first_seen = {key: n for n, key in enumerate(dict.fromkeys(r.prefix_key for r in group))}
            group.sort(key=lambda r: (first_seen[r.prefix_key], len(r.query_ids)))
            size = self._rows_per_batch(plen, group, prefix_caches, max_new_tokens)
            n_batches = -(-len(group) // size)
            even = -(-len(group) // n_batches)
            for start in range(0, len(group), even):
                yield group[start : start + even]

    @staticmethod
    def _groups(rows: list[_Row]) -> list[tuple[int, list[_Row]]]:
        """(prefix length, rows) for each (prefix length, ablation): what one batch may mix."""
        groups: dict[tuple, list[_Row]] = {}
        for row in rows:
            groups.setdefault((len(row.prefix_key[0]), tuple(sorted(row.ablate))), []).append(row)
        return [(plen, group) for (plen, _), group in groups.items()]

    def _rows_per_batch(self, plen: int, group: list[_Row], prefix_caches: _PrefixCaches, max_new_tokens: int) -> int:
        """``batch_size``, else as many rows as the token and KV-memory bounds allow."""
        longest = plen + max(len(r.query_ids) for r in group) + max_new_tokens
        return self.batch_size or self._auto_rows(longest, prefix_caches.get(group[0]))

    def _auto_rows(self, longest: int, prefix_kv) -> int:
        kv_bytes_per_token = sum(k.shape[1] * k.shape[3] * k.element_size() * 2 for k, _ in prefix_kv)
        by_memory = int(self.kv_memory_fraction * available_memory(self.device)) // max(1, kv_bytes_per_token)
        return max(1, min(256, min(self.max_batch_tokens, by_memory) // longest))

    # ------------------------------------------------------------------ decoding

    def _decode_chunk(self, chunk: list[_Row], prefix_caches, stop: StopRule) -> list[Generation]:
        n = len(chunk)
        plen = len(chunk[0].prefix_key[0])
        qmax = max(len(r.query_ids) for r in chunk)
        pads = [qmax - len(r.query_ids) for r in chunk]
        # Row b is [pad_b padding | prefix | query_b], all rows plen + qmax columns. Padding only
        # on the far left keeps column distances equal to position distances (sliding windows
        # and GPT-Neo's local attention work in columns). The first plen columns come from the
        # prefix cache; the rest are fed as input (for padded rows: the prefix tail, then the query).
        pad_id = self.tokenizer.pad_token_id or 0
        ids = torch.empty(n, qmax, dtype=torch.long)
        mask = torch.ones(n, plen + qmax, dtype=torch.long)
        cached = []  # how many prefix tokens of each row sit in the cache part
        for b, (row, pad) in enumerate(zip(chunk, pads)):
            full = [pad_id] * pad + list(row.prefix_key[0]) + row.query_ids
            ids[b] = torch.tensor(full[plen:])
            mask[b, :pad] = 0
            cached.append(max(0, plen - pad))
        hidden = [
            [(pad + a, pad + b) for a, b in row.prefix_hidden]
            + [(pad + plen + a, pad + plen + b) for a, b in row.query_hidden]
            for row, pad in zip(chunk, pads)
        ]
        interventions = [
            ColumnMask(
                hidden,
                [r.mask_layers if h else frozenset() for r, h in zip(chunk, hidden)],
                [r.mask_heads if h else None for r, h in zip(chunk, hidden)],
            )
        ]
        if chunk[0].ablate:
            interventions.append(AttentionAblation(chunk[0].ablate))

        per_row = [prefix_caches.get(r) for r in chunk]
        capacity = plen + qmax + stop.max_new_tokens
        cache = DynamicCache()
        cache.layers = [
            PreallocatedLayer(
                right_aligned([kv[layer][0] for kv in per_row], cached, plen, capacity),
                right_aligned([kv[layer][1] for kv in per_row], cached, plen, capacity),
                plen,
            )
            for layer in range(len(per_row[0]))
        ]
        return decode_batch(
            self.model,
            self.tokenizer,
            self.eos,
            cache,
            ids.to(self.device),
            mask.to(self.device),
            interventions,
            stop,
            self.stats,
            times=self.times,
        )
