"""Manifest schema 2: inputs by modality code, normalisations, targets, activation, blending; schema 1 still reads.

Every bad field is refused with a message that names it (as ``test_manifest_errors.py`` does for schema 1), and the
normalisations compute what nnU-Net's do (written out here with numpy on the same array).
"""

from __future__ import annotations

import copy
import json

import numpy as np
import pytest

from diffseg.runtime.manifest import ManifestError, load_package, parse_manifest, shipped_models
from diffseg.runtime.preprocess import Normalisation, normalise, prepare_input
from diffseg.runtime.volume import Volume


def v2_doc() -> dict:
    """The shipped default manifest rewritten as schema 2 (its files, diffusion and defaults kept)."""
    doc = json.loads((shipped_models()["default"] / "manifest.json").read_text())
    doc["schema_version"] = 2
    doc["inputs"] = doc.pop("modalities")
    doc["targets"] = [{"name": "GTVp"}]
    doc["activation"] = "affine"
    return doc


def parsed(doc: dict):
    return parse_manifest(doc, "manifest.json")


def test_schema_1_reads_as_the_same_contract():
    m = load_package("default").manifest
    assert m.modalities == ("PT", "CT") and m.required == ("PT", "CT") and m.reference == "CT"
    assert [t.name for t in m.targets] == ["tumour"] and m.targets[0].type.meaning == "Neoplasm"
    assert (m.activation, m.blending, m.in_channels) == ("affine", "gaussian", 3)
    assert m.normalisation["PT"] == Normalisation(0.0, 20.0, 0.0, 0.2)
    # Our default model keeps the window skipping and retirement its validation justified.
    assert m.defaults["candidate"] == {"modality": "PT", "min_value": 2.0} and m.defaults["retire_after"] == 2


def test_schema_2_parses_inputs_targets_and_options():
    doc = v2_doc()
    doc["inputs"] = [
        {"code": "MR", "sequence": "FLAIR", "normalisation": {"method": "zscore", "region": "nonzero"}},
        {
            "code": "CT",
            "optional": True,
            "missing_value": -1.0,
            "normalisation": {"method": "dataset_zscore", "clip": [-100, 200], "mean": 50, "std": 25},
        },
    ]
    doc["defaults"].pop("candidate")
    doc["targets"] = [{"name": "GTVp", "type": {"scheme": "SCT", "code": "86049000", "meaning": "Neoplasm, Primary"}}]
    doc["activation"], doc["blending"] = "sigmoid", "constant"
    m = parsed(doc)
    assert m.modalities == ("MR", "CT") and m.required == ("MR",) and m.reference == "CT"
    assert m.input_named("MR").name == "MR FLAIR" and m.input_named("CT").missing_value == -1.0
    assert m.normalisation["CT"] == Normalisation(-100.0, 200.0, 50.0, 1 / 25, "dataset_zscore")
    assert (
        m.targets[0].type.code == "86049000" and m.targets[0].category.meaning == "Morphologically abnormal structure"
    )
    assert (m.activation, m.blending) == ("sigmoid", "constant")


BAD_V2 = [
    ("inputs", [], "field 'inputs' must list at least one image input"),
    ("inputs.0.code", "mr", "code must be a DICOM modality code (A-Z, 0-9, '_'; e.g. CT, PT, MR), got 'mr'"),
    ("inputs.1.code", "PT", "inputs[1]: code 'PT' is listed twice"),
    ("inputs.0.optional", "yes", "inputs[0]: field 'optional' must be true or false, got 'yes'"),
    ("inputs.0.colour", 1, "inputs[0]: unknown keys ['colour']"),
    ("inputs.0.normalisation.method", "minmax", "method must be one of ['clip_scale', 'dataset_zscore', 'zscore']"),
    ("inputs.0.normalisation", {"method": "zscore", "clip": [0, 1]}, "(zscore) takes ['method', 'percentiles', 'regi"),
    ("inputs.0.normalisation", {"method": "zscore", "region": "body"}, "region must be one of ['image', 'nonzero']"),
    ("inputs.0.normalisation", {"method": "zscore", "percentiles": [5, 150]}, "percentiles must lie in [0, 100]"),
    ("inputs.0.normalisation", {"method": "dataset_zscore", "clip": [0, 1], "mean": 0, "std": 0}, "std must be > 0"),
    ("inputs.0.normalisation", {"method": "dataset_zscore", "clip": [0, 1]}, "missing ['mean', 'std']"),
    ("inputs.0.normalisation.clip", [5, 1], "clip needs finite low < high, got [5, 1]"),
    ("targets", [], "field 'targets' must list at least one target"),
    ("targets.0.name", "../gtv", "name must be 1-32 characters of letters, digits, '_' or '-'"),
    ("targets.0.type", {"code": "1"}, "targets[0]: type must be an object with exactly scheme, code and meaning"),
    ("targets", [{"name": "a"}, {"name": "a"}], "targets[1]: name 'a' is used twice"),
    ("activation", "tanh", "activation must be one of ['affine', 'sigmoid', 'softmax'], got 'tanh'"),
    ("activation", "softmax", "activation softmax needs at least two targets (over one channel it is always 1)"),
    ("blending", "hann", "blending must be one of ['gaussian', 'constant'], got 'hann'"),
    ("defaults.candidate", {"modality": "MR", "min_value": 1.0}, "candidate rule: modality must be one of the model"),
]


