"""The DICOM node's limits and files: instance and study size limits, the disk floor, a cut upload, file modes, log
rotation and AE-title rejections, with real clients (dcmtk in ``/usr/bin``, pynetdicom) in a private network
namespace. The node runs as a child process (``diffseg serve --no-worker``) unless a test needs its inside.

References: PS3.4 Table B.2-1 (``0xA700`` out of resources), PS3.8 9.3.4 (A-ASSOCIATE-RJ reasons; dcmtk's
"Called AE Title Not Recognized"), the sent files (pydicom data set equality, exact), ``stat`` (modes).
"""

from __future__ import annotations

import io
import os
import time
from pathlib import Path

import pydicom
import pytest
from dicom_net import (
    NodeProcess,
    dcmtk,
    free_port,
    netns_unavailable_reason,
    serve_options,
    store_files,
    tiny_study,
    wait_for,
)

from diffseg.runtime.serve import JobQueue, Spool

pytestmark = pytest.mark.dicom_net

_REASON = netns_unavailable_reason()
if _REASON is not None:
    pytest.skip(f"DICOM network tests skipped: {_REASON}", allow_module_level=True)

MB = 1 << 20
A700 = 0xA700


def _start_with_umask(proc: NodeProcess, umask: int = 0o022) -> NodeProcess:
    old = os.umask(umask)  # the node inherits it
    try:
        return proc.start()
    finally:
        os.umask(old)


@pytest.fixture(scope="module")
def node(netns, tmp_path_factory):
    """A receive-only node with tiny size limits: instances up to 20 KiB, studies up to 25 KiB."""
    config = {"idle_seconds": 3600.0, "max_instance_mb": 20 / 1024, "max_study_mb": 25 / 1024}
    proc = _start_with_umask(NodeProcess(tmp_path_factory.mktemp("limits"), free_port(), config))
    yield proc
    assert proc.stop() == 0, proc.stderr_path.read_text()[-2000:]


def _files(root: Path) -> list[Path]:
    return sorted(p for p in (root / "incoming").rglob("*") if p.is_file())


def _temporaries(root: Path) -> list[Path]:
    return [p for p in root.rglob(".*") if ".tmp" in p.name]


def _at_least(proc: NodeProcess, event: str, n: int) -> list[dict] | None:
    records = proc.events(event)
    return records if len(records) >= n else None


def _refusals(proc: NodeProcess, limit: str) -> list[dict]:
    return [r for r in proc.events("store_refused") if r.get("limit") == limit]


# -- size limits ---------------------------------------------------------------------------------------------


def test_an_instance_over_max_instance_mb_is_refused(node: NodeProcess, tmp_path: Path) -> None:
    (big,) = tiny_study(tmp_path / "big", n_ct=1, n_pt=0, size=128)  # 32 KiB of pixels
    (small,) = tiny_study(tmp_path / "small", n_ct=1, n_pt=0, size=16)
    assert big.stat().st_size > 20 * 1024 > small.stat().st_size
    assert store_files([big, small], node.port) == [A700, 0x0000]
    (record,) = wait_for(lambda: _refusals(node, "max_instance_mb"), 5, "the refusal in the log")
    assert (record["level"], record["status"], record["limit_mb"]) == ("WARNING", "0xA700", 20 / 1024)
    assert record["size_bytes"] > 20 * 1024 and "max_instance_mb" in record["reason"]
    spool = Spool(node.spool)
    for path, kept in ((big, False), (small, True)):
        ds = pydicom.dcmread(path)
        assert spool.instance_path(ds.StudyInstanceUID, ds.SOPInstanceUID).exists() is kept
    assert _temporaries(node.spool) == []


def test_the_instance_that_takes_its_study_over_max_study_mb_is_refused(node: NodeProcess, tmp_path: Path) -> None:
    files = tiny_study(tmp_path / "study", n_ct=4, n_pt=0, size=64)  # about 9 KB each
    sizes = [p.stat().st_size for p in files]
    limit = 25 * 1024
    assert sizes[0] + sizes[1] + 500 < limit < sum(sizes[:3]) - 500  # clear of the node's own file meta
    assert store_files(files, node.port) == [0x0000, 0x0000, A700, A700]
    study_uid = pydicom.dcmread(files[0]).StudyInstanceUID
    refused = wait_for(lambda: len(_refusals(node, "max_study_mb")) == 2 and _refusals(node, "max_study_mb"), 5, "log")
    assert {r["study_uid"] for r in refused} == {study_uid}
    assert all(r["status"] == "0xA700" and "max_study_mb" in r["reason"] for r in refused)
    spool = Spool(node.spool)
    for path, kept in zip(files, (True, True, False, False), strict=True):
        sent = pydicom.dcmread(path)
        stored = spool.instance_path(study_uid, sent.SOPInstanceUID)
        assert stored.exists() is kept
        if kept:
            assert pydicom.dcmread(stored) == sent  # the earlier instances are kept whole
    # a resend replaces its earlier copy: it is not counted twice against the study
    assert store_files(files[:1], node.port) == [0x0000]
    assert _temporaries(node.spool) == []


