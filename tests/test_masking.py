"""Masking semantics on tiny random models of every covered family."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM, DynamicCache

from conftest import OUT_PROJ, tiny
from icl_locate.core import mask_surgery
from icl_locate.core.conditions import get_condition, hidden_ranges, merge_ranges
from icl_locate.core.interventions import AttentionAblation, ColumnDrop, ColumnMask, intervene
from icl_locate.core.structure import decoder_layers
from icl_locate.engines.base import StopRule, forward
from icl_locate.engines.reference import greedy_decode
from icl_locate.util.errors import UserError

FAMILIES = ["llama", "qwen2", "starcoder2", "gemma3", "gpt_neo", "bloom", "gpt2", "gpt_neox", "mistral"]
SEQ = 20
# row 0 hides a middle stretch, row 1 hides from the very first token (no BOS: "dead" rows)
HIDDEN = [[(2, 7), (9, 11)], [(0, 6)]]


def ids_pair(seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, 200, (2, SEQ), generator=g)


def replace_hidden(ids: torch.Tensor, hidden=HIDDEN) -> torch.Tensor:
    out = ids.clone()
    for row, ranges in enumerate(hidden):
        for a, b in ranges:
            out[row, a:b] = (out[row, a:b] + 17) % 200 + 3
    return out


def visible_positions(row: int) -> list[int]:
    hidden = {i for a, b in HIDDEN[row] for i in range(a, b)}
    return [i for i in range(SEQ) if i not in hidden]


def n_layers(model) -> int:
    return len(decoder_layers(model))


@pytest.mark.parametrize("family", FAMILIES)
def test_mask_from_last_layer_is_no_mask(family):
    model = tiny(family).model
    ids = ids_pair()
    plain = forward(model, ids).logits
    past_end = forward(
        model, ids, interventions=[ColumnMask.from_layer(HIDDEN, n_layers(model), n_layers(model))]
    ).logits
    assert torch.equal(plain, past_end)
    # and the prepared model without a plan computes what transformers computes
    fresh = AutoModelForCausalLM.from_config(
        model.config.__class__.from_dict({**model.config.to_dict(), "_attn_implementation": None})
    ).eval()
    fresh.load_state_dict(model.state_dict())
    with torch.no_grad():
        reference = fresh(ids, position_ids=None if family == "bloom" else torch.arange(SEQ)[None].expand(2, -1)).logits
    torch.testing.assert_close(plain, reference, atol=1e-5, rtol=1e-5)


@pytest.fixture(params=["tested", "branch-free"])
def surgery(request, monkeypatch):
    """Mask surgery as on a CPU (a fix-up skipped where ``.any()`` finds nothing to fix) and as on a GPU (every
    fix-up applied, no host sync: ``mask_surgery.host_may_test``)."""
    if request.param == "branch-free":
        monkeypatch.setattr(mask_surgery, "host_may_test", lambda tensor: False)
    return request.param


@pytest.mark.parametrize("family", FAMILIES)
def test_hidden_tokens_are_invisible_from_layer_0(family, surgery):
    model = tiny(family).model
    ids = ids_pair()
    swapped = replace_hidden(ids)
    plan = ColumnMask.from_layer(HIDDEN, 0, n_layers(model))
    a, b = forward(model, ids, interventions=[plan]).logits, forward(model, swapped, interventions=[plan]).logits
    assert torch.isfinite(a).all()
    for row in range(2):
        vis = visible_positions(row)
        assert torch.equal(a[row, vis], b[row, vis]), f"row {row}: visible logits depend on hidden tokens"
    # without the plan the hidden tokens matter
    assert not torch.allclose(forward(model, ids).logits[0, -1], forward(model, swapped).logits[0, -1])


@pytest.mark.parametrize("family", FAMILIES)
def test_hidden_tokens_matter_when_masked_from_later_layer(family):
    model = tiny(family).model
    ids = ids_pair()
    swapped = replace_hidden(ids)
    plan = ColumnMask.from_layer(HIDDEN, 2, n_layers(model))
    a, b = forward(model, ids, interventions=[plan]).logits, forward(model, swapped, interventions=[plan]).logits
    assert not torch.allclose(a[0, -1], b[0, -1], atol=1e-6)
    # and masking does change the result compared with no mask
    assert not torch.allclose(a[0, -1], forward(model, ids).logits[0, -1], atol=1e-6)


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("from_layer", [0, 2])
def test_kv_cache_decoding_equals_full_forward(family, from_layer):
    model = tiny(family).model
    ids = ids_pair()
    plan = ColumnMask.from_layer(HIDDEN, from_layer, n_layers(model))
    full = forward(model, ids, interventions=[plan]).logits
    cache = DynamicCache()
    prefix = 12
    first = forward(model, ids[:, :prefix], cache=cache, interventions=[plan]).logits
    steps = [first]
    for t in range(prefix, SEQ):
        steps.append(forward(model, ids[:, t : t + 1], cache=cache, interventions=[plan]).logits)
    incremental = torch.cat(steps, dim=1)
    torch.testing.assert_close(incremental, full, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("family", FAMILIES)
def test_greedy_decode_cache_and_no_cache_agree(family):
    model = tiny(family).model
    prompt = ids_pair()[0].tolist()
    plan = ColumnMask.at_layers([HIDDEN[0]], range(1, n_layers(model)))
    with_cache = greedy_decode(model, None, prompt, [plan], StopRule(max_new_tokens=8), use_cache=True)
    without = greedy_decode(model, None, prompt, [plan], StopRule(max_new_tokens=8), use_cache=False)
    assert with_cache.token_ids == without.token_ids


@pytest.mark.parametrize("family", FAMILIES)
def test_eager_attention_weights_are_zero_on_hidden_columns(family):
    model = tiny(family, attn="eager").model
    ids = ids_pair()
    from_layer = 2
    plan = ColumnMask.from_layer(HIDDEN, from_layer, n_layers(model))
    attentions = forward(model, ids, interventions=[plan], output_attentions=True).attentions
    assert len(attentions) == n_layers(model)
    for layer, weights in enumerate(attentions):
        for row, ranges in enumerate(HIDDEN):
            on_hidden = torch.cat([weights[row, :, :, a:b] for a, b in ranges], dim=-1)
            if layer >= from_layer:
                assert torch.count_nonzero(on_hidden) == 0, f"layer {layer} row {row} attends to hidden columns"
            else:
                assert torch.count_nonzero(on_hidden) > 0
        assert torch.isfinite(weights).all()


@pytest.mark.parametrize("family", FAMILIES)
def test_left_padded_batch_equals_rows_alone(family, surgery):
    model = tiny(family).model
    g = torch.Generator().manual_seed(1)
    lengths = [SEQ, 13]
    rows = [torch.randint(3, 200, (n,), generator=g) for n in lengths]
    hidden = [[(3, 8)], [(2, 5), (6, 9)]]
    pad = max(lengths)
    ids = torch.zeros(2, pad, dtype=torch.long)
    mask = torch.zeros(2, pad, dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, pad - len(r) :] = r
        mask[i, pad - len(r) :] = 1
    plan = ColumnMask.from_layer(hidden, 1, n_layers(model)).shifted([pad - n for n in lengths])
    batched = forward(model, ids, attention_mask=mask, interventions=[plan]).logits
    for i, r in enumerate(rows):
        alone = forward(model, r[None], interventions=[ColumnMask.from_layer([hidden[i]], 1, n_layers(model))]).logits
        torch.testing.assert_close(batched[i, pad - len(r) :], alone[0], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("family", FAMILIES)
def test_whole_layer_ablation_equals_zeroed_attention(family):
    model = tiny(family).model
    ids = ids_pair()
    layer = 1
    ablated = forward(model, ids, interventions=[AttentionAblation(frozenset([layer]))]).logits
    proj = decoder_layers(model)[layer].get_submodule(OUT_PROJ[family])
    saved = {k: v.clone() for k, v in proj.state_dict().items()}
    try:
        with torch.no_grad():
            for p in proj.parameters():
                p.zero_()
        by_hand = forward(model, ids).logits
    finally:
        proj.load_state_dict(saved)
    torch.testing.assert_close(ablated, by_hand, atol=1e-6, rtol=1e-6)
    assert not torch.allclose(ablated, forward(model, ids).logits)


def test_conditions_and_ranges():
    spans = {"bos": (0, 1), "instructions": (1, 5), "examples": (5, 30), "query": (30, 38)}
    assert hidden_ranges(get_condition("TTF"), spans, 38) == [(1, 30)]
    assert hidden_ranges(get_condition("examples"), spans, 38) == [(5, 30)]
    assert hidden_ranges(get_condition("FFT"), spans, 38) == [(30, 38)]
    assert hidden_ranges(get_condition("instructions+examples+query"), spans, 38) == [(1, 38)]
    assert hidden_ranges(get_condition("all-but-last"), spans, 38) == [(1, 37)]
    assert hidden_ranges(get_condition("baseline"), spans, 38) == []
    assert merge_ranges([(5, 7), (1, 3), (3, 4)]) == [(1, 4), (5, 7)]
    with pytest.raises(UserError, match="unknown condition"):
        get_condition("nope")


def test_plan_validation():
    with pytest.raises(ValueError):
        ColumnMask.from_layer([[(0, 2)]], 7, 4)
    with pytest.raises(ValueError):
        ColumnMask.from_layer([[(3, 2)]], 0, 4)
    model = tiny("llama").model
    with pytest.raises(ValueError, match="out of range"):
        forward(model, ids_pair(), interventions=[AttentionAblation(frozenset([9]))])


def test_interventions_are_separate_values_that_refuse_bad_combinations():
    model = tiny("llama").model
    mask = ColumnMask.from_layer(HIDDEN, 1, n_layers(model))
    with pytest.raises(ValueError, match="two ColumnMask"):
        forward(model, ids_pair(), interventions=[mask, mask])
    drop = ColumnDrop.from_layer([(2, 5), (2, 5)], 2, n_layers(model))
    with pytest.raises(ValueError, match="both prune and mask"):
        forward(model, ids_pair(), interventions=[mask, drop])
    # a scope never leaks: after the block the model computes the unmasked result again
    plain = forward(model, ids_pair()).logits
    with intervene(model, mask):
        pass
    assert torch.equal(forward(model, ids_pair()).logits, plain)
    # select_rows keeps each row's own columns and layers
    per_row = ColumnMask.per_row(HIDDEN, [1, 3], n_layers(model)).select_rows([1])
    assert per_row.hidden == (tuple(HIDDEN[1]),) and per_row.layers == (frozenset({3}),)


@pytest.mark.parametrize("family", ["llama", "gemma3", "bloom", "gpt_neo"])
def test_branch_free_mask_surgery_gives_the_tested_surgerys_logits(family, monkeypatch):
    """On a GPU the fix-ups run where no row is dead or blind (``host_may_test``): they must change nothing there,
    and do what the tested path does where rows are (left padding, a row hiding everything before a position)."""
    model = tiny(family).model
    ids, mask = ids_pair(), torch.ones(2, SEQ, dtype=torch.long)
    mask[1, :4] = 0  # row 1: left padding
    runs = {}
    for mode in ("tested", "branch-free"):
        if mode == "branch-free":
            monkeypatch.setattr(mask_surgery, "host_may_test", lambda tensor: False)
        plan = ColumnMask.from_layer(HIDDEN, 1, n_layers(model))
        runs[mode] = [
            forward(model, ids, attention_mask=mask, interventions=[plan]).logits,  # dead and blind rows
            forward(model, ids[:1], interventions=[ColumnMask.from_layer(HIDDEN[:1], 1, n_layers(model))]).logits,
            forward(model, ids).logits,  # no intervention, no padding: nothing to fix
        ]
    for tested, branch_free in zip(runs["tested"], runs["branch-free"], strict=True):
        assert torch.equal(tested, branch_free)


def test_a_masks_per_layer_tensors_are_made_once_per_device():
    """They are asked for at every masked layer of every step; a copy to a GPU waits for the queued kernels."""
    plan = ColumnMask.at_heads([[(1, 3)], [(0, 2)]], [{2: {0, 1}}, {}])
    rows = plan.head_rows(2, 4, torch.device("cpu"))
    assert rows is not None and rows is plan.head_rows(2, 4, torch.device("cpu"))
    assert rows.tolist() == [[True, True, False, False], [True, True, True, True]]
    assert plan.columns(2, 4, torch.device("cpu")).tolist() == [[False, True, True, False], [False] * 4]  # row 1: none
    assert plan.columns(3, 4, torch.device("cpu")).tolist() == [[False] * 4, [False] * 4]  # no row masks layer 3
