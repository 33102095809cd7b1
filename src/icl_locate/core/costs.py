"""The cost model: analytic FLOPs of what a model ran or will run, KV-cache and activation bytes, and
the paper's savings estimate.

FLOPs count matmuls only: 2 x a layer's weights for every token it runs, 2 x the LM head's
weights for every row it scores, and (``request_flops``, ``segment_flops``) 4 x attention width x
the keys a token attends to (QK^T and AV). Norms, activations and softmax are left out, for every
method alike. ``ModelDims`` comes from a loaded model or, without weights, from a ``ModelShape``
(``core/shapes.py``: a config's or an alias's numbers).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, replace

import numpy as np
import torch
from torch import nn

from .shapes import ModelShape
from .structure import config_layers, decoder_config, decoder_layers, num_layers, text_config


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

    @classmethod
    def of_shape(cls, shape: ModelShape) -> ModelDims:
        """The same dimensions from a shape's numbers (no weights): norms and biases left out."""
        return cls(
            layer_params=(shape.layer_params(),) * shape.layers,
            attention_width=shape.heads * shape.head_dim,
            windows=shape.layer_windows(),
            lm_head=shape.vocab * shape.hidden,
        )


GATED_MLP = ("llama", "mistral", "mixtral", "qwen2", "qwen3", "gemma", "gemma2", "gemma3", "gemma3_text", "phi3")


def shape_of_config(config, params: int | None = None) -> ModelShape:
    """A transformers config's sizes (field names differ by family; multimodal configs nest the decoder's).
    ``params``: the known parameter count (None: computed from the sizes)."""
    text = decoder_config(config)

    def first(*names: str, default: int = 0) -> int:  # the first of ``names`` the config sets to a number
        return next((getattr(text, n) for n in names if isinstance(getattr(text, n, None), int)), default)

    hidden, heads = first("hidden_size", "n_embd", "d_model"), first("num_attention_heads", "num_heads", "n_head")
    kinds = getattr(text, "layer_types", None) or getattr(text, "attention_layers", None)  # gemma3 / gpt-neo
    window = first("sliding_window", "window_size")
    windows = tuple(window if kind in ("sliding_attention", "local") else None for kind in kinds) if kinds else (None,)
    shape = ModelShape(
        layers=config_layers(config),
        hidden=hidden,
        heads=heads,
        kv_heads=first("num_key_value_heads", default=heads),
        head_dim=first("head_dim", default=hidden // max(1, heads)),
        intermediate=first("intermediate_size", "n_inner", "ffn_dim", default=4 * hidden),
        vocab=first("vocab_size"),
        context=first("max_position_embeddings", "n_positions", "seq_length") or None,
        params=0,
        tied=bool(getattr(text, "tie_word_embeddings", True)),
        mlp_matrices=3 if text.model_type in GATED_MLP else 2,
        windows=windows or (None,),
        positions=first("max_position_embeddings", default=0) if text.model_type in ("gpt2", "gpt_neo") else 0,
    )
    return replace(shape, params=params or shape.computed_params())


def segment_flops(
    dims: ModelDims, cached: np.ndarray | int, new: np.ndarray | int, copies: Sequence[float] | None = None
) -> np.ndarray:
    """Matmul FLOPs of running ``new[i]`` tokens through every layer after ``cached[i]`` tokens already in
    its cache (one causal block: a prefill, or the fed tokens of a decoding, step by step alike), for
    each i ([n] arrays in, [n] out); LM head left out. ``copies[l]``: how many such rows layer l runs
    (the tree engine shares rows below their divergence layer; default 1 everywhere)."""
    cached, new = np.asarray(cached, dtype=np.float64), np.asarray(new, dtype=np.float64)
    total = np.zeros_like(new)
    for layer, (params, window) in enumerate(zip(dims.layer_params, dims.windows)):
        # token t (1-based) of the block attends min(cached + t, window) keys
        if window:
            below = np.clip(window - cached, 0, new)  # tokens whose keys all fit the window
            keys = below * cached + below * (below + 1) / 2 + (new - below) * window
        else:
            keys = new * cached + new * (new + 1) / 2
        per_row = 2.0 * params * new + 4.0 * dims.attention_width * keys
        total += per_row * (1.0 if copies is None else copies[layer])
    return total


def activation_bytes(shape: ModelShape, rows: int, tokens: int, keys: int, dtype_bytes: int) -> int:
    """An estimate of one forward's working set: ``rows`` rows of ``tokens`` new tokens each over
    ``keys`` columns. One layer at a time: the residual stream and its normed copy, q/k/v, the MLP's
    hidden widths, the attention scores (and the mask) if materialised, and the last position's
    logits in fp32 (the engines score the last position only)."""
    per_token = 2 * shape.hidden + (shape.heads + 2 * shape.kv_heads) * shape.head_dim
    per_token += (shape.mlp_matrices - 1) * shape.intermediate
    scores = rows * (shape.heads + 1) * tokens * keys  # [rows, heads, tokens, keys] + the mask
    return (rows * tokens * per_token + scores) * dtype_bytes + rows * shape.vocab * 4


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
