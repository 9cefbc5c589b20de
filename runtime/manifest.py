"""The model package: ``manifest.json`` (schema 2, or 1) plus its engine files, checked on load.

Schema 2 (:mod:`diffseg.runtime.model_contract`) names the inputs by modality code with their normalisation, the
targets, the output activation and the blending; a schema 1 manifest reads as the same contract (its
``modalities`` as required inputs, one tumour target, the affine activation, Gaussian blending).

A package is a folder or a ``.zip`` of one, or the name of a package shipped under ``diffseg/models`` (``default``).
Every file listed in the manifest is checked against its sha256 before anything is loaded.

A model with a condition graph (Diff-UNet's image encoder, run once per window) declares ``conditioning``:
``{"features": ["f0", "f1"]}``, the names of the condition graph's outputs, which the denoiser takes after ``x``
and ``t`` in that order. Its files are those of the denoiser plus, for each format and precision the denoiser
has, one with ``"role": "condition"`` (the graph ``image [B, C_img, *patch] → features``).
"""

from __future__ import annotations

import hashlib
import json
import math
import re
import tempfile
import zipfile
from collections.abc import Mapping
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

from .diffusion_schedule import CHANNEL_ORDERS, SamplerOptions, SchedulerConfig
from .model_contract import (
    BLENDINGS,
    MORPHOLOGICALLY_ABNORMAL,
    NEOPLASM,
    ContractError,
    InputSpec,
    TargetSpec,
    check_activation,
    engine_output_channels,
    parse_inputs,
    parse_targets,
    reference_input,
)
from .preprocess import CandidateRule, Normalisation

__all__ = [
    "ENGINE_ROLES",
    "SCHEMA_VERSION",
    "EngineFile",
    "Manifest",
    "ManifestError",
    "ModelPackage",
    "load_package",
    "parse_features",
    "sha256_of",
    "shipped_models",
]

SCHEMA_VERSION = 2
READABLE_SCHEMAS = (1, 2)
# "torch": a state dict for an architecture of diffseg's registry; "torch_export": a ``torch.export`` program (.pt2)
# that the torch backend runs with no registry.
ENGINE_FORMATS = ("onnx", "torch", "torch_export")
# What an engine file computes: the denoiser f(x, t, *features), or the condition graph image → features.
ENGINE_ROLES = ("denoiser", "condition")
# A feature names an ONNX input of the denoiser and an output of the condition graph: a plain identifier, not one
# of the names the graphs already use.
_FEATURE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]{0,63}$")
RESERVED_FEATURE_NAMES = ("x", "t", "y", "image")
_NUMBER = (int, float)
# The JSON type each ``defaults`` key must have (the keys allowed). ``_TYPED_HERE`` are typed here (``float()``
# would take a string; ``samples`` is ``num_samples`` in ``SamplerOptions``' messages), the others by
# ``SamplerOptions`` itself; the ranges by the options each builds (``SamplerOptions``, ``WindowOptions``,
# ``PostprocessOptions``, ``CandidateRule``).
DEFAULTS_TYPES: dict[str, type | tuple[type, ...]] = {
    "sampler": str,
    "steps": int,
    "eta": _NUMBER,
    "timestep_spacing": str,
    "eps_convention": str,
    "samples": int,
    "seed": int,
    "overlap": _NUMBER,
    "threshold": _NUMBER,
    "min_lesion_ml": _NUMBER,
    "candidate": dict,
    "retire_after": int,
}
DEFAULTS_KEYS = tuple(DEFAULTS_TYPES)
_TYPED_HERE = ("eta", "samples", "overlap", "threshold", "min_lesion_ml", "candidate", "retire_after")
# ``diffusion``: the type of each ``SchedulerConfig`` field, from its annotation (one source for the keys).
_ANNOTATED = {"int": int, "float": _NUMBER, "str": str, "bool": bool}
DIFFUSION_TYPES = {f.name: _ANNOTATED[str(f.type)] for f in fields(SchedulerConfig) if str(f.type) in _ANNOTATED}
_WORDS = {str: "a string", int: "an integer", float: "a number", bool: "true or false", list: "a list"}
_WORDS[dict] = "an object"


class ManifestError(ValueError):
    """A model package is malformed; the message names the package, the field and the problem."""


