"""Numerics made safe: no NaN from rows that attend to nothing (even with a kernel that returns NaN for
a fully masked row), unknown per-row arguments refused, chunked attention kept from hole-based
drafts, and bf16 models decoded
by every engine to the reference's tokens up to near-ties below the dtype's threshold."""

from __future__ import annotations

import pytest
import torch
from transformers import DynamicCache
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

from icl_locate.core.conditions import get_condition
from icl_locate.core.interventions import ColumnMask, MaskFrom
from icl_locate.core.models import load_model
from icl_locate.core.structure import attention_window
from icl_locate.engines.audit import audit_rows, margin_threshold
from icl_locate.engines.base import StopRule, forward
from icl_locate.engines.fast import FastEngine
from icl_locate.engines.reference import ReferenceEngine
from icl_locate.engines.tree import TreeEngine
from test_fast_engine import FAMILIES, encoded_prompts, masked

ATTENTION_FAMILIES = ["llama", "gemma3", "qwen2", "starcoder2", "gpt2"]  # on AttentionInterface (sdpa and eager)


def nan_prone_sdpa(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """Plain softmax attention that, like some fused kernels, returns NaN for a fully masked row."""
    groups = query.shape[1] // key.shape[1]
    key, value = key.repeat_interleave(groups, 1), value.repeat_interleave(groups, 1)
    scores = query @ key.transpose(-1, -2) * (scaling or query.shape[-1] ** -0.5)
    if attention_mask is not None:
        visible = (
            attention_mask
            if attention_mask.dtype == torch.bool
            else attention_mask > torch.finfo(attention_mask.dtype).min / 2
        )
        scores = scores.masked_fill(~visible, -float("inf"))
    weights = scores.softmax(-1)  # a row of -inf gives NaN
    return (weights @ value).transpose(1, 2).contiguous(), weights


@pytest.mark.parametrize("family", ATTENTION_FAMILIES)
def test_rows_that_attend_to_nothing_stay_finite_even_with_a_nan_prone_kernel(family, monkeypatch):
    monkeypatch.setitem(ALL_ATTENTION_FUNCTIONS._global_mapping, "sdpa", nan_prone_sdpa)
    lm = load_model(f"tiny:{family}", attn_implementation="sdpa")
    ids = torch.tensor([[5, 6, 7, 8, 9, 10], [0, 0, 0, 8, 9, 10]])
    pad = torch.tensor([[1] * 6, [0, 0, 0, 1, 1, 1]])  # left padding
    # row 0: no BOS, its first three tokens hidden from layer 0 (they attend to nothing there);
    # row 1: left padding, and its first real tokens hidden
    masks = ColumnMask.from_layer([[(0, 3)], [(3, 5)]], 0, lm.info.num_layers)
    for interventions in ([], [masks]):
        cache = DynamicCache()
        out = forward(lm.model, ids, attention_mask=pad, cache=cache, interventions=interventions)
        assert torch.isfinite(out.logits).all()
        assert all(torch.isfinite(t).all() for layer in cache.layers for t in (layer.keys, layer.values))
    # the padded row's real tokens compute what they compute without the padding
    alone = forward(lm.model, ids[1:, 3:], attention_mask=pad[1:, 3:]).logits
    padded = forward(lm.model, ids, attention_mask=pad).logits
    torch.testing.assert_close(padded[1, 3:], alone[0], rtol=1e-4, atol=1e-5)


def test_the_nan_prone_kernel_does_return_nan():
    q = torch.randn(1, 2, 3, 4)
    mask = torch.tensor([[True, False, False], [False, False, False], [True, True, True]])[None, None]
    out, _ = nan_prone_sdpa(None, q, q, q, mask)
    assert torch.isnan(out[0, 1]).all() and torch.isfinite(out[0, 0]).all()


@pytest.mark.parametrize(
    "value", [(torch.zeros(2, 3),), [torch.zeros(2, 3), 1], {"local": torch.zeros(2, 3)}, ((torch.zeros(2, 3),),)]
)
def test_an_unknown_per_row_argument_inside_a_container_is_refused(value):
    with pytest.raises(RuntimeError, match="'mystery_embeddings'"):
        TreeEngine.slice_argument("mystery_embeddings", value, torch.tensor([0]), 2)


def test_known_per_row_arguments_in_containers_are_sliced():
    rows = torch.arange(6.0).view(3, 2)
    leaf = torch.tensor([2, 0])
    cos_sin = TreeEngine.slice_argument("position_embeddings", (rows, rows + 1), leaf, 3)
    assert torch.equal(cos_sin[0], rows[[2, 0]]) and torch.equal(cos_sin[1], rows[[2, 0]] + 1)
    both = TreeEngine.slice_argument("position_embeddings", {"global": (rows,), "local": (rows,)}, leaf, 3)
    assert torch.equal(both["local"][0], rows[[2, 0]])
    assert TreeEngine.slice_argument("use_cache", True, leaf, 3) is True


def test_chunked_attention_gets_no_hole_based_drafts():
    lm = load_model("tiny:llama")
    assert attention_window(lm.model) is None
    lm.model.config.attention_chunk_size = 8192  # chunk borders are counted in columns: holes would move them
    try:
        assert attention_window(lm.model) == 0
        encs = encoded_prompts(lm.tokenizer)
        engine = TreeEngine(lm.model, lm.tokenizer, draft_tokens=4)
        engine.generate(
            masked(encs, get_condition("instructions+examples")), [MaskFrom(j) for j in range(5)], StopRule((), 8)
        )
        assert engine.stats["draft_tokens"] == 0
    finally:
        del lm.model.config.attention_chunk_size
    lm.model.config.layer_types = ["chunked_attention", "full_attention"] * 2
    try:
        assert attention_window(lm.model) == 0
    finally:
        del lm.model.config.layer_types


@pytest.mark.parametrize("family", FAMILIES)
def test_bf16_models_every_engine_equals_the_reference_up_to_near_ties(family):
    lm = load_model(f"tiny:{family}", dtype="bfloat16")
    prompts = masked(encoded_prompts(lm.tokenizer), get_condition("instructions+examples"))
    rows = [MaskFrom(j) for j in range(lm.info.num_layers + 1)]
    stop = StopRule((), 8)
    all_pairs = [(i, r) for i in range(len(prompts)) for r in range(len(rows))]
    threshold = margin_threshold(torch.bfloat16)
    engines = [
        FastEngine(lm.model, lm.tokenizer),
        TreeEngine(lm.model, lm.tokenizer),
        TreeEngine(lm.model, lm.tokenizer, draft_tokens=3),
        ReferenceEngine(lm.model, lm.tokenizer),
    ]
    for engine in engines:
        gens = engine.generate(prompts, rows, stop)
        checked = audit_rows(lm.model, lm.tokenizer, prompts, rows, gens, stop, all_pairs)
        for r in checked:
            assert r.agree or r.margin < threshold, (type(engine).__name__, r)
        if isinstance(engine, ReferenceEngine):
            assert all(r.agree for r in checked)  # the reference against itself: deterministic
