"""Researchers' models of other kinds, from ``build_package`` to ``Segmenter`` on every CPU backend (schema 2).

- a CT-only MONAI ``DiffusionModelUNet`` (with attention) with nnU-Net's CT normalisation (``dataset_zscore``):
  runs with a CT alone, no dummy PET;
- an MR model with a per-case z-score over the non-zero voxels (nnU-Net's MR normalisation), the ``sigmoid``
  activation (Diff-UNet's reading of x0) and constant blending, given as ``images={"MR": ...}``.

Each is checked against the plain PyTorch reference loop (:mod:`diffseg.export.reference`, which shares no code with
the runtime's sampler) on the model input the runtime prepared, and the normalisation against nnU-Net's formulas
written here with numpy. Random weights: accuracy is not the point, equality is.
"""

from __future__ import annotations

import json

import numpy as np
import pytest

torch = pytest.importorskip("torch")
monai_nets = pytest.importorskip("monai.networks.nets")

from export_helpers import diffusion  # noqa: E402

from diffseg.export.package import build_package  # noqa: E402
from diffseg.export.reference import ReferenceSettings, reference_sample  # noqa: E402
from diffseg.runtime.backends import BackendUnavailableError  # noqa: E402
from diffseg.runtime.cases import LoadedCase  # noqa: E402
from diffseg.runtime.pipeline import prepare_case, sample_case  # noqa: E402
from diffseg.runtime.segmenter import Segmenter  # noqa: E402
from diffseg.runtime.volume import Volume  # noqa: E402

PATCH = (16, 16, 16)
BACKENDS = ("onnxruntime", "openvino", "torch")
# The fp32 target on every backend (measured at most 1e-5: benchmarks/results/model_parity.md).
TOLERANCE = {"onnxruntime": 1e-4, "openvino": 1e-4, "torch": 1e-4}
CT_NORM = {"method": "dataset_zscore", "clip": [-160.0, 240.0], "mean": 40.0, "std": 80.0}
MR_NORM = {"method": "zscore", "region": "nonzero", "percentiles": [0.5, 99.5]}


def monai_unet(in_channels: int, out_channels: int = 1, spatial_dims: int = 3) -> torch.nn.Module:
    torch.manual_seed(0)
    net = monai_nets.DiffusionModelUNet(
        spatial_dims=spatial_dims,
        in_channels=in_channels,
        out_channels=out_channels,
        channels=(8, 16),
        attention_levels=(False, True),
        num_res_blocks=1,
        norm_num_groups=4,
        num_head_channels=8,
    ).eval()
    conv = torch.nn.Conv3d if spatial_dims == 3 else torch.nn.Conv2d
    out_conv = [m for m in net.modules() if isinstance(m, conv)][-1]
    # MONAI zero-initialises its output convolution: a zero output (probability 0.5 everywhere) proves nothing.
    torch.nn.init.normal_(out_conv.weight, std=0.05)
    return net


class TimeAsFloat(torch.nn.Module):
    """MONAI's UNet embeds an integer timestep; the package contract hands it a float32 ``t``: cast inside."""

    def __init__(self, net: torch.nn.Module) -> None:
        super().__init__()
        self.net = net

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return self.net(x, timesteps=t.long())


class SliceBySlice(torch.nn.Module):
    """A 2D denoiser (guided-diffusion style, learned σ: a prediction and a variance channel) on one-slice patches."""

    def __init__(self, net: torch.nn.Module) -> None:
        super().__init__()
        self.net = net

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return self.net(x[:, :, 0], timesteps=t.long())[:, :, None]


def make_model(spec: dict) -> torch.nn.Module:
    """The kind's network with random weights: a MONAI UNet in 3D, or in 2D run slice by slice."""
    targets = len(spec["targets"])
    in_channels = len(spec["inputs"]) + targets
    if spec.get("spatial_dims") == 2:
        return SliceBySlice(monai_unet(in_channels, 2, spatial_dims=2)).eval()
    return TimeAsFloat(monai_unet(in_channels, targets)).eval()


def volume_on_grid(array: np.ndarray, spacing: float = 2.0) -> Volume:
    """An axis-aligned volume whose voxels are the model grid's (the model grid of a 2 mm model is this grid)."""
    return Volume(array.astype(np.float32), (spacing,) * 3, (0.0, 0.0, 0.0), (1, 0, 0, 0, 1, 0, 0, 0, 1))


