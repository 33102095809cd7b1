"""Attention over a narrow window of columns for the rows that hide everything before it.

Under a layer-from mask most rows of a tree-engine batch hide the whole context at a layer: they
see one column of it (BOS) and the query and generated columns after it. Reading the context's
keys and values for them costs as much as for a row that sees it. ``NarrowRows`` says which rows
of a layer's batch see nothing before column ``start`` but one column each, whose keys and values
the engine has copied into column ``start`` (a column those rows hide); ``attend_narrow`` then runs
the attention kernel twice: those rows over the columns from ``start`` on (the moved column's mask
taken into ``start``'s place), the other rows over every column. Attention does not depend on the
order of its columns, so each row attends to the same keys and values as before; the kernel sums
them in another order only (differences of a few ulps).

The rows must be the first ``rows`` of the batch, so that both calls read views of the cache, not
copies. A row that would lose a visible column is refused (RuntimeError): the engine's claim is
checked on the mask itself at every call.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from .mask_surgery import host_may_test, keep_blind_rows_finite, visible_columns, zero_dead_rows


@dataclass(frozen=True)
class NarrowRows:
    """At one layer, batch rows ``b < rows`` see no column before ``start`` but ``moved[b]`` (-1: none;
    ``start``: the row's one visible column is ``start`` itself), whose keys and values are also held
    at column ``start``, which the row hides."""

    rows: int
    start: int
    moved: tuple[int, ...]
    _index: dict[str, torch.Tensor] = field(default_factory=dict, compare=False, repr=False)

    def __post_init__(self):
        if len(self.moved) != self.rows:
            raise ValueError(f"{len(self.moved)} moved columns for {self.rows} narrow rows")
        if self.start < 0 or any(not (c == -1 or 0 <= c <= self.start) for c in self.moved):
            raise ValueError(f"a moved column must be -1 or a column 0..{self.start} (the window's first)")

    def source(self, device: torch.device) -> torch.Tensor:
        """[rows]: the column whose mask goes into column ``start``'s place (``start`` where none moves)."""
        index = self._index.get(str(device))
        if index is None:
            index = torch.tensor([c if c >= 0 else self.start for c in self.moved], device=device)
            self._index[str(device)] = index
        return index


def narrow_mask(mask: torch.Tensor, narrow: NarrowRows, dead: torch.Tensor | None = None) -> torch.Tensor:
    """[rows, 1|H, q, kv - start]: the narrow rows' additive or bool mask over the columns from ``start``
    on, the moved column's entries in column ``start``'s place. Refused where a narrow row would lose a
    visible column at a position that is not ``dead`` (dead positions' outputs are zeroed anyway)."""
    rows, start = narrow.rows, narrow.start
    head = mask[:rows]  # [rows, 1|H, q, kv]
    source = narrow.source(mask.device)[:, None, None, None].expand(rows, head.shape[1], head.shape[2], 1)
    out = torch.cat([head.gather(-1, source), head[..., start + 1 :]], -1)
    lost = visible_columns(head).sum(-1) != visible_columns(out).sum(-1)  # [rows, 1|H, q]
    if dead is not None:
        lost &= ~dead[:rows]
    # a check of the plan that named the rows, the same on every device: made where asking is free (a CPU, as in
    # the tests), not at every narrow layer of a GPU's forward (``host_may_test``)
    if host_may_test(lost) and bool(lost.any()):
        raise RuntimeError(f"a row said to see nothing before column {start} but one column sees more")
    return out


def attend_narrow(
    stock: Callable,
    module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    mask: torch.Tensor,
    dead: torch.Tensor | None,
    narrow: NarrowRows,
    **kwargs,
) -> tuple[torch.Tensor, None]:
    """``stock``'s attention output [B, q, H, D] for query [B, H, q, D] and keys/values [B, KV, kv, D] under
    ``mask`` [B, 1|H, q, kv] (``dead``: [B, 1|H, q] positions to zero), the first ``narrow.rows`` rows over
    the columns from ``narrow.start`` on (``narrow_mask``)."""
    rows, start = narrow.rows, narrow.start
    small, blind = keep_blind_rows_finite(narrow_mask(mask, narrow, dead))
    parts = [stock(module, query[:rows], key[:rows, :, start:], value[:rows, :, start:], small, **kwargs)[0]]
    if rows < query.shape[0]:
        parts.append(stock(module, query[rows:], key[rows:], value[rows:], mask[rows:], **kwargs)[0])
    out = torch.cat(parts) if len(parts) > 1 else parts[0]  # [B, q, H, D]
    if blind is not None:  # a narrow row's position that sees nothing at all (left padding): zeroed
        everywhere = blind.new_zeros(query.shape[0], *blind.shape[1:])  # [B, 1|H, q]
        everywhere[:rows] = blind
        dead = everywhere if dead is None else dead | everywhere
    return zero_dead_rows(out, None, dead)[0], None
