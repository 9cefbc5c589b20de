"""DICOM input: synthetic series round trip, series selection, geometry and SUV checks, broken inputs.

References: the phantom itself (CT exact, PET SUV to 1e-3 relative plus the 16-bit quantisation step of the
writer), SimpleITK's ImageSeriesReader (geometry to 1e-4 mm, values exact), the QIBA SUVbw formula computed
here by hand, and dciodvfy (dicom3tools) for validity.
"""

from __future__ import annotations

import copy
import json
import math
import re
import shutil
import subprocess
from datetime import datetime
from pathlib import Path

import numpy as np
import pydicom
import pytest
import SimpleITK as sitk

from diffseg.runtime.cli import main as cli_main
from diffseg.runtime.dicom import (
    UID_ROOT,
    DicomInputError,
    GeometryOptions,
    PetCtRules,
    SeriesRules,
    align_to_grid,
    load_series,
    parse_dicom_datetime,
    parse_dicom_dt,
    read_pet_ct,
    scan_dicom,
    scan_dicom_folder,
    select_series,
    sort_slices,
    suv_conversion,
    write_phantom_dicom,
)
from diffseg.runtime.dicom.plausibility import PLAUSIBLE_RANGES
from diffseg.runtime.dicom.synthetic import SyntheticDicomOptions
from diffseg.runtime.phantom import PhantomOptions, make_phantom

# (seed, flip probability): no flips; every axis of both grids flipped; CT x flipped only and PET z flipped
# only (left-handed grids: the DICOM slice order then runs against the phantom's z axis).
CASES = {"unflipped": (2, 0.0), "all_flipped": (2, 1.0), "mixed": (3, 0.5)}


def _phantom(case: str):
    seed, flip = CASES[case]
    return make_phantom(seed, PhantomOptions(ct_size_xy=64, ct_slices=16, flip_probability=flip))


@pytest.fixture(scope="module", params=sorted(CASES))
def written(request, tmp_path_factory):
    phantom = _phantom(request.param)
    out = tmp_path_factory.mktemp(f"dicom_{request.param}")
    info = write_phantom_dicom(phantom, out)
    return phantom, out, info


@pytest.fixture(scope="module")
def plain(tmp_path_factory):
    """An unflipped case for the tests that edit files (each copies it first)."""
    phantom = _phantom("unflipped")
    out = tmp_path_factory.mktemp("dicom_plain")
    return phantom, out, write_phantom_dicom(phantom, out)


def _copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def _corners(volume) -> np.ndarray:
    nx, ny, nz = volume.size_xyz
    idx = np.array([[i, j, k] for i in (0, nx - 1) for j in (0, ny - 1) for k in (0, nz - 1)], dtype=float)
    points = volume.index_to_physical(idx)
    return points[np.lexsort(points.T[::-1])]


def _edit(files, change) -> None:
    for path in files:
        ds = pydicom.dcmread(path)
        change(ds)
        ds.save_as(path, enforce_file_format=True)


# ----------------------------------------------------------------------------------------------------
# Round trip


def test_round_trip_gives_phantom_ct_exactly_and_pet_suv(written):
    phantom, out, info = written
    study = read_pet_ct(out)
    # CT: same voxel centres (align_to_grid fails beyond 1e-3 voxel), same values, int16 HU.
    assert study.ct.array.dtype == np.int16
    np.testing.assert_allclose(_corners(study.ct), _corners(phantom.ct), atol=1e-4)
    np.testing.assert_array_equal(align_to_grid(phantom.ct, study.ct).array, study.ct.array)
    # PET: SUV to 1e-3 relative, plus half the 16-bit step of each slice (slice maximum / 131070).
    np.testing.assert_allclose(_corners(study.pet), _corners(phantom.pet), atol=1e-4)
    expected = align_to_grid(phantom.pet, study.pet).array
    step = expected.max(axis=(1, 2), keepdims=True) / 131070.0
    assert np.all(np.abs(study.pet.array - expected) <= 1e-3 * np.abs(expected) + step * 1.0001)
    hot = expected > 0.01 * expected.max()
    assert np.max(np.abs(study.pet.array[hot] / expected[hot] - 1)) < 1e-3
    # Identity of the study.
    assert study.study_instance_uid == info["study_instance_uid"]
    assert study.ct_series_uid == info["ct_series_uid"]
    assert study.pet_series_uid == info["pet_series_uid"]
    assert study.frame_of_reference_uid == info["frame_of_reference_uid"]
    assert study.patient.patient_id == f"DIFFSEG-PHANTOM-{phantom.seed:05d}"
    assert study.patient.weight_kg == pytest.approx(75.0)
    # Headers follow the array's z order: slice k's position is the volume's slice k.
    positions = np.array([[float(v) for v in h.ImagePositionPatient] for h in study.ct_headers])
    z_axis = np.stack([np.zeros(16), np.zeros(16), np.arange(16)], axis=1)
    np.testing.assert_allclose(positions, study.ct.index_to_physical(z_axis), atol=1e-4)


