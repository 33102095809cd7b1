"""Interventions: values that say what to do to attention, applied inside a ``with`` scope.

Two levels, both plain values:

* **Row interventions** say what one (prompt, setting) row of a sweep does to the model:
  ``MaskFrom(j)`` (the paper's layer-from mask: hide the prompt's hidden columns at every layer
  >= j), ``MaskBelow(j)`` (the converse window: hide them at every layer < j, for the ``-below``
  conditions; ``mask_row`` picks one of the two by a condition's window), ``AblateLayers(ls)``
  (remove those layers' attention sublayer), ``PruneFrom(r)`` (context-pruned inference: the
  hidden range is processed below r only), ``PatchLastPosition`` (a vector written into the prompt's
  last position at one layer: task and function vectors, ``patches.py``) and ``UNCHANGED``.
  They are hashable: engines key their results by them.
* **Batch interventions** are what the attention hooks read while a batch runs forward:
  ``ColumnMask`` (per-row hidden columns at per-row layers), ``AttentionAblation`` and
  ``ColumnDrop`` (a pruned cache lacks some columns at some layers). ``intervene(model, ...)``
  makes them active for the ``with`` block only (a context variable, so nothing leaks out);
  without an active intervention a prepared model behaves exactly as before.
* **Patches** (``patches.py``: ``ReplaceHidden``, ``AddHidden``, ``ReplaceHeadOutput``) are batch
  interventions too, any number at once, composing with the others in the same scope.
"""

from __future__ import annotations

import contextlib
import contextvars
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from .conditions import Condition, Range
from .mask_surgery import hide_columns
from .narrow_attention import NarrowRows
from .patches import PATCH_TYPES, Patch, PatchLastPosition, check_patches, patch_rows
from .structure import num_layers

# --------------------------------------------------------------------------- row interventions


@dataclass(frozen=True)
class MaskFrom:
    """Hide the prompt's hidden columns in every layer >= ``layer`` (= number of layers: nothing)."""

    layer: int


@dataclass(frozen=True)
class MaskBelow:
    """Hide the prompt's hidden columns in every layer < ``layer`` (0: nothing; the number of layers: every
    layer); the converse of ``MaskFrom``, for the conditions whose window is "below"."""

    layer: int


def mask_row(condition: Condition | None, layer: int) -> MaskFrom | MaskBelow:
    """The row that masks ``condition``'s columns at layer ``layer`` as its window says (no condition: MaskFrom)."""
    return MaskBelow(layer) if condition is not None and condition.window == "below" else MaskFrom(layer)


@dataclass(frozen=True)
class AblateLayers:
    """Remove the whole attention sublayer of ``layers`` (the paper's 'mask all heads' of a layer)."""

    layers: frozenset[int]


@dataclass(frozen=True)
class HeadMask:
    """Hide the prompt's hidden columns from the listed query heads only: ``heads`` holds
    (layer, head) pairs; every other head, and every layer not listed, sees the whole prompt.
    All heads of layers >= j is ``MaskFrom(j)``."""

    heads: frozenset[tuple[int, int]]

    def by_layer(self) -> dict[int, frozenset[int]]:
        out: dict[int, set[int]] = {}
        for layer, head in self.heads:
            out.setdefault(layer, set()).add(head)
        return {layer: frozenset(hs) for layer, hs in sorted(out.items())}


@dataclass(frozen=True)
class PruneFrom:
    """Process the hidden range in layers < ``layer`` only; it is absent from the cache above."""

    layer: int


@dataclass(frozen=True)
class Unchanged:
    """No intervention (zero-shot evaluation)."""


UNCHANGED = Unchanged()
RowIntervention = MaskFrom | MaskBelow | HeadMask | AblateLayers | PruneFrom | Unchanged | PatchLastPosition


# --------------------------------------------------------------------------- batch interventions


def _freeze(hidden: Sequence[Sequence[Range]]) -> tuple[tuple[Range, ...], ...]:
    out = []
    for row in hidden:
        frozen_row = []
        for start, end in row:
            if not (0 <= start <= end):
                raise ValueError(f"bad hidden range ({start}, {end})")
            frozen_row.append((int(start), int(end)))
        out.append(tuple(frozen_row))
    return tuple(out)


