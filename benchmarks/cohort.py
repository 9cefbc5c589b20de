"""A cohort three ways: one local process, ``--num-parts 2`` as two processes, and ``--ray`` with 2 actors × 1 thread.

Eight phantoms (seeds 1–8 of the test split, CT 128×128×32 by default) run through ``diffseg predict -i`` with the
same model options and seed in each configuration, every run a fresh process tree:

- local sequential: one process, the engine on all cores (``--threads`` not given);
- ``--num-parts 2``: two processes at once, ``--part-id 0`` and ``1``, one engine thread each;
- Ray: ``--ray`` (a Ray cluster started on this machine for the run, inside a private network namespace since
  Ray binds every interface), ``--ray-actors 2 --ray-cpus-per-actor 1`` (one engine thread per actor).

Figures per configuration: cases per minute (whole process wall, model loads and for Ray the cluster start
included; for Ray also the streaming part alone), per-case latency p50/p95 (local and parts: the case's stage
timings in report.json; Ray: from "read started" to "written", and the same less the wait for a busy actor), Ray's
own overhead per case as the runner measures it (``diffseg.runtime.distributed._figures``: scheduling and
object transfer between the stages, pickling), and peak RSS per worker (``wait4``'s ``ru_maxrss`` for the local
processes, ``getrusage`` inside each Ray worker). The outputs of the three are compared: masks voxel for voxel,
maps as the largest absolute difference.

    python benchmarks/cohort.py                    # about 5 minutes on 2 shared cores
    python benchmarks/cohort.py --size 160x40 --steps 10 --samples 5
"""

from __future__ import annotations

import argparse
import json
import os
import secrets
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
from _common import RESULTS, command_line, load_average, machine_header, write_results

MAPS = ("probability", "uncertainty", "entropy")


def make_cohort(folder: Path, cases: int, size: str) -> list[str]:
    """``cases`` phantoms (seeds 1…) written by a separate process; returns the case ids."""
    xy, _, slices = size.partition("x")
    code = (
        "import sys; from pathlib import Path; from diffseg.runtime.phantom import PhantomOptions, make_phantom, "
        f"write_phantom\nfor s in range(1, {cases} + 1): write_phantom(make_phantom(s, PhantomOptions("
        f"ct_size_xy={int(xy)}, ct_slices={int(slices)})), Path(sys.argv[1]) / f'case{{s}}')"
    )
    subprocess.run([sys.executable, "-c", code, str(folder)], check=True)
    return [f"case{s}" for s in range(1, cases + 1)]


def spawn(cmd: list[str], log: Path, env: dict[str, str] | None = None) -> subprocess.Popen:
    with open(log, "wb") as fh:
        return subprocess.Popen(cmd, stdout=fh, stderr=subprocess.STDOUT, env=env)


def reap(proc: subprocess.Popen, started: float, log: Path) -> dict[str, Any]:
    """Wait for ``proc`` with ``wait4``: wall seconds since ``started``, exit code, peak RSS (its own, and that of
    the descendants it waited for)."""
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    wall = time.perf_counter() - started
    if proc.returncode != 0:
        raise RuntimeError(f"{proc.args} exited with {proc.returncode}: {log.read_text()[-3000:]}")
    return {"wall_s": round(wall, 2), "peak_rss_mb": round(usage.ru_maxrss / 1024, 1)}


def predict(cohort: Path, out: Path, common: list[str], *more: str) -> list[str]:
    return [sys.executable, "-m", "diffseg", "predict", "-i", str(cohort), "-o", str(out), *common, *more]


def case_latencies(out: Path, ids: list[str]) -> list[float]:
    """Each case's stage timings (read … write) from its report.json."""
    return [sum(json.loads((out / c / "report.json").read_text())["timings_s"].values()) for c in ids]


def pcts(values: list[float]) -> dict[str, float]:
    a = np.asarray(values, dtype=float)
    return {"p50": round(float(np.percentile(a, 50)), 3), "p95": round(float(np.percentile(a, 95)), 3)}


def run_local(cohort: Path, work: Path, common: list[str], ids: list[str]) -> dict[str, Any]:
    out, log = work / "local", work / "local.log"
    started = time.perf_counter()
    proc = reap(spawn(predict(cohort, out, common), log), started, log)
    return {
        "config": "local sequential (1 process, engine on all cores)",
        "wall_s": proc["wall_s"],
        "cases_per_minute": round(60 * len(ids) / proc["wall_s"], 2),
        "latency_s": pcts(case_latencies(out, ids)),
        "peak_rss_mb": {"process": proc["peak_rss_mb"]},
        "out": out,
    }


