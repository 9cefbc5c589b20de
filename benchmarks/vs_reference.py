"""diffseg's default CPU path against the research loop papers use, on the same trained model and phantom cases.

- **diffseg**: ``Segmenter("default", backend="auto")`` with the package's defaults (DDIM 10 steps × 5 samples,
  step-major, windows × samples batched, windows without PET uptake skipped, a window's sample retired once its mask
  has been empty for ``retire_after`` steps), end to end from CT/PET volumes in memory to the cleaned mask on the CT
  grid. **diffseg exact** is the same engine with retirement off (``retire_after=0``).
- **reference** (the Diff-UNet pattern, ge-xing/Diff-UNet): PyTorch eager fp32 on the same weights
  (``models/default/denoiser.pt``, architecture from the manifest); ``monai.inferers.sliding_window_inference`` with
  roi 64³ and ``sw_batch_size`` 1 (Diff-UNet's), whose predictor runs the whole DDIM chain for its window batch,
  once per sample (Diff-UNet's loop over samples), the samples' probabilities averaged; Gaussian blending of the
  windows. Same DDIM as the package: 10 linspace steps, x0-prediction clipped to [−1, 1], ε recomputed from the
  clipped x0, η = 0. Its input is diffseg's model-grid image (same resampling, normalisation and body box), and its
  probability goes back onto the CT grid through diffseg's resampling and postprocessing, so that only the sampling
  loop differs.

Reference overlaps: 0.5 (Diff-UNet's ``SlidingWindowInferer(overlap=0.5)``: the research loop as papers run it, the
headline) and 0.25 (the package's own tiling: both loops then run the same windows, so the ratio measures the
runtime alone). Every loop runs on every case in one process; the summary gives each reference against each diffseg
mode, end to end and for the sampling stage.

Every engine makes one untimed call of each batch size it will use before the timed runs (engines build kernels on
their first call); each diffseg mode runs ``--diffseg-repeats`` times per case (default 3), with noise seeds 0, 1, 2…:
its time is the median run's, its Dice the mean over the seeds, and the spread of those Dice (max − min) is shown as
the sampling noise of one 5-sample draw. The reference (minutes per case) runs once, with the case's seed. Dice of
both against the phantom's ground truth (on the CT grid): each loop's mean over the cases must agree within 0.01; the
largest per-case gap is reported beside it, to be read against one draw's seed spread on that case.

    python benchmarks/vs_reference.py                      # test seeds 1, 2, 3, overlaps 0.5 and 0.25
    python benchmarks/vs_reference.py --cases 1 2 3 --ref-overlap 0.5
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

from _common import (
    command_line,
    load_average,
    machine_header,
    model_input,
    on_ct_grid,
    torch_model,
    write_results,
)

DICE_TOLERANCE = 0.01


def make_predictor(model, manifest, steps: int, samples: int, generator, counter: dict):
    """The predictor MONAI's sliding window calls on each window batch: the whole DDIM chain, once per sample."""
    import torch

    from diffseg.export.diffusion import alphas_cumprod
    from diffseg.export.reference import ddim_pairs

    d, defaults = manifest.diffusion, manifest.defaults
    wanted = {
        "prediction_type": (d["prediction_type"], "sample"),
        "clip_sample": (d.get("clip_sample"), True),
        "eps_convention": (defaults.get("eps_convention"), "recompute"),
        "eta": (defaults.get("eta", 0.0), 0.0),
        "channel_order": (manifest.channel_order, "image-first"),
    }
    for key, (got, want) in wanted.items():
        if got != want:
            raise ValueError(f"the reference loop implements the default package's DDIM ({key}={want!r}), got {got!r}")
    abar = alphas_cumprod(d["num_train_timesteps"], d["beta_schedule"], d["beta_start"], d["beta_end"])
    pairs = ddim_pairs(d["num_train_timesteps"], steps, defaults["timestep_spacing"])

    @torch.no_grad()
    def predictor(window: torch.Tensor) -> torch.Tensor:
        b, patch = window.shape[0], window.shape[2:]
        prob = torch.zeros((b, 1, *patch))
        for _ in range(samples):
            x = torch.randn((b, 1, *patch), generator=generator)
            for t, t_prev in pairs:
                x0 = model(torch.cat([window, x], dim=1), torch.full((b,), float(t))).clamp(-1.0, 1.0)
                counter["forwards"] += b
                ab, ab_prev = abar[t], (abar[t_prev] if t_prev >= 0 else 1.0)
                eps = (x - math.sqrt(ab) * x0) / math.sqrt(1.0 - ab)
                x = math.sqrt(ab_prev) * x0 + math.sqrt(1.0 - ab_prev) * eps
            prob += ((x + 1.0) / 2.0).clamp(0.0, 1.0)
        return prob / samples

    return predictor


