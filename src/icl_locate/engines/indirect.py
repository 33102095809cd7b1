"""Todd et al. (2024)'s indirect effects: on each corrupted prompt, the change in the answer's
probability when one head's output at the last position is replaced by its mean over clean prompts.

All of a prompt but its last token runs once (``readout.ContextCaches``); one row per head and one
unpatched then run its last token on that cache (a patch at the last position changes nothing
before it). A row patched at layer l computes every layer below l exactly as the unpatched row
does, so the rows run in bands of consecutive patch layers (``head_patch_bands``), each from its
lowest layer up (``core.surgery``). The LM head reads the final states of several prompts at once
(``readout.answer_probabilities``).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from ..core.patch_hooks import record
from ..core.patches import ReplaceHeadOutput
from ..core.surgery import feed_input, output_kind, skip_layers_below
from .base import last_hidden
from .readout import LENS_ROWS, ContextCaches, answer_probabilities, repeated_cache

ROWS_PER_FORWARD = 128  # head patches run together on one prompt's cache (one row each)
BAND_ROWS = 24  # head patches of consecutive layers that start together at the lowest (fewer: small products)

Site = tuple[int, int] | None  # (layer, head) patched, or None: nothing patched


def head_sites(n_layers: int, n_heads: int) -> list[Site]:
    """The rows of one prompt's indirect effects: the unpatched one, then every (layer, head) by layer."""
    return [None] + [(layer, h) for layer in range(n_layers) for h in range(n_heads)]


@torch.no_grad()
def head_indirect_effects(
    model: nn.Module,
    prompts: Sequence[Sequence[int]],
    answers: Sequence[int],
    means: torch.Tensor,
    starts: Sequence[int] | None = None,
) -> torch.Tensor:
    """[prompts, layers, heads]: on each (corrupted) prompt, the probability of its answer token at the
    last position with head (l, h)'s output there replaced by ``means[l, h]``, minus the probability
    without (the module docstring says how it runs)."""
    n_layers, n_heads = means.shape[:2]
    sites = head_sites(n_layers, n_heads)
    caches = ContextCaches(model)
    starts = starts if starts is not None else [0] * len(prompts)
    probs: list[torch.Tensor] = []
    states: list[torch.Tensor] = []  # final states not yet read by the head, and their answers
    rows: list[int] = []
    for ids, answer, start in zip(prompts, answers, starts, strict=True):
        kv = caches.cache_of(ids[:-1], start)  # the prompt but its last token
        states.append(_patched_last_token_states(model, ids, kv, sites, means))
        rows += [answer] * len(sites)
        if len(rows) >= LENS_ROWS:
            probs.append(answer_probabilities(model, torch.cat(states), rows))
            states, rows = [], []
    if rows:
        probs.append(answer_probabilities(model, torch.cat(states), rows))
    per_site = torch.cat(probs).view(len(prompts), len(sites)) if probs else torch.zeros(0, len(sites))
    return (per_site[:, 1:] - per_site[:, :1]).reshape(len(prompts), n_layers, n_heads)


def head_patch_bands(sites: Sequence[Site]) -> list[tuple[int, list[int]]]:
    """Sites (``head_sites``' order: None first, then by layer) in bands of consecutive patch layers, each
    with at least ``BAND_ROWS`` rows where the layers allow: (the band's lowest layer, the sites' indices).
    A band must not start above a member's patch layer (its patch would never run): hence the order."""
    layers = [0 if site is None else site[0] for site in sites]
    if not sites or sites[0] is not None or any(b < a for a, b in zip(layers, layers[1:])):
        raise ValueError("sites must be the unpatched row, then (layer, head) pairs by layer")
    bands: list[tuple[int, list[int]]] = []
    for index, layer in enumerate(layers):
        if not bands or (len(bands[-1][1]) >= BAND_ROWS and layer != layers[index - 1]):
            bands.append((layer, []))
        bands[-1][1].append(index)
    return bands


def _patched_last_token_states(
    model: nn.Module,
    ids: Sequence[int],
    kv: list[tuple[torch.Tensor, torch.Tensor]],
    sites: Sequence[Site],
    means: torch.Tensor,
) -> torch.Tensor:
    """[len(sites), hidden]: ``_last_token_states`` of every site (``sites[0]`` None, then by layer).

    A row patched at layer l computes every layer below l exactly as the unpatched row does. So the
    sites run in bands of consecutive patch layers (``head_patch_bands``): the first band, with the unpatched row,
    from the bottom, reading the unpatched row's input at each other band's lowest layer s; each other
    band from there, its layers below s skipped (``core.surgery``: their keys and values are not needed,
    as only the final states are read)."""
    last = len(ids) - 1
    bands = head_patch_bands(sites)
    out: dict[int, torch.Tensor] = {}  # by site index
    inputs: dict[int, torch.Tensor] = {}
    kind = output_kind(model)
    for n, (first_layer, members) in enumerate(bands):
        for chunk in range(0, len(members), ROWS_PER_FORWARD):
            rows = members[chunk : chunk + ROWS_PER_FORWARD]
            band_sites = [sites[i] for i in rows]
            if n == 0 and chunk == 0:  # the unpatched row is the first: read its inputs of the other bands
                with kind, record(model, hidden=[(layer, last) for layer, _ in bands[1:]]) as seen:
                    states = _last_token_states(model, ids, kv, band_sites, means)
                inputs = {layer: seen.hidden[(layer, last)][0] for layer, _ in bands[1:]}  # [d] each
            elif first_layer == 0:
                states = _last_token_states(model, ids, kv, band_sites, means)
            else:
                start = inputs[first_layer][None, None].expand(len(rows), 1, -1).contiguous()  # [rows, 1, d]
                assert kind.returns_tuple is not None  # the first band's forward ran every layer
                with (
                    feed_input(model, first_layer, lambda x=start: x),
                    skip_layers_below(model, first_layer, kind.returns_tuple),
                ):
                    states = _last_token_states(model, ids, kv, band_sites, means)
            out.update(zip(rows, states, strict=True))
    return torch.stack([out[i] for i in range(len(sites))])


def _last_token_states(
    model: nn.Module,
    ids: Sequence[int],
    kv: list[tuple[torch.Tensor, torch.Tensor]],
    sites: Sequence[Site],
    means: torch.Tensor,
) -> torch.Tensor:
    """[len(sites), hidden]: the final hidden states (after the final norm) of the prompt's last token, fed
    on its cached rest ``kv``, one row per site: head (l, h)'s output set to ``means[l, h]`` (None: nothing
    patched)."""
    parameter = next(model.parameters())
    last, rows = len(ids) - 1, len(sites)
    patches = [
        ReplaceHeadOutput(site[0], site[1], last, means[site].to(parameter.dtype), row=r)
        for r, site in enumerate(sites)
        if site is not None
    ]
    return last_hidden(
        model,
        torch.full((rows, 1), ids[last], device=parameter.device),  # [rows, 1]
        attention_mask=torch.ones(rows, len(ids), dtype=torch.long, device=parameter.device),
        cache=repeated_cache(kv, rows),
        interventions=patches,
    )[:, -1]
