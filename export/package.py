"""Build a model package from a trained denoiser: ONNX fp32 + fp16, graph checks, parity, manifest with sha256.

The package is assembled in a temporary folder beside the target and renamed into place only when every check
passed, so a failed export never leaves a half-written package.

A model with a condition graph (``conditioner``: Diff-UNet's image encoder, ``image → features``, run once per
window by the runtime) adds ``condition.onnx``, ``condition.fp16.onnx`` and ``condition.pt2`` (role ``condition``)
and the manifest's ``conditioning`` section; the denoiser takes the features after ``x`` and ``t``, and every check
runs the two together.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from diffseg import __version__
from diffseg.runtime.atomic import atomic_path, write_text_atomic
from diffseg.runtime.manifest import SCHEMA_VERSION, load_package, parse_features, parse_manifest, sha256_of
from diffseg.runtime.model_contract import (
    BLENDINGS,
    check_activation,
    engine_output_channels,
    parse_inputs,
    parse_targets,
)
from diffseg.runtime.verify import EngineError

from .contract_checks import check_condition, check_denoiser, check_patch, refuse_scripted
from .onnx_export import (
    Condition,
    ExportError,
    check_condition_graph,
    check_graph,
    convert_fp16,
    export_condition,
    export_fp32,
    parity,
)

__all__ = ["DEFAULT_SAMPLING", "build_package", "parity_inputs"]

logger = logging.getLogger("diffseg.export")

FP32_LIMIT = 1e-4
FP16_LIMIT = 1e-2

# Window skipping (``candidate``) and retirement (``retire_after``) are off unless a config enables them: they were
# validated on our default model (its config states them), not on anyone else's.
DEFAULT_SAMPLING = {
    "sampler": "ddim",
    "steps": 10,
    "eta": 0.0,
    "timestep_spacing": "linspace",
    "eps_convention": "recompute",
    "samples": 5,
    "overlap": 0.25,
    "threshold": 0.5,
    "min_lesion_ml": 0.1,
    "seed": 0,
}
DEFAULT_TARGETS = ({"name": "tumour"},)


def check_contract(
    inputs: Sequence[Mapping[str, Any]], targets: Sequence[Mapping[str, Any]], activation: str, blending: str
) -> None:
    """The inputs, targets, activation and blending as the runtime reads them (ValueError naming the field)."""
    parse_inputs(list(inputs), "inputs")
    check_activation(activation, parse_targets(list(targets), "targets"), "activation")
    if blending not in BLENDINGS:
        raise ValueError(f"blending must be one of {list(BLENDINGS)}, got {blending!r}")


def parity_inputs(
    in_channels: int,
    patch: Sequence[int],
    num_train_timesteps: int,
    patches: Sequence[np.ndarray] = (),
    seed: int = 0,
) -> list[tuple[np.ndarray, np.ndarray]]:
    """Fresh random inputs at t = 0, T/2, T−1, plus real image patches (``[C_img, *patch]``) with noisy masks."""
    rng = np.random.default_rng(seed)
    T = num_train_timesteps
    ts = np.array([0, T // 2, T - 1], dtype=np.float32)
    out = [(rng.standard_normal((3, in_channels, *patch), dtype=np.float32), ts)]
    for img in patches:
        noisy = rng.standard_normal((3, in_channels - img.shape[0], *patch), dtype=np.float32)
        x = np.concatenate([np.repeat(img[None], 3, axis=0), noisy], axis=1).astype(np.float32)
        out.append((x, ts))
    return out


def _engine_entry(
    path: Path,
    precision: str,
    opset: int,
    in_channels: int,
    patch: Sequence[int],
    out_channels: int,
    features: Mapping[str, Sequence[int]] | None = None,
) -> dict[str, Any]:
    """The manifest entry of a denoiser's ONNX file (``features``: the condition graph's, name → shape after B)."""
    features = features or {}
    return {
        "path": path.name,
        "format": "onnx",
        "precision": precision,
        "opset": opset,
        "inputs": {"x": ["batch", in_channels, *patch], "t": ["batch"], **_batched(features)},
        "input_dtypes": {"x": "float32", "t": "float32", **{f: "float32" for f in features}},
        "outputs": {"y": ["batch", out_channels, *patch]},
        "sha256": sha256_of(path),
    }


def _batched(features: Mapping[str, Sequence[int]]) -> dict[str, list]:
    return {name: ["batch", *map(int, shape)] for name, shape in features.items()}


def _condition_entry(
    path: Path, precision: str, opset: int, image_channels: int, patch: Sequence[int], features: Mapping[str, Any]
) -> dict[str, Any]:
    """The manifest entry of a condition graph's ONNX file."""
    return {
        "path": path.name,
        "format": "onnx",
        "precision": precision,
        "opset": opset,
        "role": "condition",
        "inputs": {"image": ["batch", image_channels, *patch]},
        "input_dtypes": {"image": "float32"},
        "outputs": _batched(features),
        "sha256": sha256_of(path),
    }


