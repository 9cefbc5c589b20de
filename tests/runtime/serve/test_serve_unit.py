"""The DICOM node's parts without a network: configuration, UID grammar, durable spool writes, the SQLite job
queue's state machine and crash recovery, back-off, SEG UIDs, received-instance checks, logs, status, CLI.

References: PS3.5 9.1 (UID grammar) and 6.2 (AE titles), PS3.4 Table B.2-1 (C-STORE statuses), RFC 4122 §4.3
(name-based UUIDs under ``2.25``); numbers are checked exactly (back-off is ``base · 2^(n−1)`` capped).
"""

from __future__ import annotations

import dataclasses
import io
import json
import logging
import re
import sqlite3
import time
import tomllib
from pathlib import Path

import pydicom
import pytest
from dicom_net import tiny_study

from diffseg.runtime.cli import main as cli_main
from diffseg.runtime.commands import serve as serve_command
from diffseg.runtime.serve import (
    Destination,
    JobQueue,
    ServeOptions,
    Spool,
    SpoolLockedError,
    backoff_seconds,
    check_uid,
    format_status,
    input_key_of,
    is_valid_uid,
    load_config,
    output_uids,
    recover_spool,
    spool_status,
    uid_key,
)
from diffseg.runtime.serve.logs import JsonFormatter, configure_logging, remove_handlers
from diffseg.runtime.serve.scp import (
    STATUS_CANNOT_UNDERSTAND,
    STATUS_MISMATCH,
    InstanceError,
    inspect_instance,
)
from diffseg.runtime.serve.spool import write_durable

CONFIG_TOML = """
ae_title = "DIFFSEG"
port = 11112
allowed_calling_aets = ["ORTHANC", "MODALITY1"]
spool_dir = "spool"
idle_seconds = 2.5
model = "default"
backend = "onnxruntime-cpu"

[destination]
ae_title = "ORTHANC"
host = "127.0.0.1"
port = 4242
"""


def _options(tmp_path: Path, **overrides) -> ServeOptions:
    values = dict(
        ae_title="NODE",
        port=11112,
        allowed_calling_aets=("PACS",),
        destination=Destination("PACS", "127.0.0.1", 4242),
        spool_dir=tmp_path / "spool",
    )
    values.update(overrides)
    return ServeOptions(**values)


# -- configuration -------------------------------------------------------------------------------------------


def test_load_config_toml_and_json_agree(tmp_path: Path) -> None:
    toml_path = tmp_path / "node.toml"
    toml_path.write_text(CONFIG_TOML)
    from_toml = load_config(toml_path)
    import tomllib

    json_path = tmp_path / "node.json"
    json_path.write_text(json.dumps(tomllib.loads(CONFIG_TOML)))
    from_json = load_config(json_path)
    assert from_toml == from_json
    assert from_toml.allowed_calling_aets == ("ORTHANC", "MODALITY1")
    assert from_toml.destination == Destination("ORTHANC", "127.0.0.1", 4242)
    assert from_toml.spool_dir == (tmp_path / "spool").resolve()  # relative to the config file's folder
    assert from_toml.idle_seconds == 2.5
    assert from_toml.backend == "onnxruntime-cpu"


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda c: c.replace('ae_title = "DIFFSEG"', 'ae_title = "A_TITLE_LONGER_THAN_16"'), "ae_title"),
        (lambda c: c.replace("port = 11112", "port = 70000"), "port must be an integer port"),
        (lambda c: c.replace('["ORTHANC", "MODALITY1"]', "[]"), "allowed_calling_aets"),
        (lambda c: c.replace("idle_seconds = 2.5", "idle_seconds = -1"), "idle_seconds"),
        (lambda c: c.replace("port = 4242", 'port = "4242"'), "destination.port"),
        (lambda c: c.replace('model = "default"', 'model = "default"\nmodle = "x"'), "unknown key"),
        (lambda c: c.replace('spool_dir = "spool"\n', ""), "missing required key(s) ['spool_dir']"),
        (lambda c: c + "[[oops", "not valid TOML"),
    ],
)
def test_load_config_errors_name_the_key(tmp_path: Path, edit, message: str) -> None:
    path = tmp_path / "node.toml"
    path.write_text(edit(CONFIG_TOML))
    with pytest.raises(ValueError, match=re.escape(message)):
        load_config(path)


def test_several_destinations_each_with_its_outputs(tmp_path: Path) -> None:
    two = CONFIG_TOML.split("[destination]")[0] + (
        'dicom_outputs = ["seg", "rtstruct", "labelmap"]\nfile_mode = 0o640\n'
        '[[destination]]\nae_title = "PACS"\nhost = "10.0.0.5"\nport = 4242\n'
        '[[destination]]\nae_title = "TPS"\nhost = "10.0.0.6"\nport = 104\noutputs = ["rtstruct"]\n'
    )
    path = tmp_path / "node.toml"
    path.write_text(two)
    options = load_config(path)
    assert options.destinations == (
        Destination("PACS", "10.0.0.5", 4242),
        Destination("TPS", "10.0.0.6", 104, outputs=("rtstruct",)),
    )
    assert (options.dicom_outputs, options.file_mode) == (("seg", "rtstruct", "labelmap"), 0o640)
    path.write_text(two.replace('outputs = ["rtstruct"]', 'outputs = ["fractional"]'))
    with pytest.raises(
        ValueError, match=r"destination TPS@10.0.0.6:104 asks for \['fractional'\], not in dicom_outputs"
    ):
        load_config(path)
    path.write_text(two.replace('outputs = ["rtstruct"]', 'outputs = ["rtstrut"]'))
    with pytest.raises(ValueError, match=r"destination\.outputs must hold distinct names of"):
        load_config(path)
    json_path = tmp_path / "node.json"
    json_path.write_text(json.dumps({**tomllib.loads(two), "file_mode": "0640"}))
    assert load_config(json_path).file_mode == 0o640
    json_path.write_text(json.dumps({**tomllib.loads(two), "file_mode": "0400"}))
    with pytest.raises(ValueError, match="file_mode must be permission bits that let the node read and write"):
        load_config(json_path)


