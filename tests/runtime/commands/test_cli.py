"""The command line as a user runs it: help, version, info, bad input, single case and cohort runs."""

from __future__ import annotations

import inspect
import json
import subprocess
import sys

import pytest

from diffseg.runtime.cli import COMMANDS, build_parser
from diffseg.runtime.phantom import PhantomOptions, make_phantom, write_phantom


def cli(*args: str, cwd=None, timeout: int = 600) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "diffseg", *args], capture_output=True, text=True, cwd=cwd, timeout=timeout
    )


@pytest.mark.parametrize("command", sorted(COMMANDS))
def test_every_command_has_help(command):
    out = cli(command, "--help")
    assert out.returncode == 0 and "usage: diffseg" in out.stdout


def test_version_and_info():
    from diffseg import __version__

    assert cli("--version").stdout.strip() == f"diffseg {__version__}"
    info = json.loads(cli("info", "--json").stdout)
    assert info["extension"]["cxx_flags"] and "openvino" in info["backends"]
    assert info["backends"]["onnxruntime"]["available"]


def test_cli_flags_match_the_segmenter():
    """Every Segmenter option has a predict flag (faster-whisper's signature test)."""
    from diffseg.runtime.segmenter import Segmenter

    params = set(inspect.signature(Segmenter.__init__).parameters) - {"self"}
    parser = build_parser()
    predict = next(a for a in parser._subparsers._group_actions[0].choices.items() if a[0] == "predict")[1]
    dests = {a.dest for a in predict._actions}
    renamed = {"skip_empty_windows": "no_skip"}
    assert {renamed.get(p, p) for p in params} <= dests


def test_bad_inputs_give_clear_errors(tmp_path):
    out = cli(
        "predict",
        "--ct",
        str(tmp_path / "missing.nii.gz"),
        "--pet",
        str(tmp_path / "x.nii.gz"),
        "-o",
        str(tmp_path / "o"),
    )
    assert out.returncode == 2 and "missing.nii.gz: no such file" in out.stderr
    bad = tmp_path / "ct.nii.gz"
    bad.write_bytes(b"not an image")
    pet = tmp_path / "pet.nii.gz"
    pet.write_bytes(b"not an image either")
    out = cli("predict", "--ct", str(bad), "--pet", str(pet), "-o", str(tmp_path / "o"), "--backend", "onnxruntime")
    assert out.returncode == 2 and "ct.nii.gz: cannot read image" in out.stderr
    assert not (tmp_path / "o" / "report.json").exists()
    out = cli("predict", "-i", str(tmp_path), "--ct", str(bad), "-o", str(tmp_path / "o"))
    assert out.returncode == 2 and "not both" in out.stderr
    out = cli("predict", "--ct", str(bad), "--pet", str(pet), "-o", str(tmp_path / "o"), "--backend", "tensorrt")
    assert out.returncode == 2 and "tensorrt" in out.stderr


def test_cohort_run_is_resumable_and_survives_a_bad_case(tmp_path):
    cohort = tmp_path / "cohort"
    small = PhantomOptions(ct_size_xy=128, ct_slices=24)
    for seed in (1, 2):
        write_phantom(make_phantom(seed, small), cohort / f"case{seed}")
    broken = cohort / "case9"
    broken.mkdir()
    (broken / "ct.nii.gz").write_bytes(b"truncated")
    (broken / "pet.nii.gz").write_bytes(b"truncated")
    out_dir = tmp_path / "out"
    args = [
        "predict",
        "-i",
        str(cohort),
        "-o",
        str(out_dir),
        "--backend",
        "onnxruntime",
        "--steps",
        "1",
        "--samples",
        "1",
        "--no-progress",
    ]
    first = cli(*args)
    assert first.returncode == 1, first.stderr
    assert "case case9 FAILED" in first.stdout and "2 ok, 1 failed" in first.stdout
    assert "case9" in json.loads((out_dir / "failures.json").read_text())
    for case in ("case1", "case2"):
        report = json.loads((out_dir / case / "report.json").read_text())
        assert report["settings"]["sampler"]["steps"] == 1
        assert {"mask", "probability", "uncertainty", "lesions_csv", "preview"} <= set(report["outputs"])
    second = cli(*args)
    assert "2 already done, 1 to run" in second.stdout
    part = cli(*args, "--num-parts", "2", "--part-id", "1", "--overwrite")
    assert "1 case(s) in this part" in part.stdout


