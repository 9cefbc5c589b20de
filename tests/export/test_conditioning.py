"""A Diff-UNet-style model with a condition graph (an image encoder run once per window), from ``build_package`` to
``Segmenter`` on every CPU backend.

The model is written here with MONAI's BasicUNet blocks (``TwoConv``, ``Down``, ``UpCat``): an image encoder that
returns features at three scales, and a denoiser UNet that takes ``[image, x_t]``, a sinusoidal timestep embedding
and those features (added at each scale, as Diff-UNet's ``BasicUNetDe`` adds its embedding encoder's). Random
weights, tiny channels, 16³ patches: accuracy is not the point, equality is.

References and tolerances: the runtime's mean probability against :func:`diffseg.export.reference.reference_sample`
run on a module whose forward runs the encoder then the denoiser (the naive loop: the encoder at every step and for
every sample; it shares no code with the runtime's sampler, cache or backends), on the model input the runtime
prepared, to 1e-4 on every backend; the
condition graph's calls counted exactly (once per window run with the cache, once per engine row without).
"""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

torch = pytest.importorskip("torch")
basic_unet = pytest.importorskip("monai.networks.nets.basic_unet")

from export_helpers import MODALITIES, diffusion  # noqa: E402

from diffseg.export.contract_checks import ContractError  # noqa: E402
from diffseg.export.package import build_package  # noqa: E402
from diffseg.export.reference import ReferenceSettings, reference_sample  # noqa: E402
from diffseg.runtime.backends import BackendUnavailableError, get_backend  # noqa: E402
from diffseg.runtime.cases import LoadedCase  # noqa: E402
from diffseg.runtime.manifest import load_package  # noqa: E402
from diffseg.runtime.pipeline import prepare_case, sample_case  # noqa: E402
from diffseg.runtime.segmenter import Segmenter  # noqa: E402
from diffseg.runtime.volume import Volume  # noqa: E402

PATCH = (16, 16, 16)
CHANNELS = (4, 8, 16)
FEATURES = ("enc0", "enc1", "enc2")
C_IMG = len(MODALITIES)
BACKENDS = ("onnxruntime", "openvino", "torch")
TOLERANCE = {"onnxruntime": 1e-4, "openvino": 1e-4, "torch": 1e-4}  # measured 1.1e-6, 7.3e-6, 6e-7
ACT = ("LeakyReLU", {"negative_slope": 0.1})
NORM = ("instance", {"affine": True})
SEED = 7


