"""The OpenVINO graph rewrite (narrow convolutions as depthwise + 1×1 sum) against the model compiled as read.

Both engines load the default package in one process at the same precision and settings (two throughput streams, one
patch per request); calls of ``--batch`` patches alternate between them for ``--rounds`` rounds, and the median
per-patch time of each is kept, with the per-round ratio (the two calls of a round run back to back, so the machine's
load drifts less within a pair than across the run). The outputs of the two are compared on the same input.

    python benchmarks/openvino_graph.py
"""

from __future__ import annotations

import argparse
import statistics
import time

import numpy as np
from _common import load_average, machine_header, write_results


def main() -> int:
    from diffseg.runtime.backends.openvino_backend import OpenVinoBackend
    from diffseg.runtime.bench import machine_info, markdown_table
    from diffseg.runtime.manifest import load_package

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="default")
    parser.add_argument("--batch", type=int, default=10)
    parser.add_argument("--rounds", type=int, default=21)
    parser.add_argument("--precisions", nargs="+", default=["bf16", "fp32"])
    args = parser.parse_args()

    package = load_package(args.model)
    m = package.manifest
    rng = np.random.default_rng(0)
    x = rng.standard_normal((args.batch, m.in_channels, *m.patch_size), dtype=np.float32)
    t = rng.uniform(0, m.diffusion["num_train_timesteps"] - 1, args.batch).astype(np.float32)
    machine, loads, rows = machine_info(), [load_average()], []
    for precision in args.precisions:
        engines = {
            "as read": OpenVinoBackend(package, precision, split_narrow_convolutions=False),
            "narrow convolutions split": OpenVinoBackend(package, precision),
        }
        outputs = {name: e.run(x, t) for name, e in engines.items()}  # also the warm-up call
        ms: dict[str, list[float]] = {name: [] for name in engines}
        for _ in range(args.rounds):
            for name, engine in engines.items():
                start = time.perf_counter()
                engine.run(x, t)
                ms[name].append((time.perf_counter() - start) / args.batch * 1e3)
        plain, split = (statistics.median(v) for v in ms.values())
        paired = [p / q for p, q in zip(*ms.values(), strict=True)]
        a, b = outputs.values()
        rows.append(
            {
                "precision": precision,
                "ms_per_patch": {name: statistics.median(v) for name, v in ms.items()},
                "ms_per_patch_runs": ms,
                "speedup": plain / split,
                "paired_speedup_median": statistics.median(paired),
                "rounds_faster": sum(r > 1 for r in paired),
                "rewritten": engines["narrow convolutions split"].rewritten,
                "max_abs_difference": float(np.abs(a - b).max()),
                "max_abs_output": float(np.abs(a).max()),
            }
        )
        for e in engines.values():
            e.close()
        loads.append(load_average())
        print(f"{precision}: {plain:.1f} -> {split:.1f} ms per patch ({plain / split:.2f}x)", flush=True)
    doc = {"machine": machine, "model": m.name, "batch": args.batch, "rounds": args.rounds, "results": rows}
    table = [
        [
            r["precision"],
            str(r["rewritten"]),
            f"{r['ms_per_patch']['as read']:.1f}",
            f"{r['ms_per_patch']['narrow convolutions split']:.1f}",
            f"{r['speedup']:.2f}×",
            f"{r['paired_speedup_median']:.2f}× ({r['rounds_faster']} of {args.rounds} faster)",
            f"{r['max_abs_difference']:.2g} (of {r['max_abs_output']:.2g})",
        ]
        for r in rows
    ]
    ones = [v[0] for v in loads if v]
    md = (
        f"OpenVINO, model `{m.name}`, calls of {args.batch} patches, median of {args.rounds} alternating rounds.\n\n"
        f"Machine: {machine_header(machine)}; 1-min load average {min(ones):.1f}–{max(ones):.1f}.\n\n"
        "Command: `python benchmarks/openvino_graph.py`\n\n"
        + markdown_table(
            [
                "precision",
                "convolutions split",
                "ms / patch as read",
                "ms / patch split",
                "speed-up (medians)",
                "per-round speed-up, median",
                "max abs Δ output",
            ],
            table,
        )
    )
    json_path, md_path = write_results("openvino_graph", doc, md)
    print(md)
    print(f"wrote {json_path} and {md_path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
