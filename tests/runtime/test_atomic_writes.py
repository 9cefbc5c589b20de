"""The one writer (issues #14 and #15, item 4): the umask honoured, a cut file never published, no write outside -o.

Real files throughout; the full disk is a real one: a small tmpfs mounted inside a private mount namespace
(``unshare -m``, as root; skipped with the reason otherwise).
"""

from __future__ import annotations

import errno
import gzip
import io
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from diffseg.runtime.atomic import (
    atomic_path,
    check_dicom,
    check_file,
    check_image,
    write_bytes_atomic,
    write_json_atomic,
    write_text_atomic,
)
from diffseg.runtime.cli import main
from diffseg.runtime.phantom import write_phantom
from diffseg.runtime.volume import Volume, write_volume

FAST = ["--backend", "onnxruntime", "--steps", "2", "--samples", "1", "--no-progress"]
DIFFSEG = [sys.executable, "-c", "from diffseg.runtime.cli import main; raise SystemExit(main())"]


@pytest.fixture(scope="module")
def case_dir(tmp_path_factory, small_phantom) -> Path:
    """A small phantom case on disk (ct.nii.gz, pet.nii.gz)."""
    folder = tmp_path_factory.mktemp("case") / "case1"
    write_phantom(small_phantom, folder)
    return folder


@pytest.fixture
def umask() -> Iterator:
    """Set the process umask for one test, restoring it afterwards."""
    old = os.umask(0o022)
    os.umask(old)
    yield os.umask
    os.umask(old)


def _files(root: Path) -> list[Path]:
    return sorted(p for p in root.rglob("*") if p.is_file())


def _temporaries(root: Path) -> list[Path]:
    return sorted(root.rglob(".*.tmp*"))


def _predict(case: Path, out: Path) -> int:
    return main(["predict", "--ct", str(case / "ct.nii.gz"), "--pet", str(case / "pet.nii.gz"), "-o", str(out), *FAST])


@pytest.mark.parametrize(("mask", "mode"), [(0o022, 0o644), (0o077, 0o600)], ids=["umask022", "umask077"])
def test_predict_outputs_honour_the_umask(case_dir: Path, tmp_path: Path, umask, mask: int, mode: int):
    umask(mask)
    out = tmp_path / "out"
    assert _predict(case_dir, out) == 0
    files = _files(out)
    assert {p.name for p in files} >= {
        "mask.nii.gz",
        "probability.nii.gz",
        "lesions.json",
        "preview.png",
        "report.json",
    }
    assert {p.name: oct(p.stat().st_mode & 0o777) for p in files} == {p.name: oct(mode) for p in files}
    assert _temporaries(out) == []


def test_an_explicit_mode_is_set_exactly_whatever_the_umask(tmp_path: Path, umask):
    umask(0o077)
    p = write_bytes_atomic(tmp_path / "a.dat", b"x", mode=0o640)
    assert p.stat().st_mode & 0o777 == 0o640
    umask(0o000)
    vol = _volume(np.zeros((3, 4, 5), np.uint8))
    v = write_volume(vol, tmp_path / "v.nii.gz", mode=0o604)
    assert v.stat().st_mode & 0o777 == 0o604
    with atomic_path(tmp_path / "b.txt", mode=0o600) as tmp:
        tmp.write_text("b")
    assert (tmp_path / "b.txt").stat().st_mode & 0o777 == 0o600
    assert write_text_atomic(tmp_path / "c.txt", "c").stat().st_mode & 0o777 == 0o666  # umask 0: 0o666 itself


def _volume(array: np.ndarray) -> Volume:
    return Volume(array, spacing=(1.0, 2.0, 3.0), origin=(0.0, 0.0, 0.0))


def _refuse(tmp: Path) -> None:
    raise ValueError("the caller's check says no")


def test_a_failing_check_publishes_nothing_and_keeps_the_older_file(tmp_path: Path):
    target = tmp_path / "report.json"
    write_json_atomic(target, {"version": 1})
    with pytest.raises(OSError) as info:
        write_json_atomic(target, {"version": 2}, check=_refuse)
    assert info.value.errno == errno.EIO
    assert str(target) in str(info.value) and "the caller's check says no" in str(info.value)
    assert json.loads(target.read_text()) == {"version": 1}
    assert sorted(tmp_path.iterdir()) == [target]
    fresh = tmp_path / "sub" / "new.nii.gz"
    image = _volume(np.ones((3, 4, 5), np.float32)).to_sitk()
    refused = pytest.raises(OSError, match=r"new\.nii\.gz: not written: .*size \(5, 4, 3\), expected \(1, 2, 3\)")
    with refused, atomic_path(fresh, check=lambda tmp: check_image(tmp, size=(1, 2, 3))) as tmp:
        sitk.WriteImage(image, str(tmp), useCompression=True)
    assert list((tmp_path / "sub").iterdir()) == []


def _png(tmp_path: Path) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(np.arange(64, dtype=np.uint8).reshape(8, 8)).save(buf, format="PNG")
    return buf.getvalue()


def _dicom() -> bytes:
    from pydicom.data import get_testdata_file

    return Path(get_testdata_file("CT_small.dcm")).read_bytes()


