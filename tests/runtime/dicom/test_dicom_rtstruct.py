"""RTSTRUCT, LABELMAP SEG and the choice of DICOM outputs (``WriteOptions.dicom_outputs``, ``--dicom-outputs``).

References:
- RTSTRUCT contours are read back by a reader that shares no code with the writer (which builds its dataset with
  pydicom and traces with scikit-image): the CT files are read and sorted along the slice normal with pydicom
  alone, each contour's points are mapped to (row, column) from its referenced slice's header, and the voxels whose
  centres lie inside are taken with matplotlib's ``Path.contains_points``, a slice's contours combined by exclusive
  or (DICOM's CLOSEDPLANAR_XOR rule, the even-odd rule of planning systems). Tolerance: Dice >= 0.95 (the brief),
  and the writer's own claim, exact voxels, is checked as well.
- LABELMAP: highdicom's reader (``segread``, ``get_pixels_by_source_instance``), exact.
- Validity: ``dciodvfy`` (dicom3tools), no "Error" line. The dicom3tools of Debian 12 (2022) predates the Label
  Map Segmentation IOD: where it does not know it, the LABELMAP is checked as a Segmentation and only the errors
  that are the LABELMAP's definition are allowed (see ``_labelmap_errors``).
"""

from __future__ import annotations

import copy
import os
import shutil
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import highdicom as hd
import numpy as np
import pydicom
import pytest
from matplotlib.path import Path as PolygonPath

from diffseg.runtime.dicom import (
    RtstructOptions,
    SegOptions,
    align_to_grid,
    read_pet_ct,
    read_seg,
    read_series,
    scan_dicom,
    write_phantom_dicom,
    write_rtstruct,
    write_seg,
)
from diffseg.runtime.diffusion_schedule import SamplerOptions
from diffseg.runtime.outputs import DICOM_FILE_NAMES, DICOM_OUTPUTS, DICOM_PATH_KEYS, WriteOptions, write_outputs
from diffseg.runtime.phantom import PhantomOptions, make_phantom
from diffseg.runtime.postprocess import PostprocessOptions, dice, postprocess
from diffseg.runtime.result import SampleCounts, SegmentationResult, SegmentOptions
from diffseg.runtime.sliding_window import WindowOptions

DCIODVFY = shutil.which("dciodvfy")
needs_dciodvfy = pytest.mark.skipif(DCIODVFY is None, reason="dciodvfy (Debian package dicom3tools) missing")
# (seed, flip probability): no flips; all axes flipped; z flipped only (a left-handed phantom grid whose slice
# order runs against the DICOM one). Each phantom has two lesions or more.
CASES = {"unflipped": (2, 0.0), "all_flipped": (2, 1.0), "mixed": (9, 0.5)}
LABELMAP_SOP_CLASS = "1.2.840.10008.5.1.4.1.1.66.7"


# ------------------------------------------------------------------------------------------------------------
# Helpers: the independent reader, dciodvfy


def _ct_slices(ct_dir: Path) -> list[pydicom.Dataset]:
    """The CT files sorted along the slice normal, with pydicom only."""
    headers = [pydicom.dcmread(p, stop_before_pixels=True) for p in sorted(Path(ct_dir).glob("*.dcm"))]

    def along_normal(ds: pydicom.Dataset) -> float:
        iop = np.asarray(ds.ImageOrientationPatient, dtype=float)
        return float(np.dot(np.cross(iop[:3], iop[3:]), np.asarray(ds.ImagePositionPatient, dtype=float)))

    return sorted(headers, key=along_normal)


