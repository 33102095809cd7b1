"""The code sandbox: canonical HumanEval solutions pass; hostile completions fail and the host is untouched."""

from __future__ import annotations

import contextlib
import os
import socket
import threading
from pathlib import Path

import pytest

from icl_locate.tasks.data import humaneval_problems
from icl_locate.tasks.sandbox import Limits, Sandbox, check_program, score_samples

PROBLEMS = {p["task_id"]: p for p in humaneval_problems()}
P0 = PROBLEMS["HumanEval/0"]
CORRECT = P0["prompt"] + P0["canonical_solution"]


def run(completion: str, limits: Limits | None = None):
    sandbox = Sandbox(limits if limits is not None else Limits(), workers=1)
    return sandbox.run("HumanEval/0", check_program(P0, completion))


def sandbox_uid_processes() -> list[int]:
    """Live (non-zombie) processes left under our private sandbox uid range."""
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                uid = os.stat(f"/proc/{entry}").st_uid
                state = Path(f"/proc/{entry}/stat").read_text().rsplit(")", 1)[1].split()[0]
            except (FileNotFoundError, ProcessLookupError, IndexError):
                continue
            if uid >= 3_000_000_000 and state != "Z":
                found.append(int(entry))
    return found


def test_all_canonical_solutions_pass():
    samples = [{"task_id": k, "completion": p["prompt"] + p["canonical_solution"]} for k, p in PROBLEMS.items()]
    results = score_samples(samples, PROBLEMS, workers=4)
    failed = [(r.task_id, r.reason) for r in results if not r.passed]
    assert len(results) == 164 and not failed


def test_empty_and_wrong_completions_fail():
    assert run("").status == "failed"
    wrong = P0["prompt"] + "    return False\n"
    result = run(wrong)
    assert result.status == "failed" and "AssertionError" in result.reason
    assert run(CORRECT).passed


@pytest.fixture
def canary(tmp_path):
    """Canary files in a normal (0755/0644) directory outside /tmp and inside /tmp."""
    outside = Path.cwd() / f".canary-{os.getpid()}"
    outside.mkdir(mode=0o755)
    (outside / "keep.txt").write_text("alive")
    (outside / "keep.txt").chmod(0o644)
    inside = tmp_path / "keep.txt"
    inside.write_text("alive")
    yield outside, inside
    for f in outside.iterdir():
        f.unlink()
    outside.rmdir()


HOSTILE = {
    "infinite loop": "while True:\n    pass\n",
    "memory bomb": "x = bytearray(16 * 1024 ** 3)\n",
    "fork bomb": "import os\nwhile True:\n    try:\n        os.fork()\n    except OSError:\n        pass\n",
    "exit(0) before tests": "import sys\nsys.exit(0)\n",
    "os._exit(0) before tests": "import os\nos._exit(0)\n",
    "redefine check": "def check(candidate):\n    return True\n"
    "def has_close_elements(numbers, threshold):\n    return None\n"
    "import builtins\nbuiltins.check = check\n",
    "print 100 MB": "import sys\nsys.stdout.write('x' * 100_000_000)\n",
    "kill the parent": "import os, signal\nos.kill(os.getppid(), signal.SIGKILL)\n",
    "kill everything": "import os, signal\nos.kill(-1, signal.SIGKILL)\n",
}


@pytest.mark.parametrize("name", list(HOSTILE))
def test_hostile_completion_fails_and_host_survives(name, canary):
    result = run(HOSTILE[name])
    assert result.status in ("failed", "timed out"), result
    outside, inside = canary
    assert (outside / "keep.txt").read_text() == "alive"
    assert inside.read_text() == "alive"
    assert not sandbox_uid_processes()


def test_cannot_delete_or_write_outside_its_directory(canary):
    outside, inside = canary
    escape = Path("/tmp") / f"icl-escape-{os.getpid()}"
    completion = (
        "import os, shutil\n"
        f"os.system('rm -rf {outside} {inside.parent} ~ 2>/dev/null')\n"
        f"shutil.rmtree({str(outside)!r}, ignore_errors=True)\n"
        "for path in [%r, %r, %r]:\n"
        "    try:\n"
        "        open(path, 'w').write('pwned')\n"
        "    except OSError:\n"
        "        pass\n" % (str(outside / "new.txt"), str(escape), str(inside)) + CORRECT
    )
    result = run(completion)
    assert (outside / "keep.txt").read_text() == "alive"
    assert inside.read_text() == "alive"
    assert not (outside / "new.txt").exists()
    assert not escape.exists()
    assert result.status in ("passed", "failed")  # the tests themselves may run; the host is what matters


def test_cannot_read_parent_secrets(monkeypatch):
    monkeypatch.setenv("ICL_TEST_SECRET", "s3cr3t-value")
    completion = (
        "import os\n"
        "print(os.environ.get('ICL_TEST_SECRET'))\n"
        "for pid in (os.getppid(), 1):\n"
        "    try:\n"
        "        print(open(f'/proc/{pid}/environ').read())\n"
        "    except OSError as e:\n"
        "        print('denied', e)\n" + CORRECT
    )
    result = run(completion)
    assert "s3cr3t-value" not in result.stdout + result.stderr
    assert result.passed  # isolation does not stop honest code


def test_no_network():
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(1)
    server.settimeout(5)
    port = server.getsockname()[1]
    accepted = []

    def accept():
        with contextlib.suppress(OSError):
            accepted.append(server.accept())

    thread = threading.Thread(target=accept)
    thread.start()
    completion = (
        f"import socket\ns = socket.create_connection(('127.0.0.1', {port}), timeout=1)\ns.sendall(b'leak')\n" + CORRECT
    )
    result = run(completion)
    server.close()
    thread.join()
    assert result.status == "failed"
    if os.geteuid() == 0:  # as root the sample gets its own network namespace: loopback is not the host's
        assert not accepted


def test_other_samples_unaffected_by_a_fork_bomb():
    samples = [{"task_id": "HumanEval/0", "completion": HOSTILE["fork bomb"]}] + [
        {"task_id": k, "completion": PROBLEMS[k]["prompt"] + PROBLEMS[k]["canonical_solution"]}
        for k in ("HumanEval/1", "HumanEval/2", "HumanEval/3")
    ]
    results = score_samples(samples, PROBLEMS, workers=2)
    assert results[0].status in ("failed", "timed out")
    assert all(r.passed for r in results[1:])


def test_isolation_levels_reported():
    result = run(CORRECT)
    if os.geteuid() == 0:
        assert result.isolation == ["uid", "network", "filesystem"]
