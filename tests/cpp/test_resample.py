"""Resampling against SimpleITK's ``Resample`` with equal, flipped and oblique directions.

References and tolerances:
- linear: ``SimpleITK.Resample(sitkLinear, sitkFloat32)``, 1e-4 absolute on HU-scale data (-1024..3071); the
  kernels compute continuous indices and interpolate in ITK's order of operations, so axis-aligned grids (equal
  or flipped directions) must match to the bit, which the tests assert;
- nearest: ``SimpleITK.Resample(sitkNearestNeighbor)``: identical on axis-aligned grids; on oblique ones,
  identical except at exact ties (a continuous index within 1e-9 of a half-integer, where the last bit of the
  matrix inverse decides, SVD in ITK and LU here); the test computes those voxels and allows differences only there;
- label vote: SimpleITK linear resampling of each one-hot channel (float64) then the first argmax, identical
  except where the two best labels' weights are within 1e-9.
"""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
import SimpleITK as sitk

from diffseg.runtime.native import index_affine
from diffseg.runtime.phantom import PhantomOptions, make_phantom
from diffseg.runtime.resample import resample, resample_array, resample_image
from diffseg.runtime.volume import GridSpec, Volume

KINDS = ("equal", "flipped", "oblique")


def _rotation(rng: np.random.Generator) -> np.ndarray:
    q, r = np.linalg.qr(rng.normal(size=(3, 3)))
    return q * np.sign(np.diag(r))


def _source_direction(rng, kind) -> np.ndarray:
    return _rotation(rng) if kind == "oblique" and rng.random() < 0.5 else np.diag(rng.choice([-1.0, 1.0], 3))


def _random_grids(seed: int, kind: str) -> tuple[GridSpec, GridSpec]:
    """A source grid and an overlapping target grid whose directions are equal, flipped or oblique."""
    rng = np.random.default_rng(seed)
    d_src = _source_direction(rng, kind)
    if kind == "equal":
        d_dst = d_src
    elif kind == "flipped":
        d_dst = d_src @ np.diag(rng.choice([-1.0, 1.0], 3))
    else:
        d_dst = _rotation(rng)
    n_src, s_src = rng.integers(6, 22, 3), rng.uniform(0.7, 3.0, 3)
    s_dst = rng.uniform(0.5, 3.5, 3)
    extent = np.sort(n_src * s_src)[rng.permutation(3)] if kind == "oblique" else n_src * s_src
    n_dst = np.maximum(2, np.round(extent * rng.uniform(0.6, 1.3, 3) / s_dst)).astype(int)
    o_src = rng.uniform(-50, 50, 3)
    centre = o_src + d_src @ (s_src * (n_src - 1) / 2) + rng.normal(0, 3, 3)
    o_dst = centre - d_dst @ (s_dst * (n_dst - 1) / 2)
    src = GridSpec(tuple(int(v) for v in n_src), tuple(s_src), tuple(o_src), tuple(d_src.ravel()))
    dst = GridSpec(tuple(int(v) for v in n_dst), tuple(s_dst), tuple(o_dst), tuple(d_dst.ravel()))
    return src, dst


def _sitk(array: np.ndarray, grid: GridSpec) -> sitk.Image:
    image = sitk.GetImageFromArray(array)
    image.SetSpacing(grid.spacing)
    image.SetOrigin(grid.origin)
    image.SetDirection(grid.direction)
    return image


def _sitk_resample(array, src, dst, interpolator, default, pixel_type) -> np.ndarray:
    reference = _sitk(np.zeros(dst.shape, np.uint8), dst)
    out = sitk.Resample(_sitk(array, src), reference, sitk.Transform(), interpolator, default, pixel_type)
    return sitk.GetArrayFromImage(out)


def _continuous_index(src: GridSpec, dst: GridSpec) -> np.ndarray:
    """Source continuous index (x, y, z) of every target voxel, shape dst.shape + (3,)."""
    m, b = index_affine(src, dst)
    z, y, x = np.indices(dst.shape, dtype=np.float64)
    return np.stack([x, y, z], axis=-1) @ m.T + b