def test_load_config_missing_file_and_bad_suffix(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_config(tmp_path / "absent.toml")
    path = tmp_path / "node.yaml"
    path.write_text("a: 1")
    with pytest.raises(ValueError, match=r"must end in \.toml or \.json"):
        load_config(path)


def test_every_option_is_documented_in_the_command_help() -> None:
    """The config keys listed by ``diffseg serve --help`` are exactly the fields of ServeOptions."""
    fields = {f.name for f in dataclasses.fields(ServeOptions)}
    described = set(re.findall(r"[a-z_]+", serve_command.DESCRIPTION.split("Configuration (TOML or JSON):")[1]))
    assert fields <= described, f"undocumented in DESCRIPTION: {sorted(fields - described)}"


# -- UIDs, names, durable writes -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "uid",
    ["1.2.840.10008.5.1.4.1.1.2", "0.0", "2.25.329800735698586629295641978511506172918", "1" + ".1" * 31],
)
def test_valid_uids(uid: str) -> None:
    assert is_valid_uid(uid)
    assert check_uid("uid", uid) == uid


@pytest.mark.parametrize(
    "uid",
    ["", "1..2", "1.02", ".1.2", "1.2.", "1.2.a", "../../etc/passwd", "1/2", "1." + "2" * 63, None, 12],
)
def test_invalid_uids_are_refused(uid: object) -> None:
    assert not is_valid_uid(uid)
    with pytest.raises(ValueError, match="StudyInstanceUID must be a DICOM UID"):
        check_uid("StudyInstanceUID", uid)


def test_check_uid_strips_dicom_padding() -> None:
    assert check_uid("uid", "1.2.3\x00") == "1.2.3"


def test_spool_names_are_hashes_not_dicom_values(tmp_path: Path) -> None:
    spool = Spool(tmp_path).create()
    path = spool.instance_path("1.2.3", "1.2.3.4")
    assert path.parent.parent == spool.incoming
    assert re.fullmatch(r"[0-9a-f]{32}", path.parent.name) and re.fullmatch(r"[0-9a-f]{32}\.dcm", path.name)
    assert uid_key("1.2.3") == uid_key("1.2.3") != uid_key("1.2.4")
    with pytest.raises(ValueError, match="must be a DICOM UID"):
        spool.instance_path("1.2.3", "../x")


def test_write_durable_replaces_atomically_and_leaves_no_temporary(tmp_path: Path) -> None:
    target = tmp_path / "new" / "a.dcm"
    write_durable(target, b"first")
    write_durable(target, b"second version")
    assert target.read_bytes() == b"second version"
    assert sorted(p.name for p in target.parent.iterdir()) == ["a.dcm"]


def test_spool_lock_keeps_a_second_node_out(tmp_path: Path) -> None:
    first, second = Spool(tmp_path).create(), Spool(tmp_path)
    first.lock()
    try:
        with pytest.raises(SpoolLockedError, match=r"in use by another diffseg serve \(pid \d+\)"):
            second.lock()
    finally:
        first.unlock()
    second.lock()  # free again once released
    second.unlock()


# -- the job queue -------------------------------------------------------------------------------------------


def _record(queue: JobQueue, study: str, sop: str, now: float, modality: str = "CT", series: str = ".1") -> str:
    return queue.record_instance(
        study_uid=study,
        series_uid=study + series,
        sop_instance_uid=sop,
        sop_class_uid="1.2.840.10008.5.1.4.1.1.2",
        modality=modality,
        path=f"incoming/{uid_key(study)}/{uid_key(sop)}.dcm",
        calling_aet="PACS",
        size_bytes=1000,
        now=now,
    )


def _ready(queue: JobQueue, now: float, idle: float = 1.0, max_wait: float = 3600.0) -> list:
    return queue.enqueue_ready_studies(idle, max_wait, now=now)


def test_queue_is_wal_and_closes_studies_after_the_idle_time(tmp_path: Path) -> None:
    queue = JobQueue(tmp_path / "q.sqlite", input_modalities=("CT",))
    with sqlite3.connect(tmp_path / "q.sqlite") as db:
        assert db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    t0 = 1000.0
    for i in range(3):
        assert _record(queue, "1.2.3", f"1.2.3.{i}", t0 + i) == "new"  # last arrival at t0 + 2
    assert _record(queue, "1.2.3", "1.2.3.1", t0 + 2) == "duplicate"  # the same instance again: counted once
    assert queue.study_bytes("1.2.3") == 3000
    assert _ready(queue, t0 + 6.9, idle=5.0) == []
    (job,) = _ready(queue, t0 + 7.0, idle=5.0)
    assert (job.state, job.study_uid, job.version, job.instances, job.runs) == ("queued", "1.2.3", 1, 3, 0)
    assert _ready(queue, t0 + 100, idle=5.0) == []  # nothing new: no second job
    assert queue.summary() == {
        "receiving": 0,
        "queued": 1,
        "running": 0,
        "sending": 0,
        "done": 0,
        "failed": 0,
        "instances": 3,
        "late_instances": 0,
        "purged": 0,
    }
    queue.close()


