"""Export of researchers' denoisers: the fixed reference, checkpoint adapters, contract checks, provenance.

References and tolerances: the reference's importance map against MONAI's ``compute_importance_map`` (1e-7) and
its timestep grid against ``diffusers.DDIMScheduler.set_timesteps`` (exact); the reference loop against the runtime's
step-major sampler on the same torch model (1e-5, fp32); adapters load weights equal (``torch.equal``) to the
original. Every refused model or checkpoint must raise its named error and leave no package folder behind.
Networks are tiny and randomly initialised (16³ patches).
"""

from __future__ import annotations

import copy
import json

import numpy as np
import pytest
import torch
from export_helpers import MODALITIES, PATCH, diffusion, export

from diffseg.export.architectures import MonaiDenoiser, build_model
from diffseg.export.checkpoints import CheckpointError, load_checkpoint, load_weights
from diffseg.export.cli_support import (
    NOT_STATED,
    load_export_config,
    phantom_patches,
    provenance_for,
    sampling_for,
)
from diffseg.export.contract_checks import ContractError, check_denoiser
from diffseg.export.onnx_export import ExportError
from diffseg.export.package import DEFAULT_SAMPLING
from diffseg.export.reference import ReferenceSettings, ddim_pairs, gaussian_map, reference_sample
from diffseg.export.unet import DiffusionUNet3D, UNetConfig
from diffseg.runtime.diffusion_schedule import TIMESTEP_SPACINGS, SamplerOptions, SchedulerConfig, timestep_pairs
from diffseg.runtime.sampling import sample_step_major
from diffseg.runtime.sliding_window import WindowOptions

# TorchScript models are built here only to be refused; torch deprecates torch.jit.script itself.
JIT_DEPRECATED = "ignore:`torch.jit.script` is deprecated:DeprecationWarning"
MONAI_CFG = {
    "architecture": "monai-diffusion-unet",
    "model": {
        "in_channels": 3,
        "out_channels": 1,
        "channels": [8, 16],
        "attention_levels": [False, True],
        "num_res_blocks": 1,
        "norm_num_groups": 4,
        "num_head_channels": 8,
    },
}


def assert_nothing_written(tmp_path, name="pkg"):
    assert not (tmp_path / name).exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(f".{name}.")], "no staging folder left behind"


# ---------------------------------------------------------------------------------------------- the reference


@pytest.mark.parametrize("patch", [(16, 16, 16), (32, 32, 32), (64, 64, 64), (15, 20, 33)])
def test_reference_importance_map_is_monai_s(patch):
    from monai.inferers.utils import compute_importance_map

    want = compute_importance_map(patch, mode="gaussian", sigma_scale=0.125)
    got = gaussian_map(patch)
    assert got.dtype == torch.float32 and got.shape == want.shape
    assert (got - want).abs().max().item() <= 1e-7


@pytest.mark.parametrize("spacing", TIMESTEP_SPACINGS)
def test_reference_timesteps_are_diffusers_grid(spacing):
    from diffusers import DDIMScheduler

    for offset in (0, 1) if spacing == "leading" else (0,):
        scheduler = DDIMScheduler(num_train_timesteps=1000, timestep_spacing=spacing, steps_offset=offset)
        for n in range(1, 51):
            scheduler.set_timesteps(n)
            pairs = ddim_pairs(1000, n, spacing, steps_offset=offset)
            assert [t for t, _ in pairs] == scheduler.timesteps.tolist(), (spacing, offset, n)
            assert [p for _, p in pairs] == [*[t for t, _ in pairs][1:], -1]
            assert pairs == [tuple(r) for r in timestep_pairs(1000, n, spacing, offset).tolist()]


