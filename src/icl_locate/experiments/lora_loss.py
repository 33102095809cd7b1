"""LoRA training losses: the model's own (the plain path), the LM head's in chunks, and their precision.

Precision: the model's dtype, or with ``autocast="bf16"`` the forward passes under bf16 autocast
(``"auto"``: on a GPU), both paths alike.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from ..util.errors import UserError
from .lora_batches import MicroBatch

AUTOCAST = ("off", "bf16")
HEAD_CHUNK_BYTES = 128 * 2**20  # float32 logits of one LM-head chunk (a softcap needs a second buffer)


def autocast_scope(mode: str, device: torch.device):
    """Forward passes under bf16 autocast (matmuls in bfloat16; softmax, norms and the loss in float32,
    as torch's autocast lists say) or as they are. Backward runs outside, in the forward's dtypes."""
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=mode == "bf16")


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


def head_chunk_rows(vocab_size: int) -> int:
    """Loss positions per LM-head chunk: 128 for a 262k vocabulary, 1024 for 32k. Each chunk reads the
    whole head matrix (a memory-bound pass), so chunks are as large as the memory they may take."""
    return max(16, HEAD_CHUNK_BYTES // (4 * vocab_size))


def plain_loss(model: nn.Module, mb: MicroBatch, scale: float, backward: bool, autocast: str = "off") -> float:
    """Sum of the targets' cross-entropies by the model's own forward and loss; backward on
    ``loss sum * scale`` when asked."""
    with autocast_scope(autocast, mb.ids.device):
        out = model(input_ids=mb.ids, attention_mask=mb.mask, labels=mb.labels())
    total = out.loss * mb.tokens  # the model's loss is the mean over the targets
    if backward:
        (total * scale).backward()
    return float(total.detach())


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
            if grad is not None:  # backward
                p = z.div_(sums[:, None])  # softmax
                p[torch.arange(len(part), device=p.device), t] -= 1.0
                p.mul_(scale)
                if self.softcap:  # d(c tanh(z / c))/dz = 1 - tanh^2
                    p.mul_(tanh.square_().neg_().add_(1.0))
                grad[part.start : part.stop] = (p.to(self.weight.dtype) @ self.weight).to(grad.dtype)
        return total, grad
