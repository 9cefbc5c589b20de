"""The study side of the job queue: arrivals, when a study is ready, requeue, retention, waiting studies.

:class:`StudyRecords` is the base of :class:`~diffseg.runtime.serve.jobqueue.JobQueue`, which owns the connection
(``_db``, ``_lock``, ``_tx``) and the job transitions.
"""

from __future__ import annotations

import sqlite3
import threading
import time
from pathlib import Path
from typing import Any

from .jobs import JOB_STATES, RESUMABLE_STATES, Job, StudyWait, duration_text, iso_time, modality_names

__all__ = ["StudyRecords"]


class StudyRecords:
    """Study-level queries and updates of the queue (see the module docstring)."""

    # set by JobQueue, which also provides _tx() (a write transaction) and job(id)
    db_path: Path
    input_modalities: tuple[str, ...]
    _db: sqlite3.Connection
    _lock: threading.RLock

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
        size_bytes: int = 0,
        now: float | None = None,
    ) -> str:
        """Record a received instance and restart its study's idle timer.

        Returns:
            One of ``ARRIVALS``: ``new`` (before the study's first job), ``duplicate`` (this SOPInstanceUID is
            already held: a resend), ``late`` (new, of an input modality, after the study's job started or
            finished: the study is segmented again once idle) or ``ignored`` (new, after a job, of no input
            modality: recorded, changes nothing).
        """
        now = time.time() if now is None else now
        with self._tx() as db:
            held = db.execute("SELECT 1 FROM instances WHERE sop_instance_uid=?", (sop_instance_uid,)).fetchone()
            db.execute(
                "INSERT INTO instances (sop_instance_uid, study_uid, series_uid, sop_class_uid, modality, path,"
                " calling_aet, received_at, size_bytes) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)"
                " ON CONFLICT (sop_instance_uid) DO UPDATE SET path=excluded.path, size_bytes=excluded.size_bytes",
                (sop_instance_uid, study_uid, series_uid, sop_class_uid, modality, path, calling_aet, now, size_bytes),
            )
            db.execute(
                "INSERT INTO studies (study_uid, first_received, last_received) VALUES (?, ?, ?)"
                " ON CONFLICT (study_uid) DO UPDATE SET last_received=excluded.last_received, purged_at=NULL",
                (study_uid, now, now),
            )
            if held:
                return "duplicate"
            db.execute("UPDATE studies SET instances=instances+1 WHERE study_uid=?", (study_uid,))
            is_input = modality in self.input_modalities
            if is_input:
                db.execute("UPDATE studies SET inputs_changed_at=? WHERE study_uid=?", (now, study_uid))
            if db.execute("SELECT 1 FROM jobs WHERE study_uid=?", (study_uid,)).fetchone() is None:
                return "new"
            if not is_input:
                return "ignored"
            db.execute("UPDATE studies SET late_instances=late_instances+1 WHERE study_uid=?", (study_uid,))
            return "late"

    def known_instances(self) -> set[str]:
        """Paths (relative to the spool) of every recorded instance."""
        with self._lock:
            return {row[0] for row in self._db.execute("SELECT path FROM instances")}

    def study_bytes(self, study_uid: str) -> int:
        """Bytes of the instances recorded for a study."""
        with self._lock:
            row = self._db.execute(
                "SELECT COALESCE(SUM(size_bytes), 0) FROM instances WHERE study_uid=?", (study_uid,)
            ).fetchone()
        return int(row[0])

    def study_instances(self, study_uid: str) -> int:
        """Instances recorded for a study."""
        with self._lock:
            row = self._db.execute("SELECT instances FROM studies WHERE study_uid=?", (study_uid,)).fetchone()
        return 0 if row is None else int(row[0])

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

    def _candidates(self, db: sqlite3.Connection) -> list[sqlite3.Row]:
        """Studies that may need a job: none yet, or inputs changed after their latest job (which has finished)."""
        return db.execute(
            "SELECT s.*, j.id AS latest_id, j.state AS latest_state, j.inputs_as_of AS latest_inputs,"
            " j.version AS latest_version FROM studies s"
            " LEFT JOIN jobs j ON j.id = (SELECT MAX(id) FROM jobs WHERE study_uid = s.study_uid)"
            " WHERE s.purged_at IS NULL AND (j.id IS NULL OR (s.inputs_changed_at IS NOT NULL"
            " AND s.inputs_changed_at > COALESCE(j.inputs_as_of, 0))) ORDER BY s.first_received"
        ).fetchall()

    def _modalities(self, db: sqlite3.Connection, study_uid: str) -> tuple[str, ...]:
        rows = db.execute(
            "SELECT DISTINCT modality FROM instances WHERE study_uid=? AND modality IS NOT NULL ORDER BY modality",
            (study_uid,),
        )
        return tuple(r[0] for r in rows)

    def enqueue_ready_studies(
        self, idle_seconds: float, max_wait_seconds: float, now: float | None = None
    ) -> list[Job]:
        """Queue a job for every study that is ready; fail those that waited too long for an input.

        Ready: idle for ``idle_seconds``, an instance of every input modality present, and either no job yet or
        new inputs since its latest job, which has finished. A study idle that long but missing an input waits
        until ``max_wait_seconds`` after its last instance, then gets a ``failed`` job naming what never came.

        Returns:
            The new jobs (``queued`` or ``failed``).
        """
        now = time.time() if now is None else now
        new_ids = []
        with self._tx() as db:
            for row in self._candidates(db):
                if row["latest_state"] in RESUMABLE_STATES or row["last_received"] > now - idle_seconds:
                    continue
                missing = [m for m in self.input_modalities if m not in self._modalities(db, row["study_uid"])]
                waited = now - row["last_received"]
                if missing and waited < max_wait_seconds:
                    continue
                state, reason = "queued", None
                if missing:
                    state = "failed"
                    reason = (
                        f"{modality_names(missing)} never arrived (waited {duration_text(waited)} after the last "
                        f"instance; max_wait_seconds is {max_wait_seconds:g})"
                    )
                new_ids.append(self._insert_job(db, row, state, reason, now))
        return [self.job(i) for i in new_ids]

    def _insert_job(
        self, db: sqlite3.Connection, study: sqlite3.Row, state: str, reason: str | None, now: float, requeued=0
    ) -> int:
        done = db.execute(
            "SELECT MAX(id) FROM jobs WHERE study_uid=? AND state='done'", (study["study_uid"],)
        ).fetchone()[0]
        version = db.execute(
            "SELECT COALESCE(MAX(version), 0) + 1 FROM jobs WHERE study_uid=?", (study["study_uid"],)
        ).fetchone()[0]
        cur = db.execute(
            "INSERT INTO jobs (study_uid, version, state, reason, created_at, updated_at, finished_at, instances,"
            " inputs_as_of, supersedes, requeued) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            (
                study["study_uid"],
                version,
                state,
                reason,
                now,
                now,
                now if state == "failed" else None,
                study["instances"],
                study["inputs_changed_at"],
                done,
                requeued,
            ),
        )
        return int(cur.lastrowid)

    def requeue(self, study_uid: str, now: float | None = None) -> Job:
        """Queue a new version of a study at once (an operator's ``diffseg serve requeue``).

        Raises:
            KeyError: no such study in the queue.
            ValueError: its instances were purged, or a job of it is still queued, running or sending.
        """
        now = time.time() if now is None else now
        with self._tx() as db:
            study = db.execute("SELECT * FROM studies WHERE study_uid=?", (study_uid,)).fetchone()
            if study is None:
                raise KeyError(f"study {study_uid} is not in the queue {self.db_path}")
            if study["purged_at"] is not None:
                raise ValueError(
                    f"study {study_uid}: its instances were purged from the spool at {iso_time(study['purged_at'])} "
                    "(keep_done_days / keep_failed_days); send the study to the node again instead"
                )
            active = db.execute(
                "SELECT id, state FROM jobs WHERE study_uid=? AND state IN ('queued', 'running', 'sending')",
                (study_uid,),
            ).fetchone()
            if active is not None:
                raise ValueError(f"study {study_uid}: job {active['id']} is {active['state']}; wait for it to finish")
            job_id = self._insert_job(db, study, "queued", None, now, requeued=1)
        return self.job(job_id)

    def studies_to_purge(self, keep_done_days: float, keep_failed_days: float, now: float | None = None) -> list[str]:
        """Studies whose spool may go: the latest job finished (done, or failed) longer ago than such a study is
        kept, and no input arrived after it (a new version would need them)."""
        now = time.time() if now is None else now
        with self._lock:
            rows = self._db.execute(
                "SELECT s.study_uid FROM studies s"
                " JOIN jobs j ON j.id = (SELECT MAX(id) FROM jobs WHERE study_uid = s.study_uid)"
                " WHERE s.purged_at IS NULL AND j.finished_at IS NOT NULL"
                " AND COALESCE(s.inputs_changed_at, 0) <= COALESCE(j.inputs_as_of, 0)"
                " AND ((j.state='done' AND j.finished_at <= ?) OR (j.state='failed' AND j.finished_at <= ?))",
                (now - keep_done_days * 86400.0, now - keep_failed_days * 86400.0),
            ).fetchall()
        return [r[0] for r in rows]

    def mark_purged(self, study_uid: str, now: float | None = None) -> None:
        """Forget a purged study's instances (its study and job rows stay, as the record of what was done)."""
        now = time.time() if now is None else now
        with self._tx() as db:
            db.execute("DELETE FROM instances WHERE study_uid=?", (study_uid,))
            db.execute("UPDATE studies SET purged_at=?, instances=0 WHERE study_uid=?", (now, study_uid))

    def waiting_studies(
        self, idle_seconds: float, max_wait_seconds: float, now: float | None = None
    ) -> list[StudyWait]:
        """Studies without a finished answer to their current inputs, and why each waits."""
        now = time.time() if now is None else now
        out = []
        with self._lock:
            for row in self._candidates(self._db):
                modalities = self._modalities(self._db, row["study_uid"])
                missing = tuple(m for m in self.input_modalities if m not in modalities)
                if row["latest_state"] in RESUMABLE_STATES:
                    why = "job_active"
                elif row["last_received"] > now - idle_seconds:
                    why = "receiving"
                elif missing:
                    why = "missing"
                else:
                    why = "changed" if row["latest_id"] is not None else "receiving"
                fails_at = row["last_received"] + max_wait_seconds if missing else None
                out.append(
                    StudyWait(
                        row["study_uid"], row["instances"], modalities, why, missing, row["last_received"], fails_at
                    )
                )
        return out

    def summary(self) -> dict[str, Any]:
        """Counts: studies without a job, jobs per state, instances, late instances, purged studies."""
        with self._lock:
            counts = dict.fromkeys(JOB_STATES, 0)
            for state, n in self._db.execute("SELECT state, COUNT(*) FROM jobs GROUP BY state"):
                counts[state] = n
            receiving = self._db.execute(
                "SELECT COUNT(*) FROM studies WHERE study_uid NOT IN (SELECT study_uid FROM jobs)"
            ).fetchone()[0]
            instances = self._db.execute("SELECT COUNT(*) FROM instances").fetchone()[0]
            late = self._db.execute("SELECT COALESCE(SUM(late_instances), 0) FROM studies").fetchone()[0]
            purged = self._db.execute("SELECT COUNT(*) FROM studies WHERE purged_at IS NOT NULL").fetchone()[0]
        return {"receiving": receiving, **counts, "instances": instances, "late_instances": late, "purged": purged}
