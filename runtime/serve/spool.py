"""The spool directory: where every received instance lands, durably, before the sender hears "success".

Layout (no path is built from a DICOM value; every name is a hash of a UID checked against the grammar)::

    SPOOL/incoming/<study key>/<instance key>.dcm   received instances, as sent (DICOM file format)
    SPOOL/results/<study key>/v<version>/seg.dcm    a job's outputs (seg.dcm, rtstruct.dcm...), written before
                                                    they are sent
    SPOOL/queue.sqlite                              the job queue (see jobqueue.py)
    SPOOL/serve.log                                 structured log, one JSON object per line
    SPOOL/serve.lock                                held (flock) by the running node

A write is a temporary file in the target folder, ``fsync``, ``rename`` over the target, then ``fsync`` of the
folder, so that after a power cut the instance is either wholly there or not there at all.
"""

from __future__ import annotations

import fcntl
import hashlib
import os
import re
import shutil
import threading
from pathlib import Path

from ..atomic import fsync_dir, write_bytes_atomic

__all__ = [
    "Spool",
    "SpoolLockedError",
    "check_uid",
    "fsync_dir",
    "is_valid_uid",
    "uid_key",
    "write_durable",
]

# PS3.5 9.1: components of digits separated by '.', no leading zero in a component of more than one digit,
# at most 64 characters.
_UID = re.compile(r"^(0|[1-9][0-9]*)(\.(0|[1-9][0-9]*))*$")


def is_valid_uid(value: object) -> bool:
    """Whether ``value`` is a string that follows the DICOM UID grammar (PS3.5 9.1)."""
    return isinstance(value, str) and len(value) <= 64 and _UID.match(value) is not None


def check_uid(name: str, value: object) -> str:
    """Return ``value`` if it is a valid UID, else raise ``ValueError`` naming ``name`` and the value.

    Args:
        name: the attribute, e.g. ``"StudyInstanceUID"``.
        value: the candidate (trailing NUL or space padding is removed first).

    Raises:
        ValueError: not a UID by the PS3.5 9.1 grammar.
    """
    if isinstance(value, str):
        value = value.rstrip("\x00 ")
    if not is_valid_uid(value):
        shown = value if not isinstance(value, str) else value[:80]
        raise ValueError(f"{name} must be a DICOM UID (digits and dots, <= 64 characters), got {shown!r}")
    return value  # type: ignore[return-value]


def uid_key(uid: str) -> str:
    """The file-system name of a UID: 32 hex digits of its SHA-256 (the UID must be valid)."""
    return hashlib.sha256(check_uid("uid", uid).encode("ascii")).hexdigest()[:32]


def write_durable(path: Path, data: bytes, mode: int | None = None) -> Path:
    """Write ``data`` to ``path`` atomically and durably, with the one writer (``atomic.write_bytes_atomic``).

    Temporary file ``.<name>.<random>.tmp`` beside it (the umask applies), fsync, check of the size on disk (the
    data was parsed on receipt, so it is not parsed again), rename, fsync of the folder; a folder created on the way
    is made durable too (its parent is synced). On any error the temporary file is removed and the target is left
    as it was.

    Args:
        path: the target file.
        data: its whole content.
        mode: the file's permission bits (the node's ``file_mode``); None: 0o666 less the umask.

    Returns:
        ``path``.

    Raises:
        OSError: the write failed (``errno.ENOSPC`` when the disk is full); the message names ``path``.
    """
    return write_bytes_atomic(path, data, mode=mode, format_check=False)


class SpoolLockedError(RuntimeError):
    """Another node process holds the spool directory."""


class Spool:
    """Paths of one spool directory, and the lock that keeps a second node out of it.

    Args:
        root: the spool directory (created if missing).
    """

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)
        self.incoming = self.root / "incoming"
        self.results = self.root / "results"
        self.db_path = self.root / "queue.sqlite"
        self.log_path = self.root / "serve.log"
        self.lock_path = self.root / "serve.lock"
        self._lock_fd: int | None = None
        # Held by the SCP around "write an instance, record it" and by the purge around "delete a study": a
        # study is never deleted between an instance's write and its record.
        self.incoming_lock = threading.Lock()

    def create(self) -> Spool:
        """Create the folders (durably) and return ``self``.

        Raises:
            ValueError: ``root`` exists and is not a folder.
        """
        if self.root.exists() and not self.root.is_dir():
            raise ValueError(f"spool_dir {self.root} exists and is not a directory")
        for folder in (self.root, self.incoming, self.results):
            if not folder.is_dir():
                folder.mkdir(parents=True, exist_ok=True)
                fsync_dir(folder.parent)
        return self

    def lock(self) -> None:
        """Take the spool's lock for this process (released by the kernel if the process dies).

        Raises:
            SpoolLockedError: another process holds it.
        """
        fd = os.open(self.lock_path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 64, 0).decode("ascii", "replace").strip() or "unknown"
            os.close(fd)
            raise SpoolLockedError(f"spool_dir {self.root} is in use by another diffseg serve (pid {holder})") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        self._lock_fd = fd

    def unlock(self) -> None:
        """Release the lock taken by :meth:`lock` (no-op if not held)."""
        if self._lock_fd is not None:
            fcntl.flock(self._lock_fd, fcntl.LOCK_UN)
            os.close(self._lock_fd)
            self._lock_fd = None

    def study_dir(self, study_uid: str) -> Path:
        """Folder of a study's received instances."""
        return self.incoming / uid_key(study_uid)

    def instance_path(self, study_uid: str, sop_instance_uid: str) -> Path:
        """File of one received instance."""
        return self.study_dir(study_uid) / f"{uid_key(sop_instance_uid)}.dcm"

    def result_dir(self, study_uid: str, version: int) -> Path:
        """Folder of the outputs of one version (job) of a study."""
        if isinstance(version, bool) or not isinstance(version, int) or version < 1:
            raise ValueError(f"version must be an integer >= 1, got {version!r}")
        return self.results / uid_key(study_uid) / f"v{version}"

    def purge_study(self, study_uid: str) -> int:
        """Delete a study's received instances and outputs (the caller holds ``incoming_lock``); return the bytes
        freed."""
        freed = 0
        for folder in (self.study_dir(study_uid), self.results / uid_key(study_uid)):
            if folder.is_dir():
                freed += sum(f.stat().st_size for f in folder.rglob("*") if f.is_file())
                shutil.rmtree(folder)
                fsync_dir(folder.parent)
        return freed

    def remove_partial_writes(self) -> int:
        """Delete temporary files left by a crash in the middle of a write; return how many."""
        removed = 0
        for folder in (self.incoming, self.results):
            for tmp in folder.rglob(".*.tmp*"):  # ours end in .tmp; atomic_path's in .tmp<suffix>
                tmp.unlink(missing_ok=True)
                removed += 1
        return removed

    def instance_files(self) -> list[Path]:
        """Every received instance file, sorted."""
        return sorted(self.incoming.glob("*/*.dcm"))
