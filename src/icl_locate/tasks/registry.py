"""Tasks: one declarative spec each, built in or written by the user as a YAML file, read by one parser.

A task = where its data comes from (a loader and its options), the prompt format, the stop and
cut rules, the token limit and a metric (compare lm-evaluation-harness's declarative tasks). The
built-in tasks (``BUILTIN``) are written in the same keys a task file uses; ``--task`` takes a
built-in name or the path of a task file (``examples/`` holds two). Every mistake in a task file is
one error line naming the file and the key.

Task file keys::

    name: capitals                 # required
    description: ...
    data:
      bank: bank.tsv               # in-context examples (paths relative to the task file)
      test: test.tsv               # test queries with references
      dir: data/                   # or: a folder, with bank/test naming its splits (data/train.jsonl ...)
      bank_lines: 1-40             # optional record ranges, 1-based inclusive (as the paper's 801-997)
      test_lines: 1-100
      format: tsv                  # jsonl | tsv | csv (default: from the file name)
      fields: {source: 1, target: 2}   # TSV columns (1-based), or JSONL keys / CSV columns; id optional
      src_lang: fra_Latn           # optional: names for <L1>/<L2> in the header; BLEU's sentence splitter
      tgt_lang: eng_Latn
    prompt:                        # prompt = header + sep + examples + sep + query
      header: "Translate <L1> to <L2>:"
      q: "Q:"                      # example = q + source + a + target + example_suffix, joined by sep
      a: "A:"
      sep: "\\n"
      example_suffix: " "
    stop: ["\\n"]                  # decoding stops once the continuation contains one
    cut: ["Q:"]                    # the answer ends before the first of these
    max_new_tokens: 50
    metric: bleu                   # bleu | chrf | exact_match | accuracy | pass@1, or {name: ..., options}
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import yaml

from ..core.prompts import (
    EncodedPrompt,
    Example,
    Prompt,
    PromptFormat,
    build_prompt,
    encode_prompt,
    render_header,
    sample_examples,
)
from ..util.errors import UserError
from ..util.fileio import file_sha256
from .data import (
    data_dir_or_default,
    flores_bitext,
    flores_file,
    humaneval_problems,
    mbpp_problems,
    parse_pair,
    resolve_language,
)
from .files import parse_range, read_table, select_range
from .metrics import Accuracy, Metric, make_metric


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
    digest: str = ""  # sha256 of the task file ("" for built-ins)

    @property
    def needs_pair(self) -> bool:
        """Translation tasks over FLORES take --pair / --pairs."""
        return self.data.loader == "flores"

    @property
    def format(self) -> str:
        return self.prompt_format.name

    def load(self, opts: TaskOptions) -> TaskData:
        data = LOADERS[self.data.loader](self, opts)
        if isinstance(self.metric, Accuracy):
            for name, split in (("bank", data.bank), ("test", data.test)):
                self.metric.check_labels([ex.target for ex in split], f"{self.origin} ({name})")
        return data


# --------------------------------------------------------------------------- loaders


def humaneval_query(prompt: str) -> str:
    """The paper's query text: the first triple-double-quoted docstring, else the whole prompt."""
    return prompt.split('"""')[1].strip() if '"""' in prompt else prompt


def load_flores(task: Task, opts: TaskOptions) -> TaskData:
    if not opts.pair:
        raise UserError(f"the {task.name} task needs --pair (e.g. fra-eng)")
    src, tgt = parse_pair(opts.pair)
    data_dir = data_dir_or_default(opts.data_dir)
    dev = flores_bitext(data_dir, src, tgt, "dev")
    devtest = flores_bitext(data_dir, src, tgt, "devtest")
    files = [flores_file(data_dir, lang, split) for split in ("dev", "devtest") for lang in (src, tgt)]
    return TaskData(
        bank=select_range(dev, task.data.bank_lines, "bank_lines", "FLORES dev"),
        test=select_range(devtest, task.data.test_lines, "test_lines", "FLORES devtest"),
        l1=src.name,
        l2=tgt.name,
        files=files,
        label=f"{src.flores200}-{tgt.flores200}",
        language=tgt.iso1,
    )


def load_code(task: Task, opts: TaskOptions) -> TaskData:
    """MBPP problems with task ids in ``bank_lines`` as examples, HumanEval as the test set."""
    data_dir = data_dir_or_default(opts.data_dir)
    lo, hi = task.data.bank_lines or (1, 10**9)
    bank = [
        Example(id=f"mbpp:{p['task_id']}", source=p["text"], target=p["code"])
        for p in mbpp_problems(data_dir)
        if lo <= int(p["task_id"]) <= hi
    ]
    if not bank:
        raise UserError(f"MBPP under {data_dir} has no problems {lo}-{hi}")
    problems = {p["task_id"]: p for p in humaneval_problems()}
    test = [
        Example(id=tid, source=humaneval_query(p["prompt"]), target=p["canonical_solution"])
        for tid, p in problems.items()
    ]
    return TaskData(
        bank=bank,
        test=select_range(test, task.data.test_lines, "test_lines", "HumanEval"),
        problems=problems,
        files=[data_dir / "mbpp" / "mbpp.jsonl"],
        label="mbpp-humaneval",
    )


