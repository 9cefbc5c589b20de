"""DICOM network test helpers: a private network namespace, Debian's Orthanc, dcmtk clients, tiny studies.

Orthanc 1.10 binds every interface, so it is only ever started from a thread that has moved into a private
network namespace (``unshare(CLONE_NEWNET)`` on the calling thread, loopback brought up);
:func:`private_netns` refuses to yield otherwise, and :class:`Orthanc` checks again before it starts.
Processes started from that thread (Orthanc, the node, dcmtk's clients) inherit the namespace; the thread
returns to its own namespace afterwards.
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pydicom
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

__all__ = [
    "DCMTK_DIR",
    "NodeProcess",
    "Orthanc",
    "dcmtk",
    "encoded_copy",
    "free_port",
    "netns_unavailable_reason",
    "private_netns",
    "send_raw",
    "serve_options",
    "store_files",
    "tiny_study",
    "wait_for",
]

CLONE_NEWNET = 0x40000000
#: dcmtk's tools live in /usr/bin; pynetdicom installs console scripts with the same names earlier on PATH.
DCMTK_DIR = Path("/usr/bin")
ORTHANC = Path("/usr/sbin/Orthanc")
#: The CLI, run by the interpreter of the tests (started outside the repository: its diffseg/ would shadow).
DIFFSEG = [sys.executable, "-c", "from diffseg.runtime.cli import main; raise SystemExit(main())"]


def _netns_id() -> str:
    return os.readlink("/proc/thread-self/ns/net")


def netns_unavailable_reason() -> str | None:
    """Why these tests cannot run here (None if they can): root, ``unshare -n``, ``ip``, Orthanc, dcmtk."""
    if sys.platform != "linux":
        return f"needs Linux network namespaces, platform is {sys.platform}"
    for tool in ("unshare", "ip"):
        if shutil.which(tool) is None:
            return f"{tool} not found on PATH"
    probe = subprocess.run(["unshare", "-n", "-m", "true"], capture_output=True, text=True)
    if probe.returncode != 0:
        return f"'unshare -n -m true' failed (rc {probe.returncode}): {probe.stderr.strip()} (needs root)"
    if not ORTHANC.exists():
        return f"{ORTHANC} not found: apt-get install -y orthanc"
    for tool in ("echoscu", "storescu"):
        if not (DCMTK_DIR / tool).exists():
            return f"{DCMTK_DIR / tool} not found: apt-get install -y dcmtk"
    return None


@contextlib.contextmanager
def private_netns() -> Iterator[str]:
    """Move the calling thread into a new network namespace with ``lo`` up; return to the old one on exit.

    Yields:
        The namespace's identifier (``net:[inode]``).
    """
    libc = ctypes.CDLL(None, use_errno=True)
    old = os.open("/proc/thread-self/ns/net", os.O_RDONLY)
    before = _netns_id()
    try:
        if libc.unshare(CLONE_NEWNET) != 0:
            err = ctypes.get_errno()
            raise OSError(err, f"unshare(CLONE_NEWNET) failed: {os.strerror(err)}")
        try:
            inside = _netns_id()
            if inside == before:
                raise RuntimeError("unshare(CLONE_NEWNET) left the thread in its old network namespace")
            subprocess.run(["ip", "link", "set", "lo", "up"], check=True)
            yield inside
        finally:
            if libc.setns(old, CLONE_NEWNET) != 0:
                err = ctypes.get_errno()
                raise OSError(err, f"setns back to the original network namespace failed: {os.strerror(err)}")
    finally:
        os.close(old)


def free_port() -> int:
    """A TCP port free on loopback of the current namespace."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for(predicate, timeout: float, what: str, interval: float = 0.05):
    """Poll ``predicate`` until it returns a truthy value; raise TimeoutError naming ``what``."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(interval)


def dcmtk(tool: str, *args: str, timeout: float = 60) -> subprocess.CompletedProcess:
    """Run a dcmtk tool (from /usr/bin, TCP_NODELAY on) and capture its output."""
    env = dict(os.environ, TCP_NODELAY="1")
    return subprocess.run([str(DCMTK_DIR / tool), *args], capture_output=True, text=True, timeout=timeout, env=env)


@dataclass
class Orthanc:
    """Debian's Orthanc in the current (private) network namespace, with one modality entry for the node.

    Attributes:
        workdir: folder for its configuration, storage and log.
        node_aet, node_port: the modality entry ``node`` (our SCP).
        aet, dicom_port, http_port: Orthanc's own AE title and ports.
    """

    workdir: Path
    node_aet: str
    node_port: int
    aet: str = "ORTHANC"
    dicom_port: int = 0
    http_port: int = 0
    process: subprocess.Popen | None = None

    def start(self, host_netns: str) -> Orthanc:
        if _netns_id() == host_netns:
            raise RuntimeError("refusing to start Orthanc outside a private network namespace (it binds 0.0.0.0)")
        self.dicom_port = self.dicom_port or free_port()
        self.http_port = self.http_port or free_port()
        db = self.workdir / "db"
        db.mkdir(parents=True, exist_ok=True)
        config = {
            "Name": "PACS-TEST",
            "StorageDirectory": str(db),
            "IndexDirectory": str(db),
            "Plugins": [],
            "HttpServerEnabled": True,
            "HttpPort": self.http_port,
            "RemoteAccessAllowed": False,
            "AuthenticationEnabled": False,
            "DicomServerEnabled": True,
            "DicomAet": self.aet,
            "DicomPort": self.dicom_port,
            "DicomCheckCalledAet": False,
            "DicomAlwaysAllowEcho": True,
            "DicomAlwaysAllowStore": True,
            "DicomCheckModalityHost": False,
            "DicomModalities": {"node": {"AET": self.node_aet, "Host": "127.0.0.1", "Port": self.node_port}},
            "OrthancExplorerEnabled": False,
            "WebDavEnabled": False,
            "StableAge": 60,
            "SaveJobs": False,
        }
        cfg = self.workdir / "orthanc.json"
        cfg.write_text(json.dumps(config, indent=2))
        log = self.workdir / "orthanc.log"
        self.process = subprocess.Popen(
            [str(ORTHANC), str(cfg), f"--logfile={log}"],
            env=dict(os.environ, TCP_NODELAY="1"),
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        wait_for(self._alive, 30, f"Orthanc on http port {self.http_port} (log {log})")
        return self

    def _alive(self) -> bool:
        if self.process is not None and self.process.poll() is not None:
            raise RuntimeError(f"Orthanc exited with {self.process.returncode}; see {self.workdir}/orthanc.log")
        try:
            self.get("/system")
        except (urllib.error.URLError, ConnectionError):
            return False
        return True

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()

    def _request(self, method: str, path: str, body: object | None = None, raw: bool = False):
        data = None if body is None else json.dumps(body).encode()
        req = urllib.request.Request(f"http://127.0.0.1:{self.http_port}{path}", data=data, method=method)
        with urllib.request.urlopen(req, timeout=120) as rsp:
            payload = rsp.read()
        return payload if raw else json.loads(payload)

    def get(self, path: str, raw: bool = False):
        return self._request("GET", path, raw=raw)

    def post(self, path: str, body: object):
        return self._request("POST", path, body)

    def delete(self, path: str):
        return self._request("DELETE", path)

    def put(self, path: str, body: object):
        return self._request("PUT", path, body, raw=True)

    def add_modality(self, name: str, aet: str, port: int) -> None:
        """Register (or replace) a DICOM modality, e.g. a node on another port."""
        self.put(f"/modalities/{name}", {"AET": aet, "Host": "127.0.0.1", "Port": port})

    def upload(self, path: Path) -> dict:
        req = urllib.request.Request(
            f"http://127.0.0.1:{self.http_port}/instances", data=path.read_bytes(), method="POST"
        )
        with urllib.request.urlopen(req, timeout=60) as rsp:
            return json.loads(rsp.read())

    def find(self, level: str, query: dict) -> list:
        return self.post("/tools/find", {"Level": level, "Query": query, "Expand": True})

    def push_to_node(self, resources: list[str], modality: str = "node") -> dict:
        """C-STORE Orthanc resources (study/series ids) to a modality, synchronously."""
        return self.post(f"/modalities/{modality}/store", {"Resources": resources, "Synchronous": True})


def tiny_study(out_dir: Path, n_ct: int = 4, n_pt: int = 3, size: int = 16, study_uid: str | None = None) -> list[Path]:
    """Write a small, valid CT + PET study (``size``² pixels) with pydicom; return the files.

    Enough for the node's transport and spool tests; the segmentation tests use the project's phantom writer.
    """
    out_dir.mkdir(parents=True, exist_ok=True)
    study_uid = study_uid or generate_uid()
    frame_uid = generate_uid()
    rng = np.random.default_rng(0)
    files = []
    for modality, count, sop_class in (
        ("CT", n_ct, "1.2.840.10008.5.1.4.1.1.2"),
        ("PT", n_pt, "1.2.840.10008.5.1.4.1.1.128"),
    ):
        series_uid = generate_uid()
        for i in range(count):
            sop_uid = generate_uid()
            meta = FileMetaDataset()
            meta.MediaStorageSOPClassUID = sop_class
            meta.MediaStorageSOPInstanceUID = sop_uid
            meta.TransferSyntaxUID = ExplicitVRLittleEndian
            ds = Dataset()
            ds.file_meta = meta
            ds.SOPClassUID = sop_class
            ds.SOPInstanceUID = sop_uid
            ds.StudyInstanceUID = study_uid
            ds.SeriesInstanceUID = series_uid
            ds.FrameOfReferenceUID = frame_uid
            ds.Modality = modality
            ds.PatientName = "Tiny^Study"
            ds.PatientID = "TINY0001"
            ds.StudyDate = "20240101"
            ds.StudyTime = "120000"
            ds.SeriesNumber = 1 if modality == "CT" else 2
            ds.InstanceNumber = i + 1
            ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
            ds.ImagePositionPatient = [0.0, 0.0, 3.0 * i]
            ds.PixelSpacing = [1.0, 1.0]
            ds.SliceThickness = 3.0
            ds.Rows = ds.Columns = size
            ds.SamplesPerPixel = 1
            ds.PhotometricInterpretation = "MONOCHROME2"
            ds.BitsAllocated = 16
            ds.BitsStored = 16
            ds.HighBit = 15
            ds.PixelRepresentation = 1 if modality == "CT" else 0
            ds.RescaleIntercept = -1024 if modality == "CT" else 0
            ds.RescaleSlope = 1
            dtype = np.int16 if modality == "CT" else np.uint16
            ds.PixelData = rng.integers(0, 2000, (size, size)).astype(dtype).tobytes()
            path = out_dir / f"{modality}{i:03d}.dcm"
            ds.save_as(path, enforce_file_format=True)
            files.append(path)
    return files


def read_uid(path: Path, keyword: str) -> str:
    """One UID of a DICOM file (header only)."""
    return str(getattr(pydicom.dcmread(path, stop_before_pixels=True), keyword))


@dataclass
class NodeProcess:
    """``diffseg serve`` as a child process (so that a test can SIGKILL it), optionally on a tiny tmpfs spool.

    With ``tmpfs_size`` the node runs in its own mount namespace (``unshare -m``) with a tmpfs of that size
    mounted on the spool; its files are then read through ``/proc/<pid>/root``.

    Attributes:
        workdir: holds the configuration, the spool (unless tmpfs) and the node's stderr.
        port: the node's DICOM port.
        config: extra configuration keys (destination, idle_seconds...).
        worker: False runs ``--no-worker``.
        tmpfs_size: e.g. ``"600k"``; None keeps the spool on the test's disk.
    """

    workdir: Path
    port: int
    config: dict
    worker: bool = False
    tmpfs_size: str | None = None
    process: subprocess.Popen | None = None
    starts: int = 0

    @property
    def spool(self) -> Path:
        return self.workdir / "spool"

    @property
    def stderr_path(self) -> Path:
        return self.workdir / f"node-{self.starts}.stderr"

    def view(self, path: Path) -> Path:
        """Where this process (and its mount namespace) sees ``path``."""
        if self.tmpfs_size is None:
            return path
        return Path(f"/proc/{self.process.pid}/root") / path.relative_to("/")

    def start(self, timeout: float = 60) -> NodeProcess:
        self.starts += 1
        self.spool.mkdir(parents=True, exist_ok=True)
        config = {
            "ae_title": "NODE",
            "port": self.port,
            "allowed_calling_aets": ["PACS", "ORTHANC"],
            "spool_dir": str(self.spool),
            "idle_seconds": 1.0,
            "destination": {"ae_title": "ORTHANC", "host": "127.0.0.1", "port": 9},
            **self.config,
        }
        cfg = self.workdir / "node.json"
        cfg.write_text(json.dumps(config, indent=2))
        cmd = [*DIFFSEG, "serve", "--config", str(cfg), "--stop-grace", "5"]
        if not self.worker:
            cmd.append("--no-worker")
        if self.tmpfs_size is not None:
            mount = f"mount -t tmpfs -o size={self.tmpfs_size} diffseg-test-spool {self.spool}"
            cmd = [
                "unshare",
                "-m",
                "--propagation",
                "private",
                "sh",
                "-c",
                f'{mount} && exec "$@"',
                "sh",
                *cmd,
            ]
        # cwd outside the repository: its diffseg/ folder would shadow the installed package
        for attempt in range(3):
            with open(self.stderr_path, "wb") as err:
                self.process = subprocess.Popen(cmd, cwd=self.workdir, stdout=subprocess.DEVNULL, stderr=err)
            try:
                wait_for(lambda: self._started(), timeout, f"the node to start (stderr {self.stderr_path})")
                return self
            except RuntimeError as exc:
                # only a shared developer install caught mid-rebuild is retried; any other failure is reported
                if "No module named 'diffseg" not in str(exc) or attempt == 2:
                    raise
                time.sleep(10.0)
        return self

    def _started(self) -> bool:
        if self.process.poll() is not None:
            raise RuntimeError(f"node exited with {self.process.returncode}: {self.stderr_path.read_text()[-3000:]}")
        return bool(self.events("started"))

    def events(self, event: str | None = None, start: int | None = None) -> list[dict]:
        """JSON log records of one start (default: the current one) from stderr, optionally one event only."""
        path = self.workdir / f"node-{start or self.starts}.stderr"
        out = []
        for line in path.read_text(errors="replace").splitlines() if path.exists() else []:
            if line.startswith("{"):
                with contextlib.suppress(json.JSONDecodeError):
                    rec = json.loads(line)
                    if event is None or rec.get("event") == event:
                        out.append(rec)
        return out

    def status(self) -> dict:
        """``diffseg serve --status --json`` of the spool, run where the node sees it."""
        if self.tmpfs_size is None:  # in-process: no dependence on a fresh interpreter finding the package
            from diffseg.runtime.serve import spool_status

            return json.loads(json.dumps(spool_status(self.spool)))
        cmd = [*DIFFSEG, "serve", "--status", "--json", "--spool", str(self.spool)]
        cmd = ["nsenter", "-t", str(self.process.pid), "-m", *cmd]
        for attempt in range(3):  # tolerate a moment when the shared developer install is being rebuilt
            out = subprocess.run(cmd, cwd=self.workdir, capture_output=True, text=True, timeout=60)
            if out.returncode == 0:
                return json.loads(out.stdout)
            time.sleep(2.0 * (attempt + 1))
        raise RuntimeError(f"diffseg serve --status failed ({out.returncode}): {out.stderr[-2000:]}")

    def stop(self) -> int:
        """SIGTERM and wait; returns the exit code."""
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        return self.process.returncode if self.process is not None else 0

    def kill(self) -> None:
        """SIGKILL: no clean-up of any kind."""
        self.process.send_signal(signal.SIGKILL)
        self.process.wait()


def send_raw(path: Path, port: int, calling_aet: str = "PACS", called_aet: str = "NODE") -> int | None:
    """C-STORE the bytes of ``path`` as they are (file meta read, data set not decoded); return the status.

    dcmtk's storescu refuses to send a file it cannot parse, so the damaged-upload tests use pynetdicom's
    chunked sending, which streams the data set bytes without decoding them.
    """
    from pynetdicom import AE, _config
    from pynetdicom.dsutils import split_dataset

    meta, _ = split_dataset(path)
    ae = AE(ae_title=calling_aet)
    ae.add_requested_context(meta.MediaStorageSOPClassUID, meta.TransferSyntaxUID)
    old = _config.STORE_SEND_CHUNKED_DATASET
    _config.STORE_SEND_CHUNKED_DATASET = True
    try:
        assoc = ae.associate("127.0.0.1", port, ae_title=called_aet)
        if not assoc.is_established:
            raise RuntimeError(f"association with {called_aet} on port {port} not established")
        try:
            rsp = assoc.send_c_store(path)
        finally:
            assoc.release()
    finally:
        _config.STORE_SEND_CHUNKED_DATASET = old
    status = getattr(rsp, "Status", None)
    return None if status is None else int(status)


def store_files(paths: list[Path], port: int, calling_aet: str = "PACS", called_aet: str = "NODE") -> list[int]:
    """C-STORE files in one association with pynetdicom; return each status (-1: no answer)."""
    from pynetdicom import AE

    datasets = [pydicom.dcmread(p) for p in paths]
    ae = AE(ae_title=calling_aet)
    for uid in sorted({(str(d.SOPClassUID), str(d.file_meta.TransferSyntaxUID)) for d in datasets}):
        ae.add_requested_context(*uid)
    assoc = ae.associate("127.0.0.1", port, ae_title=called_aet)
    if not assoc.is_established:
        raise RuntimeError(f"association with {called_aet} on port {port} not established")
    try:
        return [int(getattr(assoc.send_c_store(ds), "Status", -1)) for ds in datasets]
    finally:
        assoc.release()


def _gdcm_j2k(source: Path, target: Path) -> None:
    import gdcm

    reader = gdcm.ImageReader()
    reader.SetFileName(str(source))
    assert reader.Read(), source
    change = gdcm.ImageChangeTransferSyntax()
    change.SetTransferSyntax(gdcm.TransferSyntax(gdcm.TransferSyntax.JPEG2000Lossless))
    change.SetInput(reader.GetImage())
    assert change.Change(), source
    writer = gdcm.ImageWriter()
    writer.SetFileName(str(target))
    writer.SetFile(reader.GetFile())
    writer.SetImage(change.GetOutput())
    assert writer.Write(), target


def encoded_copy(source: Path, target: Path, encoder) -> str:
    """The study under ``source`` with new UIDs (its own study in the spool), encoded into ``target``; the new
    StudyInstanceUID."""
    study_uid, series, frame_map = str(generate_uid()), {}, {}
    for path in sorted(source.rglob("*.dcm")):
        ds = pydicom.dcmread(path)
        ds.StudyInstanceUID = study_uid
        ds.SeriesInstanceUID = series.setdefault(ds.SeriesInstanceUID, str(generate_uid()))
        ds.FrameOfReferenceUID = frame_map.setdefault(ds.FrameOfReferenceUID, str(generate_uid()))
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = str(generate_uid())
        plain = target / "plain" / path.relative_to(source)
        plain.parent.mkdir(parents=True, exist_ok=True)
        ds.save_as(plain, enforce_file_format=True)
        out = target / "sent" / path.relative_to(source)
        out.parent.mkdir(parents=True, exist_ok=True)
        if encoder == "gdcm":
            _gdcm_j2k(plain, out)
        else:
            done = subprocess.run([*encoder, str(plain), str(out)], capture_output=True, text=True, timeout=60)
            assert done.returncode == 0, done.stderr
    return study_uid


def serve_options(spool_dir: Path, **overrides):
    """Node options for an in-process node (AE ``NODE``, calling AE ``PACS``, free ports), with ``overrides``."""
    from diffseg.runtime.serve import Destination, ServeOptions

    values = dict(
        ae_title="NODE",
        port=free_port(),
        allowed_calling_aets=("PACS",),
        destination=Destination(ae_title="ORTHANC", host="127.0.0.1", port=free_port()),
        spool_dir=spool_dir,
    )
    return ServeOptions(**{**values, **overrides})
