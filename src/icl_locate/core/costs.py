"""The cost model: analytic FLOPs of what a model ran, KV-cache bytes, and the paper's savings estimate.

FLOPs count matmuls only: 2 x a layer's weights for every token it runs, 2 x the LM head's
weights for every row it scores, and (``request_flops`` only) 4 x attention width x the keys a
token attends to (QK^T and AV). Norms, activations and softmax are left out, for every method alike.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from .structure import decoder_layers, num_layers, text_config


@dataclass(frozen=True)
class ModelDims:
    """What the FLOP counts need: per-layer weights, attention width, windows, LM head."""

    layer_params: tuple[int, ...]
    attention_width: int  # query heads x head dim
    windows: tuple[int | None, ...]  # sliding window per layer (None: full attention)
    lm_head: int  # vocabulary x hidden size

    @classmethod
    def of(cls, model: nn.Module) -> ModelDims:
        config = text_config(model)
        heads = config.num_attention_heads
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
        layer_types = getattr(config, "layer_types", None) or ["full_attention"] * num_layers(model)
        window = getattr(config, "sliding_window", None)
        windows = tuple(window if t == "sliding_attention" and window else None for t in layer_types)
        head = model.get_output_embeddings()  # pyright: ignore[reportCallIssue]
        head = head if head is not None else model.get_input_embeddings()  # pyright: ignore[reportCallIssue]
        return cls(
            layer_params=tuple(sum(p.numel() for p in layer.parameters()) for layer in decoder_layers(model)),
            attention_width=heads * head_dim,
            windows=windows,
            lm_head=head.weight.numel(),
        )


def weight_flops(dims: ModelDims, layer_tokens: Sequence[int], logit_rows: int) -> float:
    """2 x (each layer's weights x the tokens it ran + the head's weights x the rows it scored);
    attention over the cache left out."""
    return 2.0 * sum(p * t for p, t in zip(dims.layer_params, layer_tokens)) + 2.0 * dims.lm_head * logit_rows


def request_flops(
    dims: ModelDims, length: int, pruned: tuple[int, int], fed_after_prompt: int, from_layer: int
) -> dict[str, float]:
    """Matmul FLOPs of one request of ``length`` prompt tokens, prompt and decoding separately.

    The prompt's ``pruned`` range [start, end) runs only below ``from_layer``; at layers >=
    ``from_layer`` the later tokens see the rest and themselves. One logit row per forwarded step
    (last position). ``fed_after_prompt``: generated tokens fed back (each but the last of a generation).
    """
    start, end = pruned
    n = length + fed_after_prompt
    pos = np.arange(n)
    prompt = pos < length
    in_range = (pos >= start) & (pos < end)
    prompt_flops = decode_flops = 0.0
    for layer, (params, window) in enumerate(zip(dims.layer_params, dims.windows)):
        drops = from_layer <= layer and end > start
        runs = ~in_range if drops else np.ones(n, dtype=bool)
        stored = (~in_range if drops else np.ones(n, dtype=bool)).astype(np.int64)
        before = np.cumsum(stored)  # visible keys up to and including each position
        if window:
            before = before - np.concatenate([np.zeros(window, dtype=np.int64), before[:-window]])[:n]
        per_token = 2.0 * params + 4.0 * dims.attention_width * before
        prompt_flops += float(per_token[runs & prompt].sum())
        decode_flops += float(per_token[runs & ~prompt].sum())
    logit_rows = 1 + fed_after_prompt
    return {"prompt": prompt_flops + 2.0 * dims.lm_head, "decode": decode_flops + 2.0 * dims.lm_head * (logit_rows - 1)}


def kv_bytes(pairs: Iterable[tuple[torch.Tensor, torch.Tensor]]) -> int:
    """Bytes of the keys and values of every (keys, values) pair, one per cache layer."""
    return sum(keys.nbytes + values.nbytes for keys, values in pairs)


def paper_savings(num_layers_: int, from_layer: int, k: int) -> float:
    """The paper's estimate of the prompt compute saved by dropping the context (k examples) from
    layer r of L: (L - r) / L x k / (k + 1)."""
    return (num_layers_ - from_layer) / num_layers_ * k / (k + 1)
