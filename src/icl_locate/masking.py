"""Layer-from context masking and whole-layer attention ablation.

The paper's intervention: in every layer >= j no position may attend to the hidden token
columns (instructions and/or examples and/or query); layers < j run untouched; hidden tokens
keep their positions, and the tokens themselves are still processed (their own states are
simply never read at masked layers).

How it is wired in:

* Models that dispatch attention through transformers' ``AttentionInterface`` (llama, gemma3,
  qwen2, starcoder2, mistral, gpt2, gpt_neox, ...) are switched to our implementation names
  ``icl_sdpa`` / ``icl_eager``. Those wrap the stock function and, for a layer in the active
  plan (looked up by ``module.layer_idx``), remove the hidden columns from the attention mask.
  A mask function of the same name is registered in ``AttentionMaskInterface`` that always
  materialises the mask: SDPA's "no mask needed, use is_causal" shortcut would otherwise hand
  us ``None`` and the hiding would be silently lost.
* GPT-Neo and Bloom compute attention inline; ``legacy.py`` covers them with module hooks.

A position whose every visible column is hidden (a hidden token at the very start of a prompt
without BOS) attends to nothing: its attention output is zero. Nothing visible ever reads that
position at a masked layer, so this only keeps it free of NaNs.

The active plan is a context variable, so a plan never leaks out of its ``with`` block.
"""

from __future__ import annotations

import contextlib
import contextvars
import sys
from dataclasses import dataclass, field
from typing import Callable, Iterator, Sequence

import torch
from torch import nn

from .errors import UserError

Range = tuple[int, int]


# --------------------------------------------------------------------------- conditions

@dataclass(frozen=True)
class Condition:
    """A named masking condition of the paper: which prompt parts are hidden."""

    name: str
    paper_code: str
    parts: frozenset[str]  # subset of {"instructions", "examples", "query"}
    all_but_last: bool = False
    description: str = ""


CONDITIONS: dict[str, Condition] = {
    c.name: c
    for c in (
        Condition("baseline", "baseline", frozenset(), description="nothing hidden"),
        Condition("instructions+examples", "TTF", frozenset({"instructions", "examples"}),
                  description="hide the instructions and the in-context examples"),
        Condition("examples", "FTF", frozenset({"examples"}), description="hide the examples only"),
        Condition("query", "FFT", frozenset({"query"}), description="hide the test query only"),
        Condition("instructions+examples+query", "TTT", frozenset({"instructions", "examples", "query"}),
                  description="hide instructions, examples and query"),
        Condition("instructions", "TF", frozenset({"instructions"}), description="hide the instructions only"),
        Condition("all-but-last", "mask_all", frozenset(), all_but_last=True,
                  description="hide every prompt token but BOS and the last one"),
    )
}


def get_condition(name: str) -> Condition:
    """Look a condition up by its name or by the paper's code (TTF, FTF, ...)."""
    for cond in CONDITIONS.values():
        if name in (cond.name, cond.paper_code):
            return cond
    raise UserError(f"unknown condition {name!r}; choose from: {', '.join(CONDITIONS)}")


def hidden_ranges(condition: Condition, spans: dict[str, Range | None], prompt_len: int) -> list[Range]:
    """Token ranges [start, end) hidden by ``condition`` for one prompt.

    ``spans`` maps "bos", "instructions", "examples", "query" to token ranges (None if absent).
    BOS is never hidden.
    """
    if condition.all_but_last:
        bos = spans.get("bos")
        start = bos[1] if bos else 0
        return [(start, prompt_len - 1)] if prompt_len - 1 > start else []
    ranges = [spans[p] for p in ("instructions", "examples", "query") if p in condition.parts and spans.get(p)]
    return merge_ranges([r for r in ranges if r[1] > r[0]])


def merge_ranges(ranges: Sequence[Range]) -> list[Range]:
    """Sort and merge overlapping/adjacent ranges."""
    merged: list[list[int]] = []
    for start, end in sorted(ranges):
        if merged and start <= merged[-1][1]:
            merged[-1][1] = max(merged[-1][1], end)
        else:
            merged.append([start, end])
    return [(a, b) for a, b in merged]


# --------------------------------------------------------------------------- plans

