"""Small ONNX graphs that run the step-major sampler's per-step work where the engine runs (onnxruntime on a GPU).

With them the global x_t, the accumulators and the image stay on the device across all steps: only window starts,
per-task peaks and, for stochastic steps, the noise cross the bus. Each graph mirrors one host operation:

- ``gather`` (batch B): engine rows ``[B, C+1, *patch]`` = the image window and the window of x_t of each
  (sample, window) task, in the model's channel order (host: the sampler's row fill);
- ``background``: the accumulator's start, ``(p·x_t + q)·bg_weight``, the "background" output ``output_for_x0(−1)``
  of every window that is not run (skipped or retired), weighted by Σ of their importance maps per sample;
- ``blend`` (batch B): ``acc + Σ_j pad(w·y_j)`` for the B engine outputs, plus each task's peak predicted x0
  (``max(a_out·y + a_x·x_t)``, in double) for retirement;
- ``step``: the scheduler step in :mod:`diffseg.runtime.diffusion_steps`' element-wise form, in double, with the
  blend's 1/Σweights folded in, optional noise, and the padded margin kept at ``pad_value``.

Graphs are built with ``onnx.helper`` (``pip install "diffseg[gpu]"``) for fixed shapes and cached by them.
"""

from __future__ import annotations

from collections.abc import Sequence

__all__ = ["background_graph", "blend_graph", "gather_graph", "step_graph"]

OPSET = 18


def _helpers():
    import onnx
    from onnx import TensorProto, helper

    return onnx, TensorProto, helper


class _Graph:
    """Accumulates nodes, constants and value infos; ``model()`` returns a checked ModelProto."""

    def __init__(self, name: str) -> None:
        self.onnx, self.tp, self.h = _helpers()
        self.name = name
        self.nodes: list = []
        self.inits: list = []
        self.inputs: list = []
        self.outputs: list = []
        self._n = 0

    def fresh(self, stem: str) -> str:
        self._n += 1
        return f"{stem}_{self._n}"

    def input(self, name: str, dtype: int, shape: Sequence[int | str]) -> str:
        self.inputs.append(self.h.make_tensor_value_info(name, dtype, list(shape)))
        return name

    def output(self, name: str, dtype: int, shape: Sequence[int | str]) -> None:
        self.outputs.append(self.h.make_tensor_value_info(name, dtype, list(shape)))

    def const(self, values: Sequence[float] | Sequence[int], dtype: int, stem: str = "c") -> str:
        name = self.fresh(stem)
        self.inits.append(self.h.make_tensor(name, dtype, [len(values)], list(values)))
        return name

    def scalar(self, value: float, dtype: int) -> str:
        name = self.fresh("s")
        self.inits.append(self.h.make_tensor(name, dtype, [], [value]))
        return name

    def op(self, op_type: str, inputs: Sequence[str], out: str | None = None, **attrs) -> str:
        out = out or self.fresh(op_type.lower())
        self.nodes.append(self.h.make_node(op_type, list(inputs), [out], **attrs))
        return out

    def model(self):
        graph = self.h.make_graph(self.nodes, self.name, self.inputs, self.outputs, self.inits)
        model = self.h.make_model(graph, opset_imports=[self.h.make_opsetid("", OPSET)])
        model.ir_version = 8
        self.onnx.checker.check_model(model)
        return model


def _row_window(g: _Graph, starts: str, j: int) -> str:
    """starts[j] as a [4] int64 tensor (sample, z, y, x)."""
    return g.op("Gather", [starts, g.scalar(j, g.tp.INT64)], axis=0)


def gather_graph(k: int, padded: Sequence[int], image_channels: int, patch: Sequence[int], batch: int, noisy: int):
    """Rows ``[batch, C+1, *patch]`` from ``x [k, *padded]``, ``image [C, *padded]``, ``starts [batch, 4]``;
    the noisy window goes to channel ``noisy`` (0 or C), the image channels around it in order."""
    g = _Graph(f"gather_b{batch}")
    f32, i64 = g.tp.FLOAT, g.tp.INT64
    x = g.input("x", f32, [k, *padded])
    image = g.input("image", f32, [image_channels, *padded])
    starts = g.input("starts", i64, [batch, 4])
    x_size = g.const([1, *patch], i64)
    image_size = g.const([image_channels, *patch], i64)
    spatial_only = g.const([0, 1, 1, 1], i64)
    rows = []
    for j in range(batch):
        s = _row_window(g, starts, j)
        x_win = g.op("Slice", [x, s, g.op("Add", [s, x_size])])
        s_img = g.op("Mul", [s, spatial_only])
        img_win = g.op("Slice", [image, s_img, g.op("Add", [s_img, image_size])])
        parts = [img_win, x_win] if noisy == image_channels else [x_win, img_win]
        row = g.op("Concat", parts, axis=0)
        rows.append(g.op("Unsqueeze", [row, g.const([0], i64)]))
    g.op("Concat", rows, "rows", axis=0) if batch > 1 else g.op("Identity", rows, "rows")
    g.output("rows", f32, [batch, image_channels + 1, *patch])
    return g.model()


