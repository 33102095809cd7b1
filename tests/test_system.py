"""The machine's description: what a calibration is kept for and what every figure is reported beside."""

from __future__ import annotations

import ctypes
import subprocess
import sys

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
