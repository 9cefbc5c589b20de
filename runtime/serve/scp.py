"""The node's Storage SCP (pynetdicom): C-ECHO, and C-STORE of every storage SOP class into the spool.

The C-STORE handler answers success only once the instance is durably in the spool and recorded in the queue;
it does no model work (that would hold up the C-STORE-RSP, see the reference §3.3). Associations from calling
AE titles that are not configured, or to another called AE title, are rejected by pynetdicom at A-ASSOCIATE and
logged here with the reason.

**Transfer syntaxes.** Each storage SOP class is offered only the transfer syntaxes this installation can decode
(``runtime/dicom/codecs.py`` asks pydicom's decoders), so a sender that can convert is asked to, and one that
cannot gets its presentation context rejected at association time instead of a job that fails later.

**Streaming receive** (``upload.py``). Each incoming data set streams into ``incoming/.recv-<random>.tmp`` in the
spool, refused while it arrives once it exceeds ``max_instance_mb`` or free space falls under ``min_free_disk_mb``;
the handler checks it with pixel data left on disk (``received.py``), fsyncs it and renames it into place. Every
refusal or failure removes the temporary file; an upload cut off by the peer is removed when its connection closes.
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket
import sqlite3
import threading
from pathlib import Path
from typing import Any

from pynetdicom import AE, AllStoragePresentationContexts, evt
from pynetdicom.sop_class import Verification

from ..dicom import codecs
from .jobqueue import JobQueue
from .options import ServeOptions
from .received import (
    STATUS_CANNOT_UNDERSTAND,
    STATUS_MISMATCH,
    STATUS_OUT_OF_RESOURCES,
    STATUS_SUCCESS,
    InstanceError,
    ReceivedInstance,
    inspect_instance,
)
from .scp_log import log_arrival, log_refused, log_rejection, log_store_failed, peer_of
from .spool import Spool, fsync_dir
from .upload import MB, Upload, register_receiver

__all__ = [
    "MAXIMUM_PDU_SIZE",
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

#: The largest PDU the node receives (bytes): memory per upload is a few times this, whatever the instance size.
MAXIMUM_PDU_SIZE = 1 << 20


def set_tcp_nodelay(assoc: Any) -> None:
    """Turn Nagle off on an association's socket (else 40 ms delayed-ACK stalls per PDU, reference §2)."""
    sock = getattr(getattr(assoc.dul, "socket", None), "socket", None)
    if sock is not None and sock.family in (socket.AF_INET, socket.AF_INET6):
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


