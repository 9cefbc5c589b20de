"""The node's Storage SCP (pynetdicom): C-ECHO, and C-STORE of every storage SOP class into the spool.

The C-STORE handler answers success only once the instance is durably in the spool and recorded in the queue;
it does no model work (that would hold up the C-STORE-RSP, see the reference §3.3). Associations from calling
AE titles that are not configured are rejected by pynetdicom at A-ASSOCIATE and logged here.

Status codes answered (PS3.4 Table B.2-1): ``0x0000`` stored; ``0xA700`` refused, out of resources (disk full
or any other failure to write the spool or the queue); ``0xA900`` data set does not match the SOP class of the
request; ``0xC000`` cannot understand (unreadable, truncated or non-DICOM data, or UIDs that break the
grammar).
"""

from __future__ import annotations

import errno
import io
import logging
import socket
import sqlite3
import threading
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pydicom
from pydicom.uid import UID
from pynetdicom import AE, ALL_TRANSFER_SYNTAXES, AllStoragePresentationContexts, evt
from pynetdicom.sop_class import Verification

from .jobqueue import JobQueue
from .options import ServeOptions
from .spool import Spool, check_uid, write_durable

__all__ = [
    "STATUS_CANNOT_UNDERSTAND",
    "STATUS_MISMATCH",
    "STATUS_OUT_OF_RESOURCES",
    "STATUS_SUCCESS",
    "InstanceError",
    "ReceivedInstance",
    "StorageSCP",
    "inspect_instance",
    "set_tcp_nodelay",
]

logger = logging.getLogger("diffseg")

STATUS_SUCCESS = 0x0000
STATUS_OUT_OF_RESOURCES = 0xA700
STATUS_MISMATCH = 0xA900
STATUS_CANNOT_UNDERSTAND = 0xC000


class InstanceError(ValueError):
    """A received data set that cannot be stored; ``status`` is the C-STORE status to answer."""

    def __init__(self, message: str, status: int = STATUS_CANNOT_UNDERSTAND) -> None:
        super().__init__(message)
        self.status = status


@dataclass(frozen=True)
class ReceivedInstance:
    """The identifying attributes of a received instance, all UIDs checked.

    Attributes:
        study_uid, series_uid, sop_instance_uid, sop_class_uid: the UIDs.
        modality: the Modality attribute (None if absent).
    """

    study_uid: str
    series_uid: str
    sop_instance_uid: str
    sop_class_uid: str
    modality: str | None


def _expected_native_bytes(ds: pydicom.Dataset) -> int:
    frames = int(ds.get("NumberOfFrames", 1) or 1)
    bits = int(ds.BitsAllocated)
    pixels = int(ds.Rows) * int(ds.Columns) * int(ds.get("SamplesPerPixel", 1)) * frames
    return (pixels * bits + 7) // 8


def inspect_instance(data: bytes, sop_class_uid: str, sop_instance_uid: str) -> ReceivedInstance:
    """Decode a received data set completely and check what the node relies on.

    Checks: every element decodes; Study/Series/SOP Instance/SOP Class UIDs are present and follow the UID
    grammar; SOP Class and SOP Instance UIDs equal those of the C-STORE request; native (uncompressed) pixel
    data is as long as Rows × Columns × samples × frames × bits allocated say.

    Args:
        data: the data set in the DICOM file format (preamble, file meta, data set), as pynetdicom gives it.
        sop_class_uid: Affected SOP Class UID of the request.
        sop_instance_uid: Affected SOP Instance UID of the request.

    Returns:
        The instance's identifying attributes.

    Raises:
        InstanceError: with the status to answer and the reason.
    """
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            ds = pydicom.dcmread(io.BytesIO(data))
            for elem in ds.iterall():
                _ = elem.value
    except Exception as exc:  # pydicom raises many types on corrupt input; all mean "cannot understand"
        raise InstanceError(f"data set does not decode: {type(exc).__name__}: {exc}") from None
    values: dict[str, str] = {}
    for keyword in ("StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID", "SOPClassUID"):
        if keyword not in ds:
            raise InstanceError(f"data set has no {keyword}")
        try:
            values[keyword] = check_uid(keyword, str(ds[keyword].value))
        except ValueError as exc:
            raise InstanceError(str(exc)) from None
    if values["SOPInstanceUID"] != sop_instance_uid:
        raise InstanceError(
            f"SOPInstanceUID {values['SOPInstanceUID']} differs from the request's {sop_instance_uid}",
            STATUS_MISMATCH,
        )
    if values["SOPClassUID"] != sop_class_uid:
        raise InstanceError(
            f"SOPClassUID {values['SOPClassUID']} differs from the request's {sop_class_uid}", STATUS_MISMATCH
        )
    if "PixelData" in ds and not UID(ds.file_meta.TransferSyntaxUID).is_compressed:
        try:
            expected = _expected_native_bytes(ds)
        except (AttributeError, KeyError, TypeError, ValueError) as exc:
            raise InstanceError(f"pixel data without a usable image description: {exc}") from None
        got = len(ds.PixelData)
        if got < expected:
            raise InstanceError(f"pixel data truncated: {got} bytes, expected {expected}")
    modality = ds.get("Modality")
    return ReceivedInstance(
        study_uid=values["StudyInstanceUID"],
        series_uid=values["SeriesInstanceUID"],
        sop_instance_uid=values["SOPInstanceUID"],
        sop_class_uid=values["SOPClassUID"],
        modality=str(modality) if modality else None,
    )


