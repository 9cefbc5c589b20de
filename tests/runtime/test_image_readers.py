"""Image readers that refuse what they cannot read whole (issue #15, item 1).

Every file here is written by SimpleITK and then damaged with byte edits, as a failed copy or a wrong converter
damages it; no reader is mocked. The reference for an intact file is ``SimpleITK.ReadImage`` itself: the array
(exact) and the geometry (exact) must be what it gives. For each damage the test also shows what SimpleITK alone does
with the file where that matters (zeros for missing slices, 1 mm for a zero spacing), so that a test cannot pass
because the damage did not happen.
"""

from __future__ import annotations

import gzip
import re
import struct
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from diffseg.runtime.image_file import (
    MAX_EXTENT_MM,
    MAX_VOXELS,
    check_grid_limits,
    check_image_file,
    read_image,
)
from diffseg.runtime.input_checks import InputChecks, check_inputs
from diffseg.runtime.volume import GridSpec, Volume, read_volume

SPACING = (0.8, 0.9, 2.5)
ORIGIN = (-100.0, 20.5, 300.0)
DIRECTION = (0.0, 1.0, 0.0, -1.0, 0.0, 0.0, 0.0, 0.0, 1.0)  # a rotation about z: not the identity

# name → (file name, compressed, detached data file or None)
FORMATS = {
    "nii.gz": ("ct.nii.gz", True, None),
    "nii": ("ct.nii", False, None),
    "nrrd raw": ("ct.nrrd", False, None),
    "nrrd gzip": ("ct.nrrd", True, None),
    "nhdr raw": ("ct.nhdr", False, "ct.raw"),
    "nhdr gzip": ("ct.nhdr", True, "ct.raw.gz"),
    "mha raw": ("ct.mha", False, None),
    "mha zlib": ("ct.mha", True, None),
    "mhd raw": ("ct.mhd", False, "ct.raw"),
    "mhd zlib": ("ct.mhd", True, "ct.zraw"),
}
COMPRESSED = [k for k, (_, c, _) in FORMATS.items() if c]


def _image(array: np.ndarray, spacing=SPACING) -> sitk.Image:
    img = sitk.GetImageFromArray(array)
    img.SetSpacing(spacing)
    img.SetOrigin(ORIGIN)
    img.SetDirection(DIRECTION)
    return img


def _ct(shape=(40, 24, 32), dtype=np.int16) -> np.ndarray:
    rng = np.random.default_rng(15)
    return rng.integers(-1000, 1000, size=shape).astype(dtype)


def _write(tmp: Path, fmt: str, array: np.ndarray | None = None, spacing=SPACING) -> tuple[Path, Path]:
    """The image in ``fmt`` under ``tmp``: (the file to read, the file holding the voxel data)."""
    name, compressed, data = FORMATS[fmt]
    path = tmp / name
    sitk.WriteImage(_image(_ct() if array is None else array, spacing), str(path), useCompression=compressed)
    if data is not None:
        assert (tmp / data).is_file(), f"SimpleITK wrote no {data}"
    return path, (tmp / data if data else path)


def _cut(path: Path, keep: int) -> None:
    path.write_bytes(path.read_bytes()[:keep])


def _same_as_simpleitk(path: Path) -> None:
    ours, theirs = read_image(path), sitk.ReadImage(str(path))
    assert ours.GetPixelID() == theirs.GetPixelID()
    np.testing.assert_array_equal(sitk.GetArrayFromImage(ours), sitk.GetArrayFromImage(theirs))
    assert ours.GetSpacing() == theirs.GetSpacing()
    assert ours.GetOrigin() == theirs.GetOrigin()
    assert ours.GetDirection() == theirs.GetDirection()


