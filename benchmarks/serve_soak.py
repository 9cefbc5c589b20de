"""Soak test of ``diffseg serve``: Orthanc pushes N phantom studies, each PET late, while the node is SIGKILLed.

Everything runs in a private network namespace (this script moves its thread into one and brings ``lo`` up;
Orthanc binds every interface and is never started outside it). Orthanc (Debian package) holds N synthetic
PET/CT studies; each study's CT series is pushed to the node with ``POST /modalities/node/store``, then its PET
series after a random delay of 0 to ``--pet-delay-windows`` idle windows (as a scanner sends the PET once it is
reconstructed); a push that fails because the node is down is retried, as a router would. Meanwhile the node is
killed with SIGKILL at K random moments and restarted. At the end every study must hold exactly one SEG and one
RTSTRUCT in Orthanc: the script counts them per study through Orthanc's REST API, and the node's ``job_done``
log events across all runs of the node. The spool's size after the soak shows the purge (``keep_done_days``).

Usage (root; apt-get install -y orthanc dcmtk):
    python benchmarks/serve_soak.py [--studies 20] [--kills 3] [--seed 0] [--model default] [--backend auto]

Writes benchmarks/results/serve_soak.json (``--output`` to change) and prints it.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import sys
import tempfile
import threading
import time
import urllib.error
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests" / "runtime" / "serve"))

from dicom_net import NodeProcess, Orthanc, free_port, netns_unavailable_reason, private_netns, wait_for

from diffseg.runtime.dicom import write_phantom_dicom
from diffseg.runtime.environment import cpu_info
from diffseg.runtime.phantom import PhantomOptions, make_phantom

RESULTS = Path(__file__).resolve().parent / "results" / "serve_soak.json"


def _counts(pacs: Orthanc, study_uids: list[str], modality: str) -> dict[str, int]:
    return {uid: len(pacs.find("Instance", {"StudyInstanceUID": uid, "Modality": modality})) for uid in study_uids}


def _series_ids(pacs: Orthanc, study_uid: str) -> dict[str, str]:
    series = pacs.find("Series", {"StudyInstanceUID": study_uid})
    return {s["MainDicomTags"]["Modality"]: s["ID"] for s in series}


def _push(pacs: Orthanc, orthanc_id: str, stop: threading.Event) -> int:
    """Push one series until Orthanc reports every instance sent (the node may be down at any moment)."""
    tries = 0
    while not stop.is_set():
        tries += 1
        try:
            answer = pacs.push_to_node([orthanc_id])
            if answer.get("FailedInstancesCount", 1) == 0:
                break
        except (urllib.error.URLError, ConnectionError, TimeoutError):
            pass
        time.sleep(1.0)
    return tries


def _pusher(pacs: Orthanc, series: list[dict[str, str]], delays: list[float], log: dict, stop: threading.Event) -> None:
    """Each study: its CT, then its PET ``delay`` seconds later."""
    for ids, delay in zip(series, delays, strict=True):
        log["push_tries"][ids["CT"]] = _push(pacs, ids["CT"], stop)
        time.sleep(delay)
        log["push_tries"][ids["PT"]] = _push(pacs, ids["PT"], stop)
    log["pushes_finished_at"] = time.monotonic()


def run(args: argparse.Namespace) -> dict:
    rng = random.Random(args.seed)
    work = Path(tempfile.mkdtemp(prefix="diffseg-soak-"))
    host_ns = os.readlink("/proc/thread-self/ns/net")
    t_setup = time.perf_counter()
    studies: dict[str, Path] = {}
    for seed in range(1, args.studies + 1):
        phantom = make_phantom(seed, PhantomOptions(ct_size_xy=args.ct_size, ct_slices=args.ct_slices))
        info = write_phantom_dicom(phantom, work / "studies" / f"seed{seed}")
        studies[info["study_instance_uid"]] = work / "studies" / f"seed{seed}"
    with private_netns():
        node = NodeProcess(
            work / "node",
            free_port(),
            {
                "idle_seconds": args.idle_seconds,
                "model": args.model,
                "backend": args.backend,
                "keep_done_days": args.keep_done_days,
            },
            worker=True,
        )
        pacs = Orthanc(work / "orthanc", node_aet="NODE", node_port=node.port).start(host_ns)
        node.config["destination"] = {"ae_title": pacs.aet, "host": "127.0.0.1", "port": pacs.dicom_port}
        node.config["retry_base_seconds"] = 0.5
        try:
            for folder in studies.values():
                for path in sorted(folder.rglob("*.dcm")):
                    pacs.upload(path)
            series = [_series_ids(pacs, uid) for uid in studies]
            delays = [rng.uniform(0.0, args.pet_delay_windows * args.idle_seconds) for _ in studies]
            setup_s = time.perf_counter() - t_setup
            node.start()
            start = time.monotonic()
            log: dict = {"push_tries": {}, "pushes_finished_at": None}
            stop = threading.Event()
            pusher = threading.Thread(target=_pusher, args=(pacs, series, delays, log, stop), daemon=True)
            pusher.start()
            kills = []
            for _ in range(args.kills):
                time.sleep(rng.uniform(args.kill_min_s, args.kill_max_s))
                node.kill()
                state = node.status()["summary"]
                kills.append({"at_s": round(time.monotonic() - start, 2), "queue_at_kill": state})
                time.sleep(rng.uniform(0.0, 1.0))
                node.start()
            pusher.join(args.timeout)
            uids = list(studies)

            def all_done():
                status = node.status()
                summary = status["summary"]
                idle = not status["waiting"] and not any(summary[s] for s in ("queued", "running", "sending"))
                return idle and summary["done"] + summary["failed"] >= len(uids) and summary

            final = wait_for(all_done, args.timeout, "every job done or failed", interval=1.0)
            elapsed = time.monotonic() - start
            segs = _counts(pacs, uids, "SEG")
            rtstructs = _counts(pacs, uids, "RTSTRUCT")
            jobs = node.status()["jobs"]
            time.sleep(2.0)  # the purge runs on the node's watcher, every half second
            spool_bytes = sum(f.stat().st_size for f in node.spool.rglob("*") if f.is_file())
            incoming_bytes = sum(f.stat().st_size for f in (node.spool / "incoming").rglob("*") if f.is_file())
            confirmations: dict[str, int] = {}
            for run_no in range(1, node.starts + 1):
                for event in node.events("job_done", start=run_no):
                    confirmations[event["study_uid"]] = confirmations.get(event["study_uid"], 0) + 1
        finally:
            stop_rc = node.stop()
            pacs.stop()
    expected_instances = {uid: len(list(folder.rglob("*.dcm"))) for uid, folder in studies.items()}
    lost = sorted(uid for uid in uids if segs[uid] == 0 or rtstructs[uid] == 0)
    duplicated = sum(max(0, n - 1) for n in [*segs.values(), *rtstructs.values()])
    return {
        "command": "python benchmarks/serve_soak.py " + " ".join(sys.argv[1:]),
        "studies": len(studies),
        "expected_segs": len(studies),
        "segs_in_orthanc": sum(segs.values()),
        "rtstructs_in_orthanc": sum(rtstructs.values()),
        "lost": len(lost),
        "duplicated": duplicated,
        "failed": sum(1 for j in jobs if j["state"] == "failed"),
        "lost_studies": lost,
        "pet_delays_s": [round(d, 2) for d in delays],
        "pet_delays_beyond_idle": sum(1 for d in delays if d > args.idle_seconds),
        "versions_beyond_first": sum(1 for j in jobs if j["version"] > 1),
        "spool_bytes_after": spool_bytes,
        "incoming_bytes_after": incoming_bytes,
        "kills": kills,
        "jobs": final,
        "jobs_resegmented_after_kill": sum(1 for j in jobs if j["runs"] > 1),
        # a job that started before its study had fully arrived (e.g. a kill cut a push short)
        "jobs_on_incomplete_studies": sum(
            1 for j in jobs if j["state"] == "done" and j["instances"] != expected_instances[j["study_uid"]]
        ),
        "seg_sends_confirmed_per_study": sorted(set(confirmations.values())),
        "studies_confirmed_more_than_once": sum(1 for n in confirmations.values() if n > 1),
        "push_tries_total": sum(log["push_tries"].values()),
        "failed_jobs": [{"study_uid": j["study_uid"], "reason": j["reason"]} for j in jobs if j["state"] == "failed"],
        "wall_s": round(elapsed, 1),
        "setup_s": round(setup_s, 1),
        "node_exit_code": stop_rc,
        "phantom": {"ct_size_xy": args.ct_size, "ct_slices": args.ct_slices},
        "node": {
            "idle_seconds": args.idle_seconds,
            "model": args.model,
            "backend": args.backend,
            "keep_done_days": args.keep_done_days,
        },
        "machine": {
            **cpu_info(),
            "cpus": os.cpu_count(),
            "platform": platform.platform(),
            "python": platform.python_version(),
        },
        "seed": args.seed,
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--studies", type=int, default=20)
    parser.add_argument("--kills", type=int, default=3)
    parser.add_argument("--seed", type=int, default=0, help="seed of the kill moments")
    parser.add_argument("--kill-min-s", type=float, default=20.0, help="shortest time between kills")
    parser.add_argument("--kill-max-s", type=float, default=90.0, help="longest time between kills")
    parser.add_argument("--ct-size", type=int, default=128)
    parser.add_argument("--ct-slices", type=int, default=16)
    parser.add_argument("--idle-seconds", type=float, default=2.0)
    parser.add_argument(
        "--pet-delay-windows", type=float, default=3.0, help="each PET comes 0 to this many idle windows after its CT"
    )
    parser.add_argument("--keep-done-days", type=float, default=0.0, help="the node's keep_done_days (0: purge)")
    parser.add_argument("--model", default="default")
    parser.add_argument("--backend", default="auto")
    parser.add_argument("--timeout", type=float, default=1800.0)
    parser.add_argument("--output", type=Path, default=RESULTS)
    args = parser.parse_args()
    reason = netns_unavailable_reason()
    if reason is not None:
        print(f"serve_soak: cannot run: {reason}", file=sys.stderr)
        return 2
    result = run(args)
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))
    return 0 if result["lost"] == result["duplicated"] == result["failed"] == 0 else 1


if __name__ == "__main__":
    raise SystemExit(main())