def run_reference(model, case, package, steps, samples, overlap, sw_batch, seed, post_options) -> dict:
    import torch
    from monai.inferers import sliding_window_inference

    from diffseg.runtime.postprocess import dice

    m = package.manifest
    timings = {}
    start = time.perf_counter()
    image, grid, box = model_input(case.ct, case.pet, m)
    timings["preprocess"] = time.perf_counter() - start
    counter = {"forwards": 0}
    predictor = make_predictor(model, m, steps, samples, torch.Generator().manual_seed(seed), counter)
    tick = time.perf_counter()
    prob = sliding_window_inference(
        torch.from_numpy(image)[None],
        roi_size=tuple(m.patch_size),
        sw_batch_size=sw_batch,
        predictor=predictor,
        overlap=overlap,
        mode="gaussian",
        sigma_scale=0.125,
        padding_mode="constant",
        cval=0.0,
    )[0, 0].numpy()
    timings["sample"] = time.perf_counter() - tick
    tick = time.perf_counter()
    post = on_ct_grid(prob, grid, box, case.ct, case.pet, post_options)
    timings["postprocess"] = time.perf_counter() - tick
    return {
        "timings_s": timings,
        "total_s": sum(timings.values()),
        "patch_forwards": counter["forwards"],
        "model_grid_box": [b.stop - b.start for b in box],
        "dice": dice(post.mask.array, case.mask.array),
        "lesions": len(post.lesions),
    }


def run_diffseg(segmenter, case, seed: int) -> dict:
    from diffseg.runtime.postprocess import dice

    start = time.perf_counter()
    result = segmenter.predict(case.ct, case.pet, seed=seed)
    total = time.perf_counter() - start
    return {
        "timings_s": dict(result.timings),
        "total_s": total,
        "windows": result.counts.windows,
        "windows_skipped": result.counts.windows_skipped,
        "retired": result.counts.retired,
        "seed": seed,
        "patch_forwards": result.counts.patch_forwards,
        "dice": dice(result.mask.array, case.mask.array),
        "lesions": len(result.lesions),
    }


def warm_up(segmenters: dict, model, package, ref_batch: int) -> None:
    """One untimed engine call per batch size each loop will use (engines build kernels on their first call)."""
    import numpy as np
    import torch

    m = package.manifest
    for seg in segmenters.values():
        for batch in {seg.options.window.batch_size, 1}:
            x = np.zeros((batch, m.in_channels, *m.patch_size), np.float32)
            seg.backend.run(x, np.full(batch, 500.0, np.float32))
    with torch.no_grad():
        model(torch.zeros((ref_batch, m.in_channels, *m.patch_size)), torch.full((ref_batch,), 500.0))


