"""Activation patches and readings on tiny random models of every covered family (left padding, GQA).

Each patch is checked against the same edit written here with plain module hooks; the patch applies
where a forward processes its column only (KV-cache decoding equals the full recompute), and a
reading is ``output_hidden_states[l]`` at the position."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM, BloomConfig, DynamicCache

from conftest import OUT_PROJ, tiny
from icl_locate.core.attention import prepare_model
from icl_locate.core.interventions import ColumnMask, collect, intervene
from icl_locate.core.patch_hooks import record
from icl_locate.core.patches import AddHidden, ReplaceHeadOutput, ReplaceHidden
from icl_locate.core.structure import decoder_layers
from icl_locate.engines.base import StopRule, forward, position_ids_for
from icl_locate.engines.reference import greedy_decode

FAMILIES = ["llama", "qwen2", "starcoder2", "gemma3", "gpt_neo", "bloom", "gpt2", "gpt_neox", "mistral"]
SEQ, PAD = 20, 4  # row 1 is left-padded by PAD columns
LAYER, HEAD, COLUMN = 2, 1, 9


def padded_batch(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """ids and 2D mask [2, SEQ]: row 0 full, row 1 left-padded by PAD columns."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, 200, (2, SEQ), generator=g)
    mask = torch.ones(2, SEQ, dtype=torch.long)
    ids[1, :PAD], mask[1, :PAD] = 0, 0
    return ids, mask


def sizes(model) -> tuple[int, int]:
    """(hidden_size, head_dim) of the tiny models (4 query heads)."""
    d = model.config.hidden_size
    return d, d // 4


def vector(n: int, seed: int = 1) -> torch.Tensor:
    return torch.randn(n, generator=torch.Generator().manual_seed(seed))


def logits(model, ids, mask, *interventions) -> torch.Tensor:
    return forward(model, ids, attention_mask=mask, interventions=interventions).logits


def model_inputs(family: str, ids: torch.Tensor, mask: torch.Tensor) -> dict:
    kwargs = dict(input_ids=ids, attention_mask=mask)
    if family != "bloom":  # Bloom has no position ids (ALiBi)
        kwargs["position_ids"] = position_ids_for(mask)
    return kwargs


def layer_input_hook(model, layer: int, edit):
    """Plain pre-hook: decoder layer ``layer`` runs on ``edit(hidden)`` ([B, T, d])."""

    def hook(module, args, kwargs):
        if args:
            return (edit(args[0]),) + tuple(args[1:]), kwargs
        return args, {**kwargs, "hidden_states": edit(kwargs["hidden_states"])}

    return decoder_layers(model)[layer].register_forward_pre_hook(hook, with_kwargs=True)


