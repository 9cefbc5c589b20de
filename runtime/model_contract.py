"""What a model takes and gives (manifest schema 2): its image inputs, its targets and the output activation.

Schema 2 opens the package to any researcher's model:

- ``inputs``: the image channels in order, each an image by modality code (``CT``, ``PT``, ``MR`` with a sequence
  name, any DICOM modality code), required or optional (an optional input that is absent is a channel of
  ``missing_value``), with its normalisation (:class:`~diffseg.runtime.preprocess.Normalisation`);
- ``targets``: K ≥ 1 noisy channels, each with a name and the coded concept a DICOM SEG gives its segment; the
  network predicts target c in output channel c (:mod:`diffseg.runtime.targets` combines their results);
- ``activation``: how a sample's final x maps to a probability: ``affine`` ((x + 1)/2, clipped: the mask lives in
  [−1, 1]), ``sigmoid`` (Diff-UNet's reading of x0) or ``softmax`` over the targets (K ≥ 2);
- ``blending``: ``gaussian`` (MONAI's importance map) or ``constant`` windows.

A schema 1 manifest reads as schema 2: its ``modalities`` are required inputs with clip/offset/scale
normalisation, one target (the tumour) and the ``affine`` activation with Gaussian blending.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from .diffusion_schedule import SAMPLE_ACTIVATIONS
from .preprocess import Normalisation

__all__ = [
    "ACTIVATIONS",
    "BLENDINGS",
    "NEOPLASM",
    "Concept",
    "InputSpec",
    "TargetSpec",
    "parse_inputs",
    "parse_targets",
    "reference_input",
]

ACTIVATIONS = SAMPLE_ACTIVATIONS
BLENDINGS = ("gaussian", "constant")
# A modality code as DICOM writes it (CS: upper case, digits, '_'), up to 16 characters.
_CODE = re.compile(r"^[A-Z0-9_]{1,16}$")
# A target's name names its output files (probability_<name>.nii.gz): a plain file-name part.
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]{0,31}$")


class ContractError(ValueError):
    """An inputs/targets section of a manifest is malformed (the message names the field)."""


@dataclass(frozen=True)
class Concept:
    """A coded concept (scheme, code value, meaning), as DICOM SEG's segmented property category and type."""

    scheme: str
    code: str
    meaning: str

    @classmethod
    def parse(cls, doc: Any, where: str) -> Concept:
        if not isinstance(doc, Mapping) or set(doc) != {"scheme", "code", "meaning"}:
            raise ContractError(f"{where} must be an object with exactly scheme, code and meaning, got {doc!r}")
        if not all(isinstance(v, str) and v.strip() for v in doc.values()):
            raise ContractError(f"{where}: scheme, code and meaning must be non-empty strings, got {doc!r}")
        return cls(doc["scheme"], doc["code"], doc["meaning"])

    def as_dict(self) -> dict[str, str]:
        return {"scheme": self.scheme, "code": self.code, "meaning": self.meaning}


MORPHOLOGICALLY_ABNORMAL = Concept("SCT", "49755003", "Morphologically abnormal structure")
NEOPLASM = Concept("SCT", "108369006", "Neoplasm")


@dataclass(frozen=True)
class InputSpec:
    """One image input of the model.

    Attributes:
        code: the modality code (``CT``, ``PT``, ``MR``, ...): what ``predict --image CODE=PATH`` names.
        name: what messages call it (``MR T1``): the code and the sequence, if any.
        unit: the unit the model expects (``HU``, ``SUVbw``; None: none stated).
        sequence: an MR sequence name (``T1``, ``FLAIR``), or None.
        optional: the model runs without it (its channel is then ``missing_value``, already normalised).
        missing_value: the normalised value of an absent optional input's channel.
        normalisation: how raw values become the channel.
    """

    code: str
    name: str
    unit: str | None
    sequence: str | None
    optional: bool
    missing_value: float
    normalisation: Normalisation


@dataclass(frozen=True)
class TargetSpec:
    """One noisy channel of the model: what it segments.

    Attributes:
        name: a short name (output files ``probability_<name>.nii.gz`` when K > 1).
        category: the DICOM SEG segmented property category.
        type: the DICOM SEG segmented property type.
    """

    name: str
    category: Concept
    type: Concept

    def as_dict(self) -> dict[str, Any]:
        return {"name": self.name, "category": self.category.as_dict(), "type": self.type.as_dict()}


_INPUT_KEYS = {"code", "unit", "sequence", "optional", "missing_value", "normalisation"}
_TARGET_KEYS = {"name", "category", "type"}


def _str_or_none(entry: Mapping[str, Any], key: str, where: str) -> str | None:
    value = entry.get(key)
    if value is not None and (not isinstance(value, str) or not value.strip()):
        raise ContractError(f"{where}: field {key!r} must be a non-empty string, got {value!r}")
    return value