@pytest.mark.parametrize(
    ("name", "make", "problem"),
    [
        ("t.json", lambda tp: b'{"a": [1, 2', "not valid JSON"),
        ("p.png", lambda tp: _png(tp)[:-6], "does not end with the IEND chunk"),
        ("p.png", lambda tp: b"GIF89a" + _png(tp)[6:], "no PNG signature"),
        ("m.nii.gz", lambda tp: gzip.compress(b"\x00" * 50_000)[:-9], "the gzip stream is damaged"),
        ("m.nii.gz", lambda tp: gzip.compress(b"\x00" * 50_000)[:-4] + b"\x00\x00\x00\x00", "damaged"),  # length
        ("s.dcm", lambda tp: _dicom()[:20_000], "the DICOM file is cut inside element (7FE0,0010)"),
        ("s.dcm", lambda tp: _dicom()[:500], "the DICOM file is cut inside element (0008,0018)"),
        ("e.csv", lambda tp: b"", "the file is empty"),
    ],
)
def test_each_format_check_refuses_a_cut_file(tmp_path: Path, name: str, make, problem: str):
    data = make(tmp_path)
    with pytest.raises(OSError) as info:
        write_bytes_atomic(tmp_path / name, data)
    assert str(info.value).startswith(f"[Errno {errno.EIO}] {tmp_path / name}: not written: ")
    assert problem in str(info.value)
    assert list(tmp_path.iterdir()) == []


def test_the_checks_accept_whole_files(tmp_path: Path):
    vol = _volume(np.random.default_rng(0).random((6, 7, 8)).astype(np.float32))
    for path in (
        write_volume(vol, tmp_path / "v.nii.gz"),
        write_volume(vol, tmp_path / "v.nii"),
        write_volume(vol, tmp_path / "v.nrrd"),
        write_bytes_atomic(tmp_path / "p.png", _png(tmp_path)),
        write_bytes_atomic(tmp_path / "s.dcm", _dicom()),
        write_json_atomic(tmp_path / "j.json", [1]),
    ):
        check_file(path)
    check_image(tmp_path / "v.nii.gz", size=(8, 7, 6))
    check_dicom(tmp_path / "s.dcm", Modality="CT")
    with pytest.raises(ValueError, match="has Modality 'CT', expected 'MR'"):
        check_dicom(tmp_path / "s.dcm", Modality="MR")
    raw = tmp_path / "v.nii"
    raw.write_bytes(raw.read_bytes()[:-100])  # an uncompressed NIfTI cut: header whole, voxels short
    with pytest.raises(ValueError, match="the voxel data is short"):
        check_file(raw)


def test_write_errors_keep_their_errno_and_name_the_final_path(tmp_path: Path):
    target = tmp_path / "seg.dcm"
    target.write_bytes(b"older")
    with pytest.raises(OSError) as info, atomic_path(target):
        raise OSError(errno.ENOSPC, "No space left on device")
    assert info.value.errno == errno.ENOSPC
    assert str(info.value) == f"[Errno {errno.ENOSPC}] {target}: not written: No space left on device"
    assert target.read_bytes() == b"older" and sorted(tmp_path.iterdir()) == [target]
    with pytest.raises(KeyError), atomic_path(target):  # not a write error: goes through, the temporary removed
        raise KeyError("x")
    assert sorted(tmp_path.iterdir()) == [target]
    (tmp_path / "file").write_bytes(b"")
    with pytest.raises(OSError) as info:
        write_bytes_atomic(tmp_path / "file" / "x.json", b"{}")  # a file where the folder should be
    assert info.value.errno in (errno.EEXIST, errno.ENOTDIR) and str(tmp_path / "file" / "x.json") in str(info.value)


def test_temporary_names_match_the_spools_cleanup_pattern(tmp_path: Path):
    seen = []

    def look(tmp: Path) -> None:
        seen.append(tmp)

    write_bytes_atomic(tmp_path / "i.dcm", _dicom(), check=look)
    with atomic_path(tmp_path / "m.nii.gz", check=look) as tmp:
        sitk.WriteImage(_volume(np.zeros((2, 2, 2), np.uint8)).to_sitk(), str(tmp))
    assert [p.parent for p in seen] == [tmp_path, tmp_path]
    assert all(p.match(".*.tmp*") for p in seen)
    assert seen[0].name.endswith(".tmp")  # never *.dcm: the spool lists instances as */*.dcm
    assert seen[1].name.endswith(".tmp.nii.gz")  # SimpleITK picks the format by the extension


def _tmpfs_unavailable(folder: Path) -> str | None:
    """Why a tmpfs cannot be mounted in a private mount namespace here (None: it can)."""
    if os.geteuid() != 0:
        return "needs root to mount a tmpfs (CI runs as root)"
    if shutil.which("unshare") is None:
        return "needs unshare (util-linux)"
    folder.mkdir()
    mount = f"mount -t tmpfs -o size=16k diffseg-probe {shlex.quote(str(folder))}"
    probe = subprocess.run(["unshare", "-m", "--propagation", "private", "sh", "-c", mount], capture_output=True)
    if probe.returncode != 0:
        return f"cannot mount a tmpfs in a private mount namespace here: {probe.stderr.decode(errors='replace')}"
    return None


