"""Connected components, statistics and size filtering against scipy.ndimage, cc3d and numpy.

References and tolerances:
- labels: ``scipy.ndimage.label`` (binary) and ``cc3d.connected_components`` (multi-label): identical label
  images and n (exact), at 6/18/26-connectivity;
- statistics: numpy/scipy on the same labels: counts, boxes, maxima exact; sums, means and centroids to 1e-9
  relative (summation order differs);
- size filtering: a numpy reference built from scipy labels and ``np.bincount`` (exact).
"""

from __future__ import annotations

import gc

import numpy as np
import pytest
from scipy import ndimage as ndi

from diffseg.runtime.components import (
    component_stats,
    connected_components,
    label_components,
    remove_small_components,
)
from diffseg.runtime.phantom import PhantomOptions, make_phantom
from diffseg.runtime.volume import GridSpec, Volume

cc3d = pytest.importorskip("cc3d")

CONNECTIVITIES = (6, 18, 26)
# Shapes that exercise full 64-voxel chunks, tails, single rows and single planes.
SHAPES = [(7, 13, 150), (5, 9, 64), (3, 20, 33), (1, 1, 200), (12, 1, 70), (4, 5, 1)]


def _structure(connectivity: int) -> np.ndarray:
    return ndi.generate_binary_structure(3, {6: 1, 18: 2, 26: 3}[connectivity])


def _random_mask(shape, density, seed) -> np.ndarray:
    return np.random.default_rng(seed).random(shape) < density


@pytest.mark.parametrize("connectivity", CONNECTIVITIES)
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("density", [0.15, 0.5, 0.85])
def test_binary_labels_equal_scipy(connectivity, shape, density):
    mask = _random_mask(shape, density, seed=hash((shape, density)) % 2**32)
    expected, n_expected = ndi.label(mask, _structure(connectivity))
    labels, n = connected_components(mask, connectivity, multilabel=False)
    assert n == n_expected
    np.testing.assert_array_equal(labels, expected)


@pytest.mark.parametrize("connectivity", CONNECTIVITIES)
@pytest.mark.parametrize("dtype", [np.uint8, np.uint16, np.uint32, np.int32, np.uint64])
def test_multilabel_equal_cc3d(connectivity, dtype):
    rng = np.random.default_rng(7)
    mask = _random_mask((6, 15, 140), 0.6, seed=3) * rng.integers(1, 4, (6, 15, 140))
    mask = mask.astype(dtype)
    expected, n_expected = cc3d.connected_components(mask, connectivity=connectivity, return_N=True)
    labels, n = connected_components(mask, connectivity)
    assert n == n_expected
    np.testing.assert_array_equal(labels, expected)


@pytest.mark.parametrize("connectivity", CONNECTIVITIES)
@pytest.mark.parametrize("threads", [1, 2])
def test_smoothed_noise_equals_cc3d(connectivity, threads):
    # The benchmark's dense case in small: runs of every length, hundreds of them per plane, many planes per slab.
    field = ndi.gaussian_filter(np.random.default_rng(5).random((40, 48, 300), dtype=np.float32), sigma=1.0)
    mask = (field > np.median(field)).astype(np.uint8)
    expected, n_expected = cc3d.connected_components(mask, connectivity=connectivity, return_N=True)
    labels, n = connected_components(mask, connectivity, threads=threads)
    assert n == n_expected
    np.testing.assert_array_equal(labels, expected)


@pytest.mark.parametrize("threads", [1, 2, 3, 7])
def test_thread_count_does_not_change_labels(threads):
    # Slab seams fall at different planes for each thread count; the numbering must not move.
    mask = _random_mask((11, 24, 90), 0.45, seed=11)
    expected, n_expected = ndi.label(mask, _structure(26))
    labels, n = connected_components(mask, 26, threads=threads)
    assert n == n_expected
    np.testing.assert_array_equal(labels, expected)


@pytest.mark.parametrize("seed", [1, 5])
def test_phantom_mask_equals_scipy_and_cc3d(seed):
    mask = make_phantom(seed, PhantomOptions(ct_size_xy=64, ct_slices=16)).mask.array
    # Dilated noise around the lesions gives several components.
    noisy = mask | (np.random.default_rng(seed).random(mask.shape) < 0.02).astype(np.uint8)
    for connectivity in CONNECTIVITIES:
        expected, n_expected = ndi.label(noisy, _structure(connectivity))
        labels, n = connected_components(noisy, connectivity)
        assert n == n_expected
        np.testing.assert_array_equal(labels, expected)
        np.testing.assert_array_equal(labels, cc3d.connected_components(noisy, connectivity=connectivity))


