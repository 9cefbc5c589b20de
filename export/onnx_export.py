"""torch → ONNX: fp32 with a fixed patch and dynamic batch, fp16 with fp32 islands, graph checks and parity.

Exported at opset 18 (18–20 allowed) so that GroupNorm is decomposed (``GroupNormalization`` only exists from 21 and
TensorRT 10.7 cannot parse it) and attention stays MatMul/Softmax; the checks reject both fused ops.

A model with a condition graph (:class:`Condition`: Diff-UNet's image encoder) is two graphs: ``condition.onnx``,
``image`` ``[B, C_img, *patch]`` → the named features (each ``[B, ...]``), and the denoiser, ``x``, ``t`` and the
features → ``y``; both with the batch dynamic, and checked together (condition graph, then denoiser).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import torch

from diffseg.runtime.verify import EngineError, compare_outputs

__all__ = [
    "Condition",
    "ExportError",
    "check_condition_graph",
    "check_graph",
    "convert_fp16",
    "export_condition",
    "export_fp32",
    "parity",
]

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


@dataclass(frozen=True)
class Condition:
    """A model's condition graph as the export sees it.

    Attributes:
        module: ``forward(image)`` → a tuple of feature tensors, each ``[B, ...]``, computed from the image channels
            of a window alone (the same at every step and for every sample).
        features: the features' names, in the order ``module`` returns them and the denoiser takes them.
        image_channels: where the image channels lie in the denoiser's ``x`` (``channel_order``).
    """

    module: torch.nn.Module
    features: tuple[str, ...]
    image_channels: slice

    def __call__(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """The features of the windows of ``x`` (the denoiser's input), from its image channels."""
        return tuple(self.module(x[:, self.image_channels]))


def _export_onnx(
    model: torch.nn.Module,
    args: tuple[torch.Tensor, ...],
    input_names: Sequence[str],
    output_names: Sequence[str],
    path: Path,
    opset: int,
) -> Path:
    """``torch.onnx.export`` (dynamo) of ``model`` on ``args`` with dim 0 of every input the dynamic ``batch``."""
    if not 18 <= opset <= 20:
        raise ValueError(f"opset must be 18–20 (GroupNorm decomposed, no fused Attention), got {opset}")
    try:
        program = torch.onnx.export(
            model,
            args,
            input_names=list(input_names),
            output_names=list(output_names),
            opset_version=opset,
            dynamo=True,
            optimize=True,
            dynamic_shapes=tuple({0: "batch"} for _ in args),
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


def export_fp32(
    model: torch.nn.Module,
    in_channels: int,
    patch: tuple[int, int, int],
    path: Path,
    opset: int = 18,
    condition: Condition | None = None,
) -> Path:
    """Export ``model`` (``f(x, t)``) to ONNX: ``x`` [B, C, *patch], ``t`` float32 [B], output ``y``; batch dynamic.

    With ``condition``, the denoiser takes the condition graph's features after ``t`` (``f(x, t, *features)``),
    as inputs named by ``condition.features``.

    Raises:
        ExportError: torch.export failed in a way diffseg can explain (a branch on the value of t, a batch size
            fixed inside the model); other torch errors propagate unchanged.
    """
    model = model.eval().float()
    x = torch.randn(2, in_channels, *patch)
    t = torch.tensor([10.0, 500.0])
    features: tuple[torch.Tensor, ...] = ()
    if condition is not None:
        with torch.no_grad():
            features = tuple(f.detach() for f in condition(x))
    names = ["x", "t", *(condition.features if condition is not None else ())]
    return _export_onnx(model, (x, t, *features), names, ["y"], path, opset)


def export_condition(
    condition: Condition, image_channels: int, patch: tuple[int, int, int], path: Path, opset: int = 18
) -> Path:
    """Export the condition graph: ``image`` [B, C_img, *patch] → the features, named ``condition.features``.

    Raises:
        ExportError: as :func:`export_fp32`.
    """
    module = condition.module.eval().float()
    image = torch.randn(2, image_channels, *patch)
    return _export_onnx(module, (image,), ["image"], condition.features, path, opset)


def _dims(value_info: onnx.ValueInfoProto) -> list:
    return [d.dim_param or d.dim_value for d in value_info.type.tensor_type.shape.dim]


def _checked(path: Path) -> onnx.ModelProto:
    """Checker, strict shape inference and no fused GroupNorm/Attention; the inferred model."""
    model = onnx.load(str(path))
    onnx.checker.check_model(model, full_check=True)
    inferred = onnx.shape_inference.infer_shapes(model, strict_mode=True, data_prop=True)
    bad = sorted({n.op_type for n in inferred.graph.node} & FORBIDDEN_OPS)
    if bad:
        raise ExportError(f"{path.name}: graph holds {bad}; export at opset 18–20 so that they are decomposed")
    return inferred


def _check_batched(path: Path, what: str, value_info: onnx.ValueInfoProto) -> None:
    """A float32 tensor whose first axis is the dynamic batch."""
    dims = _dims(value_info)
    if value_info.type.tensor_type.elem_type != onnx.TensorProto.FLOAT or not dims or not isinstance(dims[0], str):
        raise ExportError(
            f"{path.name}: {what} {value_info.name} must be float32 [B, ...] with a dynamic batch, got elem_type "
            f"{value_info.type.tensor_type.elem_type} dims {dims}"
        )


def check_graph(
    path: Path, in_channels: int, patch: tuple[int, int, int], features: Sequence[str] = ()
) -> onnx.ModelProto:
    """Checker, strict shape inference, no fused GroupNorm/Attention, and the I/O contract of DESIGN.md.

    ``features``: a conditioned denoiser's inputs after ``x`` and ``t`` (each float32 ``[B, ...]``).
    """
    inferred = _checked(path)
    inputs = {i.name: i for i in inferred.graph.input}
    if set(inputs) != {"x", "t", *features}:
        want = " and ".join(["x", "t"]) if not features else ", ".join(["x", "t", *features])
        raise ExportError(f"{path.name}: inputs must be {want}, got {sorted(inputs)}")
    tx, tt = inputs["x"], inputs["t"]
    if tt.type.tensor_type.elem_type != onnx.TensorProto.FLOAT or len(_dims(tt)) != 1:
        raise ExportError(
            f"{path.name}: t must be float32 [B], got elem_type {tt.type.tensor_type.elem_type} dims {_dims(tt)}"
        )
    if _dims(tx)[1:] != [in_channels, *patch] or not isinstance(_dims(tx)[0], str):
        raise ExportError(
            f"{path.name}: x must be [B, {in_channels}, {', '.join(map(str, patch))}] with a "
            f"dynamic batch, got {_dims(tx)}"
        )
    for name in features:
        _check_batched(path, "input", inputs[name])
    return inferred


def check_condition_graph(
    path: Path, image_channels: int, patch: tuple[int, int, int], features: Sequence[str]
) -> onnx.ModelProto:
    """The checks of :func:`check_graph` on a condition graph: ``image`` float32 [B, C_img, *patch] in, the
    ``features`` out in order, each float32 [B, ...], B dynamic."""
    inferred = _checked(path)
    inputs = list(inferred.graph.input)
    want = [image_channels, *patch]
    if [i.name for i in inputs] != ["image"] or inputs[0].type.tensor_type.elem_type != onnx.TensorProto.FLOAT:
        raise ExportError(f"{path.name}: the condition graph's one input must be float32 image, got {inputs}")
    if _dims(inputs[0])[1:] != want or not isinstance(_dims(inputs[0])[0], str):
        raise ExportError(
            f"{path.name}: image must be [B, {', '.join(map(str, want))}] with a dynamic batch, got {_dims(inputs[0])}"
        )
    outputs = list(inferred.graph.output)
    if [o.name for o in outputs] != list(features):
        raise ExportError(f"{path.name}: outputs must be {list(features)} in order, got {[o.name for o in outputs]}")
    for out in outputs:
        _check_batched(path, "output", out)
    return inferred


def _nodes_independent_of(model: onnx.ModelProto, input_names: set[str]) -> list[str]:
    """Names of nodes whose inputs never depend on the graph inputs ``input_names``."""
    dependent = set(input_names)
    names = []
    for node in model.graph.node:  # ONNX nodes are topologically sorted
        if any(i in dependent for i in node.input):
            dependent.update(node.output)
        else:
            names.append(node.name)
    return names


def _split_consumed_outputs(model: onnx.ModelProto) -> None:
    """A graph output that nodes of the graph also read (a condition graph's feature at one scale, pooled into the
    next) becomes an internal tensor plus an ``Identity`` to the output: the fp16 converter keeps graph outputs
    float32 and would leave the nodes that read one typed float16."""
    outputs = {o.name for o in model.graph.output}
    consumed = {i for n in model.graph.node for i in n.input} & outputs
    for name in sorted(consumed):
        internal = f"{name}__internal"
        for node in model.graph.node:
            node.input[:] = [internal if i == name else i for i in node.input]
            node.output[:] = [internal if o == name else o for o in node.output]
        model.graph.node.append(onnx.helper.make_node("Identity", [internal], [name], name=f"{name}__output"))


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
    _split_consumed_outputs(model)
    # Everything computed from t alone (the time embedding and its MLP): every input but t varies per window.
    keep = set(_nodes_independent_of(model, {i.name for i in model.graph.input} - {"t"}))
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
    condition: Condition | None = None,
    condition_path: Path | None = None,
) -> EngineError:
    """Compare an ONNX file (onnxruntime CPU) with the torch model on the given (x, t) inputs.

    With ``condition`` (and its ONNX file ``condition_path``), end to end: the condition graph on the image
    channels of x, then the denoiser on x, t and those features, against the same in torch.
    """
    import onnxruntime as ort

    factory = session_factory or (lambda p: ort.InferenceSession(str(p), providers=["CPUExecutionProvider"]))
    sess = factory(onnx_path)
    cond_sess = None
    if condition is not None:
        if condition_path is None:
            raise ValueError("condition_path must name the condition graph's ONNX file when condition is given")
        cond_sess = factory(condition_path)
        condition.module.eval()
    model = model.eval()
    pairs = []
    for x, t in inputs:
        feeds: dict[str, np.ndarray] = {"x": x, "t": t}
        with torch.no_grad():
            xt = torch.from_numpy(x)
            features = condition(xt) if condition is not None else ()
            ref = model(xt, torch.from_numpy(t), *features).numpy()
        if condition is not None and cond_sess is not None:
            image = np.ascontiguousarray(x[:, condition.image_channels])
            got = cond_sess.run(list(condition.features), {"image": image})
            feeds.update(zip(condition.features, got, strict=True))
        pairs.append((sess.run(["y"], feeds)[0], ref))
    return compare_outputs(name, pairs, limit)
