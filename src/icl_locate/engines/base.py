"""What every engine shares: the Engine protocol, a generation, the stop rule, one forward pass.

An engine takes prompts with their hidden columns (``MaskedPrompt``) and row interventions
(``MaskFrom(j)``, ``HeadMask``, ``AblateLayers``, ``PruneFrom(r)``, ``UNCHANGED``) and returns the
greedy generation of every (prompt, intervention) pair. The reference engine (``reference.py``)
decodes them one by one and is obviously right; the fast (``fast.py``), tree (``tree.py``) and
pruned (``pruned.py``) engines are tested against it; ``paper.py`` is the paper's own way, a
baseline for ``bench``.
"""

from __future__ import annotations

import contextlib
import functools
import inspect
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import torch
from torch import nn
from transformers import DynamicCache

from ..core.conditions import MaskedPrompt
from ..core.interventions import BatchIntervention, RowIntervention, intervene
from ..core.structure import text_config
from .timing import synchronizer

ProgressCallback = Callable[[int, int], None]  # (rows done, rows in all)


@dataclass
class Generation:
    token_ids: list[int]
    text: str  # decoded continuation (stop string included, if one was hit)
    finish: str  # "stop", "eos" or "length"


@dataclass(frozen=True)
class StopRule:
    """When greedy decoding ends: EOS (not kept), a stop string in the continuation (kept), or the limit."""

    stop_strings: tuple[str, ...] = ()
    max_new_tokens: int = 50

    def after(self, tokenizer, eos: set[int], generated: list[int], token: int) -> str | None:
        """Take ``token``: append it to ``generated`` unless it is EOS; the finish reason, or None to go on."""
        if token in eos:
            return "eos"
        generated.append(token)
        if self.stop_strings and any(s in tokenizer.decode(generated) for s in self.stop_strings):
            return "stop"
        if len(generated) >= self.max_new_tokens:
            return "length"
        return None

    def cut(self, tokenizer, eos: set[int], token_ids: Sequence[int]) -> list[int]:
        """``token_ids`` as this rule would have ended them (for outputs of decoders without the rule)."""
        out: list[int] = []
        for token in token_ids:
            if self.after(tokenizer, eos, out, token) is not None:
                break
        return out


DEFAULT_STOP = StopRule()  # EOS or the default token limit, no stop strings


ResultKey = tuple[int, RowIntervention]


class Engine(Protocol):
    """Greedy generation of every (prompt index, row intervention) pair."""

    def generate(
        self,
        prompts: Sequence[MaskedPrompt],
        interventions: Sequence[RowIntervention],
        stop: StopRule,
        progress: ProgressCallback | None = None,
    ) -> dict[ResultKey, Generation]: ...


def eos_ids(model: nn.Module, tokenizer) -> set[int]:
    ids = set()
    for source in (getattr(model, "generation_config", None), model.config):
        value = getattr(source, "eos_token_id", None) if source is not None else None
        ids.update(value if isinstance(value, (list, tuple)) else [value] if value is not None else [])
    if tokenizer is not None and tokenizer.eos_token_id is not None:
        ids.add(tokenizer.eos_token_id)
    return ids


@contextlib.contextmanager
def head_timer(model: nn.Module, times: dict) -> Iterator[None]:
    """Add the seconds spent in the LM head to ``times["head"]`` while the block runs (on a GPU
    each call synchronises, which costs a little: it is for the time breakdown)."""
    head = model.get_output_embeddings()  # pyright: ignore[reportCallIssue]
    device = next(model.parameters()).device
    sync = synchronizer(device)
    started: list[float] = []

    def before(module, args):
        sync()
        started.append(time.perf_counter())

    def after(module, args, output):
        sync()
        times["head"] += time.perf_counter() - started.pop()

    handles = [head.register_forward_pre_hook(before), head.register_forward_hook(after)] if head is not None else []
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


