"""The sampling loops: oracle denoisers recover a known mask; PyTorch reference loops (MONAI sliding window + diffusers
DDIM) reproduce step-major and window-major with the documented noise order; skipping, determinism, batch size."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.stats
import torch
from diffusers import DDIMScheduler
from monai.data.utils import dense_patch_slices
from monai.inferers import sliding_window_inference
from monai.inferers.utils import _get_scan_interval

from diffseg.runtime.diffusion_schedule import SchedulerConfig, make_alphas_cumprod
from diffseg.runtime.sampling import (
    SamplerOptions,
    WindowOptions,
    binary_entropy,
    sample_step_major,
    sample_window_major,
)

LOOPS = [sample_step_major, sample_window_major]
VOLUME, PATCH = (12, 20, 22), (8, 10, 12)  # 2 × 3 × 3 = 18 windows at overlap 0.25
# The oracle's own float64 ᾱ table (linear β in float32 as diffusers), independent of the scheduler code.
ALPHA_BAR = np.cumprod(1 - np.linspace(1e-4, 0.02, 1000, dtype=np.float32).astype(np.float64))


def make_case(shape=VOLUME, seed=0):
    """A mask with two boxes and a CT-like channel; image channel 0 carries 2·mask − 1 for the oracle."""
    mask = np.zeros(shape, np.uint8)
    mask[2:7, 3:9, 4:10] = 1
    mask[-4:, -6:-2, -5:] = 1
    ct = np.random.default_rng(seed).standard_normal(shape).astype(np.float32)
    return mask, np.stack([2 * mask.astype(np.float32) - 1, ct])


def oracle(prediction_type="epsilon", channel_order="image_first", output_channels=1):
    """A denoiser that reads the true x0 from image channel 0 and returns the output consistent with it."""

    def run(x, t):
        assert x.dtype == np.float32 and t.dtype == np.float32 and t.shape == (x.shape[0],)
        x0 = x[:, 1 if channel_order == "noisy_first" else 0].astype(np.float64)
        xt = x[:, 0 if channel_order == "noisy_first" else -1].astype(np.float64)
        ab = ALPHA_BAR[t.astype(int)].reshape(-1, *([1] * (x.ndim - 2)))
        out = {
            "epsilon": (xt - np.sqrt(ab) * x0) / np.sqrt(1 - ab),
            "sample": x0,
            "v_prediction": (np.sqrt(ab) * xt - x0) / np.sqrt(1 - ab),
        }[prediction_type]
        channels = [out, np.full_like(out, 0.3)][:output_channels]
        return np.stack(channels, axis=1).astype(np.float32)

    return run


def toy(x, t):
    """A nonlinear denoiser that depends on the whole window (its mean), float32 or float64 in, same out."""
    xt, pet, ct = x[:, -1:], x[:, :1], x[:, 1:2]
    window_mean = xt.mean(axis=tuple(range(2, x.ndim)), keepdims=True)
    tt = t.reshape(-1, *([1] * (x.ndim - 1))).astype(x.dtype)
    return np.tanh(0.8 * xt + 0.3 * pet - 0.2 * ct) + 0.05 * window_mean + 1e-4 * tt


ORACLE_CASES = [
    ("epsilon", SamplerOptions(num_samples=2), 1),
    ("v_prediction", SamplerOptions(num_samples=2, eta=1.0, channel_order="noisy_first"), 1),
    ("sample", SamplerOptions(num_samples=2, eta=0.5, timestep_spacing="trailing", eps_convention="recompute"), 1),
    ("epsilon", SamplerOptions(sampler="ddpm", steps=20, num_samples=2, timestep_spacing="linspace"), 2),
]


@pytest.mark.parametrize("loop", LOOPS)
@pytest.mark.parametrize(("prediction", "options", "channels"), ORACLE_CASES)
def test_oracle_recovers_the_mask(loop, prediction, options, channels):
    # Reference: the known mask. The oracle predicts the true x0 at every step, so every chain ends on it; tolerance
    # 1e-5 (float32 rounding of the oracle's output).
    mask, image = make_case()
    variance = "learned_range" if channels == 2 else "fixed_small"
    config = SchedulerConfig(prediction_type=prediction, output_channels=channels, variance_type=variance)
    result = loop(
        image,
        oracle(prediction, options.channel_order, channels),
        config,
        options,
        WindowOptions(patch_size=PATCH, batch_size=5),
    )
    assert result.probabilities.shape == (2, *VOLUME) and result.probabilities.dtype == np.float32
    np.testing.assert_allclose(result.probabilities, np.broadcast_to(mask, (2, *VOLUME)), atol=1e-5)
    np.testing.assert_allclose(result.std, 0, atol=1e-5)
    assert result.windows == 18 and result.windows_skipped == 0
    assert result.loop_order == loop.__name__.removeprefix("sample_")


def reference_step_major(image, options, seed, patch, eta):
    """PyTorch reference: MONAI sliding_window_inference on cat([image, x_t]) each step + diffusers DDIM.step with
    variance_noise, in float64 with our ᾱ table, drawing noise in the documented order."""
    rng = np.random.default_rng(seed)
    k = options.num_samples
    x = torch.from_numpy(rng.standard_normal((k, *image.shape[1:]), dtype=np.float32).astype(np.float64))
    ddim = DDIMScheduler(clip_sample=True)
    ddim.alphas_cumprod = torch.from_numpy(make_alphas_cumprod(SchedulerConfig()))
    ddim.set_timesteps(options.steps)
    images = torch.from_numpy(np.broadcast_to(image, (k, *image.shape)).astype(np.float64))
    for t in ddim.timesteps.tolist():

        def predictor(b, t=t):
            return torch.from_numpy(toy(b.numpy(), np.full(b.shape[0], t)))

        eps = sliding_window_inference(
            torch.cat([images, x[:, None]], 1), patch, 3, predictor, overlap=0.25, mode="gaussian", sigma_scale=0.125
        )
        prev = t - 1000 // options.steps
        noise = None
        if eta > 0 and ddim._get_variance(t, prev) > 0:  # the documented rule: draw only when σ_t > 0
            noise = torch.from_numpy(rng.standard_normal((k, *image.shape[1:]), dtype=np.float32).astype(np.float64))
        x = ddim.step(eps[:, 0], t, x, eta=eta, variance_noise=noise).prev_sample
    return np.clip((x.numpy() + 1) / 2, 0, 1)


@pytest.mark.parametrize(("shape", "eta"), [(VOLUME, 0.0), (VOLUME, 0.7), ((6, 20, 9), 0.7)])
def test_step_major_matches_pytorch_reference_loop(shape, eta):
    # Reference: reference_step_major above (MONAI 1.6.1 + diffusers 0.42, float64); (6, 20, 9) is padded by MONAI
    # on two axes. Tolerance 1e-5 on the probabilities.
    _, image = make_case(shape)
    options = SamplerOptions(steps=5, eta=eta, num_samples=2, seed=7)
    result = sample_step_major(image, toy, SchedulerConfig(), options, WindowOptions(patch_size=PATCH, batch_size=4))
    reference = reference_step_major(image, options, 7, PATCH, eta)
    np.testing.assert_allclose(result.probabilities, reference, atol=1e-5)
    assert result.probabilities.std() > 0.05  # not a trivially saturated output


def reference_window_major(image, options, seed, patch, eta):
    """PyTorch reference (Diff-UNet order): MONAI sliding_window_inference whose predictor runs the whole diffusers
    DDIM chain on each window (with_coord gives the window position for the crop of x_T and its noise seed)."""
    rng = np.random.default_rng(seed)
    k = options.num_samples
    spatial = image.shape[1:]
    x_init = rng.standard_normal((k, *spatial), dtype=np.float32)
    diffs = [max(p - s, 0) for p, s in zip(patch, spatial, strict=True)]
    x_init = np.pad(x_init, [(0, 0)] + [(d // 2, d - d // 2) for d in diffs])  # as MONAI pads the image
    padded = tuple(max(s, p) for s, p in zip(spatial, patch, strict=True))
    total = len(dense_patch_slices(padded, patch, _get_scan_interval(padded, patch, 3, (0.25,) * 3)))
    ddim = DDIMScheduler(clip_sample=True)
    ddim.alphas_cumprod = torch.from_numpy(make_alphas_cumprod(SchedulerConfig()))
    ddim.set_timesteps(options.steps)
    # Draw order: x_T, then one seed per window of the tiling (only when a step adds noise).
    seeds = rng.integers(0, 2**63, size=total, dtype=np.int64) if eta > 0 else None
    visited: list[int] = []  # MONAI visits the windows in tiling order (batch size 1)

    def predictor(window, coords):
        (coord,) = coords
        visited.append(len(visited))
        generator = np.random.default_rng(int(seeds[visited[-1]])) if seeds is not None else None
        img = window[0].numpy().astype(np.float64)
        x = torch.from_numpy(x_init[(slice(None), *coord[2:])].astype(np.float64))
        for t in ddim.timesteps.tolist():
            inp = np.concatenate([np.broadcast_to(img, (k, *img.shape)), x.numpy()[:, None]], 1)
            eps = torch.from_numpy(toy(inp, np.full(k, t)))[:, 0]
            prev = t - 1000 // options.steps
            noise = None
            if eta > 0 and ddim._get_variance(t, prev) > 0:
                noise = torch.from_numpy(generator.standard_normal((k, *patch), dtype=np.float32).astype(np.float64))
            x = ddim.step(eps, t, x, eta=eta, variance_noise=noise).prev_sample
        return x[None]

    out = sliding_window_inference(
        torch.from_numpy(image[None].astype(np.float64)),
        patch,
        1,
        predictor,
        overlap=0.25,
        mode="gaussian",
        sigma_scale=0.125,
        with_coord=True,
    )
    return np.clip((out[0].numpy() + 1) / 2, 0, 1)


@pytest.mark.parametrize(("shape", "eta"), [(VOLUME, 0.0), (VOLUME, 0.7), ((6, 20, 9), 0.7)])
def test_window_major_matches_pytorch_reference_loop(shape, eta):
    # Reference: reference_window_major above (MONAI 1.6.1 + diffusers 0.42, float64); tolerance 1e-5.
    _, image = make_case(shape)
    options = SamplerOptions(steps=5, eta=eta, num_samples=2, seed=11)
    result = sample_window_major(image, toy, SchedulerConfig(), options, WindowOptions(patch_size=PATCH, batch_size=4))
    np.testing.assert_allclose(result.probabilities, reference_window_major(image, options, 11, PATCH, eta), atol=1e-5)


def test_loop_orders_agree_on_a_single_window():
    # Reference: step-major. With one window (volume = patch) and η = 0 both orders run the same chain from the same
    # x_T; the only difference is the blend w·y/w (float32 rounding): 1e-6.
    _, image = make_case(PATCH)
    options = SamplerOptions(steps=6, num_samples=3)
    window = WindowOptions(patch_size=PATCH)
    a = sample_step_major(image, toy, SchedulerConfig(), options, window)
    b = sample_window_major(image, toy, SchedulerConfig(), options, window)
    np.testing.assert_allclose(a.probabilities, b.probabilities, atol=1e-6)
    assert a.windows == b.windows == 1


@pytest.mark.parametrize("loop", LOOPS)
def test_skipping_empty_windows_gives_the_same_mask(loop):
    # Reference: the same run without skipping (every window run). Windows without a candidate hold only background,
    # which the oracle predicts there; tolerance 1e-5.
    mask, image = make_case()
    config, options = SchedulerConfig(), SamplerOptions(num_samples=2, eta=0.5)
    window = WindowOptions(patch_size=PATCH, batch_size=4)
    full = loop(image, oracle(), config, options, window)
    skipped = loop(image, oracle(), config, options, window, candidate=mask.astype(bool))
    assert skipped.windows_skipped > 0 and skipped.engine_calls < full.engine_calls
    np.testing.assert_allclose(skipped.probabilities, full.probabilities, atol=1e-5)
    np.testing.assert_allclose(skipped.mean, mask, atol=1e-5)


@pytest.mark.parametrize("loop", LOOPS)
def test_determinism_and_batch_size_independence(loop):
    # Reference: the first run (bit-exact): same seed, other batch sizes, no input cache and other thread counts give
    # the same arrays.
    _, image = make_case()
    runs = [
        loop(
            image,
            toy,
            SchedulerConfig(),
            SamplerOptions(steps=4, eta=0.8, num_samples=3, seed=5, threads=threads),
            WindowOptions(patch_size=PATCH, batch_size=b, input_cache_mb=c),
        )
        for b, c, threads in [(4, 1024, 1), (1, 1024, 3), (7, 0, 2)]
    ]
    for other in runs[1:]:
        np.testing.assert_array_equal(other.probabilities, runs[0].probabilities)
    other_seed = loop(image, toy, SchedulerConfig(), SamplerOptions(steps=4, eta=0.8, num_samples=3, seed=6))
    assert not np.array_equal(other_seed.probabilities, runs[0].probabilities)


def test_engine_call_counts():
    # Reference: step-major makes steps × ceil(windows × K / batch) calls; window-major runs groups of batch // K
    # windows, each group steps × ceil(group × K / batch) calls.
    _, image = make_case()
    options, window = SamplerOptions(steps=3, num_samples=2), WindowOptions(patch_size=PATCH, batch_size=5)
    assert sample_step_major(image, toy, SchedulerConfig(), options, window).engine_calls == 3 * -(-18 * 2 // 5)
    groups = [min(2, 18 - g) for g in range(0, 18, 2)]
    expected = sum(3 * -(-g * 2 // 5) for g in groups)
    assert sample_window_major(image, toy, SchedulerConfig(), options, window).engine_calls == expected


def test_uncertainty_maps():
    # Reference: numpy mean and population std of the returned probabilities (1e-6) and scipy.stats.entropy in bits
    # of the mean (1e-5).
    _, image = make_case()
    result = sample_step_major(
        image, toy, SchedulerConfig(), SamplerOptions(steps=4, eta=1.0, num_samples=4), WindowOptions(patch_size=PATCH)
    )
    p = result.probabilities
    np.testing.assert_allclose(result.mean, p.mean(axis=0), atol=1e-6)
    np.testing.assert_allclose(result.std, p.std(axis=0), atol=1e-6)
    ref_entropy = scipy.stats.entropy(np.stack([result.mean, 1 - result.mean]).astype(np.float64), base=2, axis=0)
    np.testing.assert_allclose(result.entropy, ref_entropy, atol=1e-5)
    assert result.std.max() > 0.01  # the samples differ
    np.testing.assert_allclose(binary_entropy(np.array([0.0, 0.5, 1.0])), [0.0, 1.0, 0.0], atol=1e-7)


@pytest.mark.parametrize("loop", LOOPS)
def test_boundary_errors(loop):
    _, image = make_case()
    window = WindowOptions(patch_size=PATCH)
    with pytest.raises(ValueError, match="denoiser returned shape"):
        loop(image, lambda x, t: x[:, :1, :-1], SchedulerConfig(), SamplerOptions(steps=2), window)
    with pytest.raises(ValueError, match="image must be"):
        loop(image[0], toy, SchedulerConfig(), SamplerOptions(steps=2), window)
    with pytest.raises(ValueError, match="candidate shape"):
        loop(image, toy, SchedulerConfig(), SamplerOptions(steps=2), window, candidate=np.ones(PATCH, bool))


def counting(run):
    """Wraps a denoiser; records every (t, window content fingerprint) it is asked for."""
    calls: list[int] = []

    def wrapped(x, t):
        calls.append(x.shape[0])
        return run(x, t)

    wrapped.calls = calls  # type: ignore[attr-defined]
    return wrapped


@pytest.mark.parametrize("prediction", ["epsilon", "sample", "v_prediction"])
@pytest.mark.parametrize("cache_mb", [1024, 0])
def test_retiring_background_windows_keeps_the_result(prediction, cache_mb):
    # Reference: the same run with retirement off. The oracle predicts exactly x0 = -1 in windows without tumour, the
    # same "background" a retired task contributes, so the probabilities agree to 1e-5 while those windows stop
    # running after `retire_after` steps; with and without the input cache (rows squeezed out or refilled).
    mask, image = make_case()
    config = SchedulerConfig(prediction_type=prediction)
    options = SamplerOptions(steps=6, num_samples=2, eta=0.5)
    exact_run, retire_run = counting(oracle(prediction)), counting(oracle(prediction))
    exact = sample_step_major(image, exact_run, config, options, WindowOptions(patch_size=PATCH, batch_size=5))
    window = WindowOptions(patch_size=PATCH, batch_size=5, retire_after=2, input_cache_mb=cache_mb)
    retired = sample_step_major(image, retire_run, config, options, window)
    np.testing.assert_allclose(retired.probabilities, exact.probabilities, atol=1e-5)
    # windows whose patch holds no tumour voxel retire; each then runs exactly 2 steps instead of 6
    slices = dense_patch_slices(VOLUME, PATCH, _get_scan_interval(VOLUME, PATCH, 3, (0.25,) * 3))
    empty = sum(not mask[window].any() for window in slices)
    assert empty > 0 and retired.retired == 2 * empty
    assert exact.patch_forwards == sum(exact_run.calls) == 18 * 2 * 6
    assert retired.patch_forwards == sum(retire_run.calls) == exact.patch_forwards - 2 * empty * (6 - 2)


def test_retirement_is_per_sample_and_final():
    # Reference: the documented rule. A denoiser that predicts background everywhere for its first two calls of a
    # task and foreground later: with retire_after=2 every task retires after step 2 and the late foreground is never
    # seen (probability 0); with retire_after=3 nothing retires and the chain ends on foreground (probability 1).
    _, image = make_case(PATCH)
    seen = {"steps": 0}

    def late_foreground(x, t):
        seen["steps"] += 1
        value = -1.0 if seen["steps"] <= 2 else 1.0
        return np.full((x.shape[0], 1, *x.shape[2:]), value, np.float32)

    options = SamplerOptions(steps=5, num_samples=3)
    config = SchedulerConfig(prediction_type="sample")
    window = WindowOptions(patch_size=PATCH, batch_size=8, retire_after=2)
    early = sample_step_major(image, late_foreground, config, options, window)
    assert early.retired == 3 and early.patch_forwards == 3 * 2 and early.engine_calls == 2
    np.testing.assert_allclose(early.probabilities, 0.0, atol=1e-6)
    seen["steps"] = 0
    late = sample_step_major(image, late_foreground, config, options, WindowOptions(patch_size=PATCH, retire_after=3))
    assert late.retired == 0 and late.patch_forwards == 3 * 5
    np.testing.assert_allclose(late.probabilities, 1.0, atol=1e-6)


def test_retirement_options_are_checked():
    with pytest.raises(ValueError, match="retire_after must be an int >= 0"):
        WindowOptions(patch_size=PATCH, retire_after=-1)
    with pytest.raises(ValueError, match="retire_level must be a probability"):
        WindowOptions(patch_size=PATCH, retire_level=0.7)
    _, image = make_case()
    with pytest.raises(ValueError, match="step-major loop only"):
        window = WindowOptions(PATCH, retire_after=1)
        sample_window_major(image, toy, SchedulerConfig(), SamplerOptions(steps=2), window)
