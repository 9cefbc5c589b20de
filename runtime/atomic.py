"""The one writer of every output: a temporary file beside the target, checked, then renamed over the target.

Each write:

1. creates ``.<name>.<random>.tmp`` (``write_bytes_atomic``) or ``.<name>.<random>.tmp<suffixes>`` (``atomic_path``,
   for writers that pick a format by the extension) beside the target with ``O_CREAT | O_EXCL`` and mode 0o666, so
   the process umask applies as for any file a program creates (0644 under the usual 022), or with an explicit
   ``mode``, set exactly whatever the umask;
2. writes, flushes and fsyncs it;
3. checks it: not empty, the format's own check by the target's suffix (see :func:`check_file`), then the caller's
   ``check``;
4. renames it over the target (``os.replace``) and fsyncs the folder.

Any failure (ENOSPC, EIO, EROFS, EACCES, or a failed check) raises an ``OSError`` that names the final path and the
problem, with the errno kept (EIO for a failed check, ENOSPC when the disk turns out full); the temporary file is
removed, so nothing is ever left under the final name and an older file there stays as it was. The check is what
catches a full disk that a library does not report (SimpleITK's NIfTI writer ignores a short write).

Temporary names start with ``.`` and contain ``.tmp``: a folder's leftovers from a crash match ``.*.tmp*``.
"""

from __future__ import annotations

import contextlib
import errno as errno_codes
import gzip
import json
import os
import re
import secrets
import zlib
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

__all__ = [
    "Check",
    "atomic_path",
    "check_dicom",
    "check_file",
    "check_image",
    "fsync_dir",
    "write_bytes_atomic",
    "write_json_atomic",
    "write_text_atomic",
]

Check = Callable[[Path], None]
"""A check of a written temporary file: returns when it is good, raises (any exception) naming the problem."""

DEFAULT_MODE = 0o666  # the umask takes off what it takes off, as for open(..., "w")
IMAGE_SUFFIXES = (".nii.gz", ".nii", ".nrrd", ".nhdr", ".mha", ".mhd")
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
PNG_IEND = b"\x00\x00\x00\x00IEND\xaeB`\x82"  # the last chunk: length 0, type, CRC
_CHUNK = 1 << 20
_NIFTI1_HEADER = 352  # bytes before the voxels: the 348-byte header and the 4-byte extension flag
_LOW_SPACE = 64 * 1024  # bytes free below which a failed check is blamed on a full disk


class _CheckFailed(Exception):
    """A written file that failed its check (internal: becomes an OSError naming the final path)."""


