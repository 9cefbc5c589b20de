"""Build a model package from a trained denoiser: ONNX fp32 + fp16, graph checks, parity, manifest with sha256.

The package is assembled in a temporary folder beside the target and renamed into place only when every check
passed, so a failed export never leaves a half-written package.
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
from diffseg.runtime.manifest import SCHEMA_VERSION, load_package, parse_manifest, sha256_of
from diffseg.runtime.model_contract import (
    BLENDINGS,
    check_activation,
    engine_output_channels,
    parse_inputs,
    parse_targets,
)
from diffseg.runtime.verify import EngineError

from .contract_checks import check_denoiser, check_patch, refuse_scripted
from .onnx_export import ExportError, check_graph, convert_fp16, export_fp32, parity

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
    path: Path, precision: str, opset: int, in_channels: int, patch: Sequence[int], out_channels: int
) -> dict[str, Any]:
    return {
        "path": path.name,
        "format": "onnx",
        "precision": precision,
        "opset": opset,
        "inputs": {"x": ["batch", in_channels, *patch], "t": ["batch"]},
        "input_dtypes": {"x": "float32", "t": "float32"},
        "outputs": {"y": ["batch", out_channels, *patch]},
        "sha256": sha256_of(path),
    }


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
) -> Path:
    """Export ``model`` into a model package at ``out_dir``.

    Args:
        model: a denoiser ``f(x, t)`` (ours, MONAI's, or any module with that contract).
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

    Raises:
        ContractError: the model does not meet the contract the package declares (checked on real inputs at
            t = 0, T/2, T−1 before anything is written: see :mod:`diffseg.export.contract_checks`).
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
    # The contract on real inputs before anything is written: shape, dtype and channels of y at t = 0, T/2, T−1.
    check_denoiser(
        model,
        in_channels=in_channels,
        patch=patch,
        output_channels=out_channels,
        prediction_channel=int(diffusion.get("prediction_channel", 0)),
        num_train_timesteps=int(diffusion["num_train_timesteps"]),
        patches=patches,
        noisy_channels=len(targets),
    )
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", dir=out_dir.parent))
    try:
        fp32 = export_fp32(model, in_channels, patch, staging / "denoiser.onnx", opset)
        check_graph(fp32, in_channels, patch)
        fp16 = convert_fp16(fp32, staging / "denoiser.fp16.onnx")
        check_graph(fp16, in_channels, patch)
        cases = parity_inputs(in_channels, patch, int(diffusion["num_train_timesteps"]), patches)
        results: list[EngineError] = [
            parity("onnx_fp32_vs_torch_fp32", model, fp32, cases, FP32_LIMIT),
            parity("onnx_fp16_vs_torch_fp32", model, fp16, cases, FP16_LIMIT),
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
                "fp32": _engine_entry(fp32, "fp32", opset, in_channels, patch, out_channels),
                "fp16": _engine_entry(fp16, "fp16", opset, in_channels, patch, out_channels),
            },
            "validation": {"parity": {r.name: r.as_dict() for r in results}, **(validation or {})},
            "provenance": {
                "exported_by": f"diffseg {__version__}",
                "torch": torch.__version__,
                **(provenance or {}),
            },
        }
        # The weights for the torch backend (reference runs, GPUs without TensorRT).
        with atomic_path(staging / "denoiser.pt") as tmp:
            torch.save({k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}, tmp)
        manifest["files"]["torch"] = {
            "path": "denoiser.pt",
            "format": "torch",
            "precision": "fp32",
            "sha256": sha256_of(staging / "denoiser.pt"),
        }
        # The program for the torch backend: runs any architecture, no registry (the state dict serves the registry).
        from .program_export import export_program

        T = int(diffusion["num_train_timesteps"])
        export_program(model, in_channels, patch, staging / "denoiser.pt2", num_train_timesteps=T)
        manifest["files"]["torch_export"] = {
            "path": "denoiser.pt2",
            "format": "torch_export",
            "precision": "fp32",
            "sha256": sha256_of(staging / "denoiser.pt2"),
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