def _condition(
    conditioner: torch.nn.Module | None, features: Sequence[str], image_channels: int, targets: int, order: str
) -> Condition | None:
    """The condition graph as the checks see it (None without one); ValueError for a half-given one."""
    if conditioner is None:
        if features:
            raise ValueError(f"features {list(features)} were given without a conditioner; pass both or neither")
        return None
    refuse_scripted(conditioner)
    if not features:
        raise ValueError("features must name the conditioner's outputs (in order) when a conditioner is given")
    names = parse_features(list(features), "features")
    image_first = order.replace("-", "_") == "image_first"
    channels = slice(0, image_channels) if image_first else slice(targets, targets + image_channels)
    return Condition(conditioner, names, channels)


def build_package(
    model: torch.nn.Module,
    out_dir: str | Path,
    *,
    name: str,
    inputs: Sequence[Mapping[str, Any]],
    spacing_mm: float,
    patch_size: Sequence[int],
    channel_order: str,
    diffusion: Mapping[str, Any],
    architecture: Mapping[str, Any],
    targets: Sequence[Mapping[str, Any]] = DEFAULT_TARGETS,
    activation: str = "affine",
    blending: str = "gaussian",
    defaults: Mapping[str, Any] | None = None,
    patches: Sequence[np.ndarray] = (),
    validation: Mapping[str, Any] | None = None,
    provenance: Mapping[str, Any] | None = None,
    opset: int = 18,
    overwrite: bool = False,
    conditioner: torch.nn.Module | None = None,
    features: Sequence[str] = (),
) -> Path:
    """Export ``model`` into a model package at ``out_dir``.

    Args:
        model: a denoiser ``f(x, t)`` (ours, MONAI's, or any module with that contract); with a ``conditioner``,
            ``f(x, t, *features)``.
        inputs: the image inputs in channel order, as the manifest's ``inputs`` (:mod:`diffseg.runtime.model_contract`):
            ``[{"code": "PT", "unit": "SUVbw", "normalisation": {"clip": [lo, hi], "offset": o, "scale": s}},
            {"code": "MR", "sequence": "T1", "normalisation": {"method": "zscore", "region": "nonzero"}}, …]``.
        targets: the noisy channels' names and coded concepts (default: one, the tumour).
        activation: final x → probability, ``affine`` ((x + 1)/2) or ``sigmoid``.
        blending: ``gaussian`` or ``constant`` sliding-window blending.
        defaults: sampling defaults over :data:`DEFAULT_SAMPLING` (window skipping and retirement only if given).
        diffusion: ``num_train_timesteps``, ``beta_schedule`` (+ ``beta_start``/``beta_end``), ``prediction_type``,
            ``output_channels``, ``prediction_channel``, ``clip_sample``, ``clip_range``.
        patches: real image patches ``[C_img, *patch]`` for the parity check, besides random inputs.
        validation: accuracy figures measured elsewhere (kept in the manifest next to the parity report).
        conditioner: the model's condition graph (Diff-UNet's image encoder): ``forward(image)``, image
            ``[B, C_img, *patch]`` (the image channels of x), → a tuple of feature tensors, each ``[B, ...]``,
            that the runtime computes once per window and passes to ``model`` after ``t``. The package then has no
            registry state dict (``denoiser.pt``): the torch backend runs its two programs.
        features: the names of the conditioner's outputs, in order (identifiers; not x, t, y or image).

    Raises:
        ContractError: the model (or its conditioner) does not meet the contract the package declares (checked on
            real inputs at t = 0, T/2, T−1 before anything is written: see :mod:`diffseg.export.contract_checks`).
        ValueError: a conditioner without features or features without a conditioner, or a bad feature name.
        ExportError: torch.export failed in a way diffseg explains, or a graph or parity check failed; the
            message names the model or the engine and the error. Nothing is left behind.
        FileExistsError: ``out_dir`` exists and ``overwrite`` is false.
    """
    out_dir = Path(out_dir)
    if out_dir.exists() and not overwrite:
        raise FileExistsError(f"{out_dir}: already exists (pass overwrite=True / --overwrite)")
    refuse_scripted(model)
    check_contract(inputs, targets, activation, blending)  # the manifest's contract, before minutes of export
    patch = check_patch(patch_size)
    in_channels = len(inputs) + len(targets)
    out_channels = engine_output_channels(len(targets), int(diffusion["output_channels"]))
    condition = _condition(conditioner, features, len(inputs), len(targets), channel_order)
    # The contract on real inputs before anything is written: shape, dtype and channels of y at t = 0, T/2, T−1
    # (after the condition graph's, for a conditioned model).
    check_denoiser(
        model,
        in_channels=in_channels,
        patch=patch,
        output_channels=out_channels,
        prediction_channel=int(diffusion.get("prediction_channel", 0)),
        num_train_timesteps=int(diffusion["num_train_timesteps"]),
        patches=patches,
        noisy_channels=len(targets),
        condition=condition,
    )
    feature_shapes: dict[str, tuple[int, ...]] = {}
    if condition is not None:  # each feature's shape after B, for the manifest
        probe = check_condition(condition, torch.zeros(1, len(inputs), *patch))
        feature_shapes = {name: tuple(f.shape[1:]) for name, f in zip(condition.features, probe, strict=True)}
    names = condition.features if condition is not None else ()
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", dir=out_dir.parent))
    try:
        fp32 = export_fp32(model, in_channels, patch, staging / "denoiser.onnx", opset, condition)
        check_graph(fp32, in_channels, patch, names)
        fp16 = convert_fp16(fp32, staging / "denoiser.fp16.onnx")
        check_graph(fp16, in_channels, patch, names)
        cond32 = cond16 = None
        condition_files: list[tuple[str, Path, str]] = []
        if condition is not None:
            cond32 = export_condition(condition, len(inputs), patch, staging / "condition.onnx", opset)
            check_condition_graph(cond32, len(inputs), patch, names)
            cond16 = convert_fp16(cond32, staging / "condition.fp16.onnx")
            check_condition_graph(cond16, len(inputs), patch, names)
            condition_files = [("condition_fp32", cond32, "fp32"), ("condition_fp16", cond16, "fp16")]
        cases = parity_inputs(in_channels, patch, int(diffusion["num_train_timesteps"]), patches)
        results: list[EngineError] = [  # end to end for a conditioned model: condition graph, then denoiser
            parity(
                "onnx_fp32_vs_torch_fp32", model, fp32, cases, FP32_LIMIT, condition=condition, condition_path=cond32
            ),
            parity(
                "onnx_fp16_vs_torch_fp32", model, fp16, cases, FP16_LIMIT, condition=condition, condition_path=cond16
            ),
        ]
        for r in results:
            logger.info(
                "parity %s: rel %.2e (limit %.0e), max abs %.2e, finite %s",
                r.name,
                r.rel_error,
                r.limit,
                r.max_abs_error,
                r.finite,
            )
        failed = [r for r in results if not r.passed]
        if failed:
            raise ExportError(
                "; ".join(
                    f"{r.name}: output y relative error {r.rel_error:.3e} over limit {r.limit:.0e}"
                    + ("" if r.finite else " and non-finite values (NaN/Inf)")
                    for r in failed
                )
                + " — package not written"
            )
        manifest = {
            "schema_version": SCHEMA_VERSION,
            "name": name,
            "version": str((provenance or {}).get("model_version", "1")),
            "inputs": [dict(m) for m in inputs],
            "targets": [dict(t) for t in targets],
            "activation": activation,
            "blending": blending,
            "spacing_mm": float(spacing_mm),
            "patch_size": list(patch),
            "channel_order": channel_order,
            "diffusion": dict(diffusion),
            "defaults": {**DEFAULT_SAMPLING, **(defaults or {})},
            "architecture": dict(architecture),
            "files": {
                "fp32": _engine_entry(fp32, "fp32", opset, in_channels, patch, out_channels, feature_shapes),
                "fp16": _engine_entry(fp16, "fp16", opset, in_channels, patch, out_channels, feature_shapes),
            },
            "validation": {"parity": {r.name: r.as_dict() for r in results}, **(validation or {})},
            "provenance": {
                "exported_by": f"diffseg {__version__}",
                "torch": torch.__version__,
                **(provenance or {}),
            },
        }
        if condition is None:
            # The weights for the torch backend (reference runs, GPUs without TensorRT). The registry's
            # architectures are f(x, t): a conditioned model runs from its programs alone.
            with atomic_path(staging / "denoiser.pt") as tmp:
                torch.save({k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}, tmp)
            manifest["files"]["torch"] = {
                "path": "denoiser.pt",
                "format": "torch",
                "precision": "fp32",
                "sha256": sha256_of(staging / "denoiser.pt"),
            }
        else:
            manifest["conditioning"] = {"features": list(names)}
            for key, path, precision in condition_files:
                manifest["files"][key] = _condition_entry(path, precision, opset, len(inputs), patch, feature_shapes)
        # The program for the torch backend: runs any architecture, no registry (the state dict serves the registry).
        from .program_export import export_condition_program, export_program

        T = int(diffusion["num_train_timesteps"])
        export_program(model, in_channels, patch, staging / "denoiser.pt2", num_train_timesteps=T, condition=condition)
        manifest["files"]["torch_export"] = {
            "path": "denoiser.pt2",
            "format": "torch_export",
            "precision": "fp32",
            "sha256": sha256_of(staging / "denoiser.pt2"),
        }
        if condition is not None:
            export_condition_program(condition, len(inputs), patch, staging / "condition.pt2")
            manifest["files"]["condition_torch_export"] = {
                "path": "condition.pt2",
                "format": "torch_export",
                "precision": "fp32",
                "role": "condition",
                "sha256": sha256_of(staging / "condition.pt2"),
            }
        parse_manifest(manifest, "manifest")  # the runtime must accept what we write
        write_text_atomic(staging / "manifest.json", json.dumps(manifest, indent=2) + "\n")  # parsed back
        load_package(staging)  # re-read and verify sha256 as the runtime will
        os.chmod(staging, 0o755)  # mkdtemp makes it private; a package is meant to be shared
        if out_dir.exists():
            shutil.rmtree(out_dir)
        os.replace(staging, out_dir)
    finally:
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)
    return out_dir


def inputs_from_config(cfg: Mapping[str, Any]) -> list[dict[str, Any]]:
    """The manifest's ``inputs`` from an export config: its ``inputs`` (schema 2 entries) as given, or a training
    config's ``modalities`` with their ``normalisation`` (clip/offset/scale)."""
    if "inputs" in cfg:
        return [dict(entry) for entry in cfg["inputs"]]
    out = []
    for code in cfg["modalities"]:
        norm = dict(cfg["normalisation"][code])
        unit = norm.pop("unit", "SUVbw" if code == "PT" else "HU")
        out.append({"code": code, "unit": unit, "normalisation": norm})
    return out


def diffusion_from_config(cfg: Mapping[str, Any]) -> dict[str, Any]:
    d = dict(cfg["diffusion"])
    out_ch = int(cfg.get("model", {}).get("out_channels", 1))  # a program's config has no model section
    d.setdefault("output_channels", out_ch)
    d.setdefault("prediction_channel", 0)
    d.setdefault("clip_sample", True)
    d.setdefault("clip_range", 1.0)
    d.setdefault("set_alpha_to_one", True)
    d.setdefault("beta_dtype", "float64")  # training builds β in float64 (export/diffusion.py)
    return d