def read_examples(path: Path, spec: DataSpec, notes: list[str]) -> list[Example]:
    """(source, target) records of a user file, verbatim; ids from the id field, else file:line."""
    fmt = spec.format
    fields = dict(spec.fields)
    if not fields:
        fields = (
            {"source": 1, "target": 2}
            if (fmt or path.suffix.lower()) in ("tsv", ".tsv", ".tab", ".txt")
            else {"source": "source", "target": "target", "id": "id"}
        )
    optional = frozenset({"id"}) if "id" in fields and not spec.fields else frozenset()
    table = read_table(path, fields, fmt, optional)
    if not table.records:
        raise UserError(f"{path} holds no records")
    notes.append(table.summary("pairs"))
    return [
        Example(id=r.fields.get("id") or f"{path.name}:{r.line}", source=r.fields["source"], target=r.fields["target"])
        for r in table.records
    ]


def load_files(task: Task, opts: TaskOptions) -> TaskData:
    """A user's bank and test files (from the task file, or --bank/--test for the bitext task)."""
    spec = task.data
    bank_path = Path(opts.bank_path) if opts.bank_path else (Path(spec.bank) if spec.bank else None)
    test_path = Path(opts.test_path) if opts.test_path else (Path(spec.test) if spec.test else None)
    if bank_path is None or test_path is None:
        raise UserError(f"the {task.name} task needs --bank FILE and --test FILE (JSONL, TSV or CSV pairs)")
    notes: list[str] = []
    bank = select_range(read_examples(bank_path, spec, notes), spec.bank_lines, "bank_lines", str(bank_path))
    test = select_range(read_examples(test_path, spec, notes), spec.test_lines, "test_lines", str(test_path))
    src_name = opts.src_lang or spec.src_lang
    tgt_name = opts.tgt_lang or spec.tgt_lang
    src = resolve_language(src_name) if src_name else None
    tgt = resolve_language(tgt_name) if tgt_name else None
    digest = hashlib.sha256(
        json.dumps(
            [
                task.digest,
                file_sha256(bank_path),
                file_sha256(test_path),
                spec.bank_lines,
                spec.test_lines,
                src_name,
                tgt_name,
            ]
        ).encode()
    ).hexdigest()
    return TaskData(
        bank=bank,
        test=test,
        l1=src.name if src else "",
        l2=tgt.name if tgt else "",
        files=[bank_path, test_path],
        label=test_path.stem,
        language=tgt.iso1 if tgt else "",
        notes=notes,
        digest=digest,
    )


LOADERS = {"flores": load_flores, "mbpp-humaneval": load_code, "files": load_files}


# --------------------------------------------------------------------------- the one parser

TOP_KEYS = {"name", "description", "data", "prompt", "stop", "cut", "max_new_tokens", "metric"}
DATA_KEYS = {"loader", "bank", "test", "dir", "bank_lines", "test_lines", "format", "fields", "src_lang", "tgt_lang"}
PROMPT_KEYS = {"header", "q", "a", "sep", "example_suffix"}


def _strings(value, where: str) -> tuple[str, ...]:
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, list) or not all(isinstance(x, str) and x for x in value):
        raise UserError(f"{where}: expected a list of non-empty strings, got {value!r}")
    return tuple(value)


def _check_keys(mapping, allowed: set[str], where: str) -> dict:
    if not isinstance(mapping, dict):
        raise UserError(f"{where}: expected a mapping, got {type(mapping).__name__}")
    unknown = sorted(set(mapping) - allowed)
    if unknown:
        raise UserError(f"{where}: unknown key(s) {', '.join(unknown)}; known: {', '.join(sorted(allowed))}")
    return mapping


def _split_file(folder: Path, split: str, where: str) -> str:
    matches = sorted(p for p in folder.glob(f"{split}.*") if p.suffix.lower() in (".jsonl", ".json", ".tsv", ".csv"))
    if len(matches) != 1:
        raise UserError(
            f"{where}: expected one file {split}.jsonl, .tsv or .csv in {folder}, found "
            f"{[p.name for p in matches] or 'none'}"
        )
    return str(matches[0])