# --- intact files ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize(
    "dtype", [np.uint8, np.int16, np.uint16, np.int32, np.uint32, np.int64, np.float32, np.float64]
)
def test_intact_file_reads_as_simpleitk_reads_it(tmp_path, fmt, dtype):
    path, _ = _write(tmp_path, fmt, _ct(dtype=dtype))
    header = check_image_file(path)
    assert header.data_checked, "the voxel data of a format parsed here must be counted"
    assert header.size_xyz == (32, 24, 40)
    np.testing.assert_allclose(header.spacing, SPACING, rtol=1e-6)
    _same_as_simpleitk(path)
    vol = read_volume(path)
    np.testing.assert_array_equal(vol.array, _ct(dtype=dtype))
    np.testing.assert_allclose(vol.direction, DIRECTION, atol=1e-6)


def test_gzip_of_several_members_reads_whole(tmp_path):
    # gzip -c a b > c: a valid file whose stream is two members; both are decompressed and counted.
    path, _ = _write(tmp_path, "nii.gz")
    raw = gzip.decompress(path.read_bytes())
    half = len(raw) // 2
    path.write_bytes(gzip.compress(raw[:half]) + gzip.compress(raw[half:]))
    _same_as_simpleitk(path)


# --- truncated files ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("keep", [0.02, 0.3, 0.7, 0.99, -1], ids=["2%", "30%", "70%", "99%", "all but 1 byte"])
def test_truncated_file_is_refused(tmp_path, fmt, keep):
    path, data = _write(tmp_path, fmt)
    size = data.stat().st_size
    _cut(data, size - 1 if keep == -1 else int(size * keep))
    with pytest.raises(ValueError, match="truncated") as err:
        read_volume(path)
    assert str(err.value).startswith(f"{path}: "), "the message must name the file read"
    assert "again" in str(err.value), "the message must say what to do"


@pytest.mark.parametrize("fmt", ["nii", "nii.gz", "nrrd raw", "mha raw", "mhd raw", "mha zlib"])
def test_truncated_voxels_are_counted_in_slices(tmp_path, fmt):
    path, data = _write(tmp_path, fmt)
    whole = data.read_bytes()
    header_bytes = 0 if data != path else len(whole) - _ct().nbytes
    if FORMATS[fmt][1]:
        _cut(data, len(whole) // 2)
    else:  # exactly 25 of the 40 slices of 24 × 32 int16 left
        _cut(data, header_bytes + 25 * 24 * 32 * 2)
    if fmt in ("nii", "nii.gz"):  # the damage is real: SimpleITK alone fills the missing slices with zeros
        assert (sitk.GetArrayFromImage(sitk.ReadImage(str(path)))[-5:] == 0).all()
    with pytest.raises(ValueError, match=r"of 40 slices present") as err:
        read_image(path)
    if not FORMATS[fmt][1]:
        assert "25 of 40 slices present" in str(err.value)


def test_gzip_stream_whole_but_short_is_refused(tmp_path):
    # A writer that stopped early but closed its gzip stream: CRC and length are right, the voxels are not all there.
    path, _ = _write(tmp_path, "nii.gz")
    raw = gzip.decompress(path.read_bytes())
    path.write_bytes(gzip.compress(raw[: len(raw) - 3 * 24 * 32 * 2]))
    with pytest.raises(ValueError, match=r"truncated: 37 of 40 slices present \(the gzip stream is whole"):
        read_volume(path)


def test_detached_data_file_missing_is_refused(tmp_path):
    path, data = _write(tmp_path, "mhd raw")
    data.unlink()
    with pytest.raises(ValueError, match=r"ct\.mhd: the voxel data file .*ct\.raw named in the header is missing"):
        read_volume(path)


# --- corrupt compressed streams -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("fmt", "where", "message"),
    [
        ("nii.gz", -8, "fails its CRC-32 check"),  # the CRC-32 field of the gzip trailer
        ("nii.gz", -2, r"fails its length check \(gzip ISIZE\)"),  # the ISIZE field
        ("nii.gz", 0.5, "corrupt"),  # inside the deflate data: a CRC or a deflate error, named
        ("nrrd gzip", -8, "fails its CRC-32 check"),
        ("nhdr gzip", -8, "fails its CRC-32 check"),
        ("mha zlib", -2, "fails its Adler-32 checksum"),  # the zlib trailer
        ("mhd zlib", 0.5, "corrupt"),
    ],
)
def test_flipped_byte_in_a_compressed_stream_is_named(tmp_path, fmt, where, message):
    path, data = _write(tmp_path, fmt)
    raw = bytearray(data.read_bytes())
    at = int(len(raw) * where) if isinstance(where, float) else len(raw) + where
    raw[at] ^= 0xFF
    data.write_bytes(bytes(raw))
    with pytest.raises(ValueError, match=message) as err:
        read_volume(path)
    assert str(err.value).startswith(f"{path}: the file is corrupt")


