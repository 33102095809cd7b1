"""The greedy token without the full-precision LM head product: a cheap screen, then a certificate.

A model with a large vocabulary spends much of each generated token in the LM head. Greedy decoding
needs only the top token, so a screen computes every logit cheaply together with a rigorous bound
on its error, and only the tokens that might still be the top one are computed in full precision
(fp32, the model's own arithmetic); the first largest of those wins, as ``argmax`` over all logits
would pick it. Two screens, each kept only where ``calibrate.py`` measures it faster on the
machine at hand:

- ``Bf16ScreenedHead``: the product in bf16, for CPUs with bf16 instructions and GPUs;
- ``Int8ScreenedHead``: the product in int8 with the hidden state's outlier channels in fp32, for
  CPUs without fast bf16 (int8 products are fast on x86 CPUs with AVX2 alone).

So the result is the argmax of the fp32 logits: it can differ from the plain head only where two
logits tie to within fp32 rounding (the same kind of difference a different batch size makes).
Rows with too many candidates fall back to the full fp32 product. A screen follows the head: a
weight replaced or changed in place (through the tensor, not through ``.data``) rebuilds it. Every
few calls one row's exact logits verify the bound: if it is ever exceeded, the screen switches
itself off with a warning and the full head decides from then on. Used only where it is checked to
be exact: the model's logits must be ``head(final hidden state)``, softcapped by
``final_logit_softcapping`` when the config sets it, with no bias (``screen_mismatch``).
"""

from __future__ import annotations

import functools
import math
import warnings

import torch
from torch import nn

from ..core.structure import text_config
from .base import forward, last_hidden, logits_probe

UNIT_BF16 = 2.0**-8
UNIT_FP32 = 2.0**-24
SAFETY = 1.01  # headroom over a bound, for the few operations it does not itemise
CHECK_EVERY = 8  # one row's full logits verify the bound every this many calls (about 1/(8 B) of the head)
MAX_CANDIDATES_PER_ROW = 4096  # beyond this a row's logits are computed in full instead
PAIRS_PER_BLOCK = 16384  # candidate logits gathered at a time (d floats each)


class CertifiedHead:
    """``argmax(hidden)`` equal to ``argmax(lm_head(hidden))`` (softcapped): a subclass's screen names the
    candidates (``_candidates``), their fp32 logits decide."""

    kind = ""  # the name --head takes for this screen

    def __init__(self, model: nn.Module, check_every: int = CHECK_EVERY):
        """``check_every``: every this many calls, one row's full logits verify the bound (0: never)."""
        self.head = model.get_output_embeddings()  # pyright: ignore[reportCallIssue]
        self.softcap = getattr(text_config(model), "final_logit_softcapping", None)
        self.check_every, self.calls, self.disabled = check_every, 0, False
        self.stats = {"rows": 0, "candidates": 0, "full_rows": 0, "rebuilt": 0, "checked_rows": 0}
        self.buffer: torch.Tensor | None = None  # the screen's logits of the last call (``_screen_buffer``)
        self.weight = self.head.weight  # [V, d], the model's own (fp32)
        self.version = self.weight._version  # in-place changes of the weight bump it
        self._build()

    # ------------------------------------------------------------------ what a screen provides

    def _build(self) -> None:
        """Derive the screen from ``self.weight`` as it is now."""
        raise NotImplementedError

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

    def _refresh(self) -> None:
        """Rebuild the screen if the head's weight was replaced or changed in place since it was built."""
        if self.head.weight is not self.weight or self.head.weight._version != self.version:
            self.weight, self.version = self.head.weight, self.head.weight._version
            self._build()
            self.stats["rebuilt"] += 1

    def cap(self, logits: torch.Tensor) -> torch.Tensor:
        """The model's final logit softcap (``final_logit_softcapping``), or the logits as they are."""
        if not self.softcap:
            return logits
        return torch.tanh(logits / self.softcap) * self.softcap

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

    def _approx(self, hidden: torch.Tensor) -> torch.Tensor:
        """bf16 logits [B, V]; on a GPU with reduced-precision reductions switched off in this scope
        (the bound assumes fp32 accumulation)."""
        out = self._screen_buffer((hidden.shape[0], self.screen.shape[0]), torch.bfloat16, hidden.device)
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


