"""Where each slot of a tree-engine layer sits in its cache buffer as slots come and go.

A layer's slots fall into classes kept in order (``TreeDecode``: own slots that attend over a narrow
window of columns, other own slots, shared slots), so that each class is one run of buffer rows and
the attention reads it as a view (``core.narrow_attention``). Slots that leave open holes; kept slots
from the end of their class fill them, so a slot that leaves costs one move, not a move of every
slot after it. A class never grows (new slots are copies appended after every kept one), so every
move goes from a later row to an earlier one: copying in order never overwrites a slot still to move
(``decoding.SlotLayer.rearrange``).
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Sequence
from typing import TypeVar

K = TypeVar("K")


def hole_filling_order(kept: Collection[int]) -> list[int]:
    """The old slot each of the first n = len(kept) slots takes (``SlotLayer.rearrange``'s ``keep``): a
    kept slot below n stays where it is, and the kept slots at or past n fill the others' places."""
    n = len(kept)
    order = [i if i in kept else -1 for i in range(n)]
    movers = iter(sorted(i for i in kept if i >= n))
    return [i if i >= 0 else next(movers) for i in order]


def class_order(old: Sequence[K], kept: Collection[int], class_of: Callable[[K], int]) -> list[int]:
    """``hole_filling_order`` within each class: ``old`` holds the slots in class order (classes ascending),
    ``kept`` the old places that stay; the old place each new place takes, class by class."""
    classes = [class_of(key) for key in old]
    if classes != sorted(classes):
        raise ValueError("the old slots are not in class order")
    order: list[int] = []
    for c in sorted(set(classes)):
        mine = [i for i in kept if classes[i] == c]
        offset = len(order)  # where the class starts now: at or before where it started (classes only shrink)
        order += [offset + i for i in hole_filling_order({i - offset for i in mine})]
    return order