# --- spacing ------------------------------------------------------------------------------------------------------


def _nifti_pixdim(path: Path, axis: int, value: float) -> None:
    gz = path.name.endswith(".gz")
    raw = bytearray(gzip.decompress(path.read_bytes()) if gz else path.read_bytes())
    struct.pack_into("<f", raw, 76 + 4 * axis, value)
    path.write_bytes(gzip.compress(bytes(raw)) if gz else bytes(raw))


BAD = [0.0, float("nan"), -1.0, float("inf")]


@pytest.mark.parametrize("fmt", ["nii", "nii.gz"])
@pytest.mark.parametrize("value", BAD, ids=["zero", "nan", "negative", "inf"])
@pytest.mark.parametrize("axis", [1, 3])
def test_nifti_spacing_that_simpleitk_would_replace_is_refused(tmp_path, fmt, value, axis):
    path, _ = _write(tmp_path, fmt)
    _nifti_pixdim(path, axis, value)
    # What SimpleITK alone makes of it: 1 mm for 0/NaN/Inf, 1 mm (|-1|) for -1: a plausible, wrong grid.
    assert sitk.ReadImage(str(path)).GetSpacing()[axis - 1] == pytest.approx(1.0)
    with pytest.raises(
        ValueError, match=rf"spacing along {'xyz'[axis - 1]} is .* mm \(pixdim\[{axis}\] in the header\)"
    ):
        read_volume(path)


@pytest.mark.parametrize("fmt", ["nrrd raw", "nhdr gzip"])
@pytest.mark.parametrize("vector", ["(0,0,0)", "(nan,0,0)", "(inf,0,0)"])
def test_nrrd_space_direction_that_is_not_a_spacing_is_refused(tmp_path, fmt, vector):
    path, _ = _write(tmp_path, fmt)
    text = path.read_bytes()
    path.write_bytes(re.sub(rb"space directions: \([^)]*\)", b"space directions: " + vector.encode(), text, count=1))
    with pytest.raises(ValueError, match=r"spacing along x is .* mm \(space directions in the header\)"):
        read_volume(path)


def _nrrd_spacings(path: Path, line: bytes) -> None:
    text = path.read_bytes()
    for field in (rb"space directions: [^\n]*\n", rb"space: [^\n]*\n", rb"space origin: [^\n]*\n"):
        text = re.sub(field, b"", text, count=1)
    path.write_bytes(text.replace(b"kinds:", line + b"kinds:", 1))


@pytest.mark.parametrize("value", ["0", "nan", "-0.8"])
def test_nrrd_spacings_field_is_checked(tmp_path, value):
    path, _ = _write(tmp_path, "nrrd raw")
    _nrrd_spacings(path, f"spacings: {value} 0.9 2.5\n".encode())
    with pytest.raises(ValueError, match=r"spacing along x is .* mm \(spacings in the header\)"):
        read_volume(path)


def test_nrrd_negative_direction_is_a_direction_not_a_spacing(tmp_path):
    # Control: a negative component flips an axis; the spacing is the vector's length and the file is valid.
    path, _ = _write(tmp_path, "nrrd raw")
    text = path.read_bytes()
    path.write_bytes(re.sub(rb"space directions: \(([^)]*)\)", rb"space directions: (-0,-0.8,0)", text, count=1))
    _same_as_simpleitk(path)
    assert read_volume(path).spacing[0] == pytest.approx(0.8)


