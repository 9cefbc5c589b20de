"""What the export tests share: the modalities, diffusion settings and a package build with test defaults."""

from __future__ import annotations

from diffseg.export.package import build_package

PATCH = (16, 16, 16)
MODALITIES = [
    {"code": "PT", "unit": "SUVbw", "normalisation": {"clip": [0, 20], "offset": 0, "scale": 0.2}},
    {"code": "CT", "unit": "HU", "normalisation": {"clip": [-250, 250], "offset": 0, "scale": 0.004}},
]


def diffusion(out_channels: int = 1, prediction_type: str = "epsilon") -> dict:
    return {
        "num_train_timesteps": 1000,
        "beta_schedule": "linear",
        "beta_start": 1e-4,
        "beta_end": 0.02,
        "prediction_type": prediction_type,
        "output_channels": out_channels,
        "prediction_channel": 0,
        "clip_sample": True,
        "clip_range": 1.0,
    }


def export(model, tmp_path, name="pkg", out_channels=1, patches=(), patch=PATCH):
    """``build_package`` of ``model`` under ``tmp_path/name`` with the test modalities and diffusion settings."""
    return build_package(
        model,
        tmp_path / name,
        name=name,
        inputs=MODALITIES,
        spacing_mm=2.0,
        patch_size=patch,
        channel_order="image-first",
        diffusion=diffusion(out_channels),
        architecture={"type": "test"},
        patches=patches,
    )
