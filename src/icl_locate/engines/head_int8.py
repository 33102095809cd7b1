"""The int8 screen of the LM head, for CPUs where bf16 products are slow and ``torch._int_mm`` is fast.

``head.py`` describes screens and their certificate; this one's arithmetic and bound are in
``Int8ScreenedHead``'s docstring.
"""

from __future__ import annotations

import functools
from typing import Any

import torch
from torch import nn

from .head import CHECK_EVERY, SAFETY, UNIT_FP32, CertifiedHead

OUTLIER_CHANNELS = 64  # hidden channels kept in fp32 (at most a quarter of them): the int8 scale ignores them
CHUNK_TOKENS = 8192  # vocabulary rows per int8 product: each chunk's results stay in cache while rescaled
MAX_BLOCK_TOKENS = 256  # tokens per block whose max is taken in cache after each product: the candidates' scan
# then reads only the blocks whose max reaches a row's threshold (a row's block: contiguous)
assert CHUNK_TOKENS % MAX_BLOCK_TOKENS == 0, "a chunk is whole blocks"
BLOCKS_PER_CHUNK = CHUNK_TOKENS // MAX_BLOCK_TOKENS
QUANTISE_TOKENS = 1024  # vocabulary rows quantised at a time: a block's dozen passes stay in a core's cache
PROBE_ROWS = (1, 16, 64, 256, 1024)  # state counts ``exact_int8_levels`` tries; no product takes more than the last


