"""Type stubs of diffseg._ext, the compiled kernels (see diffseg.runtime.kernels for the Python layer).

Arrays are C-contiguous and indexed [z, y, x]; geometry vectors and matrices are in ITK order (x, y, z).
Argument errors raise ValueError (std::invalid_argument) or TypeError; the GIL is released while kernels run.
"""

from typing import Any

import numpy as np
import numpy.typing as npt

Geometry = tuple[
    npt.NDArray[np.float64], npt.NDArray[np.float64], npt.NDArray[np.float64], npt.NDArray[np.float64], bool
]
Stats = dict[str, npt.NDArray[Any] | None]

def build_info() -> dict[str, Any]:
    """Compiler, flags and threading of this build."""

def release_scratch() -> None:
    """Free the scratch memory the kernels keep between calls."""

def resample_linear(
    source: npt.NDArray[Any], out: npt.NDArray[np.float32], geometry: Geometry, fill: float = 0.0, threads: int = 0
) -> None:
    """Trilinear resampling with SimpleITK's rules into ``out`` (float32). ``geometry`` is
    (index_to_physical_out, origin_out, physical_to_index_in, origin_in, separable)."""

def resample_nearest(
    source: npt.NDArray[Any], out: npt.NDArray[Any], geometry: Geometry, fill: npt.NDArray[Any], threads: int = 0
) -> None:
    """Nearest-neighbour resampling (floor(c + 0.5)); ``out`` and the one-element ``fill`` have the source's dtype."""

def resample_label_vote(
    source: npt.NDArray[Any], out: npt.NDArray[Any], geometry: Geometry, fill: npt.NDArray[Any], threads: int = 0
) -> None:
    """Label-map resampling by trilinear vote (ties: the smallest label)."""

def connected_components(
    mask: npt.NDArray[Any],
    connectivity: int = 26,
    multilabel: bool = True,
    out: npt.NDArray[Any] | None = None,
    dtype: str | None = None,
    threads: int = 0,
) -> tuple[npt.NDArray[Any], int]:
    """Labels 1..n in raster order of each component's first voxel; returns (labels, n)."""

def label_with_stats(
    mask: npt.NDArray[Any],
    connectivity: int = 26,
    multilabel: bool = True,
    intensity: npt.NDArray[Any] | None = None,
    out: npt.NDArray[Any] | None = None,
    dtype: str | None = None,
    threads: int = 0,
) -> tuple[npt.NDArray[Any], int, Stats]:
    """connected_components plus statistics: count [n], bbox [n, 6], centroid [n, 3], sum [n] and max [n]."""

def component_stats(
    labels: npt.NDArray[Any], n: int, intensity: npt.NDArray[Any] | None = None, threads: int = 0
) -> Stats:
    """Statistics of components 1..n of a label image."""

def remove_small(
    mask: npt.NDArray[Any],
    connectivity: int = 26,
    multilabel: bool = True,
    min_voxels: int = 0,
    keep_largest: int = -1,
    out: npt.NDArray[Any] | None = None,
    threads: int = 0,
) -> tuple[npt.NDArray[Any], int, int]:
    """Zeroes components under min_voxels (and beyond the keep_largest largest); returns (mask, found, kept)."""

def diffusion_step(
    model_output: npt.NDArray[np.float32],
    x_t: npt.NDArray[np.float32],
    coefficients: dict[str, Any],
    x_prev: npt.NDArray[np.float32] | None = None,
    x0: npt.NDArray[np.float32] | None = None,
    noise: npt.NDArray[np.float32] | None = None,
    variance: npt.NDArray[np.float32] | None = None,
    scale: npt.NDArray[np.float32] | None = None,
    threads: int = 0,
) -> None:
    """One reverse-diffusion step in one pass, each element in double: m = model_output·scale (scale repeats over
    the leading axes), x0 = clip(a_out·m + a_x·x_t), x_prev = A·x0 + B·m + C·x_t + σ·z, σ a constant or
    exp(L1·variance + L0). ``coefficients`` come from diffseg.runtime.diffusion_steps; outputs may be inputs."""
