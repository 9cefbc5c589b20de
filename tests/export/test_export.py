"""Export: ONNX fp32/fp16 parity against PyTorch (limits 1e-4 and 1e-2, ‖Δ‖/‖ref‖), graph checks, packages.

Networks are small and randomly initialised, with a final layer that is not zero (a zero output proves nothing).
"""

from __future__ import annotations

import json
import math

import numpy as np
import onnx
import pytest
import torch
from export_helpers import PATCH, export
from onnx import TensorProto, helper

from diffseg.export.onnx_export import ExportError, check_graph
from diffseg.export.unet import DiffusionUNet3D, UNetConfig
from diffseg.runtime.manifest import ManifestError, load_package


def assert_parity(pkg_dir):
    manifest = json.loads((pkg_dir / "manifest.json").read_text())
    parity = manifest["validation"]["parity"]
    assert parity["onnx_fp32_vs_torch_fp32"]["rel_error"] <= 1e-4
    assert parity["onnx_fp16_vs_torch_fp32"]["rel_error"] <= 1e-2
    assert parity["onnx_fp16_vs_torch_fp32"]["finite"]
    return manifest


def test_diffseg_unet_exports_with_parity(tmp_path):
    torch.manual_seed(0)
    model = DiffusionUNet3D(UNetConfig(base_channels=4, channel_mult=(1, 2), groups=2)).eval()
    assert model.out_conv.weight.abs().sum() > 0
    rng = np.random.default_rng(1)
    patches = [rng.uniform(-1, 1, size=(2, *PATCH)).astype(np.float32)]
    pkg = export(model, tmp_path, patches=patches)
    manifest = assert_parity(pkg)
    loaded = load_package(pkg)
    assert loaded.manifest.patch_size == PATCH and set(loaded.files) == {"fp32", "fp16", "torch", "torch_export"}
    model_fp32 = onnx.load(str(loaded.engine("fp32").path))
    ops = {n.op_type for n in model_fp32.graph.node}
    assert not ops & {"GroupNormalization", "Attention"}
    t_input = next(i for i in model_fp32.graph.input if i.name == "t")
    assert t_input.type.tensor_type.elem_type == TensorProto.FLOAT
    # fp32 islands: normalisation and the time embedding stay float32 in the fp16 graph.
    fp16 = onnx.shape_inference.infer_shapes(onnx.load(str(loaded.engine("fp16").path)))
    types = {v.name: v.type.tensor_type.elem_type for v in [*fp16.graph.value_info, *fp16.graph.output]}
    out_types = {}
    for node in fp16.graph.node:
        out_types.setdefault(node.op_type, set()).add(types.get(node.output[0]))
    for op in ("InstanceNormalization", "Cos", "Sin", "Gemm"):
        assert out_types[op] == {TensorProto.FLOAT}, op
    assert TensorProto.FLOAT16 in out_types["Conv"]
    assert types["y"] == TensorProto.FLOAT
    assert manifest["files"]["fp32"]["opset"] == 18


def test_no_nan_at_extreme_timesteps(tmp_path):
    """The fp16 graph stays finite at t = 0, T/2, T−1 (checked inside the parity report and here directly)."""
    import onnxruntime as ort

    torch.manual_seed(3)
    model = DiffusionUNet3D(UNetConfig(base_channels=4, channel_mult=(1, 2), groups=2)).eval()
    pkg = load_package(export(model, tmp_path))
    sess = ort.InferenceSession(str(pkg.engine("fp16").path), providers=["CPUExecutionProvider"])
    x = np.random.default_rng(0).standard_normal((3, 3, *PATCH), dtype=np.float32)
    y = sess.run(["y"], {"x": x, "t": np.array([0, 500, 999], np.float32)})[0]
    assert np.isfinite(y).all()


