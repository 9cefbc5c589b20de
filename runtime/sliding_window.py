"""Sliding-window inference with MONAI's tiling and Gaussian blending, in numpy with float32 accumulators.

Tiling follows ``monai.inferers.sliding_window_inference`` (MONAI 1.6.1, ``monai/inferers/utils.py`` and
``monai/data/utils.py``) so that results compare with it directly:

- an axis shorter than the patch is padded symmetrically (``diff // 2`` before, the rest after) with a constant, and
  the output is cropped back;
- stride per axis = ``int(patch · (1 − overlap))`` (at least 1), or the patch when patch == padded size;
- n windows per axis = 1 + the first d with ``d·stride + patch ≥ size``; starts ``d·stride``, the last one shifted
  back to ``size − patch`` (windows never overhang); windows are enumerated in C order over the axes;
- importance map ``w = ∏_i exp(−x_i² / (2σ_i²))``, ``x_i ∈ [−(p_i−1)/2, (p_i−1)/2]``, σ_i = sigma_scale·p_i, then
  clamped from below at ``max(min(w), 1e-3)``; ``constant`` mode uses ones;
- output = Σ w·prediction / Σ w over all windows.

Windows with no candidate voxel can be skipped: their prediction counts as a constant ``fill_value`` (still weighted
by w), so the result equals running a predictor that returns ``fill_value`` there.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np

__all__ = [
    "SlidingWindow",
    "WindowOptions",
    "WindowResult",
    "importance_map",
    "sliding_window",
    "window_starts",
]

logger = logging.getLogger("diffseg")

Predictor = Callable[[np.ndarray], np.ndarray]


@dataclass(frozen=True)
class WindowOptions:
    """Tiling and blending of the sliding window.

    Attributes:
        patch_size: window size per spatial axis (the engine's fixed input shape), numpy axis order.
        overlap: fraction of overlap between neighbouring windows, in [0, 1).
        batch_size: windows (× samples, in the sampler) per engine call.
        mode: ``gaussian`` or ``constant`` blending.
        sigma_scale: σ of the Gaussian map as a fraction of the patch size.
        pad_value: constant used to pad axes shorter than the patch.
        fill_value: prediction assumed for skipped windows (generic :func:`sliding_window` only; the sampler fills
            skipped windows with the "background" prediction instead).
        input_cache_mb: the sampler keeps its per-batch engine inputs (image channels written once) when they take at
            most this many MiB; otherwise one batch buffer is refilled for each call.
        retire_after: step-major sampler only; 0 = off. A (window, sample) whose predicted x0 has been background
            everywhere (foreground probability ≤ ``retire_level`` in every voxel) for this many consecutive steps is
            not run again: from then on it predicts background, as a window without candidate tissue does. The last
            step is never skipped on account of a retirement that only it could decide.
        retire_level: the foreground probability (0 … 0.5) under which a voxel counts as background for retirement.
        cache_conditioning: a model with a condition graph: compute each window's features once and reuse them at
            every step and for every sample (False: again for every row of every engine call, as a paper's loop).
    """

    patch_size: tuple[int, ...] = (96, 96, 96)
    overlap: float = 0.25
    batch_size: int = 4
    mode: str = "gaussian"
    sigma_scale: float = 0.125
    pad_value: float = 0.0
    fill_value: float = 0.0
    input_cache_mb: float = 1024.0
    retire_after: int = 0
    retire_level: float = 0.01
    cache_conditioning: bool = True

    def __post_init__(self) -> None:
        patch = tuple(int(p) for p in self.patch_size)
        if not patch or any(p < 1 for p in patch) or any(p != q for p, q in zip(patch, self.patch_size, strict=True)):
            raise ValueError(f"patch_size must be positive integers, got {self.patch_size}")
        object.__setattr__(self, "patch_size", patch)
        if not (0 <= self.overlap < 1):
            raise ValueError(f"overlap must be >= 0 and < 1, got {self.overlap}")
        if isinstance(self.batch_size, bool) or not isinstance(self.batch_size, int) or self.batch_size < 1:
            raise ValueError(f"batch_size must be an int >= 1, got {self.batch_size!r}")
        if self.mode not in ("gaussian", "constant"):
            raise ValueError(f"mode must be 'gaussian' or 'constant', got {self.mode!r}")
        if not (math.isfinite(self.sigma_scale) and self.sigma_scale > 0):
            raise ValueError(f"sigma_scale must be > 0, got {self.sigma_scale}")
        if not (math.isfinite(self.pad_value) and math.isfinite(self.fill_value)):
            raise ValueError(f"pad_value and fill_value must be finite, got {self.pad_value}, {self.fill_value}")
        if not self.input_cache_mb >= 0:
            raise ValueError(f"input_cache_mb must be >= 0, got {self.input_cache_mb}")
        if isinstance(self.retire_after, bool) or not isinstance(self.retire_after, int) or self.retire_after < 0:
            raise ValueError(f"retire_after must be an int >= 0 (0 = off), got {self.retire_after!r}")
        if not (0 <= self.retire_level <= 0.5):
            raise ValueError(f"retire_level must be a probability in [0, 0.5], got {self.retire_level}")


@dataclass(frozen=True)
class WindowResult:
    """What :func:`sliding_window` returns.

    Attributes:
        output: blended prediction ``[C_out, *spatial]``, float32 (``C_out`` = 1 if every window was skipped).
        windows: number of windows in the tiling.
        windows_skipped: windows not run (no candidate voxel).
        engine_calls: calls of the predictor.
        engine_seconds: wall time inside the predictor.
        options: the options used.
    """

    output: np.ndarray
    windows: int
    windows_skipped: int
    engine_calls: int
    engine_seconds: float
    options: WindowOptions = field(repr=False)


def window_starts(size: int, patch: int, overlap: float) -> list[int]:
    """Window starts along one axis of a (padded) size ≥ patch, as MONAI's ``dense_patch_slices``.

    Args:
        size: axis length (already padded to at least ``patch``).
        patch: window length.
        overlap: fraction in [0, 1).

    Returns:
        Sorted list of start indices; the last window ends at ``size``.

    Raises:
        ValueError: if ``size < patch``.
    """
    if size < patch:
        raise ValueError(f"size must be >= patch (pad first), got size={size}, patch={patch}")
    stride = patch if patch == size else max(int(patch * (1 - overlap)), 1)
    count = next(d for d in range(size) if d * stride + patch >= size) + 1
    return [d * stride - max(d * stride + patch - size, 0) for d in range(count)]


def importance_map(patch_size: Sequence[int], mode: str = "gaussian", sigma_scale: float = 0.125) -> np.ndarray:
    """Per-window blending weights, as MONAI's ``compute_importance_map`` (float32 arithmetic, as MONAI).

    Args:
        patch_size: window size per axis.
        mode: ``gaussian`` or ``constant``.
        sigma_scale: σ_i = sigma_scale · patch_i.

    Returns:
        float32 array of shape ``patch_size``, clamped from below at ``max(min, 1e-3)``.

    Raises:
        ValueError: on an unknown mode.
    """
    if mode == "constant":
        return np.ones(tuple(patch_size), np.float32)
    if mode != "gaussian":
        raise ValueError(f"mode must be 'gaussian' or 'constant', got {mode!r}")
    weight = np.ones((), np.float32)
    for p in patch_size:
        x = np.arange(p, dtype=np.float32) - np.float32((p - 1) / 2.0)
        sigma = np.float32(p * sigma_scale)
        weight = weight[..., None] * np.exp(x**2 / (np.float32(-2) * sigma**2))
    return np.maximum(weight, max(float(weight.min()), 1e-3)).astype(np.float32)


class SlidingWindow:
    """The tiling of one spatial shape: padding, window slices, importance map and 1/Σw, computed once.

    Args:
        image_shape: spatial shape of the volume (numpy order).
        options: patch size, overlap, blending.

    Raises:
        ValueError: if the shape does not match the patch's number of axes.
    """

    def __init__(self, image_shape: Sequence[int], options: WindowOptions) -> None:
        self.options = options
        self.image_shape = tuple(int(s) for s in image_shape)
        patch = options.patch_size
        if len(self.image_shape) != len(patch) or any(s < 1 for s in self.image_shape):
            raise ValueError(f"image_shape {self.image_shape} must be positive with {len(patch)} axes like patch_size")
        diffs = [max(p - s, 0) for p, s in zip(patch, self.image_shape, strict=True)]
        self.pad_width = tuple((d // 2, d - d // 2) for d in diffs)
        self.padded_shape = tuple(max(p, s) for p, s in zip(patch, self.image_shape, strict=True))
        self.needs_padding = any(diffs)
        self.interior = tuple(slice(b, b + s) for (b, _), s in zip(self.pad_width, self.image_shape, strict=True))
        axes = [window_starts(s, p, options.overlap) for s, p in zip(self.padded_shape, patch, strict=True)]
        self.starts = np.stack([g.ravel() for g in np.meshgrid(*axes, indexing="ij")], axis=1)
        self.slices = [tuple(slice(int(b), int(b) + p) for b, p in zip(st, patch, strict=True)) for st in self.starts]
        self.weight = importance_map(patch, options.mode, options.sigma_scale)
        self.inv_weight_sum = np.float32(1.0) / self.weight_sum_of(np.ones(len(self.slices), bool))

    @property
    def num_windows(self) -> int:
        """Number of windows in the tiling."""
        return len(self.slices)

    def __repr__(self) -> str:
        return (
            f"SlidingWindow(image={self.image_shape}, patch={self.options.patch_size}, "
            f"overlap={self.options.overlap}, windows={self.num_windows}, padded={self.padded_shape})"
        )

    def pad(self, array: np.ndarray, value: float | None = None) -> np.ndarray:
        """Pad the trailing spatial axes to the padded shape (``array`` itself when no padding is needed)."""
        if not self.needs_padding:
            return array
        lead = [(0, 0)] * (array.ndim - len(self.image_shape))
        fill = self.options.pad_value if value is None else value
        return np.pad(array, lead + list(self.pad_width), mode="constant", constant_values=fill)

    def crop(self, array: np.ndarray) -> np.ndarray:
        """Crop the trailing spatial axes from the padded shape back to the image shape (a view)."""
        if not self.needs_padding:
            return array
        return array[(Ellipsis, *self.interior)]

    def active(self, candidate: np.ndarray | None) -> np.ndarray:
        """Which windows hold at least one candidate voxel.

        Args:
            candidate: boolean map on the image grid, or None (every window is active).

        Returns:
            bool array ``[num_windows]``.

        Raises:
            ValueError: if the map's shape is not the image shape.
        """
        if candidate is None:
            return np.ones(self.num_windows, bool)
        candidate = np.asarray(candidate)
        if candidate.shape != self.image_shape:
            raise ValueError(f"candidate shape {candidate.shape} differs from image shape {self.image_shape}")
        padded = self.pad(candidate.astype(bool, copy=False), False)
        return np.array([bool(padded[s].any()) for s in self.slices], dtype=bool)

    def weight_sum_of(self, windows: np.ndarray) -> np.ndarray:
        """Σ w over the selected windows (a bool mask over the tiling), on the padded grid (float32)."""
        total = np.zeros(self.padded_shape, np.float32)
        for i in np.flatnonzero(windows):
            total[self.slices[i]] += self.weight
        return total


def sliding_window(
    inputs: np.ndarray,
    predict: Predictor,
    options: WindowOptions | None = None,
    *,
    candidate: np.ndarray | None = None,
    window: SlidingWindow | None = None,
) -> WindowResult:
    """Run ``predict`` over all windows of ``inputs`` and blend the outputs with the importance map.

    Args:
        inputs: ``[C, *spatial]`` array (any float dtype; windows are passed as float32).
        predict: ``predict(batch [n, C, *patch]) -> [n, C_out, *patch]``.
        options: tiling; None → defaults (or ``window.options``).
        candidate: optional boolean map ``[*spatial]``; windows without a candidate voxel are not run and count as
            ``options.fill_value``.
        window: a cached :class:`SlidingWindow` for this shape and options.

    Returns:
        The blended float32 output ``[C_out, *spatial]`` and counts.

    Raises:
        ValueError: on mismatched shapes or a predictor output of the wrong shape.
    """
    options = options or (window.options if window is not None else WindowOptions())
    inputs = np.asarray(inputs)
    if inputs.ndim != len(options.patch_size) + 1:
        raise ValueError(
            f"inputs must be [C, *spatial] with {len(options.patch_size)} spatial axes, got shape {inputs.shape}"
        )
    sw = window or SlidingWindow(inputs.shape[1:], options)
    if sw.image_shape != inputs.shape[1:] or sw.options != options:
        raise ValueError(f"window was built for {sw.image_shape} and {sw.options}, got {inputs.shape[1:]}, {options}")
    padded = sw.pad(inputs.astype(np.float32, copy=False))
    run = np.flatnonzero(sw.active(candidate))
    patch = options.patch_size
    batch = np.empty((min(options.batch_size, max(run.size, 1)), inputs.shape[0], *patch), np.float32)
    acc: np.ndarray | None = None
    product = np.empty(patch, np.float32)
    calls, seconds = 0, 0.0
    for first in range(0, run.size, options.batch_size):
        ids = run[first : first + options.batch_size]
        for j, i in enumerate(ids):
            batch[j] = padded[(slice(None), *sw.slices[i])]
        start = time.perf_counter()
        out = np.asarray(predict(batch[: ids.size]))
        seconds += time.perf_counter() - start
        calls += 1
        if out.ndim != len(patch) + 2 or out.shape[0] != ids.size or out.shape[2:] != patch:
            raise ValueError(f"predict returned shape {out.shape}, expected [{ids.size}, C_out, *{patch}]")
        if acc is None:
            acc = np.zeros((out.shape[1], *sw.padded_shape), np.float32)
        for j, i in enumerate(ids):
            target = acc[(slice(None), *sw.slices[i])]
            for c in range(out.shape[1]):
                np.multiply(out[j, c], sw.weight, out=product)
                target[c] += product
    skipped = sw.num_windows - run.size
    if acc is None:  # every window skipped: the output is the fill value everywhere
        acc = np.full((1, *sw.padded_shape), options.fill_value, np.float32)
    else:
        if skipped and options.fill_value != 0:
            not_run = np.ones(sw.num_windows, bool)
            not_run[run] = False
            acc += np.float32(options.fill_value) * sw.weight_sum_of(not_run)
        acc *= sw.inv_weight_sum
    if logger.isEnabledFor(logging.DEBUG):
        logger.debug("sliding window: %d windows, %d skipped, %d calls", sw.num_windows, skipped, calls)
    return WindowResult(
        output=np.ascontiguousarray(sw.crop(acc)),
        windows=sw.num_windows,
        windows_skipped=int(skipped),
        engine_calls=calls,
        engine_seconds=seconds,
        options=options,
    )
