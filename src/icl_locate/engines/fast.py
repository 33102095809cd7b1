"""The fast engine: exact greedy generations for many (prompt, intervention) rows at once.

Exact shortcuts (each checked against the reference engine in tests/test_fast_engine.py):

* The context (BOS + instructions + examples) before the query does not depend on the query,
  so its KV cache is computed once per distinct prefix and shared by every query. Rows that only
  patch (task and function vectors) change nothing before the patched last token: each prompt up
  to it is a prefix of its own, and a batch's prefixes are computed together (right-padded), the
  tokens they all begin with once.
* Masking from layer j hides the masked columns at layers >= j, so their keys/values there
  are never read: the *unmasked* prefix cache is exact for every j as long as no visible
  prefix token comes after a hidden one (true for every paper condition except
  "instructions": the examples then see no instructions and need their own cache per j; so
  do the conditions inside the examples, "answers", "inputs", "example:i"). A mask below
  layer j (``MaskBelow``) that hides prefix columns changes keys/values read above it: such a
  row has its own prefix cache (``rows.needs_own_prefix_cache``).
* Rows (query, j) for many queries and layers decode together in one batch; a finished row
  (stop string, EOS, token limit) leaves the batch at once.
* Logits are computed for the last position only.

Layout of a batch row: [left padding | prefix | query | generated...] (``rows.BatchLayout``;
prefixes of different lengths may share a batch, each right-aligned against its query).
Padding columns are excluded through the 2D attention mask; positions come from the mask's
cumulative sum, so every real token keeps the position it has in the full prompt.
"""

from __future__ import annotations

import time
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import replace
from typing import Any

import torch
from torch import nn
from transformers import DynamicCache

from ..core.conditions import MaskedPrompt
from ..core.interventions import AttentionAblation, BatchIntervention, ColumnMask, PruneFrom, RowIntervention
from ..core.structure import num_layers
from ..util.system import available_memory
from .base import (
    Generation,
    ProgressCallback,
    ResultKey,
    StopRule,
    caches_together,
    common_start,
    eos_ids,
    head_timer,
    last_hidden,
)
from .decoding import decode_batch
from .head import CertifiedHead
from .rows import KV, BatchLayout, PrefixCaches, Row, plan_rows

PREFIX_BATCH_TOKENS = 8192  # padded tokens of prefix caches made in one forward (``FastEngine._prefix_caches``)


MAX_BATCH_ROWS = 256  # the automatic rule's bound on a batch's rows
MAX_BATCH_TOKENS = 32_000  # the automatic rule's bound on a batch's rows x (prefix + query + new) tokens
KV_MEMORY_FRACTION = 0.3  # the share of the memory available at a batch's start its KV cache may take


def rows_by_memory(kv: KV, tokens: int, fraction: float, device: torch.device) -> int:
    """Rows of ``tokens`` positions each whose KV cache (the per-token size of ``kv``, one row's keys and
    values per layer) fits in ``fraction`` of the memory available now."""
    bytes_per_token = sum(k.shape[1] * k.shape[3] * k.element_size() * 2 for k, _ in kv)
    return int(fraction * available_memory(device)) // max(1, bytes_per_token * tokens)


