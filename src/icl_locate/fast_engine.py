"""The fast exact sweep engine: greedy generations for many (query, layer) rows at once.

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

Layout of a batch row: [prefix | left padding | query | generated...]. Padding columns are
excluded through the 2D attention mask; positions come from the mask's cumulative sum, so
every real token keeps the position it has in the full prompt.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence

import torch
from torch import nn

from transformers.cache_utils import DynamicLayer

from .engine import Generation, eos_ids, forward
from .masking import Condition, MaskPlan, Range, hidden_ranges, num_layers


@dataclass(frozen=True)
class Variant:
    """What a row does to the model: mask the condition from ``from_layer``, or ablate layers."""

    from_layer: int | None = None
    ablate: frozenset[int] = frozenset()


@dataclass
class _Row:
    item: int
    variant: Variant
    prefix_key: tuple  # which prefix cache this row continues
    query_ids: list[int]
    query_hidden: list[Range]  # hidden ranges inside the query, relative to the query start
    prefix_hidden: list[Range]  # hidden ranges inside the prefix


def split_prompt(ids: Sequence[int], spans: dict) -> int:
    """Where the query starts: everything before it is shared context."""
    query = spans.get("query")
    if query is None:
        raise ValueError("prompt has no query span")
    return query[0]


def _needs_own_prefix_cache(prefix_hidden: Sequence[Range], prefix_len: int) -> bool:
    """True if some visible prefix token comes after a hidden one (its states then depend on j)."""
    if not prefix_hidden:
        return False
    first_hidden = min(a for a, _ in prefix_hidden)
    hidden = {i for a, b in prefix_hidden for i in range(a, b)}
    return any(i not in hidden for i in range(first_hidden, prefix_len))


class SweepEngine:
    """Decode every (item, variant) row; ``generate`` returns {(item index, variant): Generation}."""

    def __init__(self, model: nn.Module, tokenizer, batch_size: int | None = None,
                 max_batch_tokens: int = 32_000, kv_memory_fraction: float = 0.3):
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
        self.stats = {"prefix_forwards": 0, "tokens_forwarded": 0, "logit_rows": 0, "steps": 0}

    # ------------------------------------------------------------------ public

    @torch.no_grad()
    def generate(self, encoded: Sequence, condition: Condition | None, variants: Sequence[Variant],
                 stop_strings: Sequence[str] = (), max_new_tokens: int = 50,
                 progress: Callable[[int, int], None] | None = None) -> dict[tuple[int, Variant], Generation]:
        rows = self._plan_rows(encoded, condition, variants)
        prefix_caches = self._prefix_caches(encoded, rows)
        results: dict[tuple[int, Variant], Generation] = {}
        for chunk in self._chunks(rows, prefix_caches, max_new_tokens):
            for row, gen in zip(chunk, self._decode_chunk(chunk, prefix_caches, stop_strings, max_new_tokens)):
                results[(row.item, row.variant)] = gen
            if progress is not None:
                progress(len(results), len(rows))
        return results

    # ------------------------------------------------------------------ planning

    def _plan_rows(self, encoded, condition, variants) -> list[_Row]:
        rows = []
        for i, enc in enumerate(encoded):
            start = max(1, split_prompt(enc.ids, enc.spans))  # a prompt without BOS or context: share 1 token
            prefix, query = tuple(enc.ids[:start]), list(enc.ids[start:])
            for v in variants:
                if v.from_layer is not None and not 0 <= v.from_layer <= self.n_layers:
                    raise ValueError(f"from_layer {v.from_layer} outside 0..{self.n_layers}")
                masked = condition is not None and v.from_layer is not None and v.from_layer < self.n_layers
                ranges = hidden_ranges(condition, enc.spans, len(enc.ids)) if masked else []
                p_hidden = [(a, min(b, start)) for a, b in ranges if a < start]
                q_hidden = [(max(a, start) - start, b - start) for a, b in ranges if b > start]
                own = bool(v.ablate) or _needs_own_prefix_cache(p_hidden, start)
                key = (prefix, v) if own else (prefix, None)
                rows.append(_Row(i, v, key, query, q_hidden, p_hidden))
        return rows

    def _prefix_caches(self, encoded, rows: list[_Row]) -> dict[tuple, list[tuple[torch.Tensor, torch.Tensor]]]:
        """Per-layer (keys, values) of each distinct prefix, computed once (batch of 1)."""
        from transformers import DynamicCache

        caches = {}
        for row in rows:
            if row.prefix_key in caches:
                continue
            prefix, variant = row.prefix_key
            plan = None
            if variant is not None:
                layers = range(variant.from_layer, self.n_layers) if variant.from_layer is not None else ()
                plan = MaskPlan(hidden=(tuple(row.prefix_hidden),), layers=frozenset(layers) if row.prefix_hidden
                                else frozenset(), ablate=variant.ablate)
            cache = DynamicCache()
            ids = torch.tensor([list(prefix)], device=self.device)
            forward(self.model, ids, cache=cache, plan=plan, last_only=True)
            self.stats["prefix_forwards"] += 1
            self.stats["tokens_forwarded"] += len(prefix)
            caches[row.prefix_key] = [(layer.keys, layer.values) for layer in cache.layers]
        return caches

    def _chunks(self, rows: list[_Row], prefix_caches, max_new_tokens: int):
        """Batches of rows with one prefix length and one ablation each, bounded in rows x tokens
        and in KV bytes, and of even sizes (a small last batch would decode as long as a full one)."""
        groups: dict[tuple, list[_Row]] = {}
        for row in rows:
            groups.setdefault((len(row.prefix_key[0]), tuple(sorted(row.variant.ablate))), []).append(row)
        for (plen, _), group in groups.items():
            group.sort(key=lambda r: len(r.query_ids))
            longest = plen + max(len(r.query_ids) for r in group) + max_new_tokens
            size = self.batch_size or self._auto_rows(longest, prefix_caches[group[0].prefix_key])
            n_batches = -(-len(group) // size)
            even = -(-len(group) // n_batches)
            for start in range(0, len(group), even):
                yield group[start:start + even]

    def _auto_rows(self, longest: int, prefix_kv) -> int:
        kv_bytes_per_token = sum(k.shape[1] * k.shape[3] * k.element_size() * 2 for k, _ in prefix_kv)
        by_memory = int(self.kv_memory_fraction * available_memory(self.device)) // max(1, kv_bytes_per_token)
        return max(1, min(256, min(self.max_batch_tokens, by_memory) // longest))

    # ------------------------------------------------------------------ decoding

    def _decode_chunk(self, chunk: list[_Row], prefix_caches, stop_strings, max_new_tokens) -> list[Generation]:
        from transformers import DynamicCache

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
        hidden = [[(pad + a, pad + b) for a, b in row.prefix_hidden]
                  + [(pad + plen + a, pad + plen + b) for a, b in row.query_hidden]
                  for row, pad in zip(chunk, pads)]
        from_layers = [r.variant.from_layer if r.variant.from_layer is not None and h else self.n_layers
                       for r, h in zip(chunk, hidden)]
        plan = MaskPlan.per_row(hidden, from_layers, self.n_layers, ablate=chunk[0].variant.ablate)

        # One preallocated buffer per layer, written in place: growing a DynamicCache by
        # concatenation would copy the whole batch's cache at every step.
        cache = DynamicCache()
        per_row = [prefix_caches[r.prefix_key] for r in chunk]
        capacity = plen + qmax + max_new_tokens
        cache.layers = [_PreallocatedLayer(_right_aligned([kv[layer][0] for kv in per_row], cached, plen, capacity),
                                           _right_aligned([kv[layer][1] for kv in per_row], cached, plen, capacity),
                                           plen)
                        for layer in range(len(per_row[0]))]

        return decode_batch(self.model, self.tokenizer, self.eos, cache, ids.to(self.device), mask.to(self.device),
                            plan, stop_strings, max_new_tokens, self.stats)


def decode_batch(model: nn.Module, tokenizer, eos: set[int], cache, step_input: torch.Tensor,
                 mask: torch.Tensor, plan: MaskPlan | None, stop_strings: Sequence[str], max_new_tokens: int,
                 stats: dict | None = None,
                 first_logits: Callable[[torch.Tensor], None] | None = None) -> list[Generation]:
    """Greedy decoding of a batch whose prompts sit in ``cache`` up to ``step_input``.

    ``step_input`` ([B, t]) is the rest of each prompt (at least its last token); ``mask`` is the
    2D padding mask over cache + ``step_input``. A row leaves the batch as soon as it finishes
    (EOS, a stop string, or ``max_new_tokens``); ``cache`` must support ``batch_select_indices``.
    ``first_logits`` receives the first step's logits [B, vocab] (for tests).
    """
    n = step_input.shape[0]
    device = step_input.device
    alive = list(range(n))  # rows still decoding, aligned with the batch
    new_tokens: list[list[int]] = [[] for _ in range(n)]
    finish = ["length"] * n
    for step in range(max_new_tokens):
        logits = forward(model, step_input, attention_mask=mask, cache=cache, plan=plan,
                         last_only=True).logits[:, -1]
        if first_logits is not None and step == 0:
            first_logits(logits)
        if stats is not None:
            stats["tokens_forwarded"] += step_input.numel()
            stats["logit_rows"] += logits.shape[0]
            stats["steps"] += 1
        tokens = logits.argmax(-1).tolist()
        keep = []
        for pos, (b, token) in enumerate(zip(alive, tokens)):
            if token in eos:
                finish[b] = "eos"
                continue
            new_tokens[b].append(token)
            if stop_strings and any(s in tokenizer.decode(new_tokens[b]) for s in stop_strings):
                finish[b] = "stop"
                continue
            if len(new_tokens[b]) < max_new_tokens:
                keep.append(pos)
        if not keep:
            break
        if len(keep) < len(alive):
            index = torch.tensor(keep, device=device)
            cache.batch_select_indices(index)
            mask = mask[index]
            plan = plan.select_rows(keep) if plan is not None else None
            tokens = [tokens[p] for p in keep]
            alive = [alive[p] for p in keep]
        step_input = torch.tensor(tokens, device=device)[:, None]
        mask = torch.cat([mask, mask.new_ones(len(alive), 1)], dim=1)
    return [Generation(token_ids=t, text=tokenizer.decode(t, skip_special_tokens=True), finish=f)
            for t, f in zip(new_tokens, finish)]


def available_memory(device: torch.device) -> int:
    """Bytes free for new tensors: free GPU memory, or the kernel's MemAvailable on CPU."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 8 * 2 ** 30  # not Linux: assume 8 GiB


