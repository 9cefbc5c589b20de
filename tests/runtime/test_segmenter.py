"""The runtime against a plain PyTorch reference loop, across backends and precisions, on phantoms.

References: ``diffseg.export.reference.reference_sample`` (torch, its own DDIM and Gaussian sliding window, no code
shared with the runtime) on the same model, seed and noise; tolerances: probability max abs difference ≤ 5e-4 for
onnxruntime fp32 (see the test) and Dice agreement ≥ 0.99; bf16 vs fp32 Dice agreement ≥ 0.98.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys

import numpy as np
import pytest
import torch

from diffseg.export.reference import ReferenceSettings, reference_sample
from diffseg.runtime.backends import BackendUnavailableError, get_backend
from diffseg.runtime.diffusion_schedule import SamplerOptions, SchedulerConfig
from diffseg.runtime.phantom import PhantomOptions, make_phantom
from diffseg.runtime.postprocess import dice
from diffseg.runtime.preprocess import model_grid_for, normalise, resample_to
from diffseg.runtime.sampling import sample_step_major
from diffseg.runtime.segmenter import Segmenter
from diffseg.runtime.sliding_window import WindowOptions

STEPS, SAMPLES, SEED = 4, 2, 7


@pytest.fixture(scope="module")
def model_grid_case(default_package):
    """Normalised PET/CT of a phantom on the model grid, large enough that no axis needs padding."""
    ph = make_phantom(2, PhantomOptions(ct_size_xy=160, ct_slices=48))
    m = default_package.manifest
    grid = model_grid_for(ph.ct, m.spacing_mm)
    assert min(grid.shape) >= 64
    image = np.stack(
        [
            normalise(
                resample_to({"CT": ph.ct, "PT": ph.pet}[c], grid, "linear", m.normalisation[c].low).array,
                m.normalisation[c],
            )
            for c in m.modalities
        ]
    )
    return image


@pytest.fixture(scope="module")
def torch_model(default_package):
    from diffseg.export.architectures import build_model

    arch = dict(default_package.manifest.raw["architecture"])
    model = build_model({"architecture": arch.pop("type"), "model": arch})
    model.load_state_dict(torch.load(default_package.files["torch"].path, weights_only=True))
    return model.eval()


@pytest.fixture(scope="module")
def reference_probability(torch_model, model_grid_case, default_package):
    d = default_package.manifest.defaults
    settings = ReferenceSettings(
        steps=STEPS,
        samples=SAMPLES,
        overlap=d["overlap"],
        prediction_type="sample",
        timestep_spacing=d["timestep_spacing"],
        batch_size=4,
    )
    torch.set_num_threads(2)
    return reference_sample(torch_model, model_grid_case, (64, 64, 64), settings, seed=SEED).mean(axis=0)


def runtime_probability(backend, image, package):
    m = package.manifest
    config = SchedulerConfig.from_dict(m.diffusion)
    d = m.defaults
    options = SamplerOptions(
        sampler="ddim",
        steps=STEPS,
        timestep_spacing=d["timestep_spacing"],
        eps_convention=d["eps_convention"],
        num_samples=SAMPLES,
        seed=SEED,
    )
    window = WindowOptions(patch_size=(64, 64, 64), overlap=d["overlap"], batch_size=4)
    return sample_step_major(image, backend.run, config, options, window).mean


def test_torch_fp32_matches_pytorch_reference_to_1e_5(default_package, model_grid_case, reference_probability):
    """The runtime's sampler and window on the same arithmetic as the reference (the torch backend): 1e-5."""
    with get_backend("torch", default_package, "fp32") as backend:
        prob = runtime_probability(backend, model_grid_case, default_package)
    assert np.abs(prob - reference_probability).max() <= 1e-5


