"""The greedy token without the full-precision LM head product: a bf16 screen, then a certificate.

A model with a large vocabulary spends much of each generated token in the LM head, and where bf16
products are faster than fp32 ones (CPUs with bf16 instructions, GPUs; ``calibrate.py`` measures
it on the machine at hand) most of that product can run in bf16. Greedy decoding needs only the
top token, so:

1. ``approx = bf16(h) @ bf16(W).T`` over the whole vocabulary (fp32 accumulation, bf16 result);
2. a rigorous bound ``E`` on ``|approx - h @ W.T|``: rounding h and W to bf16 changes each product
   h_i W_vi by at most (2u + u^2)|h_i W_vi| (u = 2^-8), the fp32 sum adds at most n 2^-24 of
   sum |h_i W_vi| <= ||h|| max_v ||W_v||, and the bf16 result adds u of its own magnitude;
3. the true top token v* satisfies approx_v* >= max(approx) - 2E, so every token above that
   threshold is a candidate; their logits are computed in full precision (fp32, the model's own
   arithmetic) and the first largest wins, as ``argmax`` over all logits would pick it.

So the result is the argmax of the fp32 logits: it can differ from the plain head only where two
logits tie to within fp32 rounding (the same kind of difference a different batch size makes).
Rows with too many candidates fall back to the full fp32 product. The screen follows the head: a
weight replaced or changed in place (through the tensor, not through ``.data``) rebuilds it. The
bound assumes fp32 accumulation, so on a GPU the bf16 product runs with reduced-precision
reductions switched off, and every few calls one row's exact logits verify it: if it is ever
exceeded, the screen switches itself off with a warning and the full head decides from then on.
Used only where it is checked to be exact: the model's logits must be ``head(final hidden state)``, softcapped by
``final_logit_softcapping`` when the config sets it, with no bias (``screen_mismatch``).
"""

from __future__ import annotations

import warnings

import torch
from torch import nn

from ..core.structure import text_config
from .base import forward, last_hidden

UNIT_BF16 = 2.0**-8
UNIT_FP32 = 2.0**-24
SAFETY = 1.01  # headroom over the bound, for the few operations it does not itemise
CHECK_EVERY = 8  # one row's full logits verify the bound every this many calls (about 1/(8 B) of the head)
MAX_CANDIDATES_PER_ROW = 256  # beyond this a row's logits are computed in full instead