def test_build_engine_verify_on_cpu():
    out = cli("build-engine", "--backend", "openvino", "--precision", "fp32", "--verify")
    assert out.returncode == 0, out.stderr
    assert "verify openvino fp32 vs onnxruntime fp32" in out.stdout and ": ok" in out.stdout


def test_predict_on_dicom_series_writes_a_seg(tmp_path):
    """DICOM in (two series folders, and a study folder), DICOM SEG out, equal to the NIfTI mask voxel for voxel."""
    import numpy as np

    from diffseg.runtime.dicom import read_pet_ct, read_seg, write_phantom_dicom
    from diffseg.runtime.volume import read_volume

    phantom = make_phantom(2, PhantomOptions(ct_size_xy=128, ct_slices=24))
    dirs = write_phantom_dicom(phantom, tmp_path / "study")
    common = ["--backend", "onnxruntime", "--steps", "1", "--samples", "1", "--no-progress"]
    out = cli("predict", "--ct", str(dirs["ct_dir"]), "--pet", str(dirs["pet_dir"]), "-o", str(tmp_path / "o"), *common)
    assert out.returncode == 0, out.stderr
    study = read_pet_ct(tmp_path / "study")
    seg = read_seg(tmp_path / "o" / "seg.dcm", study)
    mask = read_volume(tmp_path / "o" / "mask.nii.gz")
    assert seg.same_grid(mask) and np.array_equal(seg.array > 0, mask.array > 0)
    table = json.loads((tmp_path / "o" / "lesions_dicom.json").read_text())
    assert study.study_instance_uid in json.dumps(table)
    whole = cli("predict", "-i", str(tmp_path / "study"), "-o", str(tmp_path / "o2"), *common)
    assert whole.returncode == 0, whole.stderr
    assert (tmp_path / "o2" / "study" / "seg.dcm").is_file()


def test_info_lists_what_each_backend_declares():
    # Reference: the classes' own declarations and available_backends(), which `auto` uses.
    from diffseg.runtime.backends import BACKENDS, available_backends
    from diffseg.runtime.backends.base import _backend_class

    engines = json.loads(cli("info", "--json").stdout)["engines"]
    assert set(engines) == set(BACKENDS)
    reasons = available_backends()
    for name, engine in engines.items():
        assert engine["available"] == (reasons[name] is None), name
        if engine["available"]:
            cls = _backend_class(name)
            assert engine["device_ops"] == cls.has_device_ops and list(engine["precisions"]) == list(cls.precisions)
    assert engines["onnxruntime"]["device_ops"] and not engines["openvino"]["device_ops"]
    assert engines["onnxruntime"]["precisions"] == {"fp32": None}


def test_predict_refuses_an_implausible_dose_unless_forced(tmp_path):
    # Reference: the synthetic study's known dose (370 MBq); written in MBq (370) it gives SUVs 10^6 times off. The
    # CLI must refuse it with the file and the fix named, and with --force-units segment it and record the override.
    import pydicom

    from diffseg.runtime.dicom import write_phantom_dicom

    phantom = make_phantom(2, PhantomOptions(ct_size_xy=128, ct_slices=24))
    dirs = write_phantom_dicom(phantom, tmp_path / "study")
    for path in sorted(dirs["pet_dir"].glob("*.dcm")):
        ds = pydicom.dcmread(path)
        ds.RadiopharmaceuticalInformationSequence[0].RadionuclideTotalDose = "370"
        ds.save_as(path, enforce_file_format=True)
    common = ["--backend", "onnxruntime", "--steps", "1", "--samples", "1", "--no-progress"]
    inputs = ["--ct", str(dirs["ct_dir"]), "--pet", str(dirs["pet_dir"])]
    refused = cli("predict", *inputs, "-o", str(tmp_path / "o"), *common)
    assert refused.returncode == 2
    assert "RadionuclideTotalDose" in refused.stderr and "--force-units" in refused.stderr
    assert not (tmp_path / "o" / "report.json").exists()
    forced = cli("predict", *inputs, "-o", str(tmp_path / "f"), "--force-units", *common)
    assert forced.returncode == 0, forced.stderr
    # Two overrides: the dose as written, and the PET it gives (SUVs 10^6 too large) used as it is.
    dose, pet = json.loads((tmp_path / "f" / "report.json").read_text())["overrides"]
    assert "RadionuclideTotalDose" in dose and "force_units" in dose
    assert "does not look like a PET in SUVbw" in pet and "force_units" in pet