def test_label_dtype_is_the_smallest_that_fits():
    # A 3D checkerboard has one 6-connected component per foreground voxel.
    z, y, x = np.indices((4, 12, 12))
    board = ((z + y + x) % 2).astype(np.uint8)
    labels, n = connected_components(board, 6)
    assert n == board.sum() == 288 and labels.dtype == np.uint16
    labels, n = connected_components(board[:, :6, :6], 6)
    assert n == 72 and labels.dtype == np.uint8
    labels, _ = connected_components(board, 6, dtype=np.int32)
    assert labels.dtype == np.int32
    with pytest.raises(ValueError, match="cannot hold 288"):
        connected_components(board, 6, dtype=np.uint8)


@pytest.mark.parametrize("dtype", [np.uint8, np.uint16, np.uint32, np.int32, np.uint64, np.int64])
@pytest.mark.parametrize("density", [0.2, 0.6])
def test_every_label_dtype_paints_the_same_labels(dtype, density):
    # Dense rows take the vector paint (whole 16-byte stores per run), sparse outputs small pages; both must
    # leave exactly scipy's labels, in a fresh array and in a dirty caller buffer.
    mask = _random_mask((3, 40, 150), density, seed=13)
    expected, n = ndi.label(mask, _structure(26))
    if np.iinfo(dtype).max < n:
        pytest.skip("too many components for this dtype")
    labels, _ = connected_components(mask, dtype=dtype)
    assert labels.dtype == dtype and labels.flags.writeable and labels.flags.c_contiguous
    np.testing.assert_array_equal(labels, expected)
    dirty = np.full(mask.shape, 99, dtype)
    connected_components(mask, out=dirty)
    np.testing.assert_array_equal(dirty, expected)


def test_labels_outlive_the_call_and_can_be_written():
    mask = _random_mask((4, 30, 100), 0.05, seed=21)  # sparse: the labels live on pages mapped by the kernel
    expected, _ = ndi.label(mask, _structure(26))
    labels, _ = connected_components(mask)
    del mask
    gc.collect()
    np.testing.assert_array_equal(labels, expected)
    labels[0, 0, 0] = 7
    assert labels[0, 0, 0] == 7


@pytest.mark.parametrize(
    "mask",
    [
        np.zeros((0, 4, 5), np.uint8),
        np.zeros((3, 0, 5), np.uint8),
        np.zeros((3, 4, 0), np.uint8),
        np.ones((1, 1, 1), np.uint8),
        np.zeros((1, 1, 1), np.uint8),
        np.ones((5, 6, 70), np.uint8),
        np.zeros((5, 6, 70), np.uint8),
    ],
    ids=["empty-z", "empty-y", "empty-x", "one-voxel", "one-background", "all-foreground", "all-background"],
)
def test_degenerate_volumes(mask):
    labels, n = connected_components(mask)
    expected, n_expected = ndi.label(mask, _structure(26))
    assert labels.shape == mask.shape and n == n_expected
    np.testing.assert_array_equal(labels, expected)
    stats = component_stats(labels, n)
    assert stats.n == n and stats.voxel_count.sum() == mask.sum()
    np.testing.assert_array_equal(remove_small_components(mask, 2), mask if mask.size > 1 else 0 * mask)


def test_non_contiguous_fortran_and_read_only_inputs():
    base = _random_mask((8, 30, 80), 0.5, seed=2).astype(np.uint8)
    expected, _ = ndi.label(base[:, ::2, 1::3], _structure(26))
    labels, _ = connected_components(base[:, ::2, 1::3])
    np.testing.assert_array_equal(labels, expected)
    fortran = np.asfortranarray(base)  # numbered in C raster order all the same
    np.testing.assert_array_equal(connected_components(fortran)[0], ndi.label(base, _structure(26))[0])
    frozen = base.copy()
    frozen.flags.writeable = False
    np.testing.assert_array_equal(connected_components(frozen)[0], ndi.label(base, _structure(26))[0])


