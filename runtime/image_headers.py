"""The headers of NIfTI, NRRD and MetaImage files as written: what :mod:`diffseg.runtime.image_file` checks.

:func:`parse_header` reads a file's own header (not SimpleITK's view of it, which substitutes defaults: see
``image_file``) for the spacing as written per spatial axis and for where the voxel data lies and how many bytes of it
the header promises (:class:`VoxelData`). A layout that only SimpleITK's reader follows (NRRD ``LIST``, text
encodings, MetaImage ASCII data) gives no ``VoxelData``; a format without a parser here gives no layout at all.

Formats and fields read: NIfTI-1 and NIfTI-2 in ``.nii`` and ``.nii.gz`` (``dim``, ``datatype``, ``pixdim``,
``vox_offset``, either byte order); NRRD ``.nrrd`` (attached) and ``.nhdr`` (``data file``), raw and gzip encodings
(``sizes``, ``type``, ``kinds``, ``space directions``/``spacings``, ``line skip``, ``byte skip``); MetaImage ``.mha``
(``ElementDataFile = LOCAL``) and ``.mhd`` (a detached ``.raw``/``.zraw``), raw or ``CompressedData``
(``DimSize``, ``ElementType``, ``ElementNumberOfChannels``, ``ElementSpacing``/``ElementSize``,
``CompressedDataSize``, ``HeaderSize``).
"""

from __future__ import annotations

import math
import re
import struct
import zlib
from dataclasses import dataclass
from pathlib import Path

__all__ = ["HeaderLayout", "VoxelData", "corrupt_error", "format_bytes", "parse_header"]

_HEADER_MAX = 1 << 20  # a text header (NRRD, MetaImage) longer than this is not one
# NIfTI datatype code → bytes per voxel (nifti1.h); DT_BINARY (1 bit) is left to SimpleITK.
_NIFTI_BYTES = {2: 1, 4: 2, 8: 4, 16: 4, 32: 8, 64: 8, 128: 3, 256: 1, 512: 2, 768: 4, 1024: 8, 1280: 8, 1536: 16}
_NIFTI_BYTES |= {1792: 16, 2048: 32, 2304: 4}
_MET_BYTES = {"CHAR": 1, "UCHAR": 1, "SHORT": 2, "USHORT": 2, "INT": 4, "UINT": 4, "LONG": 4, "ULONG": 4}  # metaTypes.h
_MET_BYTES |= {"LONG_LONG": 8, "ULONG_LONG": 8, "FLOAT": 4, "DOUBLE": 8}
_NRRD_DOMAIN_KINDS = {"domain", "space", "time", "???", "none"}  # the axes teem and ITK count as spatial
# SimpleITK 2.5 (teem) crashes (SIGSEGV) on a field it cannot parse whose line is over about 1,000 characters:
# such a line is refused here first. Free-text fields never fail to parse.
_NRRD_LINE_MAX = 512
_NRRD_FREE_TEXT = {"content", "sample units", "units", "labels", "space units"}


@dataclass(frozen=True)
class VoxelData:
    """Where a file's voxel data lies and how many bytes of it the header promises.

    Attributes:
        file: the file holding the data (the image file itself, or a detached data file).
        offset: bytes before the data, or before the compressed stream.
        need: bytes of voxels the header promises.
        slices: voxels along z, for the messages.
        codec: None (raw), ``gzip`` or ``zlib``.
        skip: decompressed bytes before the voxels (the header inside a ``.nii.gz``, NRRD ``byte skip``).
        limit: compressed bytes the header promises (MetaImage ``CompressedDataSize``), or None: to the end.
        float_type: for a float NIfTI, the numpy type of its voxels (``<f4``, ``>f8``): SimpleITK's NIfTI reader
            (nifti1_io) sets NaN and ±Inf voxels to 0, so they are found in the data and put back.
        rescale: the NIfTI ``scl_slope``, ``scl_inter`` that SimpleITK applies ((1, 0): none).
    """

    file: Path
    offset: int
    need: int
    slices: int
    codec: str | None = None
    skip: int = 0
    limit: int | None = None
    float_type: str | None = None
    rescale: tuple[float, float] = (1.0, 0.0)


