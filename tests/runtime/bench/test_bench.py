"""Tests of the benchmark harness: the ONNX FLOP counter (hand counts, torch's counter), latency statistics, the
peak-memory monitor, and ``diffseg bench`` end to end on a tiny setting. No assertion depends on a timing."""

from __future__ import annotations

import json

import numpy as np
import pytest

from diffseg.runtime.bench import (
    BenchOptions,
    PeakRssMonitor,
    count_flops,
    latency_stats,
    plot_report,
    time_calls,
)
from diffseg.runtime.cli import main

onnx = pytest.importorskip("onnx")
from onnx import TensorProto, helper, numpy_helper  # noqa: E402


def _tiny_graph() -> onnx.ModelProto:
    """x [N, 3, 4, 4, 4] → Conv → grouped Conv → ConvTranspose → flatten → Gemm (transA) and a batched MatMul."""
    rng = np.random.default_rng(0)

    def init(name: str, shape: tuple[int, ...]) -> onnx.TensorProto:
        return numpy_helper.from_array(rng.standard_normal(shape).astype(np.float32), name)

    inits = [
        init("w1", (8, 3, 3, 3, 3)),  # Conv 3→8, k 3³, pads 1
        init("w2", (8, 4, 1, 1, 1)),  # Conv 8→8, group 2, k 1³
        init("w3", (8, 4, 2, 2, 2)),  # ConvTranspose 8→4, k 2³, stride 2
        init("gb", (2048, 5)),  # Gemm B
        init("mb", (2, 7, 3)),
    ]
    nodes = [
        helper.make_node("Conv", ["x", "w1"], ["c1"], pads=[1] * 6),
        helper.make_node("Conv", ["c1", "w2"], ["c2"], group=2),
        helper.make_node("ConvTranspose", ["c2", "w3"], ["c3"], strides=[2, 2, 2]),
        helper.make_node("Flatten", ["c3"], ["flat"], axis=1),  # [N, 4·8·8·8] = [N, 2048]
        helper.make_node("Transpose", ["flat"], ["flat_t"], perm=[1, 0]),  # [2048, N]
        helper.make_node("Gemm", ["flat_t", "gb"], ["g"], transA=1),  # [N, 5]
        helper.make_node("MatMul", ["m", "mb"], ["mm"]),  # [2, 4, 7] · [2, 7, 3] → [2, 4, 3]
    ]
    graph = helper.make_graph(
        nodes,
        "tiny",
        [
            helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 3, 4, 4, 4]),
            helper.make_tensor_value_info("m", TensorProto.FLOAT, [2, 4, 7]),
        ],
        [
            helper.make_tensor_value_info("g", TensorProto.FLOAT, None),
            helper.make_tensor_value_info("mm", TensorProto.FLOAT, None),
        ],
        inits,
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])


def _hand_macs(n: int) -> dict[str, int]:
    conv1 = n * 8 * 4**3 * (3 * 3**3)  # |Y| = N·8·4³ outputs, each C_in·k³ = 3·27 MACs
    conv2 = n * 8 * 4**3 * (4 * 1)  # group 2: each output sees 8/2 = 4 input channels, k = 1
    convt = n * 8 * 4**3 * (4 * 2**3)  # each of N·8·4³ inputs scattered to 4 outputs channels × 2³ taps
    gemm = n * 5 * 2048  # [N, 2048] · [2048, 5]
    matmul = 2 * 4 * 3 * 7  # batch 2 of [4, 7] · [7, 3]
    return {"Conv": conv1 + conv2, "ConvTranspose": convt, "Gemm": gemm, "MatMul": matmul}


@pytest.mark.parametrize("batch", [1, 3])
def test_flops_match_a_hand_count(batch):
    count = count_flops(_tiny_graph(), batch=batch)
    hand = _hand_macs(batch)
    assert count.by_op == hand  # exact
    assert count.macs == sum(hand.values())
    assert count.flops == 2 * sum(hand.values())
    assert count.nodes == 5 and not count.unresolved


def test_tiny_graph_shapes_are_what_onnxruntime_computes():
    """The hand count assumes these shapes; onnxruntime (an independent implementation) must produce them."""
    ort = pytest.importorskip("onnxruntime")
    sess = ort.InferenceSession(_tiny_graph().SerializeToString(), providers=["CPUExecutionProvider"])
    g, mm = sess.run(None, {"x": np.zeros((3, 3, 4, 4, 4), np.float32), "m": np.zeros((2, 4, 7), np.float32)})
    assert g.shape == (3, 5) and mm.shape == (2, 4, 3)


