"""DICOM input that must never become a wrong result (issue #15): a slice without its position at either end of the
stack, a CT without its PET, folders of images the reader cannot use (enhanced multi-frame, secondary capture),
files without the Part 10 preamble, implausible rescale values, malformed or ambiguous dates.

References: the synthetic phantom study (``write_phantom_dicom``) edited one attribute at a time, the same study
read as written (bit-identical volumes for the preamble-less copy), pydicom's own test files (RTPLAN data sets
without file meta, the enhanced CT of pydicom-data when installed), and the QIBA factor of the values as written.
"""

from __future__ import annotations

import re
import shutil
import warnings
from pathlib import Path

import numpy as np
import pydicom
import pytest

from diffseg.runtime.cases import discover_cases
from diffseg.runtime.dicom import DicomInputError, read_pet_ct, scan_dicom, suv_conversion, write_phantom_dicom
from diffseg.runtime.phantom import PhantomOptions, make_phantom

ZR89_HALF_LIFE_S = 282_240.0  # 78.4 h


@pytest.fixture(scope="module")
def study(tmp_path_factory):
    """A small phantom study: 8 CT slices (ct/) and its PET (pet/)."""
    phantom = make_phantom(5, PhantomOptions(ct_size_xy=32, ct_slices=8, flip_probability=0.0))
    out = tmp_path_factory.mktemp("study")
    return out, write_phantom_dicom(phantom, out)


def _copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def _edit(files, change) -> None:
    for path in files:
        ds = pydicom.dcmread(path)
        change(ds)
        ds.save_as(path, enforce_file_format=True)


def _series_describe(folder: Path, modality: str) -> str:
    return next(s for s in scan_dicom(folder).series if s.modality == modality).describe()


# ----------------------------------------------------------------------------------------------------
# A slice without its position, anywhere in the stack


@pytest.mark.parametrize(("modality", "index"), [("ct", 0), ("ct", 3), ("ct", -1), ("pet", 0), ("pet", -1)])
def test_slice_without_position_is_refused_naming_it(study, tmp_path, modality, index):
    src, info = study
    folder = _copy(src, tmp_path / "study")
    victim = folder / modality / info[f"{modality}_files"][index].name
    _edit([victim], lambda ds: delattr(ds, "ImagePositionPatient"))
    code = "CT" if modality == "ct" else "PT"
    with pytest.raises(DicomInputError) as refused:
        read_pet_ct(folder)
    message = str(refused.value)
    assert message.startswith(f"{code} series #"), message
    assert re.search(
        rf"1 file\(s\) cannot be used, e\.g\. {re.escape(str(victim))}: image without ImagePositionPatient: its "
        "place in the volume is unknown",
        message,
    ), message
    # The scan records it on its series (and logs it), not as a file of no series.
    series = next(s for s in scan_dicom(folder).series if s.modality == code)
    assert [b.path for b in series.broken_files] == [victim]


def test_images_of_no_series_without_position_are_still_skipped(study, tmp_path):
    # An image that names no series (no SeriesInstanceUID) cannot leave a gap in ours: skipped, the study reads.
    src, info = study
    folder = _copy(src, tmp_path / "study")
    stray = pydicom.dcmread(info["ct_files"][0])
    del stray.ImagePositionPatient, stray.SeriesInstanceUID
    stray.save_as(folder / "stray.dcm", enforce_file_format=True)
    result = scan_dicom(folder)
    assert {s.path.name: s.reason for s in result.skipped}["stray.dcm"].startswith("image without")
    assert read_pet_ct(folder).ct.shape[0] == len(info["ct_files"])


# ----------------------------------------------------------------------------------------------------
# A CT without its PET (and the reverse)


def test_study_folder_with_ct_and_no_pet_says_so(study, tmp_path):
    src, info = study
    folder = tmp_path / "case1"
    shutil.copytree(src / "ct", folder / "ct")
    ct = _series_describe(folder, "CT")
    with pytest.raises(DicomInputError) as refused:
        read_pet_ct(folder)
    assert str(refused.value) == (
        f"study folder {folder}: found {ct} but no PT series; the PET may not have been sent yet (or lies in "
        "another folder: pass (ct_dir, pet_dir))"
    )
    n = len(info["ct_files"])
    expected = (
        rf"{re.escape(str(folder))}(/ct)?: found CT series #2 'CT for attenuation correction' \({n} files, "
        rf"{re.escape(info['ct_series_uid'])}\) but no PT series; the PET may not have been sent yet"
    )
    with pytest.raises(ValueError, match=expected):
        discover_cases(folder)


