"""The screened LM heads there are (``--head``'s choices besides "plain") and how one is built for a model.

A screen is used only where it is checked to be exact on the model at hand (``screen_mismatch``); a new
screen is a ``CertifiedHead`` subclass (``head.py``) listed in ``SCREENS``.
"""

from __future__ import annotations

import torch
from torch import nn

from .base import logits_probe
from .head import Bf16ScreenedHead, CertifiedHead
from .head_int8 import Int8ScreenedHead
from .head_int8_linear import Int8LinearScreenedHead


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


SCREENS: dict[str, type[CertifiedHead]] = {  # --head's screens
    "bf16": Bf16ScreenedHead,
    "int8": Int8ScreenedHead,
    "int8-linear": Int8LinearScreenedHead,
}


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
