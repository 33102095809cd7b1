"""The screened LM heads (bf16, int8, int8-linear) are the argmax of the full fp32 logits: on random states of every
scale, on adversarial near-ties (logits a few fp32 ulps apart, computed exactly so that the full
argmax is well defined), with ties going to the first token; they fall back to the full product
where their bound cannot certify, follow a head changed in place, switch themselves off when a
bound is exceeded, and the int8 screen measures whether this machine's int8 products are exact."""

from __future__ import annotations

import pytest
import torch

from icl_locate.core.models import load_model
from icl_locate.engines import head as head_module
from icl_locate.engines import head_int8
from icl_locate.engines.head_int8 import (
    PROBE_ROWS,
    Int8ScreenedHead,
    exact_int8_levels,
    int8_depth,
    int_mm_in_probed_rows,
)
from icl_locate.engines.screens import SCREENS


def head_model(vocab=5000, d=64, softcap=None, seed=0, weight=None):
    """A bare module with an LM head (the screens need only ``get_output_embeddings`` and the config)."""
    torch.manual_seed(seed)
    model = torch.nn.Module()
    model.lm_head = torch.nn.Linear(d, vocab, bias=False)
    if weight is not None:
        model.lm_head.weight = torch.nn.Parameter(weight)
    model.get_output_embeddings = lambda: model.lm_head
    model.config = type("C", (), {"final_logit_softcapping": softcap})()
    return model


def with_outlier_channels(hidden: torch.Tensor) -> torch.Tensor:
    """States like a real model's final ones: a few channels far larger than the rest."""
    hidden = hidden.clone()
    hidden[:, :3] *= 20
    return hidden


def exact_here(kind: str) -> bool:
    """Whether this machine's kernels give the screen an exact product (the int8 ones depend on them)."""
    levels = getattr(SCREENS[kind], "exact_levels", None)
    return levels is None or levels(int8_depth(head_model())) > 0


KINDS = [
    pytest.param(kind, marks=pytest.mark.skipif(not exact_here(kind), reason=f"no exact {kind} product here"))
    for kind in SCREENS
]


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize(
    "softcap, vocab",
    [(None, 5000), (30.0, 5000), (None, 2 * head_int8.CHUNK_TOKENS + 100)],  # the last: several int8 chunks
)
def test_a_screen_is_the_argmax_of_the_full_logits(kind, softcap, vocab):
    head = SCREENS[kind](head_model(vocab=vocab, softcap=softcap), check_every=1)  # the bound checked every call
    hidden = with_outlier_channels(torch.randn(300, 64) * torch.logspace(-1, 2, 300)[:, None])  # small to large
    logits = head.full_logits(hidden)
    expected = logits.argmax(-1)
    # growing, then smaller again: a screen reuses its buffers, whose stale contents must never count
    for rows in (hidden[:1], hidden[:16], hidden, hidden[:16]):
        assert torch.equal(head.argmax(rows), expected[: len(rows)])
    assert head.stats["candidates"] >= 300
    assert head.stats["checked_rows"] == 4 and not head.disabled  # a row's screened logits read in token order
    # rows in full: only where the cap is flat (a token outside could reach the best capped value)
    top = logits.max(-1).values
    saturated, near_cap = (top >= (softcap or float("inf"))), (top >= 0.99 * (softcap or float("inf")))
    assert int(saturated.sum()) <= head.stats["full_rows"] - 2 * int(saturated[:16].sum()) <= int(near_cap.sum())


