"""Benchmark of the compiled kernels against their peers, in one run, on the same inputs.

Cases (the targets of issue 4; sizes as a head-and-neck CT):

- ``linear_ct``: CT 512×512×300 at 0.98×0.98×2.5 mm → 1 mm isotropic (502×502×750), float32;
- ``nearest_back``: a uint8 label map at 1 mm → back onto the CT grid;
- ``linear_pet``: PET 200×200×260 at 4×4×3 mm (offset origin) → the CT grid;
- ``cc26_sparse`` / ``cc6_sparse``: 512×512×300 uint8 mask, 1 % foreground (20 lumpy blobs, 300 specks);
- ``cc26_dense`` / ``cc6_dense``: 256³ smoothed noise thresholded at its median (50 % foreground);
- ``dust_sparse``: label + remove components under 100 voxels (26-connectivity), mask out;
- ``stats_sparse``: per-component count, box, centroid, CT max and mean (fused with labelling, and standalone).

Peers: SimpleITK (``Resample``, ``ConnectedComponent``, ``RelabelComponent``, ``LabelShapeStatistics``,
``LabelStatistics``), cc3d (``connected_components``, ``dust``, ``statistics``), scipy.ndimage (``label``) and
torch (``F.interpolate``; not SimpleITK's geometry, shown for speed only).

Method: every call is preceded by an untimed allocate-and-touch of 2 GiB, so that freed memory is resident (on
micro-VMs, memory idle for ~2 s goes back to the host and costs 1-2 s/GiB to touch again); 1 warm-up call, then
``--repeats`` timed calls; the table shows the median and [min-max] in ms. Everything runs with the same thread
count (``--threads``, default 2): OpenMP for ours, ``SetGlobalDefaultNumberOfThreads`` for SimpleITK,
``torch.set_num_threads`` for torch; cc3d and scipy are single-threaded. Results go to
``benchmarks/results/kernels.json`` and ``kernels.md`` (with the machine and its load average, since the
development machine is shared).

Usage: ``python benchmarks/kernels.py [--repeats 5] [--threads 2] [--only linear_ct,cc26_dense]``
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

from diffseg.runtime.components import component_stats, connected_components, label_components, remove_small_components
from diffseg.runtime.resample import resample_array
from diffseg.runtime.volume import GridSpec

RESULTS_DIR = Path(__file__).resolve().parent / "results"
PREFAULT_BYTES = 2 << 30

CT_GRID = GridSpec((512, 512, 300), (0.98, 0.98, 2.5), (-250.0, -250.0, -400.0))
ISO_GRID = GridSpec((502, 502, 750), (1.0, 1.0, 1.0), CT_GRID.origin)
PET_GRID = GridSpec((200, 200, 260), (4.0, 4.0, 3.0), (-400.0, -400.0, -770.0))


# ------------------------------------------------------------------------------------------------ inputs


def make_ct(seed: int = 2) -> np.ndarray:
    """Synthetic CT (HU, float32): air outside an elliptic body, soft tissue with noise inside."""
    rng = np.random.default_rng(seed)
    _, ny, nx = CT_GRID.shape
    yy, xx = np.ogrid[:ny, :nx]
    body = (((yy - ny / 2) / (ny * 0.4)) ** 2 + ((xx - nx / 2) / (nx * 0.45)) ** 2) <= 1
    ct = np.broadcast_to(np.where(body, np.float32(40.0), np.float32(-1000.0)), CT_GRID.shape).copy()
    ct += rng.standard_normal(CT_GRID.shape, dtype=np.float32) * np.float32(20.0)
    return ct


def make_sparse_mask(seed: int = 0) -> np.ndarray:
    """About 1 % foreground on the CT grid: 20 lumpy 'tumours' (unions of spheres) and 300 small specks."""
    rng = np.random.default_rng(seed)
    shape = CT_GRID.shape
    spacing = np.array(CT_GRID.spacing[::-1])
    mask = np.zeros(shape, np.uint8)
    for _ in range(20):
        radius = rng.uniform(16, 34)
        centre = np.array([rng.uniform(0.2, 0.8), rng.uniform(0.25, 0.75), rng.uniform(0.25, 0.75)]) * shape
        for _ in range(rng.integers(3, 7)):
            r = radius * rng.uniform(0.55, 0.95)
            c = centre + rng.normal(0, radius * 0.35, 3) / spacing
            lo = np.maximum(0, np.floor(c - r / spacing - 1)).astype(int)
            hi = np.minimum(shape, np.ceil(c + r / spacing + 2)).astype(int)
            zz, yy, xx = np.ogrid[lo[0] : hi[0], lo[1] : hi[1], lo[2] : hi[2]]
            d2 = ((zz - c[0]) * spacing[0]) ** 2 + ((yy - c[1]) * spacing[1]) ** 2 + ((xx - c[2]) * spacing[2]) ** 2
            mask[lo[0] : hi[0], lo[1] : hi[1], lo[2] : hi[2]] |= (d2 <= r * r).astype(np.uint8)
    for _ in range(300):
        size = rng.integers(1, 4, 3)
        p = [int(rng.integers(0, shape[i] - size[i])) for i in range(3)]
        mask[p[0] : p[0] + size[0], p[1] : p[1] + size[1], p[2] : p[2] + size[2]] = 1
    return mask


def make_dense_mask(n: int = 256, seed: int = 1) -> np.ndarray:
    """Smoothed uniform noise thresholded at its median: 50 % foreground, hundreds of components."""
    from scipy import ndimage as ndi

    field = ndi.gaussian_filter(np.random.default_rng(seed).random((n, n, n), dtype=np.float32), sigma=1.0)
    return (field > np.median(field)).astype(np.uint8)


# ------------------------------------------------------------------------------------------------ timing


def prefault() -> None:
    block = np.empty(PREFAULT_BYTES, np.uint8)
    block.fill(0)
    del block


class Bench:
    def __init__(self, repeats: int) -> None:
        self.repeats = repeats
        self.rows: list[dict] = []
        self.checks: dict[str, object] = {}

    def time(self, case: str, name: str, fn: Callable[[], object], *, ours: bool = False, note: str = "") -> object:
        prefault()
        result = fn()  # warm-up (and the result, for the checks)
        times = []
        for _ in range(self.repeats):
            prefault()
            t0 = time.perf_counter()
            out = fn()
            times.append(time.perf_counter() - t0)
            del out
        row = {
            "case": case,
            "name": name,
            "ours": ours,
            "median_ms": statistics.median(times) * 1e3,
            "min_ms": min(times) * 1e3,
            "max_ms": max(times) * 1e3,
            "n": self.repeats,
            "note": note,
        }
        self.rows.append(row)
        print(
            f"  {case:13s} {name:58s} {row['median_ms']:9.1f} ms [{row['min_ms']:.1f}-{row['max_ms']:.1f}]", flush=True
        )
        return result


def _sitk_image(array: np.ndarray, grid: GridSpec):
    import SimpleITK as sitk

    image = sitk.GetImageFromArray(array)
    image.SetSpacing(grid.spacing)
    image.SetOrigin(grid.origin)
    image.SetDirection(grid.direction)
    return image


# ------------------------------------------------------------------------------------------------ cases


def run_resample(b: Bench, parts: set[str], threads: int) -> None:
    import SimpleITK as sitk
    import torch
    import torch.nn.functional as F

    ct = make_ct()
    ct_img = _sitk_image(ct, CT_GRID)
    iso_ref = sitk.Image(ISO_GRID.size_xyz, sitk.sitkUInt8)
    iso_ref.SetSpacing(ISO_GRID.spacing)
    iso_ref.SetOrigin(ISO_GRID.origin)

    def sitk_resample(image, reference, interpolator, pixel):
        f = sitk.ResampleImageFilter()
        f.SetReferenceImage(reference)
        f.SetInterpolator(interpolator)
        f.SetOutputPixelType(pixel)
        return f.Execute(image)

    if "linear_ct" in parts:
        print("== linear CT 0.98x0.98x2.5 mm -> 1 mm", flush=True)
        ours = b.time(
            "linear_ct",
            "diffseg resample_array linear (new output)",
            lambda: resample_array(ct, CT_GRID, ISO_GRID, threads=threads),
            ours=True,
        )
        out = np.empty(ISO_GRID.shape, np.float32)
        out.fill(0)
        b.time(
            "linear_ct",
            "diffseg resample_array linear (out=, pre-faulted)",
            lambda: resample_array(ct, CT_GRID, ISO_GRID, out=out, threads=threads),
            ours=True,
            note="kernel only",
        )
        del out
        ref = b.time(
            "linear_ct",
            "SimpleITK Resample linear",
            lambda: sitk_resample(ct_img, iso_ref, sitk.sitkLinear, sitk.sitkFloat32),
        )
        b.checks["linear_ct_max_abs_diff_vs_sitk"] = float(np.abs(sitk.GetArrayViewFromImage(ref) - ours).max())
        del ref
        t = torch.from_numpy(ct)[None, None]
        b.time(
            "linear_ct",
            "torch F.interpolate trilinear (size-based map, not ITK's)",
            lambda: F.interpolate(t, size=ISO_GRID.shape, mode="trilinear", align_corners=False),
        )
        del ours, t

    if "nearest_back" in parts:
        print("== nearest label map 1 mm -> CT grid", flush=True)
        labels_iso = resample_array((make_sparse_mask() * 3).astype(np.uint8), CT_GRID, ISO_GRID, "nearest")
        lab_img = _sitk_image(labels_iso, ISO_GRID)
        ct_ref = sitk.Image(CT_GRID.size_xyz, sitk.sitkUInt8)
        ct_ref.SetSpacing(CT_GRID.spacing)
        ct_ref.SetOrigin(CT_GRID.origin)
        ours = b.time(
            "nearest_back",
            "diffseg resample_array nearest (new output)",
            lambda: resample_array(labels_iso, ISO_GRID, CT_GRID, "nearest", threads=threads),
            ours=True,
        )
        out = np.empty(CT_GRID.shape, np.uint8)
        out.fill(0)
        b.time(
            "nearest_back",
            "diffseg resample_array nearest (out=, pre-faulted)",
            lambda: resample_array(labels_iso, ISO_GRID, CT_GRID, "nearest", out=out, threads=threads),
            ours=True,
            note="kernel only",
        )
        b.checks["nearest_back_out_equal_to_new_output"] = bool(np.array_equal(out, ours))
        del out
        ref = b.time(
            "nearest_back",
            "SimpleITK Resample nearest",
            lambda: sitk_resample(lab_img, ct_ref, sitk.sitkNearestNeighbor, sitk.sitkUInt8),
        )
        b.checks["nearest_back_voxels_differing_from_sitk"] = int((sitk.GetArrayViewFromImage(ref) != ours).sum())
        del ref
        tl = torch.from_numpy(labels_iso)[None, None]
        b.time(
            "nearest_back",
            "torch F.interpolate nearest-exact uint8",
            lambda: F.interpolate(tl, size=CT_GRID.shape, mode="nearest-exact"),
        )
        del ours, tl, lab_img, labels_iso

    if "linear_pet" in parts:
        print("== linear PET 4 mm -> CT grid", flush=True)
        pet = np.random.default_rng(3).gamma(2.0, 1.0, PET_GRID.shape).astype(np.float32)
        pet_img = _sitk_image(pet, PET_GRID)
        ct_ref = sitk.Image(CT_GRID.size_xyz, sitk.sitkFloat32)
        ct_ref.SetSpacing(CT_GRID.spacing)
        ct_ref.SetOrigin(CT_GRID.origin)
        ours = b.time(
            "linear_pet",
            "diffseg resample_array linear (new output)",
            lambda: resample_array(pet, PET_GRID, CT_GRID, threads=threads),
            ours=True,
        )
        ref = b.time(
            "linear_pet",
            "SimpleITK Resample linear",
            lambda: sitk_resample(pet_img, ct_ref, sitk.sitkLinear, sitk.sitkFloat32),
        )
        b.checks["linear_pet_max_abs_diff_vs_sitk"] = float(np.abs(sitk.GetArrayViewFromImage(ref) - ours).max())
        del ours, ref


def run_components(b: Bench, parts: set[str], threads: int) -> None:
    import cc3d
    import SimpleITK as sitk
    from scipy import ndimage as ndi

    sparse = make_sparse_mask() if parts & {"cc26_sparse", "cc6_sparse", "dust_sparse", "stats_sparse"} else None
    dense = make_dense_mask() if parts & {"cc26_dense", "cc6_dense"} else None
    for name, mask in (("sparse", sparse), ("dense", dense)):
        if mask is None:
            continue
        image = sitk.GetImageFromArray(mask)
        for conn in (26, 6):
            case = f"cc{conn}_{name}"
            if case not in parts:
                continue
            print(f"== {case}: {mask.shape}, {mask.mean() * 100:.1f} % foreground", flush=True)
            ours, n = b.time(
                case,
                "diffseg connected_components",
                lambda m=mask, c=conn: connected_components(m, c, threads=threads),
                ours=True,
            )
            ref = b.time(
                case, "cc3d.connected_components", lambda m=mask, c=conn: cc3d.connected_components(m, connectivity=c)
            )
            b.checks[f"{case}_identical_to_cc3d"] = bool(np.array_equal(ours, ref)) and n == int(ref.max())
            structure = ndi.generate_binary_structure(3, 3 if conn == 26 else 1)
            b.time(case, "scipy.ndimage.label", lambda m=mask, s=structure: ndi.label(m, s))
            b.time(case, "SimpleITK ConnectedComponent", lambda im=image, c=conn: sitk.ConnectedComponent(im, c == 26))
            b.checks[f"{case}_components"] = n
            del ours, ref

    if sparse is None:
        return
    image = sitk.GetImageFromArray(sparse)
    if "dust_sparse" in parts:
        print("== dust: label + remove components under 100 voxels (26-connectivity)", flush=True)
        ours = b.time(
            "dust_sparse",
            "diffseg remove_small_components",
            lambda: remove_small_components(sparse, 100, threads=threads),
            ours=True,
        )
        ref = b.time(
            "dust_sparse",
            "SimpleITK ConnectedComponent + RelabelComponent(min 100)",
            lambda: sitk.Cast(sitk.RelabelComponent(sitk.ConnectedComponent(image, True), 100) > 0, sitk.sitkUInt8),
        )
        b.checks["dust_identical_to_sitk"] = bool(np.array_equal(ours, sitk.GetArrayViewFromImage(ref)))
        cc = b.time("dust_sparse", "cc3d.dust", lambda: cc3d.dust(sparse, threshold=100, connectivity=26))
        b.checks["dust_identical_to_cc3d"] = bool(np.array_equal(ours, cc))
        del ours, ref, cc

    if "stats_sparse" in parts:
        print("== statistics: count, box, centroid, CT max and mean per component", flush=True)
        ct = make_ct()
        labels, n = connected_components(sparse, 26, threads=threads)
        b.time(
            "stats_sparse",
            "diffseg connected_components (labelling alone)",
            lambda: connected_components(sparse, 26, threads=threads),
            ours=True,
        )
        b.time(
            "stats_sparse",
            "diffseg label_components(intensity=CT) (fused)",
            lambda: label_components(sparse, 26, intensity=ct, grid=CT_GRID, threads=threads),
            ours=True,
        )
        ours = b.time(
            "stats_sparse",
            "diffseg component_stats(labels, intensity=CT)",
            lambda: component_stats(labels, n, intensity=ct, grid=CT_GRID, threads=threads),
            ours=True,
        )
        lab_img = sitk.GetImageFromArray(labels.astype(np.uint32))
        ct_img = sitk.GetImageFromArray(ct)

        def sitk_stats():
            shape = sitk.LabelShapeStatisticsImageFilter()
            shape.Execute(lab_img)
            inten = sitk.LabelStatisticsImageFilter()
            inten.Execute(ct_img, lab_img)
            return shape, inten

        shape, inten = b.time("stats_sparse", "SimpleITK LabelShapeStatistics + LabelStatistics", sitk_stats)
        b.checks["stats_max_equal_to_sitk"] = bool(
            all(float(ours.intensity_max[k - 1]) == inten.GetMaximum(k) for k in range(1, n + 1))
        )
        b.checks["stats_count_equal_to_sitk"] = bool(
            all(int(ours.voxel_count[k - 1]) == shape.GetNumberOfPixels(k) for k in range(1, n + 1))
        )
        b.time("stats_sparse", "cc3d.statistics (count, box, centroid; no intensity)", lambda: cc3d.statistics(labels))


# ------------------------------------------------------------------------------------------------ report


def run_step(b: Bench, parts: set[str], threads: int) -> None:
    """One DDIM step over the sampler volume of the 512×512×300 case (5 samples × 302×103×183 on the model grid):
    ours (one pass, double per element) against diffusers' DDIMScheduler.step in torch float32."""
    if "ddim_step" not in parts:
        return
    import torch
    from diffusers import DDIMScheduler

    from diffseg.runtime.diffusion_schedule import SamplerOptions, SchedulerConfig
    from diffseg.runtime.scheduler import Scheduler

    shape = (5, 302, 103, 183)
    rng = np.random.default_rng(3)
    x = rng.standard_normal(shape, dtype=np.float32)
    out = rng.standard_normal(shape, dtype=np.float32)
    t, t_prev = 555, 444  # diffusers pairs t with t − T // steps: 1000 // 9 = 111
    print(f"== ddim_step: {shape}, x0-prediction, clipped, t {t} -> {t_prev}", flush=True)
    config = SchedulerConfig(prediction_type="sample", clip_sample=True, beta_dtype="float32")
    ours = Scheduler(config, SamplerOptions(eta=0.0, eps_convention="raw", threads=threads))
    x_prev = np.empty_like(x)
    b.time("ddim_step", "diffseg Scheduler.step", lambda: ours.step(out, x, t, t_prev, out=(x_prev, None)), ours=True)
    ref = DDIMScheduler(beta_schedule="linear", prediction_type="sample", clip_sample=True, set_alpha_to_one=True)
    ref.set_timesteps(9)
    out_t, x_t = torch.from_numpy(out), torch.from_numpy(x)
    want = b.time("ddim_step", "diffusers DDIMScheduler.step (torch)", lambda: ref.step(out_t, t, x_t, eta=0.0))
    want = want.prev_sample.numpy()
    b.checks["ddim_step_max_rel_error_vs_diffusers"] = float(np.abs(x_prev - want).max() / np.abs(want).max())