def _ties(src: GridSpec, dst: GridSpec, eps: float = 1e-9) -> np.ndarray:
    c = _continuous_index(src, dst)
    frac = c - np.floor(c)
    edge = np.abs(c + 0.5) < eps
    edge |= np.abs(c - (np.array(src.size_xyz) - 0.5)) < eps
    return np.any((np.abs(frac - 0.5) < eps) | edge, axis=-1)


def _hu(shape, seed) -> np.ndarray:
    return np.random.default_rng(seed).uniform(-1024, 3071, shape).astype(np.float32)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("seed", range(6))
def test_linear_equals_simpleitk(kind, seed):
    src, dst = _random_grids(seed, kind)
    image = _hu(src.shape, seed)
    expected = _sitk_resample(image, src, dst, sitk.sitkLinear, -2000.0, sitk.sitkFloat32)
    result = resample_array(image, src, dst, "linear", default=-2000.0)
    assert result.dtype == np.float32 and result.shape == dst.shape
    assert (expected != -2000.0).mean() > 0.1, "the grids should overlap"
    np.testing.assert_allclose(result, expected, rtol=0, atol=1e-4)
    if kind != "oblique":
        np.testing.assert_array_equal(result, expected)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("seed", range(6))
def test_nearest_equals_simpleitk_except_at_ties(kind, seed):
    src, dst = _random_grids(100 + seed, kind)
    labels = np.random.default_rng(seed).integers(0, 200, src.shape).astype(np.uint8)
    expected = _sitk_resample(labels, src, dst, sitk.sitkNearestNeighbor, 255, sitk.sitkUInt8)
    result = resample_array(labels, src, dst, "nearest", default=255)
    if kind != "oblique":
        np.testing.assert_array_equal(result, expected)
    differ = result != expected
    assert not np.any(differ & ~_ties(src, dst))


def test_nearest_rounds_half_way_cases_up_as_itk():
    # Target voxel centres fall exactly half-way between source voxels along x: floor(c + 0.5) picks the upper one.
    src = GridSpec((8, 3, 2), (1.0, 1.0, 1.0), (0.0, 0.0, 0.0))
    dst = GridSpec((4, 3, 2), (2.0, 1.0, 1.0), (0.5, 0.0, 0.0))
    labels = np.arange(48, dtype=np.int16).reshape(src.shape)
    expected = _sitk_resample(labels, src, dst, sitk.sitkNearestNeighbor, -1, sitk.sitkInt16)
    result = resample_array(labels, src, dst, "nearest", default=-1)
    np.testing.assert_array_equal(result, expected)
    np.testing.assert_array_equal(result[0, 0], [1, 3, 5, 7])


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("seed", range(3))
def test_label_vote_equals_one_hot_linear_argmax(kind, seed):
    src, dst = _random_grids(200 + seed, kind)
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 4, src.shape).astype(np.uint16) * 3  # labels 0, 3, 6, 9
    values = np.array([0, 3, 6, 9], np.uint16)
    probs = np.stack(
        [
            _sitk_resample((labels == v).astype(np.float64), src, dst, sitk.sitkLinear, 0.0, sitk.sitkFloat64)
            for v in values
        ]
    )
    expected = values[np.argmax(probs, axis=0)]  # ties: the first (smallest) label
    top2 = np.sort(probs, axis=0)[-2:]
    decided = top2[1] - top2[0] > 1e-9
    inside = _sitk_resample(np.ones(src.shape, np.float32), src, dst, sitk.sitkLinear, 0.0, sitk.sitkFloat32) > 0
    result = resample_array(labels, src, dst, "label_vote", default=1)
    np.testing.assert_array_equal(result[inside & decided], expected[inside & decided])
    assert np.all(result[~inside] == 1)
    assert (inside & decided).mean() > 0.05


def test_label_vote_on_the_same_grid_is_identity():
    grid = GridSpec((17, 9, 5), (0.9, 1.1, 3.0), (4.0, -2.0, 7.0), tuple(np.diag([1.0, -1.0, 1.0]).ravel()))
    labels = np.random.default_rng(3).integers(-3, 4, grid.shape).astype(np.int8)
    np.testing.assert_array_equal(resample_array(labels, grid, grid, "label_vote"), labels)
    np.testing.assert_array_equal(resample_array(labels, grid, grid, "nearest"), labels)