def background_graph(k: int, padded: Sequence[int]):
    """``acc = (p·x + q)·bg_weight`` with ``pq [2]`` float32 (the background output of windows not run)."""
    g = _Graph("background")
    f32 = g.tp.FLOAT
    x = g.input("x", f32, [k, *padded])
    weight = g.input("bg_weight", f32, [k, *padded])
    pq = g.input("pq", f32, [2])
    p = g.op("Slice", [pq, g.const([0], g.tp.INT64), g.const([1], g.tp.INT64)])
    q = g.op("Slice", [pq, g.const([1], g.tp.INT64), g.const([2], g.tp.INT64)])
    g.op("Mul", [g.op("Add", [g.op("Mul", [x, p]), q]), weight], "acc")
    g.output("acc", f32, [k, *padded])
    return g.model()


def blend_graph(k: int, padded: Sequence[int], patch: Sequence[int], out_channels: int, channel: int, batch: int):
    """``acc_out = acc + Σ_j pad(weight·y[j, channel])`` at ``starts[j]``, and ``peak [batch]`` float64 =
    ``max(a_out·y + a_x·x_t)`` over each task's window, with ``ax [2]`` float64 = (a_out, a_x)."""
    g = _Graph(f"blend_b{batch}")
    f32, f64, i64 = g.tp.FLOAT, g.tp.DOUBLE, g.tp.INT64
    acc = g.input("acc", f32, [k, *padded])
    y = g.input("y", f32, [batch, out_channels, *patch])
    weight = g.input("weight", f32, list(patch))
    starts = g.input("starts", i64, [batch, 4])
    x = g.input("x", f32, [k, *padded])
    ax = g.input("ax", f64, [2])
    a_out = g.op("Slice", [ax, g.const([0], i64), g.const([1], i64)])
    a_x = g.op("Slice", [ax, g.const([1], i64), g.const([2], i64)])
    full = g.const([k, *padded], i64)
    size = g.const([1, *patch], i64)
    peaks = []
    for j in range(batch):
        s = _row_window(g, starts, j)
        y_j = g.op("Slice", [y, g.const([j, channel], i64), g.const([j + 1, channel + 1], i64), g.const([0, 1], i64)])
        y_j = g.op("Squeeze", [y_j, g.const([0], i64)])  # [1, *patch]
        placed = g.op(
            "Pad",
            [g.op("Mul", [y_j, weight]), g.op("Concat", [s, g.op("Sub", [full, g.op("Add", [s, size])])], axis=0)],
        )
        acc = g.op("Add", [acc, placed])
        x_win = g.op("Slice", [x, s, g.op("Add", [s, size])])
        x0 = g.op(
            "Add",
            [g.op("Mul", [g.op("Cast", [y_j], to=f64), a_out]), g.op("Mul", [g.op("Cast", [x_win], to=f64), a_x])],
        )
        peaks.append(g.op("ReduceMax", [x0, g.const([0, 1, 2, 3], i64)], keepdims=0))
    g.op("Identity", [acc], "acc_out")
    g.op("Concat", [g.op("Unsqueeze", [p, g.const([0], i64)]) for p in peaks], "peak", axis=0)
    g.output("acc_out", f32, [k, *padded])
    g.output("peak", f64, [batch])
    return g.model()


def step_graph(k: int, padded: Sequence[int], clip: float | None, noise: bool, margin: bool):
    """``x_prev`` from ``acc`` (Σ weight·output), ``x`` and ``scale`` (1/Σ weight) with ``coef [6]`` float64 =
    (a_out, a_x, A, B, C, σ): m = acc·scale, x0 = clip(a_out·m + a_x·x), x_prev = A·x0 + B·m + C·x (+ σ·z), each
    element in double as ``diffseg._ext.diffusion_step``. With ``margin``, voxels where ``interior`` is false are set
    to ``pad_value`` afterwards."""
    g = _Graph("step")
    f32, f64, i64 = g.tp.FLOAT, g.tp.DOUBLE, g.tp.INT64
    acc = g.input("acc", f32, [k, *padded])
    x = g.input("x", f32, [k, *padded])
    scale = g.input("scale", f32, list(padded))
    coef = g.input("coef", f64, [6])
    c = [g.op("Slice", [coef, g.const([i], i64), g.const([i + 1], i64)]) for i in range(6)]
    m = g.op("Mul", [g.op("Cast", [acc], to=f64), g.op("Cast", [scale], to=f64)])
    xd = g.op("Cast", [x], to=f64)
    x0 = g.op("Add", [g.op("Mul", [c[0], m]), g.op("Mul", [c[1], xd])])
    if clip is not None:
        x0 = g.op("Min", [g.op("Max", [x0, g.scalar(-clip, f64)]), g.scalar(clip, f64)])
    nxt = g.op("Add", [g.op("Add", [g.op("Mul", [c[2], x0]), g.op("Mul", [c[3], m])]), g.op("Mul", [c[4], xd])])
    if noise:
        z = g.input("noise", f32, [k, *padded])
        nxt = g.op("Add", [nxt, g.op("Mul", [c[5], g.op("Cast", [z], to=f64)])])
    out = g.op("Cast", [nxt], to=f32)
    if margin:
        interior = g.input("interior", g.tp.BOOL, list(padded))
        pad_value = g.input("pad_value", f32, [])
        out = g.op("Where", [interior, out, pad_value])
    g.op("Identity", [out], "x_prev")
    g.output("x_prev", f32, [k, *padded])
    return g.model()
