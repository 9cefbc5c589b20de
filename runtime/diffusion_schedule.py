"""The diffusion process and the sampler's options: their vocabularies, ``SchedulerConfig`` (the manifest's
``diffusion`` section, one source of truth for its keys and values), ``SamplerOptions``, the β schedules, the ᾱ
table and the timestep grids.

Notation as in :mod:`diffseg.runtime.scheduler`: β_t, t = 0 … T−1; ᾱ_t = ∏_{s≤t} (1 − β_s), a float64 table.
:func:`timestep_pairs` gives the N reverse steps as consecutive pairs of a grid (diffusers DDPM and
guided-diffusion respacing); :class:`~diffseg.runtime.scheduler.Scheduler` steps on whatever pairs it is given.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping
from dataclasses import dataclass, fields
from typing import Any

import numpy as np

__all__ = [
    "BETA_SCHEDULES",
    "CHANNEL_ORDERS",
    "EPS_CONVENTIONS",
    "PREDICTION_TYPES",
    "SAMPLERS",
    "TIMESTEP_SPACINGS",
    "VARIANCE_TYPES",
    "SamplerOptions",
    "SchedulerConfig",
    "make_alphas_cumprod",
    "make_betas",
    "timestep_pairs",
]

BETA_SCHEDULES = ("linear", "scaled_linear", "squaredcos_cap_v2")
_BETA_ALIASES = {
    "linear_beta": "linear",
    "scaled_linear_beta": "scaled_linear",
    "cosine": "squaredcos_cap_v2",
}
PREDICTION_TYPES = ("epsilon", "sample", "v_prediction")
VARIANCE_TYPES = ("fixed_small", "fixed_large", "learned_range")
SAMPLERS = ("ddim", "ddpm")
TIMESTEP_SPACINGS = ("leading", "trailing", "linspace")
EPS_CONVENTIONS = ("raw", "recompute")


def _check_choice(name: str, value: Any, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise ValueError(f"{name} must be one of {allowed}, got {value!r}")


CHANNEL_ORDERS = ("image_first", "noisy_first")
# final x -> probability (plan.probability_of): affine clip((x + 1)/2, 0, 1); sigmoid 1/(1 + e^-x); softmax over
# the targets (two or more)
SAMPLE_ACTIVATIONS = ("affine", "sigmoid", "softmax")


@dataclass(frozen=True)
class SchedulerConfig:
    """The diffusion process a denoiser was trained with (the manifest's ``diffusion`` section).

    Attributes:
        num_train_timesteps: T, the number of training timesteps.
        beta_schedule: ``linear``, ``scaled_linear`` or ``squaredcos_cap_v2`` (aliases: ``cosine``,
            ``linear_beta``, ``scaled_linear_beta``); stored under its canonical name.
        beta_start: β_0 of the linear schedules.
        beta_end: β_{T−1} of the linear schedules.
        beta_dtype: ``float32`` builds β as diffusers/MONAI do (float32 linspace), ``float64`` as
            guided-diffusion; ᾱ is always accumulated in float64.
        prediction_type: what the network predicts: ``epsilon``, ``sample`` (x0) or ``v_prediction``.
        clip_sample: clip the predicted x0 to ``[-clip_range, clip_range]``.
        clip_range: the clipping bound.
        set_alpha_to_one: ᾱ past the end of the chain (t_prev < 0) is 1, otherwise ᾱ_0.
        steps_offset: offset added to the ``leading`` grid (diffusers ``steps_offset``).
        variance_type: DDPM variance: ``fixed_small`` (posterior β̃), ``fixed_large`` (β) or ``learned_range``
            (needs a 2-channel model: log-variance interpolated by the second channel).
        output_channels: channels the network returns (2 for learned-sigma models).
        prediction_channel: the channel holding the prediction (ε, x0 or v); with 2 output channels the other
            one is the variance interpolation v.
    """

    num_train_timesteps: int = 1000
    beta_schedule: str = "linear"
    beta_start: float = 1e-4
    beta_end: float = 0.02
    beta_dtype: str = "float32"
    prediction_type: str = "epsilon"
    clip_sample: bool = True
    clip_range: float = 1.0
    set_alpha_to_one: bool = True
    steps_offset: int = 0
    variance_type: str = "fixed_small"
    output_channels: int = 1
    prediction_channel: int = 0

    def __post_init__(self) -> None:
        if isinstance(self.num_train_timesteps, bool) or not isinstance(self.num_train_timesteps, int):
            raise TypeError(f"num_train_timesteps must be an int, got {self.num_train_timesteps!r}")
        if self.num_train_timesteps < 2:
            raise ValueError(f"num_train_timesteps must be >= 2, got {self.num_train_timesteps}")
        object.__setattr__(self, "beta_schedule", _BETA_ALIASES.get(self.beta_schedule, self.beta_schedule))
        _check_choice("beta_schedule", self.beta_schedule, BETA_SCHEDULES)
        if not (0.0 < self.beta_start <= self.beta_end < 1.0):
            raise ValueError(
                f"beta_start and beta_end must satisfy 0 < beta_start <= beta_end < 1, "
                f"got {self.beta_start} and {self.beta_end}"
            )
        _check_choice("beta_dtype", self.beta_dtype, ("float32", "float64"))
        _check_choice("prediction_type", self.prediction_type, PREDICTION_TYPES)
        if not (math.isfinite(self.clip_range) and self.clip_range > 0):
            raise ValueError(f"clip_range must be a positive number, got {self.clip_range}")
        if not 0 <= self.steps_offset < self.num_train_timesteps:
            raise ValueError(f"steps_offset must be in [0, {self.num_train_timesteps}), got {self.steps_offset}")
        _check_choice("variance_type", self.variance_type, VARIANCE_TYPES)
        if self.output_channels not in (1, 2):
            raise ValueError(f"output_channels must be 1 or 2, got {self.output_channels}")
        if not 0 <= self.prediction_channel < self.output_channels:
            raise ValueError(
                f"prediction_channel must be in [0, {self.output_channels}), got {self.prediction_channel}"
            )
        if self.variance_type == "learned_range" and self.output_channels != 2:
            raise ValueError("variance_type 'learned_range' needs output_channels == 2, got 1")

    @property
    def variance_channel(self) -> int | None:
        """The channel holding the learned variance interpolation v, or None for 1-channel models."""
        return 1 - self.prediction_channel if self.output_channels == 2 else None

    @classmethod
    def from_dict(cls, mapping: Mapping[str, Any]) -> SchedulerConfig:
        """Build from a manifest ``diffusion`` dict; unknown keys are an error naming them.

        Args:
            mapping: keys are the attribute names of this class.

        Returns:
            The validated config.

        Raises:
            ValueError: on an unknown key or a bad value.
        """
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(mapping) - known)
        if unknown:
            raise ValueError(f"unknown diffusion keys {unknown}; allowed: {sorted(known)}")
        return cls(**dict(mapping))


@dataclass(frozen=True)
class SamplerOptions:
    """How to sample: the reverse process, its grid and the ensemble.

    Attributes:
        sampler: ``ddim`` or ``ddpm``.
        steps: number of reverse steps N (1 … T).
        eta: DDIM stochasticity η (0 = deterministic, 1 = DDPM-like); must be 0 for ``ddpm``.
        timestep_spacing: grid of N timesteps: ``leading`` (T//N·k, diffusers/MONAI-1.4 default and
            guided-diffusion ``ddimN``), ``trailing`` (ends at T−1) or ``linspace`` (guided-diffusion
            ``space_timesteps``).
        eps_convention: ε used in the DDIM update after clipping x0: ``raw`` (the network's ε, as diffusers
            and MONAI) or ``recompute`` (ε re-derived from the clipped x0, as guided-diffusion
            ``ddim_sample``).
        num_samples: ensemble members K, run together in the batch dimension.
        channel_order: ``image_first`` (``[image..., x_t]``) or ``noisy_first`` (``[x_t, image...]``); the
            manifest's ``image-first``/``noisy-first`` are accepted and stored with an underscore.
        activation: how a sample's final x becomes a probability (the model's; see :data:`SAMPLE_ACTIVATIONS`):
            ``affine`` clip((x + 1)/2, 0, 1) (the mask trained in [−1, 1]), ``sigmoid`` (Diff-UNet's reading of x0),
            or ``softmax`` over the targets.
        targets: the model's noisy channels T (one mask each); x_t holds T rows per sample.
        seed: seed of the case's ``np.random.Generator``.
        threads: threads for the numpy work between engine calls (0 = min(8, CPU count)); results do not depend
            on it.
    """

    sampler: str = "ddim"
    steps: int = 10
    eta: float = 0.0
    timestep_spacing: str = "leading"
    eps_convention: str = "raw"
    num_samples: int = 5
    channel_order: str = "image_first"
    activation: str = "affine"
    targets: int = 1
    seed: int = 0
    threads: int = 0

    def __post_init__(self) -> None:
        _check_choice("sampler", self.sampler, SAMPLERS)
        if isinstance(self.steps, bool) or not isinstance(self.steps, int) or self.steps < 1:
            raise ValueError(f"steps must be an int >= 1, got {self.steps!r}")
        if not (math.isfinite(self.eta) and self.eta >= 0):
            raise ValueError(f"eta must be >= 0, got {self.eta}")
        if self.sampler == "ddpm" and self.eta != 0:
            raise ValueError(f"eta applies to the ddim sampler only; got eta={self.eta} with sampler='ddpm'")
        _check_choice("timestep_spacing", self.timestep_spacing, TIMESTEP_SPACINGS)
        _check_choice("eps_convention", self.eps_convention, EPS_CONVENTIONS)
        if isinstance(self.num_samples, bool) or not isinstance(self.num_samples, int) or self.num_samples < 1:
            raise ValueError(f"num_samples must be an int >= 1, got {self.num_samples!r}")
        object.__setattr__(self, "channel_order", str(self.channel_order).replace("-", "_"))  # manifest: image-first
        _check_choice("channel_order", self.channel_order, CHANNEL_ORDERS)
        _check_choice("activation", self.activation, SAMPLE_ACTIVATIONS)
        if isinstance(self.targets, bool) or not isinstance(self.targets, int) or self.targets < 1:
            raise ValueError(f"targets must be an int >= 1, got {self.targets!r}")
        if self.activation == "softmax" and self.targets < 2:
            raise ValueError("activation softmax needs at least two targets (over one channel it is always 1)")
        if not isinstance(self.seed, int) or self.seed < 0:
            raise ValueError(f"seed must be an int >= 0, got {self.seed!r}")
        if isinstance(self.threads, bool) or not isinstance(self.threads, int) or self.threads < 0:
            raise ValueError(f"threads must be an int >= 0 (0 = automatic), got {self.threads!r}")

    @property
    def num_threads(self) -> int:
        """Threads for the numpy work between engine calls: ``threads``, or min(8, CPU count) when 0."""
        return self.threads or min(8, os.cpu_count() or 1)


def _alpha_bar_cosine(t: float) -> float:
    return math.cos((t + 0.008) / 1.008 * math.pi / 2) ** 2


def make_betas(config: SchedulerConfig) -> np.ndarray:
    """β_t for t = 0 … T−1 as float64 (rounded through float32 first when ``beta_dtype`` is ``float32``).

    Args:
        config: the diffusion process.

    Returns:
        float64 array of shape ``[T]``.
    """
    n = config.num_train_timesteps
    low = config.beta_dtype == "float32"
    if config.beta_schedule == "linear":
        betas = np.linspace(config.beta_start, config.beta_end, n, dtype=np.float64)
        if low:
            betas = betas.astype(np.float32)
    elif config.beta_schedule == "scaled_linear":
        roots = np.linspace(config.beta_start**0.5, config.beta_end**0.5, n, dtype=np.float64)
        betas = np.square(roots.astype(np.float32)) if low else roots**2
    else:  # squaredcos_cap_v2 (Nichol & Dhariwal 2021, β capped at 0.999)
        betas = np.array([min(1 - _alpha_bar_cosine((i + 1) / n) / _alpha_bar_cosine(i / n), 0.999) for i in range(n)])
        if low:
            betas = betas.astype(np.float32)
    return betas.astype(np.float64)


def make_alphas_cumprod(config: SchedulerConfig) -> np.ndarray:
    """ᾱ_t = ∏_{s≤t} (1 − β_s), accumulated in float64.

    Args:
        config: the diffusion process.

    Returns:
        float64 array of shape ``[T]``.
    """
    return np.cumprod(1.0 - make_betas(config))


def timestep_pairs(num_train_timesteps: int, steps: int, spacing: str, steps_offset: int = 0) -> np.ndarray:
    """The N reverse steps as consecutive pairs ``(t_k, t_{k+1})`` of a grid, the last one ending at −1.

    Grids (T = 1000, N = 10): ``leading`` 900, 800 … 0 (+ ``steps_offset``); ``trailing`` 999, 899 … 99;
    ``linspace`` 999, 888 … 0 (= guided-diffusion ``space_timesteps(1000, [10])``). These are the rounding
    rules of diffusers' ``set_timesteps``.

    Args:
        num_train_timesteps: T.
        steps: N, 1 … T.
        spacing: one of :data:`TIMESTEP_SPACINGS`.
        steps_offset: added to the ``leading`` grid.

    Returns:
        int64 array ``[N, 2]`` of (t, t_prev), t strictly decreasing, t_prev = −1 on the last row.

    Raises:
        ValueError: if ``steps`` is out of range or ``spacing`` unknown.
    """
    t_total = num_train_timesteps
    if not 1 <= steps <= t_total:
        raise ValueError(f"steps must be in [1, {t_total}] (num_train_timesteps), got {steps}")
    _check_choice("timestep_spacing", spacing, TIMESTEP_SPACINGS)
    if spacing == "leading":
        grid = (np.arange(steps, dtype=np.int64) * (t_total // steps))[::-1] + steps_offset
    elif spacing == "trailing":
        grid = np.round(np.arange(t_total, 0, -t_total / steps)).astype(np.int64) - 1
    else:
        grid = np.linspace(0, t_total - 1, steps).round()[::-1].astype(np.int64)
    if grid.size != steps or np.any(np.diff(grid) >= 0) or grid[0] >= t_total:
        raise ValueError(f"the {spacing!r} grid for steps={steps}, T={t_total} is degenerate: {grid.tolist()}")
    return np.stack([grid, np.append(grid[1:], -1)], axis=1)
