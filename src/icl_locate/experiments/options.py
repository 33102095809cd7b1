"""The settings of every command but ``sweep`` (whose ``SweepConfig`` lives in ``settings``): typed
dataclasses whose field defaults are the command line's defaults. Torch-free, so that the parser
reads its defaults and help text from here without importing the model stack."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from ..core.catalog import EMBEDDED
from ..tasks import sandbox
from ..util.errors import UserError
from .settings import ModelAndData


@dataclass(kw_only=True)
class RunSettings(ModelAndData):
    pair: str | None = None
    condition: str = "baseline"
    from_layer: int | None = None  # None: the last layer for the baseline, else required
    k: int = 5
    seed: int = 0
    n_test: int | None = None
    instructions: bool = True
    per_query_examples: bool = False
    labels: str = "gold"  # the examples' label variant (core/labels.py)
    max_new_tokens: int | None = None
    out: str | None = None
    workers: int = sandbox.WORKERS  # code tasks: samples run at once
    timeout: float = sandbox.TIMEOUT  # code tasks: seconds per sample


@dataclass(kw_only=True)
class BenchSettings(ModelAndData):
    pair: str = "fra-eng"
    condition: str = "instructions+examples"
    layers: str = "all"
    n_test: int = 8
    k: int = 5
    seed: int = 0
    batch_size: int | None = None
    engine: str = "auto"  # (d): auto (measured) | tree | fast
    head: str = "auto"  # (d): auto (measured) | bf16 | int8 | plain
    draft_tokens: int | str = "auto"  # (d): auto (measured) or drafts of up to N tokens (0: none)
    skip_paper: bool = False
    json: str | None = None


@dataclass(kw_only=True)
class PruneSettings(ModelAndData):
    layer: int  # r: the context is processed in layers < r only
    pair: str = "fra-eng"
    condition: str = "instructions+examples"
    n_test: int = 16
    k: int = 5
    seed: int = 0
    per_query_examples: bool = False
    batch_size: int = 8
    head: str = "auto"  # the LM head of full and pruned runs: auto (measured) | bf16 | int8 | plain
    max_new_tokens: int | None = None
    check: bool = True
    json: str | None = None
    store: str | None = None


@dataclass(kw_only=True)
class ScoreCodeSettings:
    """``icl-locate score-code``: HumanEval completions from a samples file, run in the sandbox."""

    samples: str  # JSONL lines {"task_id": ..., "completion": ...}
    out: str | None = None  # per-sample results; None: <samples>_results.jsonl
    workers: int = sandbox.WORKERS  # samples run at once
    timeout: float = sandbox.TIMEOUT  # seconds per sample


REPORT_FORMATS = ("html", "md")


@dataclass(kw_only=True)
class ReportSettings:
    """``icl-locate report``: figures and a report from a results store."""

    store: str
    out_dir: str | None = None  # None: <store>_report/
    format: str = "html"  # html (self-contained) or md
    fraction: float = 0.95  # recognition threshold (share of the baseline); analysis.DEFAULT_FRACTION
    bootstrap: int = 1000  # bootstrap replicates

    def __post_init__(self) -> None:  # the API takes any value the command line's choices would refuse
        if self.format not in REPORT_FORMATS:
            raise UserError(f"report format must be one of {', '.join(REPORT_FORMATS)}, got {self.format!r}")
        if self.bootstrap < 1:
            raise UserError(f"--bootstrap must be >= 1 (replicates of the intervals), got {self.bootstrap}")
        if not 0 < self.fraction <= 1:
            raise UserError(f"--fraction must be in (0, 1] (a share of the baseline), got {self.fraction}")

    def output_dir(self) -> Path:
        """Where the report goes: ``out_dir``, else ``<store>_report/`` beside the store."""
        store = Path(self.store)
        return Path(self.out_dir) if self.out_dir else store.with_name(store.stem + "_report")


@dataclass
class DemoSettings:
    out_dir: str = "runs/demo"
    n_test: int = 16
    data_dir: str | None = None


@dataclass(kw_only=True)
class StartupSettings:
    model: str = EMBEDDED  # what `run`/`sweep` load by default
    dtype: str | None = None
    device: str | None = None
    repeats: int = 3  # fresh processes per measurement (the median is reported)


@dataclass
class LoraSettings:
    """Defaults: the paper's (configs/training + its LoRA script), except the loss (see ``loss``);
    every one overridable."""

    r: int = 8
    alpha: int = 32
    dropout: float = 0.05
    lr: float = 1e-4
    batch_size: int = 32
    micro_batch: int = 8  # gradient accumulation keeps memory bounded; the update sees batch_size
    val_size: int = 197  # validation pairs from dev 801-997
    max_epochs: int = 100
    patience: int = 5
    threshold: float = 0.01
    train_size: int = 800
    seed: int = 0
    loss: str = "answer"  # "answer": answer tokens only; "full": every position (the paper's code)
    bucketing: bool = True  # fixed micro-batches of similar length, shuffled each epoch
    reuse: bool = True  # keep the frozen layers' output once instead of recomputing it (same results)
    activation_mb: int | None = None  # saved activations per training piece (None: lora_reuse.activation_budget)
    autocast: str = "auto"  # "bf16": forward passes under bf16 autocast; "auto": bf16 on a GPU (resolve_autocast)


@dataclass
class LoraRun:
    """``icl-locate lora-sweep``: which model, pair and layers, where results go."""

    settings: LoraSettings
    preset: str | None = None
    model: str = EMBEDDED
    pair: str = "fra-eng"
    layers: str = "all"
    n_test: int | None = None
    out_dir: str = "runs/lora"
    store: str | None = None
    data_dir: str | None = None
    dtype: str | None = None
    device: str | None = None


EXECUTORS = ("local", "ray")


@dataclass(frozen=True)
class ExecutorSettings:
    """Where units are computed: "local" (this process) or "ray" (Ray workers, sized by ``RaySettings``)."""

    executor: str = "local"


@dataclass(frozen=True)
class RaySettings:
    """Where and how wide: ``address`` None starts a local Ray instance, "auto" joins the running
    cluster, anything else is that cluster's address."""

    address: str | None = None
    workers: int = 2
    cpus_per_worker: float = 1.0
    gpus_per_worker: float = 0.0  # fractions pack several small models onto one GPU
    max_attempts: int = 3  # per unit: a unit that fails this often (error or lost worker) stops the sweep

    def check(self) -> None:
        if self.workers < 1:
            raise UserError(f"--workers must be >= 1, got {self.workers}")
        if self.cpus_per_worker <= 0 or self.gpus_per_worker < 0:
            raise UserError("--cpus-per-worker must be > 0 and --gpus-per-worker >= 0")
        if self.max_attempts < 1:
            raise UserError(f"attempts per unit must be >= 1, got {self.max_attempts}")


@dataclass(frozen=True)
class PlanSettings:
    """``icl-locate plan``: how a sweep's cost is predicted (the sweep itself is a ``SweepConfig``)."""

    tflops: float | None = None  # a worker's throughput in TFLOP/s; None: measured here (a matmul, cached)
    json: str | None = None  # also write the plan here
    store: str | None = None  # units already in this store are counted as done (and restore's layer read)
    chars_per_token: float = 4.0  # where no tokenizer loads offline: English-like text, ~4 characters a token
    calibration_seconds: float = 1.0  # how long the matmul is timed: a few repeats, noise within a few %

    def __post_init__(self) -> None:  # checked when made: bad settings fail before the model stack is imported
        if self.tflops is not None and self.tflops <= 0:
            raise UserError(f"--tflops must be > 0, got {self.tflops}")
        if self.chars_per_token <= 0 or self.calibration_seconds <= 0:
            raise UserError("characters per token and calibration seconds must be > 0")
