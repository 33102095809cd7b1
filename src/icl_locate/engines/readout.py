"""Reading a model at each prompt's last position: what the task-vector, function-vector and
logit-lens sweeps are made of.

* ``last_position_states``: the input of decoder layer l (``output_hidden_states[l]``) at the last
  position, e.g. a task vector theta_l of an ICL prompt (Hendel et al., 2023).
* ``mean_head_outputs``, ``function_vector``: Todd et al. (2024)'s function vector: each head's mean
  output over clean ICL prompts; the sum of the top heads' means as they enter the residual stream
  (through the output projection, bias left out). The heads' indirect effects, which choose the top
  heads, are ``indirect.py``'s, on ``answer_probabilities`` from here.
* ``logit_lens``: the final norm and LM head applied to the residual stream at every layer.
* ``head_readings``: what the lens and ``answer_probabilities`` read of a state's logits (the answer's
  probability, its rank, the top token), computed a block of the vocabulary at a time.

Readings go through the same hooks as the masks (``record``, ``intervene``), so the reference for
each is a plain forward of the model. Prompts that share their context (BOS, instructions,
examples) run it once and their own tokens together, right-padded (``read_last_positions``): padding
after a prompt's last token changes none of its states.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn

from ..core.interventions import ColumnMask
from ..core.patch_hooks import record
from ..core.patches import head_layout
from ..core.structure import (
    attention_module,
    decoder_layers,
    final_norm,
    logit_softcap,
    num_layers,
    output_projection,
    softcapped,
)
from ..util.errors import UserError
from .base import forward_sharing_start, logits_probe

LENS_ROWS = 256  # states read by the LM head at once (each pass reads the whole vocabulary's weights)
VOCAB_BLOCK = 1024  # tokens whose logits head_readings computes at a time: LENS_ROWS states' fit in a core's cache
READ_BATCH = 32  # prompts read in one forward


def _shared_length(start: int, length: int) -> int:
    """How many first tokens of a prompt of ``length`` run as shared context: ``start``, leaving the prompt at
    least one token of its own."""
    return max(0, min(start, length - 1))


@dataclass
class LastPositions:
    """What ``read_last_positions`` read at each prompt's last position."""

    hidden: torch.Tensor | None  # [prompts, len(layers), hidden]: the input of each decoder layer asked for
    heads: torch.Tensor | None  # [prompts, layers, heads, head_dim]: every head's output
    final: torch.Tensor | None  # [prompts, hidden]: the last layer's output (before the final norm)

    def mean_heads(self) -> torch.Tensor:
        """[layers, heads, head_dim]: every head's output averaged over the prompts (fp32)."""
        assert self.heads is not None, "head outputs not read"
        return self.heads.float().mean(0)

    def to(self, device: torch.device | str) -> LastPositions:
        """The same readings on ``device`` (these very tensors where they are there already)."""
        move = lambda t: t.to(device) if t is not None else None  # noqa: E731
        return LastPositions(move(self.hidden), move(self.heads), move(self.final))

    def nbytes(self) -> int:
        return sum(t.nbytes for t in (self.hidden, self.heads, self.final) if t is not None)

    def lens(self) -> torch.Tensor:
        """[prompts, len(layers) + 1, hidden]: the layers' inputs read, then the last layer's output (read with
        every layer: the residual stream the logit lens reads)."""
        assert self.hidden is not None and self.final is not None, "layers and the last layer's output not read"
        return torch.cat([self.hidden, self.final[:, None]], dim=1)


def _batches(prompts: Sequence[Sequence[int]], starts: Sequence[int]) -> list[list[int]]:
    """Indices of prompts with the same context before their own tokens, ``READ_BATCH`` at most a batch."""
    groups: dict[tuple, list[int]] = {}
    for i, (ids, start) in enumerate(zip(prompts, starts, strict=True)):
        groups.setdefault(tuple(ids[: _shared_length(start, len(ids))]), []).append(i)
    return [g[n : n + READ_BATCH] for g in groups.values() for n in range(0, len(g), READ_BATCH)]


