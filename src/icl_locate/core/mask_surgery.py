"""Mask surgery: hiding columns of a 4D attention mask without letting a kernel produce NaN.

A query position whose every visible column is hidden attends to nothing; attention kernels
return NaN for such rows, so they keep one column for the kernel and their output is zeroed
afterwards (``zero_dead_rows``). ``interventions.ColumnMask`` hides columns with ``hide_columns``;
the attention hooks (``attention.py``) keep left-padding rows finite the same way.
"""

from __future__ import annotations

import torch


def hide_columns(
    attention_mask: torch.Tensor, hidden: torch.Tensor, readers: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Remove hidden columns from a 4D attention mask.

    attention_mask: [B|1, H|1, q, kv], bool (True = may attend) or additive float (0 / large negative).
    hidden: bool [B, kv] (every head), or [B, H, kv] (per query head).
    readers: bool [B, q], the query positions the columns are hidden from (None: every position).
    Returns the new mask ([B, 1 or H, q, kv]) and ``dead`` (bool [B, 1 or H, q]: query positions of
    a head that could see something before and nothing now; None if there are none). Dead rows keep
    their old mask row so that the kernel stays NaN-free; the caller zeroes their output.
    """
    if attention_mask.dim() != 4:
        raise RuntimeError(f"expected a 4D attention mask, got shape {tuple(attention_mask.shape)}")
    kv = attention_mask.shape[-1]
    if hidden.shape[-1] != kv:
        raise RuntimeError(f"hidden columns for {hidden.shape[-1]} keys, mask has {kv}")
    if attention_mask.shape[0] not in (1, hidden.shape[0]):
        raise RuntimeError(f"mask has {hidden.shape[0]} rows, batch has {attention_mask.shape[0]}")
    if hidden.dim() == 2:
        hidden = hidden[:, None, :]  # every head alike
    visible = visible_columns(attention_mask)
    hide = hidden[:, :, None, :] & visible  # [B, 1|H, q, kv]
    if readers is not None:
        hide = hide & readers[:, None, :, None]
    still_visible = visible & ~hide
    dead = visible.any(-1) & ~still_visible.any(-1)  # [B, 1|H, q]
    if host_may_test(dead) and not dead.any():
        dead_rows = None
    else:  # dead rows keep their old mask row (on a GPU always applied: nothing changes where none is dead)
        hide = hide & ~dead[..., None]
        dead_rows = dead
    if attention_mask.dtype == torch.bool:
        new_mask = attention_mask & ~hide
    else:
        new_mask = torch.where(hide, torch.finfo(attention_mask.dtype).min, attention_mask)
    return keep_blind_rows_finite(new_mask, dead_rows)


def keep_blind_rows_finite(
    attention_mask: torch.Tensor, dead: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Rows that may attend to nothing at all (left padding) get one visible column, and join ``dead``.

    Some fused attention kernels return NaN for a fully masked row, and a NaN in a padding
    position's output spreads to real rows through 0 x NaN once its keys/values are read with
    weight 0. The visible column keeps the kernel finite; the caller zeroes the row's output.
    attention_mask: [B|1, H|1, q, kv]; dead: [B, 1|H, q] or None. Returns (mask, dead rows or None).
    """
    blind = ~visible_columns(attention_mask).any(-1)  # [B|1, H|1, q]
    if host_may_test(blind) and not blind.any():
        return attention_mask, dead
    first = torch.zeros(attention_mask.shape[-1], dtype=torch.bool, device=attention_mask.device)
    first[0] = True
    opened = blind[..., None] & first  # [B|1, H|1, q, kv]: column 0 of each blind row
    if attention_mask.dtype == torch.bool:
        attention_mask = attention_mask | opened
    else:
        attention_mask = attention_mask.masked_fill(opened, 0.0)
    return attention_mask, blind if dead is None else dead | blind


def host_may_test(tensor: torch.Tensor) -> bool:
    """Whether the host may ask ``tensor`` a yes/no question (``.any()``) to skip a fix-up: on a CPU it is free;
    on a GPU the answer waits for every kernel queued before it, a host sync at every layer that stops the
    host from queueing the next layer's kernels while this one's run. There the fix-ups run whether needed or
    not: they change nothing where no row is dead or blind."""
    return tensor.device.type == "cpu"


def visible_columns(attention_mask: torch.Tensor) -> torch.Tensor:
    """Bool, the mask's shape: where a bool (True = may attend) or additive float mask lets a position
    see a column."""
    if attention_mask.dtype == torch.bool:
        return attention_mask
    return attention_mask > torch.finfo(attention_mask.dtype).min / 2


def zero_dead_rows(attn_output: torch.Tensor, attn_weights: torch.Tensor | None, dead: torch.Tensor | None):
    """Zero attention output ([B, q, H, D]) and weights ([B, H, q, kv]) of dead (row, head, position)s
    (``dead``: [B, 1|H, q])."""
    if dead is None:
        return attn_output, attn_weights
    attn_output = attn_output.masked_fill(dead.permute(0, 2, 1)[..., None], 0.0)
    if attn_weights is not None:
        attn_weights = attn_weights.masked_fill(dead[..., None], 0.0)
    return attn_output, attn_weights