def parse_data(raw: dict, where: str, base: Path | None) -> DataSpec:
    raw = _check_keys(raw, DATA_KEYS, f"{where}: data")
    loader = raw.get("loader", "files")
    if loader not in LOADERS:
        raise UserError(f"{where}: data.loader must be one of {', '.join(LOADERS)}, got {loader!r}")

    def path(key: str) -> str | None:
        value = raw.get(key)
        if value is None:
            return None
        if not isinstance(value, str):
            raise UserError(f"{where}: data.{key} must be a file name")
        if "dir" in raw:
            return _split_file((base or Path(".")) / raw["dir"], value, f"{where}: data.{key}")
        p = Path(value)
        return str(p if p.is_absolute() or base is None else base / p)

    bank, test = path("bank"), path("test")
    if loader == "files" and base is not None and (bank is None or test is None):
        raise UserError(f"{where}: data needs bank and test (files, or split names with dir)")
    for key in ("bank", "test"):
        value = bank if key == "bank" else test
        if value is not None and not Path(value).is_file():
            raise UserError(f"{where}: data.{key}: file not found: {value}")
    fields = raw.get("fields") or {}
    if (
        not isinstance(fields, dict)
        or not {"source", "target"} <= set(fields)
        or not set(fields) <= {"source", "target", "id"}
    ):
        if fields:
            raise UserError(f"{where}: data.fields maps source and target (and optionally id) to keys or columns")
    fmt = raw.get("format")
    if fmt is not None and fmt not in ("jsonl", "tsv", "csv"):
        raise UserError(f"{where}: data.format must be jsonl, tsv or csv, got {fmt!r}")
    if fmt == "tsv" or (fmt is None and bank and bank.endswith(".tsv")):
        for name, col in fields.items():
            if not isinstance(col, int) or col < 1:
                raise UserError(f"{where}: data.fields.{name}: TSV columns are numbers from 1, got {col!r}")
    for key in ("src_lang", "tgt_lang"):
        if raw.get(key) is not None:
            resolve_language(str(raw[key]))
    return DataSpec(
        loader=loader,
        bank=bank,
        test=test,
        bank_lines=parse_range(raw.get("bank_lines"), f"{where}: data.bank_lines"),
        test_lines=parse_range(raw.get("test_lines"), f"{where}: data.test_lines"),
        format=fmt,
        fields=tuple(fields.items()),
        src_lang=raw.get("src_lang"),
        tgt_lang=raw.get("tgt_lang"),
    )


def parse_task(raw: dict, where: str, base: Path | None = None, digest: str = "") -> Task:
    """A Task from its spec (a task file's mapping, or a built-in's); one error line per mistake."""
    raw = _check_keys(raw, TOP_KEYS, where)
    for key in ("name", "data", "prompt", "metric"):
        if key not in raw:
            raise UserError(f"{where}: missing {key}")
    name = raw["name"]
    if not isinstance(name, str) or not name or not all(c.isalnum() or c in "-_." for c in name):
        raise UserError(f"{where}: name must be letters, digits, '-', '_' or '.', got {name!r}")
    prompt = _check_keys(raw["prompt"], PROMPT_KEYS, f"{where}: prompt")
    for key, value in prompt.items():
        if not isinstance(value, str):
            raise UserError(f"{where}: prompt.{key} must be a string, got {value!r}")
    if "q" not in prompt or "a" not in prompt:
        raise UserError(f"{where}: prompt needs q and a (question and answer markers)")
    fmt = PromptFormat(
        name=f"{name}-format",
        header=prompt.get("header", ""),
        q=prompt["q"],
        a=prompt["a"],
        sep=prompt.get("sep", "\n"),
        example_suffix=prompt.get("example_suffix", " "),
    )
    max_new = raw.get("max_new_tokens", 50)
    if not isinstance(max_new, int) or isinstance(max_new, bool) or max_new < 1:
        raise UserError(f"{where}: max_new_tokens must be a positive integer, got {max_new!r}")
    return Task(
        name=name,
        description=str(raw.get("description", "")),
        prompt_format=fmt,
        metric=make_metric(raw["metric"], f"{where}: metric"),
        stop_strings=_strings(raw.get("stop", []), f"{where}: stop") if raw.get("stop") else (),
        cut_strings=_strings(raw.get("cut", []), f"{where}: cut") if raw.get("cut") else (),
        max_new_tokens=max_new,
        data=parse_data(raw["data"], where, base),
        origin=where if base is not None else "built-in",
        digest=digest,
    )


def load_task_file(path: str | Path) -> Task:
    path = Path(path)
    if not path.is_file():
        raise UserError(f"task file not found: {path}")
    text = path.read_bytes()
    try:
        raw = yaml.safe_load(text.decode("utf-8"))
    except UnicodeDecodeError as err:
        raise UserError(f"{path}: not UTF-8 at byte offset {err.start}") from None
    except yaml.YAMLError as err:
        raise UserError(f"{path} is not valid YAML: {str(err).splitlines()[0]}") from None
    if not isinstance(raw, dict):
        raise UserError(f"{path}: a task file holds a mapping (name, data, prompt, metric, ...)")
    return parse_task(raw, str(path), path.parent, hashlib.sha256(text).hexdigest())


