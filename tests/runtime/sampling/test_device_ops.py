"""The device-resident step-major loop (x_t kept as OrtValues on the engine's device) against the host loop.

Run here on onnxruntime's CPU provider: the same graphs and IO bindings that run on CUDA, with "cpu" OrtValues.
"""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
from layouts import bare_layout

from diffseg.runtime.backends import BackendUnavailableError, get_backend
from diffseg.runtime.backends.ort_ops import OrtDeviceOps
from diffseg.runtime.backends.ort_step_graphs import background_graph, blend_graph, gather_graph, step_graph
from diffseg.runtime.diffusion_schedule import PREDICTION_TYPES, SchedulerConfig
from diffseg.runtime.manifest import load_package, sha256_of
from diffseg.runtime.sampling import SamplerOptions, WindowOptions, sample_step_major
from diffseg.runtime.scheduler import Scheduler

onnx = pytest.importorskip("onnx")
from onnx import TensorProto, helper  # noqa: E402

PATCH = (64, 64, 64)


@pytest.fixture(scope="module")
def ort_cpu(default_package):
    with get_backend("onnxruntime", default_package, "fp32", threads=2) as backend:
        yield backend


def _ops(backend, k: int, padded: tuple[int, ...], patch: tuple[int, ...]) -> OrtDeviceOps:
    return OrtDeviceOps(backend, bare_layout(k, padded, patch, image_channels=2))


def _run(dev: OrtDeviceOps, model, inputs: dict[str, np.ndarray], outputs: dict[str, tuple]) -> dict[str, np.ndarray]:
    # Keyed by content: id(model) can be reused once an earlier graph is freed, which handed a later graph the
    # earlier graph's cached session.
    session = dev.session(model.SerializeToString(), lambda: model)
    bound = {name: dev.empty(shape, dtype) for name, (shape, dtype) in outputs.items()}
    dev.run_graph(session, {k: dev.upload(v) for k, v in inputs.items()}, bound)
    return {name: v.numpy() for name, v in bound.items()}


@pytest.mark.parametrize("pred", PREDICTION_TYPES)
@pytest.mark.parametrize(("sampler", "eta", "clip"), [("ddim", 0.0, True), ("ddim", 0.6, False), ("ddpm", 0.0, True)])
def test_step_graph_equals_the_scheduler_step(ort_cpu, pred, sampler, eta, clip):
    # Reference: Scheduler.step (the C++ kernel) with the same scale; same double arithmetic in the same order, so
    # equal to float32 rounding of identical doubles (bit-exact expected; 1 ulp allowed for library differences).
    k, padded = 2, (5, 6, 7)
    dev = _ops(ort_cpu, k, padded, (2, 2, 2))
    rng = np.random.default_rng(3)
    acc, x, z = (rng.standard_normal((k, *padded)).astype(np.float32) for _ in range(3))
    scale = rng.uniform(0.5, 3.0, padded).astype(np.float32)
    scheduler = Scheduler(
        SchedulerConfig(prediction_type=pred, clip_sample=clip), SamplerOptions(sampler=sampler, eta=eta)
    )
    for t, t_prev in ((999, 899), (500, 400), (99, -1)):
        noisy = scheduler.needs_noise(t, t_prev)
        want, _ = scheduler.step(acc, x, t, t_prev, noise=z if noisy else None, scale=scale)
        c = scheduler.step_coefficients(t, t_prev)
        inputs = {"acc": acc, "x": x, "scale": scale}
        inputs["coef"] = np.array([c["a_out"], c["a_x"], c["A"], c["B"], c["C"], c.get("sigma", 0.0)])
        if noisy:
            inputs["noise"] = z
        got = _run(dev, step_graph(k, padded, c["clip"], noisy, False), inputs, {"x_prev": ((k, *padded), np.float32)})
        np.testing.assert_array_max_ulp(got["x_prev"], want, maxulp=1)


