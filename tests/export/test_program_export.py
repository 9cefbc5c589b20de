"""torch.export programs in model packages: denoiser.pt2 written, checked and run by the torch backend, no registry.

References and tolerances: the torch backend's output on a package's program against the eager model it came from
(‖Δ‖/‖ref‖ <= 1e-5, fp32, CPU), the manifest's sha256 against the file's. A program that ``load_program`` refuses
(damaged, TorchScript, pickled payloads, code hidden in the program's JSON) raises its named error, runs nothing
from the file and leaves no package folder behind. Networks are tiny and randomly initialised (16³ patches).
"""

from __future__ import annotations

import json
import sys

import numpy as np
import pytest
import torch
from export_helpers import MODALITIES, PATCH, diffusion, export

from diffseg.export.architectures import ARCHITECTURES
from diffseg.export.onnx_export import ExportError
from diffseg.export.program_export import ProgramError, export_program, load_program
from diffseg.runtime.backends import BackendUnavailableError
from diffseg.runtime.backends.torch_backend import TorchBackend
from diffseg.runtime.manifest import ManifestError, load_package, sha256_of
from diffseg.runtime.verify import compare_outputs

# TorchScript files are written here only to be refused; torch deprecates torch.jit.script and torch.jit.save.
JIT_DEPRECATED = "ignore:`torch.jit.(script|save)` is deprecated:DeprecationWarning"


class MonaiCustom(torch.nn.Module):
    """A researcher's own wrapper of MONAI's DiffusionModelUNet (3D, attention at the second level): not a class
    of diffseg's registry."""

    def __init__(self) -> None:
        super().__init__()
        from monai.networks.nets import DiffusionModelUNet

        self.unet = DiffusionModelUNet(
            spatial_dims=3,
            in_channels=3,
            out_channels=1,
            channels=(8, 16),
            attention_levels=(False, True),
            num_res_blocks=1,
            norm_num_groups=4,
            num_head_channels=8,
        )
        out_conv = [m for m in self.modules() if isinstance(m, torch.nn.Conv3d)][-1]
        torch.nn.init.normal_(out_conv.weight, std=0.05)  # MONAI zero-initialises it: a zero output proves nothing

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return self.unet(x, timesteps=t)