def test_onnxruntime_fp32_matches_pytorch_reference(default_package, model_grid_case, reference_probability):
    with get_backend("onnxruntime", default_package, "fp32") as backend:
        prob = runtime_probability(backend, model_grid_case, default_package)
    # 5e-4, not 1e-4: onnxruntime's CPU InstanceNormalization (the exported GroupNorm) sums its statistics in float32
    # (~3e-5 off float64 per layer over 64³ groups, torch ~1e-6), so one call differs from torch by up to 1e-4 and
    # the probability by 2.15e-4 here; the runtime on the torch backend is 1.5e-6 from the reference.
    assert np.abs(prob - reference_probability).max() <= 5e-4
    assert dice(prob >= 0.5, reference_probability >= 0.5) >= 0.99


def test_openvino_bf16_agrees_with_fp32(default_package, model_grid_case, reference_probability):
    try:
        backend = get_backend("openvino", default_package, "bf16")
    except BackendUnavailableError as exc:
        pytest.skip(f"no native bf16 here: {exc}")
    with backend:
        prob = runtime_probability(backend, model_grid_case, default_package)
    assert dice(prob >= 0.5, reference_probability >= 0.5) >= 0.98


@pytest.mark.parametrize(("name", "precision"), [("onnxruntime", "fp32"), ("openvino", "fp32"), ("torch", "fp32")])
def test_backends_agree_on_one_call(default_package, name, precision):
    x = np.random.default_rng(0).standard_normal((2, 3, 64, 64, 64), dtype=np.float32)
    t = np.array([0.0, 999.0], np.float32)
    with get_backend("torch", default_package, "fp32") as ref, get_backend(name, default_package, precision) as b:
        want, got = ref.run(x, t), b.run(x, t)
    assert got.dtype == np.float32 and got.shape == (2, 1, 64, 64, 64)
    assert np.linalg.norm(got - want) / np.linalg.norm(want) <= 1e-4


def test_backend_errors_are_explicit(default_package):
    with pytest.raises(ValueError, match="backend must be one of"):
        get_backend("tensorflow", default_package)
    with pytest.raises(BackendUnavailableError, match="cannot run fp16"):
        get_backend("onnxruntime", default_package, "fp16")
    if not torch.cuda.is_available():
        with pytest.raises(BackendUnavailableError, match="fp16 runs on CUDA only"):
            get_backend("torch", default_package, "fp16")
    with pytest.raises(BackendUnavailableError, match="not available"):
        get_backend("tensorrt", default_package)


def test_segmenter_end_to_end(small_phantom):
    seg = Segmenter("default", backend="onnxruntime", steps=2, samples=2, seed=1)
    result = seg.predict(small_phantom.ct, small_phantom.pet)
    assert result.mask.same_grid(small_phantom.ct) and result.probability.same_grid(small_phantom.ct)
    assert result.mask.array.dtype == np.uint8 and set(np.unique(result.mask.array)) <= {0, 1}
    assert result.probability.array.min() >= 0.0 and result.probability.array.max() <= 1.0
    assert result.uncertainty.array.min() >= 0.0
    assert result.settings["backend"] == "onnxruntime" and result.settings["sampler"]["steps"] == 2
    assert list(result.timings) == ["read", "prepare", "sample", "postprocess"]
    assert dice(result.mask.array, small_phantom.mask.array) >= 0.6
    for row in result.lesions:
        assert row["volume_ml"] >= seg.options.postprocess.min_lesion_ml
        assert row["suv_max"] >= row["suv_mean"] > 0
        assert row["tlg"] == pytest.approx(row["suv_mean"] * row["mtv_ml"], rel=1e-2)


def test_auto_backend_is_recorded(caplog):
    from diffseg.runtime.backends import pick_auto

    name, precision = pick_auto()
    caplog.set_level("INFO", logger="diffseg")
    seg = Segmenter("default", backend="auto", steps=1, samples=1)
    settings = seg.settings()
    assert (settings["backend"], settings["precision"]) == (name, precision)
    picks = [
        r.getMessage()
        for r in caplog.records
        if r.name == "diffseg" and r.levelname == "INFO" and "auto" in r.getMessage()
    ]
    assert len(picks) == 1, [r.getMessage() for r in caplog.records]
    assert set(picks[0].replace(":", " ").split()) >= {name, precision}, picks[0]


