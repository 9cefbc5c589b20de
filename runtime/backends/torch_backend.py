"""The PyTorch backend: the reference on the CPU (fp32), and fp16 with CUDA graphs on GPUs without TensorRT.

torch is imported only when this backend is chosen. The network comes, after the sha256 check of the package, from

- the package's ``torch.export`` program (``denoiser.pt2``, format ``torch_export``) at fp32: any architecture, no
  registry (read by :func:`diffseg.export.program_export.load_program`, which runs no code from the file); or
- diffseg's architecture registry (``diffseg.export.architectures``): the manifest's ``architecture`` rebuilt and the
  package's ``denoiser.pt`` loaded with ``weights_only=True``: at fp16 (a program's devices and dtypes are fixed
  when it is exported: ``.cuda().half()`` leaves the device and dtype written into its graph, such as the
  ``arange`` of a time embedding, as they were), and for packages without a program (``models/default``).

A model with a condition graph runs from its two programs (``denoiser.pt2`` ``f(x, t, *features)`` and
``condition.pt2`` ``condition(image) → features``), at fp32 only.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

import numpy as np

from ..sampling.device_ops import DeviceLayout, DeviceOps, step_vector
from .base import Backend, BackendUnavailableError

__all__ = ["TorchBackend", "TorchDeviceOps"]

logger = logging.getLogger("diffseg")


class TorchBackend(Backend):
    name = "torch"
    precisions = ("fp32", "fp16")
    has_device_ops = True  # TorchDeviceOps: the sampler's steps as tensor operations on the engine's device
    conditioning_precisions = ("fp32",)  # from the programs, whose devices and dtypes were fixed at export

    @classmethod
    def unavailable_reason(cls) -> str | None:
        try:
            import torch  # noqa: F401
        except ImportError as exc:
            return f"torch is not installed ({exc})"
        return None

    @classmethod
    def precision_reason(cls, precision: str) -> str | None:
        if precision not in cls.precisions:
            return f"supported: {list(cls.precisions)}"
        if precision == "fp16":
            import torch

            if not torch.cuda.is_available():
                return "fp16 runs on CUDA only (CPU fp16 convolutions are slower than fp32)"
        return None

    def __init__(self, package, precision: str, threads: int | None = None, cuda_graphs: bool = True) -> None:
        super().__init__(package, precision, threads)
        import torch

        self.torch = torch
        if threads:
            torch.set_num_threads(threads)
        program = package.program("denoiser")
        self.condition_model = None
        if self.features:
            self.model, self.condition_model = self._conditioned_programs(package)
            self.source = f"torch_export ({program.path.name}, {package.program('condition').path.name})"
        elif program is not None and precision == "fp32":
            from diffseg.export.program_export import load_program

            self.model = load_program(program.path, in_channels=self.in_channels, patch=self.patch)
            self.source = f"torch_export ({program.path.name})"
        else:
            self.model = self._registry_model(package, program is not None)
            self.source = f"registry ({package.files['torch'].path.name})"
        logger.info("torch backend %s: %s", precision, self.source)
        if precision == "fp16":
            self.device = "cuda"
            self.model = self.model.cuda().half()
        self.cuda_graphs = cuda_graphs and precision == "fp16"
        self._graphs: dict[int, tuple] = {}

    def _conditioned_programs(self, package):
        """The denoiser's and the condition graph's programs (a conditioned model has no registry weights).

        Raises:
            BackendUnavailableError: a program is missing, or diffseg's export side (which reads them) is not
                installed.
        """
        denoiser, condition = package.program("denoiser"), package.program("condition")
        if denoiser is None or condition is None:
            raise BackendUnavailableError(
                f"{package.root}: the torch backend runs a model with a condition graph from its torch.export "
                f"programs (denoiser.pt2 and condition.pt2); the package lacks "
                + " and ".join(
                    n for n, f in (("the denoiser's", denoiser), ("the condition graph's", condition)) if f is None
                )
                + "; run it on onnxruntime or openvino, or re-export it with build_package"
            )
        try:
            from diffseg.export.program_export import load_program
        except ImportError as exc:
            raise BackendUnavailableError(
                f"{package.root}: reading its torch.export programs needs diffseg's export side ({exc}); "
                f'pip install "diffseg[export]"'
            ) from None
        n = len(self.features)
        model = load_program(denoiser.path, in_channels=self.in_channels, patch=self.patch, features=n)
        cond = load_program(
            condition.path, in_channels=self.image_channels, patch=self.patch, features=n, role="condition"
        )
        return model, cond

    def _registry_model(self, package, has_program: bool):
        """The manifest's architecture rebuilt from diffseg's registry with the package's ``denoiser.pt``.

        Raises:
            BackendUnavailableError: no registry weights, the registry is not installed, or it does not know the
                architecture; the message says what the package has and what to run instead.
        """
        torch = self.torch
        program_note = (
            "; its torch.export program (denoiser.pt2) runs fp32 only (a program's devices and dtypes are fixed when "
            "it is exported): run --precision fp32 on torch, or fp16 on onnxruntime or TensorRT"
            if has_program
            else " and no torch.export program (denoiser.pt2); re-export it with diffseg export to add one"
        )
        if "torch" not in package.files:
            raise BackendUnavailableError(
                f"{package.root}: the torch backend at {self.precision} needs torch weights (denoiser.pt) of an "
                f"architecture in diffseg's registry; the package has none{program_note}"
            )
        arch = dict(package.manifest.raw.get("architecture") or {})
        name = arch.pop("type", None)
        try:
            from diffseg.export.architectures import ARCHITECTURES, build_model
        except ImportError as exc:
            raise BackendUnavailableError(
                f"{package.root}: rebuilding architecture {name!r} needs diffseg's export side ({exc}); "
                f'pip install "diffseg[export]"{program_note}'
            ) from None
        if name not in ARCHITECTURES:
            raise BackendUnavailableError(
                f"{package.root}: architecture {name!r} is not in diffseg's registry ({sorted(ARCHITECTURES)}), so "
                f"denoiser.pt cannot be rebuilt{program_note}"
            )
        model = build_model({"architecture": name, "model": arch})
        state = torch.load(package.files["torch"].path, map_location="cpu", weights_only=True)
        model.load_state_dict(state)
        return model.eval()

    def _graph(self, batch: int):
        torch = self.torch
        if batch not in self._graphs:
            x = torch.zeros((batch, self.in_channels, *self.patch), device="cuda", dtype=torch.float16)
            t = torch.zeros((batch,), device="cuda", dtype=torch.float32)
            stream = torch.cuda.Stream()
            stream.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(stream), torch.inference_mode():
                for _ in range(2):  # warm up before capture (cuDNN picks its algorithms)
                    self.model(x, t)
            torch.cuda.current_stream().wait_stream(stream)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph), torch.inference_mode():
                y = self.model(x, t)
            self._graphs[batch] = (graph, x, t, y)
        return self._graphs[batch]

    def run(self, x: np.ndarray, t: np.ndarray, features: Sequence[np.ndarray] = ()) -> np.ndarray:
        self._check(x, t, features)
        torch = self.torch
        if self.precision == "fp32":
            extra = [torch.from_numpy(np.ascontiguousarray(f, dtype=np.float32)) for f in features]
            with torch.inference_mode():
                return self.model(torch.from_numpy(x), torch.from_numpy(t), *extra).numpy()
        if self.cuda_graphs:
            graph, xs, ts, ys = self._graph(x.shape[0])
            xs.copy_(torch.from_numpy(x), non_blocking=False)
            ts.copy_(torch.from_numpy(t))
            graph.replay()
            return ys.float().cpu().numpy()
        with torch.inference_mode():
            y = self.model(torch.from_numpy(x).cuda().half(), torch.from_numpy(t).cuda())
        return y.float().cpu().numpy()

    def condition(self, images: np.ndarray) -> Sequence[np.ndarray]:
        """The condition graph's program on ``images`` [B, C_img, *patch]: the features, each [B, ...]."""
        if self.condition_model is None:
            return super().condition(images)
        self._check_images(images)
        torch = self.torch
        with torch.inference_mode():
            out = self.condition_model(torch.from_numpy(np.ascontiguousarray(images, dtype=np.float32)))
        return [f.numpy() for f in out]

    def run_tensor(self, x, t: int):
        """One engine call on a float32 tensor already on the engine's device; returns the output tensor there (for
        CUDA graphs, the graph's own output buffer, valid until the next call)."""
        torch = self.torch
        if self.cuda_graphs:
            graph, xs, ts, ys = self._graph(x.shape[0])
            xs.copy_(x)
            ts.fill_(float(t))
            graph.replay()
            return ys
        with torch.inference_mode():
            t_vec = torch.full((x.shape[0],), float(t), dtype=torch.float32, device=x.device)
            return self.model(x.half() if self.precision == "fp16" else x, t_vec)

    def device_ops(self, layout: DeviceLayout) -> TorchDeviceOps:
        """The step-major loop's array work as tensor operations on this engine's device."""
        return TorchDeviceOps(self, layout)

    def close(self) -> None:
        self._graphs.clear()

    def describe(self) -> dict:
        return {
            **super().describe(),
            "torch": self.torch.__version__,
            "model_source": self.source,
            "cuda_graphs": self.cuda_graphs,
        }