def _rasterise(rtstruct: Path, ct_dir: Path) -> dict[str, np.ndarray]:
    """Every ROI of an RTSTRUCT as a boolean [slice, row, column] volume on the CT files' grid."""
    slices = _ct_slices(ct_dir)
    index = {str(ds.SOPInstanceUID): k for k, ds in enumerate(slices)}
    rows, cols = int(slices[0].Rows), int(slices[0].Columns)
    rr, cc = np.mgrid[0:rows, 0:cols]
    centres = np.column_stack([cc.ravel(), rr.ravel()]).astype(float)
    ds = pydicom.dcmread(rtstruct)
    names = {int(r.ROINumber): str(r.ROIName) for r in ds.StructureSetROISequence}
    out = {}
    for item in ds.ROIContourSequence:
        volume = np.zeros((len(slices), rows, cols), dtype=bool)
        for contour in item.get("ContourSequence", []):
            assert contour.ContourGeometricType == "CLOSED_PLANAR"
            k = index[str(contour.ContourImageSequence[0].ReferencedSOPInstanceUID)]
            ct = slices[k]
            points = np.asarray(contour.ContourData, dtype=float).reshape(-1, 3)
            assert len(points) == int(contour.NumberOfContourPoints)
            iop = np.asarray(ct.ImageOrientationPatient, dtype=float)
            row_spacing, col_spacing = (float(v) for v in ct.PixelSpacing)
            offset = points - np.asarray(ct.ImagePositionPatient, dtype=float)
            normal = np.cross(iop[:3], iop[3:])
            np.testing.assert_allclose(offset @ normal, 0.0, atol=1e-3)  # on its referenced slice's plane
            col, row = offset @ iop[:3] / col_spacing, offset @ iop[3:] / row_spacing
            inside = PolygonPath(np.column_stack([col, row])).contains_points(centres).reshape(rows, cols)
            volume[k] ^= inside
        out[names[int(item.ReferencedROINumber)]] = volume
    return out


def _dciodvfy(path: Path) -> tuple[list[str], str]:
    run = subprocess.run([DCIODVFY, str(path)], capture_output=True, text=True, timeout=60)
    text = run.stdout + run.stderr
    return [line for line in text.splitlines() if line.startswith("Error")], text


def _labelmap_errors(path: Path, tmp_path: Path) -> tuple[list[str], str]:
    """dciodvfy's errors for a LABELMAP SEG; with a dicom3tools that does not know the Label Map Segmentation IOD,
    those of the same file checked as a Segmentation, less the three that are what LABELMAP differs in: its
    SegmentationType, its background segment 0 (PS3.3 C.8.20.2.3 in 2024c) and frames identified by pixel value,
    not by SegmentIdentificationSequence."""
    path = Path(path)
    errors, text = _dciodvfy(path)
    if "Error - Information Object Not found" not in errors:
        return errors, text
    ds = pydicom.dcmread(path)
    assert ds.SOPClassUID == LABELMAP_SOP_CLASS
    ds.SOPClassUID = ds.file_meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.66.4"
    as_seg = tmp_path / f"{path.stem}_as_seg.dcm"
    ds.save_as(as_seg)
    errors, text = _dciodvfy(as_seg)
    allowed = (
        "Unrecognized enumerated value <LABELMAP> for value 1 of attribute <Segmentation Type>",
        "SegmentNumber not monotonically increasing from one by one - have SegmentSequence item number 1 (from one) "
        "with SegmentNumber of 0",
        "Value is zero for value 1 of attribute <Segment Number>",
        "Missing attribute Type 1 Required Element=<SegmentIdentificationSequence> Module=<SegmentationMacro>",
    )
    return [e for e in errors if not any(a in e for a in allowed)], text


def _dice(a: np.ndarray, b: np.ndarray) -> float:
    return dice(a, b)


# ------------------------------------------------------------------------------------------------------------
# Fixtures: synthetic DICOM PET/CT studies and a result of each (lesions numbered by postprocess)


@pytest.fixture(scope="module")
def studies(tmp_path_factory):
    out = {}
    for name, (seed, flip) in CASES.items():
        phantom = make_phantom(seed, PhantomOptions(ct_size_xy=64, ct_slices=16, flip_probability=flip))
        folder = tmp_path_factory.mktemp(f"rt_{name}")
        dirs = write_phantom_dicom(phantom, folder)
        # The result as the pipeline makes it: postprocess on the phantom's own grid numbers the lesions.
        post = postprocess(
            phantom.mask.with_array(phantom.mask.array.astype(np.float32)), None, PostprocessOptions(min_lesion_ml=0)
        )
        out[name] = SimpleNamespace(phantom=phantom, study=read_pet_ct(folder), ct_dir=dirs["ct_dir"], post=post)
    return out


@pytest.fixture(params=sorted(CASES))
def case(request, studies):
    return studies[request.param]


@pytest.fixture
def plain(studies):
    return studies["unflipped"]