def _finish(queue: JobQueue, job, key: str = "k1") -> object:
    if job.state == "queued":
        job = queue.start_run(job.id)
    outputs = {"seg": {"path": "results/x/v1/seg.dcm", "series_instance_uid": "2.25.2", "sop_instance_uid": "2.25.1"}}
    queue.set_sending(job.id, outputs=outputs, input_key=key, model_version="m")
    return queue.mark_done(job.id, sent_to="PACS@h:1", sent_status=0)


def test_queue_state_machine_and_resume_after_reopen(tmp_path: Path) -> None:
    db_path = tmp_path / "q.sqlite"
    queue = JobQueue(db_path, input_modalities=("CT",))
    _record(queue, "1.2.3", "1.2.3.1", 0.0)
    (job,) = _ready(queue, 10.0)
    job = queue.start_run(job.id)
    assert (job.state, job.runs, job.instances) == ("running", 1, 1)
    assert _record(queue, "1.2.3", "1.2.3.9", 11.0) == "late"  # the job has started
    queue.close()

    queue = JobQueue(db_path)  # a restart: the running job is offered again; the input modalities were kept
    assert queue.input_modalities == ("CT",)
    assert queue.next_job().id == job.id
    job = queue.start_run(job.id)
    assert (job.state, job.runs, job.instances) == ("running", 2, 2)
    outputs = {"seg": {"path": "results/x/v1/seg.dcm", "series_instance_uid": "2.25.2", "sop_instance_uid": "2.25.1"}}
    job = queue.set_sending(job.id, outputs=outputs, input_key="k", model_version="m")
    assert job.outputs == outputs
    retry_at = time.time() + 60
    job = queue.send_failed(job.id, "association rejected", retry_at)
    assert (job.state, job.send_attempts, job.reason) == ("sending", 1, "association rejected")
    assert queue.next_job() is None  # backing off
    assert queue.next_job(now=retry_at).id == job.id
    assert queue.next_wakeup() == pytest.approx(retry_at)
    job = queue.mark_done(job.id, sent_to="PACS@h:1", sent_status=0)
    assert (job.state, job.reason, job.sent_status) == ("done", None, 0)
    assert queue.next_job(now=time.time() + 1e6) is None  # done is never offered again
    with pytest.raises(RuntimeError, match=r"expected state in \('sending',\), found state 'done'"):
        queue.mark_done(job.id, sent_to="PACS@h:1", sent_status=0)
    with pytest.raises(RuntimeError, match="found state 'done'"):
        queue.start_run(job.id)
    assert queue.summary()["late_instances"] == 1
    queue.close()


def test_a_study_waits_for_every_input_then_fails_naming_what_never_came(tmp_path: Path) -> None:
    queue = JobQueue(tmp_path / "q.sqlite", input_modalities=("PT", "CT"))
    _record(queue, "1.2.3", "1.2.3.1", 0.0)  # CT only
    _record(queue, "1.2.4", "1.2.4.1", 0.0)
    assert _ready(queue, 100.0, max_wait=600.0) == []  # idle, but no PET yet: waits
    (wait,) = [w for w in queue.waiting_studies(1.0, 600.0, now=100.0) if w.study_uid == "1.2.3"]
    assert (wait.why, wait.missing, wait.modalities, wait.fails_at) == ("missing", ("PT",), ("CT",), 600.0)
    assert _record(queue, "1.2.4", "1.2.4.2", 200.0, modality="PT", series=".2") == "new"  # the PET, 200 s late
    (job,) = _ready(queue, 201.0, max_wait=600.0)
    assert (job.study_uid, job.state) == ("1.2.4", "queued")
    assert _ready(queue, 599.0, max_wait=600.0) == []
    (failed,) = _ready(queue, 600.0, max_wait=600.0)
    assert (failed.study_uid, failed.state) == ("1.2.3", "failed")
    assert failed.reason == "PET never arrived (waited 10 min 0 s after the last instance; max_wait_seconds is 600)"
    assert _ready(queue, 10_000.0, max_wait=600.0) == []  # failed once, not again
    # The PET arrives after all: the study's inputs changed, so it gets a second version
    assert _record(queue, "1.2.3", "1.2.3.2", 700.0, modality="PT", series=".2") == "late"
    (again,) = _ready(queue, 702.0, max_wait=600.0)
    assert (again.study_uid, again.version, again.state, again.supersedes) == ("1.2.3", 2, "queued", None)
    queue.close()


def test_inputs_that_change_after_a_job_give_a_new_version_and_nothing_else_does(tmp_path: Path) -> None:
    queue = JobQueue(tmp_path / "q.sqlite")
    _record(queue, "1.2.3", "1.2.3.1", 0.0)
    _record(queue, "1.2.3", "1.2.3.2", 0.0, modality="PT", series=".2")
    (v1,) = _ready(queue, 5.0)
    v1 = queue.start_run(v1.id)
    assert _record(queue, "1.2.3", "1.2.3.3", 6.0, modality="PT", series=".3") == "late"  # while v1 runs
    assert _ready(queue, 20.0) == []  # not while v1 is active
    assert [w.why for w in queue.waiting_studies(1.0, 3600.0, now=20.0)] == ["job_active"]
    v1 = _finish(queue, v1)
    (v2,) = _ready(queue, 21.0)
    assert (v2.version, v2.supersedes) == (2, v1.id)
    v2 = _finish(queue, v2, key="k2")
    assert queue.previous_done(v2).id == v1.id
    # After v2: a resend, and the node's own SEG coming back, change nothing
    assert _record(queue, "1.2.3", "1.2.3.3", 30.0, modality="PT", series=".3") == "duplicate"
    assert _record(queue, "1.2.3", "2.25.1", 30.0, modality="SEG", series=".9") == "ignored"
    assert _ready(queue, 100.0) == [] and queue.waiting_studies(1.0, 3600.0, now=100.0) == []
    queue.close()


