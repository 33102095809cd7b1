"""The attention hooks: where interventions meet the model.

* Models that dispatch attention through transformers' ``AttentionInterface`` (llama, gemma3,
  qwen2, starcoder2, mistral, gpt2, gpt_neox, ...) are switched to our implementation names
  ``icl_sdpa`` / ``icl_eager``. Those wrap the stock function and, at a layer where the active
  ``ColumnMask`` applies (looked up by ``module.layer_idx``), remove the hidden columns from the
  attention mask; where a ``ColumnDrop`` applies, they drop the pruned columns from it. A mask
  function of the same name is registered in ``AttentionMaskInterface`` that always
  materialises the mask: SDPA's "no mask needed, use is_causal" shortcut would otherwise hand
  us ``None`` and the hiding would be silently lost. Where the active mask says that the first
  rows of a layer see only a narrow window of columns (``narrow_attention``), the SDPA wrapper runs
  those rows over the window alone.
* GPT-Neo and Bloom compute attention inline: ``legacy.py`` covers them with module hooks.
* ``AttentionAblation`` is a forward hook on every attention sublayer, for every family.
* Patches and readings (``patches.py``) are carried out by ``patch_hooks``, hooked on the decoder body.

A position whose every visible column is hidden (a hidden token at the very start of a prompt
without BOS) attends to nothing: its attention output is zero. Nothing visible ever reads that
position at a masked layer, so this only keeps it free of NaNs. Left padding positions, which
attend to nothing at any layer, get the same treatment (one visible column for the kernel, a
zero output), so a kernel that returns NaN for a fully masked row cannot poison real rows.
"""

from __future__ import annotations

import sys
from collections.abc import Callable

import torch
from torch import nn
from transformers import AttentionInterface, masking_utils
from transformers.masking_utils import AttentionMaskInterface
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

from . import legacy
from .interventions import PREPARED_FLAG, active, is_prepared
from .mask_surgery import keep_blind_rows_finite, zero_dead_rows
from .narrow_attention import attend_narrow
from .patch_hooks import install_patch_hooks
from .structure import attention_module, decoder_layers

IMPLEMENTATIONS = {"sdpa": "icl_sdpa", "eager": "icl_eager"}


def _stock_attention(module: nn.Module, base: str) -> Callable:
    """The function the model would use for ``base``: its own eager, or transformers' SDPA."""
    if base == "eager":
        modeling = sys.modules[type(module).__module__]
        fn = getattr(modeling, "eager_attention_forward", None)
        if fn is None:
            raise RuntimeError(f"{type(module).__name__} has no module-level eager_attention_forward")
        return fn
    return ALL_ATTENTION_FUNCTIONS["sdpa"]


def _make_attention(base: str) -> Callable:
    def attention(module, query, key, value, attention_mask, **kwargs):
        stock = _stock_attention(module, base)
        state = active()
        layer = getattr(module, "layer_idx", None)
        drop = state.drop if state.drop is not None and state.drop.applies_to(layer) else None
        mask = state.mask if state.mask is not None and state.mask.applies_to(layer) else None
        if drop is None and mask is None:
            # one query position is the token just fed, which sees itself: only a prefill (several
            # positions) can hold left padding rows that see nothing
            if attention_mask is None or attention_mask.dim() != 4 or attention_mask.shape[-2] == 1:
                return stock(module, query, key, value, attention_mask, **kwargs)
            attention_mask, blind = keep_blind_rows_finite(attention_mask)  # left padding rows
            out, weights = stock(module, query, key, value, attention_mask, **kwargs)
            return zero_dead_rows(out, weights, blind)
        if attention_mask is None:  # never drop the hiding silently
            raise RuntimeError("intervened layer received no attention mask; the mask function was bypassed")
        if drop is not None:  # the mask spans every prompt column; this layer's cache lacks the pruned ones
            attention_mask = drop.without_dropped_columns(attention_mask)
            if attention_mask.shape[-1] != key.shape[-2]:
                raise RuntimeError(
                    f"pruned layer {layer}: mask has {attention_mask.shape[-1]} columns, cache {key.shape[-2]}"
                )
            attention_mask, blind = keep_blind_rows_finite(attention_mask)
            out, weights = stock(module, query, key, value, attention_mask, **kwargs)
            return zero_dead_rows(out, weights, blind)
        assert mask is not None and layer is not None  # applies_to() holds only for a layer index
        hidden_mask, dead = mask.apply(attention_mask, layer, n_heads=query.shape[1])
        narrow = mask.narrow_at(layer)
        if narrow is not None and base == "sdpa":  # (eager returns weights over every column: it reads all)
            if kwargs.get("position_bias") is not None:  # one per column: the window would need its own
                raise RuntimeError("narrow attention rows with a position bias are not supported")
            return attend_narrow(stock, module, query, key, value, hidden_mask, dead, narrow, **kwargs)
        out, weights = stock(module, query, key, value, hidden_mask, **kwargs)
        return zero_dead_rows(out, weights, dead)

    attention.__name__ = f"icl_{base}_attention"
    return attention


