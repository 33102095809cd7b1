"""The tree engine: the sweep engine plus exact sharing *across* mask layers.

Row (q, j) of a layer sweep computes, at every layer l < j, exactly what the unmasked run of
query q computes, as long as its generated tokens so far are the same. In general a row's
*divergence layer* d is the first layer its intervention touches (``MaskFrom(j)``: j, a head
mask or an ablation: its first layer, none: L). Two rows of one query with the same tokens so
far (one *history group*) compute the same states and keys/values at every layer below both
their divergence layers. So at layer l a history group needs one *shared slot* for its rows
with d > l, and each row with d <= l needs its own slot: a 19-row sweep runs 1 + (l + 1) states
at layer l instead of 19 (about 45% of the body's work over all layers), in the query's prefill
and in every decoding step, and the keys/values of a shared slot are stored once.

When the rows of a group pick different tokens, the group splits; the new group's shared slots
start as copies of the old group's (their history up to the split is the same), own slots stay
where they are. A finished row leaves its slots; an empty slot is dropped.

Mechanics: the model runs its own forward (embeddings, masks, rotary tables, attention hooks)
on a batch of *leaves*, the slots of the last layer (N_0 <= N_1 <= ... <= N_{L-1}, so the last
layer has the most). A forward pre-hook on each decoder layer picks this layer's slots out of
the previous layer's output (an ``index_select``) and slices the per-row arguments (attention
mask, position embeddings and ids, Bloom's ALiBi) to them; cache layer l holds N_l rows, and
the column mask of layer l (``LayerColumnMasks``) has one row per slot. Everything else is the
sweep engine's: shared context caches, left padding, stop rules, logits at the last position.
"""

from __future__ import annotations

import inspect
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
from transformers import DynamicCache

from ..core.conditions import MaskedPrompt
from ..core.interventions import AttentionAblation, ColumnMask, LayerColumnMasks, RowIntervention
from ..core.structure import attention_window, decoder_layers
from .base import Generation, Progress, ResultKey, StopRule, forward, last_hidden
from .decoding import PreallocatedLayer, right_aligned
from .drafts import Drafter
from .head import ScreenedHead, screen_mismatch
from .sweep import SweepEngine, _PrefixCaches, _Row

# Keyword arguments of a decoder layer that carry one row per batch row, by name. Any other
# tensor argument is refused (we cannot know whether its first dimension is the batch).
PER_ROW = frozenset({"attention_mask", "position_ids", "position_embeddings", "encoder_attention_mask"})
PER_ROW_TIMES_HEADS = frozenset({"alibi"})  # Bloom: [batch x heads, 1, kv]
NOT_PER_ROW = frozenset({"cache_position"})

Key = tuple  # ("shared", group) or ("own", member)


@dataclass
class _Member:
    row: _Row
    d: int  # divergence layer
    query: int
    group: int
    tokens: list[int] = field(default_factory=list)
    finish: str | None = None


@dataclass
class _Group:
    query: int
    history: list[int]
    parent: int | None = None  # the group it split from at the last step (its shared slots are copied)
    gid: int = 0
    columns: list[int] = field(default_factory=list)  # generated columns: 1 = a token, 0 = a rejected draft's hole
    fails: int = 0  # drafts missed in a row
    pause: int = 0  # steps left without drafts


def _holds_tensor(value) -> bool:
    """A tensor, or a tuple / list / dict with one somewhere inside."""
    if isinstance(value, torch.Tensor):
        return True
    if isinstance(value, (tuple, list)):
        return any(_holds_tensor(v) for v in value)
    if isinstance(value, dict):
        return any(_holds_tensor(v) for v in value.values())
    return False


def divergence_layer(row: _Row, n_layers: int) -> int:
    """The first layer at which the row computes something the unmasked run does not."""
    return min(row.mask_layers | row.ablate | {n_layers})


class SlotLayer(PreallocatedLayer):
    """A cache layer whose rows are slots that come and go: dropped slots are compacted away in
    place, new slots are copies of kept ones appended at the end (the buffer grows when full)."""

    def __init__(self, keys: torch.Tensor, values: torch.Tensor, length: int):
        super().__init__(keys, values, length)
        self.rows = keys.shape[0]

    def _views(self) -> None:
        rows = getattr(self, "rows", self.buf_k.shape[0])
        self.keys, self.values = self.buf_k[:rows, :, : self.length], self.buf_v[:rows, :, : self.length]

    def rearrange(self, keep: list[int], copies: list[int]) -> None:
        """Keep old rows ``keep`` (ascending) in that order, then append copies of new rows ``copies``."""
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
        return 2 * self.keys.numel() * self.keys.element_size()


