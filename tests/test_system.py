"""The machine's description: what a calibration is kept for and what every figure is reported beside."""

from __future__ import annotations

import ctypes
import subprocess
import sys

import psutil
import pytest
import torch

from conftest import tiny
from icl_locate.engines.calibrate import Calibrator
from icl_locate.util import system

SAPPHIRE_RAPIDS_VM = """processor\t: 0
vendor_id\t: GenuineIntel
cpu family\t: 6
model\t\t: 167
model name\t: Intel(R) Xeon(R) Processor
stepping\t: 1
flags\t\t: fpu sse2 avx2 fma avx512f avx512bw avx_vnni avx512_bf16 amx_bf16 avx512_vnni avx512_fp16 amx_tile amx_int8

processor\t: 1
vendor_id\t: GenuineIntel
model name\t: the first core's name is taken
"""
SKYLAKE_VM = (
    SAPPHIRE_RAPIDS_VM.replace("167", "85")
    .replace(" avx_vnni avx512_bf16 amx_bf16 avx512_vnni", "")
    .replace(" avx512_fp16 amx_tile amx_int8", "")
)
MASKED_VM = SAPPHIRE_RAPIDS_VM.replace(" avx512_bf16 amx_bf16", "").replace(" amx_tile amx_int8", "")
DESCRIBE = system.cpu_description  # the real parser (the tests replace what the machine reads)
GRAVITON = """processor\t: 0
BogoMIPS\t: 2100.00
Features\t: fp asimd aes asimddp sha512 sve i8mm bf16 svebf16
CPU implementer\t: 0x41
CPU architecture: 8
CPU part\t: 0xd40
"""
BOARD = GRAVITON + "\nHardware\t: BCM2835\nModel\t: Raspberry Pi 4 Model B Rev 1.4\n"  # the model after the cores


def test_the_cpu_is_described_by_its_design_and_speed_features():
    intel = system.cpu_description(SAPPHIRE_RAPIDS_VM)
    assert intel["model"] == "Intel(R) Xeon(R) Processor"
    assert intel["id"] == "GenuineIntel 6/167/1"
    assert intel["flags"] == [
        "avx2",
        "avx512f",
        "avx512_bf16",
        "avx512_vnni",
        "avx_vnni",
        "avx512_fp16",
        "amx_bf16",
        "amx_int8",
    ]
    older = system.cpu_description(SKYLAKE_VM)  # the same model name, no bf16 or int8 units
    assert older["model"] == intel["model"] and older["flags"] == ["avx2", "avx512f"] and older["id"] != intel["id"]
    arm = system.cpu_description(GRAVITON)
    assert arm["id"] == "ARM implementer 0x41 part 0xd40"
    assert arm["flags"] == ["asimddp", "i8mm", "bf16", "sve"]  # svebf16 is not bf16
    assert DESCRIBE(BOARD)["model"] == "Raspberry Pi 4 Model B Rev 1.4"
    assert system.cpu_description("")["flags"] == []


APPLE_M2 = """machdep.cpu.brand_string: Apple M2 Pro
hw.cpufamily: -634136515
hw.optional.arm.FEAT_BF16: 1
hw.optional.arm.FEAT_I8MM: 1
hw.optional.arm.FEAT_DotProd: 1
hw.optional.arm.FEAT_FP16: 1
hw.optional.arm.FEAT_SME: 0
hw.optional.neon: 1
"""
INTEL_MAC = """machdep.cpu.brand_string: Intel(R) Core(TM) i9-9880H CPU @ 2.30GHz
machdep.cpu.vendor: GenuineIntel
machdep.cpu.family: 6
machdep.cpu.model: 158
machdep.cpu.stepping: 13
hw.cpufamily: 260141638
hw.optional.avx2_0: 1
hw.optional.avx512f: 0
"""


