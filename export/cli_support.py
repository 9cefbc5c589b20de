"""What ``diffseg export`` does, kept on the export side so that the runtime CLI never imports torch.

The config (JSON) needs what the package declares: ``model`` (and ``architecture``, default ours), ``patch_size``,
``spacing_mm``, the inputs (``inputs`` as the manifest writes them, or a training config's ``modalities`` and
``normalisation``) and ``diffusion``; optional ``targets``, ``activation``, ``blending``, ``name``, ``version``,
``channel_order``, ``sampling`` (merged over :data:`~diffseg.export.package.DEFAULT_SAMPLING`, keys checked) and
``provenance`` (``training_data``, ``intended_use``, ``licence``, ``model_version``). No ``train`` section is
needed. Provenance comes from the CLI flags, else the config's ``provenance`` section (our default model's config
states its own); anything else is written as "not stated".

The model comes from a checkpoint (:func:`export_from_checkpoint`: the config's ``architecture`` and ``model``
rebuilt from diffseg's registry, the weights loaded ``weights_only``) or from a saved ``torch.export`` program
(:func:`export_from_program`: any architecture; the config needs no ``architecture`` or ``model`` section, and
``diffusion.output_channels`` defaults to 1). Both then go through the same package build.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch

from diffseg.runtime.manifest import DEFAULTS_KEYS, DEFAULTS_TYPES, sha256_of
from diffseg.runtime.phantom import split_seeds

from .checkpoints import WEIGHT_CHOICES, load_checkpoint
from .data import phantom_case
from .package import DEFAULT_SAMPLING, DEFAULT_TARGETS, build_package, diffusion_from_config, inputs_from_config
from .program_export import load_program
from .train import norms_of, read_json_config

__all__ = [
    "EXPORT_CONFIG_KEYS",
    "NOT_STATED",
    "PHANTOM_MODALITIES",
    "PROVENANCE_KEYS",
    "export_from_checkpoint",
    "export_from_program",
    "load_export_config",
    "phantom_patches",
    "provenance_for",
    "sampling_for",
]

logger = logging.getLogger("diffseg.export")

#: Config keys an export needs (``train`` and ``seed`` are the trainer's, not the export's).
EXPORT_CONFIG_KEYS = ("model", "patch_size", "spacing_mm", "diffusion")
#: The inputs: schema 2 ``inputs``, or a training config's ``modalities`` + ``normalisation``.
INPUT_KEYS = (("inputs",), ("modalities", "normalisation"))
#: Provenance fields written to the manifest, each from a flag, the config's ``provenance`` section, or "not stated".
PROVENANCE_KEYS = ("training_data", "intended_use", "licence", "model_version")
NOT_STATED = "not stated"
#: Modalities the synthetic phantoms (``diffseg.runtime.phantom``) make: parity patches only for these.
PHANTOM_MODALITIES = ("CT", "PT")
_OPTIONAL_KEYS = (
    *("architecture", "name", "version", "channel_order", "targets", "activation", "blending", "sampling"),
    *("provenance", "train", "seed"),
)


def load_export_config(path: str | Path, *, model_section: bool = True) -> dict[str, Any]:
    """Read an export config (JSON) and check the keys an export needs.

    Args:
        path: the config file.
        model_section: the export rebuilds the network from the config (a checkpoint); False for a
            ``torch.export`` program, which needs no ``model`` section.

    Raises:
        FileNotFoundError: no such file.
        ValueError: not JSON, not an object, or a needed key missing (named, with the file).
    """
    cfg = read_json_config(path)
    needed = [k for k in EXPORT_CONFIG_KEYS if model_section or k != "model"]
    missing = [k for k in needed if k not in cfg]
    if missing:
        raise ValueError(
            f"{path}: missing keys {missing}; an export config needs {needed} (optional: {list(_OPTIONAL_KEYS)})"
        )
    if not any(all(k in cfg for k in keys) for keys in INPUT_KEYS):
        raise ValueError(
            f'{path}: no inputs: give \'inputs\' (a list as the manifest\'s, e.g. [{{"code": "MR", "normalisation": '
            f"{{\"method\": \"zscore\"}}}}]) or a training config's 'modalities' and 'normalisation'"
        )
    for key in ("sampling", "provenance"):
        if key in cfg and not isinstance(cfg[key], dict):
            raise ValueError(f"{path}: {key} must be an object, got {type(cfg[key]).__name__}")
    return cfg


def provenance_for(cfg: Mapping[str, Any], flags: Mapping[str, str | None] | None = None) -> dict[str, Any]:
    """The manifest's provenance: each of :data:`PROVENANCE_KEYS` from ``flags``, else the config's
    ``provenance`` section, else "not stated" (the config's ``version`` stands for ``model_version``).

    Args:
        cfg: the export config.
        flags: CLI values (None = not given).

    Returns:
        The provenance fields plus ``training_config`` (the config itself).

    Raises:
        ValueError: an unknown key in the config's ``provenance`` section or in ``flags``.
    """
    section = dict(cfg.get("provenance") or {})
    flags = {k: v for k, v in (flags or {}).items() if v is not None}
    for where, keys in (("provenance", section), ("provenance flags", flags)):
        unknown = sorted(set(keys) - set(PROVENANCE_KEYS))
        if unknown:
            raise ValueError(f"{where}: unknown keys {unknown}; allowed: {list(PROVENANCE_KEYS)}")
    stated: dict[str, str] = {"model_version": str(cfg["version"])} if "version" in cfg else {}
    out: dict[str, Any] = {"training_config": dict(cfg)}
    for key in PROVENANCE_KEYS:
        value = flags.get(key, section.get(key, stated.get(key)))
        out[key] = NOT_STATED if value is None or str(value).strip() == "" else str(value)
    return out


def sampling_for(cfg: Mapping[str, Any]) -> dict[str, Any]:
    """The package's sampling defaults: the config's ``sampling`` section merged over ``DEFAULT_SAMPLING``.

    Raises:
        ValueError: an unknown key (named, with the allowed ones) or a value of the wrong JSON type.
    """
    section = dict(cfg.get("sampling") or {})
    unknown = sorted(set(section) - set(DEFAULTS_KEYS))
    if unknown:
        raise ValueError(f"sampling: unknown keys {unknown}; allowed: {list(DEFAULTS_KEYS)}")
    for key, value in section.items():
        want = DEFAULTS_TYPES[key]
        if (isinstance(value, bool) and want is not bool) or not isinstance(value, want):
            raise ValueError(f"sampling: {key} must be of type {want}, got {value!r}")
    return {**DEFAULT_SAMPLING, **section}


def phantom_patches(cfg: Mapping[str, Any], count: int) -> list[np.ndarray]:
    """One image patch per validation phantom, centred on its tumour (or its centre when it has none).

    Only for configs whose modalities the phantoms make (:data:`PHANTOM_MODALITIES`); otherwise no patches (the
    parity check then runs on random inputs only).
    """
    if count <= 0 or "modalities" not in cfg or not set(cfg["modalities"]) <= set(PHANTOM_MODALITIES):
        return []
    patch = np.array(cfg["patch_size"])
    out = []
    for seed in split_seeds("validation")[:count]:
        case = phantom_case(seed, cfg["modalities"], norms_of(dict(cfg)), cfg["spacing_mm"])
        fg = np.argwhere(case.mask > 0)
        centre = fg.mean(axis=0).astype(int) if len(fg) else np.array(case.mask.shape) // 2
        start = np.clip(centre - patch // 2, 0, np.maximum(np.array(case.mask.shape) - patch, 0))
        sl = tuple(slice(int(s), int(s) + int(p)) for s, p in zip(start, patch, strict=True))
        img = case.image[(slice(None), *sl)]
        if img.shape[1:] == tuple(patch):
            out.append(np.ascontiguousarray(img))
    return out


def export_from_checkpoint(
    checkpoint: Path,
    config: Path,
    out_dir: Path,
    *,
    validation: Mapping | None = None,
    parity_phantoms: int = 2,
    overwrite: bool = False,
    weights: str = "model",
    provenance: Mapping[str, str | None] | None = None,
) -> Path:
    """Rebuild the configured network, load the checkpoint's weights and write a model package.

    Args:
        checkpoint: the checkpoint (any layout :mod:`diffseg.export.checkpoints` reads, ``weights_only``).
        config: the export config (JSON).
        out_dir: the package folder to write.
        validation: accuracy figures to record in the manifest.
        parity_phantoms: validation phantoms whose patches join the parity inputs (phantom modalities only).
        overwrite: replace an existing package.
        weights: ``model`` or ``ema``.
        provenance: CLI provenance values (``training_data``, ``intended_use``, ``licence``, ``model_version``).

    Returns:
        The package folder.
    """
    if weights not in WEIGHT_CHOICES:
        raise ValueError(f"weights must be one of {WEIGHT_CHOICES}, got {weights!r}")
    cfg = load_export_config(config)
    if not Path(checkpoint).is_file():
        raise FileNotFoundError(f"{checkpoint}: no such checkpoint")

    def load() -> tuple[torch.nn.Module, dict[str, Any], dict[str, Any]]:
        model, loaded = load_checkpoint(checkpoint, cfg, weights)
        architecture = {"type": cfg.get("architecture", "diffseg-unet3d"), **cfg["model"]}
        return model, architecture, {"checkpoint": loaded.as_provenance()}

    return _export(
        cfg,
        out_dir,
        load,
        name=cfg.get("name", Path(checkpoint).stem),
        validation=validation,
        parity_phantoms=parity_phantoms,
        overwrite=overwrite,
        provenance=provenance,
    )


def export_from_program(
    program: Path,
    config: Path,
    out_dir: Path,
    *,
    validation: Mapping | None = None,
    parity_phantoms: int = 2,
    overwrite: bool = False,
    provenance: Mapping[str, str | None] | None = None,
) -> Path:
    """Write a model package from a saved ``torch.export`` program (``torch.export.save``): any architecture.

    The manifest's ``architecture`` records ``{"type": "torch_export", "source": <file name>}`` and the provenance
    the file's name and sha256; the package's own program (``denoiser.pt2``) is exported again from it and checked.

    Args:
        program: the ``.pt2`` file (read by :func:`~diffseg.export.program_export.load_program`: no code from the
            file is run).
        config: the export config (JSON), without ``architecture`` or ``model``.
        out_dir, validation, parity_phantoms, overwrite, provenance: as for :func:`export_from_checkpoint`.

    Returns:
        The package folder.

    Raises:
        FileNotFoundError: no such program or config.
        ProgramError: not a torch.export program (a TorchScript archive, a ``torch.save`` file, a damaged file) or
            one diffseg refuses to load; the message names the file and what to do.
    """
    cfg = load_export_config(config, model_section=False)
    if not Path(program).is_file():
        raise FileNotFoundError(f"{program}: no such torch.export program")

    def load() -> tuple[torch.nn.Module, dict[str, Any], dict[str, Any]]:
        source = {"file": Path(program).name, "sha256": sha256_of(Path(program))}
        return load_program(program), {"type": "torch_export", "source": source["file"]}, {"program": source}

    return _export(
        cfg,
        out_dir,
        load,
        name=cfg.get("name", Path(program).stem),
        validation=validation,
        parity_phantoms=parity_phantoms,
        overwrite=overwrite,
        provenance=provenance,
    )


def _export(
    cfg: Mapping[str, Any],
    out_dir: Path,
    load: Callable[[], tuple[torch.nn.Module, dict[str, Any], dict[str, Any]]],
    *,
    name: str,
    validation: Mapping | None,
    parity_phantoms: int,
    overwrite: bool,
    provenance: Mapping[str, str | None] | None,
) -> Path:
    """The package build shared by both model sources: provenance and sampling checked, then ``load()`` (the
    model, the manifest's ``architecture``, what the provenance records of the source), then ``build_package``."""
    prov = provenance_for(cfg, provenance)
    defaults = sampling_for(cfg)
    model, architecture, source = load()
    prov.update(source)
    patches = phantom_patches(cfg, parity_phantoms)
    logger.info("parity inputs: random%s", f" + {len(patches)} phantom patches" if patches else " only")
    return build_package(
        model,
        out_dir,
        name=name,
        inputs=inputs_from_config(cfg),
        spacing_mm=cfg["spacing_mm"],
        patch_size=cfg["patch_size"],
        channel_order=cfg.get("channel_order", "image-first"),
        diffusion=diffusion_from_config(cfg),
        architecture=architecture,
        targets=cfg.get("targets", DEFAULT_TARGETS),
        activation=cfg.get("activation", "affine"),
        blending=cfg.get("blending", "gaussian"),
        defaults=defaults,
        patches=patches,
        validation=validation,
        provenance=prov,
        overwrite=overwrite,
    )