def test_same_seed_same_mask(small_phantom):
    seg = Segmenter("default", backend="onnxruntime", steps=2, samples=1)
    a = seg.predict(small_phantom.ct, small_phantom.pet, seed=3).probability.array
    b = seg.predict(small_phantom.ct, small_phantom.pet, seed=3).probability.array
    c = seg.predict(small_phantom.ct, small_phantom.pet, seed=4).probability.array
    assert np.array_equal(a, b) and not np.array_equal(a, c)


def test_inputs_that_do_not_overlap_are_refused(small_phantom):
    from diffseg.runtime.volume import Volume

    far = Volume(
        small_phantom.pet.array,
        small_phantom.pet.spacing,
        tuple(o + 5000.0 for o in small_phantom.pet.origin),
        small_phantom.pet.direction,
    )
    seg = Segmenter("default", backend="onnxruntime", steps=1, samples=1)
    with pytest.raises(ValueError, match="PET and CT do not overlap in space"):
        seg.predict(small_phantom.ct, far)


def test_runtime_does_not_import_torch():
    import subprocess
    import sys

    code = (
        "import sys, diffseg.runtime, diffseg.runtime.segmenter, diffseg.runtime.cli, diffseg.runtime.backends, "
        "diffseg.runtime.dicom; from diffseg.runtime.backends import get_backend; "
        "from diffseg.runtime.manifest import load_package; get_backend('onnxruntime', load_package('default')); "
        "print('torch' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd="/")
    assert out.stdout.strip() == "False"


@pytest.mark.gpu
@pytest.mark.parametrize("name", ["tensorrt", "onnxruntime-tensorrt", "onnxruntime-cuda", "torch"])
def test_gpu_backend_verifies_against_onnxruntime(default_package, name):
    """GPU engines at fp16 against onnxruntime fp32 (limit 1e-2); skipped with the reason on machines without."""
    from diffseg.runtime.backends import available_backends
    from diffseg.runtime.verify import verify_backend

    reason = available_backends()[name] or (None if torch.cuda.is_available() else "no CUDA device")
    if reason:
        pytest.skip(f"{name}: {reason}")
    with get_backend(name, default_package, "fp16") as backend:
        result = verify_backend(backend, default_package)
    assert result.passed, result


def test_retirement_follows_the_manifest_unless_overridden():
    # Reference: the default package's manifest (retire_after 2); 0 turns it off (the exact loop); window-major never
    # retires.
    with Segmenter("default", backend="onnxruntime") as seg:
        assert seg.options.window.retire_after == seg.package.manifest.defaults["retire_after"] == 2
        assert seg.settings()["window"]["retire_after"] == 2
    with Segmenter("default", backend="onnxruntime", retire_after=0) as seg:
        assert seg.options.window.retire_after == 0
    with Segmenter("default", backend="onnxruntime", loop_order="window-major") as seg:
        assert seg.options.window.retire_after == 0 and seg.settings()["window"]["retire_after"] == 0


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"loop_order": "window-major", "retire_after": 2}, "retire_after applies to the step-major loop only"),
        ({"batch_size": 0}, r"batch_size must be an int >= 1 .* got 0"),
        ({"batch_size": -3}, r"batch_size must be an int >= 1 .* got -3"),
        ({"loop_order": "diagonal"}, "loop_order must be step-major or window-major, got 'diagonal'"),
        ({"steps": 0}, r"steps must be an int >= 1, got 0"),
    ],
)
def test_options_that_would_be_ignored_are_refused(kwargs, message):
    # Reference: the rule that no option is quietly dropped or replaced (before: batch_size 0 became the default and
    # retire_after was zeroed under window-major).
    with pytest.raises(ValueError, match=message):
        Segmenter("default", backend="onnxruntime", **kwargs)


def test_predict_after_close_says_so(small_phantom):
    seg = Segmenter("default", backend="onnxruntime", steps=1, samples=1)
    seg.close()
    with pytest.raises(RuntimeError, match="Segmenter was closed"):
        seg.predict(small_phantom.ct, small_phantom.pet)