def ct_volume() -> Volume:
    rng = np.random.default_rng(5)
    z, y, x = np.mgrid[0:28, 0:30, 0:26]
    body = ((z - 14) / 8) ** 2 + ((y - 15) / 9) ** 2 + ((x - 13) / 7) ** 2 <= 1  # air around it: a body crop
    ct = np.where(body, 40.0 + 20.0 * rng.standard_normal(body.shape), -1000.0)
    ct[(z - 14) ** 2 + (y - 15) ** 2 + (x - 13) ** 2 <= 9] = 300.0  # a bony core above the clip
    return volume_on_grid(ct)


def pet_volume() -> Volume:
    """SUVbw on the CT's grid: background uptake in the body, two hot spots (a primary and a node)."""
    ct = ct_volume().array
    z, y, x = np.mgrid[0:28, 0:30, 0:26]
    pet = np.where(ct > -500, 1.5, 0.0)
    pet += 9.0 * np.exp(-((z - 12) ** 2 + (y - 13) ** 2 + (x - 12) ** 2) / 8.0)
    pet += 6.0 * np.exp(-((z - 17) ** 2 + (y - 19) ** 2 + (x - 15) ** 2) / 4.0)
    return volume_on_grid(pet)


def mr_volume() -> Volume:
    rng = np.random.default_rng(6)
    z, y, x = np.mgrid[0:18, 0:20, 0:20]
    head = ((z - 9) / 8) ** 2 + ((y - 10) / 9) ** 2 + ((x - 10) / 9) ** 2 <= 1
    mr = np.where(head, 600.0 + 150.0 * rng.standard_normal(head.shape), 0.0)
    mr[head & (rng.random(head.shape) < 0.01)] = 5000.0  # bright outliers the percentile clip removes
    return volume_on_grid(np.clip(mr, 0.0, None))


PT_NORM = {"clip": [0, 20], "offset": 0, "scale": 0.1}
THREE = [{"name": "GTVp"}, {"name": "GTVn"}, {"name": "other"}]
KINDS = {
    "ct_only": {
        "inputs": [{"code": "CT", "unit": "HU", "normalisation": CT_NORM}],
        "targets": [{"name": "tumour"}],
        "activation": "affine",
        "blending": "gaussian",
        "volumes": lambda: {"CT": ct_volume()},
        "prediction_type": "sample",
    },
    "mr_zscore_sigmoid": {
        "inputs": [{"code": "MR", "sequence": "T1", "normalisation": MR_NORM}],
        "targets": [{"name": "tumour"}],
        "activation": "sigmoid",
        "blending": "constant",
        "volumes": lambda: {"MR": mr_volume()},
        "prediction_type": "epsilon",
    },
    # guided-diffusion's 2D UNet with a learned σ (output channels: the prediction and the variance interpolation),
    # sampled by DDIM on its prediction channel; v-prediction, the third prediction type.
    "guided_2d_learned_sigma": {
        "inputs": [{"code": "MR", "sequence": "FLAIR", "normalisation": MR_NORM}],
        "targets": [{"name": "lesion"}],
        "activation": "affine",
        "blending": "gaussian",
        "volumes": lambda: {"MR": mr_volume()},
        "prediction_type": "v_prediction",
        "spatial_dims": 2,
        "patch": (1, 16, 16),
        "diffusion": {"output_channels": 2, "variance_type": "learned_range"},
    },
    # Diff-UNet's BraTS setup in kind: several targets, each its own noisy channel, read through a sigmoid.
    "three_targets": {
        "inputs": [
            {"code": "PT", "unit": "SUVbw", "normalisation": PT_NORM},
            {"code": "CT", "unit": "HU", "normalisation": CT_NORM},
        ],
        "targets": THREE,
        "activation": "sigmoid",
        "blending": "gaussian",
        "volumes": lambda: {"PT": pet_volume(), "CT": ct_volume()},
        "prediction_type": "sample",
    },
}


def export_kind(name: str, spec: dict, folder) -> tuple[torch.nn.Module, object]:
    """A kind's network and its package (``benchmarks/model_parity.py`` builds them with this too)."""
    model = make_model(spec)
    pkg = build_package(
        model,
        folder / name,
        name=name,
        inputs=spec["inputs"],
        spacing_mm=2.0,
        patch_size=spec.get("patch", PATCH),
        channel_order="image-first",
        diffusion={**diffusion(prediction_type=spec["prediction_type"]), **spec.get("diffusion", {})},
        architecture={"type": "monai-custom-not-in-registry"},
        targets=spec["targets"],
        activation=spec["activation"],
        blending=spec["blending"],
        defaults={"steps": 2, "samples": 2, "overlap": 0.25},
    )
    return model, pkg


