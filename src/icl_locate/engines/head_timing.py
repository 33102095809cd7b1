"""Which LM head decodes fastest here: the model's own product against each screen it can take.

A screen (``head.py``) pays off only where its cheap product is faster than the full one on this
machine (bf16 units, int8 units), and for the rows a head call takes: a product of a few rows streams
the whole head for each; of many, it is bound by arithmetic, where bf16 and int8 units differ. So the
heads are timed on real final states of the work's first prompt (``head_sample``), after each screen
is checked to give the plain head's tokens there: a screen that disagrees is refused.

A screen whose kernel is far slower than the full product here (int8 products without fast int8 units
can be ten times slower than fp32 ones) would make its set-up and check alone cost several full head
calls. So on a CPU each screen is first built on a slice of the vocabulary (``VocabularySlice``: every
``SLICE_FRACTION``-th token) and timed there against the full product of the same tokens, on every row
of the sample: both products grow with the tokens they cover, so a screen ``GATE_CLEAR`` times slower
there, a margin for the fixed costs that weigh more on a slice, is not expected to win on the whole
vocabulary, and is neither built on it nor checked there. (On a GPU a head's product is short and a
screen's fixed costs, kernel launches and host syncs, would weigh on a slice far more than on the
whole head: no slice there.) The check of a screen that passes, on the whole sample, is timed too: a
screen that slow there is not timed again. On a CPU the checks, with the call of the full product that
gave the tokens they are checked against, are a preliminary round: a screen's clear win there decides;
otherwise it is not counted, and the heads' rounds run.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import nn

from ..util.errors import UserError
from .base import logits_probe
from .head import CertifiedHead
from .screens import SCREENS, build_screen, logits_mismatch
from .timing import REPEATS, Timer, interleaved, ratio

# the names of the head's timings in ``measured``: the heads' rounds and the gate's (a head measured again drops them)
HEAD_TIMINGS = ("head/", "slice/", "gate/", "check/")
HEAD_CLEAR = 1.3  # after a round, a head this many times slower than the fastest is timed no more
SLICE_FRACTION = 16  # the gate times the heads on this fraction of the vocabulary (a sixteenth of a call)
SLICE_MIN_TOKENS = 4096  # and on no fewer tokens: a product over fewer would time its fixed costs, not its kernel
SLICE_MAX_SHARE = 4  # no slice where it would be more than this fraction of the vocabulary: a screen built twice
# The gate drops a screen only this many times slower than the full product: on a slice a screen's fixed costs
# (quantising the states, finding candidates) weigh more than on the whole vocabulary, and the full product of a
# slice may run partly from cache where the whole head's does not; a screen the gate passes is timed on the whole
# head, and dropped at HEAD_CLEAR.
GATE_CLEAR = 2 * HEAD_CLEAR


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


def _clear_winner(seconds: dict[str, float]) -> str | None:
    """The head ``HEAD_CLEAR`` times faster than every other in one round (None: none, or fewer than two).
    Of the timed checks on a CPU, only a screen's clear win decides: its check is its first call on the
    sample (its logits' buffer made before it), if anything slower than later ones, while the full
    product's call runs as each of its calls does (a fresh output every time, no kernel set up by a first
    call), so later rounds would not unseat it; a screen that loses its first call may still win them."""
    if len(seconds) < 2:
        return None
    left = set(seconds) - _beaten_heads(seconds)  # the fastest, and any within HEAD_CLEAR of it
    return left.pop() if len(left) == 1 else None


@dataclass
class HeadTiming:
    """The head ``time_heads`` found fastest (or the one forced), and what it measured."""

    kind: str  # "plain" or a screen's kind
    reason: str
    shared: bool  # whether the verdict holds for the model whatever the prompt (no screen refused by a sample)
    measured: dict[str, float] = field(default_factory=dict)  # seconds, by ``HEAD_TIMINGS`` names: "head/KIND", ...
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
    gated: list[str] = []  # screens out as too slow (on the slice, or in their check), as the reason says them
    shared = True
    plain_tokens = None  # the plain head's tokens on the sample: computed once for every screen's check
    plain_seconds = 0.0  # that call's seconds
    gate = wanted == "auto"
    on_cpu = hidden.device.type == "cpu"  # the slice and the checks' round (a GPU's short products: neither)
    gate_seconds: dict[str, float] = {}  # the gate's timings ("slice/", "gate/plain", "check/"), kept with the rest
    kinds = [wanted] if wanted in SCREENS else list(SCREENS)
    probe = logits_probe(model)  # the model's logits formula, checked by every screen's build
    if gate and on_cpu:
        kinds, gated = slice_gate(model, hidden, [k for k in kinds if k not in built], timer, gate_seconds, probe)
        kinds += [k for k in SCREENS if k in built]
    for kind in kinds:
        screen, why_not = (built[kind], None) if kind in built else build_screen(model, kind, probe)
        if screen is not None and plain_tokens is None and gate:
            plain_tokens, plain_seconds = _timed_plain_tokens(screen, hidden, timer)
            gate_seconds["gate/plain"] = plain_seconds
        elif screen is not None and plain_tokens is None:
            plain_tokens = screen.full_logits(hidden).argmax(-1)
        if screen is not None and gate and plain_tokens is not None:
            why_out, agreed = _timed_check(kind, screen, hidden, plain_tokens, plain_seconds, timer, gate_seconds)
            shared = shared and agreed
            if why_out is not None and agreed:
                gated.append(why_out)
            elif why_out is not None:
                refused.append(f"no {kind} screen: {why_out}")
            else:
                screens[kind] = screen  # checked on the whole sample
            continue
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
        return HeadTiming("plain", "; ".join(gated + refused), shared, gate_seconds)
    lm_head, cap = model.get_output_embeddings(), next(iter(screens.values())).cap
    heads: dict[str, Callable[[], object]] = {"head/plain": lambda: cap(lm_head(hidden)).argmax(-1)}
    heads.update({f"head/{kind}": (lambda s=screen: s.argmax(hidden)) for kind, screen in screens.items()})
    # The timed checks as a preliminary round of the heads (the full product's call, then each screen's), on a
    # CPU: its long products outweigh a first call's fixed costs (on a GPU they may not).
    checks: dict[str, float] = {}
    if gate and on_cpu:
        checks = {"head/plain": gate_seconds["gate/plain"]} | {f"head/{k}": gate_seconds[f"check/{k}"] for k in screens}
    if _clear_winner(checks) not in (None, "head/plain"):
        measured = gate_seconds | checks  # a screen won that round clearly: later rounds would not unseat it
    else:
        with torch.no_grad():  # each head ran on ``hidden`` above (the screens' checks): warmed up
            measured = gate_seconds | interleaved(timer, heads, REPEATS, _beaten_heads, warmed=True)
    plain, on = measured["head/plain"], f"on {len(hidden)} rows"
    fastest = min(screens, key=lambda kind: measured[f"head/{kind}"])
    seconds = measured[f"head/{fastest}"]
    if wanted == "screen":  # a screen, whichever is fastest, even where the plain head is faster
        than_plain = f"{ratio(plain, seconds)} faster" if seconds < plain else f"{ratio(seconds, plain)} slower"
        reason = f"--head screen: the fastest screen, {than_plain} than the full product {on} here"
        return HeadTiming(fastest, reason, False, measured, screens)
    if seconds < plain:
        reason = f"{fastest} screen {ratio(plain, seconds)} faster than the full product {on} here"
        return HeadTiming(fastest, "; ".join([reason, *gated]), shared, measured, screens)
    reason = f"{fastest} screen {ratio(seconds, plain)} slower than the full product {on} here"
    return HeadTiming("plain", "; ".join([reason, *gated]), shared, measured, screens)


class VocabularySlice(nn.Module):
    """A stand-in for ``model`` whose LM head holds ``tokens`` of the model's head rows, every
    ``vocab // tokens``-th (a copy: spread over the vocabulary, not its first tokens, byte pieces and
    specials), and whose config is the model's (its logit softcap): a screen built on it covers that slice."""

    def __init__(self, model: nn.Module, tokens: int):
        super().__init__()
        self.config = model.config
        weight = model.get_output_embeddings().weight.detach()  # pyright: ignore[reportCallIssue]
        rows = weight[:: len(weight) // tokens][:tokens].contiguous()  # [tokens, d]
        self.lm_head = nn.Linear(weight.shape[1], tokens, bias=False, device="meta")
        self.lm_head.weight = nn.Parameter(rows, requires_grad=False)

    def get_output_embeddings(self) -> nn.Linear:
        return self.lm_head


def slice_tokens(vocab: int) -> int | None:
    """The tokens of the gate's slice of a vocabulary of ``vocab``: 1/``SLICE_FRACTION``, at least
    ``SLICE_MIN_TOKENS``; None (no slice gate) where that is more than 1/``SLICE_MAX_SHARE`` of the vocabulary."""
    tokens = max(SLICE_MIN_TOKENS, vocab // SLICE_FRACTION)
    return tokens if tokens * SLICE_MAX_SHARE <= vocab else None


@torch.no_grad()
def slice_gate(
    model,
    hidden: torch.Tensor,
    kinds: list[str],
    timer: Timer,
    measured: dict[str, float],
    probe: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> tuple[list[str], list[str]]:
    """The screens of ``kinds`` not far slower than the full product here: each built on a slice of the vocabulary
    (``VocabularySlice``) and timed on it against the full product of the same slice, on every row of ``hidden``
    [rows, d] ("slice/plain", "slice/KIND": one round after a warm-up of each); those ``GATE_CLEAR`` times slower
    are out. Returns the screens left (those this model cannot take included: their build says why) and why
    each other is out; the timings go to ``measured``. No gate where no screen fits the model's head or its
    logits are not the head's (``logits_mismatch``, ``probe`` as it takes it): the builds then say why."""
    usable = [kind for kind in kinds if SCREENS[kind].unsupported_reason(model) is None]
    if not usable or logits_mismatch(model, probe) is not None:
        return kinds, []
    vocab = model.get_output_embeddings().weight.shape[0]
    tokens = slice_tokens(vocab)
    if tokens is None:
        return kinds, []
    part = VocabularySlice(model, tokens)
    on_slice = {kind: SCREENS[kind](part) for kind in usable}
    for screen in on_slice.values():
        screen.prepare(hidden)  # what it derives from the states (int8: outlier channels, the slice's copy)
    full = on_slice[usable[0]].full_logits  # the slice's full product, softcapped: the plain head on those tokens
    heads: dict[str, Callable[[], object]] = {"slice/plain": lambda: full(hidden).argmax(-1)}
    heads.update({f"slice/{kind}": (lambda s=screen: s.argmax(hidden)) for kind, screen in on_slice.items()})
    seconds = interleaved(timer, heads, 1)
    measured.update(seconds)
    plain = seconds["slice/plain"]
    slow = [kind for kind in usable if seconds[f"slice/{kind}"] >= GATE_CLEAR * plain]
    out = [
        f"{kind} screen {ratio(seconds[f'slice/{kind}'], plain)} slower than the full product on {tokens} of "
        f"{vocab} tokens (all {len(hidden)} rows) here"
        for kind in slow
    ]
    return [kind for kind in kinds if kind not in slow], out


def _timed_plain_tokens(screen: CertifiedHead, hidden: torch.Tensor, timer: Timer) -> tuple[torch.Tensor, float]:
    """The plain head's greedy tokens on ``hidden`` [rows, d] (by the screen's full product: the model's head,
    softcapped) and the seconds of that call, timed as "gate/plain"."""
    out: list[torch.Tensor] = []
    seconds = timer("gate/plain", lambda: out.append(screen.full_logits(hidden).argmax(-1)))
    return out[0], seconds


def _timed_check(
    kind: str,
    screen: CertifiedHead,
    hidden: torch.Tensor,
    plain_tokens: torch.Tensor,
    plain_seconds: float,
    timer: Timer,
    measured: dict[str, float],
) -> tuple[str | None, bool]:
    """A screen's check on the sample ``hidden`` [rows, d], timed ("check/KIND"): the screen must give the plain
    head's tokens and take less than ``GATE_CLEAR`` times ``plain_seconds`` (the full product on every row).
    Returns why it is out (None: it passed) and whether it agreed; the seconds go to ``measured``."""
    screen.prepare(hidden)  # what it derives from the states (int8: its outlier channels) is not timed,
    screen.reserve(len(hidden), hidden.device)  # nor its logits' first page faults (on a CPU it may decide)
    agrees: list[bool] = []
    seconds = measured[f"check/{kind}"] = timer(
        f"check/{kind}", lambda: agrees.append(screen_agrees(screen, hidden, plain_tokens))
    )
    if not agrees[0]:
        return "it disagreed with the plain head on a sample", False
    if seconds >= GATE_CLEAR * plain_seconds:
        return (
            f"{kind} screen {ratio(seconds, plain_seconds)} slower than the full product on {len(hidden)} rows here",
            True,
        )
    return None, True
