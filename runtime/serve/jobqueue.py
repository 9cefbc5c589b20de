"""The persistent job queue: SQLite (WAL, synchronous=FULL) in the spool directory.

Three tables: ``instances`` (one row per received SOP instance), ``studies`` (arrival times per
StudyInstanceUID, for the idle timer and the inputs' changes) and ``jobs`` (one row per segmentation of a study: a
study's first job is version 1, a study whose inputs change later gets version 2, ...). A job moves
``queued → running → sending → done``; any state but ``done`` may go to ``failed`` with a reason. ``queued``,
``running`` and ``sending`` are resumed after a restart; a ``done`` job is never selected again.

When a study is ready (:meth:`JobQueue.enqueue_ready_studies`): idle for ``idle_seconds`` and holding an instance
of every input modality the model requires. A study missing one waits up to ``max_wait_seconds`` after its last
instance, then gets a failed job ("PET never arrived"). An instance of an input modality that arrives after a
study's job (a late PET, a completed or new series) marks the study's inputs changed: once that job is finished and
the study idle again, a new version is queued. Anything else after a job (the study's own SEG coming back, a
resend of an instance already held) is recorded and changes nothing.

All methods are safe to call from several threads (one connection behind a lock), and several processes may open
the same queue (``diffseg serve requeue`` while the node runs).
"""

from __future__ import annotations

import json
import sqlite3
import threading
import time
from collections.abc import Iterable
from pathlib import Path

from .jobs import ARRIVALS, DEFAULT_INPUT_MODALITIES, JOB_STATES, RESUMABLE_STATES, Job, StudyWait, modality_names
from .queue_schema import create_schema
from .study_records import StudyRecords

__all__ = [
    "ARRIVALS",
    "DEFAULT_INPUT_MODALITIES",
    "JOB_STATES",
    "RESUMABLE_STATES",
    "Job",
    "JobQueue",
    "StudyWait",
    "modality_names",
]


