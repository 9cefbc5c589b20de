"""Every backend and precision available here on the same case: engine load, per-call latency, end to end, Dice.

Each (backend, precision) runs in a fresh process: ``python -m diffseg bench --backend B --precision P`` on the same
phantom (package defaults: DDIM 10 steps × 5 samples, batch 10), with denoiser calls timed at batch 1 and 10 and the
achieved GFLOP/s set against the peak measured at that precision. Pairs that cannot run here are listed with the
reason the runtime gives (no silent fallback).

    python benchmarks/backends.py                     # phantom seed 1, every pair available
    python benchmarks/backends.py --seeds 1 2 --steps 2
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

from _common import command_line, load_average, machine_header, write_results

PAIRS = [
    ("openvino", "bf16"),
    ("openvino", "fp32"),
    ("onnxruntime", "fp32"),
    ("torch", "fp32"),
    ("torch", "fp16"),
    ("onnxruntime-cuda", "fp16"),
    ("onnxruntime-cuda", "fp32"),
    ("onnxruntime-tensorrt", "fp16"),
    ("tensorrt", "fp16"),
]


def bench_pair(backend: str, precision: str, args, out: Path) -> dict:
    cmd = [sys.executable, "-m", "diffseg", "bench", "--backend", backend, "--precision", precision, "-o", str(out)]
    cmd += ["--seeds", *map(str, args.seeds), "--batch-sizes", *map(str, args.batch_sizes)]
    cmd += ["--repeats", str(args.repeats), "--warmup", "1", "--no-plot", "--no-write"]
    if args.steps:
        cmd += ["--steps", str(args.steps)]
    if args.ct_size:
        cmd += ["--ct-size", str(args.ct_size), "--ct-slices", str(args.ct_slices)]
    load_before = load_average()
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        reason = (proc.stderr.strip().splitlines() or [f"exit {proc.returncode}"])[-1]
        return {"backend": backend, "precision": precision, "unavailable": reason}
    report = json.loads((out / "bench.json").read_text())
    return {"backend": backend, "precision": precision, "report": report, "load": [load_before, load_average()]}


def main() -> int:
    from diffseg.runtime.backends import available_backends
    from diffseg.runtime.bench import machine_info, markdown_table

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, nargs="+", default=[1])
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 10])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--steps", type=int, help="DDIM steps (default: the package's)")
    parser.add_argument("--ct-size", type=int, help="phantom CT matrix (default: the phantom's 256)")
    parser.add_argument("--ct-slices", type=int, default=64, help="phantom CT slices with --ct-size (default 64)")
    parser.add_argument("--name", default="backends")
    args = parser.parse_args()

    machine = machine_info()
    reasons = available_backends()
    rows = []
    with tempfile.TemporaryDirectory(prefix="diffseg-backends-") as tmp:
        for backend, precision in PAIRS:
            if reasons.get(backend):
                rows.append({"backend": backend, "precision": precision, "unavailable": reasons[backend]})
                continue
            row = bench_pair(backend, precision, args, Path(tmp) / f"{backend}-{precision}")
            rows.append(row)
            if "report" in row:
                cases = row["report"]["cases"]
                print(f"{backend} {precision}: {sum(c['total_s'] for c in cases):.1f} s end to end", flush=True)
            else:
                print(f"{backend} {precision}: unavailable ({row['unavailable']})", flush=True)

    ran = [r for r in rows if "report" in r]
    header = ["backend", "precision", "load s", *(f"call p50 s (batch {b})" for b in args.batch_sizes)]
    header += ["ms / patch (largest batch)", "GFLOP/s", "% of peak", "end to end s", "sample s", "overhead", "Dice"]
    body = []
    for r in ran:
        rep = r["report"]
        den = {d["batch"]: d for d in rep["denoiser"]}
        big = den[max(den)]
        cases = rep["cases"]
        total = sum(c["total_s"] for c in cases)
        sample = sum(c["timings_s"]["sample"] for c in cases)
        engine = sum(c["engine_s"] for c in cases)
        dice = [c["dice"] for c in cases if c.get("dice") is not None]
        frac = big.get("fraction_of_peak")
        body.append(
            [
                r["backend"],
                f"{r['precision']} ({rep['settings']['device']})",
                f"{rep['load']['engine_s']:.2f}",
                *(f"{den[b]['latency_s']['p50']:.3f}" for b in args.batch_sizes),
                f"{1e3 * big['per_patch_s']:.0f}",
                f"{big.get('gflops', 0):.1f}",
                f"{100 * frac:.0f} %" if frac else "-",
                f"{total:.1f}",
                f"{sample:.1f}",
                f"{100 * (sample - engine) / sample:.1f} %" if sample else "-",
                " ".join(f"{d:.4f}" for d in dice),
            ]
        )
    peaks = {
        r["precision"]: r["report"]["peak"] for r in ran if r["report"].get("peak") and "gflops" in r["report"]["peak"]
    }
    loads = [v[0] for r in ran for v in r["load"] if v]
    skipped = [f"`{r['backend']} {r['precision']}`: {r['unavailable']}" for r in rows if "unavailable" in r]
    md = [
        f"Same case for every backend: phantom seed(s) {args.seeds}, package defaults "
        f"({'DDIM ' + str(args.steps) + ' steps' if args.steps else 'DDIM 10 steps'} × 5 samples, batch 10); "
        "a fresh process per backend; write stage left out.\n",
        f"Machine: {machine_header(machine)}"
        + (f"; 1-min load average {min(loads):.1f}–{max(loads):.1f} during the runs (shared machine)" if loads else "")
        + ".\n",
        f"Command: `{command_line()}`\n",
        markdown_table(header, body) + "\n",
        "Peaks: " + "; ".join(f"{p}: {v['gflops']:.0f} GFLOP/s ({v['method']})" for p, v in peaks.items()) + ".\n",
        "Not run here:\n\n" + "\n".join(f"- {s}" for s in skipped) + "\n" if skipped else "",
    ]
    doc = {"machine": machine, "seeds": args.seeds, "rows": rows}
    json_path, md_path = write_results(args.name, doc, "\n".join(md))
    print("\n".join(md))
    print(f"wrote {json_path} and {md_path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
