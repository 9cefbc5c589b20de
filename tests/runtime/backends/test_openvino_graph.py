"""The OpenVINO graph rewrite (narrow convolutions as depthwise + 1×1 sum) against torch's conv3d and the unrewritten
OpenVINO model, in fp32."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from diffseg.runtime.backends import get_backend
from diffseg.runtime.backends.openvino_graph import split_narrow_convolutions

ov = pytest.importorskip("openvino")
ops = pytest.importorskip("openvino.opset13")


def _conv_model(w: np.ndarray, stride: int, pad: int, dilation: int, bias: np.ndarray | None):
    x = ops.parameter([-1, w.shape[1], 11, 12, 13], np.float32, name="x")
    y = ops.convolution(x, ops.constant(w), [stride] * 3, [pad] * 3, [pad] * 3, [dilation] * 3)
    if bias is not None:
        y = ops.add(y, ops.constant(bias.reshape(1, -1, 1, 1, 1)))
    return ov.Model([y], [x])


def _run(model, x: np.ndarray) -> np.ndarray:
    compiled = ov.Core().compile_model(model, "CPU", {"INFERENCE_PRECISION_HINT": "f32"})
    return compiled.create_infer_request().infer([x])[0].copy()


@pytest.mark.parametrize(
    ("out_ch", "in_ch", "kernel", "stride", "pad", "dilation"),
    [(1, 8, 3, 1, 1, 1), (2, 16, 3, 2, 1, 1), (3, 8, 5, 1, 2, 2), (1, 12, 2, 1, 0, 1)],
)
def test_split_convolution_equals_torch_conv3d(out_ch, in_ch, kernel, stride, pad, dilation):
    # Reference: torch.nn.functional.conv3d in float64 (the same sum, another order); the unrewritten OpenVINO model
    # is held to the same tolerance, so the rewrite adds no error of its own beyond float32 summation order.
    rng = np.random.default_rng(out_ch * 100 + in_ch)
    w = rng.standard_normal((out_ch, in_ch, kernel, kernel, kernel)).astype(np.float32)
    b = rng.standard_normal(out_ch).astype(np.float32)
    x = rng.standard_normal((2, in_ch, 11, 12, 13)).astype(np.float32)
    want = torch.nn.functional.conv3d(
        torch.from_numpy(x).double(), torch.from_numpy(w).double(), torch.from_numpy(b).double(), stride, pad, dilation
    ).numpy()
    plain = _run(_conv_model(w, stride, pad, dilation, b), x)
    model = _conv_model(w, stride, pad, dilation, b)
    assert split_narrow_convolutions(model) == 1
    types = [op.get_type_name() for op in model.get_ordered_ops()]
    assert "GroupConvolution" in types and types.count("Convolution") == 1
    got = _run(model, x)
    assert got.shape == want.shape
    scale = np.abs(want).max()
    assert np.abs(plain - want).max() <= 1e-5 * scale
    assert np.abs(got - want).max() <= 1e-5 * scale


@pytest.mark.parametrize(("out_ch", "in_ch", "kernel"), [(4, 8, 3), (1, 3, 3), (1, 16, 1)])
def test_wide_shallow_and_pointwise_convolutions_are_left_alone(out_ch, in_ch, kernel):
    w = np.ones((out_ch, in_ch, kernel, kernel, kernel), np.float32)
    model = _conv_model(w, 1, kernel // 2, 1, None)
    assert split_narrow_convolutions(model) == 0
    assert [op.get_type_name() for op in model.get_ordered_ops()].count("GroupConvolution") == 0


def test_default_model_output_head_is_split(default_package):
    # The default UNet has one narrow convolution: its output head (8 → 1 channel, 3³).
    with get_backend("openvino", default_package, "fp32") as backend:
        assert backend.describe()["narrow_convolutions_split"] == 1