def run_parts(cohort: Path, work: Path, common: list[str], ids: list[str]) -> dict[str, Any]:
    out = work / "parts"
    started = time.perf_counter()
    logs = [work / f"part{k}.log" for k in (0, 1)]
    procs = [
        spawn(predict(cohort, out, common, "--threads", "1", "--num-parts", "2", "--part-id", str(k)), log)
        for k, log in zip((0, 1), logs, strict=True)
    ]
    done = [reap(p, started, log) for p, log in zip(procs, logs, strict=True)]
    wall = max(d["wall_s"] for d in done)
    return {
        "config": "--num-parts 2: two processes at once, 1 engine thread each",
        "wall_s": wall,
        "cases_per_minute": round(60 * len(ids) / wall, 2),
        "latency_s": pcts(case_latencies(out, ids)),
        "peak_rss_mb": {f"part {k}": d["peak_rss_mb"] for k, d in enumerate(done)},
        "out": out,
    }


def run_ray(cohort: Path, work: Path, common: list[str], ids: list[str]) -> dict[str, Any]:
    """``--ray`` in a private network namespace; Ray's files under a temporary folder of this run, removed after."""
    out, log = work / "ray", work / "ray.log"
    ray_tmp = Path(tempfile.mkdtemp(prefix="rb", dir="/tmp"))  # short: Ray's socket paths must fit
    env = dict(os.environ, RAY_TMPDIR=str(ray_tmp), RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=secrets.token_hex(32))
    env["RAY_USAGE_STATS_ENABLED"] = "0"
    cmd = predict(cohort, out, common, "--threads", "1", "--ray", "--ray-actors", "2", "--ray-cpus-per-actor", "1")
    cmd = ["unshare", "-n", "sh", "-c", 'ip link set lo up && exec "$@"', "sh", *cmd]
    started = time.perf_counter()
    try:
        proc = reap(spawn(cmd, log, env), started, log)
    finally:
        left = _processes_under(ray_tmp)
        shutil.rmtree(ray_tmp, ignore_errors=True)
    f = json.loads((out / "ray_run.json").read_text())["figures"]
    per_case = f["per_case"]
    service = [c["latency_s"] - c["actor_wait_s"] for c in per_case]
    workers = {f"{w['role']} pid {w['pid']}": w["peak_rss_mb"] for w in f["workers"]}
    return {
        "config": "--ray (local cluster), 2 actors x 1 CPU x 1 engine thread",
        "wall_s": proc["wall_s"],
        "cases_per_minute": round(60 * len(ids) / proc["wall_s"], 2),
        "streaming_wall_s": f["wall_s"],
        "streaming_cases_per_minute": f["cases_per_minute"],
        "latency_s": pcts([c["latency_s"] for c in per_case]),
        "service_latency_s": pcts(service),
        "ray_overhead_s": f["ray_overhead_s"],
        "ray_overhead_parts_s": f["ray_overhead_parts_s"],
        "actor_wait_s": f["actor_wait_s"],
        "bytes_per_case": {k: v["mean"] for k, v in f["bytes_per_case"].items()},
        "max_cases_in_flight": f["max_cases_in_flight"],
        "cluster_start_s": f["cluster_s"],
        "actor_load_s": [w["load_s"] for w in f["workers"] if "load_s" in w],
        "peak_rss_mb": {"driver (and the Ray processes it waited for)": proc["peak_rss_mb"], **workers},
        "processes_left_after_run": left,
        "out": out,
    }


def _processes_under(folder: Path) -> list[int]:
    """Processes of this run still alive (their command line names its Ray folder); they are ended by id."""
    import signal

    mine = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
        except OSError:
            continue
        if str(folder).encode() in cmdline:
            mine.append(int(pid))
            os.kill(int(pid), signal.SIGKILL)
    return mine


def compare(a: Path, b: Path, ids: list[str]) -> dict[str, Any]:
    """Masks voxel for voxel and the largest map difference between two runs' outputs."""
    from diffseg.runtime.volume import read_volume

    same_masks, worst = 0, 0.0
    for c in ids:
        same_masks += np.array_equal(read_volume(a / c / "mask.nii.gz").array, read_volume(b / c / "mask.nii.gz").array)
        for m in MAPS:
            x, y = (read_volume(d / c / f"{m}.nii.gz").array for d in (a, b))
            worst = max(worst, float(np.abs(x - y).max()))
    return {"masks_identical": f"{same_masks}/{len(ids)}", "max_map_difference": worst}