def near_tie_model(vocab=3000, d=64, seed=0):
    """Integer weights and states whose every partial sum stays below 2^24, so fp32 computes each
    logit exactly in any order; logits lie near 2^23 (one ulp = 1), and tokens come in groups one or
    two units (ulps) apart or exactly equal: the full argmax is well defined, yet a screen's bound
    is hundreds of ulps wide."""
    generator = torch.Generator().manual_seed(seed)
    weight = torch.randint(100, 128, (vocab, d), generator=generator).float()
    hidden = torch.randint(1000, 1100, (8, d), generator=generator).float()
    for i in range(0, vocab - 4, 5):  # token i, then i+1..i+4 within a unit or two of it for row 0
        for j, delta in zip(range(1, 5), (0, 1, -1, 2)):
            weight[i + j] = weight[i]
            a, b = torch.randperm(d, generator=generator)[:2]
            # move one unit of weight between two channels whose states differ by `delta`
            hidden_ab = hidden[0, a] - hidden[0, b]
            if hidden_ab == delta and weight[i + j, a] < 127 and weight[i + j, b] > 100:
                weight[i + j, a] += 1
                weight[i + j, b] -= 1
    return weight, hidden


@pytest.mark.parametrize("kind", KINDS)
def test_a_screen_decides_adversarial_near_ties_as_the_full_argmax(kind):
    weight, hidden = near_tie_model()
    # the winning token and its near-ties: copies of the best row, one and two ulps either side
    full = hidden @ weight.T
    best = int(full[0].argmax())
    weight[best + 1 :: 997] = weight[best]  # exact ties after the winner: the first must win
    hidden = torch.cat([hidden, hidden[:1] + torch.tensor([0.0] * 63 + [1.0])])
    assert float((hidden @ weight.T).max()) < 2**24  # every sum exact in fp32
    head = SCREENS[kind](head_model(vocab=len(weight), weight=weight))
    expected = (hidden @ weight.T).argmax(-1)
    logits = hidden @ weight.T
    top2 = logits.topk(2, dim=-1).values
    assert float((top2[:, 0] - top2[:, 1]).min()) <= 2  # the test has ties within two ulps
    assert torch.equal(head.argmax(hidden), expected)


@pytest.mark.parametrize("kind", KINDS)
def test_ties_go_to_the_first_token_and_crowded_rows_fall_back(kind, monkeypatch):
    model = head_model()
    with torch.no_grad():
        model.lm_head.weight[4000] = model.lm_head.weight[17]  # an exact tie: the reference picks 17
    head = SCREENS[kind](model)
    hidden = model.lm_head.weight[17][None].clone() * 5
    assert int(head.argmax(hidden)[0]) == int(head.full_logits(hidden).argmax(-1)[0]) == 17
    monkeypatch.setattr(head_module, "MAX_CANDIDATES_PER_ROW", 0)  # every row crowded: full product
    hidden = torch.randn(7, 64)
    assert torch.equal(head.argmax(hidden), head.full_logits(hidden).argmax(-1))
    assert head.stats["full_rows"] == 7


@pytest.mark.parametrize("kind", KINDS)
def test_a_row_the_bound_cannot_separate_falls_back_to_the_full_product(kind):
    """Thousands of tokens within a few ulps of each other: more candidates than a row may have, so
    the row is computed in full, and still exactly."""
    generator = torch.Generator().manual_seed(1)
    row = torch.randint(100, 128, (64,), generator=generator).float()
    weight = row.repeat(6000, 1)
    channel = torch.arange(6000) % 64
    weight[torch.arange(6000), channel] += torch.randint(-1, 2, (6000,), generator=generator).float()
    hidden = torch.randint(1000, 1100, (2, 64), generator=generator).float()
    head = SCREENS[kind](head_model(vocab=6000, weight=weight))
    assert torch.equal(head.argmax(hidden), (hidden @ weight.T).argmax(-1))
    assert head.stats["full_rows"] == 2


@pytest.mark.parametrize("kind", KINDS)
def test_a_screen_refuses_what_it_cannot_certify(kind):
    model = head_model()
    model.lm_head = torch.nn.Linear(64, 100, bias=True)
    assert "bias" in SCREENS[kind].unsupported_reason(model)
    model.lm_head = torch.nn.Linear(64, 100, bias=False).to(torch.bfloat16)
    assert "bfloat16" in SCREENS[kind].unsupported_reason(model)


