"""From probabilities on the CT grid to a clinical mask and lesion table (threshold, components, volume filter)."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np

from .components import label_components, remove_small_components
from .volume import Volume

__all__ = ["LESION_FIELDS", "PostprocessOptions", "Postprocessed", "dice", "postprocess", "thresholded_mask"]

LESION_FIELDS = ("id", "voxels", "volume_ml", "centroid_mm", "bbox", "suv_max", "suv_mean", "mtv_ml", "tlg")


@dataclass(frozen=True)
class PostprocessOptions:
    """How probabilities become lesions.

    Attributes:
        threshold: foreground where the mean probability is at least this.
        min_lesion_ml: components smaller than this volume (ml) are removed.
        connectivity: 6, 18 or 26 (voxel neighbourhood of a component).
    """

    threshold: float = 0.5
    min_lesion_ml: float = 0.1
    connectivity: int = 26

    def __post_init__(self) -> None:
        if not 0.0 < self.threshold < 1.0:
            raise ValueError(f"threshold must be in (0, 1), got {self.threshold}")
        if not (math.isfinite(self.min_lesion_ml) and self.min_lesion_ml >= 0):
            raise ValueError(f"min_lesion_ml must be >= 0, got {self.min_lesion_ml}")
        if self.connectivity not in (6, 18, 26):
            raise ValueError(f"connectivity must be 6, 18 or 26, got {self.connectivity}")


@dataclass(frozen=True)
class Postprocessed:
    mask: Volume  # uint8, 1 = tumour
    labels: Volume  # lesion ids 1..n in raster order of each lesion's first voxel
    lesions: list[dict[str, Any]]


def thresholded_mask(probability: Volume, options: PostprocessOptions) -> np.ndarray:
    """uint8 ``[z, y, x]``: the probability at least the threshold, components under ``min_lesion_ml`` removed."""
    mask = (probability.array >= np.float32(options.threshold)).astype(np.uint8)
    min_voxels = math.ceil(options.min_lesion_ml / probability.voxel_volume_ml) if options.min_lesion_ml > 0 else 0
    remove_small_components(mask, min_voxels, connectivity=options.connectivity, out=mask)
    return mask


def postprocess(probability: Volume, pet: Volume | None, options: PostprocessOptions | None = None) -> Postprocessed:
    """Threshold, drop small components, label lesions and measure them (SUV from ``pet`` on the same grid).

    Args:
        probability: mean foreground probability on the CT grid.
        pet: PET in SUVbw resampled onto the same grid (None: no SUV fields).
        options: threshold, minimum volume, connectivity.

    Returns:
        The binary mask, the lesion label map and one row per lesion: id, voxels, volume_ml, centroid_mm (x, y, z),
        bbox (``[start, stop]`` array indices z, y, x; stop exclusive), suv_max, suv_mean, mtv_ml (metabolic
        tumour volume = the lesion's volume) and tlg (total lesion glycolysis = SUVmean × MTV).
    """
    opt = options or PostprocessOptions()
    if pet is not None and not pet.same_grid(probability):
        raise ValueError("pet must be on the probability's grid (resample it onto the CT grid first)")
    mask = thresholded_mask(probability, opt)
    intensity = pet.array.astype(np.float32, copy=False) if pet is not None else None
    labels, stats = label_components(mask, opt.connectivity, intensity=intensity, grid=probability)
    lesions = []
    for i in range(stats.n):
        volume = float(stats.volume_ml[i])  # type: ignore[index]
        row: dict[str, Any] = {
            "id": i + 1,
            "voxels": int(stats.voxel_count[i]),
            "volume_ml": round(volume, 4),
            "centroid_mm": [round(float(c), 2) for c in stats.centroid_mm[i]],  # type: ignore[index]
            "bbox": [stats.bbox_start[i].tolist(), stats.bbox_stop[i].tolist()],
            "suv_max": None,
            "suv_mean": None,
            "mtv_ml": round(volume, 4),
            "tlg": None,
        }
        if intensity is not None:
            suv_mean = float(stats.intensity_mean[i])  # type: ignore[index]
            row.update(
                suv_max=round(float(stats.intensity_max[i]), 3),
                suv_mean=round(suv_mean, 3),  # type: ignore[index]
                tlg=round(suv_mean * volume, 3),
            )
        lesions.append(row)
    return Postprocessed(probability.with_array(mask), probability.with_array(labels), lesions)


def dice(prediction: np.ndarray, truth: np.ndarray) -> float:
    """Dice of two binary masks; 1.0 when both are empty."""
    p, t = prediction.astype(bool), truth.astype(bool)
    denom = int(p.sum()) + int(t.sum())
    return 1.0 if denom == 0 else 2.0 * int(np.logical_and(p, t).sum()) / denom