def markdown(doc: dict[str, Any]) -> str:
    rows = doc["runs"]
    lines = [
        f"Machine: {machine_header(doc['machine'])}; 1-min load average {doc['load_average_before']} before, "
        f"{doc['load_average_after']} after (shared machine).",
        "",
        f"Command: `{doc['command']}`",
        "",
        f"{doc['cases']} phantoms (CT {doc['size']}), backend {doc['backend']}, {doc['steps']} steps × "
        f"{doc['samples']} samples, seed {doc['seed']}; every run a fresh process tree.",
        "",
        "| configuration | wall s | cases/min | latency p50 s | latency p95 s | peak RSS per worker MB |",
        "|---|---|---|---|---|---|",
    ]
    for r in rows:
        rss = ", ".join(f"{k} {v:.0f}" for k, v in r["peak_rss_mb"].items())
        lat = r["latency_s"]
        lines.append(
            f"| {r['config']} | {r['wall_s']:.1f} | {r['cases_per_minute']:.2f} | {lat['p50']:.2f} | {lat['p95']:.2f} "
            f"| {rss} |"
        )
    ray = rows[-1]
    o, parts = ray["ray_overhead_s"], ray["ray_overhead_parts_s"]
    lines += [
        "",
        f"Ray: streaming part {ray['streaming_wall_s']:.1f} s ({ray['streaming_cases_per_minute']:.2f} cases/min); "
        f"cluster start {ray['cluster_start_s']:.1f} s, model load per actor "
        f"{', '.join(f'{s:.2f}' for s in ray['actor_load_s'])} s; latency less the wait for a busy actor p50 "
        f"{ray['service_latency_s']['p50']:.2f} s, p95 {ray['service_latency_s']['p95']:.2f} s.",
        "",
        f"Ray's own overhead per case (measured): mean {o['mean']:.3f} s, p50 {o['p50']:.3f} s, p95 {o['p95']:.3f} s "
        f"= to the actor {parts['to_actor_s']['mean']:.3f} s + to the writer {parts['to_writer_s']['mean']:.3f} s "
        f"+ pickling {parts['serialise_s']['mean']:.3f} s (means); bytes per case through the object store: "
        + ", ".join(f"{k} {v / 1e6:.2f} MB" for k, v in ray["bytes_per_case"].items())
        + f"; at most {ray['max_cases_in_flight']} case(s) between prepared and written at once.",
        "",
        "Outputs: Ray vs --num-parts (both 1 thread per engine): masks identical "
        f"{doc['equal']['ray_vs_parts']['masks_identical']}, largest map difference "
        f"{doc['equal']['ray_vs_parts']['max_map_difference']:.1e}; Ray vs local (all cores): masks identical "
        f"{doc['equal']['ray_vs_local']['masks_identical']}, largest map difference "
        f"{doc['equal']['ray_vs_local']['max_map_difference']:.1e}.",
    ]
    return "\n".join(lines)


def main() -> int:
    from diffseg.runtime.bench import machine_info

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cases", type=int, default=8)
    parser.add_argument("--size", default="128x32", help="CT XYxSLICES of the phantoms (default 128x32)")
    parser.add_argument("--backend", default="onnxruntime")
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--samples", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--work", type=Path, default=None, help="work folder (default: a temporary one, removed)")
    parser.add_argument("--name", default="cohort")
    parser.add_argument("--results", type=Path, default=RESULTS, help="folder of the result files")
    args = parser.parse_args()
    if shutil.which("unshare") is None or subprocess.run(["unshare", "-n", "true"]).returncode != 0:
        print("Ray runs only inside a private network namespace here: 'unshare -n' must work (root)")
        return 2

    work = args.work or Path(tempfile.mkdtemp(prefix="diffseg-cohort-"))
    work.mkdir(parents=True, exist_ok=True)
    common = ["--backend", args.backend, "--steps", str(args.steps), "--samples", str(args.samples)]
    common += ["--seed", str(args.seed), "--no-progress"]
    try:
        ids = make_cohort(work / "cohort", args.cases, args.size)
        doc: dict[str, Any] = {"machine": machine_info(), "load_average_before": load_average()}
        runs = []
        for run in (run_local, run_parts, run_ray):
            runs.append(run(work / "cohort", work, common, ids))
            print(f"{runs[-1]['config']}: {runs[-1]['wall_s']:.1f} s, {runs[-1]['cases_per_minute']:.2f} cases/min")
        local, parts, ray = (r.pop("out") for r in runs)
        doc["equal"] = {"ray_vs_parts": compare(parts, ray, ids), "ray_vs_local": compare(local, ray, ids)}
        doc.update(load_average_after=load_average(), cases=args.cases, size=args.size, backend=args.backend)
        doc.update(steps=args.steps, samples=args.samples, seed=args.seed, runs=runs)
        j, m = write_results(args.name, doc, markdown({**doc, "command": command_line()}), folder=args.results)
        print(f"wrote {j} and {m}")
    finally:
        if args.work is None:
            shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
