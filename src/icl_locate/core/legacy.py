"""The one adapter for architectures that compute attention inline (GPT-Neo, Bloom).

They do not dispatch through ``AttentionInterface``, so we hook their attention modules: a
forward pre-hook removes the hidden columns from the additive attention mask they receive (per
query head when the active mask names heads), and a forward pre-hook on the output projection
zeroes the context of every (row, head, position) left with nothing visible, so such a head
attends to nothing, as in the AttentionInterface families. (The projection's input is the heads'
outputs side by side, head h in columns [h*D, (h+1)*D).)

Adding another such architecture = one more entry in ``ADAPTERS``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

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
            module.register_forward_pre_hook(self._mask_hook(idx), with_kwargs=True)
            getattr(module, self.out_proj).register_forward_pre_hook(self._dead_heads_hook(module))
            module.register_forward_hook(self._dead_weights_hook)

    def _mask_hook(self, layer_idx: int):
        def hook(module, args, kwargs):
            module._icl_dead = None
            mask_plan = active().mask
            if mask_plan is None or not mask_plan.applies_to(layer_idx):
                return None
            in_kwargs = "attention_mask" in kwargs
            mask = kwargs["attention_mask"] if in_kwargs else args[self.mask_arg_index]
            if mask is None:
                raise RuntimeError(f"{type(module).__name__} received no attention mask at a masked layer")
            mask, module._icl_dead = mask_plan.apply(mask, layer_idx, n_heads=module.num_heads)
            if in_kwargs:
                kwargs["attention_mask"] = mask
            else:
                args = args[: self.mask_arg_index] + (mask,) + args[self.mask_arg_index + 1 :]
            return args, kwargs

        return hook

    @staticmethod
    def _dead_heads_hook(attention: nn.Module):
        def hook(proj, args):
            dead = getattr(attention, "_icl_dead", None)  # [B, 1|H, q]
            if dead is None:
                return None
            context = args[0]  # [B, q, H * D]
            b, q, width = context.shape
            heads = context.view(b, q, attention.num_heads, width // attention.num_heads)
            heads = heads.masked_fill(dead.permute(0, 2, 1)[..., None], 0.0)
            return (heads.reshape(b, q, width),) + tuple(args[1:])

        return hook

    @staticmethod
    def _dead_weights_hook(module, args, output):
        """Attention weights (when returned) of dead (row, head, position)s are zero too; then forget them."""
        dead = getattr(module, "_icl_dead", None)
        module._icl_dead = None
        if dead is None or not isinstance(output, tuple) or len(output) < 2 or output[1] is None:
            return output
        return (output[0], output[1].masked_fill(dead[..., None], 0.0)) + tuple(output[2:])


ADAPTERS: dict[str, LegacyAdapter] = {
    "gpt_neo": LegacyAdapter(
        model_type="gpt_neo",
        inner_attention=lambda layer: layer.get_submodule("attn.attention"),
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