@torch.no_grad()
def read_last_positions(
    model: nn.Module,
    prompts: Sequence[Sequence[int]],
    starts: Sequence[int] | None = None,
    mask: ColumnMask | None = None,
    layers: Sequence[int] = (),
    heads: bool = False,
    final: bool = False,
) -> LastPositions:
    """At each prompt's last position: the input of each decoder layer in ``layers``, with ``heads`` every
    head's output, with ``final`` the last layer's output; under ``mask`` (one row per prompt; None:
    nothing hidden). ``starts``: where each prompt's own tokens begin (its query); the context before
    runs once per batch of prompts sharing it, under the mask's part there (the same for all of them)."""
    n_layers = num_layers(model)
    n_heads = head_layout(model)[0] if heads else 0
    starts = starts if starts is not None else [0] * len(prompts)
    out_hidden: dict[int, torch.Tensor] = {}
    out_heads: dict[int, torch.Tensor] = {}
    out_final: dict[int, torch.Tensor] = {}
    for batch in _batches(prompts, starts):
        ids = [prompts[i] for i in batch]
        start = _shared_length(starts[batch[0]], min(len(x) for x in ids))
        rows_mask = mask.select_rows(batch) if mask is not None else None
        lasts = [len(x) - 1 for x in ids]
        hidden_sites = [(layer, p) for layer in layers for p in sorted(set(lasts))]
        head_sites = [(layer, h, p) for layer in range(n_layers) for h in range(n_heads) for p in sorted(set(lasts))]
        captured: list[torch.Tensor] = []
        hook = final_norm(model).register_forward_pre_hook(_keep_input(captured)) if final else None
        try:
            with record(model, hidden=hidden_sites, heads=head_sites) as seen:
                masks = [rows_mask] if rows_mask is not None else []
                first = [rows_mask.select_rows([0])] if rows_mask is not None else []  # the shared context's row
                forward_sharing_start(model, ids, start, interventions=masks, shared_interventions=first)
        finally:
            if hook is not None:
                hook.remove()
        for b, (i, last) in enumerate(zip(batch, lasts, strict=True)):
            if layers:
                out_hidden[i] = torch.stack([seen.hidden[(layer, last)][b] for layer in layers])
            if heads:
                out_heads[i] = torch.stack(
                    [
                        torch.stack([seen.heads[(layer, h, last)][b] for h in range(n_heads)])
                        for layer in range(n_layers)
                    ]
                )
            if final:
                out_final[i] = captured[-1][b, last - start].clone()
    stack = lambda values: torch.stack([values[i] for i in range(len(prompts))]) if values else None  # noqa: E731
    return LastPositions(stack(out_hidden), stack(out_heads), stack(out_final))


def _keep_input(into: list[torch.Tensor]):
    """A forward pre-hook that keeps its module's input ([B, T, d]) in ``into``."""
    return lambda module, args: into.append(args[0])


def last_position_states(
    model: nn.Module, prompts: Sequence[Sequence[int]], layers: Sequence[int], starts: Sequence[int] | None = None
) -> torch.Tensor:
    """[prompts, len(layers), hidden]: the input of each decoder layer in ``layers`` at each prompt's last
    position, nothing masked (``starts``: where each prompt's own tokens begin)."""
    hidden = read_last_positions(model, prompts, starts, layers=layers).hidden
    assert hidden is not None
    return hidden


def mean_head_outputs(
    model: nn.Module, prompts: Sequence[Sequence[int]], starts: Sequence[int] | None = None
) -> torch.Tensor:
    """[layers, heads, head_dim]: every head's output at the last position, averaged over ``prompts``."""
    return read_last_positions(model, prompts, starts, heads=True).mean_heads()


def read_everything(
    model: nn.Module, prompts: Sequence[Sequence[int]], starts: Sequence[int] | None = None
) -> LastPositions:
    """Every reading at each prompt's last position, nothing masked: each decoder layer's input, every head's
    output, the last layer's output (one forward for what the task vector, function vector and lens read)."""
    return read_last_positions(model, prompts, starts, layers=range(num_layers(model)), heads=True, final=True)


def _fp32_linear_head(model: nn.Module) -> nn.Linear | None:
    """The LM head where it is an fp32 linear layer (its product can be computed here, a block of the
    vocabulary at a time), else None."""
    head = model.get_output_embeddings()  # pyright: ignore[reportCallIssue]
    return head if isinstance(head, nn.Linear) and head.weight.dtype == torch.float32 else None


