"""The task registry. A task = prompt bank + test set + prompt format + stop rule + metric.

Adding a task is one ``Task(...)`` entry in ``TASKS`` with a loader function that returns a
``TaskData`` (compare lm-evaluation-harness's declarative tasks); its metric is an object from
``metrics.py``.
"""

from __future__ import annotations

import csv
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from ..core.prompts import FORMATS, EncodedPrompt, Example, Prompt, PromptFormat, build_prompt, encode_prompt, \
    render_header, sample_examples
from ..util.errors import UserError
from .data import data_dir_or_default, flores_bitext, flores_file, humaneval_problems, mbpp_problems, parse_pair
from .metrics import Bleu, Metric, PassAt1


@dataclass
class TaskOptions:
    data_dir: str | None = None
    pair: str | None = None  # translation: "fra-eng"
    bank_path: str | None = None  # bitext: prompt bank file
    test_path: str | None = None  # bitext: test file


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


@dataclass(frozen=True)
class Task:
    name: str
    description: str
    format: str  # key of prompts.FORMATS
    metric: Metric
    stop_strings: tuple[str, ...]  # decoding stops once the continuation contains one
    cut_strings: tuple[str, ...]  # post-processing: the answer ends before the first of these
    max_new_tokens: int
    load: Callable[[TaskOptions], TaskData]
    needs_pair: bool = False  # translation tasks take --pair / --pairs

    @property
    def prompt_format(self) -> PromptFormat:
        return FORMATS[self.format]


# --------------------------------------------------------------------------- loaders

FLORES_BANK_LINES = (801, 997)  # 1-based, inclusive: dev lines 1-800 are kept for LoRA training
MBPP_BANK_IDS = (801, 974)


def load_flores(opts: TaskOptions) -> TaskData:
    if not opts.pair:
        raise UserError("the flores task needs --pair (e.g. fra-eng)")
    src, tgt = parse_pair(opts.pair)
    data_dir = data_dir_or_default(opts.data_dir)
    dev = flores_bitext(data_dir, src, tgt, "dev")
    devtest = flores_bitext(data_dir, src, tgt, "devtest")
    lo, hi = FLORES_BANK_LINES
    files = [flores_file(data_dir, lang, split) for split in ("dev", "devtest") for lang in (src, tgt)]
    return TaskData(bank=dev[lo - 1:hi], test=devtest, l1=src.name, l2=tgt.name, files=files,
                    label=f"{src.flores200}-{tgt.flores200}", language=tgt.iso1)


def humaneval_query(prompt: str) -> str:
    """The paper's query text: the first triple-double-quoted docstring, else the whole prompt."""
    return prompt.split('"""')[1].strip() if '"""' in prompt else prompt


def load_code(opts: TaskOptions) -> TaskData:
    data_dir = data_dir_or_default(opts.data_dir)
    lo, hi = MBPP_BANK_IDS
    bank = [Example(id=f"mbpp:{p['task_id']}", source=p["text"], target=p["code"])
            for p in mbpp_problems(data_dir) if lo <= int(p["task_id"]) <= hi]
    if not bank:
        raise UserError(f"MBPP under {data_dir} has no problems {lo}-{hi}")
    problems = {p["task_id"]: p for p in humaneval_problems()}
    test = [Example(id=tid, source=humaneval_query(p["prompt"]), target=p["canonical_solution"])
            for tid, p in problems.items()]
    return TaskData(bank=bank, test=test, problems=problems, files=[data_dir / "mbpp" / "mbpp.jsonl"],
                    label="mbpp-humaneval")


def read_pairs(path: str) -> list[Example]:
    """(source, target) pairs from JSONL (keys source/target) or TSV (two columns)."""
    p = Path(path)
    if not p.is_file():
        raise UserError(f"file not found: {path}")
    out = []
    with open(p, encoding="utf-8") as f:
        if p.suffix in (".jsonl", ".json"):
            for n, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                    out.append(Example(id=str(row.get("id", n)), source=row["source"], target=row["target"]))
                except (ValueError, KeyError, TypeError):
                    raise UserError(f"{path}:{n}: expected a JSON object with 'source' and 'target'") from None
        else:
            for n, row in enumerate(csv.reader(f, delimiter="\t"), 1):
                if len(row) < 2:
                    raise UserError(f"{path}:{n}: expected two tab-separated columns (source, target)")
                out.append(Example(id=str(n), source=row[0], target=row[1]))
    if not out:
        raise UserError(f"{path} holds no pairs")
    return out


def load_bitext(opts: TaskOptions) -> TaskData:
    if not (opts.bank_path and opts.test_path):
        raise UserError("the bitext task needs --bank FILE and --test FILE (JSONL or TSV pairs)")
    return TaskData(bank=read_pairs(opts.bank_path), test=read_pairs(opts.test_path),
                    files=[Path(opts.bank_path), Path(opts.test_path)], label=Path(opts.test_path).stem)


# --------------------------------------------------------------------------- registry

TASKS: dict[str, Task] = {
    t.name: t
    for t in (
        Task("flores", "FLORES-200 translation (--pair fra-eng); examples from dev 801-997, test on devtest",
             format="instr_machine_translation", metric=Bleu(), stop_strings=("\n",), cut_strings=("Q:",),
             max_new_tokens=50, load=load_flores, needs_pair=True),
        Task("humaneval", "HumanEval code generation prompted with MBPP 801-974 examples; pass@1",
             format="instr_code_gen", metric=PassAt1(), stop_strings=("\nQ:",), cut_strings=("Q:",),
             max_new_tokens=256, load=load_code),
        Task("bitext", "your own (source, target) pairs: --bank FILE --test FILE (JSONL or TSV)",
             format="instr_none_QA", metric=Bleu(), stop_strings=("\nQ:",), cut_strings=("Q:",),
             max_new_tokens=100, load=load_bitext),
    )
}


def get_task(name: str) -> Task:
    if name not in TASKS:
        raise UserError(f"unknown task {name!r}; available: {', '.join(TASKS)}")
    return TASKS[name]


# --------------------------------------------------------------------------- prompts for a task

@dataclass
class PromptedItem:
    item: Example
    prompt: Prompt
    encoded: EncodedPrompt


def build_items(task: Task, data: TaskData, tokenizer, k: int, seed: int, n_test: int | None = None,
                instructions: bool = True, per_query_examples: bool = False) -> list[PromptedItem]:
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
