"""The reference engine: plain greedy decoding of one full prompt under a mask plan.

Written to be obviously right; it is the oracle the fast engine is tested against.
Each step feeds the model the whole sequence so far (``use_cache=False``), or the prompt once
and then one token at a time through a plain ``DynamicCache`` (``use_cache=True``, the
default; tested equal). The cache is a plain DynamicCache, never a sliding-window one, so key
columns always keep their absolute positions and the hidden column indices stay valid.
"""

from __future__ import annotations

import functools
import inspect
from dataclasses import dataclass
from typing import Sequence

import torch
from torch import nn

from .masking import MaskPlan, Range, apply_plan, num_layers


@dataclass
class Generation:
    token_ids: list[int]
    text: str  # decoded continuation (stop string included, if one was hit)
    finish: str  # "stop", "eos" or "length"


def position_ids_for(attention_mask: torch.Tensor) -> torch.Tensor:
    """Positions that ignore left padding: the first real token is position 0."""
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)


def _accepts(model: nn.Module, name: str) -> bool:
    # A PEFT wrapper passes keyword arguments through to the model it wraps: ask that one.
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return name in _forward_parameters(type(base))


@functools.lru_cache(maxsize=None)
def _forward_parameters(model_class: type) -> frozenset[str]:
    """Keyword names of a model class's forward, looked up once (forward runs at every decode step)."""
    return frozenset(inspect.signature(model_class.forward).parameters)


def _cache_kwarg(model: nn.Module) -> str:
    """transformers 5.x renames ``past_key_values`` to ``cache``, model by model."""
    return "cache" if _accepts(model, "cache") else "past_key_values"


@torch.no_grad()
def forward(model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
            cache=None, plan: MaskPlan | None = None, output_attentions: bool = False, last_only: bool = False):
    """One forward pass under ``plan``, with padding-aware positions.

    ``attention_mask`` is the 2D padding mask over all tokens so far (cache included).
    ``last_only`` asks for logits at the last position only (saves a vocabulary-sized matmul
    per prompt token where the model supports ``logits_to_keep``).
    """
    if attention_mask is None:
        past = cache.get_seq_length() if cache is not None else 0
        attention_mask = torch.ones(input_ids.shape[0], past + input_ids.shape[1], dtype=torch.long,
                                    device=input_ids.device)
    kwargs = dict(input_ids=input_ids, attention_mask=attention_mask, use_cache=cache is not None)
    if cache is not None:
        kwargs[_cache_kwarg(model)] = cache
    if _accepts(model, "position_ids"):
        kwargs["position_ids"] = position_ids_for(attention_mask)[:, -input_ids.shape[1]:]
    if output_attentions:
        kwargs["output_attentions"] = True
    if last_only and _accepts(model, "logits_to_keep"):
        kwargs["logits_to_keep"] = 1
    with apply_plan(model, plan):
        return model(**kwargs)


def eos_ids(model: nn.Module, tokenizer) -> set[int]:
    ids = set()
    for source in (getattr(model, "generation_config", None), model.config):
        value = getattr(source, "eos_token_id", None) if source is not None else None
        ids.update(value if isinstance(value, (list, tuple)) else [value] if value is not None else [])
    if tokenizer is not None and tokenizer.eos_token_id is not None:
        ids.add(tokenizer.eos_token_id)
    return ids


def plan_for_prompt(hidden: Sequence[Range], layers: Sequence[int] = (), ablate: Sequence[int] = ()) -> MaskPlan:
    """A one-row plan: hide ``hidden`` at ``layers``, ablate the attention of ``ablate``."""
    return MaskPlan(hidden=(tuple(hidden),), layers=frozenset(layers), ablate=frozenset(ablate))


@torch.no_grad()
def greedy_decode(model: nn.Module, tokenizer, prompt_ids: Sequence[int], plan: MaskPlan | None = None,
                  stop_strings: Sequence[str] = (), max_new_tokens: int = 50, use_cache: bool = True) -> Generation:
    """Greedy decoding of one prompt under ``plan`` (a one-row plan, or None for no intervention).

    Stops at EOS, at ``max_new_tokens``, or once the decoded continuation contains a stop string.
    """
    from transformers import DynamicCache

    if plan is not None and plan.hidden and len(plan.hidden) != 1:
        raise ValueError("greedy_decode takes a one-row plan")
    device = next(model.parameters()).device
    eos = eos_ids(model, tokenizer)
    ids = torch.tensor([list(prompt_ids)], device=device)
    cache = DynamicCache() if use_cache else None
    step_input = ids
    new: list[int] = []
    finish = "length"
    for _ in range(max_new_tokens):
        out = forward(model, step_input, cache=cache, plan=plan, last_only=True)
        token = int(out.logits[0, -1].argmax())
        if token in eos:
            finish = "eos"
            break
        new.append(token)
        ids = torch.cat([ids, ids.new_tensor([[token]])], dim=1)
        step_input = ids[:, -1:] if use_cache else ids
        if stop_strings and any(s in tokenizer.decode(new) for s in stop_strings):
            finish = "stop"
            break
    text = tokenizer.decode(new, skip_special_tokens=True) if tokenizer is not None else ""
    return Generation(token_ids=new, text=text, finish=finish)


def layer_range(model: nn.Module, from_layer: int) -> range:
    """The layers masked when masking 'from layer j' (empty when j == number of layers)."""
    return range(from_layer, num_layers(model))


@dataclass
class Prediction:
    """One test item decoded under one (condition, from_layer)."""

    example_id: str
    condition: str
    from_layer: int
    prompt: str
    prompt_token_ids: list[int]
    masked_token_ranges: list[Range]
    masked_layers: list[int]
    raw_generation: str
    generation: str
    reference: str
    finish: str
    in_context_example_ids: list[str]


def predict(loaded, task, items, condition, from_layer: int, max_new_tokens: int | None = None,
            use_cache: bool = True, progress=None) -> list[Prediction]:
    """Decode every prompted item under ``condition`` masked from ``from_layer`` (reference engine)."""
    from .masking import hidden_ranges
    from .tasks import post_process

    model, tokenizer = loaded.model, loaded.tokenizer
    layers = list(layer_range(model, from_layer))
    out = []
    for item in items:
        enc = item.encoded
        ranges = hidden_ranges(condition, enc.spans, len(enc.ids)) if layers else []
        plan = plan_for_prompt(ranges, layers=layers if ranges else ())
        gen = greedy_decode(model, tokenizer, enc.ids, plan, stop_strings=task.stop_strings,
                            max_new_tokens=max_new_tokens or task.max_new_tokens, use_cache=use_cache)
        out.append(Prediction(
            example_id=item.item.id, condition=condition.name, from_layer=from_layer, prompt=enc.text,
            prompt_token_ids=list(enc.ids), masked_token_ranges=[list(r) for r in ranges],
            masked_layers=layers if ranges else [], raw_generation=gen.text,
            generation=post_process(task, gen.text), reference=item.item.target, finish=gen.finish,
            in_context_example_ids=list(enc.example_ids)))
        if progress is not None:
            progress(len(out), len(items))
    return out