def parse_inputs(doc: Any, where: str) -> tuple[InputSpec, ...]:
    """The ``inputs`` list of a schema 2 manifest (each entry named by its index in messages)."""
    if not isinstance(doc, list) or not doc:
        raise ContractError(f"{where}: field 'inputs' must list at least one image input, got {doc!r}")
    specs: list[InputSpec] = []
    for i, entry in enumerate(doc):
        w = f"{where}: inputs[{i}]"
        if not isinstance(entry, Mapping):
            raise ContractError(f"{w} must be an object, got {type(entry).__name__}")
        unknown = sorted(set(entry) - _INPUT_KEYS)
        if unknown:
            raise ContractError(f"{w}: unknown keys {unknown}; allowed: {sorted(_INPUT_KEYS)}")
        code = entry.get("code")
        if not isinstance(code, str) or not _CODE.match(code):
            raise ContractError(
                f"{w}: code must be a DICOM modality code (A-Z, 0-9, '_'; e.g. CT, PT, MR), got {code!r}"
            )
        if any(s.code == code for s in specs):
            raise ContractError(f"{w}: code {code!r} is listed twice; each modality is one input")
        optional = entry.get("optional", False)
        if not isinstance(optional, bool):
            raise ContractError(f"{w}: field 'optional' must be true or false, got {optional!r}")
        missing = entry.get("missing_value", 0.0)
        if isinstance(missing, bool) or not isinstance(missing, int | float):
            raise ContractError(f"{w}: field 'missing_value' must be a number, got {missing!r}")
        if "normalisation" not in entry:
            raise ContractError(f"{w}: missing field 'normalisation'")
        try:
            norm = Normalisation.from_manifest(entry["normalisation"], code)
        except ValueError as exc:
            raise ContractError(f"{w}: {exc}") from None
        sequence = _str_or_none(entry, "sequence", w)
        name = f"{code} {sequence}" if sequence else code
        specs.append(InputSpec(code, name, _str_or_none(entry, "unit", w), sequence, optional, float(missing), norm))
    if all(s.optional for s in specs):
        raise ContractError(f"{where}: inputs: at least one input must be required (optional false)")
    return tuple(specs)


def parse_targets(doc: Any, where: str) -> tuple[TargetSpec, ...]:
    """The ``targets`` list of a schema 2 manifest (K ≥ 1 noisy channels)."""
    if not isinstance(doc, list) or not doc:
        raise ContractError(f"{where}: field 'targets' must list at least one target, got {doc!r}")
    specs: list[TargetSpec] = []
    for i, entry in enumerate(doc):
        w = f"{where}: targets[{i}]"
        if not isinstance(entry, Mapping):
            raise ContractError(f"{w} must be an object, got {type(entry).__name__}")
        unknown = sorted(set(entry) - _TARGET_KEYS)
        if unknown:
            raise ContractError(f"{w}: unknown keys {unknown}; allowed: {sorted(_TARGET_KEYS)}")
        name = entry.get("name")
        if not isinstance(name, str) or not _NAME.match(name):
            raise ContractError(
                f"{w}: name must be 1-32 characters of letters, digits, '_' or '-', starting with a letter or "
                f"digit (it names output files), got {name!r}"
            )
        if any(s.name == name for s in specs):
            raise ContractError(f"{w}: name {name!r} is used twice")
        category = Concept.parse(entry["category"], f"{w}: category") if "category" in entry else None
        kind = Concept.parse(entry["type"], f"{w}: type") if "type" in entry else None
        specs.append(TargetSpec(name, category or MORPHOLOGICALLY_ABNORMAL, kind or NEOPLASM))
    return tuple(specs)


def check_activation(activation: Any, targets: Sequence[TargetSpec], where: str) -> str:
    if activation not in ACTIVATIONS:
        raise ContractError(f"{where}: activation must be one of {list(ACTIVATIONS)}, got {activation!r}")
    if activation == "softmax" and len(targets) < 2:
        raise ContractError(
            f"{where}: activation softmax needs at least two targets (over one channel it is always 1); use sigmoid "
            "or affine for one target"
        )
    return str(activation)


def engine_output_channels(targets: int, diffusion_output_channels: int) -> int:
    """The denoiser's output channels: the diffusion's (2 with a learned variance) for one target, else one per
    target (target c in channel c)."""
    return targets if targets > 1 else diffusion_output_channels


def reference_input(inputs: Sequence[InputSpec]) -> str:
    """The input whose grid the outputs lie on: the CT if the model takes one, else the first required input."""
    codes = [s.code for s in inputs]
    if "CT" in codes:
        return "CT"
    return next(s.code for s in inputs if not s.optional)


def v1_inputs(modalities: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """A schema 1 ``modalities`` list as schema 2 ``inputs`` (every one required, clip/offset/scale)."""
    out = []
    for entry in modalities:
        doc = dict(entry)
        norm = dict(doc.get("normalisation") or {})
        norm.setdefault("method", "clip_scale")
        doc["normalisation"] = norm
        out.append(doc)
    return out
