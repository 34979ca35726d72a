"""Peak memory of a code region: CUDA max-allocated, or the process's peak RSS on CPU."""

from __future__ import annotations

import threading

import torch


def current_rss() -> int:
    import psutil

    return psutil.Process().memory_info().rss


def _read_hwm() -> int | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def _reset_hwm() -> bool:
    """Linux resets the peak-RSS counter (VmHWM) when "5" is written to /proc/self/clear_refs."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return _read_hwm() is not None
    except OSError:
        return False


class PeakMemory:
    """``with PeakMemory(device) as m: ...`` then ``m.peak`` (bytes) and ``m.delta`` (peak minus the start).

    CUDA: ``torch.cuda.max_memory_allocated`` (tensors only, like the paper's numbers from PyTorch).
    CPU: the process's peak resident set size (VmHWM, reset on entry); where that counter cannot be reset,
    a background thread samples RSS with psutil every 5 ms.
    """

    def __init__(self, device: str | torch.device):
        self.device = torch.device(device)
        self.kind = "cuda_max_allocated" if self.device.type == "cuda" else "cpu_peak_rss"
        self.peak = 0
        self.start = 0
        self._thread = None
        self._stop = threading.Event()

    def __enter__(self):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self.start = torch.cuda.memory_allocated(self.device)
        else:
            self.start = current_rss()
            self._use_hwm = _reset_hwm()
            if not self._use_hwm:
                self._sampled = self.start
                self._thread = threading.Thread(target=self._sample, daemon=True)
                self._thread.start()
        return self

    def _sample(self):
        while not self._stop.wait(0.005):
            self._sampled = max(self._sampled, current_rss())

    def __exit__(self, *exc):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self.peak = torch.cuda.max_memory_allocated(self.device)
        elif self._use_hwm:
            self.peak = max(_read_hwm() or 0, current_rss())
        else:
            self._stop.set()
            self._thread.join()
            self.peak = max(self._sampled, current_rss())
        return False

    @property
    def delta(self) -> int:
        return max(0, self.peak - self.start)