@dataclass
class _StepMaps:
    """Per layer: which previous-layer slot each slot continues, and one leaf of each slot."""

    parent: list[torch.Tensor]
    leaf: list[torch.Tensor]
    leaves: int


class TreeEngine(SweepEngine):
    """Decode every (prompt, intervention) row, sharing the states of rows of one query below
    their divergence layers. Same rows, same results as ``SweepEngine``."""

    def __init__(
        self,
        model,
        tokenizer,
        batch_size: int | None = None,
        max_batch_tokens: int = 32_000,
        kv_memory_fraction: float = 0.3,
        screen_head: bool | None = None,
        draft_tokens: int = 0,
    ):
        """``screen_head``: pick greedy tokens with ``ScreenedHead`` (True), with the model's own
        head (False), or the former where it is supported and checked on this model (None).
        ``draft_tokens``: verify drafts of up to this many tokens per step (0: none; see drafts.py)."""
        super().__init__(model, tokenizer, batch_size, max_batch_tokens, kv_memory_fraction)
        self.layers = decoder_layers(model)
        self._maps: _StepMaps | None = None
        self.stats.update(
            slot_tokens=[0] * self.n_layers,
            row_tokens=[0] * self.n_layers,
            splits=0,
            kv_bytes_peak=0,
            kv_bytes_unshared_peak=0,
            draft_tokens=0,
            draft_accepted=0,
        )
        self.drafter = Drafter(draft_tokens) if draft_tokens else None
        self.head, self.head_note = self._choose_head(screen_head)

    def _choose_head(self, screen_head: bool | None) -> tuple[ScreenedHead | None, str]:
        if screen_head is False:
            return None, "the model's own LM head (screening off)"
        why_not = ScreenedHead.supported(self.model)
        head = ScreenedHead(self.model) if why_not is None else None
        why_not = why_not or screen_mismatch(self.model, head)
        if why_not is None:
            return head, "bf16-screened LM head, candidates in full precision"
        if screen_head:
            raise ValueError(f"cannot screen the LM head of this model: {why_not}")
        return None, f"the model's own LM head ({why_not})"

    # ------------------------------------------------------------------ public

    @torch.no_grad()
    def generate(
        self,
        prompts: Sequence[MaskedPrompt],
        interventions: Sequence[RowIntervention],
        stop: StopRule,
        progress: Progress | None = None,
    ) -> dict[ResultKey, Generation]:
        with self._slot_hooks():
            return super().generate(prompts, interventions, stop, progress)

    # ------------------------------------------------------------------ planning

    def _chunks(self, rows: list[_Row], prefix_caches: _PrefixCaches, max_new_tokens: int):
        """Rows that continue a shared context cache: every row of a query in one batch (they share
        states), unless one query alone has more rows than a batch holds. Rows with a context cache
        of their own (head masks, the "instructions" condition) batch as in the sweep engine, by
        cache, so that only a few such caches are alive at a time; they share little anyway."""
        yield from super()._chunks([r for r in rows if r.prefix_key[1] is not None], prefix_caches, max_new_tokens)
        for plen, group in self._groups([r for r in rows if r.prefix_key[1] is None]):
            by_query: dict[int, list[_Row]] = {}
            for row in group:
                by_query.setdefault(row.item, []).append(row)
            size = self._rows_per_batch(plen, group, prefix_caches, max_new_tokens)
            batch: list[_Row] = []
            for query_rows in sorted(by_query.values(), key=lambda rs: len(rs[0].query_ids)):
                for start in range(0, len(query_rows), size):
                    part = query_rows[start : start + size]
                    if len(batch) + len(part) > size:
                        yield batch
                        batch = []
                    batch += part
            if batch:
                yield batch

    # ------------------------------------------------------------------ the hooks

    @contextmanager
    def _slot_hooks(self) -> Iterator[None]:
        handles = [
            layer.register_forward_pre_hook(self._pre_hook(idx), with_kwargs=True)
            for idx, layer in enumerate(self.layers)
        ]
        try:
            yield
        finally:
            for handle in handles:
                handle.remove()
            self._maps = None

    def _pre_hook(self, idx: int):
        names = list(inspect.signature(self.layers[idx].forward).parameters)

        def hook(module, args, kwargs):
            maps = self._maps
            if maps is None:
                return None
            if len(args) > len(names):
                raise RuntimeError(f"{type(module).__name__} got {len(args)} positional arguments")
            kwargs = dict(kwargs, **dict(zip(names[1:], args[1:])))
            hidden = args[0] if args else kwargs.pop(names[0])
            hidden = hidden.index_select(0, maps.parent[idx])
            leaf = maps.leaf[idx]
            return (hidden,), {name: self._slice(name, value, leaf, maps.leaves) for name, value in kwargs.items()}

        return hook

    @staticmethod
    def _slice(name: str, value, leaf: torch.Tensor, leaves: int):
        if isinstance(value, (tuple, list)) and (name in PER_ROW or name in PER_ROW_TIMES_HEADS):
            return type(value)(TreeEngine._slice(name, v, leaf, leaves) for v in value)
        if isinstance(value, dict) and (name in PER_ROW or name in PER_ROW_TIMES_HEADS):
            return {key: TreeEngine._slice(name, v, leaf, leaves) for key, v in value.items()}
        if name not in NOT_PER_ROW and _holds_tensor(value) and not isinstance(value, torch.Tensor):
            raise RuntimeError(
                f"the tree engine does not know whether the decoder layer argument {name!r} (a "
                f"{type(value).__name__} holding tensors) has one row per batch row; add it to "
                f"PER_ROW or NOT_PER_ROW in engines/tree.py"
            )
        if not isinstance(value, torch.Tensor) or name in NOT_PER_ROW or value.dim() == 0:
            return value
        if name in PER_ROW:
            return value if value.shape[0] == 1 else value.index_select(0, leaf)
        if name in PER_ROW_TIMES_HEADS:
            per_row = value.view(leaves, -1, *value.shape[1:]).index_select(0, leaf)
            return per_row.reshape(-1, *value.shape[1:])
        raise RuntimeError(
            f"the tree engine does not know whether the decoder layer argument {name!r} "
            f"has one row per batch row; add it to PER_ROW or NOT_PER_ROW in engines/tree.py"
        )

    # ------------------------------------------------------------------ decoding

    def _decode_chunk(self, chunk: list[_Row], prefix_caches, stop: StopRule) -> list[Generation]:
        return _TreeDecode(self, chunk, prefix_caches, stop).run()


