"""``diffseg serve``: run the DICOM node, or report the queue of its spool directory."""

from __future__ import annotations

import argparse
import json
import logging
import signal
import threading
from pathlib import Path

DESCRIPTION = """Run a DICOM node beside a PACS. It accepts C-ECHO and C-STORE from the configured calling AE
titles, writes every instance durably to the spool before answering, and segments a study (model loaded once)
once it holds every input the model needs (CT and PET) and was idle for `idle_seconds`; a study missing one waits
up to `max_wait_seconds`. It C-STOREs the DICOM outputs (SEG and RTSTRUCT by default) to the destination,
retrying with exponential back-off. A series that arrives later and changes the inputs gives a new version.
Jobs persist in SPOOL/queue.sqlite: after a crash or restart every unfinished job resumes and no finished one
runs again. Logs are JSON lines in SPOOL/serve.log (rotated) and on stderr. SIGTERM stops it cleanly.

  diffseg serve --config node.toml
  diffseg serve --status --spool /var/spool/diffseg
  diffseg serve requeue STUDY_UID --spool /var/spool/diffseg

Configuration (TOML or JSON): ae_title, port, bind, allowed_calling_aets, spool_dir, idle_seconds, model,
backend, [destination] ae_title/host/port, and optionally max_wait_seconds, dicom_outputs, max_send_attempts,
retry_base_seconds, retry_max_seconds, max_runs, network_timeout, maximum_associations, keep_done_days,
keep_failed_days, max_instance_mb, max_study_mb, min_free_disk_mb, log_max_mb, log_backups, file_mode.
See docs/serve.md."""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "action",
        nargs="*",
        metavar="requeue STUDY_UID",
        help="queue a study again (a new version) in the spool of --spool DIR or --config FILE, and exit",
    )
    parser.add_argument("--config", type=Path, help="node configuration file (.toml or .json)")
    parser.add_argument(
        "--no-worker",
        action="store_true",
        help="receive and queue only: load no model, send nothing (jobs wait for a node with a worker)",
    )
    parser.add_argument("--status", action="store_true", help="print the queue of --spool DIR and exit")
    parser.add_argument("--spool", type=Path, help="spool directory to report on (with --status or requeue)")
    parser.add_argument("--json", action="store_true", help="with --status: print JSON instead of text")
    parser.add_argument(
        "--stop-grace", type=float, default=10.0, help="seconds to let work finish on SIGTERM (default 10)"
    )


def run(args: argparse.Namespace) -> int:
    from diffseg.runtime.serve import Node, Spool, format_status, load_config, spool_status
    from diffseg.runtime.serve.logs import configure_logging, remove_handlers

    if args.action:
        return _requeue(args)
    if args.status:
        if args.spool is None:
            raise ValueError("--status needs --spool DIR")
        status = spool_status(args.spool)
        print(json.dumps(status, indent=2) if args.json else format_status(status))
        return 0
    if args.config is None:
        raise ValueError("--config FILE is required (or --status --spool DIR)")
    if args.stop_grace < 0:
        raise ValueError(f"--stop-grace must be >= 0, got {args.stop_grace}")
    options = load_config(args.config)
    spool = Spool(options.spool_dir).create()
    handlers = configure_logging(
        spool.log_path,
        logging.DEBUG if args.verbose >= 2 else logging.INFO,
        max_mb=options.log_max_mb,
        backups=options.log_backups,
        file_mode=options.file_mode,
    )
    logger = logging.getLogger("diffseg")
    stop = threading.Event()

    def on_signal(signum: int, frame: object) -> None:
        del frame
        logger.info("signal %s: stopping", signal.Signals(signum).name, extra={"event": "signal", "signal": signum})
        stop.set()

    previous = {sig: signal.signal(sig, on_signal) for sig in (signal.SIGTERM, signal.SIGINT)}
    node = Node(options, run_worker=not args.no_worker)
    try:
        try:
            node.start()
        except Exception as exc:
            logger.error("node did not start: %s", exc, extra={"event": "start_failed"})
            raise
        logger.info(
            "node started",
            extra={
                "event": "started",
                "ae_title": options.ae_title,
                "port": node.port,
                "spool": str(options.spool_dir),
                "destinations": [str(d) for d in options.destinations],
                "worker": not args.no_worker,
            },
        )
        while not stop.wait(1.0):
            pass
        node.stop(args.stop_grace)
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        remove_handlers(handlers)
    return 0


def _requeue(args: argparse.Namespace) -> int:
    from diffseg.runtime.serve import check_uid, load_config, open_queue

    if len(args.action) != 2 or args.action[0] != "requeue":
        raise ValueError(f"the only action is 'requeue STUDY_UID', got {' '.join(args.action)!r}")
    study_uid = check_uid("STUDY_UID", args.action[1])
    if args.spool is None and args.config is None:
        raise ValueError("requeue needs --spool DIR or --config FILE (the node's spool)")
    spool = args.spool if args.spool is not None else load_config(args.config).spool_dir
    queue = open_queue(spool)
    try:
        try:
            job = queue.requeue(study_uid)
        except KeyError as exc:
            raise ValueError(exc.args[0]) from None
    finally:
        queue.close()
    print(f"study {study_uid}: job {job.id} (version {job.version}) queued; a running node picks it up")
    return 0
