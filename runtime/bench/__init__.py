"""The benchmark harness behind ``diffseg bench``: FLOP counting, timing, machine peak, report, plot.

Nothing here imports torch at import time; the torch backend (chosen by the user) brings it in.
"""

from __future__ import annotations

from .flops import FlopCount, count_flops
from .machine import machine_info, measure_peak_gflops
from .report import format_report, markdown_table, plot_report
from .runner import BenchCase, BenchOptions, run_bench
from .timing import LatencyStats, PeakRssMonitor, latency_stats, peak_rss_bytes, time_calls

__all__ = [
    "BenchCase",
    "BenchOptions",
    "FlopCount",
    "LatencyStats",
    "PeakRssMonitor",
    "count_flops",
    "format_report",
    "latency_stats",
    "machine_info",
    "markdown_table",
    "measure_peak_gflops",
    "peak_rss_bytes",
    "plot_report",
    "run_bench",
    "time_calls",
]
