"""Label variants of the in-context examples: what the examples' answers say, as a sweep axis.

They separate *task recognition* from *task learning* (Pan et al., 2023): examples whose labels are
wrong still show which task it is; abstract labels can only be used by learning the mapping from
the examples. Every variant changes the examples' answers only (their inputs, the query and the
prompt format stay), and each is a pure function of the examples, the label space and the seed:

* ``gold``: the dataset's answers.
* ``random``: each answer drawn uniformly from the task's labels (classification; it may draw
  the gold label, as in Min et al. 2022 and Pan et al. 2023), or, for a task without a label set
  (translation, short answers), the answer of a bank item whose answer differs from the gold one.
* ``shuffled``: the examples' gold answers permuted among the examples, with no example keeping its
  own answer where the answers allow it (``derangement``).
* ``abstract``: each label mapped one-to-one to a symbol with no meaning for the task (the task
  file's ``abstract_labels``, else ``DEFAULT_SYMBOLS``), the assignment drawn by the seed; the
  query's reference is mapped too, so a model scores only by learning the mapping. Needs a
  label set.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass, replace

from ..util.errors import UserError
from .prompts import Example

LABEL_VARIANTS = ("gold", "random", "shuffled", "abstract")
VARIANTS_HELP = (
    "label variants of the examples' answers: gold, random (drawn from the label set, or other bank answers), "
    "shuffled (permuted among the examples), abstract (labels mapped to symbols; classification tasks)"
)
# Numbers name no sentiment, topic or entity, are one token in common vocabularies, and do not
# collide with the "A:" / "Q:" markers of the prompt formats.
DEFAULT_SYMBOLS = ("0", "1", "2", "3", "4", "5", "6", "7", "8", "9")


@dataclass(frozen=True)
class LabelSpace:
    """What a task's answers can be: its label set (classification, else empty), the bank's answers
    (the pool of ``random`` for tasks without labels) and the symbols of ``abstract``."""

    labels: tuple[str, ...]
    answers: tuple[str, ...]
    symbols: tuple[str, ...] = DEFAULT_SYMBOLS


def check_variant(variant: str) -> str:
    if variant not in LABEL_VARIANTS:
        raise UserError(f"unknown label variant {variant!r}; choose from: {', '.join(LABEL_VARIANTS)}")
    return variant


def abstract_map(space: LabelSpace, seed: int) -> dict[str, str]:
    """label -> symbol, one-to-one, the assignment drawn by ``seed``."""
    if not space.labels:
        raise UserError("abstract labels need a task with a label set (an accuracy metric with labels)")
    if len(space.symbols) < len(space.labels) or len(set(space.symbols)) != len(space.symbols):
        raise UserError(
            f"abstract labels: {len(space.labels)} labels need as many distinct symbols, got {list(space.symbols)}"
        )
    symbols = random.Random(f"abstract:{seed}").sample(list(space.symbols), len(space.labels))
    return dict(zip(space.labels, symbols))


def relabel(examples: Sequence[Example], variant: str, space: LabelSpace, seed: int) -> list[Example]:
    """The examples with the answers of ``variant`` (deterministic in ``seed``)."""
    check_variant(variant)
    if variant == "gold" or not examples:
        return list(examples)
    rng = random.Random(f"{variant}:{seed}")
    if variant == "abstract":
        mapping = abstract_map(space, seed)
        return [replace(ex, target=map_label(ex.target, mapping)) for ex in examples]
    if variant == "shuffled":
        targets = derangement([ex.target for ex in examples], rng)
        return [replace(ex, target=t) for ex, t in zip(examples, targets)]
    return [replace(ex, target=random_answer(ex.target, space, rng)) for ex in examples]


def map_label(target: str, mapping: dict[str, str]) -> str:
    """A gold label's symbol; labels are compared as written, then case-insensitively and stripped."""
    if target in mapping:
        return mapping[target]
    loose = {label.strip().lower(): symbol for label, symbol in mapping.items()}
    key = target.strip().lower()
    if key not in loose:
        raise UserError(f"answer {target!r} is not one of the task's labels {list(mapping)}")
    return loose[key]


def random_answer(gold: str, space: LabelSpace, rng: random.Random) -> str:
    """A label drawn uniformly (classification), else a bank answer that differs from ``gold``."""
    if space.labels:
        return rng.choice(space.labels)
    others = [a for a in space.answers if a.strip() != gold.strip()]
    if not others:
        raise UserError("random labels need at least two different answers in the prompt bank")
    return rng.choice(others)


def derangement(targets: Sequence[str], rng: random.Random, tries: int = 1000) -> list[str]:
    """A random permutation of ``targets`` that leaves no answer where an equal answer was (a uniform draw
    among those, by rejection); where none exists (e.g. 3 of 5 answers alike), the draw that moves most."""
    order, best, best_moved = list(range(len(targets))), None, -1
    for _ in range(tries):
        rng.shuffle(order)
        moved = sum(targets[i] != targets[j] for j, i in enumerate(order))
        if moved > best_moved:
            best, best_moved = list(order), moved
        if moved == len(targets):
            break
    assert best is not None  # tries >= 1
    return [targets[i] for i in best]
