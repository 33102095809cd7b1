"""Where a task's data comes from: one loader per ``data.loader`` (FLORES, MBPP + HumanEval, the
user's files), each turning a task and its options into ``TaskData``. A new data source is one
function in ``LOADERS``."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from ..core.prompts import Example
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
from .files import read_table, select_range
from .metrics import Accuracy
from .spec import DataSpec, Task, TaskData, TaskOptions


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
    fields: dict[str, str | int] = dict(spec.fields)
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


def load_data(task: Task, opts: TaskOptions) -> TaskData:
    """The task's bank and test items; an accuracy task's labels are checked against its classes."""
    data = LOADERS[task.data.loader](task, opts)
    if isinstance(task.metric, Accuracy):
        for name, split in (("bank", data.bank), ("test", data.test)):
            task.metric.check_labels([ex.target for ex in split], f"{task.origin} ({name})")
    return data
