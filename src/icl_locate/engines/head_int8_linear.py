"""The int8 screen with its product in torch's quantized dynamic linear, for CPUs whose ``torch._int_mm`` is slow.

Where a CPU has no VNNI, ``torch._int_mm`` may run a kernel several times slower than the fp32 head
itself, while the quantized dynamic linear (FBGEMM on x86) runs its AVX2 int8 kernel. That operator
quantises its input itself, per tensor, from its minimum and maximum: to make it take our integer
levels unchanged, every call appends one range row holding -L and L + 1 (L = 63). The input's range
is then exactly 127 wide, so its scale is 1 and its zero point L: each level q becomes the unsigned
q + L within 0..127, and the weights are our int8 levels with scale 1. Unsigned 7-bit times signed
8-bit pairs stay within int16 (2 x 127 x 127 < 2^15), and the kernel's int32 sums come back in fp32
as the ``torch._int_mm`` path converts them (rounded to nearest, so exact below 2^24; the bound
covers that rounding). None of this is assumed: ``exact_linear_levels`` runs the product on
worst-case inputs, at the screen's depth, chunk and state counts, and the screen is refused where it
does not give exactly that. The rest (outlier channels, bound, candidates) is ``Int8ScreenedHead``'s.
"""

from __future__ import annotations

import functools
import warnings
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import torch
from torch import nn

from .head import CHECK_EVERY
from .head_int8 import CHUNK_TOKENS, PROBE_ROWS, Int8ScreenedHead

LEVELS = 63  # L: the range row's -L and L + 1 make the operator's input range 127 wide (scale 1, 7-bit unsigned)
PROBE_TOKENS = 512  # the probe's weight rows at its larger state counts (a whole chunk at the smaller: cheap there)
# The operator warns that quantized tensors are deprecated; their removal makes ``exact_linear_levels`` 0.
_DEPRECATION = "torch.quantize_per_tensor, torch.quantize_per_channel and other quantized tensor creation"


def pack_int8(weights: list[torch.Tensor]) -> list[object]:
    """The quantized linear's packed weights of int8 levels ``weights`` ([N, K] each), scale 1 and zero point 0 (the
    levels taken as they are: quantising them again from floats would be a pass over the head for nothing). Each
    packing keeps about one core busy, so they run side by side (in order), under one warnings filter set here
    for the pool's threads too."""
    with warnings.catch_warnings(), ThreadPoolExecutor(max(1, torch.get_num_threads())) as pool:
        warnings.filterwarnings("ignore", message=_DEPRECATION)
        return list(pool.map(_prepack, weights))


def _prepack(weight: torch.Tensor) -> object:
    quantized = torch._make_per_tensor_quantized_tensor(weight.contiguous(), 1.0, 0)  # pyright: ignore[reportPrivateImportUsage]
    return torch.ops.quantized.linear_prepack(quantized, None)


def with_range_rows(levels: torch.Tensor) -> list[torch.Tensor]:
    """States' levels [B, K] (integers within +-LEVELS, as floats) in pieces of at most ``PROBE_ROWS[-1]``
    states (the most ``exact_linear_levels`` tried), each with the range row appended: [b + 1, K] each."""
    most = PROBE_ROWS[-1]
    pieces = []
    for start in range(0, len(levels), most):
        piece = levels[start : start + most]
        padded = piece.new_zeros(len(piece) + 1, piece.shape[1])
        padded[:-1] = piece
        padded[-1, 0], padded[-1, 1] = -LEVELS, LEVELS + 1
        pieces.append(padded)
    return pieces


def linear_product(packed: object, pieces: list[torch.Tensor]) -> torch.Tensor:
    """The integer product of the packed weight [N, K] with the states of ``pieces`` (``with_range_rows``):
    [B, N] fp32 holding integers, the range rows dropped."""
    outs = [torch.ops.quantized.linear_dynamic(piece, packed, True)[:-1] for piece in pieces]
    return outs[0] if len(outs) == 1 else torch.cat(outs)


@functools.cache
def exact_linear_levels(depth: int) -> int:
    """``LEVELS`` where the quantized dynamic linear gives the integer product on this machine, each sum rounded
    once to fp32 (tried on worst cases for int16 pair sums, at ``depth`` channels, from one state to
    ``PROBE_ROWS[-1]``, on a chunk of ``CHUNK_TOKENS`` tokens where the states are few and ``PROBE_TOKENS`` where
    they are many, as kernels may be chosen by shape); 0 where it does not, or torch lacks it."""
    generator = torch.Generator().manual_seed(0)
    weight = torch.randint(-127, 128, (CHUNK_TOKENS, depth), dtype=torch.int8, generator=generator)
    weight[:64] = 127
    weight[64:128] = -127
    try:
        packed = dict(zip((CHUNK_TOKENS, PROBE_TOKENS), pack_int8([weight, weight[:PROBE_TOKENS]]), strict=True))
        for rows in PROBE_ROWS:
            tokens = CHUNK_TOKENS if rows <= 16 else PROBE_TOKENS
            levels = torch.randint(-LEVELS, LEVELS + 1, (rows, depth), generator=generator).float()
            levels[: rows // 2 + 1] = LEVELS
            exact = levels.double() @ weight[:tokens].double().T  # |sums| < 2^53: exact in float64
            if not torch.equal(linear_product(packed[tokens], with_range_rows(levels)), exact.float()):
                return 0
    except (RuntimeError, AttributeError, NotImplementedError):  # no quantized engine or operator here
        return 0
    return LEVELS


class Int8LinearScreenedHead(Int8ScreenedHead):
    """``Int8ScreenedHead`` whose integer product runs the quantized dynamic linear (see the module's docstring)."""

    kind = "int8-linear"

    def __init__(self, model: nn.Module, check_every: int = CHECK_EVERY):
        self.packed: list[object] = []  # the weight's levels per chunk of CHUNK_TOKENS vocabulary rows
        super().__init__(model, check_every)

    @staticmethod
    def exact_levels(depth: int) -> int:
        return exact_linear_levels(depth)

    def _quantise(self) -> None:
        super()._quantise()
        vocab = self.w_int8.shape[0]
        self.packed = pack_int8([self.w_int8[start : start + CHUNK_TOKENS] for start in range(0, vocab, CHUNK_TOKENS)])

    def _states_operand(self, q: torch.Tensor) -> list[torch.Tensor]:
        return with_range_rows(q)

    def _integer_product(self, chunk: int, start: int, stop: int, states: Any) -> torch.Tensor:
        return linear_product(self.packed[chunk], states)  # [B, C]