@dataclass(frozen=True)
class HeaderLayout:
    """A header as parsed here.

    Attributes:
        format: ``NIfTI-1``, ``NIfTI-2``, ``NRRD`` or ``MetaImage``.
        spacing: mm per spatial axis as written (None: not written).
        field: the header field of the spacing, for messages (``{n}``: the axis, from 1).
        data: the voxel data, or None where only SimpleITK's reader follows the layout.
    """

    format: str
    spacing: tuple[float | None, ...]
    field: str
    data: VoxelData | None


def format_bytes(n: int) -> str:
    """``n`` bytes in words: exact below 100 kB, else MB to one decimal."""
    return f"{n:,} bytes" if n < 100_000 else f"{n / 1e6:.1f} MB"


def _damaged(path: Path, what: str) -> ValueError:
    return ValueError(f"{path}: the header is damaged: {what}; export the image again")


def corrupt_error(path: Path, codec: str, exc: zlib.error, consumed: int) -> ValueError:
    """The refusal of a compressed stream that zlib cannot decompress or whose checksum fails."""
    text = str(exc)
    if "incorrect data check" in text:
        what = "fails its CRC-32 check" if codec == "gzip" else "fails its Adler-32 checksum"
    elif "incorrect length check" in text:
        what = "fails its length check (gzip ISIZE)"
    else:
        what = f"cannot be decompressed ({text.split(': ', 1)[-1]})"
    after = f" after {format_bytes(consumed)}" if consumed else ""
    return ValueError(
        f"{path}: the file is corrupt: its {codec} stream {what}{after}; it was damaged in a copy or on disk, copy it "
        "again"
    )


def _gunzip_head(path: Path, n: int) -> bytes:
    """The first ``n`` decompressed bytes of a gzip file (fewer when the stream ends first)."""
    d, out = zlib.decompressobj(16 + zlib.MAX_WBITS), bytearray()
    with open(path, "rb") as fh:
        while len(out) < n and not d.eof and (chunk := d.unconsumed_tail or fh.read(1 << 16)):
            try:
                out += d.decompress(chunk, n - len(out))
            except zlib.error as exc:
                raise corrupt_error(path, "gzip", exc, 0) from None
    return bytes(out)


