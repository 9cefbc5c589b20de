"""``diffseg serve``: a DICOM node beside a PACS that receives studies and sends back their DICOM SEG.

Modules, in the order data flows: ``options`` (configuration), ``scp`` (Storage SCP → ``spool``), ``jobqueue``
(SQLite queue, idle timer per study), ``worker`` (``pipeline``: read → segment → SEG; ``sender``: C-STORE with
back-off), ``node`` (starts them together and recovers after a crash), ``status`` and ``logs``.
"""

from __future__ import annotations

from .jobqueue import JOB_STATES, Job, JobQueue
from .node import Node, recover_spool
from .options import Destination, ServeOptions, load_config
from .pipeline import SegmenterPipeline, SegPipeline, SegUids, seg_uids
from .sender import SendError, SendResult, echo, send_file
from .spool import Spool, SpoolLockedError, check_uid, is_valid_uid, uid_key
from .status import format_status, spool_status
from .worker import Worker, backoff_seconds

__all__ = [
    "JOB_STATES",
    "Destination",
    "Job",
    "JobQueue",
    "Node",
    "SegPipeline",
    "SegUids",
    "SegmenterPipeline",
    "SendError",
    "SendResult",
    "ServeOptions",
    "Spool",
    "SpoolLockedError",
    "Worker",
    "backoff_seconds",
    "check_uid",
    "echo",
    "format_status",
    "is_valid_uid",
    "load_config",
    "recover_spool",
    "seg_uids",
    "send_file",
    "spool_status",
    "uid_key",
]