def reference_of(spec: dict, model: torch.nn.Module, image: np.ndarray) -> np.ndarray:
    """The reference loop's per-sample probabilities for a kind, with the package's sampling defaults, seed 7."""
    settings = ReferenceSettings(
        steps=2,
        samples=2,
        overlap=0.25,
        prediction_type=spec["prediction_type"],
        timestep_spacing="linspace",
        activation=spec["activation"],
        blending=spec["blending"],
        targets=len(spec["targets"]),
    )
    return reference_sample(model, image, spec.get("patch", PATCH), settings, seed=7)


@pytest.fixture(scope="module", params=sorted(KINDS))
def kind(request, tmp_path_factory):
    spec = KINDS[request.param]
    model, pkg = export_kind(request.param, spec, tmp_path_factory.mktemp(request.param))
    return request.param, spec, model, pkg, spec["volumes"]()


def test_manifest_is_schema_2_with_the_contract(kind):
    _, spec, _, pkg, _ = kind
    doc = json.loads((pkg / "manifest.json").read_text())
    assert doc["schema_version"] == 2 and "modalities" not in doc
    assert doc["inputs"] == spec["inputs"] and doc["targets"] == spec["targets"]
    assert (doc["activation"], doc["blending"]) == (spec["activation"], spec["blending"])
    # Window skipping and retirement were not asked for, so they are off.
    assert "candidate" not in doc["defaults"] and "retire_after" not in doc["defaults"]
    with Segmenter(pkg, backend="onnxruntime") as seg:
        assert seg.options.candidate is None and seg.options.window.retire_after == 0
        assert seg.options.window.mode == spec["blending"] and seg.options.sampler.activation == spec["activation"]


def _nnunet_zscore(raw: np.ndarray, norm: dict) -> np.ndarray:
    """nnU-Net's normalisations, written out: CT (dataset figures) and MR z-score over the non-zero mask."""
    if norm.get("method", "clip_scale") == "clip_scale":
        return (np.clip(raw, *norm["clip"]) - norm["offset"]) * norm["scale"]
    if norm["method"] == "dataset_zscore":
        return (np.clip(raw, *norm["clip"]) - norm["mean"]) / norm["std"]
    inside = raw != 0
    lo, hi = np.percentile(raw[inside], norm["percentiles"])
    clipped = np.clip(raw, lo, hi)
    z = (clipped - clipped[inside].mean()) / clipped[inside].std()
    return np.where(inside, z, 0.0)


def test_normalisation_is_nnunets(kind):
    _, spec, _, pkg, volumes = kind
    with Segmenter(pkg, backend="onnxruntime") as seg:
        prepared = prepare_case(seg.package.manifest, seg.options, LoadedCase(dict(volumes)))
    image = prepared.model_input
    for c, entry in enumerate(spec["inputs"]):
        raw = volumes[entry["code"]].array
        assert image.grid.shape == raw.shape  # the model grid is the volume's own: no resampling blur
        whole = tuple(slice(0, n) for n in raw.shape)
        # A CT model's input is cropped to the body (HU > -500, with a margin); an MR model's is the whole grid.
        assert (image.box != whole) if "CT" in volumes else (image.box == whole)
        want = _nnunet_zscore(raw.astype(np.float64), entry["normalisation"])
        np.testing.assert_allclose(image.image[c], want[image.box], atol=2e-5)


@pytest.mark.parametrize("backend", BACKENDS)
def test_runtime_equals_the_reference_loop(kind, backend):
    name, spec, model, pkg, volumes = kind
    try:
        seg = Segmenter(pkg, backend=backend, precision="fp32", retire_after=0)
    except BackendUnavailableError as exc:
        pytest.skip(f"{backend}: {exc}")
    with seg:
        prepared = prepare_case(seg.package.manifest, seg.options, LoadedCase(dict(volumes)), seed=7)
        got = sample_case(seg, prepared.model_input, prepared.seed).samples.mean
    want = reference_of(spec, model, prepared.model_input.image)
    assert np.abs(got - want.mean(axis=0)).max() <= TOLERANCE[backend], f"{name} on {backend}"
    inside = (want > 0.01) & (want < 0.99)
    assert inside.mean() > 0.2 and want.std() > 0.05, "the reference must not be constant or saturated"


