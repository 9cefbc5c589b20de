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
    is_valid_uid,
    load_config,
    recover_spool,
    seg_uids,
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


def _record(queue: JobQueue, study: str, sop: str, now: float) -> bool:
    return queue.record_instance(
        study_uid=study,
        series_uid=study + ".1",
        sop_instance_uid=sop,
        sop_class_uid="1.2.840.10008.5.1.4.1.1.2",
        modality="CT",
        path=f"incoming/{uid_key(study)}/{uid_key(sop)}.dcm",
        calling_aet="PACS",
        now=now,
    )


def test_queue_is_wal_and_closes_studies_after_the_idle_time(tmp_path: Path) -> None:
    queue = JobQueue(tmp_path / "q.sqlite")
    with sqlite3.connect(tmp_path / "q.sqlite") as db:
        assert db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    t0 = 1000.0
    for i in range(3):
        _record(queue, "1.2.3", f"1.2.3.{i}", t0 + i)  # last arrival at t0 + 2
    _record(queue, "1.2.3", "1.2.3.1", t0 + 2)  # the same instance again: counted once
    assert queue.enqueue_idle_studies(5.0, now=t0 + 6.9) == []
    (job,) = queue.enqueue_idle_studies(5.0, now=t0 + 7.0)
    assert (job.state, job.study_uid, job.instances, job.runs) == ("queued", "1.2.3", 3, 0)
    assert queue.enqueue_idle_studies(5.0, now=t0 + 100) == []  # one job per study, ever
    assert queue.summary() == {
        "receiving": 0,
        "queued": 1,
        "running": 0,
        "sending": 0,
        "done": 0,
        "failed": 0,
        "instances": 3,
        "late_instances": 0,
    }
    queue.close()


def test_queue_state_machine_and_resume_after_reopen(tmp_path: Path) -> None:
    db_path = tmp_path / "q.sqlite"
    queue = JobQueue(db_path)
    _record(queue, "1.2.3", "1.2.3.1", 0.0)
    (job,) = queue.enqueue_idle_studies(1.0, now=10.0)
    job = queue.start_run(job.id, instances=1)
    assert (job.state, job.runs) == ("running", 1)
    assert _record(queue, "1.2.3", "1.2.3.9", 11.0) is True  # late: the job has started
    queue.close()

    queue = JobQueue(db_path)  # a restart: the running job is offered again
    assert queue.next_job().id == job.id
    job = queue.start_run(job.id, instances=2)
    assert (job.state, job.runs, job.instances) == ("running", 2, 2)
    job = queue.set_sending(
        job.id,
        seg_path="results/x.seg.dcm",
        sop_instance_uid="2.25.1",
        series_instance_uid="2.25.2",
        model_version="m",
    )
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
        queue.start_run(job.id, instances=2)
    assert queue.summary()["late_instances"] == 1
    queue.close()


def test_restart_gives_receiving_studies_a_fresh_idle_period(tmp_path: Path) -> None:
    queue = JobQueue(tmp_path / "q.sqlite")
    _record(queue, "1.2.3", "1.2.3.1", 0.0)
    _record(queue, "1.2.4", "1.2.4.1", 0.0)
    assert queue.enqueue_idle_studies(1.0, now=0.5) == []
    assert len(queue.enqueue_idle_studies(1.0, now=1.0)) == 2  # both closed
    _record(queue, "1.2.5", "1.2.5.1", 0.0)  # still receiving
    assert queue.restart_idle_timers(now=50.0) == 1
    assert queue.enqueue_idle_studies(1.0, now=50.5) == []
    assert [j.study_uid for j in queue.enqueue_idle_studies(1.0, now=51.0)] == ["1.2.5"]
    queue.close()