class Int8ScreenedHead(CertifiedHead):
    """The screen in int8, for CPUs where bf16 products are slow but ``torch._int_mm`` is fast (VNNI, AMX).

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
    Everything is computed in units of t (h / t) to save a pass over the [B, V] logits."""

    kind = "int8"

    def __init__(self, model: nn.Module, check_every: int = CHECK_EVERY):
        self.outliers: torch.Tensor | None = None  # channel set S: chosen by the first call's states
        self.levels = self.exact_levels(int8_depth(model))  # L
        if self.levels == 0:
            raise ValueError(f"this machine's {self.kind} products are not exact: no {self.kind} screen here")
        super().__init__(model, check_every)

    @staticmethod
    def exact_levels(depth: int) -> int:
        """L for this screen's integer product over ``depth`` channels on this machine (0: never exact)."""
        return exact_int8_levels(depth)

    @classmethod
    def unsupported_reason(cls, model: nn.Module) -> str | None:
        why = CertifiedHead.unsupported_reason(model)
        if why is not None:
            return why
        if model.get_output_embeddings().weight.device.type != "cpu":  # pyright: ignore[reportCallIssue]
            return f"the {cls.kind} screen is written for CPUs (GPUs have fast bf16 products)"
        if cls.exact_levels(int8_depth(model)) == 0:
            return f"this machine's {cls.kind} products are not exact"
        return None

    def _build(self) -> None:
        if self.outliers is not None:
            self._quantise()

    def prepare(self, hidden: torch.Tensor) -> None:
        if self.outliers is None:
            self._choose_outliers(hidden.float())

    def _choose_outliers(self, hidden: torch.Tensor) -> None:
        k = outlier_count(hidden.shape[1])
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
        self.w_scale = torch.empty(vocab, device=weight.device)
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
            self.w_scale[start:stop] = scale.squeeze(1)
            self.w_norm[start:stop] = w_norm
            self.e_norm[start:stop] = (
                residual.norm(dim=1) * norm_rounding * (1 + 2 * UNIT_FP32) + UNIT_FP32 * w_norm
            ) * SAFETY
        self.w_norm_max, self.e_norm_max = float(self.w_norm.max()), float(self.e_norm.max())
        self.rounding = 2 * (d + 16) * UNIT_FP32

    def logits_layout(self, rows: int) -> tuple[tuple[int, ...], torch.dtype]:
        return (-(-self.weight.shape[0] // CHUNK_TOKENS), rows, CHUNK_TOKENS), torch.float32  # [chunks, B, C]

    def _approx(self, hidden: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """The screen's logits in units of t, [chunks, B, CHUNK_TOKENS] (-inf past V; each chunk row-major, as
        the quantized linear gives its product: no transposing pass), the max of each block of
        ``MAX_BLOCK_TOKENS`` of them [B, blocks], t [B], and the bound's per-row factors alpha, beta [B]:
        |error_v| / t <= ||W_v|| alpha + ||e_v|| beta."""
        h_rest = hidden[:, self.rest]  # [B, d - k]
        t = (h_rest.abs().amax(1) / self.levels).clamp(min=torch.finfo(torch.float32).tiny)  # [B]
        q = torch.round(h_rest / t[:, None]).clamp(-self.levels, self.levels)
        f = (h_rest.double() - t.double()[:, None] * q.double()).norm(dim=1)  # ||f||, float64
        alpha = (f + self.rounding * hidden.double().norm(dim=1)) / t * SAFETY
        beta = (h_rest.double().norm(dim=1) + f) / t * SAFETY
        states = self._states_operand(q)
        h_out = hidden[:, self.outliers] / t[:, None]  # [B, k]
        vocab, rows = self.w_int8.shape[0], hidden.shape[0]
        chunks = self._screen_buffer(*self.logits_layout(rows), hidden.device)
        chunks[-1, :, vocab - (len(chunks) - 1) * CHUNK_TOKENS :] = -float("inf")  # past V: never a candidate
        block_max = torch.empty(rows, len(chunks), BLOCKS_PER_CHUNK, dtype=chunks.dtype, device=hidden.device)
        for c, start in enumerate(range(0, vocab, CHUNK_TOKENS)):
            stop = min(vocab, start + CHUNK_TOKENS)
            product = self._integer_product(c, start, stop, states)  # [B, C], exact integers
            out = chunks[c, :, : stop - start]
            torch.mul(product, self.w_scale[start:stop], out=out)
            out.addmm_(h_out, self.w_outliers[start:stop].T)
            torch.amax(chunks[c].view(rows, BLOCKS_PER_CHUNK, MAX_BLOCK_TOKENS), 2, out=block_max[:, c])  # in cache
        return chunks, block_max.view(rows, -1), t, alpha.float(), beta.float()

    def _states_operand(self, q: torch.Tensor) -> Any:
        """The states' levels q [B, d - k] (integers within +-L, as floats) as ``_integer_product`` takes them."""
        return q.to(torch.int8).T  # [d - k, B]

    def _integer_product(self, chunk: int, start: int, stop: int, states: Any) -> torch.Tensor:
        """q_v . q_h for every state and the vocabulary rows ``start:stop`` (the ``chunk``-th): [B, C] integers
        (int32 here, a transposed view: ``exact_int8_levels`` tried the kernel in this orientation alone, where an
        AVX2 kernel's int16 pair sums stay exact for 7-bit states; its rescaling then reads it strided)."""
        return int_mm_in_probed_rows(self.w_int8[start:stop], states).T

    def _candidates(self, hidden: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor] | None:
        self.prepare(hidden)  # a first call not prepared before chooses the outliers from its own states
        chunks, block_max, t, alpha, beta = self._approx(hidden)  # chunks [n, B, C], block_max [B, n C / S]
        rows, vocab = hidden.shape[0], self.w_int8.shape[0]
        # the screen's top logit and token per row, without a max-with-indices pass over all of them
        top, best_block = block_max.max(1)  # [B]
        columns = torch.arange(rows, device=hidden.device)
        where = best_block * MAX_BLOCK_TOKENS + block_values(chunks, best_block, columns).argmax(1)  # [B]
        lower = top - (self.w_norm[where] * alpha + self.e_norm[where] * beta)  # <= the top fp32 logit / t
        row = self._row_to_check(rows)
        if row is not None:
            error = (chunks[:, row].reshape(-1)[:vocab] * t[row] - hidden[row] @ self.weight.T).abs()
            excess = error - (self.w_norm * alpha[row] + self.e_norm * beta[row]) * t[row]
            worst = int(excess.argmax())
            detail = f"token {worst} off by {float(error[worst]):.3g}"
            if not self._bound_held(float(excess[worst]), detail):
                return None
        loose = lower - (self.w_norm_max * alpha + self.e_norm_max * beta)  # [B]: with every token's largest bound
        # the tokens at or above ``loose``, scanned only in the blocks whose max reaches it (a row's few); row-major
        # with tokens ascending as found: the blocks' nonzero is, and each block's offsets are
        r, block = (block_max >= loose[:, None]).nonzero().unbind(1)  # [K']
        hit, offset = (block_values(chunks, block, r) >= loose[r, None]).nonzero().unbind(1)  # in the [K', S] gathered
        token, r = block[hit] * MAX_BLOCK_TOKENS + offset, r[hit]
        inside = token < vocab  # the -inf past V is reached only by a -inf (overflowed) threshold
        token, r = token[inside], r[inside]
        value = chunks[token // CHUNK_TOKENS, r, token % CHUNK_TOKENS]
        keep = value + self.w_norm[token] * alpha[r] + self.e_norm[token] * beta[r] >= lower[r]
        return torch.stack([r[keep], token[keep]], 1), lower * t  # a token left out is below ``lower``


def block_values(chunks: torch.Tensor, block: torch.Tensor, r: torch.Tensor) -> torch.Tensor:
    """The screen's logits [K, S] of row ``r[i]`` in block ``block[i]`` (of ``MAX_BLOCK_TOKENS`` tokens, counted
    over the whole vocabulary) of ``chunks`` [n, B, C] (``Int8ScreenedHead._approx``)."""
    blocks = chunks.view(len(chunks), chunks.shape[1], BLOCKS_PER_CHUNK, MAX_BLOCK_TOKENS)  # [n, B, C / S, S], no copy
    return blocks[block // BLOCKS_PER_CHUNK, r, block % BLOCKS_PER_CHUNK]


def outlier_count(d: int) -> int:
    """The hidden channels kept in fp32: ``OUTLIER_CHANNELS``, at most a quarter of them."""
    return min(OUTLIER_CHANNELS, d // 4)


def int8_depth(model: nn.Module) -> int:
    """The channels the screen's int8 product runs over: the hidden size less the outliers."""
    d = model.get_output_embeddings().weight.shape[1]  # pyright: ignore[reportCallIssue]
    return d - outlier_count(d)


@functools.cache
def exact_int8_levels(depth: int = 96) -> int:
    """The largest L (127 or 63) such that ``torch._int_mm(a, b)`` is exact on this machine for any int8
    ``a`` and ``b`` within +-L, tried on the worst cases for int16 pair sums, with the screen's ``depth``
    (its int8 channels) and from one state to ``PROBE_ROWS[-1]`` (the most a product is given, see
    ``int_mm_in_probed_rows``), as kernels may be chosen by shape; 0 if neither is."""
    if not hasattr(torch, "_int_mm"):
        return 0
    generator = torch.Generator().manual_seed(0)
    for levels in (127, 63):
        for rows in PROBE_ROWS:
            a = torch.randint(-127, 128, (256, depth), dtype=torch.int8, generator=generator)
            a[:64] = 127
            a[64:128] = -127
            # the states' operand as the screen passes it: a transposed view ([rows, depth] -> [depth, rows])
            b = torch.randint(-levels, levels + 1, (rows, depth), dtype=torch.int8, generator=generator).T
            b[:, : rows // 2 + 1] = levels
            exact = a.double() @ b.double()  # |sums| < 2^53: exact in float64, and a BLAS product
            if not torch.equal(torch._int_mm(a, b).double(), exact):  # pyright: ignore[reportPrivateImportUsage]
                break
        else:
            return levels
    return 0


def int_mm_in_probed_rows(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``torch._int_mm(a, b)`` [M, N] int32 for ``a`` [M, K] and the states' ``b`` [K, N], in products of at most
    ``PROBE_ROWS[-1]`` states: ``exact_int8_levels`` tried the kernel at state counts up to there, none beyond
    (a tree engine's head call can take more, its batch's leaves times the positions a draft feeds)."""
    most = PROBE_ROWS[-1]
    if b.shape[1] <= most:
        return torch._int_mm(a, b)  # pyright: ignore[reportPrivateImportUsage]
    pieces = [torch._int_mm(a, b[:, i : i + most]) for i in range(0, b.shape[1], most)]  # pyright: ignore[reportPrivateImportUsage]
    return torch.cat(pieces, 1)