@torch.no_grad()
def head_logits(model: nn.Module, states: torch.Tensor, first: int = 0, last: int | None = None) -> torch.Tensor:
    """[N, last - first] fp32: the LM head applied to final hidden states ([N, hidden], after the final norm),
    softcapped as the model does (Gemma 2/3 squash their final logits): the model's own logits of the
    vocabulary's tokens ``first`` to ``last`` (None: to the end). A block of the vocabulary is computed
    alone only for an fp32 linear head; any other head computes all its logits and is sliced."""
    head = _fp32_linear_head(model)
    cap = logit_softcap(model)
    if head is None or states.dtype != torch.float32:
        logits = model.get_output_embeddings()(states).float()  # pyright: ignore[reportCallIssue]
        return softcapped(logits[:, first:last], cap)
    logits = torch.mm(states, head.weight[first:last].T)  # [N, last - first]
    if head.bias is not None:
        logits += head.bias[first:last]
    return softcapped(logits, cap, in_place=True)  # the product is this function's own


@torch.no_grad()
def check_head_logits(model: nn.Module, method: str) -> None:
    """Refuse (one line) a model whose own logits are not ``head_logits`` of its final hidden state (e.g. a
    logit scale the config adds): ``method`` reads the LM head on states it holds, not through the model."""
    logits, hidden = logits_probe(model)  # [1, vocab], [1, hidden]
    ours = head_logits(model, hidden)
    tolerance = max(1e-4, 16 * torch.finfo(hidden.dtype).eps) * float(logits.abs().max())
    if not torch.allclose(logits, ours, rtol=0, atol=tolerance):
        raise UserError(
            f"{method} reads the LM head on hidden states, and this model's logits are not its head applied to "
            "its final hidden state (softcapped where the config says so)"
        )


@dataclass
class HeadReadings:
    """What the lens and the indirect effects read of each state's logits over the whole vocabulary (on the
    CPU: a few numbers per state)."""

    answer_logit: torch.Tensor  # [N] the answer token's logit
    log_normaliser: torch.Tensor  # [N] float64: logsumexp of all the logits
    rank: torch.Tensor | None  # [N] int32: 1 + how many tokens' logits exceed the answer's (None: not read)
    top: torch.Tensor | None  # [N] int64: the first token with the largest logit, as argmax picks it

    @property
    def probability(self) -> torch.Tensor:
        """[N] softmax(logits)[answer]."""
        return (self.answer_logit.double() - self.log_normaliser).exp().float()


