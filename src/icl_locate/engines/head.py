"""The greedy token without the full-precision LM head product: a cheap screen, then a certificate.

A model with a large vocabulary spends much of each generated token in the LM head. Greedy decoding
needs only the top token, so a screen computes every logit cheaply together with a rigorous bound
on its error, and only the tokens that might still be the top one are computed in full precision
(fp32, the model's own arithmetic); the first largest of those wins, as ``argmax`` over all logits
would pick it. Three screens (``screens.py`` lists them), each kept only where ``calibrate.py``
measures it faster on the machine at hand:

- ``Bf16ScreenedHead`` (here): the product in bf16, for CPUs with bf16 instructions and GPUs;
- ``Int8ScreenedHead`` (``head_int8.py``): the product in int8 with the hidden state's outlier
  channels in fp32, for CPUs without fast bf16 whose ``torch._int_mm`` is fast (VNNI);
- ``Int8LinearScreenedHead`` (``head_int8_linear.py``): the same screen with its product in torch's
  quantized dynamic linear, whose AVX2 kernel (FBGEMM) is fast where ``torch._int_mm``'s is not.

So the result is the argmax of the fp32 logits: it can differ from the plain head only where two
logits tie to within fp32 rounding (the same kind of difference a different batch size makes).
Rows with too many candidates fall back to the full fp32 product. A screen follows the head: a
weight replaced, given new storage (``.data =``, a move to another device or dtype) or changed in
place (through the tensor: a write through ``.data`` is not seen) rebuilds it. Every
few calls one row's exact logits verify the bound: if it is ever exceeded, the screen switches
itself off with a warning and the full head decides from then on. Used only where it is checked to
be exact: the model's logits must be ``head(final hidden state)``, softcapped by
``final_logit_softcapping`` when the config sets it, with no bias (``screens.logits_mismatch``).
"""

from __future__ import annotations

import math
import warnings

import torch
from torch import nn

from ..core.structure import logit_softcap, softcapped
from .base import forward, last_hidden

UNIT_BF16 = 2.0**-8
UNIT_FP32 = 2.0**-24
SAFETY = 1.01  # headroom over a bound, for the few operations it does not itemise
CHECK_EVERY = 8  # one row's full logits verify the bound every this many calls (about 1/(8 B) of the head)
MAX_CANDIDATES_PER_ROW = 4096  # beyond this a row's logits are computed in full instead
PAIRS_PER_BLOCK = 16384  # candidate logits gathered at a time (d floats each)


def weight_source(weight: torch.Tensor) -> tuple:
    """What a screen's copy of ``weight`` depends on beside the tensor object: its storage (``.data =`` and moves
    swap it), device, dtype and version (in-place changes through the tensor bump it)."""
    return weight.data_ptr(), weight.device, weight.dtype, weight._version