def test_cohort_with_one_case_missing_its_pet_names_it(study, tmp_path):
    src, _ = study
    cohort = tmp_path / "cohort"
    shutil.copytree(src, cohort / "complete")
    shutil.copytree(src / "ct", cohort / "waiting" / "ct")
    # "complete" holds a PT of the same study, but it is a sibling of the case folder, not of waiting/ct: the
    # waiting case is incomplete, not one half of a study split into series folders.
    with pytest.raises(ValueError, match=r"cohort/waiting: found CT series #2 .* but no PT series; the PET may not"):
        discover_cases(cohort)


def test_study_split_into_series_folders_is_still_one_case(study):
    src, _ = study  # src/ct and src/pet: each alone holds one modality, together one study
    cases = discover_cases(src)
    assert [(c.ct, c.pet) for c in cases] == [(src, None)]


def test_pet_without_ct_and_folders_given_the_wrong_way_round(study, tmp_path):
    src, _ = study
    folder = tmp_path / "pet_only"
    shutil.copytree(src / "pet", folder / "pet")
    with pytest.raises(DicomInputError, match=r"found PT series #3 .* but no CT series; the CT may not have been sent"):
        read_pet_ct(folder)
    with pytest.raises(ValueError, match=r"found PT series #3 'PET AC' \(\d+ files, .*\) but no CT series"):
        discover_cases(folder)
    with pytest.raises(
        DicomInputError, match=rf"^PET folder {re.escape(str(src / 'ct'))}: found CT series #2 .* but no PT"
    ):
        read_pet_ct((src / "ct", src / "ct"))


# ----------------------------------------------------------------------------------------------------
# Folders of images that the reader cannot use: the reasons in the message


def _enhanced(first: Path, frames: int, path: Path) -> None:
    """A multi-frame Enhanced CT Image (the pixel data of ``frames`` copies of one slice) in one file."""
    ds = pydicom.dcmread(first)
    ds.SOPClassUID = ds.file_meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.2.1"
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = pydicom.uid.generate_uid()
    ds.NumberOfFrames = frames
    ds.PixelData = ds.PixelData * frames
    ds.save_as(path, enforce_file_format=True)


def _secondary_capture(first: Path, path: Path) -> None:
    ds = pydicom.dcmread(first)
    ds.SOPClassUID = ds.file_meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.7"
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = pydicom.uid.generate_uid()
    ds.save_as(path, enforce_file_format=True)


def test_folder_of_enhanced_and_secondary_capture_ct_counts_the_reasons(study, tmp_path):
    _, info = study
    folder = tmp_path / "enhanced"
    folder.mkdir()
    for k in range(3):
        _enhanced(info["ct_files"][0], 8, folder / f"enhanced_{k}.dcm")
    _secondary_capture(info["ct_files"][0], folder / "screen.dcm")
    (folder / "notes.txt").write_text("scanned 2024-01-02")
    with pytest.raises(DicomInputError) as refused:
        read_pet_ct(folder)
    message = str(refused.value)
    assert message.startswith(f"study folder {folder}: no DICOM image series found (5 file(s) skipped: "), message
    assert (
        f"3 × multi-frame image (Enhanced CT Image Storage): only single-frame slices are read, e.g. "
        f"{folder / 'enhanced_0.dcm'}"
    ) in message
    assert f"1 × not an image volume slice: Secondary Capture, e.g. {folder / 'screen.dcm'}" in message
    assert (
        f"1 × not DICOM (no DICM prefix, and not a DICOM data set without it), e.g. {folder / 'notes.txt'}" in message
    )


def test_ct_beside_an_enhanced_pet_names_the_skipped_files(study, tmp_path):
    src, info = study
    folder = _copy(src, tmp_path / "study")
    shutil.rmtree(folder / "pet")
    _enhanced(info["pet_files"][0], 4, folder / "pet.dcm")
    with pytest.raises(DicomInputError, match=r"but no PT series \(1 file\(s\) skipped: 1 × multi-frame image"):
        read_pet_ct(folder)


def test_real_enhanced_ct_of_pydicom_data(tmp_path):
    from pydicom.data import get_testdata_file

    try:
        path = get_testdata_file("eCT_Supplemental.dcm")
    except Exception:
        path = None
    if path is None:
        pytest.skip("eCT_Supplemental.dcm comes with pydicom-data, which is not installed")
    shutil.copy(path, tmp_path / "eCT_Supplemental.dcm")
    with pytest.raises(DicomInputError, match=r"1 × multi-frame image \(Enhanced CT Image Storage\)"):
        read_pet_ct(tmp_path)


