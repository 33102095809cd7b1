"""What an engine runs with: the configuration the calibration chose (``calibrate.py``), why, and what
was measured to decide it; stored with the run and shown in one line."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

from ..util.system import hardware_line


@dataclass
class Choices:
    """What an engine runs with, why, and what was measured (seconds) to decide it."""

    engine: str  # "tree" or "fast"
    head: str  # "plain", or a screened head (``screens.py``): "bf16", "int8", "int8-linear"
    draft_tokens: int
    batch_size: int | None  # forced rows per batch (--batch-size), else None
    reasons: dict[str, str]
    measured: dict[str, float] = field(default_factory=dict)
    hardware: dict = field(default_factory=dict)
    calibration_seconds: float = 0.0
    cached: bool = False
    batch_scale: float = 1.0  # the factor on the automatic rule's rows measured fastest (1: the rule's own)

    def line(self) -> str:
        """One line for the terminal: the choices and the measured reasons."""
        cost = "cached" if self.cached else f"{self.calibration_seconds:.1f}s"
        return (
            f"engine: {self.engine} ({self.reasons['engine']}); head: {self.head} ({self.reasons['head']}); "
            f"drafts: {self.draft_tokens or 'off'} ({self.reasons['drafts']}); batch: {self.batch_line()} "
            f"({self.reasons['batch']}); calibration {cost}; on "
            f"{hardware_line(self.hardware)}"
        )

    def batch_line(self) -> str:
        """The batch size in a few words: forced, the rule's, or a multiple of the rule's."""
        if self.batch_size:
            return str(self.batch_size)
        return "auto" if self.batch_scale == 1 else f"{self.batch_scale:g}x the rule's rows"

    def summary(self) -> str:
        """The configuration in a few words, e.g. "tree engine, screened head, no drafts"."""
        if self.engine == "fast":
            return "fast engine"
        head = "plain head" if self.head == "plain" else f"{self.head}-screened head"
        drafts = f"drafts <= {self.draft_tokens}" if self.draft_tokens else "no drafts"
        return f"tree engine, {head}, {drafts}"

    def as_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> Choices:
        return cls(**data)