def _make_mask(base: str) -> Callable:
    def sdpa_mask(*args, **kwargs):
        kwargs["allow_is_causal_skip"] = False
        return masking_utils.sdpa_mask(*args, **kwargs)

    def eager_mask(*args, **kwargs):
        return masking_utils.eager_mask(*args, **kwargs)

    return sdpa_mask if base == "sdpa" else eager_mask


# Registered once, when this module is imported (transformers' documented extension point).
for _base, _name in IMPLEMENTATIONS.items():
    AttentionInterface.register(_name, _make_attention(_base))
    AttentionMaskInterface.register(_name, _make_mask(_base))


def _ablation_hook(layer_idx: int, residual_in_output: bool):
    def hook(module, args, kwargs, output):
        ablation = active().ablation
        if ablation is None or not ablation.applies_to(layer_idx):
            return output
        attn_out = output[0] if isinstance(output, tuple) else output
        if residual_in_output:  # Bloom adds the residual inside its attention module
            residual = kwargs["residual"] if "residual" in kwargs else args[1]
            new = residual.clone()
        else:
            new = torch.zeros_like(attn_out)
        if isinstance(output, tuple):
            return (new,) + tuple(output[1:])
        return new

    return hook


def prepare_model(model: nn.Module) -> nn.Module:
    """Make ``model`` obey interventions. Idempotent; with none active it behaves as before."""
    if is_prepared(model):
        return model
    adapter = legacy.adapter_for(model)
    layers = decoder_layers(model)
    if adapter is not None:
        adapter.install(model, layers)
    else:
        current = model.config._attn_implementation  # pyright: ignore[reportAttributeAccessIssue]
        base = "eager" if current in ("eager", "icl_eager") else "sdpa"
        if current not in ("sdpa", "eager", "icl_sdpa", "icl_eager", None):
            raise RuntimeError(
                f"attention implementation {current!r} is not supported for masking; load with sdpa or eager"
            )
        model.set_attn_implementation(IMPLEMENTATIONS[base])  # pyright: ignore[reportCallIssue]
    for idx, layer in enumerate(layers):
        attention_module(layer).register_forward_hook(
            _ablation_hook(idx, residual_in_output=adapter is not None and adapter.residual_in_attention),
            with_kwargs=True,
        )
    install_patch_hooks(model)
    setattr(model, PREPARED_FLAG, True)
    return model


def serves_narrow_rows(model: nn.Module) -> bool:
    """True where the attention honours ``NarrowRows`` (our SDPA wrapper): rows it names read no column
    before the window, so a cache may leave those unwritten."""
    return getattr(model.config, "_attn_implementation", None) == IMPLEMENTATIONS["sdpa"]


def inline_attention(model: nn.Module) -> bool:
    """True for families that compute attention inline (covered by ``legacy``, not by AttentionInterface)."""
    return legacy.adapter_for(model) is not None