def test_out_buffer_is_written_in_full():
    mask = _random_mask((4, 10, 66), 0.4, seed=4)
    out = np.full(mask.shape, 12345, np.uint32)  # stale values must be overwritten with background
    labels, _ = connected_components(mask, out=out)
    assert labels is out
    np.testing.assert_array_equal(out, ndi.label(mask, _structure(26))[0])


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"mask": np.zeros((4, 4), np.uint8)}, ValueError, "3D"),
        ({"mask": np.zeros((2, 2, 2), np.float32)}, TypeError, "booleans or integers"),
        ({"mask": [[[1]]]}, TypeError, "numpy array"),
        ({"connectivity": 8}, ValueError, "connectivity must be 6, 18 or 26"),
        ({"out": np.zeros((2, 2, 3), np.uint32)}, ValueError, "shape"),
        ({"out": np.zeros((2, 2, 2), np.float32)}, TypeError, "out must be one of"),
        ({"out": np.zeros((2, 2, 2, 2), np.uint32)[..., 0]}, ValueError, "C-contiguous"),
        ({"threads": 0}, ValueError, "threads"),
        ({"dtype": np.float64}, TypeError, "dtype"),
    ],
)
def test_bad_arguments_raise(kwargs, error, match):
    args = {"mask": np.ones((2, 2, 2), np.uint8)} | kwargs
    with pytest.raises(error, match=match):
        connected_components(**args)


def test_read_only_out_raises():
    out = np.zeros((2, 2, 2), np.uint32)
    out.flags.writeable = False
    with pytest.raises(ValueError, match="writeable"):
        connected_components(np.ones((2, 2, 2), np.uint8), out=out)


# ------------------------------------------------------------------------------------------------ statistics


def _reference_stats(labels: np.ndarray, n: int, image: np.ndarray):
    index = np.arange(1, n + 1)
    count = np.bincount(labels.ravel(), minlength=n + 1)[1:]
    boxes = ndi.find_objects(labels, max_label=n)
    start = np.array([[s.start for s in b] for b in boxes])
    stop = np.array([[s.stop for s in b] for b in boxes])
    centroid = np.array(ndi.center_of_mass(np.ones_like(labels), labels, index))
    total = ndi.sum_labels(image.astype(np.float64), labels, index)
    maximum = ndi.maximum(image, labels, index)
    return count, start, stop, centroid, total, maximum


@pytest.mark.parametrize("intensity_dtype", [np.float32, np.int16, np.float64])
def test_fused_and_standalone_stats_equal_numpy(intensity_dtype):
    phantom = make_phantom(2, PhantomOptions(ct_size_xy=64, ct_slices=16))
    rng = np.random.default_rng(0)
    mask = phantom.mask.array | (rng.random(phantom.mask.shape) < 0.01).astype(np.uint8)
    image = (phantom.ct.array if intensity_dtype == np.int16 else rng.normal(0, 100, mask.shape)).astype(
        intensity_dtype
    )
    labels, stats = label_components(
        Volume(mask, phantom.ct.spacing, phantom.ct.origin, phantom.ct.direction), intensity=image
    )
    expected_labels, n = ndi.label(mask, _structure(26))
    np.testing.assert_array_equal(labels, expected_labels)
    standalone = component_stats(expected_labels, n, intensity=image)
    count, start, stop, centroid, total, maximum = _reference_stats(expected_labels, n, image)
    for s in (stats, standalone):
        assert s.n == n
        np.testing.assert_array_equal(s.voxel_count, count)
        np.testing.assert_array_equal(s.bbox_start, start)
        np.testing.assert_array_equal(s.bbox_stop, stop)
        np.testing.assert_allclose(s.centroid_index, centroid, rtol=1e-9)
        np.testing.assert_allclose(s.intensity_sum, total, rtol=1e-9, atol=1e-9)
        np.testing.assert_array_equal(s.intensity_max, maximum)
        np.testing.assert_allclose(s.intensity_mean, total / count, rtol=1e-9, atol=1e-12)
    # Millimetre fields from the Volume's geometry (the CT grid may be flipped).
    expected_mm = phantom.ct.index_to_physical(centroid[:, ::-1])
    np.testing.assert_allclose(stats.centroid_mm, expected_mm, rtol=0, atol=1e-9)
    np.testing.assert_allclose(stats.volume_ml, count * phantom.ct.voxel_volume_ml, rtol=1e-12)
    assert standalone.centroid_mm is None  # plain arrays carry no geometry
    grid = GridSpec.of(phantom.ct)
    assert np.allclose(component_stats(expected_labels, n, grid=grid).centroid_mm, expected_mm, atol=1e-9)