def test_monai_diffusion_unet_exports(tmp_path):
    """Bring your own denoiser: MONAI's DiffusionModelUNet, 3D, attention off, final layer re-initialised."""
    from diffseg.export.architectures import MonaiDenoiser

    torch.manual_seed(0)
    model = MonaiDenoiser(
        in_channels=3,
        out_channels=1,
        channels=(8, 16),
        attention_levels=(False, False),
        num_res_blocks=1,
        norm_num_groups=4,
    ).eval()
    out_conv = [m for m in model.modules() if isinstance(m, torch.nn.Conv3d)][-1]
    torch.nn.init.normal_(out_conv.weight, std=0.05)  # MONAI zero-initialises it
    assert_parity(export(model, tmp_path, name="monai"))


class _GuidedResBlock(torch.nn.Module):
    """guided-diffusion's ResBlock with use_scale_shift_norm and resblock_updown (down by a strided conv)."""

    def __init__(self, cin: int, cout: int, emb: int, down: bool) -> None:
        super().__init__()
        self.in_layers = torch.nn.Sequential(torch.nn.GroupNorm(4, cin), torch.nn.SiLU())
        self.conv = torch.nn.Conv3d(cin, cout, 3, stride=2 if down else 1, padding=1)
        self.emb = torch.nn.Linear(emb, 2 * cout)
        self.out_norm = torch.nn.GroupNorm(4, cout)
        self.out_conv = torch.nn.Conv3d(cout, cout, 3, padding=1)
        self.skip = torch.nn.Conv3d(cin, cout, 1, stride=2 if down else 1)

    def forward(self, x, emb):
        h = self.conv(self.in_layers(x))
        scale, shift = self.emb(torch.nn.functional.silu(emb))[..., None, None, None].chunk(2, dim=1)
        h = self.out_norm(h) * (1 + scale) + shift
        return self.skip(x) + self.out_conv(torch.nn.functional.silu(h))


class GuidedStyleUNet(torch.nn.Module):
    """A guided-diffusion style 3D UNet with learned sigma: 2 output channels (ε, variance interpolation)."""

    def __init__(self, ch: int = 8) -> None:
        super().__init__()
        self.ch = ch
        self.time = torch.nn.Sequential(torch.nn.Linear(ch, 4 * ch), torch.nn.SiLU(), torch.nn.Linear(4 * ch, 4 * ch))
        self.inp = torch.nn.Conv3d(3, ch, 3, padding=1)
        self.down = _GuidedResBlock(ch, 2 * ch, 4 * ch, down=True)
        self.mid = _GuidedResBlock(2 * ch, 2 * ch, 4 * ch, down=False)
        self.up = torch.nn.ConvTranspose3d(2 * ch, ch, 2, stride=2)
        self.dec = _GuidedResBlock(2 * ch, ch, 4 * ch, down=False)
        self.out = torch.nn.Sequential(torch.nn.GroupNorm(4, ch), torch.nn.SiLU(), torch.nn.Conv3d(ch, 2, 3, padding=1))

    def forward(self, x, t):
        half = self.ch // 2
        freqs = torch.exp(-math.log(10000) * torch.arange(half, dtype=torch.float32) / half)
        args = t[:, None].float() * freqs[None]
        emb = self.time(torch.cat([torch.cos(args), torch.sin(args)], dim=-1))
        h0 = self.inp(x)
        h = self.mid(self.down(h0, emb), emb)
        return self.out(self.dec(torch.cat([self.up(h), h0], dim=1), emb))


def test_guided_diffusion_style_two_channel_exports(tmp_path):
    torch.manual_seed(0)
    model = GuidedStyleUNet().eval()
    pkg = export(model, tmp_path, name="guided", out_channels=2)
    manifest = assert_parity(pkg)
    assert manifest["files"]["fp32"]["outputs"]["y"][1] == 2
    assert load_package(pkg).manifest.output_channels == 2


# The weights scaled by 1e6 are meant to overflow fp16: onnxconverter_common says it clips them (its own warning).
@pytest.mark.filterwarnings("ignore:the float32 number .* will be truncated to:UserWarning:onnxconverter_common\\..*")
def test_export_refuses_when_fp16_parity_fails(tmp_path):
    """Activations beyond fp16's range (65504) make the fp16 graph overflow: the export must refuse and say why."""
    torch.manual_seed(0)
    model = DiffusionUNet3D(UNetConfig(base_channels=4, channel_mult=(1, 2), groups=2)).eval()
    with torch.no_grad():
        model.stem.weight.mul_(1e6)
    with pytest.raises(ExportError, match=r"onnx_fp16_vs_torch_fp32: output y .*package not written"):
        export(model, tmp_path, name="bad")
    assert not (tmp_path / "bad").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".bad")], "no staging folder left behind"