def time_breakdown(times: dict) -> dict[str, float]:
    """Seconds by part: context prefill, query prefill, decoding forwards (one token a row) and
    verification forwards (with drafts); across them, LM head and body (everything else in the
    forwards: layers, attention, masks); bookkeeping is the rest."""
    forwards = times["prefix"] + times["query_prefill"] + times["decode_forward"] + times["verification"]
    return dict(
        total=times["total"],
        prefix=times["prefix"],
        query_prefill=times["query_prefill"],
        decode_forward=times["decode_forward"],
        verification=times["verification"],
        head=times["head"],
        body=forwards - times["head"],
        bookkeeping=times["total"] - forwards,
    )


def position_ids_for(attention_mask: torch.Tensor) -> torch.Tensor:
    """Positions that ignore left padding: the first real token is position 0."""
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)


def _accepts(model: nn.Module, name: str) -> bool:
    # A PEFT wrapper passes keyword arguments through to the model it wraps: ask that one.
    base = model.get_base_model() if hasattr(model, "get_base_model") else model  # pyright: ignore[reportCallIssue]
    return name in _forward_parameters(type(base))


@functools.cache
def _forward_parameters(model_class: type) -> frozenset[str]:
    """Keyword names of a model class's forward, looked up once (forward runs at every decode step)."""
    return frozenset(inspect.signature(model_class.forward).parameters)


def _cache_kwarg(model: nn.Module) -> str:
    """transformers 5.x renames ``past_key_values`` to ``cache``, model by model."""
    return "cache" if _accepts(model, "cache") else "past_key_values"


def _model_inputs(model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor | None, cache) -> dict:
    """Keyword arguments for ``model`` (a causal LM or its decoder) with padding-aware positions."""
    if attention_mask is None:
        past = cache.get_seq_length() if cache is not None else 0
        attention_mask = torch.ones(
            input_ids.shape[0], past + input_ids.shape[1], dtype=torch.long, device=input_ids.device
        )
    kwargs = dict(input_ids=input_ids, attention_mask=attention_mask, use_cache=cache is not None)
    if cache is not None:
        kwargs[_cache_kwarg(model)] = cache
    if _accepts(model, "position_ids"):
        kwargs["position_ids"] = position_ids_for(attention_mask)[:, -input_ids.shape[1] :]
    return kwargs


@torch.no_grad()
def forward(
    model: nn.Module,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None = None,
    cache=None,
    interventions: Sequence[BatchIntervention | None] = (),
    output_attentions: bool = False,
    last_only: bool = False,
    keep_last: int | None = None,
):
    """One forward pass under ``interventions``, with padding-aware positions.

    ``attention_mask`` is the 2D padding mask over all tokens so far (cache included).
    ``last_only`` asks for logits at the last position only, ``keep_last`` at the last n (saves a
    vocabulary-sized matmul per prompt token where the model supports ``logits_to_keep``).
    """
    kwargs = _model_inputs(model, input_ids, attention_mask, cache)
    if output_attentions:
        kwargs["output_attentions"] = True
    keep = 1 if last_only else keep_last
    if keep and _accepts(model, "logits_to_keep"):
        kwargs["logits_to_keep"] = keep
    with intervene(model, *interventions):
        return model(**kwargs)