# --------------------------------------------------------------------------- registry

MT_PROMPT = {"header": "Translate <L1> to <L2>:", "q": "Q:", "a": "A:", "sep": "\n"}
QA_PROMPT = {"header": "", "q": "Q:", "a": "\nA:", "sep": "\n"}

BUILTIN: dict[str, dict] = {
    "flores": dict(
        name="flores",
        description="FLORES-200 translation (--pair fra-eng); examples from dev 801-997, test on devtest",
        data=dict(loader="flores", bank_lines="801-997"),
        prompt=MT_PROMPT,
        stop=["\n"],
        cut=["Q:"],
        max_new_tokens=50,
        metric="bleu",
    ),
    "humaneval": dict(
        name="humaneval",
        description="HumanEval code generation prompted with MBPP 801-974 examples; pass@1",
        data=dict(loader="mbpp-humaneval", bank_lines="801-974"),
        prompt={"header": "Write a program for the following task:\n", "q": "Q:", "a": "\nA:", "sep": "\n"},
        stop=["\nQ:"],
        cut=["Q:"],
        max_new_tokens=256,
        metric="pass@1",
    ),
    "bitext": dict(
        name="bitext",
        description="your own (source, target) pairs: --bank FILE --test FILE (JSONL, TSV "
        "or CSV); --src-lang/--tgt-lang give the paper's translation format",
        data=dict(loader="files"),
        prompt=QA_PROMPT,
        stop=["\nQ:"],
        cut=["Q:"],
        max_new_tokens=100,
        metric="bleu",
    ),
}
TASKS: dict[str, Task] = {name: parse_task(spec, f"built-in task {name}") for name, spec in BUILTIN.items()}


def get_task(name_or_path: str, src_lang: str | None = None, tgt_lang: str | None = None) -> Task:
    """A built-in task by name, or a task file by path (a name ending in .yaml / .yml, or an existing file).

    The bitext task with languages uses the paper's translation format (header, one-line answers)."""
    if name_or_path in TASKS:
        task = TASKS[name_or_path]
        if name_or_path == "bitext" and (src_lang or tgt_lang):
            if not (src_lang and tgt_lang):
                raise UserError("give both --src-lang and --tgt-lang")
            resolve_language(src_lang), resolve_language(tgt_lang)
            mt = parse_task(
                dict(BUILTIN["bitext"], prompt=MT_PROMPT, stop=["\n"], max_new_tokens=50), "built-in task bitext"
            )
            task = replace(mt, data=replace(mt.data, src_lang=src_lang, tgt_lang=tgt_lang))
        return task
    if name_or_path.endswith((".yaml", ".yml")) or Path(name_or_path).is_file():
        return load_task_file(name_or_path)
    raise UserError(f"unknown task {name_or_path!r}; available: {', '.join(TASKS)}, or a task file (.yaml)")


# --------------------------------------------------------------------------- prompts for a task


@dataclass
class PromptedItem:
    item: Example
    prompt: Prompt
    encoded: EncodedPrompt


def build_items(
    task: Task,
    data: TaskData,
    tokenizer,
    k: int,
    seed: int,
    n_test: int | None = None,
    instructions: bool = True,
    per_query_examples: bool = False,
) -> list[PromptedItem]:
    """Prompts for the first ``n_test`` test items (all if None).

    As the paper: one set of k examples per seed shared by every query; with
    ``per_query_examples`` each query draws its own (seeded by seed and its index).
    """
    fmt = task.prompt_format
    header = render_header(fmt, data.l1, data.l2) if instructions else ""
    test = data.test if n_test is None else data.test[:n_test]
    if n_test is not None and not 0 < n_test <= len(data.test):
        raise UserError(f"--n-test must be in 1..{len(data.test)}, got {n_test}")
    shared = sample_examples(data.bank, k, seed)
    items = []
    for i, ex in enumerate(test):
        shots = sample_examples(data.bank, k, seed * 1_000_003 + i) if per_query_examples else shared
        prompt = build_prompt(fmt, shots, ex.source, header=header)
        items.append(PromptedItem(item=ex, prompt=prompt, encoded=encode_prompt(tokenizer, prompt)))
    return items


def post_process(task: Task, text: str) -> str:
    """The paper's clean-up: the answer ends before the next delimiter; trimmed."""
    for cut in task.cut_strings:
        text = text.split(cut)[0]
    return text.strip()