def test_requeue_makes_a_new_version_unless_one_is_active_or_purged(tmp_path: Path) -> None:
    queue = JobQueue(tmp_path / "q.sqlite", input_modalities=("CT",))
    with pytest.raises(KeyError, match="not in the queue"):
        queue.requeue("1.2.3")
    _record(queue, "1.2.3", "1.2.3.1", 0.0)
    (v1,) = _ready(queue, 5.0)
    with pytest.raises(ValueError, match=f"job {v1.id} is queued; wait for it to finish"):
        queue.requeue("1.2.3")
    v1 = _finish(queue, v1)
    v2 = queue.requeue("1.2.3", now=10.0)
    assert (v2.version, v2.state, v2.requeued, v2.supersedes) == (2, "queued", 1, v1.id)
    _finish(queue, v2)
    assert queue.studies_to_purge(keep_done_days=1.0, keep_failed_days=30.0, now=time.time() + 3600) == []
    assert queue.studies_to_purge(keep_done_days=1.0, keep_failed_days=30.0, now=time.time() + 86401) == ["1.2.3"]
    queue.mark_purged("1.2.3")
    assert queue.summary()["purged"] == 1 and queue.known_instances() == set()
    with pytest.raises(ValueError, match=r"purged from the spool .* send the study to the node again"):
        queue.requeue("1.2.3")
    queue.close()


def test_purge_waits_for_pending_inputs_and_keeps_failed_studies_longer(tmp_path: Path) -> None:
    queue = JobQueue(tmp_path / "q.sqlite", input_modalities=("CT",))
    _record(queue, "1.2.3", "1.2.3.1", 0.0)
    _record(queue, "1.2.4", "1.2.4.1", 0.0)
    done, failed = _ready(queue, 5.0)
    _finish(queue, done)
    queue.mark_failed(failed.id, "segmentation failed")
    now = time.time()
    assert queue.studies_to_purge(0.0, 30.0, now=now + 1) == ["1.2.3"]
    assert sorted(queue.studies_to_purge(0.0, 30.0, now=now + 31 * 86400)) == ["1.2.3", "1.2.4"]
    _record(queue, "1.2.3", "1.2.3.2", now + 2)  # a late input: kept until its version is done
    assert queue.studies_to_purge(0.0, 30.0, now=now + 3) == []
    queue.close()


def test_a_version_1_queue_is_upgraded_in_place(tmp_path: Path) -> None:
    db_path = tmp_path / "q.sqlite"
    with sqlite3.connect(db_path) as db:  # the schema and rows of a queue written by the previous release
        db.executescript(
            """
            CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
            INSERT INTO meta VALUES ('schema', '1');
            CREATE TABLE instances (sop_instance_uid TEXT PRIMARY KEY, study_uid TEXT NOT NULL,
                series_uid TEXT NOT NULL, sop_class_uid TEXT NOT NULL, modality TEXT, path TEXT NOT NULL,
                calling_aet TEXT, received_at REAL NOT NULL);
            CREATE INDEX instances_study ON instances (study_uid);
            CREATE TABLE studies (study_uid TEXT PRIMARY KEY, first_received REAL NOT NULL,
                last_received REAL NOT NULL, instances INTEGER NOT NULL DEFAULT 0,
                late_instances INTEGER NOT NULL DEFAULT 0);
            CREATE TABLE jobs (id INTEGER PRIMARY KEY AUTOINCREMENT, study_uid TEXT NOT NULL UNIQUE
                REFERENCES studies (study_uid), state TEXT NOT NULL, reason TEXT, runs INTEGER NOT NULL DEFAULT 0,
                send_attempts INTEGER NOT NULL DEFAULT 0, created_at REAL NOT NULL, updated_at REAL NOT NULL,
                started_at REAL, finished_at REAL, next_attempt_at REAL NOT NULL DEFAULT 0, instances INTEGER,
                model_version TEXT, seg_path TEXT, seg_sop_instance_uid TEXT, seg_series_instance_uid TEXT,
                sent_to TEXT, sent_status INTEGER, sent_at REAL);
            INSERT INTO instances VALUES ('1.2.3.1', '1.2.3', '1.2.3.1', '1.2.840.10008.5.1.4.1.1.2', 'CT',
                'incoming/a/b.dcm', 'PACS', 1.0);
            INSERT INTO studies VALUES ('1.2.3', 1.0, 1.0, 1, 0);
            INSERT INTO jobs (study_uid, state, created_at, updated_at, instances, model_version, seg_path,
                seg_sop_instance_uid, seg_series_instance_uid) VALUES ('1.2.3', 'sending', 2.0, 2.0, 1, 'm',
                'results/x.seg.dcm', '2.25.1', '2.25.2');
            """
        )
    queue = JobQueue(db_path)
    (job,) = queue.jobs()
    assert (job.state, job.version, job.model_version) == ("sending", 1, "m")
    assert job.outputs == {
        "seg": {"path": "results/x.seg.dcm", "series_instance_uid": "2.25.2", "sop_instance_uid": "2.25.1"}
    }
    assert queue.meta("schema") == "2" and queue.study_bytes("1.2.3") == 0
    queue.close()


def test_restart_gives_receiving_studies_a_fresh_idle_period(tmp_path: Path) -> None:
    queue = JobQueue(tmp_path / "q.sqlite", input_modalities=("CT",))
    _record(queue, "1.2.3", "1.2.3.1", 0.0)
    _record(queue, "1.2.4", "1.2.4.1", 0.0)
    assert _ready(queue, 0.5) == []
    assert len(_ready(queue, 1.0)) == 2  # both closed
    _record(queue, "1.2.5", "1.2.5.1", 0.0)  # still receiving
    assert queue.restart_idle_timers(now=50.0) == 1
    assert _ready(queue, 50.5) == []
    assert [j.study_uid for j in _ready(queue, 51.0)] == ["1.2.5"]
    queue.close()


