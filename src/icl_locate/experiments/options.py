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
    pair: str | None = None  # a translation task's direction (FLORES: required); None for other tasks
    condition: str = "baseline"  # what is hidden; the baseline hides nothing (the unmasked score)
    from_layer: int | None = None  # None: the last layer for the baseline, else required
    k: int = 5  # in-context examples: the paper's setting
    seed: int = 0  # which examples are drawn: a fixed draw makes runs comparable
    n_test: int | None = None  # the first N test items; None: all of them
    instructions: bool = True  # the instruction header, as in the paper's prompts
    per_query_examples: bool = False  # one example set for every query (the paper's), or new ones per query
    labels: str = "gold"  # the examples' label variant (core/labels.py)
    max_new_tokens: int | None = None  # None: the task's limit (50 for MT)
    out: str | None = None  # one JSON line per prediction; None: the table and scores only
    workers: int = sandbox.WORKERS  # code tasks: samples run at once
    timeout: float = sandbox.TIMEOUT  # code tasks: seconds per sample


@dataclass(kw_only=True)
class BenchSettings(ModelAndData):
    pair: str = "fra-eng"  # the direction the embedded model translates
    condition: str = "instructions+examples"  # the paper's main masking condition
    layers: str = "all"  # every mask layer 0..L: a whole sweep unit's rows
    n_test: int = 8  # 8 queries x 19 layers = 152 rows: (a) in about a quarter of an hour on 2 CPU cores
    k: int = 5  # in-context examples: the paper's setting
    seed: int = 0  # which examples are drawn
    batch_size: int | None = None  # None: the engines' memory rule, scaled where the calibration measured it to pay
    engine: str = "auto"  # (d): auto (measured) | tree | fast
    head: str = "auto"  # (d): auto (measured) | screen | bf16 | int8 | int8-linear | plain
    draft_tokens: int | str = "auto"  # (d): auto (measured) or drafts of up to N tokens (0: none)
    skip_paper: bool = False  # (a) takes about as long as (b), and 5 to 8 times (c) and (d) together
    json: str | None = None  # the measurements as JSON (with the machine and the choices); None: printed only


@dataclass(kw_only=True)
class PruneSettings(ModelAndData):
    layer: int  # r: the context is processed in layers < r only
    pair: str = "fra-eng"  # the direction the embedded model translates
    condition: str = "instructions+examples"  # the context pruned: what the sweep masked
    n_test: int = 16  # the demo's sentences (its check then reads the demo sweep's rows)
    k: int = 5  # in-context examples: the paper's setting
    seed: int = 0  # which examples are drawn (the sweep's, for the check)
    per_query_examples: bool = False  # one example set for every query (the paper's), or new ones per query
    batch_size: int = 8  # requests decoded together, the same in the full and the pruned runs (a fair comparison)
    head: str = "auto"  # of full and pruned runs: auto (measured) | screen | bf16 | int8 | int8-linear | plain
    max_new_tokens: int | None = None  # None: the task's limit (50 for MT)
    check: bool = True  # pruned generations against masking from r: the method's claim, checked on each run
    json: str | None = None  # the measurements as JSON; None: printed only
    store: str | None = None  # a study store to keep the measurement in (and to take the check's rows from)


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
    out_dir: str = "runs/demo"  # the store and the report; a rerun resumes the store
    n_test: int = 16  # test sentences per unit: a curve with a usable interval in a few minutes on 2 cores
    data_dir: str | None = None  # None: $ICL_LOCATE_DATA_DIR, else the XDG data directory (FLORES-200)


@dataclass(kw_only=True)
class StartupSettings:
    model: str = EMBEDDED  # what `run`/`sweep` load by default
    dtype: str | None = None  # None: the device's default (float32 on a CPU, bfloat16 on a GPU)
    device: str | None = None  # None: a GPU where there is one
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