@pytest.mark.parametrize(("name", "precision"), [("onnxruntime", "fp32"), ("openvino", "fp32")])
def test_closed_backend_says_so_and_closes_once(small_phantom, name, precision):
    # Before: backend.run after close was an AttributeError ('NoneType' object has no attribute 'run') on
    # onnxruntime, and OpenVINO quietly compiled a new network and ran.
    seg = Segmenter("default", backend=name, precision=precision, steps=1, samples=1)
    backend = seg.backend
    x = np.zeros((1, backend.in_channels, *backend.patch), np.float32)
    t = np.zeros(1, np.float32)
    assert backend.run(x, t).shape == (1, backend.out_channels, *backend.patch)  # control: open, it runs
    seg.close()
    seg.close()  # a second close does nothing, as for a file
    assert seg.closed and backend.closed
    with pytest.raises(RuntimeError, match=rf"backend {name!r} was closed; load the model again"):
        backend.run(x, t)
    with pytest.raises(RuntimeError, match=rf"backend {name!r} was closed"):
        backend.device_ops(None)  # type: ignore[arg-type]
    with pytest.raises(RuntimeError, match="Segmenter was closed"):
        seg.predict(small_phantom.ct, small_phantom.pet)


@pytest.mark.parametrize("threads", [-3, 0, 1.5, True, "2"])
def test_threads_must_be_a_positive_int(default_package, threads):
    # Before: -3 reached OpenVINO, whose error did not name the option; 0 silently meant all cores.
    message = rf"threads must be an int >= 1 \(None: all cores\), got {re.escape(repr(threads))}"
    with pytest.raises(ValueError, match=message):
        Segmenter("default", backend="openvino", precision="fp32", threads=threads)
    with pytest.raises(ValueError, match=message):
        get_backend("onnxruntime", default_package, "fp32", threads=threads)
    from diffseg.runtime.backends.ort_backend import OrtCpuBackend

    with pytest.raises(ValueError, match=message):  # a backend built directly checks it too
        OrtCpuBackend(default_package, "fp32", threads=threads)


def test_threads_one_reaches_the_engine(default_package):
    with get_backend("onnxruntime", default_package, "fp32", threads=1) as backend:
        assert backend.threads == 1
        assert backend.session.get_session_options().intra_op_num_threads == 1


@pytest.mark.skipif(
    any(os.path.exists(n) for n in ("/dev/nvidiactl", "/dev/nvidia0", "/dev/dxg")), reason="a GPU is present"
)
def test_auto_on_a_cpu_machine_does_not_import_torch():
    # Reference: the rule that the runtime imports torch only when the torch backend is chosen. A fresh interpreter
    # picks auto, loads the engine and segments nothing; torch must stay out of sys.modules.
    code = (
        "import sys; from diffseg.runtime.segmenter import Segmenter; "
        "s = Segmenter('default', backend='auto'); "
        "print(s.backend.name, 'torch' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd="/")
    name, imported = out.stdout.split()
    assert name in ("openvino", "onnxruntime") and imported == "False"


def test_openvino_single_patch_and_stream_paths_agree(default_package):
    # Reference: the throughput-stream path (patches in flight together). A lone patch (a call of one, or the odd one
    # out of a call) runs on a latency request with every thread instead; both compile the same static batch-1
    # network, so the outputs are bit-identical.
    x = np.random.default_rng(2).standard_normal((4, 3, 64, 64, 64), dtype=np.float32)
    t = np.array([10.0, 500.0, 999.0, 3.0], np.float32)
    with get_backend("openvino", default_package, "fp32") as backend:
        together = backend.run(x, t)
        odd = backend.run(x[:3], t[:3])
        alone = np.concatenate([backend.run(x[i : i + 1], t[i : i + 1]) for i in range(4)])
    np.testing.assert_array_equal(alone, together)
    np.testing.assert_array_equal(odd, together[:3])
