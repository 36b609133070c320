"""Memory a phase of a rank's life takes (model loading): host RSS growth and device peak, measured, not guessed.

``resource.getrusage().ru_maxrss`` is a peak over the process's whole life, so it cannot tell what loading
cost in a process that did something before. Here the kernel's high-water mark (VmHWM) is first reset to the
current RSS (``echo 5 > /proc/self/clear_refs``, Linux >= 4.0), so VmHWM at the end is the peak of this phase
alone; where that reset is refused, VmRSS is sampled every millisecond by a thread instead (a spike shorter than
that can be missed). On a GPU, ``torch.cuda.max_memory_allocated`` after ``reset_peak_memory_stats``.
"""

from __future__ import annotations

import threading

import torch

STATUS = "/proc/self/status"
SAMPLE_SECONDS = 0.001


def _status_mib(field: str) -> float | None:
    """VmRSS, VmHWM, ... of this process in MiB (None off Linux)."""
    try:
        with open(STATUS) as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) / 1024.0
    except OSError:
        return None
    return None


def _reset_high_water_mark() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


class PhaseMemory:
    """``with PhaseMemory(device) as m: ...`` then ``m.as_dict()``: RSS before, peak during, growth, RSS after
    (MiB), the method used, and on CUDA the peak allocated device memory."""

    def __init__(self, device: torch.device | None = None):
        self.device = device if device is not None and device.type == "cuda" else None
        self.before = self.peak = self.after = self.cuda_peak = None
        self.method = ""
        self._samples: list[float] = []
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _sample(self) -> None:
        while not self._stop.wait(SAMPLE_SECONDS):
            rss = _status_mib("VmRSS")
            if rss is not None:
                self._samples.append(rss)

    def __enter__(self) -> PhaseMemory:
        if self.device is not None:
            torch.cuda.reset_peak_memory_stats(self.device)
        self.before = _status_mib("VmRSS")
        if self.before is None:
            self.method = "unavailable (no /proc/self/status)"
        elif _reset_high_water_mark():
            self.method = "VmHWM after resetting it (clear_refs 5)"
        else:
            self.method = f"VmRSS sampled every {SAMPLE_SECONDS * 1000:g} ms"
            self._thread = threading.Thread(target=self._sample, daemon=True)
            self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        if self._thread is not None:
            self._stop.set()
            self._thread.join()
            self.peak = max([self.before, *self._samples, _status_mib("VmRSS") or 0.0])
        elif self.before is not None:
            self.peak = _status_mib("VmHWM")
        self.after = _status_mib("VmRSS")
        if self.device is not None:
            self.cuda_peak = torch.cuda.max_memory_allocated(self.device) / 2**20

    def as_dict(self) -> dict:
        growth = None if self.peak is None or self.before is None else self.peak - self.before
        return {"rss_before_mib": self.before, "peak_rss_mib": self.peak, "peak_growth_mib": growth,
                "rss_after_mib": self.after, "method": self.method, "cuda_max_allocated_mib": self.cuda_peak}
