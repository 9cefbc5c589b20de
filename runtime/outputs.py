"""Writing a case's results: NIfTI maps, lesion table (JSON, CSV), preview PNG and the run report, each atomically.

``report.json`` is written last: its presence marks a finished case (batch runs skip such cases when resumed).
"""

from __future__ import annotations

import csv
import io
import json
import platform
from pathlib import Path
from typing import Any

import numpy as np

from .atomic import write_bytes_atomic, write_json_atomic, write_text_atomic
from .postprocess import LESION_FIELDS
from .segmenter import SegmentationResult
from .volume import Volume, write_volume

__all__ = ["REPORT_NAME", "lesions_csv", "preview_png", "write_case_outputs"]

REPORT_NAME = "report.json"


def lesions_csv(lesions: list[dict[str, Any]]) -> str:
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(
        [
            *LESION_FIELDS[:3],
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


def write_case_outputs(
    result: SegmentationResult, out_dir: str | Path, ct: Volume, pet: Volume, extra: dict[str, Any] | None = None
) -> dict[str, Path]:
    """Write every output of one case into ``out_dir``; ``report.json`` last."""
    import time

    from .preprocess import resample_to
    from .segmenter import _grid

    start = time.perf_counter()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {
        "mask": write_volume(result.mask, out / "mask.nii.gz"),
        "probability": write_volume(result.probability, out / "probability.nii.gz"),
        "uncertainty": write_volume(result.uncertainty, out / "uncertainty.nii.gz"),
        "entropy": write_volume(result.entropy, out / "entropy.nii.gz"),
        "lesions_json": write_json_atomic(out / "lesions.json", result.lesions),
        "lesions_csv": write_text_atomic(out / "lesions.csv", lesions_csv(result.lesions)),
    }
    pet_on_ct = resample_to(pet, _grid(ct), "linear")
    paths["preview"] = write_bytes_atomic(out / "preview.png", preview_png(ct, pet_on_ct, result.mask))
    from diffseg import __version__

    result.timings["write"] = time.perf_counter() - start
    report = {
        "diffseg": __version__,
        "python": platform.python_version(),
        "settings": result.settings,
        "timings_s": {k: round(v, 4) for k, v in result.timings.items()},
        "windows": result.windows,
        "windows_skipped": result.windows_skipped,
        "retired": result.retired,
        "engine_calls": result.engine_calls,
        "patch_forwards": result.patch_forwards,
        "lesion_count": len(result.lesions),
        "total_volume_ml": round(float(sum(r["volume_ml"] for r in result.lesions)), 4),
        "outputs": {k: p.name for k, p in paths.items()},
        **(extra or {}),
    }
    paths["report"] = write_json_atomic(out / REPORT_NAME, json.loads(json.dumps(report, default=str)))
    return paths
