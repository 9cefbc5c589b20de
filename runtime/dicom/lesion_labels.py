"""The lesion label map of a result, checked against its mask and lesion table (the LABELMAP SEG's and the
RTSTRUCT's segments: one per lesion, numbered by the lesion's id)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from ..volume import Volume

__all__ = ["is_integer_mask", "lesion_labels"]


def is_integer_mask(array: np.ndarray) -> bool:
    return bool(np.issubdtype(array.dtype, np.integer) or array.dtype == bool)


def lesion_labels(
    mask: Volume,
    lesions: Sequence[Mapping[str, Any]] | None = None,
    *,
    labels: Volume | None = None,
    connectivity: int = 26,
) -> Volume:
    """The lesion label map of a result, checked against its mask and its lesion table.

    Labels are taken as given (``SegmentationResult.labels``) or, without them, made by labelling ``mask`` with
    ``connectivity`` on the mask's own grid, exactly as :func:`~diffseg.runtime.postprocess.postprocess` numbers
    lesions (ids 1..n in raster order of each lesion's first voxel): labelling it after re-indexing onto the CT
    would number the lesions in another order.

    Args:
        mask: the tumour mask (nonzero = tumour).
        lesions: the lesion table (rows with ``id`` and ``voxels``, as ``SegmentationResult.lesions``); None:
            not checked.
        labels: the lesion label map on the mask's grid; None: labelled here.
        connectivity: 6, 18 or 26, the postprocessing's (``PostprocessOptions.connectivity``), for labelling.

    Returns:
        The label map on the mask's grid, uint16 (0 = background, lesion ids as values).

    Raises:
        ValueError: labels on another grid, labels that do not cover exactly the mask's voxels, more than
            65535 lesions, or a lesion table whose ids or voxel counts differ from the labels.
    """
    if not is_integer_mask(mask.array):
        raise ValueError(f"mask must hold integers or booleans (nonzero = tumour), got {mask.array.dtype}")
    if labels is None:
        if connectivity not in (6, 18, 26):
            raise ValueError(f"connectivity must be 6, 18 or 26, got {connectivity}")
        from ..components import label_components

        array, _ = label_components((mask.array > 0).astype(np.uint8), connectivity)
        labels = mask.with_array(array)
    elif not labels.same_grid(mask) or labels.shape != mask.shape:
        raise ValueError(f"labels must be on the mask's grid, got {labels!r} for mask {mask!r}")
    if not is_integer_mask(labels.array) or (labels.array.size and labels.array.min() < 0):
        raise ValueError(f"labels must hold integers >= 0, got {labels.array.dtype}")
    if not np.array_equal(labels.array > 0, mask.array > 0):
        raise ValueError("labels must be nonzero exactly where the mask is (the lesions of this mask)")
    ids, counts = np.unique(labels.array[labels.array > 0], return_counts=True)
    if ids.size and ids[-1] > 65535:
        raise ValueError(f"lesion ids must be at most 65535 (16-bit segment numbers), got {int(ids[-1])}")
    if lesions is not None:
        table = {}
        for i, row in enumerate(lesions):
            if "id" not in row or "voxels" not in row:
                raise ValueError(f"lesion row {i} lacks id or voxels")
            table[int(row["id"])] = int(row["voxels"])
        found = dict(zip(ids.tolist(), counts.tolist(), strict=True))
        if table != found:
            raise ValueError(
                f"the lesion table does not match the lesion labels: table (id: voxels) {table}, labels {found} "
                "(pass the result's labels, or the connectivity the lesions were labelled with)"
            )
    return labels.with_array(labels.array.astype(np.uint16))
