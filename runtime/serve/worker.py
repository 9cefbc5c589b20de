"""The worker thread: takes jobs from the queue, segments, sends the outputs, retries with back-off.

One job at a time, in queue order. A job whose study reads as the same series as the study's last sent version
is ``done`` without running the model or sending (a resend, a series that is not selected). A job is marked
``done`` only after the destination confirmed every output; a send failure schedules the next try after
``backoff_seconds``; a job that cannot be segmented fails with the reason.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from pathlib import Path

from .jobqueue import Job, JobQueue
from .options import ServeOptions
from .pipeline import SegPipeline
from .sender import SendError, send_files
from .spool import Spool

__all__ = ["Worker", "backoff_seconds"]

logger = logging.getLogger("diffseg")


def backoff_seconds(failures: int, base: float, cap: float) -> float:
    """Wait before the next try after ``failures`` failed sends: ``min(cap, base · 2^(failures − 1))``.

    Args:
        failures: failed tries so far (>= 1).
        base: wait after the first failure (s).
        cap: longest wait (s).

    Raises:
        ValueError: ``failures`` < 1, or ``base``/``cap`` not positive.
    """
    if failures < 1:
        raise ValueError(f"failures must be >= 1, got {failures}")
    if base <= 0 or cap <= 0:
        raise ValueError(f"base and cap must be > 0, got base={base}, cap={cap}")
    return min(cap, base * 2.0 ** min(failures - 1, 60))


class Worker:
    """Runs queued jobs on a thread until stopped.

    Args:
        options: node configuration (destination, retry policy, AE title).
        spool: the spool directory.
        queue: its job queue.
        pipeline: loaded pipeline (model loaded once); None for a node that only sends jobs already segmented.
    """

    def __init__(self, options: ServeOptions, spool: Spool, queue: JobQueue, pipeline: SegPipeline | None) -> None:
        self.options = options
        self.spool = spool
        self.queue = queue
        self.pipeline = pipeline
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="diffseg-worker", daemon=True)
        self.busy_with: int | None = None

    def start(self) -> None:
        """Start the thread."""
        self._thread.start()

    def stop(self, timeout: float | None = None) -> bool:
        """Ask the thread to stop after the current step; wait up to ``timeout`` s; True if it stopped."""
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout)
        return not self._thread.is_alive()

    def _loop(self) -> None:
        while not self._stop.is_set():
            try:
                job = self.queue.next_job()
            except Exception:
                logger.exception("job queue read failed", extra={"event": "queue_error"})
                self._stop.wait(1.0)
                continue
            if job is None:
                wake = self.queue.next_wakeup()
                delay = 0.5 if wake is None else min(0.5, max(0.01, wake - time.time()))
                self._stop.wait(delay)
                continue
            self.busy_with = job.id
            try:
                self.process(job)
            except Exception as exc:  # a bug must not kill the worker; the job stays resumable or fails
                logger.exception("job %d: unexpected error", job.id, extra={"event": "job_error", "job": job.id})
                try:
                    self.queue.mark_failed(job.id, f"internal error: {type(exc).__name__}: {exc}")
                except Exception:
                    logger.exception("job %d: could not mark failed", job.id, extra={"event": "queue_error"})
            finally:
                self.busy_with = None

    def process(self, job: Job) -> Job:
        """Advance one job as far as it goes now: segment if needed, then one send try.

        Returns:
            The job as it is afterwards.
        """
        if job.state in ("queued", "running"):
            job = self._segment(job)
            if job.state != "sending":
                return job
        if job.state == "sending":
            return self._send(job)
        return job

    def _fail(self, job: Job, reason: str, exc_info: bool = False) -> Job:
        logger.error(
            "job %d failed: %s",
            job.id,
            reason,
            exc_info=exc_info,
            extra={"event": "job_failed", "job": job.id, "study_uid": job.study_uid, "reason": reason},
        )
        return self.queue.mark_failed(job.id, reason)

    def _start(self, job: Job) -> Job:
        """Count a run (or fail a job that was interrupted too often); log it."""
        if job.runs >= self.options.max_runs:
            reason = f"segmentation started {job.runs} times without finishing (crash or kill during the run?)"
            return self._fail(job, reason)
        if self.pipeline is None:
            return self._fail(job, "no segmentation pipeline loaded in this node")
        job = self.queue.start_run(job.id)
        logger.info(
            "job %d: segmenting study, version %d (%d instances)%s",
            job.id,
            job.version,
            job.instances or 0,
            ", resumed after a restart" if job.runs > 1 else "",
            extra={
                "event": "job_running",
                "job": job.id,
                "study_uid": job.study_uid,
                "version": job.version,
                "run": job.runs,
            },
        )
        return job

    def _segment(self, job: Job) -> Job:
        job = self._start(job)
        if job.state != "running" or self.pipeline is None:
            return job
        model_version = self.pipeline.model_version
        start = time.perf_counter()
        try:
            study = self.pipeline.read(self.spool.study_dir(job.study_uid))
        except Exception as exc:
            return self._fail(job, f"study could not be read: {type(exc).__name__}: {exc}", exc_info=True)
        previous = self.queue.previous_done(job)
        same = previous is not None and (previous.input_key, previous.model_version) == (study.input_key, model_version)
        if same and not job.requeued:
            return self._unchanged(job, previous, study.input_key, model_version)  # type: ignore[arg-type]
        out_dir = self.spool.result_dir(job.study_uid, job.version)
        try:
            kinds = self.options.dicom_outputs
            outputs, figures = self.pipeline.segment(study, out_dir, job.study_uid, kinds, job.version)
        except Exception as exc:
            return self._fail(job, f"segmentation failed: {type(exc).__name__}: {exc}", exc_info=True)
        for entry in outputs.values():
            if self.options.file_mode is not None:  # the writer gave 0o666 less the umask
                os.chmod(entry["path"], self.options.file_mode)
            entry["path"] = str(Path(entry["path"]).relative_to(self.spool.root))
        logger.info(
            "job %d: outputs written",
            job.id,
            extra={
                "event": "outputs_written",
                "job": job.id,
                "version": job.version,
                "supersedes": previous.id if previous is not None else None,
                "seconds": round(time.perf_counter() - start, 3),
                "outputs": {k: v["sop_instance_uid"] for k, v in outputs.items()},
                **figures,
            },
        )
        return self.queue.set_sending(job.id, outputs=outputs, input_key=study.input_key, model_version=model_version)

    def _unchanged(self, job: Job, previous: Job, input_key: str, model_version: str) -> Job:
        logger.info(
            "job %d: the series read are those of job %d, already sent; nothing new",
            job.id,
            previous.id,
            extra={"event": "job_unchanged", "job": job.id, "study_uid": job.study_uid, "same_as": previous.id},
        )
        return self.queue.mark_unchanged(job.id, input_key=input_key, model_version=model_version, same_as=previous.id)

    def _send(self, job: Job) -> Job:
        outputs = job.outputs or {}
        missing = [e["path"] for e in outputs.values() if not (self.spool.root / e["path"]).is_file()]
        if not outputs or missing:
            return self._fail(job, f"output file(s) {missing or '(none recorded)'} missing; cannot send")
        dest = ", ".join(str(d) for d in self.options.destinations)
        status, seconds = 0, 0.0
        try:
            # every destination each round: a repeat send carries the same UIDs, so a PACS that has it keeps one
            for destination in self.options.destinations:
                kinds = destination.outputs or tuple(outputs)
                paths = [self.spool.root / outputs[k]["path"] for k in kinds if k in outputs]
                if paths:
                    result = send_files(paths, destination, self.options.ae_title, self.options.network_timeout)
                    status, seconds = result.status, seconds + result.seconds
        except (SendError, OSError) as exc:
            failures = job.send_attempts + 1
            if failures >= self.options.max_send_attempts:
                return self._fail(job, f"outputs not accepted by {dest} after {failures} attempts; last error: {exc}")
            wait = backoff_seconds(failures, self.options.retry_base_seconds, self.options.retry_max_seconds)
            logger.warning(
                "job %d: send failed (%s); try %d of %d in %.1f s",
                job.id,
                exc,
                failures + 1,
                self.options.max_send_attempts,
                wait,
                extra={
                    "event": "send_retry",
                    "job": job.id,
                    "attempt": failures,
                    "wait_s": wait,
                    "error": str(exc),
                },
            )
            return self.queue.send_failed(job.id, str(exc), time.time() + wait)
        done = self.queue.mark_done(job.id, sent_to=dest, sent_status=status)
        logger.info(
            "job %d done: outputs stored by %s",
            job.id,
            dest,
            extra={
                "event": "job_done",
                "job": job.id,
                "study_uid": job.study_uid,
                "version": job.version,
                "outputs": {k: v["sop_instance_uid"] for k, v in (job.outputs or {}).items()},
                "status": f"0x{status:04X}",
                "send_s": round(seconds, 3),
            },
        )
        return done
