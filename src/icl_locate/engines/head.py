"""The greedy token without the full-precision LM head product: a bf16 screen, then a certificate.

For Gemma-3-270M the LM head (vocabulary 262,144 x hidden 640) costs 1.7x the whole transformer
body per generated token, and a CPU with bf16 instructions multiplies bf16 about 4x faster than
fp32. Greedy decoding needs only the top token, so:

1. ``approx = bf16(h) @ bf16(W).T`` over the whole vocabulary (fp32 accumulation, bf16 result);
2. a rigorous bound ``E`` on ``|approx - h @ W.T|``: rounding h and W to bf16 changes each product
   h_i W_vi by at most (2u + u^2)|h_i W_vi| (u = 2^-8), the fp32 sum adds at most n 2^-24 of
   sum |h_i W_vi| <= ||h|| max_v ||W_v||, and the bf16 result adds u of its own magnitude;
3. the true top token v* satisfies approx_v* >= max(approx) - 2E, so every token above that
   threshold is a candidate; their logits are computed in full precision (fp32, the model's own
   arithmetic) and the first largest wins, as ``argmax`` over all logits would pick it.

So the result is the argmax of the fp32 logits: it can differ from the plain head only where two
logits tie to within fp32 rounding (the same kind of difference a different batch size makes).
Rows with too many candidates fall back to the full fp32 product. Used only where it is checked
to be exact: the model's logits must be ``head(final hidden state)``, softcapped by
``final_logit_softcapping`` when the config sets it, with no bias (``screen_mismatch``).
"""

from __future__ import annotations

import torch
from torch import nn

from ..core.structure import text_config
from .base import forward, last_hidden

UNIT_BF16 = 2.0 ** -8
UNIT_FP32 = 2.0 ** -24
SAFETY = 1.01  # headroom over the bound, for the few operations it does not itemise
MAX_CANDIDATES_PER_ROW = 256  # beyond this a row's logits are computed in full instead


class ScreenedHead:
    """``argmax(hidden)`` equal to ``argmax(lm_head(hidden))`` (softcapped), computed with a bf16 screen."""

    def __init__(self, model: nn.Module):
        head = model.get_output_embeddings()
        self.weight = head.weight  # [V, d], the model's own (fp32)
        self.screen = self.weight.detach().to(torch.bfloat16)
        self.max_norm = float(self.weight.detach().float().norm(dim=1).max())
        self.softcap = getattr(text_config(model), "final_logit_softcapping", None)
        d = self.weight.shape[1]
        self.input_term = (2 * UNIT_BF16 + UNIT_BF16 ** 2 + d * UNIT_FP32 * (1 + UNIT_BF16) ** 2) * SAFETY
        self.output_term = UNIT_BF16 / (1 - UNIT_BF16) * SAFETY
        self.stats = {"rows": 0, "candidates": 0, "full_rows": 0}

    @staticmethod
    def supported(model: nn.Module) -> str | None:
        """Why the screen cannot be used for ``model`` (None: it can)."""
        head = model.get_output_embeddings()
        if not isinstance(head, nn.Linear):
            return "the output embedding is not a plain linear layer"
        if head.bias is not None:
            return "the LM head has a bias"
        if head.weight.dtype != torch.float32:
            return f"the LM head is {head.weight.dtype}, not float32 (nothing to gain)"
        return None

    def _cap(self, logits: torch.Tensor) -> torch.Tensor:
        if not self.softcap:
            return logits
        return torch.tanh(logits / self.softcap) * self.softcap

    def full_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self._cap(hidden @ self.weight.T)

    @torch.no_grad()
    def argmax(self, hidden: torch.Tensor) -> torch.Tensor:
        """hidden: [B, d] final hidden states (after the final norm) -> [B] greedy tokens."""
        hidden = hidden.float()
        approx = hidden.to(torch.bfloat16) @ self.screen.T  # [B, V] bf16
        top = approx.max(-1).values.float()
        magnitude = torch.maximum(top.abs(), approx.min(-1).values.float().abs())
        bound = self.output_term * magnitude + self.input_term * hidden.norm(dim=-1) * self.max_norm
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
            logits = self._cap(logits).masked_fill(~valid, -float("inf"))
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
