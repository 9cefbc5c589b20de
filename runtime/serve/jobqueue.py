"""The persistent job queue: SQLite (WAL, synchronous=FULL) in the spool directory.

Three tables: ``instances`` (one row per received SOP instance), ``studies`` (arrival times per
StudyInstanceUID, for the idle timer) and ``jobs`` (at most one per study). A job moves
``queued → running → sending → done``; any state but ``done`` may go to ``failed`` with a reason. ``queued``,
``running`` and ``sending`` are resumed after a restart; a ``done`` job is never selected again, so a study is
segmented and sent at most once by the queue (the SEG's deterministic SOPInstanceUID covers the window between
the destination's confirmation and the commit of ``done``).

All methods are safe to call from several threads (one connection behind a lock).
"""

from __future__ import annotations

import sqlite3
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

__all__ = ["JOB_STATES", "RESUMABLE_STATES", "Job", "JobQueue"]

JOB_STATES = ("queued", "running", "sending", "done", "failed")
RESUMABLE_STATES = ("queued", "running", "sending")
SCHEMA_VERSION = "1"

_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS instances (
    sop_instance_uid TEXT PRIMARY KEY,
    study_uid TEXT NOT NULL,
    series_uid TEXT NOT NULL,
    sop_class_uid TEXT NOT NULL,
    modality TEXT,
    path TEXT NOT NULL,
    calling_aet TEXT,
    received_at REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS instances_study ON instances (study_uid);
CREATE TABLE IF NOT EXISTS studies (
    study_uid TEXT PRIMARY KEY,
    first_received REAL NOT NULL,
    last_received REAL NOT NULL,
    instances INTEGER NOT NULL DEFAULT 0,
    late_instances INTEGER NOT NULL DEFAULT 0
);
CREATE TABLE IF NOT EXISTS jobs (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    study_uid TEXT NOT NULL UNIQUE REFERENCES studies (study_uid),
    state TEXT NOT NULL CHECK (state IN ('queued', 'running', 'sending', 'done', 'failed')),
    reason TEXT,
    runs INTEGER NOT NULL DEFAULT 0,
    send_attempts INTEGER NOT NULL DEFAULT 0,
    created_at REAL NOT NULL,
    updated_at REAL NOT NULL,
    started_at REAL,
    finished_at REAL,
    next_attempt_at REAL NOT NULL DEFAULT 0,
    instances INTEGER,
    model_version TEXT,
    seg_path TEXT,
    seg_sop_instance_uid TEXT,
    seg_series_instance_uid TEXT,
    sent_to TEXT,
    sent_status INTEGER,
    sent_at REAL
);
"""


@dataclass(frozen=True)
class Job:
    """One row of the ``jobs`` table (times are Unix seconds).

    Attributes:
        id: job number.
        study_uid: the study it segments.
        state: one of ``JOB_STATES``.
        reason: why it failed, or the last send error while it retries.
        runs: times segmentation started.
        send_attempts: failed C-STOREs so far.
        instances: instances of the study when segmentation started.
        model_version: model identity that the SEG UIDs derive from.
        seg_path: the SEG file (relative to the spool) once written.
        seg_sop_instance_uid: SOPInstanceUID of the SEG.
        seg_series_instance_uid: SeriesInstanceUID of the SEG.
        sent_to: destination that confirmed the SEG.
        sent_status: the DIMSE status it answered.
    """

    id: int
    study_uid: str
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
    model_version: str | None
    seg_path: str | None
    seg_sop_instance_uid: str | None
    seg_series_instance_uid: str | None
    sent_to: str | None
    sent_status: int | None
    sent_at: float | None

    def as_dict(self) -> dict[str, Any]:
        """The job as a JSON-ready dict."""
        return dict(self.__dict__)


class JobQueue:
    """The queue of one spool directory.

    Args:
        db_path: the SQLite file (created with its schema if missing).
        timeout: seconds to wait for a lock held by another connection.
    """

    def __init__(self, db_path: str | Path, timeout: float = 30.0) -> None:
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

    def _create_schema(self) -> None:
        with self._lock:
            self._db.executescript(_SCHEMA)
            row = self._db.execute("SELECT value FROM meta WHERE key='schema'").fetchone()
            if row is None:
                self._db.execute("INSERT INTO meta (key, value) VALUES ('schema', ?)", (SCHEMA_VERSION,))
            elif row[0] != SCHEMA_VERSION:
                raise RuntimeError(
                    f"job queue {self.db_path} has schema version {row[0]}, this diffseg reads {SCHEMA_VERSION}"
                )

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

    # -- receiving -------------------------------------------------------------------------------------------

    def record_instance(
        self,
        *,
        study_uid: str,
        series_uid: str,
        sop_instance_uid: str,
        sop_class_uid: str,
        modality: str | None,
        path: str,
        calling_aet: str | None,
        now: float | None = None,
    ) -> bool:
        """Record a received instance and restart its study's idle timer.

        Returns:
            True if the instance is new and arrived after its study's job had started (a late instance:
            kept in the spool, counted, not segmented).
        """
        now = time.time() if now is None else now
        with self._tx() as db:
            new = db.execute("SELECT 1 FROM instances WHERE sop_instance_uid=?", (sop_instance_uid,)).fetchone() is None
            db.execute(
                "INSERT OR REPLACE INTO instances (sop_instance_uid, study_uid, series_uid, sop_class_uid,"
                " modality, path, calling_aet, received_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                (sop_instance_uid, study_uid, series_uid, sop_class_uid, modality, path, calling_aet, now),
            )
            db.execute(
                "INSERT INTO studies (study_uid, first_received, last_received) VALUES (?, ?, ?)"
                " ON CONFLICT (study_uid) DO UPDATE SET last_received=excluded.last_received",
                (study_uid, now, now),
            )
            db.execute(
                "UPDATE studies SET instances=(SELECT COUNT(*) FROM instances WHERE study_uid=?) WHERE study_uid=?",
                (study_uid, study_uid),
            )
            job = db.execute("SELECT state FROM jobs WHERE study_uid=?", (study_uid,)).fetchone()
            late = new and job is not None and job["state"] != "queued"
            if late:
                db.execute("UPDATE studies SET late_instances=late_instances+1 WHERE study_uid=?", (study_uid,))
        return late

    def known_instances(self) -> set[str]:
        """Paths (relative to the spool) of every recorded instance."""
        with self._lock:
            return {row[0] for row in self._db.execute("SELECT path FROM instances")}

    def restart_idle_timers(self, now: float | None = None) -> int:
        """Give every study still receiving (no job yet) a fresh idle period; return how many.

        Called at start-up so that a study whose transfer was cut by a crash is not taken as complete before
        the sender had a chance to send the rest.
        """
        now = time.time() if now is None else now
        with self._tx() as db:
            cur = db.execute(
                "UPDATE studies SET last_received=? WHERE study_uid NOT IN (SELECT study_uid FROM jobs)",
                (now,),
            )
            return cur.rowcount

    def enqueue_idle_studies(self, idle_seconds: float, now: float | None = None) -> list[Job]:
        """Queue a job for every study idle for ``idle_seconds`` that has none yet; return the new jobs."""
        now = time.time() if now is None else now
        with self._tx() as db:
            rows = db.execute(
                "SELECT study_uid, instances FROM studies WHERE last_received <= ?"
                " AND study_uid NOT IN (SELECT study_uid FROM jobs) ORDER BY first_received",
                (now - idle_seconds,),
            ).fetchall()
            for row in rows:
                db.execute(
                    "INSERT INTO jobs (study_uid, state, created_at, updated_at, instances)"
                    " VALUES (?, 'queued', ?, ?, ?)",
                    (row["study_uid"], now, now, row["instances"]),
                )
            uids = [row["study_uid"] for row in rows]
        return [self.job_for_study(uid) for uid in uids]  # type: ignore[misc]

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
        return None if row is None else Job(**dict(row))

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

    def start_run(self, job_id: int, instances: int) -> Job:
        """``queued``/``running`` → ``running``; counts the run."""
        return self._transition(
            job_id,
            ("queued", "running"),
            "state='running', runs=runs+1, started_at=?, instances=?, reason=NULL",
            (time.time(), instances),
        )

    def set_sending(
        self,
        job_id: int,
        *,
        seg_path: str,
        sop_instance_uid: str,
        series_instance_uid: str,
        model_version: str,
    ) -> Job:
        """``running`` → ``sending`` once the SEG file is written."""
        return self._transition(
            job_id,
            ("running",),
            "state='sending', seg_path=?, seg_sop_instance_uid=?, seg_series_instance_uid=?, model_version=?",
            (seg_path, sop_instance_uid, series_instance_uid, model_version),
        )

    def send_failed(self, job_id: int, reason: str, next_attempt_at: float) -> Job:
        """Count a failed C-STORE and schedule the next try (stays ``sending``)."""
        return self._transition(
            job_id,
            ("sending",),
            "send_attempts=send_attempts+1, reason=?, next_attempt_at=?",
            (reason, next_attempt_at),
        )

    def mark_done(self, job_id: int, *, sent_to: str, sent_status: int) -> Job:
        """``sending`` → ``done``: the destination confirmed the SEG."""
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
        return Job(**dict(row))

    def job_for_study(self, study_uid: str) -> Job | None:
        """The job of a study, or None."""
        with self._lock:
            row = self._db.execute("SELECT * FROM jobs WHERE study_uid=?", (study_uid,)).fetchone()
        return None if row is None else Job(**dict(row))

    def jobs(self, states: tuple[str, ...] = JOB_STATES) -> list[Job]:
        """Jobs in the given states, oldest first."""
        marks = ", ".join("?" * len(states))
        with self._lock:
            rows = self._db.execute(f"SELECT * FROM jobs WHERE state IN ({marks}) ORDER BY id", states).fetchall()
        return [Job(**dict(row)) for row in rows]

    def study_instances(self, study_uid: str) -> int:
        """Instances recorded for a study."""
        with self._lock:
            row = self._db.execute("SELECT instances FROM studies WHERE study_uid=?", (study_uid,)).fetchone()
        return 0 if row is None else int(row[0])

    def summary(self) -> dict[str, Any]:
        """Counts: studies still receiving, jobs per state, instances, late instances."""
        with self._lock:
            counts = dict.fromkeys(JOB_STATES, 0)
            for state, n in self._db.execute("SELECT state, COUNT(*) FROM jobs GROUP BY state"):
                counts[state] = n
            receiving = self._db.execute(
                "SELECT COUNT(*) FROM studies WHERE study_uid NOT IN (SELECT study_uid FROM jobs)"
            ).fetchone()[0]
            instances = self._db.execute("SELECT COUNT(*) FROM instances").fetchone()[0]
            late = self._db.execute("SELECT COALESCE(SUM(late_instances), 0) FROM studies").fetchone()[0]
        return {"receiving": receiving, **counts, "instances": instances, "late_instances": late}
