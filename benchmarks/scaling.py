"""How end-to-end time and peak memory grow with volume size, steps, samples and batch size.

Every measured run is a fresh process that does exactly what ``diffseg predict --ct CT --pet PET -o OUT`` does
(``segment_files``: read the NIfTI files, segment, write every output), with the engine calls timed; its peak resident
memory (``wait4``'s ``ru_maxrss``) is that case's alone. The phantoms are generated beforehand in other processes.
The auto backend imports torch to see whether the torch backend is available (about 0.2 GB of the peak RSS).

- sizes: CT 128×128×40 … 512×512×300 (with its PET on its own ~4 mm grid), package defaults;
- steps, samples, batch size: on the 256×256×64 case;
- the cost per patch-forward: least squares of sampling-stage seconds against patch-forwards over the runs at
  batch 10 (intercept = the per-case fixed cost of the sampler), and the overhead outside the engine
  (sampling seconds − engine seconds; ``SampleResult.total_seconds − engine_seconds`` as the harness times it).

Targets reported against: peak host memory of the 512×512×300 case ≤ 4 GB; overhead ≤ 5 % of sampling time.

    python benchmarks/scaling.py                       # everything (about 30 min on 2 cores)
    python benchmarks/scaling.py --parts sizes         # sizes only
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import threading
from pathlib import Path

import numpy as np
from _common import command_line, load_average, machine_header, write_results

SIZES = ["128x40", "256x64", "384x150", "512x200", "512x300"]
MEMORY_TARGET_BYTES = 4 * 10**9
OVERHEAD_TARGET = 0.05


def _size(text: str) -> tuple[int, int]:
    xy, _, slices = text.partition("x")
    return int(xy), int(slices)


def phantom_files(size: str, seed: int, work: Path) -> dict[str, str]:
    """Generate (once, in a separate process) and return the case files of a phantom of ``size``."""
    folder = work / f"phantom-{seed}-{size}"
    if not (folder / "case.json").is_file():
        xy, slices = _size(size)
        code = (
            "import sys; from diffseg.runtime.phantom import PhantomOptions, make_phantom, write_phantom; "
            f"write_phantom(make_phantom({seed}, PhantomOptions(ct_size_xy={xy}, ct_slices={slices})), sys.argv[1])"
        )
        subprocess.run([sys.executable, "-c", code, str(folder)], check=True)
    return {"ct": str(folder / "ct.nii.gz"), "pet": str(folder / "pet.nii.gz")}


def worker(ct: str, pet: str, out: Path, backend: str, steps: int, samples: int, batch: int) -> None:
    """The measured process: exactly ``diffseg predict``'s flow (``segment_files``: read, segment, write), with the
    engine figures the sampler records itself; prints one JSON line."""
    import time

    import psutil

    from diffseg.runtime.bench.runner import step_seconds
    from diffseg.runtime.pipeline import segment_files
    from diffseg.runtime.segmenter import Segmenter

    rss: list[tuple[float, int]] = []  # (time, resident bytes) every 10 ms: the peak of each stage
    stop = threading.Event()

    def poll() -> None:
        process = psutil.Process()
        while not stop.is_set():
            rss.append((time.perf_counter(), process.memory_info().rss))
            stop.wait(0.01)

    poller = threading.Thread(target=poll, daemon=True)
    poller.start()
    t_load = time.perf_counter()
    segmenter = Segmenter("default", backend=backend, steps=steps, samples=samples, batch_size=batch)
    t_case = time.perf_counter()
    case = segment_files(segmenter, Path(ct), Path(pet), out)
    report, calls = case.report, case.result.engine_log
    stop.set()
    poller.join()
    bounds = {"load": (t_load, t_case)}
    edge = t_case
    for stage, seconds in report["timings_s"].items():  # stages ran one after the other, in this order
        bounds[stage] = (edge, edge + seconds)
        edge += seconds
    stage_peaks = {k: max((b for t, b in rss if lo <= t <= hi), default=None) for k, (lo, hi) in bounds.items()}
    per_step = step_seconds(calls, steps, "step_major") if steps > 1 else None
    doc = {
        "settings": report["settings"],
        "timings_s": report["timings_s"],
        "windows": report["windows"],
        "windows_skipped": report["windows_skipped"],
        "retired": report["retired"],
        "engine_s": case.result.counts.engine_seconds,
        "patch_forwards": case.result.counts.patch_forwards,
        "step_s": per_step["p50"] if per_step else None,
        "stage_peak_rss_bytes": stage_peaks,
    }
    print("RESULT " + json.dumps(doc), flush=True)


def measure(files: dict[str, str], out: Path, backend: str, steps: int, samples: int, batch: int) -> dict:
    """One fresh worker process on one case; returns its figures plus the process's peak RSS (``wait4``)."""
    cmd = [sys.executable, __file__, "--worker", files["ct"], files["pet"], str(out), "--backend", backend]
    cmd += ["--worker-steps", str(steps), "--worker-samples", str(samples), "--worker-batch", str(batch)]
    load_before = load_average()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True)
    stdout = proc.stdout.read()
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    lines = [line for line in stdout.splitlines() if line.startswith("RESULT ")]
    if proc.returncode != 0 or not lines:
        raise RuntimeError(f"{' '.join(cmd)} exited with {proc.returncode}")
    r = json.loads(lines[-1][len("RESULT ") :])
    sample_s = r["timings_s"]["sample"]
    return {
        "steps": steps,
        "samples": samples,
        "batch": batch,
        "backend": f"{r['settings']['backend']} {r['settings']['precision']}",
        "ct_shape": _ct_shape(files["ct"]),
        "model_grid_shape": _model_shape(files["ct"]),
        "windows": r["windows"],
        "windows_run": r["windows"] - r["windows_skipped"],
        "patch_forwards": r["patch_forwards"],
        "timings_s": r["timings_s"],
        "total_s": sum(r["timings_s"].values()),
        "sample_s": sample_s,
        "engine_s": r["engine_s"],
        "overhead_s": sample_s - r["engine_s"],
        "overhead_fraction": (sample_s - r["engine_s"]) / sample_s if sample_s > 0 else 0.0,
        "step_s": r["step_s"],
        "stage_peak_rss_bytes": r["stage_peak_rss_bytes"],
        "process_peak_rss_bytes": usage.ru_maxrss * 1024,  # Linux: kB
        "load": [load_before, load_average()],
    }


