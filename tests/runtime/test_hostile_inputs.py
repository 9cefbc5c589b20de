"""Broken and hostile inputs against ``diffseg predict`` as a user runs it: each gets its named error, a non-zero
exit, and leaves nothing behind (no file under ``-o`` but a cohort's ``failures.json``).

Every case is built here from a small phantom (NIfTI and DICOM), damaged the way real files are damaged: cut by a
failed copy, saved in the wrong units, exported by a spreadsheet, written by a hostile CSV. The controls at the
end (an override used, a file without a DICOM preamble) must succeed and say what was overridden.
"""

from __future__ import annotations

import gzip
import json
import shutil
import struct
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pydicom
import pytest
import SimpleITK as sitk

from diffseg.runtime.cli import main as diffseg_main
from diffseg.runtime.phantom import PhantomOptions, make_phantom
from diffseg.runtime.volume import Volume, write_volume

FAST = ["--steps", "2", "--samples", "1", "--no-progress"]


@dataclass(frozen=True)
class Inputs:
    """The clean inputs every case starts from (built once)."""

    ct: Path  # ct.nii.gz
    pet: Path  # pet.nii.gz
    ct_volume: Volume
    pet_volume: Volume
    dicom: Path  # a study folder: ct/ and pet/ series


def build_clean(root: Path) -> Inputs:
    """The clean inputs: a small phantom as NIfTI and as a DICOM study."""
    from diffseg.runtime.dicom import write_phantom_dicom

    ph = make_phantom(7, PhantomOptions(ct_size_xy=96, ct_slices=24, flip_probability=0.0))
    write_volume(ph.ct, root / "ct.nii.gz")
    write_volume(ph.pet, root / "pet.nii.gz")
    write_phantom_dicom(ph, root / "dicom")
    return Inputs(root / "ct.nii.gz", root / "pet.nii.gz", ph.ct, ph.pet, root / "dicom")


@pytest.fixture(scope="module")
def clean(tmp_path_factory) -> Inputs:
    return build_clean(tmp_path_factory.mktemp("clean"))


# --- builders: each takes (clean inputs, a scratch folder) and returns predict's input arguments -------------------


def _pair(ct: Path, pet: Path) -> list[str]:
    return ["--ct", str(ct), "--pet", str(pet)]


def _cut(src: Path, dst: Path, fraction: float) -> Path:
    data = src.read_bytes()
    dst.write_bytes(data[: int(len(data) * fraction)])
    return dst


def _as(volume: Volume, path: Path, array: np.ndarray | None = None, **geometry) -> Path:
    img = sitk.GetImageFromArray(volume.array if array is None else array)
    img.SetSpacing(geometry.get("spacing", tuple(volume.spacing)))
    img.SetOrigin(geometry.get("origin", tuple(volume.origin)))
    img.SetDirection(geometry.get("direction", tuple(np.asarray(volume.direction).ravel())))
    sitk.WriteImage(img, str(path), useCompression=path.name.endswith((".gz", ".mha", ".nrrd")))
    return path


def truncated(suffix: str, fraction: float = 0.6) -> Callable[[Inputs, Path], list[str]]:
    def build(c: Inputs, d: Path) -> list[str]:
        whole = _as(c.ct_volume, d / f"whole{suffix}")
        return _pair(_cut(whole, d / f"ct{suffix}", fraction), c.pet)

    return build


