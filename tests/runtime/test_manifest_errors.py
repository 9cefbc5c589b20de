"""A manifest field of the wrong type is a ``ManifestError`` that names the field, the type wanted and the value.

Each case edits one field of a copy of the shipped ``models/default/manifest.json``. Before this check, several gave
a bare ``ValueError`` from ``float()`` with no field (``"overlap": "a"``), an ``AttributeError`` (``"candidate":
"PT"``), a ``TypeError`` text without the field (``"beta_start": "x"``), or were accepted: ``"clip_sample": "yes"``
(any non-empty string is true), ``"eta": "0"``, ``"patch_size": [true, 64, 64]``.
"""

from __future__ import annotations

import copy
import json
import re
import shutil

import pytest

from diffseg.runtime.manifest import ManifestError, load_package, parse_manifest, shipped_models

WHERE = "m.json"


@pytest.fixture(scope="module")
def doc() -> dict:
    return json.loads((shipped_models()["default"] / "manifest.json").read_text())


def _set(doc: dict, path: str, value) -> dict:
    doc = copy.deepcopy(doc)
    *keys, last = path.split(".")
    node = doc
    for k in keys:
        node = node[int(k)] if isinstance(node, list) else node[k]
    if isinstance(node, list):
        node[int(last)] = value
    else:
        node[last] = value
    return doc


CASES = [
    # (field path, value, the message after "m.json: ")
    ("defaults.steps", "ten", "defaults: steps must be an int >= 1, got 'ten'"),
    ("defaults.samples", "5", "defaults: field 'samples' must be an integer, got str '5'"),
    ("defaults.eta", "0", "defaults: field 'eta' must be a number, got str '0'"),
    ("defaults.overlap", "a", "defaults: field 'overlap' must be a number, got str 'a'"),
    ("defaults.overlap", 1.5, "defaults: overlap must be >= 0 and < 1, got 1.5"),
    ("defaults.threshold", None, "defaults: field 'threshold' must be a number, got NoneType None"),
    ("defaults.min_lesion_ml", "0.1", "defaults: field 'min_lesion_ml' must be a number, got str '0.1'"),
    ("defaults.candidate", "PT", "defaults: field 'candidate' must be an object, got str 'PT'"),
    (
        "defaults.candidate",
        {"modality": "PT", "min_value": "x"},
        "defaults: candidate rule: min_value must be a number",
    ),
    ("defaults.retire_after", "2", "defaults: field 'retire_after' must be an integer, got str '2'"),
    ("defaults.sampler", 3, "defaults: sampler must be one of ('ddim', 'ddpm'), got 3"),
    ("defaults", [1], "field 'defaults' must be an object, got list [1]"),
    ("diffusion.num_train_timesteps", "1000", "diffusion: field 'num_train_timesteps' must be an integer, got str"),
    ("diffusion.beta_start", "x", "diffusion: field 'beta_start' must be a number, got str 'x'"),
    ("diffusion.prediction_channel", "0", "diffusion: field 'prediction_channel' must be an integer, got str '0'"),
    ("diffusion.clip_sample", "yes", "diffusion: field 'clip_sample' must be true or false, got str 'yes'"),
    ("diffusion.clip_range", "1", "diffusion: field 'clip_range' must be a number, got str '1'"),
    ("diffusion.output_channels", 1.0, "diffusion: field 'output_channels' must be an integer, got float 1.0"),
    ("modalities", "PT", "field 'modalities' must be a list, got str 'PT'"),
    ("modalities.0", "PT", "modalities[0] must be an object with a field 'code', got str 'PT'"),
    ("modalities.0.normalisation", "x", "modalities[0]: field 'normalisation' must be an object, got str 'x'"),
    ("modalities.0.normalisation.clip", "x", "modalities[0]: normalisation: field 'clip' must be a list, got str"),
    ("modalities.0.normalisation.clip", [0], "modalities[0]: normalisation: field 'clip' must be [low, high], got"),
    ("modalities.0.normalisation.clip", ["a", 1], "modalities[0]: normalisation: clip[0] must be a number, got str"),
    ("modalities.0.normalisation.scale", "x", "modalities[0]: normalisation: field 'scale' must be a number, got"),
    ("modalities.1.normalisation.offset", None, "modalities[1]: normalisation: field 'offset' must be a number, got"),
    ("spacing_mm", "2", "field 'spacing_mm' must be a number, got str '2'"),
    ("spacing_mm", True, "field 'spacing_mm' must be a number, got bool True"),
    ("patch_size", "64", "field 'patch_size' must be a list, got str '64'"),
    ("patch_size", [True, 64, 64], "patch_size must be three positive integers, got [True, 64, 64]"),
    ("channel_order", 1, "field 'channel_order' must be a string, got int 1"),
    ("schema_version", "1", "field 'schema_version' must be an integer, got str '1'"),
]


@pytest.mark.parametrize(("field", "value", "message"), CASES, ids=[f"{f}={v!r}" for f, v, _ in CASES])
def test_wrong_type_names_field_type_and_value(doc, field, value, message):
    with pytest.raises(ManifestError, match=f"^{re.escape(WHERE)}: {re.escape(message)}"):
        parse_manifest(_set(doc, field, value), WHERE)


def test_the_shipped_manifest_passes(doc):
    # Control: the checks refuse only what is wrong (ints are numbers where a float is wanted).
    manifest = parse_manifest(_set(doc, "defaults.eta", 0), WHERE)
    assert manifest.patch_size == (64, 64, 64)


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("files.fp32", "denoiser.onnx", "files.fp32 must be an object with a field 'path', got str 'denoiser.onnx'"),
        ("files.fp32.path", 1, "files.fp32: field 'path' must be a string, got int 1"),
        ("files.fp32.opset", "18", "files.fp32: field 'opset' must be an integer, got str '18'"),
        ("files.fp32.sha256", None, "files.fp32: field 'sha256' must be a string, got NoneType None"),
    ],
)
def test_wrong_type_in_files_is_named(tmp_path, doc, field, value, message):
    package = tmp_path / "model"
    shutil.copytree(shipped_models()["default"], package)
    (package / "manifest.json").write_text(json.dumps(_set(doc, field, value)))
    with pytest.raises(ManifestError, match=re.escape(f"manifest.json: {message}")):
        load_package(package, verify=False)
