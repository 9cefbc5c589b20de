"""``diffseg serve``: a DICOM node beside a PACS that receives studies and sends back their SEG and RTSTRUCT.

Modules, in the order data flows: ``options`` (configuration), ``scp`` (Storage SCP → ``spool``), ``jobqueue``
(SQLite queue: when a study is ready, its versions), ``worker`` (``pipeline``: read → segment → outputs;
``sender``: C-STORE with back-off), ``node`` (starts them together, purges old studies, recovers after a crash),
``status`` and ``logs``.
"""

from __future__ import annotations

from .jobqueue import JOB_STATES, Job, JobQueue, StudyWait
from .node import Node, input_modalities, recover_spool
from .options import Destination, ServeOptions, load_config
from .pipeline import OutputUids, ReadStudy, SegmenterPipeline, SegPipeline, input_key_of, output_uids
from .sender import SendError, SendResult, echo, send_file, send_files
from .spool import Spool, SpoolLockedError, check_uid, is_valid_uid, uid_key
from .status import format_status, open_queue, spool_status
from .worker import Worker, backoff_seconds

__all__ = [
    "JOB_STATES",
    "Destination",
    "Job",
    "JobQueue",
    "Node",
    "OutputUids",
    "ReadStudy",
    "SegPipeline",
    "SegmenterPipeline",
    "SendError",
    "SendResult",
    "ServeOptions",
    "Spool",
    "SpoolLockedError",
    "StudyWait",
    "Worker",
    "backoff_seconds",
    "check_uid",
    "echo",
    "format_status",
    "input_key_of",
    "input_modalities",
    "is_valid_uid",
    "load_config",
    "open_queue",
    "output_uids",
    "recover_spool",
    "send_file",
    "send_files",
    "spool_status",
    "uid_key",
]
