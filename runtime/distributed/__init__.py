"""Cohorts on a Ray cluster: ``diffseg predict -i COHORT -o OUT --ray [ADDRESS]``, and :func:`run_cohort_on_ray`.

A Ray Data pipeline runs the one pipeline of :mod:`diffseg.runtime.pipeline`, stage by stage, on the cluster:

1. read + prepare (CPU tasks): ``load_case`` + ``prepare_case``;
2. sample (an actor pool, ``concurrency`` = the actors): one ``Segmenter`` per actor, loaded once, holding
   ``num_gpus`` GPUs where the cluster has them, else ``num_cpus`` CPUs and as many engine threads;
3. finish + write (CPU tasks): ``finish_case`` + ``write_case``, ``report.json`` last, every file atomic.

It streams: cases enter one per block, at most ``prepare_tasks`` are read at once, Ray Data's backpressure holds
the rest back while the actors are busy (see ``RayOptions``), and only each case's small result row comes back to
the driver. The outputs are those of a local run (same seeds, same files, the same ``report.json`` with a ``ray``
section added, the same ``failures.json``); a case whose worker dies is retried by Ray and written again over its
own files, atomically. Which cases to run (the resume rule, ``--num-parts``) is decided before Ray sees them.

Every node needs diffseg (the same version), the model and the cohort's files at the same paths, and ``-o`` on
a file system they share. ``ray`` is imported only when a run starts; without it the run says which extra to
install (``pip install "diffseg[ray]"``).

Example (a notebook)::

    from diffseg.runtime.cases import discover_cases
    from diffseg.runtime.distributed import RayOptions, run_cohort_on_ray

    cases = discover_cases("cohort/")
    run = run_cohort_on_ray(cases, "out/", {"model": "default", "steps": 10}, options=RayOptions(actors=4))
    run.failures, run.figures["cases_per_minute"]
"""

from __future__ import annotations

import inspect
import logging
import math
import os
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ._cluster import RAY_EXTRA, RAY_REQUIREMENT, Cluster, RayOptions, RayUnavailableError, connect, require_ray

__all__ = [
    "RAY_EXTRA",
    "RAY_REQUIREMENT",
    "CohortRun",
    "RayOptions",
    "RayUnavailableError",
    "require_ray",
    "run_cohort_on_ray",
]

logger = logging.getLogger("diffseg")

_CPU_BACKENDS = ("onnxruntime", "openvino")


@dataclass
class CohortRun:
    """What :func:`run_cohort_on_ray` did.

    Attributes:
        failures: case id → message, for every case that failed (as ``failures.json`` holds them).
        cases: one record per case that came back: ``case_id``, ``error``, ``report`` (path), ``figures``.
        ray: the Ray options of the run, as each report records them.
        figures: the measured figures (``_figures.summarise``), plus ``cluster_s`` (start or join).
    """

    failures: dict[str, str] = field(default_factory=dict)
    cases: list[dict[str, Any]] = field(default_factory=list)
    ray: dict[str, Any] = field(default_factory=dict)
    figures: dict[str, Any] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        return {"ray": self.ray, "failures": self.failures, "figures": self.figures}


def _segment_options(segmenter_args: Mapping[str, Any]):
    """The manifest and options the actors' segmenters will have, made here without a backend (checked early)."""
    from ..backends import BACKENDS
    from ..manifest import load_package
    from ..segmenter import Segmenter, resolve_options

    known = set(inspect.signature(Segmenter.__init__).parameters) - {"self"}
    unknown = sorted(set(segmenter_args) - known)
    if unknown:
        raise TypeError(f"segmenter_args: unknown Segmenter arguments {unknown}; known: {sorted(known)}")
    a = segmenter_args
    backend = a.get("backend", "auto")
    if backend != "auto" and backend not in BACKENDS:
        raise ValueError(f"backend must be auto or one of {sorted(BACKENDS)}, got {backend!r}")
    manifest = load_package(a.get("model", "default")).manifest
    names = ("steps", "samples", "eta", "seed", "overlap", "threshold", "min_lesion_ml", "batch_size")
    options = resolve_options(
        manifest,
        a.get("loop_order", "step-major"),
        {k: a.get(k) for k in names},
        a.get("skip_empty_windows", True),
        a.get("retire_after"),
    )
    return manifest, options


