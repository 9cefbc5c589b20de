"""The phantoms' CT and PET images: scanner-like grids, CT numbers with noise, PET activity blurred, noisy, binned.

The CT and the PET grid each get their own spacing, origin, extent and orientation, as in a real PET/CT, and both
rasterise the same anatomy and lesions.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

from ..volume import Volume
from ._anatomy import _HU, _NECROSIS_HU, TONGUE, _Anatomy, _tissue_map
from ._lesions import _LesionDesign, _rasterise_lesions

if TYPE_CHECKING:
    from . import PhantomOptions

# --------------------------------------------------------------------------------------------------------------
# Geometry helpers. Phantom grids are axis-aligned (possibly flipped), so physical coordinates separate per axis.


def _axis_grid(n: int, spacing: float, centre: float, flip: bool) -> tuple[float, float]:
    """(origin, direction cosine) of an axis of ``n`` voxels centred on ``centre`` mm."""
    sign = -1.0 if flip else 1.0
    return centre - sign * spacing * (n - 1) / 2.0, sign


def _coords(vol_origin: float, sign: float, spacing: float, n: int) -> np.ndarray:
    return (vol_origin + sign * spacing * np.arange(n)).astype(np.float32)


def _make_grid(
    n_xyz: tuple[int, int, int],
    spacing: tuple[float, float, float],
    centre: tuple[float, float, float],
    flips: tuple[bool, bool, bool],
):
    origin, signs = [], []
    for n, s, c, f in zip(n_xyz, spacing, centre, flips, strict=True):
        o, sg = _axis_grid(n, s, c, f)
        origin.append(o)
        signs.append(sg)
    direction = (signs[0], 0.0, 0.0, 0.0, signs[1], 0.0, 0.0, 0.0, signs[2])
    xs = _coords(origin[0], signs[0], spacing[0], n_xyz[0])
    ys = _coords(origin[1], signs[1], spacing[1], n_xyz[1])
    zs = _coords(origin[2], signs[2], spacing[2], n_xyz[2])
    # Broadcastable [z, y, x] coordinate arrays.
    return tuple(origin), direction, (xs[None, None, :], ys[None, :, None], zs[:, None, None])


def _gaussian_blur(volume: np.ndarray, sigma_vox: float) -> np.ndarray:
    """Separable Gaussian blur (numpy only), zero outside the volume."""
    radius = max(1, int(np.ceil(3.0 * sigma_vox)))
    x = np.arange(-radius, radius + 1, dtype=np.float64)
    kernel = np.exp(-0.5 * (x / sigma_vox) ** 2)
    kernel /= kernel.sum()
    out = volume.astype(np.float32)
    for axis in range(3):
        padded = np.moveaxis(out, axis, -1)
        n = padded.shape[-1]
        acc = np.zeros_like(padded)
        for k, w in zip(range(-radius, radius + 1), kernel, strict=True):
            lo, hi = max(0, -k), min(n, n - k)
            if lo < hi:
                acc[..., lo:hi] += np.float32(w) * padded[..., lo + k : hi + k]
        out = np.moveaxis(acc, -1, axis)
    return np.ascontiguousarray(out)


def _ct_image(
    rng: np.random.Generator, opt: PhantomOptions, anatomy: _Anatomy, designs: list[_LesionDesign]
) -> tuple[Volume, np.ndarray, tuple[float, float, float], np.ndarray]:
    """The CT (HU, int16) with the lesion labels on its grid, the grid centre and the field of view (mm, x y z)."""
    # CT grid: scanner-like, centred on the neck, random table offset, sometimes stored flipped.
    sxy = opt.ct_spacing_xy or float(rng.choice([0.9115, 0.9766, 1.0156]))
    nz = opt.ct_slices or int(rng.integers(56, 73))
    ct_centre = (rng.uniform(-8, 8), rng.uniform(-5, 15), rng.uniform(-20, 0))
    flips = tuple(bool(rng.random() < opt.flip_probability) for _ in range(3))
    ct_origin, ct_dir, (X, Y, Z) = _make_grid(
        (opt.ct_size_xy, opt.ct_size_xy, nz), (sxy, sxy, opt.ct_slice_mm), ct_centre, flips
    )
    tissue = _tissue_map(X, Y, Z, anatomy)
    labels, _, necrosis = _rasterise_lesions(X, Y, Z, designs, tissue, with_activity=False)

    hu = np.vectorize(_HU.get, otypes=[np.float32])(np.arange(12))[tissue]
    lesion_hu = np.zeros(len(designs) + 1, dtype=np.float32)
    lesion_hu[1:] = rng.uniform(58.0, 80.0, size=len(designs))
    hu = np.where(labels > 0, lesion_hu[labels], hu)
    hu = np.where(necrosis, _NECROSIS_HU, hu)
    hu += rng.normal(0.0, opt.ct_noise_hu, size=hu.shape).astype(np.float32)
    ct = np.clip(np.rint(hu), -1024, 3071).astype(np.int16)
    ct_vol = Volume(ct, (sxy, sxy, opt.ct_slice_mm), ct_origin, ct_dir)
    ct_extent = np.array([opt.ct_size_xy * sxy, opt.ct_size_xy * sxy, nz * opt.ct_slice_mm])
    return ct_vol, labels, ct_centre, ct_extent


def _pet_image(
    rng: np.random.Generator,
    opt: PhantomOptions,
    anatomy: _Anatomy,
    designs: list[_LesionDesign],
    ct_centre: tuple[float, float, float],
    ct_extent: np.ndarray,
) -> Volume:
    """The PET (SUVbw, float32) over a field of view a little larger than the CT's, on its own grid."""
    # PET: activity on a 2 mm grid over the PET field of view, blurred, noisy, binned 2×2×2 to the 4 mm grid.
    pet_sp = opt.pet_spacing_mm or float(rng.uniform(3.9, 4.1))
    fwhm = opt.pet_fwhm_mm or float(rng.uniform(5.0, 7.0))
    pet_n = [
        int(np.ceil(ct_extent[0] * rng.uniform(1.05, 1.25) / pet_sp)),
        int(np.ceil(ct_extent[1] * rng.uniform(1.05, 1.25) / pet_sp)),
        int(np.ceil(ct_extent[2] * rng.uniform(0.95, 1.1) / pet_sp)),
    ]
    pet_n = [n + (n % 2) for n in pet_n]
    pet_centre = (
        ct_centre[0] + rng.uniform(-6, 6),
        ct_centre[1] + rng.uniform(-6, 6),
        ct_centre[2] + rng.uniform(-10, 10),
    )
    pet_flips = tuple(bool(rng.random() < opt.flip_probability) for _ in range(3))
    fine_n = tuple(2 * n for n in pet_n)
    fine_sp = pet_sp / 2.0
    _, _, (FX, FY, FZ) = _make_grid(fine_n, (fine_sp,) * 3, pet_centre, pet_flips)
    fine_tissue = _tissue_map(FX, FY, FZ, anatomy)
    fine_labels, fine_act, _ = _rasterise_lesions(FX, FY, FZ, designs, fine_tissue, with_activity=True)
    suv_table = np.array([anatomy.suv[k] for k in range(12)], dtype=np.float32)
    if anatomy.tongue_hot:
        suv_table[TONGUE] *= 1.8
    activity = suv_table[fine_tissue]
    activity = np.where(fine_labels > 0, fine_act, activity)
    blurred = _gaussian_blur(activity, fwhm / 2.3548 / fine_sp)
    white = rng.normal(size=blurred.shape).astype(np.float32)
    corr = _gaussian_blur(white, 1.0)
    corr /= max(float(corr.std()), 1e-6)
    noisy = blurred + opt.pet_noise * np.sqrt(np.maximum(blurred, 0.0)) * corr
    nzp, nyp, nxp = pet_n[2], pet_n[1], pet_n[0]
    pet = noisy.reshape(nzp, 2, nyp, 2, nxp, 2).mean(axis=(1, 3, 5))
    pet = np.maximum(pet, 0.0).astype(np.float32)
    # The binned grid: voxel centres sit between pairs of fine voxels.
    pet_origin, pet_dir, _ = _make_grid(tuple(pet_n), (pet_sp,) * 3, pet_centre, pet_flips)
    return Volume(pet, (pet_sp,) * 3, pet_origin, pet_dir)
