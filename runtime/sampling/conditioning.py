"""Conditioning computed once per window: a model's ``condition(image) → features`` graph (Diff-UNet's image
encoder) depends on the image window only, so its features are the same at every step and for every sample.

The loops take the features of each engine row from a :class:`ConditionCache`: with ``cache`` (the default) each
window's features are computed once, in batches of windows, before the first step, and handed to every engine call
that runs the window; without it they are computed again for every row of every call, as a paper's loop does (the
figure the cache is measured against). Either way the denoiser sees the same features, so the result is the same.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence

import numpy as np

__all__ = ["ConditionCache", "Conditioner"]

Conditioner = Callable[[np.ndarray], Sequence[np.ndarray]]


class ConditionCache:
    """Each window's features, with the figures of the condition graph's calls.

    Args:
        condition: ``condition(images)``: ``[B, C_img, *patch]`` float32 → the features, each ``[B, ...]``.
        image_window: the padded image channels of window ``w``, ``[C_img, *patch]``.
        batch_size: windows per call when the cache is filled.
        cache: keep each window's features (False: compute them for every row of every engine call).

    Attributes:
        calls: calls of the condition graph.
        forwards: windows run through it (the sum of the calls' batch sizes).
        seconds: wall time inside it.
    """

    def __init__(
        self, condition: Conditioner, image_window: Callable[[int], np.ndarray], batch_size: int, cache: bool = True
    ) -> None:
        self.condition, self.image_window, self.batch_size, self.cache = condition, image_window, batch_size, cache
        self.store: dict[int, tuple[np.ndarray, ...]] = {}
        self.calls, self.forwards, self.seconds = 0, 0, 0.0

    def _compute(self, windows: Sequence[int]) -> list[tuple[np.ndarray, ...]]:
        images = np.stack([self.image_window(w) for w in windows]).astype(np.float32, copy=False)
        start = time.perf_counter()
        features = [np.asarray(f, np.float32) for f in self.condition(images)]
        self.seconds += time.perf_counter() - start
        self.calls += 1
        self.forwards += len(windows)
        for f in features:
            if f.shape[0] != len(windows):
                raise ValueError(f"condition graph returned a feature of batch {f.shape[0]} for {len(windows)} windows")
        return [tuple(f[j] for f in features) for j in range(len(windows))]

    def prepare(self, windows: Sequence[int]) -> None:
        """Fill the cache for ``windows`` (nothing without ``cache``)."""
        if not self.cache:
            return
        todo = [int(w) for w in windows if int(w) not in self.store]
        for first in range(0, len(todo), self.batch_size):
            chunk = todo[first : first + self.batch_size]
            self.store.update(zip(chunk, self._compute(chunk), strict=True))

    def rows(self, windows: Sequence[int]) -> tuple[np.ndarray, ...]:
        """The features of engine rows whose windows are ``windows`` (one per row, repeats allowed), stacked."""
        per_row = [self.store[int(w)] for w in windows] if self.cache else self._compute(windows)
        return tuple(np.stack([row[f] for row in per_row]) for f in range(len(per_row[0])))