def test_instance_files_are_0644_under_umask_022(node: NodeProcess, tmp_path: Path) -> None:
    files = tiny_study(tmp_path / "modes", n_ct=1, n_pt=1)
    assert store_files(files, node.port) == [0x0000, 0x0000]
    spool = Spool(node.spool)
    for path in files:
        ds = pydicom.dcmread(path)
        assert spool.instance_path(ds.StudyInstanceUID, ds.SOPInstanceUID).stat().st_mode & 0o777 == 0o644
    assert (node.spool / "serve.log").stat().st_mode & 0o777 == 0o644


# -- disk floor ----------------------------------------------------------------------------------------------


def test_disk_floor_refuses_keeps_what_was_received_and_recovers(netns, tmp_path: Path) -> None:
    files = tiny_study(tmp_path / "study", n_ct=3, n_pt=0)
    proc = NodeProcess(tmp_path / "floor", free_port(), {"idle_seconds": 3600.0, "min_free_disk_mb": 0})
    proc.start()
    try:
        assert store_files(files[:1], proc.port) == [0x0000]
        kept = _files(proc.spool)
        assert len(kept) == 1
        proc.stop()
        proc.config["min_free_disk_mb"] = 1e9  # a petabyte: more than any disk here has free
        proc.start()
        assert store_files(files[1:], proc.port) == [A700, A700]
        refused = wait_for(lambda: len(proc.events("store_refused")) == 2 and proc.events("store_refused"), 5, "log")
        assert all(r["disk_floor"] is True and r["limit"] == "min_free_disk_mb" for r in refused)
        assert all(r["status"] == "0xA700" and "min_free_disk_mb" in r["reason"] for r in refused)
        assert _files(proc.spool) == kept  # nothing half-written, nothing received lost
        assert pydicom.dcmread(kept[0]) == pydicom.dcmread(files[0])
        assert dcmtk("echoscu", "-aet", "PACS", "-aec", "NODE", "127.0.0.1", str(proc.port)).returncode == 0
        assert proc.process.poll() is None
        proc.stop()
        proc.config["min_free_disk_mb"] = 0
        proc.start()
        assert store_files(files[1:], proc.port) == [0x0000, 0x0000]
        assert len(_files(proc.spool)) == 3
    finally:
        assert proc.stop() == 0


# -- streaming receive ---------------------------------------------------------------------------------------


def test_uploads_stream_into_the_spool_and_a_cut_upload_is_removed(netns, tmp_path: Path, monkeypatch) -> None:
    """In-process SCP: the data set is written into ``incoming/.recv-*.tmp`` while it arrives (pynetdicom's own
    temporary file is never used), and an upload whose association is aborted half-way leaves nothing."""
    from pynetdicom import AE
    from pynetdicom.dimse_messages import C_STORE_RQ
    from pynetdicom.dimse_primitives import C_STORE
    from pynetdicom.dsutils import split_dataset

    from diffseg.runtime.serve.scp import StorageSCP

    def no_fallback(self, event):
        raise AssertionError("the upload did not stream into the spool")

    monkeypatch.setattr(StorageSCP, "_adopt", no_fallback)
    options = serve_options(tmp_path / "spool", min_free_disk_mb=0)
    spool = Spool(options.spool_dir).create()
    queue = JobQueue(spool.db_path)
    scp = StorageSCP(options, spool, queue)
    scp.start()
    try:
        small, large = tiny_study(tmp_path / "study", n_ct=2, n_pt=0, size=256)  # 128 KiB of pixels each
        assert store_files([small], scp.port) == [0x0000]
        ds = pydicom.dcmread(small)
        assert pydicom.dcmread(spool.instance_path(ds.StudyInstanceUID, ds.SOPInstanceUID)) == ds
        # half an upload: the command and the first data set fragments of `large`, then an A-ABORT
        meta, offset = split_dataset(large)
        ae = AE(ae_title="PACS")
        ae.add_requested_context(meta.MediaStorageSOPClassUID, meta.TransferSyntaxUID)
        assoc = ae.associate("127.0.0.1", scp.port, ae_title="NODE")
        assert assoc.is_established
        request = C_STORE()
        request.MessageID, request.Priority = 1, 2
        request.AffectedSOPClassUID = meta.MediaStorageSOPClassUID
        request.AffectedSOPInstanceUID = meta.MediaStorageSOPInstanceUID
        request.DataSet = io.BytesIO(large.read_bytes()[offset:])
        message = C_STORE_RQ()
        message.primitive_to_message(request)
        fragments = message.encode_msg(assoc.accepted_contexts[0].context_id, 16384)
        for _ in range(4):  # the command set, then three 16 KiB data set fragments of about 130 KiB
            assoc.dul.send_pdu(next(fragments))
        partial = wait_for(lambda: list(spool.incoming.glob(".recv-*.tmp")), 5, "the upload's file in the spool")
        assert len(partial) == 1 and 0 < partial[0].stat().st_size < large.stat().st_size
        assoc.abort()
        wait_for(lambda: not _temporaries(spool.root), 5, "the cut upload to be removed")
        assert not spool.instance_path(ds.StudyInstanceUID, meta.MediaStorageSOPInstanceUID).exists()
        # a temporary left by a crash would match what the start-up clean-up deletes
        left = spool.incoming / ".recv-0123456789abcdef.tmp"
        left.write_bytes(b"half")
        assert spool.remove_partial_writes() == 1 and not left.exists()
    finally:
        scp.stop()
        queue.close()


