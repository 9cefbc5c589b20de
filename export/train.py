"""Train a diffusion denoiser on synthetic phantoms: ``python -m diffseg.export.train --config CFG -o RUN_DIR``.

DDPM training (T = 1000, linear β) on patches of the model grid, with the normalisation that the manifest will carry.
Reproducible from its config and seed; logs loss and validation Dice (one JSON object per line in ``train.log``);
``--resume`` continues from ``RUN_DIR/last.pt``. Runs on CUDA when available, else on the CPU.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import time
from concurrent.futures import ProcessPoolExecutor
from functools import partial
from pathlib import Path

import numpy as np
import torch
from torch.nn import functional as F

from diffseg.runtime.atomic import atomic_path, write_text_atomic
from diffseg.runtime.phantom import split_seeds
from diffseg.runtime.preprocess import Normalisation

from .data import Case, PatchSampler, phantom_case
from .diffusion import alphas_cumprod, q_sample, target_for
from .reference import ReferenceSettings, reference_sample
from .unet import DiffusionUNet3D, UNetConfig

__all__ = ["dice", "load_config", "main", "train"]

logger = logging.getLogger("diffseg.train")


def read_json_config(path: str | Path) -> dict:
    """A JSON config file as a dict; the file named in every error.

    Raises:
        FileNotFoundError: no such file.
        ValueError: not JSON, or not an object.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such config file")
    try:
        cfg = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise ValueError(f"{path}: not valid JSON ({exc})") from None
    if not isinstance(cfg, dict):
        raise ValueError(f"{path}: the config must be a JSON object, got {type(cfg).__name__}")
    return cfg


def load_config(path: str | Path) -> dict:
    """A training config: :func:`read_json_config` with every key training needs."""
    cfg = read_json_config(path)
    for key in (
        "seed",
        "model",
        "patch_size",
        "spacing_mm",
        "modalities",
        "normalisation",
        "diffusion",
        "train",
    ):
        if key not in cfg:
            raise ValueError(f"{path}: missing key {key!r}")
    return cfg


def norms_of(cfg: dict) -> dict[str, Normalisation]:
    return {m: Normalisation.from_manifest(cfg["normalisation"][m], m) for m in cfg["modalities"]}


def dice(pred: np.ndarray, truth: np.ndarray) -> float:
    """Dice of two binary masks; 1.0 when both are empty."""
    p, t = pred.astype(bool), truth.astype(bool)
    denom = int(p.sum()) + int(t.sum())
    return 1.0 if denom == 0 else 2.0 * int((p & t).sum()) / denom


def _make_case(seed: int, cfg: dict) -> Case:
    return phantom_case(seed, cfg["modalities"], norms_of(cfg), cfg["spacing_mm"])


def build_cases(seeds: list[int], cfg: dict, workers: int) -> list[Case]:
    if workers <= 1:
        return [_make_case(s, cfg) for s in seeds]
    with ProcessPoolExecutor(workers) as pool:
        return list(pool.map(partial(_make_case, cfg=cfg), seeds, chunksize=4))


def _loss(pred: torch.Tensor, target: torch.Tensor, x0: torch.Tensor, prediction_type: str) -> torch.Tensor:
    loss = F.mse_loss(pred, target)
    if prediction_type == "sample":
        # A soft Dice term on the predicted mask counters the small tumour share of each patch (as Diff-UNet).
        p = ((pred + 1) / 2).clamp(0, 1).flatten(1)
        m = ((x0 + 1) / 2).flatten(1)
        soft_dice = (2 * (p * m).sum(1) + 1) / (p.sum(1) + m.sum(1) + 1)
        loss = loss + (1 - soft_dice).mean()
    return loss


def validate(model: torch.nn.Module, cases: list[Case], cfg: dict, device: str) -> float:
    """Mean Dice on the model grid with the reference DDIM loop (few steps and samples, to keep it quick)."""
    model.eval()
    v = cfg["train"]
    settings = ReferenceSettings(
        steps=v.get("val_steps", 5),
        samples=v.get("val_samples", 1),
        prediction_type=cfg["diffusion"]["prediction_type"],
        channel_order=cfg.get("channel_order", "image-first"),
    )
    scores = []
    for case in cases:
        prob = reference_sample(
            model,
            case.image,
            tuple(cfg["patch_size"]),
            settings,
            seed=case.seed,
            num_train_timesteps=cfg["diffusion"]["num_train_timesteps"],
            beta_schedule=cfg["diffusion"]["beta_schedule"],
            device=device,
        )
        scores.append(dice(prob.mean(0) >= 0.5, case.mask))
    model.train()
    return float(np.mean(scores))