def _result(post, probability: np.ndarray) -> SegmentationResult:
    grid = post.mask
    zeros = grid.with_array(np.zeros(grid.shape, np.float32))
    return SegmentationResult(
        mask=post.mask,
        labels=post.labels,
        probability=grid.with_array(probability.astype(np.float32)),
        uncertainty=zeros,
        entropy=zeros,
        pet_on_ct=None,
        lesions=tuple(post.lesions),
        options=SegmentOptions(SamplerOptions(), WindowOptions(), PostprocessOptions(min_lesion_ml=0)),
        settings={},
        counts=SampleCounts(0, 0, 0, 0, 0, 0.0, 0.0),
        timings={},
        engine_log=np.zeros((0, 4)),
    )


# ------------------------------------------------------------------------------------------------------------
# RTSTRUCT


def test_rtstruct_round_trip_every_lesion_its_own_roi(case, tmp_path):
    post, study = case.post, case.study
    assert len(post.lesions) >= 2  # a test of per-lesion ROIs needs several lesions
    path = write_rtstruct(post.mask, post.lesions, study, tmp_path / "rt.dcm", labels=post.labels)
    rois = _rasterise(path, case.ct_dir)
    expected = align_to_grid(post.labels, study.ct).array  # lesion ids on the CT grid (the files' slice order)
    ids = [row["id"] for row in post.lesions]
    assert list(rois) == [f"Lesion {i}" for i in ids] + ["Tumour"]
    assert _dice(rois["Tumour"], expected > 0) >= 0.95
    np.testing.assert_array_equal(rois["Tumour"], expected > 0)  # the writer's claim: the voxels exactly
    for row in post.lesions:
        got, want = rois[f"Lesion {row['id']}"], expected == row["id"]
        assert got.sum() > 0 and int(want.sum()) == row["voxels"]
        assert _dice(got, want) >= 0.95, row
        np.testing.assert_array_equal(got, want)

    ds = pydicom.dcmread(path)
    assert ds.SOPClassUID == "1.2.840.10008.5.1.4.1.1.481.3" and ds.Modality == "RTSTRUCT"
    assert ds.StudyInstanceUID == study.study_instance_uid and ds.FrameOfReferenceUID == study.frame_of_reference_uid
    frame = ds.ReferencedFrameOfReferenceSequence[0]
    assert frame.FrameOfReferenceUID == study.frame_of_reference_uid
    series = frame.RTReferencedStudySequence[0].RTReferencedSeriesSequence[0]
    assert series.SeriesInstanceUID == study.ct_series_uid
    referenced = [str(i.ReferencedSOPInstanceUID) for i in series.ContourImageSequence]
    assert sorted(referenced) == sorted(str(h.SOPInstanceUID) for h in study.ct_headers)
    assert {r.ROIGenerationAlgorithm for r in ds.StructureSetROISequence} == {"AUTOMATIC"}
    assert {o.RTROIInterpretedType for o in ds.RTROIObservationsSequence} == {"GTV"}
    numbers = [int(r.ROINumber) for r in ds.StructureSetROISequence]
    assert numbers == [*ids, max(ids) + 1]  # ROI number = lesion id; the tumour after them
    assert ds.ApprovalStatus == "UNAPPROVED" and int(ds.SeriesNumber) == 902
    assert ds.file_meta.TransferSyntaxUID == pydicom.uid.ImplicitVRLittleEndian


@needs_dciodvfy
def test_rtstruct_passes_dciodvfy(case, tmp_path):
    errors, text = _dciodvfy(write_rtstruct(case.post.mask, case.post.lesions, case.study, tmp_path / "rt.dcm"))
    assert not errors, text


def test_labels_made_from_the_mask_match_the_lesion_table(case, tmp_path):
    """Without labels the writer labels the mask on its own grid (flipped or not) as postprocess does."""
    post, study = case.post, case.study
    path = write_rtstruct(post.mask, post.lesions, study, tmp_path / "rt.dcm")
    rois = _rasterise(path, case.ct_dir)
    expected = align_to_grid(post.labels, study.ct).array
    for row in post.lesions:
        np.testing.assert_array_equal(rois[f"Lesion {row['id']}"], expected == row["id"])


