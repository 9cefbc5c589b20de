"""A model of several targets: each target postprocessed on its own, then the case's combined maps and table.

Each target gets its own threshold, small-component removal and lesion table (:func:`postprocess`), as a model of
that target alone would. The combined ``mask`` is a target label map (c + 1 for target c); where two targets claim a
voxel it goes to the one of higher mean probability (the earlier target on a tie). Lesion ids run over all targets,
target by target, and each lesion row names its ``target``; the combined probability, uncertainty and entropy are
the largest over the targets.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from .model_contract import TargetSpec
from .postprocess import PostprocessOptions, postprocess, thresholded_mask
from .result import TargetResult
from .volume import Volume

__all__ = ["CombinedTargets", "combine_targets"]


class CombinedTargets:
    """What :func:`combine_targets` gives: per-target results and the case's combined maps and lesions."""

    def __init__(
        self,
        targets: tuple[TargetResult, ...],
        mask: Volume,
        labels: Volume,
        maps: tuple[Volume, Volume, Volume],
        lesions: list[dict],
    ) -> None:
        self.targets, self.mask, self.labels, self.lesions = targets, mask, labels, lesions
        self.probability, self.uncertainty, self.entropy = maps


def combine_targets(
    targets: Sequence[TargetSpec],
    probabilities: Sequence[Volume],
    uncertainties: Sequence[Volume],
    entropies: Sequence[Volume],
    pet: Volume | None,
    options: PostprocessOptions,
) -> CombinedTargets:
    """Postprocess each target, then combine them (see the module docstring).

    Args:
        targets: the manifest's targets, in order.
        probabilities, uncertainties, entropies: each target's maps on the output grid.
        pet: the PET on the same grid (lesion SUVs), or None.
        options: threshold, minimum lesion volume, connectivity (the same for every target).
    """
    stack = np.stack([p.array for p in probabilities])
    found = np.stack([thresholded_mask(p, options).astype(bool) for p in probabilities])
    # A voxel found for several targets goes to the one of highest probability (argmax keeps the first on a tie).
    claimed = np.where(found.any(axis=0), np.where(found, stack, -1.0).argmax(axis=0), -1)
    mask = np.zeros(stack.shape[1:], np.uint8)
    labels = np.zeros(stack.shape[1:], np.int32)
    results, lesions, next_id = [], [], 1
    for c, (target, probability) in enumerate(zip(targets, probabilities, strict=True)):
        # The target's lesions on the voxels it kept (a claimed-away part can leave a piece under min_lesion_ml),
        # numbered after the earlier targets' lesions.
        kept = probability.with_array(np.where(claimed == c, probability.array, 0.0).astype(np.float32))
        post = postprocess(kept, pet, options)
        own = post.labels.array > 0
        target_labels = np.where(own, post.labels.array + (next_id - 1), 0).astype(np.int32)
        mask[own], labels[own] = c + 1, target_labels[own]
        rows = tuple({**row, "id": row["id"] + next_id - 1, "target": target.name} for row in post.lesions)
        next_id += len(rows)
        lesions += rows
        results.append(
            TargetResult(
                target=target,
                mask=post.mask,
                labels=probability.with_array(target_labels),
                probability=probability,
                uncertainty=uncertainties[c],
                entropy=entropies[c],
                lesions=rows,
            )
        )
    first = probabilities[0]
    maps = tuple(
        first.with_array(np.max(np.stack([v.array for v in group]), axis=0))
        for group in (probabilities, uncertainties, entropies)
    )
    return CombinedTargets(tuple(results), first.with_array(mask), first.with_array(labels), maps, lesions)  # type: ignore[arg-type]