def test_predict_with_the_models_own_inputs(kind, tmp_path):
    name, spec, _, pkg, volumes = kind
    first = spec["inputs"][0]["code"]
    with Segmenter(pkg, backend="onnxruntime") as seg:
        result = seg.predict(images=volumes)
        assert result.mask.shape == volumes[first].shape and (result.pet_on_ct is None) == ("PT" not in volumes)
        if "PT" not in volumes:
            assert all(lesion["suv_max"] is None and lesion["tlg"] is None for lesion in result.lesions)
        names = [t["name"] for t in spec["targets"]]
        if len(names) > 1:  # each target on its own, the combined label map and table made of them
            assert [t.name for t in result.targets] == names
            for c, target in enumerate(result.targets):
                np.testing.assert_array_equal(target.mask.array == 1, result.mask.array == c + 1)
                assert target.probability.array.max() <= result.probability.array.max()
                assert all(row["target"] == target.name for row in target.lesions)
            ids = [row["id"] for row in result.lesions]
            assert ids == list(range(1, len(ids) + 1)) and set(np.unique(result.labels.array)) == {0, *ids}
        else:
            assert result.targets == ()
        with pytest.raises(ValueError, match=rf"model '{name}' needs {first}"):
            seg.predict(images={"XA": volumes[first]})
        if "PT" not in volumes:
            with pytest.raises(ValueError, match=rf"model '{name}' takes {first}, not PT"):
                seg.predict(pet=volumes[first], images=volumes)


def test_predict_cli_takes_image_code_path(kind, tmp_path, capsys):
    from diffseg.runtime.cli import main
    from diffseg.runtime.volume import read_volume, write_volume

    name, spec, _, pkg, volumes = kind
    files = {code: write_volume(v, tmp_path / f"{code.lower()}.nii.gz") for code, v in volumes.items()}
    out = tmp_path / "out"
    argv = ["predict", "-m", str(pkg), "--backend", "onnxruntime", "--no-progress", "-o", str(out)]
    assert main([*argv, *(f"--image={code}={path}" for code, path in files.items())]) == 0
    report = json.loads((out / "report.json").read_text())
    for code, path in files.items():
        assert report["inputs"][{"CT": "ct", "PT": "pet"}.get(code, code.lower())] == str(path)
    first = spec["inputs"][0]["code"]
    assert read_volume(out / "mask.nii.gz").same_grid(volumes[first])  # on the reference input's own grid
    names = [t["name"] for t in spec["targets"]]
    if len(names) > 1:  # each target's own maps, and the lesion table says which target each lesion is
        assert all((out / f"probability_{n}.nii.gz").is_file() and (out / f"mask_{n}.nii.gz").is_file() for n in names)
        assert (out / "lesions.csv").read_text().splitlines()[0].startswith("id,target,voxels")
    capsys.readouterr()
    # The input the model needs, missing: named, with how to give it; a code that is not a DICOM code.
    assert main([*argv, "--overwrite", f"--image=XA={files[first]}"]) == 2
    err = capsys.readouterr().err
    want = {"CT": "--ct PATH", "PT": "--pet PATH"}.get(first, f"--image {first}=PATH")
    assert f"model '{name}' needs {first}" in err and want in err, err
    with pytest.raises(SystemExit):
        main([*argv, f"--image=mr={files[first]}"])
    assert "give CODE=PATH with the modality code in capitals" in capsys.readouterr().err


class TinyDenoiser(torch.nn.Module):
    """A small convolution that depends on t: enough to tell the loops apart when they differ."""

    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__()
        torch.manual_seed(1)
        self.conv = torch.nn.Conv3d(in_channels, out_channels, 3, padding=1)

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return self.conv(x) * (1.0 + t[:, None, None, None, None] / 1000.0)


@pytest.mark.parametrize("activation", ["softmax", "sigmoid"])
def test_several_targets_sample_as_the_reference_loop(activation):
    from diffseg.runtime.diffusion_schedule import SamplerOptions, SchedulerConfig
    from diffseg.runtime.sampling import sample_step_major, sample_window_major
    from diffseg.runtime.sliding_window import WindowOptions

    targets, patch = 3, (8, 8, 8)
    model = TinyDenoiser(2 + targets, targets).eval()

    def run(x, t):
        with torch.no_grad():
            return model(torch.from_numpy(x), torch.from_numpy(t)).numpy()

    image = np.random.default_rng(2).uniform(-1, 1, size=(2, 12, 10, 9)).astype(np.float32)
    config = SchedulerConfig(prediction_type="epsilon", beta_dtype="float64")
    options = SamplerOptions(
        steps=3,
        timestep_spacing="linspace",
        eps_convention="recompute",
        num_samples=2,
        seed=4,
        activation=activation,
        targets=targets,
    )
    windows = WindowOptions(patch_size=patch, batch_size=3)
    got = sample_step_major(image, run, config, options, windows)
    settings = ReferenceSettings(
        steps=3, samples=2, prediction_type="epsilon", activation=activation, targets=targets, batch_size=3
    )
    want = reference_sample(model, image, patch, settings, seed=4)
    assert got.probabilities.shape == want.shape == (2, targets, 12, 10, 9) and got.mean.shape == (targets, 12, 10, 9)
    assert np.abs(got.probabilities - want).max() <= 1e-5
    if activation == "softmax":
        np.testing.assert_allclose(got.probabilities.sum(axis=1), 1.0, atol=1e-5)
    # One window covering the volume: the window-major loop runs the very same chains.
    whole = WindowOptions(patch_size=image.shape[1:], batch_size=4)
    same = [loop(image, run, config, options, whole).probabilities for loop in (sample_step_major, sample_window_major)]
    assert np.abs(same[0] - same[1]).max() <= 1e-5  # the C++ step in double, the numpy one in float32