def test_failed_job_keeps_its_reason_and_status_reports_it(tmp_path: Path) -> None:
    spool = Spool(tmp_path / "spool").create()
    queue = JobQueue(spool.db_path)
    for study in ("1.2.3", "1.2.4"):
        _record(queue, study, study + ".1", 0.0)
        _record(queue, study, study + ".2", 0.0, modality="PT", series=".2")
    _record(queue, "1.2.5", "1.2.5.1", time.time())  # CT only: waiting for the PET
    j1, j2 = _ready(queue, 5.0)
    queue.mark_failed(j1.id, "segmentation failed: DicomInputError: no PET series")
    queue.start_run(j2.id)
    queue.set_meta("timing", json.dumps({"idle_seconds": 0.0, "max_wait_seconds": 3600.0}))
    queue.close()
    status = spool_status(spool.root)
    assert status["summary"]["failed"] == 1 and status["summary"]["running"] == 1
    assert [(w["study_uid"], w["why"]) for w in status["waiting"]] == [("1.2.5", "missing")]
    text = format_status(status)
    assert "failed 1" in text and "reason: segmentation failed: DicomInputError: no PET series" in text
    assert "study 1.2.5  1 instances (CT)" in text and "waiting for PET (fails at" in text
    assert cli_main(["serve", "--status", "--spool", str(spool.root), "--json"]) == 0


def test_requeue_from_the_command_line(tmp_path: Path, capsys) -> None:
    spool = Spool(tmp_path / "spool").create()
    queue = JobQueue(spool.db_path, input_modalities=("CT",))
    _record(queue, "1.2.3", "1.2.3.1", 0.0)
    (job,) = _ready(queue, 5.0)
    _finish(queue, job)
    queue.close()
    assert cli_main(["serve", "requeue", "1.2.3", "--spool", str(spool.root)]) == 0
    assert "study 1.2.3: job 2 (version 2) queued" in capsys.readouterr().out
    assert cli_main(["serve", "requeue", "1.2.3", "--spool", str(spool.root)]) == 2
    assert "job 2 is queued; wait for it to finish" in capsys.readouterr().err
    assert cli_main(["serve", "requeue", "9.9", "--spool", str(spool.root)]) == 2
    assert "study 9.9 is not in the queue" in capsys.readouterr().err
    assert cli_main(["serve", "requeue", "../etc", "--spool", str(spool.root)]) == 2
    assert "STUDY_UID must be a DICOM UID" in capsys.readouterr().err


def test_status_of_a_folder_without_queue_is_a_clear_error(tmp_path: Path, capsys) -> None:
    assert cli_main(["serve", "--status", "--spool", str(tmp_path)]) == 2
    assert "no job queue in" in capsys.readouterr().err
    assert cli_main(["serve"]) == 2
    assert "--config FILE is required" in capsys.readouterr().err


# -- back-off and output UIDs --------------------------------------------------------------------------------


def test_backoff_doubles_and_caps() -> None:
    assert [backoff_seconds(n, 2.0, 30.0) for n in range(1, 7)] == [2.0, 4.0, 8.0, 16.0, 30.0, 30.0]
    assert backoff_seconds(10_000, 1.0, 300.0) == 300.0
    with pytest.raises(ValueError, match="failures must be >= 1"):
        backoff_seconds(0, 1.0, 2.0)


def test_output_uids_are_deterministic_valid_and_distinct() -> None:
    a = output_uids("1.2.3", "default@1", "k1", "seg")
    assert a == output_uids("1.2.3", "default@1", "k1", "seg")
    others = [
        output_uids("1.2.3", "default@2", "k1", "seg"),
        output_uids("1.2.4", "default@1", "k1", "seg"),
        output_uids("1.2.3", "default@1", "k2", "seg"),  # other inputs: a new version
        output_uids("1.2.3", "default@1", "k1", "rtstruct"),
    ]
    uids = {a.series_instance_uid, a.sop_instance_uid}
    for o in others:
        uids |= {o.series_instance_uid, o.sop_instance_uid}
    assert len(uids) == 10
    for uid in uids:
        assert uid.startswith("2.25.") and is_valid_uid(uid) and len(uid) <= 64
    with pytest.raises(ValueError, match="study_uid must be a DICOM UID"):
        output_uids("x", "m", "k", "seg")
    with pytest.raises(ValueError, match="input_key must be a non-empty string"):
        output_uids("1.2.3", "m", "", "seg")


def test_input_key_depends_on_every_instance_not_on_order() -> None:
    key = input_key_of({"1.2.3": ["1", "2"], "1.2.4": ["3"]})
    assert key == input_key_of({"1.2.4": ["3"], "1.2.3": ["2", "1"]})
    assert key != input_key_of({"1.2.3": ["1", "2", "4"], "1.2.4": ["3"]})  # a completed series
    assert key != input_key_of({"1.2.3": ["1", "2"], "1.2.5": ["3"]})  # another PET series


# -- received instances --------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def ct_file(tmp_path_factory) -> Path:
    return tiny_study(tmp_path_factory.mktemp("tiny"), n_ct=1, n_pt=0)[0]


def test_inspect_accepts_a_good_instance(ct_file: Path) -> None:
    ds = pydicom.dcmread(ct_file)
    inst = inspect_instance(ct_file.read_bytes(), ds.SOPClassUID, ds.SOPInstanceUID)
    assert (inst.study_uid, inst.sop_instance_uid, inst.modality) == (
        ds.StudyInstanceUID,
        ds.SOPInstanceUID,
        "CT",
    )


