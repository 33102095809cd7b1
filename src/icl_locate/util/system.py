"""The machine, read in one place: process and device memory, the CPU and what its speed depends on (Linux
``/proc``; CUDA through torch)."""

from __future__ import annotations

import ctypes
import functools
import gc
import math
import os
import platform
import subprocess
import sys
from collections.abc import Callable
from typing import TypeVar

import psutil

try:
    import resource  # Unix only; the fallback of process_peak_mb reads it
except ImportError:  # Windows
    resource = None

import torch


def _proc_kb(path: str, field: str) -> int | None:
    """A ``Field:   N kB`` line of a /proc file, in kB (None where there is no /proc)."""
    try:
        with open(path) as f:
            for line in f:
                if line.startswith(field):
                    return int(line.split()[1])
    except OSError:
        pass
    return None


def reset_peak_rss() -> None:
    """Linux: reset the process's peak resident set size (VmHWM), so a phase can be measured alone."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass


def peak_rss_mb() -> float | None:
    """Peak resident set size since the last reset (Linux VmHWM), in MB."""
    kb = _proc_kb("/proc/self/status", "VmHWM:")
    return None if kb is None else kb / 1024


def process_peak_mb(read_peaks: list[float | None]) -> float:
    """The process's peak RSS in MB, where it may have been reset: the largest of ``peak_rss_mb`` read before
    each reset and at the end, or, where there is no /proc to read or reset it, the kernel's lifetime maximum
    (``ru_maxrss``: kB on Linux, bytes on macOS); NaN where neither can be read (Windows without readings)."""
    if None not in read_peaks or resource is None:
        return max((p for p in read_peaks if p is not None), default=float("nan"))
    maxrss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return maxrss / 2**20 if sys.platform == "darwin" else maxrss / 1024


def current_rss_mb() -> float | None:
    """Resident set size now (Linux VmRSS), in MB."""
    kb = _proc_kb("/proc/self/status", "VmRSS:")
    return None if kb is None else kb / 1024


def return_free_memory(gpu_cache: bool = True) -> None:
    """Hand back to the system the memory this process freed: glibc keeps freed heap memory for reuse, and
    after a unit of decoding that is often gigabytes (every batch's activations and KV caches) that the
    process would keep resident, and a measurement of the next phase would start from; with ``gpu_cache``,
    also the blocks torch's allocator keeps cached on a GPU (not where a timed run follows: it would pay for
    them again, and torch's allocated-memory figures leave them out anyway). Where the C library is not
    glibc, only the GPU's cache is emptied."""
    gc.collect()  # tensors held only by reference cycles go first
    if gpu_cache and torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.empty_cache()
    trim = _malloc_trim()
    if trim is not None:
        trim(0)


@functools.cache
def _malloc_trim():
    """glibc's ``malloc_trim`` (None elsewhere: musl, macOS, Windows)."""
    try:
        return ctypes.CDLL(None).malloc_trim
    except (AttributeError, OSError, TypeError):  # TypeError: Windows has no handle for the running program
        return None


def available_memory(device: torch.device) -> int:
    """Bytes free for new tensors: on a GPU its free memory and what torch's allocator keeps cached (freed
    blocks it hands out again, which the device counts as used; fragments of them may not fit a large tensor,
    which the fractions callers take leave room for); on a CPU the system's available memory (Linux's
    MemAvailable, elsewhere psutil's), bounded by what this process's memory cgroups leave it
    (``cgroup_headroom``: a container's or a batch job's limit, which MemAvailable, counting the whole
    host, does not see; past it the kernel kills the process)."""
    if device.type == "cuda":  # the device's free memory and the blocks torch's allocator holds free
        return (
            torch.cuda.mem_get_info(device)[0]
            + torch.cuda.memory_reserved(device)
            - torch.cuda.memory_allocated(device)
        )
    free = meminfo_available()
    free = free if free is not None else psutil.virtual_memory().available
    headroom = cgroup_headroom()
    return free if headroom is None else min(free, headroom)


def use_device(device: str) -> None:
    """Make a GPU named with its index (``cuda:1``) the current one: what ``torch.cuda.synchronize``,
    ``empty_cache`` and the timings' synchronisation act on when given no device."""
    place = torch.device(device)
    if place.type == "cuda" and place.index is not None and torch.cuda.is_available():
        torch.cuda.set_device(place)


def meminfo_available() -> int | None:
    """Linux's MemAvailable, in bytes (None where there is no /proc/meminfo)."""
    kb = _proc_kb("/proc/meminfo", "MemAvailable:")
    return None if kb is None else kb * 1024


CGROUP_ROOT = "/sys/fs/cgroup"
T = TypeVar("T", int, float)  # a limit read from a cgroup: bytes or CPUs
THREAD_SETTINGS = ("OMP_NUM_THREADS", "MKL_NUM_THREADS")  # a thread count set by the user: kept as set
# cgroup v1 writes "no limit" as the largest page-aligned 64-bit number; anything from 2^62 on is no limit
CGROUP_V1_UNLIMITED = 2**62
# The files a memory cgroup's limits, usage and reclaimable page cache are read from, by cgroup version: usage
# counts the page cache too, whose inactive part the kernel drops before it kills (as container runtimes count);
# v2's memory.high is a limit too: above it the kernel throttles the process, reclaiming hard
CGROUP_FILES = {
    2: (("memory.max", "memory.high"), "memory.current", "inactive_file"),
    1: (("memory.limit_in_bytes",), "memory.usage_in_bytes", "total_inactive_file"),
}


def cgroup_headroom(root: str = CGROUP_ROOT, membership: str | None = None) -> int | None:
    """Bytes this process may still take before one of its memory cgroups reaches its limit: the least, over
    its cgroup and each ancestor up to ``root`` (v2, and v1's memory controller), of limit - (usage - inactive
    page cache); None where none sets a limit or none can be read (not Linux). ``membership``: the text of
    /proc/self/cgroup (read where None); a cgroup missing under ``root`` (a container sees its own as the
    root) is skipped."""
    return _tightest("memory", _headroom, root, membership)


def cpu_quota(root: str = CGROUP_ROOT, membership: str | None = None) -> float | None:
    """The CPUs this process's cgroups let it use (quota / period), the least over its cgroup and each ancestor
    (v2 ``cpu.max``, v1 ``cpu.cfs_quota_us`` / ``cpu.cfs_period_us``); None where none sets a quota. A container's
    ``--cpus`` and a batch job's CPU limit are such quotas; ``membership`` as in ``cgroup_headroom``."""
    return _tightest("cpu", _quota, root, membership)


def usable_cpus() -> int:
    """The CPUs this process may run on (its affinity, where the OS has one), no more than its CPU quota
    allows (``cpu_quota``, rounded up: half a CPU's quota more is worth a thread, a whole one less is not;
    the README has the measurements)."""
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    quota = cpu_quota()
    return max(1, min(cpus, math.ceil(quota))) if quota is not None else cpus


def fit_threads_to_cpu_quota() -> None:
    """Lower torch's CPU threads to ``usable_cpus`` where a CPU quota is set, unless OMP_NUM_THREADS or
    MKL_NUM_THREADS is (``THREAD_SETTINGS``): torch starts a thread per core it may run on, quota or not, and
    threads beyond the quota are throttled in turn, each stalling the others at every barrier of a product.
    A count set in code (``torch.set_num_threads``) above the quota is lowered too; never raised."""
    if cpu_quota() is None or any(os.environ.get(name) for name in THREAD_SETTINGS):
        return
    threads = usable_cpus()
    if torch.get_num_threads() > threads:
        torch.set_num_threads(threads)


def cgroup_folders(controller: str, root: str = CGROUP_ROOT, membership: str | None = None) -> list[tuple[str, int]]:
    """The folders of this process's cgroups of ``controller`` ("memory", "cpu") and of their ancestors, with
    their cgroup version, from /proc/self/cgroup's ``id:controllers:path`` lines (v2: ``0::path``; v1: the
    hierarchy mounted under the name of its controllers, e.g. ``cpu,cpuacct``)."""
    if membership is None:
        membership = _read("/proc/self/cgroup") or ""
    folders = []
    for line in membership.splitlines():
        parts = line.strip().split(":", 2)
        if len(parts) != 3:
            continue
        hierarchy, controllers, path = parts
        if hierarchy == "0" and not controllers:
            base, version = root, 2
        elif controller in controllers.split(","):
            base, version = os.path.join(root, controllers), 1
        else:
            continue
        names = [name for name in path.split("/") if name]
        if ".." in names:  # a cgroup outside this namespace's root: only the root is ours to read
            names = []
        folders += [(os.path.join(base, *names[:depth]), version) for depth in range(len(names), -1, -1)]
    return folders


def _tightest(controller: str, read: Callable[[str, int], T | None], root: str, membership: str | None) -> T | None:
    """The least of ``read(folder, version)`` over this process's cgroups of ``controller`` and their ancestors
    (``cgroup_folders``), those that set a limit; None where none does."""
    limits = [read(folder, version) for folder, version in cgroup_folders(controller, root, membership)]
    return min((limit for limit in limits if limit is not None), default=None)


def _quota(folder: str, version: int) -> float | None:
    """quota / period of the cpu cgroup in ``folder``; None where it sets none or its files cannot be read."""
    if version == 2:
        quota, _, period = (_read(os.path.join(folder, "cpu.max")) or "").partition(" ")
    else:
        quota, period = (_read(os.path.join(folder, f"cpu.cfs_{name}_us")) or "" for name in ("quota", "period"))
    if not quota.isdigit() or not period.isdigit() or int(period) == 0:
        return None  # "max", -1 (no quota) or no such cgroup here
    return int(quota) / int(period)


def _headroom(folder: str, version: int) -> int | None:
    """The least limit (``CGROUP_FILES``) - (usage - inactive page cache) of the memory cgroup in ``folder`` (0 at
    least); None where it sets no limit or its files cannot be read."""
    limit_files, usage_file, inactive_field = CGROUP_FILES[version]
    texts = [_read(os.path.join(folder, name)) for name in limit_files]
    limits = [int(text) for text in texts if text is not None and text.isdigit()]  # "max": no limit
    limits = [limit for limit in limits if version == 2 or limit < CGROUP_V1_UNLIMITED]
    usage = _read(os.path.join(folder, usage_file))
    if not limits or usage is None or not usage.isdigit():
        return None  # no limit, or no such cgroup here
    stat = (line.split() for line in (_read(os.path.join(folder, "memory.stat")) or "").splitlines())
    inactive = next((int(fields[1]) for fields in stat if len(fields) == 2 and fields[0] == inactive_field), 0)
    return max(0, min(limits) - max(0, int(usage) - inactive))


def _read(path: str) -> str | None:
    """A small text file's stripped contents (None where it cannot be read)."""
    try:
        with open(path) as f:
            return f.read().strip()
    except OSError:
        return None


# The CPU features that decide which of torch's kernels run fast, as /proc/cpuinfo names them (x86 "flags", ARM
# "Features"): the vector width of fp32 products (avx2, avx512f; ARM sve), bf16 products (avx512_bf16, amx_bf16;
# ARM bf16), int8 products (avx512_vnni, avx_vnni, amx_int8; ARM asimddp, i8mm) and fp16 ones (avx512_fp16,
# amx_fp16; ARM fphp). A VM's model name is often generic ("Intel(R) Xeon(R) Processor"), and the same name
# covers CPUs with and without fast bf16, so these are part of what a calibration is kept for.
SPEED_FLAGS = (
    "avx2",
    "avx512f",
    "avx512_bf16",
    "avx512_vnni",
    "avx_vnni",
    "avx512_fp16",
    "amx_bf16",
    "amx_int8",
    "amx_fp16",
    "asimddp",
    "i8mm",
    "bf16",
    "fphp",
    "sve",
)
# Settings that change which kernels torch's products run on the CPU: less of the instruction set than the CPU has
# (``ATEN_CPU_CAPABILITY`` shows in torch's CPU capability; oneDNN's, MKL's, FBGEMM's and OpenBLAS's do not show
# anywhere else, yet change bf16 and int8 speed), or fp32 products computed in lower precision (oneDNN's fpmath mode)
ISA_SETTINGS = (
    "ATEN_CPU_CAPABILITY",
    "ONEDNN_MAX_CPU_ISA",
    "DNNL_MAX_CPU_ISA",
    "ONEDNN_DEFAULT_FPMATH_MODE",
    "MKL_ENABLE_INSTRUCTIONS",
    "MKL_CBWR",
    "MKL_DEBUG_CPU_TYPE",
    "OPENBLAS_CORETYPE",
    "FBGEMM_ENABLE_INSTRUCTIONS",
)


def cpu_description(cpuinfo: str | None = None) -> dict:
    """The CPU: its marketing name (``model``), what identifies its design (``id``: x86 vendor, family, model
    and stepping; ARM implementer and part) and which ``SPEED_FLAGS`` it has (``flags``, in that order).
    ``cpuinfo``: the text of Linux ``/proc/cpuinfo`` (read where None: on macOS sysctl's, elsewhere what
    ``platform`` knows)."""
    if cpuinfo is None:
        cpuinfo = _cpuinfo()
    fields: dict[str, str] = {}
    for line in cpuinfo.splitlines():  # each field's first value: the first core's (ARM boards name the model last)
        name, _, value = line.partition(":")
        fields.setdefault(name.strip(), value.strip())
    model = fields.get("model name") or fields.get("Model") or fields.get("Hardware")
    model = model or platform.processor() or platform.machine() or "unknown CPU"
    if "vendor_id" in fields:
        parts = [
            fields["vendor_id"],
            fields.get("cpu family", "?"),
            fields.get("model", "?"),
            fields.get("stepping", "?"),
        ]
        design = "{} {}/{}/{}".format(*parts)
    elif "CPU implementer" in fields:
        design = f"ARM implementer {fields['CPU implementer']} part {fields.get('CPU part', '?')}"
    else:
        design = platform.machine() or "unknown"
    present = set((fields.get("flags") or fields.get("Features") or "").split())
    return dict(model=model, id=design, flags=[flag for flag in SPEED_FLAGS if flag in present])


@functools.cache
def _cpuinfo() -> str:
    """``read_cpuinfo``, once (long on a large host; the CPU does not change)."""
    return read_cpuinfo()


def read_cpuinfo(path: str = "/proc/cpuinfo", platform_name: str = sys.platform) -> str:
    """Linux's /proc/cpuinfo; on macOS the same fields from ``sysctl`` (``sysctl_cpuinfo``); "" elsewhere."""
    try:
        with open(path) as f:
            return f.read()
    except OSError:
        pass
    if platform_name != "darwin":
        return ""
    try:
        done = subprocess.run(["sysctl", *SYSCTL_NAMES], capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return ""
    return sysctl_cpuinfo(done.stdout)  # what it printed, whatever its exit status (a name it did not know)


# What macOS's sysctl says of the CPU: its name, its design (an Intel Mac: vendor, family, model and stepping; Apple
# silicon: ``hw.cpufamily``, one number per core design) and its features (``hw.optional``: 1 where present),
# named as /proc/cpuinfo names them (``SPEED_FLAGS``)
SYSCTL_DESIGN = {
    "machdep.cpu.vendor": "vendor_id",
    "machdep.cpu.family": "cpu family",
    "machdep.cpu.model": "model",
    "machdep.cpu.stepping": "stepping",
}
# nodes every Mac has, each printing its subtree (an older sysctl stops at the first name it does not know)
SYSCTL_NAMES = ("machdep.cpu", "hw.cpufamily", "hw.optional")
SYSCTL_FLAGS = {
    "hw.optional.arm.FEAT_DotProd": "asimddp",
    "hw.optional.arm.FEAT_I8MM": "i8mm",
    "hw.optional.arm.FEAT_BF16": "bf16",
    "hw.optional.arm.FEAT_FP16": "fphp",
    "hw.optional.avx2_0": "avx2",
    "hw.optional.avx512f": "avx512f",
}


def sysctl_cpuinfo(text: str) -> str:
    """``sysctl``'s ``name: value`` lines (``SYSCTL_NAMES``) as the /proc/cpuinfo fields ``cpu_description``
    reads: ``model name``, ``flags`` and the design (x86 fields, or Apple silicon's as an implementer and part)."""
    values = dict(line.split(": ", 1) for line in text.splitlines() if ": " in line)
    flags = [flag for name, flag in SYSCTL_FLAGS.items() if values.get(name, "").strip() == "1"]
    lines = [f"model name\t: {values.get('machdep.cpu.brand_string', '').strip()}", f"flags\t\t: {' '.join(flags)}"]
    if "machdep.cpu.vendor" in values:  # an Intel Mac
        lines += [f"{field}\t: {values.get(name, '?').strip()}" for name, field in SYSCTL_DESIGN.items()]
    elif "hw.cpufamily" in values:
        lines += ["CPU implementer\t: Apple", f"CPU part\t: cpufamily {values['hw.cpufamily'].strip()}"]
    return "\n".join(lines) + "\n"


def isa_settings() -> dict[str, str]:
    """The ``ISA_SETTINGS`` set in this process's environment."""
    return {name: os.environ[name] for name in ISA_SETTINGS if os.environ.get(name)}


def hardware(device: torch.device | str) -> dict:
    """What the speed of this run depends on: the CPU (model name, design, speed-relevant features), the
    instruction set torch's CPU kernels dispatch to and the settings that lower it, the precision fp32
    products may drop to, the GPU in use, the thread count and the cgroup's CPU quota (None: none)."""
    device = torch.device(device)
    gpu = torch.cuda.get_device_name(device) if device.type == "cuda" else None
    cpu = cpu_description()
    return dict(
        cpu=cpu["model"],
        cpu_id=cpu["id"],
        cpu_flags=cpu["flags"],
        cpu_capability=torch.backends.cpu.get_cpu_capability(),
        isa_settings=isa_settings(),
        # "high" / "medium" let fp32 products run in TF32 or bf16 (set by a user's code, never by ours)
        fp32_matmul_precision=torch.get_float32_matmul_precision(),
        onednn_fp32_precision=getattr(getattr(torch.backends.mkldnn, "matmul", None), "fp32_precision", None),
        gpu=gpu,
        threads=torch.get_num_threads(),
        cpu_quota=cpu_quota(),  # the CPUs a cgroup lets this process use (None: no quota)
        device=str(device),
        torch=torch.__version__,
    )


def hardware_line(info: dict) -> str:
    """One line naming the machine (for logs and reports)."""
    gpu = f"GPU {info['gpu']}" if info.get("gpu") else "no GPU"
    design = ", ".join(filter(None, [info.get("cpu_id"), " ".join(info.get("cpu_flags") or [])]))
    settings = "".join(f", {name}={value}" for name, value in (info.get("isa_settings") or {}).items())
    if info.get("fp32_matmul_precision", "highest") != "highest":
        settings += f", fp32 matmul precision {info['fp32_matmul_precision']}"
    if info.get("onednn_fp32_precision") not in (None, "none", "ieee"):
        settings += f", oneDNN fp32 precision {info['onednn_fp32_precision']}"
    cpu = f"{info['cpu']} [{design}]" if design else info["cpu"]
    quota = f", CPU quota {info['cpu_quota']:g}" if info.get("cpu_quota") else ""
    threads = f"{info['threads']} thread{'s' if info['threads'] != 1 else ''}"
    return f"{cpu} (torch CPU capability {info['cpu_capability']}{settings}, {threads}{quota}), {gpu}"
