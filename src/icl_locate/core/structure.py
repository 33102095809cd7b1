"""Where a model keeps its decoder layers and their attention, found generically (no per-model code)."""

from __future__ import annotations

from typing import Any

from torch import nn

LAYER_LIST_NAMES = ("layers", "h", "blocks")
ATTENTION_NAMES = ("self_attn", "self_attention", "attn", "attention")


def decoder_config(config: Any) -> Any:
    """The config that describes the decoder (multimodal models nest it as ``text_config``).

    Any: a transformers config, whose fields differ from one architecture to the next."""
    return getattr(config, "text_config", None) or config


def text_config(model: nn.Module) -> Any:
    return decoder_config(model.config)


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