@pytest.mark.parametrize(
    ("damage", "status", "message"),
    [
        (lambda b: b[:-200], STATUS_CANNOT_UNDERSTAND, "pixel data truncated: 312 bytes, expected 512"),
        (lambda b: b[:-1], STATUS_CANNOT_UNDERSTAND, "pixel data truncated: 511 bytes, expected 512"),
        (lambda b: b[:400], STATUS_CANNOT_UNDERSTAND, "data set has no StudyInstanceUID"),
        (lambda b: b[:132] + b"this is not DICOM" * 20, STATUS_CANNOT_UNDERSTAND, "has no StudyInstanceUID"),
        (lambda b: b"not DICOM at all" * 20, STATUS_CANNOT_UNDERSTAND, "data set does not decode"),
    ],
)
def test_inspect_refuses_damaged_data(ct_file: Path, damage, status: int, message: str) -> None:
    ds = pydicom.dcmread(ct_file)
    with pytest.raises(InstanceError, match=re.escape(message)) as info:
        inspect_instance(damage(ct_file.read_bytes()), ds.SOPClassUID, ds.SOPInstanceUID)
    assert info.value.status == status


def test_inspect_refuses_uid_mismatch_and_bad_uids(ct_file: Path, tmp_path: Path) -> None:
    ds = pydicom.dcmread(ct_file)
    with pytest.raises(InstanceError, match="differs from the request's") as info:
        inspect_instance(ct_file.read_bytes(), ds.SOPClassUID, "1.2.3")
    assert info.value.status == STATUS_MISMATCH
    with pytest.warns(UserWarning, match="Invalid value for VR UI"):  # pydicom validates on assignment
        ds.StudyInstanceUID = "1.2.3/../../x"
    bad = tmp_path / "bad.dcm"
    ds.save_as(bad)
    with pytest.raises(InstanceError, match="StudyInstanceUID must be a DICOM UID") as info:
        inspect_instance(bad.read_bytes(), ds.SOPClassUID, ds.SOPInstanceUID)
    assert info.value.status == STATUS_CANNOT_UNDERSTAND


# -- crash recovery ------------------------------------------------------------------------------------------


def test_recover_records_spooled_files_and_drops_partial_writes(tmp_path: Path, ct_file: Path) -> None:
    spool = Spool(tmp_path / "spool").create()
    ds = pydicom.dcmread(ct_file)
    path = write_durable(spool.instance_path(ds.StudyInstanceUID, ds.SOPInstanceUID), ct_file.read_bytes())
    partial = path.parent / ".abc.dcm.x1y2.tmp"
    partial.write_bytes(b"half")
    foreign = spool.incoming / "0" / "not-ours.dcm"
    foreign.parent.mkdir()
    foreign.write_bytes(b"junk")
    queue = JobQueue(spool.db_path)
    counts = recover_spool(spool, queue)
    assert counts == {
        "partial_writes_removed": 1,
        "instances_recovered": 1,
        "files_ignored": 1,
        "idle_timers_restarted": 1,
    }
    assert not partial.exists() and foreign.exists()
    assert queue.known_instances() == {str(path.relative_to(spool.root))}
    assert recover_spool(spool, queue)["instances_recovered"] == 0  # idempotent
    queue.close()


# -- logs ----------------------------------------------------------------------------------------------------


def test_logs_are_one_json_object_per_line(tmp_path: Path) -> None:
    stream = io.StringIO()
    handlers = configure_logging(tmp_path / "serve.log", logging.INFO, stream)
    try:
        logger = logging.getLogger("diffseg")
        logger.info("job %d done", 7, extra={"event": "job_done", "job": 7, "status": 0})
        logger.debug("not written at INFO")
        try:
            raise OSError(28, "No space left on device")
        except OSError:
            logger.exception("disk", extra={"event": "store_failed"})
        logging.getLogger("pynetdicom").info("one line per PDU: not written")
        logging.getLogger("pynetdicom.transport").error("TCP Initialisation Error")
    finally:
        remove_handlers(handlers)
    assert logging.getLogger("diffseg").propagate and logging.getLogger("pynetdicom").propagate
    file_lines = (tmp_path / "serve.log").read_text().splitlines()
    assert file_lines == stream.getvalue().splitlines() and len(file_lines) == 3
    first, second, third = map(json.loads, file_lines)
    assert first["message"] == "job 7 done" and first["event"] == "job_done" and first["job"] == 7
    assert first["level"] == "INFO" and first["time"].endswith("+00:00") and first["logger"] == "diffseg"
    assert second["event"] == "store_failed" and "No space left on device" in second["exception"]
    assert third["logger"] == "pynetdicom.transport" and third["level"] == "ERROR"


def test_json_formatter_writes_unserialisable_extras_as_text() -> None:
    record = logging.LogRecord("diffseg", logging.INFO, __file__, 1, "x", None, None)
    record.path = Path("/a/b")
    assert json.loads(JsonFormatter().format(record))["path"] == "/a/b"


def test_options_reject_bad_values(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="allowed_calling_aets must be a non-empty list"):
        _options(tmp_path, allowed_calling_aets="PACS")
    with pytest.raises(ValueError, match="max_send_attempts must be an integer >= 1"):
        _options(tmp_path, max_send_attempts=0)
    with pytest.raises(ValueError, match=r"allowed_calling_aets\[1\] must be 1-16"):
        _options(tmp_path, allowed_calling_aets=("PACS", "BAD\\AET"))
    assert _options(tmp_path, allowed_calling_aets=(" PACS ",)).allowed_calling_aets == ("PACS",)


