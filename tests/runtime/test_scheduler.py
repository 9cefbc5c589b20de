"""The numpy scheduler against diffusers 0.42 and MONAI 1.6.1 schedulers and an in-house guided-diffusion reference.

Tolerance convention: ``assert_rel(got, ref, tol)`` checks max|got − ref| ≤ tol · max|ref| (relative to the array's
scale; element-wise relative error is meaningless where x_t − √ᾱ·x0 cancels). Unless a test says otherwise the
reference runs in float64 with our float64 ᾱ table injected, so that it isolates the definitions from the
float32 rounding of diffusers'/MONAI's own ᾱ tables (compared separately).
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from diffusers import DDIMScheduler, DDPMScheduler
from monai.networks.schedulers import DDIMScheduler as MonaiDDIM
from monai.networks.schedulers import DDPMScheduler as MonaiDDPM

from diffseg.runtime.diffusion_schedule import (
    PREDICTION_TYPES,
    SamplerOptions,
    SchedulerConfig,
    make_alphas_cumprod,
    timestep_pairs,
)
from diffseg.runtime.scheduler import Scheduler

SHAPE = (2, 1, 16, 32, 40)  # 40,960 voxels
BIG = (2, 1, 32, 64, 64)  # 262,144 voxels: four of the step kernel's 65,536-element thread shares


def assert_rel(got: np.ndarray, ref: np.ndarray, tol: float = 1e-5) -> None:
    got, ref = np.asarray(got, np.float64), np.asarray(ref, np.float64)
    assert got.shape == ref.shape
    err = np.max(np.abs(got - ref)) / max(np.max(np.abs(ref)), 1e-30)
    assert err <= tol, f"relative error {err:.3g} > {tol:g}"


def randn(seed: int, shape=SHAPE) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal(shape).astype(np.float32)


def t64(a: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.asarray(a, np.float64))


# -- tables and grids ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("schedule", ["linear", "scaled_linear", "squaredcos_cap_v2"])
def test_alphas_cumprod_match_diffusers(schedule):
    # Reference: diffusers' float32 table; our float64 accumulation differs by float32 rounding only (rtol
    # 1e-6).
    ours = make_alphas_cumprod(SchedulerConfig(beta_schedule=schedule))
    ref = DDIMScheduler(beta_schedule=schedule).alphas_cumprod.double().numpy()
    np.testing.assert_allclose(ours, ref, rtol=1e-6)


def test_alphas_cumprod_check_values_and_monai():
    # Reference: diffusion-sampling.md §2.1 check values (3 digits) and MONAI's linear_beta table (rtol 1e-6).
    ours = make_alphas_cumprod(SchedulerConfig(beta_schedule="linear_beta"))
    np.testing.assert_allclose(ours[[999, 899, 0]], [4.04e-5, 2.75e-4, 0.9999], rtol=2e-3)
    np.testing.assert_allclose(ours, MonaiDDIM().alphas_cumprod.double().numpy(), rtol=1e-6)
    gd = np.cumprod(1 - np.linspace(1e-4, 0.02, 1000, dtype=np.float64))  # guided-diffusion: float64 β
    np.testing.assert_allclose(make_alphas_cumprod(SchedulerConfig(beta_dtype="float64")), gd, rtol=1e-15)


@pytest.mark.parametrize("spacing", ["leading", "trailing", "linspace"])
@pytest.mark.parametrize("steps", [1, 3, 7, 10, 50, 1000])
def test_timestep_grid_matches_diffusers(spacing, steps):
    # Reference: diffusers DDPMScheduler.set_timesteps grid and previous_timestep (exact).
    pairs = timestep_pairs(1000, steps, spacing)
    ref = DDPMScheduler(timestep_spacing=spacing)
    ref.set_timesteps(steps)
    np.testing.assert_array_equal(pairs[:, 0], ref.timesteps.numpy())
    np.testing.assert_array_equal(pairs[:, 1], [int(ref.previous_timestep(int(t))) for t in pairs[:, 0]])


@pytest.mark.parametrize("steps", [10, 25, 100])
def test_respacing_grids_match_guided_diffusion(steps):
    # Reference: guided-diffusion space_timesteps, single section (round(i·stride)) and "ddimN" (range(0, T,
    # T//N)), re-implemented here from its definition.
    stride = (1000 - 1) / (steps - 1)
    taken = sorted({round(i * stride) for i in range(steps)}, reverse=True)
    np.testing.assert_array_equal(timestep_pairs(1000, steps, "linspace")[:, 0], taken)
    ddim = sorted(range(0, 1000, 1000 // steps), reverse=True)
    np.testing.assert_array_equal(timestep_pairs(1000, steps, "leading")[:, 0], ddim)


# -- DDIM ----------------------------------------------------------------------------------------------------


def _ddim_case(pred, clip, one, eta, recompute):
    config = SchedulerConfig(prediction_type=pred, clip_sample=clip, set_alpha_to_one=one)
    ours = Scheduler(config, SamplerOptions(eta=eta, eps_convention="recompute" if recompute else "raw"))
    return config, ours


@pytest.mark.parametrize("pred", PREDICTION_TYPES)
@pytest.mark.parametrize("clip", [True, False])
@pytest.mark.parametrize("one", [True, False])
@pytest.mark.parametrize("eta", [0.0, 0.8])
@pytest.mark.parametrize("recompute", [False, True])
def test_ddim_step_matches_diffusers(pred, clip, one, eta, recompute):
    # Reference: diffusers DDIMScheduler.step (leading grid, t_prev = t − T//N) in float64 with our ᾱ table,
    # use_clipped_model_output = our "recompute", injected variance_noise; tolerance 1e-5 relative.
    _, ours = _ddim_case(pred, clip, one, eta, recompute)
    ref = DDIMScheduler(prediction_type=pred, clip_sample=clip, set_alpha_to_one=one)
    ref.alphas_cumprod = t64(ours.alphas_cumprod)
    ref.final_alpha_cumprod = torch.tensor(ours.final_alpha_cumprod, dtype=torch.float64)
    ref.set_timesteps(10)
    x, out, z = randn(1), randn(2), randn(3)
    for t in ref.timesteps.tolist():
        noise = z if ours.needs_noise(t, t - 100) else None
        got = ours.step(out, x, t, t - 100, noise=noise)
        want = ref.step(
            t64(out), t, t64(x), eta=eta, use_clipped_model_output=recompute, variance_noise=t64(z), return_dict=False
        )
        for g, w in zip(got, want, strict=True):
            assert g.dtype == np.float32
            assert_rel(g, w.numpy())


@pytest.mark.parametrize("pred", PREDICTION_TYPES)
def test_ddim_step_matches_stock_diffusers_float32(pred):
    # Reference: diffusers out of the box (its float32 ᾱ table, float32 arithmetic). Tolerance 5e-5: diffusers
    # stores 1 − ᾱ_0 = 1e-4 in float32 (≈ 6e-4 relative error on √(1 − ᾱ_0)), seen at the last steps.
    _, ours = _ddim_case(pred, True, True, 0.5, False)
    ref = DDIMScheduler(prediction_type=pred)
    ref.set_timesteps(10)
    x, out, z = randn(4), randn(5), randn(6)
    for t in ref.timesteps.tolist():
        got = ours.step(out, x, t, t - 100, noise=z if ours.needs_noise(t, t - 100) else None)
        want = ref.step(torch.from_numpy(out), t, torch.from_numpy(x), eta=0.5, variance_noise=torch.from_numpy(z))
        assert_rel(got[0], want.prev_sample.numpy(), 5e-5)
        assert_rel(got[1], want.pred_original_sample.numpy(), 5e-5)


@pytest.mark.parametrize("pred", PREDICTION_TYPES)
@pytest.mark.parametrize("eta", [0.0, 0.6])
def test_ddim_step_matches_monai(pred, eta):
    # Reference: MONAI 1.6.1 DDIMScheduler. Its grid is linspace(T−1, 0, N).round() (PR #8623) while step()
    # uses t_prev = t − T//N: both are pinned here, then each step is compared (float64, our ᾱ; 1e-5
    # relative).
    ref = MonaiDDIM(prediction_type=pred, clip_sample=True)
    ref.set_timesteps(10)
    np.testing.assert_array_equal(ref.timesteps.numpy(), np.linspace(999, 0, 10).round())
    ours = Scheduler(SchedulerConfig(prediction_type=pred), SamplerOptions(eta=eta))
    ref.alphas_cumprod = t64(ours.alphas_cumprod)
    ref.final_alpha_cumprod = torch.tensor(1.0, dtype=torch.float64)
    x, out = randn(7), randn(8)
    for t in ref.timesteps.tolist():
        z = torch.randn(SHAPE, dtype=torch.float64, generator=torch.Generator().manual_seed(t))
        want = ref.step(t64(out), t, t64(x), eta=eta, generator=torch.Generator().manual_seed(t))
        got = ours.step(out, x, t, t - 100, noise=z.float().numpy() if ours.needs_noise(t, t - 100) else None)
        assert_rel(got[0], want[0].numpy())
        assert_rel(got[1], want[1].numpy())


# -- DDPM ----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("variance", ["fixed_small", "fixed_large", "learned_range"])
@pytest.mark.parametrize("pred", PREDICTION_TYPES)
@pytest.mark.parametrize("steps", [10, 1000])
def test_ddpm_step_matches_diffusers(variance, pred, steps):
    # Reference: diffusers DDPMScheduler.step (respaced: t_prev = next grid entry) in float64 with our ᾱ
    # table; its noise comes from a seeded torch generator, reproduced here; 1e-5 relative.
    channels = 2 if variance == "learned_range" else 1
    config = SchedulerConfig(prediction_type=pred, variance_type=variance, output_channels=channels)
    ours = Scheduler(config, SamplerOptions(sampler="ddpm", steps=steps))
    ref = DDPMScheduler(prediction_type=pred, variance_type=variance)
    ref.alphas_cumprod = t64(ours.alphas_cumprod)
    ref.set_timesteps(steps)
    x, out = randn(9), randn(10)
    v = np.random.default_rng(11).uniform(-1, 1, SHAPE).astype(np.float32)
    model = np.concatenate([out, v], axis=1) if channels == 2 else out
    pairs = ours.pairs()
    for t, t_prev in pairs if steps <= 10 else pairs[[0, 1, 500, 998, 999]]:
        want = ref.step(t64(model), int(t), t64(x), generator=torch.Generator().manual_seed(int(t)))
        z = torch.randn(model[:, :1].shape, generator=torch.Generator().manual_seed(int(t)), dtype=torch.float64)
        noise = z.float().numpy() if ours.needs_noise(t, t_prev) else None
        got = ours.step(out, x, t, t_prev, noise=noise, variance_output=v)
        assert_rel(got[0], want.prev_sample.numpy())
        assert_rel(got[1], want.pred_original_sample.numpy())


@pytest.mark.parametrize("variance", ["fixed_small", "fixed_large"])
def test_ddpm_step_matches_monai_full_chain(variance):
    # Reference: MONAI 1.6.1 DDPMScheduler at N = T only (its step uses ᾱ[t−1], β[t], α[t] whatever N),
    # float64 tables injected; 1e-5 relative.
    ours = Scheduler(SchedulerConfig(variance_type=variance), SamplerOptions(sampler="ddpm", steps=1000))
    ref = MonaiDDPM(variance_type=variance)
    ref.set_timesteps(1000)
    ab = ours.alphas_cumprod
    ref.alphas_cumprod = t64(ab)
    ref.alphas = t64(ab / np.append(1.0, ab[:-1]))
    ref.betas = 1 - ref.alphas
    x, out = randn(12), randn(13)
    for t in (999, 600, 1, 0):
        want = ref.step(t64(out), t, t64(x), generator=torch.Generator().manual_seed(t))
        z = torch.randn(SHAPE, dtype=torch.float64, generator=torch.Generator().manual_seed(t))
        got = ours.step(out, x, t, t - 1, noise=z.float().numpy() if t > 0 else None)
        assert_rel(got[0], want[0].numpy())
        assert_rel(got[1], want[1].numpy())


# -- guided-diffusion respacing: in-house float64 reference --------------------------------------------------


def gd_respaced(ab_full: np.ndarray, kept: np.ndarray):
    """guided-diffusion SpacedDiffusion tables: β recomputed from the kept ᾱ (ascending t), ᾱ_prev with 1.0."""
    ab = ab_full[np.sort(kept)]
    betas = 1 - ab / np.append(1.0, ab[:-1])
    ab_prev = np.append(1.0, ab[:-1])
    post_var = betas * (1 - ab_prev) / (1 - ab)
    post_log_clipped = np.log(np.append(post_var[1], post_var[1:]))
    return ab, ab_prev, betas, post_log_clipped


def gd_ddim_step(i, ab, ab_prev, x, eps_model, eta, noise):
    """guided-diffusion ddim_sample at respaced index i, ε target, clip_denoised=True."""
    x0 = np.clip(np.sqrt(1 / ab[i]) * x - np.sqrt(1 / ab[i] - 1) * eps_model, -1, 1)
    eps = (np.sqrt(1 / ab[i]) * x - x0) / np.sqrt(1 / ab[i] - 1)
    sigma = eta * np.sqrt((1 - ab_prev[i]) / (1 - ab[i])) * np.sqrt(1 - ab[i] / ab_prev[i])
    mean = x0 * np.sqrt(ab_prev[i]) + np.sqrt(1 - ab_prev[i] - sigma**2) * eps
    return mean + (i != 0) * sigma * noise, x0


def gd_p_sample(i, tables, x, eps_model, v, noise):
    """guided-diffusion p_sample at respaced index i, learned_range variance, ε target, clip_denoised=True."""
    ab, ab_prev, betas, post_log_clipped = tables
    x0 = np.clip(np.sqrt(1 / ab[i]) * x - np.sqrt(1 / ab[i] - 1) * eps_model, -1, 1)
    c1 = betas[i] * np.sqrt(ab_prev[i]) / (1 - ab[i])
    c2 = (1 - ab_prev[i]) * np.sqrt(1 - betas[i]) / (1 - ab[i])
    frac = (v + 1) / 2
    log_var = frac * np.log(betas[i]) + (1 - frac) * post_log_clipped[i]
    return c1 * x0 + c2 * x + (i != 0) * np.exp(0.5 * log_var) * noise, x0


@pytest.mark.parametrize("eta", [0.0, 1.0])
def test_ddim_recompute_matches_guided_diffusion_respacing(eta):
    # Reference: guided-diffusion ddim_sample on space_timesteps(1000, [10]) (float64, formulas above); our
    # linspace pairs + eps_convention "recompute" + float64 β; 1e-5 relative, every step on fresh random
    # inputs.
    config = SchedulerConfig(beta_dtype="float64")
    ours = Scheduler(config, SamplerOptions(steps=10, eta=eta, timestep_spacing="linspace", eps_convention="recompute"))
    pairs = ours.pairs()
    ab, ab_prev, _, _ = gd_respaced(ours.alphas_cumprod, pairs[:, 0])
    for k, (t, t_prev) in enumerate(pairs):
        i = len(pairs) - 1 - k  # respaced index counts up from the end of the chain
        x, out, z = randn(20 + k), 3 * randn(40 + k), randn(60 + k)  # 3·ε: x0 far outside [-1, 1], clipping active
        want = gd_ddim_step(i, ab, ab_prev, x.astype(np.float64), out.astype(np.float64), eta, z)
        got = ours.step(out, x, t, t_prev, noise=z if ours.needs_noise(t, t_prev) else None)
        assert_rel(got[0], want[0])
        assert_rel(got[1], want[1])


def test_ddpm_learned_range_matches_guided_diffusion_respacing():
    # Reference: guided-diffusion p_sample with learn_sigma on space_timesteps(1000, [25]) (float64); 1e-5
    # relative.
    config = SchedulerConfig(beta_dtype="float64", variance_type="learned_range", output_channels=2)
    ours = Scheduler(config, SamplerOptions(sampler="ddpm", steps=25, timestep_spacing="linspace"))
    pairs = ours.pairs()
    tables = gd_respaced(ours.alphas_cumprod, pairs[:, 0])
    for k, (t, t_prev) in enumerate(pairs):
        i = len(pairs) - 1 - k
        x, out, z = randn(80 + k), randn(110 + k), randn(140 + k)
        v = np.random.default_rng(k).uniform(-1, 1, SHAPE).astype(np.float32)
        want = gd_p_sample(i, tables, x.astype(np.float64), out.astype(np.float64), v.astype(np.float64), z)
        got = ours.step(out, x, t, t_prev, noise=z if ours.needs_noise(t, t_prev) else None, variance_output=v)
        assert_rel(got[0], want[0])
        assert_rel(got[1], want[1])


# -- behaviour -----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("sampler", ["ddim", "ddpm"])
def test_in_place_step_equals_out_of_place(sampler):
    # Reference: the same step without output buffers (bit-exact).
    ours = Scheduler(SchedulerConfig(), SamplerOptions(sampler=sampler, eta=0.3 if sampler == "ddim" else 0.0))
    x, out, z = randn(1), randn(2), randn(3)
    want = ours.step(out, x, 800, 700, noise=z)
    x0 = np.empty_like(x)
    got = ours.step(out, x, 800, 700, noise=z, out=(x, x0))
    assert got[0] is x and got[1] is x0
    np.testing.assert_array_equal(x, want[0])
    np.testing.assert_array_equal(x0, want[1])


@pytest.mark.parametrize("sampler", ["ddim", "ddpm"])
def test_threads_give_identical_steps(sampler):
    # Reference: the single-threaded step (bit-exact); BIG spans four thread shares, dealt out to 1 vs 4 threads.
    config = SchedulerConfig(variance_type="learned_range", output_channels=2)
    x, out, z, v = randn(1, BIG), randn(2, BIG), randn(3, BIG), np.tanh(randn(4, BIG))
    steps = [
        Scheduler(config, SamplerOptions(sampler=sampler, eta=0.0, threads=n)).step(
            out, x, 800, 700, noise=z, variance_output=v
        )
        for n in (1, 4)
    ]
    for a, b in zip(*steps, strict=True):
        np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("pred", PREDICTION_TYPES)
def test_output_for_x0_round_trips(pred):
    # Reference: the x0 given; the step's predicted x0 must return it. Tolerance: 1e-6 plus the float32
    # rounding of the network output (a few roundings of 2^-24 relative: 4 · 2^-24), which the ε → x0 map
    # amplifies by √((1 − ᾱ)/ᾱ) (≈ 160 at t = 999).
    ours = Scheduler(SchedulerConfig(prediction_type=pred, clip_sample=False))
    x0 = np.random.default_rng(0).uniform(-1, 1, SHAPE).astype(np.float32)
    for t in (999, 500, 3):
        x_t = ours.add_noise(x0, randn(t), t)
        out = ours.output_for_x0(x0, x_t, t)
        _, pred_x0 = ours.step(out, x_t, t, t - 100)
        ab = ours.alphas_cumprod[t]
        amplification = math.sqrt((1 - ab) / ab) if pred == "epsilon" else 1.0
        assert_rel(pred_x0, x0, 1e-6 + 4 * 2**-24 * amplification * np.abs(out).max())


@pytest.mark.parametrize("pred", PREDICTION_TYPES)
@pytest.mark.parametrize("clip", [False, True])
def test_x0_for_output_equals_the_steps_x0(pred, clip):
    # Reference: the x0 that step() predicts from the same output; both run the same kernel (bit-exact).
    ours = Scheduler(SchedulerConfig(prediction_type=pred, clip_sample=clip))
    rng = np.random.default_rng(1)
    for t in (999, 500, 3):
        x_t = randn(t)
        out = rng.standard_normal(SHAPE).astype(np.float32)
        _, want = ours.step(out, x_t, t, t - 100)
        got = ours.x0_for_output(out, x_t, t)
        np.testing.assert_array_equal(got, want)
        if clip:
            assert np.abs(got).max() <= 1.0


def test_needs_noise_rules():
    ddim = Scheduler(SchedulerConfig(), SamplerOptions(eta=0.5))
    # DDIM: noise iff σ_t(η) > 0, and σ_t = 0 when ᾱ_prev = 1 or ᾱ_prev = ᾱ_t.
    assert ddim.needs_noise(900, 800) and not ddim.needs_noise(99, -1)
    no_one = Scheduler(SchedulerConfig(set_alpha_to_one=False), SamplerOptions(eta=0.5))
    assert no_one.needs_noise(99, -1) and not no_one.needs_noise(0, -1)
    assert not Scheduler(SchedulerConfig(), SamplerOptions(eta=0.0)).needs_noise(900, 800)
    ddpm = Scheduler(SchedulerConfig(), SamplerOptions(sampler="ddpm"))
    assert ddpm.needs_noise(1, 0) and not ddpm.needs_noise(0, -1)
    # Reference for σ_t(η): diffusers DDIMScheduler._get_variance (float64, our table), 1e-12 relative.
    ref = DDIMScheduler()
    ref.alphas_cumprod = t64(ddim.alphas_cumprod)
    assert math.isclose(ddim.ddim_sigma(900, 800), 0.5 * math.sqrt(ref._get_variance(900, 800)), rel_tol=1e-12)


@pytest.mark.parametrize(
    ("mapping", "message"),
    [
        ({"num_train_timesteps": 1000, "beta_shedule": "linear"}, "unknown diffusion keys"),
        ({"prediction_type": "noise"}, "prediction_type"),
        ({"beta_schedule": "sigmoid"}, "beta_schedule"),
        ({"variance_type": "learned_range"}, "output_channels == 2"),
        ({"beta_start": 0.02, "beta_end": 1e-4}, "beta_start"),
        ({"clip_range": 0.0}, "clip_range"),
        ({"output_channels": 2, "prediction_channel": 2}, "prediction_channel"),
    ],
)
def test_config_errors_name_the_field(mapping, message):
    with pytest.raises(ValueError, match=message):
        SchedulerConfig.from_dict(mapping)


def test_config_from_manifest_dict():
    manifest = {
        "num_train_timesteps": 1000,
        "beta_schedule": "cosine",
        "beta_start": 1e-4,
        "beta_end": 0.02,
        "prediction_type": "v_prediction",
        "clip_sample": True,
        "clip_range": 1.0,
        "set_alpha_to_one": True,
    }
    config = SchedulerConfig.from_dict(manifest)
    assert config.beta_schedule == "squaredcos_cap_v2" and config.prediction_type == "v_prediction"
    assert SamplerOptions(channel_order="noisy-first").channel_order == "noisy_first"


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"sampler": "ddpm", "eta": 0.5}, "eta applies to the ddim"),
        ({"steps": 0}, "steps"),
        ({"eta": -1.0}, "eta"),
        ({"timestep_spacing": "karras"}, "timestep_spacing"),
        ({"eps_convention": "clipped"}, "eps_convention"),
        ({"channel_order": "last"}, "channel_order"),
        ({"num_samples": 0}, "num_samples"),
        ({"threads": -1}, "threads"),
    ],
)
def test_sampler_options_errors(kwargs, message):
    with pytest.raises(ValueError, match=message):
        SamplerOptions(**kwargs)


def test_step_errors():
    ddim = Scheduler(SchedulerConfig(), SamplerOptions(eta=1.0))
    x = randn(0, (2, 3))
    with pytest.raises(ValueError, match="pass noise"):
        ddim.step(x, x, 900, 800)
    with pytest.raises(ValueError, match="t_prev < t"):
        ddim.step(x, x, 800, 900, noise=x)
    with pytest.raises(ValueError, match="shape"):
        ddim.step(x[:1], x, 900, 800, noise=x)
    with pytest.raises(ValueError, match="may not overlap"):
        ddim.step(x.copy(), x, 900, 800, noise=x, out=(np.empty_like(x), x))
    with pytest.raises(ValueError, match="steps must be in"):
        timestep_pairs(1000, 1001, "leading")
    learned = SchedulerConfig(variance_type="learned_range", output_channels=2)
    with pytest.raises(ValueError, match="variance_output"):
        Scheduler(learned, SamplerOptions(sampler="ddpm")).step(x, x, 900, 800, noise=x)
    flat = randn(0, (12,))
    with pytest.raises(ValueError, match="overlaps x_t without being"):
        ddim.step(x, flat[:6].reshape(2, 3), 900, 800, noise=x, out=(flat[3:9].reshape(2, 3), None))
    with pytest.raises(ValueError, match="trailing shape"):
        ddim.step(x, x, 900, 800, noise=x, scale=np.ones(2, np.float32))
    with pytest.raises(ValueError, match="may not overlap"):
        buf = np.empty_like(x)
        ddim.step(x, x.copy(), 900, 800, noise=x, out=(buf, buf))


@pytest.mark.parametrize("sampler", ["ddim", "ddpm"])
def test_scale_equals_scaling_the_output_first(sampler):
    # Reference: the same step on model_output·scale (rounded to float32 first, where the kernel multiplies in
    # double: a relative difference of float32 rounding, amplified by at most the ε → x0 map at t = 800).
    ours = Scheduler(SchedulerConfig(), SamplerOptions(sampler=sampler, eta=0.4 if sampler == "ddim" else 0.0))
    x, out, z = randn(1), randn(2), randn(3)
    scale = np.random.default_rng(5).uniform(0.5, 4.0, SHAPE[1:]).astype(np.float32)
    want_prev, want_x0 = ours.step(out * scale, x, 800, 700, noise=z)
    got_prev, got_x0 = ours.step(out, x, 800, 700, noise=z, scale=scale)
    ab = ours.alphas_cumprod[800]
    tol = 1e-6 + 2 * 2**-24 * math.sqrt((1 - ab) / ab)
    assert_rel(got_prev, want_prev, tol)
    assert_rel(got_x0, want_x0, tol)
    # without an x0 buffer, x_prev is the same to the bit and x0 is not written
    x_prev = np.empty_like(x)
    prev, none = ours.step(out, x, 800, 700, noise=z, scale=scale, out=(x_prev, None))
    assert prev is x_prev and none is None
    np.testing.assert_array_equal(x_prev, got_prev)


def test_step_kernel_argument_errors():
    # The compiled kernel names the argument and the problem.
    from diffseg import _ext
    from diffseg.runtime.diffusion_steps import ddim_coefficients

    coef = ddim_coefficients(0.5, 0.7, "epsilon", None, 0.0, False, False)
    x = randn(0, (4, 5))
    with pytest.raises(ValueError, match="x_t must be float32"):
        _ext.diffusion_step(x, x.astype(np.float64), coef, x_prev=x.copy())
    with pytest.raises(ValueError, match="model_output must be C-contiguous"):
        _ext.diffusion_step(np.asfortranarray(x), x, coef, x_prev=x.copy())
    with pytest.raises(ValueError, match="x_prev has shape"):
        _ext.diffusion_step(x, x, coef, x_prev=np.empty((5, 4), np.float32))
    with pytest.raises(ValueError, match="lack 'A'"):
        _ext.diffusion_step(x, x, {k: v for k, v in coef.items() if k != "A"}, x_prev=x.copy())
    with pytest.raises(ValueError, match="pass noise"):
        _ext.diffusion_step(x, x, {**coef, "noise": "constant", "sigma": 1.0}, x_prev=x.copy())
    with pytest.raises(ValueError, match="different buffers"):
        buf = x.copy()
        _ext.diffusion_step(x, x, coef, x_prev=buf, x0=buf)
    with pytest.raises(ValueError, match="trailing axes"):
        _ext.diffusion_step(x, x, coef, x_prev=x.copy(), scale=np.ones(4, np.float32))
