"""What the worker does with a complete study: read it, segment it, write the SEG with deterministic UIDs.

The SEG's SeriesInstanceUID and SOPInstanceUID are name-based UUIDs (``2.25.<uuid5>``, PS3.5 B.2) of the
study's UID and the model version, so a SEG sent again after a crash carries the same UIDs and overwrites (or
is ignored as already stored by) the PACS instead of appearing twice.
"""

from __future__ import annotations

import logging
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from .spool import check_uid, fsync_dir

__all__ = ["SegPipeline", "SegUids", "SegmenterPipeline", "load_segmenter_class", "model_version_of", "seg_uids"]

logger = logging.getLogger("diffseg")

# Fixed namespace of the name-based UUIDs; changing it would change every SEG UID ever derived.
_NAMESPACE = uuid.uuid5(uuid.NAMESPACE_URL, "https://github.com/diffseg/diffseg/serve/seg")


@dataclass(frozen=True)
class SegUids:
    """The UIDs of one study's SEG.

    Attributes:
        series_instance_uid: SeriesInstanceUID of the SEG series.
        sop_instance_uid: SOPInstanceUID of the SEG instance.
    """

    series_instance_uid: str
    sop_instance_uid: str


def seg_uids(study_uid: str, model_version: str) -> SegUids:
    """Derive the SEG's UIDs from the study and the model version (same inputs, same UIDs).

    Args:
        study_uid: StudyInstanceUID of the segmented study.
        model_version: identity of the model (name and version) that made the SEG.

    Returns:
        Two ``2.25.`` UIDs (at most 44 characters).

    Raises:
        ValueError: ``study_uid`` is not a UID, or ``model_version`` is empty.
    """
    check_uid("study_uid", study_uid)
    if not isinstance(model_version, str) or not model_version:
        raise ValueError(f"model_version must be a non-empty string, got {model_version!r}")
    series = uuid.uuid5(_NAMESPACE, "\n".join(("series", study_uid, model_version)))
    instance = uuid.uuid5(_NAMESPACE, "\n".join(("instance", study_uid, model_version)))
    return SegUids(series_instance_uid=f"2.25.{series.int}", sop_instance_uid=f"2.25.{instance.int}")


class SegPipeline(Protocol):
    """Turns a folder of received instances into a SEG file.

    Attributes:
        model_version: identity of the model; the SEG UIDs derive from it.
    """

    model_version: str

    def run(self, study_dir: Path, out_path: Path, uids: SegUids) -> dict[str, Any]:
        """Segment the study in ``study_dir``, write its SEG to ``out_path``, return figures for the log."""
        ...


def model_version_of(segmenter: Any, model: str) -> str:
    """A stable identity of a loaded model, from which the SEG UIDs derive.

    ``name@version+<12 hex of the fp32 engine's sha256>`` from the model package's manifest when the segmenter has
    one (so that retraining under the same name and version still gives new UIDs), else ``model@diffseg-<version>``.
    """
    manifest = getattr(getattr(segmenter, "package", None), "manifest", None)
    if manifest is not None and getattr(manifest, "name", None):
        identity = f"{manifest.name}@{manifest.version}"
        files = (getattr(manifest, "raw", None) or {}).get("files", {})
        ordered = [files.get("fp32"), *files.values()]  # the fp32 engine stands for the weights
        digest = next((f.get("sha256") for f in ordered if isinstance(f, dict) and f.get("sha256")), None)
        return f"{identity}+{digest[:12]}" if digest else identity
    from diffseg import __version__

    return f"{model}@diffseg-{__version__}"


def load_segmenter_class() -> type:
    """``diffseg.runtime.Segmenter`` (or, until it is exported there, ``diffseg.runtime.segmenter.Segmenter``).

    Raises:
        ImportError: neither exists in this build.
    """
    try:
        from diffseg.runtime import Segmenter  # type: ignore[attr-defined]
    except ImportError:
        from diffseg.runtime.segmenter import Segmenter  # type: ignore[no-redef]
    return Segmenter


class SegmenterPipeline:
    """The default pipeline: the study folder through :func:`diffseg.runtime.pipeline.segment_files`, writing only
    the DICOM SEG (BINARY, our UIDs).

    The model is loaded once, here, and reused for every study.

    Args:
        model: model package name or path (``Segmenter``'s ``model``).
        backend: backend name (``Segmenter``'s ``backend``).

    Raises:
        RuntimeError: ``Segmenter`` or the DICOM reader/writer cannot be imported, or the model does not load.
    """

    def __init__(self, model: str, backend: str) -> None:
        try:
            Segmenter = load_segmenter_class()
            from diffseg.runtime.dicom import SegOptions
            from diffseg.runtime.outputs import WriteOptions
            from diffseg.runtime.pipeline import segment_files
        except ImportError as exc:
            raise RuntimeError(f"the segmentation pipeline is not available in this build: {exc}") from exc
        start = time.perf_counter()
        self.segmenter = Segmenter(model=model, backend=backend)
        self.model_version = model_version_of(self.segmenter, model)
        self._segment_files = segment_files
        self._write_options = WriteOptions
        self._seg_options = SegOptions
        logger.info(
            "model loaded",
            extra={
                "event": "model_loaded",
                "model": model,
                "backend": backend,
                "model_version": self.model_version,
                "seconds": round(time.perf_counter() - start, 3),
            },
        )

    def run(self, study_dir: Path, out_path: Path, uids: SegUids) -> dict[str, Any]:
        """Segment one study; see :class:`SegPipeline`."""
        seg = self._seg_options(series_instance_uid=uids.series_instance_uid, sop_instance_uid=uids.sop_instance_uid)
        write = self._write_options(
            maps=False, tables=False, preview=False, report=False, seg_name=out_path.name, seg_options=seg
        )
        case = self._segment_files(self.segmenter, study_dir, None, out_path.parent, case_id="study", write=write)
        if case.paths.get("dicom_seg") != out_path:
            raise RuntimeError(f"{study_dir}: the pipeline wrote no SEG at {out_path} (is the study DICOM?)")
        fsync_dir(out_path.parent)
        t = case.result.timings
        return {
            "read_s": round(t.get("read", 0.0), 3),
            "predict_s": round(t.get("prepare", 0.0) + t.get("sample", 0.0) + t.get("postprocess", 0.0), 3),
            "write_s": round(case.write_seconds, 3),
            "mask_voxels": int(case.result.mask.array.astype(bool).sum()),
        }