# ----------------------------------------------------------------------------------------------------
# Files without the 128-byte preamble and DICM prefix


def _strip_part10(path: Path, implicit: bool) -> None:
    ds = pydicom.dcmread(path)
    del ds.file_meta
    ds.preamble = None
    ds.save_as(path, implicit_vr=implicit, little_endian=True, enforce_file_format=False)


@pytest.mark.parametrize("implicit", [True, False], ids=["implicit_vr", "explicit_vr"])
def test_files_without_preamble_are_read_like_the_others(study, tmp_path, implicit):
    src, _ = study
    folder = _copy(src, tmp_path / "study")
    files = sorted((folder / "ct").glob("*.dcm")) + sorted((folder / "pet").glob("*.dcm"))
    for path in files:
        _strip_part10(path, implicit)
    assert files[0].read_bytes()[:2] == b"\x08\x00" and b"DICM" not in files[0].read_bytes()[:200]
    with pytest.raises(pydicom.errors.InvalidDicomError):
        pydicom.dcmread(files[0])  # what pydicom alone does
    expected = read_pet_ct(src)
    got = read_pet_ct(folder)
    np.testing.assert_array_equal(got.ct.array, expected.ct.array)
    np.testing.assert_array_equal(got.pet.array, expected.pet.array)
    assert got.suv.factors == expected.suv.factors
    assert [c.ct for c in discover_cases(folder)] == [folder]


def test_only_files_that_really_are_not_dicom_are_called_so(tmp_path):
    from pydicom.data import get_testdata_file

    (tmp_path / "text.txt").write_text("no DICOM here")
    (tmp_path / "starts_like_dicom.bin").write_bytes(b"\x08\x00" + bytes(range(256)) * 4)
    (tmp_path / "empty.dcm").write_bytes(b"")
    for name in ("ExplVR_LitEndNoMeta.dcm", "ExplVR_BigEndNoMeta.dcm"):  # real RTPLAN data sets without file meta
        shutil.copy(get_testdata_file(name), tmp_path / name)
    reasons = {s.path.name: s.reason for s in scan_dicom(tmp_path).skipped}
    not_dicom = "not DICOM (no DICM prefix, and not a DICOM data set without it)"
    assert reasons["text.txt"] == reasons["starts_like_dicom.bin"] == reasons["empty.dcm"] == not_dicom
    # Read as the DICOM they are (pydicom alone refuses them), and skipped for what they are: plans.
    assert reasons["ExplVR_LitEndNoMeta.dcm"] == reasons["ExplVR_BigEndNoMeta.dcm"] == "not an image: Modality RTPLAN"


# ----------------------------------------------------------------------------------------------------
# RescaleSlope / RescaleIntercept


def _all(folder: Path, modality: str) -> list[Path]:
    return sorted((folder / modality).glob("*.dcm"))


def test_ct_intercept_outside_its_range_is_refused_unless_forced(study, tmp_path):
    src, _ = study
    folder = _copy(src, tmp_path / "study")
    _edit(_all(folder, "ct"), lambda ds: setattr(ds, "RescaleIntercept", "1024"))  # a sign slip
    n = len(_all(folder, "ct"))
    with pytest.raises(
        DicomInputError,
        match=rf"^CT series #2 .*: RescaleIntercept of .*CT_0001\.dcm is 1024 HU \({n} of {n} slices outside\), "
        r"outside the plausible range of the CT rescale intercept, -32768 … 0 HU: .*force_units=True",
    ):
        read_pet_ct(folder)
    forced = read_pet_ct(folder, force_units=True)
    assert len(forced.overrides) == 1 and forced.overrides[0].startswith("CT series #2")
    assert "RescaleIntercept" in forced.overrides[0] and forced.overrides[0].endswith("(force_units)")
    np.testing.assert_array_equal(forced.ct.array, read_pet_ct(src).ct.array.astype(np.int32) + 2048)


def test_pet_intercept_must_be_zero(study, tmp_path):
    src, _ = study
    folder = _copy(src, tmp_path / "study")
    _edit(_all(folder, "pet")[:1], lambda ds: setattr(ds, "RescaleIntercept", "-5"))
    with pytest.raises(DicomInputError, match=r"RescaleIntercept of .*PT_0001\.dcm is -5 \(1 of \d+ slices outside\)"):
        read_pet_ct(folder)
    assert len(read_pet_ct(folder, force_units=True).overrides) == 1