@dataclass(frozen=True)
class MaskPlan:
    """What to hide, from whom, and where.

    hidden: per batch row, the token column ranges [start, end) to hide, in the coordinates of
        the batch as fed to the model (left padding included).
    layers: the layers where hiding applies (for every row, unless ``row_layers`` is given).
    ablate: layers whose whole attention sublayer is removed (adds nothing to the residual).
    row_layers: optional per-row layer sets, so that one batch can mix rows masked from
        different layers (the fast engine decodes (sentence, layer) rows together).
    pruned_layers, dropped: context-pruned inference (pruning.py). At ``pruned_layers`` the
        cache does not hold the columns ``dropped[row]`` (one range per row, the same width in
        every row); the attention mask, built over all prompt columns, loses them there too.
    """

    hidden: tuple[tuple[Range, ...], ...] = ()
    layers: frozenset[int] = frozenset()
    ablate: frozenset[int] = frozenset()
    row_layers: tuple[frozenset[int], ...] | None = None
    pruned_layers: frozenset[int] = frozenset()
    dropped: tuple[Range, ...] = ()
    _cache: dict = field(default_factory=dict, compare=False, repr=False)

    @classmethod
    def from_layer(cls, hidden: Sequence[Sequence[Range]], from_layer: int, num_layers: int) -> "MaskPlan":
        """The paper's plan: hide ``hidden`` in every layer >= ``from_layer``."""
        if not 0 <= from_layer <= num_layers:
            raise ValueError(f"from_layer must be in 0..{num_layers}, got {from_layer}")
        return cls(hidden=_freeze(hidden), layers=frozenset(range(from_layer, num_layers)))

    @classmethod
    def per_row(cls, hidden: Sequence[Sequence[Range]], from_layers: Sequence[int], num_layers: int,
                ablate: frozenset[int] = frozenset()) -> "MaskPlan":
        """Row i hides ``hidden[i]`` in every layer >= ``from_layers[i]``; ``ablate`` applies to all rows."""
        if len(hidden) != len(from_layers):
            raise ValueError("one from_layer per row")
        rows = tuple(frozenset(range(j, num_layers)) for j in from_layers)
        return cls(hidden=_freeze(hidden), layers=frozenset().union(*rows), row_layers=rows, ablate=ablate)

    @classmethod
    def at_layers(cls, hidden: Sequence[Sequence[Range]], layers: Sequence[int]) -> "MaskPlan":
        return cls(hidden=_freeze(hidden), layers=frozenset(layers))

    @classmethod
    def pruned(cls, dropped: Sequence[Range], from_layer: int, num_layers: int) -> "MaskPlan":
        """Row i's columns ``dropped[i]`` are absent from the cache at every layer >= ``from_layer``."""
        widths = {b - a for a, b in dropped}
        if len(widths) > 1:
            raise ValueError(f"dropped ranges must have one width, got {sorted(widths)}")
        return cls(pruned_layers=frozenset(range(from_layer, num_layers)),
                   dropped=_freeze([dropped])[0])

    @classmethod
    def ablation(cls, layers: Sequence[int]) -> "MaskPlan":
        """Remove the attention sublayer of ``layers`` entirely (the paper's 'mask all heads')."""
        return cls(ablate=frozenset(layers))

    def shifted(self, offsets: Sequence[int]) -> "MaskPlan":
        """The same plan with each row's ranges moved right by its left-padding offset."""
        if len(offsets) != len(self.hidden):
            raise ValueError("one offset per batch row")
        if self.dropped:
            raise ValueError("a pruned plan is built in batch columns already")
        hidden = tuple(tuple((a + o, b + o) for a, b in row) for row, o in zip(self.hidden, offsets))
        return MaskPlan(hidden=hidden, layers=self.layers, ablate=self.ablate, row_layers=self.row_layers)

    def select_rows(self, rows: Sequence[int]) -> "MaskPlan":
        row_layers = None if self.row_layers is None else tuple(self.row_layers[i] for i in rows)
        layers = self.layers if row_layers is None else frozenset().union(*row_layers)
        return MaskPlan(hidden=tuple(self.hidden[i] for i in rows) if self.hidden else (), layers=layers,
                        ablate=self.ablate, row_layers=row_layers, pruned_layers=self.pruned_layers,
                        dropped=tuple(self.dropped[i] for i in rows) if self.dropped else ())

    def masks_layer(self, layer: int | None) -> bool:
        return layer is not None and layer in self.layers and any(self.hidden)

    def prunes_layer(self, layer: int | None) -> bool:
        return layer is not None and layer in self.pruned_layers and any(b > a for a, b in self.dropped)

    def without_dropped_columns(self, attention_mask: torch.Tensor) -> torch.Tensor:
        """The 4D mask [B|1, H|1, q, kv] without each row's dropped columns: [B, H|1, q, kv - width]."""
        batch, kv = len(self.dropped), attention_mask.shape[-1]
        width = self.dropped[0][1] - self.dropped[0][0]
        key = ("dropped", kv, str(attention_mask.device))
        index = self._cache.get(key)
        if index is None:
            kept = torch.arange(kv - width)
            starts = torch.tensor([a for a, _ in self.dropped])[:, None]
            index = (kept[None, :] + width * (kept[None, :] >= starts)).to(attention_mask.device)
            self._cache[key] = index
        mask = attention_mask.expand(batch, *attention_mask.shape[1:])
        return mask.gather(-1, index[:, None, None, :].expand(*mask.shape[:-1], kv - width))

    def hidden_columns(self, kv_len: int, device: torch.device, layer: int | None = None) -> torch.Tensor:
        """Bool [batch, kv_len]: True where a column is hidden (at ``layer``, for per-row plans)."""
        key = (kv_len, str(device), layer if self.row_layers is not None else None)
        cols = self._cache.get(key)
        if cols is None:
            cols = torch.zeros(len(self.hidden), kv_len, dtype=torch.bool)
            for row, ranges in enumerate(self.hidden):
                if self.row_layers is not None and layer not in self.row_layers[row]:
                    continue
                for start, end in ranges:
                    cols[row, max(start, 0):min(end, kv_len)] = True
            cols = cols.to(device)
            self._cache[key] = cols
        return cols


