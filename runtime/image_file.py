"""Image files read whole or not at all: the header checked and the voxel data counted before a voxel is read.

SimpleITK (2.5) turns a damaged file into a wrong image without a word: a truncated ``.nii``/``.nii.gz`` comes back
with the missing slices as zeros; a NIfTI ``pixdim`` of 0, NaN or ±Inf becomes 1 mm and a negative one its absolute
value; an NRRD ``spacings`` of NaN, or a missing spacing in any format, becomes 1 mm. Where it does refuse, it says
the wrong thing: a truncated ``.mha`` is "No such file or directory", a ``.nii.gz`` failing its CRC "Unable to
determine ImageIO reader", an MHA ``ElementSpacing`` of 0 "Refusing to change spacing". Its NIfTI reader
(nifti1_io) also sets NaN and ±Inf voxels of a float image to 0, and given ``X.nii.gz`` opens ``X.nii`` instead
when there is one. Some damaged headers crash it (SIGSEGV, SIGFPE) or hang it; those found by fuzzing
(``benchmarks/fuzz.py``) are refused by the header parser first. :func:`read_image` so:

1. refuses ``X.nii.gz`` with an ``X.nii`` beside it; parses the file's own header
   (:func:`~diffseg.runtime.image_headers.parse_header`: NIfTI-1/2, NRRD, MetaImage; any other format goes to
   SimpleITK alone) and refuses a spacing written there that is not positive and finite;
2. reads SimpleITK's view of the header (``ImageFileReader.ReadImageInformation``: no voxels) with the reader that
   SimpleITK picks for the file, pinned for step 5;
3. refuses an image that is not 3D scalar, a spatial axis without a spacing, and a grid over the limits below
   (:func:`check_grid_limits`), before anything is allocated;
4. counts the voxel data: a raw file's length, or a compressed stream decompressed in full in chunks whose output is
   dropped, so that its end, its checksum (gzip CRC-32 and length, zlib Adler-32) and its length are all checked
   (a float NIfTI's voxels are also looked at, for NaN and ±Inf);
5. reads the voxels with SimpleITK, and puts back the NaN and ±Inf voxels of a float NIfTI that step 4 found, so
   that the input checks (``input_checks.finite_voxels``) see them.

Step 4 decompresses a compressed file once more than SimpleITK does (SimpleITK reads from files, not from bytes in
memory); on a ``.nii.gz`` the checks cost about as much again as SimpleITK's own read (see :func:`read_image`).
Every refusal is a ``ValueError`` that names the file, gives the figures and says what to do.
"""

from __future__ import annotations

import math
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from .image_headers import HeaderLayout, VoxelData, corrupt_error, format_bytes, parse_header
from .volume import GridSpec, scalar_3d_problem

if TYPE_CHECKING:
    import SimpleITK as sitk

__all__ = [
    "MAX_EXTENT_MM",
    "MAX_FIELD_OF_VIEW_L",
    "MAX_VOXELS",
    "ImageHeader",
    "check_grid_limits",
    "check_image_file",
    "read_image",
]

# The limits of an image grid, stated once. A header over one is damaged or not a patient image; it is refused with
# the figure before anything is allocated (a MemoryError traceback, or minutes of swapping, otherwise).
MAX_VOXELS = 2**30  # 1.07e9 voxels, 4 GiB as float32; a 512 × 512 × 2000 whole-body CT is 5.2e8
MAX_EXTENT_MM = 3000.0  # along each axis: no patient is 3 m long; a whole-body CT is about 2 m
# The box the grid spans, in litres: a whole-body field of view is about 500 L (0.5 × 0.5 × 2 m). The model grid
# covers it whole, so this also bounds the model grid (2000 L is 2.5e8 voxels at 2 mm).
MAX_FIELD_OF_VIEW_L = 2000.0

_CHUNK = 1 << 20  # compressed bytes read at a time
_OUT = 1 << 22  # decompressed bytes at most per call: a stream of zeros inflates about 1000-fold
_IO = {"NIfTI-1": "NiftiImageIO", "NIfTI-2": "NiftiImageIO", "NRRD": "NrrdImageIO", "MetaImage": "MetaImageIO"}


def _axis(n: int) -> str:
    return "xyz"[n - 1] if n <= 3 else f"axis {n}"


