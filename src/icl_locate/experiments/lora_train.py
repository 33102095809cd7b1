"""Training one single-layer LoRA adapter: sequences, batches, losses, and two ways to run them.

* **plain** (``reuse=False``): the model's own forward and loss, every layer, every epoch;
  ``loss="full"`` with unbucketed batches is exactly the code of earlier versions (and the
  paper's loss: every non-padding position, prompt included).
* **reuse** (the default): the layers below the adapted layer l do not depend on the adapter, so
  their output -- the input of layer l -- is computed once, without gradients, for every training
  and validation micro-batch, and kept (in the model's dtype; its bytes are reported). Each epoch
  then runs layers l..L-1 from it: the layers below are swapped for pass-throughs while the
  adapter trains (the model's own forward still builds masks and rotary tables) and a pre-hook on
  layer l hands it the kept input. The LM head runs only at the loss positions, in chunks, and
  the cross-entropy is backpropagated chunk by chunk into the final hidden states, so no
  [positions, vocabulary] tensor for a whole micro-batch ever exists. Exact: same losses and
  gradients as the plain path up to float rounding (tested), and checked on the model at start.

Losses: ``answer`` (the default) scores only the answer tokens (after ``A:``, EOS included) -- what
zero-shot decoding is evaluated on; ``full`` scores every position as the paper's code does.

Batches: with ``bucketing`` the examples are cut once into micro-batches of similar length (little
padding) and every epoch shuffles the micro-batches, an optimizer step taking batch_size /
micro_batch of them; without it every epoch shuffles the examples into batches and sorts each
batch into micro-batches (earlier versions). Either way a step's loss is the mean over its tokens.
"""

from __future__ import annotations

import contextlib
import math
import time
from dataclasses import dataclass
from typing import Callable, Iterator, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ..core.structure import decoder_layers, text_config
from ..util.errors import UserError
from ..util.system import available_memory

LOSSES = ("answer", "full")
HEAD_CHUNK_BYTES = 128 * 2 ** 20  # logits of one LM-head chunk (its softmax and gradient are as big again)