@pytest.mark.parametrize("modality", ["ct", "pet"])
def test_geometry_and_values_match_simpleitk(written, modality):
    _, out, _ = written
    study = read_pet_ct(out)
    reader = sitk.ImageSeriesReader()
    reader.SetFileNames(reader.GetGDCMSeriesFileNames(str(out / modality)))
    image = reader.Execute()
    ours = study.ct if modality == "ct" else study.pet
    np.testing.assert_allclose(image.GetOrigin(), ours.origin, atol=1e-4)
    np.testing.assert_allclose(image.GetSpacing(), ours.spacing, atol=1e-6)
    np.testing.assert_allclose(image.GetDirection(), ours.direction, atol=1e-6)
    values = sitk.GetArrayFromImage(image)
    if modality == "ct":
        np.testing.assert_array_equal(values, ours.array)
    else:  # SimpleITK gives Bq/ml (per-slice rescale); one START factor makes it SUV. float32 rounding only.
        np.testing.assert_allclose(values * study.suv.factors[0], ours.array, rtol=1e-6, atol=1e-6)


def test_uids_are_deterministic_and_under_the_root(tmp_path):
    phantom = make_phantom(5, PhantomOptions(ct_size_xy=32, ct_slices=8))
    a = write_phantom_dicom(phantom, tmp_path / "a")
    b = write_phantom_dicom(phantom, tmp_path / "b")
    other = write_phantom_dicom(make_phantom(6, PhantomOptions(ct_size_xy=32, ct_slices=8)), tmp_path / "c")
    keys = ("study_instance_uid", "frame_of_reference_uid", "ct_series_uid", "pet_series_uid")
    assert [a[k] for k in keys] == [b[k] for k in keys]
    assert all(a[k] != other[k] for k in keys)
    sop = [pydicom.dcmread(f).SOPInstanceUID for f in a["ct_files"] + a["pet_files"]]
    assert sop == [pydicom.dcmread(f).SOPInstanceUID for f in b["ct_files"] + b["pet_files"]]
    assert len(set(sop)) == len(sop)
    assert all(u.startswith(UID_ROOT) and len(u) <= 64 for u in [*sop, *(a[k] for k in keys)])


def _dciodvfy(path: Path) -> tuple[list[str], str]:
    run = subprocess.run(["dciodvfy", str(path)], capture_output=True, text=True, timeout=60)
    text = run.stdout + run.stderr
    return [line for line in text.splitlines() if line.startswith("Error")], text


@pytest.mark.skipif(shutil.which("dciodvfy") is None, reason="dciodvfy (Debian package dicom3tools) missing")
def test_synthetic_instances_pass_dciodvfy(plain):
    _, _, info = plain
    for path in (info["ct_files"][0], info["ct_files"][-1], info["pet_files"][0]):
        errors, text = _dciodvfy(path)
        assert not errors, text


def test_phantom_cli_writes_dicom_beside_nifti(tmp_path):
    rc = cli_main(["phantom", "--seed", "7", "--ct-size", "32", "--ct-slices", "8", "--dicom", "-o", str(tmp_path)])
    assert rc == 0
    assert (tmp_path / "ct.nii.gz").is_file() and (tmp_path / "mask.nii.gz").is_file()
    assert len(list((tmp_path / "ct").glob("*.dcm"))) == 8
    study = read_pet_ct(tmp_path)
    assert study.ct.shape == (8, 32, 32)
    assert json.loads((tmp_path / "case.json").read_text())["seed"] == 7


# ----------------------------------------------------------------------------------------------------
# Scanning: non-images and broken files


