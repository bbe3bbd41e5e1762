"""Peak memory while a block runs: resident memory of this process, sampled from /proc by a thread, or the bytes
of CPU tensors alive at once, traced by torch.profiler."""

from __future__ import annotations

import resource
import threading
from collections.abc import Callable

from torch.profiler import ProfilerActivity, profile


class PeakRSS:
    """Peak resident memory (MiB) of this process while the context is open, sampled from /proc."""

    def __init__(self, interval: float = 0.05):
        self.interval = interval
        self.peak_mb = 0.0
        self.start_mb = 0.0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    @staticmethod
    def current_mb() -> float:
        """Resident set size now (Linux /proc; falls back to the process-lifetime peak elsewhere)."""
        try:
            with open("/proc/self/status") as handle:
                for line in handle:
                    if line.startswith("VmRSS:"):
                        return int(line.split()[1]) / 1024
        except OSError:
            pass
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024

    def _sample(self) -> None:
        while not self._stop.is_set():
            self.peak_mb = max(self.peak_mb, self.current_mb())
            self._stop.wait(self.interval)

    def __enter__(self) -> PeakRSS:
        self.start_mb = self.peak_mb = self.current_mb()
        self._stop.clear()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        self.peak_mb = max(self.peak_mb, self.current_mb())


def peak_tensor_bytes(work: Callable[[], object]) -> int:
    """The most bytes of CPU tensors alive at once while `work()` runs, over those alive when it started, traced
    allocation by allocation (`torch.profiler` with `profile_memory`)."""
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as profiler:
        work()
    events = [event for event in profiler.profiler.kineto_results.events() if event.name() == "[memory]"]
    live = peak = 0
    for event in sorted(events, key=lambda event: event.start_ns()):
        live += event.nbytes()
        peak = max(peak, live)
    return peak
