"""``diffseg serve --status``: what the queue of a spool directory holds, readable while the node runs."""

from __future__ import annotations

import datetime as _dt
import json
from pathlib import Path
from typing import Any

from .jobqueue import JOB_STATES, JobQueue, modality_names
from .spool import Spool

__all__ = ["format_status", "open_queue", "spool_status"]

_WHY = {
    "receiving": "receiving (not idle yet)",
    "changed": "new inputs since its last version: queued again once idle",
    "job_active": "new inputs while its job runs: queued again after it",
}


def open_queue(spool_dir: str | Path) -> JobQueue:
    """The job queue of an existing spool directory (for status and requeue).

    Raises:
        FileNotFoundError: the folder or its job queue does not exist.
    """
    spool = Spool(spool_dir)
    if not spool.root.is_dir():
        raise FileNotFoundError(f"spool directory {spool.root} does not exist")
    if not spool.db_path.is_file():
        raise FileNotFoundError(f"no job queue in {spool.root} (expected {spool.db_path.name}); has a node run here?")
    return JobQueue(spool.db_path)


def spool_status(spool_dir: str | Path) -> dict[str, Any]:
    """Counts per state, the studies waiting (and why), and every job of a spool directory.

    Args:
        spool_dir: the node's spool directory.

    Returns:
        ``{"spool": str, "summary": {...}, "waiting": [study dicts], "jobs": [job dicts, oldest first]}``.

    Raises:
        FileNotFoundError: the folder or its job queue does not exist.
    """
    queue = open_queue(spool_dir)
    try:
        timing = json.loads(queue.meta("timing") or "{}")
        waiting = queue.waiting_studies(timing.get("idle_seconds", 30.0), timing.get("max_wait_seconds", 3600.0))
        return {
            "spool": str(Path(spool_dir)),
            "input_modalities": list(queue.input_modalities),
            "summary": queue.summary(),
            "waiting": [w.as_dict() for w in waiting],
            "jobs": [job.as_dict() for job in queue.jobs(JOB_STATES)],
        }
    finally:
        queue.close()


def _when(ts: float | None) -> str:
    if ts is None:
        return "-"
    return _dt.datetime.fromtimestamp(ts).isoformat(sep=" ", timespec="seconds")


def _waiting_line(w: dict[str, Any]) -> str:
    if w["why"] == "missing":
        why = f"waiting for {modality_names(w['missing'])} (fails at {_when(w['fails_at'])} if it never arrives)"
    else:
        why = _WHY[w["why"]]
    have = ", ".join(w["modalities"]) or "nothing"
    return f"study {w['study_uid']}  {w['instances']} instances ({have}), last {_when(w['last_received'])}: {why}"


def format_status(status: dict[str, Any]) -> str:
    """A readable report of :func:`spool_status`: counts, waiting studies, then one line per job."""
    s = status["summary"]
    lines = [
        f"spool {status['spool']}  (inputs the model needs: {', '.join(status['input_modalities'])})",
        f"receiving {s['receiving']}  queued {s['queued']}  running {s['running']}  sending {s['sending']}  "
        f"done {s['done']}  failed {s['failed']}  (instances {s['instances']}, late {s['late_instances']}, "
        f"purged studies {s['purged']})",
    ]
    lines += [_waiting_line(w) for w in status["waiting"]]
    for job in status["jobs"]:
        line = (
            f"job {job['id']:>5}  {job['state']:<8} study {job['study_uid']} v{job['version']}  runs {job['runs']}  "
            f"send tries {job['send_attempts']}  updated {_when(job['updated_at'])}"
        )
        if job["supersedes"]:
            line += f"  supersedes job {job['supersedes']}"
        if job["state"] == "done" and job["outputs"] and job["sent_status"] is not None:
            sent = ", ".join(f"{k} {v['sop_instance_uid']}" for k, v in job["outputs"].items())
            line += f"  sent {sent} to {job['sent_to']} (0x{job['sent_status']:04X})"
        elif job["reason"]:
            line += f"  reason: {job['reason']}"
        lines.append(line)
    return "\n".join(lines)
