"""Executors: where units are computed. The driver (``sweep.execute``) hands an executor the units it
has claimed and commits what comes back; an executor computes and never writes the store.

* ``LocalExecutor``: one worker in this process, units one after another.
* ``RayExecutor``: Ray actors, each loading the model once (``load(*args)``) and computing units;
  a worker that dies mid-unit is restarted and the unit recomputed; a unit that keeps failing
  stops the sweep with one line naming it and the worker's error.

Adding an executor (a job queue, another cluster manager) = one class with ``map`` here.
"""

from __future__ import annotations

import os
import socket
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from typing import Any, Protocol

import torch

from ..util.errors import UserError
from ..util.progress import Progress
from ..util.system import usable_cpus
from .options import RaySettings

RAY_INSTALL = "the ray executor needs Ray: pip install 'icl-locate[ray]'"


class Computes(Protocol):
    """What a worker is to an executor: something that turns a unit into its result."""

    def compute(self, unit: Any, progress: Callable[[int, int], None] | None = None) -> Any: ...


class Executor(Protocol):
    def map(self, units: Iterable[Any], progress: Progress) -> Iterator[Any]:
        """Compute ``units`` (pulled lazily: each is claimed as it is pulled) and yield each result as it is done."""
        ...


class LocalExecutor:
    """Units one after another in this process, on the worker it is given."""

    def __init__(self, worker: Computes):
        self.worker = worker

    def map(self, units: Iterable[Any], progress: Progress) -> Iterator[Any]:
        for unit in units:
            yield self.worker.compute(unit, progress.inner(unit.label()))


def require_ray():
    """Ray, or one line saying how to install it."""
    try:
        import ray  # lazy: an optional extra, only this executor needs it
    except ImportError:
        raise UserError(RAY_INSTALL) from None
    return ray


class UnitActor:
    """One Ray worker process: builds its worker once (the model load), then computes units."""

    def __init__(self, load: Callable[..., Computes], args: tuple, threads: int):
        torch.set_num_threads(max(1, threads))  # the CPUs Ray reserved for this actor, no more
        self.worker = load(*args)
        self.name = f"{socket.gethostname()}:{os.getpid()}"

    def where(self) -> str:
        return self.name

    def compute(self, unit: Any) -> Any:
        return self.worker.compute(unit)


def first_error_line(error: BaseException) -> str:
    """The worker's own error, one line: the last 'SomeError: message' line of a remote traceback."""
    cause = getattr(error, "cause", None)
    if cause is not None and not isinstance(cause, type(error)):
        error = cause
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    named = [
        line
        for line in lines
        if ": " in line
        and line.split(":")[0].replace(".", "").isidentifier()
        and line.split(":")[0].split(".")[-1][:1].isupper()
    ]
    return (named[-1] if named else lines[-1] if lines else type(error).__name__)[:300]


class RayExecutor:
    """Units on Ray actors; results come back to the driver, which alone writes the store."""

    def __init__(self, settings: RaySettings, load: Callable[..., Computes], *args: Any):
        settings.check()
        self.settings, self.load, self.args = settings, load, args
        self.ray = require_ray()

    def _start(self):
        ray, s = self.ray, self.settings
        actor = ray.remote(num_cpus=s.cpus_per_worker, num_gpus=s.gpus_per_worker, max_restarts=0)(UnitActor)
        return actor.remote(self.load, self.args, int(s.cpus_per_worker))

    def map(self, units: Iterable[Any], progress: Progress) -> Iterator[Any]:
        ray, s = self.ray, self.settings
        started_here = not ray.is_initialized()
        if started_here:
            ray.init(
                address=s.address,
                include_dashboard=False,
                log_to_driver=False,
                **({"num_cpus": max(usable_cpus(), int(s.workers * s.cpus_per_worker))} if s.address is None else {}),
            )
        actors = [self._start() for _ in range(s.workers)]
        try:
            yield from self._drive(units, actors, progress)
        finally:
            for actor in actors:
                ray.kill(actor)
            if started_here:
                ray.shutdown()

    def _drive(self, units: Iterable[Any], actors: list, progress: Progress) -> Iterator[Any]:
        ray, s = self.ray, self.settings
        source = iter(units)
        retry: deque = deque()
        attempts: dict[str, int] = {}
        idle = list(range(len(actors)))
        pending: dict[Any, tuple[Any, int]] = {}  # object ref -> (unit, worker index)
        while True:
            while idle:
                unit = retry.popleft() if retry else next(source, None)
                if unit is None:
                    break
                i = idle.pop(0)
                pending[actors[i].compute.remote(unit)] = (unit, i)
                progress.log(f"worker {i} <- {unit.label()}")
            if not pending:
                return
            (ref,), _ = ray.wait(list(pending), num_returns=1)
            unit, i = pending.pop(ref)
            try:
                result = ray.get(ref)
            except ray.exceptions.RayActorError as error:  # the worker process died: killed, out of memory, node lost
                attempts[unit.unit_id] = attempts.get(unit.unit_id, 0) + 1
                if attempts[unit.unit_id] >= s.max_attempts:
                    raise UserError(
                        f"unit {unit.label()} lost its worker {attempts[unit.unit_id]} times; last: "
                        f"{first_error_line(error)}"
                    ) from None
                progress.log(
                    f"worker {i} died while computing {unit.label()}; starting a new one, the unit is computed again"
                )
                actors[i] = self._start()
                retry.append(unit)
                idle.append(i)
                continue
            except ray.exceptions.RayTaskError as error:  # the unit itself raised
                attempts[unit.unit_id] = attempts.get(unit.unit_id, 0) + 1
                if attempts[unit.unit_id] >= s.max_attempts:
                    raise UserError(
                        f"unit {unit.label()} failed {attempts[unit.unit_id]} times on worker {i}: "
                        f"{first_error_line(error)}"
                    ) from None
                retry.append(unit)
                idle.append(i)
                continue
            idle.append(i)
            yield result