def sha256_of(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


@dataclass(frozen=True)
class EngineFile:
    """One engine file of the package (an ONNX graph at a precision, a state dict, a torch.export program).

    Attributes:
        role: ``denoiser`` (``f(x, t, *features)``) or ``condition`` (the condition graph ``image → features``).
    """

    key: str
    path: Path
    format: str  # one of ENGINE_FORMATS
    precision: str
    opset: int | None
    sha256: str
    role: str = "denoiser"  # one of ENGINE_ROLES


@dataclass(frozen=True)
class Manifest:
    """The validated contents of ``manifest.json`` (``raw`` keeps the whole document).

    Attributes:
        inputs: the image inputs in channel order (:class:`~diffseg.runtime.model_contract.InputSpec`).
        targets: the K noisy channels (:class:`~diffseg.runtime.model_contract.TargetSpec`).
        activation: final x → probability (``affine``, ``sigmoid``, ``softmax``).
        blending: the sliding window's importance map (``gaussian``, ``constant``).
    """

    name: str
    version: str
    inputs: tuple[InputSpec, ...]
    targets: tuple[TargetSpec, ...]
    activation: str
    blending: str
    spacing_mm: float
    patch_size: tuple[int, int, int]
    channel_order: str
    diffusion: Mapping[str, Any]
    defaults: Mapping[str, Any]
    raw: Mapping[str, Any]

    @property
    def modalities(self) -> tuple[str, ...]:
        """The inputs' modality codes, in channel order."""
        return tuple(s.code for s in self.inputs)

    @property
    def normalisation(self) -> dict[str, Normalisation]:
        return {s.code: s.normalisation for s in self.inputs}

    @property
    def required(self) -> tuple[str, ...]:
        """The codes of the inputs the model cannot run without."""
        return tuple(s.code for s in self.inputs if not s.optional)

    @property
    def reference(self) -> str:
        """The input whose grid the outputs lie on (the CT if any, else the first required input)."""
        return reference_input(self.inputs)

    @property
    def conditioning(self) -> tuple[str, ...]:
        """The condition graph's features in the order the denoiser takes them after (x, t); () without one."""
        section = self.raw.get("conditioning")
        return tuple(section["features"]) if isinstance(section, Mapping) else ()

    def input_named(self, code: str) -> InputSpec:
        return next(s for s in self.inputs if s.code == code)

    @property
    def in_channels(self) -> int:
        return len(self.inputs) + len(self.targets)

    @property
    def output_channels(self) -> int:
        """The engine's output channels (:func:`~diffseg.runtime.model_contract.engine_output_channels`)."""
        return engine_output_channels(len(self.targets), int(self.diffusion["output_channels"]))


@dataclass(frozen=True)
class ModelPackage:
    root: Path
    manifest: Manifest
    files: Mapping[str, EngineFile]

    def engine(self, precision: str, role: str = "denoiser") -> EngineFile:
        """The ONNX file of ``role`` (``denoiser`` or ``condition``) at ``precision``.

        Raises:
            ValueError: ``role`` is not one of :data:`ENGINE_ROLES`.
            ManifestError: the package has no such file.
        """
        if role not in ENGINE_ROLES:
            raise ValueError(f"role must be one of {list(ENGINE_ROLES)}, got {role!r}")
        for f in self.files.values():
            if f.format == "onnx" and f.precision == precision and f.role == role:
                return f
        have = sorted(f.precision for f in self.files.values() if f.format == "onnx" and f.role == role)
        what = "engine file" if role == "denoiser" else "condition graph file"
        raise ManifestError(f"{self.root}: no {what} at precision {precision!r}; the package has {have}")

    def program(self, role: str = "denoiser") -> EngineFile | None:
        """The ``torch_export`` program of ``role``, or None when the package has none."""
        return next((f for f in self.files.values() if f.format == "torch_export" and f.role == role), None)


def _typed(value: Any, what: str, kind: type | tuple[type, ...]) -> Any:
    """``value`` when it has the JSON type ``kind`` (an int is a number; a bool is neither); else ManifestError."""
    kinds = kind if isinstance(kind, tuple) else (kind,)
    if not isinstance(value, kinds) or (isinstance(value, bool) and bool not in kinds):
        named = [k for k in kinds if not (k is int and float in kinds)]  # an int is a number
        words = " or ".join(_WORDS.get(k, k.__name__) for k in named)
        raise ManifestError(f"{what} must be {words}, got {type(value).__name__} {value!r}")
    return value


def _need(doc: Any, key: str, where: str, kind: type | tuple[type, ...]) -> Any:
    """The field ``key`` of the object ``doc`` (``where`` in messages), of JSON type ``kind``; else ManifestError."""
    if not isinstance(doc, Mapping):
        raise ManifestError(f"{where} must be an object with a field {key!r}, got {type(doc).__name__} {doc!r}")
    if key not in doc:
        raise ManifestError(f"{where}: missing field {key!r}")
    return _typed(doc[key], f"{where}: field {key!r}", kind)


def _check_types(section: Mapping[str, Any], where: str, types: Mapping[str, type | tuple[type, ...]]) -> None:
    for key, value in section.items():
        if key in types:
            _typed(value, f"{where}: field {key!r}", types[key])


def _check_defaults(
    defaults: Mapping[str, Any], w: str, modalities: tuple[str, ...], patch: tuple[int, ...]
) -> Mapping[str, Any]:
    """The ``defaults`` section: known keys of their types, their ranges through the options they build."""
    from .postprocess import PostprocessOptions
    from .sliding_window import WindowOptions

    unknown = sorted(set(defaults) - set(DEFAULTS_KEYS))
    if unknown:
        raise ManifestError(f"{w}: unknown keys {unknown}; allowed: {list(DEFAULTS_KEYS)}")
    for key in ("sampler", "steps", "samples", "overlap", "threshold", "min_lesion_ml"):
        if key not in defaults:
            raise ManifestError(f"{w}: missing field {key!r}")
    _check_types(defaults, w, {key: DEFAULTS_TYPES[key] for key in _TYPED_HERE})
    try:
        SamplerOptions(
            sampler=defaults["sampler"],
            steps=defaults["steps"],
            eta=float(defaults.get("eta", 0.0)),
            timestep_spacing=defaults.get("timestep_spacing", "leading"),
            eps_convention=defaults.get("eps_convention", "raw"),
            num_samples=defaults["samples"],
            seed=defaults.get("seed", 0),
        )
        WindowOptions(patch_size=patch, overlap=float(defaults["overlap"]))
        PostprocessOptions(threshold=float(defaults["threshold"]), min_lesion_ml=float(defaults["min_lesion_ml"]))
        CandidateRule.from_manifest(defaults.get("candidate"), modalities)
    except (TypeError, ValueError) as exc:
        raise ManifestError(f"{w}: {exc}") from None
    retire = defaults.get("retire_after", 0)
    if retire < 0:
        raise ManifestError(f"{w}: retire_after must be an int >= 0 (0 = off), got {retire!r}")
    return defaults


def _normalisation(entry: Mapping[str, Any], code: str, w: str) -> Normalisation:
    """A modality's ``normalisation``: each field of its type here, the rest by ``Normalisation`` itself."""
    norm = _need(entry, "normalisation", w, dict)
    wn = f"{w}: normalisation"
    clip = _need(norm, "clip", wn, list)
    if len(clip) != 2:
        raise ManifestError(f"{wn}: field 'clip' must be [low, high], got {clip!r}")
    for i, bound in enumerate(clip):
        _typed(bound, f"{wn}: clip[{i}]", _NUMBER)
    _need(norm, "offset", wn, _NUMBER)
    _need(norm, "scale", wn, _NUMBER)
    try:
        return Normalisation.from_manifest(norm, code)
    except ValueError as exc:
        raise ManifestError(f"{w}: {exc}") from None


def _v1_inputs(doc: Mapping[str, Any], where: str) -> tuple[InputSpec, ...]:
    """Schema 1's ``modalities``: CT and PT only, each with clip/offset/scale, all required."""
    modalities_doc = _need(doc, "modalities", where, list)
    if not modalities_doc:
        raise ManifestError(f"{where}: field 'modalities' must list at least one modality")
    specs: list[InputSpec] = []
    for i, entry in enumerate(modalities_doc):
        w = f"{where}: modalities[{i}]"
        code = _need(entry, "code", w, str)
        if code not in ("CT", "PT"):
            raise ManifestError(f"{w}: code must be CT or PT, got {code!r}")
        norm = _normalisation(entry, code, w)
        specs.append(InputSpec(code, code, entry.get("unit"), None, False, 0.0, norm))
    return tuple(specs)


def _contract(doc: Mapping[str, Any], version: int, where: str) -> tuple[tuple[InputSpec, ...], tuple, str, str]:
    """(inputs, targets, activation, blending) of either schema."""
    if version == 1:
        return _v1_inputs(doc, where), (TargetSpec("tumour", MORPHOLOGICALLY_ABNORMAL, NEOPLASM),), "affine", "gaussian"
    try:
        inputs = parse_inputs(_need(doc, "inputs", where, list), where)
        targets = parse_targets(_need(doc, "targets", where, list), where)
        activation = check_activation(_need(doc, "activation", where, str), targets, where)
    except ContractError as exc:
        raise ManifestError(str(exc)) from None
    blending = doc.get("blending", "gaussian")
    if blending not in BLENDINGS:
        raise ManifestError(f"{where}: blending must be one of {list(BLENDINGS)}, got {blending!r}")
    return inputs, targets, activation, blending


def _conditioning(doc: Mapping[str, Any], version: int, where: str) -> tuple[str, ...]:
    """The optional ``conditioning`` section: ``{"features": [names]}`` (schema 2 only)."""
    if "conditioning" not in doc:
        return ()
    w = f"{where}: conditioning"
    if version < 2:
        raise ManifestError(f"{w}: a condition graph needs schema_version 2, got {version}")
    section = doc["conditioning"]
    if not isinstance(section, Mapping) or set(section) != {"features"}:
        got = sorted(section) if isinstance(section, Mapping) else f"{type(section).__name__} {section!r}"
        raise ManifestError(f"{w} must be an object with exactly the field 'features', got {got}")
    return parse_features(section["features"], w)


def parse_features(features: Any, where: str) -> tuple[str, ...]:
    """A condition graph's feature names: a non-empty list of unique identifiers, none of ``x``, ``t``, ``y``,
    ``image`` (ManifestError naming ``where``, the entry and the value)."""
    if not isinstance(features, list | tuple) or not features:
        raise ManifestError(f"{where}: field 'features' must list at least one feature name, got {features!r}")
    for i, name in enumerate(features):
        if not isinstance(name, str) or not _FEATURE.match(name):
            raise ManifestError(
                f"{where}: features[{i}] must be an identifier (letters, digits, '_', not starting with a digit; up "
                f"to 64 characters), got {name!r}"
            )
        if name in RESERVED_FEATURE_NAMES:
            raise ManifestError(
                f"{where}: features[{i}] is {name!r}, a name the graphs already use ({list(RESERVED_FEATURE_NAMES)})"
            )
        if name in features[:i]:
            raise ManifestError(f"{where}: features[{i}]: {name!r} is listed twice")
    return tuple(features)


def _check_roles(files: Mapping[str, Any], features: tuple[str, ...], where: str) -> None:
    """Each file's ``role``; a condition file of each format and precision of the denoiser's when the manifest
    declares ``conditioning``, and none when it does not."""
    kinds: dict[str, set[tuple[str, str]]] = {role: set() for role in ENGINE_ROLES}
    for key, entry in files.items():
        if not isinstance(entry, Mapping):
            continue  # load_package names it
        role = entry.get("role", "denoiser")
        if role not in ENGINE_ROLES:
            raise ManifestError(f"{where}: files.{key}: role must be one of {list(ENGINE_ROLES)}, got {role!r}")
        kinds[role].add((str(entry.get("format", "onnx")), str(entry.get("precision"))))
    if kinds["condition"] and not features:
        names = sorted(k for k, e in files.items() if isinstance(e, Mapping) and e.get("role") == "condition")
        raise ManifestError(
            f"{where}: files {names} have role 'condition' but the manifest has no 'conditioning' section naming "
            f"the features they compute"
        )
    missing = sorted(kinds["denoiser"] - kinds["condition"]) if features else []
    if missing:
        raise ManifestError(
            f"{where}: conditioning: the denoiser takes features {list(features)}, but files has no condition graph "
            f"(role 'condition') of "
            + ", ".join(f"format {fmt} precision {prec}" for fmt, prec in missing)
            + "; each engine of the denoiser needs its condition graph"
        )


def parse_manifest(doc: Mapping[str, Any], where: str) -> Manifest:
    """Validate a manifest document (schema 1 or 2); each bad field raises ``ManifestError`` naming it."""
    version = _need(doc, "schema_version", where, int)
    if version not in READABLE_SCHEMAS:
        raise ManifestError(
            f"{where}: schema_version {version} is not supported (this runtime reads {list(READABLE_SCHEMAS)})"
        )
    inputs, targets, activation, blending = _contract(doc, version, where)
    modalities = tuple(s.code for s in inputs)
    spacing = float(_need(doc, "spacing_mm", where, _NUMBER))
    if not (math.isfinite(spacing) and spacing > 0):
        raise ManifestError(f"{where}: spacing_mm must be > 0, got {spacing}")
    patch = _need(doc, "patch_size", where, list)
    if len(patch) != 3 or not all(isinstance(p, int) and not isinstance(p, bool) and p > 0 for p in patch):
        raise ManifestError(f"{where}: patch_size must be three positive integers, got {patch}")
    order = _need(doc, "channel_order", where, str)
    if order.replace("-", "_") not in CHANNEL_ORDERS:
        raise ManifestError(f"{where}: channel_order must be one of {CHANNEL_ORDERS} (or with '-'), got {order!r}")
    diff = _need(doc, "diffusion", where, dict)
    _check_types(diff, f"{where}: diffusion", DIFFUSION_TYPES)
    try:  # the scheduler's own check: one source of truth for keys, enums and ranges
        config = SchedulerConfig.from_dict(diff)
    except (TypeError, ValueError) as exc:
        raise ManifestError(f"{where}: diffusion: {exc}") from None
    if len(targets) > 1 and (config.output_channels != 1 or config.prediction_channel != 0):
        raise ManifestError(
            f"{where}: diffusion: a model of {len(targets)} targets predicts target c in output channel c "
            f"(output_channels 1 per target, prediction_channel 0, no learned variance); got output_channels "
            f"{config.output_channels}, prediction_channel {config.prediction_channel}"
        )
    defaults = _check_defaults(_need(doc, "defaults", where, dict), f"{where}: defaults", modalities, patch)
    features = _conditioning(doc, version, where)
    _check_roles(_need(doc, "files", where, dict), features, where)
    return Manifest(
        name=_need(doc, "name", where, str),
        version=str(_need(doc, "version", where, str)),
        inputs=inputs,
        targets=targets,
        activation=activation,
        blending=blending,
        spacing_mm=spacing,
        patch_size=tuple(patch),
        channel_order=order,
        diffusion=diff,
        defaults=defaults,
        raw=dict(doc),
    )  # type: ignore[arg-type]


def shipped_models() -> dict[str, Path]:
    """Packages shipped with diffseg, by name."""
    root = Path(__file__).resolve().parent.parent / "models"
    return {p.name: p for p in sorted(root.iterdir()) if (p / "manifest.json").is_file()} if root.is_dir() else {}


_EXTRACTED: dict[Path, tempfile.TemporaryDirectory] = {}


def _resolve(model: str | Path) -> Path:
    path = Path(model)
    if not path.exists():
        shipped = shipped_models()
        if str(model) in shipped:
            return shipped[str(model)]
        raise FileNotFoundError(
            f"{model}: no such model package (folder or .zip); shipped models: {sorted(shipped) or 'none'}"
        )
    if path.is_file() and path.suffix == ".zip":
        if path not in _EXTRACTED:
            tmp = tempfile.TemporaryDirectory(prefix="diffseg-model-")
            with zipfile.ZipFile(path) as zf:
                for info in zf.infolist():  # never write outside the extraction folder
                    target = (Path(tmp.name) / info.filename).resolve()
                    if not str(target).startswith(str(Path(tmp.name).resolve())):
                        raise ManifestError(f"{path}: member {info.filename!r} points outside the package")
                zf.extractall(tmp.name)
            _EXTRACTED[path] = tmp
        root = Path(_EXTRACTED[path].name)
        inner = [p.parent for p in root.rglob("manifest.json")]
        if len(inner) != 1:
            raise ManifestError(f"{path}: the zip must hold exactly one manifest.json, found {len(inner)}")
        return inner[0]
    return path


def load_package(model: str | Path, verify: bool = True) -> ModelPackage:
    """Load and validate a model package (a folder, a .zip, or a shipped name such as ``default``).

    Raises:
        FileNotFoundError: no such package or a listed file is missing.
        ManifestError: the manifest is malformed or a file's sha256 does not match.
    """
    root = _resolve(model)
    mpath = root / "manifest.json"
    if not mpath.is_file():
        raise FileNotFoundError(f"{root}: no manifest.json (is this a model package?)")
    try:
        doc = json.loads(mpath.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise ManifestError(f"{mpath}: not valid JSON ({exc})") from None
    manifest = parse_manifest(doc, str(mpath))
    files = {}
    for key, entry in manifest.raw["files"].items():
        w = f"{mpath}: files.{key}"
        rel = _need(entry, "path", w, str)
        if Path(rel).is_absolute() or ".." in Path(rel).parts:
            raise ManifestError(f"{w}: path must stay inside the package, got {rel!r}")
        fpath = root / rel
        if not fpath.is_file():
            raise FileNotFoundError(f"{w}: file {fpath} is missing")
        digest = _need(entry, "sha256", w, str)
        if verify and sha256_of(fpath) != digest:
            raise ManifestError(f"{w}: sha256 of {fpath.name} does not match the manifest (file altered or corrupt)")
        fmt = entry.get("format", "onnx")
        if fmt not in ENGINE_FORMATS:
            raise ManifestError(f"{w}: format must be one of {list(ENGINE_FORMATS)}, got {fmt!r}")
        opset = int(_need(entry, "opset", w, int)) if fmt == "onnx" else None
        precision = _need(entry, "precision", w, str)
        files[key] = EngineFile(key, fpath, fmt, precision, opset, digest, entry.get("role", "denoiser"))
    return ModelPackage(root, manifest, files)
