"""Synthetic head-and-neck FDG PET/CT phantoms with ground-truth tumour masks (numpy only).

Anatomy is defined analytically in physical space (mm, LPS: +x left, +y posterior, +z superior) and rasterised
separately on the CT grid and on the PET grid, so the two images agree in physical space while having their own
spacing, origin, extent and orientation, as a real PET/CT does. Physiological uptake (brain, tonsils, salivary
glands, tongue and neck muscles) competes with the tumours on PET, so that CT context is needed to tell them apart.

Seeds split into documented sets (``SPLITS``): the test and validation seeds are never used for training.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from .volume import Volume

__all__ = ["SPLITS", "Lesion", "Phantom", "PhantomOptions", "make_phantom", "split_seeds", "write_phantom"]

#: Seed ranges of the documented split. Training may use any seed ≥ 1000.
SPLITS: dict[str, range] = {
    "test": range(1, 21),
    "validation": range(101, 121),
    "train": range(1000, 100_000),
}

# Tissue classes of the analytic anatomy.
AIR, FAT, SOFT, CORTICAL, TRABECULAR, BRAIN, CANAL, PAROTID, SUBMANDIBULAR, TONSIL, TONGUE, MUSCLE = range(12)
_HU = {
    AIR: -1000.0,
    FAT: -100.0,
    SOFT: 35.0,
    CORTICAL: 1300.0,
    TRABECULAR: 450.0,
    BRAIN: 32.0,
    CANAL: 12.0,
    PAROTID: -10.0,
    SUBMANDIBULAR: 40.0,
    TONSIL: 45.0,
    TONGUE: 45.0,
    MUSCLE: 48.0,
}
_NECROSIS_HU = 15.0


def split_seeds(name: str, count: int | None = None) -> list[int]:
    """Seeds of a split (``train``, ``validation``, ``test``), the first ``count`` of them if given."""
    if name not in SPLITS:
        raise ValueError(f"split must be one of {sorted(SPLITS)}, got {name!r}")
    seeds = SPLITS[name]
    if count is not None:
        if count < 0 or count > len(seeds):
            raise ValueError(f"count must be in 0..{len(seeds)} for split {name!r}, got {count}")
        seeds = seeds[:count]
    return list(seeds)


@dataclass(frozen=True)
class PhantomOptions:
    """Grid and noise settings of a phantom.

    Attributes:
        ct_size_xy: CT matrix in plane (voxels); the scanner default for H&N is 512, 256 keeps cases light.
        ct_slices: CT slice count (None: random 56–72).
        ct_spacing_xy: CT pixel size (mm); None draws 0.90–1.05.
        ct_slice_mm: CT slice spacing (mm).
        pet_spacing_mm: PET voxel size (mm); None draws 3.9–4.1.
        pet_fwhm_mm: PET resolution (mm); None draws 5–7.
        ct_noise_hu: standard deviation of CT noise (HU).
        pet_noise: relative PET noise at SUV 1.
        flip_probability: chance that a grid is stored with flipped axes (negative direction cosines).
    """

    ct_size_xy: int = 256
    ct_slices: int | None = None
    ct_spacing_xy: float | None = None
    ct_slice_mm: float = 3.0
    pet_spacing_mm: float | None = None
    pet_fwhm_mm: float | None = None
    ct_noise_hu: float = 12.0
    pet_noise: float = 0.12
    flip_probability: float = 0.3

    def __post_init__(self) -> None:
        if self.ct_size_xy < 32:
            raise ValueError(f"ct_size_xy must be >= 32, got {self.ct_size_xy}")
        if self.ct_slices is not None and self.ct_slices < 8:
            raise ValueError(f"ct_slices must be >= 8, got {self.ct_slices}")
        if not 0.0 <= self.flip_probability <= 1.0:
            raise ValueError(f"flip_probability must be in [0, 1], got {self.flip_probability}")


@dataclass
class Lesion:
    """One tumour or node as generated.

    Attributes:
        kind: ``primary`` or ``node``.
        label: the value of this lesion in the instance mask (1-based).
        centre_mm: designed centre (physical, LPS).
        volume_ml: ground-truth volume: labelled CT voxels × voxel volume.
        voxels: labelled CT voxels.
        suv_max: designed peak activity (before PET blur and noise).
        suv_max_pet: maximum of the PET image at the lesion's CT voxels (nearest PET voxel).
        necrotic: whether it has a necrotic (cold, hypodense) core.
    """

    kind: str
    label: int
    centre_mm: tuple[float, float, float]
    volume_ml: float
    voxels: int
    suv_max: float
    suv_max_pet: float
    necrotic: bool


@dataclass
class Phantom:
    seed: int
    ct: Volume
    pet: Volume
    mask: Volume
    lesions: list[Lesion] = field(default_factory=list)

    def case_info(self) -> dict:
        """What ``case.json`` holds: the lesion list and the grids."""

        def grid(v: Volume) -> dict:
            return {
                "size_xyz": list(v.size_xyz),
                "spacing_mm": list(v.spacing),
                "origin_mm": list(v.origin),
                "direction": list(v.direction),
            }

        return {
            "seed": self.seed,
            "split": next((n for n, r in SPLITS.items() if self.seed in r), "none"),
            "generator": "diffseg.runtime.phantom",
            "ct": grid(self.ct),
            "pet": grid(self.pet),
            "total_volume_ml": float(sum(les.volume_ml for les in self.lesions)),
            "lesions": [asdict(les) for les in self.lesions],
        }


# --------------------------------------------------------------------------------------------------------------
# Geometry helpers. Phantom grids are axis-aligned (possibly flipped), so physical coordinates separate per axis.


def _axis_grid(n: int, spacing: float, centre: float, flip: bool) -> tuple[float, float]:
    """(origin, direction cosine) of an axis of ``n`` voxels centred on ``centre`` mm."""
    sign = -1.0 if flip else 1.0
    return centre - sign * spacing * (n - 1) / 2.0, sign


def _coords(vol_origin: float, sign: float, spacing: float, n: int) -> np.ndarray:
    return (vol_origin + sign * spacing * np.arange(n)).astype(np.float32)


def _make_grid(
    n_xyz: tuple[int, int, int],
    spacing: tuple[float, float, float],
    centre: tuple[float, float, float],
    flips: tuple[bool, bool, bool],
):
    origin, signs = [], []
    for n, s, c, f in zip(n_xyz, spacing, centre, flips, strict=True):
        o, sg = _axis_grid(n, s, c, f)
        origin.append(o)
        signs.append(sg)
    direction = (signs[0], 0.0, 0.0, 0.0, signs[1], 0.0, 0.0, 0.0, signs[2])
    xs = _coords(origin[0], signs[0], spacing[0], n_xyz[0])
    ys = _coords(origin[1], signs[1], spacing[1], n_xyz[1])
    zs = _coords(origin[2], signs[2], spacing[2], n_xyz[2])
    # Broadcastable [z, y, x] coordinate arrays.
    return tuple(origin), direction, (xs[None, None, :], ys[None, :, None], zs[:, None, None])


def _ellipsoid(X, Y, Z, c, r) -> np.ndarray:
    return ((X - c[0]) / r[0]) ** 2 + ((Y - c[1]) / r[1]) ** 2 + ((Z - c[2]) / r[2]) ** 2 <= 1.0


# --------------------------------------------------------------------------------------------------------------
# Anatomy


@dataclass
class _Anatomy:
    scale: float
    neck_shift_y: float
    head_top: float
    suv: dict[int, float]
    tongue_hot: bool


def _draw_anatomy(rng: np.random.Generator) -> _Anatomy:
    suv = {
        AIR: 0.0,
        FAT: rng.uniform(0.25, 0.4),
        SOFT: rng.uniform(0.8, 1.2),
        CORTICAL: 0.4,
        TRABECULAR: rng.uniform(0.6, 0.9),
        BRAIN: rng.uniform(7.0, 11.0),
        CANAL: 0.4,
        PAROTID: rng.uniform(1.8, 3.2),
        SUBMANDIBULAR: rng.uniform(2.0, 3.8),
        TONSIL: rng.uniform(3.0, 6.5),
        TONGUE: rng.uniform(1.5, 3.0),
        MUSCLE: rng.uniform(1.0, 2.6),
    }
    return _Anatomy(
        scale=rng.uniform(0.92, 1.08),
        neck_shift_y=rng.uniform(-4, 4),
        head_top=rng.uniform(90, 110),
        suv=suv,
        tongue_hot=bool(rng.random() < 0.25),
    )


def _body_axes(z: np.ndarray, s: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Body cross-section semi-axes (x, y) and centre y as functions of z (mm)."""
    zk = [-200, -100, -65, -40, 0, 35, 70, 110]
    ax = np.interp(z, zk, [190, 175, 75, 60, 68, 74, 76, 40]) * s
    ay = np.interp(z, zk, [100, 95, 68, 60, 80, 92, 95, 50]) * s
    cy = np.interp(z, zk, [10, 10, 12, 10, -2, -2, 0, 0])
    return ax, ay, cy