class CertifiedHead:
    """``argmax(hidden)`` equal to ``argmax(lm_head(hidden))`` (softcapped): a subclass's screen names the
    candidates (``_candidates``), their fp32 logits decide."""

    kind = ""  # the name --head takes for this screen

    def __init__(self, model: nn.Module, check_every: int = CHECK_EVERY):
        """``check_every``: every this many calls, one row's full logits verify the bound (0: never)."""
        self.head = model.get_output_embeddings()  # pyright: ignore[reportCallIssue]
        self.softcap = logit_softcap(model)
        self.check_every, self.calls, self.disabled = check_every, 0, False
        self.stats = {"rows": 0, "candidates": 0, "full_rows": 0, "rebuilt": 0, "checked_rows": 0}
        self.buffer: torch.Tensor | None = None  # the screen's logits of the last call (``_screen_buffer``)
        self.weight = self.head.weight  # [V, d], the model's own (fp32)
        self.source = weight_source(self.weight)  # the weight's state the screen is derived from
        self._build()

    # ------------------------------------------------------------------ what a screen provides

    def _build(self) -> None:
        """Derive the screen from ``self.weight`` as it is now."""
        raise NotImplementedError

    def prepare(self, hidden: torch.Tensor) -> None:
        """Derive now what the screen takes from the first states it sees (``hidden`` [B, d]), so that a timed
        first call does not pay it; nothing for most screens."""

    def _candidates(self, hidden: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor] | None:
        """hidden [B, d] fp32 -> [K, 2] (row, token) pairs, row-major with tokens ascending, that hold every
        row's fp32 argmax, and [B] an upper bound on the fp32 logit of every token not among them; None
        where the bound failed its check (the full head decides)."""
        raise NotImplementedError

    @staticmethod
    def unsupported_reason(model: nn.Module) -> str | None:
        """Why a screen cannot be used for ``model`` (None: it can)."""
        head = model.get_output_embeddings()  # pyright: ignore[reportCallIssue]
        if not isinstance(head, nn.Linear):
            return "the output embedding is not a plain linear layer"
        if head.bias is not None:
            return "the LM head has a bias"
        if head.weight.dtype != torch.float32:
            return f"the LM head is {head.weight.dtype}, not float32 (nothing to gain)"
        return None

    # ------------------------------------------------------------------ shared

    def follows_head(self) -> bool:
        """Whether the screen is derived from the head's weight as it is now (the same tensor, storage and version)."""
        return self.head.weight is self.weight and weight_source(self.weight) == self.source

    def _refresh(self) -> None:
        """Rebuild the screen if the head's weight was replaced, given new storage or changed in place since."""
        if not self.follows_head():
            self.weight = self.head.weight
            self.source = weight_source(self.weight)
            self._build()
            self.stats["rebuilt"] += 1

    def cap(self, logits: torch.Tensor) -> torch.Tensor:
        """The model's final logit softcap (``final_logit_softcapping``), or the logits as they are."""
        return softcapped(logits, self.softcap)

    def logits_layout(self, rows: int) -> tuple[tuple[int, ...], torch.dtype] | None:
        """The shape and dtype of the screen's logits of ``rows`` states, as ``_screen_buffer`` holds them (None:
        a screen that keeps no logits buffer)."""
        return None

    def reserve(self, rows: int, device: torch.device) -> None:
        """Make the logits' buffer for ``rows`` states now and touch its pages: a timed first call then times
        the screen as later calls run it, not the page faults of a fresh buffer of tens to hundreds of MB."""
        layout = self.logits_layout(rows)
        if layout is not None:
            self._screen_buffer(*layout, device).zero_()

    def _screen_buffer(self, shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        """A tensor of ``shape`` for the screen's logits to be written into (contents undefined), from a buffer
        kept for the next call: a fresh one of a few hundred MB pays its page faults on every call, a large
        part of the screen's time on a CPU. It grows to the largest batch (no more memory than that batch
        took anyway) and lives until ``release`` (an engine releases it when its ``generate`` ends)."""
        size = math.prod(shape)
        if (
            self.buffer is None
            or self.buffer.numel() < size
            or (self.buffer.dtype, self.buffer.device) != (dtype, device)
        ):
            self.buffer = None  # the old one goes before the new one comes
            self.buffer = torch.empty(size, dtype=dtype, device=device)
        return self.buffer[:size].view(shape)

    def release(self) -> None:
        """Drop the logits' buffer (an engine's work is done, or a measurement grew it past what comes next)."""
        self.buffer = None

    def full_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.cap(hidden @ self.weight.T)

    def _row_to_check(self, rows: int) -> int | None:
        """The row whose exact logits verify the bound in this call (None: no check due)."""
        self.calls += 1
        if not self.check_every or self.calls % self.check_every:
            return None
        self.stats["checked_rows"] += 1
        return self.calls // self.check_every % rows

    def _bound_held(self, excess: float, detail: str) -> bool:
        """``excess``: the largest error beyond its bound in the checked row (<= 0: the bound held)."""
        if excess <= 0:
            return True
        warnings.warn(
            f"the {self.kind}-screened LM head's error bound was exceeded on this device ({detail}); the "
            "screen is switched off and the full head used from now on",
            stacklevel=3,
        )
        self.disabled = True
        return False

    @torch.no_grad()
    def argmax(self, hidden: torch.Tensor) -> torch.Tensor:
        """hidden: [B, d] final hidden states (after the final norm) -> [B] greedy tokens."""
        hidden = hidden.float()
        self._refresh()
        screened = None if self.disabled else self._candidates(hidden)
        if screened is None:
            return self.full_logits(hidden).argmax(-1)
        pairs, outside = screened
        counts = torch.bincount(pairs[:, 0], minlength=hidden.shape[0])
        self.stats["rows"] += hidden.shape[0]
        self.stats["candidates"] += int(counts.sum())
        tokens = torch.empty(hidden.shape[0], dtype=torch.long, device=hidden.device)
        crowded = (counts > MAX_CANDIDATES_PER_ROW) | (counts == 0)  # none: a non-finite state, decided in full
        if crowded.any():
            rows = crowded.nonzero()[:, 0]
            tokens[rows] = self.full_logits(hidden[rows]).argmax(-1)
            self.stats["full_rows"] += len(rows)
            keep = ~crowded[pairs[:, 0]]
            pairs, counts = pairs[keep], counts.masked_fill(crowded, 0)
        if len(pairs):
            self._decide(hidden, pairs, counts, outside, tokens)
        return tokens

    def _decide(
        self,
        hidden: torch.Tensor,
        pairs: torch.Tensor,
        counts: torch.Tensor,
        outside: torch.Tensor,
        tokens: torch.Tensor,
    ) -> None:
        """Fill ``tokens`` for the rows with candidates: the first (smallest) token of their largest fp32 logit."""
        r, v = pairs[:, 0], pairs[:, 1]
        logits = torch.cat(
            [
                torch.einsum("kd,kd->k", self.weight[v[i : i + PAIRS_PER_BLOCK]], hidden[r[i : i + PAIRS_PER_BLOCK]])
                for i in range(0, len(pairs), PAIRS_PER_BLOCK)
            ]
        )
        logits = self.cap(logits)  # [K]
        rows = hidden.shape[0]
        best = torch.full((rows,), -float("inf"), device=hidden.device).scatter_reduce(0, r, logits, "amax")
        at_best = logits == best[r]
        first = torch.full((rows,), len(self.weight), dtype=torch.long, device=hidden.device)
        first = first.scatter_reduce(0, r[at_best], v[at_best], "amin")
        decided = (counts > 0).nonzero()[:, 0]
        tokens[decided] = first[decided]
        if self.softcap:  # the cap flattens large logits: a token outside may reach the best capped value
            flat = decided[self.cap(outside[decided]) >= best[decided]]
            if len(flat):
                tokens[flat] = self.full_logits(hidden[flat]).argmax(-1)
                self.stats["full_rows"] += len(flat)


class Bf16ScreenedHead(CertifiedHead):
    """The screen in bf16, where bf16 products are faster than fp32 ones (bf16 CPU instructions, GPUs).

    1. ``approx = bf16(h) @ bf16(W).T`` over the whole vocabulary (fp32 accumulation, bf16 result);
    2. a rigorous bound ``E`` on ``|approx - h @ W.T|``: rounding h and W to bf16 changes each product
       h_i W_vi by at most (2u + u^2)|h_i W_vi| (u = 2^-8), the fp32 sum adds at most n 2^-24 of
       sum |h_i W_vi| <= ||h|| max_v ||W_v||, and the bf16 result adds u of its own magnitude;
    3. the true top token v* satisfies approx_v* >= max(approx) - 2E, so every token above that
       threshold is a candidate.

    The bound assumes fp32 accumulation, so on a GPU the bf16 product runs with reduced-precision
    reductions switched off."""

    kind = "bf16"

    def _build(self) -> None:
        self.screen = self.weight.detach().to(torch.bfloat16)
        self.max_norm = float(self.weight.detach().float().norm(dim=1).max())
        d = self.weight.shape[1]
        self.input_term = (2 * UNIT_BF16 + UNIT_BF16**2 + d * UNIT_FP32 * (1 + UNIT_BF16) ** 2) * SAFETY
        self.output_term = UNIT_BF16 / (1 - UNIT_BF16) * SAFETY

    def logits_layout(self, rows: int) -> tuple[tuple[int, ...], torch.dtype]:
        return (rows, self.screen.shape[0]), torch.bfloat16  # [B, V]

    def _approx(self, hidden: torch.Tensor) -> torch.Tensor:
        """bf16 logits [B, V]; on a GPU with reduced-precision reductions switched off in this scope
        (the bound assumes fp32 accumulation)."""
        out = self._screen_buffer(*self.logits_layout(hidden.shape[0]), hidden.device)
        if hidden.device.type != "cuda":
            return torch.mm(hidden.to(torch.bfloat16), self.screen.T, out=out)
        flags = torch.backends.cuda.matmul
        saved = flags.allow_bf16_reduced_precision_reduction
        flags.allow_bf16_reduced_precision_reduction = False
        try:
            return torch.mm(hidden.to(torch.bfloat16), self.screen.T, out=out)
        finally:
            flags.allow_bf16_reduced_precision_reduction = saved

    def _candidates(self, hidden: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor] | None:
        approx = self._approx(hidden)  # [B, V] bf16
        block_max, block_min = block_extremes(approx)  # [B, blocks] each
        top = block_max.amax(-1).float()
        magnitude = torch.maximum(top.abs(), block_min.amin(-1).float().abs())
        bound = self.output_term * magnitude + self.input_term * hidden.norm(dim=-1) * self.max_norm  # [B]
        row = self._row_to_check(hidden.shape[0])
        if row is not None:
            exact = hidden[row] @ self.weight.T  # [V], before the softcap (the bound is on the product)
            error = float((approx[row].float() - exact).abs().max())
            if not self._bound_held(error - float(bound[row]), f"{error:.3g} > {float(bound[row]):.3g}"):
                return None
        threshold = (top - 2 * bound).to(approx.dtype)
        # bf16 rounding of the threshold must not drop a candidate: step one bf16 ulp down
        threshold = torch.nextafter(threshold, torch.full_like(threshold, -float("inf")))
        pairs = at_least(approx, block_max, threshold)  # [K, 2], row-major: rows, then tokens ascending
        return pairs, threshold.float() + bound  # a token below the threshold is below this


SCAN_TOKENS = 1024  # tokens a block of the screen's logits: its max and min are one short reduction


def block_extremes(approx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The max and the min of each block of ``SCAN_TOKENS`` tokens of every row of ``approx`` [B, V] (the
    last block may be shorter): [B, ceil(V / SCAN_TOKENS)] each. Reductions over short blocks run faster on
    a CPU than over a whole vocabulary, and the blocks' maxima tell ``at_least`` which blocks to scan."""
    vocab = approx.shape[1]
    whole = vocab // SCAN_TOKENS * SCAN_TOKENS
    blocks = approx[:, :whole].unflatten(1, (whole // SCAN_TOKENS, SCAN_TOKENS))  # [B, blocks, S], a view
    block_max, block_min = blocks.amax(-1), blocks.amin(-1)
    if whole < vocab:
        tail = approx[:, whole:]
        block_max = torch.cat([block_max, tail.amax(-1, keepdim=True)], 1)
        block_min = torch.cat([block_min, tail.amin(-1, keepdim=True)], 1)
    return block_max, block_min


def at_least(approx: torch.Tensor, block_max: torch.Tensor, threshold: torch.Tensor) -> torch.Tensor:
    """The (row, token) pairs [K, 2] with ``approx[row, token] >= threshold[row]``, row-major with tokens
    ascending (``(approx >= threshold[:, None]).nonzero()``), comparing only the blocks whose max reaches
    the threshold (``block_extremes``): a row's candidates lie in a few blocks."""
    vocab = approx.shape[1]
    rows, blocks = (block_max >= threshold[:, None]).nonzero().unbind(1)  # row-major, blocks ascending
    columns = blocks[:, None] * SCAN_TOKENS + torch.arange(SCAN_TOKENS, device=approx.device)  # [K', S]
    inside = columns < vocab  # the last block may be shorter
    values = approx[rows[:, None], columns.clamp(max=vocab - 1)]  # [K', S]
    hit, offset = ((values >= threshold[rows, None]) & inside).nonzero().unbind(1)
    return torch.stack([rows[hit], columns[hit, offset]], 1)


def greedy_tokens(
    model: nn.Module, screen: CertifiedHead | None, ids: torch.Tensor, positions: int = 1, **inputs
) -> torch.Tensor:
    """[B, positions] greedy tokens at the last ``positions`` of ``ids`` [B, T] (``inputs``: ``forward``'s
    attention mask and cache): by the model's own head (logits only there), or by ``screen`` on the final states."""
    if screen is None:
        return forward(model, ids, keep_last=positions, **inputs).logits[:, -positions:].argmax(-1)
    hidden = last_hidden(model, ids, positions=positions, **inputs)  # [B, positions, d]
    return screen.argmax(hidden.flatten(0, 1)).view(ids.shape[0], positions)