@pytest.mark.parametrize(
    ("size", "suffix"),
    [
        ("24k", ".nii.gz"),  # fills in a NIfTI map: SimpleITK writes it cut without a word, the check catches it
        ("140k", ".png"),  # fills in the preview: os.write reports ENOSPC
    ],
)
def test_a_real_full_disk_fails_the_run_and_leaves_no_cut_file(case_dir: Path, tmp_path: Path, size: str, suffix):
    reason = _tmpfs_unavailable(tmp_path / "probe")
    if reason:
        pytest.skip(reason)
    disk, copy = tmp_path / "disk", tmp_path / "copy"
    disk.mkdir()
    out = disk / "out"
    predict = [*DIFFSEG, "predict", "--ct", str(case_dir / "ct.nii.gz"), "--pet", str(case_dir / "pet.nii.gz")]
    mount = f"mount -t tmpfs -o size={size} diffseg-test-out {shlex.quote(str(disk))}"
    script = f'{mount} && "$@"; rc=$?; cp -a {shlex.quote(str(out))} {shlex.quote(str(copy))}; exit $rc'
    cmd = ["unshare", "-m", "--propagation", "private", "sh", "-c", script, "sh", *predict, "-o", str(out), *FAST]
    run = subprocess.run(cmd, capture_output=True, text=True, cwd=tmp_path, timeout=600)
    assert run.returncode == 2, run.stderr
    named = re.search(rf"error: \[Errno {errno.ENOSPC}\] (\S+): not written: .*No space left on device", run.stderr)
    assert named, run.stderr
    failing = Path(named.group(1))
    assert failing.parent == out and failing.name.endswith(suffix), run.stderr
    assert not any(disk.iterdir()), "the tmpfs was mounted outside the private namespace"
    files = _files(copy)
    assert files and failing.name not in {p.name for p in files} and "report.json" not in {p.name for p in files}
    assert _temporaries(copy) == []
    for p in files:
        check_file(p)  # every file there is whole


def test_a_symlinked_case_folder_under_o_is_refused(case_dir: Path, tmp_path: Path, capsys):
    """The case fails naming the path (the other cases go on), and nothing is written where the link points."""
    cohort, out, outside = tmp_path / "cohort", tmp_path / "out", tmp_path / "outside"
    shutil.copytree(case_dir, cohort / "case1")
    shutil.copytree(case_dir, cohort / "case2")
    outside.mkdir()
    out.mkdir()
    (out / "case1").symlink_to(outside)
    assert main(["predict", "-i", str(cohort), "-o", str(out), *FAST]) == 1
    said = f"{out / 'case1'}: outside the output folder {out.resolve()} (it resolves to {outside.resolve()})"
    assert said in capsys.readouterr().out
    assert said in json.loads((out / "failures.json").read_text())["case1"]
    assert (out / "case2" / "report.json").is_file()
    assert list(outside.iterdir()) == []


def test_a_symlinked_output_file_is_refused_and_its_target_untouched(case_dir: Path, tmp_path: Path, capsys):
    out, victim = tmp_path / "out", tmp_path / "victim.nii.gz"
    victim.write_bytes(b"not yours")
    out.mkdir()
    (out / "probability.nii.gz").symlink_to(victim)
    assert _predict(case_dir, out) == 2
    assert f"{out / 'probability.nii.gz'}: outside the output folder" in capsys.readouterr().err
    assert victim.read_bytes() == b"not yours"
    assert "report.json" not in {p.name for p in _files(out)}


def test_a_read_only_disk_keeps_the_older_file_and_names_the_path(tmp_path: Path):
    reason = _tmpfs_unavailable(tmp_path / "probe")
    if reason:
        pytest.skip(reason)
    disk = tmp_path / "disk"
    disk.mkdir()
    target = disk / "report.json"
    script = (
        "import errno, json, sys\n"
        "from diffseg.runtime.atomic import write_json_atomic\n"
        "try:\n"
        f"    write_json_atomic({str(target)!r}, {{'new': 1}})\n"
        "except OSError as exc:\n"
        "    print(json.dumps({'errno': exc.errno, 'message': str(exc)}))\n"
    )
    d = shlex.quote(str(disk))
    shell = (
        f"mount -t tmpfs -o size=64k diffseg-test-ro {d} && echo old > {d}/report.json && mount -o remount,ro {d} && "
        f'"$@" && cat {d}/report.json && ls -A {d}'
    )
    cmd = ["unshare", "-m", "--propagation", "private", "sh", "-c", shell, "sh", sys.executable, "-c", script]
    run = subprocess.run(cmd, capture_output=True, text=True, cwd=tmp_path, timeout=120)
    assert run.returncode == 0, run.stderr
    first, *rest = run.stdout.splitlines()
    failure = json.loads(first)
    assert failure["errno"] == errno.EROFS
    assert failure["message"] == f"[Errno {errno.EROFS}] {target}: not written: Read-only file system"
    assert rest == ["old", "report.json"]  # the older file as it was, no temporary beside it
