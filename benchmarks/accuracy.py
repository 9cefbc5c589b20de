"""Accuracy of a model package on the held-out test phantoms, two ways, with one command:

1. ``reference``: the plain PyTorch sliding-window DDIM loop (``diffseg.export.reference``) on the model grid,
   mean probability resampled onto the CT grid by SimpleITK, threshold 0.5 (the export issue's check);
2. ``predict``: the runtime as a user runs it (``Segmenter`` with the package's defaults, auto backend), which also
   removes components under the minimum lesion volume.

Dice is computed on the CT grid against the phantom's ground truth. Cases without any tumour have no Dice: they
report the false-positive volume instead. Summary: mean Dice over cases with tumour, and the aggregate Dice
(2·Σ|P∩T| / (Σ|P| + Σ|T|) over all cases, as HECKTOR ranks).

    python benchmarks/accuracy.py                       # whole test split (20 cases), both paths
    python benchmarks/accuracy.py --seeds 1 2 --paths reference
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import numpy as np

RESULTS = Path(__file__).resolve().parent / "results"


def reference_probability(
    model, case, manifest, seed: int, steps: int, samples: int, device: str = "cpu"
) -> np.ndarray:
    """Mean probability of the PyTorch reference loop, on the CT grid (the runtime's preparation of the input, on
    the whole model grid, as the research loop runs it)."""
    from diffseg.export.reference import ReferenceSettings, reference_sample
    from diffseg.runtime.preprocess import prepare_input, resample_to

    volumes = {"CT": case.ct, "PT": case.pet}
    model_input = prepare_input(
        volumes, manifest.modalities, manifest.normalisation, manifest.spacing_mm, crop_to_body=False
    )
    d = manifest.defaults
    settings = ReferenceSettings(
        steps=steps,
        samples=samples,
        overlap=d["overlap"],
        prediction_type=manifest.diffusion["prediction_type"],
        timestep_spacing=d["timestep_spacing"],
        batch_size=2 * samples,
    )
    prob = reference_sample(
        model.to(device), model_input.image, tuple(manifest.patch_size), settings, seed=seed, device=device
    ).mean(0)
    return resample_to(model_input.uncrop(prob.astype(np.float32)), case.ct.grid, "linear").array


def main() -> int:
    from diffseg.export.train import dice  # numpy only (the runtime's module loads the compiled extension)
    from diffseg.runtime.environment import cpu_info
    from diffseg.runtime.manifest import load_package
    from diffseg.runtime.phantom import make_phantom, split_seeds

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="default")
    parser.add_argument("--seeds", type=int, nargs="+", default=split_seeds("test"))
    parser.add_argument("--paths", nargs="+", default=["reference", "predict"], choices=["reference", "predict"])
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--samples", type=int, default=5)
    parser.add_argument("--device", default="cpu", help="device of the reference loop (cpu, cuda)")
    parser.add_argument("--out", type=Path, default=None, help="JSON output (default: results/accuracy_<paths>.json)")
    args = parser.parse_args()

    package = load_package(args.model)
    m = package.manifest
    model = seg = None
    if "reference" in args.paths:
        import torch

        from diffseg.export.architectures import build_model

        arch = dict(m.raw["architecture"])
        model = build_model({"architecture": arch.pop("type"), "model": arch})
        model.load_state_dict(torch.load(package.files["torch"].path, weights_only=True))
        model.eval()
    if "predict" in args.paths:
        from diffseg.runtime.segmenter import Segmenter

        seg = Segmenter(args.model, backend="auto", steps=args.steps, samples=args.samples)
    rows = []
    for seed in args.seeds:
        case = make_phantom(seed)
        truth = case.mask.array.astype(bool)
        row = {
            "seed": seed,
            "truth_voxels": int(truth.sum()),
            "truth_ml": round(float(truth.sum() * case.ct.voxel_volume_ml), 3),
            "lesions": len(case.lesions),
        }
        for path in args.paths:
            start = time.perf_counter()
            if path == "reference":
                pred = reference_probability(model, case, m, seed, args.steps, args.samples, args.device) >= 0.5
            else:
                pred = seg.predict(case.ct, case.pet).mask.array.astype(bool)
            row[path] = {
                "dice": round(dice(pred, truth), 4) if truth.any() else None,
                "intersection": int(np.logical_and(pred, truth).sum()),
                "predicted": int(pred.sum()),
                "false_positive_ml": round(float(np.logical_and(pred, ~truth).sum() * case.ct.voxel_volume_ml), 3),
                "seconds": round(time.perf_counter() - start, 1),
            }
        rows.append(row)
        print(json.dumps(row), flush=True)

    summary = {}
    for path in args.paths:
        with_tumour = [r[path]["dice"] for r in rows if r[path]["dice"] is not None]
        inter = sum(r[path]["intersection"] for r in rows)
        total = sum(r[path]["predicted"] + r["truth_voxels"] for r in rows)
        summary[path] = {
            "mean_dice_cases_with_tumour": round(float(np.mean(with_tumour)), 4) if with_tumour else None,
            "cases_with_tumour": len(with_tumour),
            "aggregate_dice": round(2 * inter / total, 4) if total else None,
            "false_positive_ml_in_cases_without_tumour": [
                r[path]["false_positive_ml"] for r in rows if r[path]["dice"] is None
            ],
        }
    info = cpu_info()
    if args.device.startswith("cuda"):
        import torch

        info["model"] = f"{torch.cuda.get_device_name(0)} (reference loop), host {info['model']}"
    doc = {
        "model": m.name,
        "steps": args.steps,
        "samples": args.samples,
        "seeds": args.seeds,
        "machine": f"{info['model']}, {info['logical_cores']} cores",
        "python": platform.python_version(),
        "backend_predict": seg.settings()["backend"] + " " + seg.settings()["precision"] if seg else None,
        "summary": summary,
        "cases": rows,
    }
    args.out = args.out or RESULTS / f"accuracy_{'_'.join(args.paths)}.json"
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(doc, indent=2) + "\n")
    lines = [
        "| path | mean Dice (cases with tumour) | aggregate Dice | FP ml in tumour-free cases |",
        "|---|---|---|---|",
    ]
    for path, s in summary.items():
        lines.append(
            f"| {path} | {s['mean_dice_cases_with_tumour']} ({s['cases_with_tumour']} cases) | "
            f"{s['aggregate_dice']} | {s['false_positive_ml_in_cases_without_tumour']} |"
        )
    args.out.with_suffix(".md").write_text(
        f"Model `{m.name}`, DDIM {args.steps} steps × {args.samples} samples, test seeds {args.seeds[0]}–"
        f"{args.seeds[-1]}, {doc['machine']}.\n\n" + "\n".join(lines) + "\n"
    )
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