def _tissue_map(X, Y, Z, a: _Anatomy) -> np.ndarray:
    """Tissue class at every voxel of a broadcast grid."""
    s = a.scale
    shape = np.broadcast_shapes(X.shape, Y.shape, Z.shape)
    ax, ay, cy = _body_axes(Z, s)
    cy = cy + a.neck_shift_y
    rho = np.sqrt((X / ax) ** 2 + ((Y - cy) / ay) ** 2)
    inside_body = (rho <= 1.0) & (Z < a.head_top * s)
    tissue = np.full(shape, AIR, dtype=np.uint8)
    tissue[inside_body] = FAT
    # Subcutaneous fat ~8 mm: muscle/soft tissue inside.
    inner = rho <= 1.0 - 8.0 / np.minimum(ax, ay)
    tissue[inside_body & inner] = SOFT

    # Neck muscles (sternocleidomastoid and paraspinal bands): hot on PET at times.
    scm = _ellipsoid(X, Y, Z, (38 * s, 0, -35), (9 * s, 9 * s, 45)) | _ellipsoid(
        X, Y, Z, (-38 * s, 0, -35), (9 * s, 9 * s, 45)
    )
    para = _ellipsoid(X, Y, Z, (18 * s, 45 * s, -30), (12 * s, 10 * s, 60)) | _ellipsoid(
        X, Y, Z, (-18 * s, 45 * s, -30), (12 * s, 10 * s, 60)
    )
    tissue[(scm | para) & inside_body & inner] = MUSCLE

    # Tongue, tonsils, salivary glands.
    tissue[_ellipsoid(X, Y, Z, (0, -35 * s, 8), (22 * s, 24 * s, 14)) & inside_body] = TONGUE
    for sx in (-1, 1):
        tissue[_ellipsoid(X, Y, Z, (sx * 14 * s, -8 * s, 4), (6 * s, 8 * s, 10))] = TONSIL
        tissue[_ellipsoid(X, Y, Z, (sx * 46 * s, 12 * s, 18), (11 * s, 16 * s, 20)) & inside_body] = PAROTID
        tissue[_ellipsoid(X, Y, Z, (sx * 30 * s, -24 * s, -22), (9 * s, 9 * s, 8)) & inside_body] = SUBMANDIBULAR

    # Skull and brain.
    skull_c, skull_r = (0.0, 4.0 * s, 62.0 * s), np.array([70, 88, 78]) * s
    q = np.sqrt(
        ((X - skull_c[0]) / skull_r[0]) ** 2
        + ((Y - skull_c[1]) / skull_r[1]) ** 2
        + ((Z - skull_c[2]) / skull_r[2]) ** 2
    )
    upper = Z > 36 * s
    tissue[(q <= 1.0) & (q > 1.0 - 7.0 / skull_r.min()) & upper] = CORTICAL
    tissue[(q <= 1.0 - 7.0 / skull_r.min()) & (Z > 42 * s)] = BRAIN
    base = (Z > 32 * s) & (Z <= 42 * s) & (np.sqrt((X / (50 * s)) ** 2 + ((Y - 12 * s) / (55 * s)) ** 2) <= 1.0)
    tissue[base] = TRABECULAR
    tissue[base & ((Z <= 34 * s) | (Z > 40 * s))] = CORTICAL

    # Cervical spine: vertebral bodies with discs, posterior arch, spinal canal.
    spine_mask = Z < 36 * s
    body_r = np.sqrt(X**2 + (Y - 20 * s) ** 2)
    vertebra = (body_r <= 10 * s) & spine_mask
    disc = np.mod(Z + 200.0, 18.0) < 3.5
    tissue[vertebra] = TRABECULAR
    tissue[vertebra & (body_r > 8 * s)] = CORTICAL
    tissue[vertebra & disc] = SOFT
    canal_r = np.sqrt(X**2 + (Y - 36 * s) ** 2)
    arch = (canal_r <= 11 * s) & (canal_r > 7 * s) & spine_mask & ~disc
    tissue[arch] = CORTICAL
    tissue[(canal_r <= 7 * s) & spine_mask] = CANAL

    # Mandible: an arch open posteriorly, with rami rising towards the skull base.
    m = np.sqrt((X / (46 * s)) ** 2 + ((Y - 2 * s) / (58 * s)) ** 2)
    mand_body = (m <= 1.0) & (m >= 1.0 - 8.0 / (50 * s)) & (Y < 8 * s) & (Z > -20) & (Z < -4)
    ramus = (np.abs(np.abs(X) - 42 * s) < 4 * s) & (Y >= -2 * s) & (Y < 16 * s) & (Z >= -20) & (Z < 30 * s)
    tissue[mand_body | ramus] = CORTICAL

    # Airway: trachea, larynx, pharynx, oral/nasal cavity.
    zk = [-200, -50, -30, -5, 15, 30, 40]
    r_x = np.interp(Z, zk, [8, 8, 10, 14, 14, 16, 0]) * s
    r_y = np.interp(Z, zk, [7, 7, 8, 7, 9, 14, 0]) * s
    c_y = np.interp(Z, zk, [-22, -22, -18, -2, -4, -30, -30]) * s
    airway = ((X / np.maximum(r_x, 1e-3)) ** 2 + ((Y - c_y) / np.maximum(r_y, 1e-3)) ** 2 <= 1.0) & (Z < 36 * s)
    tissue[airway & inside_body] = AIR
    return tissue