@pytest.mark.parametrize("slope", ["0", "-1", "1e400"])
def test_rescale_slope_must_be_positive_even_when_forced(study, tmp_path, slope):
    # A slope of 0 used to be taken as absent (1): every voxel would have been the intercept.
    src, _ = study
    folder = _copy(src, tmp_path / "study")
    victim = _all(folder, "ct")[2]
    _edit([victim], lambda ds: setattr(ds, "RescaleSlope", slope))
    for force in (False, True):
        with pytest.raises(DicomInputError, match=rf"{re.escape(str(victim))} has RescaleSlope .*must be a finite"):
            read_pet_ct(folder, force_units=force)


# ----------------------------------------------------------------------------------------------------
# Dates and times


@pytest.fixture(scope="module")
def pet_headers(study):
    _, info = study
    return [pydicom.dcmread(f, stop_before_pixels=True) for f in info["pet_files"]]


def _modified(headers, change):
    import copy

    out = [copy.deepcopy(h) for h in headers]
    for h in out:
        change(h)
    return out


def _info(h):
    return h.RadiopharmaceuticalInformationSequence[0]


# pydicom warns of each such value as it sets or reads it (a warning is an error in the tests).
@pytest.mark.filterwarnings("ignore:Invalid value for VR:UserWarning")
@pytest.mark.parametrize(
    ("change", "attribute"),
    [
        (lambda h: setattr(h, "SeriesDate", "2024-13-02"), "SeriesDate/SeriesTime"),
        (lambda h: setattr(h, "AcquisitionTime", "25x"), "AcquisitionDate/AcquisitionTime"),
        (lambda h: setattr(_info(h), "RadiopharmaceuticalStartDateTime", "2024"), "RadiopharmaceuticalStartDateTime"),
    ],
)
def test_malformed_dates_name_the_attribute_and_file(pet_headers, change, attribute):
    with pytest.raises(
        DicomInputError, match=rf"^PT series: {attribute}.* of .*PT_0001\.dcm is malformed \(.*\): the decay"
    ):
        suv_conversion(_modified(pet_headers, change), "PT series")


def test_injection_time_without_date_is_refused_for_a_long_lived_nuclide(pet_headers):
    def time_only(h):
        del _info(h).RadiopharmaceuticalStartDateTime
        _info(h).RadiopharmaceuticalStartTime = "100000"

    assert suv_conversion(_modified(pet_headers, time_only)).overrides == ()  # F-18: a day off is 13 half-lives

    def zirconium(h):
        time_only(h)
        _info(h).RadionuclideHalfLife = str(ZR89_HALF_LIFE_S)

    with pytest.raises(
        DicomInputError,
        match=r"RadiopharmaceuticalStartTime in RadiopharmaceuticalInformationSequence of .*PT_0001\.dcm is "
        r"100000 without a date, and with a half-life of 78\.4 h .*RadiopharmaceuticalStartDateTime \(with the date\)",
    ):
        suv_conversion(_modified(pet_headers, zirconium))
    forced = suv_conversion(_modified(pet_headers, zirconium), force_units=True)
    assert len(forced.overrides) == 1 and "without a date" in forced.overrides[0]


def test_decay_correction_none_on_a_decay_corrected_image_is_refused(pet_headers):
    def none(h):
        h.DecayCorrection = "NONE"  # CorrectedImage still holds DECY

    with pytest.raises(DicomInputError, match=r"DecayCorrection of .* is NONE, but CorrectedImage .* holds DECY"):
        suv_conversion(_modified(pet_headers, none))
    assert len(suv_conversion(_modified(pet_headers, none), force_units=True).overrides) == 1


def test_dose_in_mbq_is_refused_not_warned(study, tmp_path):
    src, _ = study
    folder = _copy(src, tmp_path / "study")
    _edit(_all(folder, "pet"), lambda ds: setattr(_info(ds), "RadionuclideTotalDose", "370"))
    with pytest.raises(DicomInputError, match=r"RadionuclideTotalDose .* is 370 Bq, outside the plausible range"):
        read_pet_ct(folder)


def test_injection_time_after_the_scan_is_the_day_before_only_across_midnight(pet_headers):
    def time_only(start):
        def change(h):
            del _info(h).RadiopharmaceuticalStartDateTime
            _info(h).RadiopharmaceuticalStartTime = start

        return change

    # Scan at 11:00. 10:00 is an hour before; 23:59 "after the scan" would be 11 h before it, the day before: 6
    # half-lives of F-18, which only a clock or typing error gives.
    assert suv_conversion(_modified(pet_headers, time_only("100000"))).overrides == ()
    with pytest.raises(
        DicomInputError,
        match=r"RadiopharmaceuticalStartTime .* is 235900, after the scan \(2024-01-02 11:00:00\), and taken as "
        r"the day before it gives 11 h \(6.02 half-lives\) of uptake, more than the 3",
    ):
        suv_conversion(_modified(pet_headers, time_only("235900")))
    forced = suv_conversion(_modified(pet_headers, time_only("235900")), force_units=True)
    assert str(forced.injection_time) == "2024-01-01 23:59:00" and len(forced.overrides) == 1


