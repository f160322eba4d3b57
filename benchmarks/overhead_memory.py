"""Peak memory of one phase of a fit, on a CPU (the process's resident set) or a CUDA device.

* CPU: peak resident set size. At each phase start the meter collects garbage, returns freed heap
  memory to the OS (glibc ``malloc_trim(0)``, so memory freed by the previous phase does not count
  as this phase's), and resets the kernel's high-water mark (``echo 5 > /proc/self/clear_refs``); at
  the phase end it reads ``VmHWM`` from ``/proc/self/status``. Exact peaks, no sampling thread
  competing for the CPU.
* CUDA: ``torch.cuda.reset_peak_memory_stats`` at each phase start, ``max_memory_allocated`` at the end.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import gc
import re
from typing import Protocol

import torch


class MemoryMeter(Protocol):
    """Peak memory since the last :meth:`start_phase`, in bytes."""

    what: str

    def start_phase(self) -> int:
        """Reset the peak; returns the memory in use now."""

    def peak(self) -> int:
        """The peak since :meth:`start_phase`."""


class ResidentSetMeter:
    """Peak resident set size of this process through the kernel's resettable high-water mark."""

    what = "peak RSS of the process (VmHWM, reset per phase after malloc_trim)"

    def __init__(self) -> None:
        library = ctypes.util.find_library("c")
        libc = ctypes.CDLL(library) if library else None
        if libc is None or not hasattr(libc, "malloc_trim"):
            raise RuntimeError(
                "CPU peak memory needs glibc's malloc_trim (to return freed memory before each phase); this "
                "C library lacks it. Run on a glibc Linux, or use --device cuda."
            )
        self._malloc_trim = libc.malloc_trim
        try:
            self._reset_high_water_mark()
        except OSError as error:
            raise RuntimeError(
                f"CPU peak memory resets the process's RSS high-water mark through /proc/self/clear_refs, which "
                f"failed ({error}); it needs Linux >= 4.0 with /proc writable by the process. Use --device cuda "
                "elsewhere."
            ) from error

    @staticmethod
    def _reset_high_water_mark() -> None:
        with open("/proc/self/clear_refs", "w", encoding="ascii") as clear_refs:
            clear_refs.write("5")

    @staticmethod
    def _status_bytes(key: str) -> int:
        with open("/proc/self/status", encoding="ascii") as status:
            match = re.search(rf"^{key}:\s+(\d+) kB", status.read(), re.MULTILINE)
        if match is None:
            raise RuntimeError(f"/proc/self/status has no {key} line.")
        return int(match.group(1)) * 1024

    def start_phase(self) -> int:
        gc.collect()
        self._malloc_trim(0)
        self._reset_high_water_mark()
        return self._status_bytes("VmRSS")

    def peak(self) -> int:
        return self._status_bytes("VmHWM")


class CudaMeter:
    """Peak memory allocated by tensors on one CUDA device (the caching allocator's own count)."""

    what = "torch.cuda.max_memory_allocated, reset per phase"

    def __init__(self, device: torch.device) -> None:
        self.device = device

    def start_phase(self) -> int:
        gc.collect()
        torch.cuda.synchronize(self.device)
        torch.cuda.reset_peak_memory_stats(self.device)
        return torch.cuda.memory_allocated(self.device)

    def peak(self) -> int:
        torch.cuda.synchronize(self.device)
        return torch.cuda.max_memory_allocated(self.device)


_METERS: dict[str, MemoryMeter] = {}


def make_meter(device: torch.device) -> MemoryMeter:
    if device.type == "cuda":
        return CudaMeter(device)
    if "cpu" not in _METERS:  # checks the C library and /proc once
        _METERS["cpu"] = ResidentSetMeter()
    return _METERS["cpu"]
