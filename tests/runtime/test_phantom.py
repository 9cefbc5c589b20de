"""Synthetic PET/CT phantoms: geometry, ground truth, determinism, CLI (references: SimpleITK, numpy)."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
import SimpleITK as sitk

from diffseg.runtime.phantom import SPLITS, PhantomOptions, make_phantom, split_seeds, write_phantom
from diffseg.runtime.volume import read_volume

SEEDS = [1, 2, 3, 5, 7, 11]


@pytest.fixture(scope="module", params=SEEDS)
def phantom(request):
    return make_phantom(request.param)


def test_grids_look_like_scanners(phantom):
    ct, pet = phantom.ct, phantom.pet
    assert ct.array.dtype == np.int16 and pet.array.dtype == np.float32
    assert 0.9 <= ct.spacing[0] <= 1.05 and ct.spacing[0] == ct.spacing[1] and ct.spacing[2] == 3.0
    assert all(3.9 <= s <= 4.1 for s in pet.spacing)
    assert not np.allclose(ct.origin, pet.origin, atol=1.0), "PET and CT must have their own origins"
    hu = ct.array
    assert hu.min() <= -950 and hu.max() >= 1000, "air and cortical bone present"
    assert np.isfinite(pet.array).all() and pet.array.min() >= 0


def test_pet_and_ct_agree_in_physical_space(phantom):
    """Resampled by SimpleITK into the CT grid, the PET's hottest tumour voxels fall inside the CT's tumour mask."""
    pet_on_ct = sitk.GetArrayFromImage(
        sitk.Resample(phantom.pet.to_sitk(), phantom.ct.to_sitk(), sitk.Transform(), sitk.sitkLinear, 0.0)
    )
    mask = phantom.mask.array.astype(bool)
    if not mask.any():
        pytest.skip("phantom without lesions")
    # Tumour uptake (≥ 3 SUV designed, blurred) against the soft tissue ring just outside the tumour.
    inside = pet_on_ct[mask].mean()
    body = (phantom.ct.array > -500) & ~mask
    assert inside > 1.5 * np.median(pet_on_ct[body])
    # Brain uptake sits where the CT has brain density inside the skull (top of the scan, z up).
    assert pet_on_ct.max() > 5.0


def test_lesions_inside_body_and_volumes_match(phantom):
    mask = phantom.mask.array.astype(bool)
    ct = phantom.ct.array
    assert (ct[mask] > -500).mean() > 0.99, "tumour voxels lie in soft tissue, not air"
    total = mask.sum() * phantom.ct.voxel_volume_ml
    listed = sum(les.volume_ml for les in phantom.lesions)
    assert total == pytest.approx(listed, rel=1e-3, abs=1e-3)
    for les in phantom.lesions:
        assert 0.3 <= les.volume_ml <= 45.0
        assert 3.0 <= les.suv_max <= 20.0
        assert les.voxels == pytest.approx(les.volume_ml / phantom.ct.voxel_volume_ml, rel=1e-3)


def test_deterministic_per_seed():
    a, b, c = make_phantom(4), make_phantom(4), make_phantom(6)
    assert np.array_equal(a.ct.array, b.ct.array) and np.array_equal(a.pet.array, b.pet.array)
    assert np.array_equal(a.mask.array, b.mask.array) and a.lesions == b.lesions
    assert not np.array_equal(a.pet.array.shape, c.pet.array.shape) or not np.array_equal(a.pet.array, c.pet.array)


def test_some_cases_are_flipped_and_lesion_counts_vary():
    cases = [make_phantom(s, PhantomOptions(ct_size_xy=64, ct_slices=16)) for s in range(1, 21)]
    directions = {c.ct.direction for c in cases} | {c.pet.direction for c in cases}
    assert any(min(d[0], d[4], d[8]) < 0 for d in directions), "some grids must be stored flipped"
    counts = {len(c.lesions) for c in cases}
    assert len(counts) >= 3


def test_splits_are_disjoint():
    test, val, train = (set(SPLITS[k]) for k in ("test", "validation", "train"))
    assert not (test & val) and not (test & train) and not (val & train)
    assert split_seeds("test", 3) == [1, 2, 3]
    with pytest.raises(ValueError, match="split must be one of"):
        split_seeds("holdout")


def test_write_and_read_back(tmp_path):
    ph = make_phantom(1, PhantomOptions(ct_size_xy=64, ct_slices=16))
    paths = write_phantom(ph, tmp_path)
    ct = read_volume(paths["ct"])
    assert np.array_equal(ct.array, ph.ct.array) and np.allclose(ct.direction, ph.ct.direction)
    info = json.loads(paths["case"].read_text())
    assert info["split"] == "test" and len(info["lesions"]) == len(ph.lesions)


def test_cli_writes_case(tmp_path):
    out = tmp_path / "case1"
    proc = subprocess.run(
        [sys.executable, "-m", "diffseg", "phantom", "--seed", "1", "-o", str(out)],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    assert {p.name for p in out.iterdir()} >= {"ct.nii.gz", "pet.nii.gz", "mask.nii.gz", "case.json"}
    ct, pet = sitk.ReadImage(str(out / "ct.nii.gz")), sitk.ReadImage(str(out / "pet.nii.gz"))
    # The PET's field of view overlaps the CT's in physical space.
    ct_c = ct.TransformContinuousIndexToPhysicalPoint([(s - 1) / 2 for s in ct.GetSize()])
    idx = pet.TransformPhysicalPointToContinuousIndex(ct_c)
    assert all(0 <= i <= s - 1 for i, s in zip(idx, pet.GetSize(), strict=True))
