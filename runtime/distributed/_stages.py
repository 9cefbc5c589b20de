"""The three Ray Data stages of a case, as plain functions over rows (no Ray import: they run anywhere).

1. :func:`read_prepare` (CPU task): :func:`~diffseg.runtime.cases.load_case` +
   :func:`~diffseg.runtime.pipeline.prepare_case`;
2. :class:`SampleStage` (actor): one :class:`~diffseg.runtime.segmenter.Segmenter` per actor, loaded once;
   :func:`~diffseg.runtime.pipeline.sample_case` per case;
3. :func:`finish_write` (CPU task): :func:`~diffseg.runtime.pipeline.finish_case` +
   :func:`~diffseg.runtime.pipeline.write_case`.

A row is a few columns: ``case_id``, ``spec`` (the case's paths), ``error`` (empty, or the message of the stage
that refused the case: later stages pass it on), ``figures`` (JSON: each stage's start, end, work, serialisation,
bytes, worker and peak RSS) and the payloads, pickled here so that what crosses the object store is measured
exactly:

- ``model_input`` (stage 1 → 2): the case on the model grid (image, candidate, grid, box) and its seed;
- ``case`` (stage 1 → 3, carried through the actor unopened): the :class:`PreparedCase` without the model image
  (the volumes as read, a DICOM study's headers, the overrides, the timings; ``uncrop`` needs only grid and box);
- ``samples`` (stage 2 → 3): the :class:`SampledCase` without the per-sample maps (``finish_case`` reads the mean,
  standard deviation and entropy only).

Carried payloads rather than object references: a block is rebuilt by Ray Data's lineage when a worker dies, an
object put by a dead worker is not.
"""

from __future__ import annotations

import contextlib
import json
import os
import pickle
import resource
import socket
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np

from ..cases import load_case
from ..input_checks import InputChecks
from ..manifest import Manifest
from ..outputs import WriteOptions
from ..pipeline import PreparedCase, SampledCase, finish_case, prepare_case, sample_case, write_case
from ..result import SegmentOptions

__all__ = ["CASE_ERRORS", "CaseSpec", "SampleStage", "finish_write", "read_prepare"]

#: What makes a case fail (listed in failures.json) rather than the run: the local cohort loop's set.
CASE_ERRORS = (ValueError, FileNotFoundError, RuntimeError, OSError)
PAYLOADS = ("model_input", "case", "samples")


@dataclass(frozen=True)
class CaseSpec:
    """A case as the driver hands it out.

    Attributes:
        case_id: the case's id.
        ct, pet: the inputs as given (``pet`` None: a DICOM study folder in ``ct``), read, named in messages and
            recorded in the report exactly as a local run does; relative ones are taken from ``cwd``.
        cwd: the driver's working folder.
        out_dir: the case's output folder (absolute, proven under ``-o`` by the driver).
    """

    case_id: str
    ct: str
    pet: str | None
    cwd: str
    out_dir: str


@contextlib.contextmanager
def _working_dir(spec: CaseSpec) -> Iterator[None]:
    """Read relative inputs from the driver's working folder (a task worker runs one task at a time)."""
    relative = not all(os.path.isabs(p) for p in (spec.ct, spec.pet) if p is not None)
    before = os.getcwd()
    if relative and before != spec.cwd and os.path.isdir(spec.cwd):
        os.chdir(spec.cwd)
        try:
            yield
        finally:
            os.chdir(before)
    else:
        yield


def dumps(value: Any) -> bytes:
    return pickle.dumps(value, protocol=pickle.HIGHEST_PROTOCOL)


def _worker() -> dict[str, Any]:
    """This worker: host, pid, Ray node, and its peak resident memory so far (``getrusage``, MB)."""
    node = ""
    try:  # the node id, when running under Ray (the stages also run without it, in tests)
        import ray

        if ray.is_initialized():
            node = ray.get_runtime_context().get_node_id()
    except ImportError:
        pass
    peak_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # kilobytes on Linux
    return {"host": socket.gethostname(), "pid": os.getpid(), "node": node, "peak_rss_mb": round(peak_kb / 1024, 1)}


class _Clock:
    """One stage's record: wall start and end (epoch seconds, comparable across workers), work and serialisation."""

    def __init__(self) -> None:
        self.start = time.time()
        self.serialise = 0.0
        self.bytes: dict[str, int] = {}

    def loads(self, data: bytes) -> Any:
        t = time.perf_counter()
        value = pickle.loads(data)
        self.serialise += time.perf_counter() - t
        return value

    def dumps(self, name: str, value: Any) -> bytes:
        t = time.perf_counter()
        data = dumps(value)
        self.serialise += time.perf_counter() - t
        self.bytes[name] = len(data)
        return data

    def record(self, figures: str, stage: str, work: float, **more: Any) -> str:
        end = time.time()
        entry = {"start": self.start, "end": end, "work_s": work, "serialise_s": self.serialise, "bytes": self.bytes}
        return json.dumps({**json.loads(figures or "{}"), stage: {**entry, **more, **_worker()}})


