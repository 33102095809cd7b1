"""What one sweep unit costs, counted without weights: its items' token counts and its rows' FLOPs per
engine and memory (``plan`` adds them up). See ``plan``'s docstring for the engines' cost model.

Layer and head units decode their rows (``units.row_interventions``) on the items' prompts. Method units
(``methods.py``) are costed as they run:

* task vector: the ICL prompts' forward (states read, no head), then the zero-shot prompts decoded with a
  patch at each layer and unpatched, and the ICL prompts decoded unpatched;
* function vector: the ICL prompts' forward (head outputs), the indirect effects (on each of the first
  ``AIE_PROMPTS`` label-shuffled prompts: all but its last token once, then one row per head and one
  unpatched, each a last token from its band's lowest layer up, several prompts' rows a forward, and
  through the LM head), then decoding as for task vectors;
* logit lens: the prompts' forward with the context visible and with it hidden, then the LM head on every
  layer's state at the last position (nothing generated).

Each unit counts its own forward of the ICL prompts (and a vector unit their decoding), although in an
atlas a worker reads them once for the three methods and takes their decoding from the masking unit when
that ran first in the same process (``unchanged.py``): an upper bound there.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, replace

import numpy as np
import torch

from ..core.conditions import Condition, MaskedPrompt, get_condition
from ..core.costs import ModelDims, activation_bytes, segment_flops
from ..core.interventions import UNCHANGED, RowIntervention
from ..core.patches import PatchLastPosition
from ..core.prompts import PromptedItem
from ..core.shapes import DTYPE_BYTES, ModelShape
from ..engines.fast import rows_by_size
from ..engines.indirect import batch_sizes, head_patch_bands, head_sites
from ..engines.rows import divergence_layer, plan_rows
from ..engines.tree import tree_batch_rows
from ..tasks.items import build_items
from .methods import AIE_PROMPTS, METHOD_KINDS
from .settings import LoadedTasks, WorkUnit
from .units import row_interventions

ENGINES = ("paper", "fast", "tree")


class _TextOnly:
    """Stands in for a tokenizer where only the prompts' texts are wanted: one token per text, so that
    building a unit's items costs nothing per token (the texts are then counted all at once)."""

    all_special_ids: list[int] = []

    def __call__(self, text: str, **_) -> dict:
        return {"input_ids": [0], "offset_mapping": [(0, len(text))]}


class CharTokens:
    """An estimating tokenizer for a model whose own is not here: a BOS, then one token per ``chars``
    characters, with offsets (so prompt parts and hidden ranges map as with a real tokenizer)."""

    all_special_ids = [1]

    def __init__(self, chars: float):
        self.chars = chars

    def __call__(self, text: str, add_special_tokens: bool = True, **_) -> dict:
        cuts = [math.floor(i * self.chars) for i in range(math.ceil(len(text) / self.chars))] + [len(text)]
        offsets = [(0, 0)] * add_special_tokens + list(zip(cuts[:-1], cuts[1:]))
        return {"input_ids": [1] * add_special_tokens + [2] * (len(cuts) - 1), "offset_mapping": offsets}


def token_counts(tokenizer, texts: list[str], special: bool = True) -> np.ndarray:
    """Each text's token count as ``prompts.encode_prompt`` keeps its ids: special tokens a tokenizer
    appends at the end (EOS, with empty offsets) are dropped. [len(texts)]"""
    if isinstance(tokenizer, CharTokens):  # what its __call__ gives, without building the offsets
        return np.array([special + math.ceil(len(t) / tokenizer.chars) for t in texts], dtype=np.int64)
    enc = tokenizer(texts, add_special_tokens=special, return_offsets_mapping=True)
    ends = set(tokenizer.all_special_ids)
    counts = []
    for ids, offsets in zip(enc["input_ids"], enc["offset_mapping"]):
        n = len(ids)
        while n > 1 and ids[n - 1] in ends and tuple(offsets[n - 1]) == (0, 0):
            n -= 1
        counts.append(n)
    return np.array(counts, dtype=np.int64)


@dataclass
class ItemSet:
    """A unit's test items as token counts (units that differ only in their condition share them)."""

    prompt: np.ndarray  # [items] prompt tokens
    context: int  # tokens before the query (BOS, instructions, examples): what the fast engine shares
    answer: np.ndarray  # [items] estimated generated tokens: the reference's tokens + 1, within the limit
    first: PromptedItem  # the first item, tokenised, for the plans of the unit's rows


