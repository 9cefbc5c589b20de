"""``diffseg serve``: run the DICOM node, or report the queue of its spool directory."""

from __future__ import annotations

import argparse
import json
import logging
import signal
import threading
from pathlib import Path

DESCRIPTION = """Run a DICOM node beside a PACS. It accepts C-ECHO and C-STORE from the configured calling AE
titles, writes every instance durably to the spool before answering, closes a study after `idle_seconds`
without new instances, segments it (model loaded once), and C-STOREs the DICOM SEG to the destination,
retrying with exponential back-off. Jobs persist in SPOOL/queue.sqlite: after a crash or restart every
unfinished job resumes and no finished one runs again. Logs are JSON lines in SPOOL/serve.log and on stderr.
SIGTERM stops it cleanly.

  diffseg serve --config node.toml
  diffseg serve --status --spool /var/spool/diffseg

Configuration (TOML or JSON): ae_title, port, bind, allowed_calling_aets, spool_dir, idle_seconds, model,
backend, [destination] ae_title/host/port, and optionally max_send_attempts, retry_base_seconds,
retry_max_seconds, max_runs, network_timeout, maximum_associations. See docs/serve.md."""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", type=Path, help="node configuration file (.toml or .json)")
    parser.add_argument(
        "--no-worker",
        action="store_true",
        help="receive and queue only: load no model, send nothing (jobs wait for a node with a worker)",
    )
    parser.add_argument("--status", action="store_true", help="print the queue of --spool DIR and exit")
    parser.add_argument("--spool", type=Path, help="spool directory to report on (with --status)")
    parser.add_argument("--json", action="store_true", help="with --status: print JSON instead of text")
    parser.add_argument(
        "--stop-grace", type=float, default=10.0, help="seconds to let work finish on SIGTERM (default 10)"
    )


def run(args: argparse.Namespace) -> int:
    from diffseg.runtime.serve import Node, Spool, format_status, load_config, spool_status
    from diffseg.runtime.serve.logs import configure_logging, remove_handlers

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
    handlers = configure_logging(spool.log_path, logging.DEBUG if args.verbose >= 2 else logging.INFO)
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
                "destination": str(options.destination),
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