@pytest.mark.parametrize("fmt", ["mha raw", "mhd zlib"])
@pytest.mark.parametrize("value", ["0", "nan", "-0.8", "inf"])
def test_metaimage_element_spacing_is_checked(tmp_path, fmt, value):
    path, _ = _write(tmp_path, fmt)
    text = path.read_bytes()
    path.write_bytes(re.sub(rb"ElementSpacing = \S+", b"ElementSpacing = " + value.encode(), text, count=1))
    with pytest.raises(ValueError, match=r"spacing along x is .* mm \(ElementSpacing in the header\)"):
        read_volume(path)


@pytest.mark.parametrize("fmt", ["mha raw", "mhd raw"])
@pytest.mark.parametrize("where", ["first", "later"])
def test_metaimage_header_line_without_a_value_is_refused(tmp_path, fmt, where):
    """``NDims`` with no ``= value``: SimpleITK's MetaIO reader then frees an invalid pointer (found by fuzzing)."""
    path, _ = _write(tmp_path, fmt)
    text = path.read_bytes()
    text = b"NDims\n" + text if where == "first" else re.sub(rb"NDims = \S+", b"NDims ", text, count=1)
    path.write_bytes(text)
    with pytest.raises(ValueError, match=r"the header is damaged: the line 'NDims' is not 'Key = Value'"):
        read_volume(path)


@pytest.mark.parametrize("fmt", ["nrrd raw", "mha raw"])
def test_spacing_missing_from_the_header_is_refused(tmp_path, fmt):
    path, _ = _write(tmp_path, fmt)
    if fmt == "nrrd raw":
        _nrrd_spacings(path, b"")
    else:
        path.write_bytes(re.sub(rb"ElementSpacing = [^\n]*\n", b"", path.read_bytes(), count=1))
    assert sitk.ReadImage(str(path)).GetSpacing() == (1.0, 1.0, 1.0)  # SimpleITK's default, silently
    with pytest.raises(ValueError, match=r"no spacing along x .* SimpleITK would assume 1 mm"):
        read_volume(path)


# --- not a 3D scalar image ----------------------------------------------------------------------------------------

SHAPES = {
    "2D": (sitk.GetImageFromArray(np.zeros((24, 32), np.int16)), r"the image is 2D \(size 32×24\)"),
    "4D": (sitk.Image([8, 6, 4, 3], sitk.sitkInt16), r"the image is 4D \(size 8×6×4×3\)"),
    "RGB": (
        sitk.GetImageFromArray(np.zeros((4, 6, 8, 3), np.uint8), isVector=True),
        r"3 components per voxel \(vector of 8-bit unsigned integer\)",
    ),
}


@pytest.mark.parametrize("suffix", [".nii.gz", ".nrrd", ".mha"])
@pytest.mark.parametrize("shape", SHAPES)
def test_image_that_is_not_3d_scalar_is_refused(tmp_path, suffix, shape):
    image, message = SHAPES[shape]
    path = tmp_path / f"ct{suffix}"
    sitk.WriteImage(image, str(path))
    with pytest.raises(ValueError, match=message) as err:
        check_image_file(path)
    assert "a 3D scalar image is needed" in str(err.value)


def test_volume_from_sitk_says_the_same():
    # One place for the rule: a SimpleITK image given in memory gets the reader's words.
    with pytest.raises(ValueError, match=r"^the image is 4D \(size 8×6×4×3\); a 3D scalar image is needed"):
        Volume.from_sitk(SHAPES["4D"][0])