def test_a_mac_is_described_from_sysctl_as_linux_describes_it_from_cpuinfo():
    """macOS has no /proc/cpuinfo: the name, design and features come from sysctl (one M1 and one M3 must not
    share a calibration, nor an Intel Mac with and without AVX-512)."""
    m2 = system.cpu_description(system.sysctl_cpuinfo(APPLE_M2))
    assert m2 == dict(
        model="Apple M2 Pro",
        id="ARM implementer Apple part cpufamily -634136515",
        flags=["asimddp", "i8mm", "bf16", "fphp"],
    )
    m1 = system.cpu_description(
        system.sysctl_cpuinfo(
            APPLE_M2.replace("M2 Pro", "M1").replace("-634136515", "458787763").replace("FEAT_BF16: 1", "FEAT_BF16: 0")
        )
    )
    assert m1["id"] != m2["id"] and "bf16" not in m1["flags"]
    intel = system.cpu_description(system.sysctl_cpuinfo(INTEL_MAC))
    assert intel["id"] == "GenuineIntel 6/158/13" and intel["flags"] == ["avx2"]


def test_on_macos_the_cpu_is_read_from_sysctl_whatever_its_exit_status(monkeypatch, tmp_path):
    """No /proc/cpuinfo: ``sysctl`` asked for nodes every Mac has; what it printed counts even where it exits
    non-zero (a newer sysctl warns about a name it does not know and goes on)."""
    asked = []

    def sysctl(argv, **kwargs):
        asked.append(argv)
        return subprocess.CompletedProcess(argv, 1, stdout=APPLE_M2, stderr="sysctl: unknown oid")

    monkeypatch.setattr(system.subprocess, "run", sysctl)
    text = system.read_cpuinfo(str(tmp_path / "no-cpuinfo"), "darwin")
    assert asked == [["sysctl", "machdep.cpu", "hw.cpufamily", "hw.optional"]]
    assert system.cpu_description(text)["flags"] == ["asimddp", "i8mm", "bf16", "fphp"]
    assert system.read_cpuinfo(str(tmp_path / "no-cpuinfo"), "win32") == ""  # elsewhere: what platform knows
    assert len(asked) == 1


def test_the_machine_line_names_the_design_and_the_settings_that_lower_the_instruction_set(monkeypatch):
    monkeypatch.setattr(system, "cpu_description", lambda: DESCRIBE(SAPPHIRE_RAPIDS_VM))
    for name in system.ISA_SETTINGS:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", "AVX2")
    info = system.hardware("cpu")
    assert info["isa_settings"] == {"ONEDNN_MAX_CPU_ISA": "AVX2"}
    line = system.hardware_line(info)
    assert line.startswith("Intel(R) Xeon(R) Processor [GenuineIntel 6/167/1, avx2 avx512f avx512_bf16 ")
    assert ", ONEDNN_MAX_CPU_ISA=AVX2, " in line and line.endswith("threads), no GPU")
    assert "precision" not in line  # torch's default, "highest"
    monkeypatch.setattr(torch, "get_float32_matmul_precision", lambda: "medium")
    assert ", fp32 matmul precision medium, " in system.hardware_line(system.hardware("cpu"))
    # a record written before the design was kept still reads
    old = {k: info[k] for k in ("cpu", "cpu_capability", "threads", "gpu")}
    assert system.hardware_line(
        old
    ) == f"Intel(R) Xeon(R) Processor (torch CPU capability {info['cpu_capability']}, " + (
        f"{info['threads']} threads), no GPU"
    )


