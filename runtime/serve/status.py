"""``diffseg serve --status``: what the queue of a spool directory holds, readable while the node runs."""

from __future__ import annotations

import datetime as _dt
from pathlib import Path
from typing import Any

from .jobqueue import JOB_STATES, JobQueue
from .spool import Spool

__all__ = ["format_status", "spool_status"]


def spool_status(spool_dir: str | Path) -> dict[str, Any]:
    """Counts per state and every job of a spool directory.

    Args:
        spool_dir: the node's spool directory.

    Returns:
        ``{"spool": str, "summary": {...}, "jobs": [job dicts, oldest first]}``.

    Raises:
        FileNotFoundError: the folder or its job queue does not exist.
    """
    spool = Spool(spool_dir)
    if not spool.root.is_dir():
        raise FileNotFoundError(f"spool directory {spool.root} does not exist")
    if not spool.db_path.is_file():
        raise FileNotFoundError(f"no job queue in {spool.root} (expected {spool.db_path.name}); has a node run here?")
    queue = JobQueue(spool.db_path)
    try:
        return {
            "spool": str(spool.root),
            "summary": queue.summary(),
            "jobs": [job.as_dict() for job in queue.jobs(JOB_STATES)],
        }
    finally:
        queue.close()


def _when(ts: float | None) -> str:
    if ts is None:
        return "-"
    return _dt.datetime.fromtimestamp(ts).isoformat(sep=" ", timespec="seconds")


def format_status(status: dict[str, Any]) -> str:
    """A readable report of :func:`spool_status`: counts, then one line per job (with failure reasons)."""
    s = status["summary"]
    lines = [
        f"spool {status['spool']}",
        f"receiving {s['receiving']}  queued {s['queued']}  running {s['running']}  sending {s['sending']}  "
        f"done {s['done']}  failed {s['failed']}  (instances {s['instances']}, late {s['late_instances']})",
    ]
    for job in status["jobs"]:
        line = (
            f"job {job['id']:>5}  {job['state']:<8} study {job['study_uid']}  runs {job['runs']}  "
            f"send tries {job['send_attempts']}  updated {_when(job['updated_at'])}"
        )
        if job["state"] == "done":
            line += f"  sent {job['seg_sop_instance_uid']} to {job['sent_to']} (0x{job['sent_status']:04X})"
        elif job["reason"]:
            line += f"  reason: {job['reason']}"
        lines.append(line)
    return "\n".join(lines)
