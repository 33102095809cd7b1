"""LoRA training data: sequences in the zero-shot format, micro-batches, and each epoch's steps.

A training pair is the zero-shot prompt ``Q:{src}\\nA:`` followed by its answer and EOS. Losses:
``answer`` (the default) scores only the answer tokens (after ``A:``, EOS included) -- what
zero-shot decoding is evaluated on; ``full`` scores every position as the paper's code does.

Batches: with ``bucketing`` the examples are cut once into micro-batches of similar length (little
padding) and every epoch shuffles the micro-batches, an optimizer step taking batch_size /
micro_batch of them; without it every epoch shuffles the examples into batches and sorts each
batch into micro-batches. Either way a step's loss is the mean over its tokens.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch

from ..core.prompts import FORMATS, render_answered, render_query
from ..util.errors import UserError

LOSSES = ("answer", "full")
ZERO_SHOT = FORMATS["instr_none_QA"]  # Q:{src}\nA: -- no instructions, no examples


@dataclass(frozen=True)
class TrainingSequence:
    """One training pair, tokenised: ``Q:{src}\\nA:{tgt}`` + EOS; the answer starts at ``answer_start``."""

    ids: tuple[int, ...]
    answer_start: int

    def targets(self, loss: str) -> range:
        """Indices of the tokens the loss predicts (each from the position before it)."""
        return range(self.answer_start if loss == "answer" else 1, len(self.ids))


def encode_pairs(tokenizer, pairs, max_length: int = 512) -> list[TrainingSequence]:
    """Tokenise the whole text at once (as the paper does); the answer starts after the longest
    common prefix with the tokenised prompt ``Q:{src}\\nA:``."""
    out = []
    for ex in pairs:
        prompt = tokenizer(render_query(ZERO_SHOT, ex.source))["input_ids"]
        ids = tokenizer(render_answered(ZERO_SHOT, ex))["input_ids"][: max_length - 1]
        ids = ids + [tokenizer.eos_token_id]
        start = next((i for i, (a, b) in enumerate(zip(prompt, ids)) if a != b), min(len(prompt), len(ids)))
        out.append(TrainingSequence(tuple(ids), max(1, start)))
    return out


@dataclass
class MicroBatch:
    """Right-padded ids and mask, and the loss targets: (row, index of the predicted token)."""

    ids: torch.Tensor
    mask: torch.Tensor
    rows: torch.Tensor
    positions: torch.Tensor  # index of each target token; its logits come from position - 1
    tokens: int  # number of targets
    key: int  # identity of this micro-batch (the activation cache is keyed by it)

    def labels(self) -> torch.Tensor:
        """[B, T] with the targets' tokens and -100 elsewhere (for the model's own loss)."""
        labels = torch.full_like(self.ids, -100)
        labels[self.rows, self.positions] = self.ids[self.rows, self.positions]
        return labels


def make_micro_batch(seqs: Sequence[TrainingSequence], loss: str, pad_id: int, device, key: int = -1) -> MicroBatch:
    width = max(len(s.ids) for s in seqs)
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    mask = torch.zeros_like(ids)
    rows, positions = [], []
    for i, s in enumerate(seqs):
        ids[i, : len(s.ids)] = torch.tensor(s.ids)
        mask[i, : len(s.ids)] = 1
        targets = list(s.targets(loss))
        rows += [i] * len(targets)
        positions += targets
    return MicroBatch(
        ids.to(device),
        mask.to(device),
        torch.tensor(rows, device=device),
        torch.tensor(positions, device=device),
        len(positions),
        key,
    )


def check_batching(reuse: bool, bucketing: bool) -> None:
    """Kept activations are keyed by micro-batch, so they need the fixed ones."""
    if reuse and not bucketing:
        raise UserError("reusing activations needs fixed micro-batches: drop --no-bucketing or add --no-reuse")


def fixed_micro_batches(
    seqs: list[TrainingSequence], size: int, loss: str, pad_id: int, device, first_key: int = 0
) -> list[MicroBatch]:
    """Micro-batches of similar lengths, made once; keyed first_key, first_key + 1, ..."""
    order = sorted(range(len(seqs)), key=lambda i: (len(seqs[i].ids), i))
    return [
        make_micro_batch([seqs[i] for i in order[s : s + size]], loss, pad_id, device, key=first_key + n)
        for n, s in enumerate(range(0, len(order), size))
    ]


def epoch_steps(
    seqs: list[TrainingSequence],
    buckets: list[MicroBatch] | None,
    batch_size: int,
    micro_batch: int,
    loss: str,
    pad_id: int,
    device,
    gen: torch.Generator,
) -> Iterator[list[MicroBatch]]:
    """One epoch's optimizer steps, each a list of micro-batches."""
    if buckets is not None:
        order = torch.randperm(len(buckets), generator=gen).tolist()
        per_step = max(1, batch_size // micro_batch)
        for s in range(0, len(order), per_step):
            yield [buckets[i] for i in order[s : s + per_step]]
        return
    order = torch.randperm(len(seqs), generator=gen).tolist()
    for start in range(0, len(order), batch_size):
        batch = sorted((seqs[i] for i in order[start : start + batch_size]), key=lambda s: len(s.ids))
        yield [
            make_micro_batch(batch[m : m + micro_batch], loss, pad_id, device)
            for m in range(0, len(batch), micro_batch)
        ]