@pytest.mark.parametrize(
    "change",
    [
        lambda mp: mp.setattr(system, "cpu_description", lambda: DESCRIBE(SKYLAKE_VM)),
        lambda mp: mp.setattr(system, "cpu_description", lambda: DESCRIBE(MASKED_VM)),
        lambda mp: mp.setenv("ONEDNN_MAX_CPU_ISA", "AVX2"),
        lambda mp: mp.setenv("MKL_ENABLE_INSTRUCTIONS", "AVX2"),
        lambda mp: mp.setenv("ONEDNN_DEFAULT_FPMATH_MODE", "BF16"),
        lambda mp: mp.setattr(torch, "get_float32_matmul_precision", lambda: "high"),
    ],
    ids=[
        "another CPU of the same name",
        "bf16 and AMX hidden by the hypervisor",
        "oneDNN lowered",
        "MKL lowered",
        "fp32 products in bf16",
        "fp32 products in TF32 (torch's setting)",
    ],
)
def test_a_calibration_is_kept_for_the_cpu_design_and_the_instruction_set_settings(change, monkeypatch, tmp_path):
    lm = tiny("llama")
    monkeypatch.setattr(system, "cpu_description", lambda: DESCRIBE(SAPPHIRE_RAPIDS_VM))
    for name in system.ISA_SETTINGS:
        monkeypatch.delenv(name, raising=False)
    calibrator = Calibrator(lm.model, lm.tokenizer, cache=tmp_path)
    here = calibrator.identity(None)
    assert calibrator.identity(None) == here
    change(monkeypatch)
    assert calibrator.identity(None) != here


HEAP_HELD = """
import ctypes
from icl_locate.util import system
libc = ctypes.CDLL(None)
libc.mallopt(-3, 4 * 2**20)  # M_MMAP_THRESHOLD: 1 MB blocks from the heap, as glibc's dynamic threshold makes them
libc.mallopt(-1, 2**30)  # M_TRIM_THRESHOLD: no trimming on free, as a long-running process sees it
blocks = [ctypes.create_string_buffer(2**20) for _ in range(256)]  # 256 MB, touched (zeroed)
del blocks[:-1]  # all but the last block: the heap's top stays in use, free() cannot shrink it
held = system.current_rss_mb()
system.return_free_memory()
print(held - system.current_rss_mb())
"""


def test_memory_freed_inside_the_heap_is_handed_back():
    """glibc keeps freed blocks below its mmap threshold in the heap, resident; ``return_free_memory`` hands
    their pages back (what a worker does after each unit). In a process of its own: the allocator's settings
    it changes would stay."""
    if system.current_rss_mb() is None or not hasattr(ctypes.CDLL(None), "malloc_trim"):
        pytest.skip("needs Linux's /proc and glibc")
    handed_back = subprocess.run([sys.executable, "-c", HEAP_HELD], capture_output=True, text=True, check=True)
    assert float(handed_back.stdout) > 128  # MB of the 255 freed


def test_the_process_peak_is_the_largest_peak_read_between_resets():
    assert system.process_peak_mb([300.0, 900.0, 400.0, 450.0]) == 900.0
    now = system.current_rss_mb()
    if now is not None:  # no reading (no /proc): the kernel's maximum, in MB (it lags the current RSS a little)
        assert system.process_peak_mb([300.0, None]) >= 0.9 * now > 10


def cgroup_tree(root, folders: dict[str, dict[str, str]]) -> str:
    """Memory cgroup files under ``root`` (folder -> file -> text), as the kernel shows them."""
    for folder, files in folders.items():
        (root / folder).mkdir(parents=True, exist_ok=True)
        for name, text in files.items():
            (root / folder / name).write_text(text + "\n")
    return str(root)


GIB = 2**30


def test_a_memory_cgroup_limit_bounds_the_memory_a_run_counts_on(tmp_path):
    """MemAvailable counts the whole host; a container's or a batch job's cgroup limit is what the kernel kills at:
    the headroom is the least of limit - (usage - inactive page cache) over the process's cgroup and its ancestors."""
    root = cgroup_tree(
        tmp_path,
        {
            "job": {
                "memory.max": str(16 * GIB),
                "memory.current": str(6 * GIB),
                "memory.stat": "anon 1\ninactive_file 0",
            },
            "job/step": {
                "memory.max": "max",  # no limit of its own: its parent's holds
                "memory.current": str(5 * GIB),
                "memory.stat": f"anon 5\ninactive_file {GIB}",
            },
        },
    )
    assert system.cgroup_headroom(root, "0::/job/step\n") == 10 * GIB  # the parent's 16 - 6
    tight = cgroup_tree(
        tmp_path / "tight",
        {
            "job/step": {
                "memory.max": str(8 * GIB),
                "memory.current": str(5 * GIB),
                "memory.stat": f"inactive_file {GIB}",
            },
            "job": {"memory.max": str(16 * GIB), "memory.current": str(6 * GIB)},
        },
    )
    assert system.cgroup_headroom(tight, "0::/job/step") == 4 * GIB  # its own 8 - (5 - 1 of page cache it may drop)
    assert (
        system.cgroup_headroom(tight, "0::/job/step/elsewhere") == 4 * GIB
    )  # a cgroup not mounted here: its ancestors
    full = cgroup_tree(tmp_path / "full", {"": {"memory.max": str(GIB), "memory.current": str(2 * GIB)}})
    assert system.cgroup_headroom(full, "0::/") == 0  # over its limit: none left, not a negative count


