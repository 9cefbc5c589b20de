"""Time the DICOM path on a synthetic case: write phantom DICOM, scan + read PET/CT, write/read SEG.

Usage: python benchmarks/bench_dicom_io.py [--ct-size 256] [--ct-slices 64] [--seed 2] [--repeat 3]
Prints one JSON object: the grid sizes and the median seconds of each step over ``--repeat`` runs.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

from diffseg.runtime.dicom import read_pet_ct, read_seg, scan_dicom, write_phantom_dicom, write_seg
from diffseg.runtime.phantom import PhantomOptions, make_phantom


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ct-size", type=int, default=256)
    parser.add_argument("--ct-slices", type=int, default=64)
    parser.add_argument("--seed", type=int, default=2)
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    phantom = make_phantom(args.seed, PhantomOptions(ct_size_xy=args.ct_size, ct_slices=args.ct_slices))
    probability = phantom.mask.with_array(phantom.mask.array.astype("float32") * 0.9)
    times: dict[str, list[float]] = {}

    def timed(name, fn):
        start = time.perf_counter()
        value = fn()
        times.setdefault(name, []).append(time.perf_counter() - start)
        return value

    for _ in range(args.repeat):
        with tempfile.TemporaryDirectory() as tmp:
            out = Path(tmp)
            timed("write_phantom_dicom", lambda out=out: write_phantom_dicom(phantom, out))
            timed("scan_dicom", lambda out=out: scan_dicom(out))
            study = timed("read_pet_ct", lambda out=out: read_pet_ct(out))
            seg = timed("write_seg_binary", lambda out=out, s=study: write_seg(phantom.mask, s, out / "seg.dcm"))
            timed(
                "write_seg_fractional",
                lambda out=out, s=study: write_seg(
                    phantom.mask, s, out / "prob.dcm", probability=probability, fractional=True
                ),
            )
            timed("read_seg", lambda s=study, seg=seg: read_seg(seg, s))
    result = {
        "ct_shape_zyx": list(phantom.ct.shape),
        "pet_shape_zyx": list(phantom.pet.shape),
        "mask_voxels": int(phantom.mask.array.sum()),
        "repeat": args.repeat,
        "median_s": {k: round(statistics.median(v), 3) for k, v in times.items()},
    }
    print(json.dumps(result))


if __name__ == "__main__":
    main()
