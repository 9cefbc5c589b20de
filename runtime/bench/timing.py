"""Latency statistics of repeated calls, and the peak memory of this process.

Percentiles use numpy's default (linear interpolation between order statistics), so p50 of an even number of
repeats is the mean of the two middle ones.
"""

from __future__ import annotations

import resource
import sys
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

__all__ = ["LatencyStats", "PeakRssMonitor", "latency_stats", "peak_rss_bytes", "time_calls"]


@dataclass(frozen=True)
class LatencyStats:
    """Wall-clock seconds of repeated calls (after warm-up).

    Attributes:
        repeats: timed calls.
        p50, p95: percentiles (linear interpolation).
        min, max, mean: over the timed calls.
        first: seconds of the very first call (warm-up included: compilation, allocation); None if not timed.
    """

    repeats: int
    p50: float
    p95: float
    min: float
    max: float
    mean: float
    first: float | None = None

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def latency_stats(seconds: Sequence[float], first: float | None = None) -> LatencyStats:
    """Summarise timed calls.

    Raises:
        ValueError: ``seconds`` is empty or holds a negative or non-finite value.
    """
    s = np.asarray(seconds, dtype=np.float64)
    if s.ndim != 1 or s.size == 0:
        raise ValueError(f"seconds must be a non-empty 1-D sequence, got shape {s.shape}")
    if not np.all(np.isfinite(s)) or np.any(s < 0):
        raise ValueError(f"seconds must be finite and >= 0, got {s.tolist()}")
    return LatencyStats(
        repeats=int(s.size),
        p50=float(np.percentile(s, 50)),
        p95=float(np.percentile(s, 95)),
        min=float(s.min()),
        max=float(s.max()),
        mean=float(s.mean()),
        first=first,
    )


def time_calls(fn: Callable[[], object], repeats: int, warmup: int = 1) -> LatencyStats:
    """Call ``fn`` ``warmup`` times (the first of them timed as ``first``), then ``repeats`` timed times.

    Raises:
        ValueError: ``repeats`` < 1 or ``warmup`` < 0.
    """
    if repeats < 1:
        raise ValueError(f"repeats must be >= 1, got {repeats}")
    if warmup < 0:
        raise ValueError(f"warmup must be >= 0, got {warmup}")
    first = None
    for i in range(warmup):
        start = time.perf_counter()
        fn()
        if i == 0:
            first = time.perf_counter() - start
    seconds = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        seconds.append(time.perf_counter() - start)
    return latency_stats(seconds, first)


def peak_rss_bytes() -> int:
    """Peak resident set size of this process since it started (``getrusage``; kB on Linux, bytes on macOS)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(peak if sys.platform == "darwin" else peak * 1024)


class PeakRssMonitor:
    """Peak resident set size during a block, sampled by a background thread (default every 5 ms).

    ``getrusage`` only gives the peak since the process started; this gives the peak of one stage, at the cost of
    missing spikes shorter than the interval. Needs psutil.

    Example::

        with PeakRssMonitor() as mon:
            segmenter.predict(ct, pet)
        mon.peak_bytes
    """

    def __init__(self, interval_s: float = 0.005) -> None:
        if interval_s <= 0:
            raise ValueError(f"interval_s must be > 0, got {interval_s}")
        import psutil

        self._process = psutil.Process()
        self.interval_s = interval_s
        self.start_bytes = 0
        self.peak_bytes = 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _sample(self) -> None:
        while not self._stop.is_set():
            self.peak_bytes = max(self.peak_bytes, self._process.memory_info().rss)
            self._stop.wait(self.interval_s)

    def __enter__(self) -> PeakRssMonitor:
        self.start_bytes = self.peak_bytes = self._process.memory_info().rss
        self._stop.clear()
        self._thread = threading.Thread(target=self._sample, name="diffseg-rss", daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        self.peak_bytes = max(self.peak_bytes, self._process.memory_info().rss)