def test_two_injection_times_that_disagree_are_refused(pet_headers):
    def disagree(h):
        _info(h).RadiopharmaceuticalStartTime = "235900"  # RadiopharmaceuticalStartDateTime stays 10:00

    with pytest.raises(
        DicomInputError,
        match=r"RadiopharmaceuticalStartTime .* is 235900, after the scan, but RadiopharmaceuticalStartDateTime is "
        r"20240102100000.* disagree by 10 h",
    ):
        suv_conversion(_modified(pet_headers, disagree))
    forced = suv_conversion(_modified(pet_headers, disagree), force_units=True)
    assert str(forced.injection_time) == "2024-01-02 10:00:00" and len(forced.overrides) == 1


def test_header_value_unlike_its_vr_is_a_broken_file_named(study, tmp_path):
    # Found by the dicom fuzz target: an empty Rows made the scan raise a bare TypeError instead of naming the file.
    src, info = study
    folder = _copy(src, tmp_path / "study")
    victim = folder / "ct" / info["ct_files"][4].name
    _edit([victim], lambda ds: setattr(ds, "Rows", None))
    (skip,) = [s for s in scan_dicom(folder).skipped if s.path == victim]
    assert skip.broken and skip.reason.startswith("unreadable DICOM header (TypeError")
    with pytest.raises(DicomInputError, match=rf"1 file\(s\) cannot be read, e\.g\. {re.escape(str(victim))}"):
        read_pet_ct(folder)


def test_element_of_unknown_vr_is_a_broken_file_named(study, tmp_path):
    # Found by the dicom fuzz target: pydicom converts elements when first used, and an unknown VR raised a bare
    # NotImplementedError out of the scan.
    src, info = study
    folder = _copy(src, tmp_path / "study")
    victim = folder / "pet" / info["pet_files"][1].name
    data = victim.read_bytes()
    at = data.index(b"\x08\x00\x16\x00UI", 132)  # SOPClassUID, explicit VR little endian
    victim.write_bytes(data[: at + 4] + b"\x55\x1c" + data[at + 6 :])
    (skip,) = [s for s in scan_dicom(folder).skipped if s.path == victim]
    assert skip.broken and skip.reason.startswith("unreadable DICOM header (NotImplementedError: Unknown Value")
    with pytest.raises(DicomInputError, match=rf"1 file\(s\) cannot be read, e\.g\. {re.escape(str(victim))}"):
        read_pet_ct(folder)


@pytest.mark.parametrize(
    "keyword, value",
    [("ImageOrientationPatient", None), ("ImagePositionPatient", "1\\2"), ("PixelSpacing", "nan\\1")],
)
def test_slice_geometry_that_is_not_numbers_is_a_broken_file_named(study, tmp_path, keyword, value):
    # Found by `python benchmarks/fuzz.py --minutes 10` (dicom): an orientation '0^0' raised a bare float() error
    # out of series selection.
    src, info = study
    folder = _copy(src, tmp_path / "study")
    victim = folder / "pet" / info["pet_files"][3].name
    data = victim.read_bytes()
    with warnings.catch_warnings():  # pydicom warns of the invalid DS, as it does in a real run (not an error there)
        warnings.simplefilter("ignore", UserWarning)
        if value is None:  # a '^' inside a number, in the bytes: pydicom would refuse to write it
            at = data.index(b"\x20\x00\x37\x00DS", 132) + 8  # ImageOrientationPatient, explicit VR little endian
            victim.write_bytes(data[:at] + data[at:].replace(b"0", b"^", 1))
        else:
            ds = pydicom.dcmread(victim)
            ds[keyword].value = value
            ds.save_as(victim, enforce_file_format=True)
        assert victim.read_bytes() != data
        (skip,) = [s for s in scan_dicom(folder).skipped if s.path == victim]
        assert skip.broken and skip.reason.startswith(f"{keyword} is not")
        with pytest.raises(DicomInputError, match=rf"1 file\(s\) cannot be read, e\.g\. {re.escape(str(victim))}"):
            read_pet_ct(folder)