class JobQueue(StudyRecords):
    """The queue of one spool directory.

    Args:
        db_path: the SQLite file (created with its schema if missing; a version-1 queue is upgraded in place).
        input_modalities: the modalities the model needs (``manifest.modalities``); stored in the queue so that
            another process (status, requeue) knows them. None: as stored, else ``DEFAULT_INPUT_MODALITIES``.
        timeout: seconds to wait for a lock held by another connection.
    """

    def __init__(
        self, db_path: str | Path, input_modalities: Iterable[str] | None = None, timeout: float = 30.0
    ) -> None:
        self.db_path = Path(db_path)
        self._lock = threading.RLock()
        self._db = sqlite3.connect(self.db_path, timeout=timeout, isolation_level=None, check_same_thread=False)
        self._db.row_factory = sqlite3.Row
        mode = self._db.execute("PRAGMA journal_mode=WAL").fetchone()[0]
        if mode.lower() != "wal":
            raise RuntimeError(f"job queue {self.db_path}: could not switch to WAL journal mode (got {mode!r})")
        self._db.execute("PRAGMA synchronous=FULL")
        self._db.execute("PRAGMA foreign_keys=ON")
        self._create_schema()
        self.input_modalities = self._input_modalities(input_modalities)

    def _create_schema(self) -> None:
        with self._tx() as db:
            create_schema(db, str(self.db_path))

    def _input_modalities(self, given: Iterable[str] | None) -> tuple[str, ...]:
        with self._tx() as db:
            if given is not None:
                codes = tuple(given)
                if not codes or any(not isinstance(c, str) or not c for c in codes):
                    raise ValueError(f"input_modalities must be non-empty modality codes, got {codes!r}")
                db.execute(
                    "INSERT OR REPLACE INTO meta (key, value) VALUES ('input_modalities', ?)", (",".join(codes),)
                )
                return codes
            row = db.execute("SELECT value FROM meta WHERE key='input_modalities'").fetchone()
        return tuple(row[0].split(",")) if row else DEFAULT_INPUT_MODALITIES

    def meta(self, key: str) -> str | None:
        """A value the node stored in the queue (``set_meta``), or None."""
        with self._lock:
            row = self._db.execute("SELECT value FROM meta WHERE key=?", (key,)).fetchone()
        return None if row is None else str(row[0])

    def set_meta(self, key: str, value: str) -> None:
        """Store a value for other processes that open the queue (the node's timing for ``--status``)."""
        with self._tx() as db:
            db.execute("INSERT OR REPLACE INTO meta (key, value) VALUES (?, ?)", (key, value))

    def close(self) -> None:
        """Close the connection."""
        with self._lock:
            self._db.close()

    # -- transactions ----------------------------------------------------------------------------------------

    class _Tx:
        def __init__(self, queue: JobQueue) -> None:
            self.q = queue

        def __enter__(self) -> sqlite3.Connection:
            self.q._lock.acquire()
            try:
                self.q._db.execute("BEGIN IMMEDIATE")
            except BaseException:
                self.q._lock.release()
                raise
            return self.q._db

        def __exit__(self, exc_type, exc, tb) -> None:
            try:
                if exc_type is None:
                    self.q._db.execute("COMMIT")
                else:
                    self.q._db.execute("ROLLBACK")
            finally:
                self.q._lock.release()

    def _tx(self) -> JobQueue._Tx:
        return JobQueue._Tx(self)

    # -- the worker's side -----------------------------------------------------------------------------------

    def next_job(self, now: float | None = None) -> Job | None:
        """The oldest resumable job whose back-off has elapsed, or None."""
        now = time.time() if now is None else now
        with self._lock:
            row = self._db.execute(
                "SELECT * FROM jobs WHERE state IN ('queued', 'running', 'sending') AND next_attempt_at <= ?"
                " ORDER BY id LIMIT 1",
                (now,),
            ).fetchone()
        return None if row is None else Job.from_row(row)

    def next_wakeup(self) -> float | None:
        """The earliest ``next_attempt_at`` of a resumable job, or None if there is none."""
        with self._lock:
            row = self._db.execute(
                "SELECT MIN(next_attempt_at) FROM jobs WHERE state IN ('queued', 'running', 'sending')"
            ).fetchone()
        return row[0]

    def _transition(self, job_id: int, allowed: tuple[str, ...], sets: str, params: tuple) -> Job:
        now = time.time()
        with self._tx() as db:
            marks = ", ".join("?" * len(allowed))
            cur = db.execute(
                f"UPDATE jobs SET {sets}, updated_at=? WHERE id=? AND state IN ({marks})",
                (*params, now, job_id, *allowed),
            )
            if cur.rowcount != 1:
                row = db.execute("SELECT state FROM jobs WHERE id=?", (job_id,)).fetchone()
                got = "no such job" if row is None else f"state {row[0]!r}"
                raise RuntimeError(f"job {job_id}: expected state in {allowed}, found {got}")
        return self.job(job_id)

    def start_run(self, job_id: int) -> Job:
        """``queued``/``running`` → ``running``; counts the run and notes the inputs it covers."""
        with self._lock:
            study = self._db.execute(
                "SELECT s.instances, s.inputs_changed_at FROM studies s JOIN jobs j ON j.study_uid = s.study_uid"
                " WHERE j.id=?",
                (job_id,),
            ).fetchone()
        return self._transition(
            job_id,
            ("queued", "running"),
            "state='running', runs=runs+1, started_at=?, instances=?, inputs_as_of=?, reason=NULL",
            (time.time(), study["instances"], study["inputs_changed_at"]),
        )

    def previous_done(self, job: Job) -> Job | None:
        """The study's latest ``done`` job before ``job`` (the one it supersedes), or None."""
        with self._lock:
            row = self._db.execute(
                "SELECT * FROM jobs WHERE study_uid=? AND state='done' AND id<? ORDER BY id DESC LIMIT 1",
                (job.study_uid, job.id),
            ).fetchone()
        return None if row is None else Job.from_row(row)

    def set_sending(
        self, job_id: int, *, outputs: dict[str, dict[str, str]], input_key: str, model_version: str
    ) -> Job:
        """``running`` → ``sending`` once every output file is written."""
        return self._transition(
            job_id,
            ("running",),
            "state='sending', outputs=?, input_key=?, model_version=?",
            (json.dumps(outputs, sort_keys=True), input_key, model_version),
        )

    def mark_unchanged(self, job_id: int, *, input_key: str, model_version: str, same_as: int) -> Job:
        """``running`` → ``done`` without sending: the series read are those of job ``same_as``, already sent."""
        now = time.time()
        return self._transition(
            job_id,
            ("running",),
            "state='done', input_key=?, model_version=?, reason=?, finished_at=?",
            (input_key, model_version, f"inputs unchanged since job {same_as}: nothing new to send", now),
        )

    def send_failed(self, job_id: int, reason: str, next_attempt_at: float) -> Job:
        """Count a failed C-STORE round and schedule the next try (stays ``sending``)."""
        return self._transition(
            job_id,
            ("sending",),
            "send_attempts=send_attempts+1, reason=?, next_attempt_at=?",
            (reason, next_attempt_at),
        )

    def mark_done(self, job_id: int, *, sent_to: str, sent_status: int) -> Job:
        """``sending`` → ``done``: the destination confirmed every output."""
        now = time.time()
        return self._transition(
            job_id,
            ("sending",),
            "state='done', reason=NULL, sent_to=?, sent_status=?, sent_at=?, finished_at=?",
            (sent_to, sent_status, now, now),
        )

    def mark_failed(self, job_id: int, reason: str) -> Job:
        """Any resumable state → ``failed`` with ``reason``."""
        return self._transition(
            job_id, RESUMABLE_STATES, "state='failed', reason=?, finished_at=?", (reason, time.time())
        )

    # -- reading ---------------------------------------------------------------------------------------------

    def job(self, job_id: int) -> Job:
        """One job by id.

        Raises:
            KeyError: no such job.
        """
        with self._lock:
            row = self._db.execute("SELECT * FROM jobs WHERE id=?", (job_id,)).fetchone()
        if row is None:
            raise KeyError(f"no job {job_id} in {self.db_path}")
        return Job.from_row(row)

    def job_for_study(self, study_uid: str) -> Job | None:
        """The latest job of a study, or None."""
        with self._lock:
            row = self._db.execute(
                "SELECT * FROM jobs WHERE study_uid=? ORDER BY id DESC LIMIT 1", (study_uid,)
            ).fetchone()
        return None if row is None else Job.from_row(row)

    def jobs(self, states: tuple[str, ...] = JOB_STATES, study_uid: str | None = None) -> list[Job]:
        """Jobs in the given states (of one study, if given), oldest first."""
        marks = ", ".join("?" * len(states))
        where, params = f"state IN ({marks})", list(states)
        if study_uid is not None:
            where, params = where + " AND study_uid=?", [*params, study_uid]
        with self._lock:
            rows = self._db.execute(f"SELECT * FROM jobs WHERE {where} ORDER BY id", params).fetchall()
        return [Job.from_row(row) for row in rows]