def _nifti(path: Path) -> HeaderLayout:
    with open(path, "rb") as fh:
        head = fh.read(544)
    gz = head[:2] == b"\x1f\x8b"
    head = _gunzip_head(path, 544) if gz else head
    for e in "<>":
        version = {348: 1, 540: 2}.get(struct.unpack_from(e + "i", head.ljust(4, b"\0"))[0])
        if version:
            break
    if not version and len(head) >= 4:  # SimpleITK would try it as Analyze: it can hang on such a file
        size = struct.unpack_from("<i", head)[0]
        raise ValueError(f"{path}: cannot read image: not a NIfTI file (its sizeof_hdr is {size}, not 348 or 540)")
    if len(head) < (540 if version == 2 else 348):  # shorter than its NIfTI header
        where = f"its gzip stream holds {len(head)} bytes" if gz else f"{len(head)} bytes"
        raise ValueError(f"{path}: the file is truncated: {where}, inside the NIfTI header; copy it again")
    if version == 1:
        dim, (datatype,) = struct.unpack_from(e + "8h", head, 40), struct.unpack_from(e + "h", head, 70)
        pixdim, vox, minimum = struct.unpack_from(e + "8f", head, 76), struct.unpack_from(e + "f", head, 108)[0], 352
        single, scale = head[344:348] == b"n+1\0", struct.unpack_from(e + "2f", head, 112)
    else:
        (datatype,), dim = struct.unpack_from(e + "h", head, 12), struct.unpack_from(e + "8q", head, 16)
        pixdim, vox, minimum = struct.unpack_from(e + "8d", head, 104), struct.unpack_from(e + "q", head, 168)[0], 544
        single, scale = head[4:8] == b"n+2\0", struct.unpack_from(e + "2d", head, 176)
    ndim = dim[0]
    if not 1 <= ndim <= 7:
        raise _damaged(path, f"NIfTI dim[0] (the number of dimensions) is {ndim}, not 1..7")
    sizes = dim[1 : ndim + 1]
    for i, s in enumerate(sizes, 1):
        if s < 1:
            raise _damaged(path, f"NIfTI dim[{i}] is {s}, not a number of voxels >= 1")
    if not (math.isfinite(vox) and vox >= 0):
        raise _damaged(path, f"NIfTI vox_offset is {vox}")
    spacing = tuple(float(p) for p in pixdim[1 : min(ndim, 3) + 1])
    per = _NIFTI_BYTES.get(datatype)
    data = None
    if single and per is not None:
        offset = max(int(vox), minimum)
        need, slices = math.prod(sizes) * per, sizes[2] if ndim >= 3 else 1
        floats = {16: e + "f4", 64: e + "f8"}.get(datatype)
        slope, inter = scale if math.isfinite(scale[0]) and scale[0] != 0 and math.isfinite(scale[1]) else (1.0, 0.0)
        more = {"float_type": floats, "rescale": (slope, inter)}
        if gz:
            data = VoxelData(path, 0, need, slices, "gzip", offset, **more)  # type: ignore[arg-type]
        else:
            data = VoxelData(path, offset, need, slices, **more)  # type: ignore[arg-type]
    return HeaderLayout(f"NIfTI-{version}", spacing, "pixdim[{n}]", data)


# --- text headers: NRRD and MetaImage ---------------------------------------------------------------------------


def _numbers(path: Path, field: str, text: str, kind: type = float) -> list:
    try:
        return [kind(v) for v in text.split()]
    except ValueError:
        raise _damaged(path, f"{field} is {text!r}, not numbers") from None


def _nrrd_type_bytes(name: str) -> int | None:
    t = " ".join(name.lower().split())
    if t in ("float", "double"):
        return 4 if t == "float" else 8
    for words, n in ((("char", "int8"), 1), (("short", "int16"), 2), (("long", "int64"), 8), (("int",), 4)):
        if any(w in t for w in words):
            return n
    return None  # "block" or unknown: SimpleITK decides


def _nrrd_fields(path: Path) -> tuple[dict[str, str], int | None]:
    """The header fields, and the offset of the attached data (None: the header has no blank line after it)."""
    fields: dict[str, str] = {}
    with open(path, "rb") as fh:
        first = fh.readline(64)
        if not first.startswith(b"NRRD000"):
            if b"NRRD000".startswith(first):
                raise ValueError(f"{path}: the file is truncated: {len(first)} bytes, in the NRRD header; copy again")
            raise ValueError(f"{path}: cannot read image: not an NRRD file (it starts {first[:12]!r}, not NRRD000)")
        while fh.tell() < _HEADER_MAX and (line := fh.readline(_HEADER_MAX)):
            text = line.decode("latin-1").rstrip("\r\n")
            if not text:
                return fields, fh.tell()
            key, sep, value = text.partition(": ")
            if sep and not text.startswith("#") and ":=" not in key:
                if len(text) > _NRRD_LINE_MAX and key.strip() not in _NRRD_FREE_TEXT:
                    raise _damaged(path, f"its NRRD field {key.strip()[:40]!r} is a line of {len(text):,} characters")
                fields[key.strip()] = value.strip()
    return fields, None


def _many_files(path: Path, field: str, name: str) -> bool:
    """Whether a data-file field names several files (``LIST`` or ``pattern min max step [n]``), which SimpleITK's
    reader follows alone; a field of several words that is neither is refused (MetaIO divides by its step: a
    damaged one crashes SimpleITK with SIGFPE)."""
    words = name.split()
    if words[:1] == ["LIST"] or len(words) <= 1:
        return words[:1] == ["LIST"]
    numbers = words[1:4]
    if "%" not in words[0] or len(words) not in (4, 5) or not all(re.fullmatch(r"-?\d+", w) for w in words[1:]):
        raise _damaged(path, f"{field} is {name[:80]!r}: neither a file name nor 'pattern min max step'")
    if int(numbers[2]) == 0:
        raise _damaged(path, f"{field} is {name[:80]!r}: a file pattern with step 0")
    return True


