"""torch → ONNX: fp32 with a fixed patch and dynamic batch, fp16 with fp32 islands, graph checks and parity.

Exported at opset 18 (18–20 allowed) so that GroupNorm is decomposed (``GroupNormalization`` only exists from 21 and
TensorRT 10.7 cannot parse it) and attention stays MatMul/Softmax; the checks reject both fused ops.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnx
import torch

from diffseg.runtime.verify import EngineError, compare_outputs

__all__ = ["ExportError", "check_graph", "convert_fp16", "export_fp32", "parity"]

logger = logging.getLogger("diffseg.export")

FORBIDDEN_OPS = {"GroupNormalization", "Attention"}
# Ops whose arithmetic stays fp32 in the fp16 model: normalisation statistics, the sinusoidal embedding, softmax.
FP32_OPS = [
    "InstanceNormalization",
    "LayerNormalization",
    "ReduceMean",
    "ReduceSum",
    "ReduceSumSquare",
    "Pow",
    "Sqrt",
    "Reciprocal",
    "Div",
    "Sub",
    "Exp",
    "Sin",
    "Cos",
    "Softmax",
    "Erf",
]


class ExportError(RuntimeError):
    """The export cannot produce a valid model package; the message says which check failed and by how much."""


def export_fp32(
    model: torch.nn.Module, in_channels: int, patch: tuple[int, int, int], path: Path, opset: int = 18
) -> Path:
    """Export ``model`` (``f(x, t)``) to ONNX: ``x`` [B, C, *patch], ``t`` float32 [B], output ``y``; batch dynamic.

    Raises:
        ExportError: torch.export failed in a way diffseg can explain (a branch on the value of t, a batch size
            fixed inside the model); other torch errors propagate unchanged.
    """
    if not 18 <= opset <= 20:
        raise ValueError(f"opset must be 18–20 (GroupNorm decomposed, no fused Attention), got {opset}")
    model = model.eval().float()
    x = torch.randn(2, in_channels, *patch)
    t = torch.tensor([10.0, 500.0])
    try:
        program = torch.onnx.export(
            model,
            (x, t),
            input_names=["x", "t"],
            output_names=["y"],
            opset_version=opset,
            dynamo=True,
            optimize=True,
            dynamic_shapes=({0: "batch"}, {0: "batch"}),
            external_data=False,
            verbose=False,
        )
    except Exception as exc:
        from .contract_checks import explain_export_error  # imports this module

        explained = explain_export_error(model, exc)
        if explained is None:
            raise
        raise explained from exc
    path.parent.mkdir(parents=True, exist_ok=True)
    program.save(str(path))
    return path


def check_graph(path: Path, in_channels: int, patch: tuple[int, int, int]) -> onnx.ModelProto:
    """Checker, strict shape inference, no fused GroupNorm/Attention, and the I/O contract of DESIGN.md."""
    model = onnx.load(str(path))
    onnx.checker.check_model(model, full_check=True)
    inferred = onnx.shape_inference.infer_shapes(model, strict_mode=True, data_prop=True)
    bad = sorted({n.op_type for n in inferred.graph.node} & FORBIDDEN_OPS)
    if bad:
        raise ExportError(f"{path.name}: graph holds {bad}; export at opset 18–20 so that they are decomposed")
    inputs = {i.name: i for i in inferred.graph.input}
    if set(inputs) != {"x", "t"}:
        raise ExportError(f"{path.name}: inputs must be x and t, got {sorted(inputs)}")

    def dims(value_info: onnx.ValueInfoProto) -> list:
        return [d.dim_param or d.dim_value for d in value_info.type.tensor_type.shape.dim]

    tx, tt = inputs["x"], inputs["t"]
    if tt.type.tensor_type.elem_type != onnx.TensorProto.FLOAT or len(dims(tt)) != 1:
        raise ExportError(
            f"{path.name}: t must be float32 [B], got elem_type {tt.type.tensor_type.elem_type} dims {dims(tt)}"
        )
    if dims(tx)[1:] != [in_channels, *patch] or not isinstance(dims(tx)[0], str):
        raise ExportError(
            f"{path.name}: x must be [B, {in_channels}, {', '.join(map(str, patch))}] with a "
            f"dynamic batch, got {dims(tx)}"
        )
    return inferred


def _nodes_independent_of(model: onnx.ModelProto, input_name: str) -> list[str]:
    """Names of nodes whose inputs never depend on graph input ``input_name`` (the timestep branch)."""
    dependent = {input_name}
    names = []
    for node in model.graph.node:  # ONNX nodes are topologically sorted
        if any(i in dependent for i in node.input):
            dependent.update(node.output)
        else:
            names.append(node.name)
    return names


def _float32_outputs(model: onnx.ModelProto) -> None:
    """Make every graph output float32: the converter can leave a final Cast to fp16 even with keep_io_types."""
    producers = {o: n for n in model.graph.node for o in n.output}
    for out in model.graph.output:
        if out.type.tensor_type.elem_type != onnx.TensorProto.FLOAT16:
            continue
        node = producers[out.name]
        if node.op_type != "Cast":
            raise ExportError(f"fp16 output {out.name} is produced by {node.op_type}, expected a Cast")
        for attr in node.attribute:
            if attr.name == "to":
                attr.i = onnx.TensorProto.FLOAT
        out.type.tensor_type.elem_type = onnx.TensorProto.FLOAT


def convert_fp16(src: Path, dst: Path) -> Path:
    """fp16 model with fp32 islands: normalisation statistics, the time embedding and its MLP, softmax, the output.

    Inputs and outputs stay float32 (casts inside), so every backend feeds the same arrays.
    """
    from onnxconverter_common import float16

    model = onnx.load(str(src))
    keep = set(_nodes_independent_of(model, "x"))  # everything computed from t alone: embedding and MLP
    outputs = {o.name for o in model.graph.output}
    keep.update(n.name for n in model.graph.node if set(n.output) & outputs)  # the output layer
    fp16 = float16.convert_float_to_float16(
        model,
        keep_io_types=True,
        op_block_list=sorted(set(float16.DEFAULT_OP_BLOCK_LIST) | set(FP32_OPS)),
        node_block_list=sorted(keep),
    )
    _float32_outputs(fp16)
    onnx.checker.check_model(fp16, full_check=True)
    dst.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(fp16, str(dst))
    return dst


def parity(
    name: str,
    model: torch.nn.Module,
    onnx_path: Path,
    inputs: list[tuple[np.ndarray, np.ndarray]],
    limit: float,
    session_factory: Callable | None = None,
) -> EngineError:
    """Compare an ONNX file (onnxruntime CPU) with the torch model on the given (x, t) inputs."""
    import onnxruntime as ort

    sess = (session_factory or (lambda p: ort.InferenceSession(str(p), providers=["CPUExecutionProvider"])))(onnx_path)
    model = model.eval()
    pairs = []
    for x, t in inputs:
        with torch.no_grad():
            ref = model(torch.from_numpy(x), torch.from_numpy(t)).numpy()
        pairs.append((sess.run(["y"], {"x": x, "t": t})[0], ref))
    return compare_outputs(name, pairs, limit)