def _slice_study(plain):
    """A mask on the CT grid with, on slice 5: a ring (a hole with an island inside it), two islands, a lesion
    of one voxel and two voxels touching only at a corner (one lesion under 26-connectivity)."""
    study = plain.study
    array = np.zeros(study.ct.shape, dtype=np.uint8)
    k = 5
    array[k, 10:30, 10:30] = 1
    array[k, 14:26, 14:26] = 0  # the hole
    array[k, 18:21, 18:21] = 1  # an island inside the hole
    array[k, 40:44, 5:9] = 1  # island A
    array[k, 40:46, 50:60] = 1  # island B
    array[k, 55, 30] = 1  # one voxel
    array[k, 58, 40] = array[k, 59, 41] = 1  # a diagonal pair
    array[k + 1, 12:16, 12:16] = 1  # the ring goes on to the next slice
    return study.ct.with_array(array)


def test_ring_hole_and_islands_on_one_slice(plain, tmp_path):
    mask = _slice_study(plain)
    post = postprocess(mask.with_array(mask.array.astype(np.float32)), None, PostprocessOptions(min_lesion_ml=0))
    assert len(post.lesions) == 6  # ring + slice 6, island in the hole, A, B, one voxel, diagonal pair
    path = write_rtstruct(post.mask, post.lesions, plain.study, tmp_path / "rt.dcm", labels=post.labels)
    rois = _rasterise(path, plain.ct_dir)
    np.testing.assert_array_equal(rois["Tumour"], mask.array > 0)
    for row in post.lesions:
        np.testing.assert_array_equal(rois[f"Lesion {row['id']}"], post.labels.array == row["id"])
    ds = pydicom.dcmread(path)
    per_roi = {int(item.ReferencedROINumber): len(item.get("ContourSequence", [])) for item in ds.ROIContourSequence}
    ring = int(post.labels.array[5, 10, 10])
    assert per_roi[ring] == 3  # outer and hole on slice 5, one on slice 6
    # The tumour on slice 5: ring outer + hole + island inside + A + B + one voxel + 2 for the diagonal pair.
    assert per_roi[max(per_roi)] == 8 + 1
    if DCIODVFY is not None:
        errors, text = _dciodvfy(path)
        assert not errors, text


def test_empty_mask_gives_a_tumour_roi_without_contours(plain, tmp_path):
    study = plain.study
    empty = study.ct.with_array(np.zeros(study.ct.shape, np.uint8))
    path = write_rtstruct(empty, [], study, tmp_path / "rt.dcm")
    ds = pydicom.dcmread(path)
    assert [r.ROIName for r in ds.StructureSetROISequence] == ["Tumour"]
    assert "ContourSequence" not in ds.ROIContourSequence[0]
    assert not _rasterise(path, plain.ct_dir)["Tumour"].any()
    if DCIODVFY is not None:
        errors, text = _dciodvfy(path)
        assert not errors, text


def test_rtstruct_refuses_a_mismatched_lesion_table_or_grid(plain, tmp_path):
    post, study = plain.post, plain.study
    wrong = [dict(row) for row in post.lesions]
    wrong[0]["voxels"] += 1
    with pytest.raises(ValueError, match="does not match the lesion labels"):
        write_rtstruct(post.mask, wrong, study, tmp_path / "a.dcm", labels=post.labels)
    with pytest.raises(ValueError, match="does not match the lesion labels"):
        write_rtstruct(post.mask, post.lesions[:1], study, tmp_path / "b.dcm")
    other = post.labels.with_array(np.where(post.labels.array == 1, 0, post.labels.array))
    with pytest.raises(ValueError, match="nonzero exactly where the mask is"):
        write_rtstruct(post.mask, None, study, tmp_path / "c.dcm", labels=other)
    pet_grid = plain.phantom.pet.with_array(np.ones(plain.phantom.pet.shape, np.uint8))
    with pytest.raises(ValueError, match="mask is not on the CT grid"):
        write_rtstruct(pet_grid, None, study, tmp_path / "d.dcm")
    with pytest.raises(ValueError, match="connectivity must be 6, 18 or 26"):
        write_rtstruct(post.mask, None, study, tmp_path / "e.dcm", connectivity=8)
    assert not list(tmp_path.iterdir())


