"""The cost model: the paper's savings formula, weight-only and per-request FLOPs, KV-cache bytes."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from icl_locate.core.costs import ModelDims, kv_bytes, paper_savings, request_flops, weight_flops
from icl_locate.core.models import load_model


def test_paper_savings_by_hand():
    assert paper_savings(32, 14, 5) == pytest.approx(18 / 32 * 5 / 6)  # 0.46875
    assert paper_savings(32, 14, 5) == pytest.approx(0.46875)
    assert paper_savings(18, 18, 5) == 0.0
    assert paper_savings(10, 0, 1) == pytest.approx(0.5)


def test_weight_flops_by_hand():
    dims = ModelDims(layer_params=(10, 20), attention_width=99, windows=(None, None), lm_head=7)
    # 2 x (10 x 3 + 20 x 4) + 2 x 7 x 5 = 220 + 70
    assert weight_flops(dims, [3, 4], 5) == 290.0


def test_kv_bytes_counts_keys_and_values():
    k = torch.zeros(2, 3, 5, 4)  # [B, heads, T, head dim] float32
    assert kv_bytes([(k, k), (k[:1], k[:1])]) == 2 * 480 + 2 * 240


def brute_force_flops(dims: ModelDims, length: int, pruned: tuple[int, int], fed: int, r: int) -> float:
    """Token by token, layer by layer, key by key."""
    start, end = pruned
    total = 0.0
    n = length + fed
    for layer, params in enumerate(dims.layer_params):
        drops = layer >= r and end > start
        stored = [c for c in range(n) if not (drops and start <= c < end)]
        for t in range(n):
            if drops and start <= t < end:
                continue
            window = dims.windows[layer]
            visible = [c for c in stored if c <= t and (window is None or c > t - window)]
            total += 2 * params + 4 * dims.attention_width * len(visible)
    return total + 2 * dims.lm_head * (1 + fed)


@pytest.mark.parametrize("window", [None, 7])
def test_request_flops_matches_brute_force(window):
    dims = ModelDims(
        layer_params=(100, 200, 300, 400), attention_width=8, windows=(window, None, window, None), lm_head=50
    )
    for length, pruned in ((25, (1, 20)), (25, (24, 24)), (12, (0, 10))):
        for r in range(5):
            f = request_flops(dims, length, pruned, 6, r)
            assert f["prompt"] + f["decode"] == pytest.approx(brute_force_flops(dims, length, pruned, 6, r))


def test_paper_formula_is_the_weights_only_limit():
    """Without attention FLOPs and with k examples of equal length as the whole context, the
    prompt saving is exactly the paper's (L - r)/L x k/(k + 1)."""
    L, k, ex = 32, 5, 40
    dims = ModelDims(layer_params=(1000,) * L, attention_width=0, windows=(None,) * L, lm_head=0)
    length, pruned = (k + 1) * ex, (0, k * ex)  # k examples pruned, the query (one example long) kept
    for r in (0, 14, 32):
        full = request_flops(dims, length, pruned, 0, L)["prompt"]
        kept = request_flops(dims, length, pruned, 0, r)["prompt"]
        assert 1 - kept / full == pytest.approx(paper_savings(L, r, k))


def test_model_dims_of_gemma_like_config():
    lm = load_model("tiny:gemma3")
    dims = ModelDims.of(lm.model)
    assert len(dims.layer_params) == lm.info.num_layers
    assert sum(dims.layer_params) < sum(p.numel() for p in lm.model.parameters())
    assert any(w is not None for w in dims.windows) == any(
        t == "sliding_attention" for t in lm.model.config.layer_types
    )
    assert np.all(np.array(dims.layer_params) > 0)
    assert dims.lm_head == lm.model.get_output_embeddings().weight.numel()
