"""The tree engine: the fast engine plus exact sharing *across* mask layers.

Row (q, j) of a layer sweep computes, at every layer l < j, exactly what the unmasked run of
query q computes, as long as its generated tokens so far are the same. In general a row's
*divergence layer* d is the first layer its intervention touches (``MaskFrom(j)``: j, a head
mask or an ablation: its first layer, ``MaskBelow(j)`` with j > 0: 0, none: L). Two rows of one
query with the same tokens so far (one *history group*) compute the same states and keys/values
at every layer below both their divergence layers. So at layer l a history group needs one
*shared slot* for its rows with d > l, and each row with d <= l needs its own slot: a 19-row
sweep runs 1 + (l + 1) states at layer l instead of 19, in the query's prefill and in every
decoding step, and the keys/values of a shared slot are stored once.

When the rows of a group pick different tokens, the group splits; the new group's shared slots
start as copies of the old group's (their history up to the split is the same), own slots stay
where they are. A finished row leaves its slots; an empty slot is dropped.

Mechanics: the model runs its own forward (embeddings, masks, rotary tables, attention hooks)
on a batch of *leaves*, the slots of the last layer (N_0 <= N_1 <= ... <= N_{L-1}, so the last
layer has the most). A forward pre-hook on each decoder layer picks this layer's slots out of
the previous layer's output (an ``index_select``) and slices the per-row arguments (attention
mask, position embeddings and ids, Bloom's ALiBi) to them; cache layer l holds N_l rows, and
the column mask of layer l (``LayerColumnMasks``) has one row per slot. A layer's own slots that
hide the whole context but one column (BOS) come first, and attend over the columns from one before
the earliest query on, with that column's keys/values copied into the first of them
(``core.narrow_attention``, ``slot_order``): under a layer-from mask they are most slots, and the
context's keys/values are most of each slot's columns.
The decoding of one batch, its groups and slots, is ``tree_decode.TreeDecode``. Everything else is the fast engine's:
shared context caches, left padding, stop rules, logits at the last position.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager

import torch

from ..core.conditions import MaskedPrompt
from ..core.interventions import RowIntervention
from ..core.structure import decoder_layers
from ..core.surgery import LayerCall
from .base import Generation, ProgressCallback, ResultKey, StopRule
from .drafts import Drafter
from .fast import KV_MEMORY_FRACTION, MAX_BATCH_TOKENS, FastEngine, even_batch, rows_by_memory
from .head import CertifiedHead
from .rows import PrefixCaches, Row, divergence_layer
from .screens import build_screen
from .tree_decode import SlotRoutes, TreeDecode

# Keyword arguments of a decoder layer that carry one row per batch row, by name. Any other
# tensor argument is refused (we cannot know whether its first dimension is the batch).
PER_ROW = frozenset({"attention_mask", "position_ids", "position_embeddings", "encoder_attention_mask"})
PER_ROW_TIMES_HEADS = frozenset({"alibi"})  # Bloom: [batch x heads, 1, kv]
NOT_PER_ROW = frozenset({"cache_position"})


def _holds_tensor(value) -> bool:
    """A tensor, or a tuple / list / dict with one somewhere inside."""
    if isinstance(value, torch.Tensor):
        return True
    if isinstance(value, (tuple, list)):
        return any(_holds_tensor(v) for v in value)
    if isinstance(value, dict):
        return any(_holds_tensor(v) for v in value.values())
    return False


class TreeEngine(FastEngine):
    """Decode every (prompt, intervention) row, sharing the states of rows of one query below
    their divergence layers. Same rows, same results as ``FastEngine``."""

    def __init__(
        self,
        model,
        tokenizer,
        batch_size: int | None = None,
        max_batch_tokens: int = MAX_BATCH_TOKENS,
        kv_memory_fraction: float = KV_MEMORY_FRACTION,
        head_kind: str | None = None,
        draft_tokens: int = 0,
        screen: CertifiedHead | None = None,
        batch_scale: float = 1.0,
    ):
        """``head_kind``: pick greedy tokens with the model's own head ("plain") or a screened head
        ("bf16", "int8", "int8-linear": ``screens.py``; refused with ValueError where it cannot be used on this model);
        None: the bf16 screen where it can be used, else the model's own head (``calibrate.py`` chooses
        by measuring instead).
        ``draft_tokens``: verify drafts of up to this many tokens per step (0: none; see drafts.py).
        ``screen``: the ``head_kind`` screen, built already (e.g. by the calibration), else the one kept for the
        model (``screens.kept_screen``) or one built here.
        ``batch_scale``: as in ``FastEngine``."""
        super().__init__(model, tokenizer, batch_size, max_batch_tokens, kv_memory_fraction, batch_scale=batch_scale)
        self.layers = decoder_layers(model)
        self._routes: SlotRoutes | None = None  # what the slot hooks follow in the forward under way
        self.stats.update(
            slot_tokens=[0] * self.n_layers,
            row_tokens=[0] * self.n_layers,
            splits=0,
            kv_bytes_peak=0,
            kv_bytes_unshared_peak=0,
            draft_tokens=0,
            draft_accepted=0,
        )
        self.drafter = Drafter(draft_tokens) if draft_tokens else None
        self.head, self.head_note = self._choose_head(head_kind, screen)
        if self.head is not None:  # its counts (bench reports them) start with this engine (a screen may be shared)
            self.head.stats = dict.fromkeys(self.head.stats, 0)

    def _choose_head(self, head_kind: str | None, screen: CertifiedHead | None) -> tuple[CertifiedHead | None, str]:
        if head_kind == "plain":
            return None, "the model's own LM head (screening off)"
        if screen is not None and screen.kind != (head_kind or "bf16"):
            raise ValueError(f"a {screen.kind} screen given for head {head_kind!r}")
        head, why_not = (screen, None) if screen is not None else build_screen(self.model, head_kind or "bf16")
        if head is not None:
            return head, f"{head.kind}-screened LM head, candidates in full precision"
        if head_kind:
            raise ValueError(f"cannot screen the LM head of this model: {why_not}")
        return None, f"the model's own LM head ({why_not})"

    # ------------------------------------------------------------------ public

    @torch.no_grad()
    def generate(
        self,
        prompts: Sequence[MaskedPrompt],
        interventions: Sequence[RowIntervention],
        stop: StopRule,
        progress: ProgressCallback | None = None,
    ) -> dict[ResultKey, Generation]:
        with self.slot_hooks():
            return super().generate(prompts, interventions, stop, progress)

    # ------------------------------------------------------------------ planning

    def _chunks(self, rows: list[Row], prefix_caches: PrefixCaches, max_new_tokens: int):
        """Rows that continue a shared context cache: whole queries (their rows share states), as many a batch
        as ``_packing`` says, spread evenly (``query_batches``). Rows with a context cache of their
        own (head masks, ``MaskBelow`` rows that hide context, conditions with visible context after hidden
        context: "instructions", "answers", "inputs", "example:i") batch as in the fast engine, by cache, so
        that only a few such caches are alive at a time; they share little anyway."""
        yield from super()._chunks([r for r in rows if r.prefix_key[1] is not None], prefix_caches, max_new_tokens)
        for group in self.ablation_groups([r for r in rows if r.prefix_key[1] is None]):
            by_query: dict[int, list[Row]] = {}
            for row in group:
                by_query.setdefault(row.item, []).append(row)
            queries = sorted(by_query.values(), key=lambda rs: (len(rs[0].prefix_key[0]), len(rs[0].query_ids)))
            size = self._rows_per_batch(group, prefix_caches, max_new_tokens)
            whole, wide, per_batch, part = self._packing(queries, size, prefix_caches, max_new_tokens)
            for rows in wide:
                yield from (rows[start : start + part] for start in range(0, len(rows), part))
            yield from query_batches(whole, per_batch)

    def _packing(
        self, queries: list[list[Row]], size: int, prefix_caches: PrefixCaches, max_new_tokens: int
    ) -> tuple[list[list[Row]], list[list[Row]], int, int]:
        """The queries a batch takes whole, those split, how many whole queries a batch takes, and the rows
        of a split query's batches (``size``, within the KV-memory bound). ``--batch-size`` counts rows. The
        automatic rule's ``size`` counts what a batch stores and computes per layer, which here is a query's
        states (``query_states``: a slot per diverged row and one shared, before any split), not its rows;
        and a batch never holds more rows than the KV memory bound allows unshared (splits can leave every
        row a slot of its own)."""
        if self.batch_size:
            states, unshared = [float(len(rows)) for rows in queries], size  # rows, and no more
        else:
            longest = self._longest([r for rows in queries for r in rows], max_new_tokens)
            unshared = rows_by_memory(prefix_caches.get(queries[0][0]), longest, self.kv_memory_fraction, self.device)
            states = [query_states(rows, self.n_layers) for rows in queries]
        fits, per_batch, part = packing([len(rows) for rows in queries], states, size, unshared)
        whole = [rows for rows, fit in zip(queries, fits, strict=True) if fit]
        wide = [rows for rows, fit in zip(queries, fits, strict=True) if not fit]
        return whole, wide, per_batch, part

    # ------------------------------------------------------------------ the hooks

    @contextmanager
    def routing(self, routes: SlotRoutes) -> Iterator[None]:
        """Within the block, the slot hooks follow ``routes`` (outside it they leave every forward alone)."""
        self._routes = routes
        try:
            yield
        finally:
            self._routes = None

    @contextmanager
    def slot_hooks(self) -> Iterator[None]:
        """Within the block, a pre-hook on every decoder layer maps its inputs onto the layer's slots
        whenever ``routing`` is active (a ``TreeDecode`` forward); ``generate`` holds it, and so must
        any caller that drives a ``TreeDecode`` itself."""
        handles = [
            layer.register_forward_pre_hook(self._pre_hook(idx), with_kwargs=True)
            for idx, layer in enumerate(self.layers)
        ]
        try:
            yield
        finally:
            for handle in handles:
                handle.remove()
            self._routes = None

    def _pre_hook(self, idx: int):
        call = LayerCall(self.layers[idx])

        def hook(module, args, kwargs):
            routes = self._routes
            if routes is None:
                return None
            hidden, kwargs = call.split(args, kwargs)
            hidden = hidden.index_select(0, routes.parent[idx])  # [slots at idx, T, d]
            leaf = routes.leaf[idx]
            return (hidden,), {
                name: self.slice_argument(name, value, leaf, routes.leaves) for name, value in kwargs.items()
            }

        return hook

    @staticmethod
    def slice_argument(name: str, value, leaf: torch.Tensor, leaves: int):
        """Decoder-layer argument ``name`` for the layer's slots: per-row values (``PER_ROW``, and
        ``PER_ROW_TIMES_HEADS`` with ``leaves`` rows of heads) take the rows ``leaf`` picks; values shared
        by every row (``NOT_PER_ROW``) pass unchanged; an unknown argument holding tensors is refused."""
        if isinstance(value, (tuple, list)) and (name in PER_ROW or name in PER_ROW_TIMES_HEADS):
            return type(value)(TreeEngine.slice_argument(name, v, leaf, leaves) for v in value)
        if isinstance(value, dict) and (name in PER_ROW or name in PER_ROW_TIMES_HEADS):
            return {key: TreeEngine.slice_argument(name, v, leaf, leaves) for key, v in value.items()}
        if name not in NOT_PER_ROW and _holds_tensor(value) and not isinstance(value, torch.Tensor):
            raise RuntimeError(
                f"the tree engine does not know whether the decoder layer argument {name!r} (a "
                f"{type(value).__name__} holding tensors) has one row per batch row; add it to "
                f"PER_ROW or NOT_PER_ROW in engines/tree.py"
            )
        if not isinstance(value, torch.Tensor) or name in NOT_PER_ROW or value.dim() == 0:
            return value
        if name in PER_ROW:
            return value if value.shape[0] == 1 else value.index_select(0, leaf)
        if name in PER_ROW_TIMES_HEADS:
            per_row = value.view(leaves, -1, *value.shape[1:]).index_select(0, leaf)
            return per_row.reshape(-1, *value.shape[1:])
        raise RuntimeError(
            f"the tree engine does not know whether the decoder layer argument {name!r} "
            f"has one row per batch row; add it to PER_ROW or NOT_PER_ROW in engines/tree.py"
        )

    # ------------------------------------------------------------------ decoding

    def _decode_chunk(self, chunk: list[Row], prefix_caches: PrefixCaches, stop: StopRule) -> list[Generation]:
        return TreeDecode(self, chunk, prefix_caches, stop).run()


def query_states(rows: list[Row], n_layers: int) -> float:
    """The slots one query's rows hold per layer, on average over the layers, while they share one history:
    at layer l one for each row diverged at or below l (``divergence_layer``), and one shared by the rest."""
    layers = [divergence_layer(row, n_layers) for row in rows]
    per_layer = [sum(d <= layer for d in layers) + any(d > layer for d in layers) for layer in range(n_layers)]
    return sum(per_layer) / max(1, n_layers)


def packing(query_rows: list[int], states: list[float], size: float, unshared: int) -> tuple[list[bool], int, int]:
    """The tree engine's packing rule, for queries of ``query_rows`` rows and ``states`` states each under the
    rule's ``size`` and at most ``unshared`` rows a batch: which queries a batch takes whole (their states
    within ``size``, their rows within ``unshared``), how many whole queries a batch takes, and the rows of
    each part a query that does not fit is split into."""
    fits = [rows <= unshared and n <= size for rows, n in zip(query_rows, states, strict=True)]
    most = max((n for n, fit in zip(states, fits, strict=True) if fit), default=1.0)
    widest = max((rows for rows, fit in zip(query_rows, fits, strict=True) if fit), default=1)
    return fits, max(1, min(int(size / most), unshared // widest)), max(1, min(int(size), unshared))


def largest_batch_rows(n_queries: int, query_rows: int, states: float, size: float, unshared: int | None = None) -> int:
    """The rows of the largest batch ``_packing`` and ``query_batches`` make of ``n_queries`` queries alike
    (``query_rows`` rows, ``states`` states each) under the rule's ``size``, with at most ``unshared`` rows a
    batch (the KV-memory bound; None: unbounded): whole queries, as many as fit, spread evenly; a query that
    does not fit is split into parts (``packing``)."""
    if n_queries <= 0 or query_rows <= 0:
        return 0
    bound = query_rows * n_queries if unshared is None else max(1, unshared)
    (fit,), per_batch, part = packing([query_rows], [states], size, bound)
    return even_batch(n_queries, per_batch) * query_rows if fit else min(query_rows, part)


def tree_batch_rows(
    query: Sequence[Row], n_queries: int, size: int, n_layers: int, unshared: int | None = None, forced: bool = False
) -> int:
    """The rows of the largest batch the tree engine makes of ``n_queries`` queries whose rows are like
    ``query``'s (``_chunks``): per ablation, rows with a context cache of their own as the fast engine batches
    them, and whole queries of the rest by their states (``largest_batch_rows``). ``forced``: ``size`` is
    --batch-size, which counts rows (and bounds them)."""
    largest = 0
    for group in FastEngine.ablation_groups(list(query)):
        own = [r for r in group if r.prefix_key[1] is not None]
        shared = [r for r in group if r.prefix_key[1] is None]
        largest = max(largest, even_batch(n_queries * len(own), size))
        if shared:
            states = float(len(shared)) if forced else query_states(shared, n_layers)
            bound = size if forced else unshared
            largest = max(largest, largest_batch_rows(n_queries, len(shared), states, size, bound))
    return largest


def query_batches(queries: list[list[Row]], per_batch: int) -> Iterator[list[Row]]:
    """Batches of whole queries (the rows of a query share states), at most ``per_batch`` a batch, spread
    evenly over the fewest such batches (a small last batch would decode as long as a full one)."""
    if not queries:
        return
    batches = -(-len(queries) // max(1, per_batch))
    base, extra = divmod(len(queries), batches)
    start = 0
    for b in range(batches):
        count = base + (b < extra)
        yield [row for rows in queries[start : start + count] for row in rows]
        start += count
