"""``diffseg info``: what this installation really has."""

from __future__ import annotations

import argparse
import json

DESCRIPTION = (
    "Print the package version, the compiled extension's build, which backends import and see devices, and which "
    "DICOM transfer syntaxes this installation decodes. With -m PACKAGE: the model's contract instead (inputs and "
    "their normalisation, targets, activation, blending, sampling defaults, engine files, parity report), after "
    "the sha256 check of every file."
)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--json", action="store_true", help="print JSON instead of text")
    parser.add_argument("-m", "--model", help="describe this model package (folder, .zip or shipped name) instead")


def describe_model(model: str) -> dict:
    """The contract of a model package as ``diffseg info -m`` prints it (every file's sha256 checked first)."""
    from diffseg.runtime.manifest import load_package

    package = load_package(model)
    m = package.manifest
    defaults = dict(m.defaults)
    written = m.raw.get("inputs") or m.raw.get("modalities")  # each input's normalisation as the manifest states it
    return {
        "package": str(package.root),
        "name": m.name,
        "version": m.version,
        "schema_version": m.raw["schema_version"],
        "inputs": [
            {
                "code": s.code,
                "name": s.name,
                "unit": s.unit,
                "optional": s.optional,
                "normalisation": w["normalisation"],
            }
            for s, w in zip(m.inputs, written, strict=True)
        ],
        "reference": m.reference,
        "targets": [t.as_dict() for t in m.targets],
        "activation": m.activation,
        "blending": m.blending,
        "patch_size": list(m.patch_size),
        "spacing_mm": m.spacing_mm,
        "channel_order": m.channel_order,
        "diffusion": dict(m.diffusion),
        "defaults": defaults,
        "window_skipping": defaults.get("candidate") or "off",
        "retire_after": defaults.get("retire_after", 0) or "off",
        "files": {
            k: {"path": f.path.name, "format": f.format, "precision": f.precision} for k, f in package.files.items()
        },
        "parity": dict(m.raw.get("validation", {}).get("parity", {})),
    }


def _print_model(d: dict) -> None:
    print(f"model {d['name']} version {d['version']} (schema {d['schema_version']}): {d['package']}, sha256 checked")
    for s in d["inputs"]:
        optional = " (optional)" if s["optional"] else ""
        print(f"  input {s['name']}{optional}: unit {s['unit'] or 'not stated'}; normalisation {s['normalisation']}")
    for t in d["targets"]:
        print(f"  target {t['name']}: {t['type']['meaning']} ({t['type']['scheme']} {t['type']['code']})")
    print(
        f"  outputs on the {d['reference']} grid; activation {d['activation']}; blending {d['blending']}; patch "
        f"{'x'.join(map(str, d['patch_size']))} at {d['spacing_mm']} mm; channels {d['channel_order']}"
    )
    print(f"  diffusion: {d['diffusion']}")
    print(f"  defaults: {d['defaults']}; window skipping {d['window_skipping']}; retirement {d['retire_after']}")
    for key, f in d["files"].items():
        print(f"  file {key}: {f['path']} ({f['format']}, {f['precision']})")
    for name, r in d["parity"].items():
        verdict = "passed" if r.get("passed") else "FAILED"
        print(f"  parity {name}: rel. error {r['rel_error']:.2e} (limit {r['limit']:.0e}) {verdict}")


def run(args: argparse.Namespace) -> int:
    from diffseg.runtime.environment import collect_info

    if args.model is not None:
        described = describe_model(args.model)
        if args.json:
            print(json.dumps(described, indent=2))
        else:
            _print_model(described)
        return 0

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
