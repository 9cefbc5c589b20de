"""A plain PyTorch reference: DDIM over a whole volume with a Gaussian-weighted sliding window, step-major.

This is the loop a researcher would write around the trained denoiser. It shares no code with the runtime's numpy
scheduler, sliding window or backends, so it can check them. Noise follows the runtime's documented convention: one
``numpy.random.default_rng(seed)`` per case, the initial noise drawn first as one array ``[K, z, y, x]``.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass

import numpy as np
import torch

from .diffusion import alphas_cumprod

__all__ = ["ReferenceSettings", "ddim_pairs", "gaussian_map", "reference_sample", "window_starts"]


@dataclass(frozen=True)
class ReferenceSettings:
    """DDIM settings of the reference loop (η = 0).

    Attributes:
        steps: number of DDIM steps.
        samples: ensemble members.
        overlap: sliding-window overlap (MONAI's definition).
        prediction_type: what the network outputs (epsilon, sample, v_prediction).
        clip: clip the predicted x0 to [-1, 1]; ε is then recomputed from the clipped x0 (guided-diffusion).
        timestep_spacing: diffusers' grids: linspace (999 … 0), leading (900 … 0, diffusers/MONAI) or trailing
            (999 … 99); see :func:`ddim_pairs`.
        channel_order: image-first ``[images, x_t]`` or noisy-first ``[x_t, images]``.
        prediction_channel: output channel holding the prediction (0; learned-sigma models add a second one).
        batch_size: windows per model call.
        steps_offset: added to the ``leading`` grid (diffusers' ``steps_offset``).
        activation: final x → probability: ``affine`` ((x + 1)/2, clamped to [0, 1]), ``sigmoid``, or ``softmax``
            over the targets.
        targets: noisy channels T (one mask each), predicted in output channels 0 … T−1.
        blending: ``gaussian`` (MONAI's importance map) or ``constant`` (MONAI's ``mode="constant"``: ones).
    """

    steps: int = 10
    samples: int = 5
    overlap: float = 0.25
    prediction_type: str = "sample"
    clip: bool = True
    timestep_spacing: str = "linspace"
    channel_order: str = "image-first"
    prediction_channel: int = 0
    batch_size: int = 8
    steps_offset: int = 0
    activation: str = "affine"
    blending: str = "gaussian"
    targets: int = 1


def ddim_pairs(num_train_timesteps: int, steps: int, spacing: str, steps_offset: int = 0) -> list[tuple[int, int]]:
    """The reverse steps as consecutive pairs ``(t_k, t_{k+1})`` of diffusers' timestep grid.

    The grid is the one ``diffusers.DDIMScheduler.set_timesteps(steps)`` builds, with the same floating-point
    rounding (which differs from exact rational rounding for some step counts, e.g. N = 27 with ``linspace``):
    ``linspace`` rounds ``linspace(0, T−1, N)`` and reverses it (N = 1 gives t = 0); ``leading`` is ``k·(T//N)``
    reversed, plus ``steps_offset``; ``trailing`` rounds ``arange(T, 0, −T/N)`` and subtracts 1. Steps pair
    consecutive grid entries; ``t_prev = −1`` on the last one means ᾱ = 1 (the final step returns x0), as the
    runtime's ``set_alpha_to_one``.

    Args:
        num_train_timesteps: T.
        steps: N, 1 … T.
        spacing: ``linspace``, ``leading`` or ``trailing``.
        steps_offset: added to the ``leading`` grid (diffusers' ``steps_offset``).

    Returns:
        N pairs (t, t_prev), t strictly decreasing.

    Raises:
        ValueError: on a step count out of range or an unknown spacing.
    """
    T = num_train_timesteps
    if isinstance(steps, bool) or not isinstance(steps, int) or not 1 <= steps <= T:
        raise ValueError(f"steps must be an int in [1, {T}] (num_train_timesteps), got {steps!r}")
    if spacing == "linspace":
        grid = np.linspace(0, T - 1, steps).round()[::-1].astype(np.int64)
    elif spacing == "leading":
        grid = (np.arange(steps) * (T // steps))[::-1].astype(np.int64) + steps_offset
    elif spacing == "trailing":
        grid = np.round(np.arange(T, 0, -T / steps)).astype(np.int64) - 1
    else:
        raise ValueError(f"timestep_spacing must be one of linspace, leading, trailing; got {spacing!r}")
    ts = [int(v) for v in grid]
    if len(ts) != steps or any(a <= b for a, b in itertools.pairwise(ts)) or not 0 <= ts[-1] <= ts[0] < T:
        raise ValueError(f"the {spacing!r} grid for steps={steps}, T={T} is degenerate: {ts}")
    return list(zip(ts, [*ts[1:], -1], strict=True))


def window_starts(size: int, patch: int, overlap: float) -> list[int]:
    """MONAI's window starts along one axis (the last window shifted back so that none overhangs)."""
    if size <= patch:
        return [0]
    stride = max(int(patch * (1 - overlap)), 1)
    n = math.ceil((size - patch) / stride) + 1
    return [min(i * stride, size - patch) for i in range(n)]


def gaussian_map(patch: tuple[int, ...], sigma_scale: float = 0.125) -> torch.Tensor:
    """MONAI's Gaussian importance map (``compute_importance_map(patch, "gaussian", sigma_scale)``), float32.

    ``w = ∏_i exp(−x_i² / (2σ_i²))`` with ``x_i ∈ [−(p_i−1)/2, (p_i−1)/2]`` and σ_i = sigma_scale·p_i, computed in
    float32 in MONAI's order, not normalised, then clamped from below at ``max(min(w), 1e-3)``.
    """
    w = None
    for p in patch:
        x = torch.arange(-(p - 1) / 2.0, (p - 1) / 2.0 + 1, dtype=torch.float32)
        g = torch.exp(x**2 / (-2 * (p * sigma_scale) ** 2))
        w = g if w is None else w.unsqueeze(-1) * g
    if w is None:
        raise ValueError(f"patch must have at least one axis, got {patch!r}")
    return w.clamp(min=max(float(w.min()), 1e-3))


def _pad_to(x: torch.Tensor, patch: tuple[int, ...], value: float) -> tuple[torch.Tensor, tuple[int, ...]]:
    shape = x.shape[-3:]
    pads = []
    for s, p in zip(reversed(shape), reversed(patch), strict=True):
        extra = max(p - s, 0)
        pads += [extra // 2, extra - extra // 2]
    return torch.nn.functional.pad(x, pads, value=value), tuple(pads)


@torch.no_grad()
def reference_sample(
    model: torch.nn.Module,
    image: np.ndarray,
    patch: tuple[int, int, int],
    settings: ReferenceSettings,
    seed: int,
    num_train_timesteps: int = 1000,
    beta_schedule: str = "linear",
    device: str = "cpu",
) -> np.ndarray:
    """Sample ``settings.samples`` masks for one volume; returns foreground probabilities ``[K, z, y, x]``
    (``[K, T, z, y, x]`` for T > 1 targets: the initial noise is then drawn as ``[K·T, z, y, x]``).

    Args:
        model: the denoiser ``f(x, t)``.
        image: normalised image channels on the model grid ``[C, z, y, x]``.
        patch: window size (z, y, x).
        settings: DDIM settings.
        seed: the case seed (numpy generator, initial noise drawn first).
    """
    s = settings
    K, T = s.samples, s.targets
    shape = image.shape[1:]
    noise = np.random.default_rng(seed).standard_normal((K * T, *shape), dtype=np.float32).reshape(K, T, *shape)
    abar = torch.from_numpy(alphas_cumprod(num_train_timesteps, beta_schedule)).to(device)
    img = torch.from_numpy(image).to(device)
    mins = img.flatten(1).min(dim=1).values
    img = torch.stack([_pad_to(img[c : c + 1], patch, float(mins[c]))[0][0] for c in range(img.shape[0])])
    x = torch.from_numpy(noise).to(device)
    x, pads = _pad_to(x, patch, 0.0)
    vol = x.shape[-3:]
    starts = [
        (z, y, xx)
        for z in window_starts(vol[0], patch[0], s.overlap)
        for y in window_starts(vol[1], patch[1], s.overlap)
        for xx in window_starts(vol[2], patch[2], s.overlap)
    ]
    w = (gaussian_map(patch) if s.blending == "gaussian" else torch.ones(patch)).to(device)
    for t, t_prev in ddim_pairs(num_train_timesteps, s.steps, s.timestep_spacing, s.steps_offset):
        acc = torch.zeros_like(x)
        norm = torch.zeros(vol, dtype=torch.float32, device=device)
        jobs = [(k, st) for st in starts for k in range(K)]
        for b in range(0, len(jobs), s.batch_size):
            chunk = jobs[b : b + s.batch_size]
            crops = []
            for k, (z0, y0, x0_) in chunk:
                sl = (slice(z0, z0 + patch[0]), slice(y0, y0 + patch[1]), slice(x0_, x0_ + patch[2]))
                xt = x[(k, slice(None), *sl)]
                im = img[(slice(None), *sl)]
                crops.append(torch.cat([im, xt] if s.channel_order == "image-first" else [xt, im], dim=0))
            out = model(torch.stack(crops), torch.full((len(chunk),), float(t), device=device))
            out = out[:, s.prediction_channel : s.prediction_channel + T].float()
            for j, (k, (z0, y0, x0_)) in enumerate(chunk):
                sl = (slice(z0, z0 + patch[0]), slice(y0, y0 + patch[1]), slice(x0_, x0_ + patch[2]))
                acc[(k, slice(None), *sl)] += out[j] * w
                if k == 0:
                    norm[sl] += w
        model_out = acc / norm
        ab = abar[t].float()
        ab_prev = abar[t_prev].float() if t_prev >= 0 else torch.tensor(1.0, device=device)
        if s.prediction_type == "sample":
            x0 = model_out
        elif s.prediction_type == "epsilon":
            x0 = (x - (1 - ab).sqrt() * model_out) / ab.sqrt()
        elif s.prediction_type == "v_prediction":
            x0 = ab.sqrt() * x - (1 - ab).sqrt() * model_out
        else:
            raise ValueError(f"unknown prediction_type {s.prediction_type!r}")
        if s.clip:
            x0 = x0.clamp(-1, 1)
        eps = (x - ab.sqrt() * x0) / (1 - ab).sqrt()
        x = ab_prev.sqrt() * x0 + (1 - ab_prev).sqrt() * eps
    zs, ys, xs = (
        slice(pads[4], pads[4] + shape[0]),
        slice(pads[2], pads[2] + shape[1]),
        slice(pads[0], pads[0] + shape[2]),
    )
    final = x[:, :, zs, ys, xs]
    if s.activation == "softmax":
        prob = torch.softmax(final, dim=1)
    else:
        prob = torch.sigmoid(final) if s.activation == "sigmoid" else ((final + 1) / 2).clamp(0, 1)
    return (prob[:, 0] if T == 1 else prob).cpu().numpy()