def _skip_lines(file: Path, offset: int, lines: int) -> int:
    """The offset after ``lines`` lines from ``offset`` (unchanged when the file cannot be opened: reported later)."""
    try:
        with open(file, "rb") as fh:
            fh.seek(offset)
            for _ in range(lines):
                if not fh.readline(_HEADER_MAX):
                    break
            return fh.tell()
    except (OSError, ValueError):
        return offset


def _nrrd(path: Path) -> HeaderLayout | None:
    fields, end = _nrrd_fields(path)
    get = fields.get
    datafile = get("data file", get("datafile"))
    if end is None and datafile is None:
        raise ValueError(
            f"{path}: the file is truncated: its NRRD header ends after {format_bytes(path.stat().st_size)} without "
            "the blank line that starts the voxel data; copy it again"
        )
    if "sizes" not in fields or "dimension" not in fields:
        return None  # SimpleITK says what is missing
    sizes = _numbers(path, "NRRD sizes", fields["sizes"], int)
    if _numbers(path, "NRRD dimension", fields["dimension"], int) != [len(sizes)] or not 1 <= len(sizes) <= 16:
        raise _damaged(path, f"NRRD dimension {fields['dimension']!r} with sizes {fields['sizes']!r}")
    kinds = get("kinds", "").split()
    spatial = [i for i in range(len(sizes)) if len(kinds) != len(sizes) or kinds[i].lower() in _NRRD_DOMAIN_KINDS]
    if "space directions" in fields:
        field, spacing = "space directions", []
        for vector in re.findall(r"\([^)]*\)|none", fields["space directions"]):
            if vector != "none":
                spacing.append(math.sqrt(sum(v * v for v in _numbers(path, field, vector[1:-1].replace(",", " ")))))
    elif "spacings" in fields:
        field, values = "spacings", _numbers(path, "NRRD spacings", fields["spacings"])
        spacing = [values[i] for i in spatial if i < len(values)]
    else:
        field, spacing = "space directions or spacings", [None] * len(spatial)
    per = _nrrd_type_bytes(get("type", ""))
    codec = {"raw": None, "gzip": "gzip", "gz": "gzip"}.get(get("encoding", "").lower(), "other")
    many = datafile is not None and _many_files(path, "the NRRD data file", datafile)
    if per is None or codec == "other" or many:
        return HeaderLayout("NRRD", tuple(spacing), field, None)
    file = path if datafile is None else path.parent / datafile
    offset = end if datafile is None else 0
    line_skip = int(get("line skip", get("lineskip", "0")))  # lines before the data, compressed or not
    if line_skip > 0:
        offset = _skip_lines(file, offset, line_skip)
    byte_skip = int(get("byte skip", get("byteskip", "0")))  # -1: the data ends the file (raw only)
    need, slices = math.prod(sizes) * per, sizes[spatial[2]] if len(spatial) >= 3 else 1
    if codec is None:
        data = VoxelData(file, offset + max(byte_skip, 0), need, slices)
    else:
        data = VoxelData(file, offset, need, slices, codec, max(byte_skip, 0))
    return HeaderLayout("NRRD", tuple(spacing), field, data)


