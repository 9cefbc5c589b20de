"""Tumours and nodes of the phantoms: where they go, their shape and uptake, and their rasterisation on a grid.

A lesion is designed in physical space (a sum of rotated anisotropic Gaussian blobs at a primary or nodal site,
scaled to a target volume), kept only where it sits in soft tissue, then labelled on each grid where it displaces
soft tissue (not bone, air or brain).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ._anatomy import AIR, BRAIN, CANAL, CORTICAL, FAT, TRABECULAR, _Anatomy, _tissue_map

_PRIMARY_SITES = [  # (centre mm, jitter mm): oropharynx, larynx, hypopharynx, oral tongue
    ((12, -14, 0), (6, 5, 10)),
    ((10, -26, -40), (5, 4, 8)),
    ((14, -10, -25), (5, 5, 8)),
    ((12, -38, 10), (8, 6, 5)),
]
_NODE_SITES = [  # level II, III, IV, retropharyngeal
    ((38, -4, -8), (6, 7, 8)),
    ((40, 2, -32), (6, 7, 8)),
    ((40, 6, -55), (6, 7, 8)),
    ((18, 10, 5), (3, 3, 6)),
]


def _lesion_field(X, Y, Z, centre, blobs) -> np.ndarray:
    """Sum of rotated anisotropic Gaussian blobs: inside where the field exceeds exp(-1)."""
    f = np.zeros(np.broadcast_shapes(X.shape, Y.shape, Z.shape), dtype=np.float32)
    for offset, rot, radii in blobs:
        dx, dy, dz = X - (centre[0] + offset[0]), Y - (centre[1] + offset[1]), Z - (centre[2] + offset[2])
        u = (rot[0, 0] * dx + rot[0, 1] * dy + rot[0, 2] * dz) / radii[0]
        v = (rot[1, 0] * dx + rot[1, 1] * dy + rot[1, 2] * dz) / radii[1]
        w = (rot[2, 0] * dx + rot[2, 1] * dy + rot[2, 2] * dz) / radii[2]
        f += np.exp(-(u * u + v * v + w * w)).astype(np.float32)
    return f


def _random_rotation(rng: np.random.Generator) -> np.ndarray:
    q, r = np.linalg.qr(rng.normal(size=(3, 3)))
    return q * np.sign(np.diag(r))


@dataclass
class _LesionDesign:
    kind: str
    centre: tuple[float, float, float]
    blobs: list
    suv_max: float
    necrotic: bool
    necrosis_level: float
    texture: list  # (wave vector, phase) of the heterogeneity pattern
    extent: float  # half-size (mm) of the box that holds it
    target_ml: float


def _design_lesion(rng: np.random.Generator, kind: str, scale: float) -> _LesionDesign:
    sites = _PRIMARY_SITES if kind == "primary" else _NODE_SITES
    base, jitter = sites[rng.integers(len(sites))]
    side = -1.0 if rng.random() < 0.5 else 1.0
    centre = (
        side * base[0] * scale + rng.uniform(-1, 1) * jitter[0],
        base[1] * scale + rng.uniform(-1, 1) * jitter[1],
        base[2] * scale + rng.uniform(-1, 1) * jitter[2],
    )
    lo, hi = (2.0, 40.0) if kind == "primary" else (0.5, 15.0)
    volume = float(np.exp(rng.uniform(np.log(lo), np.log(hi))))
    radius = (3.0 * volume * 1000.0 / (4.0 * np.pi)) ** (1.0 / 3.0)
    blobs = []
    for i in range(int(rng.integers(1, 4)) if kind == "primary" else int(rng.integers(1, 3))):
        offset = np.zeros(3) if i == 0 else rng.normal(scale=0.45 * radius, size=3)
        radii = radius * rng.uniform(0.7, 1.2, size=3) * (1.0 if i == 0 else rng.uniform(0.5, 0.8))
        blobs.append((offset, _random_rotation(rng), radii))
    suv_max = float(rng.uniform(3.0, 20.0) if kind == "primary" else rng.uniform(3.0, 14.0))
    necrotic = bool(volume > 6.0 and rng.random() < 0.45)
    texture = [(rng.normal(scale=2 * np.pi / (1.5 * radius), size=3), rng.uniform(0, 2 * np.pi)) for _ in range(3)]
    return _LesionDesign(kind, centre, blobs, suv_max, necrotic, rng.uniform(0.55, 0.75), texture, 2.6 * radius, volume)


def _scale_to_volume(design: _LesionDesign) -> None:
    """Rescale the blobs so that the thresholded field holds the target volume (measured on a 1 mm grid)."""
    for _ in range(3):
        e = design.extent
        ax = np.arange(-e, e + 1.0, 1.0, dtype=np.float32)
        X, Y, Z = ax[None, None, :], ax[None, :, None], ax[:, None, None]
        f = _lesion_field(X + design.centre[0], Y + design.centre[1], Z + design.centre[2], design.centre, design.blobs)
        vol = float((f > np.exp(-1.0)).sum()) / 1000.0
        if vol <= 0:
            return
        k = (design.target_ml / vol) ** (1.0 / 3.0)
        design.blobs = [(o * k, r, radii * k) for o, r, radii in design.blobs]
        design.extent *= k
        if abs(k - 1.0) < 0.03:
            return


def _lesion_activity(X, Y, Z, f, d: _LesionDesign) -> np.ndarray:
    """Heterogeneous SUV inside a lesion: a smooth texture between 55 % and 100 % of SUVmax, a cold necrotic core."""
    tex = np.zeros(f.shape, dtype=np.float32)
    for k, phase in d.texture:
        tex += np.cos(k[0] * (X - d.centre[0]) + k[1] * (Y - d.centre[1]) + k[2] * (Z - d.centre[2]) + phase)
    tex = (tex / len(d.texture) + 1.0) / 2.0  # 0..1
    act = d.suv_max * (0.55 + 0.45 * tex)
    if d.necrotic:
        core = f > d.necrosis_level * float(f.max())
        act = np.where(core, 0.2 * d.suv_max, act)
    return act.astype(np.float32)


def _place_lesions(rng: np.random.Generator, anatomy: _Anatomy) -> list[_LesionDesign]:
    count = int(rng.choice([0, 1, 2, 3, 4], p=[0.08, 0.37, 0.30, 0.15, 0.10]))
    designs: list[_LesionDesign] = []
    attempts = 0
    while len(designs) < count and attempts < 60:
        attempts += 1
        kind = "primary" if (not designs and rng.random() < 0.7) else "node"
        d = _design_lesion(rng, kind, anatomy.scale)
        _scale_to_volume(d)
        # Keep lesions apart: no two boxes overlapping by more than a little.
        if any(np.linalg.norm(np.subtract(d.centre, o.centre)) < 0.6 * (d.extent + o.extent) for o in designs):
            continue
        c = d.centre
        t = _tissue_map(np.float32(c[0]), np.float32(c[1]), np.float32(c[2]), anatomy)
        if int(t) in (AIR, FAT, CORTICAL, TRABECULAR, BRAIN, CANAL):
            continue
        designs.append(d)
    return designs


def _box_slices(coords: np.ndarray, lo: float, hi: float) -> slice:
    inside = np.nonzero((coords >= lo) & (coords <= hi))[0]
    if inside.size == 0:
        return slice(0, 0)
    return slice(int(inside.min()), int(inside.max()) + 1)


def _rasterise_lesions(X, Y, Z, designs: list[_LesionDesign], tissue: np.ndarray, with_activity: bool):
    """Instance labels (1-based, by design order) and, optionally, lesion activity on a grid."""
    labels = np.zeros(tissue.shape, dtype=np.uint8)
    activity = np.zeros(tissue.shape, dtype=np.float32) if with_activity else None
    necrosis = np.zeros(tissue.shape, dtype=bool)
    xs, ys, zs = X.ravel(), Y.ravel(), Z.ravel()
    for i, d in enumerate(designs, start=1):
        sx = _box_slices(xs, d.centre[0] - d.extent, d.centre[0] + d.extent)
        sy = _box_slices(ys, d.centre[1] - d.extent, d.centre[1] + d.extent)
        sz = _box_slices(zs, d.centre[2] - d.extent, d.centre[2] + d.extent)
        bx, by, bz = X[:, :, sx], Y[:, sy, :], Z[sz, :, :]
        if bx.size == 0 or by.size == 0 or bz.size == 0:
            continue
        f = _lesion_field(bx, by, bz, d.centre, d.blobs)
        t = tissue[sz, sy, sx]
        # Tumours displace soft tissue, not bone, air or brain.
        inside = (f > np.exp(-1.0)) & ~np.isin(t, (AIR, CORTICAL, TRABECULAR, BRAIN, CANAL)) & (labels[sz, sy, sx] == 0)
        labels[sz, sy, sx][inside] = i
        if d.necrotic:
            necrosis[sz, sy, sx] |= inside & (f > d.necrosis_level * float(f.max()))
        if activity is not None:
            act = _lesion_activity(bx, by, bz, f, d)
            activity[sz, sy, sx] = np.where(inside, act, activity[sz, sy, sx])
    return labels, activity, necrosis