def _freeze(hidden: Sequence[Sequence[Range]]) -> tuple[tuple[Range, ...], ...]:
    out = []
    for row in hidden:
        frozen_row = []
        for start, end in row:
            if not (0 <= start <= end):
                raise ValueError(f"bad hidden range ({start}, {end})")
            frozen_row.append((int(start), int(end)))
        out.append(tuple(frozen_row))
    return tuple(out)


_ACTIVE: contextvars.ContextVar[MaskPlan | None] = contextvars.ContextVar("icl_locate_plan", default=None)


def active_plan() -> MaskPlan | None:
    return _ACTIVE.get()


@contextlib.contextmanager
def apply_plan(model: nn.Module, plan: MaskPlan | None) -> Iterator[None]:
    """Run ``model`` under ``plan`` inside the ``with`` block."""
    if plan is not None and (plan.layers or plan.ablate or plan.pruned_layers):
        if not getattr(model, "_icl_locate_prepared", False):
            raise RuntimeError("model is not prepared for masking: call icl_locate.masking.prepare_model(model)")
        n = num_layers(model)
        bad = sorted(x for x in plan.layers | plan.ablate | plan.pruned_layers if not 0 <= x < n)
        if bad:
            raise ValueError(f"layers {bad} out of range for a model with {n} layers")
    token = _ACTIVE.set(plan)
    try:
        yield
    finally:
        _ACTIVE.reset(token)


# --------------------------------------------------------------------------- mask surgery