class ImageEncoder(torch.nn.Module):
    """Diff-UNet's embedding encoder in small: the image channels alone → features at full, 1/2 and 1/4 size."""

    def __init__(self, c_img: int, channels: tuple[int, ...] = CHANNELS) -> None:
        super().__init__()
        self.conv0 = basic_unet.TwoConv(3, c_img, channels[0], ACT, NORM, True)
        self.down1 = basic_unet.Down(3, channels[0], channels[1], ACT, NORM, True)
        self.down2 = basic_unet.Down(3, channels[1], channels[2], ACT, NORM, True)

    def forward(self, image: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        f0 = self.conv0(image)
        f1 = self.down1(f0)
        return f0, f1, self.down2(f1)


def timestep_embedding(t: torch.Tensor, freqs: torch.Tensor) -> torch.Tensor:
    """The sinusoidal embedding of the (float) timestep, [B, 2·len(freqs)]."""
    angles = t[:, None] * freqs[None]
    return torch.cat([torch.sin(angles), torch.cos(angles)], dim=1)


class ConditionedUNet(torch.nn.Module):
    """Diff-UNet's denoiser in small: ``[image, x_t]`` in, at each scale the timestep embedding and the encoder's
    feature added, skip connections up to the output (``y`` [B, 1, *patch])."""

    def __init__(self, in_channels: int, channels: tuple[int, ...] = CHANNELS, embed: int = 16) -> None:
        super().__init__()
        self.register_buffer("freqs", torch.exp(-math.log(10000.0) * torch.arange(embed // 2) / (embed // 2)))
        self.temb = torch.nn.Sequential(torch.nn.Linear(embed, embed), torch.nn.SiLU(), torch.nn.Linear(embed, embed))
        self.proj = torch.nn.ModuleList(torch.nn.Linear(embed, c) for c in channels)
        self.conv0 = basic_unet.TwoConv(3, in_channels, channels[0], ACT, NORM, True)
        self.down1 = basic_unet.Down(3, channels[0], channels[1], ACT, NORM, True)
        self.down2 = basic_unet.Down(3, channels[1], channels[2], ACT, NORM, True)
        self.up2 = basic_unet.UpCat(3, channels[2], channels[1], channels[1], ACT, NORM, True)
        self.up1 = basic_unet.UpCat(3, channels[1], channels[0], channels[0], ACT, NORM, True, halves=False)
        self.out = torch.nn.Conv3d(channels[0], 1, 1)

    def forward(self, x: torch.Tensor, t: torch.Tensor, f0: torch.Tensor, f1: torch.Tensor, f2: torch.Tensor):
        emb = self.temb(timestep_embedding(t, self.freqs))

        def plus(h: torch.Tensor, level: int, feature: torch.Tensor) -> torch.Tensor:
            return h + feature + self.proj[level](emb)[:, :, None, None, None]

        h0 = plus(self.conv0(x), 0, f0)
        h1 = plus(self.down1(h0), 1, f1)
        h2 = plus(self.down2(h1), 2, f2)
        return self.out(self.up1(self.up2(h2, h1), h0))


class EncoderThenDenoiser(torch.nn.Module):
    """The loop a paper runs: the encoder inside the denoiser's forward, at every step and for every sample."""

    def __init__(self, encoder: torch.nn.Module, denoiser: torch.nn.Module) -> None:
        super().__init__()
        self.encoder, self.denoiser = encoder, denoiser

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return self.denoiser(x, t, *self.encoder(x[:, :C_IMG]))


def models() -> tuple[ImageEncoder, ConditionedUNet]:
    torch.manual_seed(0)
    return ImageEncoder(C_IMG).eval(), ConditionedUNet(C_IMG + 1).eval()


def volume_on_grid(array: np.ndarray) -> Volume:
    return Volume(array.astype(np.float32), (2.0,) * 3, (0.0, 0.0, 0.0), (1, 0, 0, 0, 1, 0, 0, 0, 1))


def case() -> dict[str, Volume]:
    """A PET/CT on a 2 mm grid: a body in air with a bony core, background uptake and two hot spots."""
    rng = np.random.default_rng(5)
    z, y, x = np.mgrid[0:28, 0:30, 0:26]
    body = ((z - 14) / 8) ** 2 + ((y - 15) / 9) ** 2 + ((x - 13) / 7) ** 2 <= 1
    ct = np.where(body, 40.0 + 20.0 * rng.standard_normal(body.shape), -1000.0)
    ct[(z - 14) ** 2 + (y - 15) ** 2 + (x - 13) ** 2 <= 9] = 300.0
    pet = np.where(body, 1.5, 0.0) + 9.0 * np.exp(-((z - 12) ** 2 + (y - 13) ** 2 + (x - 12) ** 2) / 8.0)
    pet += 6.0 * np.exp(-((z - 17) ** 2 + (y - 19) ** 2 + (x - 15) ** 2) / 4.0)
    return {"PT": volume_on_grid(pet), "CT": volume_on_grid(ct)}


def export(tmp_path, model, conditioner, features=FEATURES, name="pkg"):
    return build_package(
        model,
        tmp_path / name,
        name="diff-unet-style",
        inputs=MODALITIES,
        spacing_mm=2.0,
        patch_size=PATCH,
        channel_order="image-first",
        diffusion=diffusion(prediction_type="sample"),
        architecture={"type": "diff-unet-style-not-in-registry"},
        activation="sigmoid",
        defaults={"steps": 2, "samples": 2, "overlap": 0.25},
        conditioner=conditioner,
        features=features,
    )


def assert_nothing_written(tmp_path, name="pkg"):
    assert not (tmp_path / name).exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(f".{name}.")], "no staging folder left behind"


@pytest.fixture(scope="module")
def package(tmp_path_factory):
    encoder, denoiser = models()
    return export(tmp_path_factory.mktemp("conditioned"), denoiser, encoder), encoder, denoiser


@pytest.fixture(scope="module")
def reference(package):
    """The naive loop's mean probability on the model input the runtime prepares (the same for every backend)."""
    pkg, encoder, denoiser = package
    with Segmenter(pkg, backend="onnxruntime", precision="fp32", retire_after=0) as seg:
        prepared = prepare_case(seg.package.manifest, seg.options, LoadedCase(case()), seed=SEED)
    settings = ReferenceSettings(
        steps=2, samples=2, overlap=0.25, prediction_type="sample", timestep_spacing="linspace", activation="sigmoid"
    )
    naive = EncoderThenDenoiser(encoder, denoiser).eval()
    want = reference_sample(naive, prepared.model_input.image, PATCH, settings, seed=SEED).mean(axis=0)
    return prepared, want


def test_manifest_declares_the_condition_graph(package):
    pkg, _, _ = package
    doc = json.loads((pkg / "manifest.json").read_text())
    assert doc["conditioning"] == {"features": list(FEATURES)}
    files = doc["files"]
    roles = {key: entry.get("role", "denoiser") for key, entry in files.items()}
    assert roles == {
        "fp32": "denoiser",
        "fp16": "denoiser",
        "torch_export": "denoiser",
        "condition_fp32": "condition",
        "condition_fp16": "condition",
        "condition_torch_export": "condition",
    }  # no registry state dict: a conditioned model runs from its programs
    shapes = {"enc0": [4, 16, 16, 16], "enc1": [8, 8, 8, 8], "enc2": [16, 4, 4, 4]}
    assert files["fp32"]["inputs"] == {
        "x": ["batch", 3, *PATCH],
        "t": ["batch"],
        **{name: ["batch", *shape] for name, shape in shapes.items()},
    }
    assert files["condition_fp16"]["inputs"] == {"image": ["batch", 2, *PATCH]}
    assert files["condition_fp32"]["outputs"] == {name: ["batch", *shape] for name, shape in shapes.items()}
    parity = doc["validation"]["parity"]
    assert parity["onnx_fp32_vs_torch_fp32"]["rel_error"] <= 1e-4 and parity["onnx_fp16_vs_torch_fp32"]["passed"]
    loaded = load_package(pkg)
    assert loaded.manifest.conditioning == FEATURES
    assert loaded.engine("fp16", role="condition").path.name == "condition.fp16.onnx"
    assert loaded.engine("fp16").path.name == "denoiser.fp16.onnx"
    assert loaded.program("condition").path.name == "condition.pt2"


@pytest.mark.parametrize("backend", BACKENDS)
def test_runtime_equals_the_naive_loop(package, reference, backend):
    pkg, _, _ = package
    prepared, want = reference
    try:
        seg = Segmenter(pkg, backend=backend, precision="fp32", retire_after=0)
    except BackendUnavailableError as exc:
        pytest.skip(f"{backend}: {exc}")
    with seg:
        assert seg.backend.conditioner is not None
        samples = sample_case(seg, prepared.model_input, prepared.seed).samples
    assert np.abs(samples.mean - want).max() <= TOLERANCE[backend], backend
    run = samples.windows - samples.windows_skipped
    assert samples.condition_forwards == run and samples.condition_calls >= 1  # once per window, not × steps × samples
    assert samples.patch_forwards == run * 2 * 2


def test_the_cache_is_what_saves_the_encoder_calls(package):
    """Cache off (the naive loop): the condition graph runs for every engine row; the result is the same."""
    pkg, _, _ = package
    results = {}
    for cached in (True, False):
        with Segmenter(pkg, backend="onnxruntime", retire_after=0, cache_conditioning=cached) as seg:
            assert seg.options.window.cache_conditioning is cached
            results[cached] = seg.predict(images=case(), seed=SEED)
    on, off = results[True].counts, results[False].counts
    assert on.condition_forwards == on.windows - on.windows_skipped and on.patch_forwards == 4 * on.condition_forwards
    assert off.condition_forwards == off.patch_forwards == on.patch_forwards
    assert off.condition_calls == off.engine_calls
    # The same features (up to the convolutions' rounding at another batch size), so the same probabilities.
    assert np.abs(results[True].probability.array - results[False].probability.array).max() <= 1e-4
    with pytest.raises(ValueError, match="cache_conditioning must be True or False, got 'no'"):
        Segmenter(pkg, backend="onnxruntime", cache_conditioning="no")


def test_backends_check_the_features(package):
    pkg, _, _ = package
    loaded = load_package(pkg)
    x = np.zeros((2, 3, *PATCH), np.float32)
    t = np.array([0.0, 500.0], np.float32)
    with get_backend("onnxruntime", loaded, "fp32") as backend:
        features = backend.condition(np.zeros((2, C_IMG, *PATCH), np.float32))
        assert [f.shape for f in features] == [(2, 4, 16, 16, 16), (2, 8, 8, 8, 8), (2, 16, 4, 4, 4)]
        assert backend.run(x, t, features).shape == (2, 1, *PATCH)
        with pytest.raises(ValueError, match=r"features must be the condition graph's 3 arrays .*got 0"):
            backend.run(x, t)
        with pytest.raises(ValueError, match=r"feature enc1 must be \[B = 2, \.\.\.\], got \[1, 8, 8, 8, 8\]"):
            backend.run(x, t, [features[0], features[1][:1], features[2]])
        with pytest.raises(ValueError, match=r"images must be \[B, 2, 16, 16, 16\], got \[2, 3, 16, 16, 16\]"):
            backend.condition(x)
    with pytest.raises(RuntimeError, match="was closed"):
        backend.condition(np.zeros((1, C_IMG, *PATCH), np.float32))


def test_gpu_backends_refuse_a_conditioned_model_naming_those_that_run_it(package):
    """Refused at load, before any GPU library is touched (so this runs on a CPU machine)."""
    from diffseg.runtime.backends.base import pick_auto
    from diffseg.runtime.backends.ort_backend import OrtCudaBackend, OrtTensorrtBackend
    from diffseg.runtime.backends.tensorrt_backend import TensorrtBackend

    loaded = load_package(package[0])
    for cls in (OrtCudaBackend, OrtTensorrtBackend, TensorrtBackend):
        with pytest.raises(
            BackendUnavailableError, match=r"has a condition graph \(features \['enc0', 'enc1', 'enc2'\]"
        ) as err:
            cls(loaded, "fp16")
        assert "onnxruntime at fp32; openvino at bf16, fp32; torch at fp32" in str(err.value)
    name, _ = pick_auto(conditioned=True)
    assert name in ("openvino", "onnxruntime")


def _single_tensor(encoder: ImageEncoder):
    class SingleTensor(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.encoder = encoder

        def forward(self, image):
            return self.encoder(image)[0]

    return (
        SingleTensor(),
        ("enc0",),
        r"SingleTensor: the condition graph's output check .*returned Tensor; return a tuple",
    )


def _batch_of_one(encoder: ImageEncoder):
    class BatchMean(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.encoder = encoder

        def forward(self, image):
            f0, f1, f2 = self.encoder(image)
            return f0, f1.mean(dim=0, keepdim=True), f2

    return BatchMean(), FEATURES, r"BatchMean: .*feature 'enc1' has shape \(1, 8, 8, 8, 8\), not batch 2 first"


def _too_few(encoder: ImageEncoder):
    return (
        encoder,
        FEATURES[:2],
        r"ImageEncoder: .*returned 3 tensors, the package declares the features \['enc0', 'enc1'\]",
    )


@pytest.mark.parametrize("bad", [_single_tensor, _batch_of_one, _too_few], ids=["tensor", "batch-of-one", "count"])
def test_bad_conditioner_is_a_named_contract_error_and_nothing_is_written(tmp_path, bad):
    encoder, denoiser = models()
    conditioner, features, message = bad(encoder)
    with pytest.raises(ContractError, match=message):
        export(tmp_path, denoiser, conditioner, features)
    assert_nothing_written(tmp_path)


def test_half_given_conditioning_is_refused(tmp_path):
    encoder, denoiser = models()
    with pytest.raises(ValueError, match=r"features \['enc0'\] were given without a conditioner"):
        export(tmp_path, denoiser, None, ("enc0",))
    with pytest.raises(ValueError, match="features must name the conditioner's outputs"):
        export(tmp_path, denoiser, encoder, ())
    with pytest.raises(ValueError, match=r"features\[1\] is 'x', a name the graphs already use"):
        export(tmp_path, denoiser, encoder, ("enc0", "x", "enc2"))
    assert_nothing_written(tmp_path)