def _text_sr(reference: Path, path: Path) -> None:
    """A minimal Basic Text SR in the same study: an object with no pixels that must be skipped."""
    ref = pydicom.dcmread(reference, stop_before_pixels=True)
    ds = pydicom.Dataset()
    for keyword in ("PatientName", "PatientID", "StudyInstanceUID", "StudyDate", "StudyTime"):
        setattr(ds, keyword, getattr(ref, keyword))
    ds.SOPClassUID = "1.2.840.10008.5.1.4.1.1.88.11"
    ds.SOPInstanceUID = pydicom.uid.generate_uid()
    ds.SeriesInstanceUID = pydicom.uid.generate_uid()
    ds.Modality = "SR"
    ds.file_meta = pydicom.dataset.FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.file_meta.TransferSyntaxUID = pydicom.uid.ExplicitVRLittleEndian
    ds.save_as(path, enforce_file_format=True)


def test_scan_skips_non_dicom_and_non_image_objects(plain, tmp_path, caplog):
    from diffseg.runtime.dicom import write_seg

    phantom, src, _ = plain
    folder = _copy(src, tmp_path / "study")
    study = read_pet_ct(folder)
    write_seg(phantom.mask, study, folder / "derived" / "seg.dcm")
    _text_sr(study.ct_series.files[0], folder / "derived" / "report.dcm")
    (folder / "README.txt").write_text("not dicom")
    caplog.set_level("INFO", logger="diffseg")
    result = scan_dicom(folder)
    assert sorted(s.modality for s in result.series) == ["CT", "PT"]
    reasons = {p.name: s.reason for s in result.skipped for p in [s.path]}
    assert "Segmentation" in reasons["seg.dcm"]
    assert "SR" in reasons["report.dcm"]
    assert "not DICOM" in reasons["README.txt"]
    assert not any(s.broken for s in result.skipped)
    assert "skipping" in caplog.text and "seg.dcm" in caplog.text
    np.testing.assert_array_equal(read_pet_ct(folder).ct.array, study.ct.array)


@pytest.mark.parametrize("cut", ["pixel_data", "before_pixels", "header"])
def test_truncated_file_is_reported_and_refused(plain, tmp_path, cut):
    _, src, info = plain
    folder = _copy(src, tmp_path / "study")
    victim = folder / "ct" / info["ct_files"][7].name
    data = victim.read_bytes()
    keep = {"pixel_data": len(data) - 1000, "before_pixels": len(data) - 64 * 64 * 2 - 12, "header": 700}[cut]
    victim.write_bytes(data[:keep])
    result = scan_dicom(folder)  # never raises on a broken file
    broken = [s for s in result.skipped if s.broken]
    assert [s.path for s in broken] == [victim]
    with pytest.raises(DicomInputError, match=rf"1 file\(s\) cannot be read, e.g. .*{victim.name}: truncated"):
        read_pet_ct(folder)
    # Ignoring unreadable files still refuses the CT: by file when its header names the series, else by
    # the gap it leaves.
    with pytest.raises(DicomInputError) as err:
        read_pet_ct(folder, PetCtRules(allow_broken_files=True))
    message = str(err.value)
    assert message.startswith("CT series #2")
    if cut == "header":
        assert "1 missing slice(s)" in message
    else:
        assert f"{victim.name}: truncated" in message


# ----------------------------------------------------------------------------------------------------
# Geometry checks


def test_missing_slice(plain, tmp_path):
    _, src, info = plain
    folder = _copy(src, tmp_path / "study")
    (folder / "ct" / info["ct_files"][5].name).unlink()
    with pytest.raises(DicomInputError, match=r"CT series .*1 missing slice\(s\).*median step is 3\.000 mm"):
        read_pet_ct(folder)


def test_duplicate_positions(plain, tmp_path):
    _, src, info = plain
    folder = _copy(src, tmp_path / "study")
    ds = pydicom.dcmread(info["ct_files"][3])
    ds.SOPInstanceUID = pydicom.uid.generate_uid()
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.save_as(folder / "ct" / "copy.dcm", enforce_file_format=True)
    with pytest.raises(DicomInputError, match="duplicate slice positions"):
        read_pet_ct(folder)