HeadSets = dict[int, frozenset[int]]  # layer -> the query heads masked there (a layer not listed: all heads)


class ColumnMask:
    """Row b may not attend to the columns ``hidden[b]`` at the layers ``layers[b]``; with ``heads``,
    row b hides them at such a layer only from the query heads ``heads[b][layer]`` (layers it does
    not list: every head).

    With ``others_only[b]`` (the converse window), row b hides its columns from the positions outside
    them only: a hidden position still attends as usual, so the hidden tokens' own states are computed
    as without the mask and only their reading by the rest is held back. A forward's query positions
    are taken to be the newest columns of its keys (true of prefills and of every cached step).

    Columns are those of the batch as fed to the model (left padding included). Immutable;
    the bool column matrix and each layer's rows are built once per device on first use (``_device_tensor``).
    """

    def __init__(
        self,
        hidden: Sequence[Sequence[Range]],
        layers: Sequence[frozenset[int]],
        heads: Sequence[HeadSets | None] | None = None,
        others_only: Sequence[bool] | None = None,
    ):
        if len(hidden) != len(layers) or (heads is not None and len(heads) != len(hidden)):
            raise ValueError("one layer set (and head map) per row")
        if others_only is not None and len(others_only) != len(hidden):
            raise ValueError("one others_only flag per row")
        self.others_only = tuple(bool(x) for x in others_only) if others_only is not None else (False,) * len(hidden)
        self.hidden = _freeze(hidden)
        self.layers = tuple(frozenset(x) for x in layers)
        self.heads = tuple(dict(h) if h else None for h in heads) if heads is not None else (None,) * len(hidden)
        for row_layers, row_heads in zip(self.layers, self.heads):
            if row_heads and not set(row_heads) <= row_layers:
                raise ValueError("heads are given for layers the row does not mask")
            if row_heads and any(not hs or min(hs) < 0 for hs in row_heads.values()):
                raise ValueError("a head set must be non-empty head indices >= 0")
        self.active_layers = frozenset().union(*(ls for ls, h in zip(self.layers, self.hidden) if h))
        self._on_device: dict[tuple, torch.Tensor] = {}

    @classmethod
    def from_layer(cls, hidden: Sequence[Sequence[Range]], from_layer: int, n_layers: int) -> ColumnMask:
        """The paper's mask: every row hides its columns in every layer >= ``from_layer``."""
        if not 0 <= from_layer <= n_layers:
            raise ValueError(f"from_layer must be in 0..{n_layers}, got {from_layer}")
        return cls(hidden, [frozenset(range(from_layer, n_layers))] * len(hidden))

    @classmethod
    def per_row(cls, hidden: Sequence[Sequence[Range]], from_layers: Sequence[int], n_layers: int) -> ColumnMask:
        """Row i hides ``hidden[i]`` in every layer >= ``from_layers[i]`` (rows of a sweep decode together)."""
        if len(hidden) != len(from_layers):
            raise ValueError("one from_layer per row")
        return cls(hidden, [frozenset(range(j, n_layers)) for j in from_layers])

    @classmethod
    def at_layers(cls, hidden: Sequence[Sequence[Range]], layers: Sequence[int]) -> ColumnMask:
        return cls(hidden, [frozenset(layers)] * len(hidden))

    @classmethod
    def at_heads(cls, hidden: Sequence[Sequence[Range]], heads: Sequence[HeadSets]) -> ColumnMask:
        """Row i hides ``hidden[i]`` from the heads ``heads[i][layer]`` of each listed layer only."""
        return cls(hidden, [frozenset(h) for h in heads], heads)

    def max_head(self) -> int:
        return max([-1] + [max(hs) for row in self.heads if row for hs in row.values()])

    def applies_to(self, layer: int | None) -> bool:
        return layer is not None and layer in self.active_layers

    def all_layers(self) -> frozenset[int]:
        return frozenset().union(*self.layers)

    def columns(self, layer: int, kv_len: int, device: torch.device) -> torch.Tensor:
        """Bool [batch, kv_len]: True where a row may not look at ``layer``."""
        rows = self._device_tensor(("rows", layer), device, lambda: torch.tensor([layer in ls for ls in self.layers]))
        return self.hidden_columns(kv_len, device) & rows[:, None]

    def readers(self, q_len: int, kv_len: int, device: torch.device) -> torch.Tensor | None:
        """Bool [batch, q_len]: the query positions (the newest ``q_len`` columns) a row hides its columns
        from; None where every row hides them from every position."""
        if not any(self.others_only):
            return None
        own = self.hidden_columns(kv_len, device)[:, kv_len - q_len :]  # [B, q]: the position is itself hidden
        exempt = self._device_tensor(("others_only",), device, lambda: torch.tensor(self.others_only))[:, None] & own
        return ~exempt

    def hidden_columns(self, kv_len: int, device: torch.device) -> torch.Tensor:
        """Bool [batch, kv_len]: every row's hidden columns, whatever the layer."""
        base = self._device_tensor(("columns",), device, self._column_matrix)  # [batch, widest hidden end]
        width = base.shape[1]
        return base[:, :kv_len] if kv_len <= width else torch.cat([base, base.new_zeros(len(base), kv_len - width)], 1)

    def _column_matrix(self) -> torch.Tensor:
        base = torch.zeros(
            len(self.hidden), max([1] + [end for row in self.hidden for _, end in row]), dtype=torch.bool
        )
        for row, ranges in enumerate(self.hidden):
            for start, end in ranges:
                base[row, start:end] = True
        return base

    def head_rows(self, layer: int, n_heads: int, device: torch.device) -> torch.Tensor | None:
        """Bool [batch, n_heads]: which query heads of each row hide at ``layer``; None when all do."""
        if not any(row and layer in row for row in self.heads):
            return None
        if self.max_head() >= n_heads:
            raise ValueError(f"head {self.max_head()} out of range: the attention has {n_heads} query heads")
        return self._device_tensor(("heads", layer, n_heads), device, lambda: self._head_rows(layer, n_heads))

    def _head_rows(self, layer: int, n_heads: int) -> torch.Tensor:
        rows = torch.ones(len(self.hidden), n_heads, dtype=torch.bool)  # [batch, n_heads]
        for b, row in enumerate(self.heads):
            if row and layer in row:
                rows[b] = False
                rows[b, sorted(row[layer])] = True
        return rows

    def _device_tensor(self, key: tuple, device: torch.device, build: Callable[[], torch.Tensor]) -> torch.Tensor:
        """``build()`` on ``device``, made once per key and device (a copy to a GPU waits for the kernels queued)."""
        found = self._on_device.get((*key, str(device)))
        if found is None:
            found = self._on_device[(*key, str(device))] = build().to(device)
        return found

    def apply(
        self, attention_mask: torch.Tensor, layer: int, n_heads: int | None = None
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The 4D mask without this layer's hidden columns (per query head where heads are given; the
        result is then [B, n_heads, q, kv]), and the (row, head, position)s left seeing nothing."""
        q_len, kv_len, device = attention_mask.shape[-2], attention_mask.shape[-1], attention_mask.device
        cols = self.columns(layer, kv_len, device)
        readers = self.readers(q_len, kv_len, device)
        heads = self.head_rows(layer, n_heads, device) if n_heads else None
        if heads is None:
            if any(row and layer in row for row in self.heads):
                raise RuntimeError("a head-restricted mask needs the number of query heads")
            return hide_columns(attention_mask, cols, readers)
        return hide_columns(attention_mask, cols[:, None, :] & heads[:, :, None], readers)

    def narrow_at(self, layer: int) -> NarrowRows | None:
        """Rows that may attend over a narrow window of columns (``narrow_attention``): none here."""
        return None

    def shifted(self, offsets: Sequence[int]) -> ColumnMask:
        """The same mask with each row's ranges moved right by its left-padding offset."""
        if len(offsets) != len(self.hidden):
            raise ValueError("one offset per batch row")
        moved = [[(a + o, b + o) for a, b in row] for row, o in zip(self.hidden, offsets)]
        return ColumnMask(moved, self.layers, self.heads, self.others_only)

    def select_rows(self, rows: Sequence[int]) -> ColumnMask:
        return ColumnMask(
            [self.hidden[i] for i in rows],
            [self.layers[i] for i in rows],
            [self.heads[i] for i in rows],
            [self.others_only[i] for i in rows],
        )