def set_tcp_nodelay(assoc: Any) -> None:
    """Turn Nagle off on an association's socket (else 40 ms delayed-ACK stalls per PDU, reference §2)."""
    sock = getattr(getattr(assoc.dul, "socket", None), "socket", None)
    if sock is not None and sock.family in (socket.AF_INET, socket.AF_INET6):
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


def _peer(event: Any) -> str:
    req = event.assoc.requestor
    return f"{req.ae_title}@{req.address}:{req.port}"


class StorageSCP:
    """The node's listener: builds the AE, answers C-ECHO and C-STORE, writes into the spool.

    Args:
        options: the node configuration (AE title, bind address, port, allowed calling AE titles, timeouts).
        spool: the spool directory (created).
        queue: the job queue of that spool.
    """

    def __init__(self, options: ServeOptions, spool: Spool, queue: JobQueue) -> None:
        self.options = options
        self.spool = spool
        self.queue = queue
        self._server: Any = None
        self.ae = self._build_ae()
        self._tally: dict[int, dict[str, int]] = {}  # per association: stored / refused / failed
        self._tally_lock = threading.Lock()

    def _build_ae(self) -> AE:
        ae = AE(ae_title=self.options.ae_title)
        for cx in AllStoragePresentationContexts:
            ae.add_supported_context(cx.abstract_syntax, ALL_TRANSFER_SYNTAXES)
        ae.add_supported_context(Verification)
        ae.require_called_aet = True
        ae.require_calling_aet = list(self.options.allowed_calling_aets)
        ae.maximum_pdu_size = 0
        ae.maximum_associations = self.options.maximum_associations
        ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = self.options.network_timeout
        return ae

    @property
    def port(self) -> int:
        """The port listened on (useful when configured as 0 in tests)."""
        return self._server.server_address[1] if self._server is not None else self.options.port

    def start(self) -> None:
        """Start listening (non-blocking)."""
        handlers = [
            (evt.EVT_CONN_OPEN, self._on_conn_open),
            (evt.EVT_ACCEPTED, self._on_accepted),
            (evt.EVT_REJECTED, self._on_rejected),
            (evt.EVT_ABORTED, self._on_aborted),
            (evt.EVT_RELEASED, self._on_released),
            (evt.EVT_C_ECHO, self._on_echo),
            (evt.EVT_C_STORE, self._on_store),
        ]
        self._server = self.ae.start_server((self.options.bind, self.options.port), block=False, evt_handlers=handlers)
        logger.info(
            "listening",
            extra={
                "event": "listening",
                "ae_title": self.options.ae_title,
                "bind": self.options.bind,
                "port": self.port,
                "allowed_calling_aets": list(self.options.allowed_calling_aets),
            },
        )

    def stop(self) -> None:
        """Stop listening and close the open associations."""
        if self._server is not None:
            self._server.shutdown()
            self._server = None
            logger.info("stopped listening", extra={"event": "scp_stopped"})

    # -- handlers (run on pynetdicom's association threads) --------------------------------------------------

    def _on_conn_open(self, event: Any) -> None:
        set_tcp_nodelay(event.assoc)

    def _on_accepted(self, event: Any) -> None:
        logger.info("association accepted", extra={"event": "association_accepted", "peer": _peer(event)})

    def _on_rejected(self, event: Any) -> None:
        calling = event.assoc.requestor.ae_title
        logger.warning(
            "association rejected: calling AE title %r is not in allowed_calling_aets",
            calling,
            extra={"event": "association_rejected", "calling_aet": calling, "peer": _peer(event)},
        )

    def _count(self, event: Any, outcome: str) -> None:
        with self._tally_lock:
            tally = self._tally.setdefault(id(event.assoc), {"stored": 0, "refused": 0, "failed": 0})
            tally[outcome] += 1

    def _pop_tally(self, event: Any) -> dict[str, int]:
        with self._tally_lock:
            return self._tally.pop(id(event.assoc), {"stored": 0, "refused": 0, "failed": 0})

    def _on_aborted(self, event: Any) -> None:
        logger.warning(
            "association aborted",
            extra={"event": "association_aborted", "peer": _peer(event), **self._pop_tally(event)},
        )

    def _on_released(self, event: Any) -> None:
        tally = self._pop_tally(event)
        logger.info(
            "association released: %d stored, %d refused, %d failed",
            tally["stored"],
            tally["refused"],
            tally["failed"],
            extra={"event": "association_released", "peer": _peer(event), **tally},
        )

    def _on_echo(self, event: Any) -> int:
        logger.info("C-ECHO", extra={"event": "echo", "peer": _peer(event)})
        return STATUS_SUCCESS

    def _on_store(self, event: Any) -> int:
        peer = _peer(event)
        received = self._receive(event, peer)
        if isinstance(received, int):  # refused (logged and counted): the status to answer
            return received
        data, inst = received
        path = self.spool.instance_path(inst.study_uid, inst.sop_instance_uid)
        if not self._write_to_spool(event, path, data, inst, peer):
            return STATUS_OUT_OF_RESOURCES
        late = self._record_in_queue(event, path, inst, peer)
        if late is None:
            return STATUS_OUT_OF_RESOURCES
        level = logging.WARNING if late else logging.DEBUG
        if logger.isEnabledFor(level):
            logger.log(
                level,
                "late instance: its study's job has started; kept in the spool, not segmented" if late else "stored",
                extra={
                    "event": "late_instance" if late else "stored",
                    "study_uid": inst.study_uid,
                    "sop_instance_uid": inst.sop_instance_uid,
                    "modality": inst.modality,
                    "peer": peer,
                },
            )
        self._count(event, "stored")
        return STATUS_SUCCESS

    def _receive(self, event: Any, peer: str) -> tuple[bytes, ReceivedInstance] | int:
        """The received data set and its checked identity, or the status of a refusal (logged and counted)."""
        request = event.request
        req_class = str(request.AffectedSOPClassUID)
        req_instance = str(request.AffectedSOPInstanceUID)
        try:
            data = event.encoded_dataset()
            inst = inspect_instance(data, req_class, req_instance)
        except InstanceError as exc:
            logger.warning(
                "C-STORE refused: %s",
                exc,
                extra={
                    "event": "store_refused",
                    "status": f"0x{exc.status:04X}",
                    "peer": peer,
                    "reason": str(exc),
                },
            )
            self._count(event, "refused")
            return exc.status
        except Exception as exc:  # the handler must answer whatever happens; pynetdicom would answer 0xC211
            logger.exception("C-STORE refused", extra={"event": "store_refused", "peer": peer, "reason": str(exc)})
            self._count(event, "refused")
            return STATUS_CANNOT_UNDERSTAND
        return data, inst

    def _write_to_spool(self, event: Any, path: Path, data: bytes, inst: ReceivedInstance, peer: str) -> bool:
        """Write the instance durably into the spool; False when that failed (logged and counted)."""
        try:
            write_durable(path, data)
        except OSError as exc:
            full = exc.errno in (errno.ENOSPC, errno.EDQUOT)
            logger.error(
                "C-STORE failed: %s writing the spool: %s",
                "disk full" if full else "error",
                exc,
                extra={
                    "event": "store_failed",
                    "status": f"0x{STATUS_OUT_OF_RESOURCES:04X}",
                    "errno": errno.errorcode.get(exc.errno or 0, str(exc.errno)),
                    "disk_full": full,
                    "study_uid": inst.study_uid,
                    "sop_instance_uid": inst.sop_instance_uid,
                    "peer": peer,
                },
            )
            self._count(event, "failed")
            return False
        return True

    def _record_in_queue(self, event: Any, path: Path, inst: ReceivedInstance, peer: str) -> bool | None:
        """Record the spooled instance in the job queue: whether it came late (its study's job has started), or
        None when the queue write failed (logged and counted)."""
        try:
            return self.queue.record_instance(
                study_uid=inst.study_uid,
                series_uid=inst.series_uid,
                sop_instance_uid=inst.sop_instance_uid,
                sop_class_uid=inst.sop_class_uid,
                modality=inst.modality,
                path=str(path.relative_to(self.spool.root)),
                calling_aet=event.assoc.requestor.ae_title,
            )
        except sqlite3.Error as exc:
            # The file is in the spool; the start-up scan records it if this process stops before a resend.
            logger.error(
                "C-STORE failed: job queue write: %s",
                exc,
                extra={
                    "event": "store_failed",
                    "status": f"0x{STATUS_OUT_OF_RESOURCES:04X}",
                    "disk_full": "full" in str(exc),
                    "study_uid": inst.study_uid,
                    "sop_instance_uid": inst.sop_instance_uid,
                    "peer": peer,
                },
            )
            self._count(event, "failed")
            return None
