"""The int8-linear screen's product (torch's quantized dynamic linear) is exact only through its range row: the
probe finds it exact with the row and refuses it without; a product of more states than the probe tried is
cut into tried sizes, each with its own range row. (The screen's argmax against the full one, on random
states, near-ties and fall-backs, is tested with every screen in ``test_screened_heads.py``.)"""

from __future__ import annotations

import pytest
import torch

from icl_locate.engines import head_int8_linear
from icl_locate.engines.head_int8 import CHUNK_TOKENS, PROBE_ROWS
from icl_locate.engines.head_int8_linear import (
    LEVELS,
    Int8LinearScreenedHead,
    exact_linear_levels,
    linear_product,
    pack_int8,
    with_range_rows,
)
from test_screened_heads import head_model, with_outlier_channels

# FBGEMM's int8 kernels need AVX2: there the probe must find the product exact (a broken probe fails here)
pytestmark = pytest.mark.skipif(
    not {"x86", "fbgemm"} & set(torch.backends.quantized.supported_engines)
    or torch.backends.cpu.get_cpu_capability() not in ("AVX2", "AVX512"),
    reason="no x86 quantized engine here, or a CPU without AVX2",
)


@pytest.fixture
def fresh_probe():
    exact_linear_levels.cache_clear()
    yield
    exact_linear_levels.cache_clear()


def test_the_product_is_exact_with_the_range_row_and_refused_without(monkeypatch, fresh_probe):
    assert exact_linear_levels(96) == LEVELS
    # without the range row the operator scales each call's input by its own range: not the integers we gave
    monkeypatch.setattr(head_int8_linear, "with_range_rows", lambda levels: [levels])
    monkeypatch.setattr(head_int8_linear, "linear_product", lambda packed, pieces: linear_product_whole(packed, pieces))
    exact_linear_levels.cache_clear()
    assert exact_linear_levels(96) == 0
    assert "int8-linear products are not exact" in Int8LinearScreenedHead.unsupported_reason(head_model())


def linear_product_whole(packed, pieces):
    """``linear_product`` for pieces without a range row (nothing dropped)."""
    return torch.cat([torch.ops.quantized.linear_dynamic(piece, packed, True) for piece in pieces])


def test_a_product_of_more_states_than_the_probe_tried_is_cut_into_tried_sizes(fresh_probe):
    generator = torch.Generator().manual_seed(3)
    weight = torch.randint(-127, 128, (CHUNK_TOKENS // 4, 96), dtype=torch.int8, generator=generator)
    states = 2 * PROBE_ROWS[-1] + 37
    levels = torch.randint(-LEVELS, LEVELS + 1, (states, 96), generator=generator).float()
    pieces = with_range_rows(levels)
    assert [len(p) for p in pieces] == [PROBE_ROWS[-1] + 1, PROBE_ROWS[-1] + 1, 38]
    assert all(p[-1, :2].tolist() == [-LEVELS, LEVELS + 1] and not p[-1, 2:].any() for p in pieces)
    assert torch.equal(linear_product(pack_int8([weight])[0], pieces).double(), levels.double() @ weight.double().T)
    # the screen itself on that many states: the full argmax, its bound never exceeded
    model = head_model(vocab=3000)
    head = Int8LinearScreenedHead(model, check_every=1)
    hidden = with_outlier_channels(torch.randn(states, 64, generator=generator) * 4)
    assert head.levels == LEVELS
    assert torch.equal(head.argmax(hidden), (hidden @ model.lm_head.weight.T).argmax(-1)) and not head.disabled