@pytest.mark.parametrize("seed", [1, 5, 7])
def test_phantom_pet_and_ct_between_their_own_grids(seed):
    # Phantom seeds 1, 5 and 7 store the CT and PET with different flipped axes.
    phantom = make_phantom(seed, PhantomOptions(ct_size_xy=64, ct_slices=16))
    ct, pet, mask = phantom.ct, phantom.pet, phantom.mask
    pet_on_ct = resample(pet, ct, "linear")
    expected = sitk.Resample(pet.to_sitk(), ct.to_sitk(), sitk.Transform(), sitk.sitkLinear, 0.0, sitk.sitkFloat32)
    np.testing.assert_array_equal(pet_on_ct.array, sitk.GetArrayFromImage(expected))
    assert pet_on_ct.same_grid(Volume(pet_on_ct.array, ct.spacing, ct.origin, ct.direction))
    ct_on_pet = resample(ct, pet, "linear", default=-1024.0)  # int16 in, float32 out, downsampling
    expected = sitk.Resample(ct.to_sitk(), pet.to_sitk(), sitk.Transform(), sitk.sitkLinear, -1024.0, sitk.sitkFloat32)
    np.testing.assert_array_equal(ct_on_pet.array, sitk.GetArrayFromImage(expected))
    mask_on_pet = resample(mask, pet, "nearest")
    expected = sitk.Resample(mask.to_sitk(), pet.to_sitk(), sitk.Transform(), sitk.sitkNearestNeighbor, 0)
    np.testing.assert_array_equal(mask_on_pet.array, sitk.GetArrayFromImage(expected))


def test_resample_image_is_a_drop_in_for_simpleitk():
    src, dst = _random_grids(42, "oblique")
    image = _sitk(_hu(src.shape, 1), src)
    reference = _sitk(np.zeros(dst.shape, np.float32), dst)
    result = resample_image(image, reference, "linear", default=5.0)
    expected = sitk.Resample(image, reference, sitk.Transform(), sitk.sitkLinear, 5.0, sitk.sitkFloat32)
    assert result.GetSize() == expected.GetSize()
    np.testing.assert_allclose(result.GetSpacing(), expected.GetSpacing())
    np.testing.assert_allclose(result.GetOrigin(), expected.GetOrigin())
    np.testing.assert_allclose(result.GetDirection(), expected.GetDirection())
    np.testing.assert_allclose(sitk.GetArrayFromImage(result), sitk.GetArrayFromImage(expected), atol=1e-4)


def test_nan_and_inf_follow_simpleitk():
    src = GridSpec((9, 7, 5), (1.0, 1.0, 2.0), (0.0, 0.0, 0.0))
    dst = GridSpec((13, 11, 8), (0.7, 0.6, 1.3), (-0.4, 0.2, -0.9))
    image = _hu(src.shape, 2)
    image[2, 3, 4] = np.nan
    image[0, 0, 8] = np.inf
    expected = _sitk_resample(image, src, dst, sitk.sitkLinear, 0.0, sitk.sitkFloat32)
    result = resample_array(image, src, dst)
    assert np.isnan(result).any()
    np.testing.assert_array_equal(result, expected)  # NaN == NaN here


@pytest.mark.parametrize(
    ("src_size", "dst_size"),
    [((0, 4, 4), (5, 5, 5)), ((4, 4, 4), (0, 3, 3)), ((1, 1, 1), (4, 4, 4)), ((3, 1, 2), (6, 4, 5))],
    ids=["empty-source", "empty-target", "one-voxel", "thin"],
)
@pytest.mark.parametrize("mode", ["linear", "nearest", "label_vote"])
def test_degenerate_grids(src_size, dst_size, mode):
    src = GridSpec(src_size, (1.0, 1.0, 1.0), (0.0, 0.0, 0.0))
    dst = GridSpec(dst_size, (0.4, 0.5, 0.6), (-0.3, -0.2, -0.1))
    data = np.arange(np.prod(src.shape), dtype=np.int16).reshape(src.shape) + 1
    result = resample_array(data, src, dst, mode, default=-7)
    assert result.shape == dst.shape
    if min(src_size) == 0:
        assert np.all(result == -7)
    elif min(dst_size) > 0:
        interpolator = sitk.sitkLinear if mode == "linear" else sitk.sitkNearestNeighbor
        pixel = sitk.sitkFloat32 if mode == "linear" else sitk.sitkInt16
        expected = _sitk_resample(data, src, dst, interpolator, -7, pixel)
        if mode != "label_vote" or np.ptp(data) == 0:
            np.testing.assert_allclose(result, expected, atol=1e-4)
        np.testing.assert_array_equal(result == -7, expected == -7)