def _set(doc: dict, dotted: str, value) -> None:
    keys = dotted.split(".")
    target = doc
    for key in keys[:-1]:
        target = target[int(key)] if isinstance(target, list) else target[key]
    last = keys[-1]
    if isinstance(target, list):
        target[int(last)] = value
    else:
        target[last] = value


@pytest.mark.parametrize(("field", "value", "message"), BAD_V2, ids=[f"{f}={v!r}" for f, v, _ in BAD_V2])
def test_bad_schema_2_fields_are_named(field, value, message):
    doc = copy.deepcopy(v2_doc())
    _set(doc, field, value)
    with pytest.raises(ManifestError, match=r"manifest\.json") as err:
        parsed(doc)
    assert message in str(err.value)


def test_several_targets_take_one_output_channel_each():
    doc = v2_doc()
    doc["targets"] = [{"name": "GTVp"}, {"name": "GTVn"}]
    doc["activation"] = "softmax"
    m = parsed(doc)
    assert [t.name for t in m.targets] == ["GTVp", "GTVn"] and m.in_channels == 4 and m.output_channels == 2
    doc["diffusion"]["output_channels"], doc["diffusion"]["variance_type"] = 2, "learned_range"
    with pytest.raises(ManifestError, match="a model of 2 targets predicts target c in output channel c"):
        parsed(doc)


def test_every_input_optional_is_refused():
    doc = v2_doc()
    for entry in doc["inputs"]:
        entry["optional"] = True
    with pytest.raises(ManifestError, match="at least one input must be required"):
        parsed(doc)


def test_unknown_schema_is_refused():
    doc = v2_doc()
    doc["schema_version"] = 3
    with pytest.raises(ManifestError, match=r"schema_version 3 is not supported \(this runtime reads \[1, 2\]\)"):
        parsed(doc)


def test_zscore_is_nnunets_and_refuses_what_has_none():
    rng = np.random.default_rng(0)
    raw = np.where(rng.random((12, 10, 8)) < 0.3, 0.0, rng.gamma(4.0, 100.0, (12, 10, 8))).astype(np.float32)
    norm = Normalisation.from_manifest({"method": "zscore", "region": "nonzero", "percentiles": [1, 99]}, "MR")
    got = normalise(raw, norm.fitted(raw))
    inside = raw != 0  # nnU-Net's ZScoreNormalization with use_mask_for_norm, after a percentile clip
    lo, hi = np.percentile(raw[inside].astype(np.float64), [1, 99])
    clipped = np.clip(raw.astype(np.float64), lo, hi)
    want = np.where(inside, (clipped - clipped[inside].mean()) / clipped[inside].std(), 0.0)
    np.testing.assert_allclose(got, want, atol=1e-5)
    whole = Normalisation.from_manifest({"method": "zscore"}, "MR").fitted(raw)
    np.testing.assert_allclose(normalise(raw, whole), (raw - raw.mean()) / raw.std(), atol=1e-5)
    with pytest.raises(ValueError, match="the image is constant"):
        norm.fitted(np.full((4, 4, 4), 7.0, np.float32))
    with pytest.raises(ValueError, match="over the nonzero voxels: the image has none"):
        norm.fitted(np.zeros((4, 4, 4), np.float32))


def _volume(array: np.ndarray) -> Volume:
    return Volume(array.astype(np.float32), (2.0, 2.0, 2.0), (0.0, 0.0, 0.0), (1, 0, 0, 0, 1, 0, 0, 0, 1))


def test_an_absent_optional_input_is_its_missing_value():
    mr = _volume(np.random.default_rng(1).uniform(1, 5, (6, 7, 8)))
    norms = {
        "MR": Normalisation.from_manifest({"method": "zscore"}, "MR"),
        "PT": Normalisation(0.0, 20.0, 0.0, 0.2),
    }
    got = prepare_input({"MR": mr}, ("MR", "PT"), norms, 2.0, reference="MR", absent={"PT": -1.0})
    assert got.image.shape == (2, 6, 7, 8) and np.all(got.image[1] == -1.0)
    assert abs(float(got.image[0].mean())) < 1e-5 and got.grid.shape == (6, 7, 8)
    with pytest.raises(ValueError, match=r"the model needs the inputs \['MR', 'PT'\]; missing \['PT'\]"):
        prepare_input({"MR": mr}, ("MR", "PT"), norms, 2.0, reference="MR")
    with pytest.raises(ValueError, match="the MR image is required: it defines the model grid"):
        prepare_input({"PT": mr}, ("MR", "PT"), norms, 2.0, reference="MR", absent={"MR": 0.0})
