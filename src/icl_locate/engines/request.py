"""What the user asks of an engine (``--engine``, ``--head``, ``--draft-tokens``, ``--batch-size``), as
plain data checked before anything loads; ``calibrate.py`` measures what is left to "auto"."""

from __future__ import annotations

from dataclasses import dataclass

from ..util.errors import UserError

ENGINES = ("auto", "tree", "fast")
# bf16, int8, int8-linear: the screened heads of screens.py; screen: the fastest of them
HEADS = ("auto", "screen", "bf16", "int8", "int8-linear", "plain")
SCREENED = ("screen", "bf16", "int8", "int8-linear")  # heads only the tree (and pruned) engines have


@dataclass(frozen=True)
class EngineRequest:
    """What the user asked for; "auto" (and draft_tokens None) means measure and choose."""

    engine: str = "auto"  # auto | tree | fast
    head: str = (
        "auto"  # auto | screen | bf16 | int8 | plain (the tree and pruned engines'; the fast engine: the model's)
    )
    draft_tokens: int | None = None  # None: measure; 0: no drafts; N: drafts of up to N tokens (tree engine)
    batch_size: int | None = None  # rows per batch; None: the engines' automatic rule (checked by calibration)

    def check(self) -> None:
        if self.engine not in ENGINES:
            raise UserError(f"--engine must be one of {', '.join(ENGINES)}, got {self.engine!r}")
        if self.head not in HEADS:
            raise UserError(f"--head must be one of {', '.join(HEADS)}, got {self.head!r}")
        if self.draft_tokens is not None and self.draft_tokens < 0:
            raise UserError(f"--draft-tokens must be 'auto' or >= 0, got {self.draft_tokens}")
        if self.engine == "fast" and self.draft_tokens:
            raise UserError("--draft-tokens is for the tree engine (--engine fast has no drafts)")
        if self.engine == "fast" and self.head in SCREENED:
            raise UserError(f"--head {self.head} is for the tree engine (--engine fast uses the model's own head)")

    def tree_only_flags(self) -> str:
        """The flags given that only the tree engine honours (a screened head, drafts), as the user wrote them."""
        flags = [f"--head {self.head}"] if self.head in SCREENED else []
        if self.draft_tokens:
            flags.append(f"--draft-tokens {self.draft_tokens}")
        return " ".join(flags)


AUTO_REQUEST = EngineRequest()  # everything left to "auto" (the default of functions taking a request)


def auto_or_count(flag: str, value: str | int | None) -> int | None:
    """A setting that is 'auto' (or None: not given) -> None, else a count >= 0 (``flag`` names it in errors)."""
    if value is None or value == "auto":
        return None
    try:
        count = int(value)
    except (TypeError, ValueError):
        raise UserError(f"{flag} must be 'auto' or a number >= 0, got {value!r}") from None
    if count < 0:
        raise UserError(f"{flag} must be 'auto' or a number >= 0, got {count}")
    return count


def parse_draft_tokens(value: str | int | None) -> int | None:
    """--draft-tokens: 'auto' -> None (measured); else drafts of up to this many tokens (0: none)."""
    return auto_or_count("--draft-tokens", value)
