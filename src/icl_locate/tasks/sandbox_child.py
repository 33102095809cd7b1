"""Sandbox launcher: sets up isolation, then execs the interpreter on the program from stdin.

Run as ``python -I sandbox_child.py CONFIG_JSON`` by ``sandbox.py`` (never imported; stdlib
only, so nothing from the project or site-packages is loaded before the exec). Why a separate
process instead of ``preexec_fn``: the host may be multi-threaded (torch), and forking a
threaded process then running Python code before exec can deadlock.

As root: new network and mount namespaces, private tmpfs on /tmp, /var/tmp and /dev/shm, a
fresh working directory, resource limits, then a drop to a dedicated unprivileged uid (so the
completion cannot touch the host's files or processes). Not root: new user+network+mount
namespaces where the kernel allows them (tmpfs over /tmp and $HOME), and resource limits.
Mode ``{"kill_uid": N}`` kills every process of uid N (used after each sample).
"""

import ctypes
import json
import os
import resource
import signal
import sys
import time

CLONE_NEWNS, CLONE_NEWUSER, CLONE_NEWNET = 0x00020000, 0x10000000, 0x40000000
MS_REC, MS_PRIVATE = 0x4000, 1 << 18

_libc = ctypes.CDLL(None, use_errno=True)


def _check(ret, what):
    if ret != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"{what}: {os.strerror(err)}")


def _mount_tmpfs(path, size_mb):
    if os.path.isdir(path):
        _check(
            _libc.mount(b"tmpfs", path.encode(), b"tmpfs", 0, f"size={size_mb}m,mode=1777".encode()),
            f"mount tmpfs {path}",
        )


def _isolate_as_root(cfg):
    _check(_libc.unshare(CLONE_NEWNET | CLONE_NEWNS), "unshare")
    _check(_libc.mount(b"none", b"/", None, MS_REC | MS_PRIVATE, None), "make / private")
    for path in ("/tmp", "/var/tmp", "/dev/shm"):
        _mount_tmpfs(path, cfg["tmpfs_mb"])
    work = "/tmp/work"
    os.mkdir(work, 0o700)
    os.chown(work, cfg["uid"], cfg["uid"])
    return work, ["uid", "network", "filesystem"]


def _isolate_unprivileged(cfg):
    levels = []
    try:
        uid, gid = os.getuid(), os.getgid()
        _check(_libc.unshare(CLONE_NEWUSER | CLONE_NEWNET | CLONE_NEWNS), "unshare")
        with open("/proc/self/setgroups", "w") as f:
            f.write("deny")
        with open("/proc/self/uid_map", "w") as f:
            f.write(f"{uid} {uid} 1")
        with open("/proc/self/gid_map", "w") as f:
            f.write(f"{gid} {gid} 1")
        _check(_libc.mount(b"none", b"/", None, MS_REC | MS_PRIVATE, None), "make / private")
        for path in ("/tmp", "/var/tmp", "/dev/shm", os.path.expanduser("~")):
            _mount_tmpfs(path, cfg["tmpfs_mb"])
        levels = ["network", "filesystem"]
    except OSError:
        pass  # the kernel forbids unprivileged namespaces: resource limits only
    work = f"/tmp/icl-sandbox-{os.getpid()}"
    os.mkdir(work, 0o700)
    return work, levels


def _limit(cfg):
    cpu = int(cfg["cpu_seconds"])
    resource.setrlimit(resource.RLIMIT_CPU, (cpu, cpu + 1))
    resource.setrlimit(resource.RLIMIT_AS, (cfg["memory_mb"] << 20,) * 2)
    resource.setrlimit(resource.RLIMIT_FSIZE, (cfg["file_mb"] << 20,) * 2)
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
    resource.setrlimit(resource.RLIMIT_NOFILE, (64, 64))
    if cfg.get("uid") is not None:  # per-uid count: only meaningful for our dedicated uid
        resource.setrlimit(resource.RLIMIT_NPROC, (cfg["max_processes"],) * 2)


def main():
    cfg = json.loads(sys.argv[1])
    if "kill_uid" in cfg:
        os.setgroups([])
        os.setgid(cfg["kill_uid"])
        os.setuid(cfg["kill_uid"])
        # every process this uid may signal: its own. Repeat, since a fork bomb forks while we kill.
        for _ in range(100):
            try:
                os.kill(-1, signal.SIGKILL)
            except ProcessLookupError:
                break
            time.sleep(0.005)
        return
    if cfg.get("uid") is not None:
        work, levels = _isolate_as_root(cfg)
    else:
        work, levels = _isolate_unprivileged(cfg)
    os.chdir(work)
    _limit(cfg)
    if cfg.get("uid") is not None:
        os.setgroups([])
        os.setgid(cfg["uid"])
        os.setuid(cfg["uid"])
    os.write(cfg["status_fd"], ("isolation:" + ",".join(levels) + "\n").encode())
    env = {"PATH": "/usr/bin:/bin", "HOME": work, "TMPDIR": work, "LANG": "C.UTF-8"}
    os.execve(cfg["python"], [cfg["python"], "-I", "-S", "-"], env)


if __name__ == "__main__":
    main()
