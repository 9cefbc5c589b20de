"""DICOM SEG out (highdicom) and back in (pydicom), on the grid of the study's CT: BINARY, FRACTIONAL and LABELMAP.

Frames are matched to CT slices by position. ``PetCtStudy.ct_headers[k]`` is the CT slice of
``study.ct.array[k]`` (both sorted along the slice normal), and highdicom pairs ``pixel_array[k]`` with
``source_images[k]``; a mask whose grid is the CT grid stored with flipped or permuted axes (a NIfTI in RAS,
say) is first re-indexed onto ``study.ct`` exactly (``align_to_grid``), so the slice-order pitfall of the
reference cannot occur. ``read_seg`` does not trust that pairing either: it places each frame by its
PlanePositionSequence.

Empty masks: a SEG must hold at least one frame. By default (``SegOptions.empty="single_frame"``) an empty
result is written as one all-zero frame on the first CT slice: a small, valid SEG that states "segmented,
nothing found". ``"all_frames"`` writes one empty frame per CT slice; ``"error"`` raises instead.

Kinds (``write_seg(kind=...)``): ``binary`` (one segment, the tumour: SOP class Segmentation Storage),
``fractional`` (one segment, the foreground probability in 1/255 steps) and ``labelmap`` (Label Map Segmentation
Storage, DICOM 2024c): each frame holds segment numbers as pixel values. A LABELMAP holds **one segment per lesion,
its segment number the lesion id** (``Lesion 1``, ``Lesion 2``... in the lesion table's numbering) when lesion
labels or the lesion table are given, so that a viewer shows each lesion in its own colour and a lesion table row
finds its segment by number; without them, one segment, the tumour (what a BINARY SEG says, for viewers that
take label maps). Lesion labels come from the result (``SegmentationResult.labels``) or,
when only the table is given, from labelling the mask with the postprocessing's connectivity
(:func:`lesion_labels`), and must agree with the table (ids and voxel counts). An empty LABELMAP holds one
segment, the tumour, and no labelled voxel.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import numpy as np

from ..atomic import atomic_path, check_dicom
from ..volume import Volume
from .errors import DicomInputError
from .geometry import align_to_grid
from .lesion_labels import is_integer_mask, lesion_labels

if TYPE_CHECKING:
    from .study import PetCtStudy

__all__ = [
    "LABELMAP_SEG_SOP_CLASS_UID",
    "SEG_KINDS",
    "SEG_SOP_CLASS_UID",
    "SegOptions",
    "read_seg",
    "write_seg",
]

logger = logging.getLogger("diffseg")

SEG_SOP_CLASS_UID = "1.2.840.10008.5.1.4.1.1.66.4"
LABELMAP_SEG_SOP_CLASS_UID = "1.2.840.10008.5.1.4.1.1.66.7"
#: What :func:`write_seg` writes: a BINARY, FRACTIONAL (PROBABILITY) or LABELMAP segmentation.
SEG_KINDS = ("binary", "fractional", "labelmap")
_SERIES_NUMBERS = {"binary": 900, "fractional": 901, "labelmap": 903}  # 902: the RTSTRUCT
_SERIES_DESCRIPTIONS = {
    "binary": "diffseg tumour segmentation (research use)",
    "fractional": "diffseg tumour probability (research use)",
    "labelmap": "diffseg lesion label map (research use)",
}


def _version() -> str:
    try:
        from diffseg import __version__
    except ImportError:  # pragma: no cover
        return "0"
    return str(__version__)


@dataclass(frozen=True)
class SegOptions:
    """Identification and policy of a written SEG.

    Attributes:
        segment_label: SegmentLabel of the tumour segment (BINARY, FRACTIONAL, and a LABELMAP without lesions).
        lesion_label_prefix: a LABELMAP's lesion segments are labelled ``"<prefix> <lesion id>"``.
        series_description: SeriesDescription; None: one per kind (``diffseg tumour segmentation``, ``... tumour
            probability``, ``... lesion label map``, each ``(research use)``).
        series_number: SeriesNumber; None: 900 for BINARY, 901 for FRACTIONAL, 903 for LABELMAP (902 is the
            RTSTRUCT's).
        content_label: ContentLabel (CS: upper case, digits, '_' and space, 16 characters at most).
        content_description: ContentDescription.
        algorithm_name: AlgorithmName of the segment.
        algorithm_version: AlgorithmVersion; None: the diffseg version.
        manufacturer: Manufacturer of the SEG equipment.
        model_name: ManufacturerModelName.
        device_serial_number: DeviceSerialNumber.
        series_instance_uid: SeriesInstanceUID; None: a new UID.
        sop_instance_uid: SOPInstanceUID; None: a new UID.
        empty: what an empty mask (or an all-zero probability) gives: ``single_frame`` (one empty frame on the
            first CT slice), ``all_frames`` (one empty frame per CT slice) or ``error`` (ValueError).
        max_fractional_value: MaximumFractionalValue of a FRACTIONAL SEG (probability 1 is stored as this).
    """

    segment_label: str = "Tumour"
    lesion_label_prefix: str = "Lesion"
    series_description: str | None = None
    series_number: int | None = None
    content_label: str = "TUMOUR"
    content_description: str = "Automatic tumour segmentation (diffusion model)"
    algorithm_name: str = "diffseg"
    algorithm_version: str | None = None
    manufacturer: str = "diffseg"
    model_name: str = "diffseg"
    device_serial_number: str = "0"
    series_instance_uid: str | None = None
    sop_instance_uid: str | None = None
    empty: Literal["single_frame", "all_frames", "error"] = "single_frame"
    max_fractional_value: int = 255

    def __post_init__(self) -> None:
        if self.empty not in ("single_frame", "all_frames", "error"):
            raise ValueError(f"empty must be 'single_frame', 'all_frames' or 'error', got {self.empty!r}")
        if not 1 <= self.max_fractional_value <= 255:
            raise ValueError(f"max_fractional_value must be in 1..255, got {self.max_fractional_value}")
        label = self.content_label
        if not label or len(label) > 16 or any(not (c.isupper() or c.isdigit() or c in "_ ") for c in label):
            raise ValueError(f"content_label must be 1-16 characters of A-Z, 0-9, '_' or space, got {label!r}")
        if self.series_number is not None and self.series_number < 0:
            raise ValueError(f"series_number must be >= 0, got {self.series_number}")
        for name in ("segment_label", "lesion_label_prefix"):
            value = getattr(self, name)
            if not value or len(value) > 56 or "\\" in value:  # LO: 64 characters, room for " <id>"
                raise ValueError(f"{name} must be 1-56 characters without a backslash, got {value!r}")


def _segment_description(opt: SegOptions, number: int = 1, label: str | None = None, target: Any = None):
    """A segment: the tumour (or a lesion), or with ``target`` (a ``TargetSpec``) that target and its concepts."""
    import highdicom as hd
    from pydicom.sr.codedict import codes

    algorithm = hd.AlgorithmIdentificationSequence(
        name=opt.algorithm_name,
        version=opt.algorithm_version or _version(),
        family=codes.cid7162.ArtificialIntelligence,
    )
    return hd.seg.SegmentDescription(
        segment_number=number,
        segment_label=label or opt.segment_label,
        segmented_property_category=_coded(target.category) if target else codes.SCT.MorphologicallyAbnormalStructure,
        segmented_property_type=_coded(target.type) if target else codes.SCT.Neoplasm,
        algorithm_type=hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC,
        algorithm_identification=algorithm,
    )


def _coded(concept: Any):
    import highdicom as hd

    return hd.sr.CodedConcept(concept.code, concept.scheme, concept.meaning)


def _kind_of(kind: str | None, fractional: bool) -> str:
    if kind is None:
        return "fractional" if fractional else "binary"
    if kind not in SEG_KINDS:
        raise ValueError(f"kind must be one of {SEG_KINDS}, got {kind!r}")
    if fractional and kind != "fractional":
        raise ValueError(f"fractional=True writes kind 'fractional', got kind={kind!r}")
    return kind


def _checked_values(
    mask: Volume,
    probability: Volume | None,
    kind: str,
    labels: Volume | None,
    lesions: Sequence[Mapping[str, Any]] | None,
    connectivity: int,
) -> tuple[Volume, list[int]]:
    """The values to write on the mask's grid, and the lesion ids that are its segments ([]: one segment, the
    tumour, number 1)."""
    if kind != "fractional" and probability is not None:
        raise ValueError(
            "probability is written only with fractional=True (a FRACTIONAL SEG); "
            "pass it with fractional=True or leave it None"
        )
    if kind != "labelmap" and (labels is not None or lesions is not None):
        raise ValueError(f"labels and lesions are written only in a LABELMAP (kind='labelmap'), got kind {kind!r}")
    if kind == "binary":
        if not is_integer_mask(mask.array):
            raise ValueError(f"mask must hold integers or booleans (nonzero = tumour), got {mask.array.dtype}")
        return mask.with_array((mask.array > 0).astype(np.uint8)), []
    if kind == "labelmap":
        if labels is None and lesions is None:
            if not is_integer_mask(mask.array):
                raise ValueError(f"mask must hold integers or booleans (nonzero = tumour), got {mask.array.dtype}")
            return mask.with_array((mask.array > 0).astype(np.uint8)), []
        values = lesion_labels(mask, lesions, labels=labels, connectivity=connectivity)
        return values, [int(i) for i in np.unique(values.array) if i > 0]
    if probability is None:
        raise ValueError("fractional=True needs probability (a Volume of values in [0, 1])")
    p = np.asarray(probability.array, dtype=np.float32)
    if not np.all(np.isfinite(p)) or p.min() < 0 or p.max() > 1:
        raise ValueError(f"probability must hold finite values in [0, 1], got range [{np.nanmin(p)}, {np.nanmax(p)}]")
    return probability.with_array(p), []


def write_seg(
    mask: Volume,
    study: PetCtStudy,
    path: str | Path,
    *,
    probability: Volume | None = None,
    fractional: bool = False,
    options: SegOptions | None = None,
    kind: Literal["binary", "fractional", "labelmap"] | None = None,
    labels: Volume | None = None,
    lesions: Sequence[Mapping[str, Any]] | None = None,
    connectivity: int = 26,
    targets: Sequence[Any] = (),
) -> Path:
    """Write a DICOM SEG of a result on the study's CT grid, referencing the CT series.

    Args:
        mask: the tumour mask on the CT grid (nonzero = tumour); its axes may be flipped or permuted
            relative to ``study.ct`` as long as it holds the same voxels. With ``fractional=True`` it is
            only checked to be on the CT grid.
        study: the study the result belongs to (from ``read_pet_ct``).
        path: the output file; written atomically (temporary file, then rename).
        probability: the foreground probability on the CT grid, written when ``fractional=True``.
        fractional: False: a BINARY SEG of ``mask``; True: a FRACTIONAL (PROBABILITY) SEG of ``probability``
            (the same as ``kind="fractional"``).
        options: identification and empty-mask policy; ``None`` uses the defaults.
        kind: ``binary``, ``fractional`` or ``labelmap`` (see the module docstring); None: as ``fractional``
            says.
        labels: LABELMAP only: the lesion label map on the mask's grid (``SegmentationResult.labels``).
        lesions: LABELMAP only: the lesion table (``SegmentationResult.lesions``), checked against the labels.
        connectivity: LABELMAP only: labels the mask when ``lesions`` come without ``labels`` (the
            postprocessing's connectivity).
        targets: BINARY only, a model of several targets: their ``TargetSpec`` in order; ``mask`` is then the
            target label map (c + 1 = target c) and each target is a segment (its name and coded concepts).

    Returns:
        ``path``.

    Raises:
        ValueError: a volume that is not on the CT grid, a probability given without ``fractional`` (or
            missing with it), values out of range, labels or lesions that do not match the mask (or given for
            another kind than ``labelmap``), or an empty result with ``options.empty="error"``.
    """
    import highdicom as hd

    opt = options or SegOptions()
    path = Path(path)
    kind = _kind_of(kind, fractional)
    fractional = kind == "fractional"
    values, lesion_ids = _checked_values(mask, probability, kind, labels, lesions, connectivity)
    if targets:
        if kind != "binary":
            raise ValueError(f"targets are written in a BINARY SEG (kind='binary'), got kind {kind!r}")
        found = int(mask.array.max(initial=0))
        if found > len(targets):
            raise ValueError(f"mask holds target {found}, but only {len(targets)} targets are given")
        values = mask.with_array(mask.array.astype(np.uint8))
    try:
        align_to_grid(mask, study.ct)
        on_ct = align_to_grid(values, study.ct)
    except ValueError as exc:
        raise ValueError(
            f"write_seg: {'probability' if fractional else 'mask'} is not on the CT grid of study "
            f"{study.study_instance_uid}: {exc}"
        ) from None
    sources, array, omit_empty = _frames_to_write(on_ct.array, list(study.ct_headers), opt, fractional)
    seg = hd.seg.Segmentation(
        source_images=sources,
        pixel_array=array,
        series_instance_uid=opt.series_instance_uid or hd.UID(),
        series_number=opt.series_number if opt.series_number is not None else _SERIES_NUMBERS[kind],
        sop_instance_uid=opt.sop_instance_uid or hd.UID(),
        instance_number=1,
        manufacturer=opt.manufacturer,
        manufacturer_model_name=opt.model_name,
        software_versions=_version(),
        device_serial_number=opt.device_serial_number,
        content_label=opt.content_label,
        content_description=opt.content_description,
        omit_empty_frames=omit_empty,
        **_kind_arguments(opt, kind, lesion_ids, targets),
    )
    seg.SeriesDescription = opt.series_description or _SERIES_DESCRIPTIONS[kind]
    expected = {"SOPInstanceUID": seg.SOPInstanceUID, "NumberOfFrames": seg.NumberOfFrames}
    with atomic_path(path, check=lambda tmp: check_dicom(tmp, **expected)) as tmp:
        seg.save_as(tmp)
    logger.info("wrote %s SEG with %d frame(s) to %s", kind.upper(), int(seg.NumberOfFrames), path)
    return path


def _kind_arguments(opt: SegOptions, kind: str, lesion_ids: list[int], targets: Sequence[Any] = ()) -> dict[str, Any]:
    """highdicom's arguments that depend on the kind: the type, the segments, the fractional type."""
    import highdicom as hd

    descriptions = [_segment_description(opt, i, f"{opt.lesion_label_prefix} {i}") for i in lesion_ids]
    descriptions += [_segment_description(opt, c + 1, t.name, t) for c, t in enumerate(targets)]
    out: dict[str, Any] = {
        "segmentation_type": hd.seg.SegmentationTypeValues(kind.upper()),
        "segment_descriptions": descriptions or [_segment_description(opt)],
    }
    if kind == "fractional":
        out["fractional_type"] = hd.seg.SegmentationFractionalTypeValues.PROBABILITY
        out["max_fractional_value"] = opt.max_fractional_value
    return out


def _frames_to_write(
    array: np.ndarray, sources: list, opt: SegOptions, fractional: bool
) -> tuple[list, np.ndarray, bool]:
    """The CT slices, the frames on them and ``omit_empty_frames`` for highdicom; an empty result as
    ``opt.empty`` says (one empty frame, one per slice, or ValueError)."""
    if len(sources) != array.shape[0]:
        raise ValueError(f"study has {len(sources)} CT headers for {array.shape[0]} CT slices")
    omit_empty = True
    if not np.any(array):
        if opt.empty == "error":
            raise ValueError(
                f"write_seg: the {'probability' if fractional else 'mask'} is empty (SegOptions.empty is 'error')"
            )
        omit_empty = False
        if opt.empty == "single_frame":
            sources, array = sources[:1], array[:1]
        logger.info("empty result: SEG written with %d empty frame(s)", array.shape[0])
    return sources, array, omit_empty


def _frame_item(ds, i: int, keyword: str):
    """The item of functional group ``keyword`` for frame ``i`` (per-frame first, then shared)."""
    per_frame = ds.get("PerFrameFunctionalGroupsSequence")
    if per_frame is not None and keyword in per_frame[i]:
        return per_frame[i][keyword][0]
    shared = ds.get("SharedFunctionalGroupsSequence")
    if shared is not None and keyword in shared[0]:
        return shared[0][keyword][0]
    return None


def read_seg(path: str | Path, study: PetCtStudy) -> Volume:
    """Read a SEG of the study's CT back onto the CT grid, placing each frame by its position.

    Args:
        path: the SEG file.
        study: the study whose CT grid the SEG was made on.

    Returns:
        A ``Volume`` on ``study.ct``'s grid: uint8 segment numbers (0 = background) for a BINARY SEG,
        float32 fractions in [0, 1] (the largest over segments) for a FRACTIONAL one, the pixel values (segment
        numbers, uint8 or uint16 as stored) for a LABELMAP.

    Raises:
        FileNotFoundError: ``path`` does not exist.
        DicomInputError: not a SEG, another frame of reference, frames whose orientation, pixel spacing, size
            or position do not fall on CT slices.
    """
    import pydicom

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such file")
    ds = pydicom.dcmread(path)
    if str(ds.get("SOPClassUID", "")) not in (SEG_SOP_CLASS_UID, LABELMAP_SEG_SOP_CLASS_UID):
        raise DicomInputError(f"{path}: not a Segmentation (SOPClassUID {ds.get('SOPClassUID')})")
    if str(ds.get("FrameOfReferenceUID", "")) != study.frame_of_reference_uid:
        raise DicomInputError(
            f"{path}: FrameOfReferenceUID {ds.get('FrameOfReferenceUID')} is not the CT's "
            f"{study.frame_of_reference_uid}"
        )
    ct = study.ct
    if (int(ds.Rows), int(ds.Columns)) != ct.shape[1:]:
        raise DicomInputError(
            f"{path}: frames of {ds.Rows}x{ds.Columns} pixels, CT slices of {ct.shape[1]}x{ct.shape[2]}"
        )
    seg_type = str(ds.SegmentationType).upper()
    frames = ds.pixel_array
    if frames.ndim == 2:
        frames = frames[None]
    dtypes = {"FRACTIONAL": np.float32, "LABELMAP": np.uint16 if int(ds.BitsAllocated) > 8 else np.uint8}
    out = np.zeros(ct.shape, dtype=dtypes.get(seg_type, np.uint8))
    scale = float(ds.get("MaximumFractionalValue", 1) or 1)
    d = ct.direction_matrix
    for i in range(frames.shape[0]):
        plane = _frame_item(ds, i, "PlaneOrientationSequence")
        measures = _frame_item(ds, i, "PixelMeasuresSequence")
        position = _frame_item(ds, i, "PlanePositionSequence")
        segment = _frame_item(ds, i, "SegmentIdentificationSequence")  # none in a LABELMAP: pixels are numbers
        if plane is None or measures is None or position is None or (segment is None and seg_type != "LABELMAP"):
            raise DicomInputError(
                f"{path}: frame {i + 1} lacks its plane orientation, pixel measures, position or segment number"
            )
        iop = np.asarray([float(v) for v in plane.ImageOrientationPatient])
        if not (np.allclose(iop[:3], d[:, 0], atol=1e-4) and np.allclose(iop[3:], d[:, 1], atol=1e-4)):
            raise DicomInputError(f"{path}: frame {i + 1} orientation {iop.tolist()} is not the CT's")
        spacing = [float(v) for v in measures.PixelSpacing]
        if not np.allclose(spacing, [ct.spacing[1], ct.spacing[0]], rtol=1e-4):
            raise DicomInputError(f"{path}: frame {i + 1} PixelSpacing {spacing} is not the CT's")
        index = ct.physical_to_index(np.asarray([float(v) for v in position.ImagePositionPatient]))
        k = round(float(index[2]))
        if not (np.allclose(index, [0, 0, k], atol=1e-2) and 0 <= k < ct.shape[0]):
            raise DicomInputError(
                f"{path}: frame {i + 1} at {position.ImagePositionPatient} is not on a CT slice "
                f"(CT index {index.round(3).tolist()})"
            )
        if seg_type == "LABELMAP":
            out[k] = np.where(frames[i] > 0, frames[i], out[k])
            continue
        number = int(segment.ReferencedSegmentNumber)
        if seg_type == "FRACTIONAL":
            out[k] = np.maximum(out[k], frames[i].astype(np.float32) / scale)
        else:
            out[k] = np.where(frames[i] > 0, number, out[k])
    return ct.with_array(out)
