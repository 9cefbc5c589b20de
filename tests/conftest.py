"""Shared fixtures: small phantoms (built once per session) and the shipped model package."""

from __future__ import annotations

import pytest

from diffseg.runtime.phantom import PhantomOptions, make_phantom

SMALL = PhantomOptions(ct_size_xy=160, ct_slices=40)


@pytest.fixture(scope="session")
def small_phantom():
    """A light phantom (160×160×40 CT) with at least one lesion, for end-to-end tests."""
    for seed in range(1, 30):
        ph = make_phantom(seed, SMALL)
        if ph.lesions and ph.mask.array.sum() > 500:
            return ph
    raise RuntimeError("no small phantom with a lesion in seeds 1-29")


@pytest.fixture(scope="session")
def default_package():
    from diffseg.runtime.manifest import load_package

    return load_package("default")
