"""Training data: phantoms on the model grid, and patch sampling with foreground oversampling.

Phantom grids are axis-aligned (possibly flipped), so resampling them onto the model grid is separable: the
linear interpolation here is SimpleITK's (voxel centres, default value outside the source) done one axis at a time
in numpy, which keeps training free of SimpleITK and of the compiled extension (it also runs on a bare GPU box).
The grid definition (``model_grid_for``) and the normalisation are the runtime's own, so training and inference see
the same inputs.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from diffseg.runtime.kernels import GridSpec
from diffseg.runtime.phantom import Phantom, PhantomOptions, make_phantom
from diffseg.runtime.preprocess import Normalisation, model_grid_for, normalise
from diffseg.runtime.volume import Volume

__all__ = ["Case", "PatchSampler", "axis_aligned_linear", "phantom_case"]


def axis_aligned_linear(volume: Volume, grid: GridSpec, default: float) -> np.ndarray:
    """Linear resampling between axis-aligned grids (diagonal ±1 directions), float32 out.

    Target points whose continuous source index lies outside [−0.5, n − 0.5) on any axis take ``default``; inside
    that range neighbours are clamped to the buffer, as in ITK's ``LinearInterpolateImageFunction``.
    """
    src_dir = np.diag(volume.direction_matrix)
    dst_dir = np.diag(np.asarray(grid.direction, dtype=np.float64).reshape(3, 3))
    off_src = volume.direction_matrix - np.diag(src_dir)
    off_dst = np.asarray(grid.direction, dtype=np.float64).reshape(3, 3) - np.diag(dst_dir)
    if np.abs(off_src).max() > 1e-6 or np.abs(off_dst).max() > 1e-6:
        raise ValueError("axis_aligned_linear needs axis-aligned grids (diagonal directions)")
    out = volume.array.astype(np.float32)
    valid = None
    # numpy axis order is (z, y, x); physical axis a = 2 - numpy axis.
    for np_axis in range(3):
        a = 2 - np_axis
        n_dst = grid.size_xyz[a]
        phys = grid.origin[a] + dst_dir[a] * grid.spacing[a] * np.arange(n_dst)
        cont = (phys - volume.origin[a]) / (src_dir[a] * volume.spacing[a])
        n_src = volume.size_xyz[a]
        inside = (cont >= -0.5) & (cont < n_src - 0.5)  # ITK's buffer test; clamped neighbours near the edge
        c = np.clip(cont, 0, n_src - 1)
        i0 = np.minimum(np.floor(c).astype(np.int64), max(n_src - 2, 0))
        w = (c - i0).astype(np.float32)
        i1 = np.minimum(i0 + 1, n_src - 1)
        shape = [1, 1, 1]
        shape[np_axis] = n_dst
        w = w.reshape(shape)
        out = np.take(out, i0, axis=np_axis) * (1 - w) + np.take(out, i1, axis=np_axis) * w
        ins = inside.reshape(shape)
        valid = ins if valid is None else valid & ins
    return np.where(valid, out, np.float32(default)).astype(np.float32)


@dataclass
class Case:
    """A phantom on the model grid: normalised image channels [C, z, y, x] and the binary mask [z, y, x]."""

    seed: int
    image: np.ndarray
    mask: np.ndarray
    grid: GridSpec
    phantom: Phantom | None = None


def phantom_case(
    seed: int,
    modalities: Sequence[str],
    norms: Mapping[str, Normalisation],
    spacing_mm: float,
    keep_phantom: bool = False,
    options: PhantomOptions | None = None,
) -> Case:
    ph = make_phantom(seed, options)
    grid = model_grid_for(ph.ct, spacing_mm)
    vols = {"CT": ph.ct, "PT": ph.pet}
    image = np.empty((len(modalities), *grid.shape), dtype=np.float32)
    for c, m in enumerate(modalities):
        arr = axis_aligned_linear(vols[m], grid, norms[m].low)
        normalise(arr, norms[m], out=image[c])
    # Mask on the model grid: the fraction of tumour by linear interpolation, thresholded at one half.
    frac = axis_aligned_linear(ph.mask, grid, 0.0)
    mask = (frac >= 0.5).astype(np.uint8)
    return Case(seed, image, mask, grid, ph if keep_phantom else None)


class PatchSampler:
    """Random training patches: a share centred on tumour voxels, a share on hot PET voxels, the rest anywhere.

    Hot non-tumour voxels (brain, tonsils, glands) are the hard negatives that teach the model to use CT context.
    """

    def __init__(
        self,
        cases: Sequence[Case],
        patch: Sequence[int],
        rng: np.random.Generator,
        foreground_fraction: float = 0.5,
        hot_fraction: float = 0.25,
        pet_channel: int = 0,
        hot_level: float = 0.4,
    ) -> None:
        self.cases = list(cases)
        self.patch = tuple(int(p) for p in patch)
        self.rng = rng
        self.fg = foreground_fraction
        self.hot = hot_fraction
        self.fg_index = [np.argwhere(c.mask > 0) for c in self.cases]
        self.hot_index = [np.argwhere(c.image[pet_channel] > hot_level) for c in self.cases]

    def _crop(self, case: Case, centre: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        shape = np.array(case.mask.shape)
        p = np.array(self.patch)
        start = np.clip(centre - p // 2, 0, np.maximum(shape - p, 0))
        sl = tuple(slice(int(s), int(s) + int(n)) for s, n in zip(start, p, strict=True))
        img = case.image[(slice(None), *sl)]
        msk = case.mask[sl]
        if img.shape[1:] != self.patch:  # volume smaller than the patch: pad with each channel's minimum
            pad = [(0, 0)] + [(0, int(n - s)) for n, s in zip(p, img.shape[1:], strict=True)]
            img = np.stack([np.pad(ch, pad[1:], constant_values=ch.min()) for ch in img])
            msk = np.pad(msk, pad[1:])
        return img, msk

    def sample(self, batch: int) -> tuple[np.ndarray, np.ndarray]:
        images, masks = [], []
        for _ in range(batch):
            i = int(self.rng.integers(len(self.cases)))
            case = self.cases[i]
            u = self.rng.random()
            if u < self.fg and len(self.fg_index[i]):
                centre = self.fg_index[i][self.rng.integers(len(self.fg_index[i]))]
            elif u < self.fg + self.hot and len(self.hot_index[i]):
                centre = self.hot_index[i][self.rng.integers(len(self.hot_index[i]))]
            else:
                centre = np.array([self.rng.integers(n) for n in case.mask.shape])
            centre = centre + self.rng.integers(-8, 9, size=3)
            img, msk = self._crop(case, centre)
            if self.rng.random() < 0.5:  # left-right flip: the anatomy is symmetric, lesions are not
                img, msk = img[..., ::-1], msk[..., ::-1]
            images.append(img)
            masks.append(msk)
        return np.ascontiguousarray(np.stack(images)), np.ascontiguousarray(np.stack(masks))