# --------------------------------------------------------------------------------------------------------------
# Lesions

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


# --------------------------------------------------------------------------------------------------------------
# Rasterisation


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


def _gaussian_blur(volume: np.ndarray, sigma_vox: float) -> np.ndarray:
    """Separable Gaussian blur (numpy only), zero outside the volume."""
    radius = max(1, int(np.ceil(3.0 * sigma_vox)))
    x = np.arange(-radius, radius + 1, dtype=np.float64)
    kernel = np.exp(-0.5 * (x / sigma_vox) ** 2)
    kernel /= kernel.sum()
    out = volume.astype(np.float32)
    for axis in range(3):
        padded = np.moveaxis(out, axis, -1)
        n = padded.shape[-1]
        acc = np.zeros_like(padded)
        for k, w in zip(range(-radius, radius + 1), kernel, strict=True):
            lo, hi = max(0, -k), min(n, n - k)
            if lo < hi:
                acc[..., lo:hi] += np.float32(w) * padded[..., lo + k : hi + k]
        out = np.moveaxis(acc, -1, axis)
    return np.ascontiguousarray(out)


def make_phantom(seed: int, options: PhantomOptions | None = None) -> Phantom:
    """Generate one synthetic H&N PET/CT case, deterministic per seed.

    Args:
        seed: the case seed (see ``SPLITS``).
        options: grid and noise settings; ``None`` uses the defaults.

    Returns:
        A ``Phantom`` with CT (HU, int16), PET (SUVbw, float32), the ground-truth mask on the CT grid (uint8,
        1 = tumour) and the lesion list.
    """
    if seed < 0:
        raise ValueError(f"seed must be >= 0, got {seed}")
    opt = options or PhantomOptions()
    rng = np.random.default_rng(seed)
    anatomy = _draw_anatomy(rng)
    designs = _place_lesions(rng, anatomy)

    # CT grid: scanner-like, centred on the neck, random table offset, sometimes stored flipped.
    sxy = opt.ct_spacing_xy or float(rng.choice([0.9115, 0.9766, 1.0156]))
    nz = opt.ct_slices or int(rng.integers(56, 73))
    ct_centre = (rng.uniform(-8, 8), rng.uniform(-5, 15), rng.uniform(-20, 0))
    flips = tuple(bool(rng.random() < opt.flip_probability) for _ in range(3))
    ct_origin, ct_dir, (X, Y, Z) = _make_grid(
        (opt.ct_size_xy, opt.ct_size_xy, nz), (sxy, sxy, opt.ct_slice_mm), ct_centre, flips
    )
    tissue = _tissue_map(X, Y, Z, anatomy)
    labels, _, necrosis = _rasterise_lesions(X, Y, Z, designs, tissue, with_activity=False)

    hu = np.vectorize(_HU.get, otypes=[np.float32])(np.arange(12))[tissue]
    lesion_hu = np.zeros(len(designs) + 1, dtype=np.float32)
    lesion_hu[1:] = rng.uniform(58.0, 80.0, size=len(designs))
    hu = np.where(labels > 0, lesion_hu[labels], hu)
    hu = np.where(necrosis, _NECROSIS_HU, hu)
    hu += rng.normal(0.0, opt.ct_noise_hu, size=hu.shape).astype(np.float32)
    ct = np.clip(np.rint(hu), -1024, 3071).astype(np.int16)
    ct_vol = Volume(ct, (sxy, sxy, opt.ct_slice_mm), ct_origin, ct_dir)
    mask_vol = Volume((labels > 0).astype(np.uint8), ct_vol.spacing, ct_vol.origin, ct_vol.direction)

    # PET: activity on a 2 mm grid over the PET field of view, blurred, noisy, binned 2×2×2 to the 4 mm grid.
    pet_sp = opt.pet_spacing_mm or float(rng.uniform(3.9, 4.1))
    fwhm = opt.pet_fwhm_mm or float(rng.uniform(5.0, 7.0))
    ct_extent = np.array([opt.ct_size_xy * sxy, opt.ct_size_xy * sxy, nz * opt.ct_slice_mm])
    pet_n = [
        int(np.ceil(ct_extent[0] * rng.uniform(1.05, 1.25) / pet_sp)),
        int(np.ceil(ct_extent[1] * rng.uniform(1.05, 1.25) / pet_sp)),
        int(np.ceil(ct_extent[2] * rng.uniform(0.95, 1.1) / pet_sp)),
    ]
    pet_n = [n + (n % 2) for n in pet_n]
    pet_centre = (
        ct_centre[0] + rng.uniform(-6, 6),
        ct_centre[1] + rng.uniform(-6, 6),
        ct_centre[2] + rng.uniform(-10, 10),
    )
    pet_flips = tuple(bool(rng.random() < opt.flip_probability) for _ in range(3))
    fine_n = tuple(2 * n for n in pet_n)
    fine_sp = pet_sp / 2.0
    _, _, (FX, FY, FZ) = _make_grid(fine_n, (fine_sp,) * 3, pet_centre, pet_flips)
    fine_tissue = _tissue_map(FX, FY, FZ, anatomy)
    fine_labels, fine_act, _ = _rasterise_lesions(FX, FY, FZ, designs, fine_tissue, with_activity=True)
    suv_table = np.array([anatomy.suv[k] for k in range(12)], dtype=np.float32)
    if anatomy.tongue_hot:
        suv_table[TONGUE] *= 1.8
    activity = suv_table[fine_tissue]
    activity = np.where(fine_labels > 0, fine_act, activity)
    blurred = _gaussian_blur(activity, fwhm / 2.3548 / fine_sp)
    white = rng.normal(size=blurred.shape).astype(np.float32)
    corr = _gaussian_blur(white, 1.0)
    corr /= max(float(corr.std()), 1e-6)
    noisy = blurred + opt.pet_noise * np.sqrt(np.maximum(blurred, 0.0)) * corr
    nzp, nyp, nxp = pet_n[2], pet_n[1], pet_n[0]
    pet = noisy.reshape(nzp, 2, nyp, 2, nxp, 2).mean(axis=(1, 3, 5))
    pet = np.maximum(pet, 0.0).astype(np.float32)
    # The binned grid: voxel centres sit between pairs of fine voxels.
    pet_origin, pet_dir, _ = _make_grid(tuple(pet_n), (pet_sp,) * 3, pet_centre, pet_flips)
    pet_vol = Volume(pet, (pet_sp,) * 3, pet_origin, pet_dir)

    lesions = _lesion_table(designs, labels, ct_vol, pet_vol)
    return Phantom(seed=seed, ct=ct_vol, pet=pet_vol, mask=mask_vol, lesions=lesions)