def test_flops_of_the_default_model_equal_torch_flop_counter(default_package):
    """Reference: torch.utils.flop_counter.FlopCounterMode on the same architecture (2·MACs of convolutions and
    addmm); exact equality at batch 1 (the batch scaling is checked on the tiny graph)."""
    torch = pytest.importorskip("torch")
    from torch.utils.flop_counter import FlopCounterMode

    from diffseg.export.architectures import build_model

    arch = dict(default_package.manifest.raw["architecture"])
    model = build_model({"architecture": arch.pop("type"), "model": arch}).eval()
    patch = tuple(default_package.manifest.patch_size)
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        model(torch.zeros(1, default_package.manifest.in_channels, *patch), torch.zeros(1))
    ours = count_flops(default_package.engine("fp32").path, batch=1)
    assert ours.flops == counter.get_total_flops()
    assert not ours.unresolved


def test_fp16_graph_counts_the_same_flops(default_package):
    fp32 = count_flops(default_package.engine("fp32").path)
    fp16 = count_flops(default_package.engine("fp16").path)
    assert fp16.by_op == fp32.by_op


def test_flops_boundary_errors(tmp_path):
    with pytest.raises(ValueError, match="batch must be an int >= 1, got 0"):
        count_flops(_tiny_graph(), batch=0)
    with pytest.raises(FileNotFoundError, match=r"nope\.onnx"):
        count_flops(tmp_path / "nope.onnx")
    with pytest.raises(ValueError, match="does not have"):
        count_flops(_tiny_graph(), input_shapes={"y": [1, 3, 4, 4, 4]})
    with pytest.raises(ValueError, match=r"input_shapes\['x'\] must have 5 dims"):
        count_flops(_tiny_graph(), input_shapes={"x": [1, 3]})


def test_latency_stats_against_numpy_percentiles():
    s = latency_stats([4.0, 1.0, 3.0, 2.0], first=9.0)
    # reference: linear interpolation between order statistics (numpy's default), exact in binary for these values
    assert (s.p50, s.min, s.max, s.mean, s.repeats, s.first) == (2.5, 1.0, 4.0, 2.5, 4, 9.0)
    assert s.p95 == pytest.approx(3.85, rel=1e-12)  # 3 + 0.85 · (4 − 3)
    with pytest.raises(ValueError, match="non-empty"):
        latency_stats([])
    with pytest.raises(ValueError, match="finite and >= 0"):
        latency_stats([1.0, -1.0])


def test_time_calls_counts_warmup_and_repeats():
    calls = []
    stats = time_calls(lambda: calls.append(1), repeats=4, warmup=2)
    assert len(calls) == 6 and stats.repeats == 4 and stats.first is not None
    with pytest.raises(ValueError, match="repeats must be >= 1, got 0"):
        time_calls(lambda: None, repeats=0)


def test_peak_rss_monitor_sees_an_allocation():
    """Reference: the bytes allocated and touched inside the block (256 MiB); tolerance 25 % (allocator, sampling)."""
    import time

    size = 256 * 2**20
    with PeakRssMonitor(interval_s=0.002) as mon:
        block = np.ones(size, np.uint8)
        time.sleep(0.05)
        del block
    assert mon.peak_bytes - mon.start_bytes >= 0.75 * size


def test_bench_options_are_checked():
    with pytest.raises(ValueError, match="batch_sizes must be ints >= 1"):
        BenchOptions(batch_sizes=(1, 0))
    with pytest.raises(ValueError, match="repeats must be >= 1"):
        BenchOptions(repeats=0)


CASE_KEYS = {
    "case",
    "ct_shape",
    "windows",
    "windows_skipped",
    "retired",
    "engine_calls",
    "patch_forwards",
    "timings_s",
    "total_s",
    "engine_s",
    "overhead_s",
    "overhead_fraction",
    "step_s",
    "ct_voxels_per_s",
    "patch_forwards_per_s",
    "engine_gflops",
    "fraction_of_peak",
    "peak_rss_bytes",
    "dice",
}