def test_failed_job_keeps_its_reason_and_status_reports_it(tmp_path: Path) -> None:
    spool = Spool(tmp_path / "spool").create()
    queue = JobQueue(spool.db_path)
    _record(queue, "1.2.3", "1.2.3.1", 0.0)
    _record(queue, "1.2.4", "1.2.4.1", 0.0)
    j1, j2 = queue.enqueue_idle_studies(1.0, now=5.0)
    queue.mark_failed(j1.id, "segmentation failed: DicomInputError: no PET series")
    queue.start_run(j2.id, 1)
    queue.close()
    status = spool_status(spool.root)
    assert status["summary"]["failed"] == 1 and status["summary"]["running"] == 1
    text = format_status(status)
    assert "failed 1" in text and "reason: segmentation failed: DicomInputError: no PET series" in text
    assert cli_main(["serve", "--status", "--spool", str(spool.root), "--json"]) == 0


def test_status_of_a_folder_without_queue_is_a_clear_error(tmp_path: Path, capsys) -> None:
    assert cli_main(["serve", "--status", "--spool", str(tmp_path)]) == 2
    assert "no job queue in" in capsys.readouterr().err
    assert cli_main(["serve"]) == 2
    assert "--config FILE is required" in capsys.readouterr().err


# -- back-off and SEG UIDs -----------------------------------------------------------------------------------


def test_backoff_doubles_and_caps() -> None:
    assert [backoff_seconds(n, 2.0, 30.0) for n in range(1, 7)] == [2.0, 4.0, 8.0, 16.0, 30.0, 30.0]
    assert backoff_seconds(10_000, 1.0, 300.0) == 300.0
    with pytest.raises(ValueError, match="failures must be >= 1"):
        backoff_seconds(0, 1.0, 2.0)


def test_seg_uids_are_deterministic_valid_and_distinct() -> None:
    a = seg_uids("1.2.3", "default@1")
    assert a == seg_uids("1.2.3", "default@1")
    assert a != seg_uids("1.2.3", "default@2") and a != seg_uids("1.2.4", "default@1")
    for uid in (a.series_instance_uid, a.sop_instance_uid):
        assert uid.startswith("2.25.") and is_valid_uid(uid) and len(uid) <= 64
    assert a.series_instance_uid != a.sop_instance_uid
    with pytest.raises(ValueError, match="study_uid must be a DICOM UID"):
        seg_uids("x", "m")


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
    queue = JobQueue(spool.db_path)
    _record(queue, "1.2.3", "1.2.3.1", 0.0)
    (job,) = queue.enqueue_idle_studies(1.0, now=5.0)
    queue.start_run(job.id, 1)
    job = queue.start_run(job.id, 1)  # two runs started, none finished (killed twice)
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
    seg = write_durable(spool.result_path("1.2.3"), ct_file.read_bytes())  # any DICOM file stands for the SEG
    queue = JobQueue(spool.db_path)
    _record(queue, "1.2.3", "1.2.3.1", 0.0)
    (job,) = queue.enqueue_idle_studies(1.0, now=5.0)
    queue.start_run(job.id, 1)
    job = queue.set_sending(
        job.id,
        seg_path=str(seg.relative_to(spool.root)),
        sop_instance_uid="2.25.1",
        series_instance_uid="2.25.2",
        model_version="m",
    )
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
    assert job.reason.startswith("SEG not accepted by PACS@127.0.0.1:") and "after 3 attempts" in job.reason
    queue.close()


def test_model_identity_comes_from_the_manifest() -> None:
    """The SEG UIDs derive from name@version+fp32 sha256 of the shipped package, read here from its manifest."""
    from types import SimpleNamespace

    from diffseg.runtime.manifest import load_package
    from diffseg.runtime.serve.pipeline import model_version_of

    package = load_package("default")
    manifest = package.manifest
    sha = manifest.raw["files"]["fp32"]["sha256"]
    identity = model_version_of(SimpleNamespace(package=package), "default")
    assert identity == f"{manifest.name}@{manifest.version}+{sha[:12]}"
    assert model_version_of(object(), "mymodel").startswith("mymodel@diffseg-")