def test_inputs_may_be_strided_read_only_and_threads_do_not_matter():
    src, dst = _random_grids(9, "flipped")
    big = _hu((src.shape[0], src.shape[1], 2 * src.shape[2]), 3)
    strided = big[:, :, ::2]
    strided.flags.writeable = False
    expected = _sitk_resample(np.ascontiguousarray(strided), src, dst, sitk.sitkLinear, 0.0, sitk.sitkFloat32)
    one = resample_array(strided, src, dst, threads=1)
    three = resample_array(strided, src, dst, threads=3)
    np.testing.assert_array_equal(one, three)
    np.testing.assert_allclose(one, expected, atol=1e-4)
    out = np.full(dst.shape, np.nan, np.float32)
    assert resample_array(strided, src, dst, out=out) is out
    np.testing.assert_array_equal(out, one)


GRID = GridSpec((4, 3, 2), (1.0, 1.0, 1.0), (0.0, 0.0, 0.0))


@pytest.mark.parametrize(
    ("array", "kwargs", "error", "match"),
    [
        (np.zeros((2, 3, 4), np.float32), {"mode": "cubic"}, ValueError, "mode must be one of"),
        (np.zeros((2, 3, 4), np.int32), {"mode": "linear"}, TypeError, "linear resampling takes"),
        (np.zeros((2, 3, 4), bool), {"mode": "linear"}, TypeError, "boolean"),
        (np.zeros((2, 3, 4), np.float32), {"mode": "label_vote"}, TypeError, "integer or boolean"),
        (np.zeros((2, 3, 4), np.uint8), {"mode": "nearest", "default": 300}, ValueError, "default 300"),
        (np.zeros((2, 3, 4), np.int16), {"mode": "nearest", "default": 0.5}, ValueError, "default 0.5"),
        (np.zeros((2, 3, 5), np.float32), {}, ValueError, "source grid has size"),
        (np.zeros((3, 4), np.float32), {}, ValueError, "3D"),
        (np.zeros((2, 3, 4), np.float32), {"out": np.zeros((2, 3, 4), np.float64)}, TypeError, "dtype"),
        (np.zeros((2, 3, 4), np.float32), {"out": np.zeros((2, 3, 5), np.float32)}, ValueError, "shape"),
        (np.zeros((2, 3, 4), np.float32), {"threads": -1}, ValueError, "threads"),
    ],
)
def test_bad_arguments_raise(array, kwargs, error, match):
    with pytest.raises(error, match=match):
        resample_array(array, GRID, GRID, **kwargs)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"size_xyz": (4, -1, 2)}, "size_xyz"),
        ({"spacing": (1.0, 0.0, 1.0)}, "spacing"),
        ({"origin": (0.0, np.nan, 0.0)}, "origin"),
        ({"direction": (1.0, 1.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0)}, "orthonormal"),
    ],
)
def test_gridspec_validates(kwargs, match):
    args = {"size_xyz": (4, 3, 2), "spacing": (1.0, 1.0, 1.0), "origin": (0.0, 0.0, 0.0)} | kwargs
    with pytest.raises(ValueError, match=match):
        GridSpec(**args)


def _rotated_flipped_grid() -> GridSpec:
    """An anisotropic grid whose direction is a rotation times a flip of y (determinant -1)."""
    rotation = _rotation(np.random.default_rng(7))
    direction = rotation @ np.diag([1.0, -1.0, 1.0])
    return GridSpec((11, 7, 5), (0.7, 1.3, 3.1), (-12.5, 40.25, 7.0), tuple(direction.ravel()))


