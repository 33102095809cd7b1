"""Todd et al. (2024)'s indirect effects: on each corrupted prompt, the change in the answer's
probability when one head's output at the last position is replaced by its mean over clean prompts.

A patch at the last position changes nothing before it, so all of a prompt but its last token runs
once (``base.caches_together``: several prompts in one forward, what they all begin with once); then
one row per head and one unpatched row run its last token on that cache. The prompts run together, at
most ``PROMPTS_PER_BATCH`` at a time: their caches left-padded into one batch (padding only on the far
left keeps column distances equal to position distances; positions come from the mask), so a forward
multiplies the rows of many prompts at once. A row patched at layer l computes every layer below l
exactly as the unpatched row does, so the rows run in bands of consecutive patch layers
(``head_patch_bands``), each from its lowest layer up on the unpatched row's input there
(``core.surgery``). The LM head reads the final states of several forwards at once
(``readout.answer_probabilities``); only the probabilities are kept.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import torch
from torch import nn
from transformers import DynamicCache

from ..core.costs import shape_of_config
from ..core.patch_hooks import record
from ..core.patches import ReplaceHeadOutput
from ..core.surgery import feed_input, output_kind, skip_layers_below
from .base import caches_together, last_hidden
from .decoding import PreallocatedLayer, right_aligned
from .readout import LENS_ROWS, answer_probabilities
from .rows import left_padding_mask

ROWS_PER_FORWARD = 128  # rows (a prompt's head patches, of several prompts) run in one forward at most
KV_BYTES_PER_FORWARD = 1 << 30  # and at most this much of their caches' copies (a large model: fewer rows)
BAND_ROWS = 24  # rows of consecutive patch layers that start together at the lowest (fewer: small products)
PROMPTS_PER_BATCH = 25  # prompts whose rows run together (their left-padded caches held at once)

Site = tuple[int, int] | None  # (layer, head) patched, or None: nothing patched
KV = list[tuple[torch.Tensor, torch.Tensor]]  # per layer: keys, values [rows, kv heads, columns, head_dim]


def head_sites(n_layers: int, n_heads: int) -> list[Site]:
    """The rows of one prompt's indirect effects: the unpatched one, then every (layer, head) by layer."""
    return [None] + [(layer, h) for layer in range(n_layers) for h in range(n_heads)]


@torch.no_grad()
def head_indirect_effects(
    model: nn.Module,
    prompts: Sequence[Sequence[int]],
    answers: Sequence[int],
    means: torch.Tensor,
) -> torch.Tensor:
    """[prompts, layers, heads]: on each (corrupted) prompt, the probability of its answer token at the
    last position with head (l, h)'s output there replaced by ``means[l, h]``, minus the probability
    without (the module docstring says how it runs)."""
    if len(answers) != len(prompts):
        raise ValueError(f"{len(prompts)} prompts but {len(answers)} answers")
    if any(len(ids) < 2 for ids in prompts):
        raise ValueError("a prompt needs a token before its last (the cache the patched rows run on)")
    n_layers, n_heads = means.shape[:2]
    sites = head_sites(n_layers, n_heads)
    probs = torch.zeros(len(prompts), len(sites))  # [prompts, sites]
    parameter = next(model.parameters())
    per_token = shape_of_config(model.config).kv_bytes_per_token(parameter.element_size())
    together, size = batch_sizes(per_token * max((len(ids) for ids in prompts), default=1), len(prompts))
    pending: list[tuple[list[tuple[int, int]], torch.Tensor]] = []  # final states not yet read by the head
    for first in range(0, len(prompts), together):
        batch = list(range(first, min(first + together, len(prompts))))
        padded = left_padded(caches_together(model, [prompts[i][:-1] for i in batch]))
        last_tokens = [prompts[i][-1] for i in batch]
        for rows, states in _patched_last_token_states(model, last_tokens, padded, sites, means, size):
            pending.append(([(batch[p], s) for p, s in rows], states))
            _read_answers(model, pending, answers, probs)
    _read_answers(model, pending, answers, probs, last=True)
    return (probs[:, 1:] - probs[:, :1]).reshape(len(prompts), n_layers, n_heads)


