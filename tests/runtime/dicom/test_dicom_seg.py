"""DICOM output: SEG round trip on flipped and unflipped grids, FRACTIONAL SEG, empty masks, lesion table.

References: the phantom's ground-truth mask (exact, voxel for voxel), highdicom's own reader indexed by the CT
SOPInstanceUIDs (exact), the CT slice positions (1e-4 mm), and dciodvfy (dicom3tools) for validity.
"""

from __future__ import annotations

import csv
import json
import shutil
import subprocess
from pathlib import Path

import highdicom as hd
import numpy as np
import pydicom
import pytest

from diffseg.runtime.dicom import (
    LESION_KEYS,
    DicomInputError,
    SegOptions,
    align_to_grid,
    read_pet_ct,
    read_seg,
    write_lesion_table,
    write_phantom_dicom,
    write_seg,
)
from diffseg.runtime.phantom import PhantomOptions, make_phantom
from diffseg.runtime.volume import Volume

# (seed, flip probability): no flips; all axes flipped; CT with x flipped only (a left-handed grid whose DICOM
# slice order runs against the phantom's z axis).
CASES = {"unflipped": (2, 0.0), "all_flipped": (2, 1.0), "mixed": (3, 0.5)}
DCIODVFY = shutil.which("dciodvfy")


@pytest.fixture(scope="module", params=sorted(CASES))
def case(request, tmp_path_factory):
    seed, flip = CASES[request.param]
    phantom = make_phantom(seed, PhantomOptions(ct_size_xy=64, ct_slices=16, flip_probability=flip))
    out = tmp_path_factory.mktemp(f"seg_{request.param}")
    write_phantom_dicom(phantom, out)
    return phantom, read_pet_ct(out), out


@pytest.fixture(scope="module")
def plain(tmp_path_factory):
    phantom = make_phantom(2, PhantomOptions(ct_size_xy=64, ct_slices=16, flip_probability=0.0))
    out = tmp_path_factory.mktemp("seg_plain")
    write_phantom_dicom(phantom, out)
    return phantom, read_pet_ct(out), out


def _dciodvfy_errors(path: Path) -> tuple[list[str], str]:
    run = subprocess.run([DCIODVFY, str(path)], capture_output=True, text=True, timeout=60)
    text = run.stdout + run.stderr
    return [line for line in text.splitlines() if line.startswith("Error")], text


def test_binary_seg_round_trip_voxel_for_voxel(case, tmp_path):
    phantom, study, _ = case
    assert phantom.mask.array.sum() > 0
    # The mask is given in the phantom's own orientation, which differs from the DICOM (sorted) one when
    # flipped.
    path = write_seg(phantom.mask, study, tmp_path / "seg.dcm")
    back = read_seg(path, study)
    assert back.same_grid(study.ct)
    expected = align_to_grid(phantom.mask, study.ct).array
    np.testing.assert_array_equal(back.array, expected)
    np.testing.assert_array_equal(align_to_grid(back, phantom.mask).array, phantom.mask.array)

    # Independent reader: highdicom, indexed by the CT SOPInstanceUIDs in the study's slice order.
    seg = hd.seg.segread(path)
    uids = [h.SOPInstanceUID for h in study.ct_headers]
    by_uid = seg.get_pixels_by_source_instance(
        source_sop_instance_uids=uids, combine_segments=True, assert_missing_frames_are_empty=True
    )
    np.testing.assert_array_equal(by_uid, expected)

    # Frame positions are the CT slice positions of the slices that hold tumour (slice-order pitfall).
    ds = pydicom.dcmread(path)
    frame_positions = np.array(
        [
            [float(v) for v in f.PlanePositionSequence[0].ImagePositionPatient]
            for f in ds.PerFrameFunctionalGroupsSequence
        ]
    )
    ct_positions = np.array([[float(v) for v in h.ImagePositionPatient] for h in study.ct_headers])
    slices = np.nonzero(expected.any(axis=(1, 2)))[0]
    np.testing.assert_allclose(np.sort(frame_positions, axis=0), np.sort(ct_positions[slices], axis=0), atol=1e-4)
    assert ds.ReferencedSeriesSequence[0].SeriesInstanceUID == study.ct_series_uid
    assert ds.StudyInstanceUID == study.study_instance_uid
    assert ds.FrameOfReferenceUID == study.frame_of_reference_uid