class Tiny(torch.nn.Module):
    """Two convolutions and a time embedding: the cheapest denoiser that uses both x and t."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = torch.nn.Linear(1, 4)
        self.conv1 = torch.nn.Conv3d(3, 4, 3, padding=1)
        self.conv2 = torch.nn.Conv3d(4, 1, 3, padding=1)

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        emb = self.emb(t[:, None] / 1000.0)[:, :, None, None, None]
        return self.conv2(torch.nn.functional.silu(self.conv1(x) + emb))


def _inputs(batch: int = 3, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    x = np.random.default_rng(seed).standard_normal((batch, 3, *PATCH), dtype=np.float32)
    return x, np.array([0.0, 500.0, 999.0][:batch], np.float32)


def _eager(model: torch.nn.Module, x: np.ndarray, t: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        return model.eval()(torch.from_numpy(x), torch.from_numpy(t)).numpy()


def assert_nothing_written(tmp_path, name="pkg"):
    assert not (tmp_path / name).exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(f".{name}.")], "no staging folder left behind"


@pytest.mark.slow  # about 45 s on 2 cores: the ONNX export of the MONAI network alone takes 20 s
def test_monai_package_runs_on_the_torch_backend_without_the_registry(tmp_path, monkeypatch):
    torch.manual_seed(0)
    model = MonaiCustom().eval()
    pkg_dir = export(model, tmp_path, name="monai")
    manifest = json.loads((pkg_dir / "manifest.json").read_text())
    entry = manifest["files"]["torch_export"]
    assert entry == {**entry, "path": "denoiser.pt2", "format": "torch_export", "precision": "fp32"}
    assert entry["sha256"] == sha256_of(pkg_dir / "denoiser.pt2")
    assert manifest["architecture"]["type"] not in ARCHITECTURES  # the registry could not rebuild it
    # No registry: importing it fails from here on, so the backend must run the program alone.
    monkeypatch.setitem(sys.modules, "diffseg.export.architectures", None)
    with pytest.raises(ImportError):
        from diffseg.export.architectures import build_model  # noqa: F401
    package = load_package(pkg_dir)
    x, t = _inputs()
    with TorchBackend(package, "fp32", threads=2) as backend:
        got = backend.run(x, t)
        assert backend.describe()["model_source"] == "torch_export (denoiser.pt2)"
    result = compare_outputs("torch backend vs eager", [(got, _eager(model, x, t))], 1e-5)
    assert result.passed, result
    # fp16 needs the registry's weights: the program's devices and dtypes are fixed at export.
    with pytest.raises(BackendUnavailableError, match=r"denoiser\.pt2\) runs fp32 only"):
        TorchBackend(package, "fp16")


def test_altered_program_fails_the_sha256_check(tmp_path):
    torch.manual_seed(0)
    copy = export(Tiny(), tmp_path)
    data = bytearray((copy / "denoiser.pt2").read_bytes())
    data[len(data) // 2] ^= 0xFF
    (copy / "denoiser.pt2").write_bytes(bytes(data))
    with pytest.raises(ManifestError, match=r"files\.torch_export: sha256 of denoiser\.pt2 does not match"):
        load_package(copy)


def _config(tmp_path) -> None:
    """An export config for a program: no architecture, no model section."""
    cfg = {
        "name": "from-program",
        "patch_size": list(PATCH),
        "spacing_mm": 2.0,
        "modalities": ["PT", "CT"],
        "normalisation": {m["code"]: {"unit": m["unit"], **m["normalisation"]} for m in MODALITIES},
        "diffusion": {k: v for k, v in diffusion().items() if k != "output_channels"},
    }
    (tmp_path / "cfg.json").write_text(json.dumps(cfg))


def _save_program(model: torch.nn.Module, path) -> None:
    batch = torch.export.Dim("batch", min=1)
    x, t = (torch.from_numpy(a) for a in _inputs(2))
    torch.export.save(torch.export.export(model.eval(), (x, t), dynamic_shapes=({0: batch}, {0: batch})), path)


def test_diffseg_export_from_a_saved_program(tmp_path, monkeypatch, capsys):
    from diffseg.runtime.cli import main

    torch.manual_seed(0)
    model = Tiny().eval()
    _save_program(model, tmp_path / "saved.pt2")
    _config(tmp_path)
    out = tmp_path / "pkg"
    args = ["export", "--program", str(tmp_path / "saved.pt2"), "--config", str(tmp_path / "cfg.json")]
    assert main([*args, "-o", str(out), "--parity-phantoms", "0"]) == 0
    assert "program: saved.pt2 (sha256 " in capsys.readouterr().out
    package = load_package(out)
    manifest = package.manifest.raw
    assert manifest["architecture"] == {"type": "torch_export", "source": "saved.pt2"}
    assert manifest["provenance"]["program"] == {"file": "saved.pt2", "sha256": sha256_of(tmp_path / "saved.pt2")}
    monkeypatch.setitem(sys.modules, "diffseg.export.architectures", None)
    x, t = _inputs()
    with TorchBackend(package, "fp32", threads=2) as backend:
        assert compare_outputs("program", [(backend.run(x, t), _eager(model, x, t))], 1e-5).passed
    # --weights belongs to --checkpoint.
    assert main([*args, "-o", str(tmp_path / "pkg2"), "--weights", "ema"]) == 2
    assert "--weights picks the weights inside a --checkpoint" in capsys.readouterr().err
    assert_nothing_written(tmp_path, "pkg2")


def _bad_truncated(tmp_path):
    _save_program(Tiny(), tmp_path / "full.pt2")
    data = (tmp_path / "full.pt2").read_bytes()
    (tmp_path / "bad.pt2").write_bytes(data[: len(data) // 2])


def _bad_random(tmp_path):
    (tmp_path / "bad.pt2").write_bytes(np.random.default_rng(0).bytes(4096))


def _bad_torchscript(tmp_path):
    torch.jit.save(torch.jit.script(Tiny()), tmp_path / "bad.pt2")


def _bad_state_dict(tmp_path):
    torch.save(Tiny().state_dict(), tmp_path / "bad.pt2")


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (_bad_truncated, r"bad\.pt2 is not a torch\.export program \(torch's archive reader: .*truncated"),
        (_bad_random, r"bad\.pt2 is not a torch\.export program \(torch's archive reader: "),
        (_bad_torchscript, r"bad\.pt2 is a TorchScript archive \(torch\.jit\.save\), not a torch\.export program"),
        (_bad_state_dict, r"bad\.pt2 is a torch\.save file \(a state_dict or a pickled module\).*--checkpoint"),
    ],
    ids=["truncated", "random-bytes", "torchscript", "state-dict"],
)
@pytest.mark.filterwarnings(JIT_DEPRECATED)
def test_bad_program_is_refused_and_nothing_is_written(tmp_path, capsys, make, message):
    from diffseg.runtime.cli import main

    make(tmp_path)
    _config(tmp_path)
    with pytest.raises(ProgramError, match=message + r".*torch\.export\.save"):
        load_program(tmp_path / "bad.pt2")
    args = ["export", "--program", str(tmp_path / "bad.pt2"), "--config", str(tmp_path / "cfg.json")]
    assert main([*args, "-o", str(tmp_path / "pkg")]) == 2
    assert "diffseg export: error: " in capsys.readouterr().err
    assert_nothing_written(tmp_path)


def _rewrite(src, dst, change) -> None:
    """Copy a .pt2 archive record by record, ``change(records)`` editing the dict of name → bytes first."""
    from torch.export.pt2_archive._package import PT2ArchiveReader, PT2ArchiveWriter

    with PT2ArchiveReader(str(src)) as reader:
        records = {n: reader.read_bytes(n) for n in reader.get_file_names()}
    change(records)
    with PT2ArchiveWriter(str(dst)) as writer:
        for name, data in records.items():
            if name not in (".data/version", ".data/serialization_id", "byteorder"):
                writer.write_bytes(name, data)


def _inject_expr(records) -> None:
    program = json.loads(records["models/model.json"])
    placeholder = program["graph_module"]["graph"]["tensor_values"]
    first = next(v for v in placeholder.values() if "as_expr" in v["sizes"][0])
    first["sizes"][0]["as_expr"]["expr_str"] = "__import__('pathlib').Path('PWNED').touch() or Symbol('s0')"
    records["models/model.json"] = json.dumps(program).encode()


def _pickled_weight(records) -> None:
    config = json.loads(records["data/weights/model_weights_config.json"])
    meta = next(iter(config["config"].values()))
    meta["use_pickle"] = True
    records["data/weights/model_weights_config.json"] = json.dumps(config).encode()


def _native_code(records) -> None:
    records["data/aotinductor/model/model.so"] = b"\x7fELF"


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (_inject_expr, r"a symbolic shape of the program is not a plain sympy expression .*'__import__'"),
        (_pickled_weight, r"is stored as a pickled object \(weight_\d+\), which diffseg does not unpickle"),
        (_native_code, r"holds 'data/aotinductor/model/model\.so', which a plain torch\.export program does not"),
    ],
    ids=["code-in-a-shape", "pickled-weight", "aotinductor-library"],
)
def test_program_that_would_run_code_is_refused_before_torch_reads_it(tmp_path, monkeypatch, change, message):
    monkeypatch.chdir(tmp_path)
    _save_program(Tiny(), tmp_path / "good.pt2")
    assert isinstance(load_program(tmp_path / "good.pt2"), torch.nn.Module)  # the copy's source is fine
    _rewrite(tmp_path / "good.pt2", tmp_path / "bad.pt2", change)
    with pytest.raises(ProgramError, match=message):
        load_program(tmp_path / "bad.pt2")
    assert not (tmp_path / "PWNED").exists()


def _guards_code(records) -> None:
    program = json.loads(records["models/model.json"])
    program["guards_code"] = ["__import__('pathlib').Path('PWNED').touch() or True"]
    records["models/model.json"] = json.dumps(program).encode()


def test_stored_guards_are_never_executed(tmp_path, monkeypatch):
    """ExportedProgram.module() exec()s the program's guards_code on each call; load_program builds the module
    without them (check_guards=False), so the code in them never runs, and input shapes are still checked."""
    monkeypatch.chdir(tmp_path)
    torch.manual_seed(0)
    model = Tiny().eval()
    _save_program(model, tmp_path / "good.pt2")
    _rewrite(tmp_path / "good.pt2", tmp_path / "guards.pt2", _guards_code)
    module = load_program(tmp_path / "guards.pt2")
    x, t = _inputs()
    with torch.no_grad():
        np.testing.assert_array_equal(module(torch.from_numpy(x), torch.from_numpy(t)).numpy(), _eager(model, x, t))
        with pytest.raises(RuntimeError, match=r"Expected input at \*args\[1\]\.shape\[0\] to be equal to 3"):
            module(torch.from_numpy(x), torch.from_numpy(t[:2]))
    assert not (tmp_path / "PWNED").exists()


def test_program_with_a_fixed_batch_is_refused(tmp_path):
    x, t = (torch.from_numpy(a) for a in _inputs(2))
    torch.export.save(torch.export.export(Tiny().eval(), (x, t)), tmp_path / "static.pt2")
    with pytest.raises(ProgramError, match=r"static\.pt2: the program's batch is fixed at 2 .*dynamic_shapes"):
        load_program(tmp_path / "static.pt2")
    _save_program(Tiny(), tmp_path / "dynamic.pt2")
    with pytest.raises(ProgramError, match=r"takes x \[B, 3, 16, 16, 16\], the package declares \[B, 3, 32, 32, 32\]"):
        load_program(tmp_path / "dynamic.pt2", patch=(32, 32, 32))


class _BranchOnT(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = torch.nn.Conv3d(3, 1, 3, padding=1)

    def forward(self, x, t):
        if t[0] > 500:
            return self.conv(x) * 2
        return self.conv(x)


def test_export_program_failures_name_the_model(tmp_path):
    with pytest.raises(ExportError, match=r"_BranchOnT: torch\.export failed on data-dependent control flow"):
        export_program(_BranchOnT(), 3, PATCH, tmp_path / "denoiser.pt2")
    assert list(tmp_path.iterdir()) == []


def test_package_fails_cleanly_when_only_torch_export_refuses(tmp_path, monkeypatch):
    """The ONNX export accepts the model, the program export fails: ExportError naming it, no package folder."""
    real = torch.export.export

    def refuse_for_the_program(*args, **kwargs):
        if sys._getframe(1).f_globals.get("__name__") == "diffseg.export.program_export":
            raise RuntimeError("an operator torch.export cannot save")
        return real(*args, **kwargs)

    monkeypatch.setattr(torch.export, "export", refuse_for_the_program)
    torch.manual_seed(0)
    with pytest.raises(ExportError, match=r"Tiny: torch\.export\.export failed for the torch backend's program"):
        export(Tiny(), tmp_path)
    assert_nothing_written(tmp_path)


def test_loaded_program_is_an_eval_module(tmp_path):
    _save_program(Tiny(), tmp_path / "p.pt2")
    module = load_program(tmp_path / "p.pt2")
    assert module.eval() is module and not module.training
    with pytest.raises(RuntimeError, match="cannot be trained"):
        module.train()
    with pytest.raises(FileNotFoundError, match=r"no such torch\.export program"):
        load_program(tmp_path / "missing.pt2")
