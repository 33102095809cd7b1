"""Run untrusted code completions against HumanEval tests, each in its own isolated process.

Per sample: a launcher (``sandbox_child.py``) isolates a fresh process (see there), limits
CPU time, address space, file size, open files and processes, scrubs the environment, and
execs a bare interpreter (``-I -S``) on the check program

    completion + "\\n" + test + "\\n" + "check(entry_point)" + <marker>

The marker is a random nonce written to a private pipe *after* ``check`` returns, so exiting
early (``sys.exit(0)``, ``os._exit(0)``) or redefining ``check`` cannot fake a pass. Output is
capped (the process is killed past the cap), wall time is enforced from outside, and every
process left behind by the sample is killed. Samples run in a small worker pool.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import select
import signal
import stat
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from queue import Queue

CHILD = Path(__file__).with_name("sandbox_child.py")


TIMEOUT = 3.0  # seconds of wall and CPU time per sample (the paper's default)
WORKERS = 2  # samples run at once


@dataclass(frozen=True)
class Limits:
    timeout: float = TIMEOUT
    memory_mb: int = 2048
    file_mb: int = 16
    tmpfs_mb: int = 64
    max_processes: int = 32
    output_bytes: int = 1 << 20  # stdout + stderr kept before the process is killed


@dataclass
class SampleResult:
    task_id: str
    status: str  # "passed", "failed", "timed out"
    reason: str = ""
    seconds: float = 0.0
    isolation: list[str] = field(default_factory=list)
    stdout: str = ""
    stderr: str = ""

    @property
    def passed(self) -> bool:
        return self.status == "passed"

    def as_dict(self) -> dict:
        return asdict(self)


def check_program(problem: dict, completion: str) -> str:
    """The paper's check program: the model writes the whole function."""
    return f"{completion}\n{problem['test']}\ncheck({problem['entry_point']})\n"


def _world_executable(path: str) -> bool:
    """Can an unprivileged stranger run ``path``? (every directory o+x, the file o+x)."""
    p = Path(os.path.realpath(path))
    return all(part.stat().st_mode & stat.S_IXOTH for part in [*reversed(p.parents), p])


def sandbox_python(as_root: bool) -> str:
    """The interpreter that runs completions: ours if a dropped uid can reach it, else the system's."""
    if not as_root or _world_executable(sys.executable):
        return os.path.realpath(sys.executable)
    for candidate in ("/usr/bin/python3", "/usr/local/bin/python3"):
        if os.path.exists(candidate) and _world_executable(candidate):
            return os.path.realpath(candidate)
    raise RuntimeError("no interpreter reachable by an unprivileged user (tried the current one and /usr/bin/python3)")


