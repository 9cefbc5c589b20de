"""Training data: phantoms on the model grid, and patch sampling with foreground oversampling.

A phantom goes onto the model grid through the runtime's own :func:`~diffseg.runtime.preprocess.prepare_input`
(model grid, physical-space resampling by ``diffseg._ext``, normalisation), so training and inference see the same
inputs; only the body crop is left out, since the patch sampler picks the training patches itself.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from diffseg.runtime.phantom import Phantom, PhantomOptions, make_phantom
from diffseg.runtime.preprocess import Normalisation, prepare_input, resample_to
from diffseg.runtime.volume import GridSpec

__all__ = ["Case", "PatchSampler", "phantom_case"]


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
    # The runtime's own preparation, on the whole model grid (the patch sampler crops the training patches).
    model_input = prepare_input({"CT": ph.ct, "PT": ph.pet}, modalities, norms, spacing_mm, crop_to_body=False)
    # Mask on the model grid: the fraction of tumour by linear interpolation, thresholded at one half.
    fraction = resample_to(ph.mask.with_array(ph.mask.array.astype(np.float32)), model_input.grid, "linear")
    mask = (fraction.array >= 0.5).astype(np.uint8)
    return Case(seed, model_input.image, mask, model_input.grid, ph if keep_phantom else None)


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