class TorchDeviceOps(DeviceOps):
    """The step-major loop on torch tensors (CUDA for fp16; the CPU for the fp32 reference and tests). Updates the
    accumulator and x_t in place; the step applies the float64 coefficients in double, as ``diffseg._ext``.

    Raises:
        BackendUnavailableError: a learned-variance model (the host loop runs those).
    """

    def __init__(self, backend: TorchBackend, layout: DeviceLayout) -> None:
        super().__init__(layout)
        self.torch = torch = backend.torch
        self.backend = backend
        self.device = torch.device("cuda" if backend.device == "cuda" else "cpu")
        self.weight = self.upload(layout.weight)
        self.scale = self.upload(layout.inv_weight_sum).double()
        self.interior = None if layout.interior is None else self.upload(layout.interior)
        self.image_channels = (
            slice(0, layout.image_channels) if layout.noisy_channel == layout.image_channels else slice(1, None)
        )
        self.rows: dict[int, Any] = {}
        bg_weight = np.zeros(layout.full, np.float32)
        if layout.skip_weight is not None:
            bg_weight[...] = layout.skip_weight
        self.bg_weight = self.upload(bg_weight)  # Σ weight of the windows not run, per sample

    def upload(self, array: np.ndarray):
        return self.torch.from_numpy(np.ascontiguousarray(array)).to(self.device)

    def _sync(self) -> None:
        if self.device.type == "cuda":
            self.torch.cuda.synchronize()

    def begin(self, x_init: np.ndarray, image: np.ndarray) -> None:
        self.x = self.upload(x_init).clone()  # x_t is updated in place: never through the caller's array
        self.image = self.upload(image)
        self.acc = self.torch.empty_like(self.x)

    def reset(self, t: int, c_x: float, c_0: float) -> None:
        self.torch.mul(self.x, c_x, out=self.acc)  # output_for_x0(−1) = c_x·x_t − c_0
        self.acc.add_(-c_0).mul_(self.bg_weight)

    def gather(self, batch: list[int], first: int):
        lay, b = self.layout, len(batch)
        if b not in self.rows:
            self.rows[b] = self.torch.empty((b, lay.image_channels + 1, *lay.patch), device=self.device)
        rows = self.rows[b]
        for j, task in enumerate(batch):
            i, *region = lay.region(task)
            rows[j, lay.noisy_channel] = self.x[(i, *region)]
            rows[j, self.image_channels] = self.image[(slice(None), *region)]
        return rows

    def engine(self, rows, t: int):
        self._sync()  # the engine's time starts when the gathers have finished
        y = self.backend.run_tensor(rows, t)
        self._sync()
        return y

    def blend(self, y, batch: list[int], t: int, watch: bool, a_out: float, a_x: float):
        peaks = self.torch.empty(len(batch), dtype=self.torch.float64, device=self.device)
        for j, task in enumerate(batch):
            region = self.layout.region(task)
            y_j = y[j, self.layout.prediction_channel].float()
            self.acc[region] += y_j * self.weight
            if watch:
                peaks[j] = (a_out * y_j.double() + a_x * self.x[region].double()).max()
        return peaks.cpu().numpy() if watch else None

    def step(self, coef: dict[str, Any], noise: np.ndarray | None) -> None:
        a_out, a_x, big_a, big_b, big_c, sigma = step_vector(coef).tolist()
        m = self.acc.double() * self.scale
        xd = self.x.double()
        x0 = a_out * m + a_x * xd
        if self.layout.clip is not None:
            x0 = x0.clamp(-self.layout.clip, self.layout.clip)
        nxt = big_a * x0 + big_b * m + big_c * xd
        if noise is not None:
            nxt += sigma * self.upload(noise).double()
        out = nxt.float()
        if self.interior is not None:
            out = self.torch.where(self.interior, out, self.layout.pad_value)
        self.x.copy_(out)

    def retire(self, retiring: list[int], live: list[int]) -> None:
        for task in retiring:
            self.bg_weight[self.layout.region(task)] += self.weight

    def final_x(self) -> np.ndarray:
        return self.x.cpu().numpy()