def test_reference_single_step_runs_t0_to_x0():
    """steps=1 on the linspace grid is t = 0 (diffusers), and the last step returns the clipped x0 (ᾱ_prev = 1)."""
    assert ddim_pairs(1000, 1, "linspace") == [(0, -1)]
    seen = []

    class Constant(torch.nn.Module):
        def forward(self, x, t):
            seen.extend(t.tolist())
            return torch.full((x.shape[0], 1, *x.shape[2:]), 0.5)

    image = np.zeros((2, 16, 16, 16), np.float32)
    settings = ReferenceSettings(steps=1, samples=2, timestep_spacing="linspace")
    prob = reference_sample(Constant(), image, PATCH, settings, seed=0)
    assert set(seen) == {0.0}
    np.testing.assert_allclose(prob, 0.75, atol=1e-6)
    with pytest.raises(ValueError, match="timestep_spacing must be one of linspace, leading, trailing; got 'log'"):
        ddim_pairs(1000, 4, "log")
    with pytest.raises(ValueError, match=r"steps must be an int in \[1, 1000\]"):
        ddim_pairs(1000, 0, "leading")


@pytest.mark.parametrize(("steps", "spacing"), [(1, "linspace"), (3, "linspace"), (3, "leading"), (2, "trailing")])
def test_reference_matches_runtime_sampler(steps, spacing):
    """Same torch model, seed and noise: the reference loop and the runtime's step-major sampler agree to 1e-5."""
    torch.manual_seed(0)
    model = DiffusionUNet3D(UNetConfig(base_channels=4, channel_mult=(1, 2), groups=2)).eval()
    image = np.random.default_rng(1).uniform(-1, 1, size=(2, 24, 20, 18)).astype(np.float32)

    def run(x, t):
        with torch.no_grad():
            return model(torch.from_numpy(x), torch.from_numpy(t)).numpy()

    config = SchedulerConfig(prediction_type="sample", beta_dtype="float64")
    options = SamplerOptions(steps=steps, timestep_spacing=spacing, eps_convention="recompute", num_samples=2, seed=3)
    got = sample_step_major(image, run, config, options, WindowOptions(patch_size=PATCH, batch_size=4)).mean
    settings = ReferenceSettings(steps=steps, samples=2, prediction_type="sample", timestep_spacing=spacing)
    want = reference_sample(model, image, PATCH, settings, seed=3).mean(axis=0)
    assert np.abs(got - want).max() <= 1e-5


# --------------------------------------------------------------------------------------- checkpoint adapters


@pytest.fixture(scope="module")
def monai_model():
    torch.manual_seed(0)
    return build_model(MONAI_CFG).eval()


def _same(model, reference, offset: float = 0.0) -> bool:
    want = reference.state_dict()
    got = model.state_dict()
    return set(got) == set(want) and all(
        torch.equal(got[k], want[k] + offset if want[k].is_floating_point() else want[k]) for k in want
    )


@pytest.mark.parametrize(
    ("layout", "renaming"),
    [
        ("raw_monai", ("", "net.")),
        ("ours", ("", "")),
        ("lightning", ("model.", "net.")),
        ("ddp", ("module.", "")),
        ("lightning_ddp", ("model.module.", "")),
    ],
)
def test_checkpoint_layouts_load_the_original_weights(tmp_path, monai_model, layout, renaming):
    bare = monai_model.net.state_dict()
    ours = monai_model.state_dict()
    obj = {
        "raw_monai": bare,
        "ours": {"model": ours, "iteration": 6000, "optimizer": {"state": {}, "param_groups": [{"lr": 2e-3}]}},
        "lightning": {"state_dict": {f"model.{k}": v for k, v in bare.items()}, "epoch": 3, "hyper_parameters": {}},
        "ddp": {f"module.{k}": v for k, v in ours.items()},
        "lightning_ddp": {"state_dict": {f"model.module.{k}": v for k, v in ours.items()}},
    }[layout]
    path = tmp_path / f"{layout}.ckpt"
    torch.save(obj, path)
    model, info = load_checkpoint(path, MONAI_CFG)
    assert _same(model, monai_model)
    assert (info.removed_prefix, info.added_prefix) == renaming
    assert info.weights == "model" and not model.training
    assert path.name in info.describe()


