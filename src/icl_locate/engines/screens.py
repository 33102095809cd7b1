"""The screened LM heads there are (``--head``'s choices besides "plain") and how one is built for a model.

A screen is used only where it is checked to be exact on the model at hand (``logits_mismatch``); a new
screen is a ``CertifiedHead`` subclass (``head.py``) listed in ``SCREENS``.
"""

from __future__ import annotations

import torch
from torch import nn

from ..core.structure import logit_softcap, softcapped
from .base import logits_probe
from .head import Bf16ScreenedHead, CertifiedHead
from .head_int8 import Int8ScreenedHead
from .head_int8_linear import Int8LinearScreenedHead


@torch.no_grad()
def logits_mismatch(model: nn.Module, probe: tuple[torch.Tensor, torch.Tensor] | None = None) -> str | None:
    """Check on ``model`` itself that its logits are its LM head's full-precision logits of the decoder's last
    hidden state, softcapped as its config says (no extra scaling or bias a screen would miss); None: they
    are. ``probe``: ``logits_probe(model)`` where computed already (one serves every screen of a model)."""
    logits, hidden = probe if probe is not None else logits_probe(model)
    ours = softcapped(hidden @ model.get_output_embeddings().weight.T, logit_softcap(model))  # pyright: ignore[reportCallIssue]
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
    (``probe``: as ``logits_mismatch`` takes it)."""
    screen_class = SCREENS[kind]
    why_not = screen_class.unsupported_reason(model)
    if why_not is not None:
        return None, why_not
    why_not = logits_mismatch(model, probe)
    return (screen_class(model), None) if why_not is None else (None, why_not)
