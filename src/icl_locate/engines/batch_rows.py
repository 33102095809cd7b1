"""Timed decoding steps over the work's first prompt, and how many rows an automatic batch takes.

A step's cost depends on the rows decoded together and on the tokens each is fed, and how it does
depends on the machine: the rows of a batch share every product's weights, so a step's cost per row
falls as rows are added until the products run at the machine's full rate (a CPU with a few cores
fills them with a few tens of rows; a GPU has many more units to fill); past that, attention over
every row's cache and the memory it streams make further rows cost as much or more. So the
calibration times real steps (``DecodingSteps``: the body and the LM head the engine will use, over a
KV cache of the first prompt, at the row count the engine will decode) rather than assume a machine.

The batch size: the engines' rule (``fast.rule_rows``) bounds a batch in rows, tokens and KV memory
alike everywhere. The check times a step at the rule's row count and at half of it. Where the half
cost less than 1 / ``DOUBLING_COST_LIMIT`` of the whole, rows are not latency-bound here: a step's cost
grows at least as fast with rows past the rule (it is convex in rows: each row costs at least what
the one before did, once the units are full), so no doubling can pay and none is tried (a doubled KV
cache is the calibration's largest allocation); halvings are then taken where a row clearly costs less
(at most ``HALVING_COST_LIMIT`` of its cost at twice the rows: a step's timing leaves out what each batch
pays beside its steps, its query prefill and its LM head calls' fixed part, which smaller batches pay more
often), but never below one query's rows (the tree engine packs whole queries into a batch, sharing their
states). Otherwise doublings are tried while the doubled step costs at most
``DOUBLING_COST_LIMIT`` times the step before (up to the KV-memory rule, ``BATCH_ROW_LIMIT`` and the
work's own rows). What is kept is a factor on the rule's rows (within the KV-memory bound: ``fast.scaled_rows``,
as the engines apply it), so prompts of other lengths keep its proportions.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from transformers import DynamicCache

from .base import last_hidden
from .calibration_cache import CalibrationCache, valid_batch_verdict
from .decoding import PreallocatedLayer
from .fast import MAX_BATCH_TOKENS, rows_by_memory, rule_rows
from .head import CertifiedHead, greedy_tokens
from .rows import KV
from .timing import Timer

BATCH_ROW_LIMIT = 1024  # no batch is measured beyond this many rows
# Twice the rows are taken where their step costs at most this many times the step of half as many:
# where decoding is latency-bound (more rows come almost free); and doublings are tried only where the
# rule's step costs at most this many times the step of half its rows (or the rule is one row). Smaller
# gains are not taken: a step
# over-states what more rows gain over a whole run
# (rows finish at different lengths, and the tree engine's shared states already shrink its low layers'
# products), while their KV cache is surely larger.
DOUBLING_COST_LIMIT = 1.25
# Half the rows are taken only where a step's row costs at most this fraction of the step before's.
HALVING_COST_LIMIT = 0.9
# ends a batch reason taken from an earlier verdict (``calibration_cache.py``: why it holds for this work)
BATCH_CACHED = "; measured before for this model here, over a cache of about this length"


def prompt_states(model, ids: list[int], cached: int, positions: int) -> tuple[KV, torch.Tensor]:
    """One forward over ``ids``: one row's keys and values over its first ``cached`` tokens, per layer
    ([1, kv heads, cached, head dim] each; causal attention: the later tokens change none of them), and
    the final hidden states at its last ``positions`` positions [positions, hidden]."""
    cache = DynamicCache()
    hidden = last_hidden(
        model, torch.tensor([ids], device=next(model.parameters()).device), cache=cache, positions=positions
    )
    layers: list = cache.layers
    return [(layer.keys[:, :, :cached], layer.values[:, :, :cached]) for layer in layers], hidden[0]


class DecodingSteps:
    """Greedy steps of any number of rows, each continuing the cached prompt ``kv`` with the first ``fed``
    of ``tokens`` (one: a plain step; more: a step verifying a draft), as the engines decode: a
    preallocated cache with a left-padding column (a real batch has padding, and a mask to apply), the
    head at every fed position, screened where a screen is given. One buffer serves every row count up to
    the largest asked so far."""

    def __init__(self, model, kv: KV, tokens: Sequence[int], new_tokens: int, memory_fraction: float):
        self.model, self.kv, self.tokens = model, kv, list(tokens)
        self.length = kv[0][0].shape[2] + 1  # the padding column, then the prompt
        self.buffers: list[tuple[torch.Tensor, torch.Tensor]] = []
        self.final_states: torch.Tensor | None = None  # the prompt's, where ``over`` made the cache
        self.cached_ids: list[int] | None = None  # the tokens the cache holds, where ``over`` made it
        # the engines' automatic rows for this prompt and ``new_tokens`` more, and the most rows their KV-memory
        # rule allows: read now, before any buffer of a check takes memory (the engines read it at their start)
        device, longest = kv[0][0].device, self.length - 1 + len(self.tokens) + new_tokens
        self.rule = rule_rows(kv, longest, MAX_BATCH_TOKENS, memory_fraction, device)
        self.by_memory = rows_by_memory(kv, longest, memory_fraction, device)

    @classmethod
    def over(cls, model, prompt_ids: Sequence[int], fed: int, new_tokens: int, memory_fraction: float) -> DecodingSteps:
        """Steps over the cache of ``prompt_ids`` but its last ``fed`` tokens, which a step feeds (at most);
        the same forward's final hidden states at every position are kept as ``final_states`` [len, hidden]
        (rows like those a head decodes: the calibration's sample)."""
        ids = list(prompt_ids)
        if not 1 <= fed < len(ids):
            raise ValueError(f"a prompt of {len(ids)} tokens leaves no cache before its last {fed}")
        kv, states = prompt_states(model, ids, len(ids) - fed, len(ids))
        steps = cls(model, kv, ids[-fed:], new_tokens, memory_fraction)
        steps.final_states, steps.cached_ids = states, ids[:-fed]
        return steps

    def prefix_kv(self, ids: Sequence[int]) -> KV | None:
        """The keys and values of ``ids`` where they begin the cached prompt (views of its cache: causal attention,
        so the prompt's later tokens changed none of them; a forward of ``ids`` alone may round its products
        differently, so these serve timings, not tokens that must equal another engine's), else None."""
        if self.cached_ids is None or list(ids) != self.cached_ids[: len(ids)]:
            return None
        return [(keys[:, :, : len(ids)], values[:, :, : len(ids)]) for keys, values in self.kv]

    def _room(self, rows: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
        if not self.buffers or self.buffers[0][0].shape[0] < rows:
            self.buffers = []  # the smaller buffer goes before the larger comes
            width = self.length + len(self.tokens)
            for keys, values in self.kv:  # [1, kv heads, length - 1, d] each; the rooms [rows, kv heads, width, d]
                room_k = keys.new_empty(rows, keys.shape[1], width, keys.shape[3])
                room_v = values.new_empty(rows, values.shape[1], width, values.shape[3])
                # the padding column is masked, yet its scores must be finite: zeros; the prompt's columns are
                # copied; the fed tokens' columns are written by each step before it reads them (written once)
                room_k[:, :, :1], room_v[:, :, :1] = 0, 0
                room_k[:, :, 1 : self.length], room_v[:, :, 1 : self.length] = keys, values
                self.buffers.append((room_k, room_v))
        return [(k[:rows], v[:rows]) for k, v in self.buffers]

    def step(self, rows: int, screen: CertifiedHead | None, fed: int = 1) -> Callable[[], torch.Tensor]:
        """One step of ``rows`` rows fed ``fed`` tokens each; repeatable (the cache is rewound at every
        call). Returns their greedy tokens [rows, fed]."""
        if not 1 <= fed <= len(self.tokens):
            raise ValueError(f"a step feeds 1 to {len(self.tokens)} tokens, not {fed}")
        room = self._room(rows)
        device = room[0][0].device
        step_input = torch.tensor([self.tokens[:fed]] * rows, device=device)  # [rows, fed]
        mask = torch.ones(rows, self.length + fed, dtype=torch.long, device=device)  # [rows, length + fed]
        mask[:, 0] = 0  # the padding column: positions start after it

        def run() -> torch.Tensor:
            cache = DynamicCache()
            cache.layers = [PreallocatedLayer(k, v, self.length) for k, v in room]  # pyright: ignore[reportAttributeAccessIssue]
            return greedy_tokens(self.model, screen, step_input, positions=fed, attention_mask=mask, cache=cache)

        return run

    def release(self) -> None:
        """Free the buffers (on a GPU also from torch's cache: the engines' memory rule reads free memory)."""
        self.buffers = []
        if self.kv[0][0].is_cuda:
            torch.cuda.empty_cache()


def choose_batch(
    steps: DecodingSteps,
    query_rows: int,
    work_rows: int,
    screen: CertifiedHead | None,
    timer: Timer,
    kept: CalibrationCache,
    key: str,
) -> tuple[float, str, dict[str, float]]:
    """``choose_batch_scale``'s factor, reason and seconds, or those of the verdict kept under ``key`` (its machine,
    model, head, rule, query rows and cache length: ``calibration_cache.py``); a verdict measured here is kept
    where it found decoding not latency-bound (``compute_bound``: then nothing else of the work moves it)."""
    verdict = kept.get(key)
    if valid_batch_verdict(verdict):
        return verdict["scale"], verdict["reason"] + BATCH_CACHED, verdict["measured"]
    scale, reason, seconds = choose_batch_scale(steps, query_rows, work_rows, screen, timer)
    if compute_bound(seconds, steps.rule):
        kept.put(key, dict(scale=scale, reason=reason, measured=seconds))
    return scale, reason, seconds


def compute_bound(seconds: dict[str, float], rule: int) -> bool:
    """Whether the batch check's steps (its "batch/ROWS" seconds) found decoding not latency-bound here: half the
    rule's rows were timed and cost less than 1 / ``DOUBLING_COST_LIMIT`` of the rule's (then only halvings are
    tried)."""
    half, rule_seconds = seconds.get(f"batch/{rule // 2}"), seconds.get(f"batch/{rule}")
    return half is not None and rule_seconds is not None and DOUBLING_COST_LIMIT * half < rule_seconds


@torch.no_grad()
def choose_batch_scale(
    steps: DecodingSteps, query_rows: int, work_rows: int, screen: CertifiedHead | None, timer: Timer
) -> tuple[float, str, dict[str, float]]:
    """The factor on the rule's rows that was measured fastest (1: the rule's; a power of two, so that
    prompts of other lengths keep the rule's proportions), the reason, and the seconds of a step at each
    row count tried ("batch/ROWS"). Each count is timed once (a step of many rows is long enough), after
    one warm-up step at the first. ``work_rows``: the rows of the whole work (no batch can hold more)."""
    rule, limit = steps.rule, min(BATCH_ROW_LIMIT, steps.by_memory)
    measured: dict[str, float] = {}

    def per_row(rows: int) -> float:
        if f"batch/{rows}" not in measured:
            measured[f"batch/{rows}"] = timer(f"batch/{rows}", steps.step(rows, screen))
        return measured[f"batch/{rows}"] / rows

    steps.step(rule, screen)()  # warm-up: kernels chosen, memory touched
    best, scale, cost = rule, 1.0, per_row(rule)
    half = rule // 2
    if half >= 1:
        per_row(half)
    if compute_bound(measured, rule):  # not latency-bound: fewer rows?
        rows = half
        while rows >= max(1, query_rows) and (fewer := per_row(rows)) <= HALVING_COST_LIMIT * cost:
            best, scale, cost, rows = rows, scale / 2, fewer, rows // 2
    else:  # half the rows cost about as much: more rows may come almost free (until one batch holds the work)
        rows = 2 * rule
        while rows <= limit and rows // 2 < work_rows and (more := per_row(rows)) <= DOUBLING_COST_LIMIT / 2 * cost:
            best, scale, cost, rows = rows, scale * 2, more, 2 * rows
    steps.release()
    if screen is not None:  # its logits' buffer grew to the largest count tried, not what the engine takes
        screen.release()
    tried = [f"{1e3 * s / n:.2f} at {n}" for n, s in sorted((int(k[6:]), s) for k, s in measured.items())]
    what = f"a decoding step's ms a row: {', '.join(tried)} rows"
    if best == rule:
        return 1.0, f"the rule's {rule} rows ({what})", measured
    return scale, f"{best} rows, not the rule's {rule} ({what})", measured
