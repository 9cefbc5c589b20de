"""Ray itself: the import (with the extra to install when it is missing), the address, the cluster's resources.

Nothing here runs at import time: ``ray`` is imported by :func:`require_ray`, which only the Ray runner calls.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import re
from collections.abc import Iterator
from dataclasses import dataclass
from types import ModuleType
from typing import Any

__all__ = ["RAY_EXTRA", "RAY_REQUIREMENT", "Cluster", "RayOptions", "RayUnavailableError", "connect", "require_ray"]

logger = logging.getLogger("diffseg")

RAY_REQUIREMENT = "ray[data]>=2.40,<3"
RAY_EXTRA = 'pip install "diffseg[ray]"'
_MIN_VERSION = (2, 40)
_ADDRESS = re.compile(r"^(?:ray://)?[A-Za-z0-9_.\-\[\]:]+:\d{1,5}$")


class RayUnavailableError(RuntimeError):
    """``--ray`` was asked for and Ray Data cannot be imported here (or is outside the supported versions)."""


def require_ray() -> ModuleType:
    """Import Ray and Ray Data, or say which extra to install.

    Raises:
        RayUnavailableError: ``ray`` or ``ray.data`` does not import, or its version is outside ``>=2.40,<3``.
    """
    try:
        import ray
        import ray.data  # the extra's [data] part (pyarrow, pandas)
    except ImportError as exc:
        raise RayUnavailableError(
            f"--ray runs the cohort on Ray Data, which is not installed here: {RAY_EXTRA} (installs "
            f"{RAY_REQUIREMENT}); the import failed with: {exc}"
        ) from exc
    found = tuple(int(p) for p in re.findall(r"\d+", ray.__version__)[:2])
    if not (_MIN_VERSION <= found < (3, 0)):
        raise RayUnavailableError(
            f"--ray needs {RAY_REQUIREMENT}, found ray {ray.__version__}: {RAY_EXTRA} (or pip install "
            f"'{RAY_REQUIREMENT}')"
        )
    return ray


@dataclass(frozen=True)
class RayOptions:
    """Where and how wide a cohort runs on Ray (Ray's own names: address, ``num_gpus``/``num_cpus`` per actor).

    Attributes:
        address: None or ``"local"``: start a Ray cluster on this machine for the run and stop it afterwards;
            ``"auto"``: join the cluster that ``ray start`` made on this machine; ``"host:port"`` (or
            ``ray://host:port``): join that cluster.
        actors: sampling actors, each holding one segmenter (None: one per GPU of the cluster when actors take
            GPUs, else the cluster's CPUs less one, divided by ``num_cpus_per_actor``).
        num_gpus_per_actor: GPUs each actor holds (None: 1 where the cluster has GPUs and the backend is not a
            CPU backend, else 0).
        num_cpus_per_actor: CPUs each actor holds; on CPU actors also the engine's threads unless ``threads`` is
            given to the segmenter.
        prepare_tasks: read + prepare tasks at once (None: two per actor); with Ray Data's backpressure this bounds
            the prepared cases waiting for an actor.
        object_store_memory: bytes of object store the run may use (Ray Data's ``resource_limits``; None: Ray
            Data's default share of the cluster's store).
        max_tasks_in_flight_per_actor: cases queued on an actor (one sampling, the next one's input fetched).
        memory_per_task: heap memory (bytes) Ray reserves for each read + prepare and finish + write task: no
            more of them run on a node than its memory holds.
    """

    address: str | None = None
    actors: int | None = None
    num_gpus_per_actor: float | None = None
    num_cpus_per_actor: float = 1.0
    prepare_tasks: int | None = None
    object_store_memory: int | None = None
    max_tasks_in_flight_per_actor: int = 2
    memory_per_task: int = 2 * 2**30

    def __post_init__(self) -> None:
        a = self.address
        if a is not None and a not in ("local", "auto") and not _ADDRESS.match(a):
            raise ValueError(f"address must be omitted, 'local', 'auto' or host:port, got {a!r}")
        ints = ("actors", "prepare_tasks", "object_store_memory", "max_tasks_in_flight_per_actor", "memory_per_task")
        for name in ints:
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
                raise ValueError(f"{name} must be an int >= 1, got {value!r}")
        gpus, cpus = self.num_gpus_per_actor, self.num_cpus_per_actor
        if gpus is not None and not (isinstance(gpus, int | float) and math.isfinite(gpus) and gpus >= 0):
            raise ValueError(f"num_gpus_per_actor must be a number >= 0, got {gpus!r}")
        if not (isinstance(cpus, int | float) and math.isfinite(cpus) and cpus > 0):
            raise ValueError(f"num_cpus_per_actor must be a number > 0, got {cpus!r}")

    @property
    def local(self) -> bool:
        return self.address in (None, "local")


@dataclass(frozen=True)
class Cluster:
    """The Ray cluster a run uses.

    Attributes:
        address: what the run connected to (``local`` for the one it started).
        started: the run started this cluster (and stops it).
        cpus, gpus: the cluster's logical CPUs and GPUs.
        nodes: nodes alive.
        ray_version: Ray's version.
        seconds: time to start or join it.
    """

    address: str
    started: bool
    cpus: float
    gpus: float
    nodes: int
    ray_version: str
    seconds: float


def local_cpus(options: RayOptions, want_gpus: bool) -> int:
    """Logical CPUs of a cluster started here: the cores, and at least one more than the actors hold.

    The actors' CPUs are reserved while they live; the read and write tasks need a CPU of their own, or they would
    wait for ever behind actors that wait for their input.
    """
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    if options.actors is None or want_gpus:
        return cores
    return max(cores, math.ceil(options.actors * options.num_cpus_per_actor) + 1)


@contextlib.contextmanager
def connect(options: RayOptions, *, num_cpus: int | None, progress: bool) -> Iterator[Cluster]:
    """Start or join the cluster for one run; stop what was started (or disconnect) on the way out.

    A notebook that has called ``ray.init`` already keeps its connection: the run uses it and leaves it open.
    """
    import time

    ray = require_ray()
    start = time.perf_counter()
    owned = not ray.is_initialized()
    if owned:
        kwargs: dict[str, Any] = {"logging_level": logging.WARNING, "log_to_driver": True}
        if options.local:
            kwargs.update(address="local", num_cpus=num_cpus, include_dashboard=False)
        else:
            kwargs["address"] = options.address
        ray.init(**kwargs)
    try:
        _quiet(ray, progress)
        resources = ray.cluster_resources()
        address = "local" if options.local and owned else (options.address or "connected")
        nodes = sum(1 for n in ray.nodes() if n.get("Alive"))
        cluster = Cluster(
            address=address,
            started=owned and options.local,
            cpus=float(resources.get("CPU", 0.0)),
            gpus=float(resources.get("GPU", 0.0)),
            nodes=nodes,
            ray_version=ray.__version__,
            seconds=time.perf_counter() - start,
        )
        logger.info("ray: %s, %d node(s), %g CPU, %g GPU", address, nodes, cluster.cpus, cluster.gpus)
        yield cluster
    finally:
        if owned:
            ray.shutdown()


def _quiet(ray: ModuleType, progress: bool) -> None:
    """Ray Data's progress bars and its per-run INFO lines only when progress is wanted."""
    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = progress
    ctx.print_on_execution_start = progress
    if not progress:
        logging.getLogger("ray.data").setLevel(logging.WARNING)
