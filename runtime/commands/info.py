"""``diffseg info``: what this installation really has."""

from __future__ import annotations

import argparse
import json

DESCRIPTION = (
    "Print the package version, the compiled extension's build, which backends import and see devices, and which "
    "DICOM transfer syntaxes this installation decodes."
)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--json", action="store_true", help="print JSON instead of text")


def run(args: argparse.Namespace) -> int:
    from diffseg.runtime.environment import collect_info

    info = collect_info()
    if args.json:
        print(json.dumps(info, indent=2))
        return 0
    print(f"diffseg {info['version']}  (python {info['python']}, numpy {info['numpy']})")
    ext = info["extension"]
    if "error" in ext:
        print(f"extension: NOT AVAILABLE ({ext['error']})")
    else:
        print(
            f"extension: {ext['compiler']}, flags '{ext['cxx_flags']}', SIMD {ext['simd']}, "
            f"OpenMP {'yes' if ext['openmp'] else 'no'} ({ext['openmp_max_threads']} threads)"
        )
    print(
        f"cpu: {info['cpu']['model']} ({info['cpu']['logical_cores']} logical cores), "
        f"flags: {', '.join(info['cpu']['isa']) or 'baseline'}"
    )
    print("backends:")
    for name, b in info["backends"].items():
        state = f"{b['version']}; devices: {', '.join(b['devices'])}" if b["available"] else f"missing ({b['reason']})"
        print(f"  {name:12s} {state}")
    print("engines (diffseg --backend):")
    for name, e in info["engines"].items():
        runs = [p for p, why in e["precisions"].items() if why is None]
        state = f"runs {', '.join(runs) or 'no precision here'}" if e["available"] else f"unavailable ({e['reason']})"
        print(f"  {name:22s} {state}; device loop: {'yes' if e.get('device_ops') else 'no'}")
    _print_transfer_syntaxes(info["transfer_syntaxes"])
    return 0


def _print_transfer_syntaxes(syntaxes: list[dict] | dict) -> None:
    print("DICOM transfer syntaxes (decoded here; diffseg serve accepts exactly these):")
    if isinstance(syntaxes, dict):
        print(f"  cannot tell: {syntaxes['error']}")
        return
    for s in syntaxes:
        state = f"yes ({', '.join(s['plugins'])})" if s["decodable"] else "no"
        kind = "lossless" if s["lossless"] else "lossy"
        line = f"  {s['uid']:24s} {kind:8s} {state:20s} {s['name']}"
        if not s["decodable"]:
            line += f"; needs {' or '.join(s['missing']) or 'a decoder plugin'}"
        if s["note"]:
            line += f" [{s['note']}]"
        print(line)