def fsync_dir(path: str | Path) -> None:
    """``fsync`` a folder so that the entries created or renamed in it survive a crash."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextlib.contextmanager
def _removed_on_failure(tmp: Path, final: Path) -> Iterator[None]:
    """On any failure remove the temporary file; an OSError or a failed check becomes one naming ``final``."""
    try:
        yield
    except BaseException as exc:
        error = _write_error(final, exc) if isinstance(exc, OSError | _CheckFailed) else None  # disk as it is now
        with contextlib.suppress(OSError):
            tmp.unlink()
        if error is not None:
            raise error from exc
        raise


@contextlib.contextmanager
def atomic_path(path: str | Path, *, mode: int | None = None, check: Check | None = None) -> Iterator[Path]:
    """Yield a new temporary file beside ``path`` for a writer to fill; check it and rename it over ``path``.

    The temporary name keeps the full suffix (``.nii.gz``) so that writers that pick a format by the extension
    work; the writer may truncate and rewrite the file (its mode stays).

    Args:
        path: the final file.
        mode: the file's permission bits, set exactly; None: 0o666 less the process umask.
        check: a further check of the written file (after :func:`check_file`).

    Raises:
        OSError: the folder, the write, the check or the rename failed; the message names ``path``. Other
            exceptions of the block go through unchanged; in every case the temporary file is removed.
    """
    final = Path(path)
    try:
        _make_folder(final.parent)
        tmp, fd = _create_temp(final, "".join(final.suffixes))
    except OSError as exc:
        raise _write_error(final, exc) from exc
    os.close(fd)
    with _removed_on_failure(tmp, final):
        yield tmp
        fd = os.open(tmp, os.O_RDONLY | os.O_CLOEXEC)
        try:
            if mode is not None:
                os.fchmod(fd, mode)
            os.fsync(fd)
        finally:
            os.close(fd)
        _publish(tmp, final, check)


def write_bytes_atomic(
    path: str | Path,
    data: bytes,
    *,
    mode: int | None = None,
    check: Check | None = None,
    format_check: bool = True,
) -> Path:
    """Write ``data`` as the whole content of ``path``; see the module docstring for the steps and guarantees.

    Args:
        path: the final file.
        data: its content (not empty).
        mode: the file's permission bits, set exactly; None: 0o666 less the process umask.
        check: a further check of the written file (after the size check and :func:`check_file`).
        format_check: run :func:`check_file` (by the suffix of ``path``); False: only the size on disk and
            ``check`` (for bytes already parsed, such as a received DICOM instance).

    Returns:
        ``path``.

    Raises:
        OSError: the write failed (``errno.ENOSPC`` when the disk is full) or the check did; the message names
            ``path``; the temporary file is removed and an older ``path`` is left as it was.
    """
    final = Path(path)
    try:
        _make_folder(final.parent)
        tmp, fd = _create_temp(final, "")
    except OSError as exc:
        raise _write_error(final, exc) from exc
    with _removed_on_failure(tmp, final):
        try:
            if mode is not None:
                os.fchmod(fd, mode)
            _write_all(fd, data)
            os.fsync(fd)
            size = os.fstat(fd).st_size
        finally:
            os.close(fd)
        if size != len(data):
            raise _CheckFailed(f"{size} of {len(data)} bytes are on disk")
        _publish(tmp, final, check, format_check)
    return final


def write_text_atomic(path: str | Path, text: str, *, mode: int | None = None, check: Check | None = None) -> Path:
    """:func:`write_bytes_atomic` of ``text`` in UTF-8."""
    return write_bytes_atomic(path, text.encode("utf-8"), mode=mode, check=check)


def write_json_atomic(path: str | Path, obj: Any, *, mode: int | None = None, check: Check | None = None) -> Path:
    """:func:`write_text_atomic` of ``obj`` as indented JSON (parsed back before it is published)."""
    return write_text_atomic(path, json.dumps(obj, indent=2, sort_keys=False) + "\n", mode=mode, check=check)


def check_file(path: str | Path, name: str | None = None) -> None:
    """The format check of a written file, chosen by the suffix of ``name`` (default: ``path``'s name).

    ``.json``: parsed; ``.png``: signature and IEND chunk; ``.gz``: decompressed whole (CRC and length);
    ``.nii.gz``/``.nii``/``.nrrd``/``.mha``: the header read back with SimpleITK and the voxel data there in full
    (when the file's own name has the suffix: SimpleITK picks the reader by it); ``.dcm``: read back with pydicom
    (:func:`check_dicom`); ``.csv``/``.md``/``.txt``: UTF-8. Other suffixes: not empty.

    Raises:
        ValueError: the file is damaged or empty; the message says how.
    """
    path = Path(path)
    lower = (name or path.name).lower()
    if path.stat().st_size == 0:
        raise ValueError("the file is empty")
    if lower.endswith(IMAGE_SUFFIXES) and path.name.lower().endswith(IMAGE_SUFFIXES):
        check_image(path)
    elif lower.endswith(".gz"):
        _gzip_length(path)
    if lower.endswith(".json"):
        try:
            json.loads(path.read_bytes().decode("utf-8"))
        except ValueError as exc:
            raise ValueError(f"not valid JSON ({exc})") from None
    elif lower.endswith(".png"):
        _check_png(path)
    elif lower.endswith(".dcm"):
        check_dicom(path)
    elif lower.endswith((".csv", ".md", ".txt")):
        try:
            path.read_bytes().decode("utf-8")
        except UnicodeDecodeError as exc:
            raise ValueError(f"not UTF-8 text ({exc})") from None


def check_image(path: str | Path, *, size: tuple[int, ...] | None = None, data: bool = True) -> None:
    """An image file's header read back with SimpleITK, and its voxel data there in full.

    Args:
        path: the image file (its suffix picks the reader).
        size: the expected size in voxels (x, y, z), or None.
        data: also check the voxel data (False: the header only; :func:`check_file` checks the data).

    Raises:
        ValueError: the header cannot be read, the size differs, or the voxel data is short (a gzip stream is
            decompressed whole for its CRC and length).
    """
    import SimpleITK as sitk

    path = Path(path)
    reader = sitk.ImageFileReader()
    reader.SetFileName(str(path))
    try:
        reader.ReadImageInformation()
    except RuntimeError as exc:
        last = str(exc).strip().splitlines()[-1] if str(exc).strip() else "unreadable"
        raise ValueError(f"the image header cannot be read back ({last})") from None
    got = tuple(int(n) for n in reader.GetSize())
    if size is not None and got != tuple(size):
        raise ValueError(f"the image read back has size {got}, expected {tuple(size)}")
    bits = re.search(r"(\d+)-bit", sitk.GetPixelIDValueAsString(reader.GetPixelID()))
    if not data or bits is None:
        return
    need = int(bits.group(1)) // 8 * reader.GetNumberOfComponents()
    for n in got:
        need *= n
    lower = path.name.lower()
    if lower.endswith((".nii", ".nii.gz")):
        need += _NIFTI1_HEADER  # the voxels follow the header (NIfTI-2's is longer: a lower bound)
        have = _gzip_length(path) if lower.endswith(".gz") else path.stat().st_size
    elif lower.endswith(".gz"):
        have = _gzip_length(path)
    else:
        return  # .nrrd/.mha compress inside the file; their writers report short writes
    if have < need:
        raise ValueError(f"the voxel data is short: {have} bytes for {need} bytes of voxels")


def check_dicom(path: str | Path, **expected: Any) -> None:
    """A DICOM file read back with pydicom: every element whole, pixel data present in an image.

    Args:
        path: the DICOM file.
        expected: attributes by keyword and the value each must have (compared as strings), e.g.
            ``SOPInstanceUID=...``.

    Raises:
        ValueError: unreadable, an element cut by the end of the file, an image without pixel data, or an
            expected attribute that differs.
    """
    import pydicom
    import pydicom.uid

    path = Path(path)
    size = path.stat().st_size
    try:
        ds = pydicom.dcmread(path)
    except Exception as exc:  # pydicom raises many kinds on a damaged file
        raise ValueError(f"not readable as DICOM ({type(exc).__name__}: {exc})") from None
    for tag in list(ds.keys()):  # tags: iterating a Dataset would convert every element
        raw = ds.get_item(tag)
        length, tell, value = (getattr(raw, a, None) for a in ("length", "value_tell", "value"))
        if length is None or tell is None:
            continue  # an element already converted (never for a file just read)
        # a defined length must fit in the file; an undefined one (encapsulated pixel data) must be followed by
        # its 8-byte sequence delimiter, which pydicom does not demand (it warns and stops at the end of the file)
        end = tell + length if length != 0xFFFFFFFF else tell + len(value) + 8 if isinstance(value, bytes) else 0
        if end > size:
            raise ValueError(f"the DICOM file is cut inside element {tag} (it ends at byte {size} of {end})")
    if "SOPClassUID" not in ds or "SOPInstanceUID" not in ds:
        raise ValueError("the DICOM file read back has no SOP Class or SOP Instance UID")
    sop_class = pydicom.uid.UID(str(ds.SOPClassUID)).name
    image = "Rows" in ds or "Image Storage" in sop_class or "Segmentation Storage" in sop_class
    if image and not any(k in ds for k in ("PixelData", "FloatPixelData", "DoubleFloatPixelData")):
        raise ValueError("the DICOM image read back has no pixel data")
    for keyword, value in expected.items():
        got = ds.get(keyword)
        if got is None or str(got) != str(value):
            raise ValueError(f"the DICOM file read back has {keyword} {got!r}, expected {value!r}")


def _make_folder(folder: Path) -> None:
    """Create ``folder`` and its missing parents, each made durable (its parent fsynced)."""
    if folder.is_dir():
        return
    missing = []
    for p in (folder, *folder.parents):
        if p.is_dir():
            break
        missing.append(p)
    folder.mkdir(parents=True, exist_ok=True)
    for p in reversed(missing):
        fsync_dir(p.parent)


def _create_temp(final: Path, suffix: str) -> tuple[Path, int]:
    """A new temporary file beside ``final`` (``O_EXCL``: never an existing file or link) and its descriptor."""
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC
    for _ in range(100):
        tmp = final.with_name(f".{final.name}.{secrets.token_hex(4)}.tmp{suffix}")
        try:
            return tmp, os.open(tmp, flags, DEFAULT_MODE)
        except FileExistsError:
            continue
    raise FileExistsError(errno_codes.EEXIST, f"no free temporary name beside {final}")


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        n = os.write(fd, view[:_CHUNK])
        if n <= 0:
            raise OSError(errno_codes.EIO, "write returned 0 bytes")
        view = view[n:]


def _publish(tmp: Path, final: Path, check: Check | None, format_check: bool = True) -> None:
    """Check the written ``tmp``, rename it over ``final`` and fsync the folder."""
    try:
        if format_check:
            check_file(tmp, final.name)
        elif tmp.stat().st_size == 0:
            raise ValueError("the file is empty")
        if check is not None:
            check(tmp)
    except OSError:
        raise
    except Exception as exc:  # a check says what is wrong by raising
        raise _CheckFailed(str(exc) or type(exc).__name__) from exc
    os.replace(tmp, final)
    fsync_dir(final.parent)


def _write_error(final: Path, exc: BaseException) -> OSError:
    """The OSError naming ``final`` for a failed write (errno kept) or a failed check (EIO, or ENOSPC when full)."""
    if isinstance(exc, OSError):
        code = exc.errno or errno_codes.EIO
        problem = exc.strerror or str(exc)
        if exc.filename is not None and Path(exc.filename).parent != final.parent:
            problem += f" ({exc.filename})"
        return OSError(code, f"{final}: not written: {problem}")
    code, problem = errno_codes.EIO, f"the file read back failed its check: {exc}"
    free = _free_bytes(final.parent)
    if free is not None and free < _LOW_SPACE:
        code = errno_codes.ENOSPC
        problem += f"; No space left on device ({free} bytes free)"
    return OSError(code, f"{final}: not written: {problem}")


def _free_bytes(folder: Path) -> int | None:
    try:
        st = os.statvfs(folder)
    except OSError:
        return None
    return 0 if st.f_favail == 0 and st.f_files else st.f_bavail * st.f_frsize


def _gzip_length(path: Path) -> int:
    """The decompressed length of a gzip file, read whole (gzip checks each member's CRC and length)."""
    n = 0
    try:
        with gzip.open(path, "rb") as fh:
            while chunk := fh.read(_CHUNK):
                n += len(chunk)
    except (EOFError, gzip.BadGzipFile, zlib.error) as exc:
        raise ValueError(f"the gzip stream is damaged ({exc})") from None
    return n


def _check_png(path: Path) -> None:
    with open(path, "rb") as fh:
        head = fh.read(len(PNG_SIGNATURE))
        fh.seek(0, os.SEEK_END)
        end = fh.tell()
        fh.seek(max(0, end - len(PNG_IEND)))
        tail = fh.read()
    if head != PNG_SIGNATURE:
        raise ValueError("not a PNG (no PNG signature)")
    if tail != PNG_IEND:
        raise ValueError("the PNG is cut (it does not end with the IEND chunk)")
