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

from .volume import GridSpec, Volume

__all__ = [
    "CandidateRule",
    "ModelInput",
    "Normalisation",
    "body_box",
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


BODY_HU = -500.0
BODY_MARGIN = 4


def body_box(ct_hu: np.ndarray, level: float = BODY_HU, margin: int = BODY_MARGIN) -> tuple[slice, slice, slice]:
    """Bounding box (with a margin, in voxels) of the tissue above ``level`` HU: the air around the patient is
    background by definition, so sampling it only costs time. The whole grid if nothing is above the level."""
    inside = ct_hu > level
    box = []
    for axis in range(3):
        other = tuple(a for a in range(3) if a != axis)
        hit = np.flatnonzero(inside.any(axis=other))
        n = ct_hu.shape[axis]
        box.append(slice(max(int(hit[0]) - margin, 0), min(int(hit[-1]) + 1 + margin, n)) if hit.size else slice(0, n))
    return (box[0], box[1], box[2])


@dataclass(frozen=True)
class CandidateRule:
    """Voxels that may hold tumour: the modality's raw value (before normalisation) at least ``min_value``. Windows
    without one are not sampled (the manifest's ``defaults.candidate``)."""

    modality: str
    min_value: float

    @classmethod
    def from_manifest(cls, entry: Mapping[str, object] | None, modalities: Sequence[str]) -> CandidateRule | None:
        if not entry:
            return None
        modality, level = entry.get("modality"), entry.get("min_value")
        if modality not in modalities:
            raise ValueError(f"candidate rule: modality must be one of the model's {list(modalities)}, got {entry}")
        if isinstance(level, bool) or not isinstance(level, int | float):
            raise ValueError(f"candidate rule: min_value must be a number, got {entry}")
        return cls(str(modality), float(level))


@dataclass(frozen=True)
class ModelInput:
    """A case as the sampler sees it.

    Attributes:
        image: ``[C, z, y, x]`` float32, the manifest's modalities in order, normalised, cropped to ``box``.
        grid: the whole model grid (identity direction, the manifest's spacing, the CT's extent).
        box: the body box within ``grid`` (the whole grid when not cropped).
        candidate: ``[z, y, x]`` bool within ``box`` from the candidate rule, or None (every window runs).
    """

    image: np.ndarray
    grid: GridSpec
    box: tuple[slice, slice, slice]
    candidate: np.ndarray | None

    def uncrop(self, cropped: np.ndarray) -> Volume:
        """A map over ``box`` placed on the whole model grid (0 outside the box: background, certain)."""
        full = np.zeros(self.grid.shape, dtype=np.float32)
        full[self.box] = cropped
        return Volume(full, self.grid.spacing, self.grid.origin, self.grid.direction)


def prepare_input(
    volumes: Mapping[str, Volume],
    modalities: Sequence[str],
    norms: Mapping[str, Normalisation],
    spacing_mm: float,
    *,
    candidate: CandidateRule | None = None,
    crop_to_body: bool = True,
) -> ModelInput:
    """Resample every modality onto the CT-derived model grid, crop to the body and normalise it.

    Args:
        volumes: images by modality code (``"CT"``, ``"PT"``); the CT defines the model grid.
        modalities: channel order (the manifest's ``modalities``).
        norms: normalisation per modality.
        spacing_mm: the model grid spacing.
        candidate: the rule that marks voxels worth sampling (None: all).
        crop_to_body: crop to :func:`body_box` of the CT (training keeps the whole grid).

    Raises:
        ValueError: no CT, a modality missing, or a PET without uptake where the CT is.
    """
    if "CT" not in volumes:
        raise ValueError(f"a CT is required to define the model grid; got modalities {sorted(volumes)}")
    missing = [m for m in modalities if m not in volumes]
    if missing:
        raise ValueError(f"the model needs modalities {list(modalities)}; missing {missing}")
    grid = model_grid_for(volumes["CT"], spacing_mm)
    # Outside its field of view a modality reads as its lowest normalised value (air / no uptake).
    raw = {m: resample_to(volumes[m], grid, "linear", default=norms[m].low).array for m in modalities}
    if "PT" in raw and float(raw["PT"].max(initial=0.0)) <= 0.0:
        raise ValueError(
            "the PET holds no uptake on the CT's field of view: PET and CT do not overlap in space (check that both "
            "come from the same study and that their origins and directions were exported with the images)"
        )
    whole = (slice(0, grid.shape[0]), slice(0, grid.shape[1]), slice(0, grid.shape[2]))
    box = body_box(raw["CT"]) if crop_to_body and "CT" in raw else whole
    shape = tuple(b.stop - b.start for b in box)
    image = np.empty((len(modalities), *shape), dtype=np.float32)
    for c, modality in enumerate(modalities):
        normalise(raw[modality][box], norms[modality], out=image[c])
    mask = None if candidate is None else raw[candidate.modality][box] >= np.float32(candidate.min_value)
    return ModelInput(image, grid, box, mask)
