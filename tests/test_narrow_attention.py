"""Attention over a narrow window for rows that hide everything before it (core/narrow_attention.py), the
slot order that keeps those rows first (engines/slot_order.py), and the tree engine taking that path."""

from __future__ import annotations

import random

import pytest
import torch
from transformers.integrations.sdpa_attention import sdpa_attention_forward

from conftest import tiny
from icl_locate.core import attention
from icl_locate.core.conditions import get_condition
from icl_locate.core.interventions import MaskFrom
from icl_locate.core.mask_surgery import hide_columns
from icl_locate.core.narrow_attention import NarrowRows, attend_narrow, narrow_mask
from icl_locate.core.prompts import FORMATS, build_prompt, encode_prompt
from icl_locate.engines import rows as rows_module
from icl_locate.engines.decoding import right_aligned
from icl_locate.engines.slot_order import class_order
from icl_locate.engines.tree_decode import TreeDecode
from test_fast_engine import BANK, encoded_prompts
from test_tree_engine import assert_tree_equals

MIN = torch.finfo(torch.float32).min


class GroupedAttention:
    """What ``sdpa_attention_forward`` reads of an attention module: 4 query heads share a key/value head."""

    num_key_value_groups = 2
    is_causal = True
    training = False


def batch(rows: int, q_len: int, kv: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    query = torch.randn(rows, 4, q_len, 8, generator=g)
    key = torch.randn(rows, 2, kv, 8, generator=g)
    value = torch.randn(rows, 2, kv, 8, generator=g)
    return query, key, value


def stock(module, query, key, value, mask, **kwargs):
    return sdpa_attention_forward(module, query, key, value, mask, scaling=0.3, **kwargs)


@pytest.mark.parametrize("q_len", [1, 3])
@pytest.mark.parametrize("per_head", [False, True])
def test_narrow_rows_attend_as_over_every_column(q_len, per_head):
    """Rows 0-2 hide every column up to 6 but one (moved to column 6: its keys/values copied there, as the
    tree engine does), row 3 sees nothing up to 6, row 4 nothing before 6 and column 6 itself, rows 5-6 see
    everything; row 2's first position is left padding (sees nothing), row 1 hides its one column from head 2
    (per head). The output equals one kernel call over every column; the narrow rows' columns before the
    window then hold NaN, which no kernel call may read."""
    rows, kv, start = 7, 12, 6
    query, key, value = batch(rows, q_len, kv)
    padding = torch.zeros(rows, 1, q_len, kv)
    padding[2, :, 0] = MIN  # a left-padding position
    hidden = torch.zeros(rows, kv, dtype=torch.bool)
    moved = (1, 0, 3, -1, 6)
    for b, seen in enumerate(moved):
        hidden[b, : start if seen == start else start + 1] = True  # column 6 too, where it takes a moved one
        if 0 <= seen < start:
            hidden[b, seen] = False
    full_mask, dead = hide_columns(padding, hidden)
    if per_head:  # row 1 hides its one seen column from head 2 as well: that position sees only the window
        heads = full_mask.expand(rows, 4, q_len, kv).clone()
        heads[1, 2, :, 0] = MIN
        full_mask = heads
    expected, _ = stock(GroupedAttention, query, key, value, full_mask)
    expected = expected.masked_fill(dead.permute(0, 2, 1)[..., None], 0.0) if dead is not None else expected
    for b, seen in enumerate(moved):  # the engine's copy: a hidden column takes the seen one's keys/values
        if 0 <= seen < start:
            key[b, :, start], value[b, :, start] = key[b, :, seen], value[b, :, seen]
            assert bool(full_mask[b, :, :, start].eq(MIN).all())  # column 6 was hidden for the row
    key[:5, :, :start], value[:5, :, :start] = float("nan"), float("nan")  # never read for the narrow rows
    narrow = NarrowRows(5, start, moved)
    got, weights = attend_narrow(stock, GroupedAttention, query, key, value, full_mask, dead, narrow)
    assert weights is None and got.shape == expected.shape
    torch.testing.assert_close(got, expected, atol=1e-6, rtol=1e-5)


def test_a_row_that_sees_more_before_the_window_is_refused():
    rows, kv, start = 3, 10, 5
    mask = torch.zeros(rows, 1, 1, kv)
    mask[:2, :, :, 1 : start + 1] = MIN  # rows 0 and 1 see column 0 only up to the window's first column
    mask[1, :, :, 3] = 0.0  # row 1 also sees column 3
    with pytest.raises(RuntimeError, match="sees more"):
        narrow_mask(mask, NarrowRows(2, start, (0, 0)))
    dead = torch.zeros(rows, 1, 1, dtype=torch.bool)
    dead[1] = True  # a dead position keeps its old mask row: its output is zeroed, it is not checked
    assert narrow_mask(mask, NarrowRows(2, start, (0, 0)), dead).shape == (2, 1, 1, kv - start)


def test_narrow_rows_are_checked():
    with pytest.raises(ValueError, match="moved columns"):
        NarrowRows(2, 4, (0,))
    for moved in (5, -2):
        with pytest.raises(ValueError, match="must be -1 or a column 0..4"):
            NarrowRows(1, 4, (moved,))


def test_class_order_keeps_each_class_a_run_and_moves_only_down():
    """Random layers of slots in class order lose slots; every kept slot stays once, the classes stay in
    order (each one run), and a slot moves only from a later row, so copying in order is safe."""
    rng = random.Random(0)
    for _ in range(300):
        sizes = [rng.randrange(0, 6) for _ in range(3)]
        old = [(c, i) for c, n in enumerate(sizes) for i in range(n)]
        kept = {i for i in range(len(old)) if rng.random() < 0.6}
        order = class_order(old, kept, lambda key: key[0])
        assert sorted(order) == sorted(kept)
        classes = [old[i][0] for i in order]
        assert classes == sorted(classes)
        assert all(o >= new for new, o in enumerate(order))
        rows = list(old)  # copying in order, in place (SlotLayer.rearrange), gives every slot its new row
        for new, o in enumerate(order):
            rows[new] = rows[o]
        assert rows[: len(order)] == [old[o] for o in order]
        if kept == set(range(len(old))):
            assert order == list(range(len(old)))  # nothing left: nothing moves
    with pytest.raises(ValueError, match="class order"):
        class_order([(1, 0), (0, 0)], {0, 1}, lambda key: key[0])


def poisoned(unwritten: list[int], tensors, keep, width, capacity, rows=None, only=None):
    """``right_aligned``, with the columns it leaves unwritten (``only``) filled with NaN; ``unwritten`` gets
    each such row."""
    out = right_aligned(tensors, keep, width, capacity, rows, only)
    for b, column in enumerate(only or []):
        if column is not None:
            written = out[b, :, column].clone() if column >= 0 else None
            out[b, :, :width] = float("nan")
            if written is not None:
                out[b, :, column] = written
            unwritten.append(b)
    return out


@pytest.mark.parametrize("family", ["llama", "gemma3", "qwen2", "gpt_neo"])
def test_the_tree_engine_attends_narrowly_where_rows_hide_the_context(family, monkeypatch):
    """A layer-from sweep on instructions+examples: at every masked layer the diverged rows see BOS and the
    query only, so they attend over the narrow window (most calls, most rows), and their cache rows leave the
    other prefix columns unwritten (here: NaN, which no read may meet); results equal the reference. GPT-Neo
    attends inline (not through the SDPA wrapper): its slots are written whole, and it reads them whole."""
    calls: list[tuple[int, int]] = []
    unwritten: list[int] = []

    def counting(stock, module, query, key, value, mask, dead, narrow, **kwargs):
        calls.append((narrow.rows, query.shape[0]))
        return attend_narrow(stock, module, query, key, value, mask, dead, narrow, **kwargs)

    monkeypatch.setattr(attention, "attend_narrow", counting)
    monkeypatch.setattr(rows_module, "right_aligned", lambda *args: poisoned(unwritten, *args))
    lm = tiny(family)
    rows = [MaskFrom(j) for j in range(lm.info.num_layers + 1)]
    assert_tree_equals(lm, encoded_prompts(lm.tokenizer), get_condition("instructions+examples"), rows, max_new=8)
    if family == "gpt_neo":
        assert calls == [] and unwritten == []
        return
    assert len(calls) > 8
    assert sum(n for n, _ in calls) > sum(t for _, t in calls) / 2
    assert len(unwritten) > 8


def test_a_short_prompt_whose_padding_reaches_the_window(monkeypatch):
    """A zero-shot prompt beside one with a long query: the short prompt's padding covers the window's first
    column and its BOS is fed with its query (nothing moves), so that column is padding the narrow rows read:
    written as zeros, never left as it was (NaN here); results equal the reference."""
    unwritten: list[int] = []
    monkeypatch.setattr(rows_module, "right_aligned", lambda *args: poisoned(unwritten, *args))
    lm = tiny("llama")
    fmt = FORMATS["instr_machine_translation"]
    long_query = " ".join(["une phrase beaucoup plus longue que les autres"] * 4)
    encs = [
        encode_prompt(lm.tokenizer, build_prompt(fmt, [], "court", header="Traduire:")),
        encode_prompt(lm.tokenizer, build_prompt(fmt, BANK[:1], long_query, header="Translate French to English:")),
    ]
    seen: list[tuple[int, int]] = []
    original = TreeDecode.__init__

    def recording(self, *args, **kwargs):
        original(self, *args, **kwargs)
        seen.extend((pad, self.narrow_start) for pad in self.layout.pads)

    monkeypatch.setattr(TreeDecode, "__init__", recording)
    rows = [MaskFrom(j) for j in range(lm.info.num_layers + 1)]
    assert_tree_equals(lm, encs, get_condition("instructions+examples"), rows, max_new=6)
    assert any(pad > start for pad, start in seen) and unwritten
