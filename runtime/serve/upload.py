"""Streaming receive: the file pynetdicom writes each incoming data set into, in the spool (see ``scp.py``).

pynetdicom, with ``_config.STORE_RECV_CHUNKED_DATASET``, writes a received data set fragment by fragment to a
``NamedTemporaryFile`` from ``pynetdicom.dimse_messages``; :func:`install_stream_hook` replaces that name so that,
on the threads of a registered receiver's associations, the file is an :class:`Upload` in the spool instead (same
file system: the handler renames it into place). pynetdicom 3.0 internals: if they change, a receiver gets
pynetdicom's own temporary file, which the handler copies in chunks.
"""

from __future__ import annotations

import contextlib
import errno
import os
import secrets
import threading
import weakref
from collections.abc import Callable
from pathlib import Path
from typing import Any

from pynetdicom import AE, _config, dimse_messages

__all__ = ["MB", "Upload", "free_bytes", "install_stream_hook", "register_receiver"]

MB = 1 << 20  # the unit of max_instance_mb, max_study_mb and min_free_disk_mb
_FLOOR_CHECK_BYTES = 4 << 20  # free space is looked at again after this many bytes of an upload


def free_bytes(folder: Path) -> int:
    st = os.statvfs(folder)
    return st.f_bavail * st.f_frsize


class Upload:
    """The file pynetdicom streams one C-STORE data set into, in the spool (in place of its NamedTemporaryFile).

    pynetdicom calls ``write`` for the preamble, the file meta and each data set fragment, ``file.flush`` after
    each, and ``close``. Once the upload is refused (too large, disk floor) or a write fails, further bytes are
    counted and dropped and the file is emptied, so that a refused upload takes no disk space; the handler then
    answers the refusal.
    """

    def __init__(self, folder: Path, mode: int | None, max_bytes: int, floor_bytes: int, assoc_id: int) -> None:
        self.max_bytes = max_bytes
        self.floor_bytes = floor_bytes
        self.assoc_id = assoc_id
        self.folder = folder
        self.size = 0  # bytes received, written or not
        self.refusal: str | None = None  # "too_large" or "disk_floor"
        self.free_bytes: int | None = None  # free space when refused for the disk floor
        self.error: OSError | None = None
        self.claimed = False  # taken by the C-STORE handler
        self._next_check = 0
        self.file = self  # pynetdicom flushes ``file``
        try:
            self.path, self._fd = self._create(folder)
        except OSError as exc:  # no file (no inode left, folder gone): the bytes are dropped, the handler fails
            self.path, self._fd = folder / f".recv-{secrets.token_hex(8)}.tmp", -1
            self.error = exc
        self.name = str(self.path)
        try:
            if mode is not None and self._fd >= 0:
                os.fchmod(self._fd, mode)
            self._check_floor()
        except OSError as exc:
            self._fail(exc)

    @staticmethod
    def _create(folder: Path) -> tuple[Path, int]:
        flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC
        for _ in range(100):
            path = folder / f".recv-{secrets.token_hex(8)}.tmp"  # matches Spool.remove_partial_writes' .*.tmp*
            try:
                return path, os.open(path, flags, 0o666)  # the umask applies, as for any file created
            except FileExistsError:
                continue
        raise FileExistsError(errno.EEXIST, f"no free temporary name in {folder}")

    def _check_floor(self) -> None:
        if self.floor_bytes <= 0:
            return
        free = free_bytes(self.folder)
        if free < self.floor_bytes:
            self.free_bytes = free
            self._refuse("disk_floor")
        self._next_check = self.size + _FLOOR_CHECK_BYTES

    def _refuse(self, why: str) -> None:
        self.refusal = why
        self._empty()

    def _fail(self, exc: OSError) -> None:
        self.error = exc
        self._empty()

    def _empty(self) -> None:
        with contextlib.suppress(OSError):
            if self._fd >= 0:
                os.ftruncate(self._fd, 0)

    @property
    def stopped(self) -> bool:
        """Whether bytes are no longer written (refused or failed)."""
        return self.refusal is not None or self.error is not None

    def write(self, data: bytes) -> int:
        n = len(data)
        self.size += n
        if self.stopped:
            return n
        if self.size > self.max_bytes:
            self._refuse("too_large")
            return n
        try:
            if self.size >= self._next_check:
                self._check_floor()
                if self.stopped:
                    return n
            view = memoryview(data)
            while view:
                view = view[os.write(self._fd, view) :]
        except OSError as exc:
            self._fail(exc)
        return n

    def flush(self) -> None:
        """Nothing to do: every ``write`` goes to the file descriptor."""

    def sync(self) -> None:
        """fsync the written data (before the rename that publishes it)."""
        os.fsync(self._fd)

    def close(self) -> None:
        if self._fd >= 0:
            with contextlib.suppress(OSError):
                os.close(self._fd)
            self._fd = -1

    def remove(self) -> None:
        """Close and delete the temporary file (nothing if it was renamed into place)."""
        self.close()
        with contextlib.suppress(FileNotFoundError):
            self.path.unlink()


# The receivers of this process: each StorageSCP's AE → the SCP, for the temporary-file hook below.
_RECEIVERS: weakref.WeakKeyDictionary[AE, Callable[[Any], Any]] = weakref.WeakKeyDictionary()
_pynetdicom_temporary_file = dimse_messages.NamedTemporaryFile


def _spool_temporary_file(*args: Any, **kwargs: Any) -> Any:
    """pynetdicom's NamedTemporaryFile, replaced: an upload into a StorageSCP's spool when called on the thread
    of one of its associations (pynetdicom decodes DIMSE messages on the association's DUL thread), else the
    original."""
    ae = getattr(getattr(threading.current_thread(), "assoc", None), "ae", None)
    new_upload = _RECEIVERS.get(ae) if ae is not None else None
    if new_upload is None:
        return _pynetdicom_temporary_file(*args, **kwargs)
    return new_upload(threading.current_thread().assoc)  # type: ignore[attr-defined]


def register_receiver(ae: AE, new_upload: Callable[[Any], Upload]) -> None:
    """Stream the data sets received on ``ae``'s associations into ``new_upload(assoc)`` (process-wide hook)."""
    install_stream_hook()
    _RECEIVERS[ae] = new_upload


def install_stream_hook() -> None:
    """Make pynetdicom write received data sets to files (process-wide), into the spool for our associations."""
    _config.STORE_RECV_CHUNKED_DATASET = True
    dimse_messages.NamedTemporaryFile = _spool_temporary_file
