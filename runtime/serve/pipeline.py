"""What the worker does with a ready study: read it, segment it, write its DICOM outputs with deterministic UIDs.

Each output's SeriesInstanceUID and SOPInstanceUID are name-based UUIDs (``2.25.<uuid5>``, PS3.5 B.2) of the
study's UID, the model version, the output kind and the **input key**: a digest of the series the reader selected
and of every instance in them. The same inputs give the same UIDs, so an output sent again after a crash
overwrites (or is ignored as already stored by) the PACS instead of appearing twice; new inputs (a late PET, a
completed series) give new UIDs, a new version beside the old.
"""

from __future__ import annotations

import hashlib
import logging
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from .spool import check_uid, fsync_dir

__all__ = [
    "OutputUids",
    "ReadStudy",
    "SegPipeline",
    "SegmenterPipeline",
    "input_key_of",
    "model_version_of",
    "output_uids",
]

logger = logging.getLogger("diffseg")

# Fixed namespace of the name-based UUIDs; changing it would change every UID ever derived.
_NAMESPACE = uuid.uuid5(uuid.NAMESPACE_URL, "https://github.com/diffseg/diffseg/serve/seg")


@dataclass(frozen=True)
class OutputUids:
    """The UIDs of one output of a study.

    Attributes:
        series_instance_uid: SeriesInstanceUID of the output's series.
        sop_instance_uid: SOPInstanceUID of the output instance.
    """

    series_instance_uid: str
    sop_instance_uid: str


def output_uids(study_uid: str, model_version: str, input_key: str, kind: str) -> OutputUids:
    """Derive an output's UIDs from the study, the model version, the inputs read and the output kind.

    Args:
        study_uid: StudyInstanceUID of the segmented study.
        model_version: identity of the model (name, version, weights digest) that made the output.
        input_key: :func:`input_key_of` the study read.
        kind: the output (``seg``, ``rtstruct``, ``labelmap``, ``fractional``).

    Returns:
        Two ``2.25.`` UIDs (at most 44 characters).

    Raises:
        ValueError: ``study_uid`` is not a UID, or another argument is empty.
    """
    check_uid("study_uid", study_uid)
    for name, value in (("model_version", model_version), ("input_key", input_key), ("kind", kind)):
        if not isinstance(value, str) or not value:
            raise ValueError(f"{name} must be a non-empty string, got {value!r}")
    parts = (study_uid, model_version, input_key, kind)
    series = uuid.uuid5(_NAMESPACE, "\n".join(("series", *parts)))
    instance = uuid.uuid5(_NAMESPACE, "\n".join(("instance", *parts)))
    return OutputUids(series_instance_uid=f"2.25.{series.int}", sop_instance_uid=f"2.25.{instance.int}")


def input_key_of(series: dict[str, list[str]]) -> str:
    """A digest of the input series read: ``{SeriesInstanceUID: [SOPInstanceUID, ...]}`` (order-free)."""
    text = "\n".join(f"{uid}:{','.join(sorted(sops))}" for uid, sops in sorted(series.items()))
    return hashlib.sha256(text.encode("ascii")).hexdigest()[:32]


@dataclass(frozen=True)
class ReadStudy:
    """A study as read from the spool, before the model runs.

    Attributes:
        input_key: :func:`input_key_of` the series selected.
        case: the pipeline's own handle on what it read (passed back to :meth:`SegPipeline.segment`).
        seconds: time spent reading.
    """

    input_key: str
    case: Any
    seconds: float


class SegPipeline(Protocol):
    """Turns a folder of received instances into DICOM outputs.

    Attributes:
        model_version: identity of the model; the output UIDs derive from it.
    """

    model_version: str

    def read(self, study_dir: Path) -> ReadStudy:
        """Read and select the study's inputs (no model work)."""
        ...

    def segment(
        self, study: ReadStudy, out_dir: Path, study_uid: str, kinds: tuple[str, ...], version: int
    ) -> tuple[dict[str, dict[str, str]], dict[str, Any]]:
        """Segment a read study, write the outputs ``kinds`` into ``out_dir``; return, per kind, its ``path``
        and UIDs, and figures for the log."""
        ...


def model_version_of(segmenter: Any, model: str) -> str:
    """A stable identity of a loaded model, from which the output UIDs derive.

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


class SegmenterPipeline:
    """The default pipeline: the study folder through the one pipeline (:mod:`diffseg.runtime.pipeline`), writing
    only the DICOM outputs the node sends.

    The model is loaded once, here, and reused for every study.

    Args:
        model: model package name or path (``Segmenter``'s ``model``).
        backend: backend name (``Segmenter``'s ``backend``).

    Raises:
        RuntimeError: the model does not load.
    """

    def __init__(self, model: str, backend: str) -> None:
        from diffseg.runtime.segmenter import Segmenter

        start = time.perf_counter()
        self.segmenter = Segmenter(model=model, backend=backend)
        self.model_version = model_version_of(self.segmenter, model)
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

    def read(self, study_dir: Path) -> ReadStudy:
        """Read the study folder; see :class:`SegPipeline`."""
        from diffseg.runtime.pipeline import load_case

        start = time.perf_counter()
        loaded = load_case(study_dir, None)  # the node serves PET/CT models (SEG and RTSTRUCT refer to the study)
        study = loaded.study
        if study is None:
            raise RuntimeError(f"{study_dir}: the spool folder did not read as a DICOM study")
        key = input_key_of(
            {
                study.ct_series_uid: [str(h.SOPInstanceUID) for h in study.ct_headers],
                study.pet_series_uid: [str(h.SOPInstanceUID) for h in study.pet_headers],
            }
        )
        return ReadStudy(input_key=key, case=loaded, seconds=time.perf_counter() - start)

    def segment(
        self, study: ReadStudy, out_dir: Path, study_uid: str, kinds: tuple[str, ...], version: int
    ) -> tuple[dict[str, dict[str, str]], dict[str, Any]]:
        """Segment and write; see :class:`SegPipeline`."""
        from diffseg.runtime.outputs import WriteOptions
        from diffseg.runtime.pipeline import segment_loaded, write_case

        uids = {kind: output_uids(study_uid, self.model_version, study.input_key, kind) for kind in kinds}
        write = WriteOptions(
            maps=False,
            tables=False,
            preview=False,
            report=False,
            dicom_outputs=kinds,
            dicom_uids={k: (u.series_instance_uid, u.sop_instance_uid) for k, u in uids.items()},
        )
        result = segment_loaded(self.segmenter, study.case, read_seconds=study.seconds)
        source = study.case.sources.get("CT", str(out_dir))
        case = write_case(
            result, study.case, out_dir, case_id=f"study v{version}", inputs={"ct": source, "pet": None}, write=write
        )
        outputs = {}
        for kind, u in uids.items():
            path = case.paths.get(f"dicom_{kind}")
            if path is None or path.parent != out_dir:
                raise RuntimeError(f"the pipeline wrote no {kind} output into {out_dir}")
            outputs[kind] = {
                "path": str(path),
                "series_instance_uid": u.series_instance_uid,
                "sop_instance_uid": u.sop_instance_uid,
            }
        fsync_dir(out_dir)
        t = result.timings
        figures = {
            "read_s": round(t.get("read", 0.0), 3),
            "predict_s": round(t.get("prepare", 0.0) + t.get("sample", 0.0) + t.get("postprocess", 0.0), 3),
            "write_s": round(case.write_seconds, 3),
            "mask_voxels": int(result.mask.array.astype(bool).sum()),
            "lesions": len(result.lesions),
        }
        return outputs, figures
