"""Denoiser architectures that the export CLI can rebuild from a config: ours and MONAI's.

Any other ``torch.nn.Module`` with the contract ``f(x, t)`` exports through the Python API
(``diffseg.export.package.build_package(model=...)``); this registry only serves ``diffseg export --config``.
Checkpoints are read by :mod:`diffseg.export.checkpoints` (``load_checkpoint``: prefixes, EMA, clear errors).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from .unet import DiffusionUNet3D, UNetConfig

__all__ = ["ARCHITECTURES", "MonaiDenoiser", "build_model"]


class MonaiDenoiser(torch.nn.Module):
    """MONAI's ``DiffusionModelUNet`` behind the diffseg contract (``t`` float32 ``[B]``)."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__()
        from monai.networks.nets import DiffusionModelUNet

        kwargs.setdefault("spatial_dims", 3)
        self.net = DiffusionModelUNet(**kwargs)

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return self.net(x, timesteps=t)


def _diffseg_unet(model: Mapping[str, Any]) -> torch.nn.Module:
    return DiffusionUNet3D(UNetConfig(**model))


def _monai(model: Mapping[str, Any]) -> torch.nn.Module:
    return MonaiDenoiser(**dict(model))


ARCHITECTURES = {"diffseg-unet3d": _diffseg_unet, "monai-diffusion-unet": _monai}


def build_model(cfg: Mapping[str, Any]) -> torch.nn.Module:
    """The untrained network described by a training/export config (``architecture`` defaults to ours)."""
    name = cfg.get("architecture", "diffseg-unet3d")
    if name not in ARCHITECTURES:
        raise ValueError(f"architecture must be one of {sorted(ARCHITECTURES)}, got {name!r}")
    return ARCHITECTURES[name](cfg["model"])