def test_gridspec_and_volume_map_indices_as_simpleitk():
    grid = _rotated_flipped_grid()
    assert not np.allclose(np.abs(grid.direction_matrix), np.eye(3))  # oblique, not merely flipped
    volume = Volume(np.zeros(grid.shape, np.float32), grid.spacing, grid.origin, grid.direction)
    image = volume.to_sitk()
    assert volume.grid == grid
    assert GridSpec.of(volume) is volume.grid
    assert GridSpec.of(image) == grid
    assert (volume.shape, volume.size_xyz) == (grid.shape, grid.size_xyz)
    np.testing.assert_array_equal(grid.index_matrix, grid.direction_matrix @ np.diag(grid.spacing))

    index = np.random.default_rng(3).uniform(-1.0, 1.0, (40, 3)) * 2 + np.asarray(grid.size_xyz) * [0.5, 0.4, 0.3]
    expected = np.array([image.TransformContinuousIndexToPhysicalPoint(tuple(map(float, i))) for i in index])
    for spec in (grid, volume):
        points = spec.index_to_physical(index)
        np.testing.assert_allclose(points, expected, rtol=0, atol=1e-9)
        np.testing.assert_allclose(spec.physical_to_index(points), index, rtol=0, atol=1e-9)
        np.testing.assert_allclose(spec.physical_to_index(expected), index, rtol=0, atol=1e-9)
    np.testing.assert_array_equal(volume.index_to_physical(index), grid.index_to_physical(index))
    np.testing.assert_array_equal(grid.physical_points(index[:, ::-1]), grid.index_to_physical(index))
    # One index step along axis j moves by column j of index_matrix.
    steps = grid.index_to_physical(np.eye(3)) - np.asarray(grid.origin)
    np.testing.assert_allclose(steps, grid.index_matrix.T, rtol=0, atol=1e-12)
    # A [..., 3] batch keeps its leading shape.
    assert grid.index_to_physical(index.reshape(4, 10, 3)).shape == (4, 10, 3)


BAD_GEOMETRY = [
    ("spacing", (1.0, 0.0, 1.0)),
    ("spacing", (1.0, -2.0, 1.0)),
    ("spacing", (1.0, np.nan, 1.0)),
    ("spacing", (1.0, 1.0)),
    ("spacing", "abc"),
    ("origin", (0.0, np.inf, 0.0)),
    ("origin", (0.0, 0.0)),
    ("origin", ("a", 0.0, 0.0)),
    ("direction", (1.0, 1.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0)),  # not orthonormal
    ("direction", (1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0)),  # 8 numbers
    ("direction", (np.nan, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0)),
    ("direction", tuple(2 * np.eye(3).ravel())),  # orthogonal, not unit
]


@pytest.mark.parametrize("kind", ["GridSpec", "Volume"])
@pytest.mark.parametrize(("field", "value"), BAD_GEOMETRY)
def test_bad_geometry_raises_naming_the_field(kind, field, value):
    args = {"spacing": (1.0, 1.0, 1.0), "origin": (0.0, 0.0, 0.0)} | {field: value}
    with pytest.raises(ValueError, match=rf"^{field} must "):
        if kind == "GridSpec":
            GridSpec((4, 3, 2), **args)
        else:
            Volume(np.zeros((2, 3, 4), np.float32), **args)


def test_volume_normalises_geometry_as_its_grid():
    volume = Volume(np.zeros((2, 3, 4), np.uint8), np.array([1, 2, 3]), [0, 1, 2], np.eye(3)[:, ::-1].T)
    assert volume.spacing == (1.0, 2.0, 3.0) and type(volume.spacing[0]) is float
    assert volume.origin == (0.0, 1.0, 2.0)
    assert volume.direction == (0.0, 0.0, 1.0, 0.0, 1.0, 0.0, 1.0, 0.0, 0.0)
    assert volume.grid == GridSpec((4, 3, 2), volume.spacing, volume.origin, volume.direction)
    with pytest.raises(ValueError, match="3D"):
        Volume(np.zeros((3, 4), np.float32), (1.0, 1.0, 1.0), (0.0, 0.0, 0.0))


