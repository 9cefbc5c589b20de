"""Every executor of the reverse-diffusion step against diffusers, on the same inputs.

The coefficients of a step are computed once (``Scheduler.step_coefficients`` → ``diffusion_steps``); the executors
only apply them: the C++ kernel (``Scheduler.step`` and the host loop's ``HostOps.step``), the ONNX step graph of the
onnxruntime device loop, and the torch device loop. Reference: diffusers ``DDIMScheduler.step`` (leading grid,
t_prev = t − T//N, injected variance noise) and ``DDPMScheduler.step`` (respaced pairs, seeded noise), in float64
with our ᾱ table; tolerance 1e-5 relative, as the scheduler's own tests.
"""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")

from layouts import bare_layout  # noqa: E402

from diffseg.runtime.diffusion_schedule import (  # noqa: E402
    PREDICTION_TYPES,
    SamplerOptions,
    SchedulerConfig,
)
from diffseg.runtime.sampling import DeviceLayout, HostOps, step_vector  # noqa: E402
from diffseg.runtime.scheduler import Scheduler  # noqa: E402

SHAPE = (2, 6, 10, 12)  # (K, *padded)


def _layout(clip: float | None) -> DeviceLayout:
    k, *padded = SHAPE
    return bare_layout(k, tuple(padded), (2, 2, 2), image_channels=1, clip=clip)


def _host(scheduler, layout, m, x, coef, z):
    ops = HostOps(layout, lambda rows, t: rows, scheduler, [], batch_size=1, cache_mb=0)
    ops.begin(x.copy(), np.zeros((1, *SHAPE[1:]), np.float32))
    ops.acc[...] = m
    ops.step(coef, z)
    return ops.final_x()


def _kernel(scheduler, layout, m, x, coef, z, t, t_prev):
    return scheduler.step(m, x, t, t_prev, noise=z)[0]


def _onnx(scheduler, layout, m, x, coef, z):
    pytest.importorskip("onnx")
    from diffseg.runtime.backends.ort_ops import OrtDeviceOps
    from diffseg.runtime.backends.ort_step_graphs import step_graph

    class CpuSession:  # what OrtDeviceOps reads of an onnxruntime backend; the step graph needs no engine
        ort_device, device_id, threads = "cpu", 0, 1

        @staticmethod
        def helper_providers():
            return ["CPUExecutionProvider"]

    ops = OrtDeviceOps(CpuSession(), layout)
    graph = step_graph(layout.samples, layout.padded, layout.clip, z is not None, False)
    session = ops.session(("step-test", z is not None), lambda: graph)
    inputs = {"acc": m, "x": x, "coef": step_vector(coef), "scale": layout.inv_weight_sum}
    if z is not None:
        inputs["noise"] = z
    out = ops.empty(x.shape)
    ops.run_graph(session, {k: ops.upload(v) for k, v in inputs.items()}, {"x_prev": out})
    return out.numpy()


def _torch(scheduler, layout, m, x, coef, z):
    from diffseg.runtime.backends.torch_backend import TorchDeviceOps

    class CpuEngine:  # what TorchDeviceOps reads of the torch backend; the step needs no engine
        device = "cpu"

    CpuEngine.torch = torch
    ops = TorchDeviceOps(CpuEngine(), layout)
    ops.begin(x, np.zeros((1, *SHAPE[1:]), np.float32))
    ops.acc = torch.from_numpy(m.copy())
    ops.step(coef, z)
    return ops.final_x()


EXECUTORS = {"kernel": _kernel, "host_ops": _host, "onnx_graph": _onnx, "torch_ops": _torch}


def _run(name, scheduler, m, x, z, t, t_prev):
    coef = scheduler.step_coefficients(t, t_prev)
    config = scheduler.config
    layout = _layout(config.clip_range if config.clip_sample else None)
    noise = z if scheduler.needs_noise(t, t_prev) else None
    if name == "kernel":
        return _kernel(scheduler, layout, m, x, coef, noise, t, t_prev)
    return EXECUTORS[name](scheduler, layout, m, x, coef, noise)


def _assert_rel(got, ref, tol=1e-5):
    got, ref = np.asarray(got, np.float64), np.asarray(ref, np.float64)
    err = np.max(np.abs(got - ref)) / max(np.max(np.abs(ref)), 1e-30)
    assert err <= tol, f"relative error {err:.3g} > {tol:g}"


def _randn(seed):
    return np.random.default_rng(seed).standard_normal(SHAPE).astype(np.float32)


def _t64(a):
    return torch.from_numpy(np.asarray(a, np.float64))


@pytest.mark.parametrize("executor", list(EXECUTORS))
@pytest.mark.parametrize("pred", PREDICTION_TYPES)
@pytest.mark.parametrize(("eta", "clip", "recompute"), [(0.0, True, False), (0.8, False, False), (0.5, True, True)])
def test_ddim_step_of_every_executor_matches_diffusers(executor, pred, eta, clip, recompute):
    config = SchedulerConfig(prediction_type=pred, clip_sample=clip)
    ours = Scheduler(config, SamplerOptions(eta=eta, eps_convention="recompute" if recompute else "raw", threads=1))
    ref = diffusers.DDIMScheduler(prediction_type=pred, clip_sample=clip)
    ref.alphas_cumprod = _t64(ours.alphas_cumprod)
    ref.final_alpha_cumprod = torch.tensor(ours.final_alpha_cumprod, dtype=torch.float64)
    ref.set_timesteps(10)
    x, m, z = _randn(1), _randn(2), _randn(3)
    for t in ref.timesteps.tolist()[::3]:
        got = _run(executor, ours, m, x, z, t, t - 100)
        want = ref.step(
            _t64(m), t, _t64(x), eta=eta, use_clipped_model_output=recompute, variance_noise=_t64(z), return_dict=False
        )[0]
        assert got.dtype == np.float32
        _assert_rel(got, want.numpy())


@pytest.mark.parametrize("executor", list(EXECUTORS))
@pytest.mark.parametrize("pred", PREDICTION_TYPES)
@pytest.mark.parametrize("variance", ["fixed_small", "fixed_large"])
def test_ddpm_step_of_every_executor_matches_diffusers(executor, pred, variance):
    config = SchedulerConfig(prediction_type=pred, variance_type=variance)
    ours = Scheduler(config, SamplerOptions(sampler="ddpm", steps=10, threads=1))
    ref = diffusers.DDPMScheduler(prediction_type=pred, variance_type=variance)
    ref.alphas_cumprod = _t64(ours.alphas_cumprod)
    ref.set_timesteps(10)
    x, m = _randn(9), _randn(10)
    for t, t_prev in ours.pairs()[[0, 4, 9]].tolist():
        want = ref.step(_t64(m), int(t), _t64(x), generator=torch.Generator().manual_seed(int(t))).prev_sample
        z = torch.randn(SHAPE, generator=torch.Generator().manual_seed(int(t)), dtype=torch.float64).float().numpy()
        _assert_rel(_run(executor, ours, m, x, z, t, t_prev), want.numpy())
