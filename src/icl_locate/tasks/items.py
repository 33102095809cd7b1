"""A task's test items as prompts, and its answers cleaned: the task-side ends of decoding."""

from __future__ import annotations

from dataclasses import replace

from ..core.labels import LabelSpace, abstract_map, check_variant, map_label, relabel
from ..core.prompts import Example, PromptedItem, prompt_items, render_header
from ..util.errors import UserError
from .metrics import Accuracy
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
    labels: str = "gold",
) -> list[PromptedItem]:
    """Prompts for the first ``n_test`` test items (all if None), in the task's format.

    As the paper: one set of k examples per seed shared by every query; with
    ``per_query_examples`` each query draws its own (seeded by seed and its index). ``labels``
    names the examples' label variant (``core/labels.py``); with "abstract" the queries' references
    are mapped to the same symbols (one mapping per seed), so they score what the examples taught.
    """
    check_variant(labels)
    fmt = task.prompt_format
    header = render_header(fmt, data.l1, data.l2) if instructions else ""
    test = data.test if n_test is None else data.test[:n_test]
    if n_test is not None and not 0 < n_test <= len(data.test):
        raise UserError(f"--n-test must be in 1..{len(data.test)}, got {n_test}")
    space = label_space(task, data)

    def relabelled(shots: list[Example], draw_seed: int) -> list[Example]:
        return relabel(shots, labels, space, seed if labels == "abstract" else draw_seed)

    items = prompt_items(
        fmt,
        data.bank,
        test,
        tokenizer,
        k,
        seed,
        header,
        per_query_examples,
        relabel=relabelled if labels != "gold" else None,
    )
    if labels == "abstract":
        mapping = abstract_map(space, seed)
        for it in items:
            it.item = replace(it.item, target=map_label(it.item.target, mapping))
    return items


def task_labels(task: Task) -> tuple[str, ...]:
    """The task's label set: an accuracy metric's labels; () for tasks scored on free answers."""
    return tuple(task.metric.labels) if isinstance(task.metric, Accuracy) else ()


def check_label_variant(task: Task, labels: str) -> None:
    """A known variant the task can take (abstract needs a label set); checked before any model loads."""
    check_variant(labels)
    if labels == "abstract" and not task_labels(task):
        raise UserError(f"--labels abstract needs a task with a label set (an accuracy metric); {task.name} has none")


def label_space(task: Task, data: TaskData) -> LabelSpace:
    """The task's labels, the bank's distinct answers, and its abstract symbols."""
    labels = task_labels(task)
    answers = tuple(dict.fromkeys(ex.target for ex in data.bank))
    if task.abstract_labels:
        return LabelSpace(labels, answers, task.abstract_labels)
    return LabelSpace(labels, answers)


def labelled_task(task: Task, data: TaskData, labels: str, seed: int) -> Task:
    """The task as scored under label variant ``labels``: with "abstract", its metric's labels are the
    symbols the examples use (for seed ``seed``); every other variant scores against the gold labels."""
    if labels != "abstract":
        return task
    mapping = abstract_map(label_space(task, data), seed)  # refuses a task without a label set
    metric = task.metric
    assert isinstance(metric, Accuracy)  # the only metric with a label set
    return replace(task, metric=replace(metric, labels=tuple(mapping[x] for x in metric.labels), label_words=()))


def post_process(task: Task, text: str) -> str:
    """The paper's clean-up: the answer ends before the next delimiter; trimmed."""
    for cut in task.cut_strings:
        text = text.split(cut)[0]
    return text.strip()
