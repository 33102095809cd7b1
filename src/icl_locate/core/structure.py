"""Where a model keeps its decoder layers and their attention, found generically (no per-model code)."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

LAYER_LIST_NAMES = ("layers", "h", "blocks")
ATTENTION_NAMES = ("self_attn", "self_attention", "attn", "attention")
OUTPUT_PROJECTION_NAMES = ("o_proj", "out_proj", "dense", "c_proj")
HEAD_COUNT_NAMES = ("num_attention_heads", "num_heads", "n_head")


def decoder_config(config: Any) -> Any:
    """The config that describes the decoder (multimodal models nest it as ``text_config``).

    Any: a transformers config, whose fields differ from one architecture to the next."""
    return getattr(config, "text_config", None) or config


def text_config(model: nn.Module) -> Any:
    return decoder_config(model.config)


def logit_softcap(model: nn.Module) -> float | None:
    """The cap c of the model's final logits, squashed to c * tanh(z / c) (Gemma 2 and 3's
    ``final_logit_softcapping``), or None where the model leaves them as they are."""
    return getattr(text_config(model), "final_logit_softcapping", None) or None


def softcapped(logits: torch.Tensor, cap: float | None, in_place: bool = False) -> torch.Tensor:
    """The logits squashed as the model squashes its final ones (``logit_softcap``; None: as they are).
    ``in_place`` writes into ``logits``: on a vocabulary-sized product that is one pass over memory, not
    three fresh tensors of its size."""
    if not cap:
        return logits
    if in_place:
        return logits.div_(cap).tanh_().mul_(cap)
    return torch.tanh(logits / cap) * cap


def config_layers(config) -> int:
    """Number of decoder layers a config describes."""
    config = decoder_config(config)
    for attr in ("num_hidden_layers", "num_layers", "n_layer"):
        if isinstance(getattr(config, attr, None), int):
            return getattr(config, attr)
    raise RuntimeError(f"cannot tell the number of layers of a {type(config).__name__}")


def num_layers(model: nn.Module) -> int:
    return config_layers(model.config)


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    """The model's list of decoder blocks."""
    n = num_layers(model)
    for name, module in model.named_modules():
        if isinstance(module, nn.ModuleList) and len(module) == n and name.split(".")[-1] in LAYER_LIST_NAMES:
            return module
    raise RuntimeError(f"could not find the {n} decoder layers of {type(model).__name__}")


def decoder_body(model: nn.Module) -> nn.Module:
    """The module that runs the decoder layers (LlamaModel, GPTNeoModel, ...): its forward receives
    every forward's input ids, 2D attention mask and cache, whoever calls it."""
    n = num_layers(model)
    for name, module in model.named_modules():
        if isinstance(module, nn.ModuleList) and len(module) == n and name.split(".")[-1] in LAYER_LIST_NAMES:
            return model.get_submodule(name.rpartition(".")[0])
    raise RuntimeError(f"could not find the {n} decoder layers of {type(model).__name__}")


FINAL_NORM_NAMES = ("norm", "ln_f", "final_layernorm", "final_layer_norm")  # after the last layer, by family


def final_norm(model: nn.Module) -> nn.Module:
    """The norm the decoder body applies after its last layer (what the LM head reads; the logit lens
    applies it to earlier layers' states too)."""
    body = decoder_body(model)
    for name in FINAL_NORM_NAMES:
        module = getattr(body, name, None)
        if isinstance(module, nn.Module):
            return module
    raise ValueError(f"{type(model).__name__}: no final norm found (looked for {', '.join(FINAL_NORM_NAMES)})")


def num_heads(model: nn.Module) -> int:
    """Number of query heads per attention layer."""
    config = text_config(model)
    for attr in HEAD_COUNT_NAMES:
        if isinstance(getattr(config, attr, None), int):
            return getattr(config, attr)
    raise RuntimeError(f"cannot tell the number of attention heads of a {type(config).__name__}")


def output_projection(attention: nn.Module) -> nn.Module:
    """The attention's output projection (o_proj, out_proj, dense or c_proj): its input is the heads'
    outputs side by side, [B, T, H * D] with head h in columns [h*D, (h+1)*D)."""
    found = [m for name, m in attention.named_modules() if name.split(".")[-1] in OUTPUT_PROJECTION_NAMES]
    if len(found) != 1:
        raise RuntimeError(f"{type(attention).__name__} has {len(found)} output projections, not one")
    return found[0]


def attention_module(layer: nn.Module) -> nn.Module:
    for name in ATTENTION_NAMES:
        sub = getattr(layer, name, None)
        if isinstance(sub, nn.Module):
            return sub
    raise RuntimeError(f"could not find the attention sublayer of {type(layer).__name__}")


def attention_window(model: nn.Module) -> int | None:
    """The narrowest sliding window any layer attends within, in columns (None: every layer sees
    the whole sequence). Read from ``layer_types`` (transformers' per-layer list), GPT-Neo's
    ``attention_layers``/``window_size``, or a model-wide ``sliding_window``; a config that names
    sliding layers without a window size, or chunked attention (``attention_chunk_size``, whose
    chunk borders are counted in columns), gives 0 (no room for holes)."""
    config = text_config(model)
    types = getattr(config, "layer_types", None) or getattr(config, "attention_layers", None)
    if getattr(config, "attention_chunk_size", None) or "chunked_attention" in (types or ()):
        return 0  # chunked attention (Llama 4): holes would move the chunk borders
    if types is not None:
        if not any(t in ("sliding_attention", "local") for t in types):
            return None
        return getattr(config, "sliding_window", None) or getattr(config, "window_size", None) or 0
    return getattr(config, "sliding_window", None)