@pytest.mark.parametrize(
    ("layout", "where"),
    [
        ("ema_container", "['ema']"),
        ("ema_state_dict", "['ema_state_dict']"),
        ("model_ema", "['model_ema']"),
        ("lightning_ema_prefix", "['state_dict'] keys under 'ema_model.'"),
        ("ema_prefix", "keys under 'ema.'"),
    ],
)
def test_ema_weights_are_picked_only_when_asked(tmp_path, monai_model, layout, where):
    bare = monai_model.net.state_dict()
    ema = {k: v + 1 if v.is_floating_point() else v for k, v in bare.items()}
    obj = {
        "ema_container": {"model": bare, "ema": ema},
        "ema_state_dict": {"model_state_dict": bare, "ema_state_dict": ema},
        "model_ema": {"state_dict": bare, "model_ema": ema},
        "lightning_ema_prefix": {
            "state_dict": {**{f"net.{k}": v for k, v in bare.items()}, **{f"ema_model.{k}": v for k, v in ema.items()}}
        },
        "ema_prefix": {**bare, **{f"ema.{k}": v for k, v in ema.items()}},
    }[layout]
    path = tmp_path / "ckpt.pt"
    torch.save(obj, path)
    model, info = load_checkpoint(path, MONAI_CFG)  # default: the trained network
    assert _same(model, monai_model) and info.weights == "model" and info.alternatives == "ema"
    assert "--weights ema" in info.describe()
    model, info = load_checkpoint(path, MONAI_CFG, weights="ema")
    assert _same(model, monai_model, offset=1.0) and info.weights == "ema"
    assert info.source.endswith(where)
    with pytest.raises(ValueError, match=r"weights must be one of \('model', 'ema'\), got 'swa'"):
        load_checkpoint(path, MONAI_CFG, weights="swa")


def test_ema_choice_errors_say_which_to_pass(tmp_path, monai_model):
    only_ema = tmp_path / "only_ema.pt"
    torch.save({"ema": monai_model.net.state_dict()}, only_ema)
    with pytest.raises(CheckpointError, match=r"only_ema\.pt holds only EMA weights; pass --weights ema"):
        load_checkpoint(only_ema, MONAI_CFG)
    no_ema = tmp_path / "no_ema.pt"
    torch.save(monai_model.state_dict(), no_ema)
    with pytest.raises(CheckpointError, match=r"no_ema\.pt holds no EMA weights .*use --weights model"):
        load_checkpoint(no_ema, MONAI_CFG, weights="ema")


def test_pickled_module_is_refused_with_the_fix(tmp_path, monai_model):
    path = tmp_path / "whole_model.pt"
    torch.save(monai_model, path)
    with pytest.raises(CheckpointError) as err:
        load_checkpoint(path, MONAI_CFG)
    msg = str(err.value)
    assert str(path) in msg and "holds a pickled module (diffseg.export.architectures.MonaiDenoiser)" in msg
    assert "save model.state_dict() instead: torch.save(model.state_dict(), 'ckpt.pt')" in msg


@pytest.mark.filterwarnings(JIT_DEPRECATED, "ignore:`torch.jit.save` is deprecated:DeprecationWarning")
def test_torchscript_archive_and_foreign_objects_are_refused(tmp_path):
    scripted = tmp_path / "scripted.pt"
    torch.jit.save(torch.jit.script(torch.nn.Linear(2, 2)), scripted)
    with pytest.raises(CheckpointError, match=r"scripted\.pt is a TorchScript archive .*model\.state_dict\(\)"):
        load_checkpoint(scripted, MONAI_CFG)
    # weights_only=True always: a checkpoint holding a class object is refused, not unpickled.
    hparams = tmp_path / "hparams.pt"
    torch.save({"state_dict": {}, "hyper_parameters": {"cls": torch.nn.Linear}}, hparams)
    with pytest.raises(CheckpointError, match=r"hparams\.pt holds Python objects besides tensors .*weights_only=True"):
        load_checkpoint(hparams, MONAI_CFG)
    junk = tmp_path / "junk.pt"
    junk.write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match=r"junk\.pt is not a PyTorch checkpoint"):
        load_checkpoint(junk, MONAI_CFG)
    with pytest.raises(FileNotFoundError, match="no such checkpoint"):
        load_checkpoint(tmp_path / "missing.pt", MONAI_CFG)