def test_stats_of_cc3d_multilabel_and_missing_components():
    mask = (_random_mask((5, 9, 80), 0.5, seed=9) * np.random.default_rng(1).integers(1, 3, (5, 9, 80))).astype(
        np.uint16
    )
    labels = cc3d.connected_components(mask, connectivity=6).astype(np.uint32)
    n = int(labels.max())
    stats = component_stats(labels, n + 2)  # two components that do not occur
    np.testing.assert_array_equal(stats.voxel_count[:n], np.bincount(labels.ravel())[1:])
    assert list(stats.voxel_count[n:]) == [0, 0]
    assert np.isnan(stats.centroid_index[n:]).all()
    assert component_stats(labels).n == n  # n from labels.max()
    with pytest.raises(ValueError, match="greater than n"):
        component_stats(labels, n - 1)
    with pytest.raises(ValueError, match=">= 0"):
        component_stats(labels.astype(np.int32) - 1)


def test_nan_in_intensity_propagates_to_its_component_only():
    mask = np.zeros((3, 4, 70), np.uint8)
    mask[0, 0, 2:5] = 1  # component 1
    mask[2, 3, 60:66] = 1  # component 2
    image = np.ones(mask.shape, np.float32)
    image[0, 0, 3] = np.nan
    _, stats = label_components(mask, intensity=image)
    assert np.isnan(stats.intensity_max[0]) and np.isnan(stats.intensity_sum[0])
    assert stats.intensity_max[1] == 1.0 and stats.intensity_sum[1] == 6.0


def test_intensity_must_match_the_mask():
    mask = np.ones((2, 3, 4), np.uint8)
    with pytest.raises(ValueError, match="intensity has shape"):
        label_components(mask, intensity=np.ones((2, 3, 5), np.float32))
    with pytest.raises(TypeError, match="intensity must have one of"):
        label_components(mask, intensity=np.ones((2, 3, 4), np.complex64))
    a = Volume(mask, (1.0, 1.0, 1.0), (0.0, 0.0, 0.0))
    b = Volume(np.ones((2, 3, 4), np.float32), (1.0, 1.0, 2.0), (0.0, 0.0, 0.0))
    with pytest.raises(ValueError, match="different grids"):
        label_components(a, intensity=b)


# ------------------------------------------------------------------------------------------------ size filtering


def _reference_clean(mask, min_voxels, keep_largest, connectivity):
    labels, n = ndi.label(mask, _structure(connectivity))
    count = np.bincount(labels.ravel(), minlength=n + 1)
    keep = np.zeros(n + 1, bool)
    keep[1:] = count[1:] >= min_voxels
    if keep_largest is not None:
        candidates = np.flatnonzero(keep)
        order = candidates[np.argsort(-count[candidates], kind="stable")]  # ties: lower label first
        keep[:] = False
        keep[order[:keep_largest]] = True
    return np.where(keep[labels], mask, 0).astype(mask.dtype)


@pytest.mark.parametrize("connectivity", CONNECTIVITIES)
@pytest.mark.parametrize(("min_voxels", "keep_largest"), [(0, None), (3, None), (10, None), (2, 3), (0, 1), (1, 0)])
def test_remove_small_components_equals_reference(connectivity, min_voxels, keep_largest):
    mask = _random_mask((6, 20, 90), 0.25, seed=5).astype(np.uint8) * 7  # values are kept, not set to 1
    expected = _reference_clean(mask, min_voxels, keep_largest, connectivity)
    cleaned = remove_small_components(mask, min_voxels, keep_largest, connectivity, multilabel=False)
    assert cleaned.dtype == mask.dtype
    np.testing.assert_array_equal(cleaned, expected)


def test_remove_small_components_in_place_and_bool():
    mask = _random_mask((4, 12, 70), 0.3, seed=8)
    expected = _reference_clean(mask.astype(np.uint8), 4, None, 26).astype(bool)
    np.testing.assert_array_equal(remove_small_components(mask, 4), expected)
    in_place = mask.copy()
    result = remove_small_components(in_place, 4, out=in_place)
    assert result is in_place
    np.testing.assert_array_equal(in_place, expected)
    shared = np.zeros((5, 12, 70), bool)
    with pytest.raises(ValueError, match="overlaps"):
        remove_small_components(shared[:4], 4, out=shared[1:])
    with pytest.raises(ValueError, match="min_voxels"):
        remove_small_components(mask, -1)
    with pytest.raises(ValueError, match="keep_largest"):
        remove_small_components(mask, 1, keep_largest=-2)