def _specs(cases: Sequence[Any], out_dir: Path) -> tuple[list[Any], dict[str, str]]:
    """Each case's inputs as given (with the working folder they are relative to) and its output folder (absolute;
    a case whose folder is refused fails)."""
    from ..output_paths import case_output_dir
    from ._stages import CaseSpec

    specs, failures = [], {}
    cwd = os.getcwd()
    for case in cases:
        try:
            out = case_output_dir(out_dir, case.case_id)
        except ValueError as exc:
            failures[case.case_id] = str(exc)
            continue
        pet = None if case.pet is None else str(case.pet)
        specs.append(CaseSpec(case.case_id, str(case.ct), pet, cwd, str(out)))
    return specs, failures


def _resources(options: RayOptions, cluster: Cluster, backend: str) -> tuple[int, float]:
    """Actors and GPUs per actor: as given, or the defaults of ``RayOptions``; refused if the cluster lacks them."""
    gpus = options.num_gpus_per_actor
    if gpus is None:
        gpus = 1.0 if cluster.gpus >= 1 and backend not in _CPU_BACKENDS else 0.0
    cpus = options.num_cpus_per_actor
    actors = options.actors
    if actors is None:
        actors = int(cluster.gpus // gpus) if gpus > 0 else int((cluster.cpus - 1) // cpus)
        actors = max(1, actors)
    if gpus * actors > cluster.gpus:
        raise ValueError(
            f"{actors} actor(s) x {gpus:g} GPU need {gpus * actors:g} GPU(s); the cluster has {cluster.gpus:g} "
            "(--ray-actors, --ray-gpus-per-actor)"
        )
    if cpus * actors + 1 > cluster.cpus:
        raise ValueError(
            f"{actors} actor(s) x {cpus:g} CPU leave no CPU for the read and write tasks; the cluster has "
            f"{cluster.cpus:g} CPU(s): use fewer actors or fewer CPUs per actor (--ray-actors, --ray-cpus-per-actor)"
        )
    return actors, gpus


def _dataset(ray: Any, specs: Sequence[Any], stage: Mapping[str, Any], options: RayOptions, actors: int, gpus: float):
    """The three stages as a Ray Data pipeline (lazy: it runs while the driver iterates over it)."""
    from ._stages import SampleStage, dumps, finish_write, read_prepare

    ctx = ray.data.DataContext.get_current()
    ctx.execution_options.preserve_order = False
    if options.object_store_memory is not None:
        limits = ctx.execution_options.resource_limits
        ctx.execution_options.resource_limits = limits.copy(object_store_memory=options.object_store_memory)
    rows = [{"case_id": s.case_id, "spec": dumps(s)} for s in specs]
    ds = ray.data.from_items(rows, override_num_blocks=len(rows))  # one case per block: per-case tasks and retries
    # max_retries on the CPU stages bounds the retries of a case that kills its worker; it also keeps Ray Data
    # from fusing stage 1 into the actors (their remote arguments differ), so the actors only sample.
    # The CPU stages reserve memory_per_task each: Ray then runs no more of them on a node than its memory holds,
    # and (their resources differing from the actors') Ray Data does not fuse stage 1 into the actors, which
    # only sample. Retries on a dead worker or actor are Ray Data's defaults (tasks and actor tasks retried,
    # actors restarted).
    ds = ds.map(
        read_prepare,
        fn_kwargs={"manifest": stage["manifest"], "options": stage["options"], "checks": stage["checks"]},
        num_cpus=1,
        memory=options.memory_per_task,
        compute=ray.data.TaskPoolStrategy(size=options.prepare_tasks or 2 * actors),
    )
    ds = ds.map_batches(
        SampleStage,
        fn_constructor_kwargs={"segmenter_args": dict(stage["segmenter_args"]), "expected": stage["options"]},
        batch_size=1,
        batch_format="numpy",
        compute=ray.data.ActorPoolStrategy(
            size=actors, max_tasks_in_flight_per_actor=options.max_tasks_in_flight_per_actor
        ),
        num_cpus=options.num_cpus_per_actor,
        num_gpus=gpus or None,
    )
    return ds.map(
        finish_write,
        fn_kwargs={"write": stage["write"], "extra": {"ray": stage["record"]}},
        num_cpus=1,
        memory=options.memory_per_task,
    )


def run_cohort_on_ray(
    cases: Sequence[Any],
    out_dir: str | Path,
    segmenter_args: Mapping[str, Any],
    *,
    options: RayOptions | None = None,
    checks: Any = None,
    write: Any = None,
    progress: bool = False,
    on_case: Callable[[dict[str, Any]], None] | None = None,
) -> CohortRun:
    """Segment ``cases`` on a Ray cluster into ``out_dir/<case_id>``, as ``diffseg predict -i`` would locally.

    Args:
        cases: the cases to run (``Case``: ``case_id``, ``ct``, ``pet``); the caller has applied the resume rule
            and ``--num-parts``.
        out_dir: the output folder (``-o``), on a file system every node sees.
        segmenter_args: keyword arguments of :class:`~diffseg.runtime.segmenter.Segmenter` (model, backend,
            steps...); on CPU actors ``threads`` defaults to ``num_cpus_per_actor``.
        options: address and resources (None: a local cluster, defaults of :class:`RayOptions`).
        checks: the overrides of the input checks (``InputChecks``; None: none).
        write: which outputs to write (``WriteOptions``; None: all).
        progress: Ray Data's progress bars.
        on_case: called on the driver with each case's record as it comes back.

    Raises:
        RayUnavailableError: Ray Data is not installed (the message names the extra).
        ValueError, TypeError: a bad option or segmenter argument (before any cluster is started).
    """
    ray = require_ray()
    options = options or RayOptions()
    manifest, seg_options = _segment_options(segmenter_args)
    specs, refused = _specs(cases, Path(out_dir))
    run = CohortRun()
    for case_id, error in refused.items():
        _take(run, {"case_id": case_id, "error": error, "report": "", "figures": {}}, on_case)
    if not specs:
        return run
    backend = str(segmenter_args.get("backend", "auto"))
    want_gpus = bool(options.num_gpus_per_actor) and backend not in _CPU_BACKENDS
    from ._figures import summarise

    with connect(options, num_cpus=_local_cpus(options, want_gpus), progress=progress) as cluster:
        actors, gpus = _resources(options, cluster, backend)
        args = dict(segmenter_args)
        if gpus == 0 and args.get("threads") is None:
            args["threads"] = max(1, math.ceil(options.num_cpus_per_actor))
        run.ray = {
            "address": cluster.address,
            "actors": actors,
            "num_cpus_per_actor": options.num_cpus_per_actor,
            "num_gpus_per_actor": gpus,
            "threads_per_actor": args.get("threads"),
            "ray_version": cluster.ray_version,
        }
        stage = {"manifest": manifest, "options": seg_options, "checks": checks, "write": write}
        stage.update(segmenter_args=args, record=run.ray)
        start = time.perf_counter()
        try:
            for row in _dataset(ray, specs, stage, options, actors, gpus).iter_rows():
                _take(run, _record(row), on_case)
        except ray.exceptions.RayError as exc:  # an actor that cannot start (no such backend there), a lost node
            cause = str(exc).strip().splitlines()[-1] if str(exc).strip() else type(exc).__name__
            raise RuntimeError(
                f"the Ray run stopped after {len(run.cases)} case(s) came back: {cause} (Ray's traceback is above; "
                "finished cases keep their outputs, a rerun resumes)"
            ) from exc
        run.figures = summarise(run.cases, time.perf_counter() - start)
        run.figures.update(cluster_s=round(cluster.seconds, 3), nodes=cluster.nodes)
    return run


def _local_cpus(options: RayOptions, want_gpus: bool) -> int | None:
    from ._cluster import local_cpus

    return local_cpus(options, want_gpus) if options.local else None


def _take(run: CohortRun, record: dict[str, Any], on_case: Callable[[dict[str, Any]], None] | None) -> None:
    run.cases.append(record)
    if record["error"]:
        run.failures[record["case_id"]] = record["error"]
    if on_case is not None:
        on_case(record)


def _record(row: Mapping[str, Any]) -> dict[str, Any]:
    import json

    return {
        "case_id": str(row["case_id"]),
        "error": str(row["error"]),
        "report": str(row["report"]),
        "figures": json.loads(row["figures"]),
    }
