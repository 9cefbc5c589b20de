"""``run_bench``: what ``diffseg bench`` measures, as one pure-data report (a JSON-ready dict).

For a loaded :class:`~diffseg.runtime.segmenter.Segmenter`:

1. load: seconds to load the package and the engine (the factory call), and the engine alone;
2. denoiser: one engine call at each batch size (``warmup`` untimed calls, the first reported as ``first``, then
   ``repeats`` timed calls): p50, p95, min, max; patches/s and achieved GFLOP/s at each;
3. per case (phantoms written to NIfTI, or the user's files): the end-to-end run split by stage (read,
   prepare, sample, postprocess, write), engine seconds and the overhead outside the engine within ``sample``,
   the duration of one sampler step (step-major), throughput in CT voxels/s and patch-forwards/s, the achieved
   GFLOP/s of the engine, and the peak resident memory during the case (and the peak CUDA memory with the torch
   backend);
4. machine: CPU, cores, ISA flags, versions, load average, and the measured peak GFLOP/s at the engine's precision.

FLOPs per patch-forward come from the package's ONNX graph (:func:`~diffseg.runtime.bench.flops.count_flops`).
"""

from __future__ import annotations

import logging
import os
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ..result import STAGES
from .machine import machine_info, measure_peak_gflops
from .timing import PeakRssMonitor, latency_stats, peak_rss_bytes, time_calls

__all__ = ["SCHEMA", "STAGES", "BenchCase", "BenchOptions", "run_bench"]

logger = logging.getLogger("diffseg")

SCHEMA = "diffseg-bench/2"


@dataclass(frozen=True)
class BenchCase:
    """One end-to-end case: image files on disk (read is part of the timed run).

    Attributes:
        name: shown in the table.
        ct: CT image file.
        pet: PET image file (SUV).
        truth: optional ground-truth mask file on the CT grid (then Dice is reported).
    """

    name: str
    ct: Path
    pet: Path
    truth: Path | None = None


@dataclass(frozen=True)
class BenchOptions:
    """What ``run_bench`` measures.

    Attributes:
        batch_sizes: engine batch sizes to time, one denoiser call each.
        repeats: timed calls per batch size (after warm-up).
        warmup: untimed calls per batch size before timing (the first is reported: compilation, allocation).
        seeds: phantom seeds of the end-to-end cases (used when no ``cases`` are given to ``run_bench``).
        ct_size_xy: phantom CT matrix in plane.
        ct_slices: phantom CT slices (None: the phantom's random 56–72).
        measure_peak: measure the machine's peak GFLOP/s at the engine's precision.
        write_outputs: time the write stage (NIfTI maps, lesion table, preview, report) of each case.
    """

    batch_sizes: tuple[int, ...] = (1, 2, 5, 10)
    repeats: int = 10
    warmup: int = 2
    seeds: tuple[int, ...] = (1,)
    ct_size_xy: int = 256
    ct_slices: int | None = None
    measure_peak: bool = True
    write_outputs: bool = True

    def __post_init__(self) -> None:
        sizes = tuple(self.batch_sizes)
        if any(isinstance(b, bool) or not isinstance(b, int) or b < 1 for b in sizes):
            raise ValueError(f"batch_sizes must be ints >= 1, got {list(sizes)}")
        object.__setattr__(self, "batch_sizes", sizes)
        object.__setattr__(self, "seeds", tuple(self.seeds))
        if self.repeats < 1:
            raise ValueError(f"repeats must be >= 1, got {self.repeats}")
        if self.warmup < 0:
            raise ValueError(f"warmup must be >= 0, got {self.warmup}")
        if any(s < 0 for s in self.seeds):
            raise ValueError(f"seeds must be >= 0, got {list(self.seeds)}")


def _cuda_memory(backend: Any) -> Any:
    """torch.cuda when the engine is the torch backend on CUDA (other engines allocate outside torch's view)."""
    import sys

    if backend.name != "torch" or not backend.device.startswith("cuda") or "torch" not in sys.modules:
        return None
    import torch

    return torch.cuda if torch.cuda.is_available() else None


def step_seconds(calls: np.ndarray, steps: int, loop_order: str) -> dict[str, Any] | None:
    """Duration of each sampler step from the sampler's engine log ``[calls, 4]`` (start, end, batch, t): in
    step-major a step's calls share a timestep.

    Step k (k ≥ 2) runs from the end of step k−1's last engine call to the end of its own last call: one full
    sliding-window pass plus one scheduler step. With a single step, its first call's start is used instead.
    """
    if loop_order != "step_major" or not len(calls):
        return None
    calls = calls.tolist()
    ends: list[float] = []
    for k, call in enumerate(calls):
        if k + 1 == len(calls) or calls[k + 1][3] != call[3]:
            ends.append(call[1])
    if len(ends) != steps:
        return None
    if steps == 1:
        return {**latency_stats([ends[0] - calls[0][0]]).as_dict(), "basis": "first call start to last call end"}
    durations = np.diff(ends)
    return {**latency_stats(durations.tolist()).as_dict(), "basis": f"steps 2..{steps}, end to end of last call"}