def item_set(unit: WorkUnit, tasks: LoadedTasks, tokenizer, max_new: int) -> ItemSet:
    """The unit's prompts built by the sweep's own ``build_items`` (texts first, counted together)."""
    task, data = tasks[(unit.task, unit.pair)]
    build = lambda tok, n: build_items(task, data, tok, unit.k, unit.seed, n, unit.instructions, labels=unit.labels)
    items = build(_TextOnly(), unit.n_test)
    first = build(tokenizer, 1)[0]
    answers = token_counts(tokenizer, [it.item.target for it in items], special=False) + 1  # + the stop token
    context = max(1, MaskedPrompt.of(first.encoded, None).query_start())  # as engines.rows.plan_rows
    return ItemSet(
        token_counts(tokenizer, [it.prompt.text for it in items]), context, np.minimum(answers, max_new), first
    )


# --------------------------------------------------------------------------- one unit's cost


@dataclass
class UnitCost:
    """What one unit costs on each engine, with the engines' batching and memory."""

    label: str
    items: int
    rows: int  # item x layer x variant
    prompt_tokens: int  # every row's prompt (what the paper's method runs)
    generated_bound: int  # rows x the token limit
    generated_estimate: int  # rows x (the reference's tokens + 1)
    flops: dict[str, float]  # engine -> FLOPs, answers as estimated
    flops_bound: dict[str, float]  # engine -> FLOPs, every row to the token limit
    batch_rows: (
        int  # the largest batch the engines' automatic rule (or --batch-size) makes; the calibration may scale it
    )
    kv_bytes: int  # that batch's KV buffers + the shared context's cache
    activation_bytes: int  # estimate: the largest forward's working set
    tree_batch_rows: int  # the tree engine's largest batch: whole queries whose states fit the rule
    tree_kv_bytes: int  # its KV buffers once every row has split (their upper bound) + the context's cache


