"""The lesion table as CSV or JSON that names the DICOM study and series it was measured on.

Rows come from the runtime's postprocessing, one dict per lesion with the keys of ``LESION_KEYS``: id,
voxels, volume_ml, centroid_mm (x, y, z in patient LPS mm), bbox (as the runtime gives it), suv_max,
suv_mean, mtv_ml, tlg (SUVmean · MTV, in g). Extra keys are kept. Both files carry StudyInstanceUID, the CT
and PET SeriesInstanceUIDs, FrameOfReferenceUID, PatientID and AccessionNumber (and the SEG's
SeriesInstanceUID when given), so that a table can be matched to its images in a PACS.
"""

from __future__ import annotations

import csv
import io
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..atomic import write_json_atomic, write_text_atomic

if TYPE_CHECKING:
    from .study import PetCtStudy

__all__ = ["LESION_KEYS", "lesion_table_header", "write_lesion_table"]

#: Keys every lesion row must hold.
LESION_KEYS = ("id", "voxels", "volume_ml", "centroid_mm", "bbox", "suv_max", "suv_mean", "mtv_ml", "tlg")

_UNITS = {
    "volume_ml": "ml",
    "centroid_mm": "mm (patient LPS x, y, z)",
    "suv_max": "g/ml (SUVbw)",
    "suv_mean": "g/ml (SUVbw)",
    "mtv_ml": "ml",
    "tlg": "g (SUVmean x MTV)",
}


def lesion_table_header(study: PetCtStudy, seg_series_uid: str | None = None) -> dict[str, str]:
    """The identifiers written with a lesion table, in DICOM keyword style."""
    header = {
        "PatientID": study.patient.patient_id,
        "AccessionNumber": study.patient.accession_number,
        "StudyInstanceUID": study.study_instance_uid,
        "FrameOfReferenceUID": study.frame_of_reference_uid,
        "CTSeriesInstanceUID": study.ct_series_uid,
        "PTSeriesInstanceUID": study.pet_series_uid,
    }
    if seg_series_uid:
        header["SEGSeriesInstanceUID"] = seg_series_uid
    return header


def _plain(value: Any, key: str, row: int) -> Any:
    """A JSON-ready copy of a value (numpy scalars and arrays become Python numbers and lists)."""
    if hasattr(value, "tolist"):
        value = value.tolist()
    if isinstance(value, list | tuple):
        return [_plain(v, key, row) for v in value]
    if isinstance(value, float) and not math.isfinite(value):
        raise ValueError(f"lesion row {row}: {key} is {value}")
    if value is None or isinstance(value, bool | int | float | str):
        return value
    raise ValueError(f"lesion row {row}: {key} has a value of type {type(value).__name__}")


def _checked(rows: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    out = []
    for i, row in enumerate(rows):
        missing = [k for k in LESION_KEYS if k not in row]
        if missing:
            raise ValueError(f"lesion row {i} lacks {', '.join(missing)} (has {', '.join(map(str, row))})")
        centroid = _plain(row["centroid_mm"], "centroid_mm", i)
        if not isinstance(centroid, list) or len(centroid) != 3:
            raise ValueError(f"lesion row {i}: centroid_mm must hold 3 numbers (x, y, z mm), got {centroid!r}")
        out.append({k: _plain(v, k, i) for k, v in row.items()})
    return out


def _csv_text(header: dict[str, str], rows: list[dict[str, Any]]) -> str:
    extra = [k for row in rows for k in row if k not in LESION_KEYS]
    extra = list(dict.fromkeys(extra))
    columns = [
        *header,
        "id",
        "voxels",
        "volume_ml",
        "centroid_x_mm",
        "centroid_y_mm",
        "centroid_z_mm",
        "bbox",
        "suv_max",
        "suv_mean",
        "mtv_ml",
        "tlg",
        *extra,
    ]
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=columns, lineterminator="\n")
    writer.writeheader()
    for row in rows:
        flat = dict(header)
        for key, value in row.items():
            if key == "centroid_mm":
                flat.update(zip(("centroid_x_mm", "centroid_y_mm", "centroid_z_mm"), value, strict=True))
            elif isinstance(value, list):
                flat[key] = " ".join(str(v) for v in value)  # bbox: space-separated, as DICOM multi-values
            else:
                flat[key] = value
        writer.writerow(flat)
    return buf.getvalue()


def write_lesion_table(
    rows: Sequence[Mapping[str, Any]],
    study: PetCtStudy,
    path: str | Path,
    *,
    seg_series_uid: str | None = None,
) -> Path:
    """Write the lesion table as CSV or JSON (by the suffix of ``path``), atomically.

    CSV: one line per lesion, each line starting with the study identifiers (``lesion_table_header``);
    centroid_mm becomes three columns, list values (bbox) space-separated. JSON: ``{identifiers..., "units",
    "lesions": [rows]}``. An empty ``rows`` gives a CSV with its header line only, or ``"lesions": []``.

    Args:
        rows: one dict per lesion with at least ``LESION_KEYS``.
        study: the study the lesions were measured on.
        path: ``*.csv`` or ``*.json``.
        seg_series_uid: SeriesInstanceUID of the SEG written for the same result, if any.

    Returns:
        ``path``.

    Raises:
        ValueError: another suffix, a row without a required key, a centroid that is not 3 numbers, or a
            non-finite or non-numeric value.
    """
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix not in (".csv", ".json"):
        raise ValueError(f"lesion table path must end in .csv or .json, got {path}")
    checked = _checked(rows)
    header = lesion_table_header(study, seg_series_uid)
    if suffix == ".csv":
        return write_text_atomic(path, _csv_text(header, checked))
    return write_json_atomic(path, {**header, "units": _UNITS, "lesions": checked})
