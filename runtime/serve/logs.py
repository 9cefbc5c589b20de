"""Structured logs of the node: one JSON object per line, to a file in the spool and to stderr.

The file is rotated by size (``serve.log`` → ``serve.log.1`` → ... up to the number of backups kept; the oldest
is deleted), with the permission bits of the node's ``file_mode`` (else 0o666 less the umask). Every record
carries ``time`` (UTC, ISO 8601), ``level``, ``logger``, ``message``, ``module`` and ``thread``;
the fields passed in ``extra=`` (``event``, ``job``, ``study_uid``, ``status``...) become keys of the same
object.
"""

from __future__ import annotations

import datetime as _dt
import json
import logging
import logging.handlers
import os
import sys
from pathlib import Path
from typing import IO, Any

__all__ = ["JsonFormatter", "RotatingLogFile", "configure_logging", "remove_handlers"]

# The loggers whose records the node writes (the libraries' at WARNING and above).
_LOGGERS = ("diffseg", "pynetdicom", "pydicom")

# Attributes every LogRecord has; anything else on a record came from ``extra=``.
_STANDARD = set(logging.LogRecord("", 0, "", 0, "", None, None).__dict__) | {"message", "asctime", "taskName"}


class JsonFormatter(logging.Formatter):
    """Format a record as one line of JSON (non-JSON values are written with ``str``)."""

    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, Any] = {
            "time": _dt.datetime.fromtimestamp(record.created, _dt.UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
            "module": record.module,
            "thread": record.threadName,
        }
        for key, value in record.__dict__.items():
            if key not in _STANDARD and not key.startswith("_"):
                out[key] = value
        if record.exc_info:
            out["exception"] = self.formatException(record.exc_info)
        return json.dumps(out, default=str, ensure_ascii=False)


def _only_warnings_from_libraries(record: logging.LogRecord) -> bool:
    return record.name.partition(".")[0] == "diffseg" or record.levelno >= logging.WARNING


class RotatingLogFile(logging.handlers.RotatingFileHandler):
    """A size-rotated log file whose every new file gets ``mode`` (None: 0o666 less the umask, as ``open``).

    Args:
        path: the log file.
        max_bytes: rotate before a record would take the file past this size; 0 never rotates.
        backups: rotated files kept (``path.1`` is the newest).
        mode: permission bits of each log file, set exactly.
    """

    def __init__(self, path: str | Path, max_bytes: int, backups: int, mode: int | None = None) -> None:
        self._mode = mode  # before super(): it opens the file
        super().__init__(path, maxBytes=max_bytes, backupCount=backups, encoding="utf-8")

    def _open(self) -> IO[str]:
        stream = super()._open()
        if self._mode is not None:
            os.fchmod(stream.fileno(), self._mode)
        return stream


def configure_logging(
    log_file: str | Path,
    level: int = logging.INFO,
    stream: IO[str] | None = None,
    *,
    max_mb: float = 100.0,
    backups: int = 5,
    file_mode: int | None = None,
) -> list[logging.Handler]:
    """Send log records, as JSON lines, to ``log_file`` (appended, rotated by size) and ``stream``.

    Records of the ``diffseg`` logger from ``level`` up, and of pynetdicom's and pydicom's from WARNING up
    (pynetdicom's INFO is one line per PDU), so that every line the node writes is JSON. These loggers stop
    propagating to the root logger so that each record is written once.

    Args:
        log_file: the log file (its folder must exist).
        level: the lowest level written for ``diffseg``.
        stream: second destination (default ``sys.stderr``).
        max_mb: rotate the file at this size (MB of 2^20 bytes; the node's ``log_max_mb``); 0 never rotates.
        backups: rotated files kept, ``log_file.1`` (newest) to ``log_file.<backups>`` (the node's
            ``log_backups``).
        file_mode: permission bits of the log files (the node's ``file_mode``); None: 0o666 less the umask.

    Returns:
        The handlers added (pass them to :func:`remove_handlers`).

    Raises:
        ValueError: ``max_mb`` < 0 or ``backups`` < 1.
    """
    if isinstance(max_mb, bool) or not isinstance(max_mb, int | float) or not max_mb >= 0:
        raise ValueError(f"max_mb must be a number >= 0, got {max_mb!r}")
    if isinstance(backups, bool) or not isinstance(backups, int) or backups < 1:
        raise ValueError(f"backups must be an integer >= 1, got {backups!r}")
    formatter = JsonFormatter()
    handlers: list[logging.Handler] = [
        RotatingLogFile(log_file, int(max_mb * (1 << 20)), backups, file_mode),
        logging.StreamHandler(stream if stream is not None else sys.stderr),
    ]
    for handler in handlers:
        handler.setFormatter(formatter)
        handler.setLevel(level)
        handler.addFilter(_only_warnings_from_libraries)
    for name in _LOGGERS:
        logger = logging.getLogger(name)
        for handler in handlers:
            logger.addHandler(handler)
        logger.propagate = False
    logging.getLogger("diffseg").setLevel(level)
    return handlers


def remove_handlers(handlers: list[logging.Handler]) -> None:
    """Detach and close handlers added by :func:`configure_logging`; the loggers propagate again."""
    for name in _LOGGERS:
        logger = logging.getLogger(name)
        for handler in handlers:
            logger.removeHandler(handler)
        logger.propagate = True
    logging.getLogger("diffseg").setLevel(logging.NOTSET)
    for handler in handlers:
        handler.close()