@pytest.mark.parametrize("kind", ["sheared_positions", "tilted_planes"])
def test_tilted_gantry(plain, tmp_path, kind):
    _, src, _ = plain
    folder = _copy(src, tmp_path / "study")
    degrees = 8.0  # within SeriesRules' 10° axial tolerance, so the series is selected and then refused
    angle = math.radians(degrees)

    def tilt(ds):
        ds.GantryDetectorTilt = degrees
        if kind == "sheared_positions":  # planes stay axial, each slice shifted in y in proportion to z
            x, y, z = (float(v) for v in ds.ImagePositionPatient)
            ds.ImagePositionPatient = [x, y + math.tan(angle) * (z + 50.0), z]
        else:  # planes tilted about x, positions still stepping along the table (z)
            ds.ImageOrientationPatient = [1, 0, 0, 0, round(math.cos(angle), 8), round(-math.sin(angle), 8)]

    _edit(sorted((folder / "ct").glob("*.dcm")), tilt)
    with pytest.raises(DicomInputError, match=r"CT series .*tilted gantry .*about 8\.0°"):
        read_pet_ct(folder)


def _stack(n=5, step=3.0):
    positions = [[0.0, 0.0, step * k] for k in range(n)]
    return positions, [[1, 0, 0, 0, 1, 0]] * n, [[0.8, 0.8]] * n


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (
            lambda p, o, s: o.__setitem__(2, [1, 0, 0, 0, 0.9, 0.43589]),
            "inconsistent ImageOrientationPatient",
        ),
        (lambda p, o, s: o.__setitem__(slice(None), [[1, 0, 0, 0.1, 0.99499, 0]] * len(o)), "non-orthogonal"),
        (lambda p, o, s: s.__setitem__(1, [0.8, 0.9]), "inconsistent PixelSpacing"),
        (lambda p, o, s: p.__setitem__(3, [0.0, 0.0, 9.5]), "non-uniform slice spacing"),
        (lambda p, o, s: p.__setitem__(slice(1, None), []), "at least 2 slices"),
    ],
)
def test_sort_slices_refuses_irregular_stacks(change, message):
    positions, orientations, spacings = (list(x) for x in _stack())
    change(positions, orientations, spacings)
    n = len(positions)
    with pytest.raises(DicomInputError, match=message):
        sort_slices(positions, orientations[:n], spacings[:n], "test series", GeometryOptions())


def test_sort_slices_orders_by_normal_not_by_list_order():
    positions = [[0.0, 0.0, z] for z in (6.0, 0.0, 12.0, 3.0, 9.0)]
    # Rows along -x, columns along +y: the normal is -z, so slices sort by descending z.
    stack = sort_slices(positions, [[-1, 0, 0, 0, 1, 0]] * 5, [[0.5, 0.7]] * 5, "test series")
    assert stack.order.tolist() == [2, 4, 0, 3, 1]
    assert stack.spacing == (0.7, 0.5, 3.0)
    assert stack.origin == (0.0, 0.0, 12.0)
    np.testing.assert_allclose(np.reshape(stack.direction, (3, 3)), [[-1, 0, 0], [0, 1, 0], [0, 0, -1]])


# ----------------------------------------------------------------------------------------------------
# SUVbw


@pytest.fixture(scope="module")
def pet_headers(plain):
    _, _, info = plain
    return [pydicom.dcmread(f, stop_before_pixels=True) for f in info["pet_files"]]


def _modified(headers, change):
    out = [copy.deepcopy(h) for h in headers]
    for h in out:
        change(h)
    return out


def test_suv_factor_start_matches_qiba_by_hand(pet_headers):
    opt = SyntheticDicomOptions()
    # QIBA: SUV = A · W[kg] · 1000 / (D · 2^(-(t_scan - t_inj)/T½)); 60 min uptake, F-18.
    expected = 75.0 * 1000.0 / (370.0e6 * 2.0 ** (-3600.0 / 6586.2))
    conversion = suv_conversion(pet_headers)
    assert conversion.decay_correction == "START"
    assert conversion.factors == pytest.approx([expected] * len(pet_headers), rel=1e-12)
    assert 1.0 / expected == pytest.approx(opt.bqml_per_suv, rel=1e-12)


def test_suv_decay_reference_admin_none_and_post_processed(pet_headers):
    def admin(h):
        h.DecayCorrection = "ADMIN"

    assert suv_conversion(_modified(pet_headers, admin)).factors[0] == pytest.approx(75.0e3 / 370.0e6, rel=1e-12)

    def none(h):
        h.DecayCorrection = "NONE"
        h.CorrectedImage = ["ATTN", "SCAT"]

    lam_d = math.log(2.0) * 180.0 / 6586.2
    expected = 75.0e3 / (370.0e6 * 2.0 ** (-3600.0 / 6586.2)) * lam_d / (1.0 - math.exp(-lam_d))
    assert suv_conversion(_modified(pet_headers, none)).factors[0] == pytest.approx(expected, rel=1e-12)

    def post_processed(h):  # series time 30 min after the acquisition: QIBA uses the acquisition time
        h.SeriesTime = "113000"

    start = suv_conversion(pet_headers).factors[0]
    assert suv_conversion(_modified(pet_headers, post_processed)).factors[0] == pytest.approx(start, rel=1e-12)


