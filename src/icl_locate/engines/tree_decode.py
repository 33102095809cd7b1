"""The decoding of one tree-engine batch: its rows (members), history groups, and the slots of every layer.

Layer l holds one slot per history group for the group's rows that have not diverged below l (the
shared slot) and one slot per row that has (its own slot); ``tree.py`` describes why that is exact.
Each step, the model's forward runs over the leaves (the slots of the last layer) while the engine's
hooks follow ``SlotRoutes``: at layer l, which slot of layer l - 1 each slot continues, and one leaf
of each slot for the per-row arguments. After a step the groups split where their rows picked
different tokens, finished rows leave, and every layer's slots are brought in line (``SlotLayer``).
"""

from __future__ import annotations

import time
from contextlib import AbstractContextManager
from dataclasses import dataclass, field, replace
from typing import Any, Protocol

import torch
from torch import nn
from transformers import DynamicCache

from ..core.attention import serves_narrow_rows
from ..core.interventions import AttentionAblation, ColumnMask, LayerColumnMasks
from ..core.narrow_attention import NarrowRows
from ..core.structure import attention_window
from .base import Generation, StopRule, forward, last_hidden
from .decoding import SlotLayer
from .drafts import Drafter, accepted_tokens
from .head import CertifiedHead
from .rows import BatchLayout, PrefixCaches, Row, divergence_layer
from .slot_order import class_order

Key = tuple  # ("shared", group) or ("own", member)


@dataclass
class _Member:
    """One row of the batch as it decodes."""

    row: Row
    d: int  # divergence layer
    query: int
    group: int
    tokens: list[int] = field(default_factory=list)
    finish: str | None = None


@dataclass
class _Group:
    """Rows of one query with the same tokens so far: their shared slots hold the same states."""

    query: int
    history: list[int]
    parent: int | None = None  # the group it split from at the last step (its shared slots are copied)
    gid: int = 0
    columns: list[int] = field(default_factory=list)  # generated columns: 1 = a token, 0 = a rejected draft's hole
    fails: int = 0  # drafts missed in a row
    pause: int = 0  # steps left without drafts


def slot_room(device: torch.device, members: int) -> int | None:
    """The slots a layer's buffer holds room for from the start: every member's (a layer never needs
    more: each takes one, shared or its own) on a CPU, where memory pages are taken when first written,
    so room is virtual until slots fill it and no slot to come copies a layer into a larger buffer;
    None (no room) on a GPU, whose allocator takes what it is asked for: there the buffers grow."""
    return members if device.type == "cpu" else None


@dataclass
class SlotRoutes:
    """Per layer: which previous-layer slot each slot continues, and one leaf of each slot."""

    parent: list[torch.Tensor]  # per layer l: [slots at l], indices into the slots at l - 1 (at 0: leaves)
    leaf: list[torch.Tensor]  # per layer l: [slots at l], one leaf each (its per-row arguments)
    leaves: int  # slots of the last layer: the forward's batch


class TreeHost(Protocol):
    """What a ``TreeDecode`` needs of its engine (``TreeEngine``): the model, the choices, the counters,
    and hooks that follow ``routes`` during a forward."""

    model: nn.Module
    tokenizer: Any
    device: torch.device
    n_layers: int
    eos: set[int]
    head: CertifiedHead | None
    drafter: Drafter | None
    stats: dict
    times: dict[str, float]

    def routing(self, routes: SlotRoutes) -> AbstractContextManager[None]: ...


