"""A task's test items as prompts, and its answers cleaned: the task-side ends of decoding."""

from __future__ import annotations

from ..core.prompts import PromptedItem, prompt_items, render_header
from ..util.errors import UserError
from .spec import Task, TaskData


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
    """Prompts for the first ``n_test`` test items (all if None), in the task's format.

    As the paper: one set of k examples per seed shared by every query; with
    ``per_query_examples`` each query draws its own (seeded by seed and its index).
    """
    fmt = task.prompt_format
    header = render_header(fmt, data.l1, data.l2) if instructions else ""
    test = data.test if n_test is None else data.test[:n_test]
    if n_test is not None and not 0 < n_test <= len(data.test):
        raise UserError(f"--n-test must be in 1..{len(data.test)}, got {n_test}")
    return prompt_items(fmt, data.bank, test, tokenizer, k, seed, header, per_query_examples)


def post_process(task: Task, text: str) -> str:
    """The paper's clean-up: the answer ends before the next delimiter; trimmed."""
    for cut in task.cut_strings:
        text = text.split(cut)[0]
    return text.strip()