def test_diffseg_bench_tiny_run_writes_json_and_png(tmp_path, capsys, default_package):
    pytest.importorskip("matplotlib")
    out = tmp_path / "bench"
    argv = ["bench", "--backend", "onnxruntime", "--steps", "2", "--samples", "1", "--ct-size", "128"]
    argv += ["--ct-slices", "40", "--batch-sizes", "1", "2", "--repeats", "2", "--warmup", "1", "-o", str(out)]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert "denoiser call by batch size" in printed and "end to end per case" in printed

    report = json.loads((out / "bench.json").read_text())
    assert report["schema"] == "diffseg-bench/2"
    assert {"machine", "settings", "model", "load", "flops", "peak", "denoiser", "cases", "memory"} <= set(report)
    assert {"cpu", "logical_cores", "isa", "versions"} <= set(report["machine"])
    assert report["settings"]["backend"] == "onnxruntime" and report["settings"]["precision"] == "fp32"
    assert report["flops"]["flops"] == count_flops(default_package.engine("fp32").path).flops
    assert report["peak"]["gflops"] > 0 and "numpy float32 matmul" in report["peak"]["method"]
    assert [r["batch"] for r in report["denoiser"]] == [1, 2]
    for row in report["denoiser"]:
        lat = row["latency_s"]
        assert lat["repeats"] == 2 and lat["min"] <= lat["p50"] <= lat["p95"] <= lat["max"]
        assert row["gflops"] == pytest.approx(row["batch"] * report["flops"]["flops"] / lat["p50"] / 1e9, rel=1e-12)
    (case,) = report["cases"]
    assert set(case) >= CASE_KEYS
    assert list(case["timings_s"]) == ["read", "prepare", "sample", "postprocess", "write"]
    assert case["total_s"] == pytest.approx(sum(case["timings_s"].values()), rel=1e-12)
    run_windows = case["windows"] - case["windows_skipped"]
    # windows × steps × samples: with 2 steps nothing can retire (the model's retire_after is 2 and the last step
    # never counts)
    assert run_windows > 0 and case["retired"] == 0 and case["patch_forwards"] == run_windows * 2 * 1
    # The sampler's own figures: the engine runs inside the loop, the loop inside the sample stage.
    assert 0 < case["engine_s"] < case["sampler_s"] <= case["timings_s"]["sample"]
    assert case["overhead_s"] == pytest.approx(case["timings_s"]["sample"] - case["engine_s"], rel=1e-9)
    # two steps: the second is timed end to end, within the loop's time
    assert case["step_s"]["repeats"] == 1 and 0 < case["step_s"]["p50"] < case["sampler_s"]
    assert case["dice"] >= 0.5  # the default model finds the phantom's tumour, even at 2 steps and 1 sample
    assert case["peak_rss_bytes"] >= case["rss_before_bytes"] > 0
    assert report["memory"]["process_peak_rss_bytes"] > 0
    assert (out / "bench.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_plot_without_matplotlib_says_how_to_install(monkeypatch, tmp_path):
    import sys

    monkeypatch.setitem(sys.modules, "matplotlib", None)  # what an install without the test extra looks like
    with pytest.raises(RuntimeError, match="matplotlib"):
        plot_report({}, tmp_path / "x.png")


def test_bench_cli_needs_both_ct_and_pet(tmp_path, capsys):
    assert main(["bench", "--ct", str(tmp_path / "ct.nii.gz"), "-o", str(tmp_path)]) == 2
    assert "give both --ct and --pet" in capsys.readouterr().err


def test_bench_modules_do_not_import_torch():
    import subprocess
    import sys

    code = (
        "import sys, diffseg.runtime.bench, diffseg.runtime.commands.bench; "
        "sys.exit(1 if 'torch' in sys.modules else 0)"
    )
    assert subprocess.run([sys.executable, "-c", code], check=False).returncode == 0


def _bench_case(backend: str, device_loop: bool) -> dict:
    from diffseg.runtime.bench.runner import BenchOptions as Options
    from diffseg.runtime.bench.runner import run_bench
    from diffseg.runtime.segmenter import Segmenter

    options = Options(
        batch_sizes=(1,), repeats=1, warmup=0, ct_size_xy=256, ct_slices=40, measure_peak=False, write_outputs=False
    )

    def make() -> Segmenter:  # every window runs (retirement against the host loop: tests/.../test_device_ops.py)
        return Segmenter(
            "default",
            backend=backend,
            precision="fp32",
            steps=3,
            samples=2,
            batch_size=3,
            skip_empty_windows=False,
            device_loop=device_loop,
        )

    (case,) = run_bench(make, options)["cases"]
    return case


@pytest.mark.parametrize("backend", ["onnxruntime", "torch"])
def test_bench_counts_the_device_loop_as_the_host_loop(backend):
    # Reference: the host loop's counts on the same backend. Before the one pipeline, bench timed engine calls by
    # replacing backend.run, which the device loop never calls: it reported 0 patch-forwards and 0 engine seconds.
    if backend == "torch":
        pytest.importorskip("torch")
    host, device = _bench_case(backend, False), _bench_case(backend, True)
    assert (host["device_loop"], device["device_loop"]) == (False, True)
    keys = ("windows", "windows_skipped", "retired", "engine_calls", "patch_forwards")
    assert {k: device[k] for k in keys} == {k: host[k] for k in keys}
    assert host["patch_forwards"] == host["windows"] * 3 * 2 > 0 and host["engine_calls"] > host["windows"]
    for case in (host, device):
        assert 0 < case["engine_s"] < case["sampler_s"]
        assert case["step_s"]["repeats"] == 2
