"""Where a model keeps its decoder layers and their attention, found generically (no per-model code)."""

from __future__ import annotations

from torch import nn

LAYER_LIST_NAMES = ("layers", "h", "blocks")
ATTENTION_NAMES = ("self_attn", "self_attention", "attn", "attention")


def text_config(model: nn.Module):
    """The config that describes the decoder (multimodal models nest it as ``text_config``)."""
    return getattr(model.config, "text_config", None) or model.config


def num_layers(model: nn.Module) -> int:
    config = text_config(model)
    for attr in ("num_hidden_layers", "num_layers", "n_layer"):
        if isinstance(getattr(config, attr, None), int):
            return getattr(config, attr)
    raise RuntimeError(f"cannot tell the number of layers of {type(model).__name__}")


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