def gzip_flipped_byte(c: Inputs, d: Path) -> list[str]:
    data = bytearray(c.ct.read_bytes())
    data[len(data) // 2] ^= 0xFF
    (d / "ct.nii.gz").write_bytes(bytes(data))
    return _pair(d / "ct.nii.gz", c.pet)


def empty_file(c: Inputs, d: Path) -> list[str]:
    (d / "ct.nii.gz").write_bytes(b"")
    return _pair(d / "ct.nii.gz", c.pet)


def wrong_extension(c: Inputs, d: Path) -> list[str]:
    (d / "ct.txt").write_text("patient,ct\n1,2\n")
    return _pair(d / "ct.txt", c.pet)


def nifti_pixdim(index: int, value: float) -> Callable[[Inputs, Path], list[str]]:
    """A NIfTI whose header says spacing ``value`` along axis ``index`` (1..3), written over a clean file."""

    def build(c: Inputs, d: Path) -> list[str]:
        raw = bytearray(gzip.decompress(c.ct.read_bytes()))
        struct.pack_into("<f", raw, 76 + 4 * index, value)
        (d / "ct.nii.gz").write_bytes(gzip.compress(bytes(raw)))
        return _pair(d / "ct.nii.gz", c.pet)

    return build


def values(modality: str, change: Callable[[np.ndarray], np.ndarray]) -> Callable[[Inputs, Path], list[str]]:
    def build(c: Inputs, d: Path) -> list[str]:
        vol = c.ct_volume if modality == "ct" else c.pet_volume
        path = _as(vol, d / f"{modality}.nii.gz", change(vol.array.astype(np.float32)))
        return _pair(path, c.pet) if modality == "ct" else _pair(c.ct, path)

    return build


def _nan_rows(a: np.ndarray) -> np.ndarray:
    a[2, 10:20, 10:20] = np.nan
    return a


def _inf_rows(a: np.ndarray) -> np.ndarray:
    a[1, :4, :4] = np.inf
    return a


def _labels(a: np.ndarray) -> np.ndarray:
    return (a > np.percentile(a, 90)).astype(np.float32)


def geometry(modality: str, suffix: str = ".nii.gz", **change) -> Callable[[Inputs, Path], list[str]]:
    def build(c: Inputs, d: Path) -> list[str]:
        vol = c.ct_volume if modality == "ct" else c.pet_volume
        path = _as(vol, d / f"{modality}{suffix}", **change)
        return _pair(path, c.pet) if modality == "ct" else _pair(c.ct, path)

    return build


def image_dims(array: np.ndarray, vector: bool = False) -> Callable[[Inputs, Path], list[str]]:
    def build(c: Inputs, d: Path) -> list[str]:
        sitk.WriteImage(sitk.GetImageFromArray(array, isVector=vector), str(d / "ct.nii.gz"))
        return _pair(d / "ct.nii.gz", c.pet)

    return build


def huge_header(c: Inputs, d: Path) -> list[str]:
    """A 348-byte NIfTI header that claims 30000³ voxels, with 1 kB of data."""
    raw = bytearray(gzip.decompress(c.ct.read_bytes())[:352])
    struct.pack_into("<8h", raw, 40, 3, 30000, 30000, 30000, 1, 1, 1, 1)
    (d / "ct.nii.gz").write_bytes(gzip.compress(bytes(raw) + b"\0" * 1024))
    return _pair(d / "ct.nii.gz", c.pet)


def missing_pet(c: Inputs, d: Path) -> list[str]:
    return _pair(c.ct, d / "pet.nii.gz")


def file_and_folder(c: Inputs, d: Path) -> list[str]:
    return _pair(c.ct, c.dicom / "pet")


# DICOM: the clean study copied, then changed with pydicom.


def dicom_change(
    change: Callable[[list[Path], list[Path]], None], study: bool = False
) -> Callable[[Inputs, Path], list[str]]:
    def build(c: Inputs, d: Path) -> list[str]:
        folder = d / "study"
        shutil.copytree(c.dicom, folder)
        change(sorted((folder / "ct").iterdir()), sorted((folder / "pet").iterdir()))
        return ["-i", str(folder)] if study else _pair(folder / "ct", folder / "pet")

    return build


def _edit(paths: list[Path], **values) -> None:
    for path in paths:
        ds = pydicom.dcmread(path)
        for keyword, value in values.items():
            if value is None:
                delattr(ds, keyword)
            elif keyword == "RadiopharmaceuticalInformationSequence":
                for k, v in value.items():
                    setattr(ds.RadiopharmaceuticalInformationSequence[0], k, v)
            else:
                setattr(ds, keyword, value)
        ds.save_as(path, enforce_file_format=True)


def _duplicate_slice(ct: list[Path], pet: list[Path]) -> None:
    ds = pydicom.dcmread(ct[5])
    ds.SOPInstanceUID = pydicom.uid.generate_uid()
    ds.save_as(ct[5].with_name("dup.dcm"), enforce_file_format=True)


def _tilt(ct: list[Path], pet: list[Path]) -> None:
    for k, path in enumerate(ct):  # a 2-degree gantry tilt: each slice shifted in y by its z times tan(2°)
        ds = pydicom.dcmread(path)
        x, y, z = (float(v) for v in ds.ImagePositionPatient)
        ds.ImagePositionPatient = [x, y + k * float(ds.SliceThickness) * np.tan(np.radians(2.0)), z]
        ds.save_as(path, enforce_file_format=True)


def _second_ct_series(ct: list[Path], pet: list[Path]) -> None:
    uid = pydicom.uid.generate_uid()
    for path in ct[::2]:  # half of the slices re-labelled as another series with the same description
        ds = pydicom.dcmread(path)
        ds.SeriesInstanceUID = uid
        ds.save_as(path, enforce_file_format=True)


def _no_pet(ct: list[Path], pet: list[Path]) -> None:
    shutil.rmtree(pet[0].parent)


def _secondary_capture(ct: list[Path], pet: list[Path]) -> None:
    _edit(ct, SOPClassUID="1.2.840.10008.5.1.4.1.1.7")
    for path in ct:
        ds = pydicom.dcmread(path)
        ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID
        ds.save_as(path, enforce_file_format=True)


def _no_preamble(ct: list[Path], pet: list[Path]) -> None:
    for path in [*ct, *pet]:
        ds = pydicom.dcmread(path)
        ds.save_as(path, enforce_file_format=False)
        data = path.read_bytes()
        if data[128:132] == b"DICM":  # strip the preamble and prefix, keep the meta group: as some PACS export
            path.write_bytes(data[132:])


# Cohort CSVs and the output folder.


def csv_rows(*rows: str, encoding: str = "utf-8") -> Callable[[Inputs, Path], list[str]]:
    def build(c: Inputs, d: Path) -> list[str]:
        shutil.copy(c.ct, d / "ct.nii.gz")
        shutil.copy(c.pet, d / "pet.nii.gz")
        (d / "cohort.csv").write_bytes(("case_id,ct,pet\n" + "\n".join(rows) + "\n").encode(encoding))
        return ["-i", str(d / "cohort.csv")]

    return build


def output_is_a_file(c: Inputs, d: Path) -> list[str]:
    (d / "out").write_text("not a folder")
    return _pair(c.ct, c.pet)


def symlink_out_of_output(c: Inputs, d: Path) -> list[str]:
    (d / "out").mkdir()
    (d / "elsewhere").mkdir()
    (d / "out" / "case1").symlink_to(d / "elsewhere")
    return csv_rows("case1,ct.nii.gz,pet.nii.gz")(c, d)


def package_change(change: Callable[[Path], None]) -> Callable[[Inputs, Path], list[str]]:
    def build(c: Inputs, d: Path) -> list[str]:
        from diffseg.runtime.manifest import shipped_models

        package = d / "model"
        shutil.copytree(shipped_models()["default"], package, ignore=shutil.ignore_patterns("*.pt"))
        change(package)
        return ["-m", str(package), *_pair(c.ct, c.pet)]

    return build


def _flip_onnx_byte(package: Path) -> None:
    path = package / "denoiser.onnx"
    data = bytearray(path.read_bytes())
    data[len(data) // 3] ^= 0x01
    path.write_bytes(bytes(data))


def _manifest(change: Callable[[dict], None]) -> Callable[[Path], None]:
    def edit(package: Path) -> None:
        doc = json.loads((package / "manifest.json").read_text())
        change(doc)
        (package / "manifest.json").write_text(json.dumps(doc))

    return edit


@dataclass(frozen=True)
class Case:
    name: str
    build: Callable[[Inputs, Path], list[str]]
    message: str  # a phrase the first error line must hold (case-insensitive)
    names: str | None  # a file or field the message must name (None: the output folder or the CSV, see check)
    extra: tuple[str, ...] = ()
    exit_code: int = 2


def _set(doc: dict, path: str, value) -> None:
    *keys, last = path.split(".")
    for k in keys:
        doc = doc[k]
    doc[last] = value


CASES = [
    # Image files that cannot be read whole.
    Case("truncated .nii.gz", truncated(".nii.gz"), "truncated", "ct.nii.gz"),
    Case("truncated .nii.gz near its end", truncated(".nii.gz", 0.98), "truncated", "ct.nii.gz"),
    Case("truncated .nii", truncated(".nii"), "truncated", "ct.nii"),
    Case("truncated .mha", truncated(".mha"), "truncated", "ct.mha"),
    Case("truncated .nrrd", truncated(".nrrd"), "truncated", "ct.nrrd"),
    Case("gzip with a flipped byte", gzip_flipped_byte, "corrupt", "ct.nii.gz"),
    Case("empty file", empty_file, "empty", "ct.nii.gz"),
    Case("not an image (wrong extension)", wrong_extension, "cannot read", "ct.txt"),
    Case("zero slice spacing", nifti_pixdim(3, 0.0), "spacing", "ct.nii.gz"),
    Case("negative spacing", nifti_pixdim(1, -1.0), "spacing", "ct.nii.gz"),
    Case("NaN spacing", nifti_pixdim(2, float("nan")), "spacing", "ct.nii.gz"),
    Case("NaN voxels in the CT", values("ct", _nan_rows), "nan", "ct.nii.gz"),
    Case("infinite voxels in the PET", values("pet", _inf_rows), "infinite", "pet.nii.gz"),
    Case("header claims 30000³ voxels", huge_header, "voxels", "ct.nii.gz"),
    Case("2D image", image_dims(np.zeros((64, 64), np.int16)), "3d", "ct.nii.gz"),
    Case("4D image", image_dims(np.zeros((2, 4, 16, 16), np.int16)), "3d", "ct.nii.gz"),
    Case("RGB image", image_dims(np.zeros((4, 16, 16, 3), np.uint8), vector=True), "component", "ct.nii.gz"),
    # Geometry.
    Case("a physical extent of kilometres", geometry("ct", spacing=(1000.0, 1000.0, 1000.0)), "extent", "ct.nii.gz"),
    Case(
        "non-orthonormal direction",
        geometry("ct", ".mha", direction=(1, 0, 0, 0.5, 1, 0, 0, 0, 1)),
        "direction",
        "ct.mha",
    ),
    Case("CT and PET do not overlap", geometry("pet", origin=(5000.0, 5000.0, 5000.0)), "overlap", "pet.nii.gz"),
    # Values the model would misread.
    Case("CT in raw stored values (0…4095)", values("ct", lambda a: a + 1024), "hu", "ct.nii.gz"),
    Case("CT in raw values, air at 0", values("ct", lambda a: np.clip(a + 1000, 0, None)), "hu", "ct.nii.gz"),
    Case("PET in Bq/ml", values("pet", lambda a: a * 5300.0), "suv", "pet.nii.gz"),
    Case("PET all zeros", values("pet", lambda a: a * 0), "pet", "pet.nii.gz"),
    Case("label image as the PET", values("pet", _labels), "label", "pet.nii.gz"),
    Case("label image as the CT", values("ct", _labels), "label", "ct.nii.gz"),
    # Inputs that are not there or not of one kind.
    Case("PET file missing", missing_pet, "no such file", "pet.nii.gz"),
    Case("an image file and a DICOM folder", file_and_folder, "both", None),
    # DICOM quantitative attributes and series.
    Case("weight in grams", dicom_change(lambda ct, pt: _edit(pt, PatientWeight=75000)), "PatientWeight", None),
    Case(
        "dose in MBq",
        dicom_change(lambda ct, pt: _edit(pt, RadiopharmaceuticalInformationSequence={"RadionuclideTotalDose": 370})),
        "RadionuclideTotalDose",
        None,
    ),
    Case("PET rescale slope 0", dicom_change(lambda ct, pt: _edit(pt[:3], RescaleSlope=0)), "RescaleSlope", None),
    Case("CT rescale slope negative", dicom_change(lambda ct, pt: _edit(ct, RescaleSlope=-1)), "RescaleSlope", None),
    Case(
        "injection after the scan",
        dicom_change(
            lambda ct, pt: _edit(pt, RadiopharmaceuticalInformationSequence={"RadiopharmaceuticalStartTime": "235900"})
        ),
        "after",
        None,
    ),
    Case(
        "first CT slice without a position",
        dicom_change(lambda ct, pt: _edit(ct[:1], ImagePositionPatient=None)),
        "ImagePositionPatient",
        None,
    ),
    Case(
        "middle CT slice without a position",
        dicom_change(lambda ct, pt: _edit(ct[10:11], ImagePositionPatient=None)),
        "ImagePositionPatient",
        None,
    ),
    Case("a CT slice missing", dicom_change(lambda ct, pt: ct[11].unlink()), "missing slice", None),
    Case("a CT slice twice", dicom_change(_duplicate_slice), "duplicate", None),
    Case("gantry tilt", dicom_change(_tilt), "tilt", None),
    Case("two CT series mixed in one folder", dicom_change(_second_ct_series), "series", None),
    Case("a study with a CT and no PET", dicom_change(_no_pet, study=True), "no pt", None),
    Case("secondary-capture CT", dicom_change(_secondary_capture), "secondary", None),
    # Cohort CSVs that try to write elsewhere, or are not what they say.
    Case("case id ../../x", csv_rows("../../x,ct.nii.gz,pet.nii.gz"), "line 2", "cohort.csv"),
    Case("absolute case id", csv_rows("/tmp/diffseg-x,ct.nii.gz,pet.nii.gz"), "line 2", "cohort.csv"),
    Case("case id '.'", csv_rows(".,ct.nii.gz,pet.nii.gz"), "line 2", "cohort.csv"),
    Case("case id with a separator", csv_rows("a/b,ct.nii.gz,pet.nii.gz"), "line 2", "cohort.csv"),
    Case(
        "duplicate case ids",
        csv_rows("a,ct.nii.gz,pet.nii.gz", "a,ct.nii.gz,pet.nii.gz"),
        "already used on line 2",
        "cohort.csv",
    ),
    Case("CSV row with a missing file", csv_rows("a,ct.nii.gz,nothere.nii.gz"), "does not exist", "nothere.nii.gz"),
    Case("CSV not in UTF-8", csv_rows("patiënt,ct.nii.gz,pet.nii.gz", encoding="cp1252"), "utf-8", "cohort.csv"),
    Case("output folder is a file", output_is_a_file, "not a folder", "out"),
    Case("a symlink under -o pointing out", symlink_out_of_output, "outside", "case1", exit_code=1),
    # Model packages.
    Case("tampered ONNX file", package_change(_flip_onnx_byte), "sha256", "denoiser.onnx"),
    Case(
        "manifest steps 'ten'",
        package_change(_manifest(lambda doc: _set(doc, "defaults.steps", "ten"))),
        "steps",
        "manifest.json",
    ),
    Case("manifest without patch_size", package_change(_manifest(lambda d: d.pop("patch_size"))), "patch_size", None),
    Case("threads -3", lambda c, d: _pair(c.ct, c.pet), "threads", None, extra=("--threads", "-3")),
    Case("steps 0", lambda c, d: _pair(c.ct, c.pet), "steps", None, extra=("--steps", "0")),
]


def _run(args: list[str], capsys) -> tuple[int, str, str]:
    code = diffseg_main(["predict", *args])
    out = capsys.readouterr()
    return code, out.out, out.err


def _files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.is_file() or p.is_symlink()) if folder.exists() else []


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_hostile_input_is_refused(case: Case, clean: Inputs, tmp_path: Path, capsys) -> None:
    out = tmp_path / "out"
    args = [*case.build(clean, tmp_path), "-o", str(out), *FAST, *case.extra]
    before = _files(out)
    code, stdout, stderr = _run(args, capsys)
    text = stderr + stdout
    assert code == case.exit_code, f"exit {code}, expected {case.exit_code}:\n{text}"
    assert case.message.lower() in text.lower(), text
    if case.names:
        assert case.names in text, f"the message does not name {case.names}:\n{text}"
    left = [p for p in _files(out) if p not in before and p.name != "failures.json"]
    assert not left, f"left behind: {left}"
    assert not list(tmp_path.glob("elsewhere/*")), "wrote outside -o"


def test_override_is_used_and_recorded(clean: Inputs, tmp_path: Path, capsys) -> None:
    """--nan-as turns the NaN refusal into a run whose report says what was replaced."""
    args = values("ct", _nan_rows)(clean, tmp_path)
    code, _, err = _run([*args, "-o", str(tmp_path / "out"), "--nan-as", "-1000", *FAST], capsys)
    assert code == 0, err
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    assert len(report["overrides"]) == 1 and "nan_as" in report["overrides"][0]


def test_dicom_without_preamble_is_read(clean: Inputs, tmp_path: Path, capsys) -> None:
    """DICOM files without the 128-byte preamble (as some PACS export them) are DICOM, not refused."""
    args = dicom_change(_no_preamble)(clean, tmp_path)
    assert (tmp_path / "study" / "ct").iterdir().__next__().read_bytes()[128:132] != b"DICM"
    code, _, err = _run([*args, "-o", str(tmp_path / "out"), *FAST], capsys)
    assert code == 0, err
    assert (tmp_path / "out" / "report.json").is_file() and (tmp_path / "out" / "seg.dcm").is_file()


def test_there_are_at_least_45_cases() -> None:
    assert len(CASES) >= 45 and len({c.name for c in CASES}) == len(CASES)