def head_input_hook(model, family: str, layer: int, edit):
    """Plain pre-hook: the output projection of ``layer`` runs on ``edit(heads)`` (heads [B, T, H, D])."""

    def hook(module, args):
        b, t, width = args[0].shape
        return (edit(args[0].reshape(b, t, 4, width // 4).clone()).reshape(b, t, width),)

    return decoder_layers(model)[layer].get_submodule(OUT_PROJ[family]).register_forward_pre_hook(hook)


def at(row: int | None, column: int, head: int | None = None, value=None, add: bool = False):
    """An edit for the plain hooks: write (or add) ``value`` at [row (None: every row), column(, head)]."""

    def edit(x):
        x = x.clone()
        rows = slice(None) if row is None else row
        site = (rows, column) if head is None else (rows, column, head)
        x[site] = x[site] + value if add else value
        return x

    return edit


@pytest.mark.parametrize("family", FAMILIES)
@torch.no_grad()
def test_patches_match_plain_hooks(family):
    model = tiny(family).model
    ids, mask = padded_batch()
    d, head_dim = sizes(model)
    v, w = vector(d), vector(head_dim, seed=2)
    cases = [
        (ReplaceHidden(LAYER, COLUMN, v, row=1), layer_input_hook, at(1, COLUMN, value=v)),
        (AddHidden(LAYER, COLUMN, v, row=1), layer_input_hook, at(1, COLUMN, value=v, add=True)),
        (ReplaceHeadOutput(LAYER, HEAD, COLUMN, w, row=1), None, at(1, COLUMN, HEAD, value=w)),
    ]
    plain = logits(model, ids, mask)
    for patch, install, edit in cases:
        patched = logits(model, ids, mask, patch)
        handle = install(model, LAYER, edit) if install else head_input_hook(model, family, LAYER, edit)
        try:
            by_hand = logits(model, ids, mask)
        finally:
            handle.remove()
        torch.testing.assert_close(patched, by_hand, atol=1e-5, rtol=1e-5)
        assert torch.equal(patched[0], plain[0]), f"{type(patch).__name__} leaked into another row"
        # (padding columns attend to nothing: in Bloom they average every column, so they are left out)
        assert torch.equal(patched[1, PAD:COLUMN], plain[1, PAD:COLUMN]), "a patch changed earlier columns"
        assert not torch.allclose(patched[1, COLUMN:], plain[1, COLUMN:]), "the patch had no effect"


@pytest.mark.parametrize("family", FAMILIES)
@torch.no_grad()
def test_own_values_change_nothing(family):
    model = tiny(family).model
    ids, mask = padded_batch()
    d, head_dim = sizes(model)
    out = model(**model_inputs(family, ids, mask), output_hidden_states=True)
    with record(model, heads=[(LAYER, HEAD, COLUMN)]) as reading:
        plain = logits(model, ids, mask)
    own_hidden = out.hidden_states[LAYER][1, COLUMN]  # [d]
    own_head = reading.heads[(LAYER, HEAD, COLUMN)][1]  # [head_dim]
    assert torch.equal(logits(model, ids, mask, ReplaceHidden(LAYER, COLUMN, own_hidden, row=1)), plain)
    assert torch.equal(logits(model, ids, mask, AddHidden(LAYER, COLUMN, torch.zeros(d))), plain)
    assert torch.equal(logits(model, ids, mask, ReplaceHeadOutput(LAYER, HEAD, COLUMN, own_head, row=1)), plain)


@pytest.mark.parametrize("family", FAMILIES)
@torch.no_grad()
def test_zero_head_output_is_the_head_knockout(family):
    model = tiny(family).model
    ids, mask = padded_batch()
    _, head_dim = sizes(model)
    zeroed = logits(model, ids, mask, ReplaceHeadOutput(LAYER, HEAD, COLUMN, torch.zeros(head_dim)))

    def knockout(heads):  # [B, T, H, D]: the head's slice before the output projection, every row
        heads[:, COLUMN, HEAD] = 0.0
        return heads

    handle = head_input_hook(model, family, LAYER, knockout)
    try:
        by_hand = logits(model, ids, mask)
    finally:
        handle.remove()
    assert torch.equal(zeroed, by_hand)


def decode_cached(model, ids, mask, patch, prefix: int) -> torch.Tensor:
    """Logits of ``ids`` fed as a prefill of ``prefix`` columns, then one column at a time through a cache."""
    cache = DynamicCache()
    steps = [forward(model, ids[:, :prefix], attention_mask=mask[:, :prefix], cache=cache, interventions=[patch])]
    for t in range(prefix, ids.shape[1]):
        steps.append(
            forward(model, ids[:, t : t + 1], attention_mask=mask[:, : t + 1], cache=cache, interventions=[patch])
        )
    return torch.cat([s.logits for s in steps], dim=1)


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("kind", ["replace", "add", "head"])
@torch.no_grad()
def test_kv_cache_decoding_equals_the_full_recompute(family, kind):
    """The patch at a prefill column acts once and later tokens read its keys/values; at a column fed
    in a decode step, it acts in that step (the hooks count absolute columns across forwards)."""
    model = tiny(family).model
    ids, mask = padded_batch()
    d, head_dim = sizes(model)
    for column in (COLUMN, 15):  # prefill of 12 columns, then a decode step
        patch = {
            "replace": ReplaceHidden(LAYER, column, vector(d), row=1),
            "add": AddHidden(LAYER, column, vector(d)),
            "head": ReplaceHeadOutput(LAYER, HEAD, column, vector(head_dim), row=1),
        }[kind]
        full, cached = logits(model, ids, mask, patch), decode_cached(model, ids, mask, patch, prefix=12)
        # (padding columns attend to nothing: in Bloom they average every column in reach, so they are left out)
        torch.testing.assert_close(cached[:, PAD:], full[:, PAD:], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(cached[0], full[0], atol=1e-5, rtol=1e-5)
        assert not torch.allclose(full[1, column:], logits(model, ids, mask)[1, column:])


@pytest.mark.parametrize("family", FAMILIES)
def test_reference_engine_decodes_with_a_patch(family):
    model = tiny(family).model
    prompt = padded_batch()[0][0].tolist()
    patch = AddHidden(1, 6, 5 * vector(sizes(model)[0]))
    stop = StopRule(max_new_tokens=6)
    with_cache = greedy_decode(model, None, prompt, [patch], stop, use_cache=True)
    recomputed = greedy_decode(model, None, prompt, [patch], stop, use_cache=False)
    assert with_cache.token_ids == recomputed.token_ids


@pytest.mark.parametrize("family", FAMILIES)
@torch.no_grad()
def test_reading_returns_the_model_hidden_states_and_head_outputs(family):
    model = tiny(family).model
    ids, mask = padded_batch()
    n = len(decoder_layers(model))
    seen = []
    handle = head_input_hook(model, family, LAYER, lambda heads: seen.append(heads.clone()) or heads)
    try:
        sites = [(layer, p) for layer in range(n) for p in (PAD, COLUMN, SEQ - 1)]
        with record(model, hidden=sites, heads=[(LAYER, HEAD, COLUMN)]) as reading:
            out = model(**model_inputs(family, ids, mask), output_hidden_states=True)
    finally:
        handle.remove()
    for layer, p in sites:
        assert torch.equal(reading.hidden[(layer, p)], out.hidden_states[layer][:, p]), (layer, p)
    assert torch.equal(reading.heads[(LAYER, HEAD, COLUMN)], seen[0][:, COLUMN, HEAD])


@pytest.mark.parametrize("family", ["llama", "gpt_neo", "bloom"])
@torch.no_grad()
def test_a_mask_and_patches_compose(family):
    model = tiny(family).model
    ids, mask = padded_batch()
    d, head_dim = sizes(model)
    hide = ColumnMask.from_layer([[(2, 6)], [(PAD + 1, PAD + 4)]], 1, len(decoder_layers(model)))
    v, w = vector(d), vector(head_dim)
    both = logits(model, ids, mask, hide, AddHidden(LAYER, COLUMN, v), ReplaceHeadOutput(3, HEAD, 12, w, row=0))
    handles = [
        layer_input_hook(model, LAYER, at(None, COLUMN, value=v, add=True)),
        head_input_hook(model, family, 3, at(0, 12, HEAD, value=w)),
    ]
    try:
        by_hand = logits(model, ids, mask, hide)
    finally:
        for handle in handles:
            handle.remove()
    torch.testing.assert_close(both, by_hand, atol=1e-5, rtol=1e-5)
    with intervene(model, hide, AddHidden(LAYER, COLUMN, v)) as state:
        assert state.mask is hide and len(state.patches) == 1


def test_rows_follow_a_batch_that_shrinks():
    v = torch.ones(4)
    state = collect([ReplaceHidden(0, 1, v, row=2), AddHidden(0, 1, v, row=0), AddHidden(1, 1, v)])
    kept = state.select_rows([2, 1]).patches
    assert [(type(p).__name__, p.row) for p in kept] == [("ReplaceHidden", 0), ("AddHidden", None)]


def test_a_patch_is_an_immutable_copy():
    v = torch.zeros(4)
    patch = ReplaceHidden(0, 1, v)
    v += 1
    assert torch.equal(patch.vector, torch.zeros(4))
    with pytest.raises(AttributeError):
        patch.layer = 3  # pyright: ignore[reportAttributeAccessIssue]


@torch.no_grad()
def test_bad_sites_give_one_clear_error():
    model = tiny("llama").model
    ids, mask = padded_batch()
    d, head_dim = sizes(model)
    bad = [
        (ReplaceHidden(4, 0, torch.zeros(d)), "layers \\[4\\] out of range"),
        (ReplaceHeadOutput(0, 4, 0, torch.zeros(head_dim)), "heads \\[4\\] out of range"),
        (AddHidden(0, 0, torch.zeros(d + 1)), "vector has 33 values, expected 32"),
        (ReplaceHeadOutput(0, 0, 0, torch.zeros(d)), "vector has 32 values, expected 8"),
    ]
    for patch, message in bad:
        with pytest.raises(ValueError, match=message), intervene(model, patch):
            pass
    with pytest.raises(ValueError, match="row 2, the batch has 2 rows"):
        logits(model, ids, mask, AddHidden(0, 5, torch.zeros(d), row=2))
    with pytest.raises(ValueError, match=">= 0"):
        AddHidden(0, -1, torch.zeros(d))
    with pytest.raises(ValueError, match="heads \\[7\\] out of range"), record(model, heads=[(0, 7, 1)]):
        pass
    assert not any(layer._forward_pre_hooks for layer in decoder_layers(model)), "hooks outlived the forward"


def test_a_family_whose_head_outputs_cannot_be_isolated_is_refused():
    config = BloomConfig(hidden_size=32, n_layer=2, n_head=4, pretraining_tp=2, slow_but_exact=True)
    model = prepare_model(AutoModelForCausalLM.from_config(config).eval())
    refused = "bloom with slow_but_exact and pretraining_tp > 1 bypasses"
    with pytest.raises(ValueError, match=refused), intervene(model, ReplaceHeadOutput(0, 0, 0, torch.zeros(8))):
        pass
    with pytest.raises(ValueError, match=refused), record(model, heads=[(0, 0, 0)]):
        pass
    with intervene(model, AddHidden(0, 0, torch.zeros(32))):  # the residual stream is still fine
        pass