@pytest.mark.parametrize("order", [("resample", "components"), ("components", "resample")])
def test_kernel_wrappers_import_in_either_order(order):
    # A fresh interpreter: no module of this test session is already imported there.
    code = "\n".join(
        [
            "import importlib, importlib.util, sys",
            *(f"importlib.import_module('diffseg.runtime.{name}')" for name in order),
            "from diffseg.runtime.components import connected_components",
            "from diffseg.runtime.resample import resample_array",
            "assert importlib.util.find_spec('diffseg.runtime.kernels') is None, 'the kernels facade is back'",
            "assert 'torch' not in sys.modules, 'the runtime imported torch'",
        ]
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr


def test_resample_wants_a_volume_and_a_grid():
    with pytest.raises(TypeError, match="must be a Volume"):
        resample(np.zeros((2, 3, 4), np.float32), GRID)
    volume = Volume(np.zeros((2, 3, 4), np.float32), (1.0, 1.0, 1.0), (0.0, 0.0, 0.0))
    with pytest.raises(TypeError, match=r"GridSpec, Volume or SimpleITK\.Image"):
        resample(volume, (4, 3, 2))


@pytest.mark.parametrize("x_spacing", [0.25, 0.98, 1.0, 1.02, 1.07, 1.5, 3.0])
@pytest.mark.parametrize("flip", [False, True])
def test_nearest_long_rows_equal_simpleitk(x_spacing, flip):
    # Rows long enough for the 16-voxel shuffle gathers (uint8), with spans that fit a window and ones that do not
    # (x_spacing > 16/15 takes the scalar gather for every chunk), on equal and flipped x directions.
    rng = np.random.default_rng(int(x_spacing * 100) + flip)
    src = GridSpec((203, 5, 4), (1.0, 1.3, 2.0), (-3.2, 0.4, 1.0))
    direction = np.diag([-1.0 if flip else 1.0, 1.0, 1.0])
    n_x = int(203 / x_spacing) + 9
    origin_x = 200.0 if flip else -4.0
    dst = GridSpec((n_x, 7, 5), (x_spacing, 0.9, 1.7), (origin_x, 0.1, 0.3), tuple(direction.ravel()))
    labels = rng.integers(0, 250, src.shape).astype(np.uint8)
    expected = _sitk_resample(labels, src, dst, sitk.sitkNearestNeighbor, 251, sitk.sitkUInt8)
    result = resample_array(labels, src, dst, "nearest", default=251)
    assert (expected != 251).mean() > 0.3, "the grids should overlap"
    np.testing.assert_array_equal(result, expected)
    for threads in (1, 3):
        np.testing.assert_array_equal(resample_array(labels, src, dst, "nearest", default=251, threads=threads), result)


@pytest.mark.parametrize("dtype", [np.uint8, np.int16, np.float32, np.uint64])
def test_nearest_into_out_equals_a_new_output(dtype):
    src, dst = _random_grids(11, "flipped")
    values = np.random.default_rng(4).integers(0, 120, src.shape).astype(dtype)
    expected = resample_array(values, src, dst, "nearest", default=7)
    out = np.full(dst.shape, 99, dtype)  # stale contents must all be overwritten
    assert resample_array(values, src, dst, "nearest", default=7, out=out) is out
    np.testing.assert_array_equal(out, expected)


def _read_only(shape, dtype):
    a = np.zeros(shape, dtype)
    a.flags.writeable = False
    return a


@pytest.mark.parametrize(
    ("out", "error", "match"),
    [
        (np.zeros((2, 3, 4), np.int16), TypeError, "dtype uint8"),
        (np.zeros((2, 3, 5), np.uint8), ValueError, r"shape \(2, 3, 4\)"),
        (np.zeros((2, 3, 8), np.uint8)[:, :, ::2], ValueError, "C-contiguous"),
        (_read_only((2, 3, 4), np.uint8), ValueError, "writeable"),
        ([[[0] * 4] * 3] * 2, TypeError, "numpy array"),
    ],
    ids=["dtype", "shape", "strided", "read-only", "list"],
)
def test_nearest_bad_out_raises(out, error, match):
    with pytest.raises(error, match=match):
        resample_array(np.zeros((2, 3, 4), np.uint8), GRID, GRID, "nearest", out=out)