@torch.no_grad()
def logits_probe(model: nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
    """The model's own fp32 logits [1, vocab] and its final hidden state [1, hidden] at the last of 8 probe
    tokens: what a reader of the LM head on held states compares with before trusting its formula."""
    ids = torch.arange(1, 9, device=next(model.parameters()).device)[None] % text_config(model).vocab_size  # [1, 8]
    return forward(model, ids, last_only=True).logits[:, -1].float(), last_hidden(model, ids)[:, -1]


@torch.no_grad()
def last_hidden(
    model: nn.Module,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None = None,
    cache=None,
    interventions: Sequence[BatchIntervention | None] = (),
    positions: int = 1,
) -> torch.Tensor:
    """Like ``forward``, without the LM head: the decoder's final hidden states (after its final
    norm) at the last ``positions`` positions, [B, positions, hidden]."""
    decoder = model.get_decoder()  # pyright: ignore[reportCallIssue]
    with intervene(model, *interventions):
        out = decoder(**_model_inputs(decoder, input_ids, attention_mask, cache))
    return out.last_hidden_state[:, -positions:]


def _repeated_cache(kv: list[tuple[torch.Tensor, torch.Tensor]], rows: int) -> DynamicCache:
    """A cache holding ``rows`` copies of one prompt's keys/values (per layer [1, heads, T, dim]): views, not
    copies; the next forward's cache update writes them out once, with the new tokens."""
    cache = DynamicCache()
    for index, (keys, values) in enumerate(kv):
        cache.update(keys[..., :0, :], values[..., :0, :], index)  # the layer, empty
        layer: Any = cache.layers[index]
        layer.keys, layer.values = keys.expand(rows, -1, -1, -1), values.expand(rows, -1, -1, -1)
    return cache


def common_start(prefixes: Sequence[Sequence[int]]) -> int:
    """How many first tokens every one of ``prefixes`` begins with, leaving each at least one of its own:
    what ``caches_together`` runs once (none for a single prefix, which runs whole)."""
    if len(prefixes) < 2:
        return 0
    shortest = min(len(p) for p in prefixes)
    for n in range(shortest - 1):
        if any(p[n] != prefixes[0][n] for p in prefixes):
            return n
    return max(0, shortest - 1)


@torch.no_grad()
def forward_sharing_start(
    model: nn.Module,
    prompts: Sequence[Sequence[int]],
    shared: int,
    pad_id: int = 0,
    interventions: Sequence[BatchIntervention | None] = (),
    shared_interventions: Sequence[BatchIntervention | None] = (),
) -> DynamicCache:
    """The decoder body over ``prompts``, whose first ``shared`` tokens are the same: those once (under
    ``shared_interventions``, one row), then every prompt's rest right-padded in one forward (under
    ``interventions``, a row each). Padding after a prompt changes none of its states, keys or values
    (causal attention, positions from the mask). Returns the cache of every column."""
    device = next(model.parameters()).device
    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)  # [rows, width]
    mask = torch.zeros(len(prompts), width, dtype=torch.long)  # [rows, width]: 1 on each prompt's tokens
    for b, prompt in enumerate(prompts):
        ids[b, : len(prompt)] = torch.tensor(list(prompt))
        mask[b, : len(prompt)] = 1
    cache = DynamicCache()
    if shared:
        last_hidden(model, ids[:1, :shared].to(device), cache=cache, interventions=shared_interventions)
        layers: list[Any] = cache.layers  # filled by the forward: keys and values set on every layer
        cache = _repeated_cache([(layer.keys, layer.values) for layer in layers], len(prompts))
    last_hidden(model, ids[:, shared:].to(device), mask.to(device), cache, interventions)
    return cache


def caches_together(
    model: nn.Module, prefixes: Sequence[Sequence[int]], pad_id: int = 0
) -> list[list[tuple[torch.Tensor, torch.Tensor]]]:
    """Per prefix, per layer (keys, values) [1, kv heads, len(prefix), head_dim]: what a forward of the prefix
    alone caches, computed for all of them at once (``forward_sharing_start``: the tokens they all begin
    with, ``common_start``, e.g. BOS and instructions, once). Copies, not views: a cache kept for later
    must not keep the whole forward's alive."""
    layers: list[Any] = forward_sharing_start(model, prefixes, common_start(prefixes), pad_id).layers
    return [
        [(layer.keys[b : b + 1, :, : len(p)].clone(), layer.values[b : b + 1, :, : len(p)].clone()) for layer in layers]
        for b, p in enumerate(prefixes)
    ]