@torch.no_grad()
def head_readings(model: nn.Module, states: torch.Tensor, answers: torch.Tensor, ranks: bool = True) -> HeadReadings:
    """The answer's logit, the log normaliser and (``ranks``) the answer's rank and the top token of each final
    hidden state (``states`` [N, hidden], ``answers`` [N] token ids). On a CPU the logits are computed a
    block of the vocabulary at a time (``VOCAB_BLOCK`` tokens for ``LENS_ROWS`` states, wider for fewer): each
    block's passes (max, count, exp) then read it from cache, where one vocabulary-sized product per state
    would be read from memory once per pass; a GPU takes the whole vocabulary at once. The blocks that
    hold an answer are computed first and kept (at most the whole product, when the answers spread over
    every block), so that the rank compares the very values the other passes read."""
    answer_ids = answers.long().cpu()
    head = _fp32_linear_head(model)
    kept: dict[int, torch.Tensor] = {}  # first token -> that block's logits [N, block]
    if head is None or states.dtype != torch.float32:  # any other head: all its logits, one block
        kept[0] = head_logits(model, states)
        vocab = size = kept[0].shape[1]
    else:
        vocab = head.weight.shape[0]
        size = VOCAB_BLOCK * max(1, LENS_ROWS // max(1, len(states))) if states.device.type == "cpu" else vocab
    lowest, highest = (int(answer_ids.min()), int(answer_ids.max())) if len(answer_ids) else (0, 0)
    if lowest < 0 or highest >= vocab:
        raise ValueError(f"answer token ids must lie in [0, {vocab}): got {lowest}..{highest}")
    answer_logit = torch.empty(len(states), device=states.device)
    for first in sorted({a // size * size for a in answer_ids.tolist()}):
        if first not in kept:
            kept[first] = head_logits(model, states, first, first + size)
        own = ((answer_ids >= first) & (answer_ids < first + size)).nonzero()[:, 0]  # [n] rows, on the CPU
        within = (answer_ids[own] - first).to(states.device)
        own = own.to(states.device)
        answer_logit[own] = kept[first][own, within]
    target = answer_logit[:, None]
    block_lse = []
    best = torch.full((len(states),), -float("inf"), device=states.device)  # the largest logit so far
    top = torch.zeros(len(states), dtype=torch.long, device=states.device)  # its first token (argmax's 0 if none)
    rank = torch.ones(len(states), dtype=torch.int32, device=states.device)
    for first in range(0, vocab, size):
        logits = kept.pop(first, None)
        logits = head_logits(model, states, first, first + size) if logits is None else logits  # [N, block]
        block_lse.append(torch.logsumexp(logits, -1))  # [N]: exact to a unit of fp32 over a block
        if not ranks:
            continue
        block_best, block_top = logits.max(-1)  # the first largest of the block, as argmax
        top = torch.where(block_best > best, block_top + first, top)  # a tie keeps the earlier block's token
        best = torch.maximum(best, block_best)
        rank += (logits > target).sum(-1, dtype=torch.int32)
    # the blocks' sums in float64 (on the CPU: not every GPU has it): chained in fp32, each block's rounding
    # would add up (to ~1e-4 in a probability)
    log_normaliser = torch.logsumexp(torch.stack(block_lse, -1).cpu().double(), -1)  # [N]
    if not ranks:
        return HeadReadings(answer_logit.cpu(), log_normaliser, None, None)
    return HeadReadings(answer_logit.cpu(), log_normaliser, rank.cpu(), top.cpu())


@torch.no_grad()
def answer_probabilities(model: nn.Module, states: torch.Tensor, answers: Sequence[int]) -> torch.Tensor:
    """[N]: the probability of ``answers[n]`` from the final hidden state ``states[n]``, the LM head read in
    blocks of ``LENS_ROWS`` states (a product of many rows costs less per row than one of a few)."""
    probs = []
    for first in range(0, len(states), LENS_ROWS):
        answer = torch.tensor(list(answers[first : first + LENS_ROWS]))
        probs.append(head_readings(model, states[first : first + LENS_ROWS], answer, ranks=False).probability)
    return torch.cat(probs)


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


def lens_states(
    model: nn.Module,
    prompts: Sequence[Sequence[int]],
    starts: Sequence[int] | None = None,
    mask: ColumnMask | None = None,
) -> torch.Tensor:
    """[prompts, layers + 1, hidden]: at each prompt's last position, the input of every decoder layer l
    and (l = L) the last layer's output, under ``mask`` (one row per prompt)."""
    return read_last_positions(model, prompts, starts, mask, layers=range(num_layers(model)), final=True).lens()


@torch.no_grad()
def lens_readings(model: nn.Module, states: torch.Tensor, answers: Sequence[int]) -> tuple[torch.Tensor, list[int]]:
    """The logit lens of ``states`` ([N, hidden], residual-stream states): the final norm and the LM head
    applied to each (softcapped as the model does), and there the answer token's top-1 (1.0/0.0),
    probability and rank (1 = top): [N, 3]; and the top token of each."""
    norm = final_norm(model)
    stats, tops = [], []
    for start in range(0, len(states), LENS_ROWS):
        answer = torch.tensor(list(answers[start : start + LENS_ROWS]))
        read = head_readings(model, norm(states[start : start + LENS_ROWS]), answer)
        assert read.rank is not None and read.top is not None
        stats.append(torch.stack([(read.top == answer).float(), read.probability, read.rank.float()], -1))
        tops += read.top.tolist()
    return torch.cat(stats), tops


def logit_lens(
    model: nn.Module, ids: Sequence[int], answer: int, mask: ColumnMask | None = None
) -> tuple[torch.Tensor, list[int]]:
    """At the last position, for l = 0..L, the final norm and the LM head applied to the input of decoder
    layer l (l = L: the last layer's output, the model's own logits): [layers + 1, 3] with the answer
    token's top-1, probability and rank there, and the top token at each layer (``lens_readings``);
    under ``mask`` (one row)."""
    states = lens_states(model, [ids], mask=mask)[0]
    return lens_readings(model, states, [answer] * len(states))