def test_rtstruct_options_are_written(plain, tmp_path):
    options = RtstructOptions(
        series_instance_uid="1.2.826.0.1.3680043.8.498.11",
        sop_instance_uid="1.2.826.0.1.3680043.8.498.12",
        series_number=77,
        series_description="contours",
        lesion_name_prefix="GTVp",
        tumour_name="GTV all",
        interpreted_type="CTV",
        tumour_colour=(1, 2, 3),
        lesion_colours=((4, 5, 6),),
    )
    path = write_rtstruct(plain.post.mask, plain.post.lesions, plain.study, tmp_path / "rt.dcm", options=options)
    ds = pydicom.dcmread(path)
    assert (ds.SeriesInstanceUID, ds.SOPInstanceUID) == ("1.2.826.0.1.3680043.8.498.11", "1.2.826.0.1.3680043.8.498.12")
    assert ds.file_meta.MediaStorageSOPInstanceUID == ds.SOPInstanceUID
    assert (int(ds.SeriesNumber), ds.SeriesDescription) == (77, "contours")
    ids = [row["id"] for row in plain.post.lesions]
    assert [r.ROIName for r in ds.StructureSetROISequence] == [f"GTVp {i}" for i in ids] + ["GTV all"]
    assert [list(i.ROIDisplayColor) for i in ds.ROIContourSequence] == [[4, 5, 6]] * len(ids) + [[1, 2, 3]]
    assert {o.RTROIInterpretedType for o in ds.RTROIObservationsSequence} == {"CTV"}
    for bad, match in [
        ({"series_instance_uid": "1.2.x"}, "series_instance_uid must be a valid UID"),
        ({"structure_set_label": "A" * 17}, "structure_set_label must be 1-16"),
        ({"interpreted_type": "gtv"}, "interpreted_type must be"),
        ({"tumour_colour": (0, 0, 256)}, "tumour_colour must be an RGB triple"),
        ({"lesion_colours": ()}, "lesion_colours must hold"),
        ({"series_number": -1}, "series_number must be in"),
    ]:
        with pytest.raises(ValueError, match=match):
            RtstructOptions(**bad)


@pytest.mark.parametrize("umask", [0o022, 0o027])
def test_rtstruct_honours_the_umask(plain, tmp_path, umask):
    old = os.umask(umask)
    try:
        path = write_rtstruct(plain.post.mask, plain.post.lesions, plain.study, tmp_path / "rt.dcm")
    finally:
        os.umask(old)
    assert path.stat().st_mode & 0o777 == 0o666 & ~umask  # 0644 under umask 022
    assert [p.name for p in tmp_path.iterdir()] == ["rt.dcm"]  # no temporary file left


def _real_ct_series(folder: Path, tilt_deg: float) -> Path:
    """Three slices of pydicom's CT_small.dcm (a real CT's header and pixels), 5 mm apart along the normal,
    the orientation tilted about the row direction by ``tilt_deg``."""
    source = pydicom.dcmread(pydicom.data.get_testdata_file("CT_small.dcm"))
    t = np.deg2rad(tilt_deg)
    row, col = np.array([1.0, 0.0, 0.0]), np.array([0.0, np.cos(t), np.sin(t)])
    normal = np.cross(row, col)
    origin = np.asarray(source.ImagePositionPatient, dtype=float)
    folder.mkdir()
    for k in range(3):
        ds = copy.deepcopy(source)
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = pydicom.uid.generate_uid(
            entropy_srcs=["CT_small", str(tilt_deg), str(k)]
        )
        ds.ImageOrientationPatient = [f"{v:.6f}" for v in (*row, *col)]
        ds.ImagePositionPatient = [f"{v:.4f}" for v in origin + 5.0 * k * normal]
        ds.InstanceNumber = k + 1
        ds.save_as(folder / f"ct{k}.dcm")
    return folder


