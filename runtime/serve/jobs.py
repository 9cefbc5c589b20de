"""The job queue's records: job states, a job row (:class:`Job`) and a waiting study (:class:`StudyWait`)."""

from __future__ import annotations

import datetime as _dt
import json
import sqlite3
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

__all__ = [
    "ARRIVALS",
    "DEFAULT_INPUT_MODALITIES",
    "JOB_STATES",
    "RESUMABLE_STATES",
    "Job",
    "StudyWait",
    "duration_text",
    "iso_time",
    "modality_names",
]

JOB_STATES = ("queued", "running", "sending", "done", "failed")
RESUMABLE_STATES = ("queued", "running", "sending")
#: What :meth:`JobQueue.record_instance` says of an instance (see there).
ARRIVALS = ("new", "duplicate", "late", "ignored")
#: The inputs of a PET/CT model, used when a queue is opened without being told (``--status`` of an old spool).
DEFAULT_INPUT_MODALITIES = ("CT", "PT")
_MODALITY_NAMES = {"PT": "PET", "CT": "CT", "MR": "MR"}


def modality_names(codes: Iterable[str]) -> str:
    """``["PT", "CT"]`` → ``"PET and CT"`` (for messages)."""
    names = [_MODALITY_NAMES.get(c, c) for c in codes]
    return names[0] if len(names) == 1 else ", ".join(names[:-1]) + " and " + names[-1]


def duration_text(seconds: float) -> str:
    minutes, secs = divmod(round(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours} h {minutes} min" if hours else f"{minutes} min {secs} s" if minutes else f"{secs} s"


@dataclass(frozen=True)
class Job:
    """One row of the ``jobs`` table (times are Unix seconds).

    Attributes:
        id: job number.
        study_uid: the study it segments.
        version: 1 for a study's first job; each later job of the study (its inputs changed, a requeue) counts up.
        state: one of ``JOB_STATES``.
        reason: why it failed, or the last send error while it retries; for a ``done`` job that sent nothing, why.
        runs: times segmentation started.
        send_attempts: failed C-STORE rounds so far.
        instances: instances of the study when segmentation started.
        inputs_as_of: the study's ``inputs_changed_at`` this job covers.
        input_key: identity of the series the segmentation read (their UIDs and instances); the outputs' UIDs
            derive from it, so the same inputs always give the same UIDs.
        supersedes: the job whose outputs this job's replace (the study's last ``done`` job), or None.
        requeued: 1 if an operator asked for this job (``diffseg serve requeue``).
        model_version: model identity that the output UIDs derive from.
        outputs: per output kind (``seg``, ``rtstruct``...): ``path`` (relative to the spool),
            ``series_instance_uid``, ``sop_instance_uid``; None before they are written.
        sent_to: destination that confirmed the outputs.
        sent_status: the last DIMSE status it answered.
    """

    id: int
    study_uid: str
    version: int
    state: str
    reason: str | None
    runs: int
    send_attempts: int
    created_at: float
    updated_at: float
    started_at: float | None
    finished_at: float | None
    next_attempt_at: float
    instances: int | None
    inputs_as_of: float | None
    input_key: str | None
    supersedes: int | None
    requeued: int
    model_version: str | None
    outputs: dict[str, dict[str, str]] | None
    sent_to: str | None
    sent_status: int | None
    sent_at: float | None

    @classmethod
    def from_row(cls, row: sqlite3.Row) -> Job:
        values = dict(row)
        values["outputs"] = json.loads(values["outputs"]) if values["outputs"] else None
        return cls(**values)

    def as_dict(self) -> dict[str, Any]:
        """The job as a JSON-ready dict."""
        return dict(self.__dict__)


@dataclass(frozen=True)
class StudyWait:
    """A study that is not segmented yet, and why (``diffseg serve --status``).

    Attributes:
        study_uid: the study.
        instances: instances received.
        modalities: the modalities received.
        why: ``receiving`` (not idle yet), ``missing`` (an input modality is missing), ``changed`` (new inputs
            after its last job; queued again once idle) or ``job_active`` (new inputs while its job runs).
        missing: the input modalities not received.
        last_received: when its last instance arrived.
        fails_at: when a study still missing an input fails (``missing`` only).
    """

    study_uid: str
    instances: int
    modalities: tuple[str, ...]
    why: str
    missing: tuple[str, ...]
    last_received: float
    fails_at: float | None

    def as_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


def iso_time(ts: float) -> str:
    """A Unix time as local ``YYYY-MM-DD HH:MM:SS``."""
    return _dt.datetime.fromtimestamp(ts).isoformat(sep=" ", timespec="seconds")
