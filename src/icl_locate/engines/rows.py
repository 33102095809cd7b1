"""What the engines share about rows: one row intervention's plan on a prompt, the rows of a request,
their shared prefix caches, and the layout of a batch of rows with left padding.

A row intervention means, on one prompt, the layers at which the prompt's hidden columns are masked
(from some query heads or from all) and the layers whose attention is ablated (``row_plan``); a mask
row must have the window of the prompt's condition (``MaskBelow`` for a "-below" condition, the
others for the rest), so that a row never carries out a condition other than the one asked for. The
reference engine turns that plan into batch interventions; the fast and tree engines decode many
rows at once, each row = a prefix (BOS + context, whose KV cache is computed once and shared; for
rows that only patch, the prompt up to the patched token) + the rest (the query), laid out as
``[left padding | prefix | query]`` (``BatchLayout``).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import torch

from ..core.conditions import MaskedPrompt, Range
from ..core.interventions import (
    AblateLayers,
    HeadMask,
    HeadSets,
    MaskBelow,
    MaskFrom,
    PatchLastPosition,
    PruneFrom,
    RowIntervention,
    Unchanged,
)
from ..core.patches import Patch
from .decoding import PreallocatedLayer, SlotLayer, right_aligned

NO_LAYERS: frozenset[int] = frozenset()

# --------------------------------------------------------------------------- one row's plan


@dataclass(frozen=True)
class RowPlan:
    """What a row intervention does to one prompt."""

    mask_layers: frozenset[int]  # layers where the row hides the prompt's hidden columns (empty: no mask)
    mask_heads: HeadSets | None  # per masked layer, the query heads that hide them (None: all heads)
    ablate: frozenset[int]  # layers whose attention sublayer is removed
    others_only: bool = False  # converse window: the hidden positions themselves still attend as usual
    patches: tuple[Patch, ...] = ()  # at the prompt's own columns (engines move them to their batch columns)


def row_plan(prompt: MaskedPrompt, row: RowIntervention, n_layers: int, item: int = 0) -> RowPlan:
    """The plan of ``row`` on ``prompt`` (prompt number ``item`` of the request), by the paper's definitions.

    ``PruneFrom(r)`` is, by definition, the hidden range masked from layer r: nothing at layers >= r
    reads it (the pruned engine is tested equal to this). ``MaskBelow(j)`` masks layers 0..j-1.
    """
    check_window(prompt, row)
    if isinstance(row, (MaskFrom, PruneFrom, MaskBelow)):
        if not 0 <= row.layer <= n_layers:
            raise ValueError(f"layer {row.layer} outside 0..{n_layers}")
        below = isinstance(row, MaskBelow)
        layers = range(0, row.layer) if below else range(row.layer, n_layers)
        return RowPlan(frozenset(layers) if prompt.hidden else NO_LAYERS, None, NO_LAYERS, others_only=below)
    if isinstance(row, HeadMask):
        heads = row.by_layer()
        if any(not 0 <= layer < n_layers for layer in heads):
            raise ValueError(f"head mask layers {sorted(heads)} outside 0..{n_layers - 1}")
        if not prompt.hidden:
            return RowPlan(NO_LAYERS, None, NO_LAYERS)
        return RowPlan(frozenset(heads), heads, NO_LAYERS)
    if isinstance(row, AblateLayers):
        return RowPlan(NO_LAYERS, None, row.layers)
    if isinstance(row, Unchanged):
        return RowPlan(NO_LAYERS, None, NO_LAYERS)
    if isinstance(row, PatchLastPosition):
        if not 0 <= row.layer < n_layers:
            raise ValueError(f"patch layer {row.layer} outside 0..{n_layers - 1}")
        return RowPlan(NO_LAYERS, None, NO_LAYERS, patches=row.patches(item, len(prompt.ids)))
    raise TypeError(f"not a row intervention: {row!r}")


def check_window(prompt: MaskedPrompt, row: RowIntervention) -> None:
    """Refuse a mask row whose window is not the one of the prompt's condition: ``MaskBelow`` carries out
    the "-below" conditions, ``MaskFrom``/``PruneFrom``/``HeadMask`` the others."""
    if not isinstance(row, (MaskFrom, PruneFrom, HeadMask, MaskBelow)) or prompt.condition is None:
        return
    name = prompt.condition.name
    if isinstance(row, MaskBelow) and prompt.window != "below":
        raise ValueError(f"MaskBelow rows mask below a layer; condition {name!r} masks from a layer on")
    if not isinstance(row, MaskBelow) and prompt.window != "from":
        raise ValueError(
            f"{type(row).__name__} rows mask from a layer on; condition {name!r} masks below a layer "
            "(use MaskBelow rows: interventions.mask_row)"
        )


def upward_closed(layers: frozenset[int], n_layers: int) -> bool:
    """Whether ``layers`` is every layer from its lowest up (a layer-from mask), or empty."""
    return not layers or layers == frozenset(range(min(layers), n_layers))


# --------------------------------------------------------------------------- the rows of a request


@dataclass
class Row:
    """One (prompt, intervention) row of a batched engine: the prompt cut into a shared prefix and the query."""

    item: int
    intervention: RowIntervention
    prefix_key: tuple  # which prefix cache this row continues: (prefix ids, intervention or None)
    query_ids: list[int]
    query_hidden: list[Range]  # hidden ranges inside the query, relative to the query start
    prefix_hidden: list[Range]  # hidden ranges inside the prefix
    plan: RowPlan  # what the intervention does on this row's prompt


def divergence_layer(row: Row, n_layers: int) -> int:
    """The first layer at which the row computes something the unmasked run does not (a patch at the
    input of layer l: from l on)."""
    return min(row.plan.mask_layers | row.plan.ablate | {p.layer for p in row.plan.patches} | {n_layers})


def needs_own_prefix_cache(
    prefix_hidden: Sequence[Range], prefix_len: int, mask_layers: frozenset[int], n_layers: int
) -> bool:
    """Whether the unmasked prefix cache would be wrong for a row hiding ``prefix_hidden`` of its prefix
    at ``mask_layers``.

    It is exact under a layer-from mask (upward-closed layers): the hidden columns' keys/values are
    never read at the masked layers and the states below them are unmasked, as long as no visible
    prefix token comes after a hidden one (its states would depend on the mask). Under any other mask
    (``MaskBelow``) some hidden columns' keys/values are read at a layer above a masked one.
    """
    if not prefix_hidden:
        return False
    if not upward_closed(mask_layers, n_layers):
        return True
    first_hidden = min(a for a, _ in prefix_hidden)
    hidden = {i for a, b in prefix_hidden for i in range(a, b)}
    return any(i not in hidden for i in range(first_hidden, prefix_len))


def plan_rows(prompts: Sequence[MaskedPrompt], interventions: Sequence[RowIntervention], n_layers: int) -> list[Row]:
    """Every (prompt, intervention) row, prompt by prompt; rows share a prefix cache where they can."""
    rows = []
    for i, prompt in enumerate(prompts):
        plans = [row_plan(prompt, v, n_layers, i) for v in interventions]
        start = max(1, prompt.query_start(), _unchanged_before(plans))  # a prompt without BOS or context: share 1 token
        prefix, query = tuple(prompt.ids[:start]), list(prompt.ids[start:])
        for v, plan in zip(interventions, plans, strict=True):
            ranges = prompt.hidden if plan.mask_layers else ()
            p_hidden = [(a, min(b, start)) for a, b in ranges if a < start]
            q_hidden = [(max(a, start) - start, b - start) for a, b in ranges if b > start]
            if plan.others_only and q_hidden:  # the engines take a forward's queries as never hidden there
                raise ValueError("a converse window hides context columns only, not the query's")
            # A head mask lets other heads read the hidden columns, whose own states it changed:
            # such a row's context is computed under its own intervention.
            own = (
                bool(plan.ablate)
                or plan.mask_heads is not None
                or needs_own_prefix_cache(p_hidden, start, plan.mask_layers, n_layers)
                or any(p.position < start for p in plan.patches)  # the shared prefix cache is unpatched
            )
            key = (prefix, v) if own else (prefix, None)
            rows.append(Row(i, v, key, query, q_hidden, p_hidden, plan))
    return rows


def _unchanged_before(plans: Sequence[RowPlan]) -> int:
    """The first column any of ``plans`` changes where they only patch (no mask, ablation or head mask):
    the columns before it are the same in every row, at every layer; 0 where a plan does more."""
    if any(p.mask_layers or p.ablate or p.mask_heads is not None for p in plans):
        return 0
    positions = [patch.position for p in plans for patch in p.patches]
    return min(positions) if positions else 0


KV = list[tuple[torch.Tensor, torch.Tensor]]  # per layer: keys, values [1, heads, tokens, head dim]


class PrefixCaches:
    """Prefix caches made when a batch first needs them and dropped once their last row is decoded.

    ``make(row)`` computes one row's prefix cache; ``make_many(rows)``, where given, the caches of several
    rows whose prefixes need no intervention of their own, in one forward (``prepare``); ``known``: caches
    made before, by prefix key (only this object's references to them are dropped)."""

    def __init__(
        self,
        make: Callable[[Row], KV],
        rows: list[Row],
        stats: dict,
        make_many: Callable[[list[Row]], list[KV]] | None = None,
        known: Mapping[tuple, KV] | None = None,
    ):
        self.make, self.make_many, self.stats = make, make_many, stats
        self.caches: dict[tuple, KV] = dict(known or {})
        self.pending = Counter(r.prefix_key for r in rows)

    def prepare(self, rows: list[Row]) -> None:
        """Make the missing caches of ``rows`` at once where ``make_many`` can (a batch of queries with prefixes
        of their own, e.g. task-vector rows sharing everything but the last token, costs one forward)."""
        missing = list({r.prefix_key: r for r in rows if r.prefix_key not in self.caches}.values())
        plain = [r for r in missing if r.prefix_key[1] is None]
        if self.make_many is None or len(plain) < 2:
            return
        for row, kv in zip(plain, self.make_many(plain), strict=True):
            self.caches[row.prefix_key] = kv
        self.stats["prefix_caches_alive_max"] = max(self.stats["prefix_caches_alive_max"], len(self.caches))

    def get(self, row: Row) -> KV:
        if row.prefix_key not in self.caches:
            self.caches[row.prefix_key] = self.make(row)
            self.stats["prefix_caches_alive_max"] = max(self.stats["prefix_caches_alive_max"], len(self.caches))
        return self.caches[row.prefix_key]

    def done(self, rows: list[Row]) -> None:
        for row in rows:
            self.pending[row.prefix_key] -= 1
            if not self.pending[row.prefix_key]:
                self.caches.pop(row.prefix_key, None)


# --------------------------------------------------------------------------- the batch layout


def left_padding_mask(pads: Sequence[int], width: int) -> torch.Tensor:
    """[len(pads), width] 2D attention mask: row b is 0 on its first pads[b] columns, 1 after."""
    mask = torch.ones(len(pads), width, dtype=torch.long)
    for b, pad in enumerate(pads):
        mask[b, :pad] = 0
    return mask


@dataclass
class BatchLayout:
    """Batch rows ``[pad_b padding | prefix_b | query_b]``, all ``prefix_len + query_len`` columns wide.

    Padding only on the far left keeps column distances equal to position distances (sliding windows
    and GPT-Neo's local attention work in columns); positions come from the mask, so every real token
    keeps its position in the full prompt. The first ``prefix_len`` columns come from prefix caches
    (the cache part: as wide as the shortest distance from a row's query to the right edge allows);
    the rest are fed as input (for a padded row: the prefix tail, then the query). Prefixes may differ
    in length: each is right-aligned against its query.
    """

    prefix_len: int  # the cache part's columns
    query_len: int  # the columns fed as input: the longest query
    pads: list[int]  # row b's first real column
    inputs: torch.Tensor  # [B, query_len]: each row's columns after the cached part
    mask: torch.Tensor  # [B, prefix_len + query_len]: 0 on padding
    prefix_lens: list[int]  # each row's prefix tokens

    @classmethod
    def of(cls, prefixes: Sequence[Sequence[int]], queries: Sequence[Sequence[int]], pad_id: int) -> BatchLayout:
        """The layout of rows ``prefixes[b] + queries[b]``."""
        width = max(len(p) + len(q) for p, q in zip(prefixes, queries, strict=True))
        qmax = max(len(q) for q in queries)
        cached = width - qmax  # no query token falls into the cache part
        pads = [width - len(p) - len(q) for p, q in zip(prefixes, queries, strict=True)]
        inputs = torch.empty(len(queries), qmax, dtype=torch.long)
        for b, (pad, prefix, query) in enumerate(zip(pads, prefixes, queries, strict=True)):
            inputs[b] = torch.tensor(([pad_id] * pad + list(prefix) + list(query))[cached:])
        return cls(cached, qmax, pads, inputs, left_padding_mask(pads, width), [len(p) for p in prefixes])

    @property
    def width(self) -> int:
        return self.prefix_len + self.query_len

    def cached(self, b: int) -> int:
        """How many prefix tokens of row b sit in the cache part (the rest is fed as input)."""
        return max(0, self.prefix_len - self.pads[b])

    def hidden(self, b: int, row: Row) -> list[Range]:
        """``row``'s hidden ranges as columns of batch row b."""
        pad, plen = self.pads[b], self.prefix_lens[b]
        return [(pad + s, pad + e) for s, e in row.prefix_hidden] + [
            (pad + plen + s, pad + plen + e) for s, e in row.query_hidden
        ]

    def cache_layer(
        self,
        kv: Sequence[tuple[torch.Tensor, torch.Tensor]],
        rows: Sequence[int],
        capacity: int,
        slots: int | None = None,
        only: Sequence[int | None] | None = None,
    ) -> PreallocatedLayer:
        """A cache layer whose row n holds the prefix keys/values ``kv[n]`` right-aligned as batch row
        ``rows[n]`` places them, with room for ``capacity`` columns; with ``slots``, a ``SlotLayer`` with room
        for that many rows (slots to come). ``only``: as in ``right_aligned``."""
        cached = [self.cached(b) for b in rows]
        keys = right_aligned([k for k, _ in kv], cached, self.prefix_len, capacity, slots, only)  # [N, heads, cap, d]
        values = right_aligned([v for _, v in kv], cached, self.prefix_len, capacity, slots, only)
        if slots is None:
            return PreallocatedLayer(keys, values, self.prefix_len)
        return SlotLayer(keys, values, self.prefix_len, rows=len(kv))