@pytest.mark.parametrize("tilt_deg", [0.0, 25.0])
def test_rtstruct_on_a_real_ct_header(tmp_path, tilt_deg):
    ct_dir = _real_ct_series(tmp_path / "ct", tilt_deg)
    loaded = read_series(scan_dicom(ct_dir).series[0])
    first = loaded.headers[0]
    study = SimpleNamespace(  # the parts of a PetCtStudy an RTSTRUCT uses
        ct=loaded.volume,
        ct_headers=loaded.headers,
        study_instance_uid=str(first.StudyInstanceUID),
        ct_series_uid=str(first.SeriesInstanceUID),
        frame_of_reference_uid=str(first.FrameOfReferenceUID),
    )
    array = np.zeros(loaded.volume.shape, np.uint8)
    array[0, 30:60, 40:90] = 1
    array[1, 35:55, 45:85] = 1
    array[1, 40:50, 60:70] = 0  # a hole
    array[2, 100:104, 10:13] = 1  # another lesion
    mask = loaded.volume.with_array(array)
    path = write_rtstruct(mask, None, study, tmp_path / "rt.dcm")
    rois = _rasterise(path, ct_dir)
    np.testing.assert_array_equal(rois["Tumour"], array > 0)
    assert rois["Lesion 2"].sum() == 12
    ds = pydicom.dcmread(path)
    assert ds.PatientName == first.PatientName and ds.SpecificCharacterSet == first.SpecificCharacterSet
    if DCIODVFY is not None:
        errors, text = _dciodvfy(path)
        assert not errors, text


# ------------------------------------------------------------------------------------------------------------
# LABELMAP SEG


def test_labelmap_seg_holds_one_segment_per_lesion(case, tmp_path):
    post, study = case.post, case.study
    path = write_seg(post.mask, study, tmp_path / "lm.dcm", kind="labelmap", labels=post.labels, lesions=post.lesions)
    expected = align_to_grid(post.labels, study.ct).array
    seg = hd.seg.segread(path)
    assert seg.SOPClassUID == LABELMAP_SOP_CLASS and seg.SegmentationType == "LABELMAP"
    uids = [h.SOPInstanceUID for h in study.ct_headers]
    pixels = seg.get_pixels_by_source_instance(
        source_sop_instance_uids=uids, combine_segments=True, assert_missing_frames_are_empty=True
    )
    np.testing.assert_array_equal(pixels, expected)
    labels = {int(s.SegmentNumber): s.SegmentLabel for s in seg.SegmentSequence}
    assert labels == {0: "Background", **{row["id"]: f"Lesion {row['id']}" for row in post.lesions}}
    assert int(seg.SeriesNumber) == 903
    np.testing.assert_array_equal(read_seg(path, study).array, expected)
    if DCIODVFY is not None:
        errors, text = _labelmap_errors(path, tmp_path)
        assert not errors, text


def test_labelmap_without_lesions_is_the_tumour(plain, tmp_path):
    post, study = plain.post, plain.study
    path = write_seg(post.mask, study, tmp_path / "lm.dcm", kind="labelmap")
    seg = hd.seg.segread(path)
    assert [s.SegmentLabel for s in seg.SegmentSequence] == ["Background", "Tumour"]
    volume = seg.get_volume(combine_segments=True)
    assert volume is not None and int(volume.array.max()) == 1
    back = read_seg(path, study)
    np.testing.assert_array_equal(back.array, align_to_grid(post.mask, study.ct).array)
    empty = study.ct.with_array(np.zeros(study.ct.shape, np.uint8))
    path = write_seg(empty, study, tmp_path / "empty.dcm", kind="labelmap", labels=empty, lesions=[])
    assert int(pydicom.dcmread(path).NumberOfFrames) == 1 and not read_seg(path, study).array.any()
    if DCIODVFY is not None:
        errors, text = _labelmap_errors(path, tmp_path)
        assert not errors, text


def test_write_seg_kind_arguments(plain, tmp_path):
    post, study = plain.post, plain.study
    with pytest.raises(ValueError, match="kind must be one of"):
        write_seg(post.mask, study, tmp_path / "a.dcm", kind="multi")
    with pytest.raises(ValueError, match="fractional=True writes kind 'fractional'"):
        write_seg(post.mask, study, tmp_path / "b.dcm", kind="labelmap", fractional=True)
    with pytest.raises(ValueError, match="only in a LABELMAP"):
        write_seg(post.mask, study, tmp_path / "c.dcm", labels=post.labels)
    wrong = [dict(row, id=row["id"] + 10) for row in post.lesions]
    with pytest.raises(ValueError, match="does not match the lesion labels"):
        write_seg(post.mask, study, tmp_path / "d.dcm", kind="labelmap", lesions=wrong)
    assert not list(tmp_path.iterdir())
    # kind="binary" is the old default, kind="fractional" the old fractional=True.
    path = write_seg(post.mask, study, tmp_path / "e.dcm", kind="binary")
    assert pydicom.dcmread(path).SegmentationType == "BINARY"