class TreeDecode:
    """The decoding of one batch: members (rows), history groups, and the slots of every layer."""

    def __init__(self, engine: TreeHost, chunk: list[Row], prefix_caches: PrefixCaches, stop: StopRule):
        self.engine, self.stop = engine, stop
        self.model, self.tokenizer, self.device = engine.model, engine.tokenizer, engine.device
        self.L = engine.n_layers
        items = list(dict.fromkeys(r.item for r in chunk))
        query_of = {item: n for n, item in enumerate(items)}
        self.members = [_Member(r, divergence_layer(r, self.L), query_of[r.item], query_of[r.item]) for r in chunk]
        self.groups = {q: _Group(q, [], gid=q) for q in range(len(items))}
        self.alive = list(range(len(self.members)))
        firsts = [next(r for r in chunk if r.item == item) for item in items]  # one row per query
        # each query's prompt columns: [pad | prefix | query]; generated columns follow
        pad_id = self.tokenizer.pad_token_id or 0
        self.layout = BatchLayout.of([r.prefix_key[0] for r in firsts], [r.query_ids for r in firsts], pad_id)
        self.context = [list(r.prefix_key[0]) + list(r.query_ids) for r in firsts]
        # Rejected draft tokens leave holes in the cache (masked columns): room for up to as many
        # holes as tokens. Holes count in column-based sliding windows, so every column must fit
        # in the window (positions come from the mask and are right); no room for holes: no drafts.
        base = self.layout.width + stop.max_new_tokens
        window = attention_window(self.model)
        holes = stop.max_new_tokens if engine.drafter is not None else 0
        if window is not None:
            holes = min(holes, window - base)
        self.draft_ok = holes > 0
        self.capacity = base + max(0, holes)
        self.cache_started = False
        # the narrow window: the columns from one before the earliest query on (core.narrow_attention)
        self.narrow_start = self.layout.prefix_len - 1
        self.moved = [self._moved_column(m) for m in range(len(self.members))]
        self.sparse = serves_narrow_rows(self.model)
        self.keys: list[list[Key]] = [self._needed(layer) for layer in range(self.L)]
        self.cache = self._initial_cache(prefix_caches)
        self.routes: SlotRoutes | None = None  # rebuilt after the slots change
        self.masks: LayerColumnMasks | None = None
        self.leaf_of: list[int] = []

    # -------------------------------------------------------------- slots

    def slot_key(self, m: int, layer: int) -> Key:
        """The slot member ``m`` reads and writes at ``layer``: its own once it has diverged, else its group's."""
        member = self.members[m]
        return ("own", m) if member.d <= layer else ("shared", member.group)

    def _needed(self, layer: int) -> list[Key]:
        keys = dict.fromkeys(self.slot_key(m, layer) for m in self.alive)
        return sorted(keys, key=lambda key: self._slot_class(key, layer))  # stable: member order within a class

    def _slot_class(self, key: Key, layer: int) -> int:
        """0: an own slot that attends over the narrow window at ``layer``; 1: another own slot; 2: shared."""
        if key[0] == "shared":
            return 2
        return 0 if self._narrow(key[1], layer) else 1

    def _moved_column(self, m: int) -> int | None:
        """The one prefix column member ``m`` sees where it masks, as a batch column (-1: none), if the
        narrow window can serve it: every other prefix column hidden from every head; a seen column before
        the window's first has its keys/values copied there (it is in the cached part). None otherwise."""
        member = self.members[m]
        row, plan = member.row, member.row.plan
        if self.narrow_start < 1 or not plan.mask_layers or plan.others_only or plan.mask_heads:
            return None
        pad, length = self.layout.pads[member.query], self.layout.prefix_lens[member.query]
        seen = set(range(pad, pad + length))
        for a, b in self.layout.hidden(member.query, row):
            seen -= set(range(a, b))
        if len(seen) > 1:
            return None
        column = min(seen, default=-1)
        return column if column <= self.narrow_start else -1  # past the window's first: fed, nothing to move

    def _moved_columns(self, layer: int) -> tuple[int, ...]:
        """The moved column (``_moved_column``) of each narrow slot at ``layer``, in slot order: they come first."""
        members = [key[1] for key in self.keys[layer] if not self._slot_class(key, layer)]
        return tuple(c for c in (self.moved[m] for m in members) if c is not None)  # not None: they are narrow

    def _narrow(self, m: int, layer: int) -> bool:
        """Member ``m``'s own slot at ``layer`` attends over the narrow window (where it has one)."""
        return self.moved[m] is not None and layer in self.members[m].row.plan.mask_layers

    def _first_member(self, key: Key, layer: int) -> int:
        return key[1] if key[0] == "own" else next(m for m in self.alive if self.slot_key(m, layer) == key)

    def _group_of(self, key: Key) -> int:
        return self.members[key[1]].group if key[0] == "own" else key[1]

    def _initial_cache(self, prefix_caches: PrefixCaches) -> DynamicCache:
        """Every layer's slots, each holding its first member's prefix cache as that member's query places it,
        in a buffer with room for more slots where ``slot_room`` gives it."""
        cache = DynamicCache()
        layers = []
        room = slot_room(self.device, len(self.members))
        for layer, keys in enumerate(self.keys):
            rows = [self.members[self._first_member(k, layer)] for k in keys]
            kv = [prefix_caches.get(m.row)[layer] for m in rows]
            slots = max(room, len(kv)) if room is not None else len(kv)
            moved = self._moved_columns(layer)
            # where the attention serves the window, a narrow slot's other prefix columns stay unwritten
            only = (list(moved) + [None] * (len(keys) - len(moved))) if self.sparse else None
            cache_layer = self.layout.cache_layer(kv, [m.query for m in rows], self.capacity, slots, only)
            start = self.narrow_start
            for slot, column in enumerate(moved):  # the window's first column, which the row hides, is read:
                # the one seen column's keys/values there, or zeros (never NaN)
                cache_layer.buf_k[slot, :, start] = cache_layer.buf_k[slot, :, column] if column >= 0 else 0.0
                cache_layer.buf_v[slot, :, start] = cache_layer.buf_v[slot, :, column] if column >= 0 else 0.0
            layers.append(cache_layer)
        cache.layers = layers
        return cache

    @property
    def slot_layers(self) -> list[SlotLayer]:
        """The cache's layers, SlotLayers all (``_initial_cache``)."""
        return self.cache.layers  # pyright: ignore[reportReturnType]

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
            order = class_order(self.keys[layer], kept, lambda key, at=layer: self._slot_class(key, at))
            position = {old_index: new for new, old_index in enumerate(order)}
            new_keys = [kept[i] for i in order] + [key for key, _ in copies]
            if new_keys != self.keys[layer]:
                self.slot_layers[layer].rearrange(order, [position[s] for _, s in copies])
                self.keys[layer] = new_keys

    def _build_routes(self) -> tuple[SlotRoutes, list[int]]:
        """Index tensors for the hooks, and each alive member's leaf (slot of the last layer)."""
        index = [{key: i for i, key in enumerate(keys)} for keys in self.keys]
        slot_of = [{m: index[layer][self.slot_key(m, layer)] for m in self.alive} for layer in range(self.L)]
        parents, leaves = [], []
        for layer in range(self.L):
            representative = {}  # slot -> its first alive member
            for m in self.alive:
                representative.setdefault(slot_of[layer][m], m)
            reps = [representative[s] for s in range(len(self.keys[layer]))]
            leaf = [slot_of[-1][m] for m in reps]
            parent = leaf if layer == 0 else [slot_of[layer - 1][m] for m in reps]
            parents.append(torch.tensor(parent, device=self.device))
            leaves.append(torch.tensor(leaf, device=self.device))
        return SlotRoutes(parents, leaves, len(self.keys[-1])), [slot_of[-1][m] for m in self.alive]

    def _column_masks(self) -> LayerColumnMasks:
        """Per layer, one mask row per slot: an own slot hides its row's columns where the row masks them."""
        by_layer, narrow = {}, {}
        for layer, keys in enumerate(self.keys):
            hidden, layers, heads, others_only = (
                list(part) for part in zip(*(self._slot_mask(k, layer) for k in keys))
            )
            by_layer[layer] = ColumnMask(hidden, layers, heads, others_only)
            moved = self._moved_columns(layer)
            narrow[layer] = NarrowRows(len(moved), self.narrow_start, moved)
        return LayerColumnMasks(by_layer, narrow)

    def _slot_mask(self, key: Key, layer: int) -> tuple[list, frozenset, dict | None, bool]:
        """One slot's part of ``ColumnMask`` at ``layer``: an own slot whose row masks there hides its row's
        columns (from the heads its plan names, or from all); a shared slot, or a row not masking there, none."""
        row = self.members[key[1]].row if key[0] == "own" else None
        if row is None or layer not in row.plan.mask_layers or not (row.prefix_hidden or row.query_hidden):
            return [], frozenset(), None, False
        heads = {layer: row.plan.mask_heads[layer]} if row.plan.mask_heads else None
        return self.layout.hidden(self.members[key[1]].query, row), frozenset({layer}), heads, row.plan.others_only

    def _slot_patches(self) -> list:
        """Each member's patches on its own slot: a patch at layer l writes into the input of layer l,
        where the member's own slot begins (its divergence layer), at its query's columns."""
        out = []
        for m, member in enumerate(self.members):
            for patch in member.row.plan.patches:
                slot = self.keys[patch.layer].index(("own", m))
                out.append(replace(patch, row=slot, position=self.layout.pads[member.query] + patch.position))
        return out

    # -------------------------------------------------------------- the loop

    def run(self) -> list[Generation]:
        step = 0
        while self.alive:
            drafts = self.drafts() if step else {}
            if not self.advance(self.forward(step, drafts), drafts):
                break
            step += 1
        text = [self.tokenizer.decode(m.tokens, skip_special_tokens=True) for m in self.members]
        return [Generation(m.tokens, t, m.finish or "length") for m, t in zip(self.members, text, strict=True)]

    def forward(self, step: int, drafts: dict[int, list[int]] | None = None) -> dict[int, list[int]]:
        """One forward over the leaves: step 0 is the queries' prefill; later steps feed each group's
        last token and its draft (padded to the longest). Each alive member's greedy tokens at the
        fed positions (one at step 0)."""
        drafts = drafts or {}
        if self.routes is None:
            self.masks, (self.routes, self.leaf_of) = self._column_masks(), self._build_routes()
        groups = [self.groups[self._group_of(key)] for key in self.keys[-1]]
        step_input, mask = self._fed(step, drafts, groups)
        width = 1 if step == 0 else step_input.shape[1]
        self._count(self.engine.stats, step_input.shape[1], width)
        ablation = self.members[0].row.plan.ablate  # one per batch
        interventions = [self.masks] + ([AttentionAblation(ablation)] if ablation else [])
        if step == 0:  # the queries' prefill processes every patched column
            interventions += self._slot_patches()
        started = time.perf_counter()
        with self.engine.routing(self.routes):
            tokens = self._greedy(step_input.to(self.device), mask.to(self.device), interventions, width)
        part = "query_prefill" if step == 0 else "verification" if drafts else "decode_forward"
        self.engine.times[part] += time.perf_counter() - started
        return {m: tokens[leaf] for m, leaf in zip(self.alive, self.leaf_of, strict=True)}

    def _fed(self, step: int, drafts: dict[int, list[int]], groups: list[_Group]) -> tuple[torch.Tensor, torch.Tensor]:
        """(input ids [leaves, fed], 2D mask [leaves, columns so far + fed]) of one step: the queries at
        step 0, then each leaf's group's last token and its draft."""
        queries = [g.query for g in groups]
        if step == 0:
            return self.layout.inputs[queries], self.layout.mask[queries]
        width = 1 + max((len(d) for d in drafts.values()), default=0)
        fed = [[g.history[-1]] + drafts.get(g.gid, []) for g in groups]
        step_input = torch.tensor([f + [f[-1]] * (width - len(f)) for f in fed])  # padding: never accepted
        generated = torch.tensor([g.columns for g in groups], dtype=torch.long).view(len(groups), -1)
        mask = torch.cat([self.layout.mask[queries], generated, torch.ones(len(groups), width, dtype=torch.long)], 1)
        return step_input, mask

    def _greedy(self, ids: torch.Tensor, mask: torch.Tensor, interventions: list, width: int) -> list[list[int]]:
        """Per leaf, the greedy tokens at the last ``width`` positions, by the model's head or the screen."""
        head = self.engine.head
        if head is None:
            logits = forward(
                self.model, ids, attention_mask=mask, cache=self.cache, interventions=interventions, keep_last=width
            ).logits[:, -width:]  # [leaves, width, vocab]
            return logits.argmax(-1).tolist()
        # the head hook does not see the screen: time it here
        hidden = last_hidden(
            self.model, ids, attention_mask=mask, cache=self.cache, interventions=interventions, positions=width
        )  # [leaves, width, d]
        head_started = time.perf_counter()
        tokens = head.argmax(hidden.reshape(-1, hidden.shape[-1])).view(ids.shape[0], width).tolist()
        self.engine.times["head"] += time.perf_counter() - head_started
        return tokens

    def advance(self, predicted: dict[int, list[int]], drafts: dict[int, list[int]] | None = None) -> bool:
        """Take the tokens, then bring the slots in line; False when no row is left."""
        if self._take(predicted, drafts or {}) and self.alive:
            self._restructure()
            self.routes = None
        self._track_memory(self.engine.stats)
        return bool(self.alive)

    # -------------------------------------------------------------- drafts

    def drafts(self) -> dict[int, list[int]]:
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
        used = sum(layer.used_bytes() for layer in self.slot_layers)
        per_row = sum(layer.used_bytes() // max(1, layer.rows) for layer in self.slot_layers)
        stats["kv_bytes_peak"] = max(stats["kv_bytes_peak"], used)
        stats["kv_bytes_unshared_peak"] = max(stats["kv_bytes_unshared_peak"], per_row * len(self.alive))

    def _take(self, predicted: dict[int, list[int]], drafts: dict[int, list[int]]) -> bool:
        """Give each alive member the tokens it produced (``drafts.accepted_tokens``). Members of a group that
        produced different sequences split it; the stop rule is applied token by token (tokens after a stop are
        dropped). Fed columns beyond a group's accepted tokens become holes its mask hides. True if the slots
        must change."""
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
                out = accepted_tokens(predicted[m], draft)
                by_output.setdefault(tuple(out), []).append(m)
                stats["draft_tokens"] += len(draft)
                stats["draft_accepted"] += len(out) - 1
            if draft:
                assert self.engine.drafter is not None  # drafts come from it
                self.engine.drafter.feedback(self.groups[g], max(len(out) for out in by_output) - 1)
            # the part with the deepest divergence layer keeps the group (and its shared slots)
            parts = sorted(by_output.items(), key=lambda kv: -max(self.members[m].d for m in kv[1]))
            history, columns = list(self.groups[g].history), list(self.groups[g].columns)
            for n, (out, part) in enumerate(parts):
                if n == 0:
                    gid = g
                else:
                    gid = max(self.groups) + 1  # the query, draft failures and pause carry over
                    self.groups[gid] = replace(
                        self.groups[g], history=list(history), parent=g, gid=gid, columns=list(columns)
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
        self.alive = [m for m in self.alive if m not in finished]
        for m in self.alive:
            self.members[m].tokens = self.groups[self.members[m].group].history
        return changed