def test_suv_injection_before_midnight(pet_headers):
    def overnight(h):
        h.SeriesDate = h.AcquisitionDate = "20240103"
        h.SeriesTime = h.AcquisitionTime = "003000"
        info = h.RadiopharmaceuticalInformationSequence[0]
        del info.RadiopharmaceuticalStartDateTime
        info.RadiopharmaceuticalStartTime = "233000"

    conversion = suv_conversion(_modified(pet_headers, overnight))
    assert conversion.injection_time == datetime(2024, 1, 2, 23, 30)
    assert conversion.factors[0] == pytest.approx(75.0e3 / (370.0e6 * 2.0 ** (-3600.0 / 6586.2)), rel=1e-12)


def _drop_info(keyword):
    def change(h):
        delattr(h.RadiopharmaceuticalInformationSequence[0], keyword)

    return change


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (
            _drop_info("RadionuclideTotalDose"),
            r"RadionuclideTotalDose in RadiopharmaceuticalInformationSequence of .*PT_0001\.dcm is missing",
        ),
        (_drop_info("RadionuclideHalfLife"), "RadionuclideHalfLife"),
        (
            lambda h: (
                _drop_info("RadiopharmaceuticalStartDateTime")(h),
                _drop_info("RadiopharmaceuticalStartTime")(h),
            ),
            "RadiopharmaceuticalStartDateTime and RadiopharmaceuticalStartTime",
        ),
        (
            lambda h: delattr(h, "RadiopharmaceuticalInformationSequence"),
            "RadiopharmaceuticalInformationSequence",
        ),
        (lambda h: delattr(h, "PatientWeight"), "PatientWeight"),
        (lambda h: setattr(h, "PatientWeight", "0"), r"PatientWeight of .*PT_0001\.dcm must be > 0"),
        (lambda h: setattr(h, "Units", "CNTS"), r"Units of .*PT_0001\.dcm is 'CNTS' \(counts: needs the vendor's"),
        (lambda h: setattr(h, "Units", "CM2ML"), r"Units of .* is 'CM2ML' \(cm²/ml: SUVbsa\); SUVbw is computed from"),
        (lambda h: setattr(h, "DecayCorrection", ""), "DecayCorrection is 'missing'"),
        (lambda h: setattr(h, "CorrectedImage", ["DECY", "SCAT"]), "lacks ATTN"),
        (lambda h: (delattr(h, "SeriesTime"), delattr(h, "AcquisitionTime")), "no decay reference time"),
    ],
)
def test_suv_refuses_missing_attributes(pet_headers, change, message):
    with pytest.raises(DicomInputError, match=message):
        suv_conversion(_modified(pet_headers, change), "PT series #3")


def test_pet_without_dose_is_refused_by_read_pet_ct(plain, tmp_path):
    _, src, _ = plain
    folder = _copy(src, tmp_path / "study")
    _edit(sorted((folder / "pet").glob("*.dcm")), _drop_info("RadionuclideTotalDose"))
    with pytest.raises(DicomInputError, match=r"PT series #3 .*RadionuclideTotalDose .* is missing"):
        read_pet_ct(folder)


# Plausibility of the SUVbw inputs. Each case: the edit of every PET file, the attribute and the value the
# message must name, and the START factor (QIBA, by hand) of the values as written, which force_units gives.
_T_HALF = 6586.2


def _start_factor(weight_kg=75.0, dose_bq=370.0e6, half_life_s=_T_HALF, uptake_s=3600.0):
    return weight_kg * 1000.0 / (dose_bq * 2.0 ** (-uptake_s / half_life_s))


def _set_info(keyword, value):
    def change(ds):
        setattr(ds.RadiopharmaceuticalInformationSequence[0], keyword, value)

    return change


def _set_injection(dt):
    """The injection at ``dt`` (DT), in both RadiopharmaceuticalStartDateTime and RadiopharmaceuticalStartTime (two
    times that disagree are refused on their own)."""

    def change(ds):
        _set_info("RadiopharmaceuticalStartDateTime", dt)(ds)
        _set_info("RadiopharmaceuticalStartTime", dt[8:])(ds)

    return change