class LayerColumnMasks:
    """A different ``ColumnMask`` at each layer, for engines whose batch differs from layer to layer
    (the tree engine runs N_l states at layer l): ``by_layer[l]`` has one row per state there;
    ``narrow[l]``: the first rows there see only a narrow window of columns (``narrow_attention``)."""

    def __init__(self, by_layer: dict[int, ColumnMask], narrow: dict[int, NarrowRows] | None = None):
        self.by_layer = {layer: mask for layer, mask in by_layer.items() if mask.applies_to(layer)}
        self.active_layers = frozenset(self.by_layer)
        self.narrow = {layer: n for layer, n in (narrow or {}).items() if layer in self.by_layer and n.rows}

    def applies_to(self, layer: int | None) -> bool:
        return layer in self.active_layers

    def all_layers(self) -> frozenset[int]:
        return self.active_layers

    def apply(
        self, attention_mask: torch.Tensor, layer: int, n_heads: int | None = None
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        return self.by_layer[layer].apply(attention_mask, layer, n_heads)

    def narrow_at(self, layer: int) -> NarrowRows | None:
        """The rows of ``layer`` that see only a narrow window of columns (None: no such rows)."""
        return self.narrow.get(layer)

    def select_rows(self, rows: Sequence[int]) -> LayerColumnMasks:
        raise TypeError("rows of per-layer masks differ from layer to layer: build a new one instead")


@dataclass(frozen=True)
class AttentionAblation:
    """The attention sublayers of ``layers`` add nothing to the residual stream (every row)."""

    layers: frozenset[int]

    def applies_to(self, layer: int | None) -> bool:
        return layer is not None and layer in self.layers

    def all_layers(self) -> frozenset[int]:
        return self.layers

    def select_rows(self, rows: Sequence[int]) -> AttentionAblation:
        return self


class ColumnDrop:
    """Context-pruned caches: at ``layers`` the cache lacks row b's columns ``dropped[b]``.

    Positions and the attention mask are built over every prompt column; at those layers the
    mask loses the dropped columns too, so it matches the shorter cache. One width for all rows
    keeps the cache rectangular.
    """

    def __init__(self, dropped: Sequence[Range], layers: frozenset[int]):
        widths = {b - a for a, b in dropped}
        if len(widths) > 1:
            raise ValueError(f"dropped ranges must have one width, got {sorted(widths)}")
        self.dropped = _freeze([dropped])[0]
        self.layers = frozenset(layers)
        self._index: dict[tuple, torch.Tensor] = {}

    @classmethod
    def from_layer(cls, dropped: Sequence[Range], from_layer: int, n_layers: int) -> ColumnDrop:
        return cls(dropped, frozenset(range(from_layer, n_layers)))

    def applies_to(self, layer: int | None) -> bool:
        return layer is not None and layer in self.layers and any(b > a for a, b in self.dropped)

    def all_layers(self) -> frozenset[int]:
        return self.layers

    def select_rows(self, rows: Sequence[int]) -> ColumnDrop:
        return ColumnDrop([self.dropped[i] for i in rows], self.layers)

    def without_dropped_columns(self, attention_mask: torch.Tensor) -> torch.Tensor:
        """The 4D mask [B|1, H|1, q, kv] without each row's dropped columns: [B, H|1, q, kv - width]."""
        batch, kv = len(self.dropped), attention_mask.shape[-1]
        width = self.dropped[0][1] - self.dropped[0][0]
        key = (kv, str(attention_mask.device))
        index = self._index.get(key)
        if index is None:
            kept = torch.arange(kv - width)
            starts = torch.tensor([a for a, _ in self.dropped])[:, None]
            index = (kept[None, :] + width * (kept[None, :] >= starts)).to(attention_mask.device)
            self._index[key] = index
        mask = attention_mask.expand(batch, *attention_mask.shape[1:])
        return mask.gather(-1, index[:, None, None, :].expand(*mask.shape[:-1], kv - width))


BatchIntervention = ColumnMask | LayerColumnMasks | AttentionAblation | ColumnDrop | Patch


# --------------------------------------------------------------------------- the scope


@dataclass(frozen=True)
class Active:
    """The interventions in force: at most one of each kind, and any number of patches."""

    mask: ColumnMask | LayerColumnMasks | None = None
    ablation: AttentionAblation | None = None
    drop: ColumnDrop | None = None
    patches: tuple[Patch, ...] = ()

    def select_rows(self, rows: Sequence[int]) -> Active:
        return Active(
            self.mask.select_rows(rows) if self.mask is not None else None,
            self.ablation.select_rows(rows) if self.ablation is not None else None,
            self.drop.select_rows(rows) if self.drop is not None else None,
            patch_rows(self.patches, rows),
        )

    def values(self) -> tuple[BatchIntervention, ...]:
        return tuple(x for x in (self.mask, self.ablation, self.drop) if x is not None) + self.patches


NOTHING = Active()
_ACTIVE: contextvars.ContextVar[Active] = contextvars.ContextVar("icl_locate_interventions", default=NOTHING)
PREPARED_FLAG = "_icl_locate_prepared"


def is_prepared(model) -> bool:
    """Whether ``prepare_model`` wired this model's attention for interventions."""
    return bool(getattr(model, PREPARED_FLAG, False))


def collect(interventions: Sequence[BatchIntervention | None]) -> Active:
    """Sort interventions by kind; refuse two of a kind, and a mask and a drop on the same layer
    (a pruned layer's columns are already gone: there is nothing left to hide)."""
    mask: ColumnMask | LayerColumnMasks | None = None
    ablation: AttentionAblation | None = None
    drop: ColumnDrop | None = None
    patches: list[Patch] = []
    for x in interventions:
        if x is None:
            continue
        if isinstance(x, PATCH_TYPES):  # patches compose: any number at once
            patches.append(x)
            continue
        if type(x) not in (ColumnMask, LayerColumnMasks, AttentionAblation, ColumnDrop):
            raise TypeError(f"not a batch intervention: {x!r}")
        if isinstance(x, (ColumnMask, LayerColumnMasks)) and mask is None:
            mask = x
        elif isinstance(x, AttentionAblation) and ablation is None:
            ablation = x
        elif isinstance(x, ColumnDrop) and drop is None:
            drop = x
        else:
            raise ValueError(f"two {type(x).__name__} interventions at once")
    active = Active(mask, ablation, drop, tuple(patches))
    if active.mask is not None and active.drop is not None and active.mask.active_layers & active.drop.layers:
        raise ValueError("an intervention cannot both prune and mask the same layer")
    return active


def active() -> Active:
    return _ACTIVE.get()


@contextlib.contextmanager
def intervene(model: nn.Module, *interventions: BatchIntervention | None) -> Iterator[Active]:
    """Run ``model`` under ``interventions`` inside the ``with`` block."""
    state = collect(interventions)
    layers = frozenset().union(*(x.all_layers() for x in state.values()))
    if layers:
        if not is_prepared(model):
            raise RuntimeError("model is not prepared for interventions: call icl_locate.core.attention.prepare_model")
        n = num_layers(model)
        bad = sorted(x for x in layers if not 0 <= x < n)
        if bad:
            raise ValueError(f"layers {bad} out of range for a model with {n} layers")
    if state.patches:
        check_patches(model, state.patches)
    token = _ACTIVE.set(state)
    try:
        yield state
    finally:
        _ACTIVE.reset(token)