@pytest.mark.skipif(DCIODVFY is None, reason="dciodvfy (Debian package dicom3tools) missing")
def test_seg_passes_dciodvfy(case, tmp_path):
    phantom, study, _ = case
    errors, text = _dciodvfy_errors(write_seg(phantom.mask, study, tmp_path / "seg.dcm"))
    assert not errors, text


def _probability(study) -> Volume:
    rng = np.random.default_rng(0)
    p = rng.random(study.ct.shape).astype(np.float32)
    p[:4] = 0.0  # some empty slices: omitted frames must read back as zero
    return study.ct.with_array(p)


def test_fractional_seg_round_trip(plain, tmp_path):
    phantom, study, _ = plain
    probability = _probability(study)
    path = write_seg(phantom.mask, study, tmp_path / "prob.dcm", probability=probability, fractional=True)
    ds = pydicom.dcmread(path)
    assert ds.SegmentationType == "FRACTIONAL" and ds.SegmentationFractionalType == "PROBABILITY"
    assert int(ds.SeriesNumber) == 901
    back = read_seg(path, study)
    assert back.array.dtype == np.float32
    # 8-bit storage with MaximumFractionalValue 255: half a step of rounding at most.
    np.testing.assert_allclose(back.array, probability.array, atol=0.5 / 255 + 1e-6)
    if DCIODVFY is not None:
        errors, text = _dciodvfy_errors(path)
        assert not errors, text


@pytest.mark.parametrize(("policy", "frames"), [("single_frame", 1), ("all_frames", 16)])
def test_empty_mask_gives_a_valid_seg(plain, tmp_path, policy, frames):
    _, study, _ = plain
    empty = study.ct.with_array(np.zeros(study.ct.shape, dtype=np.uint8))
    path = write_seg(empty, study, tmp_path / "empty.dcm", options=SegOptions(empty=policy))
    ds = pydicom.dcmread(path)
    assert int(ds.NumberOfFrames) == frames
    back = read_seg(path, study)
    assert back.array.shape == study.ct.shape and not back.array.any()
    if DCIODVFY is not None:
        errors, text = _dciodvfy_errors(path)
        assert not errors, text


def test_empty_mask_policy_error(plain, tmp_path):
    _, study, _ = plain
    empty = study.ct.with_array(np.zeros(study.ct.shape, dtype=np.uint8))
    with pytest.raises(ValueError, match="the mask is empty"):
        write_seg(empty, study, tmp_path / "empty.dcm", options=SegOptions(empty="error"))
    assert not (tmp_path / "empty.dcm").exists()


def test_write_seg_refuses_bad_inputs(plain, tmp_path):
    phantom, study, _ = plain
    with pytest.raises(ValueError, match="mask is not on the CT grid"):
        write_seg(phantom.pet.with_array(np.ones(phantom.pet.shape, np.uint8)), study, tmp_path / "a.dcm")
    with pytest.raises(ValueError, match="only with fractional=True"):
        write_seg(phantom.mask, study, tmp_path / "b.dcm", probability=_probability(study))
    with pytest.raises(ValueError, match="fractional=True needs probability"):
        write_seg(phantom.mask, study, tmp_path / "c.dcm", fractional=True)
    over = study.ct.with_array(np.full(study.ct.shape, 1.5, np.float32))
    with pytest.raises(ValueError, match=r"probability must hold finite values in \[0, 1\]"):
        write_seg(phantom.mask, study, tmp_path / "d.dcm", probability=over, fractional=True)
    with pytest.raises(ValueError, match="mask must hold integers"):
        write_seg(study.ct.with_array(np.zeros(study.ct.shape, np.float32)), study, tmp_path / "e.dcm")
    with pytest.raises(ValueError, match="content_label"):
        SegOptions(content_label="tumour")
    assert not list(tmp_path.iterdir())


def test_read_seg_refuses_other_frame_of_reference_and_non_seg(plain, tmp_path):
    phantom, study, out = plain
    path = write_seg(phantom.mask, study, tmp_path / "seg.dcm")
    ds = pydicom.dcmread(path)
    ds.FrameOfReferenceUID = "1.2.3"
    ds.save_as(tmp_path / "other.dcm")
    with pytest.raises(DicomInputError, match=r"FrameOfReferenceUID 1\.2\.3 is not the CT's"):
        read_seg(tmp_path / "other.dcm", study)
    with pytest.raises(DicomInputError, match="not a Segmentation"):
        read_seg(sorted((out / "ct").glob("*.dcm"))[0], study)