def _ct_shape(path: str) -> list[int]:
    import SimpleITK as sitk

    reader = sitk.ImageFileReader()
    reader.SetFileName(path)
    reader.ReadImageInformation()
    return list(reversed(reader.GetSize()))


def _model_shape(path: str) -> list[int]:
    from diffseg.runtime.preprocess import model_grid_for
    from diffseg.runtime.volume import read_volume

    return list(model_grid_for(read_volume(path), 2.0).shape)


def fit_cost(rows: list[dict]) -> dict:
    """Least squares ``sample_s = a + b · patch_forwards`` (and the same for engine seconds)."""
    f = np.array([r["patch_forwards"] for r in rows], float)
    out = {"runs": len(rows)}
    for key in ("sample_s", "engine_s"):
        y = np.array([r[key] for r in rows], float)
        (b, a), *_ = np.linalg.lstsq(np.stack([f, np.ones_like(f)], 1), y, rcond=None)
        pred = a + b * f
        r2 = 1 - float(((y - pred) ** 2).sum()) / float(((y - y.mean()) ** 2).sum()) if len(y) > 1 else None
        out[key] = {"seconds_per_forward": float(b), "intercept_s": float(a), "r2": r2}
    return out


def _gb(n: float) -> str:
    return f"{n / 1e9:.2f}"