def test_gather_background_and_blend_graphs_equal_numpy(ort_cpu):
    # Reference: the same operations written with numpy slices.
    k, padded, patch, c_img = 2, (7, 8, 9), (4, 5, 6), 2
    dev = _ops(ort_cpu, k, padded, patch)
    rng = np.random.default_rng(4)
    x = rng.standard_normal((k, *padded)).astype(np.float32)
    image = rng.standard_normal((c_img, *padded)).astype(np.float32)
    starts = np.array([[1, 0, 3, 2], [0, 3, 1, 3], [1, 2, 2, 0]], np.int64)
    for noisy in (0, c_img):
        rows = _run(
            dev,
            gather_graph(k, padded, c_img, patch, 3, noisy),
            {"x": x, "image": image, "starts": starts},
            {"rows": ((3, c_img + 1, *patch), np.float32)},
        )["rows"]
        for j, (i, *s) in enumerate(starts):
            region = tuple(slice(a, a + p) for a, p in zip(s, patch, strict=True))
            image_channels = [c for c in range(c_img + 1) if c != noisy]
            np.testing.assert_array_equal(rows[j, noisy], x[(i, *region)])
            np.testing.assert_array_equal(rows[j, image_channels], image[(slice(None), *region)])
    bg_weight = rng.uniform(0, 2, (k, *padded)).astype(np.float32)
    got = _run(
        dev,
        background_graph(k, padded),
        {"x": x, "bg_weight": bg_weight, "pq": np.array([1.5, -0.25], np.float32)},
        {"acc": ((k, *padded), np.float32)},
    )["acc"]
    np.testing.assert_allclose(got, (np.float32(1.5) * x + np.float32(-0.25)) * bg_weight, rtol=1e-6)
    acc = rng.standard_normal((k, *padded)).astype(np.float32)
    y = rng.standard_normal((3, 2, *patch)).astype(np.float32)
    weight = rng.uniform(0.1, 1, patch).astype(np.float32)
    ax = np.array([-2.0, 0.5])
    out = _run(
        dev,
        blend_graph(k, padded, patch, 2, 1, 3),
        {"acc": acc, "y": y, "weight": weight, "starts": starts, "x": x, "ax": ax},
        {"acc_out": ((k, *padded), np.float32), "peak": ((3,), np.float64)},
    )
    want = acc.copy()
    for j, (i, *s) in enumerate(starts):
        region = (i, *(slice(a, a + p) for a, p in zip(s, patch, strict=True)))
        want[region] += y[j, 1] * weight
        assert out["peak"][j] == pytest.approx(
            (ax[0] * y[j, 1].astype(np.float64) + ax[1] * x[region]).max(), rel=1e-12
        )
    np.testing.assert_allclose(out["acc_out"], want, rtol=1e-6, atol=1e-6)


def _oracle_package(tmp_path, prediction_type: str = "sample"):
    """The default package with its fp32 engine replaced by an oracle: x0 = tanh(8·(PET channel − 0.3)), returned as
    a sample prediction. Where there is no uptake it predicts background, so windows retire."""
    root = tmp_path / "oracle"
    shutil.copytree(load_package("default").root, root)
    nodes = [
        helper.make_node("Slice", ["x", "c0", "c1", "axis1"], ["pet"]),
        helper.make_node("Sub", ["pet", "level"], ["shifted"]),
        helper.make_node("Mul", ["shifted", "gain"], ["scaled"]),
        helper.make_node("Tanh", ["scaled"], ["y0"]),
        helper.make_node("Mul", ["t", "zero"], ["t0"]),  # t is an input of every engine; the oracle ignores it
        helper.make_node("Reshape", ["t0", "shape5"], ["t5"]),
        helper.make_node("Add", ["y0", "t5"], ["y"]),
    ]
    inits = [
        helper.make_tensor("c0", TensorProto.INT64, [1], [0]),
        helper.make_tensor("c1", TensorProto.INT64, [1], [1]),
        helper.make_tensor("axis1", TensorProto.INT64, [1], [1]),
        helper.make_tensor("level", TensorProto.FLOAT, [], [0.3]),
        helper.make_tensor("gain", TensorProto.FLOAT, [], [8.0]),
        helper.make_tensor("zero", TensorProto.FLOAT, [], [0.0]),
        helper.make_tensor("shape5", TensorProto.INT64, [5], [-1, 1, 1, 1, 1]),
    ]
    graph = helper.make_graph(
        nodes,
        "oracle",
        [
            helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 3, *PATCH]),
            helper.make_tensor_value_info("t", TensorProto.FLOAT, ["batch"]),
        ],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 1, *PATCH])],
        inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    model.ir_version = 8
    onnx.save(model, root / "denoiser.onnx")
    manifest = json.loads((root / "manifest.json").read_text())
    manifest["files"]["fp32"]["sha256"] = sha256_of(root / "denoiser.onnx")
    (root / "manifest.json").write_text(json.dumps(manifest))
    return load_package(root)


