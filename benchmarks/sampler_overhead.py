"""Time the sampling loops outside the engine: tiling, batching, blending, scheduler steps, noise draws.

Two measurements per loop order:

- ``null`` engine: a denoiser that returns a preallocated array, so the loop's wall time is all overhead;
- ``onnxruntime`` (optional, ``--real``): the shipped default model on onnxruntime CPU, to put the overhead beside a
  real engine time (``overhead_fraction`` = 1 − engine seconds / loop seconds).

Usage::

    python benchmarks/sampler_overhead.py                # null engine, HECKTOR-like sizes
    python benchmarks/sampler_overhead.py --real         # plus the default model on onnxruntime CPU (slower)
    python benchmarks/sampler_overhead.py --real --backend torch --precision fp16 --real-steps 10 --real-volume 144

Writes ``benchmarks/results/sampler_overhead.json`` and prints one line per run.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np

from diffseg.runtime.diffusion_schedule import SchedulerConfig
from diffseg.runtime.sampling import LOOP_ORDERS, SamplerOptions, WindowOptions

# (name, volume, patch, samples, steps, batch): 144 mm HECKTOR box at 1 mm with 96³ windows (8 windows), and at 2 mm
# with the default package's 64³ windows (8 windows)
NULL_CASES = [
    ("hecktor-1mm-96", (144, 144, 144), (96, 96, 96), 5, 10, 8),
    ("hecktor-2mm-64", (72, 72, 72), (64, 64, 64), 5, 10, 10),
]


def null_engine(out_channels: int, patch: tuple[int, ...], batch: int):
    buffer = np.zeros((batch, out_channels, *patch), np.float32)

    def run(x: np.ndarray, t: np.ndarray) -> np.ndarray:
        return buffer[: x.shape[0]]

    return run


def run_case(name, volume, patch, samples, steps, batch, run, config, engine, threads=0):
    image = np.random.default_rng(0).standard_normal((2, *volume)).astype(np.float32)
    rows = []
    for order, loop in LOOP_ORDERS.items():
        options = SamplerOptions(steps=steps, num_samples=samples, eta=0.0, threads=threads)
        result = loop(image, run, config, options, WindowOptions(patch_size=patch, batch_size=batch))
        overhead = result.total_seconds - result.engine_seconds
        row = {
            "case": name,
            "engine": engine,
            "loop_order": order,
            "volume": volume,
            "patch": patch,
            "samples": samples,
            "steps": steps,
            "batch": batch,
            "threads": options.num_threads,
            "windows": result.windows,
            "engine_calls": result.engine_calls,
            "total_s": round(result.total_seconds, 4),
            "engine_s": round(result.engine_seconds, 4),
            "overhead_s": round(overhead, 4),
            "overhead_per_step_s": round(overhead / steps, 4),
            "overhead_per_window_sample_ms": round(1e3 * overhead / (steps * result.windows * samples), 3),
            "overhead_fraction": round(result.overhead_fraction, 4),
        }
        print(json.dumps(row))
        rows.append(row)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--real", action="store_true", help="also run the default model on onnxruntime CPU")
    parser.add_argument("--real-steps", type=int, default=2, help="steps for the real-engine run (default 2)")
    parser.add_argument("--real-volume", type=int, default=72, help="cube side of the real-engine volume (default 72)")
    parser.add_argument("--backend", default="onnxruntime", help="backend for --real (default onnxruntime)")
    parser.add_argument("--precision", default="fp32", help="precision for --real (default fp32)")
    parser.add_argument("--threads", type=int, default=0, help="numpy threads between engine calls (0 = automatic)")
    parser.add_argument("--out", default=str(Path(__file__).parent / "results" / "sampler_overhead.json"))
    args = parser.parse_args()
    rows = []
    for name, volume, patch, samples, steps, batch in NULL_CASES:
        config = SchedulerConfig()
        run = null_engine(1, patch, batch)
        rows += run_case(name, volume, patch, samples, steps, batch, run, config, "null", args.threads)
    if args.real:
        from diffseg.runtime.backends import get_backend
        from diffseg.runtime.manifest import load_package

        package = load_package("default")
        m = package.manifest
        keys = set(SchedulerConfig.__dataclass_fields__)
        config = SchedulerConfig.from_dict({k: v for k, v in m.diffusion.items() if k in keys})
        backend = get_backend(args.backend, package, args.precision)
        patch, side = tuple(m.patch_size), args.real_volume
        engine = f"{args.backend}-{args.precision}-{backend.device}"
        case = f"default-2mm-{side}"
        rows += run_case(case, (side,) * 3, patch, 5, args.real_steps, 10, backend.run, config, engine, args.threads)
    report = {
        "command": " ".join(["python benchmarks/sampler_overhead.py", *sys.argv[1:]]),
        "machine": {"cpu_count": os.cpu_count(), "platform": platform.platform(), "numpy": np.__version__},
        "date": time.strftime("%Y-%m-%d"),
        "rows": rows,
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=1) + "\n")


if __name__ == "__main__":
    main()
