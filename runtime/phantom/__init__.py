"""Synthetic head-and-neck FDG PET/CT phantoms with ground-truth tumour masks (numpy only).

Anatomy is defined analytically in physical space (mm, LPS: +x left, +y posterior, +z superior) and rasterised
separately on the CT grid and on the PET grid, so the two images agree in physical space while having their own
spacing, origin, extent and orientation, as a real PET/CT does. Physiological uptake (brain, tonsils, salivary
glands, tongue and neck muscles) competes with the tumours on PET, so that CT context is needed to tell them apart.

Seeds split into documented sets (``SPLITS``): the test and validation seeds are never used for training.

This module is the API (options, cases, ``make_phantom``, ``write_phantom``); the anatomy is in ``_anatomy``, the
lesions in ``_lesions``, the CT and PET images in ``_imaging``.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from ..volume import Volume
from ._anatomy import _draw_anatomy
from ._imaging import _ct_image, _pet_image
from ._lesions import _place_lesions

__all__ = ["SPLITS", "Lesion", "Phantom", "PhantomOptions", "make_phantom", "split_seeds", "write_phantom"]

#: Seed ranges of the documented split. Training may use any seed ≥ 1000.
SPLITS: dict[str, range] = {
    "test": range(1, 21),
    "validation": range(101, 121),
    "train": range(1000, 100_000),
}


def split_seeds(name: str, count: int | None = None) -> list[int]:
    """Seeds of a split (``train``, ``validation``, ``test``), the first ``count`` of them if given."""
    if name not in SPLITS:
        raise ValueError(f"split must be one of {sorted(SPLITS)}, got {name!r}")
    seeds = SPLITS[name]
    if count is not None:
        if count < 0 or count > len(seeds):
            raise ValueError(f"count must be in 0..{len(seeds)} for split {name!r}, got {count}")
        seeds = seeds[:count]
    return list(seeds)


@dataclass(frozen=True)
class PhantomOptions:
    """Grid and noise settings of a phantom.

    Attributes:
        ct_size_xy: CT matrix in plane (voxels); the scanner default for H&N is 512, 256 keeps cases light.
        ct_slices: CT slice count (None: random 56–72).
        ct_spacing_xy: CT pixel size (mm); None draws 0.90–1.05.
        ct_slice_mm: CT slice spacing (mm).
        pet_spacing_mm: PET voxel size (mm); None draws 3.9–4.1.
        pet_fwhm_mm: PET resolution (mm); None draws 5–7.
        ct_noise_hu: standard deviation of CT noise (HU).
        pet_noise: relative PET noise at SUV 1.
        flip_probability: chance that a grid is stored with flipped axes (negative direction cosines).
    """

    ct_size_xy: int = 256
    ct_slices: int | None = None
    ct_spacing_xy: float | None = None
    ct_slice_mm: float = 3.0
    pet_spacing_mm: float | None = None
    pet_fwhm_mm: float | None = None
    ct_noise_hu: float = 12.0
    pet_noise: float = 0.12
    flip_probability: float = 0.3

    def __post_init__(self) -> None:
        if self.ct_size_xy < 32:
            raise ValueError(f"ct_size_xy must be >= 32, got {self.ct_size_xy}")
        if self.ct_slices is not None and self.ct_slices < 8:
            raise ValueError(f"ct_slices must be >= 8, got {self.ct_slices}")
        if not 0.0 <= self.flip_probability <= 1.0:
            raise ValueError(f"flip_probability must be in [0, 1], got {self.flip_probability}")


@dataclass
class Lesion:
    """One tumour or node as generated.

    Attributes:
        kind: ``primary`` or ``node``.
        label: the value of this lesion in the instance mask (1-based).
        centre_mm: designed centre (physical, LPS).
        volume_ml: ground-truth volume: labelled CT voxels × voxel volume.
        voxels: labelled CT voxels.
        suv_max: designed peak activity (before PET blur and noise).
        suv_max_pet: maximum of the PET image at the lesion's CT voxels (nearest PET voxel).
        necrotic: whether it has a necrotic (cold, hypodense) core.
    """

    kind: str
    label: int
    centre_mm: tuple[float, float, float]
    volume_ml: float
    voxels: int
    suv_max: float
    suv_max_pet: float
    necrotic: bool


@dataclass
class Phantom:
    seed: int
    ct: Volume
    pet: Volume
    mask: Volume
    lesions: list[Lesion] = field(default_factory=list)

    def case_info(self) -> dict:
        """What ``case.json`` holds: the lesion list and the grids."""

        def grid(v: Volume) -> dict:
            return {
                "size_xyz": list(v.size_xyz),
                "spacing_mm": list(v.spacing),
                "origin_mm": list(v.origin),
                "direction": list(v.direction),
            }

        return {
            "seed": self.seed,
            "split": next((n for n, r in SPLITS.items() if self.seed in r), "none"),
            "generator": "diffseg.runtime.phantom",
            "ct": grid(self.ct),
            "pet": grid(self.pet),
            "total_volume_ml": float(sum(les.volume_ml for les in self.lesions)),
            "lesions": [asdict(les) for les in self.lesions],
        }


def make_phantom(seed: int, options: PhantomOptions | None = None) -> Phantom:
    """Generate one synthetic H&N PET/CT case, deterministic per seed.

    Args:
        seed: the case seed (see ``SPLITS``).
        options: grid and noise settings; ``None`` uses the defaults.

    Returns:
        A ``Phantom`` with CT (HU, int16), PET (SUVbw, float32), the ground-truth mask on the CT grid (uint8,
        1 = tumour) and the lesion list.
    """
    if seed < 0:
        raise ValueError(f"seed must be >= 0, got {seed}")
    opt = options or PhantomOptions()
    rng = np.random.default_rng(seed)
    # One generator for the whole case, drawn in this order: anatomy, lesions, CT grid and noise, PET grid and noise.
    anatomy = _draw_anatomy(rng)
    designs = _place_lesions(rng, anatomy)
    ct_vol, labels, ct_centre, ct_extent = _ct_image(rng, opt, anatomy, designs)
    mask_vol = Volume((labels > 0).astype(np.uint8), ct_vol.spacing, ct_vol.origin, ct_vol.direction)
    pet_vol = _pet_image(rng, opt, anatomy, designs, ct_centre, ct_extent)
    lesions = _lesion_table(designs, labels, ct_vol, pet_vol)
    return Phantom(seed=seed, ct=ct_vol, pet=pet_vol, mask=mask_vol, lesions=lesions)


def _lesion_table(designs, labels: np.ndarray, ct: Volume, pet: Volume) -> list[Lesion]:
    counts = np.bincount(labels.ravel(), minlength=len(designs) + 1)
    lesions = []
    for i, d in enumerate(designs, start=1):
        if counts[i] == 0:
            continue
        zyx = np.argwhere(labels == i)
        idx = pet.physical_to_index(ct.index_to_physical(zyx[:, ::-1].astype(np.float64)))
        ijk = np.rint(idx).astype(np.int64)
        ok = np.all((ijk >= 0) & (ijk < np.array(pet.size_xyz)), axis=1)
        suv_pet = float(pet.array[ijk[ok, 2], ijk[ok, 1], ijk[ok, 0]].max()) if ok.any() else 0.0
        lesions.append(
            Lesion(
                kind=d.kind,
                label=len(lesions) + 1,
                centre_mm=tuple(round(float(c), 2) for c in d.centre),
                volume_ml=round(float(counts[i]) * ct.voxel_volume_ml, 4),
                voxels=int(counts[i]),
                suv_max=round(d.suv_max, 3),
                suv_max_pet=round(suv_pet, 3),
                necrotic=d.necrotic,
            )
        )
    return lesions


def write_phantom(phantom: Phantom, out_dir: str | Path) -> dict[str, Path]:
    """Write ``ct.nii.gz``, ``pet.nii.gz``, ``mask.nii.gz`` and ``case.json`` into ``out_dir`` (atomically)."""
    from ..atomic import write_json_atomic
    from ..volume import write_volume

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {
        "ct": write_volume(phantom.ct, out / "ct.nii.gz"),
        "pet": write_volume(phantom.pet, out / "pet.nii.gz"),
        "mask": write_volume(phantom.mask, out / "mask.nii.gz"),
    }
    paths["case"] = write_json_atomic(out / "case.json", phantom.case_info())
    return paths


def phantom_info_json(phantom: Phantom) -> str:
    return json.dumps(phantom.case_info(), indent=2)
