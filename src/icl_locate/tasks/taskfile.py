"""Task files: the one parser of a task spec (a YAML file, or a built-in written in the same keys).

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
    abstract_labels: ["0", "1"]    # optional: the symbols of --labels abstract (one per label, distinct)
"""

from __future__ import annotations

import hashlib
from pathlib import Path

from ..core.prompts import PromptFormat
from ..util.errors import UserError
from ..util.fileio import read_yaml_mapping
from .data import resolve_language
from .files import parse_range
from .loaders import LOADERS
from .metrics import make_metric
from .spec import DataSpec, Task

TOP_KEYS = {"name", "description", "data", "prompt", "stop", "cut", "max_new_tokens", "metric", "abstract_labels"}
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
    if fields and (
        not isinstance(fields, dict)
        or not {"source", "target"} <= set(fields)
        or not set(fields) <= {"source", "target", "id"}
    ):
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
    abstract = _strings(raw["abstract_labels"], f"{where}: abstract_labels") if "abstract_labels" in raw else ()
    if len(set(abstract)) != len(abstract):
        raise UserError(f"{where}: abstract_labels must be distinct, got {list(abstract)}")
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
        abstract_labels=abstract,
    )


def load_task_file(path: str | Path) -> Task:
    path = Path(path)
    if not path.is_file():
        raise UserError(f"task file not found: {path}")
    raw, text = read_yaml_mapping(path, "a task file holds a mapping (name, data, prompt, metric, ...)")
    return parse_task(raw, str(path), path.parent, hashlib.sha256(text).hexdigest())
