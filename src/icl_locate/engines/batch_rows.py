"""How many rows an automatic batch takes: the engines' rule, checked by timing a decoding step.

The rows of a batch share every product's weights, so a step's cost per row falls as rows are added,
until the products are large enough to run at the machine's full rate; past that, attention over every
row's cache and the memory it streams make further rows cost as much or more. Where that turns depends
on the machine (a CPU with a few cores fills them with a few tens of rows; a GPU has many more units to
fill) and on the prompt's length, while the engines' rule (``fast.rule_rows``) bounds a batch in rows,
tokens and KV memory alike everywhere. So the calibration times one decoding step (body and LM head,
the head the engine will use) over a KV cache of the work's first prompt, at the rule's row count and
at doublings of it, and keeps doubling while the doubled step costs at most ``DOUBLING_COST_LIMIT``
times the step before (up to the KV-memory rule and ``BATCH_ROW_LIMIT``). Where no doubling pays, it
tries halvings: fewer rows are taken where a row costs no more (less memory for the same speed), but
never fewer than one query's rows (the tree engine packs whole queries into a batch, sharing their
states). What is kept is a factor on the rule's bounds, so prompts of other lengths keep its proportions.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from transformers import DynamicCache

from .base import last_hidden
from .decoding import PreallocatedLayer
from .fast import MAX_BATCH_TOKENS, rows_by_memory, rule_rows
from .head import CertifiedHead, greedy_tokens
from .rows import KV

BATCH_ROW_LIMIT = 1024  # no batch is measured (or taken) beyond this many rows
# Twice the rows are taken where their step costs at most this many times the step of half as many:
# where decoding is latency-bound (more rows come almost free). Smaller gains are not taken: a step
# over-states what more rows gain over a whole run
# (rows finish at different lengths, and the tree engine's shared states already shrink its low layers'
# products), while their KV cache is surely larger.
DOUBLING_COST_LIMIT = 1.25

Timer = Callable[[str, Callable[[], object]], float]  # (what is timed, the work) -> seconds of one run


@torch.no_grad()
def choose_batch_scale(
    model,
    prompt_ids: list[int],
    new_tokens: int,
    query_rows: int,
    screen: CertifiedHead | None,
    timer: Timer,
    memory_fraction: float,
) -> tuple[float, str, dict[str, float]]:
    """The factor on the rule's rows that was measured fastest (1: the rule's; a power of two, so that
    prompts of other lengths keep the rule's proportions), the reason, and the seconds of a step at each
    row count tried ("batch/ROWS"). Each count is timed once (a step of many rows is long enough), after
    one warm-up step at the first."""
    if len(prompt_ids) < 2:
        return 1.0, "the rule's rows (a one-token prompt leaves no cache to time a step over)", {}
    kv = prompt_cache(model, prompt_ids[:-1])
    device = kv[0][0].device
    longest = len(prompt_ids) + new_tokens
    rule = rule_rows(kv, longest, MAX_BATCH_TOKENS, memory_fraction, device)
    limit = min(BATCH_ROW_LIMIT, rows_by_memory(kv, longest, memory_fraction, device))
    steps = DecodingSteps(model, kv, prompt_ids[-1], screen)
    measured: dict[str, float] = {}

    def per_row(rows: int) -> float:
        measured[f"batch/{rows}"] = timer(f"batch/{rows}", steps.step(rows))
        return measured[f"batch/{rows}"] / rows

    steps.step(rule)()  # warm-up: kernels chosen, memory touched
    best, cost = rule, per_row(rule)
    rows = 2 * rule
    while rows <= limit and (more := per_row(rows)) <= DOUBLING_COST_LIMIT / 2 * cost:
        best, cost, rows = rows, more, 2 * rows
    if best == rule:
        rows = rule // 2
        while rows >= max(1, query_rows) and (fewer := per_row(rows)) <= cost:
            best, cost, rows = rows, fewer, rows // 2
    steps.release()
    tried = [f"{1e3 * s / n:.2f} at {n}" for n, s in sorted((int(k[6:]), s) for k, s in measured.items())]
    what = f"a decoding step's ms a row: {', '.join(tried)} rows"
    if best == rule:
        return 1.0, f"the rule's {rule} rows ({what})", measured
    return best / rule, f"{best} rows, not the rule's {rule} ({what})", measured


def prompt_cache(model, ids: list[int]) -> KV:
    """One row's keys and values over ``ids``, per layer ([1, kv heads, len(ids), head dim] each)."""
    cache = DynamicCache()
    last_hidden(model, torch.tensor([ids], device=next(model.parameters()).device), cache=cache)
    layers: list = cache.layers
    return [(layer.keys, layer.values) for layer in layers]


class DecodingSteps:
    """Greedy steps of any number of rows, each continuing the cached prompt ``kv`` with ``token``, as
    the engines decode: a preallocated cache with a left-padding column (a real batch has padding, and
    a mask to apply), the screened head, or the model's own where ``screen`` is None. One buffer serves
    every row count up to the largest asked so far."""

    def __init__(self, model, kv: KV, token: int, screen: CertifiedHead | None):
        self.model, self.kv, self.token, self.screen = model, kv, token, screen
        self.length = kv[0][0].shape[2] + 1  # the padding column, then the prompt
        self.buffers: list[tuple[torch.Tensor, torch.Tensor]] = []

    def _room(self, rows: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
        if not self.buffers or self.buffers[0][0].shape[0] < rows:
            self.buffers = []  # the smaller buffer goes before the larger comes
            for keys, values in self.kv:  # [1, kv heads, length - 1, d] each; the rooms [rows, kv heads, length + 1, d]
                room_k = keys.new_zeros(rows, keys.shape[1], self.length + 1, keys.shape[3])
                room_v = values.new_zeros(rows, values.shape[1], self.length + 1, values.shape[3])
                room_k[:, :, 1 : self.length], room_v[:, :, 1 : self.length] = keys, values
                self.buffers.append((room_k, room_v))
        return [(k[:rows], v[:rows]) for k, v in self.buffers]

    def step(self, rows: int) -> Callable[[], torch.Tensor]:
        """One step of ``rows`` rows; repeatable (the cache is rewound at every call). Returns their tokens."""
        room = self._room(rows)
        device = room[0][0].device
        step_input = torch.full((rows, 1), self.token, device=device)  # [rows, 1]
        mask = torch.ones(rows, self.length + 1, dtype=torch.long, device=device)  # [rows, length + 1]
        mask[:, 0] = 0  # the padding column: positions start after it

        def run() -> torch.Tensor:
            cache = DynamicCache()
            cache.layers = [PreallocatedLayer(k, v, self.length) for k, v in room]  # pyright: ignore[reportAttributeAccessIssue]
            return greedy_tokens(self.model, self.screen, step_input, attention_mask=mask, cache=cache)[:, 0]

        return run

    def release(self) -> None:
        """Free the buffers (on a GPU also from torch's cache: the engines' memory rule reads free memory)."""
        self.buffers = []
        if self.screen is not None:  # its logits' buffer grew to the largest count tried, not what the engine takes
            self.screen.release()
        if self.kv[0][0].is_cuda:
            torch.cuda.empty_cache()