# --- limits -------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("fmt", "claim"),
    [
        ("nrrd raw", (b"sizes: 32 24 40", b"sizes: 100000 100000 100000")),
        ("mha zlib", (b"DimSize = 32 24 40", b"DimSize = 100000 100000 100000")),
        ("nii.gz", None),
    ],
)
def test_header_claiming_too_many_voxels_is_refused_at_once(tmp_path, fmt, claim):
    path, _ = _write(tmp_path, fmt)
    if claim is None:  # NIfTI-1 sizes are int16: 30000³
        raw = bytearray(gzip.decompress(path.read_bytes()))
        struct.pack_into("<3h", raw, 42, 30000, 30000, 30000)
        path.write_bytes(gzip.compress(bytes(raw)))
    else:
        path.write_bytes(path.read_bytes().replace(*claim, 1))
    t0 = time.perf_counter()
    with pytest.raises(ValueError, match=rf"voxels \(\d+×\d+×\d+\) is over the limit of {MAX_VOXELS:,}"):
        read_volume(path)
    assert time.perf_counter() - t0 < 2.0, "the limit must be applied from the header, before any voxel is read"


def test_voxel_limit_holds_before_anything_is_allocated(tmp_path):
    # A sparse NIfTI just over the limit (1100 × 1000 × 1000 uint8, 1.1 GB of zeros that take no disk): read in a
    # fresh interpreter, whose peak memory must stay far below the 1.1 GB SimpleITK would allocate for it.
    path = tmp_path / "big.nii"
    sitk.WriteImage(sitk.GetImageFromArray(np.zeros((2, 2, 2), np.uint8)), str(path))
    raw = bytearray(path.read_bytes()[:352])
    struct.pack_into("<4h", raw, 40, 3, 1100, 1000, 1000)
    with open(path, "wb") as fh:
        fh.write(raw)
        fh.truncate(352 + 1100 * 1000 * 1000)
    code = (
        "from diffseg.runtime.volume import read_volume\n"
        "try:\n"
        f"    read_volume({str(path)!r})\n"
        "except ValueError as exc:\n"
        "    print(exc)\n"
        # VmHWM, not ru_maxrss: Linux carries ru_maxrss over exec from the forked parent (pytest, GBs by then)
        "print(next(int(l.split()[1]) for l in open('/proc/self/status') if l.startswith('VmHWM')) // 1024)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True)
    message, peak_mb = out.stdout.strip().splitlines()
    assert "1,100,000,000 voxels (1100×1000×1000) is over the limit" in message
    assert int(peak_mb) < 600, f"peak memory {peak_mb} MB: something was allocated for the voxels"


def test_physical_extent_over_the_limit_is_refused(tmp_path):
    path, _ = _write(tmp_path, "nii.gz", spacing=(1000.0, 1000.0, 1000.0))
    with pytest.raises(
        ValueError,
        match=rf"extent along x is 32,000 mm \(32 voxels × 1000 mm\), over the limit of "
        rf"{MAX_EXTENT_MM:,.0f} mm",
    ):
        read_volume(path)


def test_field_of_view_over_the_limit_is_refused(tmp_path):
    # Each axis under 3 m, the box 24 m³: no patient.
    path, _ = _write(tmp_path, "mha raw", np.zeros((10, 10, 10), np.int16), spacing=(290.0, 290.0, 290.0))
    with pytest.raises(ValueError, match=r"field of view is 24,389 L \(2,900 × 2,900 × 2,900 mm\), over the limit"):
        read_volume(path)


def test_grid_limits_apply_to_volumes_given_in_memory():
    with pytest.raises(ValueError, match=r"CT: the physical extent along z is 24,000 mm"):
        check_grid_limits(GridSpec((4, 4, 24), (1.0, 1.0, 1000.0), (0.0, 0.0, 0.0)), "CT")
    with pytest.raises(ValueError, match="CT: the image has no voxels"):
        check_grid_limits(GridSpec((0, 4, 4), (1.0, 1.0, 1.0), (0.0, 0.0, 0.0)), "CT")
    huge = Volume(np.zeros((4, 4, 4), np.float32), (1000.0, 1.0, 1.0), (0.0, 0.0, 0.0))
    with pytest.raises(ValueError, match="PT: the physical extent along x is 4,000 mm"):
        check_inputs({"PT": huge}, {"PT": "PT"}, InputChecks())


# --- what SimpleITK's NIfTI reader hides ---------------------------------------------------------------------------


@pytest.mark.parametrize("fmt", ["nii", "nii.gz"])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_nonfinite_nifti_voxels_are_read_as_written(tmp_path, fmt, dtype):
    # nifti1_io sets NaN and ±Inf voxels of a float NIfTI to 0: the input checks would never see them.
    array = _ct(dtype=dtype) / 7.0
    array[2, 3, 4], array[10, 0, 0], array[-1, -1, -1] = np.nan, np.inf, -np.inf
    path, _ = _write(tmp_path, fmt, array)
    by_sitk = sitk.GetArrayFromImage(sitk.ReadImage(str(path)))
    assert by_sitk[2, 3, 4] == 0 and by_sitk[10, 0, 0] == 0  # the damage is real
    assert check_image_file(path).nonfinite == 3
    vol = read_volume(path)
    np.testing.assert_array_equal(vol.array, array)  # NaN == NaN here: exact, finite voxels as SimpleITK reads them
    with pytest.raises(ValueError, match=r"3 of 30720 voxels are NaN or infinite"):
        check_inputs({"CT": vol}, {"CT": str(path)}, InputChecks())


def test_nonfinite_voxels_follow_the_nifti_rescale(tmp_path):
    path, _ = _write(tmp_path, "nii", np.full((4, 5, 6), 2.0, np.float32))
    raw = bytearray(path.read_bytes())
    struct.pack_into("<2f", raw, 112, -2.0, 1.0)  # scl_slope, scl_inter
    struct.pack_into("<2f", raw, 352, np.inf, np.nan)  # the first two voxels
    path.write_bytes(bytes(raw))
    voxels = read_volume(path).array.ravel()
    assert voxels[0] == -np.inf and np.isnan(voxels[1])  # inf × -2 + 1
    assert (voxels[2:] == -3.0).all()  # 2 × -2 + 1, as SimpleITK reads them
    np.testing.assert_array_equal(voxels[2:], sitk.GetArrayFromImage(sitk.ReadImage(str(path))).ravel()[2:])


def test_nii_beside_a_nii_gz_is_refused(tmp_path):
    # Given X.nii.gz, nifti1_io opens X.nii when there is one: the voxels of the one under the header of the other.
    path, _ = _write(tmp_path, "nii.gz")
    sitk.WriteImage(_image(np.full((40, 24, 32), 7, np.int16)), str(tmp_path / "ct.nii"))
    assert (sitk.GetArrayFromImage(sitk.ReadImage(str(path))) == 7).all()  # the damage is real
    with pytest.raises(ValueError, match=r"ct\.nii\.gz: ct\.nii lies beside it, .* move one of the two away"):
        read_volume(path)
    np.testing.assert_array_equal(read_volume(tmp_path / "ct.nii").array, 7)  # the other way round is safe


# --- other unreadable files ---------------------------------------------------------------------------------------


def test_empty_missing_and_foreign_files(tmp_path):
    (tmp_path / "ct.nii.gz").write_bytes(b"")
    with pytest.raises(ValueError, match=r"ct\.nii\.gz: the file is empty \(0 bytes\)"):
        read_volume(tmp_path / "ct.nii.gz")
    with pytest.raises(FileNotFoundError, match=r"nothere\.nii: no such file"):
        read_volume(tmp_path / "nothere.nii")
    (tmp_path / "ct.txt").write_text("patient,ct\n1,2\n")
    with pytest.raises(ValueError, match=r"ct\.txt: cannot read image \(SimpleITK has no reader"):
        read_volume(tmp_path / "ct.txt")
    (tmp_path / "ct.nrrd").write_bytes(b"\x00\x01binary")
    with pytest.raises(ValueError, match=r"ct\.nrrd: cannot read image: not an NRRD file"):
        read_volume(tmp_path / "ct.nrrd")