def test_seg_options_are_written(plain, tmp_path):
    phantom, study, _ = plain
    options = SegOptions(series_number=77, series_instance_uid="1.2.826.0.1.3680043.8.498.1", segment_label="GTV")
    ds = pydicom.dcmread(write_seg(phantom.mask, study, tmp_path / "seg.dcm", options=options))
    assert (int(ds.SeriesNumber), ds.SeriesInstanceUID) == (77, "1.2.826.0.1.3680043.8.498.1")
    segment = ds.SegmentSequence[0]
    assert segment.SegmentLabel == "GTV"
    assert segment.SegmentedPropertyTypeCodeSequence[0].CodeValue == "108369006"  # SCT Neoplasm
    assert ds.SegmentationType == "BINARY" and ds.ContentLabel == "TUMOUR"


# ------------------------------------------------------------------------------------------------------------
# Lesion table


def _rows():
    return [
        {"id": 1, "voxels": 120, "volume_ml": np.float32(0.344), "centroid_mm": np.array([10.5, -3.25, 40.0]),
         "bbox": [2, 3, 4, 10, 12, 14], "suv_max": 8.25, "suv_mean": 5.5, "mtv_ml": 0.344, "tlg": 1.892},
        {"id": 2, "voxels": 30, "volume_ml": 0.086, "centroid_mm": (1.0, 2.0, 3.0),
         "bbox": [0, 0, 0, 1, 1, 1], "suv_max": np.float64(3.0), "suv_mean": 2.5, "mtv_ml": 0.086,
         "tlg": 0.215, "kind": "node"},
    ]  # fmt: skip


def test_lesion_table_csv_names_the_study(plain, tmp_path):
    _, study, _ = plain
    path = write_lesion_table(_rows(), study, tmp_path / "lesions.csv", seg_series_uid="1.2.3.4")
    with path.open() as fh:
        table = list(csv.DictReader(fh))
    assert len(table) == 2
    first = table[0]
    assert first["StudyInstanceUID"] == study.study_instance_uid
    assert first["CTSeriesInstanceUID"] == study.ct_series_uid
    assert first["PTSeriesInstanceUID"] == study.pet_series_uid
    assert first["SEGSeriesInstanceUID"] == "1.2.3.4"
    assert first["PatientID"] == study.patient.patient_id
    assert (first["centroid_x_mm"], first["centroid_y_mm"], first["centroid_z_mm"]) == (
        "10.5",
        "-3.25",
        "40.0",
    )
    assert first["bbox"] == "2 3 4 10 12 14"
    assert float(first["suv_max"]) == 8.25
    assert table[1]["kind"] == "node" and first["kind"] == ""


def test_lesion_table_json(plain, tmp_path):
    _, study, _ = plain
    data = json.loads(write_lesion_table(_rows(), study, tmp_path / "lesions.json").read_text())
    assert data["StudyInstanceUID"] == study.study_instance_uid
    assert data["FrameOfReferenceUID"] == study.frame_of_reference_uid
    assert "SEGSeriesInstanceUID" not in data
    assert data["lesions"][0]["centroid_mm"] == [10.5, -3.25, 40.0]
    assert data["lesions"][0]["volume_ml"] == pytest.approx(0.344, rel=1e-6)
    assert set(LESION_KEYS) <= set(data["lesions"][1])
    empty = json.loads(write_lesion_table([], study, tmp_path / "none.json").read_text())
    assert empty["lesions"] == []


def test_lesion_table_refuses_bad_rows(plain, tmp_path):
    _, study, _ = plain
    rows = _rows()
    del rows[1]["tlg"]
    with pytest.raises(ValueError, match="lesion row 1 lacks tlg"):
        write_lesion_table(rows, study, tmp_path / "t.csv")
    with pytest.raises(ValueError, match=r"must end in \.csv or \.json"):
        write_lesion_table(_rows(), study, tmp_path / "t.txt")
    bad = _rows()
    bad[0]["suv_max"] = float("nan")
    with pytest.raises(ValueError, match="lesion row 0: suv_max is nan"):
        write_lesion_table(bad, study, tmp_path / "t.json")
    bad = _rows()
    bad[0]["centroid_mm"] = [1.0, 2.0]
    with pytest.raises(ValueError, match="centroid_mm must hold 3 numbers"):
        write_lesion_table(bad, study, tmp_path / "t.json")
    assert not list(tmp_path.iterdir())
