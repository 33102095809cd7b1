"""Which LM head decodes fastest here: the model's own product against each screen it can take.

A screen (``head.py``) pays off only where its cheap product is faster than the full one on this
machine (bf16 units, int8 units), and for the rows a head call takes: a product of a few rows streams
the whole head for each; of many, it is bound by arithmetic, where bf16 and int8 units differ. So the
heads are timed on real final states of the work's first prompt (``head_sample``), after each screen
is checked to give the plain head's tokens there: a screen that disagrees is refused.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from ..util.errors import UserError
from .base import logits_probe
from .head import CertifiedHead
from .screens import SCREENS, build_screen
from .timing import REPEATS, Timer, interleaved, ratio

HEAD_CLEAR = 1.3  # after a round, a head this many times slower than the fastest is timed no more


@torch.no_grad()
def screen_agrees(screen: CertifiedHead, hidden: torch.Tensor, plain: torch.Tensor | None = None) -> bool:
    """Whether the screen's greedy tokens are the plain head's on ``hidden`` (a self-check on real states);
    ``plain``: the plain head's tokens there, where computed already."""
    return torch.equal(screen.argmax(hidden), screen.full_logits(hidden).argmax(-1) if plain is None else plain)


def head_sample(states: torch.Tensor, rows: int) -> torch.Tensor:
    """``rows`` final states [rows, d] from a prompt's [positions, d]: its last positions, repeated where it has
    fewer."""
    states = states[-rows:]
    reps = -(-rows // states.shape[0])
    return states.repeat(reps, 1)[:rows].contiguous()


def _beaten_heads(seconds: dict[str, float]) -> set[str]:
    """The heads ``HEAD_CLEAR`` times slower than the fastest so far: more rounds would not make them the
    fastest (the plain head's rounds, on the engine's rows, are long)."""
    fastest = min(seconds.values())
    return {name for name, s in seconds.items() if s >= HEAD_CLEAR * fastest}


@dataclass
class HeadTiming:
    """The head ``time_heads`` found fastest (or the one forced), and what it measured."""

    kind: str  # "plain" or a screen's kind
    reason: str
    shared: bool  # whether the verdict holds for the model whatever the prompt (no screen refused by a sample)
    measured: dict[str, float] = field(default_factory=dict)  # seconds of a head call, "head/KIND"
    screens: dict[str, CertifiedHead] = field(default_factory=dict)  # the screens built and checked, by kind


def time_heads(
    model, hidden: torch.Tensor, wanted: str, timer: Timer, built: dict[str, CertifiedHead] | None = None
) -> HeadTiming:
    """The fastest on ``hidden`` [rows, d] of the plain head and each screen this model can take (``wanted`` =
    "auto"), the fastest screen (``wanted`` = "screen"), or the screen ``wanted`` (checked on the sample, not
    timed). ``built``: screens of this model built before, taken instead of building them again (each a copy
    of the head). A forced screen that cannot build or check is a ``UserError``."""
    built = built or {}
    screens: dict[str, CertifiedHead] = {}
    refused: list[str] = []
    shared = True
    plain_tokens = None  # the plain head's tokens on the sample: computed once for every screen's check
    probe = logits_probe(model)  # the model's logits formula, checked by every screen's build
    for kind in [wanted] if wanted in SCREENS else list(SCREENS):
        screen, why_not = (built[kind], None) if kind in built else build_screen(model, kind, probe)
        if screen is not None and plain_tokens is None:
            plain_tokens = screen.full_logits(hidden).argmax(-1)
        if screen is not None and not screen_agrees(screen, hidden, plain_tokens):
            screen, why_not, shared = None, "it disagreed with the plain head on a sample", False
        if screen is None:
            if wanted == kind:
                raise UserError(f"cannot screen the LM head of this model with {kind}: {why_not}; use --head plain")
            refused.append(f"no {kind} screen: {why_not}")
        else:
            screens[kind] = screen
    if wanted in SCREENS:
        return HeadTiming(wanted, "forced", False, screens=screens)
    if not screens and wanted == "screen":
        raise UserError(f"--head screen: no screen of this model's LM head ({'; '.join(refused)}); use --head plain")
    if not screens:
        return HeadTiming("plain", "; ".join(refused), shared)
    lm_head, cap = model.get_output_embeddings(), next(iter(screens.values())).cap
    heads: dict[str, Callable[[], object]] = {"head/plain": lambda: cap(lm_head(hidden)).argmax(-1)}
    heads.update({f"head/{kind}": (lambda s=screen: s.argmax(hidden)) for kind, screen in screens.items()})
    with torch.no_grad():  # each head ran on ``hidden`` above (the screens' checks): warmed up
        measured = interleaved(timer, heads, REPEATS, _beaten_heads, warmed=True)
    plain, on = measured["head/plain"], f"on {len(hidden)} rows"
    fastest = min(screens, key=lambda kind: measured[f"head/{kind}"])
    seconds = measured[f"head/{fastest}"]
    if wanted == "screen":  # a screen, whichever is fastest, even where the plain head is faster
        than_plain = f"{ratio(plain, seconds)} faster" if seconds < plain else f"{ratio(seconds, plain)} slower"
        reason = f"--head screen: the fastest screen, {than_plain} than the full product {on} here"
        return HeadTiming(fastest, reason, False, measured, screens)
    if seconds < plain:
        reason = f"{fastest} screen {ratio(plain, seconds)} faster than the full product {on} here"
        return HeadTiming(fastest, reason, shared, measured, screens)
    reason = f"{fastest} screen {ratio(seconds, plain)} slower than the full product {on} here"
    return HeadTiming("plain", reason, shared, measured, screens)