# -- the worker's decisions (no network: the destination port has no listener) ----------------------------------


def _closed_port() -> int:
    import socket

    with socket.socket() as s:  # bound, never listening: connections are refused at once
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_worker_fails_a_job_interrupted_max_runs_times(tmp_path: Path) -> None:
    from diffseg.runtime.serve import Worker

    options = _options(tmp_path, max_runs=2)
    spool = Spool(options.spool_dir).create()
    queue = JobQueue(spool.db_path, input_modalities=("CT",))
    _record(queue, "1.2.3", "1.2.3.1", 0.0)
    (job,) = _ready(queue, 5.0)
    queue.start_run(job.id)
    job = queue.start_run(job.id)  # two runs started, none finished (killed twice)
    worker = Worker(options, spool, queue, pipeline=None)
    job = worker.process(job)
    assert job.state == "failed" and job.reason.startswith("segmentation started 2 times without finishing")
    queue.close()


def test_worker_backs_off_then_fails_when_the_destination_never_answers(tmp_path: Path, ct_file: Path) -> None:
    from diffseg.runtime.serve import Worker

    options = _options(
        tmp_path,
        destination=Destination("PACS", "127.0.0.1", _closed_port()),
        max_send_attempts=3,
        retry_base_seconds=0.25,
        network_timeout=5.0,
    )
    spool = Spool(options.spool_dir).create()
    seg = write_durable(spool.result_dir("1.2.3", 1) / "seg.dcm", ct_file.read_bytes())  # any DICOM file will do
    queue = JobQueue(spool.db_path, input_modalities=("CT",))
    _record(queue, "1.2.3", "1.2.3.1", 0.0)
    (job,) = _ready(queue, 5.0)
    queue.start_run(job.id)
    outputs = {"seg": {"path": str(seg.relative_to(spool.root)), "series_instance_uid": "2", "sop_instance_uid": "1"}}
    job = queue.set_sending(job.id, outputs=outputs, input_key="k", model_version="m")
    worker = Worker(options, spool, queue, pipeline=None)
    for attempt, wait in ((1, 0.25), (2, 0.5)):  # retry_base_seconds · 2^(attempt − 1)
        before = time.time()
        job = worker.process(job)
        after = time.time()
        assert (job.state, job.send_attempts) == ("sending", attempt)
        assert "not reachable" in job.reason
        # the next try is scheduled `wait` s after the failure, which happened between before and after
        assert before + wait - 1e-3 <= job.next_attempt_at <= after + wait + 1e-3
    job = worker.process(job)
    assert job.state == "failed"
    assert job.reason.startswith("outputs not accepted by PACS@127.0.0.1:") and "after 3 attempts" in job.reason
    queue.close()


def test_model_identity_comes_from_the_manifest() -> None:
    """The output UIDs derive from name@version+fp32 sha256 of the shipped package, read here from its manifest."""
    from types import SimpleNamespace

    from diffseg.runtime.manifest import load_package
    from diffseg.runtime.serve.pipeline import model_version_of

    package = load_package("default")
    manifest = package.manifest
    sha = manifest.raw["files"]["fp32"]["sha256"]
    identity = model_version_of(SimpleNamespace(package=package), "default")
    assert identity == f"{manifest.name}@{manifest.version}+{sha[:12]}"
    assert model_version_of(object(), "mymodel").startswith("mymodel@diffseg-")


# -- received instances read from a file, codecs, log rotation (issue #14) --------------------------------------


@pytest.mark.parametrize(
    ("damage", "message"),
    [
        (lambda b: b[:-200], "pixel data truncated: 312 bytes, expected 512"),
        (lambda b: b[:-1], "pixel data truncated: 511 bytes, expected 512"),
        (lambda b: b[:400], "data set has no StudyInstanceUID"),
        (lambda b: b"not DICOM at all" * 20, "data set does not decode"),
    ],
)
def test_inspect_of_a_file_refuses_the_same_damage(ct_file: Path, tmp_path: Path, damage, message) -> None:
    ds = pydicom.dcmread(ct_file)
    path = tmp_path / "received.dcm"
    path.write_bytes(damage(ct_file.read_bytes()))
    with pytest.raises(InstanceError, match=re.escape(message)):
        inspect_instance(path, ds.SOPClassUID, ds.SOPInstanceUID)


def test_inspect_of_a_file_leaves_the_pixel_data_on_disk(tmp_path: Path) -> None:
    """A 32 MiB instance is checked with well under 1 MiB of Python allocations (tracemalloc's peak)."""
    import tracemalloc

    (path,) = tiny_study(tmp_path / "big", n_ct=1, n_pt=0, size=4096)
    ds = pydicom.dcmread(path, stop_before_pixels=True)
    tracemalloc.start()
    try:
        inst = inspect_instance(path, ds.SOPClassUID, ds.SOPInstanceUID)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert inst.sop_instance_uid == ds.SOPInstanceUID
    assert path.stat().st_size > 32 * 2**20 and peak < 2**20
    cut = tmp_path / "cut.dcm"
    cut.write_bytes(path.read_bytes()[:-1000])
    with pytest.raises(InstanceError, match=f"pixel data truncated: {4096 * 4096 * 2 - 1000} bytes"):
        inspect_instance(cut, ds.SOPClassUID, ds.SOPInstanceUID)