def test_key_mismatch_names_the_file_and_the_first_keys(tmp_path):
    other = DiffusionUNet3D(UNetConfig(base_channels=4, channel_mult=(1, 2), groups=2))
    path = tmp_path / "other_net.pt"
    torch.save({"state_dict": {f"model.{k}": v for k, v in other.state_dict().items()}}, path)
    with pytest.raises(CheckpointError) as err:
        load_checkpoint(path, MONAI_CFG)
    msg = str(err.value)
    assert str(path) in msg and "do not match MonaiDenoiser" in msg
    assert "model keys missing (net.conv_in.conv.weight, " in msg and "unexpected checkpoint keys (" in msg
    assert "Check that the config's architecture and model section describe the trained network" in msg
    assert len(msg) < 1200, "a short message, not a key dump"


def test_shape_mismatch_is_named_per_key(tmp_path, monai_model):
    wider = dict(MONAI_CFG, model={**MONAI_CFG["model"], "channels": [8, 24], "num_head_channels": 8})
    path = tmp_path / "narrow.pt"
    torch.save(monai_model.net.state_dict(), path)
    with pytest.raises(CheckpointError) as err:
        load_checkpoint(path, wider)
    msg = str(err.value)
    assert str(path) in msg and "tensors have other shapes than in MonaiDenoiser" in msg
    assert ": checkpoint (16," in msg and ", model (24," in msg
    assert msg.endswith("does the config's model section match the checkpoint?")


def test_load_weights_into_any_module(tmp_path):
    torch.manual_seed(1)
    net = DiffusionUNet3D(UNetConfig(base_channels=4, channel_mult=(1, 2), groups=2))
    path = tmp_path / "lightning.ckpt"
    torch.save({"state_dict": {f"net.{k}": v for k, v in net.state_dict().items()}}, path)
    fresh = DiffusionUNet3D(UNetConfig(base_channels=4, channel_mult=(1, 2), groups=2))
    info = load_weights(fresh, path)
    assert _same(fresh, net) and info.removed_prefix == "net."


# ----------------------------------------------------------------------------------------- export contract


class _Conv(torch.nn.Module):
    """A one-layer denoiser with a configurable output (channels, padding, axes)."""

    def __init__(self, out_channels: int = 1, padding: int = 1, squeeze: bool = False, in_channels: int = 3) -> None:
        super().__init__()
        self.conv = torch.nn.Conv3d(in_channels, out_channels, 3, padding=padding)
        self.squeeze = squeeze

    def forward(self, x, t):
        y = self.conv(x) + t[:, None, None, None, None] / 1000
        return y[:, 0] if self.squeeze else y


