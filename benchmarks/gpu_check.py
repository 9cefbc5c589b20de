"""GPU check of the default model (run by ``benchmarks/gpu_check.sh`` on a lent GPU; about 1–2 minutes).

Engines timed (whatever is installed; nothing is pip-installed):

- ``torch fp16`` — the runtime's torch backend, CUDA graphs (one per batch size), and the same without graphs;
- ``torch fp32`` — the trained network in eager fp32 on the GPU with TF32 off (the reference for the fp16 checks;
  the runtime's torch backend runs fp32 on the CPU only);
- ``onnxruntime-cuda`` fp16/fp32, ``onnxruntime-tensorrt`` fp16 and ``tensorrt`` fp16 where their libraries and
  providers are present.

Per engine: one denoiser call at batch 1, 10, 20 (p50/p95/min/max after warm-up, host arrays in and out as the runtime
uses them), achieved GFLOP/s against the measured ``torch.matmul`` peak; relative error of the output against torch
fp32 on real windows of a phantom (t = 999, 500, 100); and the whole sampled phantom case (DDIM 10 × 5, step-major,
the runtime's numpy sampler) with Dice of the mask against the fp32 mask and against the ground truth.

Resampling the phantom onto the model grid uses the runtime's kernels when ``diffseg._ext`` imports (the shell script
tries to build it), else trilinear ``torch.nn.functional.grid_sample`` on the GPU (both precisions then see the same
input, which is what the comparison needs). Writes ``gpu_check.json`` and ``gpu_check.md`` into ``--out``.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import sys
import time
import traceback
from pathlib import Path

import numpy as np

BATCHES = (1, 10, 20)


def log(msg: str) -> None:
    print(f"[gpu_check {time.strftime('%H:%M:%S')}] {msg}", flush=True)


class TorchFp32Cuda:
    """The trained network in eager fp32 on the GPU (TF32 off), behind the runtime's ``run(x, t)`` interface."""

    name, precision = "torch", "fp32"

    def __init__(self, package, device: str) -> None:
        import torch

        from diffseg.export.architectures import build_model

        torch.backends.cudnn.allow_tf32 = False
        torch.backends.cuda.matmul.allow_tf32 = False
        arch = dict(package.manifest.raw["architecture"])
        self.model = build_model({"architecture": arch.pop("type"), "model": arch})
        self.model.load_state_dict(torch.load(package.files["torch"].path, map_location="cpu", weights_only=True))
        self.model = self.model.eval().to(device)
        self.torch, self.device = torch, device

    def run(self, x: np.ndarray, t: np.ndarray) -> np.ndarray:
        torch = self.torch
        with torch.inference_mode():
            y = self.model(torch.from_numpy(x).to(self.device), torch.from_numpy(t).to(self.device))
        return y.cpu().numpy()

    def close(self) -> None:
        self.model = None


def resample_torch(volume, grid, default: float, mode: str, device: str) -> np.ndarray:
    """``volume`` onto ``grid`` (identity direction) with ``grid_sample``; outside the volume: ``default``."""
    import torch

    axes = [np.asarray(grid.origin[a]) + np.arange(grid.size_xyz[a]) * grid.spacing[a] for a in range(3)]
    zz, yy, xx = np.meshgrid(axes[2], axes[1], axes[0], indexing="ij")
    idx = volume.physical_to_index(np.stack([xx, yy, zz], axis=-1))  # continuous (x, y, z)
    size = np.array(volume.size_xyz, dtype=np.float64)
    norm = 2.0 * idx / np.maximum(size - 1, 1) - 1.0
    g = torch.from_numpy(norm.astype(np.float32))[None].to(device)
    src = torch.from_numpy(volume.array.astype(np.float32) - default)[None, None].to(device)
    out = torch.nn.functional.grid_sample(src, g, mode=mode, padding_mode="zeros", align_corners=True)
    return out[0, 0].cpu().numpy() + np.float32(default)


def model_grid_case(case, manifest, device: str, have_ext: bool):
    """(image [C, z, y, x] on the body box, candidate mask, truth on the box, resampling used)."""
    from diffseg.runtime.preprocess import model_grid_for, normalise
    from diffseg.runtime.segmenter import body_box

    grid = model_grid_for(case.ct, manifest.spacing_mm)
    norms = manifest.normalisation
    sources = {"CT": case.ct, "PT": case.pet}
    if have_ext:
        from diffseg.runtime.preprocess import resample_to

        raw = {c: resample_to(sources[c], grid, "linear", default=norms[c].low).array for c in manifest.modalities}
        truth = resample_to(case.mask, grid, "nearest").array
        how = "diffseg._ext (SimpleITK-exact)"
    else:
        raw = {c: resample_torch(sources[c], grid, norms[c].low, "bilinear", device) for c in manifest.modalities}
        truth = resample_torch(case.mask, grid, 0.0, "nearest", device).round().astype(np.uint8)
        how = "torch grid_sample (no diffseg._ext here)"
    box = body_box(raw["CT"])
    image = np.stack([normalise(raw[c][box], norms[c]) for c in manifest.modalities]).astype(np.float32)
    rule = manifest.defaults.get("candidate")
    candidate = raw["PT"][box] >= np.float32(rule["min_value"]) if rule else None
    return image, candidate, truth[box].astype(bool), how