@pytest.mark.parametrize("syntax", ["1.2.840.10008.1.2.1.99", "1.2.840.10008.1.2.2", "1.2.840.10008.1.2"])
def test_inspect_of_a_file_in_each_uncompressed_syntax(ct_file: Path, tmp_path: Path, syntax: str) -> None:
    read = pydicom.dcmread(ct_file)
    ds = pydicom.Dataset()  # a new data set: pydicom does not re-encode a read one to big endian
    for elem in read:
        ds.add(elem)
    ds.file_meta = read.file_meta
    ds.file_meta.TransferSyntaxUID = syntax
    path = tmp_path / "x.dcm"
    ds.save_as(path, enforce_file_format=True)
    assert str(pydicom.dcmread(path).file_meta.TransferSyntaxUID) == syntax
    assert inspect_instance(path, ds.SOPClassUID, ds.SOPInstanceUID).study_uid == ds.StudyInstanceUID
    cut = tmp_path / "cut.dcm"
    cut.write_bytes(path.read_bytes()[:-200])
    deflated = syntax == "1.2.840.10008.1.2.1.99"  # a cut deflate stream does not inflate
    message = "data set does not decode" if deflated else "pixel data truncated: 312 bytes, expected 512"
    with pytest.raises(InstanceError, match=message):
        inspect_instance(cut, ds.SOPClassUID, ds.SOPInstanceUID)


def test_decodable_syntaxes_are_what_pydicom_decoders_say(monkeypatch) -> None:
    from pydicom.pixels.decoders.base import get_decoder

    from diffseg.runtime.dicom import codecs

    support = {s.uid: s for s in codecs.transfer_syntax_support()}
    for uid, s in support.items():
        decoder = get_decoder(uid)
        full = [p for p in decoder.available_plugins if p not in codecs.PARTIAL_PLUGINS.get(uid, {})]
        native = uid in codecs.UNCOMPRESSED or uid == "1.2.840.10008.1.2.5"
        assert s.decodable == (decoder.is_available and bool(full or native)), uid
    decodable = codecs.decodable_transfer_syntaxes()
    assert decodable[: len(codecs.UNCOMPRESSED)] == (
        "1.2.840.10008.1.2.1",
        "1.2.840.10008.1.2",
        "1.2.840.10008.1.2.1.99",
        "1.2.840.10008.1.2.2",
    )
    # the dependencies diffseg declares: JPEG Lossless (GDCM), JPEG-LS, JPEG 2000, RLE
    for uid in ("1.2.840.10008.1.2.4.57", "1.2.840.10008.1.2.4.70", "1.2.840.10008.1.2.4.80", "1.2.840.10008.1.2.4.90"):
        assert uid in decodable, support[uid]
    assert "1.2.840.10008.1.2.5" in decodable
    # 12-bit JPEG Extended only with a plugin that decodes 12-bit samples
    extended = support["1.2.840.10008.1.2.4.51"]
    assert extended.decodable == ("pylibjpeg" in extended.plugins)
    # and the SCP offers exactly the decodable list for every storage SOP class
    from diffseg.runtime.serve.scp import StorageSCP

    monkeypatch.setattr(codecs, "decodable_transfer_syntaxes", lambda: ("1.2.840.10008.1.2.1", "1.2.840.10008.1.2.5"))
    scp = StorageSCP.__new__(StorageSCP)
    scp.options = _options(Path("/nonexistent"))
    scp.transfer_syntaxes = codecs.decodable_transfer_syntaxes()
    ae = scp._build_ae()
    storage = [cx for cx in ae.supported_contexts if cx.abstract_syntax != "1.2.840.10008.1.1"]
    assert len(storage) > 100 and {tuple(cx.transfer_syntax) for cx in storage} == {scp.transfer_syntaxes}


def test_info_lists_the_transfer_syntaxes(capsys) -> None:
    assert cli_main(["info", "--json"]) == 0
    listed = {s["uid"]: s for s in json.loads(capsys.readouterr().out)["transfer_syntaxes"]}
    sv1 = listed["1.2.840.10008.1.2.4.70"]
    assert sv1["decodable"] and sv1["lossless"] and "gdcm" in sv1["plugins"]
    from diffseg.runtime.commands.info import _print_transfer_syntaxes

    _print_transfer_syntaxes(list(listed.values()))  # what `diffseg info` prints after the engines
    text = capsys.readouterr().out
    assert "DICOM transfer syntaxes" in text
    assert re.search(r"1\.2\.840\.10008\.1\.2\.4\.70 +lossless +yes \(gdcm", text)


def test_serve_log_rotates_and_keeps_the_mode(tmp_path: Path) -> None:
    import os

    path = tmp_path / "serve.log"
    old = os.umask(0o022)
    try:
        handlers = configure_logging(path, logging.INFO, io.StringIO(), max_mb=1 / 1024, backups=2, file_mode=0o640)
        try:
            for i in range(60):
                logging.getLogger("diffseg").info("line %d %s", i, "x" * 40, extra={"event": "test"})
        finally:
            remove_handlers(handlers)
        assert sorted(p.name for p in tmp_path.iterdir()) == ["serve.log", "serve.log.1", "serve.log.2"]
        for p in tmp_path.iterdir():
            assert p.stat().st_size <= 1024 and p.stat().st_mode & 0o777 == 0o640, p.name
        last = [json.loads(line)["message"] for line in path.read_text().splitlines()]
        assert last[-1] == "line 59 " + "x" * 40  # the newest lines are in serve.log
        handlers = configure_logging(tmp_path / "plain.log", logging.INFO, io.StringIO())  # umask: 0644
        remove_handlers(handlers)
        assert (tmp_path / "plain.log").stat().st_mode & 0o777 == 0o644
    finally:
        os.umask(old)
    with pytest.raises(ValueError, match="backups must be an integer >= 1, got 0"):
        configure_logging(tmp_path / "x.log", backups=0)
    with pytest.raises(ValueError, match="max_mb must be a number >= 0, got -1"):
        configure_logging(tmp_path / "x.log", max_mb=-1)