def head_chunk_rows(vocab_size: int) -> int:
    """Loss positions per LM-head chunk: 128 for a 262k vocabulary, 1024 for 32k. Each chunk reads the
    whole head matrix (a memory-bound pass), so chunks are as large as the memory they may take."""
    return max(16, HEAD_CHUNK_BYTES // (4 * vocab_size))


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
        prompt = tokenizer(f"Q:{ex.source.strip()}\nA:")["input_ids"]
        ids = tokenizer(f"Q:{ex.source.strip()}\nA:{ex.target.strip()}")["input_ids"][:max_length - 1]
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
        ids[i, :len(s.ids)] = torch.tensor(s.ids)
        mask[i, :len(s.ids)] = 1
        targets = list(s.targets(loss))
        rows += [i] * len(targets)
        positions += targets
    return MicroBatch(ids.to(device), mask.to(device), torch.tensor(rows, device=device),
                      torch.tensor(positions, device=device), len(positions), key)


def check_batching(reuse: bool, bucketing: bool) -> None:
    """Kept activations are keyed by micro-batch, so they need the fixed ones."""
    if reuse and not bucketing:
        raise UserError("reusing activations needs fixed micro-batches: drop --no-bucketing or add --no-reuse")


def fixed_micro_batches(seqs: list[TrainingSequence], size: int, loss: str, pad_id: int, device,
                        first_key: int = 0) -> list[MicroBatch]:
    """Micro-batches of similar lengths, made once; keyed first_key, first_key + 1, ..."""
    order = sorted(range(len(seqs)), key=lambda i: (len(seqs[i].ids), i))
    return [make_micro_batch([seqs[i] for i in order[s:s + size]], loss, pad_id, device, key=first_key + n)
            for n, s in enumerate(range(0, len(order), size))]


def epoch_steps(seqs: list[TrainingSequence], buckets: list[MicroBatch] | None, batch_size: int, micro_batch: int,
                loss: str, pad_id: int, device, gen: torch.Generator) -> Iterator[list[MicroBatch]]:
    """One epoch's optimizer steps, each a list of micro-batches."""
    if buckets is not None:
        order = torch.randperm(len(buckets), generator=gen).tolist()
        per_step = max(1, batch_size // micro_batch)
        for s in range(0, len(order), per_step):
            yield [buckets[i] for i in order[s:s + per_step]]
        return
    order = torch.randperm(len(seqs), generator=gen).tolist()
    for start in range(0, len(order), batch_size):
        batch = sorted((seqs[i] for i in order[start:start + batch_size]), key=lambda s: len(s.ids))
        yield [make_micro_batch(batch[m:m + micro_batch], loss, pad_id, device)
               for m in range(0, len(batch), micro_batch)]


# --------------------------------------------------------------------------- the plain path

def plain_loss(model: nn.Module, mb: MicroBatch, scale: float, backward: bool) -> float:
    """Sum of the targets' cross-entropies by the model's own forward and loss; backward on
    ``loss sum * scale`` when asked."""
    out = model(input_ids=mb.ids, attention_mask=mb.mask, labels=mb.labels())
    total = out.loss * mb.tokens  # the model's loss is the mean over the targets
    if backward:
        (total * scale).backward()
    return float(total.detach())


# --------------------------------------------------------------------------- the reuse path

class _Stop(Exception):
    """Ends a forward pass at the adapted layer (its input is all the cache needs)."""


class _PassThrough(nn.Module):
    """Stands in for a frozen layer below the adapted one: its output is already known."""

    def __init__(self, layer: nn.Module, returns_tuple: bool):
        super().__init__()
        self.returns_tuple = returns_tuple
        for name in ("attention_type", "layer_idx", "is_sliding"):  # attributes a model's loop may read
            if hasattr(layer, name):
                setattr(self, name, getattr(layer, name))

    def forward(self, hidden_states, *args, **kwargs):
        return (hidden_states,) if self.returns_tuple else hidden_states


def _hidden_argument(args: tuple, kwargs: dict) -> torch.Tensor:
    return args[0] if args else kwargs["hidden_states"]


class ReusedActivations:
    """The input of the adapted layer for every micro-batch, and a scope that runs the model from it."""

    def __init__(self, model: nn.Module, layer: int):
        self.model, self.layer = model, layer
        self.layers = decoder_layers(model)
        self.decoder = model.get_decoder()
        self.head = model.get_output_embeddings()
        self.softcap = getattr(text_config(model), "final_logit_softcapping", None)
        self.chunk = head_chunk_rows(self.head.weight.shape[0])
        self.inputs: dict[int, torch.Tensor] = {}
        self.returns_tuple = False
        self.seconds = 0.0
        self._current: torch.Tensor | None = None

    @property
    def bytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.inputs.values())

    @torch.no_grad()
    def fill(self, batches: Sequence[MicroBatch], memory_fraction: float = 0.5) -> None:
        """One forward per micro-batch up to the adapted layer; its input is kept."""
        started = time.perf_counter()
        captured: list[torch.Tensor] = []

        def grab(module, args, kwargs):
            captured.append(_hidden_argument(args, kwargs).detach())
            raise _Stop

        def output_type(module, args, output):
            self.returns_tuple = isinstance(output, tuple)

        budget = memory_fraction * available_memory(next(self.model.parameters()).device)
        handles = [self.layers[self.layer].register_forward_pre_hook(grab, with_kwargs=True),
                   self.layers[0].register_forward_hook(output_type)]
        try:
            for mb in batches:
                if mb.key in self.inputs:
                    continue
                try:
                    self.decoder(input_ids=mb.ids, attention_mask=mb.mask, use_cache=False)
                except _Stop:
                    pass
                self.inputs[mb.key] = captured.pop()
                if self.bytes > budget:
                    raise UserError(f"the kept activations of layer {self.layer} need more than "
                                    f"{budget / 2 ** 30:.1f} GiB (half the free memory); train with --no-reuse")
        finally:
            for h in handles:
                h.remove()
        self.seconds += time.perf_counter() - started

    @contextlib.contextmanager
    def running(self) -> Iterator[None]:
        """While inside, the model's forward skips the layers below the adapted one and starts
        layer l from the kept input of the micro-batch ``loss`` is given."""
        originals = list(self.layers[:self.layer])

        def feed(module, args, kwargs):
            if self._current is None:
                raise RuntimeError("no kept input selected for this forward")
            kwargs = dict(kwargs)
            if args:
                args = (self._current,) + tuple(args[1:])
            else:
                kwargs["hidden_states"] = self._current
            return args, kwargs

        handle = self.layers[self.layer].register_forward_pre_hook(feed, with_kwargs=True)
        for i, layer in enumerate(originals):
            self.layers[i] = _PassThrough(layer, self.returns_tuple)
        try:
            yield
        finally:
            handle.remove()
            for i, layer in enumerate(originals):
                self.layers[i] = layer
            self._current = None

    def loss(self, mb: MicroBatch, scale: float, backward: bool) -> float:
        """Sum of the targets' cross-entropies from the kept input (inside ``running``); backward on
        ``loss sum * scale`` when asked, one head chunk at a time."""
        self._current = self.inputs[mb.key]
        with torch.set_grad_enabled(backward):
            hidden = self.decoder(input_ids=mb.ids, attention_mask=mb.mask, use_cache=False).last_hidden_state
            states = hidden[mb.rows, mb.positions - 1]  # [N, d]: the position before each target
        targets = mb.ids[mb.rows, mb.positions]
        detached = states.detach().requires_grad_(backward)
        total = 0.0
        for start in range(0, mb.tokens, self.chunk):
            with torch.set_grad_enabled(backward):
                logits = self.head(detached[start:start + self.chunk]).float()
                if self.softcap:
                    logits = torch.tanh(logits / self.softcap) * self.softcap
                chunk = F.cross_entropy(logits, targets[start:start + self.chunk], reduction="sum")
            if backward:
                (chunk * scale).backward()
            total += float(chunk.detach())
        if backward:
            states.backward(detached.grad)
        return total


# --------------------------------------------------------------------------- the loop

@dataclass
class TrainingRecord:
    train_loss: list[float]
    val_loss: list[float]
    best_val_loss: float
    train_tokens: int  # loss targets trained on, all epochs
    sequence_tokens: int  # tokens of the training sequences processed (padding not counted), all epochs
    train_seconds: float  # optimizer steps, the activation cache's forwards included
    val_seconds: float
    cache_bytes: int
    path: str

    def as_dict(self) -> dict:
        return dict(self.__dict__)


def mean_val_loss(loss_fn, batches: Sequence[MicroBatch]) -> float:
    total = sum(loss_fn(mb, 1.0, False) for mb in batches)
    return total / max(1, sum(mb.tokens for mb in batches))


def train(peft_model, train_seqs: list[TrainingSequence], val_seqs: list[TrainingSequence], layer: int, pad_id: int, settings,
          log: Callable[[str], None] = lambda m: None) -> TrainingRecord:
    """AdamW on the adapter, early stopping on the validation loss (the best adapter is kept)."""
    check_batching(settings.reuse, settings.bucketing)
    base = peft_model.get_base_model()
    device = next(peft_model.parameters()).device
    params = [p for p in peft_model.parameters() if p.requires_grad]
    optim = torch.optim.AdamW(params, lr=settings.lr)
    gen = torch.Generator().manual_seed(settings.seed)
    loss = settings.loss
    buckets = fixed_micro_batches(train_seqs, settings.micro_batch, loss, pad_id, device) if settings.bucketing \
        else None
    val = fixed_micro_batches(val_seqs, settings.micro_batch, loss, pad_id, device,
                              first_key=len(buckets) if buckets is not None else 0)  # keys after training's
    reuse = ReusedActivations(base, layer) if settings.reuse else None
    scope = contextlib.nullcontext()
    if reuse is not None:
        reuse.fill(buckets + val)
        log(f"    kept the input of layer {layer}: {reuse.bytes / 2 ** 20:.1f} MiB for "
            f"{len(buckets) + len(val)} micro-batches ({reuse.seconds:.1f}s)")
        check_reuse(peft_model, reuse, buckets[0])
        scope = reuse.running()

    def loss_fn(mb: MicroBatch, scale: float, backward: bool) -> float:
        return reuse.loss(mb, scale, backward) if reuse is not None else plain_loss(peft_model, mb, scale, backward)

    record = TrainingRecord([], [], math.inf, 0, 0, reuse.seconds if reuse else 0.0, 0.0,
                            reuse.bytes if reuse else 0, "reuse" if reuse else "plain")
    best_state, bad_epochs = adapter_state(peft_model), 0
    with scope:
        for epoch in range(settings.max_epochs):
            peft_model.train()
            started = time.perf_counter()
            step_losses = []
            for step in epoch_steps(train_seqs, buckets, settings.batch_size, settings.micro_batch, loss, pad_id,
                                    device, gen):
                optim.zero_grad()
                n_tokens = sum(mb.tokens for mb in step)
                step_losses.append(sum(loss_fn(mb, 1.0 / n_tokens, True) for mb in step) / n_tokens)
                record.train_tokens += n_tokens
                record.sequence_tokens += sum(int(mb.mask.sum()) for mb in step)
                optim.step()
            record.train_seconds += time.perf_counter() - started
            record.train_loss.append(sum(step_losses) / max(1, len(step_losses)))
            peft_model.eval()
            started = time.perf_counter()
            with torch.no_grad():
                val_loss = mean_val_loss(loss_fn, val)
            record.val_seconds += time.perf_counter() - started
            record.val_loss.append(val_loss)
            log(f"    epoch {epoch + 1}: train {record.train_loss[-1]:.4f}  val {val_loss:.4f}")
            if val_loss < record.best_val_loss - settings.threshold:
                record.best_val_loss, best_state, bad_epochs = val_loss, adapter_state(peft_model), 0
            else:
                bad_epochs += 1
                if bad_epochs >= settings.patience:
                    break
    load_adapter_state(peft_model, best_state)
    return record


@torch.no_grad()
def check_reuse(peft_model, reuse: ReusedActivations, mb: MicroBatch) -> None:
    """The reuse path must give the plain path's loss on this model (it assumes the logits are
    the output embedding of the decoder's last hidden state, softcapped as the config says)."""
    was_training = peft_model.training
    peft_model.eval()
    try:
        plain = plain_loss(peft_model, mb, 1.0, False)
        with reuse.running():
            reused = reuse.loss(mb, 1.0, False)
    finally:
        peft_model.train(was_training)
    if not math.isclose(plain, reused, rel_tol=1e-3, abs_tol=1e-3):
        raise RuntimeError(f"reusing activations gives loss {reused:.5f} where the model's own forward gives "
                           f"{plain:.5f}; train with --no-reuse")


def adapter_state(peft_model) -> dict:
    return {k: v.detach().clone() for k, v in peft_model.named_parameters() if v.requires_grad}


def load_adapter_state(peft_model, state: dict) -> None:
    with torch.no_grad():
        for k, v in peft_model.named_parameters():
            if k in state:
                v.copy_(state[k])