@dataclass(frozen=True)
class ImageHeader:
    """An image file that passed every check, described without its voxels.

    Attributes:
        path: the file (the header file of a detached format).
        format: ``NIfTI-1``, ``NIfTI-2``, ``NRRD``, ``MetaImage``, or SimpleITK's ImageIO for another format.
        size_xyz: voxels along x, y, z.
        spacing: mm along x, y, z as the header writes it (positive and finite).
        pixel_type: SimpleITK's pixel type in words.
        data_checked: whether the voxel data was counted here (False: a format or layout that only SimpleITK's
            reader follows, such as an NRRD ``data file: LIST``).
        nonfinite: NaN and ±Inf voxels of a float NIfTI, which SimpleITK's NIfTI reader sets to 0 and
            :func:`read_image` puts back (so that the input checks see them).
    """

    path: Path
    format: str
    size_xyz: tuple[int, int, int]
    spacing: tuple[float, float, float]
    pixel_type: str
    data_checked: bool
    nonfinite: int = 0


def _last_line(exc: Exception) -> str:
    text = str(exc).strip()
    return text.splitlines()[-1] if text else "no detail"


# --- the voxel data ---------------------------------------------------------------------------------------------


class _NonFinite:
    """The NaN and ±Inf voxels of a float NIfTI, counted in its data fed chunk by chunk (the raw file from the data
    offset, or the decompressed stream); with ``into`` (the image's voxels, flat) each is also written there, as
    ``value × scl_slope + scl_inter``: what SimpleITK reads for a finite voxel."""

    def __init__(self, data: VoxelData, into: np.ndarray | None = None) -> None:
        self.type = np.dtype(data.float_type)
        self.start = data.skip if data.codec else 0
        self.end = self.start + data.need
        self.into, self.rescale = into, data.rescale
        self.seen = self.voxels = self.count = 0
        self.carry = b""

    def feed(self, chunk: bytes) -> None:
        at, self.seen = self.seen, self.seen + len(chunk)
        lo, hi = max(self.start - at, 0), min(self.end - at, len(chunk))
        if hi <= lo:
            return
        part = self.carry + chunk[lo:hi] if self.carry else memoryview(chunk)[lo:hi]
        whole = len(part) - len(part) % self.type.itemsize
        voxels = np.frombuffer(part, self.type, count=whole // self.type.itemsize)
        bad = np.flatnonzero(~np.isfinite(voxels))
        if bad.size:
            self.count += int(bad.size)
            if self.into is not None:
                slope, inter = self.rescale
                self.into[self.voxels + bad] = voxels[bad].astype(np.float64) * slope + inter
        self.voxels += voxels.size
        self.carry = bytes(part[whole:])


def _scan(data: VoxelData, feed: Callable[[bytes], None]) -> None:
    """Feed a raw file's voxel data to ``feed`` chunk by chunk (a compressed one goes through :func:`_inflate`)."""
    with open(data.file, "rb") as fh:
        fh.seek(data.offset)
        left = data.need
        while left > 0 and (chunk := fh.read(min(_CHUNK, left))):
            feed(chunk)
            left -= len(chunk)


def _inflate(data: VoxelData, feed: Callable[[bytes], None] | None = None) -> tuple[int, int, bool, zlib.error | None]:
    """Decompress a stream whole, giving the output to ``feed`` or dropping it: (bytes out, bytes in, whether it
    ended, the zlib error)."""
    gzip = data.codec == "gzip"
    d = zlib.decompressobj(16 + zlib.MAX_WBITS if gzip else 32 + zlib.MAX_WBITS)
    total = consumed = 0
    buf = b""
    with open(data.file, "rb") as fh:
        fh.seek(data.offset)
        while True:
            if not buf:
                n = _CHUNK if data.limit is None else min(_CHUNK, data.limit - consumed)
                buf = fh.read(n) if n > 0 else b""
                consumed += len(buf)
                if not buf:
                    break
            try:
                out = d.decompress(buf, _OUT)
            except zlib.error as exc:
                return total, consumed, False, exc
            total += len(out)
            if feed is not None:
                feed(out)
            buf = d.unconsumed_tail
            if d.eof:
                rest = d.unused_data + (fh.read(2) if gzip and len(d.unused_data) < 2 else b"")
                if not (gzip and rest[:2] == b"\x1f\x8b"):  # a next gzip member, or trailing bytes ignored
                    return total, consumed, True, None
                d, buf = zlib.decompressobj(16 + zlib.MAX_WBITS), rest
        try:
            out = d.flush()
        except zlib.error as exc:
            return total, consumed, False, exc
        total += len(out)
        if feed is not None:
            feed(out)
    return total, consumed, d.eof, None


def _check_data(path: Path, data: VoxelData) -> int:
    """Refuse a file whose voxel data is not all there, in slices and bytes; else the NaN and ±Inf voxels of a
    float NIfTI (0 for other files)."""
    where = "" if data.file == path else f" in {data.file.name}"
    try:
        there = data.file.is_file()
    except (OSError, ValueError):  # a name too long, or with a NUL: a damaged header
        there = False
    if not there:
        raise ValueError(f"{path}: the voxel data file {data.file} named in the header is missing; copy it beside it")

    def present(have: int) -> str:
        if have >= data.need:
            return f"all {data.slices} slices present"
        per = max(data.need // max(data.slices, 1), 1)
        return f"{max(have, 0) // per} of {data.slices} slices present"

    nonfinite = _NonFinite(data) if data.float_type else None
    if data.codec is None:
        have = data.file.stat().st_size - data.offset
        if have < data.need:
            raise ValueError(
                f"{path}: the file is truncated: {present(have)} ({max(have, 0):,} of {data.need:,} bytes of voxel "
                f"data{where}); copy it again"
            )
        if nonfinite is not None:
            _scan(data, nonfinite.feed)
        return nonfinite.count if nonfinite is not None else 0
    total, consumed, ended, error = _inflate(data, nonfinite.feed if nonfinite is not None else None)
    if error is not None:
        raise corrupt_error(path, data.codec, error, consumed)
    have = total - data.skip
    if not ended:
        raise ValueError(
            f"{path}: the file is truncated: {present(have)} (the {data.codec} stream{where} ends after "
            f"{format_bytes(consumed)} of compressed data, before its end); copy it again"
        )
    if have < data.need:
        raise ValueError(
            f"{path}: the file is truncated: {present(have)} (the {data.codec} stream{where} is whole but holds "
            f"{max(have, 0):,} of {data.need:,} bytes of voxel data); the writer stopped early, export it again"
        )
    return nonfinite.count if nonfinite is not None else 0


# --- the grid -----------------------------------------------------------------------------------------------------


def _limits(source: str, size: tuple[int, ...], spacing: tuple[float, ...]) -> None:
    shape = "×".join(str(s) for s in size)
    count = math.prod(size)
    if count == 0:
        raise ValueError(f"{source}: the image has no voxels (size {shape})")
    if count > MAX_VOXELS:
        raise ValueError(
            f"{source}: {count:,} voxels ({shape}) is over the limit of {MAX_VOXELS:,} (2^30): no PET or CT volume is "
            "that large; the header is damaged or this is not a patient image"
        )
    extents = [n * s for n, s in zip(size, spacing, strict=True)]
    for axis, extent, n, s in zip("xyz", extents, size, spacing, strict=True):
        if extent > MAX_EXTENT_MM:
            raise ValueError(
                f"{source}: the physical extent along {axis} is {extent:,.0f} mm ({n} voxels × {s:g} mm), over the "
                f"limit of {MAX_EXTENT_MM:,.0f} mm (no patient is 3 m long); the spacing is wrong (cm or m, not mm?)"
            )
    litres = math.prod(extents) / 1e6
    if litres > MAX_FIELD_OF_VIEW_L:
        box = " × ".join(f"{e:,.0f}" for e in extents)
        raise ValueError(
            f"{source}: the field of view is {litres:,.0f} L ({box} mm), over the limit of {MAX_FIELD_OF_VIEW_L:,.0f} "
            "L (a whole-body scan is about 500 L); the spacing is wrong or this is not a patient image"
        )


def check_grid_limits(grid: GridSpec, source: str) -> None:
    """Refuse an empty grid, or one over :data:`MAX_VOXELS`, :data:`MAX_EXTENT_MM` or :data:`MAX_FIELD_OF_VIEW_L`.

    Args:
        grid: the grid (``Volume.grid`` for a volume given through the Python API).
        source: what to call it in the message (a file, a series, ``CT``).

    Raises:
        ValueError: the message gives the figure and the limit.
    """
    _limits(source, grid.size_xyz, grid.spacing)


def _bad_spacing(path: Path, layout: HeaderLayout, n: int) -> ValueError | None:
    """The refusal of the spacing written for axis ``n`` (from 1), or None when it is positive and finite."""
    value, field, axis = layout.spacing[n - 1], layout.field.format(n=n), _axis(n)
    if value is None:
        return ValueError(
            f"{path}: the header gives no spacing along {axis} (no {field}), and SimpleITK would assume 1 mm; export "
            "the image again with its voxel size"
        )
    if math.isfinite(value) and value > 0:
        return None
    return ValueError(
        f"{path}: the spacing along {axis} is {value:g} mm ({field} in the header); a spacing must be positive and "
        "finite (SimpleITK would put 1 mm or drop the sign, and the image would be mis-scaled): export the image "
        "again with its voxel size"
    )


def _checked(path: Path) -> tuple[ImageHeader, sitk.ImageFileReader, VoxelData | None]:
    import SimpleITK as sitk

    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such file")
    if path.stat().st_size == 0:
        raise ValueError(f"{path}: the file is empty (0 bytes); copy it again")
    twin = path.with_name(path.name[:-3]) if path.name.lower().endswith(".nii.gz") else None
    if twin is not None and twin.exists():  # nifti1_io opens X.nii before X.nii.gz, whatever name it is given
        raise ValueError(
            f"{path}: {twin.name} lies beside it, and SimpleITK's NIfTI reader would read the voxels of {twin.name} "
            f"under the header of {path.name}; move one of the two away"
        )
    layout = parse_header(path)
    for n in range(1, len(layout.spacing) + 1) if layout is not None else ():
        if layout.spacing[n - 1] is not None and (exc := _bad_spacing(path, layout, n)):  # type: ignore[union-attr]
            raise exc  # before SimpleITK, whose own message for some (NRRD NaN, 0) does not say which
    io = sitk.ImageFileReader.GetImageIOFromFileName(str(path))
    reader = sitk.ImageFileReader()
    reader.SetFileName(str(path))
    try:
        if not io:
            raise RuntimeError("SimpleITK has no reader for this file; give a NIfTI, NRRD or MetaImage file")
        reader.SetImageIO(io)
        reader.ReadImageInformation()
    except RuntimeError as exc:
        if layout is not None and layout.data is not None:
            _check_data(path, layout.data)  # a damaged file says how before SimpleITK's less telling message
        raise ValueError(f"{path}: cannot read image ({_last_line(exc)})") from None
    if layout is not None and _IO[layout.format] != io:
        layout = None  # SimpleITK reads it as another format than its suffix says: its reader alone
    size = tuple(int(n) for n in reader.GetSize())
    pixel = sitk.GetPixelIDValueAsString(reader.GetPixelID())
    problem = scalar_3d_problem(reader.GetDimension(), reader.GetNumberOfComponents(), size, pixel)
    if problem:
        raise ValueError(f"{path}: {problem}")
    own = layout is not None and len(layout.spacing) == 3
    written = layout if own else HeaderLayout(io, tuple(reader.GetSpacing()), "spacing as SimpleITK reads it", None)
    for n in (1, 2, 3):
        if exc := _bad_spacing(path, written, n):  # type: ignore[arg-type]
            raise exc
    spacing = tuple(float(s) for s in written.spacing)  # type: ignore[union-attr, arg-type]
    _limits(str(path), size, spacing)
    data = layout.data if layout is not None else None
    nonfinite = _check_data(path, data) if data is not None else 0
    fmt = layout.format if layout is not None else io
    return ImageHeader(path, fmt, size, spacing, pixel, data is not None, nonfinite), reader, data  # type: ignore[arg-type]


def check_image_file(path: str | Path) -> ImageHeader:
    """Every check of :func:`read_image` (steps 1–4 of the module docstring), without reading the voxels.

    Raises:
        FileNotFoundError: no such file.
        ValueError: the file is empty, truncated, corrupt, not a 3D scalar image, has a spacing that is not positive
            and finite, or is over a limit; the message names the file, gives the figures and says what to do.
    """
    return _checked(Path(path))[0]


def read_image(path: str | Path) -> sitk.Image:
    """A 3D scalar image file, read only when it passed :func:`check_image_file`.

    Cost, measured on 2 shared cores: on ``models/sample_case/ct.nii.gz`` (256 × 256 × 58 int16, 3.8 MB compressed,
    7.6 MB of voxels) the checks take 35–45 ms beside SimpleITK's 45–55 ms read (+50–90 %); on a 512 × 512 × 200
    int16 ``.nii.gz`` (71 MB) 0.52 s beside 0.64 s. Nearly all of it is the gzip pass, which decompresses the file a
    second time; a raw file costs a ``stat`` (a float NIfTI one read of its voxels, for NaN and ±Inf).

    Raises:
        FileNotFoundError, ValueError: as :func:`check_image_file`, or SimpleITK could not read the voxels.
    """
    import SimpleITK as sitk

    path = Path(path)
    header, reader, data = _checked(path)
    try:
        image = reader.Execute()
    except RuntimeError as exc:
        raise ValueError(f"{path}: cannot read image ({_last_line(exc)})") from None
    if header.nonfinite and data is not None:  # SimpleITK read them as 0: put them back for the input checks
        voxels = sitk.GetArrayFromImage(image)
        restore = _NonFinite(data, voxels.reshape(-1))
        if data.codec:
            _inflate(data, restore.feed)
        else:
            _scan(data, restore.feed)
        fixed = sitk.GetImageFromArray(voxels)
        fixed.CopyInformation(image)
        image = fixed
    return image