def _right_aligned(tensors: list[torch.Tensor], keep: list[int], width: int, capacity: int) -> torch.Tensor:
    """[B, H, capacity, D]: in the first ``width`` columns, row b holds the first keep[b] prefix
    positions of tensors[b], right-aligned; the rest is room for the tokens to come."""
    first = tensors[0]
    out = first.new_empty(len(tensors), first.shape[1], capacity, first.shape[3])
    out[:, :, :width] = 0  # padding columns are masked, but must not hold NaNs (0 x NaN = NaN)
    for b, (t, k) in enumerate(zip(tensors, keep)):
        if k:
            out[b, :, width - k:width] = t[0, :, :k]
    return out


class _PreallocatedLayer(DynamicLayer):
    """A cache layer that writes new keys/values into a preallocated buffer instead of concatenating.

    ``dropped``: prompt columns this layer does not store (context pruning, pruning.py); it still
    reports the full length, so that positions and masks are built over prompt columns.
    """

    def __init__(self, keys: torch.Tensor, values: torch.Tensor, length: int, dropped: int = 0):
        super().__init__()
        self.buf_k, self.buf_v, self.length, self.dropped = keys, values, length, dropped
        self.device = keys.device
        self.is_initialized = True
        self._views()

    def _views(self) -> None:
        self.keys, self.values = self.buf_k[:, :, :self.length], self.buf_v[:, :, :self.length]

    def get_seq_length(self) -> int:
        return self.length + self.dropped

    def update(self, key_states, value_states, *args, **kwargs):
        end = self.length + key_states.shape[-2]
        if end > self.buf_k.shape[-2]:
            raise RuntimeError(f"preallocated cache of {self.buf_k.shape[-2]} positions is full")
        self.buf_k[:, :, self.length:end] = key_states
        self.buf_v[:, :, self.length:end] = value_states
        self.length = end
        self._views()
        return self.keys, self.values

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        """Keep the rows ``indices`` (ascending), compacted in place: rows only move to lower slots,
        so copying in order never overwrites a row still to move, and no second cache is allocated.
        Only the filled columns are copied."""
        for new, old in enumerate(indices.tolist()):
            if new != old:
                self.buf_k[new, :, :self.length].copy_(self.buf_k[old, :, :self.length])
                self.buf_v[new, :, :self.length].copy_(self.buf_v[old, :, :self.length])
        self.buf_k, self.buf_v = self.buf_k[:len(indices)], self.buf_v[:len(indices)]
        self._views()