IMPLAUSIBLE = {
    "dose_in_MBq": (
        _set_info("RadionuclideTotalDose", "370"),
        "RadionuclideTotalDose in RadiopharmaceuticalInformationSequence",
        "370 Bq",
        _start_factor(dose_bq=370.0),
    ),
    "dose_in_kBq": (
        _set_info("RadionuclideTotalDose", "370000"),
        "RadionuclideTotalDose in RadiopharmaceuticalInformationSequence",
        "370000 Bq",
        _start_factor(dose_bq=370.0e3),
    ),
    "weight_in_grams": (
        lambda ds: setattr(ds, "PatientWeight", "75000"),
        "PatientWeight",
        "75000 kg",
        _start_factor(weight_kg=75000.0),
    ),
    "half_life_in_ms": (
        _set_info("RadionuclideHalfLife", "6586200"),
        "RadionuclideHalfLife in RadiopharmaceuticalInformationSequence",
        r"6\.5862e\+06 s",
        _start_factor(half_life_s=6586200.0),
    ),
    # In range as a half-life, but a 60 min uptake is then 32.8 half-lives: caught by the uptake check.
    "half_life_in_minutes": (
        _set_info("RadionuclideHalfLife", "109.77"),
        r"the time from RadiopharmaceuticalStartDateTime \(2024-01-02 10:00:00\) to SeriesDate/SeriesTime "
        r"\(2024-01-02 11:00:00\)",
        r"3600 s \(1 h, 32.8 half-lives of 109.77 s\)",
        _start_factor(half_life_s=109.77),
    ),
    "negative_delay": (
        _set_injection("20240102113000"),
        r"the time from RadiopharmaceuticalStartDateTime \(2024-01-02 11:30:00\) to SeriesDate/SeriesTime "
        r"\(2024-01-02 11:00:00\)",
        r"-1800 s \(-0.5 h",
        _start_factor(uptake_s=-1800.0),
    ),
    "injection_a_day_off": (
        _set_injection("20240101100000"),
        r"the time from RadiopharmaceuticalStartDateTime \(2024-01-01 10:00:00\) to SeriesDate/SeriesTime "
        r"\(2024-01-02 11:00:00\)",
        r"90000 s \(25 h, 13.7 half-lives",
        _start_factor(uptake_s=90000.0),
    ),
}


@pytest.fixture(scope="module")
def plain_study(plain):
    return read_pet_ct(plain[1])


def test_plausible_synthetic_study_has_no_override(plain, plain_study):
    assert plain_study.overrides == ()
    assert plain_study.suv.overrides == ()
    assert plain_study.suv.factors[0] == pytest.approx(_start_factor(), rel=1e-12)
    # Forcing what is plausible forces nothing.
    forced = read_pet_ct(plain[1], force_units=True)
    assert forced.overrides == ()
    np.testing.assert_array_equal(forced.pet.array, plain_study.pet.array)


@pytest.mark.parametrize("case", sorted(IMPLAUSIBLE))
def test_implausible_suv_input_is_refused_unless_forced(plain, plain_study, tmp_path, caplog, case):
    change, attribute, value, expected_factor = IMPLAUSIBLE[case]
    folder = _copy(plain[1], tmp_path / "study")
    pet_files = sorted((folder / "pet").glob("*.dcm"))
    _edit(pet_files, change)
    with pytest.raises(DicomInputError) as refused:
        read_pet_ct(folder)
    message = str(refused.value)
    assert message.startswith("PT series #3 ")
    assert re.search(rf"{attribute} of {re.escape(str(folder / 'pet'))}/PT_\d+\.dcm is {value}", message), message
    assert "outside the plausible range" in message and "force_units=True" in message
    # Forced: read as written, the factor is QIBA's of the values written, the SUVs scale with it.
    caplog.clear()
    with caplog.at_level("WARNING", logger="diffseg"):
        study = read_pet_ct(folder, force_units=True)
    assert study.suv.factors == pytest.approx([expected_factor] * len(pet_files), rel=1e-12)
    ratio = expected_factor / plain_study.suv.factors[0]
    np.testing.assert_allclose(study.pet.array, plain_study.pet.array * ratio, rtol=1e-6, atol=1e-30)
    assert len(study.overrides) == 1 and study.overrides == study.suv.overrides
    assert re.search(rf"{attribute} of .*PT_\d+\.dcm is {value}", study.overrides[0]), study.overrides[0]
    assert "force_units" in study.overrides[0]
    assert any("force_units" in r.getMessage() and r.levelname == "WARNING" for r in caplog.records)