def machine() -> dict:
    info = {
        "python": sys.version.split()[0],
        "numpy": np.__version__,
        "cpus": os.cpu_count(),
        "platform": platform.platform(),
    }
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as fh:
            info["cpu"] = next(line.split(":", 1)[1].strip() for line in fh if line.startswith("model name"))
    except (OSError, StopIteration):
        info["cpu"] = platform.processor() or "unknown"
    from importlib.metadata import PackageNotFoundError, version

    versions = {}
    for dist in ("scipy", "SimpleITK", "connected-components-3d", "torch"):
        try:
            versions[dist] = version(dist)
        except PackageNotFoundError:
            versions[dist] = None
    info["versions"] = versions
    from diffseg import _ext

    info["extension"] = dict(_ext.build_info())
    return info


TARGETS = {  # case: (peer name prefix, minimum speed-up of ours over it)
    "linear_ct": ("SimpleITK", 10.0),
    "nearest_back": ("SimpleITK", 10.0),
    "linear_pet": ("SimpleITK", 10.0),
    "cc26_sparse": ("cc3d", 3.0),
    "cc26_dense": ("cc3d", 1.6),
}


def summarise(rows: list[dict]) -> list[dict]:
    summary = []
    cases = dict.fromkeys(r["case"] for r in rows)
    for case in cases:
        ours = next((r for r in rows if r["case"] == case and r["ours"]), None)
        if ours is None:
            continue
        for r in rows:
            if r["case"] == case and not r["ours"]:
                summary.append({"case": case, "peer": r["name"], "speedup": r["median_ms"] / ours["median_ms"]})
    return summary


