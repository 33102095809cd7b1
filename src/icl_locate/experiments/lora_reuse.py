"""The reuse path of LoRA training: the adapted layer's input computed once, the layers above run from it.

The layers below the adapted layer l do not depend on the adapter, so their output -- the input of
layer l -- is computed once, without gradients, for every training and validation micro-batch, and
kept (in the model's dtype, in memory up to half the free memory, beyond that in files read back
memory-mapped; the bytes are reported). Each epoch then runs layers l..L-1 from it: the layers
below are swapped for pass-throughs while the adapter trains (the model's own forward still builds
masks and rotary tables) and a pre-hook on layer l hands it the kept input (``core/surgery.py``).
A training micro-batch runs in row pieces whose saved activations (measured per token on the model
at start) fit ``activation_mb``. The LM head runs only at the loss positions, in chunks whose loss
and gradient are written out (``ChunkedHeadLoss``), so no [positions, vocabulary] tensor for a whole
micro-batch ever exists. Exact: same losses and gradients as the plain path up to float rounding
(tested), and checked on the model at start.
"""

from __future__ import annotations

import contextlib
import math
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import torch
from torch import nn

from ..core.structure import decoder_layers, logit_softcap
from ..core.surgery import feed_input, output_kind, skip_layers_below, stop_before
from ..util.errors import UserError
from ..util.system import available_memory
from .lora_batches import MicroBatch
from .lora_loss import ChunkedHeadLoss, autocast_scope, plain_loss


def _nbytes(tensor: torch.Tensor) -> int:
    return tensor.numel() * tensor.element_size()


class ReusedActivations:
    """The input of the adapted layer for every micro-batch, and a scope that runs the model from it."""

    def __init__(self, model: nn.Module, layer: int, activation_bytes: int | None = None, autocast: str = "off"):
        self.model, self.layer, self.autocast = model, layer, autocast
        self.activation_bytes = activation_bytes  # None: no split
        self.bytes_per_token: float | None = None  # what autograd keeps, measured by ``measure``
        self.layers = decoder_layers(model)
        self.decoder = model.get_decoder()  # pyright: ignore[reportCallIssue]
        self.head_loss = ChunkedHeadLoss(
            model.get_output_embeddings(),  # pyright: ignore[reportCallIssue]
            logit_softcap(model),
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
        budget = memory_bytes if memory_bytes is not None else available_memory(self.device) // 2
        with output_kind(self.model) as kind:
            for mb in batches:
                if mb.key in self.inputs or mb.key in self.spilled:
                    continue
                with stop_before(self.model, self.layer) as stopped, autocast_scope(self.autocast, mb.ids.device):
                    self.decoder(input_ids=mb.ids, attention_mask=mb.mask, use_cache=False)
                kept = stopped.hidden
                assert kept is not None  # the forward stopped at the adapted layer
                if self.bytes + _nbytes(kept) <= budget:
                    self.inputs[mb.key] = kept
                else:
                    self._spill(mb.key, kept)
        if kind.returns_tuple is not None:
            self.returns_tuple = kind.returns_tuple
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

        def current() -> torch.Tensor:
            if self._current is None:
                raise RuntimeError("no kept input selected for this forward")
            return self._current

        try:
            with (
                feed_input(self.model, self.layer, current),
                skip_layers_below(self.model, self.layer, self.returns_tuple),
            ):
                yield
        finally:
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


CPU_ACTIVATION_MB = 512


def activation_budget(activation_mb: int | None, device: torch.device) -> int:
    """Bytes of saved activations one training piece may take: ``activation_mb`` if given; else on a
    CPU a fixed CPU_ACTIVATION_MB (wider pieces are not faster there, only larger), on a GPU a quarter
    of its free memory (wide pieces are what keeps a GPU busy)."""
    if activation_mb is not None:
        return activation_mb * 2**20
    if device.type == "cpu":
        return CPU_ACTIVATION_MB * 2**20
    return available_memory(device) // 4


@contextlib.contextmanager
def reused_activations(
    peft_model,
    layer: int,
    buckets: list[MicroBatch],
    val: list[MicroBatch],
    activation_mb: int | None,
    autocast: str,
    log: Callable[[str], None],
) -> Iterator[ReusedActivations]:
    """Keep the input of ``layer`` for every micro-batch, check the path on the model, measure what
    a training token keeps for backward; inside, the model runs from the kept inputs (the kept bytes,
    the seconds they took and the bytes per token are the object's fields)."""
    base = peft_model.get_base_model()
    device = next(base.parameters()).device
    budget = activation_budget(activation_mb, device)
    reuse = ReusedActivations(base, layer, budget, autocast)
    try:
        reuse.fill(buckets + val)
        spilled = f" and {reuse.disk_bytes / 2**20:.1f} MiB in files" if reuse.disk_bytes else ""
        log(
            f"    kept the input of layer {layer}: {reuse.bytes / 2**20:.1f} MiB in memory{spilled} for "
            f"{len(buckets) + len(val)} micro-batches ({reuse.seconds:.1f}s)"
        )
        check_reuse(peft_model, reuse, buckets[0])
        with reuse.running():
            peft_model.train()  # dropout masks count too
            widest = max(buckets, key=lambda mb: mb.ids.shape[1])
            per_token = reuse.measure(widest)
            log(
                f"    autograd keeps {per_token / 2**10:.0f} KiB a token for layers {layer}.."
                f"{len(reuse.layers) - 1}; the widest micro-batch runs in pieces of "
                f"{reuse.rows_per_piece(widest)} of {widest.ids.shape[0]} rows "
                f"(at most {budget / 2**20:.0f} MiB)"
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
