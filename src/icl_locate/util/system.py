"""Process and device memory, read in one place (Linux ``/proc``; CUDA through torch)."""

from __future__ import annotations

import platform

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


def current_rss_mb() -> float | None:
    """Resident set size now (Linux VmRSS), in MB."""
    kb = _proc_kb("/proc/self/status", "VmRSS:")
    return None if kb is None else kb / 1024


def available_memory(device: torch.device) -> int:
    """Bytes free for new tensors: free GPU memory, or the kernel's MemAvailable on CPU."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    kb = _proc_kb("/proc/meminfo", "MemAvailable:")
    return kb * 1024 if kb is not None else 8 * 2**30  # not Linux: assume 8 GiB


def cpu_model() -> str:
    """The CPU's marketing name (Linux ``/proc/cpuinfo``; else what ``platform`` knows)."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith(("model name", "Model", "Hardware")) and ":" in line:
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown CPU"


def hardware(device: torch.device | str) -> dict:
    """What the speed of this run depends on: CPU model, the instruction set torch's CPU kernels
    dispatch to (``ATEN_CPU_CAPABILITY`` can lower it), the GPU in use and the thread count."""
    device = torch.device(device)
    gpu = torch.cuda.get_device_name(device) if device.type == "cuda" else None
    return dict(
        cpu=cpu_model(),
        cpu_capability=torch.backends.cpu.get_cpu_capability(),
        gpu=gpu,
        threads=torch.get_num_threads(),
        device=str(device),
        torch=torch.__version__,
    )


def hardware_line(info: dict) -> str:
    """One line naming the machine (for logs and reports)."""
    gpu = f"GPU {info['gpu']}" if info.get("gpu") else "no GPU"
    return f"{info['cpu']} (torch CPU capability {info['cpu_capability']}, {info['threads']} threads), {gpu}"
