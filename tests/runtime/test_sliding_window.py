"""Sliding window against MONAI 1.6.1 ``sliding_window_inference`` (tiling, Gaussian map, padding, blending)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from monai.data.utils import compute_importance_map, dense_patch_slices
from monai.inferers import sliding_window_inference
from monai.inferers.utils import _get_scan_interval

from diffseg.runtime.sliding_window import SlidingWindow, WindowOptions, importance_map, sliding_window, window_starts

# (volume, patch, overlap): odd shapes, a volume smaller than the patch on some axes, equal on one, a big overlap
CASES = [
    ((20, 24, 28), (8, 10, 12), 0.25),
    ((5, 30, 7), (8, 8, 8), 0.5),
    ((17, 9, 33), (16, 9, 10), 0.6),
    ((3, 4, 5), (8, 8, 8), 0.25),
    ((13, 11, 16), (13, 6, 7), 0.0),
]


def assert_rel(got: np.ndarray, ref: np.ndarray, tol: float = 1e-5) -> None:
    assert got.shape == ref.shape
    err = np.max(np.abs(got.astype(np.float64) - ref)) / np.max(np.abs(ref))
    assert err <= tol, f"relative error {err:.3g} > {tol:g}"


def monai(image: np.ndarray, predictor, patch, overlap, batch=3) -> np.ndarray:
    """The reference: MONAI's sliding_window_inference, gaussian mode, σ = 0.125·patch, zero padding."""

    def torch_predictor(b: torch.Tensor) -> torch.Tensor:
        return torch.from_numpy(np.ascontiguousarray(predictor(b.numpy())))

    out = sliding_window_inference(
        torch.from_numpy(image)[None],
        patch,
        batch,
        torch_predictor,
        overlap=overlap,
        mode="gaussian",
        sigma_scale=0.125,
    )
    return out[0].numpy().astype(np.float64)


def plus_one(b):
    return b + 1


def times_two(b):
    return 2 * b


def window_dependent(b):
    """Depends on the whole window's content (its mean), so tiling and weights both show in the blend."""
    return b + b.mean(axis=tuple(range(1, b.ndim)), keepdims=True)


def two_channels(b):
    return np.concatenate(
        [np.sin(3 * b[:, :1]) + b[:, 1:2] ** 2, b[:, :1] * b.std(axis=tuple(range(1, b.ndim)), keepdims=True)], axis=1
    ).astype(np.float32)


@pytest.mark.parametrize(("shape", "patch", "overlap"), CASES)
def test_window_starts_match_monai(shape, patch, overlap):
    # Reference: MONAI dense_patch_slices on the padded size with _get_scan_interval (exact).
    window = SlidingWindow(shape, WindowOptions(patch_size=patch, overlap=overlap))
    padded = tuple(max(s, p) for s, p in zip(shape, patch, strict=True))
    ref = dense_patch_slices(padded, patch, _get_scan_interval(padded, patch, 3, (overlap,) * 3))
    assert window.slices == ref
    for axis in range(3):
        starts = window_starts(padded[axis], patch[axis], overlap)
        assert sorted({s[axis].start for s in ref}) == starts


@pytest.mark.parametrize("patch", [(8, 10, 12), (96, 96, 96), (7, 1, 5)])
@pytest.mark.parametrize("mode", ["gaussian", "constant"])
def test_importance_map_matches_monai(patch, mode):
    # Reference: MONAI compute_importance_map (float32); rtol 1e-6.
    ref = compute_importance_map(patch, mode=mode, sigma_scale=0.125).numpy()
    got = importance_map(patch, mode, 0.125)
    assert got.dtype == np.float32
    np.testing.assert_allclose(got, ref, rtol=1e-6)
    assert got.min() >= 1e-3