@pytest.mark.parametrize("key", ["PatientWeight", "RadionuclideTotalDose", "RadionuclideHalfLife"])
def test_plausible_ranges_are_the_bounds_used(pet_headers, key):
    plausible = PLAUSIBLE_RANGES[key]

    def change(value):
        def edit(h):
            h.DecayCorrection = "ADMIN"  # times (and so the uptake check) out of play: this bound alone
            text = f"{value:.12g}"  # a DS holds at most 16 characters (str(500 * 1.001) has 18)
            if key == "PatientWeight":
                h.PatientWeight = text
            else:
                _set_info(key, text)(h)

        return edit

    for inside in (plausible.low, plausible.high):
        assert suv_conversion(_modified(pet_headers, change(inside))).overrides == ()
    for outside in (plausible.low * 0.999, plausible.high * 1.001):
        shown = re.escape(f"{outside:g} {plausible.unit}")
        with pytest.raises(DicomInputError, match=rf"{key}.* is {shown}, outside the plausible range"):
            suv_conversion(_modified(pet_headers, change(outside)))
        forced = suv_conversion(_modified(pet_headers, change(outside)), force_units=True)
        assert len(forced.overrides) == 1 and key in forced.overrides[0]


def test_uptake_check_per_decay_correction(pet_headers):
    late = _set_injection("20240102113000")  # 30 min after the scan

    def admin(h):  # decay-corrected to the injection: the times do not enter SUVbw, nothing to refuse
        late(h)
        h.DecayCorrection = "ADMIN"

    assert suv_conversion(_modified(pet_headers, admin)).overrides == ()

    def none(h):  # per slice: the first slice outside is named, with the count
        late(h)
        h.DecayCorrection = "NONE"
        h.CorrectedImage = ["ATTN", "SCAT"]

    n = len(pet_headers)
    with pytest.raises(
        DicomInputError,
        match=rf"AcquisitionDate/AcquisitionTime of slice 0 \(2024-01-02 11:00:00\) "
        rf"of {re.escape(pet_headers[0].filename)} is -1800 s .*; {n} of {n} slices outside",
    ):
        suv_conversion(_modified(pet_headers, none), "PT series #3")
    forced = suv_conversion(_modified(pet_headers, none), "PT series #3", force_units=True)
    assert len(forced.overrides) == 1
    lam_d = math.log(2.0) * 180.0 / _T_HALF
    expected = _start_factor(uptake_s=-1800.0) * lam_d / (1.0 - math.exp(-lam_d))
    assert forced.factors == pytest.approx([expected] * n, rel=1e-12)


def test_forced_values_that_give_no_finite_factor_are_still_refused(pet_headers):
    # F-18 half-life in hours: 1968 half-lives of uptake, 2^-1968 underflows.
    hours = _set_info("RadionuclideHalfLife", "1.8295")
    with pytest.raises(
        DicomInputError, match=r"RadionuclideHalfLife in RadiopharmaceuticalInformationSequence of .* is 1\.8295 s"
    ):
        suv_conversion(_modified(pet_headers, hours))
    with pytest.raises(
        DicomInputError, match="not a finite number: these values cannot be used, even with force_units"
    ):
        suv_conversion(_modified(pet_headers, hours), force_units=True)
    with pytest.raises(TypeError, match="force_units must be True or False, got 'yes'"):
        suv_conversion(pet_headers, force_units="yes")


def test_parse_dicom_datetime_forms():
    assert parse_dicom_datetime("20240102", "101500.25") == datetime(2024, 1, 2, 10, 15, 0, 250000)
    assert parse_dicom_datetime("20240102", "10:15:30") == datetime(2024, 1, 2, 10, 15, 30)
    assert parse_dicom_datetime("20240102", "1015") == datetime(2024, 1, 2, 10, 15)
    assert parse_dicom_dt("20240102101500.5+0100") == datetime(2024, 1, 2, 10, 15, 0, 500000)
    assert parse_dicom_datetime("20240102", None) is None
    assert parse_dicom_datetime("", "1015") is None
    with pytest.raises(ValueError, match="TM value"):
        parse_dicom_datetime("20240102", "25x")


# ----------------------------------------------------------------------------------------------------
# Series selection


