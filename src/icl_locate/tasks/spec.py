"""What a task is: its data spec, prompt format, stop and cut rules, token limit and metric, and
what loading it yields. Plain data; ``taskfile`` parses a spec, ``loaders`` reads its data."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..core.prompts import Example, PromptFormat
from .metrics import Metric


@dataclass
class TaskOptions:
    data_dir: str | None = None
    pair: str | None = None  # translation: "fra-eng"
    bank_path: str | None = None  # bitext: prompt bank file
    test_path: str | None = None  # bitext: test file
    src_lang: str | None = None  # bitext: languages for the header
    tgt_lang: str | None = None


@dataclass
class TaskData:
    bank: list[Example]  # where in-context examples are drawn from
    test: list[Example]  # test queries with references
    l1: str = ""  # names substituted into the header
    l2: str = ""
    problems: dict[str, dict] = field(default_factory=dict)  # code tasks: id -> HumanEval problem
    files: list[Path] = field(default_factory=list)  # data files read (provenance)
    label: str = ""  # e.g. "fra-eng"
    language: str = ""  # ISO 639-1 code of the answers' language (BLEU's sentence splitting); "" = unknown
    notes: list[str] = field(default_factory=list)  # "read N pairs from FILE" lines for the user
    digest: str = ""  # identity of user data (task file + files + options); "" for the built-in datasets


@dataclass(frozen=True)
class DataSpec:
    loader: str  # "flores", "mbpp-humaneval" or "files"
    bank: str | None = None
    test: str | None = None
    bank_lines: tuple[int, int] | None = None
    test_lines: tuple[int, int] | None = None
    format: str | None = None
    fields: tuple[tuple[str, Any], ...] = ()
    src_lang: str | None = None
    tgt_lang: str | None = None


@dataclass(frozen=True)
class Task:
    name: str
    description: str
    prompt_format: PromptFormat
    metric: Metric
    stop_strings: tuple[str, ...]  # decoding stops once the continuation contains one
    cut_strings: tuple[str, ...]  # post-processing: the answer ends before the first of these
    max_new_tokens: int
    data: DataSpec
    origin: str = "built-in"  # or the task file's path
    abstract_labels: tuple[str, ...] = ()  # symbols of the "abstract" label variant ("": core.labels' default)
    digest: str = ""  # sha256 of the task file ("" for built-ins)

    @property
    def needs_pair(self) -> bool:
        """Translation tasks over FLORES take --pair / --pairs."""
        return self.data.loader == "flores"

    @property
    def format(self) -> str:
        return self.prompt_format.name
