"""From scanner images to the model grid and back: physical-space resampling and the manifest's normalisation.

The model grid is axis-aligned (identity direction) with the manifest's isotropic spacing and covers the physical
extent of the reference input (the CT when the model takes one, else its first required input); every input is
resampled onto it in physical space, whatever its own grid and orientation. Results go back onto the reference's
own grid. Training (``diffseg.export``) uses these same functions, so
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


NORMALISATIONS = ("clip_scale", "dataset_zscore", "zscore")
ZSCORE_REGIONS = ("image", "nonzero")
_NORM_KEYS = {
    "clip_scale": {"method", "clip", "offset", "scale"},
    "dataset_zscore": {"method", "clip", "mean", "std"},
    "zscore": {"method", "region", "percentiles"},
}


def _number(entry: Mapping[str, object], key: str, modality: str) -> float:
    value = entry.get(key)
    if isinstance(value, bool) or not isinstance(value, int | float) or not np.isfinite(value):
        raise ValueError(f"normalisation of {modality}: {key} must be a finite number, got {value!r}")
    return float(value)


def _pair(entry: Mapping[str, object], key: str, modality: str) -> tuple[float, float]:
    value = entry.get(key)
    ok = isinstance(value, list | tuple) and len(value) == 2
    if not ok or any(isinstance(v, bool) or not isinstance(v, int | float) for v in value):  # type: ignore[union-attr]
        raise ValueError(f"normalisation of {modality}: {key} must be [low, high], got {value!r}")
    low, high = (float(v) for v in value)  # type: ignore[union-attr]
    if not (np.isfinite(low) and np.isfinite(high) and low < high):
        raise ValueError(f"normalisation of {modality}: {key} needs finite low < high, got {value!r}")
    return low, high


@dataclass(frozen=True)
class Normalisation:
    """How one input's raw values become its channel (the manifest's ``normalisation``), one of three methods:

    - ``clip_scale``: ``(clip(v, low, high) − offset) · scale`` (schema 1's only method);
    - ``dataset_zscore``: ``(clip(v, low, high) − mean) / std`` with the training set's figures (nnU-Net's CT
      normalisation: clip at the foreground's 0.5 and 99.5 percentiles, then the foreground's mean and std): the
      same formula as ``clip_scale`` with offset = mean, scale = 1/std;
    - ``zscore``: per case, ``(v − mean) / std`` over ``region`` (``image``: every voxel of the model grid;
      ``nonzero``: the voxels ≠ 0, the others set to 0, as nnU-Net does for MR), after clipping at the case's own
      ``percentiles`` (e.g. [0.5, 99.5]) when given. The figures are taken on the whole model grid (before the body
      crop), so that training and inference see the same numbers.

    Attributes:
        method: one of ``NORMALISATIONS``.
        low, high: the clip bounds (``clip_scale``, ``dataset_zscore``; ±inf for ``zscore``).
        offset, scale: subtracted, then multiplied (``zscore``: 0 and 1 until :meth:`fitted`).
        region: ``zscore`` only: where the figures are taken.
        percentiles: ``zscore`` only: the case's percentiles to clip at first, or None.
        zero_outside: the voxels outside ``region`` become 0 (``zscore`` with ``nonzero``).
    """

    low: float
    high: float
    offset: float
    scale: float
    method: str = "clip_scale"
    region: str = "image"
    percentiles: tuple[float, float] | None = None
    zero_outside: bool = False

    @classmethod
    def from_manifest(cls, entry: Mapping[str, object], modality: str) -> Normalisation:
        if not isinstance(entry, Mapping):
            raise ValueError(f"normalisation of {modality} must be an object, got {entry!r}")
        method = entry.get("method", "clip_scale")
        if method not in NORMALISATIONS:
            raise ValueError(
                f"normalisation of {modality}: method must be one of {list(NORMALISATIONS)}, got {method!r}"
            )
        unknown = sorted(set(entry) - _NORM_KEYS[str(method)])
        missing = sorted(_NORM_KEYS[str(method)] - {"method", "region", "percentiles"} - set(entry))
        if unknown or missing:
            raise ValueError(
                f"normalisation of {modality} ({method}) takes {sorted(_NORM_KEYS[str(method)])}; "
                f"unknown {unknown}, missing {missing}"
            )
        if method == "zscore":
            region = entry.get("region", "image")
            if region not in ZSCORE_REGIONS:
                raise ValueError(
                    f"normalisation of {modality}: region must be one of {list(ZSCORE_REGIONS)}, got {region!r}"
                )
            pct = _pair(entry, "percentiles", modality) if entry.get("percentiles") is not None else None
            if pct is not None and not (0.0 <= pct[0] and pct[1] <= 100.0):
                raise ValueError(f"normalisation of {modality}: percentiles must lie in [0, 100], got {list(pct)}")
            return cls(-np.inf, np.inf, 0.0, 1.0, "zscore", str(region), pct, region == "nonzero")
        low, high = _pair(entry, "clip", modality)
        if method == "dataset_zscore":
            std = _number(entry, "std", modality)
            if std <= 0:
                raise ValueError(f"normalisation of {modality}: std must be > 0, got {std}")
            return cls(low, high, _number(entry, "mean", modality), 1.0 / std, "dataset_zscore")
        scale = _number(entry, "scale", modality)
        if scale == 0:
            raise ValueError(f"normalisation of {modality}: scale must be != 0, got {entry}")
        return cls(low, high, _number(entry, "offset", modality), scale)

    @property
    def fill(self) -> float:
        """The raw value of a voxel outside the input's field of view: its lowest clip bound (air, no uptake), or 0
        for ``zscore`` (the background of an MR)."""
        return 0.0 if self.method == "zscore" else self.low

    def fitted(self, array: np.ndarray) -> Normalisation:
        """This normalisation with the case's figures in it (``zscore``: the clip at the case's percentiles and the
        mean and std over the region of ``array``, the whole model grid); the others as they are.

        Raises:
            ValueError: the region is empty or constant (no z-score exists).
        """
        if self.method != "zscore":
            return self
        values = array[array != 0] if self.region == "nonzero" else array.reshape(-1)
        if values.size == 0:
            raise ValueError(f"z-score normalisation over the {self.region} voxels: the image has none")
        low, high = (-np.inf, np.inf)
        if self.percentiles is not None:
            low, high = (float(v) for v in np.percentile(values, self.percentiles))
            values = np.clip(values, low, high)
        mean, std = float(values.mean(dtype=np.float64)), float(values.std(dtype=np.float64))
        if not std > 1e-8 * max(abs(mean), 1.0):
            raise ValueError(f"z-score normalisation: the image is constant ({mean:g}) over its {self.region} voxels")
        return Normalisation(low, high, mean, 1.0 / std, "zscore", self.region, self.percentiles, self.zero_outside)


def normalise(array: np.ndarray, norm: Normalisation, out: np.ndarray | None = None) -> np.ndarray:
    """Apply a fitted normalisation (:meth:`Normalisation.fitted`) in float32 (in place into ``out`` when given)."""
    out = np.empty(array.shape, dtype=np.float32) if out is None else out
    np.clip(array, norm.low, norm.high, out=out, casting="unsafe")
    out -= np.float32(norm.offset)
    out *= np.float32(norm.scale)
    if norm.zero_outside:
        out[array == 0] = 0.0
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
    reference: str = "CT",
    absent: Mapping[str, float] | None = None,
) -> ModelInput:
    """Resample every input onto the model grid of the reference input, crop to the body and normalise it.

    Args:
        volumes: images by modality code (``"CT"``, ``"PT"``, ``"MR"``, ...).
        modalities: channel order (the manifest's inputs).
        norms: normalisation per modality.
        spacing_mm: the model grid spacing.
        candidate: the rule that marks voxels worth sampling (None: all).
        crop_to_body: crop to :func:`body_box` of the CT when there is one (training keeps the whole grid).
        reference: the input whose extent the model grid covers (``model_contract.reference_input``).
        absent: optional inputs that may be missing, with the normalised value of their channel then.

    Raises:
        ValueError: the reference or a required input missing, a PET without uptake where the CT is, or an image
            whose z-score does not exist (empty or constant).
    """
    absent = absent or {}
    if reference not in volumes:
        raise ValueError(f"the {reference} image is required: it defines the model grid; got {sorted(volumes)}")
    missing = [m for m in modalities if m not in volumes and m not in absent]
    if missing:
        raise ValueError(f"the model needs the inputs {list(modalities)}; missing {missing}")
    grid = model_grid_for(volumes[reference], spacing_mm)
    present = [m for m in modalities if m in volumes]
    # Outside its field of view an input reads as its fill value (air, no uptake, MR background).
    raw = {m: resample_to(volumes[m], grid, "linear", default=norms[m].fill).array for m in present}
    if "PT" in raw and float(raw["PT"].max(initial=0.0)) <= 0.0:
        raise ValueError(
            f"the PET holds no uptake on the {reference}'s field of view: PET and {reference} do not overlap in space "
            "(check that both come from the same study and that their origins and directions were exported with the "
            "images)"
        )
    fitted = {m: norms[m].fitted(raw[m]) for m in present}  # z-score figures over the whole grid, before the crop
    whole = (slice(0, grid.shape[0]), slice(0, grid.shape[1]), slice(0, grid.shape[2]))
    box = body_box(raw["CT"]) if crop_to_body and "CT" in raw else whole
    shape = tuple(b.stop - b.start for b in box)
    image = np.empty((len(modalities), *shape), dtype=np.float32)
    for c, modality in enumerate(modalities):
        if modality in raw:
            normalise(raw[modality][box], fitted[modality], out=image[c])
        else:
            image[c].fill(np.float32(absent[modality]))
    if candidate is not None and candidate.modality not in raw:
        raise ValueError(f"the candidate rule reads the {candidate.modality} image, which is absent")
    mask = None if candidate is None else raw[candidate.modality][box] >= np.float32(candidate.min_value)
    return ModelInput(image, grid, box, mask)