def rows_cost(
    label: str,
    interventions: Sequence[RowIntervention],
    condition: Condition | None,
    items: ItemSet,
    shape: ModelShape,
    max_new: int,
    batch_size: int | None,
    dtype: str,
) -> UnitCost:
    """Decoding ``interventions`` on every item's prompt under ``condition``: rows, tokens, FLOPs per engine
    and memory (module docstring)."""
    n_layers, dims = shape.layers, ModelDims.of_shape(shape)
    planned = plan_rows([MaskedPrompt.of(items.first.encoded, condition)], interventions, n_layers)  # one query
    shared = [divergence_layer(r, n_layers) for r in planned if r.prefix_key[1] is None]
    own = len(planned) - len(shared)
    copies = {  # engine -> rows (states) each layer runs per query
        "fast": [len(planned)] * n_layers,
        "tree": [own + sum(d <= lay for d in shared) + any(d > lay for d in shared) for lay in range(n_layers)],
    }
    n, prompt = len(items.prompt), items.prompt
    head = 2.0 * dims.lm_head  # one scored position
    # rows that only patch share each prompt up to the patched last token (a prefix cache per query; the
    # engines run what a batch's prefixes all begin with once, counted per query here: an upper bound);
    # others share the context (as engines.rows.plan_rows)
    per_query = len(planned[0].prefix_key[0]) > items.context
    context = prompt - len(planned[0].query_ids) if per_query else np.full(n, items.context)  # [items]: cached
    context_flops = segment_flops(dims, 0, context)  # [items]

    def flops(fed: np.ndarray) -> dict[str, float]:  # fed [items]: generated tokens
        out = {
            "paper": len(planned)
            * float((segment_flops(dims, 0, prompt) + segment_flops(dims, prompt, fed - 1) + head * fed).sum())
        }
        prefix = ((len(shared) > 0) + own) * float(context_flops.sum() if per_query else context_flops[0])
        for engine, rows in copies.items():
            query = segment_flops(dims, context, prompt - context, rows) + segment_flops(dims, prompt, fed - 1, rows)
            out[engine] = prefix + float((query + head * rows[-1] * fed).sum())
        return out

    longest = int(prompt.max()) + max_new
    size = batch_size or rows_by_size(longest)
    groups = Counter(tuple(sorted(r.plan.ablate)) for r in planned)  # what one batch may mix
    batch = min(size, n * max(groups.values()))
    tree_batch = tree_batch_rows(planned, n, size, n_layers, forced=bool(batch_size))
    per_token, width, widest = (
        shape.kv_bytes_per_token(DTYPE_BYTES[dtype]),
        int((prompt - context).max()),
        int(context.max()),
    )
    caches = min(n, -(-batch // len(planned))) if per_query else 1  # prefix caches a batch holds
    tree_caches = min(n, -(-tree_batch // len(planned))) if per_query else 1
    activations = max(
        activation_bytes(shape, max(batch, tree_batch), width, widest + width, DTYPE_BYTES[dtype]),
        activation_bytes(shape, 1, widest, widest, DTYPE_BYTES[dtype]),
    )
    return UnitCost(
        label,
        n,
        n * len(planned),
        len(planned) * int(prompt.sum()),
        n * len(planned) * max_new,
        len(planned) * int(items.answer.sum()),
        flops(items.answer),
        flops(np.full(n, max_new)),
        batch,
        (batch * longest + caches * widest) * per_token,
        activations,
        tree_batch,
        (tree_batch * longest + tree_caches * widest) * per_token,
    )


def unit_cost(
    unit: WorkUnit,
    tasks: LoadedTasks,
    tokenizer,
    shape: ModelShape,
    max_new: int,
    batch_size: int | None,
    dtype: str,
    sets: dict[tuple, ItemSet] | None = None,
) -> UnitCost:
    """``unit``'s cost (module docstring); ``sets`` caches item sets between units that share them."""
    sets = {} if sets is None else sets
    items_of = lambda u: unit_items(u, tasks, tokenizer, max_new, sets)  # noqa: E731

    if unit.kind not in METHOD_KINDS:
        interventions = list(row_interventions(unit, shape.layers, shape.heads).values())
        condition = get_condition(unit.condition) if unit.kind != "ablation" else None
        return rows_cost(unit.label(), interventions, condition, items_of(unit), shape, max_new, batch_size, dtype)
    icl = items_of(unit)
    if unit.kind == "logit-lens":
        return lens_cost(unit, icl, shape, dtype)
    zero = items_of(replace(unit, k=0))
    vector = torch.zeros(shape.hidden)  # the vector's value changes no cost
    mode = "replace" if unit.kind == "task-vector" else "add"
    patched = [PatchLastPosition(layer, mode, vector) for layer in unit.layers] + [UNCHANGED]
    parts = [
        rows_cost(unit.label(), patched, None, zero, shape, max_new, batch_size, dtype),
        rows_cost(unit.label(), [UNCHANGED], None, icl, shape, max_new, batch_size, dtype),
        reading_cost(unit.label(), icl, shape, dtype),
    ]
    if unit.kind == "function-vector":
        parts.append(indirect_effects_cost(unit.label(), items_of(replace(unit, labels="shuffled")), shape, dtype))
    return combined(parts)


def unit_items(unit: WorkUnit, tasks: LoadedTasks, tokenizer, max_new: int, sets: dict[tuple, ItemSet]) -> ItemSet:
    """The unit's item set, built once for every unit with the same items (``sets``: the cache)."""
    key = (unit.task, unit.pair, unit.seed, unit.k, unit.instructions, unit.labels, unit.n_test)
    if key not in sets:
        sets[key] = item_set(unit, tasks, tokenizer, max_new)
    return sets[key]


def forward_flops(dims: ModelDims, items: ItemSet, last: int = 0) -> float:
    """One forward of every prompt (but its last ``last`` tokens), the shared context once: no LM head."""
    queries = items.prompt - items.context - last
    return float(segment_flops(dims, 0, items.context) + segment_flops(dims, items.context, queries).sum())


def reading_cost(label: str, items: ItemSet, shape: ModelShape, dtype: str) -> UnitCost:
    """The ICL prompts' forward that a vector is read from (states or head outputs at the last position)."""
    n, dims = len(items.prompt), ModelDims.of_shape(shape)
    fast = forward_flops(dims, items)
    paper = float(segment_flops(dims, 0, items.prompt).sum())
    return _readings(label, n, 0, 0, dict(paper=paper, fast=fast, tree=fast), items, shape, dtype)


def indirect_effects_cost(label: str, shuffled: ItemSet, shape: ModelShape, dtype: str) -> UnitCost:
    """Per corrupted prompt: all but its last token once, then 1 + L x H rows of its last token, each band
    of them from its lowest layer up; several prompts' rows run together, their caches left-padded
    (``batch_sizes``: how many prompts, and rows a forward)."""
    m, dims = min(AIE_PROMPTS, len(shuffled.prompt)), ModelDims.of_shape(shape)
    prompts = replace(shuffled, prompt=shuffled.prompt[:m], answer=shuffled.answer[:m])
    row_bytes = int(prompts.prompt.max()) * shape.kv_bytes_per_token(DTYPE_BYTES[dtype])
    together, size = batch_sizes(row_bytes, m)
    sites = head_sites(shape.layers, shape.heads)
    bands = head_patch_bands(sites, together)
    layer_rows = sum(len(members) * (shape.layers - first) for first, members in bands)  # the body's share
    body = segment_flops(dims, prompts.prompt - 1, np.ones(m)).sum() * layer_rows / shape.layers
    fast = forward_flops(dims, prompts, last=1) + float(body + 2.0 * dims.lm_head * len(sites) * m)
    batch = min(size, max(len(members) for _, members in bands) * together)
    kv = (batch + together) * row_bytes  # the rows' copies and the left-padded caches they are taken from
    heads = shape.layers * shape.heads  # stored rows per prompt, each with the prompt's tokens
    cost = _readings(label, m, m * heads, heads * int(prompts.prompt.sum()), dict(paper=fast, fast=fast, tree=fast),
                     prompts, shape, dtype)  # fmt: skip
    kv = max(cost.kv_bytes, kv)  # every engine runs the indirect effects alike
    return replace(cost, batch_rows=batch, kv_bytes=kv, tree_batch_rows=batch, tree_kv_bytes=kv)


def lens_cost(unit: WorkUnit, items: ItemSet, shape: ModelShape, dtype: str) -> UnitCost:
    """The prompts' forward with the context visible and hidden, the LM head on every layer's state."""
    n, dims = len(items.prompt), ModelDims.of_shape(shape)
    heads = 2.0 * dims.lm_head * 2 * n * (shape.layers + 1)
    fast = 2 * forward_flops(dims, items) + heads
    paper = 2 * float(segment_flops(dims, 0, items.prompt).sum()) + heads
    stored = 2 * n * len(unit.layers)
    tokens = 2 * len(unit.layers) * int(items.prompt.sum())  # each stored reading with its prompt's tokens
    return _readings(unit.label(), n, stored, tokens, dict(paper=paper, fast=fast, tree=fast), items, shape, dtype)


def _readings(
    label: str, n: int, rows: int, prompt_tokens: int, flops: dict, items: ItemSet, shape: ModelShape, dtype: str
) -> UnitCost:
    """A part that reads instead of decoding: ``rows`` stored (``prompt_tokens``: theirs, as for decoded rows),
    nothing generated, one prompt's memory."""
    width = DTYPE_BYTES[dtype]
    longest = int(items.prompt.max())
    return UnitCost(
        label, n, rows, prompt_tokens, 0, 0, flops, dict(flops), 1, longest * shape.kv_bytes_per_token(width),
        activation_bytes(shape, 1, longest, longest, width), 1, longest * shape.kv_bytes_per_token(width),
    )  # fmt: skip


def combined(parts: list[UnitCost]) -> UnitCost:
    """One unit made of ``parts`` run one after the other: counts and FLOPs add, memory is the largest."""
    first = parts[0]
    add = lambda name: sum(getattr(p, name) for p in parts)  # noqa: E731
    return UnitCost(
        first.label,
        first.items,
        add("rows"),
        add("prompt_tokens"),
        add("generated_bound"),
        add("generated_estimate"),
        {e: sum(p.flops[e] for p in parts) for e in ENGINES},
        {e: sum(p.flops_bound[e] for p in parts) for e in ENGINES},
        max(p.batch_rows for p in parts),
        max(p.kv_bytes for p in parts),
        max(p.activation_bytes for p in parts),
        max(p.tree_batch_rows for p in parts),
        max(p.tree_kv_bytes for p in parts),
    )