def dice(a: np.ndarray, b: np.ndarray) -> float:
    denom = int(a.sum()) + int(b.sum())
    return 1.0 if denom == 0 else 2.0 * int(np.logical_and(a, b).sum()) / denom


def windows(image: np.ndarray, patch: tuple[int, ...], count: int, rng) -> np.ndarray:
    """``count`` image windows (padded where the image is smaller than the patch) with a noisy-mask channel."""
    pad = [(0, 0)] + [(0, max(p - s, 0)) for s, p in zip(image.shape[1:], patch, strict=True)]
    img = np.pad(image, pad)
    out = np.empty((count, image.shape[0] + 1, *patch), np.float32)
    for i in range(count):
        starts = [int(rng.integers(0, s - p + 1)) for s, p in zip(img.shape[1:], patch, strict=True)]
        sl = tuple(slice(s, s + p) for s, p in zip(starts, patch, strict=True))
        out[i, :-1] = img[(slice(None), *sl)]
        out[i, -1] = rng.standard_normal(patch, dtype=np.float32)
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--seed", type=int, default=1, help="held-out test phantom seed (default 1)")
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--steps", type=int, help="DDIM steps (default: the package's)")
    parser.add_argument("--samples", type=int, help="samples (default: the package's)")
    parser.add_argument("--batches", type=int, nargs="+", default=list(BATCHES), help="batch sizes (1 10 20)")
    parser.add_argument("--resample", choices=["auto", "torch"], default="auto", help="torch: skip diffseg._ext")
    parser.add_argument("--allow-cpu", action="store_true", help="smoke-test the script without a GPU (fp32 only)")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)

    import torch

    from diffseg.runtime.backends import BackendUnavailableError, get_backend
    from diffseg.runtime.bench import count_flops, measure_peak_gflops, time_calls
    from diffseg.runtime.manifest import load_package
    from diffseg.runtime.phantom import make_phantom
    from diffseg.runtime.sampling import sample_step_major
    from diffseg.runtime.segmenter import Segmenter

    cuda = torch.cuda.is_available()
    if not cuda and not args.allow_cpu:
        log("no CUDA device visible to torch; nothing to check (use --allow-cpu for a smoke test)")
        return 1
    device = "cuda" if cuda else "cpu"
    try:
        from diffseg import _ext  # noqa: F401

        ext_built = True
    except ImportError:
        ext_built = False  # the sampler's step is a compiled kernel: no sampled case without it
    have_ext = ext_built and args.resample == "auto"
    try:
        import onnxruntime as ort

        providers = ort.get_available_providers()
    except ImportError:
        providers = []
    env = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "cudnn": torch.backends.cudnn.version() if cuda else None,
        "gpu": torch.cuda.get_device_name() if cuda else None,
        "capability": ".".join(map(str, torch.cuda.get_device_capability())) if cuda else None,
        "onnxruntime_providers": providers,
        "diffseg_ext": have_ext,
        "cpu_count": os.cpu_count(),
    }
    log(f"environment: {env}")
    doc: dict = {"environment": env, "engines": {}, "errors": {}}

    package = load_package("default")
    m = package.manifest
    patch = tuple(m.patch_size)
    try:
        flops = count_flops(package.engine("fp32").path).flops
        flops_how = "ONNX graph (diffseg.runtime.bench.count_flops)"
    except Exception as exc:  # onnx not installed here: torch's counter on the same network
        from torch.utils.flop_counter import FlopCounterMode

        ref = TorchFp32Cuda(package, "cpu")
        with FlopCounterMode(display=False) as counter, torch.no_grad():
            ref.model(torch.zeros(1, m.in_channels, *patch), torch.zeros(1))
        flops, flops_how = counter.get_total_flops(), f"torch FlopCounterMode ({exc})"
    doc["flops_per_patch"] = {"flops": flops, "method": flops_how}
    peaks = {}
    if cuda:
        for prec in ("fp16", "fp32"):
            try:
                peaks[prec] = measure_peak_gflops("cuda", prec, repeats=3)
            except Exception as exc:
                doc["errors"][f"peak {prec}"] = repr(exc)
    doc["peaks"] = peaks

    # the case: model-grid image, candidate windows, ground truth
    case = make_phantom(args.seed)
    image, candidate, truth, how = model_grid_case(case, m, device, have_ext)
    doc["case"] = {"seed": args.seed, "ct_shape": list(case.ct.shape), "model_box": list(image.shape[1:]), "how": how}
    log(f"phantom {args.seed}: CT {case.ct.shape}, model box {image.shape[1:]} ({how})")
    rng = np.random.default_rng(0)
    probe = windows(image, patch, 10, rng)

    over = {"steps": args.steps, "samples": args.samples}
    seg = Segmenter("default", backend="torch", precision="fp16", **over) if cuda else None
    ref_seg = seg or Segmenter("default", backend="torch", precision="fp32", **over)
    config, options, wopt = ref_seg.scheduler_config, ref_seg.options.sampler, ref_seg.options.window
    doc["sampler"] = {"steps": options.steps, "samples": options.num_samples, "batch": wopt.batch_size}

    engines: list[tuple[str, object]] = [("torch fp32 (eager, TF32 off)", TorchFp32Cuda(package, device))]
    if cuda:
        engines.append(("torch fp16 (CUDA graphs)", seg.backend))
        try:
            from diffseg.runtime.backends.torch_backend import TorchBackend

            engines.append(("torch fp16 (eager)", TorchBackend(package, "fp16", cuda_graphs=False)))
        except Exception as exc:
            doc["errors"]["torch fp16 eager"] = repr(exc)
        for name, prec in (
            ("onnxruntime-cuda", "fp16"),
            ("onnxruntime-cuda", "fp32"),
            ("onnxruntime-tensorrt", "fp16"),
            ("tensorrt", "fp16"),
        ):
            try:
                engines.append((f"{name} {prec}", get_backend(name, package, prec)))
            except (BackendUnavailableError, ImportError, RuntimeError, ValueError) as exc:
                doc["errors"][f"{name} {prec}"] = f"not run: {exc}"

    ref_out: dict[int, np.ndarray] = {}
    ref_mask = None
    for label, engine in engines:
        row: dict = {}
        try:
            if cuda:
                torch.cuda.synchronize()
                torch.cuda.reset_peak_memory_stats()
            # latency by batch size (host arrays in and out, as the runtime calls it)
            lat = {}
            for b in args.batches:
                x = np.concatenate([probe] * math.ceil(b / len(probe)))[:b]
                t = np.full(b, 500.0, np.float32)
                s = time_calls(lambda x=x, t=t, e=engine: e.run(x, t), args.repeats, warmup=3)
                lat[b] = {**s.as_dict(), "per_patch_ms": 1e3 * s.p50 / b, "gflops": b * flops / s.p50 / 1e9}
                prec = "fp16" if "fp16" in label else "fp32"
                if prec in peaks:
                    lat[b]["fraction_of_peak"] = lat[b]["gflops"] / peaks[prec]["gflops"]
            row["latency"] = lat
            # output error against torch fp32 at three timesteps
            errs = {}
            for tv in (999, 500, 100):
                y = engine.run(probe, np.full(len(probe), float(tv), np.float32)).astype(np.float64)
                if label.startswith("torch fp32"):
                    ref_out[tv] = y
                r = ref_out[tv]
                errs[tv] = {
                    "relative_l2": float(np.linalg.norm(y - r) / np.linalg.norm(r)),
                    "max_abs": float(np.abs(y - r).max()),
                }
            row["output_error_vs_fp32"] = errs
            # the sampled case (the scheduler step is diffseg._ext.diffusion_step)
            if not ext_built:
                log(f"{label}: sampled case skipped: diffseg._ext could not be built here (see ext_build.log)")
                doc["engines"][label] = row
                continue
            res = sample_step_major(image, engine.run, config, options, wopt, candidate=candidate)
            mask = res.mean >= 0.5
            if label.startswith("torch fp32"):
                ref_mask = mask
            row["sample"] = {
                "seconds": res.total_seconds,
                "engine_seconds": res.engine_seconds,
                "overhead_fraction": res.overhead_fraction,
                "patch_forwards": res.patch_forwards,
                "windows": res.windows,
                "windows_skipped": res.windows_skipped,
                "dice_vs_fp32": dice(mask, ref_mask),
                "dice_vs_truth": dice(mask, truth),
            }
            if getattr(engine, "device_loop", False):  # onnxruntime: x_t kept on the GPU across steps
                on_device = sample_step_major(
                    image, None, config, options, wopt, candidate=candidate, device_ops=engine.device_ops
                )
                row["sample_device_loop"] = {
                    "seconds": on_device.total_seconds,
                    "engine_seconds": on_device.engine_seconds,
                    "max_abs_vs_host_loop": float(np.abs(on_device.mean - res.mean).max()),
                    "dice_vs_host_loop": dice(on_device.mean >= 0.5, mask),
                }
            if cuda:
                row["cuda_peak_allocated_bytes"] = int(torch.cuda.max_memory_allocated())
            big = max(args.batches)
            log(
                f"{label}: batch {big} {lat[big]['per_patch_ms']:.2f} ms/patch, sample {res.total_seconds:.2f} s, "
                f"Dice vs fp32 {row['sample']['dice_vs_fp32']:.4f}, rel. error t=500 {errs[500]['relative_l2']:.2e}"
            )
        except Exception as exc:
            doc["errors"][label] = "".join(traceback.format_exception_only(exc)).strip()
            log(f"{label} FAILED: {exc}")
        doc["engines"][label] = row
        write_json(args.out, doc)  # after every engine: a timeout later still leaves what was measured

    if seg is not None and have_ext:  # end to end through the runtime, by stage
        try:
            result = seg.predict(case.ct, case.pet)
            doc["end_to_end_torch_fp16"] = {"timings_s": result.timings, "total_s": sum(result.timings.values())}
        except Exception as exc:
            doc["errors"]["end to end"] = repr(exc)

    write_json(args.out, doc)
    md = format_markdown(doc)
    (args.out / "gpu_check.md").write_text(md)
    print(md)
    return 0


