"""Conditioning once per window: a Diff-UNet-style model (image encoder + conditioned denoiser) with the runtime's
condition cache on and off.

The model is the one ``tests/export/test_conditioning.py`` writes with MONAI's BasicUNet blocks (an image encoder
returning features at three scales, a denoiser UNet taking ``[image, x_t]``, a timestep embedding and those
features), here at ``--channels`` and a ``--patch``³ window, random weights. It is exported once into a temporary
folder (``build_package`` with the encoder as the condition graph: its checks included), then one synthetic PET/CT
phantom is segmented twice on the same backend with the same seed: with the cache (each window's features computed
once, reused at every step and for every sample) and without (the encoder runs for every engine row: the loop a
paper writes, the encoder inside the denoiser's forward). Reported per case: encoder calls and forwards, denoiser
forwards, end-to-end seconds, the speed-up, and the largest difference of the mean probability between the runs
(the same features up to the encoder's rounding at another batch size: about 1e-6).

    python benchmarks/conditioning_cache.py
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from _common import command_line, load_average, machine_header, write_results

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE.parent / "tests" / "export")]  # the model of the test, and its modalities


def build(folder: Path, args: argparse.Namespace) -> tuple[Path, float]:
    """The Diff-UNet-style package at the benchmark's size; (its folder, the export's seconds)."""
    import torch
    from export_helpers import MODALITIES, diffusion
    from test_conditioning import ConditionedUNet, ImageEncoder

    from diffseg.export.package import build_package

    torch.manual_seed(0)
    channels = tuple(args.channels)
    encoder = ImageEncoder(len(MODALITIES), channels).eval()
    denoiser = ConditionedUNet(len(MODALITIES) + 1, channels).eval()
    start = time.perf_counter()
    path = build_package(
        denoiser,
        folder / "diff-unet-style",
        name="diff-unet-style-benchmark",
        inputs=MODALITIES,
        spacing_mm=args.spacing,
        patch_size=(args.patch,) * 3,
        channel_order="image-first",
        diffusion=diffusion(prediction_type="sample"),
        architecture={"type": "diff-unet-style", "channels": list(channels)},
        activation="sigmoid",
        defaults={"steps": args.steps, "samples": args.samples, "overlap": 0.25},
        conditioner=encoder,
        features=("enc0", "enc1", "enc2"),
    )
    return path, time.perf_counter() - start


def run(package: Path, cached: bool, case, args: argparse.Namespace) -> tuple[dict, np.ndarray]:
    from diffseg.runtime.segmenter import Segmenter

    with Segmenter(
        package, backend=args.backend, precision=args.precision, retire_after=0, cache_conditioning=cached
    ) as seg:
        start = time.perf_counter()
        result = seg.predict(ct=case.ct, pet=case.pet, seed=args.seed)
        seconds = time.perf_counter() - start
    c = result.counts
    row = {
        "cache": cached,
        "seconds": seconds,
        "sample_seconds": result.timings["sample"],
        "windows": c.windows,
        "windows_run": c.windows - c.windows_skipped,
        "engine_calls": c.engine_calls,
        "denoiser_forwards": c.patch_forwards,
        "denoiser_seconds": c.engine_seconds,
        "encoder_calls": c.condition_calls,
        "encoder_forwards": c.condition_forwards,
        "encoder_seconds": c.condition_seconds,
    }
    return row, result.probability.array


def main() -> int:
    from diffseg.runtime.bench import markdown_table
    from diffseg.runtime.bench.machine import machine_info
    from diffseg.runtime.phantom import PhantomOptions, make_phantom

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--backend", default="openvino")
    parser.add_argument("--precision", default="fp32")
    parser.add_argument("--patch", type=int, default=32)
    parser.add_argument("--channels", type=int, nargs=3, default=[16, 32, 64])
    parser.add_argument("--spacing", type=float, default=2.0, help="model grid (mm)")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--samples", type=int, default=5)
    parser.add_argument("--phantom", type=int, default=1, help="phantom seed (test split)")
    parser.add_argument("--ct-size", type=int, default=128, help="CT matrix in plane")
    parser.add_argument("--seed", type=int, default=0, help="the case's noise seed")
    args = parser.parse_args()

    machine, loads = machine_info(), [load_average()]
    case = make_phantom(args.phantom, PhantomOptions(ct_size_xy=args.ct_size))
    with tempfile.TemporaryDirectory(prefix="diffseg-conditioning-") as tmp:
        package, export_seconds = build(Path(tmp), args)
        print(f"exported in {export_seconds:.1f} s", flush=True)
        rows, maps = [], []
        for cached in (True, False):
            row, probability = run(package, cached, case, args)
            rows.append(row)
            maps.append(probability)
            loads.append(load_average())
            print(
                f"cache {'on' if cached else 'off'}: {row['seconds']:.1f} s, encoder {row['encoder_forwards']} "
                f"forwards in {row['encoder_calls']} calls ({row['encoder_seconds']:.1f} s), denoiser "
                f"{row['denoiser_forwards']} forwards ({row['denoiser_seconds']:.1f} s)",
                flush=True,
            )
    on, off = rows
    figures = {
        "speedup": off["seconds"] / on["seconds"],
        "sample_speedup": off["sample_seconds"] / on["sample_seconds"],
        "encoder_forwards_ratio": off["encoder_forwards"] / on["encoder_forwards"],
        "max_abs_probability_difference": float(np.abs(maps[0] - maps[1]).max()),
    }
    settings = {k: getattr(args, k) for k in ("backend", "precision", "patch", "channels", "spacing", "steps")}
    settings.update(samples=args.samples, phantom=args.phantom, ct_size=args.ct_size, seed=args.seed)
    doc = {
        "machine": machine,
        "settings": settings,
        "export_seconds": export_seconds,
        "ct_shape": list(case.ct.shape),
        "runs": rows,
        **figures,
    }
    ones = [v[0] for v in loads if v]
    table = [
        [
            "on" if r["cache"] else "off",
            f"{r['encoder_calls']}",
            f"{r['encoder_forwards']}",
            f"{r['encoder_seconds']:.1f}",
            f"{r['denoiser_forwards']}",
            f"{r['denoiser_seconds']:.1f}",
            f"{r['seconds']:.1f}",
        ]
        for r in rows
    ]
    md = (
        f"Condition cache on a Diff-UNet-style model (encoder + denoiser, channels {args.channels}, patch "
        f"{args.patch}³, random weights), {args.backend} {args.precision}, one phantom (seed {args.phantom}, CT "
        f"{'×'.join(map(str, case.ct.shape))}, model grid {args.spacing} mm), {on['windows_run']} windows, "
        f"{args.steps} steps × {args.samples} samples, same noise seed.\n\n"
        f"Machine: {machine_header(machine)}; 1-min load average {min(ones):.1f}–{max(ones):.1f}.\n\n"
        f"Command: `{command_line()}`\n\n"
        + markdown_table(
            [
                "cache",
                "encoder calls",
                "encoder forwards",
                "encoder s",
                "denoiser forwards",
                "denoiser s",
                "end-to-end s",
            ],
            table,
        )
        + f"\n\nEnd to end {figures['speedup']:.2f}× faster with the cache (sampling alone "
        f"{figures['sample_speedup']:.2f}×); {figures['encoder_forwards_ratio']:.0f}× fewer encoder forwards; "
        f"largest difference of the mean probability between the runs {figures['max_abs_probability_difference']:.1g}."
        f" Export (both graphs, ONNX fp32/fp16, parity, torch.export programs) took {export_seconds:.0f} s.\n"
    )
    json_path, md_path = write_results("conditioning_cache", doc, md)
    print(md)
    print(f"wrote {json_path} and {md_path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
