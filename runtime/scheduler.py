"""Numpy diffusion scheduler on explicit ``(t, t_prev)`` pairs: DDIM (η ≥ 0) and DDPM, three prediction types.

Notation (Ho et al. 2020, Song et al. 2021): β_t, t = 0 … T−1; α_t = 1 − β_t; ᾱ_t = ∏_{s≤t} α_s (a float64
table); x_t = √ᾱ_t·x0 + √(1 − ᾱ_t)·ε. A reverse step goes from t to ``t_prev`` < t; ``t_prev < 0`` means "past
the end of the chain" and uses ᾱ = 1 (``set_alpha_to_one``) or ᾱ_0. Explicit pairs cover every grid:

- diffusers / MONAI DDIM pair t with ``t − T//N`` whatever the grid (pass those pairs to compare with them);
- diffusers DDPM and guided-diffusion respacing pair consecutive grid entries (t_k, t_{k+1}), which is what
  :func:`~diffseg.runtime.diffusion_schedule.timestep_pairs` returns. On the ``leading`` grid both rules give the
  same pairs.

The ᾱ table, the grids and the option vocabularies are in :mod:`diffseg.runtime.diffusion_schedule`.
Coefficients are computed in float64 from the ᾱ table (:mod:`diffseg.runtime.diffusion_steps`). The arrays are
float32; a step is one pass of ``diffseg._ext.diffusion_step``, which widens each element to double (so a step over
a whole volume allocates nothing and loses no precision to the cancellation in x0 = (x_t − √(1−ᾱ)·ε)/√ᾱ at large
t) and rounds the results to float32.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from .. import _ext
from .diffusion_schedule import SamplerOptions, SchedulerConfig, make_alphas_cumprod, timestep_pairs
from .diffusion_steps import ddim_coefficients, ddim_sigma, ddpm_coefficients, x0_coefficients, x0_only

__all__ = ["Scheduler"]


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
        """σ_t(η) of DDIM eq. 16 (:func:`diffusion_steps.ddim_sigma`)."""
        ab, ab_prev = self._alphas(int(t), int(t_prev))
        return ddim_sigma(ab, ab_prev, self.options.eta)

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
        """(c_x, c_0) with output = c_x·x_t + c_0·x0 for the network output consistent with x0 at (x_t, t): the
        inverse of the step's own x0 = a_out·output + a_x·x_t (:func:`diffusion_steps.x0_coefficients`)."""
        a_out, a_x = x0_coefficients(float(self.alphas_cumprod[int(t)]), self.config.prediction_type)
        return -a_x / a_out, 1.0 / a_out

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
        arrays = self._step_inputs(model_output, x_t, t, t_prev, noise, variance_output)
        x_t = arrays["x_t"]
        if scale is not None:
            scale = np.ascontiguousarray(scale, dtype=np.float32)
            if scale.ndim > x_t.ndim or scale.shape != x_t.shape[x_t.ndim - scale.ndim :]:
                raise ValueError(f"scale shape {scale.shape} is not the trailing shape of x_t {x_t.shape}")
        x_prev, x0 = _step_outputs(out, arrays)
        coef = self.step_coefficients(t, t_prev)
        _ext.diffusion_step(
            arrays["model_output"],
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

    def _step_inputs(
        self,
        model_output: np.ndarray,
        x_t: np.ndarray,
        t: int,
        t_prev: int,
        noise: np.ndarray | None,
        variance_output: np.ndarray | None,
    ) -> dict[str, np.ndarray]:
        """The arrays the step from t reads, C-contiguous float32 and checked to share x_t's shape: ``model_output``,
        ``x_t``, and ``noise`` and ``variance_output`` where the step uses them."""
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
        return arrays


def _step_outputs(
    out: tuple[np.ndarray, np.ndarray | None] | None, arrays: dict[str, np.ndarray]
) -> tuple[np.ndarray, np.ndarray | None]:
    """New ``(x_prev, x0)`` buffers, or ``out`` checked: float32 of x_t's shape, overlapping no input (x_prev may be
    x_t itself) and not each other."""
    x_t = arrays["x_t"]
    if out is None:
        return np.empty_like(x_t), np.empty_like(x_t)
    x_prev, x0 = out
    for name, a in (("out[0]", x_prev), ("out[1]", x0)):
        if a is not None and (a.shape != x_t.shape or a.dtype != np.float32 or not a.flags.c_contiguous):
            raise ValueError(f"{name} must be C-contiguous float32 of shape {x_t.shape}")
    for name, a in arrays.items():
        if (x0 is not None and np.may_share_memory(x0, a)) or (name != "x_t" and np.may_share_memory(x_prev, a)):
            raise ValueError(f"output buffers may not overlap {name} (x_prev may be x_t itself)")
    if np.may_share_memory(x_prev, x_t) and x_prev.__array_interface__ != x_t.__array_interface__:
        raise ValueError("x_prev overlaps x_t without being x_t itself")
    if x0 is not None and np.may_share_memory(x0, x_prev):
        raise ValueError("out[0] and out[1] may not overlap")
    return x_prev, x0