def hide_columns(attention_mask: torch.Tensor, hidden: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Remove hidden columns from a 4D attention mask.

    attention_mask: [B|1, H|1, q, kv], bool (True = may attend) or additive float (0 / large negative).
    hidden: bool [B, kv].
    Returns the new mask and ``dead`` (bool [B, q]: rows that could see something before and
    nothing now; None if there are none). Dead rows keep their old mask row so that the kernel
    stays NaN-free; the caller zeroes their output.
    """
    if attention_mask.dim() != 4:
        raise RuntimeError(f"expected a 4D attention mask, got shape {tuple(attention_mask.shape)}")
    kv = attention_mask.shape[-1]
    if hidden.shape[-1] != kv:
        raise RuntimeError(f"hidden columns for {hidden.shape[-1]} keys, mask has {kv}")
    if attention_mask.shape[0] not in (1, hidden.shape[0]):
        raise RuntimeError(f"mask plan has {hidden.shape[0]} rows, batch has {attention_mask.shape[0]}")
    if attention_mask.dtype == torch.bool:
        visible = attention_mask
    else:
        visible = attention_mask > torch.finfo(attention_mask.dtype).min / 2
    hide = hidden[:, None, None, :] & visible
    still_visible = visible & ~hide
    dead = visible.any(-1) & ~still_visible.any(-1)  # [B, H|1, q]
    if dead.any():
        hide = hide & ~dead[..., None]
        dead_rows = dead.any(1)
    else:
        dead_rows = None
    if attention_mask.dtype == torch.bool:
        new_mask = attention_mask & ~hide
    else:
        new_mask = attention_mask.masked_fill(hide, torch.finfo(attention_mask.dtype).min)
    return new_mask, dead_rows


def zero_dead_rows(attn_output: torch.Tensor, attn_weights: torch.Tensor | None, dead: torch.Tensor | None):
    """Zero attention output ([B, q, H, D]) and weights ([B, H, q, kv]) of dead query rows."""
    if dead is None:
        return attn_output, attn_weights
    attn_output = attn_output.masked_fill(dead[:, :, None, None], 0.0)
    if attn_weights is not None:
        attn_weights = attn_weights.masked_fill(dead[:, None, :, None], 0.0)
    return attn_output, attn_weights


# --------------------------------------------------------------------------- AttentionInterface wiring

IMPLEMENTATIONS = {"sdpa": "icl_sdpa", "eager": "icl_eager"}


def _stock_attention(module: nn.Module, base: str) -> Callable:
    """The function the model would use for ``base``: its own eager, or transformers' SDPA."""
    if base == "eager":
        modeling = sys.modules[type(module).__module__]
        fn = getattr(modeling, "eager_attention_forward", None)
        if fn is None:
            raise RuntimeError(f"{type(module).__name__} has no module-level eager_attention_forward")
        return fn
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    return ALL_ATTENTION_FUNCTIONS["sdpa"]


def _make_attention(base: str) -> Callable:
    def attention(module, query, key, value, attention_mask, **kwargs):
        stock = _stock_attention(module, base)
        plan = _ACTIVE.get()
        layer = getattr(module, "layer_idx", None)
        if plan is None or not (plan.masks_layer(layer) or plan.prunes_layer(layer)):
            return stock(module, query, key, value, attention_mask, **kwargs)
        if attention_mask is None:  # never drop the hiding silently
            raise RuntimeError("masked layer received no attention mask; the mask function was bypassed")
        if plan.prunes_layer(layer):
            if plan.masks_layer(layer):
                raise RuntimeError("a plan cannot both prune and mask the same layer")
            # The mask spans every prompt column; this layer's cache lacks the pruned ones.
            attention_mask = plan.without_dropped_columns(attention_mask)
            if attention_mask.shape[-1] != key.shape[-2]:
                raise RuntimeError(f"pruned layer {layer}: mask has {attention_mask.shape[-1]} columns, "
                                   f"cache {key.shape[-2]}")
            return stock(module, query, key, value, attention_mask, **kwargs)
        hidden = plan.hidden_columns(attention_mask.shape[-1], attention_mask.device, module.layer_idx)
        mask, dead = hide_columns(attention_mask, hidden)
        out, weights = stock(module, query, key, value, mask, **kwargs)
        return zero_dead_rows(out, weights, dead)

    attention.__name__ = f"icl_{base}_attention"
    return attention


def _make_mask(base: str) -> Callable:
    from transformers import masking_utils

    if base == "sdpa":
        def mask(*args, **kwargs):
            kwargs["allow_is_causal_skip"] = False
            return masking_utils.sdpa_mask(*args, **kwargs)
    else:
        def mask(*args, **kwargs):
            return masking_utils.eager_mask(*args, **kwargs)
    return mask


_REGISTERED = False


def register_attention() -> None:
    """Register icl_sdpa / icl_eager with transformers (idempotent)."""
    global _REGISTERED
    if _REGISTERED:
        return
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    for base, name in IMPLEMENTATIONS.items():
        AttentionInterface.register(name, _make_attention(base))
        AttentionMaskInterface.register(name, _make_mask(base))
    _REGISTERED = True


# --------------------------------------------------------------------------- model structure

LAYER_LIST_NAMES = ("layers", "h", "blocks")
ATTENTION_NAMES = ("self_attn", "self_attention", "attn", "attention")


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    """The model's list of decoder blocks (found generically, no per-model code)."""
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


def num_layers(model: nn.Module) -> int:
    config = model.config
    config = getattr(config, "text_config", None) or config
    for attr in ("num_hidden_layers", "num_layers", "n_layer"):
        if isinstance(getattr(config, attr, None), int):
            return getattr(config, attr)
    raise RuntimeError(f"cannot tell the number of layers of {type(model).__name__}")


def _ablation_hook(layer_idx: int, residual_in_output: bool):
    def hook(module, args, kwargs, output):
        plan = _ACTIVE.get()
        if plan is None or layer_idx not in plan.ablate:
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
    """Make ``model`` obey mask plans. Idempotent; without an active plan it behaves as before."""
    from . import legacy

    if getattr(model, "_icl_locate_prepared", False):
        return model
    register_attention()
    adapter = legacy.adapter_for(model)
    layers = decoder_layers(model)
    if adapter is not None:
        adapter.install(model, layers)
    else:
        current = model.config._attn_implementation
        base = "eager" if current in ("eager", "icl_eager") else "sdpa"
        if current not in ("sdpa", "eager", "icl_sdpa", "icl_eager", None):
            raise RuntimeError(
                f"attention implementation {current!r} is not supported for masking; load with sdpa or eager")
        model.set_attn_implementation(IMPLEMENTATIONS[base])
    for idx, layer in enumerate(layers):
        attention_module(layer).register_forward_hook(
            _ablation_hook(idx, residual_in_output=adapter is not None and adapter.residual_in_attention),
            with_kwargs=True,
        )
    model._icl_locate_prepared = True
    return model
