"""The built-in tasks (``BUILTIN``, written in the keys a task file uses) and ``get_task``: a
built-in by name or a task file by path. A new built-in task is one entry in ``BUILTIN``."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

from ..util.errors import UserError
from .data import resolve_language
from .spec import Task
from .taskfile import load_task_file, parse_task

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
            for language in (src_lang, tgt_lang):  # an unknown language fails here, with one line
                resolve_language(language)
            mt = parse_task(
                dict(BUILTIN["bitext"], prompt=MT_PROMPT, stop=["\n"], max_new_tokens=50), "built-in task bitext"
            )
            task = replace(mt, data=replace(mt.data, src_lang=src_lang, tgt_lang=tgt_lang))
        return task
    if name_or_path.endswith((".yaml", ".yml")) or Path(name_or_path).is_file():
        return load_task_file(name_or_path)
    raise UserError(f"unknown task {name_or_path!r}; available: {', '.join(TASKS)}, or a task file (.yaml)")