def train(
    cfg: dict,
    run_dir: Path,
    resume: bool,
    device: str | None = None,
    workers: int | None = None,
    time_limit_s: float | None = None,
) -> Path:
    """Train and return the path of the last checkpoint (``run_dir/last.pt``).

    ``time_limit_s`` stops the loop early (after saving) when a lent machine's time runs out; ``--resume`` continues.
    """
    run_dir.mkdir(parents=True, exist_ok=True)
    write_text_atomic(run_dir / "config.json", json.dumps(cfg, indent=2))
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    workers = workers or min(os.cpu_count() or 1, 16)
    tc = cfg["train"]
    torch.manual_seed(cfg["seed"])
    rng = np.random.default_rng(cfg["seed"])
    dcfg = cfg["diffusion"]

    model = DiffusionUNet3D(UNetConfig(**cfg["model"])).to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=tc["lr"], weight_decay=tc.get("weight_decay", 1e-4))
    total = int(tc["iterations"])
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=tc["lr"], total_steps=total, pct_start=0.05)
    start_it, best = 0, -1.0
    ckpt = run_dir / "last.pt"
    if resume and ckpt.exists():
        state = torch.load(ckpt, map_location=device, weights_only=True)
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["optimizer"])
        sched.load_state_dict(state["scheduler"])
        start_it, best = int(state["iteration"]), float(state["best_val_dice"])
        rng = np.random.default_rng([cfg["seed"], start_it])  # a fresh but reproducible stream after resuming
        torch.manual_seed(cfg["seed"] + start_it)
        logger.info("resumed at iteration %d", start_it)

    t0 = time.time()
    train_seeds = split_seeds("train", tc["cases"])
    cases = build_cases(train_seeds, cfg, workers)
    val_cases = build_cases(split_seeds("validation", tc.get("val_cases", 4)), cfg, workers)
    logger.info("built %d training and %d validation cases in %.0f s", len(cases), len(val_cases), time.time() - t0)
    sampler = PatchSampler(cases, cfg["patch_size"], rng, foreground_fraction=tc.get("foreground_fraction", 0.5))
    abar = torch.from_numpy(
        alphas_cumprod(
            dcfg["num_train_timesteps"],
            dcfg["beta_schedule"],
            dcfg.get("beta_start", 1e-4),
            dcfg.get("beta_end", 0.02),
        )
    ).to(device)
    T = dcfg["num_train_timesteps"]
    log = open(run_dir / "train.log", "a", encoding="utf-8")  # noqa: SIM115 (kept open for the whole run)
    autocast = (
        torch.autocast("cuda", dtype=torch.bfloat16)
        if device.startswith("cuda")
        else torch.autocast("cpu", enabled=False)
    )
    if device.startswith("cuda"):
        torch.backends.cudnn.benchmark = True
    model.train()
    running = []
    loop_start = time.time()
    for it in range(start_it, total):
        img, msk = sampler.sample(tc["batch_size"])
        img_t = torch.from_numpy(img).to(device, non_blocking=True)
        x0 = torch.from_numpy(msk).to(device).float()[:, None] * 2 - 1
        noise = torch.randn_like(x0)
        t = torch.randint(0, T, (x0.shape[0],), device=device)
        xt = q_sample(x0, t, noise, abar)
        inp = torch.cat([img_t, xt] if cfg.get("channel_order", "image-first") == "image-first" else [xt, img_t], 1)
        with autocast:
            pred = model(inp, t.float())
        loss = _loss(pred.float(), target_for(dcfg["prediction_type"], x0, noise, t, abar), x0, dcfg["prediction_type"])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        running.append(float(loss.detach()))
        done = it + 1
        out_of_time = time_limit_s is not None and time.time() - loop_start > time_limit_s
        if done % tc["log_every"] == 0 or done == total or out_of_time:
            rec = {
                "iteration": done,
                "loss": float(np.mean(running)),
                "lr": sched.get_last_lr()[0],
                "elapsed_s": round(time.time() - t0, 1),
            }
            running = []
            if done % tc["eval_every"] == 0 or done == total or out_of_time:
                rec["val_dice"] = validate(model, val_cases, cfg, device)
                if rec["val_dice"] > best:
                    best = rec["val_dice"]
                    with atomic_path(run_dir / "best.pt") as tmp:
                        torch.save(
                            {"model": model.state_dict(), "config": cfg, "iteration": done, "val_dice": best}, tmp
                        )
            log.write(json.dumps(rec) + "\n")
            log.flush()
            logger.info("%s", rec)
            state = {
                "model": model.state_dict(),
                "optimizer": opt.state_dict(),
                "scheduler": sched.state_dict(),
                "iteration": done,
                "best_val_dice": best,
                "config": cfg,
            }
            with atomic_path(ckpt) as tmp:
                torch.save(state, tmp)
        if out_of_time:
            logger.warning("time limit reached at iteration %d of %d; --resume continues", done, total)
            break
    log.close()
    return ckpt


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m diffseg.export.train", description=__doc__)
    parser.add_argument("--config", required=True, help="training config (JSON)")
    parser.add_argument("-o", "--output", required=True, type=Path, help="run folder (checkpoints, train.log)")
    parser.add_argument("--resume", action="store_true", help="continue from RUN_DIR/last.pt")
    parser.add_argument("--device", default=None, help="cuda or cpu (default: cuda when available)")
    parser.add_argument("--iterations", type=int, default=None, help="override the config's iteration count")
    parser.add_argument("--cases", type=int, default=None, help="override the config's training case count")
    parser.add_argument("--workers", type=int, default=None, help="processes that build phantoms")
    parser.add_argument("--time-limit-min", type=float, default=None, help="stop (after saving) after this long")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    cfg = load_config(args.config)
    if args.iterations:
        cfg["train"]["iterations"] = args.iterations
    if args.cases:
        cfg["train"]["cases"] = args.cases
    limit = args.time_limit_min * 60 if args.time_limit_min else None
    train(cfg, args.output, args.resume, args.device, args.workers, limit)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
