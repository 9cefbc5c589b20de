"""Presenting a bench report: a plain-text table for the terminal, a Markdown table, and a PNG plot.

matplotlib is a test extra, not a runtime dependency: :func:`plot_report` imports it when called and raises
``RuntimeError`` with the install line when it is missing.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from .runner import STAGES

__all__ = ["format_report", "markdown_table", "plot_report"]


def _fmt(value: Any, spec: str = ".3f") -> str:
    return "-" if value is None else format(value, spec)


def _table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> list[str]:
    widths = [max(len(str(h)), *(len(r[i]) for r in rows)) for i, h in enumerate(header)]
    line = "  ".join(h.rjust(w) for h, w in zip(header, widths, strict=True))
    out = [line, "-" * len(line)]
    out += ["  ".join(c.rjust(w) for c, w in zip(r, widths, strict=True)) for r in rows]
    return out


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """A GitHub Markdown table (cells formatted with ``str``)."""
    lines = ["| " + " | ".join(map(str, header)) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(map(str, r)) + " |" for r in rows]
    return "\n".join(lines)


def format_report(report: dict[str, Any]) -> str:
    """The terminal summary of a ``run_bench`` report."""
    lines = _settings_lines(report)
    lines += ["", "denoiser call by batch size (seconds):"]
    lines += _denoiser_table(report["denoiser"])
    lines += ["", "end to end per case (seconds):"]
    lines += _case_table(report["cases"])
    mem = report["memory"]
    lines.append("")
    lines.append(f"process peak RSS: {mem['process_peak_rss_bytes'] / 2**20:.0f} MiB")
    if "cuda_peak_allocated_bytes" in mem:
        lines.append(f"CUDA peak allocated: {mem['cuda_peak_allocated_bytes'] / 2**20:.0f} MiB")
    return "\n".join(lines)


def _settings_lines(report: dict[str, Any]) -> list[str]:
    """Machine, model and settings, load time, FLOPs and measured peak."""
    m, s = report["machine"], report["settings"]
    flops, peak = report.get("flops") or {}, report.get("peak") or {}
    lines = [
        f"machine: {m['cpu']}, {m['usable_cores']} cores ({', '.join(m['isa'])}), load {m['load_average']}",
        f"model {report['model']['name']} on {s['backend']} {s['precision']} ({s['device']}); "
        f"{s['sampler']['steps']} steps x {s['sampler']['num_samples']} samples, "
        f"batch {s['window']['batch_size']}, {s['loop_order']}",
        f"load: {report['load']['total_s']:.2f} s (engine {report['load']['engine_s']:.2f} s)",
    ]
    if "flops" in flops:
        lines.append(
            f"FLOPs per patch-forward (ONNX graph, Conv/ConvTranspose/Gemm/MatMul): {flops['gflops']:.2f} GFLOP"
        )
    if "gflops" in peak:
        lines.append(f"measured peak: {peak['gflops']:.1f} GFLOP/s ({peak['method']})")
    elif peak:
        lines.append(f"measured peak: not available ({peak.get('error')})")
    return lines


def _denoiser_table(denoiser: Sequence[dict[str, Any]]) -> list[str]:
    """One row per batch size: latency percentiles, throughput, GFLOP/s and fraction of peak."""
    rows = []
    for r in denoiser:
        lat = r["latency_s"]
        rows.append(
            [
                str(r["batch"]),
                _fmt(lat["p50"], ".4f"),
                _fmt(lat["p95"], ".4f"),
                _fmt(lat["min"], ".4f"),
                _fmt(lat["max"], ".4f"),
                _fmt(lat["first"], ".3f"),
                _fmt(r["per_patch_s"], ".4f"),
                _fmt(r["patches_per_s"], ".2f"),
                _fmt(r.get("gflops"), ".1f"),
                _fmt(100 * r["fraction_of_peak"] if r.get("fraction_of_peak") else None, ".0f"),
            ]
        )
    header = ["batch", "p50", "p95", "min", "max", "first", "s/patch", "patch/s", "GFLOP/s", "%peak"]
    return _table(header, rows)


def _case_table(cases: Sequence[dict[str, Any]]) -> list[str]:
    """One row per case: time by stage, overhead, step time, windows run, throughput, memory and Dice."""
    rows = []
    for c in cases:
        t = c["timings_s"]
        rows.append(
            [
                c["case"],
                "x".join(map(str, c["ct_shape"])),
                *(_fmt(t.get(k), ".2f") for k in STAGES),
                _fmt(c["total_s"], ".2f"),
                _fmt(100 * c["overhead_fraction"] if c["overhead_fraction"] is not None else None, ".1f"),
                _fmt((c["step_s"] or {}).get("p50"), ".2f"),
                f"{c['windows'] - c['windows_skipped']}/{c['windows']}",
                _fmt(c["patch_forwards_per_s"], ".2f"),
                _fmt(c["ct_voxels_per_s"] / 1e6 if c["ct_voxels_per_s"] else None, ".2f"),
                _fmt(c["engine_gflops"], ".1f"),
                _fmt(c["peak_rss_bytes"] / 2**20, ".0f"),
                _fmt(c.get("dice"), ".3f"),
            ]
        )
    header = [
        "case",
        "CT zyx",
        *STAGES,
        "total",
        "ovh%",
        "step",
        "windows",
        "fwd/s",
        "Mvox/s",
        "GFLOP/s",
        "RSS MB",
        "Dice",
    ]
    return _table(header, rows)


def plot_report(report: dict[str, Any], path: str | Path) -> Path:
    """Write a PNG: latency by batch size (p50 with min–max, and per patch) and time by stage per case.

    Raises:
        RuntimeError: matplotlib is not installed.
    """
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as exc:
        raise RuntimeError(f'the plot needs matplotlib ({exc}); pip install "diffseg[test]" or matplotlib') from exc
    from ..atomic import atomic_path

    s = report["settings"]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4.8))
    den = report["denoiser"]
    b = [r["batch"] for r in den]
    p50 = [r["latency_s"]["p50"] for r in den]
    lo = [r["latency_s"]["p50"] - r["latency_s"]["min"] for r in den]
    hi = [r["latency_s"]["max"] - r["latency_s"]["p50"] for r in den]
    ax1.errorbar(b, p50, yerr=[lo, hi], marker="o", capsize=3, label="per call (p50, min–max)")
    ax1.plot(b, [r["per_patch_s"] for r in den], marker="s", label="per patch (p50 / batch)")
    ax1.set_xlabel("batch size (patches per engine call)")
    ax1.set_ylabel("seconds")
    ax1.set_xscale("log", base=2)
    ax1.set_xticks(b, [str(v) for v in b])
    ax1.set_title(f"denoiser latency, {s['backend']} {s['precision']} ({s['device']})")
    ax1.grid(alpha=0.3)
    ax1.legend()
    cases = report["cases"]
    left = [0.0] * len(cases)
    names = [c["case"] for c in cases]
    for stage in STAGES:
        widths = [c["timings_s"].get(stage, 0.0) for c in cases]
        if not any(widths):
            continue
        ax2.barh(names, widths, left=left, label=stage)
        left = [a + w for a, w in zip(left, widths, strict=True)]
    ax2.set_xlabel("seconds")
    ax2.set_title("end-to-end time by stage")
    ax2.legend(fontsize="small", loc="upper center", bbox_to_anchor=(0.5, -0.16), ncol=3)
    ax2.grid(alpha=0.3, axis="x")
    fig.suptitle(f"{report['model']['name']} on {report['machine']['cpu']}", fontsize="medium")
    fig.tight_layout()
    path = Path(path)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110)
    plt.close(fig)
    return path
