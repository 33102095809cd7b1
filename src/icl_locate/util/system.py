"""Process and device memory, read in one place (Linux ``/proc``; CUDA through torch)."""

from __future__ import annotations

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
    return kb * 1024 if kb is not None else 8 * 2 ** 30  # not Linux: assume 8 GiB
