"""The coefficients of one reverse-diffusion step, and the thread pool the sampler uses for its per-sample work.

Every step the runtime supports (DDIM with η ≥ 0, DDPM with fixed or learned variance; ε, x0 or v prediction;
clipping; both ε conventions) is one element-wise form once its float64 coefficients are known:

    x0 = a_out·m + a_x·x_t;  x0c = clip(x0);  x_prev = A·x0c + B·m + C·x_t + σ·z

with m the network output and σ a constant or exp(L1·v + L0) of a learned-variance channel v. This module derives
(a_out, a_x, A, B, C, σ, L1, L0) from ᾱ_t and ᾱ_prev with the papers' equations; ``diffseg._ext.diffusion_step``
applies them in one pass, each element widened to double (x0 = (x_t − √(1−ᾱ)·ε)/√ᾱ cancels terms ~160 times larger
than the result at t = 999, too much for float32 arithmetic at 1e-5), and the device-resident ONNX step applies
the same form on a GPU.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

__all__ = ["ddim_coefficients", "ddim_sigma", "ddpm_coefficients", "thread_map", "x0_coefficients", "x0_only"]

_EXECUTORS: dict[int, ThreadPoolExecutor] = {}


def thread_map(fn: Callable[[Any], Any], items: Iterable[Any], threads: int) -> list[Any]:
    """``[fn(item) for item in items]`` on a shared pool of ``threads`` threads (inline when 1 thread or 1 item).

    Args:
        fn: the work for one item; items must touch disjoint memory.
        items: the work items.
        threads: pool size.

    Returns:
        The results in item order.
    """
    items = list(items)
    if threads <= 1 or len(items) <= 1:
        return [fn(item) for item in items]
    pool = _EXECUTORS.get(threads)
    if pool is None:
        pool = _EXECUTORS.setdefault(threads, ThreadPoolExecutor(threads, thread_name_prefix="diffseg-numpy"))
    return list(pool.map(fn, items))


def x0_coefficients(ab: float, prediction_type: str) -> tuple[float, float]:
    """(a_out, a_x) with x0 = a_out·m + a_x·x_t for a network output m of ``prediction_type`` at ᾱ_t = ``ab``.

    ε: x0 = (x_t − √(1−ᾱ)·ε)/√ᾱ (DDPM eq. 15); x0: x0 = m; v (Salimans & Ho 2022): x0 = √ᾱ·x_t − √(1−ᾱ)·v.
    """
    sqrt_ab, sqrt_1m_ab = math.sqrt(ab), math.sqrt(1 - ab)
    if prediction_type == "epsilon":
        return -sqrt_1m_ab / sqrt_ab, 1.0 / sqrt_ab
    if prediction_type == "sample":
        return 1.0, 0.0
    return -sqrt_1m_ab, sqrt_ab


def ddim_sigma(ab: float, ab_prev: float, eta: float) -> float:
    """σ_t(η) of DDIM eq. 16: η·√((1 − ᾱ_prev)/(1 − ᾱ_t))·√(1 − ᾱ_t/ᾱ_prev)."""
    return eta * math.sqrt(max((1 - ab_prev) / (1 - ab) * (1 - ab / ab_prev), 0.0))


def _step(a_out: float, a_x: float, clip: float | None, A: float, B: float, C: float) -> dict[str, Any]:
    return {"a_out": a_out, "a_x": a_x, "clip": clip, "A": A, "B": B, "C": C, "noise": "none"}


def ddim_coefficients(
    ab: float, ab_prev: float, prediction_type: str, clip: float | None, eta: float, recompute: bool, noise: bool
) -> dict[str, Any]:
    """A DDIM step (Song et al. 2021, eq. 12) from ᾱ_t = ``ab`` to ᾱ_prev = ``ab_prev`` in the element-wise form.

    x_prev = √ᾱ_prev·x0c + √(1 − ᾱ_prev − σ²)·ε + σ·z with σ = σ_t(η) (eq. 16). The ε of eq. 12 is the network's
    own for ε-prediction; otherwise ε = (x_t − √ᾱ·x0)/√(1−ᾱ) from the unclipped x0 (diffusers, MONAI), or from the
    clipped x0 when ``recompute`` (guided-diffusion) and clipping is on. Writing ε = e_out·m + e_x·x_t + e_0·x0c:
    A = √ᾱ_prev + d·e_0, B = d·e_out, C = d·e_x with d = √(1 − ᾱ_prev − σ²).
    """
    sigma = ddim_sigma(ab, ab_prev, eta)
    direction = math.sqrt(max(1 - ab_prev - sigma**2, 0.0))
    sqrt_ab, sqrt_1m_ab = math.sqrt(ab), math.sqrt(1 - ab)
    a_out, a_x = x0_coefficients(ab, prediction_type)
    if recompute and clip is not None:
        e_out, e_x, e_0 = 0.0, 1.0 / sqrt_1m_ab, -sqrt_ab / sqrt_1m_ab
    elif prediction_type == "epsilon":
        e_out, e_x, e_0 = 1.0, 0.0, 0.0
    else:  # ε from the unclipped x0 = a_out·m + a_x·x_t
        e_out, e_x, e_0 = -sqrt_ab * a_out / sqrt_1m_ab, (1.0 - sqrt_ab * a_x) / sqrt_1m_ab, 0.0
    coef = _step(a_out, a_x, clip, math.sqrt(ab_prev) + direction * e_0, direction * e_out, direction * e_x)
    if noise:
        coef.update(noise="constant", sigma=sigma)
    return coef


def ddpm_coefficients(
    ab: float, ab_prev: float, prediction_type: str, clip: float | None, variance_type: str, noise: bool
) -> dict[str, Any]:
    """A (respaced) DDPM step (Ho et al. 2020, eq. 6–7; Nichol & Dhariwal 2021) in the element-wise form.

    x_prev = μ̃(x_t, x0c) + σ·z with μ̃ = √ᾱ_prev·β'/(1−ᾱ)·x0c + √α'·(1−ᾱ_prev)/(1−ᾱ)·x_t, α' = ᾱ/ᾱ_prev,
    β' = 1 − α'. σ² is β̃ = (1−ᾱ_prev)/(1−ᾱ)·β' (fixed_small, clamped at 1e-20 as diffusers), β' (fixed_large),
    or exp(f·log β' + (1−f)·log β̃) with f = (v+1)/2 (learned_range), so σ = exp(L1·v + L0).
    """
    alpha_t = ab / ab_prev
    beta_t = 1 - alpha_t
    small = max((1 - ab_prev) / (1 - ab) * beta_t, 1e-20)
    a_out, a_x = x0_coefficients(ab, prediction_type)
    c_x0 = math.sqrt(ab_prev) * beta_t / (1 - ab)
    c_xt = math.sqrt(alpha_t) * (1 - ab_prev) / (1 - ab)
    coef = _step(a_out, a_x, clip, c_x0, 0.0, c_xt)
    if not noise:
        return coef
    if variance_type == "learned_range":
        log_small, log_large = math.log(small), math.log(beta_t)
        half_diff = 0.5 * (log_large - log_small)
        coef.update(noise="learned", L1=0.5 * half_diff, L0=0.5 * (log_small + half_diff))
    else:
        coef.update(noise="constant", sigma=math.sqrt(small if variance_type == "fixed_small" else beta_t))
    return coef


def x0_only(ab: float, prediction_type: str, clip: float | None) -> dict[str, Any]:
    """The form's x0 part alone (x_prev not wanted): the predicted, clipped x0 of a network output."""
    return _step(*x0_coefficients(ab, prediction_type), clip, 0.0, 0.0, 0.0)