# ------------------------------------------------------------------------------------------------------------
# write_outputs: the DICOM outputs chosen, their UIDs and files


def test_write_outputs_writes_every_dicom_output_valid(studies, tmp_path):
    case = studies["mixed"]  # the result on a grid flipped relative to the CT
    probability = np.clip(case.post.mask.array * 0.9 + 0.05, 0, 1)
    result = _result(case.post, probability)
    uids = {kind: (f"1.2.826.0.1.3680043.8.498.{i}1", f"1.2.826.0.1.3680043.8.498.{i}2") for i, kind in
            enumerate(DICOM_OUTPUTS, start=1)}  # fmt: skip
    options = WriteOptions(
        maps=False, tables=False, preview=False, report=False, dicom_outputs=DICOM_OUTPUTS, dicom_uids=uids
    )
    paths, _ = write_outputs(result, tmp_path, ct=case.phantom.ct, study=case.study, options=options)
    assert {k: p.name for k, p in paths.items()} == {DICOM_PATH_KEYS[k]: DICOM_FILE_NAMES[k] for k in DICOM_OUTPUTS}
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(DICOM_FILE_NAMES.values())
    for kind in DICOM_OUTPUTS:
        ds = pydicom.dcmread(paths[DICOM_PATH_KEYS[kind]])
        assert (ds.SeriesInstanceUID, ds.SOPInstanceUID) == uids[kind]
        if DCIODVFY is not None:
            errors, text = _labelmap_errors(ds.filename, tmp_path) if kind == "labelmap" else _dciodvfy(ds.filename)
            assert not errors, f"{kind}: {text}"
    study = case.study
    np.testing.assert_array_equal(read_seg(paths["dicom_seg"], study).array, align_to_grid(result.mask, study.ct).array)
    labels = align_to_grid(result.labels, study.ct).array
    np.testing.assert_array_equal(read_seg(paths["dicom_labelmap"], study).array, labels)
    fractional = read_seg(paths["dicom_fractional"], study).array
    np.testing.assert_allclose(fractional, align_to_grid(result.probability, study.ct).array, atol=0.5 / 255 + 1e-6)
    rois = _rasterise(paths["dicom_rtstruct"], case.ct_dir)
    for row in result.lesions:
        np.testing.assert_array_equal(rois[f"Lesion {row['id']}"], labels == row["id"])


def test_write_outputs_default_and_none(plain, tmp_path):
    result = _result(plain.post, plain.post.mask.array * 0.8)
    quiet = {"maps": False, "tables": False, "preview": False, "report": False}
    paths, _ = write_outputs(
        result, tmp_path / "a", ct=plain.phantom.ct, study=plain.study, options=WriteOptions(**quiet)
    )
    assert sorted(paths) == ["dicom_rtstruct", "dicom_seg"]
    assert sorted(p.name for p in (tmp_path / "a").iterdir()) == ["rtstruct.dcm", "seg.dcm"]
    options = WriteOptions(**quiet, dicom_outputs=())
    paths, _ = write_outputs(result, tmp_path / "b", ct=plain.phantom.ct, study=plain.study, options=options)
    assert paths == {} and not list((tmp_path / "b").iterdir())
    # seg_options keep the labels; their UIDs go to the BINARY SEG only, never to another series.
    seg_options = SegOptions(segment_label="GTV", series_instance_uid="1.2.3.4", sop_instance_uid="1.2.3.5")
    options = WriteOptions(**quiet, dicom_outputs=("seg", "labelmap"), seg_options=seg_options)
    paths, _ = write_outputs(result, tmp_path / "c", ct=plain.phantom.ct, study=plain.study, options=options)
    seg, labelmap = (pydicom.dcmread(paths[k]) for k in ("dicom_seg", "dicom_labelmap"))
    assert (seg.SeriesInstanceUID, seg.SegmentSequence[0].SegmentLabel) == ("1.2.3.4", "GTV")
    assert labelmap.SeriesInstanceUID not in ("1.2.3.4", "1.2.3.5")