def test_a_cgroup_v1_limit_counts_and_its_unlimited_value_does_not(tmp_path):
    v1 = {"memory.usage_in_bytes": str(3 * GIB), "memory.stat": f"inactive_file 7\ntotal_inactive_file {GIB}"}
    root = cgroup_tree(tmp_path, {"memory/batch": v1 | {"memory.limit_in_bytes": str(4 * GIB)}})
    membership = "12:pids:/batch\n4:memory:/batch\n0::/\n"
    assert system.cgroup_headroom(root, membership) == 2 * GIB  # 4 - (3 - 1), the hierarchy's page cache
    unlimited = cgroup_tree(tmp_path / "u", {"memory/batch": v1 | {"memory.limit_in_bytes": "9223372036854771712"}})
    assert system.cgroup_headroom(unlimited, membership) is None
    assert system.cgroup_headroom(str(tmp_path / "absent"), membership) is None  # no cgroup files: no bound


def test_the_memory_a_cpu_run_counts_on_is_the_least_of_the_host_and_its_cgroups(monkeypatch):
    monkeypatch.setattr(system, "cgroup_headroom", lambda: 2**20)  # a job given 1 MiB more
    assert system.available_memory(torch.device("cpu")) == 2**20
    monkeypatch.setattr(system, "cgroup_headroom", lambda: None)
    monkeypatch.setattr(system, "meminfo_available", lambda: None)  # not Linux: psutil's figure, not a guess
    assert system.available_memory(torch.device("cpu")) == pytest.approx(psutil.virtual_memory().available, rel=0.2)


def test_a_cpu_quota_is_read_from_either_cgroup_version_and_the_tightest_counts(tmp_path):
    root = cgroup_tree(
        tmp_path,
        {
            "job": {"cpu.max": "150000 100000"},  # a job given 1.5 CPUs
            "job/step": {"cpu.max": "max 100000"},  # no quota of its own
            "cpu,cpuacct/pod": {"cpu.cfs_quota_us": "400000", "cpu.cfs_period_us": "100000"},
            "cpu,cpuacct/pod/box": {"cpu.cfs_quota_us": "-1", "cpu.cfs_period_us": "100000"},
        },
    )
    assert system.cpu_quota(root, "0::/job/step") == 1.5
    assert system.cpu_quota(root, "3:cpu,cpuacct:/pod/box\n") == 4.0
    assert system.cpu_quota(root, "3:cpu,cpuacct:/pod/box\n0::/job/step") == 1.5
    assert system.cpu_quota(root, "3:cpu,cpuacct:/\n4:memory:/pod\n0::/") is None


