"""Writing a case's results: NIfTI maps, lesion table (JSON, CSV), preview PNG, DICOM outputs and the run report,
each atomically. The writer computes nothing: every map, the PET on the CT grid and the lesion table come in the
result.

DICOM outputs (for DICOM input; ``WriteOptions.dicom_outputs``), each a fixed file name and path key:

======================  ========================  ======================================================
kind                    file                      what
======================  ========================  ======================================================
``seg``                 ``seg.dcm``               BINARY SEG of the mask (one segment, the tumour; one per target)
``rtstruct``            ``rtstruct.dcm``          RTSTRUCT: one ROI per lesion and one for the tumour
``labelmap``            ``seg_labelmap.dcm``      LABELMAP SEG, one segment per lesion (number = lesion id)
``fractional``          ``seg_fractional.dcm``    FRACTIONAL (PROBABILITY) SEG of ``result.probability``
======================  ========================  ======================================================

``report.json`` is written last: its presence marks a finished case (batch runs skip such cases when resumed).
"""

from __future__ import annotations

import csv
import io
import json
import platform
import time
from collections.abc import Mapping
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np

from .atomic import write_bytes_atomic, write_json_atomic, write_text_atomic
from .output_paths import path_under
from .postprocess import LESION_FIELDS
from .result import SegmentationResult
from .volume import Volume, write_volume

__all__ = [
    "DICOM_FILE_NAMES",
    "DICOM_OUTPUTS",
    "DICOM_PATH_KEYS",
    "REPORT_NAME",
    "WriteOptions",
    "lesions_csv",
    "preview_png",
    "write_outputs",
]

REPORT_NAME = "report.json"
#: The maps written as NIfTI (for a model of several targets, also ``<map>_<target>.nii.gz`` for each target).
MAP_NAMES = ("mask", "probability", "uncertainty", "entropy")
#: The DICOM outputs :func:`write_outputs` can write, in the order it writes them.
DICOM_OUTPUTS = ("seg", "rtstruct", "labelmap", "fractional")
#: The file of each DICOM output, in the case's folder.
DICOM_FILE_NAMES = {
    "seg": "seg.dcm",
    "rtstruct": "rtstruct.dcm",
    "labelmap": "seg_labelmap.dcm",
    "fractional": "seg_fractional.dcm",
}
#: The key of each DICOM output in the paths :func:`write_outputs` returns (and the report's ``outputs``).
DICOM_PATH_KEYS = {kind: f"dicom_{kind}" for kind in DICOM_OUTPUTS}


def lesions_csv(lesions: list[dict[str, Any]]) -> str:
    """The lesion table as CSV; a model of several targets adds the ``target`` column after ``id``."""
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    by_target = any("target" in row for row in lesions)
    writer.writerow(
        [
            LESION_FIELDS[0],
            *(["target"] if by_target else []),
            *LESION_FIELDS[1:3],
            "centroid_x_mm",
            "centroid_y_mm",
            "centroid_z_mm",
            "bbox_start_zyx",
            "bbox_stop_zyx",
            *LESION_FIELDS[5:],
        ]
    )
    for row in lesions:
        writer.writerow(
            [
                row["id"],
                *([row["target"]] if by_target else []),
                row["voxels"],
                row["volume_ml"],
                *row["centroid_mm"],
                " ".join(map(str, row["bbox"][0])),
                " ".join(map(str, row["bbox"][1])),
                *(row[k] for k in LESION_FIELDS[5:]),
            ]
        )
    return buf.getvalue()


def _outline(mask: np.ndarray) -> np.ndarray:
    m = mask.astype(bool)
    inner = m.copy()
    inner[1:, :] &= m[:-1, :]
    inner[:-1, :] &= m[1:, :]
    inner[:, 1:] &= m[:, :-1]
    inner[:, :-1] &= m[:, 1:]
    return m & ~inner


def _to_display(img: np.ndarray, lo: float, hi: float) -> np.ndarray:
    return (np.clip((img - lo) / (hi - lo), 0, 1) * 255).astype(np.uint8)