def test_write_options_check_the_dicom_outputs():
    with pytest.raises(ValueError, match=r"unknown output 'rt'; allowed: seg, rtstruct, labelmap, fractional"):
        WriteOptions(dicom_outputs=("seg", "rt"))
    with pytest.raises(TypeError, match="tuple of names"):
        WriteOptions(dicom_outputs="seg")
    with pytest.raises(ValueError, match="names an output twice"):
        WriteOptions(dicom_outputs=("seg", "seg"))
    with pytest.raises(ValueError, match="dicom_uids: unknown output 'pdf'"):
        WriteOptions(dicom_uids={"pdf": ("1.2.3", "1.2.4")})
    with pytest.raises(ValueError, match="every UID must differ"):
        WriteOptions(dicom_uids={"seg": ("1.2.3", "1.2.4"), "rtstruct": ("1.2.3", "1.2.5")})
    with pytest.raises(ValueError, match="is not a valid UID"):
        WriteOptions(dicom_uids={"seg": ("1.2.3", "1.02.x")})
    assert WriteOptions(dicom_outputs=["rtstruct"]).dicom_outputs == ("rtstruct",)
    assert WriteOptions().uids("labelmap") == (None, None)


# ------------------------------------------------------------------------------------------------------------
# diffseg predict --dicom-outputs


def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "diffseg", *args], capture_output=True, text=True, timeout=600)


def test_predict_dicom_outputs_option(tmp_path):
    from diffseg.runtime.cli import build_parser
    from diffseg.runtime.commands import predict

    assert predict.DICOM_OUTPUT_NAMES == DICOM_OUTPUTS  # the parser's copy of the names
    parser = build_parser()
    base = ["predict", "--ct", "c", "--pet", "p", "-o", "o"]
    args = parser.parse_args(base)
    assert predict.write_options(args).dicom_outputs == ("seg", "rtstruct")  # the default
    args = parser.parse_args([*base, "--dicom-outputs", "labelmap, fractional"])
    assert predict.write_options(args).dicom_outputs == ("labelmap", "fractional")
    assert parser.parse_args([*base, "--dicom-outputs", "none"]).dicom_outputs == ()
    bad = _cli(*base, "--dicom-outputs", "seg,pdf")
    assert bad.returncode == 2
    assert "unknown DICOM output 'pdf'; allowed: seg, rtstruct, labelmap, fractional" in bad.stderr


def test_predict_ray_path_passes_the_dicom_outputs(monkeypatch, tmp_path):
    import diffseg.runtime.distributed as distributed
    from diffseg.runtime.cli import build_parser
    from diffseg.runtime.commands import predict

    seen = {}

    def fake_run(todo, out_dir, segmenter_args, **kwargs):
        seen.update(kwargs)
        return SimpleNamespace(failures={}, figures={})

    monkeypatch.setattr(distributed, "run_cohort_on_ray", fake_run)
    args = build_parser().parse_args(["predict", "-i", "c", "-o", str(tmp_path), "--dicom-outputs", "rtstruct"])
    predict.run_on_ray(args, [], None)
    assert seen["write"].dicom_outputs == ("rtstruct",)


def test_predict_writes_only_the_dicom_outputs_asked(tmp_path):
    """One real run (default outputs: test_cli.py's DICOM run and the parser test above)."""
    phantom = make_phantom(2, PhantomOptions(ct_size_xy=64, ct_slices=16))
    dirs = write_phantom_dicom(phantom, tmp_path / "study")
    common = ["--backend", "onnxruntime", "--steps", "1", "--samples", "1", "--no-progress"]
    out = _cli(
        "predict", "--ct", str(dirs["ct_dir"]), "--pet", str(dirs["pet_dir"]), "-o", str(tmp_path / "o"),
        "--dicom-outputs", "rtstruct,labelmap", *common,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr
    written = sorted(p.name for p in (tmp_path / "o").glob("*.dcm"))
    assert written == ["rtstruct.dcm", "seg_labelmap.dcm"]
    import json

    report = json.loads((tmp_path / "o" / "report.json").read_text())
    assert report["outputs"]["dicom_rtstruct"] == "rtstruct.dcm" and "dicom_seg" not in report["outputs"]
    lesions = json.loads((tmp_path / "o" / "lesions.json").read_text())
    ds = pydicom.dcmread(tmp_path / "o" / "rtstruct.dcm")
    assert [r.ROIName for r in ds.StructureSetROISequence] == [f"Lesion {row['id']}" for row in lesions] + ["Tumour"]
    assert (tmp_path / "o" / "rtstruct.dcm").stat().st_mode & 0o777 == 0o666 & ~_umask()


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask
