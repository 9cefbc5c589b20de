"""The PyTorch backend: the reference on the CPU (fp32), and fp16 with CUDA graphs on GPUs without TensorRT.

torch is imported only when this backend is chosen. The network is rebuilt from the manifest's architecture and the
package's ``denoiser.pt`` (loaded with ``weights_only=True``, after the sha256 check of the package).
"""

from __future__ import annotations

import numpy as np

from .base import Backend, BackendUnavailableError

__all__ = ["TorchBackend"]


class TorchBackend(Backend):
    name = "torch"
    precisions = ("fp32", "fp16")

    @classmethod
    def unavailable_reason(cls) -> str | None:
        try:
            import torch  # noqa: F401

            from diffseg.export.architectures import build_model  # noqa: F401
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

        from diffseg.export.architectures import build_model

        if "torch" not in package.files:
            raise BackendUnavailableError(f"{package.root}: the package has no torch weights (denoiser.pt)")
        arch = dict(package.manifest.raw["architecture"])
        cfg = {"architecture": arch.pop("type"), "model": arch}
        self.model = build_model(cfg)
        state = torch.load(package.files["torch"].path, map_location="cpu", weights_only=True)
        self.model.load_state_dict(state)
        self.model.eval()
        if threads:
            torch.set_num_threads(threads)
        self.torch = torch
        if precision == "fp16":
            self.device = "cuda"
            self.model = self.model.cuda().half()
        self.cuda_graphs = cuda_graphs and precision == "fp16"
        self._graphs: dict[int, tuple] = {}

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

    def run(self, x: np.ndarray, t: np.ndarray) -> np.ndarray:
        self._check(x, t)
        torch = self.torch
        if self.precision == "fp32":
            with torch.inference_mode():
                return self.model(torch.from_numpy(x), torch.from_numpy(t)).numpy()
        if self.cuda_graphs:
            graph, xs, ts, ys = self._graph(x.shape[0])
            xs.copy_(torch.from_numpy(x), non_blocking=False)
            ts.copy_(torch.from_numpy(t))
            graph.replay()
            return ys.float().cpu().numpy()
        with torch.inference_mode():
            y = self.model(torch.from_numpy(x).cuda().half(), torch.from_numpy(t).cuda())
        return y.float().cpu().numpy()

    def close(self) -> None:
        self._graphs.clear()

    def describe(self) -> dict:
        return {**super().describe(), "torch": self.torch.__version__, "cuda_graphs": self.cuda_graphs}