def test_graph_check_rejects_fused_group_norm(tmp_path):
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 3, *PATCH])
    t = helper.make_tensor_value_info("t", TensorProto.FLOAT, ["batch"])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 3, *PATCH])
    scale = helper.make_tensor("scale", TensorProto.FLOAT, [3], [1.0, 1.0, 1.0])
    bias = helper.make_tensor("bias", TensorProto.FLOAT, [3], [0.0, 0.0, 0.0])
    node = helper.make_node("GroupNormalization", ["x", "scale", "bias"], ["y"], num_groups=3)
    graph = helper.make_graph([node], "g", [x, t], [y], [scale, bias])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)])
    path = tmp_path / "gn.onnx"
    onnx.save(model, str(path))
    with pytest.raises(ExportError, match="GroupNormalization"):
        check_graph(path, 3, PATCH)


def test_shipped_default_package(default_package):
    m = default_package.manifest
    assert m.modalities == ("PT", "CT") and m.patch_size == (64, 64, 64) and m.spacing_mm == 2.0
    parity = m.raw["validation"]["parity"]
    assert all(r["passed"] for r in parity.values())
    assert "not for clinical use" in m.raw["provenance"]["intended_use"]
    total = sum(p.stat().st_size for p in default_package.root.iterdir())
    assert total < 25 * 2**20


def test_tampered_package_is_refused(tmp_path, default_package):
    import shutil

    copy = tmp_path / "pkg"
    shutil.copytree(default_package.root, copy)
    with open(copy / "denoiser.onnx", "r+b") as fh:
        fh.seek(1000)
        byte = fh.read(1)
        fh.seek(1000)
        fh.write(bytes([byte[0] ^ 0xFF]))
    with pytest.raises(ManifestError, match=r"sha256 of denoiser\.onnx does not match"):
        load_package(copy)
    doc = json.loads((copy / "manifest.json").read_text())
    doc["diffusion"]["prediction_type"] = "noise"
    (copy / "manifest.json").write_text(json.dumps(doc))
    with pytest.raises(ManifestError, match="prediction_type must be one of"):
        load_package(copy, verify=False)
    doc["diffusion"]["prediction_type"] = "sample"
    doc["defaults"]["retire_after"] = -1
    (copy / "manifest.json").write_text(json.dumps(doc))
    with pytest.raises(ManifestError, match="retire_after must be an int >= 0"):
        load_package(copy, verify=False)


@pytest.mark.parametrize(
    ("section", "key", "value", "message"),
    [
        ("diffusion", "beta_shedule", "linear", r"diffusion: unknown diffusion keys \['beta_shedule'\]"),
        ("diffusion", "clip_range", 0.0, "diffusion: clip_range must be a positive number, got 0.0"),
        ("defaults", "stpes", 10, r"defaults: unknown keys \['stpes'\]"),
        ("defaults", "steps", "ten", "defaults: steps must be an int >= 1, got 'ten'"),
        ("defaults", "samples", 0, r"defaults: num_samples must be an int >= 1, got 0"),
        ("defaults", "timestep_spacing", "log", "defaults: timestep_spacing must be one of"),
    ],
)
def test_manifest_fields_are_checked_by_the_scheduler_s_own_rules(
    tmp_path, default_package, section, key, value, message
):
    # Reference: the rule that a manifest key is never filtered out before validation (a typo used to be dropped
    # silently): the manifest check and the scheduler share one definition of keys and allowed values.
    import shutil

    copy = tmp_path / "pkg"
    shutil.copytree(default_package.root, copy)
    doc = json.loads((copy / "manifest.json").read_text())
    doc[section][key] = value
    (copy / "manifest.json").write_text(json.dumps(doc))
    with pytest.raises(ManifestError, match=message):
        load_package(copy, verify=False)