def main() -> int:
    from diffseg.runtime.bench import machine_info, markdown_table

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--parts", nargs="+", default=["sizes", "steps", "samples", "batch"])
    parser.add_argument("--sizes", nargs="+", default=SIZES, help="CT sizes XYxSLICES (default: 5 up to 512x300)")
    parser.add_argument("--sweep-size", default="256x64", help="case of the steps/samples/batch sweeps")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--backend", default="auto")
    parser.add_argument("--steps-list", type=int, nargs="+", default=[1, 2, 5, 10])
    parser.add_argument("--samples-list", type=int, nargs="+", default=[1, 2, 5])
    parser.add_argument("--batch-list", type=int, nargs="+", default=[1, 2, 5, 10, 20])
    parser.add_argument("--batch-steps", type=int, default=2, help="steps of the batch-size sweep (default 2)")
    parser.add_argument("--work", type=Path, default=Path(tempfile.gettempdir()) / "diffseg-scaling")
    parser.add_argument("--name", default="scaling")
    parser.add_argument("--worker", nargs=3, metavar=("CT", "PET", "OUT"), help=argparse.SUPPRESS)
    parser.add_argument("--worker-steps", type=int, default=10, help=argparse.SUPPRESS)
    parser.add_argument("--worker-samples", type=int, default=5, help=argparse.SUPPRESS)
    parser.add_argument("--worker-batch", type=int, default=10, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        ct, pet, out = args.worker
        worker(ct, pet, Path(out), args.backend, args.worker_steps, args.worker_samples, args.worker_batch)
        return 0

    machine = machine_info()
    done: dict[tuple, dict] = {}

    def run(size: str, steps: int = 10, samples: int = 5, batch: int = 10) -> dict:
        key = (size, steps, samples, batch)
        if key not in done:
            files = phantom_files(size, args.seed, args.work)
            out = args.work / "runs" / f"{size}-s{steps}-k{samples}-b{batch}"
            done[key] = {"size": size, **measure(files, out, args.backend, steps, samples, batch)}
            r = done[key]
            print(
                f"{size} steps {steps} samples {samples} batch {batch}: {r['total_s']:.1f} s, sample "
                f"{r['sample_s']:.1f} s, overhead {100 * r['overhead_fraction']:.1f} %, "
                f"peak RSS {_gb(r['process_peak_rss_bytes'])} GB",
                flush=True,
            )
        return done[key]

    parts: dict[str, list[dict]] = {}
    if "sizes" in args.parts:
        parts["sizes"] = [run(s) for s in args.sizes]
    if "steps" in args.parts:
        parts["steps"] = [run(args.sweep_size, steps=n) for n in args.steps_list]
    if "samples" in args.parts:
        parts["samples"] = [run(args.sweep_size, samples=k) for k in args.samples_list]
    if "batch" in args.parts:
        parts["batch"] = [run(args.sweep_size, steps=args.batch_steps, batch=b) for b in args.batch_list]

    at_batch10 = [r for r in done.values() if r["batch"] == 10 and r["patch_forwards"] > 0]
    fit = fit_cost(at_batch10) if len(at_batch10) >= 2 else None
    largest = max(done.values(), key=lambda r: np.prod(r["ct_shape"]))
    all_rows = list(done.values())
    summary = {
        "fit_batch10": fit,
        "largest_case": {
            "ct_shape": largest["ct_shape"],
            "process_peak_rss_bytes": largest["process_peak_rss_bytes"],
            "meets_4GB": largest["process_peak_rss_bytes"] <= MEMORY_TARGET_BYTES,
        },
        "overhead_fraction_max": max(r["overhead_fraction"] for r in all_rows),
        "overhead_fraction_median": float(np.median([r["overhead_fraction"] for r in all_rows])),
        "overhead_meets_5pct": all(r["overhead_fraction"] <= OVERHEAD_TARGET for r in all_rows),
    }
    doc = {"machine": machine, "seed": args.seed, "backend": args.backend, "parts": parts, "summary": summary}

    def table(rows: list[dict], first: str) -> str:
        header = [
            first,
            "CT z×y×x",
            "model grid z×y×x",
            "windows run",
            "patch-fwd",
            "total s",
            "sample s",
            "engine s",
            "overhead",
            "s/step",
            "peak RSS GB",
        ]
        body = []
        for r in rows:
            label = {"sizes": r["size"], "steps": r["steps"], "samples": r["samples"], "batch": r["batch"]}[first]
            body.append(
                [
                    label,
                    "×".join(map(str, r["ct_shape"])),
                    "×".join(map(str, r["model_grid_shape"])),
                    f"{r['windows_run']}/{r['windows']}",
                    r["patch_forwards"],
                    f"{r['total_s']:.1f}",
                    f"{r['sample_s']:.1f}",
                    f"{r['engine_s']:.1f}",
                    f"{100 * r['overhead_fraction']:.1f} %",
                    f"{r['step_s']:.2f}" if r["step_s"] else "-",
                    _gb(r["process_peak_rss_bytes"]),
                ]
            )
        return markdown_table(header, body)

    loads = [v[0] for r in all_rows for v in r["load"] if v]
    md = [
        f"Backend `{args.backend}` ({all_rows[0]['backend']}), model defaults unless varied (DDIM 10 steps × 5 "
        f"samples, batch 10), phantom seed {args.seed}; each run a fresh process.\n",
        f"Machine: {machine_header(machine)}; 1-min load average {min(loads):.1f}–{max(loads):.1f} during the runs "
        "(shared machine).\n",
        f"Command: `{command_line()}`\n",
    ]
    titles = {"sizes": "Volume size (CT xy×slices)", "steps": "Steps", "samples": "Samples", "batch": "Batch size"}
    for name, rows in parts.items():
        md.append(f"### {titles[name]}\n\n{table(rows, name)}\n")
    if fit:
        s, e = fit["sample_s"], fit["engine_s"]
        md.append(
            f"Fit over {fit['runs']} runs at batch 10: sampling = {s['intercept_s']:.2f} s + "
            f"{1e3 * s['seconds_per_forward']:.1f} ms × patch-forwards (R² {s['r2']:.4f}); engine alone "
            f"{1e3 * e['seconds_per_forward']:.1f} ms per patch-forward.\n"
        )
    peaks = largest["stage_peak_rss_bytes"]
    md.append(
        f"Peak RSS by stage, {'×'.join(map(str, largest['ct_shape']))} case (GB, sampled every 10 ms): "
        + ", ".join(f"{k} {_gb(v)}" for k, v in peaks.items() if v is not None)
        + ".\n"
    )
    lc = summary["largest_case"]
    md.append(
        f"Targets: peak RSS of the {'×'.join(map(str, lc['ct_shape']))} case {_gb(lc['process_peak_rss_bytes'])} GB "
        f"(≤ 4 GB: {'met' if lc['meets_4GB'] else 'MISSED'}); overhead outside the engine median "
        f"{100 * summary['overhead_fraction_median']:.1f} %, max {100 * summary['overhead_fraction_max']:.1f} % "
        f"(≤ 5 %: {'met' if summary['overhead_meets_5pct'] else 'MISSED'}).\n"
    )
    json_path, md_path = write_results(args.name, doc, "\n".join(md))
    print("\n".join(md))
    print(f"wrote {json_path} and {md_path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
