"""The node: spool, queue, Storage SCP, the watcher that queues ready studies and purges old ones, and the worker.

Start-up order makes the guarantees hold after a crash: take the spool's lock, delete half-written temporary
files, record instance files that reached the spool but not the queue, give studies still receiving a fresh
idle period, load the model, then listen and resume every ``queued``, ``running`` or ``sending`` job.
"""

from __future__ import annotations

import json
import logging
import os
import threading
import time
from collections.abc import Callable

import pydicom

from .jobqueue import JobQueue
from .options import ServeOptions
from .pipeline import SegmenterPipeline, SegPipeline
from .scp import StorageSCP
from .spool import Spool, check_uid
from .worker import Worker

__all__ = ["Node", "input_modalities", "recover_spool"]

logger = logging.getLogger("diffseg")


def input_modalities(model: str) -> tuple[str, ...]:
    """The modalities a model package needs (its manifest's, read without loading an engine).

    Raises:
        RuntimeError: the package cannot be found or its manifest read.
    """
    from diffseg.runtime.manifest import load_package

    try:
        return tuple(load_package(model, verify=False).manifest.modalities)
    except (OSError, ValueError) as exc:
        raise RuntimeError(f"model {model!r}: its manifest cannot be read: {exc}") from exc


def recover_spool(spool: Spool, queue: JobQueue) -> dict[str, int]:
    """Bring spool and queue back in step after a stop, however abrupt.

    Deletes temporary files of interrupted writes; records instance files that are in the spool but not in the
    queue (the process stopped between the file's rename and the queue's commit, or the queue's disk was
    full); restarts the idle timer of every study that has no job yet.

    Returns:
        Counts: ``partial_writes_removed``, ``instances_recovered``, ``files_ignored``,
        ``idle_timers_restarted``.
    """
    removed = spool.remove_partial_writes()
    known = queue.known_instances()
    recovered = ignored = 0
    for path in spool.instance_files():
        rel = str(path.relative_to(spool.root))
        if rel in known:
            continue
        try:
            ds = pydicom.dcmread(path, stop_before_pixels=True)
            study = check_uid("StudyInstanceUID", str(ds.StudyInstanceUID))
            sop = check_uid("SOPInstanceUID", str(ds.SOPInstanceUID))
            if spool.instance_path(study, sop) != path:
                raise ValueError("file name does not match the hash of its UIDs")
            queue.record_instance(
                size_bytes=path.stat().st_size,
                study_uid=study,
                series_uid=check_uid("SeriesInstanceUID", str(ds.SeriesInstanceUID)),
                sop_instance_uid=sop,
                sop_class_uid=check_uid("SOPClassUID", str(ds.SOPClassUID)),
                modality=str(ds.get("Modality", "")) or None,
                path=rel,
                calling_aet=None,
            )
            recovered += 1
        except Exception as exc:  # a file we did not write: leave it alone, say so
            ignored += 1
            logger.warning(
                "spool file %s not recovered: %s",
                path,
                exc,
                extra={"event": "recover_skipped", "path": str(path)},
            )
    restarted = queue.restart_idle_timers()
    counts = {
        "partial_writes_removed": removed,
        "instances_recovered": recovered,
        "files_ignored": ignored,
        "idle_timers_restarted": restarted,
    }
    logger.info("spool recovered", extra={"event": "recovered", **counts})
    return counts