OUTLIER_CHANNELS = 64  # hidden channels kept in fp32 (at most a quarter of them): the int8 scale ignores them
CHUNK_TOKENS = 8192  # vocabulary rows per int8 product: each chunk's results stay in cache while rescaled
QUANTISE_TOKENS = 1024  # vocabulary rows quantised at a time: a block's dozen passes stay in a core's cache


class Int8ScreenedHead(CertifiedHead):
    """The screen in int8, for CPUs where bf16 products are slow but int8 ones are fast (AVX2, VNNI).

    Final hidden states carry a few channels far larger than the rest (up to ~20x their rms, mostly
    the same channels in every state), which would swamp an int8 scale; so the ``OUTLIER_CHANNELS``
    largest channels of the first states seen (set S) stay in fp32 and the rest (R) go to int8:

    - W's columns R, per token v: ``W_vR = s_v q_v + e_v`` (|q_v| <= 127, s_v = max|W_vR| / 127);
    - h's channels R, per row: ``h_R = t q_h + f`` (|q_h| <= L, t = max|h_R| / L);
    - ``approx_v = W_vS . h_S + s_v t (q_v . q_h)``, the integer product exact in int32;
    - then ``W_v . h - approx_v = W_vR . f + e_v . (h_R - f)``, so by Cauchy-Schwarz
      ``|error_v| <= ||W_v|| ||f|| + ||e_v|| (||h_R|| + ||f||)``, plus fp32 rounding (of the plain head's
      own sum and of ours) of at most ``2 (d + 16) 2^-24 ||W_v|| ||h||``.

    L is 127 where this machine's int8 product is exact for every int8 input and 63 otherwise:
    AVX2 kernels without VNNI add pairs of (shifted, unsigned) u8 x s8 products in int16, which
    saturates unless the second operand stays within 7 bits (``exact_int8_levels`` tests it).

    The bound is per token (``||W_v||``, ``||e_v||``). Any token's lower bound bounds the top logit
    from below, so the candidates are the tokens whose upper bound reaches the lower bound of the
    screen's top token: a first pass with the largest per-token norms, a second with each token's own.
    Everything is computed in units of t (h / t) to save a pass over the [V, B] logits."""

    kind = "int8"

    def __init__(self, model: nn.Module, check_every: int = CHECK_EVERY):
        self.outliers: torch.Tensor | None = None  # channel set S: chosen by the first call's states
        self.levels = exact_int8_levels()  # L
        super().__init__(model, check_every)

    @staticmethod
    def unsupported_reason(model: nn.Module) -> str | None:
        why = CertifiedHead.unsupported_reason(model)
        if why is not None:
            return why
        if model.get_output_embeddings().weight.device.type != "cpu":  # pyright: ignore[reportCallIssue]
            return "the int8 screen is written for CPUs (GPUs have fast bf16 products)"
        if exact_int8_levels() == 0:
            return "this machine's int8 products are not exact"
        return None

    def _build(self) -> None:
        if self.outliers is not None:
            self._quantise()

    def _choose_outliers(self, hidden: torch.Tensor) -> None:
        k = min(OUTLIER_CHANNELS, hidden.shape[1] // 4)
        peaks = hidden.abs().amax(0)  # [d]
        self.outliers = torch.sort(peaks, descending=True, stable=True).indices[:k].sort().values
        self._quantise()

    def _quantise(self) -> None:
        """W split into fp32 outlier columns and int8 rows, with each token's norms for the bound (in
        blocks of QUANTISE_TOKENS tokens: no large temporaries, and each block's passes run in cache)."""
        assert self.outliers is not None
        weight = self.weight.detach()  # [V, d] fp32
        vocab, d = weight.shape
        rest = torch.ones(d, dtype=torch.bool, device=weight.device)
        rest[self.outliers] = False
        self.rest = rest
        self.w_outliers = weight[:, self.outliers].contiguous()  # [V, k]
        self.w_int8 = torch.empty(vocab, d - len(self.outliers), dtype=torch.int8, device=weight.device)
        self.w_scale = torch.empty(vocab, 1, device=weight.device)
        self.w_norm = torch.empty(vocab, device=weight.device)
        self.e_norm = torch.empty(vocab, device=weight.device)
        norm_rounding = 1 + (d + 2) * UNIT_FP32  # an fp32 norm of d terms is within this factor of the true one
        rest_columns = rest.nonzero().squeeze(1)  # [d - k]
        for start in range(0, vocab, QUANTISE_TOKENS):
            stop = start + QUANTISE_TOKENS
            block = weight[start:stop].float()  # [C, d]
            w_rest = block.index_select(1, rest_columns)  # [C, d - k], a copy: the residual is made in it
            scale = (w_rest.abs().amax(1, keepdim=True) / 127).clamp_(min=torch.finfo(torch.float32).tiny)
            q = torch.div(w_rest, scale).round_().clamp_(-127, 127)
            residual = w_rest.sub_(scale * q)  # e_v up to two roundings: |error_i| <= u (|w_i| + 2 |e_i|)
            w_norm = block.norm(dim=1).mul_(norm_rounding)
            self.w_int8[start:stop] = q  # integers within +-127: exact in int8
            self.w_scale[start:stop] = scale
            self.w_norm[start:stop] = w_norm
            self.e_norm[start:stop] = (
                residual.norm(dim=1) * norm_rounding * (1 + 2 * UNIT_FP32) + UNIT_FP32 * w_norm
            ) * SAFETY
        self.w_norm_max, self.e_norm_max = float(self.w_norm.max()), float(self.e_norm.max())
        self.rounding = 2 * (d + 16) * UNIT_FP32

    def _approx(self, hidden: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """The screen's logits in units of t, [chunks, CHUNK_TOKENS, B] (-inf past V), t [B], and the
        bound's per-row factors alpha, beta [B]: |error_v| / t <= ||W_v|| alpha + ||e_v|| beta."""
        h_rest = hidden[:, self.rest]  # [B, d - k]
        t = (h_rest.abs().amax(1) / self.levels).clamp(min=torch.finfo(torch.float32).tiny)  # [B]
        q = torch.round(h_rest / t[:, None]).clamp(-self.levels, self.levels)
        f = (h_rest.double() - t.double()[:, None] * q.double()).norm(dim=1)  # ||f||, float64
        alpha = (f + self.rounding * hidden.double().norm(dim=1)) / t * SAFETY
        beta = (h_rest.double().norm(dim=1) + f) / t * SAFETY
        q_t = q.to(torch.int8).T  # [d - k, B]
        h_out_t = (hidden[:, self.outliers] / t[:, None]).T  # [k, B]
        vocab, rows = self.w_int8.shape[0], hidden.shape[0]
        chunks = self._screen_buffer((-(-vocab // CHUNK_TOKENS), CHUNK_TOKENS, rows), torch.float32, hidden.device)
        chunks[-1, vocab - (len(chunks) - 1) * CHUNK_TOKENS :] = -float("inf")  # past V: never a candidate
        for c, start in enumerate(range(0, vocab, CHUNK_TOKENS)):
            stop = min(vocab, start + CHUNK_TOKENS)
            product = torch._int_mm(self.w_int8[start:stop], q_t)  # [C, B] int32, exact  # pyright: ignore[reportPrivateImportUsage]
            out = chunks[c, : stop - start]
            torch.mul(product, self.w_scale[start:stop], out=out)
            out.addmm_(self.w_outliers[start:stop], h_out_t)
        return chunks, t, alpha.float(), beta.float()

    def _candidates(self, hidden: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor] | None:
        if self.outliers is None:
            self._choose_outliers(hidden)
        chunks, t, alpha, beta = self._approx(hidden)  # chunks [n, C, B]
        rows = hidden.shape[0]
        flat = chunks.view(-1, rows)  # [n C, B], token-major (no copy)
        # the screen's top logit and token per row, without a max-with-indices pass over all of them
        chunk_max = chunks.amax(1)  # [n, B]
        top, best_chunk = chunk_max.max(0)  # [B]
        columns = torch.arange(rows, device=hidden.device)
        where = best_chunk * CHUNK_TOKENS + chunks[best_chunk, :, columns].argmax(1)  # [B]
        lower = top - (self.w_norm[where] * alpha + self.e_norm[where] * beta)  # <= the top fp32 logit / t
        row = self._row_to_check(rows)
        if row is not None:
            vocab = self.w_int8.shape[0]
            error = (flat[:vocab, row] * t[row] - hidden[row] @ self.weight.T).abs()
            excess = error - (self.w_norm * alpha[row] + self.e_norm * beta[row]) * t[row]
            worst = int(excess.argmax())
            detail = f"token {worst} off by {float(error[worst]):.3g}"
            if not self._bound_held(float(excess[worst]), detail):
                return None
        loose = lower - (self.w_norm_max * alpha + self.e_norm_max * beta)  # [B]: with every token's largest bound
        # the tokens at or above ``loose``, scanned only in the chunks whose max reaches it (a row's few)
        chunk, r = (chunk_max >= loose).nonzero().unbind(1)  # [K']
        hit, offset = (chunks[chunk, :, r] >= loose[r, None]).nonzero().unbind(1)  # in the [K', C] gathered
        token, r = chunk[hit] * CHUNK_TOKENS + offset, r[hit]
        keep = flat[token, r] + self.w_norm[token] * alpha[r] + self.e_norm[token] * beta[r] >= lower[r]
        r, token = r[keep], token[keep]
        order = torch.argsort(r * flat.shape[0] + token)  # row-major, tokens ascending
        return torch.stack([r[order], token[order]], 1), lower * t  # a token left out is below ``lower``


@functools.cache
def exact_int8_levels() -> int:
    """The largest L (127 or 63) such that ``torch._int_mm(a, b)`` is exact on this machine for any int8
    ``a`` and ``b`` within +-L, tried on the worst cases for int16 pair sums; 0 if neither is."""
    if not hasattr(torch, "_int_mm"):
        return 0
    generator = torch.Generator().manual_seed(0)
    for levels in (127, 63):
        for rows in (1, 16, 64):
            a = torch.randint(-127, 128, (256, 96), dtype=torch.int8, generator=generator)
            a[:64] = 127
            a[64:128] = -127
            b = torch.randint(-levels, levels + 1, (96, rows), dtype=torch.int8, generator=generator)
            b[:, : rows // 2 + 1] = levels
            if not torch.equal(torch._int_mm(a, b).long(), a.long() @ b.long()):  # pyright: ignore[reportPrivateImportUsage]
                break
        else:
            return levels
    return 0


@torch.no_grad()
def screen_mismatch(
    model: nn.Module, head: CertifiedHead, probe: tuple[torch.Tensor, torch.Tensor] | None = None
) -> str | None:
    """Check on ``model`` itself that its logits are the screened head's full-precision logits of the
    decoder's last hidden state (no extra scaling or bias the screen would miss); None: they are.
    ``probe``: ``logits_probe(model)`` where computed already (one serves every screen of a model)."""
    logits, hidden = probe if probe is not None else logits_probe(model)
    ours = head.full_logits(hidden)
    if not torch.allclose(logits, ours, rtol=1e-4, atol=1e-4 * float(logits.abs().max())):
        return "its logits are not softcap(lm_head(last hidden state))"
    return None


def greedy_tokens(
    model: nn.Module, screen: CertifiedHead | None, ids: torch.Tensor, positions: int = 1, **inputs
) -> torch.Tensor:
    """[B, positions] greedy tokens at the last ``positions`` of ``ids`` [B, T] (``inputs``: ``forward``'s
    attention mask and cache): by the model's own head (logits only there), or by ``screen`` on the final states."""
    if screen is None:
        return forward(model, ids, keep_last=positions, **inputs).logits[:, -positions:].argmax(-1)
    hidden = last_hidden(model, ids, positions=positions, **inputs)  # [B, positions, d]
    return screen.argmax(hidden.flatten(0, 1)).view(ids.shape[0], positions)


SCREENS: dict[str, type[CertifiedHead]] = {"bf16": Bf16ScreenedHead, "int8": Int8ScreenedHead}  # --head's screens


def build_screen(
    model: nn.Module, kind: str, probe: tuple[torch.Tensor, torch.Tensor] | None = None
) -> tuple[CertifiedHead | None, str | None]:
    """The ``kind`` screen of ``model``'s head, or None and why it cannot be used on this model
    (``probe``: as ``screen_mismatch`` takes it)."""
    screen_class = SCREENS[kind]
    why_not = screen_class.unsupported_reason(model)
    if why_not is not None:
        return None, why_not
    screen = screen_class(model)
    why_not = screen_mismatch(model, screen, probe)
    return (screen, None) if why_not is None else (None, why_not)
