"""The analytic head-and-neck anatomy of the phantoms: tissue classes, their CT numbers, the tissue map.

Physical space is mm, LPS (+x left, +y posterior, +z superior). The map is evaluated on any broadcast grid, so
the CT grid and the PET grid rasterise the same anatomy.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

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


def _ellipsoid(X, Y, Z, c, r) -> np.ndarray:
    return ((X - c[0]) / r[0]) ** 2 + ((Y - c[1]) / r[1]) ** 2 + ((Z - c[2]) / r[2]) ** 2 <= 1.0


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
    # Each structure paints over the ones before it: the order of these calls is part of the anatomy.
    _paint_muscles_and_glands(tissue, X, Y, Z, s, inside_body, inner)
    _paint_skull_and_brain(tissue, X, Y, Z, s)
    _paint_cervical_spine(tissue, X, Y, Z, s)
    _paint_mandible(tissue, X, Y, Z, s)
    _paint_airway(tissue, X, Y, Z, s, inside_body)
    return tissue


def _paint_muscles_and_glands(tissue: np.ndarray, X, Y, Z, s: float, inside_body, inner) -> None:
    """Neck muscles, then tongue, tonsils and salivary glands: the soft tissues that take up FDG."""
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


def _paint_skull_and_brain(tissue: np.ndarray, X, Y, Z, s: float) -> None:
    """Skull vault (cortical shell), brain, and the skull base (trabecular between cortical plates)."""
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


def _paint_cervical_spine(tissue: np.ndarray, X, Y, Z, s: float) -> None:
    """Cervical spine: vertebral bodies with discs, posterior arch, spinal canal."""
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


def _paint_mandible(tissue: np.ndarray, X, Y, Z, s: float) -> None:
    """Mandible: an arch open posteriorly, with rami rising towards the skull base."""
    m = np.sqrt((X / (46 * s)) ** 2 + ((Y - 2 * s) / (58 * s)) ** 2)
    mand_body = (m <= 1.0) & (m >= 1.0 - 8.0 / (50 * s)) & (Y < 8 * s) & (Z > -20) & (Z < -4)
    ramus = (np.abs(np.abs(X) - 42 * s) < 4 * s) & (Y >= -2 * s) & (Y < 16 * s) & (Z >= -20) & (Z < 30 * s)
    tissue[mand_body | ramus] = CORTICAL


def _paint_airway(tissue: np.ndarray, X, Y, Z, s: float, inside_body) -> None:
    """Airway: trachea, larynx, pharynx, oral/nasal cavity."""
    zk = [-200, -50, -30, -5, 15, 30, 40]
    r_x = np.interp(Z, zk, [8, 8, 10, 14, 14, 16, 0]) * s
    r_y = np.interp(Z, zk, [7, 7, 8, 7, 9, 14, 0]) * s
    c_y = np.interp(Z, zk, [-22, -22, -18, -2, -4, -30, -30]) * s
    airway = ((X / np.maximum(r_x, 1e-3)) ** 2 + ((Y - c_y) / np.maximum(r_y, 1e-3)) ** 2 <= 1.0) & (Z < 36 * s)
    tissue[airway & inside_body] = AIR
