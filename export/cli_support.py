"""What ``diffseg export`` does, kept on the export side so that the runtime CLI never imports torch."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from diffseg.runtime.phantom import split_seeds

from .architectures import load_checkpoint
from .data import phantom_case
from .package import build_package, diffusion_from_config, modalities_from_config
from .train import load_config, norms_of

__all__ = ["export_from_checkpoint", "phantom_patches"]


def phantom_patches(cfg: Mapping[str, Any], count: int) -> list[np.ndarray]:
    """One image patch per validation phantom, centred on its tumour (or its centre when it has none)."""
    patch = np.array(cfg["patch_size"])
    out = []
    for seed in split_seeds("validation")[:count]:
        case = phantom_case(seed, cfg["modalities"], norms_of(cfg), cfg["spacing_mm"])
        fg = np.argwhere(case.mask > 0)
        centre = fg.mean(axis=0).astype(int) if len(fg) else np.array(case.mask.shape) // 2
        start = np.clip(centre - patch // 2, 0, np.maximum(np.array(case.mask.shape) - patch, 0))
        sl = tuple(slice(int(s), int(s) + int(p)) for s, p in zip(start, patch, strict=True))
        img = case.image[(slice(None), *sl)]
        if img.shape[1:] == tuple(patch):
            out.append(np.ascontiguousarray(img))
    return out


def export_from_checkpoint(
    checkpoint: Path,
    config: Path,
    out_dir: Path,
    *,
    validation: Mapping | None = None,
    parity_phantoms: int = 2,
    overwrite: bool = False,
) -> Path:
    cfg = load_config(config)
    if not checkpoint.is_file():
        raise FileNotFoundError(f"{checkpoint}: no such checkpoint")
    model = load_checkpoint(str(checkpoint), cfg)
    provenance = {
        "training_config": cfg,
        "training_data": "synthetic head-and-neck PET/CT phantoms (diffseg.runtime.phantom), training seeds "
        f"{split_seeds('train', cfg['train']['cases'])[0]}-"
        f"{split_seeds('train', cfg['train']['cases'])[-1]}",
        "intended_use": "research and engineering tests; trained on synthetic phantoms, not for clinical use",
        "licence": "Apache-2.0",
        "model_version": str(cfg.get("version", "1")),
    }
    return build_package(
        model,
        out_dir,
        name=cfg.get("name", checkpoint.stem),
        modalities=modalities_from_config(cfg),
        spacing_mm=cfg["spacing_mm"],
        patch_size=cfg["patch_size"],
        channel_order=cfg.get("channel_order", "image-first"),
        diffusion=diffusion_from_config(cfg),
        architecture={"type": cfg.get("architecture", "diffseg-unet3d"), **cfg["model"]},
        patches=phantom_patches(cfg, parity_phantoms),
        validation=validation,
        provenance=provenance,
        overwrite=overwrite,
    )
