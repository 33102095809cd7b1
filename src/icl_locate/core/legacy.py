"""The one adapter for architectures that compute attention inline (GPT-Neo, Bloom).

They do not dispatch through ``AttentionInterface``, so we hook their attention modules:
a forward pre-hook removes the hidden columns from the additive attention mask they receive,
and a forward hook gives rows that were left with nothing visible the output of attending to
nothing (the output projection's bias; plus the residual, which Bloom adds inside the module).

Adding another such architecture = one more entry in ``ADAPTERS``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn

from .interventions import active
from .structure import attention_module


@dataclass(frozen=True)
class LegacyAdapter:
    model_type: str
    inner_attention: Callable[[nn.Module], nn.Module]  # decoder layer -> module that takes attention_mask
    out_proj: str  # name of the output projection inside that module
    mask_arg_index: int  # position of attention_mask when passed positionally
    residual_in_attention: bool  # the attention module returns residual + attention (Bloom)

    def install(self, model: nn.Module, layers: nn.ModuleList) -> None:
        for idx, layer in enumerate(layers):
            module = self.inner_attention(layer)
            module.register_forward_pre_hook(self._pre_hook(idx), with_kwargs=True)
            module.register_forward_hook(self._post_hook(idx), with_kwargs=True)

    def _pre_hook(self, layer_idx: int):
        def hook(module, args, kwargs):
            module._icl_dead = None
            mask_plan = active().mask
            if mask_plan is None or not mask_plan.applies_to(layer_idx):
                return None
            in_kwargs = "attention_mask" in kwargs
            mask = kwargs["attention_mask"] if in_kwargs else args[self.mask_arg_index]
            if mask is None:
                raise RuntimeError(f"{type(module).__name__} received no attention mask at a masked layer")
            mask, module._icl_dead = mask_plan.apply(mask, layer_idx)
            if in_kwargs:
                kwargs["attention_mask"] = mask
            else:
                args = args[: self.mask_arg_index] + (mask,) + args[self.mask_arg_index + 1:]
            return args, kwargs

        return hook

    def _post_hook(self, layer_idx: int):
        def hook(module, args, kwargs, output):
            dead = getattr(module, "_icl_dead", None)
            module._icl_dead = None
            if dead is None:
                return output
            out, weights = output[0], output[1]
            nothing = getattr(module, self.out_proj).bias
            nothing = torch.zeros_like(out) + (nothing if nothing is not None else 0.0)
            if self.residual_in_attention:
                nothing = nothing + (kwargs["residual"] if "residual" in kwargs else args[1])
            out = torch.where(dead[:, :, None], nothing, out)
            if weights is not None:
                weights = weights.masked_fill(dead[:, None, :, None], 0.0)
            return (out, weights) + tuple(output[2:])

        return hook


ADAPTERS: dict[str, LegacyAdapter] = {
    "gpt_neo": LegacyAdapter(
        model_type="gpt_neo",
        inner_attention=lambda layer: layer.attn.attention,
        out_proj="out_proj",
        mask_arg_index=1,
        residual_in_attention=False,
    ),
    "bloom": LegacyAdapter(
        model_type="bloom",
        inner_attention=attention_module,
        out_proj="dense",
        mask_arg_index=3,
        residual_in_attention=True,
    ),
}


def adapter_for(model: nn.Module) -> LegacyAdapter | None:
    return ADAPTERS.get(getattr(model.config, "model_type", ""))