class Sandbox:
    """A pool of isolated runners. As root each slot has its own uid, so slots cannot see each other."""

    def __init__(self, limits: Limits = Limits(), workers: int = WORKERS):
        self.limits = limits
        self.workers = max(1, workers)
        self.as_root = os.geteuid() == 0
        self.python = sandbox_python(self.as_root)
        base = 3_000_000_000 + (os.getpid() % 100_000) * 64  # private uid range for this run
        self.slots: Queue = Queue()
        for i in range(self.workers):
            self.slots.put(base + i if self.as_root else None)

    def run(self, task_id: str, program: str) -> SampleResult:
        uid = self.slots.get()
        try:
            return self._run(task_id, program, uid)
        finally:
            if uid is not None:
                self._kill_uid(uid)
            self.slots.put(uid)

    def run_many(self, jobs: list[tuple[str, str]]) -> list[SampleResult]:
        with ThreadPoolExecutor(self.workers) as pool:
            return list(pool.map(lambda job: self.run(*job), jobs))

    # ------------------------------------------------------------------ internals

    def _run(self, task_id: str, program: str, uid: int | None) -> SampleResult:
        lim = self.limits
        nonce = secrets.token_hex(16)
        status_r, status_w = os.pipe()
        full = program + f"\nimport os as _icl_os\n_icl_os.write({status_w}, b'pass:{nonce}\\n')\n"
        cfg = dict(
            uid=uid,
            python=self.python,
            status_fd=status_w,
            cpu_seconds=max(1, int(lim.timeout + 0.999)),
            memory_mb=lim.memory_mb,
            file_mb=lim.file_mb,
            tmpfs_mb=lim.tmpfs_mb,
            max_processes=lim.max_processes,
        )
        started = time.monotonic()
        proc = subprocess.Popen(
            [sys.executable, "-I", str(CHILD), json.dumps(cfg)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            pass_fds=(status_w,),
            env={"PATH": "/usr/bin:/bin", "LANG": "C.UTF-8"},
            start_new_session=True,
            close_fds=True,
        )
        os.close(status_w)
        feeder = threading.Thread(target=_feed, args=(proc.stdin, full.encode()), daemon=True)
        feeder.start()
        out, err, status, verdict = self._collect(proc, status_r, started)
        os.close(status_r)
        seconds = time.monotonic() - started
        lines = status.decode(errors="replace").splitlines()
        isolation = next((line.split(":", 1)[1].split(",") for line in lines if line.startswith("isolation:")), [])
        isolation = [x for x in isolation if x]
        passed = f"pass:{nonce}" in lines
        stdout, stderr = out.decode(errors="replace"), err.decode(errors="replace")
        if verdict:
            status_, reason = verdict
        elif passed:
            status_, reason = "passed", ""
        elif proc.returncode in (-signal.SIGXCPU, -signal.SIGKILL) and seconds >= lim.timeout * 0.9:
            status_, reason = "timed out", f"cpu time limit ({lim.timeout:g}s)"
        else:
            status_, reason = "failed", _failure_reason(stderr, proc.returncode)
        return SampleResult(task_id, status_, reason, round(seconds, 3), isolation, stdout[-2000:], stderr[-2000:])

    def _collect(self, proc, status_r, started):
        """Read stdout/stderr/status until exit, enforcing the wall-time and output caps."""
        lim = self.limits
        out_fd, err_fd = proc.stdout.fileno(), proc.stderr.fileno()
        bufs = {out_fd: bytearray(), err_fd: bytearray(), status_r: bytearray()}
        open_fds = set(bufs)
        verdict = None
        total = 0
        while open_fds:
            remaining = lim.timeout + 1.0 - (time.monotonic() - started)
            if remaining <= 0:
                verdict = ("timed out", f"wall time limit ({lim.timeout:g}s)")
                break
            ready, _, _ = select.select(list(open_fds), [], [], min(remaining, 0.2))
            for fd in ready:
                chunk = os.read(fd, 65536)
                if not chunk:
                    open_fds.discard(fd)
                    continue
                if fd != status_r:
                    total += len(chunk)
                if len(bufs[fd]) < lim.output_bytes:
                    bufs[fd] += chunk[: lim.output_bytes - len(bufs[fd])]
            if total > lim.output_bytes:
                verdict = ("failed", f"output limit exceeded ({lim.output_bytes} bytes)")
                break
            if proc.poll() is not None and not ready:
                break
        if proc.poll() is None:
            _kill_group(proc)
        proc.wait()
        for fd in list(open_fds):  # drain what is already there, without blocking
            while select.select([fd], [], [], 0)[0]:
                chunk = os.read(fd, 65536)
                if not chunk:
                    break
                if len(bufs[fd]) < lim.output_bytes:
                    bufs[fd] += chunk[: lim.output_bytes - len(bufs[fd])]
        proc.stdout.close()
        proc.stderr.close()
        return bytes(bufs[out_fd]), bytes(bufs[err_fd]), bytes(bufs[status_r]), verdict

    def _kill_uid(self, uid: int) -> None:
        subprocess.run(
            [sys.executable, "-I", str(CHILD), json.dumps({"kill_uid": uid})],
            env={"PATH": "/usr/bin:/bin"},
            timeout=10,
            check=False,
        )


def _feed(pipe, data: bytes) -> None:
    try:
        pipe.write(data)
        pipe.close()
    except (BrokenPipeError, OSError):
        pass


def _kill_group(proc) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, signal.SIGKILL)


def _failure_reason(stderr: str, returncode: int) -> str:
    lines = [line for line in stderr.strip().splitlines() if line.strip()]
    if lines:
        return lines[-1][:300]
    if returncode and returncode < 0:
        return f"killed by signal {signal.Signals(-returncode).name}"
    return f"exited (code {returncode}) without passing the tests"


def score_samples(
    samples: list[dict], problems: dict[str, dict], limits: Limits = Limits(), workers: int = WORKERS
) -> list[SampleResult]:
    """Run each ``{"task_id", "completion"}`` against its HumanEval problem."""
    jobs = []
    for s in samples:
        problem = problems.get(s["task_id"])
        if problem is None:
            raise KeyError(s["task_id"])
        jobs.append((s["task_id"], check_program(problem, s["completion"])))
    return Sandbox(limits, workers).run_many(jobs)