def write_json(out: Path, doc: dict) -> None:
    tmp = out / "gpu_check.json.tmp"
    tmp.write_text(json.dumps(doc, indent=1, default=str) + "\n")
    tmp.replace(out / "gpu_check.json")


def format_markdown(doc: dict) -> str:
    env = doc["environment"]
    rows = {k: v for k, v in doc["engines"].items() if "sample" in v}
    batches = sorted({int(b) for v in rows.values() for b in v["latency"]}) or list(BATCHES)
    big = max(batches)
    lines = [
        f"GPU: **{env['gpu']}** (compute {env['capability']}), torch {env['torch']}, CUDA {env['cuda']}, cuDNN "
        f"{env['cudnn']}; DDIM {doc['sampler']['steps']} steps × {doc['sampler']['samples']} samples, batch "
        f"{doc['sampler']['batch']}; resampling: {doc['case']['how']}; phantom seed {doc['case']['seed']} (CT "
        f"{'×'.join(map(str, doc['case']['ct_shape']))}, model box {'×'.join(map(str, doc['case']['model_box']))}).",
        "",
    ]
    header = ["engine", *(f"ms/call b{b}" for b in batches), f"ms/patch b{big}", f"GFLOP/s b{big}", "% peak"]
    header += ["rel. L2 err vs fp32 (t=500)", "sample s", "overhead", "Dice vs fp32", "Dice vs truth", "CUDA peak MiB"]
    lines += ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for label, row in doc["engines"].items():
        if label not in rows:
            lines.append(f"| {label} | failed: {doc['errors'].get(label, '?')} |" + " |" * (len(header) - 2))
            continue
        lat = {int(k): v for k, v in row["latency"].items()}
        err = {int(k): v for k, v in row["output_error_vs_fp32"].items()}
        s = row["sample"]
        frac = lat[big].get("fraction_of_peak")
        cells = [
            label,
            *(f"{1e3 * lat[b]['p50']:.2f}" for b in batches),
            f"{lat[big]['per_patch_ms']:.2f}",
            f"{lat[big]['gflops']:.0f}",
            f"{100 * frac:.0f} %" if frac else "-",
            f"{err[500]['relative_l2']:.1e}",
            f"{s['seconds']:.2f}",
            f"{100 * s['overhead_fraction']:.1f} %",
            f"{s['dice_vs_fp32']:.4f}",
            f"{s['dice_vs_truth']:.4f}",
            f"{row.get('cuda_peak_allocated_bytes', 0) / 2**20:.0f}",
        ]
        lines.append("| " + " | ".join(cells) + " |")
    peaks = doc.get("peaks", {})
    if peaks:
        lines += ["", "Peaks: " + "; ".join(f"{k} {v['gflops']:.0f} GFLOP/s ({v['method']})" for k, v in peaks.items())]
    if "end_to_end_torch_fp16" in doc:
        e = doc["end_to_end_torch_fp16"]
        stages = ", ".join(f"{k} {v:.2f}" for k, v in e["timings_s"].items())
        lines += ["", f"End to end, torch fp16 through `Segmenter`: {e['total_s']:.2f} s ({stages})."]
    if doc["errors"]:
        lines += ["", "Not run / failed:", *(f"- {k}: {v}" for k, v in doc["errors"].items())]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