class Node:
    """A running DICOM node (see the module docstring).

    Args:
        options: the configuration.
        pipeline_factory: builds the pipeline once at start (default: ``SegmenterPipeline(model, backend)``).
        run_worker: False for a node that only receives and queues (the jobs wait for a node with a worker).
    """

    def __init__(
        self,
        options: ServeOptions,
        pipeline_factory: Callable[[ServeOptions], SegPipeline] | None = None,
        run_worker: bool = True,
    ) -> None:
        self.options = options
        self.spool = Spool(options.spool_dir)
        self.pipeline_factory = pipeline_factory or (lambda o: SegmenterPipeline(o.model, o.backend))
        self.run_worker = run_worker
        self.queue: JobQueue | None = None
        self.scp: StorageSCP | None = None
        self.worker: Worker | None = None
        self._stop = threading.Event()
        self._watcher = threading.Thread(target=self._watch, name="diffseg-idle-watcher", daemon=True)

    def start(self) -> Node:
        """Lock and recover the spool, load the model, start the SCP, the idle watcher and the worker.

        Raises:
            SpoolLockedError: another node runs on this spool.
            RuntimeError: the model does not load.
            OSError: the port cannot be bound.
        """
        self.spool.create()
        self.spool.lock()
        try:
            self.queue = JobQueue(self.spool.db_path, input_modalities=input_modalities(self.options.model))
            if self.options.file_mode is not None:  # SQLite creates its files with 0o644 less the umask
                for path in self.spool.root.glob(f"{self.spool.db_path.name}*"):
                    os.chmod(path, self.options.file_mode)
            recover_spool(self.spool, self.queue)
            timing = {"idle_seconds": self.options.idle_seconds, "max_wait_seconds": self.options.max_wait_seconds}
            self.queue.set_meta("timing", json.dumps(timing))
            resumable = self.queue.jobs(("queued", "running", "sending"))
            if resumable:
                logger.info(
                    "resuming %d job(s)",
                    len(resumable),
                    extra={"event": "resume", "jobs": {j.id: j.state for j in resumable}},
                )
            pipeline = self.pipeline_factory(self.options) if self.run_worker else None
            self.scp = StorageSCP(self.options, self.spool, self.queue)
            self.scp.start()
            self._watcher.start()
            if self.run_worker:
                self.worker = Worker(self.options, self.spool, self.queue, pipeline)
                self.worker.start()
        except BaseException:
            self._release()
            raise
        return self

    @property
    def port(self) -> int:
        """The port the SCP listens on."""
        return self.scp.port if self.scp is not None else self.options.port

    def _watch(self) -> None:
        assert self.queue is not None
        interval = min(0.5, max(0.05, self.options.idle_seconds / 4))
        while not self._stop.wait(interval):
            try:
                self._queue_ready_studies()
                self._purge_old_studies()
            except Exception:
                logger.exception("watcher: job queue or spool update failed", extra={"event": "queue_error"})

    def _queue_ready_studies(self) -> None:
        assert self.queue is not None
        o = self.options
        for job in self.queue.enqueue_ready_studies(o.idle_seconds, o.max_wait_seconds):
            fields = {"job": job.id, "study_uid": job.study_uid, "version": job.version, "instances": job.instances}
            if job.state == "failed":
                logger.error("job %d failed: %s", job.id, job.reason, extra={"event": "job_failed", **fields})
            else:
                logger.info(
                    "study ready after %.1f s idle: job %d (version %d) queued",
                    o.idle_seconds,
                    job.id,
                    job.version,
                    extra={"event": "job_queued", "supersedes": job.supersedes, **fields},
                )

    def _purge_old_studies(self) -> None:
        assert self.queue is not None
        for study_uid in self.queue.studies_to_purge(self.options.keep_done_days, self.options.keep_failed_days):
            with self.spool.incoming_lock:
                freed = self.spool.purge_study(study_uid)
                self.queue.mark_purged(study_uid)
            logger.info(
                "study purged from the spool (%d bytes)",
                freed,
                extra={"event": "study_purged", "study_uid": study_uid, "bytes": freed},
            )

    def stop(self, grace: float = 10.0) -> None:
        """Stop listening, let open associations and the current job step finish for up to ``grace`` s each.

        A job still segmenting after ``grace`` stays ``running`` in the queue and resumes at the next start.
        """
        self._stop.set()
        if self.scp is not None:
            self.scp.stop()
            deadline = time.monotonic() + grace
            while any(a.is_acceptor for a in self.scp.ae.active_associations) and time.monotonic() < deadline:
                time.sleep(0.05)
            for assoc in self.scp.ae.active_associations:
                assoc.abort()
        if self._watcher.is_alive():
            self._watcher.join(grace)
        worker_stopped = True
        if self.worker is not None:
            worker_stopped = self.worker.stop(grace)
            if not worker_stopped:
                logger.warning(
                    "worker still busy with job %s after %.0f s; it resumes at the next start",
                    self.worker.busy_with,
                    grace,
                    extra={"event": "stop_busy", "job": self.worker.busy_with},
                )
        logger.info("node stopped", extra={"event": "stopped"})
        if worker_stopped:
            self._release()
        else:  # the worker thread still uses the queue; the kernel releases the lock when the process exits
            self.spool.unlock()

    def _release(self) -> None:
        if self.queue is not None:
            self.queue.close()
            self.queue = None
        self.spool.unlock()
