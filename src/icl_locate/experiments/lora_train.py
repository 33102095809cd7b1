"""Training one single-layer LoRA adapter: sequences, batches, losses, and two ways to run them.

* **plain** (``reuse=False``): the model's own forward and loss, every layer, every epoch;
  ``loss="full"`` with unbucketed batches is exactly the code of earlier versions (and the
  paper's loss: every non-padding position, prompt included).
* **reuse** (the default): the layers below the adapted layer l do not depend on the adapter, so
  their output -- the input of layer l -- is computed once, without gradients, for every training
  and validation micro-batch, and kept (in the model's dtype, in memory up to half the free
  memory, beyond that in files read back memory-mapped; the bytes are reported). Each epoch then
  runs layers l..L-1 from it: the layers below are swapped for pass-throughs while the adapter
  trains (the model's own forward still builds masks and rotary tables) and a pre-hook on layer l
  hands it the kept input. A training micro-batch runs in row pieces whose saved activations
  (measured per token on the model at start) fit ``activation_mb``. The LM head runs only at the
  loss positions, in chunks whose loss and gradient are written out (``ChunkedHeadLoss``), so no
  [positions, vocabulary] tensor for a whole micro-batch ever exists. Exact: same losses and
  gradients as the plain path up to float rounding (tested), and checked on the model at start.

Precision: the model's dtype, or with ``autocast="bf16"`` the forward passes under bf16 autocast
(``"auto"``: on a GPU), both paths alike.

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
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from ..core.structure import decoder_layers, text_config
from ..util.errors import UserError
from ..util.system import available_memory

LOSSES = ("answer", "full")
AUTOCAST = ("off", "bf16")
HEAD_CHUNK_BYTES = 128 * 2**20  # float32 logits of one LM-head chunk (a softcap needs a second buffer)


def autocast_scope(mode: str, device: torch.device):
    """Forward passes under bf16 autocast (matmuls in bfloat16; softmax, norms and the loss in float32,
    as torch's autocast lists say) or as they are. Backward runs outside, in the forward's dtypes."""
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=mode == "bf16")


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
        ids = tokenizer(f"Q:{ex.source.strip()}\nA:{ex.target.strip()}")["input_ids"][: max_length - 1]
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


def autocast_mode(mode: str, device: str) -> str:
    """ "auto" made explicit: bf16 on a GPU that has it (bf16 matmuls are what GPUs are fast at), off
    on a CPU (float32 stays the default there: this project measures and tests on CPUs)."""
    check_autocast(mode)
    if mode != "auto":
        return mode
    gpu = device.startswith("cuda") and (not torch.cuda.is_available() or torch.cuda.is_bf16_supported())
    return "bf16" if gpu else "off"


def check_autocast(mode: str) -> None:
    if mode != "auto" and mode not in AUTOCAST:
        raise UserError(f"--autocast must be one of auto, {', '.join(AUTOCAST)}, got {mode!r}")


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


# --------------------------------------------------------------------------- the plain path


def plain_loss(model: nn.Module, mb: MicroBatch, scale: float, backward: bool, autocast: str = "off") -> float:
    """Sum of the targets' cross-entropies by the model's own forward and loss; backward on
    ``loss sum * scale`` when asked."""
    with autocast_scope(autocast, mb.ids.device):
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


def _nbytes(tensor: torch.Tensor) -> int:
    return tensor.numel() * tensor.element_size()


def _hidden_argument(args: tuple, kwargs: dict) -> torch.Tensor:
    return args[0] if args else kwargs["hidden_states"]


class ReusedActivations:
    """The input of the adapted layer for every micro-batch, and a scope that runs the model from it."""

    def __init__(self, model: nn.Module, layer: int, activation_bytes: int | None = None, autocast: str = "off"):
        self.model, self.layer, self.autocast = model, layer, autocast
        self.activation_bytes = activation_bytes  # None: no split
        self.bytes_per_token: float | None = None  # what autograd keeps, measured by ``measure``
        self.layers = decoder_layers(model)
        self.decoder = model.get_decoder()
        self.head_loss = ChunkedHeadLoss(
            model.get_output_embeddings(),
            getattr(text_config(model), "final_logit_softcapping", None),
            compute_dtype=torch.bfloat16 if autocast == "bf16" else None,
        )
        self.inputs: dict[int, torch.Tensor] = {}  # in memory
        self.spilled: dict[int, Path] = {}  # in files, beyond the memory budget
        self.disk_bytes = 0
        self._spill_dir: tempfile.TemporaryDirectory | None = None
        self.returns_tuple = False
        self.seconds = 0.0
        self._current: torch.Tensor | None = None

    @property
    def bytes(self) -> int:
        """Bytes of kept inputs in memory (``disk_bytes``: in files)."""
        return sum(_nbytes(t) for t in self.inputs.values())

    @torch.no_grad()
    def fill(self, batches: Sequence[MicroBatch], memory_bytes: int | None = None) -> None:
        """One forward per micro-batch up to the adapted layer; its input is kept: in memory up to
        ``memory_bytes`` (default: half the free memory), beyond that in files of a temporary
        directory, read back memory-mapped (exact either way; ``close`` deletes them)."""
        started = time.perf_counter()
        captured: list[torch.Tensor] = []

        def grab(module, args, kwargs):
            captured.append(_hidden_argument(args, kwargs).detach())
            raise _Stop

        def output_type(module, args, output):
            self.returns_tuple = isinstance(output, tuple)

        budget = memory_bytes if memory_bytes is not None else available_memory(self.device) // 2
        handles = [
            self.layers[self.layer].register_forward_pre_hook(grab, with_kwargs=True),
            self.layers[0].register_forward_hook(output_type),
        ]
        try:
            for mb in batches:
                if mb.key in self.inputs or mb.key in self.spilled:
                    continue
                try:
                    with autocast_scope(self.autocast, mb.ids.device):
                        self.decoder(input_ids=mb.ids, attention_mask=mb.mask, use_cache=False)
                except _Stop:
                    pass
                kept = captured.pop()
                if self.bytes + _nbytes(kept) <= budget:
                    self.inputs[mb.key] = kept
                else:
                    self._spill(mb.key, kept)
        finally:
            for h in handles:
                h.remove()
        self.seconds += time.perf_counter() - started

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def _spill(self, key: int, tensor: torch.Tensor) -> None:
        if self._spill_dir is None:
            self._spill_dir = tempfile.TemporaryDirectory(prefix="icl-locate-activations-")
        path = Path(self._spill_dir.name) / f"{key}.pt"
        torch.save(tensor.cpu(), path)
        self.spilled[key] = path
        self.disk_bytes += _nbytes(tensor)

    def kept(self, key: int) -> torch.Tensor:
        """The kept input of micro-batch ``key`` (a file's is memory-mapped: on a CPU the page
        cache holds it, not the process's heap)."""
        if key in self.inputs:
            return self.inputs[key]
        return torch.load(self.spilled[key], mmap=True, weights_only=True).to(self.device)

    def close(self) -> None:
        """Delete the files of spilled inputs (if any)."""
        if self._spill_dir is not None:
            self._spill_dir.cleanup()
            self._spill_dir, self.spilled, self.disk_bytes = None, {}, 0

    @contextlib.contextmanager
    def running(self) -> Iterator[None]:
        """While inside, the model's forward skips the layers below the adapted one and starts
        layer l from the kept input of the micro-batch ``loss`` is given."""
        originals = list(self.layers[: self.layer])

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
        ``loss sum * scale`` when asked. A training micro-batch runs in row pieces that keep the
        activations autograd saves within ``activation_bytes`` (same sums, same gradients)."""
        rows = self.rows_per_piece(mb) if backward else mb.ids.shape[0]
        kept = self.kept(mb.key)  # once: a spilled input is read from its file
        return sum(
            self._piece_loss(mb, kept, start, start + rows, scale, backward)
            for start in range(0, mb.ids.shape[0], rows)
        )

    def rows_per_piece(self, mb: MicroBatch) -> int:
        if self.activation_bytes is None or self.bytes_per_token is None:
            return mb.ids.shape[0]
        return max(1, int(self.activation_bytes // (self.bytes_per_token * mb.ids.shape[1])))

    def _piece_loss(
        self, mb: MicroBatch, kept: torch.Tensor, start: int, stop: int, scale: float, backward: bool
    ) -> float:
        """Rows start..stop of ``mb`` (``kept``: its kept input), cut to their longest sequence (right
        padding: the cut columns are padding, which no kept position attends to)."""
        width = int(mb.mask[start:stop].sum(dim=1).max())
        ids, mask = mb.ids[start:stop, :width], mb.mask[start:stop, :width]
        chosen = (mb.rows >= start) & (mb.rows < stop)
        rows, positions = mb.rows[chosen] - start, mb.positions[chosen]
        self._current = kept[start:stop, :width]
        with torch.set_grad_enabled(backward), autocast_scope(self.autocast, ids.device):
            hidden = self.decoder(input_ids=ids, attention_mask=mask, use_cache=False).last_hidden_state
            states = hidden[rows, positions - 1]  # [N, d]: the position before each target
        total, grad = self.head_loss(states.detach(), ids[rows, positions], scale, backward)
        if backward:
            states.backward(grad)
        return total

    def measure(self, mb: MicroBatch) -> float:
        """Bytes autograd keeps per token (row x column) to run layers l..L-1 backward, measured on
        the longest row of ``mb`` (inside ``running``, in training mode): tensors saved for backward,
        weights and kept inputs left out. Sets ``bytes_per_token``."""
        kept = self.kept(mb.key)
        existing = {t.untyped_storage().data_ptr() for t in [*self.model.parameters(), *self.inputs.values(), kept]}
        saved: dict[int, int] = {}

        def pack(tensor):
            storage = tensor.untyped_storage()
            if storage.data_ptr() not in existing:
                saved[storage.data_ptr()] = storage.nbytes()
            return tensor

        lengths = mb.mask.sum(dim=1)
        row, width = int(lengths.argmax()), int(lengths.max())
        self._current = kept[row : row + 1, :width]
        with (
            torch.enable_grad(),
            torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor),
            autocast_scope(self.autocast, mb.ids.device),
        ):
            hidden = self.decoder(
                input_ids=mb.ids[row : row + 1, :width], attention_mask=mb.mask[row : row + 1, :width], use_cache=False
            ).last_hidden_state
        del hidden
        self.bytes_per_token = sum(saved.values()) / width
        return self.bytes_per_token


class ChunkedHeadLoss:
    """Cross-entropy of the LM head at chosen positions, and its gradient with respect to their
    hidden states, written out one chunk of positions at a time.

    Why not autograd: it would allocate logits, their softcap, the log-softmax and its gradient
    afresh for every chunk (four or more [chunk, vocabulary] tensors, each a pass over memory and,
    at this size, fresh pages); here one reused buffer (two with a softcap) is updated in place and
    ``exp`` runs once for the loss and the gradient. Same arithmetic otherwise: logits in the head's
    dtype, then float32; the softcap ``c * tanh(z / c)`` as the model's config says."""

    def __init__(
        self,
        head: nn.Module,
        softcap: float | None,
        chunk_rows: int | None = None,
        compute_dtype: torch.dtype | None = None,
    ):
        """``chunk_rows``: loss positions per chunk (default: ``head_chunk_rows`` of the vocabulary)."""
        if not isinstance(head, nn.Linear):
            raise UserError(f"the output embedding is a {type(head).__name__}, not a Linear; train with --no-reuse")
        self.weight, self.bias, self.softcap = head.weight, head.bias, softcap
        if compute_dtype is not None and compute_dtype != head.weight.dtype:  # autocast: one copy, not one a chunk
            self.weight = head.weight.detach().to(compute_dtype)
            self.bias = None if head.bias is None else head.bias.detach().to(compute_dtype)
        self.chunk_rows = chunk_rows or head_chunk_rows(head.weight.shape[0])
        self._buffers: list[torch.Tensor] = []

    def _buffer(self, index: int, rows: int) -> torch.Tensor:
        while len(self._buffers) <= index:
            self._buffers.append(torch.empty(0))
        buf = self._buffers[index]
        if buf.shape[0] < rows:
            buf = self._buffers[index] = torch.empty(
                rows, self.weight.shape[0], dtype=torch.float32, device=self.weight.device
            )
        return buf[:rows]

    def chunks(self, n: int) -> list[range]:
        """Equal chunks of at most ``chunk_rows`` positions: every chunk reads the whole head matrix,
        so a short last chunk would cost almost as much as a full one."""
        count = max(1, math.ceil(n / self.chunk_rows))
        size = math.ceil(n / count)
        return [range(s, min(n, s + size)) for s in range(0, n, size)]

    @torch.no_grad()
    def __call__(
        self, states: torch.Tensor, targets: torch.Tensor, scale: float, backward: bool
    ) -> tuple[float, torch.Tensor | None]:
        """(sum of the cross-entropies, their gradient times ``scale`` w.r.t. ``states`` or None)."""
        grad = torch.empty_like(states) if backward else None
        total = 0.0
        for part in self.chunks(states.shape[0]):
            x, t = states[part.start : part.stop].to(self.weight.dtype), targets[part.start : part.stop]
            z = self._buffer(0, len(part))
            if self.weight.dtype == torch.float32:  # straight into the buffer
                torch.mm(x, self.weight.t(), out=z)
                if self.bias is not None:
                    z.add_(self.bias)
            else:
                z.copy_(F.linear(x, self.weight, self.bias))
            if self.softcap:
                tanh = z.div_(self.softcap).tanh_()
                z = torch.mul(tanh, self.softcap, out=self._buffer(1, len(part)))
            picked = z.gather(1, t[:, None]).squeeze(1)
            top = z.amax(dim=1)
            sums = z.sub_(top[:, None]).exp_().sum(dim=1)  # z now holds exp(z - max)
            total += float((sums.log() + top - picked).sum())
            if backward:
                p = z.div_(sums[:, None])  # softmax
                p[torch.arange(len(part), device=p.device), t] -= 1.0
                p.mul_(scale)
                if self.softcap:  # d(c tanh(z / c))/dz = 1 - tanh^2
                    p.mul_(tanh.square_().neg_().add_(1.0))
                grad[part.start : part.stop] = (p.to(self.weight.dtype) @ self.weight).to(grad.dtype)
        return total, grad


# --------------------------------------------------------------------------- the loop

CPU_ACTIVATION_MB = 512


def activation_budget(activation_mb: int | None, device: torch.device) -> int:
    """Bytes of saved activations one training piece may take: ``activation_mb`` if given; else on a
    CPU a fixed CPU_ACTIVATION_MB (wider pieces are not faster there: on the embedded model, adapter
    on layer 0, pieces of 1, 3 and 7 rows trained at 208, 200 and 213 tokens/s, within run-to-run
    noise, with peaks of 2482, 2811 and 3284 MiB), on a GPU a quarter of its free memory (wide pieces
    are what keeps a GPU busy)."""
    if activation_mb is not None:
        return activation_mb * 2**20
    if device.type == "cpu":
        return CPU_ACTIVATION_MB * 2**20
    return available_memory(device) // 4


@dataclass
class TrainingRecord:
    train_loss: list[float]
    val_loss: list[float]
    best_val_loss: float
    train_tokens: int  # loss targets trained on, all epochs
    sequence_tokens: int  # tokens of the training sequences processed (padding not counted), all epochs
    train_seconds: float  # optimizer steps, the activation cache's forwards included
    val_seconds: float
    path: str  # "reuse" or "plain"
    cache_bytes: int = 0  # kept inputs of the adapted layer, in memory
    cache_disk_bytes: int = 0  # ... and in files, beyond the memory budget
    bytes_per_token: float | None = None  # activations autograd keeps per token (reuse path), measured

    def as_dict(self) -> dict:
        return dict(self.__dict__)


def mean_val_loss(loss_fn, batches: Sequence[MicroBatch]) -> float:
    total = sum(loss_fn(mb, 1.0, False) for mb in batches)
    return total / max(1, sum(mb.tokens for mb in batches))


def train(
    peft_model,
    train_seqs: list[TrainingSequence],
    val_seqs: list[TrainingSequence],
    layer: int,
    pad_id: int,
    settings,
    log: Callable[[str], None] = lambda m: None,
) -> TrainingRecord:
    """AdamW on the adapter, early stopping on the validation loss (the best adapter is kept)."""
    check_batching(settings.reuse, settings.bucketing)
    device = next(peft_model.parameters()).device
    autocast = autocast_mode(settings.autocast, str(device))
    params = [p for p in peft_model.parameters() if p.requires_grad]
    optim = torch.optim.AdamW(params, lr=settings.lr)
    gen = torch.Generator().manual_seed(settings.seed)
    loss = settings.loss
    buckets = (
        fixed_micro_batches(train_seqs, settings.micro_batch, loss, pad_id, device) if settings.bucketing else None
    )
    val = fixed_micro_batches(
        val_seqs, settings.micro_batch, loss, pad_id, device, first_key=len(buckets) if buckets is not None else 0
    )  # keys after training's
    record = TrainingRecord([], [], math.inf, 0, 0, 0.0, 0.0, "reuse" if settings.reuse else "plain")
    best_state, bad_epochs = adapter_state(peft_model), 0
    with contextlib.ExitStack() as scope:
        reuse = (
            scope.enter_context(
                reused_activations(peft_model, layer, buckets, val, settings.activation_mb, autocast, record, log)
            )
            if settings.reuse
            else None
        )

        def loss_fn(mb: MicroBatch, scale: float, backward: bool) -> float:
            if reuse is not None:
                return reuse.loss(mb, scale, backward)
            return plain_loss(peft_model, mb, scale, backward, autocast)

        for epoch in range(settings.max_epochs):
            peft_model.train()
            started = time.perf_counter()
            step_losses = []
            for step in epoch_steps(
                train_seqs, buckets, settings.batch_size, settings.micro_batch, loss, pad_id, device, gen
            ):
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


@contextlib.contextmanager
def reused_activations(
    peft_model,
    layer: int,
    buckets: list[MicroBatch],
    val: list[MicroBatch],
    activation_mb: int | None,
    autocast: str,
    record: TrainingRecord,
    log: Callable[[str], None],
) -> Iterator[ReusedActivations]:
    """Keep the input of ``layer`` for every micro-batch, check the path on the model, measure what
    a training token keeps for backward; inside, the model runs from the kept inputs."""
    base = peft_model.get_base_model()
    device = next(base.parameters()).device
    reuse = ReusedActivations(base, layer, activation_budget(activation_mb, device), autocast)
    try:
        reuse.fill(buckets + val)
        record.train_seconds, record.cache_bytes, record.cache_disk_bytes = reuse.seconds, reuse.bytes, reuse.disk_bytes
        spilled = f" and {reuse.disk_bytes / 2**20:.1f} MiB in files" if reuse.disk_bytes else ""
        log(
            f"    kept the input of layer {layer}: {reuse.bytes / 2**20:.1f} MiB in memory{spilled} for "
            f"{len(buckets) + len(val)} micro-batches ({reuse.seconds:.1f}s)"
        )
        check_reuse(peft_model, reuse, buckets[0])
        with reuse.running():
            peft_model.train()  # dropout masks count too
            widest = max(buckets, key=lambda mb: mb.ids.shape[1])
            record.bytes_per_token = reuse.measure(widest)
            log(
                f"    autograd keeps {reuse.bytes_per_token / 2**10:.0f} KiB a token for layers {layer}.."
                f"{len(reuse.layers) - 1}; the widest micro-batch runs in pieces of "
                f"{reuse.rows_per_piece(widest)} of {widest.ids.shape[0]} rows "
                f"(at most {reuse.activation_bytes / 2**20:.0f} MiB)"
            )
            yield reuse
    finally:
        reuse.close()


@torch.no_grad()
def check_reuse(peft_model, reuse: ReusedActivations, mb: MicroBatch) -> None:
    """The reuse path must give the plain path's loss on this model (it assumes the logits are
    the output embedding of the decoder's last hidden state, softcapped as the config says)."""
    was_training = peft_model.training
    peft_model.eval()
    try:
        plain = plain_loss(peft_model, mb, 1.0, False, reuse.autocast)
        with reuse.running():
            reused = reuse.loss(mb, 1.0, False)
    finally:
        peft_model.train(was_training)
    if not math.isclose(plain, reused, rel_tol=1e-3, abs_tol=1e-3):
        raise UserError(
            f"reusing activations gives loss {reused:.5f} where the model's own forward gives "
            f"{plain:.5f}; train with --no-reuse"
        )


def adapter_state(peft_model) -> dict:
    return {k: v.detach().clone() for k, v in peft_model.named_parameters() if v.requires_grad}


def load_adapter_state(peft_model, state: dict) -> None:
    with torch.no_grad():
        for k, v in peft_model.named_parameters():
            if k in state:
                v.copy_(state[k])