class ScreenedHead:
    """``argmax(hidden)`` equal to ``argmax(lm_head(hidden))`` (softcapped), computed with a bf16 screen."""

    def __init__(self, model: nn.Module, check_every: int = CHECK_EVERY):
        """``check_every``: every this many calls, one row's full logits verify the bound (0: never)."""
        self.head = model.get_output_embeddings()  # pyright: ignore[reportCallIssue]
        self.softcap = getattr(text_config(model), "final_logit_softcapping", None)
        self.check_every, self.calls, self.disabled = check_every, 0, False
        self.stats = {"rows": 0, "candidates": 0, "full_rows": 0, "rebuilt": 0, "checked_rows": 0}
        self._build()

    def _build(self) -> None:
        """The bf16 copy of the head and the bound's constants, for the head's weight as it is now."""
        self.weight = self.head.weight  # [V, d], the model's own (fp32)
        self.version = self.weight._version  # in-place changes of the weight bump it
        self.screen = self.weight.detach().to(torch.bfloat16)
        self.max_norm = float(self.weight.detach().float().norm(dim=1).max())
        d = self.weight.shape[1]
        self.input_term = (2 * UNIT_BF16 + UNIT_BF16**2 + d * UNIT_FP32 * (1 + UNIT_BF16) ** 2) * SAFETY
        self.output_term = UNIT_BF16 / (1 - UNIT_BF16) * SAFETY

    def _refresh(self) -> None:
        """Rebuild the screen if the head's weight was replaced or changed in place since it was built."""
        if self.head.weight is not self.weight or self.head.weight._version != self.version:
            self._build()
            self.stats["rebuilt"] += 1

    @staticmethod
    def unsupported_reason(model: nn.Module) -> str | None:
        """Why the screen cannot be used for ``model`` (None: it can)."""
        head = model.get_output_embeddings()  # pyright: ignore[reportCallIssue]
        if not isinstance(head, nn.Linear):
            return "the output embedding is not a plain linear layer"
        if head.bias is not None:
            return "the LM head has a bias"
        if head.weight.dtype != torch.float32:
            return f"the LM head is {head.weight.dtype}, not float32 (nothing to gain)"
        return None

    def cap(self, logits: torch.Tensor) -> torch.Tensor:
        """The model's final logit softcap (``final_logit_softcapping``), or the logits as they are."""
        if not self.softcap:
            return logits
        return torch.tanh(logits / self.softcap) * self.softcap

    def full_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.cap(hidden @ self.weight.T)

    def _approx(self, hidden: torch.Tensor) -> torch.Tensor:
        """bf16 logits [B, V]; on a GPU with reduced-precision reductions switched off in this scope
        (the bound assumes fp32 accumulation)."""
        if hidden.device.type != "cuda":
            return hidden.to(torch.bfloat16) @ self.screen.T
        flags = torch.backends.cuda.matmul
        saved = flags.allow_bf16_reduced_precision_reduction
        flags.allow_bf16_reduced_precision_reduction = False
        try:
            return hidden.to(torch.bfloat16) @ self.screen.T
        finally:
            flags.allow_bf16_reduced_precision_reduction = saved

    def _bound_holds(self, hidden: torch.Tensor, approx: torch.Tensor, bound: torch.Tensor) -> bool:
        """Every ``check_every`` calls: one row's exact logits must lie within its bound of the screen's."""
        self.calls += 1
        if not self.check_every or self.calls % self.check_every:
            return True
        row = self.calls // self.check_every % hidden.shape[0]
        exact = hidden[row] @ self.weight.T  # [V], before the softcap (the bound is on the product)
        self.stats["checked_rows"] += 1
        error = float((approx[row].float() - exact).abs().max())
        if error <= float(bound[row]):
            return True
        warnings.warn(
            f"the bf16-screened LM head's error bound was exceeded on this device ({error:.3g} > "
            f"{float(bound[row]):.3g}); the screen is switched off and the full head used from now on",
            stacklevel=2,
        )
        self.disabled = True
        return False

    @torch.no_grad()
    def argmax(self, hidden: torch.Tensor) -> torch.Tensor:
        """hidden: [B, d] final hidden states (after the final norm) -> [B] greedy tokens."""
        hidden = hidden.float()
        self._refresh()
        if self.disabled:
            return self.full_logits(hidden).argmax(-1)
        approx = self._approx(hidden)  # [B, V] bf16
        top = approx.max(-1).values.float()
        magnitude = torch.maximum(top.abs(), approx.min(-1).values.float().abs())
        bound = self.output_term * magnitude + self.input_term * hidden.norm(dim=-1) * self.max_norm
        if not self._bound_holds(hidden, approx, bound):
            return self.full_logits(hidden).argmax(-1)
        threshold = (top - 2 * bound).to(approx.dtype)
        # bf16 rounding of the threshold must not drop a candidate: step one bf16 ulp down
        threshold = torch.nextafter(threshold, torch.full_like(threshold, -float("inf")))
        pairs = (approx >= threshold[:, None]).nonzero()  # [K, 2], row-major: rows, then tokens ascending
        counts = torch.bincount(pairs[:, 0], minlength=hidden.shape[0])
        self.stats["rows"] += hidden.shape[0]
        self.stats["candidates"] += int(counts.sum())
        width = int(counts.max())
        tokens = torch.empty(hidden.shape[0], dtype=torch.long, device=hidden.device)
        crowded = counts > MAX_CANDIDATES_PER_ROW
        if crowded.any():
            rows = crowded.nonzero()[:, 0]
            tokens[rows] = self.full_logits(hidden[rows]).argmax(-1)
            self.stats["full_rows"] += len(rows)
            keep = ~crowded[pairs[:, 0]]
            pairs, counts = pairs[keep], counts.masked_fill(crowded, 0)
            width = int(counts.max()) if len(pairs) else 0
        if width:
            rows = (counts > 0).nonzero()[:, 0]
            starts = torch.cumsum(counts, 0) - counts
            column = torch.arange(len(pairs), device=pairs.device) - starts[pairs[:, 0]]
            index = torch.full((hidden.shape[0], width), -1, dtype=torch.long, device=hidden.device)
            index[pairs[:, 0], column] = pairs[:, 1]
            index = index[rows]
            valid = index >= 0
            logits = torch.einsum("bkd,bd->bk", self.weight[index.clamp(min=0)], hidden[rows])
            logits = self.cap(logits).masked_fill(~valid, -float("inf"))
            best = logits.argmax(-1)  # first maximum = smallest token id: candidates are ascending
            tokens[rows] = index.gather(1, best[:, None])[:, 0]
            if self.softcap:  # a saturated cap makes ties the screen cannot see: do those rows in full
                saturated = logits.max(-1).values >= self.softcap
                if saturated.any():
                    again = rows[saturated]
                    tokens[again] = self.full_logits(hidden[again]).argmax(-1)
                    self.stats["full_rows"] += len(again)
        return tokens


@torch.no_grad()
def screen_mismatch(model: nn.Module, head: ScreenedHead) -> str | None:
    """Check on ``model`` itself that its logits are the screened head's full-precision logits of the
    decoder's last hidden state (no extra scaling or bias the screen would miss); None: they are."""
    device = next(model.parameters()).device
    ids = torch.arange(1, 9, device=device)[None] % text_config(model).vocab_size
    logits = forward(model, ids, last_only=True).logits[:, -1].float()
    ours = head.full_logits(last_hidden(model, ids)[:, -1])
    if not torch.allclose(logits, ours, rtol=1e-4, atol=1e-4 * float(logits.abs().max())):
        return "its logits are not softcap(lm_head(last hidden state))"
    return None
