"""The screened LM heads there are (``--head``'s choices besides "plain") and how one is built for a model.

A screen is used only where it is checked to be exact on the model at hand (``logits_mismatch``); a new
screen is a ``CertifiedHead`` subclass (``head.py``) listed in ``SCREENS``.

A screen is a copy of the head, built by passes over all of it (the int8 screens quantise and pack it). So
the screen a calibration chose is kept with its model for the rest of the process (``keep_screen``), and every
later calibration or engine of that model takes it instead of building another copy: a sweep's units, the
pruning after it, a notebook's engines. It goes with the model (a weak reference), when another choice (the
plain head included) replaces it, or when the head changes under it (``kept_screen``). What a screen derived
from the first states it saw (the int8 screens' outlier channels) then serves later work too: exact whatever
the states, at most slower where another task's states differ.
"""

from __future__ import annotations

import weakref

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


# the screen kept for each model alive in this process (``keep_screen``); a weak key: it does not keep the model
_KEPT: weakref.WeakKeyDictionary[nn.Module, CertifiedHead] = weakref.WeakKeyDictionary()


def keep_screen(model: nn.Module, screen: CertifiedHead | None) -> None:
    """Keep ``screen`` as ``model``'s screen for later builds (None: keep none; one copy of the head at a time),
    without its logits' buffer (sized for the last batch it saw: a later user sizes its own)."""
    if screen is None:
        _KEPT.pop(model, None)
    else:
        screen.release()
        _KEPT[model] = screen


def forget_kept_screens() -> None:
    """Drop every kept screen (their memory goes with the engines still holding them)."""
    _KEPT.clear()


def kept_screen(model: nn.Module, kind: str | None = None) -> CertifiedHead | None:
    """The screen kept for ``model`` (``keep_screen``; of ``kind``, where given) where it still screens the model's
    LM head as it is: the same module, weight (its storage, device and version) and softcap, and not switched
    off; else None (a new one is built, through the checks a build makes)."""
    screen, head = _KEPT.get(model), model.get_output_embeddings()  # pyright: ignore[reportCallIssue]
    if screen is None or kind not in (None, screen.kind) or screen.head is not head or screen.disabled:
        return None
    return screen if screen.follows_head() and screen.softcap == logit_softcap(model) else None


def build_screen(
    model: nn.Module, kind: str, probe: tuple[torch.Tensor, torch.Tensor] | None = None
) -> tuple[CertifiedHead | None, str | None]:
    """The ``kind`` screen of ``model``'s head (the one kept for it, where there is one: ``kept_screen``), or None
    and why it cannot be used on this model (``probe``: as ``logits_mismatch`` takes it)."""
    screen_class = SCREENS[kind]
    why_not = screen_class.unsupported_reason(model)
    if why_not is None:
        why_not = logits_mismatch(model, probe)
    if why_not is not None:
        return None, why_not
    return kept_screen(model, kind) or screen_class(model), None