def _phantom_cases(options: BenchOptions, folder: Path) -> list[BenchCase]:
    from ..phantom import PhantomOptions, make_phantom, write_phantom

    cases = []
    for seed in options.seeds:
        ph = make_phantom(seed, PhantomOptions(ct_size_xy=options.ct_size_xy, ct_slices=options.ct_slices))
        paths = write_phantom(ph, folder / f"phantom-{seed}")
        cases.append(BenchCase(f"phantom-{seed}", paths["ct"], paths["pet"], paths["mask"]))
    return cases


def _denoiser_rows(segmenter, options: BenchOptions, flops: int | None, peak: float | None) -> list[dict[str, Any]]:
    backend = segmenter.backend
    rng = np.random.default_rng(0)
    rows = []
    t_mid = float(segmenter.scheduler_config.num_train_timesteps // 2)
    for b in options.batch_sizes:
        x = rng.standard_normal((b, backend.in_channels, *backend.patch), dtype=np.float32)
        t = np.full(b, t_mid, np.float32)
        stats = time_calls(lambda x=x, t=t: backend.run(x, t), options.repeats, options.warmup)
        row: dict[str, Any] = {
            "batch": b,
            "latency_s": stats.as_dict(),
            "per_patch_s": stats.p50 / b,
            "patches_per_s": b / stats.p50,
        }
        if flops:
            row["gflops"] = b * flops / stats.p50 / 1e9
            row["fraction_of_peak"] = row["gflops"] / peak if peak else None
        rows.append(row)
        logger.info("denoiser batch %d: p50 %.4f s (%.4f s per patch)", b, stats.p50, stats.p50 / b)
    return rows


def _case_row(segmenter, case: BenchCase, options: BenchOptions, out: Path, flops: int | None) -> dict[str, Any]:
    from ..outputs import WriteOptions
    from ..pipeline import segment_files
    from ..postprocess import dice
    from ..volume import read_volume

    backend = segmenter.backend
    cuda = _cuda_memory(backend)
    if cuda is not None:
        cuda.synchronize()
        cuda.reset_peak_memory_stats()
    nothing = WriteOptions(maps=False, tables=False, preview=False, dicom_outputs=(), report=False)
    write = None if options.write_outputs else nothing
    start = time.perf_counter()
    with PeakRssMonitor() as mon:  # as `diffseg predict`: the one pipeline, read to write
        case_output = segment_files(segmenter, case.ct, case.pet, out / case.name, case_id=case.name, write=write)
    wall = time.perf_counter() - start
    row = _figures(case.name, case_output, options, wall, mon, flops, segmenter.package.manifest.spacing_mm)
    if cuda is not None:
        row["cuda_peak_allocated_bytes"] = int(cuda.max_memory_allocated())
        row["cuda_peak_reserved_bytes"] = int(cuda.max_memory_reserved())
    if case.truth is not None:
        row["dice"] = dice(case_output.result.mask.array, read_volume(case.truth).array)
    logger.info("case %s: %.2f s end to end (%d patch forwards)", case.name, row["total_s"], row["patch_forwards"])
    return row


def _figures(
    name: str, case_output, options: BenchOptions, wall: float, mon, flops: int | None, spacing_mm: float
) -> dict[str, Any]:
    """One case's row from the pipeline's own figures: stage timings, counts, engine seconds and log."""
    result = case_output.result
    timings = {k: float(result.timings[k]) for k in STAGES if k in result.timings}
    if options.write_outputs:
        timings["write"] = case_output.write_seconds
    total = sum(timings.values())
    counts = result.counts
    engine_s, forwards = counts.engine_seconds, counts.patch_forwards
    sample_s = timings.get("sample", 0.0)
    ct_shape = tuple(result.mask.shape)  # every output is on the CT's grid
    model_shape = model_grid_shape(result.mask, spacing_mm)
    return {
        "case": name,
        "ct_shape": list(ct_shape),
        "model_grid_shape": list(model_shape),
        "windows": counts.windows,
        "windows_skipped": counts.windows_skipped,
        "retired": counts.retired,
        "engine_calls": counts.engine_calls,
        "patch_forwards": forwards,
        "timings_s": timings,
        "total_s": total,
        "wall_s": wall,
        "engine_s": engine_s,
        "sampler_s": counts.sampler_seconds,
        "overhead_s": sample_s - engine_s,  # the sample stage outside the engine (the loop and its set-up)
        "overhead_fraction": (sample_s - engine_s) / sample_s if sample_s > 0 else None,
        "step_s": step_seconds(result.engine_log, result.options.sampler.steps, result.options.loop_order),
        "ct_voxels_per_s": int(np.prod(ct_shape)) / total if total > 0 else None,
        "model_voxels_per_s": int(np.prod(model_shape)) / sample_s if sample_s > 0 else None,
        "patch_forwards_per_s": forwards / sample_s if sample_s > 0 else None,
        "engine_patch_forwards_per_s": forwards / engine_s if engine_s > 0 else None,
        "engine_gflops": forwards * flops / engine_s / 1e9 if flops and engine_s > 0 else None,
        "peak_rss_bytes": mon.peak_bytes,
        "rss_before_bytes": mon.start_bytes,
        "lesions": len(result.lesions),
        "device_loop": result.options.device_loop,
    }


def model_grid_shape(ct, spacing_mm: float) -> tuple[int, ...]:
    from ..preprocess import model_grid_for

    return model_grid_for(ct, spacing_mm).shape


def run_bench(
    make_segmenter: Callable[[], Any],
    options: BenchOptions | None = None,
    cases: Sequence[BenchCase] | None = None,
    workdir: str | Path | None = None,
) -> dict[str, Any]:
    """Benchmark a segmenter: load, denoiser latency by batch size, end-to-end cases, machine and peak.

    Args:
        make_segmenter: builds the :class:`~diffseg.runtime.segmenter.Segmenter` (its duration is the load time).
        options: what to measure; None → defaults.
        cases: image files to run end to end; None → phantoms of ``options.seeds`` written under ``workdir``.
        workdir: where phantoms and case outputs go (None: a temporary folder, removed afterwards).

    Returns:
        The report (JSON-ready): ``schema``, ``date``, ``machine``, ``settings``, ``model``, ``load``, ``flops``,
        ``peak``, ``denoiser`` (one row per batch size), ``cases`` (one row per case), ``memory``.
    """
    from .flops import count_flops

    options = options or BenchOptions()
    machine = machine_info()
    start = time.perf_counter()
    segmenter = make_segmenter()
    load_s = time.perf_counter() - start
    backend = segmenter.backend
    precision = backend.precision
    try:
        flop_count = count_flops(segmenter.package.engine("fp32").path, batch=1)
        flops: dict[str, Any] = flop_count.as_dict()
        flops_per_forward = flop_count.flops
    except (RuntimeError, ValueError, KeyError) as exc:  # no onnx package, or no ONNX file in the package
        flops, flops_per_forward = {"error": str(exc)}, None
    peak: dict[str, Any] | None = None
    if options.measure_peak:
        device = "cuda" if backend.device.startswith("cuda") else "cpu"
        peak_precision = precision if device == "cuda" or precision == "bf16" else "fp32"
        try:
            peak = measure_peak_gflops(device, peak_precision, threads=segmenter.backend.threads)
        except (RuntimeError, ValueError) as exc:
            peak = {"error": str(exc)}
    peak_gflops = peak.get("gflops") if peak else None

    denoiser = _denoiser_rows(segmenter, options, flops_per_forward, peak_gflops)
    with tempfile.TemporaryDirectory(prefix="diffseg-bench-") as tmp:
        folder = Path(workdir) if workdir is not None else Path(tmp)
        case_list = list(cases) if cases is not None else _phantom_cases(options, folder / "cases")
        rows = [_case_row(segmenter, c, options, folder / "outputs", flops_per_forward) for c in case_list]
    for row in rows:
        row["fraction_of_peak"] = row["engine_gflops"] / peak_gflops if row["engine_gflops"] and peak_gflops else None
    m = segmenter.package.manifest
    # getrusage's high-water mark is updated lazily by the kernel; the sampled case peaks can exceed it slightly
    memory: dict[str, Any] = {"process_peak_rss_bytes": max([peak_rss_bytes(), *(r["peak_rss_bytes"] for r in rows)])}
    cuda = _cuda_memory(backend)
    if cuda is not None:
        memory["cuda_peak_allocated_bytes"] = int(cuda.max_memory_allocated())
    return {
        "schema": SCHEMA,
        "date": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "machine": machine,
        "settings": segmenter.settings(),
        "options": asdict(options),
        "model": {"name": m.name, "version": m.version, "patch_size": list(m.patch_size), "spacing_mm": m.spacing_mm},
        "load": {"total_s": load_s, "engine_s": float(segmenter.load_seconds)},
        "flops": flops,
        "peak": peak,
        "denoiser": denoiser,
        "cases": rows,
        "memory": memory,
        "load_average_after": [round(v, 2) for v in os.getloadavg()] if hasattr(os, "getloadavg") else None,
    }
