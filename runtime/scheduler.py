"""Numpy diffusion scheduler on explicit ``(t, t_prev)`` pairs: DDIM (η ≥ 0) and DDPM, three prediction types.

Notation (Ho et al. 2020, Song et al. 2021): β_t, t = 0 … T−1; α_t = 1 − β_t; ᾱ_t = ∏_{s≤t} α_s (a float64
table); x_t = √ᾱ_t·x0 + √(1 − ᾱ_t)·ε. A reverse step goes from t to ``t_prev`` < t; ``t_prev < 0`` means "past
the end of the chain" and uses ᾱ = 1 (``set_alpha_to_one``) or ᾱ_0. Explicit pairs cover every grid:

- diffusers / MONAI DDIM pair t with ``t − T//N`` whatever the grid (pass those pairs to compare with them);
- diffusers DDPM and guided-diffusion respacing pair consecutive grid entries (t_k, t_{k+1}), which is what
  :func:`timestep_pairs` returns. On the ``leading`` grid both rules give the same pairs.

Coefficients are computed in float64 from the ᾱ table (:mod:`diffseg.runtime.diffusion_steps`). The arrays are
float32; a step is one pass of ``diffseg._ext.diffusion_step``, which widens each element to double (so a step over
a whole volume allocates nothing and loses no precision to the cancellation in x0 = (x_t − √(1−ᾱ)·ε)/√ᾱ at large
t) and rounds the results to float32.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping
from dataclasses import dataclass, fields
from typing import Any

import numpy as np

from .. import _ext
from .diffusion_steps import ddim_coefficients, ddpm_coefficients, x0_only

__all__ = [
    "BETA_SCHEDULES",
    "EPS_CONVENTIONS",
    "PREDICTION_TYPES",
    "SAMPLERS",
    "TIMESTEP_SPACINGS",
    "VARIANCE_TYPES",
    "SamplerOptions",
    "Scheduler",
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
CHANNEL_ORDERS = ("image_first", "noisy_first")


def _check_choice(name: str, value: Any, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise ValueError(f"{name} must be one of {allowed}, got {value!r}")


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


class Scheduler:
    """A diffusion process (ᾱ table) with one sampler's reverse step on explicit ``(t, t_prev)`` pairs.

    Args:
        config: the trained diffusion process.
        options: sampler, η, grid and ε convention (ensemble fields are not used here).
    """

    def __init__(self, config: SchedulerConfig, options: SamplerOptions | None = None) -> None:
        self.config = config
        self.options = options or SamplerOptions()
        self.alphas_cumprod = make_alphas_cumprod(config)
        self.final_alpha_cumprod = 1.0 if config.set_alpha_to_one else float(self.alphas_cumprod[0])
        self.threads = self.options.num_threads

    def __repr__(self) -> str:
        c, o = self.config, self.options
        return (
            f"Scheduler({o.sampler}, steps={o.steps}, eta={o.eta}, {o.timestep_spacing}, "
            f"eps={o.eps_convention}; T={c.num_train_timesteps}, {c.beta_schedule}, {c.prediction_type}, "
            f"clip={c.clip_sample})"
        )

    def pairs(self) -> np.ndarray:
        """The ``[N, 2]`` (t, t_prev) pairs of the options' grid (see :func:`timestep_pairs`)."""
        return timestep_pairs(
            self.config.num_train_timesteps,
            self.options.steps,
            self.options.timestep_spacing,
            self.config.steps_offset,
        )

    def _alphas(self, t: int, t_prev: int) -> tuple[float, float]:
        t_total = self.config.num_train_timesteps
        if not (0 <= t < t_total) or t_prev >= t:
            raise ValueError(f"need 0 <= t < {t_total} and t_prev < t, got t={t}, t_prev={t_prev}")
        ab = float(self.alphas_cumprod[t])
        ab_prev = float(self.alphas_cumprod[t_prev]) if t_prev >= 0 else self.final_alpha_cumprod
        return ab, ab_prev

    def ddim_sigma(self, t: int, t_prev: int) -> float:
        """σ_t(η) of DDIM eq. 16: η·√((1 − ᾱ_prev)/(1 − ᾱ_t))·√(1 − ᾱ_t/ᾱ_prev)."""
        ab, ab_prev = self._alphas(int(t), int(t_prev))
        return self.options.eta * math.sqrt(max((1 - ab_prev) / (1 - ab) * (1 - ab / ab_prev), 0.0))

    def needs_noise(self, t: int, t_prev: int) -> bool:
        """Whether the step from t adds noise: DDIM when σ_t(η) > 0; DDPM when t > 0 (as diffusers)."""
        if self.options.sampler == "ddpm":
            return int(t) > 0
        return self.options.eta > 0 and self.ddim_sigma(t, t_prev) > 0

    def add_noise(self, x0: np.ndarray, noise: np.ndarray, t: int) -> np.ndarray:
        """Forward process q(x_t | x0): √ᾱ_t·x0 + √(1 − ᾱ_t)·ε, float32."""
        ab = float(self.alphas_cumprod[int(t)])
        return (np.float32(math.sqrt(ab)) * x0 + np.float32(math.sqrt(1 - ab)) * noise).astype(np.float32)

    def output_for_x0(
        self, x0: np.ndarray | float, x_t: np.ndarray, t: int, out: np.ndarray | None = None
    ) -> np.ndarray:
        """The network output (of ``prediction_type``) that is consistent with a given x0 at (x_t, t).

        Used to fill skipped windows with "background" and by oracle denoisers in tests:
        ε = (x_t − √ᾱ·x0)/√(1 − ᾱ); v = (√ᾱ·x_t − x0)/√(1 − ᾱ); sample = x0.

        Args:
            x0: target clean sample (array broadcastable to x_t, or a scalar).
            x_t: the current noisy sample.
            t: the current timestep.
            out: optional float32 array shaped like x_t to write into.

        Returns:
            float32 array shaped like x_t.
        """
        scale_x, scale_0 = self.output_coefficients(t)
        out = np.empty(x_t.shape, np.float32) if out is None else out
        np.multiply(x_t, np.float32(scale_x), out=out)
        out += np.float32(scale_0) * np.asarray(x0, np.float32)
        return out

    def output_coefficients(self, t: int) -> tuple[float, float]:
        """(c_x, c_0) with output = c_x·x_t + c_0·x0 for the network output consistent with x0 at (x_t, t)."""
        ab = float(self.alphas_cumprod[int(t)])
        kind = self.config.prediction_type
        if kind == "sample":
            return 0.0, 1.0
        inv = 1.0 / math.sqrt(1 - ab)
        if kind == "epsilon":
            return inv, -math.sqrt(ab) * inv
        return math.sqrt(ab) * inv, -inv

    def x0_for_output(self, output: np.ndarray, x_t: np.ndarray, t: int, out: np.ndarray | None = None) -> np.ndarray:
        """The x0 that a network output (of ``prediction_type``) predicts at (x_t, t), clipped as :meth:`step` clips
        it; the inverse of :meth:`output_for_x0` where nothing is clipped.

        Args:
            output: the prediction channel, float32.
            x_t: the current noisy sample, shaped like ``output``.
            t: the current timestep.
            out: optional float32 array shaped like ``output`` to write into (may be ``output`` itself).

        Returns:
            float32 array shaped like ``output``.
        """
        ab = float(self.alphas_cumprod[int(t)])
        output = np.ascontiguousarray(output, dtype=np.float32)
        out = np.empty(output.shape, np.float32) if out is None else out
        clip = self.config.clip_range if self.config.clip_sample else None
        coef = x0_only(ab, self.config.prediction_type, clip)
        _ext.diffusion_step(output, np.ascontiguousarray(x_t, dtype=np.float32), coef, x0=out, threads=1)
        return out

    def step_coefficients(self, t: int, t_prev: int) -> dict[str, Any]:
        """The float64 coefficients of the step from t to t_prev in :mod:`diffusion_steps`' element-wise form."""
        t, t_prev = int(t), int(t_prev)
        ab, ab_prev = self._alphas(t, t_prev)
        c, o = self.config, self.options
        clip = c.clip_range if c.clip_sample else None
        noise = self.needs_noise(t, t_prev)
        if o.sampler == "ddpm":
            return ddpm_coefficients(ab, ab_prev, c.prediction_type, clip, c.variance_type, noise)
        recompute = o.eps_convention == "recompute"
        return ddim_coefficients(ab, ab_prev, c.prediction_type, clip, o.eta, recompute, noise)

    def step(
        self,
        model_output: np.ndarray,
        x_t: np.ndarray,
        t: int,
        t_prev: int,
        *,
        noise: np.ndarray | None = None,
        variance_output: np.ndarray | None = None,
        scale: np.ndarray | None = None,
        out: tuple[np.ndarray, np.ndarray | None] | None = None,
    ) -> tuple[np.ndarray, np.ndarray | None]:
        """One reverse step x_t → x_{t_prev} of the configured sampler.

        Args:
            model_output: the prediction channel (ε, x0 or v), float32, shaped like ``x_t``.
            x_t: current sample, C-contiguous float32 of any shape.
            t: current timestep (0 … T−1).
            t_prev: the timestep to step to (< t; negative = end of the chain).
            noise: standard normal z, shaped like ``x_t``; required when :meth:`needs_noise` is true.
            variance_output: the variance-interpolation channel v ∈ [−1, 1] (DDPM ``learned_range`` only).
            scale: optional float32 factor applied to ``model_output`` first, shaped like the trailing axes of
                ``x_t`` (the sampler passes a weighted sum of window outputs and 1/Σweights, saving a pass).
            out: optional ``(x_prev, x0)`` float32 buffers; ``x_prev`` may be ``x_t`` itself (an in-place
                update); ``x0`` None skips writing the predicted x0.

        Returns:
            ``(x_prev, x0)``: the next sample and the (clipped) predicted x0 (None when ``out[1]`` is None), float32.

        Raises:
            ValueError: on shape/dtype mismatch, a bad pair, missing noise or missing variance output.
        """
        # Variable → symbol: model_output → ε_θ | x0_θ | v_θ;  x_t → x_t;  ab → ᾱ_t;  ab_prev → ᾱ_{t_prev};
        # noise → z;  variance_output → v (learned range);  x_prev → x_{t_prev};  x0 → x̂0. The coefficients, with the
        # papers' equations, are derived in diffusion_steps.ddim_coefficients / ddpm_coefficients.
        t, t_prev = int(t), int(t_prev)
        self._alphas(t, t_prev)  # validates the pair before any array work
        x_t = np.ascontiguousarray(x_t, dtype=np.float32)
        model_output = np.ascontiguousarray(model_output, dtype=np.float32)
        if model_output.shape != x_t.shape:
            raise ValueError(f"model_output shape {model_output.shape} differs from x_t shape {x_t.shape}")
        want_noise = self.needs_noise(t, t_prev)
        if want_noise and noise is None:
            raise ValueError(f"the {self.options.sampler} step from t={t} adds noise: pass noise")
        arrays = {"model_output": model_output, "x_t": x_t}
        if want_noise:
            arrays["noise"] = np.ascontiguousarray(noise, dtype=np.float32)
        learned = self.options.sampler == "ddpm" and self.config.variance_type == "learned_range"
        if learned and want_noise:
            if variance_output is None:
                raise ValueError("variance_type 'learned_range' needs variance_output (the model's v channel)")
            arrays["variance_output"] = np.ascontiguousarray(variance_output, dtype=np.float32)
        for name, a in arrays.items():
            if a.shape != x_t.shape:
                raise ValueError(f"{name} shape {a.shape} differs from x_t shape {x_t.shape}")
        if scale is not None:
            scale = np.ascontiguousarray(scale, dtype=np.float32)
            if scale.ndim > x_t.ndim or scale.shape != x_t.shape[x_t.ndim - scale.ndim :]:
                raise ValueError(f"scale shape {scale.shape} is not the trailing shape of x_t {x_t.shape}")
        if out is None:
            x_prev, x0 = np.empty_like(x_t), np.empty_like(x_t)
        else:
            x_prev, x0 = out
            for name, a in (("out[0]", x_prev), ("out[1]", x0)):
                if a is not None and (a.shape != x_t.shape or a.dtype != np.float32 or not a.flags.c_contiguous):
                    raise ValueError(f"{name} must be C-contiguous float32 of shape {x_t.shape}")
            for name, a in arrays.items():
                if (x0 is not None and np.may_share_memory(x0, a)) or (
                    name != "x_t" and np.may_share_memory(x_prev, a)
                ):
                    raise ValueError(f"output buffers may not overlap {name} (x_prev may be x_t itself)")
            if np.may_share_memory(x_prev, x_t) and x_prev.__array_interface__ != x_t.__array_interface__:
                raise ValueError("x_prev overlaps x_t without being x_t itself")
            if x0 is not None and np.may_share_memory(x0, x_prev):
                raise ValueError("out[0] and out[1] may not overlap")
        coef = self.step_coefficients(t, t_prev)
        _ext.diffusion_step(
            model_output,
            x_t,
            coef,
            x_prev=x_prev,
            x0=x0,
            noise=arrays.get("noise"),
            variance=arrays.get("variance_output"),
            scale=scale,
            threads=self.threads,
        )
        return x_prev, x0
