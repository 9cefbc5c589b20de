"""Parity of researchers' model kinds on every CPU backend: the table in docs/models.md.

Each kind of ``tests/export/test_model_kinds.py`` (the same definitions: imported from there, so the table and the
test cannot drift) is exported with random weights, run by ``Segmenter`` at fp32 on onnxruntime, OpenVINO and torch
(its ``torch.export`` program), and compared with the plain PyTorch reference loop (``diffseg.export.reference``) on
the model input the runtime prepared: the largest difference of the mean probability, the limit the test holds it
to, and the sampling seconds.

    python benchmarks/model_parity.py    # -> benchmarks/results/model_parity.{json,md}
"""

from __future__ import annotations

import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests" / "export"))

from _common import machine_header, write_results

BACKENDS = ("onnxruntime", "openvino", "torch")


def main() -> int:
    import test_model_kinds as kinds

    from diffseg.runtime.bench.machine import machine_info
    from diffseg.runtime.cases import LoadedCase
    from diffseg.runtime.pipeline import prepare_case, sample_case
    from diffseg.runtime.segmenter import Segmenter

    machine = machine_info()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for name, spec in kinds.KINDS.items():
            targets = len(spec["targets"])
            start = time.perf_counter()
            model, pkg = kinds.export_kind(name, spec, Path(tmp))
            export_seconds = time.perf_counter() - start
            volumes = spec["volumes"]()
            for backend in BACKENDS:
                with Segmenter(pkg, backend=backend, precision="fp32", retire_after=0) as seg:
                    prepared = prepare_case(seg.package.manifest, seg.options, LoadedCase(dict(volumes)), seed=7)
                    sampled = sample_case(seg, prepared.model_input, prepared.seed)
                want = kinds.reference_of(spec, model, prepared.model_input.image).mean(axis=0)
                diff = float(np.abs(sampled.samples.mean - want).max())
                rows.append(
                    {
                        "model": name,
                        "inputs": [entry["code"] for entry in spec["inputs"]],
                        "targets": targets,
                        "activation": spec["activation"],
                        "blending": spec["blending"],
                        "backend": backend,
                        "max_abs_diff": diff,
                        "reference_std": round(float(want.std()), 4),  # not constant: the diff means something
                        "limit": kinds.TOLERANCE[backend],
                        "passed": diff <= kinds.TOLERANCE[backend],
                        "sample_seconds": round(sampled.seconds, 3),
                        "export_seconds": round(export_seconds, 1),
                        "windows": sampled.samples.windows,
                    }
                )
                print(f"{name:20s} {backend:12s} max |diff| {diff:.2e} (limit {kinds.TOLERANCE[backend]:.0e})")
    lines = [
        "# Model kinds on every CPU backend against the reference loop (fp32)",
        "",
        f"Machine: {machine_header(machine)}. Command: `python benchmarks/model_parity.py`. Random weights, 16³ "
        "patches (1 × 16² for the 2D model), 2 DDIM steps, 2 samples, seed 7; max |diff| of the mean probability "
        "against `diffseg.export.reference.reference_sample` on the runtime's model input.",
        "",
        "| model | inputs | targets | activation, blending | backend | max abs diff | limit | std of the reference | "
        "sample s |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['model']} | {', '.join(r['inputs'])} | {r['targets']} | {r['activation']}, {r['blending']} | "
            f"{r['backend']} | {r['max_abs_diff']:.1e} | {r['limit']:.0e} | {r['reference_std']} | "
            f"{r['sample_seconds']} |"
        )
    write_results("model_parity", {"machine": machine, "rows": rows}, "\n".join(lines))
    return 0 if all(r["passed"] for r in rows) else 1


if __name__ == "__main__":
    raise SystemExit(main())