class _TreeDecode:
    """The decoding of one batch: members (rows), history groups, and the slots of every layer."""

    def __init__(self, engine: TreeEngine, chunk: list[_Row], prefix_caches, stop: StopRule):
        self.engine, self.stop = engine, stop
        self.model, self.tokenizer, self.device = engine.model, engine.tokenizer, engine.device
        self.L = engine.n_layers
        items = list(dict.fromkeys(r.item for r in chunk))
        query_of = {item: n for n, item in enumerate(items)}
        self.members = [_Member(r, divergence_layer(r, self.L), query_of[r.item], query_of[r.item]) for r in chunk]
        self.groups = {q: _Group(q, [], gid=q) for q in range(len(items))}
        self.alive = list(range(len(self.members)))
        self.plen = len(chunk[0].prefix_key[0])
        queries = [next(r.query_ids for r in chunk if r.item == item) for item in items]
        self.qmax = max(len(q) for q in queries)
        self.pads = [self.qmax - len(q) for q in queries]
        pad_id = self.tokenizer.pad_token_id or 0
        # Rejected draft tokens leave holes in the cache (masked columns): room for up to as many
        # holes as tokens. Holes count in column-based sliding windows, so every column must fit
        # in the window (positions come from the mask and are right); no room for holes: no drafts.
        base = self.plen + self.qmax + stop.max_new_tokens
        window = attention_window(self.model)
        holes = stop.max_new_tokens if engine.drafter is not None else 0
        if window is not None:
            holes = min(holes, window - base)
        self.draft_ok = holes > 0
        self.capacity = base + max(0, holes)
        self.cache_started = False
        prefixes = [next(r.prefix_key[0] for r in chunk if r.item == item) for item in items]
        self.context = [list(prefix) + list(q) for prefix, q in zip(prefixes, queries)]
        # the prompt part of each query's row: [pad | prefix | query]; generated columns are all ones
        self.prompt_mask = torch.ones(len(items), self.plen + self.qmax, dtype=torch.long)
        self.inputs = torch.empty(len(items), self.qmax, dtype=torch.long)
        for q, (pad, prefix, query) in enumerate(zip(self.pads, prefixes, queries)):
            self.prompt_mask[q, :pad] = 0
            self.inputs[q] = torch.tensor(([pad_id] * pad + list(prefix) + list(query))[self.plen :])
        self.keys: list[list[Key]] = [self._needed(layer) for layer in range(self.L)]
        self.cache = self._initial_cache(prefix_caches)
        self.maps: _StepMaps | None = None  # rebuilt after the slots change
        self.masks: LayerColumnMasks | None = None
        self.leaf_of: list[int] = []

    # -------------------------------------------------------------- slots

    def _key(self, m: int, layer: int) -> Key:
        member = self.members[m]
        return ("own", m) if member.d <= layer else ("shared", member.group)

    def _needed(self, layer: int) -> list[Key]:
        return list(dict.fromkeys(self._key(m, layer) for m in self.alive))

    def _first_member(self, key: Key, layer: int) -> int:
        return key[1] if key[0] == "own" else next(m for m in self.alive if self._key(m, layer) == key)

    def _group_of(self, key: Key) -> int:
        return self.members[key[1]].group if key[0] == "own" else key[1]

    def _initial_cache(self, prefix_caches) -> DynamicCache:
        cache = DynamicCache()
        layers = []
        for layer, keys in enumerate(self.keys):
            rows = [self.members[self._first_member(k, layer)] for k in keys]
            kv = [prefix_caches.get(m.row)[layer] for m in rows]
            cached = [max(0, self.plen - self.pads[m.query]) for m in rows]
            layers.append(
                SlotLayer(
                    right_aligned([k for k, _ in kv], cached, self.plen, self.capacity),
                    right_aligned([v for _, v in kv], cached, self.plen, self.capacity),
                    self.plen,
                )
            )
        cache.layers = layers
        return cache

    def _restructure(self) -> None:
        """Bring every layer's slots in line with the alive members and their groups."""
        for layer in range(self.L):
            old = {key: i for i, key in enumerate(self.keys[layer])}
            kept: dict[int, Key] = {}
            fresh: list[Key] = []
            for key in self._needed(layer):
                if key in old:
                    kept[old[key]] = key
                else:
                    fresh.append(key)
            copies: list[tuple[Key, int]] = []
            for key in fresh:
                if key[0] != "shared" or self.groups[key[1]].parent is None:
                    raise RuntimeError(f"slot {key} at layer {layer} has no source")
                source = old[("shared", self.groups[key[1]].parent)]
                if source in kept:
                    copies.append((key, source))
                else:  # the old group no longer needs its slot here: the new group takes it over
                    kept[source] = key
            order = sorted(kept)
            position = {old_index: new for new, old_index in enumerate(order)}
            new_keys = [kept[i] for i in order] + [key for key, _ in copies]
            if new_keys != self.keys[layer]:
                self.cache.layers[layer].rearrange(order, [position[s] for _, s in copies])
                self.keys[layer] = new_keys

    def _maps(self) -> tuple[_StepMaps, list[int]]:
        """Index tensors for the hooks, and each alive member's leaf (slot of the last layer)."""
        slot_of = [{} for _ in range(self.L)]
        for layer, keys in enumerate(self.keys):
            index = {key: i for i, key in enumerate(keys)}
            for m in self.alive:
                slot_of[layer][m] = index[self._key(m, layer)]
        representative = [{} for _ in range(self.L)]
        for layer in range(self.L):
            for m in self.alive:
                representative[layer].setdefault(slot_of[layer][m], m)
        parents, leaves = [], []
        for layer in range(self.L):
            reps = [representative[layer][s] for s in range(len(self.keys[layer]))]
            leaf = [slot_of[-1][m] for m in reps]
            parent = leaf if layer == 0 else [slot_of[layer - 1][m] for m in reps]
            parents.append(torch.tensor(parent, device=self.device))
            leaves.append(torch.tensor(leaf, device=self.device))
        return _StepMaps(parents, leaves, len(self.keys[-1])), [slot_of[-1][m] for m in self.alive]

    def _column_masks(self) -> LayerColumnMasks:
        by_layer = {}
        for layer, keys in enumerate(self.keys):
            hidden, layers, heads = [], [], []
            for key in keys:
                member = self.members[key[1]] if key[0] == "own" else None
                row = member.row if member is not None else None
                if row is not None and layer in row.mask_layers and (row.prefix_hidden or row.query_hidden):
                    pad = self.pads[member.query]
                    hidden.append(
                        [(pad + a, pad + b) for a, b in row.prefix_hidden]
                        + [(pad + self.plen + a, pad + self.plen + b) for a, b in row.query_hidden]
                    )
                    layers.append(frozenset({layer}))
                    heads.append({layer: row.mask_heads[layer]} if row.mask_heads else None)
                else:
                    hidden.append([])
                    layers.append(frozenset())
                    heads.append(None)
            by_layer[layer] = ColumnMask(hidden, layers, heads)
        return LayerColumnMasks(by_layer)

    # -------------------------------------------------------------- the loop

    def run(self) -> list[Generation]:
        step = 0
        while self.alive:
            drafts = self._drafts() if step else {}
            if not self.advance(self.forward(step, drafts), drafts):
                break
            step += 1
        return [
            Generation(
                token_ids=m.tokens,
                text=self.tokenizer.decode(m.tokens, skip_special_tokens=True),
                finish=m.finish or "length",
            )
            for m in self.members
        ]

    def forward(self, step: int, drafts: dict[int, list[int]] | None = None) -> dict[int, list[int]]:
        """One forward over the leaves: step 0 is the queries' prefill; later steps feed each group's
        last token and its draft (padded to the longest). Each alive member's greedy tokens at the
        fed positions (one at step 0)."""
        drafts = drafts or {}
        if self.maps is None:
            self.masks, (self.maps, self.leaf_of) = self._column_masks(), self._maps()
        groups = [self.groups[self._group_of(key)] for key in self.keys[-1]]
        if step == 0:
            step_input = self.inputs[[g.query for g in groups]]
            mask = self.prompt_mask[[g.query for g in groups]]
        else:
            width = 1 + max((len(d) for d in drafts.values()), default=0)
            fed = [[g.history[-1]] + drafts.get(g.gid, []) for g in groups]
            step_input = torch.tensor([f + [f[-1]] * (width - len(f)) for f in fed])  # padding: never accepted
            mask = torch.cat(
                [
                    self.prompt_mask[[g.query for g in groups]],
                    torch.tensor([g.columns for g in groups], dtype=torch.long).view(len(groups), -1),
                    torch.ones(len(groups), width, dtype=torch.long),
                ],
                1,
            )
        width = 1 if step == 0 else step_input.shape[1]
        self._count(self.engine.stats, step_input.shape[1], width)
        ablation = self.members[0].row.ablate  # one per batch
        interventions = [self.masks] + ([AttentionAblation(ablation)] if ablation else [])
        started = time.perf_counter()
        self.engine._maps = self.maps
        head = self.engine.head
        ids, mask = step_input.to(self.device), mask.to(self.device)
        try:
            if head is None:
                logits = forward(
                    self.model, ids, attention_mask=mask, cache=self.cache, interventions=interventions, keep_last=width
                ).logits[:, -width:]
                tokens = logits.argmax(-1).tolist()
            else:  # the head hook does not see the screen: time it here
                hidden = last_hidden(
                    self.model, ids, attention_mask=mask, cache=self.cache, interventions=interventions, positions=width
                )
                head_started = time.perf_counter()
                tokens = head.argmax(hidden.reshape(-1, hidden.shape[-1])).view(len(groups), width).tolist()
                self.engine.times["head"] += time.perf_counter() - head_started
        finally:
            self.engine._maps = None
        part = "query_prefill" if step == 0 else "verification" if drafts else "decode_forward"
        self.engine.times[part] += time.perf_counter() - started
        return {m: tokens[leaf] for m, leaf in zip(self.alive, self.leaf_of)}

    def advance(self, predicted: dict[int, list[int]], drafts: dict[int, list[int]] | None = None) -> bool:
        """Take the tokens, then bring the slots in line; False when no row is left."""
        if self._take(predicted, drafts or {}) and self.alive:
            self._restructure()
            self.maps = None
        self._track_memory(self.engine.stats)
        return bool(self.alive)

    # -------------------------------------------------------------- drafts

    def _drafts(self) -> dict[int, list[int]]:
        """A draft per alive group that has room for one (see ``Drafter``), within the cache."""
        drafter = self.engine.drafter
        if drafter is None or not self.draft_ok:
            return {}
        alive_groups = {self.members[m].group for m in self.alive}
        # keep room for the longest remaining generation without drafts after this step
        shortest = min(len(self.groups[g].history) for g in alive_groups)
        room = self.capacity - self.cache.get_seq_length() - self.stop.max_new_tokens + shortest
        if room <= 0:
            return {}
        out = {}
        for g in alive_groups:
            group = self.groups[g]
            left = self.stop.max_new_tokens - len(group.history)
            siblings = [self.groups[o].history for o in alive_groups if o != g and self.groups[o].query == group.query]
            limit = min(room, left - 1)
            draft = drafter.propose(group, self.context[group.query], siblings, limit)[: max(0, limit)]
            if draft:
                out[g] = draft
        return out

    def _count(self, stats: dict, width: int, scored: int) -> None:
        stats["steps"] += 1
        stats["tokens_forwarded"] += len(self.keys[-1]) * width
        stats["logit_rows"] += len(self.keys[-1]) * scored
        for layer, keys in enumerate(self.keys):
            stats["slot_tokens"][layer] += len(keys) * width
            stats["row_tokens"][layer] += len(self.alive) * width

    def _track_memory(self, stats: dict) -> None:
        used = sum(layer.used_bytes() for layer in self.cache.layers)
        per_row = sum(layer.used_bytes() // max(1, layer.rows) for layer in self.cache.layers)
        stats["kv_bytes_peak"] = max(stats["kv_bytes_peak"], used)
        stats["kv_bytes_unshared_peak"] = max(stats["kv_bytes_unshared_peak"], per_row * len(self.alive))

    def _take(self, predicted: dict[int, list[int]], drafts: dict[int, list[int]]) -> bool:
        """Give each alive member the tokens it produced: its first prediction, then, while the
        prediction equals the draft token fed next, the prediction after it (exactly what one-by-one
        greedy decoding would produce). Members of a group that produced different sequences split
        it; the stop rule is applied token by token (tokens after a stop are dropped). Fed columns
        beyond a group's accepted tokens become holes its mask hides. True if the slots must change."""
        changed = False
        width = len(predicted[self.alive[0]])  # columns fed this step (all groups alike)
        by_group: dict[int, list[int]] = {}
        for m in self.alive:
            by_group.setdefault(self.members[m].group, []).append(m)
        for g in by_group:
            self.groups[g].parent = None
        finished: set[int] = set()
        stats = self.engine.stats
        for g, ms in by_group.items():
            draft = drafts.get(g, [])
            by_output: dict[tuple[int, ...], list[int]] = {}
            for m in ms:
                out = [predicted[m][0]]
                while len(out) <= len(draft) and out[-1] == draft[len(out) - 1]:
                    out.append(predicted[m][len(out)])
                by_output.setdefault(tuple(out), []).append(m)
                stats["draft_tokens"] += len(draft)
                stats["draft_accepted"] += len(out) - 1
            if draft:
                self.engine.drafter.feedback(self.groups[g], max(len(out) for out in by_output) - 1)
            # the part with the deepest divergence layer keeps the group (and its shared slots)
            parts = sorted(by_output.items(), key=lambda kv: -max(self.members[m].d for m in kv[1]))
            history, columns = list(self.groups[g].history), list(self.groups[g].columns)
            for n, (out, part) in enumerate(parts):
                if n == 0:
                    gid = g
                else:
                    gid = max(self.groups) + 1
                    self.groups[gid] = _Group(
                        self.groups[g].query,
                        list(history),
                        parent=g,
                        gid=gid,
                        columns=list(columns),
                        fails=self.groups[g].fails,
                        pause=self.groups[g].pause,
                    )
                    stats["splits"] += 1
                    changed = True
                    for m in part:
                        self.members[m].group = gid
                group = self.groups[gid]
                if self.cache_started:
                    group.columns += [1] * len(out) + [0] * (width - len(out))
                for token in out:
                    reason = self.stop.after(self.tokenizer, self.engine.eos, group.history, token)
                    if reason is not None:
                        changed = True
                        for m in part:
                            self.members[m].finish = reason
                            self.members[m].tokens = list(group.history)
                            finished.add(m)
                        break
        self.cache_started = True
        if finished:
            self.alive = [m for m in self.alive if m not in finished]
        for m in self.alive:
            self.members[m].tokens = self.groups[self.members[m].group].history
        return changed
