"""The Storage SCP's log lines: association rejections, how each instance arrived, refusals and failures.

One JSON object per line (``logs.py``); the fields named here are what ``docs/serve.md`` lists per event.
"""

from __future__ import annotations

import errno
import logging
import sqlite3
from typing import Any

from .received import STATUS_OUT_OF_RESOURCES, ReceivedInstance

__all__ = ["log_arrival", "log_refused", "log_rejection", "log_store_failed", "peer_of"]

logger = logging.getLogger("diffseg")

# A-ASSOCIATE-RJ (result source, diagnostic) → the reason logged (PS3.8 9.3.4).
_REJECT_REASONS = {
    (1, 2): "application_context",
    (1, 3): "calling_aet",
    (1, 7): "called_aet",
    (2, 1): "user_identity",
    (2, 2): "protocol_version",
    (3, 1): "temporary_congestion",
    (3, 2): "too_many_associations",
}


def peer_of(event: Any) -> str:
    req = event.assoc.requestor
    return f"{req.ae_title}@{req.address}:{req.port}"


def log_rejection(event: Any, node_aet: str, maximum_associations: int) -> None:
    """Log an A-ASSOCIATE-RJ the node sent, with the reason it was sent for."""
    requestor = event.assoc.requestor
    calling = str(requestor.ae_title).strip()
    called = str(getattr(requestor.primitive, "called_ae_title", "") or "").strip()
    rj = getattr(event.assoc.acceptor, "primitive", None)
    source, diagnostic = getattr(rj, "result_source", None), getattr(rj, "diagnostic", None)
    reason = _REJECT_REASONS.get((source, diagnostic), "other")
    if reason == "called_aet":
        message = f"called AE title {called!r} is not the node's {node_aet!r}"
    elif reason == "calling_aet":
        message = f"calling AE title {calling!r} is not in allowed_calling_aets"
    elif reason == "too_many_associations":
        message = f"maximum_associations ({maximum_associations}) are open"
    else:
        message = f"result source {source}, diagnostic {diagnostic}"
    logger.warning(
        "association rejected: %s",
        message,
        extra={
            "event": "association_rejected",
            "reason": reason,
            "called_aet": called,
            "calling_aet": calling,
            "peer": peer_of(event),
            "result": getattr(rj, "result", None),
            "source": source,
            "diagnostic": diagnostic,
        },
    )


def log_arrival(outcome: str, inst: ReceivedInstance, peer: str) -> None:
    """Log a stored instance by how it arrived (``JobQueue.record_instance``'s answer)."""
    messages = {
        "new": (logging.DEBUG, "stored", "stored"),
        "duplicate": (logging.INFO, "duplicate_instance", "duplicate instance: stored again over its copy"),
        "late": (
            logging.INFO,
            "late_instance",
            "late instance: it changes the study's inputs: it is segmented again once idle",
        ),
        "ignored": (
            logging.INFO,
            "ignored_instance",
            "instance after the study's job, of no input modality: recorded, ignored",
        ),
    }
    level, event_name, message = messages.get(outcome, (logging.INFO, "stored", f"stored ({outcome})"))
    if logger.isEnabledFor(level):
        logger.log(
            level,
            message,
            extra={
                "event": event_name,
                "study_uid": inst.study_uid,
                "sop_instance_uid": inst.sop_instance_uid,
                "modality": inst.modality,
                "peer": peer,
            },
        )


def log_refused(status: int, reason: str, peer: str, **fields: Any) -> None:
    """Log a refused C-STORE (``store_refused``) with its status, reason and fields."""
    logger.warning(
        "C-STORE refused: %s",
        reason,
        extra={"event": "store_refused", "status": f"0x{status:04X}", "peer": peer, "reason": reason, **fields},
    )


def log_store_failed(exc: Exception, peer: str, inst: ReceivedInstance | None) -> None:
    """Log a failure to write the spool or the queue (``store_failed``; a full disk says so)."""
    code = getattr(exc, "errno", None)
    full = code in (errno.ENOSPC, errno.EDQUOT) or (isinstance(exc, sqlite3.Error) and "full" in str(exc))
    where = "job queue write" if isinstance(exc, sqlite3.Error) else "writing the spool"
    ids = {"study_uid": inst.study_uid, "sop_instance_uid": inst.sop_instance_uid} if inst is not None else {}
    logger.error(
        "C-STORE failed: %s %s: %s",
        "disk full" if full else "error",
        where,
        exc,
        extra={
            "event": "store_failed",
            "status": f"0x{STATUS_OUT_OF_RESOURCES:04X}",
            "errno": errno.errorcode.get(code or 0, str(code)) if code is not None else None,
            "disk_full": full,
            "peer": peer,
            **ids,
        },
    )
