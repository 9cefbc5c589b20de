"""Receive throughput of ``diffseg serve``: dcmtk's storescu sends one phantom PET/CT study to a receive-only node.

Each instance is written to the spool with fsync of file and folder and recorded in the SQLite queue before the
node answers, so this measures the cost of that durability on this machine's disk. Runs in a private network
namespace (root; apt-get install -y dcmtk).

Usage: python benchmarks/serve_receive.py [--ct-size 256] [--ct-slices 64] [--repeat 3]
Writes benchmarks/results/serve_receive.json (``--output`` to change) and prints it: instances, MB, median
seconds, instances/s, MB/s.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from dicom_net import NodeProcess, dcmtk, free_port, netns_unavailable_reason, private_netns

from diffseg.runtime.dicom import write_phantom_dicom
from diffseg.runtime.phantom import PhantomOptions, make_phantom


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ct-size", type=int, default=256)
    parser.add_argument("--ct-slices", type=int, default=64)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument(
        "--output", type=Path, default=Path(__file__).resolve().parent / "results" / "serve_receive.json"
    )
    args = parser.parse_args()
    reason = netns_unavailable_reason()
    if reason is not None:
        print(f"serve_receive: cannot run: {reason}", file=sys.stderr)
        return 2
    work = Path(tempfile.mkdtemp(prefix="diffseg-receive-"))
    phantom = make_phantom(args.seed, PhantomOptions(ct_size_xy=args.ct_size, ct_slices=args.ct_slices))
    info = write_phantom_dicom(phantom, work / "study")
    files = [Path(p) for p in info["ct_files"] + info["pet_files"]]
    megabytes = sum(p.stat().st_size for p in files) / 1e6
    seconds = []
    with private_netns():
        for i in range(args.repeat):
            node = NodeProcess(work / f"node{i}", free_port(), {"idle_seconds": 3600.0}).start()
            try:
                start = time.perf_counter()
                result = dcmtk(
                    "storescu",
                    "-aet",
                    "PACS",
                    "-aec",
                    "NODE",
                    "+sd",
                    "+r",
                    "127.0.0.1",
                    str(node.port),
                    str(work / "study"),
                )
                seconds.append(time.perf_counter() - start)
                if result.returncode != 0:
                    raise RuntimeError(f"storescu failed: {result.stderr[-2000:]}")
                stored = node.status()["summary"]["instances"]
                if stored != len(files):
                    raise RuntimeError(f"node recorded {stored} instances, {len(files)} sent")
            finally:
                node.stop()
    median = statistics.median(seconds)
    result = {
        "command": "python benchmarks/serve_receive.py " + " ".join(sys.argv[1:]),
        "instances": len(files),
        "megabytes": round(megabytes, 1),
        "ct_shape_zyx": list(phantom.ct.shape),
        "pet_shape_zyx": list(phantom.pet.shape),
        "seconds": [round(s, 3) for s in seconds],
        "median_s": round(median, 3),
        "instances_per_s": round(len(files) / median, 1),
        "mb_per_s": round(megabytes / median, 1),
        "cpus": os.cpu_count(),
    }
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
