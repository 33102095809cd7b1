"""Reading a model at each prompt's last position: what the task-vector, function-vector and
logit-lens sweeps are made of.

* ``last_position_states``: the input of decoder layer l (``output_hidden_states[l]``) at the last
  position, e.g. a task vector theta_l of an ICL prompt (Hendel et al., 2023).
* ``mean_head_outputs``, ``head_indirect_effects``, ``function_vector``: Todd et al. (2024)'s
  function vector: each head's mean output over clean ICL prompts; the change in the answer's
  probability when one head's output on a corrupted prompt is replaced by that mean; the sum of the
  top heads' means as they enter the residual stream (through the output projection, bias left out).
* ``logit_lens``: the final norm and LM head applied to the residual stream at every layer.

Everything runs one prompt at a time, unpadded, through the same hooks as the masks (``record``,
``intervene``), so the reference for each is a plain forward of the model.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn
from transformers import DynamicCache

from ..core.interventions import BatchIntervention
from ..core.patch_hooks import record
from ..core.patches import ReplaceHeadOutput, head_layout
from ..core.structure import attention_module, decoder_layers, final_norm, num_layers, output_projection, text_config
from .base import forward

ROWS_PER_FORWARD = 64  # head patches decoded together on one prompt's cache (one row each)


def _ids(model: nn.Module, ids: Sequence[int]) -> torch.Tensor:
    return torch.tensor([list(ids)], device=next(model.parameters()).device)  # [1, T]


@torch.no_grad()
def last_position_states(model: nn.Module, prompts: Sequence[Sequence[int]], layers: Sequence[int]) -> torch.Tensor:
    """[prompts, len(layers), hidden]: the input of each decoder layer in ``layers`` at each prompt's last
    position, nothing masked."""
    out = []
    for ids in prompts:
        last = len(ids) - 1
        with record(model, hidden=[(layer, last) for layer in layers]) as seen:
            forward(model, _ids(model, ids), last_only=True)
        out.append(torch.stack([seen.hidden[(layer, last)][0] for layer in layers]))
    return torch.stack(out)


@torch.no_grad()
def mean_head_outputs(model: nn.Module, prompts: Sequence[Sequence[int]]) -> torch.Tensor:
    """[layers, heads, head_dim]: every head's output at the last position, averaged over ``prompts``."""
    n_layers = num_layers(model)
    n_heads, _ = head_layout(model)
    total = None
    for ids in prompts:
        last = len(ids) - 1
        sites = [(layer, h, last) for layer in range(n_layers) for h in range(n_heads)]
        with record(model, heads=sites) as seen:
            forward(model, _ids(model, ids), last_only=True)
        outputs = torch.stack(
            [torch.stack([seen.heads[(layer, h, last)][0] for h in range(n_heads)]) for layer in range(n_layers)]
        ).float()  # [L, H, head_dim]
        total = outputs if total is None else total + outputs
    assert total is not None, "no prompts"
    return total / len(prompts)


def _repeated_cache(kv: list[tuple[torch.Tensor, torch.Tensor]], rows: int) -> DynamicCache:
    """A cache holding ``rows`` copies of one prompt's keys/values (per layer [1, heads, T, dim])."""
    cache = DynamicCache()
    for index, (keys, values) in enumerate(kv):
        cache.update(keys.expand(rows, -1, -1, -1).contiguous(), values.expand(rows, -1, -1, -1).contiguous(), index)
    return cache


@torch.no_grad()
def head_indirect_effects(
    model: nn.Module, prompts: Sequence[Sequence[int]], answers: Sequence[int], means: torch.Tensor
) -> torch.Tensor:
    """[prompts, layers, heads]: on each (corrupted) prompt, the probability of its answer token at the
    last position with head (l, h)'s output there replaced by ``means[l, h]``, minus the probability
    without. All of the prompt but its last token runs once; its cache is shared by one row per head
    (a patch at the last position changes nothing before it)."""
    n_layers, n_heads = means.shape[:2]
    sites = [(layer, h) for layer in range(n_layers) for h in range(n_heads)]
    out = torch.zeros(len(prompts), n_layers, n_heads)
    for n, (ids, answer) in enumerate(zip(prompts, answers, strict=True)):
        cache = DynamicCache()
        forward(model, _ids(model, ids[:-1]), cache=cache, last_only=True)
        layers: list[Any] = cache.layers  # filled by the forward: keys and values set on every layer
        kv = [(layer.keys, layer.values) for layer in layers]
        base = _last_token_probs(model, ids, answer, kv, [None])
        patched = torch.cat(
            [
                _last_token_probs(model, ids, answer, kv, sites[start : start + ROWS_PER_FORWARD], means)
                for start in range(0, len(sites), ROWS_PER_FORWARD)
            ]
        )
        out[n] = (patched - base).reshape(n_layers, n_heads)
    return out


