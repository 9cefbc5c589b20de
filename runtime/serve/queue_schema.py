"""The job queue's SQLite schema (version 2), and the upgrade of a version-1 queue in place.

Version 1 (the first release) held one job per study and a SEG only (``seg_path`` and its UIDs); version 2 holds
versions of a study's job, the outputs of each as JSON, the inputs each covers, and the study's purge.
"""

from __future__ import annotations

import json
import sqlite3

__all__ = ["SCHEMA_VERSION", "create_schema"]

SCHEMA_VERSION = "2"

_JOBS_COLUMNS = """
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    study_uid TEXT NOT NULL REFERENCES studies (study_uid),
    version INTEGER NOT NULL DEFAULT 1,
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
    inputs_as_of REAL,
    input_key TEXT,
    supersedes INTEGER,
    requeued INTEGER NOT NULL DEFAULT 0,
    model_version TEXT,
    outputs TEXT,
    sent_to TEXT,
    sent_status INTEGER,
    sent_at REAL,
    UNIQUE (study_uid, version)
"""

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
    received_at REAL NOT NULL,
    size_bytes INTEGER NOT NULL DEFAULT 0
);
CREATE INDEX IF NOT EXISTS instances_study ON instances (study_uid);
CREATE TABLE IF NOT EXISTS studies (
    study_uid TEXT PRIMARY KEY,
    first_received REAL NOT NULL,
    last_received REAL NOT NULL,
    instances INTEGER NOT NULL DEFAULT 0,
    late_instances INTEGER NOT NULL DEFAULT 0,
    inputs_changed_at REAL,
    purged_at REAL
);
CREATE TABLE IF NOT EXISTS jobs ({jobs});
CREATE INDEX IF NOT EXISTS jobs_study ON jobs (study_uid);
""".replace("{jobs}", _JOBS_COLUMNS)


def create_schema(db: sqlite3.Connection, where: str) -> None:
    """Create the tables, or upgrade a version-1 queue, inside the caller's transaction.

    Raises:
        RuntimeError: the queue has a schema version this diffseg does not read.
    """
    db.execute("CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL)")
    row = db.execute("SELECT value FROM meta WHERE key='schema'").fetchone()
    if row is not None and row[0] == "1":
        _upgrade_from_v1(db)
    elif row is not None and row[0] != SCHEMA_VERSION:
        raise RuntimeError(f"job queue {where} has schema version {row[0]}, this diffseg reads {SCHEMA_VERSION}")
    for statement in _SCHEMA.split(";"):
        if statement.strip():
            db.execute(statement)
    db.execute("INSERT OR REPLACE INTO meta (key, value) VALUES ('schema', ?)", (SCHEMA_VERSION,))


def _upgrade_from_v1(db: sqlite3.Connection) -> None:
    """A version-1 queue (one job per study, a SEG only) in the version-2 layout, inside the caller's transaction."""
    db.execute("ALTER TABLE instances ADD COLUMN size_bytes INTEGER NOT NULL DEFAULT 0")
    db.execute("ALTER TABLE studies ADD COLUMN inputs_changed_at REAL")
    db.execute("ALTER TABLE studies ADD COLUMN purged_at REAL")
    db.execute("ALTER TABLE jobs RENAME TO jobs_v1")
    db.execute(f"CREATE TABLE jobs ({_JOBS_COLUMNS})")
    for row in db.execute("SELECT * FROM jobs_v1").fetchall():
        outputs = None
        if row["seg_path"]:
            outputs = json.dumps(
                {
                    "seg": {
                        "path": row["seg_path"],
                        "series_instance_uid": row["seg_series_instance_uid"],
                        "sop_instance_uid": row["seg_sop_instance_uid"],
                    }
                }
            )
        db.execute(
            "INSERT INTO jobs (id, study_uid, version, state, reason, runs, send_attempts, created_at, updated_at,"
            " started_at, finished_at, next_attempt_at, instances, inputs_as_of, model_version, outputs, sent_to,"
            " sent_status, sent_at) VALUES (?, ?, 1, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            (
                row["id"],
                row["study_uid"],
                row["state"],
                row["reason"],
                row["runs"],
                row["send_attempts"],
                row["created_at"],
                row["updated_at"],
                row["started_at"],
                row["finished_at"],
                row["next_attempt_at"],
                row["instances"],
                row["created_at"],
                row["model_version"],
                outputs,
                row["sent_to"],
                row["sent_status"],
                row["sent_at"],
            ),
        )
    db.execute("DROP TABLE jobs_v1")