# -- file mode and log rotation ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def mode_node(netns, tmp_path_factory):
    """A node with file_mode 0640 and a log rotated at 2 KiB keeping 2 backups, after some traffic (stopped)."""
    work = tmp_path_factory.mktemp("modes")
    config = {"idle_seconds": 3600.0, "file_mode": "0640", "log_max_mb": 2 / 1024, "log_backups": 2}
    proc = _start_with_umask(NodeProcess(work, free_port(), config))
    try:
        files = tiny_study(work / "study", n_ct=3, n_pt=2)
        for _ in range(4):
            assert store_files(files, proc.port) == [0x0000] * len(files)
            assert dcmtk("echoscu", "-aet", "PACS", "-aec", "NODE", "127.0.0.1", str(proc.port)).returncode == 0
        time.sleep(0.2)
    finally:
        assert proc.stop() == 0
    return proc, files


def test_file_mode_is_honoured(mode_node) -> None:
    proc, files = mode_node
    stored = _files(proc.spool)
    assert len(stored) == len(files)
    assert {p.stat().st_mode & 0o777 for p in stored} == {0o640}
    queue_files = list(proc.spool.glob("queue.sqlite*"))
    assert queue_files and {p.stat().st_mode & 0o777 for p in queue_files} == {0o640}


def test_serve_log_rotates_at_log_max_mb_keeping_log_backups(mode_node) -> None:
    import json

    proc, _ = mode_node
    logs = sorted(p.name for p in proc.spool.glob("serve.log*"))
    assert logs == ["serve.log", "serve.log.1", "serve.log.2"]
    for name in logs:
        path = proc.spool / name
        assert path.stat().st_size <= 2048, name
        assert path.stat().st_mode & 0o777 == 0o640, name
        assert all(json.loads(line)["event"] for line in path.read_text().splitlines())


# -- AE titles -----------------------------------------------------------------------------------------------


def test_a_wrong_called_ae_title_is_logged_as_such(node: NodeProcess) -> None:
    echo = dcmtk("echoscu", "-aet", "PACS", "-aec", "NOTTHENODE", "127.0.0.1", str(node.port))
    assert echo.returncode != 0
    assert "Called AE Title Not Recognized" in echo.stdout + echo.stderr
    echo = dcmtk("echoscu", "-aet", "INTRUDER", "-aec", "NODE", "127.0.0.1", str(node.port))
    assert "Calling AE Title Not Recognized" in echo.stdout + echo.stderr
    records = wait_for(
        lambda: len(node.events("association_rejected")) >= 2 and node.events("association_rejected"), 5, "log"
    )
    by_reason = {r["reason"]: r for r in records}
    called, calling = by_reason["called_aet"], by_reason["calling_aet"]
    assert (called["called_aet"], called["calling_aet"]) == ("NOTTHENODE", "PACS")
    assert "called AE title 'NOTTHENODE'" in called["message"] and called["peer"].startswith("PACS@127.0.0.1:")
    assert (calling["called_aet"], calling["calling_aet"]) == ("NODE", "INTRUDER")
    assert "calling AE title 'INTRUDER'" in calling["message"] and calling["level"] == "WARNING"
