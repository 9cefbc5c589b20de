"""The worker thread: takes jobs from the queue, segments, sends the SEG, retries with back-off.

One job at a time, in queue order. A job is marked ``done`` only after the destination confirmed the SEG; a
send failure schedules the next try after ``backoff_seconds``; a job that cannot be segmented fails with the
reason.
"""

from __future__ import annotations

import logging
import threading
import time
from pathlib import Path

from .jobqueue import Job, JobQueue
from .options import ServeOptions
from .pipeline import SegPipeline, seg_uids
from .sender import SendError, send_file
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

    def _segment(self, job: Job) -> Job:
        if job.runs >= self.options.max_runs:
            reason = f"segmentation started {job.runs} times without finishing (crash or kill during the run?)"
            logger.error("job %d failed: %s", job.id, reason, extra={"event": "job_failed", "job": job.id})
            return self.queue.mark_failed(job.id, reason)
        if self.pipeline is None:
            reason = "no segmentation pipeline loaded in this node"
            logger.error("job %d failed: %s", job.id, reason, extra={"event": "job_failed", "job": job.id})
            return self.queue.mark_failed(job.id, reason)
        instances = self.queue.study_instances(job.study_uid)
        job = self.queue.start_run(job.id, instances)
        resumed = job.runs > 1
        logger.info(
            "job %d: segmenting study (%d instances)%s",
            job.id,
            instances,
            ", resumed after a restart" if resumed else "",
            extra={"event": "job_running", "job": job.id, "study_uid": job.study_uid, "run": job.runs},
        )
        model_version = self.pipeline.model_version
        uids = seg_uids(job.study_uid, model_version)
        out = self.spool.result_path(job.study_uid)
        start = time.perf_counter()
        try:
            figures = self.pipeline.run(self.spool.study_dir(job.study_uid), out, uids)
        except Exception as exc:
            reason = f"segmentation failed: {type(exc).__name__}: {exc}"
            logger.exception(
                "job %d failed: %s",
                job.id,
                reason,
                extra={"event": "job_failed", "job": job.id, "reason": reason},
            )
            return self.queue.mark_failed(job.id, reason)
        logger.info(
            "job %d: SEG written",
            job.id,
            extra={
                "event": "seg_written",
                "job": job.id,
                "seconds": round(time.perf_counter() - start, 3),
                "seg_sop_instance_uid": uids.sop_instance_uid,
                **figures,
            },
        )
        return self.queue.set_sending(
            job.id,
            seg_path=str(out.relative_to(self.spool.root)),
            sop_instance_uid=uids.sop_instance_uid,
            series_instance_uid=uids.series_instance_uid,
            model_version=model_version,
        )

    def _send(self, job: Job) -> Job:
        dest = self.options.destination
        path = self.spool.root / Path(job.seg_path or "")
        if not job.seg_path or not path.is_file():
            reason = f"SEG file {path} is missing; cannot send"
            logger.error("job %d failed: %s", job.id, reason, extra={"event": "job_failed", "job": job.id})
            return self.queue.mark_failed(job.id, reason)
        try:
            result = send_file(path, dest, self.options.ae_title, self.options.network_timeout)
        except (SendError, OSError) as exc:
            failures = job.send_attempts + 1
            if failures >= self.options.max_send_attempts:
                reason = f"SEG not accepted by {dest} after {failures} attempts; last error: {exc}"
                logger.error(
                    "job %d failed: %s",
                    job.id,
                    reason,
                    extra={"event": "job_failed", "job": job.id, "reason": reason},
                )
                return self.queue.mark_failed(job.id, reason)
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
        done = self.queue.mark_done(job.id, sent_to=str(dest), sent_status=result.status)
        logger.info(
            "job %d done: SEG stored by %s",
            job.id,
            dest,
            extra={
                "event": "job_done",
                "job": job.id,
                "study_uid": job.study_uid,
                "seg_sop_instance_uid": job.seg_sop_instance_uid,
                "status": f"0x{result.status:04X}",
                "send_s": round(result.seconds, 3),
            },
        )
        return done