class StorageSCP:
    """The node's listener: builds the AE, answers C-ECHO and C-STORE, writes into the spool.

    Creating one switches pynetdicom, for the whole process, to receiving C-STORE data sets into files
    (``_config.STORE_RECV_CHUNKED_DATASET``); other pynetdicom SCPs in the process then get ``event.dataset``
    from a temporary file as pynetdicom documents it.

    Args:
        options: the node configuration (AE title, bind address, port, allowed calling AE titles, timeouts,
            limits, file mode).
        spool: the spool directory (created).
        queue: the job queue of that spool.
    """

    def __init__(self, options: ServeOptions, spool: Spool, queue: JobQueue) -> None:
        self.options = options
        self.spool = spool
        self.queue = queue
        self._server: Any = None
        self.transfer_syntaxes = codecs.decodable_transfer_syntaxes()
        self.ae = self._build_ae()
        self._tally: dict[int, dict[str, int]] = {}  # per association: stored / refused / failed
        self._tally_lock = threading.Lock()
        self._uploads: set[Upload] = set()  # being received, not yet taken by the handler
        self._uploads_lock = threading.Lock()
        self._incoming_lock = getattr(spool, "incoming_lock", None) or threading.Lock()
        register_receiver(self.ae, self._new_upload)

    def _build_ae(self) -> AE:
        ae = AE(ae_title=self.options.ae_title)
        for cx in AllStoragePresentationContexts:
            ae.add_supported_context(cx.abstract_syntax, list(self.transfer_syntaxes))
        ae.add_supported_context(Verification)
        ae.require_called_aet = True
        ae.require_calling_aet = list(self.options.allowed_calling_aets)
        ae.maximum_pdu_size = MAXIMUM_PDU_SIZE
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
            (evt.EVT_CONN_CLOSE, self._on_conn_close),
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
                "transfer_syntaxes": list(self.transfer_syntaxes),
            },
        )

    def stop(self) -> None:
        """Stop listening and close the open associations."""
        if self._server is not None:
            self._server.shutdown()
            self._server = None
            logger.info("stopped listening", extra={"event": "scp_stopped"})
        with self._uploads_lock:
            left, self._uploads = list(self._uploads), set()
        for upload in left:
            upload.remove()

    # -- uploads (pynetdicom's DUL threads) ------------------------------------------------------------------

    def _make_upload(self, assoc: Any) -> Upload:
        o = self.options
        return Upload(
            self.spool.incoming,
            o.file_mode,
            max_bytes=int(o.max_instance_mb * MB),
            floor_bytes=int(o.min_free_disk_mb * MB),
            assoc_id=id(assoc),
        )

    def _new_upload(self, assoc: Any) -> Upload:
        """A new upload for an association, known until its handler takes it (or its connection closes)."""
        upload = self._make_upload(assoc)
        with self._uploads_lock:
            self._uploads.add(upload)
        return upload

    def _claim(self, event: Any) -> Upload | None:
        """The upload of a C-STORE request, taken by its handler (None if pynetdicom did not stream it here)."""
        upload = getattr(event.request, "_dataset_file", None)
        if not isinstance(upload, Upload):
            return None
        with self._uploads_lock:
            self._uploads.discard(upload)
            upload.claimed = True
        return upload

    def _on_conn_close(self, event: Any) -> None:
        """Remove what an association left half-received (the peer aborted or vanished mid-instance)."""
        with self._uploads_lock:
            left = [u for u in self._uploads if u.assoc_id == id(event.assoc) and not u.claimed]
            self._uploads.difference_update(left)
        for upload in left:
            upload.remove()
        if left:
            logger.warning(
                "connection closed in the middle of %d instance(s): removed",
                len(left),
                extra={"event": "upload_cut", "peer": peer_of(event), "instances": len(left)},
            )

    # -- handlers (run on pynetdicom's association threads) --------------------------------------------------

    def _on_conn_open(self, event: Any) -> None:
        set_tcp_nodelay(event.assoc)

    def _on_accepted(self, event: Any) -> None:
        logger.info("association accepted", extra={"event": "association_accepted", "peer": peer_of(event)})

    def _on_rejected(self, event: Any) -> None:
        log_rejection(event, self.options.ae_title, self.options.maximum_associations)

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
            extra={"event": "association_aborted", "peer": peer_of(event), **self._pop_tally(event)},
        )

    def _on_released(self, event: Any) -> None:
        tally = self._pop_tally(event)
        logger.info(
            "association released: %d stored, %d refused, %d failed",
            tally["stored"],
            tally["refused"],
            tally["failed"],
            extra={"event": "association_released", "peer": peer_of(event), **tally},
        )

    def _on_echo(self, event: Any) -> int:
        logger.info("C-ECHO", extra={"event": "echo", "peer": peer_of(event)})
        return STATUS_SUCCESS

    def _on_store(self, event: Any) -> int:
        peer = peer_of(event)
        upload = self._claim(event)
        try:
            if upload is None:
                upload = self._adopt(event)
            return self._store(event, upload, peer)
        except Exception as exc:  # the handler must answer whatever happens; pynetdicom would answer 0xC211
            logger.exception("C-STORE failed", extra={"event": "store_failed", "peer": peer, "reason": str(exc)})
            self._count(event, "failed")
            return STATUS_OUT_OF_RESOURCES
        finally:
            if upload is not None:
                upload.remove()  # nothing left when it was renamed into place

    def _adopt(self, event: Any) -> Upload:
        """An upload made from a data set pynetdicom received elsewhere (its own temporary file, or memory): the
        hook that streams into the spool did not apply."""
        upload = self._make_upload(event.assoc)
        upload.claimed = True
        try:
            path = event.dataset_path
        except AttributeError:
            path = None
        if path is not None and Path(path).is_file():
            with open(path, "rb") as fh:
                while chunk := fh.read(MB):
                    upload.write(chunk)
        else:
            upload.write(event.encoded_dataset())
        return upload

    def _store(self, event: Any, upload: Upload, peer: str) -> int:
        """Check the received upload and move it into the spool; the status to answer (logged and counted)."""
        request = event.request
        if upload.error is not None:
            return self._failed(event, peer, upload.error, None)
        if upload.refusal == "too_large":
            limit = self.options.max_instance_mb
            return self._refuse_limit(event, peer, f"instance over max_instance_mb ({limit:g} MB)", upload.size, None)
        if upload.refusal == "disk_floor":
            return self._refuse_floor(event, peer, upload)
        try:
            inst = inspect_instance(upload.path, str(request.AffectedSOPClassUID), str(request.AffectedSOPInstanceUID))
        except InstanceError as exc:
            return self._refuse(event, peer, exc.status, str(exc))
        path = self.spool.instance_path(inst.study_uid, inst.sop_instance_uid)
        try:
            upload.sync()
        except OSError as exc:
            return self._failed(event, peer, exc, inst)
        upload.close()
        with self._incoming_lock:
            refused = self._check_study_limit(event, peer, inst, path, upload.size)
            if refused is not None:
                return refused
            try:
                self._publish(upload.path, path)
            except OSError as exc:
                return self._failed(event, peer, exc, inst)
            outcome = self._record_in_queue(event, path, inst, peer, upload.size)
        if outcome is None:
            return STATUS_OUT_OF_RESOURCES
        log_arrival(outcome, inst, peer)
        self._count(event, "stored")
        return STATUS_SUCCESS

    def _check_study_limit(self, event: Any, peer: str, inst: ReceivedInstance, path: Path, size: int) -> int | None:
        """The refusal status when the instance would take its study over max_study_mb, else None."""
        limit = self.options.max_study_mb
        try:
            held = self.queue.study_bytes(inst.study_uid)
        except sqlite3.Error as exc:
            return self._failed(event, peer, exc, inst)
        with contextlib.suppress(OSError):
            held -= path.stat().st_size  # a resent instance replaces its earlier copy
        if held + size > limit * MB:
            return self._refuse_limit(
                event,
                peer,
                f"study over max_study_mb ({limit:g} MB): it holds {held} bytes, the instance has {size}",
                size,
                inst,
                limit_name="max_study_mb",
            )
        return None

    def _publish(self, tmp: Path, path: Path) -> None:
        """Rename the synced upload to its place in the spool and make the rename durable."""
        folder = path.parent
        if not folder.is_dir():
            folder.mkdir(parents=True, exist_ok=True)
            fsync_dir(folder.parent)
        os.replace(tmp, path)
        fsync_dir(folder)

    # -- refusals and failures (logged and counted) -----------------------------------------------------------

    def _refuse(self, event: Any, peer: str, status: int, reason: str, **fields: Any) -> int:
        log_refused(status, reason, peer, **fields)
        self._count(event, "refused")
        return status

    def _refuse_limit(
        self,
        event: Any,
        peer: str,
        reason: str,
        size: int,
        inst: ReceivedInstance | None,
        limit_name: str = "max_instance_mb",
    ) -> int:
        ids = {"study_uid": inst.study_uid, "sop_instance_uid": inst.sop_instance_uid} if inst is not None else {}
        return self._refuse(
            event,
            peer,
            STATUS_OUT_OF_RESOURCES,
            reason,
            limit=limit_name,
            limit_mb=getattr(self.options, limit_name),
            size_bytes=size,
            **ids,
        )

    def _refuse_floor(self, event: Any, peer: str, upload: Upload) -> int:
        free_mb = round((upload.free_bytes or 0) / MB, 1)
        floor = self.options.min_free_disk_mb
        return self._refuse(
            event,
            peer,
            STATUS_OUT_OF_RESOURCES,
            f"{free_mb:g} MB free on the spool's disk, under min_free_disk_mb ({floor:g} MB)",
            disk_floor=True,
            limit="min_free_disk_mb",
            limit_mb=floor,
            free_mb=free_mb,
        )

    def _failed(self, event: Any, peer: str, exc: Exception, inst: ReceivedInstance | None) -> int:
        """A failure to write the spool or the queue: 0xA700, logged as ``store_failed``."""
        log_store_failed(exc, peer, inst)
        self._count(event, "failed")
        return STATUS_OUT_OF_RESOURCES

    def _record_in_queue(self, event: Any, path: Path, inst: ReceivedInstance, peer: str, size: int) -> str | None:
        """Record the spooled instance in the job queue: how it arrived (``new``, ``duplicate``, ``late``,
        ``ignored``), or None when the queue write failed (logged and counted)."""
        try:
            return self.queue.record_instance(
                study_uid=inst.study_uid,
                series_uid=inst.series_uid,
                sop_instance_uid=inst.sop_instance_uid,
                sop_class_uid=inst.sop_class_uid,
                modality=inst.modality,
                path=str(path.relative_to(self.spool.root)),
                calling_aet=event.assoc.requestor.ae_title,
                size_bytes=size,
            )
        except sqlite3.Error as exc:
            # The file is in the spool; the start-up scan records it if this process stops before a resend.
            self._failed(event, peer, exc, inst)
            return None