def _metaimage(path: Path) -> HeaderLayout:
    fields: dict[str, str] = {}
    end = None
    bad_line: str | None = None
    with open(path, "rb") as fh:
        while fh.tell() < _HEADER_MAX and (line := fh.readline(_HEADER_MAX)):
            key, sep, value = line.decode("latin-1").partition("=")
            if not sep and key.strip() and bad_line is None:
                bad_line = key.strip()[:80]
            if sep:
                fields[key.strip()] = value.strip()
                if key.strip() == "ElementDataFile":  # the last field: the data follow
                    end = fh.tell()
                    break
    with open(path, "rb") as fh:
        text = fh.read(64)
    if "NDims" not in fields and "ObjectType" not in fields and not (text.isascii() and b"\0" not in text):
        raise ValueError(f"{path}: cannot read image: not a MetaImage file (no NDims or ObjectType line)")
    if bad_line is not None:  # MetaIO misreads such a line: a crash (free(): invalid pointer), found by fuzzing
        raise _damaged(path, f"the line {bad_line!r} is not 'Key = Value'")
    if end is None or "DimSize" not in fields:
        raise ValueError(
            f"{path}: the file is truncated: its MetaImage header ends after {format_bytes(path.stat().st_size)} "
            "without DimSize and ElementDataFile (the lines that say how many voxels there are and where); copy it "
            "again"
        )
    sizes = _numbers(path, "DimSize", fields["DimSize"], int)
    ndims = _numbers(path, "NDims", fields.get("NDims", str(len(sizes))), int)
    if ndims != [len(sizes)] or not 1 <= len(sizes) <= 10:  # MetaIO's limit; SimpleITK hangs on NDims = 1e14
        raise _damaged(path, f"NDims = {fields.get('NDims')!r} with DimSize = {fields['DimSize']!r}")
    field = "ElementSize" if "ElementSize" in fields and "ElementSpacing" not in fields else "ElementSpacing"
    spacing = tuple(_numbers(path, field, fields[field])) if field in fields else (None,) * len(sizes)  # as MetaIO
    if len(spacing) != len(sizes):
        raise _damaged(path, f"{field} = {fields[field]!r} for {len(sizes)} dimensions")
    is_true = {k: fields.get(k, "").lower() in ("true", "t", "1") for k in ("BinaryData", "CompressedData")}
    per = _MET_BYTES.get(fields.get("ElementType", "").removeprefix("MET_"))
    if per is None:  # SimpleITK fails on it, or divides by its size of 0 (SIGFPE)
        known = ", ".join(f"MET_{t}" for t in _MET_BYTES)
        raise _damaged(path, f"ElementType is {fields.get('ElementType')!r}, not one of {known}")
    name = fields["ElementDataFile"]
    if _many_files(path, "ElementDataFile", name) or not is_true["BinaryData"]:
        return HeaderLayout("MetaImage", spacing, field, None)  # ASCII, a file list or pattern: SimpleITK's reader
    local = name.lower() == "local"
    file = path if local else path.parent / name
    need = math.prod(sizes) * per * int(fields.get("ElementNumberOfChannels", "1"))
    slices = sizes[2] if len(sizes) >= 3 else 1
    if is_true["CompressedData"]:
        limit = int(fields["CompressedDataSize"]) if "CompressedDataSize" in fields else None
        data = VoxelData(file, end if local else 0, need, slices, "zlib", limit=limit)
    else:
        header_size = int(fields.get("HeaderSize", "0"))  # -1: the data ends the file
        data = VoxelData(file, end if local else max(header_size, 0), need, slices)
    return HeaderLayout("MetaImage", spacing, field, data)


def parse_header(path: Path) -> HeaderLayout | None:
    """The header as parsed here, by the file's suffix; None for a format left to SimpleITK.

    Raises:
        ValueError: the header is truncated or damaged (the message names the file and the field).
    """
    name = path.name.lower()
    parser = next((p for s, p in _PARSERS.items() if name.endswith(s)), None)
    try:
        return parser(path) if parser else None
    except (struct.error, ValueError, OverflowError, KeyError, IndexError) as exc:
        if str(exc).startswith(str(path)):
            raise
        raise _damaged(path, f"cannot parse it ({exc})") from None


_PARSERS = {".nii": _nifti, ".nii.gz": _nifti, ".nrrd": _nrrd, ".nhdr": _nrrd, ".mha": _metaimage, ".mhd": _metaimage}
