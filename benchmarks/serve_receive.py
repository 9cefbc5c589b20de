"""Receive throughput and memory of ``diffseg serve``: dcmtk's storescu sends to a receive-only node.

Two loads, each into a fresh node (``--no-worker``) in a private network namespace (root; apt-get install -y
dcmtk):

- **study**: one phantom PET/CT study (``--ct-size`` × ``--ct-slices``; 116 instances by default), ``--repeat``
  times: instances/s and MB/s. Each instance is written to the spool with fsync of file and folder and recorded in
  the SQLite queue before the node answers, so this measures the cost of that durability on this machine's disk.
- **large**: ``--large-count`` CT instances of ``--large-mb`` MB each, in one association: MB/s, and the node's
  peak resident memory above its resident memory before the upload (``VmHWM`` after ``VmRSS`` before, with the
  peak reset through ``/proc/<pid>/clear_refs``), in MB and as a multiple of one instance's size.

``--code-from REV`` runs the node from the ``runtime/`` and ``src/diffseg/`` of a git revision (``git archive``
into a temporary folder put first on the node's PYTHONPATH; the compiled extension, ``export`` and ``models`` are
the installed ones), for a before/after comparison with the working tree.

Usage:
    python benchmarks/serve_receive.py --label before --code-from HEAD
    python benchmarks/serve_receive.py --label after
Writes the run under its label into benchmarks/results/serve_receive.json (``--output``), other labels kept, and
the table of all runs to serve_receive.md beside it, with the CPU model and flags (lscpu).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests" / "runtime" / "serve"))

import numpy as np
from dicom_net import NodeProcess, dcmtk, free_port, netns_unavailable_reason, private_netns

import diffseg
from diffseg.runtime.dicom import write_phantom_dicom
from diffseg.runtime.phantom import PhantomOptions, make_phantom

REPO = Path(__file__).resolve().parents[1]
MB = 1 << 20


def _code_overlay(rev: str, into: Path) -> Path:
    """A folder holding a ``diffseg`` package whose runtime is that of git revision ``rev``."""
    src = into / "src"
    src.mkdir(parents=True)
    archive = subprocess.run(["git", "-C", str(REPO), "archive", rev, "runtime", "src/diffseg"], capture_output=True)
    if archive.returncode != 0:
        raise RuntimeError(f"git archive {rev} failed: {archive.stderr.decode(errors='replace')}")
    subprocess.run(["tar", "-x", "-C", str(src)], input=archive.stdout, check=True)
    package = into / "site" / "diffseg"
    shutil.copytree(src / "src" / "diffseg", package)
    (package / "runtime").symlink_to(src / "runtime")
    installed = Path(diffseg.__file__).resolve().parent
    for extra in [*installed.glob("_ext*.so"), installed / "export", installed / "models"]:
        target = package / extra.name
        if extra.exists() and not target.exists():
            target.symlink_to(extra.resolve())
    return into / "site"


def _proc_kb(pid: int, key: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1])
    raise KeyError(key)


def _write_large(folder: Path, count: int, megabytes: float) -> list[Path]:
    """``count`` single-frame CT instances of about ``megabytes`` MB of 16-bit pixels each (one study)."""
    import pydicom
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, generate_uid

    folder.mkdir(parents=True, exist_ok=True)
    side = int((megabytes * MB / 2) ** 0.5)
    study, series, frame = generate_uid(), generate_uid(), generate_uid()
    rng = np.random.default_rng(0)
    pixels = rng.integers(0, 2000, (side, side), dtype=np.int16).tobytes()
    files = []
    for i in range(count):
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.2"
        meta.MediaStorageSOPInstanceUID = generate_uid()
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds = Dataset()
        ds.file_meta = meta
        ds.SOPClassUID = meta.MediaStorageSOPClassUID
        ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
        ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.FrameOfReferenceUID = study, series, frame
        ds.Modality, ds.PatientID, ds.PatientName = "CT", "LARGE0001", "Large^Instance"
        ds.InstanceNumber = i + 1
        ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
        ds.ImagePositionPatient = [0.0, 0.0, float(i)]
        ds.PixelSpacing = [0.1, 0.1]
        ds.Rows = ds.Columns = side
        ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 1
        ds.RescaleIntercept, ds.RescaleSlope = -1024, 1
        ds.PixelData = pixels
        path = folder / f"large{i:03d}.dcm"
        pydicom.dcmwrite(path, ds, enforce_file_format=True)
        files.append(path)
    return files


def _send(node: NodeProcess, folder: Path) -> float:
    start = time.perf_counter()
    result = dcmtk("storescu", "-aet", "PACS", "-aec", "NODE", "+sd", "+r", "127.0.0.1", str(node.port), str(folder))
    seconds = time.perf_counter() - start
    if result.returncode != 0:
        raise RuntimeError(f"storescu failed: {(result.stdout + result.stderr)[-2000:]}")
    return seconds


def _stored(node: NodeProcess) -> int:
    return len(list((node.spool / "incoming").glob("*/*.dcm")))


def _run_study(work: Path, args: argparse.Namespace) -> dict:
    phantom = make_phantom(args.seed, PhantomOptions(ct_size_xy=args.ct_size, ct_slices=args.ct_slices))
    info = write_phantom_dicom(phantom, work / "study")
    files = [Path(p) for p in info["ct_files"] + info["pet_files"]]
    megabytes = sum(p.stat().st_size for p in files) / MB
    seconds = []
    for i in range(args.repeat):
        node = NodeProcess(work / f"study-node{i}", free_port(), {"idle_seconds": 3600.0}).start()
        try:
            seconds.append(_send(node, work / "study"))
            if _stored(node) != len(files):
                raise RuntimeError(f"node stored {_stored(node)} instances, {len(files)} sent")
        finally:
            node.stop()
    median = statistics.median(seconds)
    return {
        "instances": len(files),
        "megabytes": round(megabytes, 1),
        "ct_shape_zyx": list(phantom.ct.shape),
        "pet_shape_zyx": list(phantom.pet.shape),
        "seconds": [round(s, 3) for s in seconds],
        "median_s": round(median, 3),
        "instances_per_s": round(len(files) / median, 1),
        "mb_per_s": round(megabytes / median, 1),
    }


def _run_large(work: Path, args: argparse.Namespace) -> dict:
    files = _write_large(work / "large", args.large_count, args.large_mb)
    instance_mb = files[0].stat().st_size / MB
    node = NodeProcess(work / "large-node", free_port(), {"idle_seconds": 3600.0}).start()
    try:
        pid = node.process.pid
        time.sleep(1.0)  # let start-up settle
        Path(f"/proc/{pid}/clear_refs").write_text("5")  # peak RSS := current RSS
        rss_before = _proc_kb(pid, "VmRSS")
        seconds = _send(node, work / "large")
        peak = _proc_kb(pid, "VmHWM")
        if _stored(node) != len(files):
            raise RuntimeError(f"node stored {_stored(node)} instances, {len(files)} sent")
    finally:
        node.stop()
    above = (peak - rss_before) / 1024
    return {
        "instances": len(files),
        "instance_mb": round(instance_mb, 1),
        "seconds": round(seconds, 3),
        "mb_per_s": round(len(files) * instance_mb / seconds, 1),
        "rss_before_mb": round(rss_before / 1024, 1),
        "peak_rss_mb": round(peak / 1024, 1),
        "peak_above_before_mb": round(above, 1),
        "peak_above_before_per_instance_size": round(above / instance_mb, 2),
    }


def _machine() -> dict:
    model, flags = platform.processor() or "unknown", ""
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
        for line in out.splitlines():
            key, _, value = line.partition(":")
            if key.strip() == "Model name":
                model = value.strip()
            elif key.strip() == "Flags":
                flags = value.strip()
    except (OSError, subprocess.CalledProcessError):
        pass
    wanted = ("sse4_2", "avx", "avx2", "fma", "avx512f", "aes", "sha_ni")
    return {
        "cpu_model": model,
        "cpu_flags_of_note": [f for f in wanted if f in flags.split()],
        "cpus": os.cpu_count(),
        "kernel": platform.release(),
    }


def _markdown(results: dict) -> str:
    m = results["machine"]
    lines = [
        "# serve_receive: receive throughput and memory of `diffseg serve`",
        "",
        f"Machine: {m['cpu_model']}, {m['cpus']} CPUs (shared with other work), kernel {m['kernel']}; "
        f"CPU flags of note: {', '.join(m['cpu_flags_of_note']) or 'none'}. Spool on the local disk.",
        "",
        "| run | code | study: instances (MB) | study: median s | instances/s | MB/s | large: instances × MB | "
        "large: MB/s | peak RSS above before (MB) | × instance size |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for label, r in results["runs"].items():
        s, g = r["study"], r["large"]
        lines.append(
            f"| {label} | {r['code']} | {s['instances']} ({s['megabytes']}) | {s['median_s']} | "
            f"{s['instances_per_s']} | {s['mb_per_s']} | {g['instances']} × {g['instance_mb']} | {g['mb_per_s']} | "
            f"{g['peak_above_before_mb']} | {g['peak_above_before_per_instance_size']} |"
        )
    lines += ["", "Commands:", ""]
    lines += [f"- `{r['command']}`" for r in results["runs"].values()]
    return "\n".join(lines) + "\n"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--label", default="after", help="name of this run in the results (before, after...)")
    parser.add_argument("--code-from", metavar="REV", help="run the node from this git revision's runtime")
    parser.add_argument("--ct-size", type=int, default=256)
    parser.add_argument("--ct-slices", type=int, default=64)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--large-count", type=int, default=4)
    parser.add_argument("--large-mb", type=float, default=64.0)
    parser.add_argument(
        "--output", type=Path, default=Path(__file__).resolve().parent / "results" / "serve_receive.json"
    )
    args = parser.parse_args()
    reason = netns_unavailable_reason()
    if reason is not None:
        print(f"serve_receive: cannot run: {reason}", file=sys.stderr)
        return 2
    work = Path(tempfile.mkdtemp(prefix="diffseg-receive-"))
    code = "working tree"
    try:
        if args.code_from:
            site = _code_overlay(args.code_from, work / "code")
            os.environ["PYTHONPATH"] = os.pathsep.join([str(site), os.environ.get("PYTHONPATH", "")])
            rev = subprocess.run(
                ["git", "-C", str(REPO), "rev-parse", "--short", args.code_from], capture_output=True, text=True
            )
            code = f"git {rev.stdout.strip() or args.code_from}"
        with private_netns():
            run = {
                "command": "python benchmarks/serve_receive.py " + " ".join(sys.argv[1:]),
                "code": code,
                "study": _run_study(work, args),
                "large": _run_large(work, args),
            }
    finally:
        shutil.rmtree(work, ignore_errors=True)
    results = {"machine": _machine(), "runs": {}}
    if args.output.exists():
        with open(args.output, encoding="utf-8") as fh:
            old = json.load(fh)
        results["runs"] = old.get("runs", {}) if isinstance(old, dict) else {}
    results["runs"][args.label] = run
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(results, indent=2) + "\n")
    args.output.with_suffix(".md").write_text(_markdown(results))
    print(json.dumps(run))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