def preview_png(ct: Volume, pet_on_ct: Volume, mask: Volume) -> bytes:
    """A coronal PET MIP and three axial CT slices through the largest lesion, with the mask outlined in red.

    Images are shown in array order (no reorientation); good for a glance, not for reading.
    """
    from PIL import Image

    m = mask.array.astype(bool)
    z_range = np.flatnonzero(m.any(axis=(1, 2)))
    zs = [int(np.percentile(z_range, q)) for q in (20, 50, 80)] if z_range.size else [m.shape[0] // 2] * 3
    panels = []
    mip = pet_on_ct.array.max(axis=1)  # [z, x]
    mip_rgb = np.repeat(_to_display(mip, 0.0, 10.0)[..., None], 3, axis=2)
    mip_rgb[_outline(m.any(axis=1))] = (255, 0, 0)
    scale_z = ct.spacing[2] / ct.spacing[0]
    mip_img = Image.fromarray(mip_rgb[::-1]).resize((mip.shape[1], max(1, int(mip.shape[0] * scale_z))))
    panels.append(mip_img)
    for z in zs:
        sl = _to_display(ct.array[z].astype(np.float32), -250, 350)
        rgb = np.repeat(sl[..., None], 3, axis=2)
        rgb[_outline(m[z])] = (255, 0, 0)
        panels.append(Image.fromarray(rgb))
    height = max(p.height for p in panels)
    canvas = Image.new("RGB", (sum(p.width for p in panels), height))
    x = 0
    for p in panels:
        canvas.paste(p, (x, 0))
        x += p.width
    buf = io.BytesIO()
    canvas.save(buf, format="PNG")
    return buf.getvalue()


@dataclass(frozen=True)
class WriteOptions:
    """Which outputs :func:`write_outputs` writes.

    Attributes:
        maps: ``mask``, ``probability``, ``uncertainty``, ``entropy`` as NIfTI.
        tables: ``lesions.json`` and ``lesions.csv``; for DICOM input also ``lesions_dicom.json``.
        preview: ``preview.png``.
        dicom_outputs: for DICOM input, the DICOM outputs to write, each of :data:`DICOM_OUTPUTS` (``seg``,
            ``rtstruct``, ``labelmap``, ``fractional``; see the module docstring); empty: none.
        dicom_uids: per DICOM output kind, the (SeriesInstanceUID, SOPInstanceUID) to write it with; a kind
            absent from it gets new UIDs. All UIDs given must differ.
        seg_options: the SEGs' labels, descriptions and other settings (``SegOptions``; None: the defaults), used
            for ``seg``, ``labelmap`` and ``fractional``; its UIDs are overridden by ``dicom_uids`` and, if set,
            used for ``seg`` only when ``dicom_uids`` has no ``seg`` (two series never share UIDs).
        rtstruct_options: the RTSTRUCT's names and settings (``RtstructOptions``; None: the defaults); its UIDs
            likewise, for ``rtstruct``.
        report: ``report.json``, written last (its presence marks a finished case).
    """

    maps: bool = True
    tables: bool = True
    preview: bool = True
    dicom_outputs: tuple[str, ...] = ("seg", "rtstruct")
    dicom_uids: Mapping[str, tuple[str, str]] | None = None
    seg_options: Any = None
    rtstruct_options: Any = None
    report: bool = True

    def __post_init__(self) -> None:
        if isinstance(self.dicom_outputs, str):
            raise TypeError(f"dicom_outputs must be a tuple of names, got the string {self.dicom_outputs!r}")
        kinds = tuple(self.dicom_outputs)
        for kind in kinds:
            if kind not in DICOM_OUTPUTS:
                raise ValueError(f"dicom_outputs: unknown output {kind!r}; allowed: {', '.join(DICOM_OUTPUTS)}")
        if len(set(kinds)) != len(kinds):
            raise ValueError(f"dicom_outputs names an output twice: {kinds}")
        object.__setattr__(self, "dicom_outputs", kinds)
        if self.dicom_uids is not None:
            object.__setattr__(self, "dicom_uids", _checked_uids(self.dicom_uids))

    def uids(self, kind: str) -> tuple[str | None, str | None]:
        """The (SeriesInstanceUID, SOPInstanceUID) of DICOM output ``kind``; None: a new UID."""
        if self.dicom_uids is not None and kind in self.dicom_uids:
            return self.dicom_uids[kind]
        own = {"seg": self.seg_options, "rtstruct": self.rtstruct_options}.get(kind)
        if own is not None:
            return own.series_instance_uid, own.sop_instance_uid
        return None, None


def _checked_uids(uids: Mapping[str, tuple[str, str]]) -> dict[str, tuple[str, str]]:
    """``dicom_uids`` as a plain dict (picklable, for Ray workers), every kind known and every UID valid, once."""
    from pydicom.uid import RE_VALID_UID

    if not isinstance(uids, Mapping):
        raise TypeError(f"dicom_uids must map output kinds to (series UID, SOP instance UID), got {type(uids)}")
    out: dict[str, tuple[str, str]] = {}
    for kind, pair in uids.items():
        if kind not in DICOM_OUTPUTS:
            raise ValueError(f"dicom_uids: unknown output {kind!r}; allowed: {', '.join(DICOM_OUTPUTS)}")
        if isinstance(pair, str) or len(pair) != 2:
            raise ValueError(f"dicom_uids[{kind!r}] must be (SeriesInstanceUID, SOPInstanceUID), got {pair!r}")
        for uid in pair:
            if not isinstance(uid, str) or len(uid) > 64 or not RE_VALID_UID.match(uid):
                raise ValueError(f"dicom_uids[{kind!r}]: {uid!r} is not a valid UID (digits and dots, <= 64)")
        out[kind] = (str(pair[0]), str(pair[1]))
    every = [uid for pair in out.values() for uid in pair]
    if len(set(every)) != len(every):
        raise ValueError(f"dicom_uids: every UID must differ (each output is its own series and instance), got {out}")
    return out


def _write_dicom(result: SegmentationResult, study: Any, opt: WriteOptions, under: Any) -> dict[str, Path]:
    """The DICOM outputs ``opt.dicom_outputs`` asks for, in :data:`DICOM_OUTPUTS` order."""
    from .dicom import RtstructOptions, SegOptions, write_rtstruct, write_seg

    paths: dict[str, Path] = {}
    seg_options = opt.seg_options or SegOptions()
    connectivity = result.options.postprocess.connectivity
    targets = [t.target for t in result.targets]
    if targets and "fractional" in opt.dicom_outputs:
        raise ValueError(
            f"a model of {len(targets)} targets has no one probability for a FRACTIONAL SEG: leave 'fractional' out "
            "of dicom_outputs (probability_<target>.nii.gz hold each target's)"
        )
    for kind in (k for k in DICOM_OUTPUTS if k in opt.dicom_outputs):
        series_uid, sop_uid = opt.uids(kind)
        path = under(DICOM_FILE_NAMES[kind])
        if kind == "rtstruct":
            rt_options = replace(
                opt.rtstruct_options or RtstructOptions(), series_instance_uid=series_uid, sop_instance_uid=sop_uid
            )
            written = write_rtstruct(
                result.mask,
                list(result.lesions),
                study,
                path,
                labels=result.labels,
                connectivity=connectivity,
                options=rt_options,
            )
        else:
            options = replace(seg_options, series_instance_uid=series_uid, sop_instance_uid=sop_uid)
            extra: dict[str, Any] = {}
            if kind == "labelmap":
                extra = {"labels": result.labels, "lesions": list(result.lesions), "connectivity": connectivity}
            elif kind == "fractional":
                extra = {"probability": result.probability}
            elif targets:  # one segment per target
                extra = {"targets": targets}
            seg_kind = "binary" if kind == "seg" else kind
            written = write_seg(result.mask, study, path, kind=seg_kind, options=options, **extra)
        paths[DICOM_PATH_KEYS[kind]] = written
    return paths


def write_outputs(
    result: SegmentationResult,
    out_dir: str | Path,
    *,
    ct: Volume,
    study: Any = None,
    options: WriteOptions | None = None,
    extra: dict[str, Any] | None = None,
) -> tuple[dict[str, Path], dict[str, Any]]:
    """Write the outputs of one case into ``out_dir`` (created), each atomically; ``report.json`` last.

    Args:
        result: the case's result.
        out_dir: the case's output folder.
        ct: the CT the result lies on (the preview's background).
        study: the DICOM study the case was read from (``PetCtStudy``), or None for image files.
        options: which outputs to write (None: all).
        extra: more fields for the report (case id, inputs).

    Returns:
        The paths written by output name, and the report (empty when ``options.report`` is false).

    Raises:
        ValueError: an output path that leaves ``out_dir`` (a symlink there pointing out); nothing is written.
        OSError: a write failed or its check did (a full disk); the message names the file, which is not there.
    """
    opt = options or WriteOptions()
    start = time.perf_counter()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)

    def under(name: str) -> Path:  # each output is proven to lie under out_dir (no symlink out) before it is written
        path_under(out, name)
        return out / name

    paths: dict[str, Path] = {}
    if opt.maps:
        for name in MAP_NAMES:
            paths[name] = write_volume(getattr(result, name), under(f"{name}.nii.gz"))
        for target in result.targets:  # several targets: each one's own maps beside the combined ones
            for name in MAP_NAMES:
                key = f"{name}_{target.name}"
                paths[key] = write_volume(getattr(target, name), under(f"{key}.nii.gz"))
    if opt.tables:
        paths["lesions_json"] = write_json_atomic(under("lesions.json"), list(result.lesions))
        paths["lesions_csv"] = write_text_atomic(under("lesions.csv"), lesions_csv(list(result.lesions)))
    if opt.preview and result.pet_on_ct is not None:
        paths["preview"] = write_bytes_atomic(under("preview.png"), preview_png(ct, result.pet_on_ct, result.mask))
    if study is not None and opt.dicom_outputs:
        paths.update(_write_dicom(result, study, opt, under))
    if study is not None and opt.tables:
        from .dicom import write_lesion_table

        paths["lesions_dicom"] = write_lesion_table(list(result.lesions), study, under("lesions_dicom.json"))
    if not opt.report:
        return paths, {}
    from diffseg import __version__

    timings = {**result.timings, "write": time.perf_counter() - start}
    report = {
        "diffseg": __version__,
        "python": platform.python_version(),
        "settings": result.settings,
        "timings_s": {k: round(v, 4) for k, v in timings.items()},
        **result.counts.as_dict(),
        "lesion_count": len(result.lesions),
        "total_volume_ml": round(result.total_volume_ml, 4),
        "outputs": {k: p.name for k, p in paths.items()},
        "overrides": list(result.overrides),
        **(extra or {}),
    }
    report = json.loads(json.dumps(report, default=str))
    paths["report"] = write_json_atomic(under(REPORT_NAME), report)
    return paths, report