def write_markdown(path: Path, result: dict) -> None:
    m = result["machine"]
    lines = [
        "# Kernel benchmark",
        "",
        f"Machine: {m['cpu']}, {m['cpus']} logical CPUs; {m['platform']}; load average "
        f"{result['load_before']} before, {result['load_after']} after (a shared machine: other jobs ran).",
        f"Extension: {m['extension']['compiler']}, flags `{m['extension']['cxx_flags']}`, "
        f"OpenMP {m['extension']['openmp']}. Threads: {result['threads']} for every multi-threaded library "
        f"(OMP_WAIT_POLICY={result['omp_wait_policy']}).",
        f"Versions: {', '.join(f'{k} {v}' for k, v in m['versions'].items())}.",
        f"Median of {result['repeats']} runs after a warm-up, each after pre-faulting 2 GiB; ms [min-max].",
        f"Command: `{result['command']}`",
        "",
        "| case | implementation | median ms | [min-max] | speed-up of ours |",
        "|---|---|---:|---:|---:|",
    ]
    for case in dict.fromkeys(r["case"] for r in result["timings"]):
        rows = [r for r in result["timings"] if r["case"] == case]
        ours = next((r for r in rows if r["ours"]), None)
        for r in rows:
            ratio = "" if r["ours"] or ours is None else f"{r['median_ms'] / ours['median_ms']:.1f}×"
            name = f"**{r['name']}**" if r["ours"] else r["name"]
            lines.append(f"| {case} | {name} | {r['median_ms']:.1f} | {r['min_ms']:.1f}-{r['max_ms']:.1f} | {ratio} |")
    lines += ["", "Checks (ours against the peers on the same inputs):", ""]
    lines += [f"- {k}: {v}" for k, v in result["checks"].items()]
    lines += ["", "Targets (ours, first row of each case, against the named peer):", ""]
    for t in result["targets"]:
        lines.append(
            f"- {t['case']}: {t['speedup']:.1f}× {t['peer']} (target ≥ {t['target']}×): "
            f"{'met' if t['met'] else 'NOT met'}"
        )
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=5, help="timed runs per implementation (default 5)")
    parser.add_argument("--threads", type=int, default=2, help="threads for every multi-threaded library")
    parser.add_argument("--only", default="", help="comma-separated cases (default: all)")
    parser.add_argument("--out", type=Path, default=RESULTS_DIR, help="folder for kernels.json and kernels.md")
    parser.add_argument(
        "--omp-wait-policy",
        default="passive",
        choices=["passive", "active"],
        help="OMP_WAIT_POLICY for OpenMP (ours, torch) unless set in the environment (default passive)",
    )
    args = parser.parse_args(argv)
    all_cases = [
        "linear_ct",
        "nearest_back",
        "linear_pet",
        "cc26_sparse",
        "cc6_sparse",
        "cc26_dense",
        "cc6_dense",
        "dust_sparse",
        "stats_sparse",
        "ddim_step",
    ]
    parts = set(args.only.split(",")) if args.only else set(all_cases)
    unknown = parts - set(all_cases)
    if unknown:
        parser.error(f"unknown cases {sorted(unknown)}; known: {', '.join(all_cases)}")

    # Before OpenMP starts (ours and torch's): waiting threads sleep instead of spinning, which matters on a
    # shared machine where a spinning thread takes the core its partner needs. Recorded in the results.
    os.environ.setdefault("OMP_WAIT_POLICY", args.omp_wait_policy)
    os.environ.setdefault("OMP_NUM_THREADS", str(args.threads))
    import SimpleITK as sitk
    import torch

    sitk.ProcessObject.SetGlobalDefaultNumberOfThreads(args.threads)
    torch.set_num_threads(args.threads)

    load_before = os.getloadavg()
    bench = Bench(args.repeats)
    t0 = time.time()
    run_resample(bench, parts, args.threads)
    run_components(bench, parts, args.threads)
    run_step(bench, parts, args.threads)
    speedups = summarise(bench.rows)
    targets = []
    for case, (peer, target) in TARGETS.items():
        ratio = next((s for s in speedups if s["case"] == case and s["peer"].startswith(peer)), None)
        if ratio is not None:
            targets.append(
                {
                    "case": case,
                    "peer": ratio["peer"],
                    "speedup": ratio["speedup"],
                    "target": target,
                    "met": ratio["speedup"] >= target,
                }
            )
    result = {
        "command": "python benchmarks/kernels.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "machine": machine(),
        "threads": args.threads,
        "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY"),
        "repeats": args.repeats,
        "load_before": [round(v, 2) for v in load_before],
        "load_after": [round(v, 2) for v in os.getloadavg()],
        "wall_s": round(time.time() - t0, 1),
        "timings": bench.rows,
        "speedups": speedups,
        "targets": targets,
        "checks": bench.checks,
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "kernels.json").write_text(json.dumps(result, indent=1) + "\n", encoding="utf-8")
    write_markdown(args.out / "kernels.md", result)
    print(json.dumps({"targets": targets, "checks": bench.checks}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
