"""Manifest ``conditioning``: a model with a condition graph (``image → features``, run once per window) names its
features, and its files hold a condition graph (role ``condition``) of each format and precision of the denoiser's.

Every bad field is refused with a ``ManifestError`` naming it; packages without the section (schema 1 and 2) read
as before, every file a denoiser's. The documents are the shipped default manifest rewritten as schema 2.
"""

from __future__ import annotations

import copy
import json

import pytest

from diffseg.runtime.manifest import ManifestError, load_package, parse_manifest, sha256_of, shipped_models

WHERE = "manifest.json"
FEATURES = ["enc0", "enc1"]


def _entry(path: str, fmt: str, precision: str, role: str | None = None) -> dict:
    entry = {"path": path, "format": fmt, "precision": precision, "sha256": "0" * 64}
    if fmt == "onnx":
        entry["opset"] = 18
    if role is not None:
        entry["role"] = role
    return entry


def conditioned_doc() -> dict:
    """The shipped default as schema 2 with a condition graph: ONNX fp32/fp16 and a program for both graphs."""
    doc = json.loads((shipped_models()["default"] / "manifest.json").read_text())
    doc["schema_version"] = 2
    doc["inputs"] = doc.pop("modalities")
    doc["targets"] = [{"name": "tumour"}]
    doc["activation"] = "sigmoid"
    doc["conditioning"] = {"features": list(FEATURES)}
    doc["files"] = {
        "fp32": _entry("denoiser.onnx", "onnx", "fp32"),
        "fp16": _entry("denoiser.fp16.onnx", "onnx", "fp16"),
        "torch_export": _entry("denoiser.pt2", "torch_export", "fp32", "denoiser"),
        "condition_fp32": _entry("condition.onnx", "onnx", "fp32", "condition"),
        "condition_fp16": _entry("condition.fp16.onnx", "onnx", "fp16", "condition"),
        "condition_torch_export": _entry("condition.pt2", "torch_export", "fp32", "condition"),
    }
    return doc


def test_a_conditioned_manifest_reads_its_features():
    assert parse_manifest(conditioned_doc(), WHERE).conditioning == tuple(FEATURES)
    plain = conditioned_doc()
    del plain["conditioning"]
    plain["files"] = {k: v for k, v in plain["files"].items() if not k.startswith("condition")}
    assert parse_manifest(plain, WHERE).conditioning == ()
    assert load_package("default").manifest.conditioning == ()  # schema 1


def _without(key: str):
    def change(doc: dict) -> None:
        del doc["files"][key]

    return change


def _set(path: str, value):
    def change(doc: dict) -> None:
        *keys, last = path.split(".")
        node = doc
        for k in keys:
            node = node[k]
        node[last] = value

    return change


def _no_section(doc: dict) -> None:
    del doc["conditioning"]


def _schema_1(doc: dict) -> None:
    doc["schema_version"] = 1
    doc["modalities"] = doc.pop("inputs")
    for key in ("targets", "activation"):
        del doc[key]


BAD = [
    (_set("conditioning", ["enc0"]), "conditioning must be an object with exactly the field 'features', got list"),
    (_set("conditioning.shapes", {}), "conditioning must be an object with exactly the field 'features', got ['feat"),
    (_set("conditioning.features", []), "conditioning: field 'features' must list at least one feature name, got []"),
    (_set("conditioning.features", "enc0"), "field 'features' must list at least one feature name, got 'enc0'"),
    (_set("conditioning.features", ["enc0", "1st"]), "conditioning: features[1] must be an identifier"),
    (_set("conditioning.features", ["enc0", "a-b"]), "features[1] must be an identifier (letters, digits, '_'"),
    (_set("conditioning.features", ["enc0", 3]), "features[1] must be an identifier (letters, digits, '_', not st"),
    (_set("conditioning.features", ["enc0", "enc0"]), "conditioning: features[1]: 'enc0' is listed twice"),
    (_set("conditioning.features", ["x"]), "features[0] is 'x', a name the graphs already use"),
    (_set("conditioning.features", ["enc0", "image"]), "features[1] is 'image', a name the graphs already use"),
    (_set("conditioning.features", ["t"]), "features[0] is 't', a name the graphs already use"),
    (_set("files.condition_fp16.role", "encoder"), "files.condition_fp16: role must be one of ['denoiser', 'conditi"),
    (_no_section, "files ['condition_fp16', 'condition_fp32', 'condition_torch_export'] have role 'condition' but"),
    (_without("condition_fp16"), "no condition graph (role 'condition') of format onnx precision fp16; each engine"),
    (_without("condition_torch_export"), "no condition graph (role 'condition') of format torch_export precision fp32"),
    (_set("files.condition_fp32.role", "denoiser"), "conditioning: the denoiser takes features ['enc0', 'enc1'], bu"),
    (_schema_1, "conditioning: a condition graph needs schema_version 2, got 1"),
]


@pytest.mark.parametrize(("change", "message"), BAD, ids=[m[:40] for _, m in BAD])
def test_bad_conditioning_is_named(change, message):
    doc = copy.deepcopy(conditioned_doc())
    change(doc)
    with pytest.raises(ManifestError, match=r"^manifest\.json: ") as err:
        parse_manifest(doc, WHERE)
    assert message in str(err.value)


def test_condition_files_are_found_by_role(tmp_path):
    doc = conditioned_doc()
    for entry in doc["files"].values():  # placeholder bytes: load_package checks sha256, it does not open engines
        (tmp_path / entry["path"]).write_bytes(entry["path"].encode())
        entry["sha256"] = sha256_of(tmp_path / entry["path"])
    (tmp_path / "manifest.json").write_text(json.dumps(doc))
    package = load_package(tmp_path)
    roles = {key: f.role for key, f in package.files.items()}
    assert roles["fp32"] == roles["torch_export"] == "denoiser" and roles["condition_fp16"] == "condition"
    assert package.engine("fp16").path.name == "denoiser.fp16.onnx"
    assert package.engine("fp16", role="condition").path.name == "condition.fp16.onnx"
    assert package.program().path.name == "denoiser.pt2"
    assert package.program("condition").path.name == "condition.pt2"
    with pytest.raises(ManifestError, match=r"no condition graph file at precision 'bf16'; the package has \['fp16', "):
        package.engine("bf16", role="condition")
    with pytest.raises(ValueError, match=r"role must be one of \['denoiser', 'condition'\], got 'encoder'"):
        package.engine("fp32", role="encoder")


def test_a_package_without_conditioning_reads_as_before():
    package = load_package("default")
    assert {f.role for f in package.files.values()} == {"denoiser"}
    assert package.engine("fp32").path.name == "denoiser.onnx" and package.program() is None
    with pytest.raises(ManifestError, match=r"no condition graph file at precision 'fp32'; the package has \[\]"):
        package.engine("fp32", role="condition")
