"""FLOPs of an ONNX graph: the multiply-accumulates of its dense operators, from shapes after shape inference.

Counted: ``Conv``, ``ConvTranspose``, ``Gemm`` and ``MatMul`` (one MAC = 2 FLOPs; bias additions, normalisation,
activations and element-wise operators are not counted, as is usual for convolutional networks). The symbolic batch
dimension is fixed to ``batch`` before shape inference, so every count is exact for that batch size.

For a node with output ``Y`` (its element count ``|Y|``):

- ``Conv``: weight ``W [M, C/g, k1, k2, ...]``, MACs = ``|Y| · (C/g) · k1 · k2 · ...`` = ``|Y| · |W| / M``;
- ``ConvTranspose``: input ``X [N, C, ...]``, weight ``W [C, M/g, k...]``, MACs = ``|X| · |W| / C`` (every input
  element is scattered through ``M/g · k...`` weights);
- ``Gemm``: ``A [M, K]`` (or ``[K, M]`` with ``transA``), MACs = ``|Y| · K``;
- ``MatMul``: ``A [..., K]`` (numpy semantics, 1-D operands included), MACs = ``|Y| · K``.

The ``onnx`` package (``pip install "diffseg[export]"``) is imported only when a count is asked for.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

__all__ = ["COUNTED_OPS", "FlopCount", "count_flops"]

logger = logging.getLogger("diffseg")

COUNTED_OPS = ("Conv", "ConvTranspose", "Gemm", "MatMul")


@dataclass(frozen=True)
class FlopCount:
    """The dense-operator cost of one forward pass.

    Attributes:
        batch: the batch size the count is for.
        macs: multiply-accumulates of the counted operators.
        flops: ``2 · macs``.
        by_op: MACs per operator type (only types present).
        nodes: number of counted nodes.
        unresolved: names of counted-type nodes whose shapes shape inference could not give (not in ``macs``).
    """

    batch: int
    macs: int
    by_op: dict[str, int] = field(default_factory=dict)
    nodes: int = 0
    unresolved: tuple[str, ...] = ()

    @property
    def flops(self) -> int:
        return 2 * self.macs

    def as_dict(self) -> dict[str, Any]:
        return {
            "batch": self.batch,
            "macs": self.macs,
            "flops": self.flops,
            "gflops": self.flops / 1e9,
            "by_op_macs": dict(self.by_op),
            "nodes": self.nodes,
            "unresolved": list(self.unresolved),
        }


def _import_onnx():
    try:
        import onnx
    except ImportError as exc:
        raise RuntimeError(f'counting FLOPs needs the onnx package ({exc}); pip install "diffseg[export]"') from exc
    return onnx


def _fix_inputs(model: Any, batch: int, input_shapes: Mapping[str, Sequence[int]] | None) -> None:
    """Give every graph input a concrete shape: ``input_shapes`` where named, else symbolic dims → ``batch``."""
    initialisers = {init.name for init in model.graph.initializer}
    wanted = dict(input_shapes or {})
    for value in model.graph.input:
        if value.name in initialisers:
            continue
        dims = value.type.tensor_type.shape.dim
        if value.name in wanted:
            shape = [int(d) for d in wanted.pop(value.name)]
            if len(shape) != len(dims):
                raise ValueError(f"input_shapes[{value.name!r}] must have {len(dims)} dims, got {shape}")
            for d, n in zip(dims, shape, strict=True):
                d.ClearField("dim_param")
                d.dim_value = n
            continue
        for d in dims:
            if not d.HasField("dim_value"):
                d.ClearField("dim_param")
                d.dim_value = batch
    if wanted:
        names = [v.name for v in model.graph.input]
        raise ValueError(f"input_shapes names inputs {sorted(wanted)} that the graph does not have (inputs: {names})")


def _shapes(model: Any) -> dict[str, tuple[int, ...] | None]:
    """Tensor name → static shape (None where a dim is unknown), from inputs, outputs, value_info, initialisers."""
    out: dict[str, tuple[int, ...] | None] = {}
    for init in model.graph.initializer:
        out[init.name] = tuple(int(d) for d in init.dims)
    for value in (*model.graph.input, *model.graph.value_info, *model.graph.output):
        t = value.type.tensor_type
        if not t.HasField("shape"):
            out.setdefault(value.name, None)
            continue
        dims = [d.dim_value if d.HasField("dim_value") else None for d in t.shape.dim]
        out[value.name] = None if any(d is None for d in dims) else tuple(int(d) for d in dims)
    for node in model.graph.node:  # Constant nodes carry their tensor as an attribute
        if node.op_type == "Constant":
            for attr in node.attribute:
                if attr.name == "value":
                    out[node.output[0]] = tuple(int(d) for d in attr.t.dims)
    return out


def _attr(node: Any, name: str, default: int) -> int:
    for attr in node.attribute:
        if attr.name == name:
            return int(attr.i)
    return default


def _node_macs(node: Any, shapes: Mapping[str, tuple[int, ...] | None]) -> int | None:
    def shape(i: int, outputs: bool = False) -> tuple[int, ...] | None:
        names = node.output if outputs else node.input
        return shapes.get(names[i]) if i < len(names) and names[i] else None

    y, a, w = shape(0, outputs=True), shape(0), shape(1)
    if y is None or a is None or w is None:
        return None
    if node.op_type == "Conv":
        return math.prod(y) * math.prod(w[1:])
    if node.op_type == "ConvTranspose":
        return math.prod(a) * math.prod(w[1:])
    if node.op_type == "Gemm":
        k = a[0] if _attr(node, "transA", 0) else a[-1]
        return math.prod(y) * k
    if node.op_type == "MatMul":
        return math.prod(y) * a[-1]
    raise ValueError(f"not a counted operator: {node.op_type}")


def count_flops(
    model: str | Path | Any,
    batch: int = 1,
    input_shapes: Mapping[str, Sequence[int]] | None = None,
) -> FlopCount:
    """Count the FLOPs of one forward pass of an ONNX model.

    Args:
        model: path to a ``.onnx`` file, or an ``onnx.ModelProto`` (not modified).
        batch: the value given to every symbolic input dimension (the denoiser's only dynamic dim is the batch).
        input_shapes: explicit shapes for some inputs (by name), overriding ``batch`` for them.

    Returns:
        The MACs of ``Conv``, ``ConvTranspose``, ``Gemm`` and ``MatMul`` nodes (FLOPs = 2 · MACs).

    Raises:
        FileNotFoundError: ``model`` is a path that does not exist.
        ValueError: ``batch`` < 1, or ``input_shapes`` that do not fit the graph.
        RuntimeError: the onnx package is not installed.
    """
    onnx = _import_onnx()
    if isinstance(batch, bool) or not isinstance(batch, int) or batch < 1:
        raise ValueError(f"batch must be an int >= 1, got {batch!r}")
    if isinstance(model, str | Path):
        path = Path(model)
        if not path.is_file():
            raise FileNotFoundError(f"model {path}: no such ONNX file")
        proto = onnx.load(str(path))
    else:
        proto = onnx.ModelProto()
        proto.CopyFrom(model)
    _fix_inputs(proto, batch, input_shapes)
    inferred = onnx.shape_inference.infer_shapes(proto, strict_mode=False, data_prop=True)
    shapes = _shapes(inferred)
    by_op: dict[str, int] = {}
    unresolved: list[str] = []
    nodes = 0
    for node in inferred.graph.node:
        if node.op_type not in COUNTED_OPS or node.domain not in ("", "ai.onnx"):
            continue
        macs = _node_macs(node, shapes)
        if macs is None:
            unresolved.append(node.name or f"{node.op_type}->{node.output[0]}")
            continue
        by_op[node.op_type] = by_op.get(node.op_type, 0) + macs
        nodes += 1
    if unresolved:
        logger.warning("FLOP count: no static shape for %d node(s): %s", len(unresolved), ", ".join(unresolved[:5]))
    return FlopCount(batch=batch, macs=sum(by_op.values()), by_op=by_op, nodes=nodes, unresolved=tuple(unresolved))