def _last_token_probs(
    model: nn.Module,
    ids: Sequence[int],
    answer: int,
    kv: list[tuple[torch.Tensor, torch.Tensor]],
    sites: Sequence[tuple[int, int] | None],
    means: torch.Tensor | None = None,
) -> torch.Tensor:
    """[len(sites)]: the answer's probability after the prompt's last token, fed on its cached rest
    ``kv``, one row per site: head (l, h)'s output set to ``means[l, h]`` (None: nothing patched)."""
    parameter = next(model.parameters())
    last, rows = len(ids) - 1, len(sites)
    patches = [
        ReplaceHeadOutput(site[0], site[1], last, means[site].to(parameter.dtype), row=r)
        for r, site in enumerate(sites)
        if site is not None and means is not None
    ]
    logits = forward(
        model,
        torch.full((rows, 1), ids[last], device=parameter.device),  # [rows, 1]
        attention_mask=torch.ones(rows, len(ids), dtype=torch.long, device=parameter.device),
        cache=_repeated_cache(kv, rows),
        interventions=patches,
        last_only=True,
    ).logits[:, -1]  # [rows, vocab]
    return logits.float().softmax(-1)[:, answer].cpu()


def function_vector(model: nn.Module, means: torch.Tensor, heads: Sequence[tuple[int, int]]) -> torch.Tensor:
    """[hidden]: the sum over ``heads`` of each head's mean output as it enters the residual stream: its
    slice of the output projection applied to it (the projection's bias, shared by all heads, left out)."""
    n_heads, head_dim = head_layout(model)
    layers = decoder_layers(model)
    total = None
    for layer, h in heads:
        proj = output_projection(attention_module(layers[layer]))
        weight = next(proj.parameters())
        x = torch.zeros(2, n_heads * head_dim, dtype=weight.dtype, device=weight.device)
        x[1, h * head_dim : (h + 1) * head_dim] = means[layer, h].to(weight.dtype)
        with torch.no_grad():
            y = proj(x)  # [2, hidden]: bias alone, bias + the head's part
        part = (y[1] - y[0]).float()
        total = part if total is None else total + part
    assert total is not None, "no heads"
    return total


@torch.no_grad()
def logit_lens(
    model: nn.Module, ids: Sequence[int], answer: int, interventions: Sequence[BatchIntervention] = ()
) -> tuple[torch.Tensor, list[int]]:
    """At the last position, for l = 0..L, the final norm and the LM head applied to the input of decoder
    layer l (l = L: the last layer's output, the model's own logits): [layers + 1, 3] with the answer
    token's top-1 (1.0/0.0), probability and rank (1 = top) there, and the top token at each layer.
    Under ``interventions`` (a mask)."""
    n_layers, last = num_layers(model), len(ids) - 1
    norm, head = final_norm(model), model.get_output_embeddings()  # pyright: ignore[reportCallIssue]
    final: list[torch.Tensor] = []
    hook = norm.register_forward_pre_hook(lambda module, args: final.append(args[0][:, -1].detach().clone()))
    try:
        with record(model, hidden=[(layer, last) for layer in range(n_layers)]) as seen:
            forward(model, _ids(model, ids), interventions=interventions, last_only=True)
    finally:
        hook.remove()
    states = torch.stack([seen.hidden[(layer, last)][0] for layer in range(n_layers)] + [final[-1][0]])  # [L+1, d]
    logits = head(norm(states)).float()  # [L+1, vocab]
    cap = getattr(text_config(model), "final_logit_softcapping", None)
    if cap:  # Gemma 2/3 squash the final logits; the lens reads them as the model does
        logits = torch.tanh(logits / cap) * cap
    target = logits[:, answer]
    rank = (logits > target[:, None]).sum(-1) + 1
    prob = logits.softmax(-1)[:, answer]
    top = logits.argmax(-1)
    return torch.stack([(top == answer).float(), prob, rank.float()], dim=-1).cpu(), top.tolist()