@pytest.mark.parametrize(("eta", "shape"), [(0.0, (40, 150, 170)), (0.7, (80, 150, 170))])
def test_device_loop_equals_host_loop(tmp_path, eta, shape):
    # Reference: the host loop on the same engine, seed and noise. Covers skipped windows, retirement, an axis shorter
    # than the patch (padding), and stochastic steps. Tolerance: float32 rounding of the background terms, which the
    # device loop sums per sample before weighting (1e-6).
    package = _oracle_package(tmp_path)
    config = SchedulerConfig.from_dict(package.manifest.diffusion)
    rng = np.random.default_rng(7)
    image = np.full((2, *shape), -0.5, np.float32)
    image[1] = rng.uniform(-0.2, 0.2, shape)
    image[0, 10:30, 40:70, 50:90] = 1.0  # one hot spot: the PET channel
    candidate = image[0] > 0.5
    candidate[5:8, 100:110, 120:130] = True  # a candidate window without uptake: runs, then retires
    options = SamplerOptions(
        steps=5, num_samples=2, eta=eta, timestep_spacing="linspace", eps_convention="recompute", seed=11
    )
    window = WindowOptions(patch_size=PATCH, overlap=0.25, batch_size=3, retire_after=1)
    with get_backend("onnxruntime", package, "fp32", threads=2) as backend:
        host = sample_step_major(image, backend.run, config, options, window, candidate=candidate)
        device = sample_step_major(
            image, None, config, options, window, candidate=candidate, device_ops=backend.device_ops
        )
    assert host.windows_skipped > 0 and host.retired > 0
    assert (device.windows_skipped, device.retired, device.patch_forwards, device.engine_calls) == (
        host.windows_skipped,
        host.retired,
        host.patch_forwards,
        host.engine_calls,
    )
    np.testing.assert_allclose(device.probabilities, host.probabilities, atol=1e-6)
    np.testing.assert_allclose(device.std, host.std, atol=1e-6)


def test_segmenter_device_loop_choice(default_package):
    # On the CPU the default is the host loop; asking the device loop of a backend that cannot is an error.
    from diffseg.runtime.segmenter import Segmenter

    with Segmenter("default", backend="onnxruntime", steps=2, samples=1) as seg:
        assert seg.device_loop is False and seg.settings()["device_loop"] is False
    with Segmenter("default", backend="onnxruntime", steps=2, samples=1, device_loop=True) as seg:
        assert seg.device_loop is True
    with pytest.raises(ValueError, match="device_loop needs a backend with device ops"):
        Segmenter("default", backend="openvino", precision="fp32", device_loop=True)
    with pytest.raises(ValueError, match="device_loop needs"):
        Segmenter("default", backend="onnxruntime", loop_order="window-major", device_loop=True)
    with get_backend("openvino", default_package, "fp32") as backend:
        assert not backend.has_device_ops
        with pytest.raises(BackendUnavailableError, match="cannot keep the sampler's x_t on its device"):
            sample_step_major(
                np.zeros((2, 8, 8, 8), np.float32),
                None,
                SchedulerConfig(),
                window_options=WindowOptions(patch_size=(8, 8, 8)),
                device_ops=backend.device_ops,
            )


def test_torch_device_loop_equals_host_loop(default_package):
    # Reference: the host loop on the same torch engine (fp32 on the CPU here; fp16 with CUDA graphs on a GPU runs
    # the same TorchDeviceOps). Covers skipped windows and padding; tolerance as the onnxruntime test.
    torch_backend = pytest.importorskip("diffseg.runtime.backends.torch_backend")
    config = SchedulerConfig.from_dict(default_package.manifest.diffusion)
    rng = np.random.default_rng(8)
    shape = (40, 70, 130)
    image = np.stack([np.full(shape, 0.05, np.float32), rng.uniform(-0.2, 0.2, shape).astype(np.float32)])
    image[0, 10:30, 20:50, 10:40] = 1.5
    candidate = image[0] > 1.0
    options = SamplerOptions(steps=2, num_samples=2, eta=0.5, timestep_spacing="linspace", seed=3)
    window = WindowOptions(patch_size=PATCH, overlap=0.25, batch_size=4, retire_after=1)
    backend = torch_backend.TorchBackend(default_package, "fp32", threads=2)
    host = sample_step_major(image, backend.run, config, options, window, candidate=candidate)
    device = sample_step_major(image, None, config, options, window, candidate=candidate, device_ops=backend.device_ops)
    assert host.windows_skipped > 0
    assert (device.windows_skipped, device.retired, device.patch_forwards) == (
        host.windows_skipped,
        host.retired,
        host.patch_forwards,
    )
    np.testing.assert_allclose(device.probabilities, host.probabilities, atol=1e-5)