def test_selection_rules(plain, tmp_path):
    _, src, info = plain
    folder = _copy(src, tmp_path / "study")
    # A second, shorter CT series (a copy of 8 slices with new UIDs): most slices wins.
    short = folder / "ct_short"
    short.mkdir()
    series_uid = pydicom.uid.generate_uid()
    for path in info["ct_files"][:8]:
        ds = pydicom.dcmread(path)
        ds.SeriesInstanceUID, ds.SeriesNumber, ds.SeriesDescription = series_uid, 5, "CT thin recon"
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = pydicom.uid.generate_uid()
        ds.save_as(short / path.name, enforce_file_format=True)
    series = scan_dicom_folder(folder)
    assert select_series(series, SeriesRules(modality="CT")).series_instance_uid == info["ct_series_uid"]
    assert select_series(series, SeriesRules(modality="CT", description_regex="thin")).num_instances == 8
    with pytest.raises(DicomInputError, match="2 CT series match equally"):
        select_series(series, SeriesRules(modality="CT", most_slices=False))
    with pytest.raises(DicomInputError, match=r"no CT series matches[\s\S]*SliceThickness 3\.0 mm not in \[0\.5, 2"):
        select_series(series, SeriesRules(modality="CT", slice_thickness_mm=(0.5, 2.0)))
    with pytest.raises(DicomInputError, match=r"no MR series matches[\s\S]*Modality PT is not MR"):
        select_series(series, SeriesRules(modality="MR"))
    # The short series as the only CT of its own folder works with read_pet_ct((ct_dir, pet_dir)).
    study = read_pet_ct((short, folder / "pet"), PetCtRules())
    assert study.ct.shape == (8, 64, 64)


def test_pet_not_attenuation_corrected_is_not_selected(plain, tmp_path):
    _, src, _ = plain
    folder = _copy(src, tmp_path / "study")

    def nac(ds):
        ds.CorrectedImage = ["DECY", "NORM"]

    _edit(sorted((folder / "pet").glob("*.dcm")), nac)
    with pytest.raises(DicomInputError, match=r"no PT series matches[\s\S]*lacks ATTN"):
        read_pet_ct(folder)


def test_different_frame_of_reference_is_refused(plain, tmp_path):
    _, src, _ = plain
    folder = _copy(src, tmp_path / "study")

    def other_frame(ds):
        ds.FrameOfReferenceUID = "1.2.3.4"

    _edit(sorted((folder / "pet").glob("*.dcm")), other_frame)
    with pytest.raises(DicomInputError, match="different FrameOfReferenceUID"):
        read_pet_ct(folder)
    study = read_pet_ct(folder, PetCtRules(same_frame_of_reference=False))
    assert study.pet.shape[0] > 0


def test_pet_of_another_study_is_refused(plain, tmp_path):
    _, src, _ = plain
    folder = _copy(src, tmp_path / "study")

    def other_study(ds):
        ds.StudyInstanceUID = "1.2.826.0.1.3680043.8.498.99"

    _edit(sorted((folder / "pet").glob("*.dcm")), other_study)
    with pytest.raises(DicomInputError, match=r"holds 2 studies .*pass one study's folder"):
        read_pet_ct(folder)
    with pytest.raises(DicomInputError, match="CT and PET belong to different studies"):
        read_pet_ct((folder / "ct", folder / "pet"))
    study = read_pet_ct((folder / "ct", folder / "pet"), PetCtRules(same_study=False))
    assert study.study_instance_uid != "1.2.826.0.1.3680043.8.498.99"


def test_rules_are_checked():
    with pytest.raises(ValueError, match="modality must be an upper-case"):
        SeriesRules(modality="ct")
    with pytest.raises(ValueError, match="slice_thickness_mm"):
        SeriesRules(slice_thickness_mm=(3.0, 1.0))
    with pytest.raises(FileNotFoundError, match="no such folder"):
        read_pet_ct(Path("/nonexistent/study"))


def test_load_series_keeps_bqml_when_asked(plain):
    from diffseg.runtime.dicom import LoadOptions

    _, src, _ = plain
    pet = next(s for s in scan_dicom_folder(src) if s.modality == "PT")
    suv = load_series(pet)
    bqml = load_series(pet, LoadOptions(pet_suv=False))
    np.testing.assert_allclose(bqml.array * suv_conversion(pet.headers).factors[0], suv.array, rtol=1e-6)
