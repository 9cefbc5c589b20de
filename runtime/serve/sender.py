"""The node's C-STORE SCU: sends a job's files to the destination and says whether the destination confirmed them."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path

import pydicom
from pynetdicom import AE
from pynetdicom.sop_class import Verification

from .options import Destination
from .scp import set_tcp_nodelay

__all__ = ["SUCCESS_STATUSES", "SendError", "SendResult", "echo", "send_file", "send_files"]

logger = logging.getLogger("diffseg")

#: Storage statuses that mean "stored": success, and the three warnings of PS3.4 Table B.2-1 (coercion,
#: elements discarded, data set does not match SOP class), which still leave the instance in the PACS.
SUCCESS_STATUSES = frozenset({0x0000, 0xB000, 0xB006, 0xB007})


class SendError(RuntimeError):
    """The destination was not reached, refused the association, or answered a failure status."""


@dataclass(frozen=True)
class SendResult:
    """A confirmed C-STORE.

    Attributes:
        status: the DIMSE status the destination answered (one of ``SUCCESS_STATUSES``).
        seconds: association + transfer time.
    """

    status: int
    seconds: float


def _associate(ae: AE, destination: Destination):
    assoc = ae.associate(destination.host, destination.port, ae_title=destination.ae_title)
    if not assoc.is_established:
        # pynetdicom reports a refused TCP connection as an abort too
        why = "rejected" if assoc.is_rejected else "not reachable or aborted"
        raise SendError(f"association with {destination} {why}")
    set_tcp_nodelay(assoc)
    return assoc


def _make_ae(calling_aet: str, timeout: float) -> AE:
    ae = AE(ae_title=calling_aet)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = timeout
    ae.maximum_pdu_size = 0
    return ae


def send_file(path: str | Path, destination: Destination, calling_aet: str, timeout: float = 30.0) -> SendResult:
    """C-STORE one DICOM file to ``destination``; see :func:`send_files`."""
    return send_files([path], destination, calling_aet, timeout)


def send_files(
    paths: list[str | Path], destination: Destination, calling_aet: str, timeout: float = 30.0
) -> SendResult:
    """C-STORE DICOM files to ``destination`` in one association; every one must be confirmed.

    Args:
        paths: the files (DICOM file format, with file meta), sent in this order.
        destination: the Storage SCP.
        calling_aet: our AE title.
        timeout: ACSE, DIMSE and network timeout in seconds.

    Returns:
        The last confirmed status and the time taken.

    Raises:
        FileNotFoundError: a file does not exist.
        ValueError: no files.
        SendError: not reached, association refused, a presentation context not accepted, no answer, or a failure
            status (the file and status named in the message).
    """
    if not paths:
        raise ValueError("send_files needs at least one file")
    files = [Path(p) for p in paths]
    for path in files:
        if not path.is_file():
            raise FileNotFoundError(f"file to send {path} does not exist")
    datasets = [pydicom.dcmread(path) for path in files]
    start = time.perf_counter()
    ae = _make_ae(calling_aet, timeout)
    for context in {(str(ds.SOPClassUID), str(ds.file_meta.TransferSyntaxUID)) for ds in datasets}:
        ae.add_requested_context(*context)
    assoc = _associate(ae, destination)
    status = 0
    try:
        for path, ds in zip(files, datasets, strict=True):
            try:
                rsp = assoc.send_c_store(ds)
            except ValueError as exc:  # pynetdicom: no accepted presentation context for this SOP class
                raise SendError(f"{destination} did not accept {path.name}: {exc}") from None
            got = getattr(rsp, "Status", None)
            if got is None:
                raise SendError(f"no C-STORE response from {destination} for {path.name} (timeout or abort)")
            if int(got) not in SUCCESS_STATUSES:
                raise SendError(f"{destination} answered C-STORE status 0x{int(got):04X} for {path.name}")
            status = int(got)
    finally:
        if assoc.is_established:
            assoc.release()
    return SendResult(status=status, seconds=time.perf_counter() - start)


def echo(destination: Destination, calling_aet: str, timeout: float = 10.0) -> int:
    """C-ECHO ``destination``; return its status (0 on success).

    Raises:
        SendError: not reached, association refused, or no answer.
    """
    ae = _make_ae(calling_aet, timeout)
    ae.add_requested_context(Verification)
    assoc = _associate(ae, destination)
    try:
        rsp = assoc.send_c_echo()
    finally:
        if assoc.is_established:
            assoc.release()
    status = getattr(rsp, "Status", None)
    if status is None:
        raise SendError(f"no C-ECHO response from {destination}")
    return int(status)