def _lesion_table(designs, labels: np.ndarray, ct: Volume, pet: Volume) -> list[Lesion]:
    counts = np.bincount(labels.ravel(), minlength=len(designs) + 1)
    lesions = []
    for i, d in enumerate(designs, start=1):
        if counts[i] == 0:
            continue
        zyx = np.argwhere(labels == i)
        idx = pet.physical_to_index(ct.index_to_physical(zyx[:, ::-1].astype(np.float64)))
        ijk = np.rint(idx).astype(np.int64)
        ok = np.all((ijk >= 0) & (ijk < np.array(pet.size_xyz)), axis=1)
        suv_pet = float(pet.array[ijk[ok, 2], ijk[ok, 1], ijk[ok, 0]].max()) if ok.any() else 0.0
        lesions.append(
            Lesion(
                kind=d.kind,
                label=len(lesions) + 1,
                centre_mm=tuple(round(float(c), 2) for c in d.centre),
                volume_ml=round(float(counts[i]) * ct.voxel_volume_ml, 4),
                voxels=int(counts[i]),
                suv_max=round(d.suv_max, 3),
                suv_max_pet=round(suv_pet, 3),
                necrotic=d.necrotic,
            )
        )
    return lesions


def write_phantom(phantom: Phantom, out_dir: str | Path) -> dict[str, Path]:
    """Write ``ct.nii.gz``, ``pet.nii.gz``, ``mask.nii.gz`` and ``case.json`` into ``out_dir`` (atomically)."""
    from .atomic import write_json_atomic
    from .volume import write_volume

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {
        "ct": write_volume(phantom.ct, out / "ct.nii.gz"),
        "pet": write_volume(phantom.pet, out / "pet.nii.gz"),
        "mask": write_volume(phantom.mask, out / "mask.nii.gz"),
    }
    paths["case"] = write_json_atomic(out / "case.json", phantom.case_info())
    return paths


def phantom_info_json(phantom: Phantom) -> str:
    return json.dumps(phantom.case_info(), indent=2)