@pytest.mark.parametrize("change", ["in place", "new storage"])
@pytest.mark.parametrize("kind", KINDS)
def test_a_screen_follows_a_head_changed_in_place_or_given_new_storage(kind, change):
    """A write through the tensor bumps its version; ``weight.data = ...`` (what a move to another device does)
    keeps the tensor and its version but swaps its storage: either way the screen rebuilds."""
    torch.manual_seed(0)
    lm = load_model("tiny:llama")
    head = SCREENS[kind](lm.model)
    hidden = torch.randn(16, lm.model.config.hidden_size)
    weight = lm.model.get_output_embeddings().weight
    original = weight.data
    before = head.argmax(hidden)
    if change == "in place":
        with torch.no_grad():
            weight.copy_(weight.flip(0))  # every token's row moves: the argmax changes
    else:
        weight.data = weight.data.flip(0).contiguous()
    try:
        after = head.argmax(hidden)
        assert torch.equal(after, (hidden @ weight.T).argmax(-1)) and not torch.equal(before, after)
        assert head.stats["rebuilt"] == 1
    finally:
        if change == "in place":
            with torch.no_grad():
                weight.copy_(weight.flip(0))
        else:
            weight.data = original


def break_the_bound(head) -> None:
    """Make the screen's bound one that no real product keeps."""
    if head.kind == "bf16":
        head.input_term = head.output_term = 0.0
    else:
        head.w_norm.zero_()
        head.e_norm.zero_()


@pytest.mark.parametrize("kind", KINDS)
def test_a_screen_switches_itself_off_when_its_bound_is_exceeded(kind):
    torch.manual_seed(0)
    lm = load_model("tiny:llama")
    head = SCREENS[kind](lm.model, check_every=1)
    hidden = torch.randn(8, lm.model.config.hidden_size)
    assert torch.equal(head.argmax(hidden), head.full_logits(hidden).argmax(-1)) and not head.disabled
    break_the_bound(head)
    with pytest.warns(UserWarning, match="bound was exceeded"):
        tokens = head.argmax(hidden)
    assert head.disabled and torch.equal(tokens, head.full_logits(hidden).argmax(-1))
    assert torch.equal(head.argmax(hidden), head.full_logits(hidden).argmax(-1))


# --------------------------------------------------------------------------- int8 products