def even_batch(rows: int, size: int) -> int:
    """The rows of each batch (the last may hold fewer) when ``rows`` rows go in batches of at most ``size``,
    spread evenly over the fewest such batches: a small last batch would decode as long as a full one."""
    return -(-rows // -(-rows // max(1, size))) if rows > 0 else 0


def rule_rows(
    kv: KV, tokens: int, max_batch_tokens: int, fraction: float, device: torch.device, scale: float = 1.0
) -> int:
    """The automatic batch of rows of ``tokens`` positions: bounded in rows (``MAX_BATCH_ROWS``), in rows x
    tokens (``max_batch_tokens``) and in KV memory; then times ``scale`` (``scaled_rows``)."""
    memory = rows_by_memory(kv, tokens, fraction, device)
    return scaled_rows(min(rows_by_size(tokens, max_batch_tokens), memory), memory, scale)


def rows_by_size(tokens: int, max_batch_tokens: int = MAX_BATCH_TOKENS) -> int:
    """The automatic rule's rows of ``tokens`` positions before the KV-memory bound: at most ``MAX_BATCH_ROWS``
    and ``max_batch_tokens`` rows x tokens (what a plan without the machine's free memory can count)."""
    return max(1, min(MAX_BATCH_ROWS, max_batch_tokens // tokens))


def scaled_rows(rule: int, by_memory: int, scale: float) -> int:
    """The rule's rows times a factor the batch check measured (``batch_rows.choose_batch_scale``, which times
    these very rows), within the KV-memory bound, which no factor scales."""
    return max(1, min(int(rule * scale), by_memory))


class FastEngine:
    """Decode every (prompt, intervention) row; supports ``MaskFrom``, ``MaskBelow``, ``HeadMask``,
    ``AblateLayers``, ``PatchLastPosition``, ``UNCHANGED``."""

    def __init__(
        self,
        model: nn.Module,
        tokenizer,
        batch_size: int | None = None,
        max_batch_tokens: int = MAX_BATCH_TOKENS,
        kv_memory_fraction: float = KV_MEMORY_FRACTION,
        screen: CertifiedHead | None = None,
        batch_scale: float = 1.0,
    ):
        """``screen``: a screened LM head (``head.py``) picks the greedy tokens (the model's own head's);
        None: the model's own head. ``batch_scale``: the automatic rule's rows are multiplied by it, within the
        KV-memory bound (``scaled_rows``; a power of two the calibration measured faster than 1 on this machine,
        ``batch_rows.py``)."""
        self.model = model
        self.head = screen
        self.tokenizer = tokenizer
        self.n_layers = num_layers(model)
        self.device = next(model.parameters()).device
        self.eos = eos_ids(model, tokenizer)
        self.batch_size = batch_size
        # Automatic batches are bounded in rows, in rows x (prefix + query + new) tokens, and their KV
        # cache in bytes by a fraction of the memory available when decoding starts.
        self.max_batch_tokens = max_batch_tokens
        self.kv_memory_fraction = kv_memory_fraction
        self.batch_scale = batch_scale
        self.stats: dict[str, Any] = {  # counters; subclasses add per-layer lists
            "prefix_forwards": 0,
            "prefix_tokens": 0,
            "tokens_forwarded": 0,
            "logit_rows": 0,
            "steps": 0,
            "prefix_caches_alive_max": 0,
        }
        # seconds: total, prefix (context caches), query_prefill, decode_forward, head (see base.time_breakdown)
        self.times: dict[str, float] = defaultdict(float)
        # prefix caches made before, by prefix key, that ``generate`` takes instead of making them (the
        # calibration's engine comparison: every engine makes the same ones, so they are made once, untimed)
        self.known_prefixes: dict[tuple, KV] = {}

    # ------------------------------------------------------------------ public

    @torch.no_grad()
    def generate(
        self,
        prompts: Sequence[MaskedPrompt],
        interventions: Sequence[RowIntervention],
        stop: StopRule,
        progress: ProgressCallback | None = None,
    ) -> dict[ResultKey, Generation]:
        started = time.perf_counter()
        rows = self.plan(prompts, interventions)
        prefix_caches = self.prefix_caches(rows)
        results: dict[ResultKey, Generation] = {}
        with head_timer(self.model, self.times):
            for chunk in self._chunks(rows, prefix_caches, stop.max_new_tokens):
                prefix_caches.prepare(chunk)
                for row, gen in zip(chunk, self._decode_chunk(chunk, prefix_caches, stop), strict=True):
                    results[(row.item, row.intervention)] = gen
                prefix_caches.done(chunk)
                if progress is not None:
                    progress(len(results), len(rows))
        if self.head is not None:  # its buffer, sized for this work's batches, is not kept between units
            self.head.release()
        self.times["total"] += time.perf_counter() - started
        return results

    # ------------------------------------------------------------------ planning

    def plan(self, prompts: Sequence[MaskedPrompt], interventions: Sequence[RowIntervention]) -> list[Row]:
        """The rows to decode (``PruneFrom`` rows are the pruned engine's)."""
        for row in interventions:
            if isinstance(row, PruneFrom):
                raise ValueError("the fast engine does not run PruneFrom rows (the pruned engine does)")
        return plan_rows(prompts, interventions, self.n_layers)

    def prefix_caches(self, rows: list[Row]) -> PrefixCaches:
        """The prefix caches of ``rows``, each computed when first needed."""
        return PrefixCaches(self._prefix_cache, rows, self.stats, self._prefix_caches, self.known_prefixes)

    def _prefix_cache(self, row: Row) -> KV:
        """Per-layer (keys, values) of a row's prefix (batch of 1), under the row's own intervention
        when its prefix needs one."""
        prefix, own = row.prefix_key
        interventions = []
        if own is not None:
            if row.prefix_hidden:
                plan = row.plan
                interventions.append(
                    ColumnMask([row.prefix_hidden], [plan.mask_layers], [plan.mask_heads], [plan.others_only])
                )
            if row.plan.ablate:
                interventions.append(AttentionAblation(row.plan.ablate))
            interventions.extend(p for p in row.plan.patches if p.position < len(prefix))
        cache = DynamicCache()
        ids = torch.tensor([list(prefix)], device=self.device)
        started = time.perf_counter()
        last_hidden(self.model, ids, cache=cache, interventions=interventions)  # keys and values; no logits wanted
        self.times["prefix"] += time.perf_counter() - started
        self.stats["prefix_forwards"] += 1
        self.stats["prefix_tokens"] += len(prefix)
        self.stats["tokens_forwarded"] += len(prefix)
        # the forward filled every layer with a DynamicLayer (keys and values set); transformers
        # types the list as any kind of cache layer
        layers: list[Any] = cache.layers
        return [(layer.keys, layer.values) for layer in layers]

    def _prefix_caches(self, rows: list[Row]) -> list[KV]:
        """The prefix caches of ``rows`` (prefixes needing no intervention), right-padded together:
        padding after a prefix changes none of its keys and values (causal attention; positions from the
        mask), and one product over all of their tokens costs less per token than one per prefix. At most
        ``PREFIX_BATCH_TOKENS`` padded tokens a forward (attention's memory grows with rows x length^2)."""
        order = sorted(range(len(rows)), key=lambda n: len(rows[n].prefix_key[0]))  # shortest first: little padding
        made: dict[int, KV] = {}
        batch: list[int] = []
        for n in order:
            if batch and (len(batch) + 1) * len(rows[n].prefix_key[0]) > PREFIX_BATCH_TOKENS:
                made.update(zip(batch, self._padded_prefix_caches([rows[b] for b in batch]), strict=True))
                batch = []
            batch.append(n)
        made.update(zip(batch, self._padded_prefix_caches([rows[b] for b in batch]), strict=True))
        return [made[n] for n in range(len(rows))]

    def _padded_prefix_caches(self, rows: list[Row]) -> list[KV]:
        """``_prefix_caches`` of ``rows`` in one forward (``caches_together``: the tokens they all begin with,
        e.g. BOS and the instructions of zero-shot prompts, once before it)."""
        prefixes = [r.prefix_key[0] for r in rows]
        started = time.perf_counter()
        made = caches_together(self.model, prefixes, self.tokenizer.pad_token_id or 0)
        self.times["prefix"] += time.perf_counter() - started
        shared = common_start(prefixes)
        self.stats["prefix_forwards"] += 1 + bool(shared)
        fed = shared + sum(len(p) - shared for p in prefixes)
        self.stats["prefix_tokens"] += fed
        self.stats["tokens_forwarded"] += fed
        return made

    def _chunks(self, rows: list[Row], prefix_caches: PrefixCaches, max_new_tokens: int):
        """Batches of rows with one ablation each, bounded as ``rule_rows`` says, and of even
        sizes (a small last batch would decode as long as a full one). Rows of one prefix cache stay
        together (then by query length), so that only a few caches are alive at a time: a head sweep has
        one per intervention; prefixes of about one length batch together (less padding)."""
        for group in self.ablation_groups(rows):
            first_seen = {key: n for n, key in enumerate(dict.fromkeys(r.prefix_key for r in group))}
            group.sort(key=lambda r: (len(r.prefix_key[0]), first_seen[r.prefix_key], len(r.query_ids)))
            even = even_batch(len(group), self._rows_per_batch(group, prefix_caches, max_new_tokens))
            for start in range(0, len(group), even):
                yield group[start : start + even]

    @staticmethod
    def ablation_groups(rows: list[Row]) -> list[list[Row]]:
        """The rows of each ablation: what one batch may mix (one ablation is one batch-wide intervention)."""
        groups: dict[tuple, list[Row]] = {}
        for row in rows:
            groups.setdefault(tuple(sorted(row.plan.ablate)), []).append(row)
        return list(groups.values())

    def _rows_per_batch(self, group: list[Row], prefix_caches: PrefixCaches, max_new_tokens: int) -> int:
        """``batch_size``, else as many rows as the automatic rule allows (``rule_rows``)."""
        return self.batch_size or self._auto_rows(self._longest(group, max_new_tokens), prefix_caches.get(group[0]))

    @staticmethod
    def _longest(rows: list[Row], max_new_tokens: int) -> int:
        """The positions of the longest of ``rows`` once decoded: its prefix, its query and the new tokens."""
        return max(len(r.prefix_key[0]) + len(r.query_ids) for r in rows) + max_new_tokens

    def _auto_rows(self, longest: int, prefix_kv: KV) -> int:
        return rule_rows(
            prefix_kv, longest, self.max_batch_tokens, self.kv_memory_fraction, self.device, self.batch_scale
        )

    # ------------------------------------------------------------------ decoding

    def _decode_chunk(self, chunk: list[Row], prefix_caches: PrefixCaches, stop: StopRule) -> list[Generation]:
        pad_id = self.tokenizer.pad_token_id or 0
        layout = BatchLayout.of([r.prefix_key[0] for r in chunk], [r.query_ids for r in chunk], pad_id)
        hidden = [layout.hidden(b, row) for b, row in enumerate(chunk)]
        interventions: list[BatchIntervention] = [
            ColumnMask(
                hidden,
                [r.plan.mask_layers if h else frozenset() for r, h in zip(chunk, hidden, strict=True)],
                [r.plan.mask_heads if h else None for r, h in zip(chunk, hidden, strict=True)],
                [r.plan.others_only for r in chunk],
            )
        ]
        if chunk[0].plan.ablate:
            interventions.append(AttentionAblation(chunk[0].plan.ablate))
        # a row's patches move to its batch row and columns; those in its cached prefix part already
        # acted when its own prefix cache was made (plan_rows) and are outside every forward here
        interventions.extend(
            replace(p, row=b, position=layout.pads[b] + p.position) for b, r in enumerate(chunk) for p in r.plan.patches
        )
        per_row = [prefix_caches.get(r) for r in chunk]
        capacity = layout.width + stop.max_new_tokens
        cache = DynamicCache()
        cache.layers = [  # pyright: ignore[reportAttributeAccessIssue]  (list invariance: a list of one layer kind)
            layout.cache_layer([kv[layer] for kv in per_row], range(len(chunk)), capacity)
            for layer in range(len(per_row[0]))
        ]
        return decode_batch(
            self.model,
            self.tokenizer,
            self.eos,
            cache,
            layout.inputs.to(self.device),
            layout.mask.to(self.device),
            interventions,
            stop,
            self.stats,
            times=self.times,
            head=self.head,
        )