class TinyEncoder(torch.nn.Module):
    """Diff-UNet's split in small: an image encoder whose features the denoiser takes at two scales."""

    def __init__(self, c_img: int) -> None:
        super().__init__()
        torch.manual_seed(3)
        self.fine = torch.nn.Conv3d(c_img, 4, 3, padding=1)
        self.coarse = torch.nn.Conv3d(4, 4, 3, stride=2, padding=1)

    def forward(self, image: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        fine = torch.tanh(self.fine(image))
        return fine, torch.tanh(self.coarse(fine))


class TinyConditionedDenoiser(torch.nn.Module):
    def __init__(self, in_channels: int) -> None:
        super().__init__()
        torch.manual_seed(4)
        self.conv = torch.nn.Conv3d(in_channels + 4, 1, 3, padding=1)
        self.up = torch.nn.Upsample(scale_factor=2)

    def forward(self, x: torch.Tensor, t: torch.Tensor, fine: torch.Tensor, coarse: torch.Tensor) -> torch.Tensor:
        h = torch.cat([x, fine + self.up(coarse)], dim=1)
        return self.conv(h) * (1.0 + t[:, None, None, None, None] / 1000.0)


class EncoderInside(torch.nn.Module):
    """The loop a paper runs: the encoder inside the denoiser's forward, at every step and for every sample."""

    def __init__(self, encoder: torch.nn.Module, denoiser: torch.nn.Module, c_img: int) -> None:
        super().__init__()
        self.encoder, self.denoiser, self.c_img = encoder, denoiser, c_img

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return self.denoiser(x, t, *self.encoder(x[:, : self.c_img]))


@pytest.mark.parametrize("loop_order", ["step_major", "window_major"])
def test_condition_graph_runs_once_per_window(loop_order):
    from diffseg.runtime.diffusion_schedule import SamplerOptions, SchedulerConfig
    from diffseg.runtime.sampling import LOOP_ORDERS
    from diffseg.runtime.sliding_window import WindowOptions

    c_img, patch = 2, (8, 8, 8)
    encoder, denoiser = TinyEncoder(c_img).eval(), TinyConditionedDenoiser(c_img + 1).eval()

    def condition(images):
        with torch.no_grad():
            return [f.numpy() for f in encoder(torch.from_numpy(images))]

    def run(x, t, features):
        with torch.no_grad():
            return denoiser(torch.from_numpy(x), torch.from_numpy(t), *map(torch.from_numpy, features)).numpy()

    image = np.random.default_rng(5).uniform(-1, 1, size=(c_img, 12, 10, 9)).astype(np.float32)
    config = SchedulerConfig(prediction_type="epsilon", beta_dtype="float64")
    options = SamplerOptions(steps=3, timestep_spacing="linspace", eps_convention="recompute", num_samples=2, seed=6)
    loop = LOOP_ORDERS[loop_order]
    got = {
        cached: loop(
            image,
            run,
            config,
            options,
            WindowOptions(patch_size=patch, batch_size=3, cache_conditioning=cached),
            condition=condition,
        )
        for cached in (True, False)
    }
    windows = got[True].windows
    assert got[True].condition_forwards == windows  # once per window ...
    assert got[False].condition_forwards == got[False].patch_forwards == windows * 3 * 2  # ... not × steps × samples
    # The same features (up to the convolution's rounding at another batch size), so the same samples.
    assert np.abs(got[True].probabilities - got[False].probabilities).max() <= 1e-4
    if loop_order == "step_major":  # the reference loop, the encoder inside the forward, shares no code
        settings = ReferenceSettings(steps=3, samples=2, prediction_type="epsilon", batch_size=3)
        want = reference_sample(EncoderInside(encoder, denoiser, c_img), image, patch, settings, seed=6)
        assert np.abs(got[True].probabilities - want).max() <= 1e-4  # 1.6e-5 measured (batch-dependent rounding)
