"""Executors: where units are computed. The driver (``sweep.execute``) hands an executor the units it
has claimed and commits what comes back; an executor computes and never writes the store.

Adding an executor (a cluster, a job queue) = one class with ``map`` here.
"""

from __future__ import annotations

from typing import Iterable, Iterator, Protocol

from ..util.progress import Progress
from .settings import WorkUnit
from .units import UnitResult, Worker


class Executor(Protocol):
    def map(self, units: Iterable[WorkUnit], progress: Progress) -> Iterator[UnitResult]:
        """Compute ``units`` (pulled lazily: each is claimed as it is pulled) and yield each result as it is done."""


class LocalExecutor:
    """Units one after another in this process, on the worker it is given."""

    def __init__(self, worker: Worker):
        self.worker = worker

    def map(self, units: Iterable[WorkUnit], progress: Progress) -> Iterator[UnitResult]:
        for unit in units:
            yield self.worker.compute(unit, progress.inner(unit.label()))