def _read_answers(
    model: nn.Module,
    pending: list[tuple[list[tuple[int, int]], torch.Tensor]],
    answers: Sequence[int],
    into: torch.Tensor,
    last: bool = False,
) -> None:
    """Pending rows' (prompt p, site s) answer probabilities into ``into[p, s]``, in whole blocks of
    ``LENS_ROWS`` (a product of a few rows costs about as much per row as one of many: more passes over
    the vocabulary's weights), the rest left pending; with ``last`` every row."""
    rows = [row for part, _ in pending for row in part]
    take = len(rows) if last else len(rows) - len(rows) % LENS_ROWS
    if not take:
        return
    states = torch.cat([states for _, states in pending])  # [rows, hidden]
    read = answer_probabilities(model, states[:take], [answers[p] for p, _ in rows[:take]])  # [take]
    into[[p for p, _ in rows[:take]], [s for _, s in rows[:take]]] = read
    pending[:] = [(rows[take:], states[take:])] if take < len(rows) else []


def batch_sizes(row_bytes: int, prompts: int) -> tuple[int, int]:
    """(prompts run together, rows a forward) where a row's cache copy takes ``row_bytes``: as many as
    ``PROMPTS_PER_BATCH`` and ``ROWS_PER_FORWARD`` allow within ``KV_BYTES_PER_FORWARD``, at least one
    prompt, and every prompt's unpatched row in the first forward."""
    fit = max(1, KV_BYTES_PER_FORWARD // max(1, row_bytes))
    together = min(PROMPTS_PER_BATCH, prompts, fit)
    return together, max(together, min(ROWS_PER_FORWARD, fit))


def head_patch_bands(sites: Sequence[Site], copies: int = 1) -> list[tuple[int, list[int]]]:
    """Sites (``head_sites``' order: None first, then by layer) in bands of consecutive patch layers, each
    with at least ``BAND_ROWS`` rows where the layers allow (``copies`` rows a site: one per prompt run
    together): (the band's lowest layer, the sites' indices). A band must not start above a member's
    patch layer (its patch would never run): hence the order."""
    layers = [0 if site is None else site[0] for site in sites]
    if not sites or sites[0] is not None or any(b < a for a, b in zip(layers, layers[1:])):
        raise ValueError("sites must be the unpatched row, then (layer, head) pairs by layer")
    bands: list[tuple[int, list[int]]] = []
    for index, layer in enumerate(layers):
        if not bands or (len(bands[-1][1]) * copies >= BAND_ROWS and layer != layers[index - 1]):
            bands.append((layer, []))
        bands[-1][1].append(index)
    return bands


def left_padded(kvs: Sequence[KV]) -> tuple[KV, torch.Tensor]:
    """Prompts' caches (per layer [1, kv heads, length, head_dim] each) in one batch, right-aligned
    (``decoding.right_aligned``: zeros on the left) in buffers one column wider than the longest, room for
    the last token; and the batch's attention mask over the cached columns ([prompts, width]: 0 on padding)."""
    lengths = [kv[0][0].shape[2] for kv in kvs]
    width = max(lengths)
    mask = left_padding_mask([width - length for length in lengths], width).to(kvs[0][0][0].device)
    layers = []
    for parts in zip(*kvs, strict=True):  # one layer's (keys, values) of every prompt
        keys, values = (right_aligned(list(tensors), lengths, width, width + 1) for tensors in zip(*parts, strict=True))
        layers.append((keys, values))
    return layers, mask


def _patched_last_token_states(
    model: nn.Module,
    last_tokens: Sequence[int],
    padded: tuple[KV, torch.Tensor],
    sites: Sequence[Site],
    means: torch.Tensor,
    size: int,
) -> Iterator[tuple[list[tuple[int, int]], torch.Tensor]]:
    """Per forward, its rows (prompt p, site s) and their final hidden states (after the final norm,
    [rows, hidden]): each prompt's last token on its cached rest (``padded``: ``left_padded``), head (l, h)'s
    output set to ``means[l, h]`` where site s is (l, h) (None: nothing patched); ``size`` rows a forward.

    The sites run in bands (``head_patch_bands``), each over every prompt. The first band, whose first
    rows are the unpatched ones, runs from the bottom and reads the unpatched rows' input at each other
    band's lowest layer s; each other band starts there, its layers below s skipped (their keys and values
    are not needed, as only the final states are read)."""
    kv, mask = padded
    n_prompts, column = len(last_tokens), mask.shape[1]  # the last token's column, past the padded caches
    if size < n_prompts:
        raise ValueError(f"{size} rows a forward cannot hold the {n_prompts} unpatched rows")
    bands = head_patch_bands(sites, n_prompts)
    inputs: dict[int, torch.Tensor] = {}  # the unpatched rows' input of each band's lowest layer, [prompts, d]
    kind = output_kind(model)
    for n, (first_layer, members) in enumerate(bands):
        rows = [(p, s) for s in members for p in range(n_prompts)]  # by site: the unpatched rows first
        for chunk in range(0, len(rows), size):
            part = rows[chunk : chunk + size]
            if n == 0 and chunk == 0:
                with kind, record(model, hidden=[(layer, column) for layer, _ in bands[1:]]) as seen:
                    states = _last_token_states(model, last_tokens, padded, sites, means, part, 0)
                inputs = {layer: seen.hidden[(layer, column)][:n_prompts] for layer, _ in bands[1:]}
            elif first_layer == 0:
                states = _last_token_states(model, last_tokens, padded, sites, means, part, 0)
            else:
                fed = inputs[first_layer][[p for p, _ in part]][:, None]  # [rows, 1, d]
                assert kind.returns_tuple is not None  # the first band's forward ran every layer
                with (
                    feed_input(model, first_layer, lambda x=fed: x),
                    skip_layers_below(model, first_layer, kind.returns_tuple),
                ):
                    states = _last_token_states(model, last_tokens, padded, sites, means, part, first_layer)
            yield part, states


def _last_token_states(
    model: nn.Module,
    last_tokens: Sequence[int],
    padded: tuple[KV, torch.Tensor],
    sites: Sequence[Site],
    means: torch.Tensor,
    rows: Sequence[tuple[int, int]],
    first_layer: int,
) -> torch.Tensor:
    """[len(rows), hidden]: the final hidden states (after the final norm) of row (prompt p, site s)'s last
    token on prompt p's cache, head (l, h)'s output set to ``means[l, h]`` where site s is (l, h).
    Layers below ``first_layer`` are skipped by the caller: their caches are views, never read."""
    kv, mask = padded
    parameter = next(model.parameters())
    column = mask.shape[1]
    which = torch.tensor([p for p, _ in rows], device=mask.device)
    cache = DynamicCache()
    cache.layers = [  # pyright: ignore[reportAttributeAccessIssue]
        PreallocatedLayer(keys.index_select(0, which), values.index_select(0, which), column)  # the rows' copies
        if index >= first_layer
        else PreallocatedLayer(keys[:1].expand(len(rows), -1, -1, -1), values[:1].expand(len(rows), -1, -1, -1), column)
        for index, (keys, values) in enumerate(kv)
    ]
    patches = [
        ReplaceHeadOutput(site[0], site[1], column, means[site].to(parameter.dtype), row=r)
        for r, site in enumerate(sites[s] for _, s in rows)
        if site is not None
    ]
    fed = torch.tensor([[last_tokens[p]] for p, _ in rows], device=parameter.device)  # [rows, 1]
    attention = torch.cat([mask[which], mask.new_ones(len(rows), 1)], dim=1)  # [rows, columns + 1]
    return last_hidden(model, fed, attention_mask=attention, cache=cache, interventions=patches)[:, -1]