def main() -> int:
    import torch

    from diffseg.runtime.bench import machine_info
    from diffseg.runtime.manifest import load_package
    from diffseg.runtime.phantom import make_phantom, split_seeds
    from diffseg.runtime.segmenter import Segmenter

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cases", type=int, nargs="+", default=split_seeds("test")[:3], help="phantom seeds")
    parser.add_argument("--model", default="default")
    parser.add_argument(
        "--ref-overlap",
        type=float,
        nargs="+",
        default=[0.5, 0.25],
        help="reference sliding-window overlaps, each run (default: 0.5 = Diff-UNet's, 0.25 = the package's)",
    )
    parser.add_argument("--ref-sw-batch", type=int, default=1, help="reference sw_batch_size (Diff-UNet: 1)")
    parser.add_argument(
        "--diffseg-repeats",
        type=int,
        default=3,
        help="runs of each diffseg mode per case, noise seeds 0, 1, …: median time, mean Dice (default 3)",
    )
    parser.add_argument("--steps", type=int, help="DDIM steps for both (default: the package's)")
    parser.add_argument("--samples", type=int, help="samples for both (default: the package's)")
    parser.add_argument("--name", default="vs_reference", help="result file stem under benchmarks/results/")
    parser.add_argument(
        "--render", type=Path, metavar="JSON", help="only redraw the tables of a saved result (no measuring)"
    )
    args = parser.parse_args()
    if args.render:
        return rerender(args.render)
    test_seeds = set(split_seeds("test"))
    if not set(args.cases) <= test_seeds:
        raise SystemExit(f"--cases must be held-out test seeds {sorted(test_seeds)}, got {args.cases}")

    machine = machine_info()
    package = load_package(args.model)
    t0 = time.perf_counter()
    segmenter = Segmenter(args.model, backend="auto", steps=args.steps, samples=args.samples)
    diffseg_load = time.perf_counter() - t0
    # The same engine with retirement off: the exact loop, so that the table shows what retirement adds.
    exact = Segmenter(
        args.model,
        backend=segmenter.backend.name,
        precision=segmenter.backend.precision,
        steps=args.steps,
        samples=args.samples,
        retire_after=0,
    )
    t0 = time.perf_counter()
    model = torch_model(package)
    reference_load = time.perf_counter() - t0
    steps, samples = segmenter.options.sampler.steps, segmenter.options.sampler.num_samples
    settings = segmenter.settings()
    ours = {"diffseg": segmenter, "diffseg exact": exact}
    refs = {f"reference overlap {o:g}": o for o in args.ref_overlap}
    print(
        f"diffseg: {settings['backend']} {settings['precision']}, retire_after "
        f"{settings['window']['retire_after']}; reference: torch {torch.__version__} eager fp32, "
        f"{torch.get_num_threads()} threads, overlaps {args.ref_overlap}; {steps} steps x {samples} samples",
        flush=True,
    )
    warm_up(ours, model, package, args.ref_sw_batch)
    rows = []
    for seed in args.cases:
        case = make_phantom(seed)
        row: dict = {"seed": seed, "ct_shape": list(case.ct.shape), "load_before": load_average(), "runs": {}}
        for name, seg in ours.items():  # cheap next to the reference: several runs tame both the timing noise and
            # the sampling noise of one seed's 5-sample draw
            runs = [run_diffseg(seg, case, s) for s in range(args.diffseg_repeats)]
            dices = [r["dice"] for r in runs]
            median = sorted(runs, key=lambda r: r["total_s"])[len(runs) // 2]
            row["runs"][name] = {
                **median,
                "dice": sum(dices) / len(dices),
                "dice_seeds": dices,
                "dice_spread": max(dices) - min(dices),
                "totals_s": [r["total_s"] for r in runs],
            }
        for name, overlap in refs.items():
            row["runs"][name] = run_reference(
                model, case, package, steps, samples, overlap, args.ref_sw_batch, seed, segmenter.options.postprocess
            )
        row["load_after"] = load_average()
        for name, r in row["runs"].items():
            print(
                f"seed {seed} {name}: {r['total_s']:.1f} s, {r['patch_forwards']} patch-forwards, Dice {r['dice']:.4f}"
                + (f" (seeds {', '.join(f'{d:.4f}' for d in r['dice_seeds'])})" if "dice_seeds" in r else ""),
                flush=True,
            )
        rows.append(row)

    doc = {
        "machine": machine,
        "diffseg": {"settings": settings, "load_s": diffseg_load, "exact_retire_after": 0},
        "reference": {
            "what": "PyTorch eager fp32, monai sliding_window_inference, DDIM chain per window batch, one per sample",
            "torch": torch.__version__,
            "threads": torch.get_num_threads(),
            "overlaps": args.ref_overlap,
            "sw_batch_size": args.ref_sw_batch,
            "load_s": reference_load,
        },
        "model": package.manifest.name,
        "steps": steps,
        "samples": samples,
        "diffseg_repeats": args.diffseg_repeats,
        "loops": {"diffseg": list(ours), "reference": list(refs)},
        "cases": rows,
    }
    add_comparisons(doc)
    json_path, md_path = write_results(args.name, doc, render(doc, command_line()))
    print(md_path.read_text())
    print(f"wrote {json_path} and {md_path}")
    return 0


def add_comparisons(doc: dict) -> None:
    """Set ``comparisons`` (each reference loop against each diffseg mode) and ``summary`` (the first: the headline)."""
    doc["comparisons"] = compare(doc)
    doc["summary"] = doc["comparisons"][0]


def compare(doc: dict) -> list[dict]:
    """Each reference loop against each diffseg mode: time ratios, and Dice per case and averaged over the cases."""
    rows = doc["cases"]

    def total(name: str, key: str = "total_s") -> float:
        return sum(r["runs"][name][key] if key == "total_s" else r["runs"][name]["timings_s"][key] for r in rows)

    comparisons = []
    for ref in doc["loops"]["reference"]:
        for mine in doc["loops"]["diffseg"]:
            diffs = [abs(r["runs"][mine]["dice"] - r["runs"][ref]["dice"]) for r in rows]
            mean_dice = {n: sum(r["runs"][n]["dice"] for r in rows) / len(rows) for n in (mine, ref)}
            gap = abs(mean_dice[mine] - mean_dice[ref])
            comparisons.append(
                {
                    "reference": ref,
                    "diffseg": mine,
                    "seconds": {ref: total(ref), mine: total(mine)},
                    "ratio_end_to_end": total(ref) / total(mine),
                    "ratio_sampling": total(ref, "sample") / total(mine, "sample"),
                    "mean_dice": mean_dice,
                    "mean_dice_gap": gap,
                    "max_dice_difference": max(diffs),
                    "mean_dice_difference": sum(diffs) / len(diffs),
                    # "Dice of both agree within 0.01": each loop's Dice over the cases (its mean); the per-case gaps
                    # are reported beside it, to be read against one draw's seed spread
                    "dice_agree_within_0.01": gap <= DICE_TOLERANCE,
                    "every_case_within_0.01": max(diffs) <= DICE_TOLERANCE,
                }
            )
    return comparisons


def render(doc: dict, command: str) -> str:
    """The Markdown tables of a result document (``--render`` redraws them from a saved JSON)."""
    from diffseg.runtime.bench import markdown_table

    rows, settings, comparisons = doc["cases"], doc["diffseg"]["settings"], doc["comparisons"]
    names = [*doc["loops"]["diffseg"], *doc["loops"]["reference"]]
    case_table = [
        [
            f"phantom {r['seed']}",
            "×".join(map(str, r["ct_shape"])),
            name,
            str(r["runs"][name]["patch_forwards"]),
            f"{r['runs'][name]['total_s']:.1f}",
            f"{r['runs'][name]['timings_s']['sample']:.1f}",
            f"{r['runs'][name]['dice']:.4f}",
            f"{r['runs'][name]['dice_spread']:.4f}" if "dice_spread" in r["runs"][name] else "",
        ]
        for r in rows
        for name in names
    ]
    ratio_table = [
        [
            c["reference"],
            c["diffseg"],
            f"{c['seconds'][c['reference']]:.1f} / {c['seconds'][c['diffseg']]:.1f}",
            f"**{c['ratio_end_to_end']:.1f}×**",
            f"{c['ratio_sampling']:.1f}×",
            f"{c['mean_dice'][c['reference']]:.4f} / {c['mean_dice'][c['diffseg']]:.4f}",
            f"{c['mean_dice_gap']:.4f}",
            f"{c['max_dice_difference']:.4f}",
        ]
        for c in comparisons
    ]
    loads = [v for r in rows for v in (r["load_before"] or [])[:1] + (r["load_after"] or [])[:1]]
    spreads = [r["runs"][doc["loops"]["diffseg"][0]].get("dice_spread", 0.0) for r in rows]
    h = doc["summary"]
    return (
        f"diffseg `{settings['backend']} {settings['precision']}` (auto; `diffseg` = the package's defaults, "
        f"retire_after {settings['window']['retire_after']}; `diffseg exact` = retirement off) vs the PyTorch + MONAI "
        f"research loop (eager fp32, DDIM chain per window, sw_batch_size {doc['reference']['sw_batch_size']}, "
        "Gaussian blending; overlap 0.5 is Diff-UNet's own, 0.25 the package's tiling), model "
        f"`{doc['model']}`, DDIM {doc['steps']} steps × {doc['samples']} samples, held-out test phantoms.\n\n"
        f"Machine: {machine_header(doc['machine'])}; 1-min load average {min(loads):.1f}–{max(loads):.1f} during the "
        f"runs.\n\nCommand: `{command}`\n\n"
        + markdown_table(
            [
                "reference",
                "diffseg",
                "seconds ref / diffseg",
                "ratio",
                "sampling ratio",
                "mean Dice ref / diffseg",
                "mean Dice gap",
                "max ΔDice per case",
            ],
            ratio_table,
        )
        + "\n\nPer case:\n\n"
        + f"diffseg's Dice is the mean over noise seeds 0–{doc['diffseg_repeats'] - 1}, its time the median run's; "
        "seed spread = max − min Dice over those seeds (the sampling noise of one draw).\n\n"
        + markdown_table(
            ["case", "CT z×y×x", "loop", "patch-forwards", "total s", "sample s", "Dice", "seed spread"], case_table
        )
        + f"\n\nHeadline ({h['reference']} vs {h['diffseg']}): {h['ratio_end_to_end']:.1f}× end to end; mean Dice "
        f"{h['mean_dice'][h['reference']]:.4f} vs {h['mean_dice'][h['diffseg']]:.4f}, gap {h['mean_dice_gap']:.4f} "
        f"(within 0.01: {h['dice_agree_within_0.01']}); largest per-case gap {h['max_dice_difference']:.4f} (every "
        f"case within 0.01: {h['every_case_within_0.01']}; one diffseg draw's seed spread per case: "
        f"{min(spreads):.4f}–{max(spreads):.4f}).\n"
    )


def rerender(path: Path) -> int:
    """Recompute the comparisons of a saved result and redraw its Markdown, keeping the command that measured it."""
    from diffseg.runtime.atomic import write_json_atomic, write_text_atomic

    doc = json.loads(path.read_text())
    add_comparisons(doc)
    md = render(doc, doc["command"])
    write_json_atomic(path, doc)
    write_text_atomic(path.with_suffix(".md"), md.rstrip() + "\n")
    print(md)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
