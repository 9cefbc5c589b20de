"""Training-side diffusion math in torch: the β schedule, forward noising and the prediction targets.

Independent of the runtime's numpy scheduler on purpose: the two are checked against each other in tests.
"""

from __future__ import annotations

import math

import numpy as np
import torch

__all__ = ["alphas_cumprod", "q_sample", "target_for"]


def alphas_cumprod(
    num_train_timesteps: int, beta_schedule: str, beta_start: float = 1e-4, beta_end: float = 0.02
) -> np.ndarray:
    """ᾱ_t for t = 0 … T−1 in float64 (β as MONAI/diffusers define them, computed in float64)."""
    T = num_train_timesteps
    if beta_schedule == "linear":
        betas = np.linspace(beta_start, beta_end, T, dtype=np.float64)
    elif beta_schedule == "scaled_linear":
        betas = np.linspace(beta_start**0.5, beta_end**0.5, T, dtype=np.float64) ** 2
    elif beta_schedule in ("cosine", "squaredcos_cap_v2"):
        f = [math.cos((i / T + 0.008) / 1.008 * math.pi / 2) ** 2 for i in range(T + 1)]
        betas = np.array([min(1 - f[i + 1] / f[i], 0.999) for i in range(T)], dtype=np.float64)
    else:
        raise ValueError(f"beta_schedule must be linear, scaled_linear or cosine, got {beta_schedule!r}")
    return np.cumprod(1.0 - betas)


def q_sample(x0: torch.Tensor, t: torch.Tensor, noise: torch.Tensor, abar: torch.Tensor) -> torch.Tensor:
    """x_t = √ᾱ_t·x0 + √(1−ᾱ_t)·ε, with ``abar`` the ᾱ table on the same device."""
    a = abar[t].float().view(-1, *([1] * (x0.dim() - 1)))
    return a.sqrt() * x0 + (1 - a).sqrt() * noise


def target_for(
    prediction_type: str, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor, abar: torch.Tensor
) -> torch.Tensor:
    """What the network learns to output for each prediction type."""
    if prediction_type == "epsilon":
        return noise
    if prediction_type == "sample":
        return x0
    if prediction_type == "v_prediction":
        a = abar[t].float().view(-1, *([1] * (x0.dim() - 1)))
        return a.sqrt() * noise - (1 - a).sqrt() * x0
    raise ValueError(f"prediction_type must be epsilon, sample or v_prediction, got {prediction_type!r}")
