"""From scanner images to the model grid and back: physical-space resampling and the manifest's normalisation.

The model grid is axis-aligned (identity direction) with the manifest's isotropic spacing and covers the CT's
physical extent; PET and CT are both resampled onto it in physical space, whatever their own grids and
orientations. Results go back onto the CT's own grid. Training (``diffseg.export``) uses these same functions, so
the model sees at run time exactly what it saw in training.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from .kernels import GridSpec
from .volume import Volume

__all__ = [
    "ModelInput",
    "Normalisation",
    "model_grid_for",
    "normalise",
    "prepare_input",
    "resample_to",
]

IDENTITY = (1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0)


@dataclass(frozen=True)
class Normalisation:
    """``(clip(value, low, high) - offset) * scale`` for one modality (from the manifest)."""

    low: float
    high: float
    offset: float
    scale: float

    @classmethod
    def from_manifest(cls, entry: Mapping[str, object], modality: str) -> Normalisation:
        try:
            low, high = (float(v) for v in entry["clip"])  # type: ignore[union-attr]
            norm = cls(low, high, float(entry["offset"]), float(entry["scale"]))  # type: ignore[arg-type]
        except (KeyError, TypeError, ValueError) as exc:
            raise ValueError(f"normalisation of {modality} needs clip [low, high], offset, scale; got {entry}") from exc
        if not low < high or norm.scale == 0:
            raise ValueError(f"normalisation of {modality}: need low < high and scale != 0, got {entry}")
        return norm


def normalise(array: np.ndarray, norm: Normalisation, out: np.ndarray | None = None) -> np.ndarray:
    """Apply a modality's normalisation in float32 (in place into ``out`` when given)."""
    out = np.empty(array.shape, dtype=np.float32) if out is None else out
    np.clip(array, norm.low, norm.high, out=out, casting="unsafe")
    out -= np.float32(norm.offset)
    out *= np.float32(norm.scale)
    return out


def model_grid_for(ct: Volume, spacing_mm: float) -> GridSpec:
    """An identity-direction grid of ``spacing_mm`` covering the physical extent of the CT's voxel centres."""
    if spacing_mm <= 0:
        raise ValueError(f"spacing_mm must be > 0, got {spacing_mm}")
    x, y, z = ct.size_xyz
    corners = np.array([[i, j, k] for i in (0, x - 1) for j in (0, y - 1) for k in (0, z - 1)], dtype=np.float64)
    pts = ct.index_to_physical(corners)
    lo, hi = pts.min(axis=0), pts.max(axis=0)
    size = tuple(int(np.floor((hi[a] - lo[a]) / spacing_mm + 1e-6)) + 1 for a in range(3))
    # Centre the grid on the CT so that the margin left over is split evenly.
    used = (np.array(size) - 1) * spacing_mm
    origin = tuple(float(lo[a] + ((hi[a] - lo[a]) - used[a]) / 2.0) for a in range(3))
    return GridSpec(size, (spacing_mm,) * 3, origin, IDENTITY)  # type: ignore[arg-type]


def resample_to(volume: Volume, grid: GridSpec, mode: str, default: float = 0.0) -> Volume:
    """Resample ``volume`` onto ``grid`` in physical space (``linear`` → float32, ``nearest`` keeps the dtype)."""
    from .resample import resample

    return resample(volume, grid, mode=mode, default=default)  # type: ignore[arg-type]


@dataclass(frozen=True)
class ModelInput:
    """Image channels on the model grid, in the manifest's modality order, normalised."""

    image: np.ndarray  # [C, z, y, x] float32
    grid: GridSpec


def prepare_input(
    volumes: Mapping[str, Volume],
    modalities: Sequence[str],
    norms: Mapping[str, Normalisation],
    spacing_mm: float,
) -> ModelInput:
    """Resample every modality onto the CT-derived model grid and normalise it.

    Args:
        volumes: images by modality code (``"CT"``, ``"PT"``); the CT defines the model grid.
        modalities: channel order (the manifest's ``modalities``).
        norms: normalisation per modality.
        spacing_mm: the model grid spacing.
    """
    if "CT" not in volumes:
        raise ValueError(f"a CT is required to define the model grid; got modalities {sorted(volumes)}")
    missing = [m for m in modalities if m not in volumes]
    if missing:
        raise ValueError(f"the model needs modalities {list(modalities)}; missing {missing}")
    grid = model_grid_for(volumes["CT"], spacing_mm)
    image = np.empty((len(modalities), *grid.shape), dtype=np.float32)
    for c, modality in enumerate(modalities):
        src = volumes[modality]
        # Outside its field of view a modality reads as its lowest normalised value (air / no uptake).
        resampled = resample_to(src, grid, "linear", default=norms[modality].low)
        normalise(resampled.array, norms[modality], out=image[c])
    return ModelInput(image, grid)