def read_prepare(
    row: dict[str, Any], *, manifest: Manifest, options: SegmentOptions, checks: InputChecks | None
) -> dict[str, Any]:
    """Stage 1 (CPU task): read the case and put it on the model grid.

    Args:
        row: ``case_id`` and ``spec`` (a pickled :class:`CaseSpec`).
        manifest: the model's manifest.
        options: the segment options (those of every actor's segmenter).
        checks: the overrides of the input checks.
    """
    clock = _Clock()
    spec: CaseSpec = clock.loads(row["spec"])
    out = {"case_id": row["case_id"], "spec": row["spec"], "error": "", "model_input": b"", "case": b""}
    work = 0.0
    try:
        start = time.perf_counter()
        with _working_dir(spec):
            pet = None if spec.pet is None else Path(spec.pet)
            loaded = load_case(Path(spec.ct), pet, modalities=manifest.modalities, checks=checks)
            read_seconds = time.perf_counter() - start
            prepared = prepare_case(manifest, options, loaded, checks=checks, read_seconds=read_seconds)
        work = time.perf_counter() - start
    except CASE_ERRORS as exc:
        out["error"] = str(exc)
    else:
        image = prepared.model_input
        out["model_input"] = clock.dumps("model_input", (image, prepared.seed))
        geometry = replace(image, image=image.image[:, :0, :0, :0], candidate=None)
        out["case"] = clock.dumps("case", replace(prepared, model_input=geometry))
    out["figures"] = clock.record("", "prepare", work)
    return out


class SampleStage:
    """Stage 2 (actor): one segmenter per actor, loaded when the actor starts (again after a restart).

    Args:
        segmenter_args: keyword arguments of :class:`~diffseg.runtime.segmenter.Segmenter`.
        expected: the options stage 1 prepared the cases with; a segmenter whose options differ (another model
            version on this node) is refused.
    """

    def __init__(self, segmenter_args: Mapping[str, Any], expected: SegmentOptions) -> None:
        from ..segmenter import Segmenter

        start = time.perf_counter()
        self.segmenter = Segmenter(**segmenter_args)
        self.load_seconds = time.perf_counter() - start
        got = replace(self.segmenter.options, device_loop=False)
        if got != replace(expected, device_loop=False):
            self.segmenter.close()
            raise RuntimeError(f"the actor's segmenter options {got} differ from the driver's {expected}")

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Sample each case of ``batch`` (a numpy batch of stage 1's rows; Ray Data hands one case at a time)."""
        rows = [self.one({k: batch[k][i] for k in batch}) for i in range(len(batch["case_id"]))]
        return {k: np.array([r[k] for r in rows], dtype=object) for k in rows[0]}

    def one(self, row: Mapping[str, Any]) -> dict[str, Any]:
        clock = _Clock()
        out = {k: row[k] for k in ("case_id", "spec", "error", "case")}
        out["samples"] = b""
        work = 0.0
        if not row["error"]:
            try:
                model_input, seed = clock.loads(row["model_input"])
                sampled = sample_case(self.segmenter, model_input, seed)
                work = sampled.seconds
                light = replace(sampled.samples, probabilities=sampled.samples.probabilities[:0])
                out["samples"] = clock.dumps("samples", replace(sampled, samples=light))
            except CASE_ERRORS as exc:
                out["error"] = str(exc)
        out["figures"] = clock.record(str(row["figures"]), "sample", work, load_s=self.load_seconds)
        return out


def finish_write(row: dict[str, Any], *, write: WriteOptions | None, extra: Mapping[str, Any]) -> dict[str, Any]:
    """Stage 3 (CPU task): the maps onto the CT grid, postprocessing, then the case's outputs, ``report.json`` last.

    Args:
        row: stage 2's row.
        write: which outputs to write (None: all).
        extra: report fields after the inputs (the Ray options of the run).
    """
    clock = _Clock()
    out = {"case_id": row["case_id"], "error": row["error"], "report": ""}
    work = 0.0
    if not row["error"]:
        try:
            spec: CaseSpec = clock.loads(row["spec"])
            prepared: PreparedCase = clock.loads(row["case"])
            sampled: SampledCase = clock.loads(row["samples"])
            start = time.perf_counter()
            result = finish_case(prepared, sampled.samples, sampled.options, sampled.settings, sampled.seconds)
            written = write_case(
                result,
                prepared.loaded,
                Path(spec.out_dir),
                case_id=spec.case_id,
                inputs={"ct": spec.ct, "pet": spec.pet},
                write=write,
                extra=extra,
            )
            work = time.perf_counter() - start
            out["report"] = str(written.paths.get("report", ""))
        except CASE_ERRORS as exc:
            out["error"] = str(exc)
    out["figures"] = clock.record(row["figures"], "write", work)
    return out
