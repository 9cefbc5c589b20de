"""The arithmetic of one reverse-diffusion step, on cache-sized float64 chunks, and the thread pool that runs them.

:class:`diffseg.runtime.scheduler.Scheduler` validates its arguments and calls :func:`run_chunked` with one of the
kernels below. Coefficients are float64 numbers computed from the ᾱ table; each chunk of the float32 arrays is widened
to float64, stepped, and rounded back to float32. Widening matters: x0 = (x_t − √(1−ᾱ)·ε)/√ᾱ cancels two terms
~1/√ᾱ (≈ 160 at t = 999) times larger than the result, too much for float32 arithmetic at 1e-5. Chunks are
independent, so they are dealt out to threads (numpy releases the GIL inside its ufunc loops) with results that do
not depend on the thread count.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np

__all__ = [
    "CHUNK",
    "ddim_chunk",
    "ddim_coefficients",
    "ddpm_chunk",
    "ddpm_coefficients",
    "predicted_x0",
    "run_chunked",
    "thread_map",
]

CHUNK = 1 << 15  # elements per chunk: the float64 work buffers (8 × 256 KiB) stay in L2

Kernel = Callable[[dict[str, Any], dict[str, np.ndarray], np.ndarray, np.ndarray, np.ndarray, np.ndarray], None]

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


def run_chunked(
    kernel: Kernel,
    coef: dict[str, Any],
    inputs: dict[str, np.ndarray],
    x_prev: np.ndarray,
    x0: np.ndarray,
    threads: int,
) -> None:
    """Apply ``kernel`` chunk by chunk to flat float32 arrays, widening each chunk to float64.

    Args:
        kernel: :func:`ddim_chunk` or :func:`ddpm_chunk`.
        coef: its coefficients (:func:`ddim_coefficients` / :func:`ddpm_coefficients`, plus ``noise``: bool).
        inputs: flat float32 arrays by name (``model_output``, ``x_t``, optionally ``noise``, ``variance_output``).
        x_prev: flat float32 output (may be ``inputs["x_t"]`` itself).
        x0: flat float32 output.
        threads: threads to deal the chunks to.
    """
    n = x_prev.size
    size = min(CHUNK, n)
    starts = list(range(0, n, CHUNK))
    runs = [starts[i :: max(threads, 1)] for i in range(min(max(threads, 1), len(starts)))]

    def work_on(run: list[int]) -> None:
        work = {name: np.empty(size) for name in (*inputs, "x_prev", "x0", "eps", "scratch")}
        for start in run:
            s = slice(start, min(start + CHUNK, n))
            w = {name: buf[: s.stop - s.start] for name, buf in work.items()}
            for name, a in inputs.items():
                w[name][...] = a[s]
            kernel(coef, w, w["x_prev"], w["x0"], w["eps"], w["scratch"])
            x_prev[s] = w["x_prev"]
            x0[s] = w["x0"]

    thread_map(work_on, runs, threads)


def _x0_coefficients(ab: float, prediction_type: str, clip: float | None) -> dict[str, Any]:
    return {"kind": prediction_type, "sqrt_ab": math.sqrt(ab), "sqrt_1m_ab": math.sqrt(1 - ab), "clip": clip}


def ddim_coefficients(
    ab: float, ab_prev: float, prediction_type: str, clip: float | None, eta: float, recompute: bool
) -> dict[str, Any]:
    """Float64 coefficients of a DDIM step from ᾱ_t = ``ab`` to ᾱ_prev = ``ab_prev`` (σ_t(η) of eq. 16)."""
    sigma = eta * math.sqrt(max((1 - ab_prev) / (1 - ab) * (1 - ab / ab_prev), 0.0))
    coef = _x0_coefficients(ab, prediction_type, clip)
    coef.update(
        sqrt_ab_prev=math.sqrt(ab_prev),
        direction=math.sqrt(max(1 - ab_prev - sigma**2, 0.0)),
        sigma=sigma,
        recompute=recompute,
    )
    return coef


def ddpm_coefficients(
    ab: float, ab_prev: float, prediction_type: str, clip: float | None, variance_type: str
) -> dict[str, Any]:
    """Float64 coefficients of a (respaced) DDPM step: posterior mean (eq. 7) and variance."""
    alpha_t = ab / ab_prev  # α'_t of the (respaced) step
    beta_t = 1 - alpha_t  # β'_t
    small = max((1 - ab_prev) / (1 - ab) * beta_t, 1e-20)  # posterior β̃_t, clamped as diffusers
    coef = _x0_coefficients(ab, prediction_type, clip)
    coef.update(
        c_x0=math.sqrt(ab_prev) * beta_t / (1 - ab),
        c_xt=math.sqrt(alpha_t) * (1 - ab_prev) / (1 - ab),
        log_small=math.log(small),
        log_large=math.log(beta_t),
        sigma={"fixed_small": math.sqrt(small), "fixed_large": math.sqrt(beta_t)}.get(variance_type),
    )
    return coef


def _clip(a: np.ndarray, bound: float) -> None:
    """In-place clip to [−bound, bound] (two ufunc calls: np.clip's Python wrapper costs more per small chunk)."""
    np.minimum(a, bound, out=a)
    np.maximum(a, -bound, out=a)


def _x0_and_eps(
    c: dict[str, Any], out: np.ndarray, xt: np.ndarray, x0: np.ndarray, eps_buf: np.ndarray, need_eps: bool
) -> np.ndarray:
    """x0 (into ``x0``) and, if needed, ε (``out`` itself or into ``eps_buf``), before clipping."""
    kind = c["kind"]
    if kind == "epsilon":  # x0 = (x_t − √(1−ᾱ)·ε)/√ᾱ   (DDPM eq. 15)
        np.multiply(out, -c["sqrt_1m_ab"], out=x0)
        x0 += xt
        x0 *= 1.0 / c["sqrt_ab"]
        return out
    if kind == "sample":  # ε = (x_t − √ᾱ·x0)/√(1−ᾱ)
        x0[...] = out
    else:  # v-prediction (Salimans & Ho 2022): x0 = √ᾱ·x_t − √(1−ᾱ)·v
        np.multiply(out, -c["sqrt_1m_ab"] / c["sqrt_ab"], out=x0)
        x0 += xt
        x0 *= c["sqrt_ab"]
    if not need_eps:
        return eps_buf
    np.multiply(x0, -c["sqrt_ab"], out=eps_buf)
    eps_buf += xt
    eps_buf *= 1.0 / c["sqrt_1m_ab"]
    return eps_buf


def predicted_x0(
    prediction_type: str, ab: float, clip: float | None, output: np.ndarray, x_t: np.ndarray, out: np.ndarray
) -> np.ndarray:
    """The (clipped) x0 a network output predicts at ᾱ_t = ``ab``, with the steps' own formulas, in the dtype of
    ``out`` (which may be ``output`` itself)."""
    _x0_and_eps(_x0_coefficients(ab, prediction_type, clip), output, x_t, out, out, need_eps=False)
    if clip is not None:
        _clip(out, clip)
    return out


def ddim_chunk(
    c: dict[str, Any],
    arrays: dict[str, np.ndarray],
    x_prev: np.ndarray,
    x0: np.ndarray,
    eps_buf: np.ndarray,
    scratch: np.ndarray,
) -> None:
    """One DDIM step (Song et al. 2021, eq. 12) on one float64 chunk; ``x_prev`` may alias ``arrays["x_t"]``."""
    # Variable → symbol (Song et al. 2021, DDIM):
    #   out → ε_θ(x_t, t) | x0_θ | v_θ;  xt → x_t;  x0 → f_θ(x_t, t) (predicted x0);  eps → the ε used in eq. 12;
    #   c["sqrt_ab"] → √ᾱ_t;  c["sqrt_ab_prev"] → √ᾱ_{t_prev};  c["sigma"] → σ_t(η) (eq. 16);
    #   c["direction"] → √(1 − ᾱ_{t_prev} − σ_t²);  z → noise;  x_prev → x_{t_prev}.
    out, xt = arrays["model_output"], arrays["x_t"]
    # 1. predicted x0 and ε from the network output (eq. 12, first term)
    eps = _x0_and_eps(c, out, xt, x0, eps_buf, not (c["recompute"] and c["clip"] is not None))
    # 2. clip x0; guided-diffusion then re-derives ε from the clipped x0, diffusers/MONAI keep the raw ε
    if c["clip"] is not None:
        _clip(x0, c["clip"])
        if c["recompute"]:
            np.multiply(x0, -c["sqrt_ab"], out=eps_buf)
            eps_buf += xt
            eps_buf *= 1.0 / c["sqrt_1m_ab"]
            eps = eps_buf
    # 3. x_{t_prev} = √ᾱ_prev·x0 + √(1 − ᾱ_prev − σ²)·ε + σ·z  (eq. 12); x_t was last read above, so x_prev may
    #    alias it
    np.multiply(eps, c["direction"], out=scratch)
    np.multiply(x0, c["sqrt_ab_prev"], out=x_prev)
    x_prev += scratch
    if c["noise"]:
        np.multiply(arrays["noise"], c["sigma"], out=scratch)
        x_prev += scratch


def ddpm_chunk(
    c: dict[str, Any],
    arrays: dict[str, np.ndarray],
    x_prev: np.ndarray,
    x0: np.ndarray,
    eps_buf: np.ndarray,
    scratch: np.ndarray,
) -> None:
    """One (respaced) DDPM step (Ho et al. 2020, eq. 6–7) on one float64 chunk; ``x_prev`` may alias x_t."""
    # Variable → symbol (Ho et al. 2020, DDPM; respaced as in Nichol & Dhariwal 2021):
    #   out → ε_θ | x0_θ | v_θ;  xt → x_t;  x0 → x̂0;  c["c_x0"] → √ᾱ_prev·β'_t/(1−ᾱ_t);
    #   c["c_xt"] → √α'_t·(1−ᾱ_prev)/(1−ᾱ_t);  β'_t = 1 − ᾱ_t/ᾱ_prev;  σ² → β̃_t (fixed_small), β'_t (fixed_large)
    #   or exp(f·log β'_t + (1−f)·log β̃_t), f = (v+1)/2 (learned_range);  x_prev → x_{t_prev}.
    out, xt = arrays["model_output"], arrays["x_t"]
    # 1. predicted x0 (eq. 15), clipped
    _x0_and_eps(c, out, xt, x0, eps_buf, False)
    if c["clip"] is not None:
        _clip(x0, c["clip"])
    # 2. posterior mean μ̃_t(x_t, x̂0) (eq. 7); x_t is read before x_prev is written (they may alias)
    np.multiply(xt, c["c_xt"], out=scratch)
    np.multiply(x0, c["c_x0"], out=x_prev)
    x_prev += scratch
    # 3. x_{t_prev} = μ̃ + σ·z, only for t > 0
    if not c["noise"]:
        return
    if c["sigma"] is not None:
        np.multiply(arrays["noise"], c["sigma"], out=scratch)
    else:
        v = arrays["variance_output"]  # log σ² = f·log β' + (1 − f)·log β̃, f = (v + 1)/2
        half_diff = 0.5 * (c["log_large"] - c["log_small"])
        np.multiply(v, 0.5 * half_diff, out=scratch)
        scratch += 0.5 * (c["log_small"] + half_diff)
        np.exp(scratch, out=scratch)
        scratch *= arrays["noise"]
    x_prev += scratch