def saturating_int_mm(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """What an AVX2 int8 kernel without VNNI computes: ``a`` shifted to unsigned (a + 128), pairs of
    products summed in int16 with saturation, the shift compensated afterwards."""
    shifted = a.long() + 128  # [M, K]
    k = a.shape[1] + a.shape[1] % 2
    shifted = torch.nn.functional.pad(shifted, (0, k - a.shape[1]))
    b_long = torch.nn.functional.pad(b.long(), (0, 0, 0, k - b.shape[0]))  # [K, N]
    products = shifted[:, :, None] * b_long[None]  # [M, K, N]
    pairs = (products[:, 0::2] + products[:, 1::2]).clamp(-(2**15), 2**15 - 1)
    return (pairs.sum(1) - 128 * b_long.sum(0)[None]).int()


def test_the_int8_levels_follow_what_this_machine_computes_exactly(monkeypatch):
    assert exact_int8_levels() in (63, 127)  # torch's own kernel: exact at least for 7-bit operands
    exact_int8_levels.cache_clear()
    monkeypatch.setattr(torch, "_int_mm", saturating_int_mm)
    try:
        assert exact_int8_levels() == 63
        weight = torch.randn(3000, 64)
        head = Int8ScreenedHead(head_model(vocab=3000, weight=weight), check_every=1)
        assert head.levels == 63
        hidden = with_outlier_channels(torch.randn(40, 64) * 4)
        assert torch.equal(head.argmax(hidden), (hidden @ weight.T).argmax(-1)) and not head.disabled
        monkeypatch.setattr(torch, "_int_mm", lambda a, b: saturating_int_mm(a, b) * 0)
        exact_int8_levels.cache_clear()
        assert exact_int8_levels() == 0
        assert "not exact" in Int8ScreenedHead.unsupported_reason(head_model())
    finally:
        exact_int8_levels.cache_clear()


def test_the_int8_levels_are_tried_at_the_screens_depth_and_a_large_batchs_rows(monkeypatch):
    """A kernel chosen by shape could saturate only at the screen's shapes: the check runs those."""
    real = torch._int_mm  # pyright: ignore[reportPrivateImportUsage]
    for wide in (lambda a, b: a.shape[1] > 96, lambda a, b: b.shape[1] > 64, lambda a, b: b.shape[1] > 256):
        monkeypatch.setattr(
            torch, "_int_mm", lambda a, b, wide=wide: saturating_int_mm(a, b) if wide(a, b) else real(a, b)
        )
        exact_int8_levels.cache_clear()
        try:
            assert exact_int8_levels(200) == 63 and exact_int8_levels(96) in (63, 127)
            assert Int8ScreenedHead(head_model(vocab=300, d=256)).levels == 63  # 192 int8 channels
        finally:
            exact_int8_levels.cache_clear()


def test_a_product_of_more_states_than_the_levels_were_tried_on_is_cut_into_tried_sizes(monkeypatch):
    """Beyond the probe's largest state count the kernel is unchecked: the screen never gives it more."""
    real, widths = torch._int_mm, []  # pyright: ignore[reportPrivateImportUsage]
    monkeypatch.setattr(torch, "_int_mm", lambda a, b: widths.append(b.shape[1]) or real(a, b))
    generator = torch.Generator().manual_seed(5)
    a = torch.randint(-127, 128, (40, 96), dtype=torch.int8, generator=generator)
    states = PROBE_ROWS[-1] * 2 + 37
    b = torch.randint(-63, 64, (states, 96), dtype=torch.int8, generator=generator).T  # as the screen passes it
    assert torch.equal(int_mm_in_probed_rows(a, b).double(), a.double() @ b.double())
    assert widths == [PROBE_ROWS[-1], PROBE_ROWS[-1], 37]
    widths.clear()
    assert torch.equal(int_mm_in_probed_rows(a, b[:, :5]), real(a, b[:, :5])) and widths == [5]
    weight = torch.randn(300, 64)
    head = Int8ScreenedHead(head_model(vocab=300, weight=weight))  # its exactness probe calls _int_mm too
    hidden = with_outlier_channels(torch.randn(states, 64) * 4)
    widths.clear()
    assert torch.equal(head.argmax(hidden), (hidden @ weight.T).argmax(-1)) and not head.disabled  # the screen's call
    assert head.levels > 0 and widths and max(widths) == PROBE_ROWS[-1]


@pytest.mark.parametrize("vocab", [4 * head_module.SCAN_TOKENS, 3 * head_module.SCAN_TOKENS + 452, 300])
def test_the_block_scan_finds_what_a_scan_of_every_logit_finds(vocab):
    """The bf16 screen's extremes and candidates, taken block by block, equal the whole rows' (ties at the
    threshold kept, a short last block, rows with no candidate, a row with a NaN: none)."""
    generator = torch.Generator().manual_seed(3)
    approx = (torch.randn(9, vocab, generator=generator) * 4).to(torch.bfloat16)
    approx[1, -1] = 40  # the top in the last block
    approx[2, :5] = 30  # ties in the first block
    approx[3, 7] = float("nan")
    threshold = approx.float().max(-1).values.to(torch.bfloat16) - torch.tensor([0.5, 0, 0, 0, 3, 0.1, 1, 2, 8])
    threshold = threshold.to(torch.bfloat16)
    threshold[5] = 1e4  # above every logit: no candidate
    block_max, block_min = head_module.block_extremes(approx)
    same = dict(rtol=0, atol=0, equal_nan=True)  # bitwise; the NaN row's extremes are NaN either way
    torch.testing.assert_close(block_max.amax(-1), approx.max(-1).values, **same)
    torch.testing.assert_close(block_min.amin(-1), approx.min(-1).values, **same)
    expected = (approx >= threshold[:, None]).nonzero()
    assert len(expected) > 9 and 5 not in expected[:, 0] and 3 not in expected[:, 0]
    assert torch.equal(head_module.at_least(approx, block_max, threshold), expected)
