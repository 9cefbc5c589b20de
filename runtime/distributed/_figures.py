"""What a Ray run measured, per case and in all: latency, the work inside the stages, Ray's own overhead, memory.

Each stage records its wall start and end (epoch seconds), the pipeline's work inside it and the time spent
pickling and unpickling its payloads (see ``_stages``). From these, per case:

- ``work_s``: read + prepare, sample, postprocess + write (the pipeline's own timings);
- ``to_actor_s``: from the later of "prepared" and "its actor free again" to the actor starting on it: Ray
  Data's scheduling and the transfer of the model input (a transfer hidden behind the actor's previous case,
  thanks to ``max_tasks_in_flight_per_actor``, costs nothing here);
- ``to_writer_s``: from the end of sampling to the write task starting: scheduling and the transfer of the samples
  and the carried case;
- ``serialise_s``: pickling and unpickling the payloads in the three stages;
- ``ray_overhead_s`` = ``to_actor_s`` + ``to_writer_s`` + ``serialise_s`` (+ bookkeeping inside the stages);
- ``actor_wait_s``: time prepared but waiting for a busy actor (queueing, not overhead).

Per run: cases per minute, latency p50/p95, the means of the above, bytes per payload, the most cases alive at
once between "prepared" and "written" (the streaming bound), and each worker's peak RSS by role.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

__all__ = ["case_figures", "summarise"]

STAGES = ("prepare", "sample", "write")


def _stat(values: Sequence[float]) -> dict[str, float] | None:
    if not values:
        return None
    a = np.asarray(values, dtype=float)
    return {
        "mean": round(float(a.mean()), 4),
        "p50": round(float(np.percentile(a, 50)), 4),
        "p95": round(float(np.percentile(a, 95)), 4),
        "max": round(float(a.max()), 4),
    }


def case_figures(records: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """Per finished case (all three stages recorded): latency, work, Ray's overhead split, waiting for an actor.

    Args:
        records: one per case, each with ``case_id`` and ``figures`` (stage name → the stage's record).
    """
    done = [r for r in records if all(s in r["figures"] for s in STAGES) and not r.get("error")]
    free_at: dict[tuple[str, int], float] = {}
    by_actor: dict[tuple[str, int], list[Mapping[str, Any]]] = defaultdict(list)
    for r in done:
        s = r["figures"]["sample"]
        by_actor[(s["node"] or s["host"], s["pid"])].append(r)
    previous: dict[str, float] = {}
    for key, rows in by_actor.items():
        for r in sorted(rows, key=lambda r: r["figures"]["sample"]["start"]):
            previous[r["case_id"]] = free_at.get(key, float("-inf"))
            free_at[key] = r["figures"]["sample"]["end"]
    out = []
    for r in done:
        p, s, w = (r["figures"][k] for k in STAGES)
        ready = max(p["end"], previous[r["case_id"]])
        to_actor = max(0.0, s["start"] - ready)
        to_writer = max(0.0, w["start"] - s["end"])
        serialise = sum(x["serialise_s"] for x in (p, s, w))
        inside = sum(max(0.0, x["end"] - x["start"] - x["work_s"] - x["serialise_s"]) for x in (p, s, w))
        out.append(
            {
                "case_id": r["case_id"],
                "latency_s": w["end"] - p["start"],
                "work_s": p["work_s"] + s["work_s"] + w["work_s"],
                "to_actor_s": to_actor,
                "to_writer_s": to_writer,
                "serialise_s": serialise,
                "bookkeeping_s": inside,
                "ray_overhead_s": to_actor + to_writer + serialise + inside,
                "actor_wait_s": max(0.0, previous[r["case_id"]] - p["end"]),
                "bytes": {**p["bytes"], **s["bytes"]},
            }
        )
    return out


def _max_in_flight(records: Sequence[Mapping[str, Any]]) -> int:
    """The most cases alive at once between the end of prepare and the end of write (a sweep over the intervals)."""
    events = []
    for r in records:
        f = r["figures"]
        if "prepare" in f and "write" in f:
            events += [(f["prepare"]["end"], 1), (f["write"]["end"], -1)]
    alive = peak = 0
    for _, step in sorted(events, key=lambda e: (e[0], e[1])):
        alive += step
        peak = max(peak, alive)
    return peak


def _workers(records: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """Each worker process by role, with the cases it ran and its peak RSS (the largest ``getrusage`` seen)."""
    table: dict[tuple[str, str, int], dict[str, Any]] = {}
    for r in records:
        for role, entry in r["figures"].items():
            key = (role, entry["node"] or entry["host"], entry["pid"])
            row = table.setdefault(
                key, {"role": role, "host": entry["host"], "node": entry["node"], "pid": entry["pid"], "cases": 0}
            )
            row["cases"] += 1
            row["peak_rss_mb"] = max(row.get("peak_rss_mb", 0.0), entry["peak_rss_mb"])
            if "load_s" in entry:
                row["load_s"] = round(entry["load_s"], 3)
    return sorted(table.values(), key=lambda w: (STAGES.index(w["role"]), w["host"], w["pid"]))


def summarise(records: Sequence[Mapping[str, Any]], wall_seconds: float) -> dict[str, Any]:
    """The run's figures (see the module docstring).

    Args:
        records: one per case (``case_id``, ``error``, ``figures``).
        wall_seconds: from the first case handed to Ray to the last result back (cluster start not included).
    """
    per_case = case_figures(records)
    ok = len(per_case)
    workers = _workers(records)
    payloads = sorted({k for c in per_case for k in c["bytes"]})
    return {
        "cases": len(records),
        "ok": ok,
        "failed": sum(1 for r in records if r.get("error")),
        "wall_s": round(wall_seconds, 3),
        "cases_per_minute": round(60.0 * ok / wall_seconds, 3) if wall_seconds > 0 else None,
        "latency_s": _stat([c["latency_s"] for c in per_case]),
        "work_s": _stat([c["work_s"] for c in per_case]),
        "ray_overhead_s": _stat([c["ray_overhead_s"] for c in per_case]),
        "ray_overhead_parts_s": {
            k: _stat([c[k] for c in per_case]) for k in ("to_actor_s", "to_writer_s", "serialise_s", "bookkeeping_s")
        },
        "actor_wait_s": _stat([c["actor_wait_s"] for c in per_case]),
        "bytes_per_case": {k: _stat([c["bytes"][k] for c in per_case if k in c["bytes"]]) for k in payloads},
        "max_cases_in_flight": _max_in_flight(records),
        "peak_rss_mb": {
            role: max((w["peak_rss_mb"] for w in workers if w["role"] == role), default=None) for role in STAGES
        },
        "workers": workers,
        "per_case": per_case,
    }