class _EmbeddingOnT(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = torch.nn.Conv3d(3, 1, 3, padding=1)
        self.emb = torch.nn.Embedding(1000, 1)

    def forward(self, x, t):
        return self.conv(x) + self.emb(t)[:, :, None, None, None]


class _BranchOnT(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = torch.nn.Conv3d(3, 1, 3, padding=1)

    def forward(self, x, t):
        if t[0] > 500:
            return self.conv(x) * 2
        return self.conv(x)


class _FixedBatch(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = torch.nn.Conv3d(3, 1, 3, padding=1)

    def forward(self, x, t):
        return self.conv(x).reshape(2, 1, *x.shape[2:]) + t.reshape(2, 1, 1, 1, 1) / 1000


def _monai_three_levels():
    return MonaiDenoiser(
        in_channels=3,
        out_channels=1,
        channels=(4, 8, 8),
        attention_levels=(False, False, False),
        num_res_blocks=1,
        norm_num_groups=4,
    )


@pytest.mark.parametrize(
    ("make", "patch", "out_channels", "message"),
    [
        (
            lambda: _Conv(out_channels=2),
            PATCH,
            1,
            r"_Conv: the output check at t = 0 .*output shape \(2, 2, 16, 16, 16\): 2 output channels where the "
            r"package declares 1",
        ),
        (
            lambda: _Conv(padding=0),
            PATCH,
            1,
            r"_Conv: the output check at t = 0 .*output shape \(2, 1, 14, 14, 14\), the package declares "
            r"\(2, 1, 16, 16, 16\): the spatial size differs from the patch \(valid padding\?\)",
        ),
        (
            lambda: _Conv(squeeze=True),
            PATCH,
            1,
            r"_Conv: the output check .*output shape \(2, 16, 16, 16\), the package declares \(2, 1, 16, 16, 16\) "
            r"\(no channel axis",
        ),
        (
            _EmbeddingOnT,
            PATCH,
            1,
            r"_EmbeddingOnT: the contract check .* needs integer t .*cast t inside forward: t\.long\(\)",
        ),
        (
            _monai_three_levels,
            (18, 16, 16),
            1,
            r"MonaiDenoiser: the contract check .* on patch \(18, 16, 16\).*patch must be divisible by 2\*\*levels = 4 "
            r"\(e\.g\. \(20, 16, 16\)\)",
        ),
        (
            lambda: torch.jit.script(_Conv()),
            PATCH,
            1,
            r"is a TorchScript module .*export the eager nn\.Module, not a ScriptModule",
        ),
        (
            _Conv,
            (None, 16, 16),
            1,
            r"patch_size must be three positive ints \(a package has one fixed patch.*got \(None, 16, 16\)",
        ),
        (
            lambda: _Conv(in_channels=2),
            PATCH,
            1,
            r"_Conv: .*first layer takes 2 input channels, the package feeds 3",
        ),
        (
            lambda: torch.nn.Sequential(torch.nn.Conv3d(3, 1, 3, padding=1)),
            PATCH,
            1,
            r"Sequential: the contract check .* forward must take \(x, t\)",
        ),
    ],
    ids=[
        "two-channels",
        "valid-padding",
        "no-channel-axis",
        "embedding-t",
        "not-divisible",
        "script",
        "dynamic-patch",
        "in-channels",
        "forward-without-t",
    ],
)
@pytest.mark.filterwarnings(JIT_DEPRECATED)
def test_bad_models_are_refused_before_anything_is_written(tmp_path, make, patch, out_channels, message):
    torch.manual_seed(0)
    with pytest.raises(ContractError, match=message):
        export(make(), tmp_path, out_channels=out_channels, patch=patch)
    assert_nothing_written(tmp_path)


@pytest.mark.parametrize(
    ("model", "message"),
    [
        (
            _BranchOnT(),
            r"_BranchOnT: torch.export failed on data-dependent control flow at .*test_export_contract\.py:\d+ "
            r"\(if t\[0\] > 500:\): a branch on the value of t .*cannot be exported; .*torch\.where",
        ),
        (_FixedBatch(), r"_FixedBatch: torch.export found the batch size fixed inside the model"),
    ],
    ids=["branch-on-t", "fixed-batch"],
)
def test_export_errors_are_explained(tmp_path, model, message):
    with pytest.raises(ExportError, match=message):
        export(model.eval(), tmp_path)
    assert_nothing_written(tmp_path)


def test_learned_sigma_output_passes_when_declared():
    """2 output channels with ``output_channels`` 2 (the prediction in channel 0) meet the contract."""
    torch.manual_seed(0)
    check_denoiser(_Conv(out_channels=2), in_channels=3, patch=PATCH, output_channels=2)
    with pytest.raises(ContractError, match=r"2 output channels where the package declares 1"):
        check_denoiser(_Conv(out_channels=2), in_channels=3, patch=PATCH, output_channels=1)


# ---------------------------------------------------------------------------------- diffseg export, config


def _export_config(tmp_path, **extra) -> dict:
    cfg = {
        "name": "researcher-model",
        **MONAI_CFG,
        "patch_size": list(PATCH),
        "spacing_mm": 2.0,
        "modalities": ["PT", "CT"],
        "normalisation": {m["code"]: {"unit": m["unit"], **m["normalisation"]} for m in MODALITIES},
        "diffusion": {k: v for k, v in diffusion().items() if k != "output_channels"},
        **extra,
    }
    (tmp_path / "cfg.json").write_text(json.dumps(cfg))
    return cfg


def test_provenance_is_what_someone_said(tmp_path):
    _export_config(tmp_path)
    cfg = load_export_config(tmp_path / "cfg.json")  # no train section
    assert "train" not in cfg
    prov = provenance_for(cfg)
    assert {prov[k] for k in ("training_data", "intended_use", "licence", "model_version")} == {NOT_STATED}
    cfg["provenance"] = {"licence": "CC-BY-4.0", "training_data": "HECKTOR 2022 train split"}
    prov = provenance_for(cfg, {"licence": "MIT", "intended_use": None, "model_version": "2.1"})
    assert prov["licence"] == "MIT" and prov["training_data"] == "HECKTOR 2022 train split"
    assert prov["model_version"] == "2.1" and prov["intended_use"] == NOT_STATED
    with pytest.raises(ValueError, match=r"provenance: unknown keys \['license'\]"):
        provenance_for({**cfg, "provenance": {"license": "MIT"}})


def test_default_config_keeps_the_shipped_provenance(default_package):
    from pathlib import Path

    import diffseg.export

    cfg = load_export_config(Path(diffseg.export.__file__).parent / "configs" / "default.json")
    prov = provenance_for(cfg)
    shipped = default_package.manifest.raw["provenance"]
    for key in ("training_data", "intended_use", "licence", "model_version"):
        assert prov[key] == shipped[key], key
    assert sampling_for(cfg) == default_package.manifest.raw["defaults"]


def test_sampling_section_is_merged_and_checked(tmp_path):
    cfg = _export_config(tmp_path, sampling={"steps": 4, "timestep_spacing": "leading"})
    assert sampling_for(cfg) == {**DEFAULT_SAMPLING, "steps": 4, "timestep_spacing": "leading"}
    with pytest.raises(ValueError, match=r"sampling: unknown keys \['stpes'\]; allowed: \["):
        sampling_for({**cfg, "sampling": {"stpes": 4}})
    with pytest.raises(ValueError, match="sampling: steps must be of type"):
        sampling_for({**cfg, "sampling": {"steps": "4"}})


def test_config_checks_and_parity_phantoms(tmp_path):
    cfg = _export_config(tmp_path)
    del cfg["diffusion"]
    (tmp_path / "bad.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match=r"bad\.json: missing keys \['diffusion'\]; an export config needs"):
        load_export_config(tmp_path / "bad.json")
    # MR is not a phantom modality: random parity inputs only (the phantom generator is never asked for MR).
    assert phantom_patches({**cfg, "modalities": ["MR"]}, 2) == []


def test_diffseg_export_cli_without_train_section(tmp_path, monai_model, capsys):
    from diffseg.runtime.cli import main

    _export_config(tmp_path, sampling={"steps": 4})
    model = copy.deepcopy(monai_model)
    out_conv = [m for m in model.modules() if isinstance(m, torch.nn.Conv3d)][-1]
    with torch.no_grad():
        torch.nn.init.normal_(out_conv.weight, std=0.05)  # MONAI zero-initialises it
    bare = model.net.state_dict()
    ckpt = tmp_path / "epoch=9.ckpt"
    torch.save(
        {
            "state_dict": {
                **{f"model.{k}": v for k, v in bare.items()},
                **{f"ema_model.{k}": v for k, v in bare.items()},
            }
        },
        ckpt,
    )
    args = ["export", "--checkpoint", str(ckpt), "--config", str(tmp_path / "cfg.json"), "-o", str(tmp_path / "pkg")]
    assert main([*args, "--weights", "ema", "--licence", "CC-BY-4.0", "--parity-phantoms", "0"]) == 0
    printed = capsys.readouterr().out
    assert "weights: ema (['state_dict'] keys under 'ema_model.' of epoch=9.ckpt)" in printed
    manifest = json.loads((tmp_path / "pkg" / "manifest.json").read_text())
    prov = manifest["provenance"]
    assert prov["licence"] == "CC-BY-4.0" and prov["training_data"] == NOT_STATED
    assert prov["checkpoint"]["weights"] == "ema" and manifest["defaults"]["steps"] == 4
    # A bad checkpoint leaves no package folder.
    torch.save(model, tmp_path / "module.pt")
    assert main(["export", "--checkpoint", str(tmp_path / "module.pt"), *args[3:5], "-o", str(tmp_path / "pkg2")]) == 2
    assert "module.pt holds a pickled module (diffseg.export.architectures.MonaiDenoiser)" in capsys.readouterr().err
    assert_nothing_written(tmp_path, "pkg2")