@pytest.mark.parametrize(("shape", "patch", "overlap"), CASES)
@pytest.mark.parametrize("predictor", [plus_one, times_two, window_dependent, two_channels])
def test_blend_matches_monai(shape, patch, overlap, predictor):
    # Reference: monai.inferers.sliding_window_inference(mode="gaussian", sigma_scale=0.125); 1e-5 relative.
    image = np.random.default_rng(sum(shape)).standard_normal((2, *shape)).astype(np.float32)
    result = sliding_window(image, predictor, WindowOptions(patch_size=patch, overlap=overlap, batch_size=4))
    assert result.output.dtype == np.float32
    assert_rel(result.output, monai(image, predictor, patch, overlap))
    assert result.windows_skipped == 0
    assert result.engine_calls == -(-result.windows // 4)


def test_blend_matches_monai_2d():
    # Reference: MONAI on a 2D image (the tiling is dimension-agnostic); 1e-5 relative.
    image = np.random.default_rng(0).standard_normal((1, 37, 23)).astype(np.float32)
    result = sliding_window(image, window_dependent, WindowOptions(patch_size=(16, 16), overlap=0.5))
    assert_rel(result.output, monai(image, window_dependent, (16, 16), 0.5))


@pytest.mark.parametrize("fill", [0.0, -0.5])
def test_skipped_windows_count_as_fill_value(fill):
    # Reference: MONAI with a predictor that returns the fill value in windows whose input is all zero (the inputs
    # are zero exactly outside the candidate region); 1e-5 relative.
    shape, patch = (24, 20, 30), (8, 8, 8)
    image = np.zeros((1, *shape), np.float32)
    image[0, 2:6, 3:9, 20:27] = np.random.default_rng(1).uniform(1, 2, (4, 6, 7))
    candidate = image[0] != 0

    def predictor(b):
        out = window_dependent(b)
        out[~b.any(axis=(1, 2, 3, 4))] = fill
        return out

    options = WindowOptions(patch_size=patch, overlap=0.25, batch_size=2, fill_value=fill)
    result = sliding_window(image, predictor, options, candidate=candidate)
    window = SlidingWindow(shape, options)
    expected_run = sum(bool(candidate[s].any()) for s in window.slices)
    assert result.windows_skipped == window.num_windows - expected_run > 0
    assert result.engine_calls == -(-expected_run // 2)
    assert_rel(result.output, monai(image, predictor, patch, 0.25))


def test_every_window_skipped_gives_the_fill_value():
    options = WindowOptions(patch_size=(4, 4, 4), fill_value=0.25)
    result = sliding_window(np.ones((1, 6, 6, 6), np.float32), plus_one, options, candidate=np.zeros((6, 6, 6), bool))
    assert result.engine_calls == 0 and result.windows_skipped == result.windows == 8
    np.testing.assert_array_equal(result.output, np.full((1, 6, 6, 6), 0.25, np.float32))


def test_cached_window_gives_the_same_output():
    # Reference: the same call without a cached SlidingWindow (bit-exact).
    options = WindowOptions(patch_size=(8, 10, 12), overlap=0.5)
    image = np.random.default_rng(2).standard_normal((1, 20, 24, 28)).astype(np.float32)
    window = SlidingWindow((20, 24, 28), options)
    np.testing.assert_array_equal(
        sliding_window(image, window_dependent, window=window).output,
        sliding_window(image, window_dependent, options).output,
    )
    with pytest.raises(ValueError, match="window was built for"):
        sliding_window(image[:, :-1], window_dependent, window=window)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"overlap": 1.0}, "overlap must be >= 0 and < 1"),
        ({"batch_size": 0}, "batch_size"),
        ({"patch_size": (8, 0, 8)}, "patch_size"),
        ({"mode": "triangle"}, "mode"),
        ({"sigma_scale": 0.0}, "sigma_scale"),
    ],
)
def test_window_options_errors(kwargs, message):
    with pytest.raises(ValueError, match=message):
        WindowOptions(**kwargs)


def test_boundary_errors():
    image = np.zeros((1, 10, 10, 10), np.float32)
    options = WindowOptions(patch_size=(4, 4, 4))
    with pytest.raises(ValueError, match="predict returned shape"):
        sliding_window(image, lambda b: b[:, :, :2], options)
    with pytest.raises(ValueError, match="inputs must be"):
        sliding_window(image[0], plus_one, options)
    with pytest.raises(ValueError, match="candidate shape"):
        sliding_window(image, plus_one, options, candidate=np.ones((10, 10), bool))