@pytest.mark.parametrize(
    "quota, setting, start, threads",
    [
        (1.0, None, 3, 1),
        (1.5, None, 3, 2),  # rounded up: two threads were no slower than one at 1.5 CPUs
        (None, None, 3, 3),
        (1.0, "OMP_NUM_THREADS", 3, 3),  # a user's thread count is theirs
        (1.0, "MKL_NUM_THREADS", 3, 3),
        (8.0, None, 1, 1),  # lowered, never raised
        (8.0, None, 3, 3),  # within the quota and the 4 CPUs the process may run on
    ],
)
def test_torch_threads_are_fitted_to_the_cpu_quota_unless_a_thread_count_was_set(
    quota, setting, start, threads, monkeypatch
):
    """torch starts a thread per core whatever the quota; threads beyond it are throttled, each stalling the others."""
    before = torch.get_num_threads()
    monkeypatch.setattr(system, "cpu_quota", lambda: quota)
    monkeypatch.setattr(system.os, "sched_getaffinity", lambda pid: set(range(4)), raising=False)
    for name in system.THREAD_SETTINGS:
        monkeypatch.delenv(name, raising=False)
    if setting:
        monkeypatch.setenv(setting, "3")
    try:
        torch.set_num_threads(start)
        system.fit_threads_to_cpu_quota()
        assert torch.get_num_threads() == threads
        assert (", CPU quota" in system.hardware_line(system.hardware("cpu"))) == (quota is not None)
    finally:
        torch.set_num_threads(before)


def test_the_usable_cpus_are_the_affinity_within_the_quota(monkeypatch):
    monkeypatch.setattr(system.os, "sched_getaffinity", lambda pid: set(range(6)), raising=False)
    for quota, cpus in [(None, 6), (2.5, 3), (0.5, 1), (16.0, 6)]:
        monkeypatch.setattr(system, "cpu_quota", lambda quota=quota: quota)
        assert system.usable_cpus() == cpus


def test_cgroup_paths_outside_the_namespace_and_v2_soft_limits(tmp_path):
    root = cgroup_tree(
        tmp_path,
        {
            "": {"memory.max": str(8 * GIB), "memory.current": str(GIB), "cpu.max": "200000 100000"},
            "job": {"memory.max": "max", "memory.high": str(3 * GIB), "memory.current": str(GIB)},
        },
    )
    assert system.cgroup_headroom(root, "0::/job") == 2 * GIB  # memory.high: throttled above it
    assert system.cgroup_folders("memory", root, "0::/../../other") == [(root, 2)]  # never read outside the root
    assert system.cgroup_headroom(root, "0::/../../other") == 7 * GIB
    assert system.cpu_quota(root, "0::/../x") == 2.0
    docker_v1 = cgroup_tree(
        tmp_path / "v1",
        {"memory": {"memory.limit_in_bytes": str(2 * GIB), "memory.usage_in_bytes": str(GIB)}},
    )
    assert system.cgroup_headroom(docker_v1, "4:memory:/docker/abc\n") == GIB  # the container's own, at the root


class FakeGpu:
    """torch.cuda's memory figures and device switch, as a GPU with a busy allocator reports them."""

    def __init__(self, monkeypatch):
        self.current = None
        monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (2 * GIB, 80 * GIB))
        monkeypatch.setattr(torch.cuda, "memory_reserved", lambda device=None: 30 * GIB)
        monkeypatch.setattr(torch.cuda, "memory_allocated", lambda device=None: 18 * GIB)
        monkeypatch.setattr(torch.cuda, "set_device", lambda device: setattr(self, "current", device))
        monkeypatch.setattr(torch.cuda, "is_available", lambda: True)


def test_a_gpus_available_memory_counts_what_torchs_allocator_holds_free(monkeypatch):
    """Blocks torch freed stay reserved (the device counts them as used) and are handed out again first."""
    FakeGpu(monkeypatch)
    assert system.available_memory(torch.device("cuda", 0)) == (2 + 30 - 18) * GIB


def test_a_gpu_named_by_index_becomes_the_current_device(monkeypatch):
    """``torch.cuda.synchronize()`` (the timings) acts on the current device: it must be the model's."""
    gpu = FakeGpu(monkeypatch)
    system.use_device("cuda:1")
    assert gpu.current == torch.device("cuda", 1)
    gpu.current = None
    system.use_device("cuda")  # the current one already
    system.use_device("cpu")
    assert gpu.current is None
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    system.use_device("cuda:1")  # a torch without CUDA: the model's move says so, as before
    assert gpu.current is None
