"""The CT must look like HU and the PET like SUVbw: ``diffseg.runtime.units.check_units`` and its hook in
``check_inputs`` (so every entry point: CLI, ``Segmenter.predict``, serve).

References: what must pass are the shipped sample case, the phantoms (seeds 0-200 at the smallest sizes the tests
use, and the default size), the synthetic DICOM read back and pydicom's real CT files; what must be refused are
the slips of issue #15 made by hand from a phantom (stored values without RescaleSlope/Intercept, Bq/ml, a label
image, CT and PET swapped), each figure compared with the one ``UNIT_RANGES`` gives.
"""

from __future__ import annotations

import math
import re
from pathlib import Path

import numpy as np
import pytest

from diffseg.runtime import units
from diffseg.runtime.dicom import read_pet_ct, write_phantom_dicom
from diffseg.runtime.dicom.synthetic import SyntheticDicomOptions
from diffseg.runtime.input_checks import InputChecks, check_inputs
from diffseg.runtime.phantom import PhantomOptions, make_phantom
from diffseg.runtime.units import UNIT_RANGES, check_units, unit_figures
from diffseg.runtime.volume import Volume, read_volume

SAMPLE = Path(__file__).resolve().parents[2] / "models" / "sample_case"
_FORCE = r"pass --force-units \(API: InputChecks\(force_units=True\)\)"


def _inside(code: str, figures: dict[str, float], margin: float = 1.0) -> None:
    """Every figure inside its range, by at least ``margin`` (a factor for SUV, HU for CT)."""
    for name, value in figures.items():
        plausible = UNIT_RANGES[f"{code}.{name}"]
        if plausible.unit == "SUV" and name != "low":
            assert plausible.low * margin <= value <= plausible.high / margin, (code, name, value)
        else:
            assert plausible.low + margin <= value <= plausible.high - margin, (code, name, value)


@pytest.fixture(scope="module")
def phantom():
    return make_phantom(2, PhantomOptions(ct_size_xy=128, ct_slices=24))


# ----------------------------------------------------------------------------------------------------
# What must pass


def test_sample_case_is_plausible():
    ct, pet = read_volume(SAMPLE / "ct.nii.gz"), read_volume(SAMPLE / "pet.nii.gz")
    assert check_units(ct, "CT", "ct.nii.gz", False) is None
    assert check_units(pet, "PT", "pet.nii.gz", False) is None
    # Measured (issue #15 report): air -1024, body 32 HU; PET max 12.4, body median 1.19.
    _inside("CT", unit_figures(ct.array, "CT"), margin=100.0)
    _inside("PT", unit_figures(pet.array, "PT"), margin=3.0)


@pytest.mark.parametrize(("size", "slices", "seeds"), [(32, 8, range(0, 201, 5)), (64, 16, range(0, 201, 25))])
def test_phantoms_are_plausible(size, slices, seeds):
    # The smallest phantoms (32×32×8 CT, a 3 cm field of view) have the least air and the coldest PET: figures
    # over all seeds 0-200 (measured once, a sample of them here) were air -1024…-1008 HU, body 35…52 HU, PET max
    # 1.06…14.7, body median 0.57…1.5; at 64×64×16: -1020…-1016, 36…41, 2.2…16.9, 0.76…1.14.
    for seed in seeds:
        ph = make_phantom(seed, PhantomOptions(ct_size_xy=size, ct_slices=slices))
        assert check_units(ph.ct, "CT", f"seed {seed} CT", False) is None
        assert check_units(ph.pet, "PT", f"seed {seed} PET", False) is None
        _inside("CT", unit_figures(ph.ct.array, "CT"), margin=100.0)
        _inside("PT", unit_figures(ph.pet.array, "PT"), margin=2.0)


def test_default_size_phantom_and_its_dicom_are_plausible(tmp_path):
    ph = make_phantom(1000, PhantomOptions(ct_slices=8))
    assert check_units(ph.ct, "CT", "CT", False) is None and check_units(ph.pet, "PT", "PT", False) is None
    small = make_phantom(4, PhantomOptions(ct_size_xy=48, ct_slices=12))
    study = read_pet_ct(write_phantom_dicom(small, tmp_path)["ct_dir"].parent)
    volumes, overrides = check_inputs({"CT": study.ct, "PT": study.pet}, {}, InputChecks())
    assert overrides == () and set(volumes) == {"CT", "PT"}


@pytest.mark.parametrize(
    ("name", "raw_caught"),
    [
        ("CT_small.dcm", True),  # a real 128×128 crop, partial-volume air only: 1st percentile -850 HU
        ("693_J2KI.dcm", False),  # lossy JPEG 2000 with -3024 padding smeared towards air: 1st percentile -1134
        ("693_UNCR.dcm", True),  # pydicom-data, when installed: the same slice lossless
        ("693_J2KR.dcm", True),
    ],
)
def test_real_ct_files_of_pydicom_are_plausible(name, raw_caught):
    pydicom = pytest.importorskip("pydicom")
    from pydicom.data import get_testdata_file
    from pydicom.pixels import apply_rescale

    try:
        path = get_testdata_file(name)
    except Exception:  # pydicom-data's files come from an optional package
        path = None
    if path is None:
        pytest.skip(f"{name} comes with pydicom-data, which is not installed")
    ds = pydicom.dcmread(path)
    try:
        stored = ds.pixel_array
    except Exception as exc:  # no codec for a compressed one
        pytest.skip(f"{name}: {exc}")
    hu = apply_rescale(stored, ds).astype(np.float32)[None]
    volume = Volume(hu, (1.0, 1.0, 1.0), (0.0, 0.0, 0.0), (1, 0, 0, 0, 1, 0, 0, 0, 1))
    assert check_units(volume, "CT", name, False) is None
    # The same slice as stored (RescaleIntercept -1024 not applied) is refused, except the lossy one: its smeared
    # padding (stored -2000…0) reads as air (1st percentile -440), a limit of the check (see units.CT_AIR_PERCENTILE).
    raw = volume.with_array(stored.astype(np.float32)[None])
    if raw_caught:
        with pytest.raises(ValueError, match="looks like raw stored values"):
            check_units(raw, "CT", name, False)
    else:
        assert check_units(raw, "CT", name, False) is None


def test_ct_padding_outside_the_reconstruction_circle_is_not_air(phantom):
    # GE/Canon pad with -3024 HU, Siemens with -2048: a fifth of the slice outside the circle.
    yy, xx = np.mgrid[:128, :128]
    outside = (yy - 63.5) ** 2 + (xx - 63.5) ** 2 > 64**2
    for value in (-3024, -2048, -1024):
        padded = phantom.ct.array.copy()
        padded[:, outside] = value
        assert check_units(phantom.ct.with_array(padded), "CT", "padded", False) is None


def test_other_modalities_are_not_checked(phantom):
    raw = phantom.ct.with_array((phantom.ct.array.astype(np.int32) + 1024).astype(np.uint16))
    assert check_units(raw, "MR", "t1.nii.gz", False) is None
    assert unit_figures(raw.array, "MR") == {}


# ----------------------------------------------------------------------------------------------------
# What must be refused


def _slips(phantom):
    ct, pet, mask = phantom.ct, phantom.pet, phantom.mask
    hu = ct.array.astype(np.int32)
    bqml = SyntheticDicomOptions().bqml_per_suv  # 3.4 kBq/ml per SUV: 370 MBq, 75 kg, 60 min F-18
    yy, xx = np.mgrid[:128, :128]
    outside = (yy - 63.5) ** 2 + (xx - 63.5) ** 2 > 64**2
    raw_padded = hu + 1024
    raw_padded[:, outside] = -2000  # GE: PixelPaddingValue -2000 stored
    return {
        # name: (modality, volume, figures that must be named, the cause)
        "ct_raw": (
            "CT",
            ct.with_array((hu + 1024).astype(np.uint16)),
            ["1st percentile of the voxels above -1500 HU", "body"],
            "raw stored",
        ),
        "ct_raw_intercept_1000": ("CT", ct.with_array((hu + 1000).clip(0).astype(np.uint16)), ["body"], "raw stored"),
        "ct_raw_padded": (
            "CT",
            ct.with_array(raw_padded.astype(np.int16)),
            ["1st percentile of the voxels above -1500 HU"],
            "raw stored",
        ),
        "ct_is_a_mask": ("CT", mask, ["2 distinct values (0, 1)"], "label image"),
        "ct_is_the_pet": ("CT", pet, ["1st percentile of the voxels above -1500 HU"], "not a CT"),
        "ct_empty": ("CT", ct.with_array(np.full(ct.shape, -1024, np.int16)), ["every voxel is -1024"], "empty"),
        "pet_bqml": ("PT", pet.with_array(pet.array * bqml), ["maximum", "body"], "looks like Bq/ml"),
        # The lowest Bq/ml per SUV (Zr-89 a week after 37 MBq): the maximum passes, the body median does not.
        "pet_bqml_low_dose": ("PT", pet.with_array(pet.array * 120.0), ["median of the body"], "looks like Bq/ml"),
        "pet_mbqml": ("PT", pet.with_array(pet.array * bqml / 1e6), ["maximum", "body"], "MBq/ml"),
        "pet_suv_x1000": ("PT", pet.with_array(pet.array * 1000.0), ["maximum"], "SUV × 1000"),
        "pet_zeros": ("PT", pet.with_array(np.zeros(pet.shape, np.float32)), ["every voxel is 0"], "empty image"),
        "pet_is_a_mask": ("PT", mask, ["2 distinct values"], "label image"),
        "pet_is_the_ct": ("PT", ct, ["1st percentile is -10"], "CT and PET swapped"),
        "pet_labels_float": ("PT", mask.with_array(mask.array.astype(np.float32) * 3.0), ["distinct"], "label"),
    }


SLIPS = [
    "ct_raw",
    "ct_raw_intercept_1000",
    "ct_raw_padded",
    "ct_is_a_mask",
    "ct_is_the_pet",
    "ct_empty",
    "pet_bqml",
    "pet_bqml_low_dose",
    "pet_mbqml",
    "pet_suv_x1000",
    "pet_zeros",
    "pet_is_a_mask",
    "pet_is_the_ct",
    "pet_labels_float",
]


@pytest.mark.parametrize("slip", SLIPS)
def test_slips_are_refused_with_figures_cause_and_override(phantom, slip, caplog):
    code, volume, named, cause = _slips(phantom)[slip]
    with pytest.raises(ValueError) as refused:
        check_units(volume, code, "case7/input.nii.gz", False)
    message = str(refused.value)
    what = "a CT in HU" if code == "CT" else "a PET in SUVbw"
    assert message.startswith(f"case7/input.nii.gz: does not look like {what}: "), message
    for figure in named:
        assert figure in message, (figure, message)
    assert cause in message, message
    assert re.search(_FORCE, message), message
    # Forced: used as it is, the override said in words and logged as a warning.
    with caplog.at_level("WARNING", logger="diffseg"):
        override = check_units(volume, code, "case7/input.nii.gz", True)
    assert override is not None and override.startswith(f"case7/input.nii.gz: does not look like {what}")
    assert override.endswith("used as it is (force_units)")
    assert any(r.levelname == "WARNING" and "force_units" in r.getMessage() for r in caplog.records)


def test_raw_ct_message_names_rescale_and_bqml_message_names_the_formula(phantom):
    slips = _slips(phantom)
    with pytest.raises(ValueError, match=r"apply RescaleSlope/RescaleIntercept \(HU = stored × slope \+ intercept\)"):
        check_units(slips["ct_raw"][1], "CT", "ct.nii.gz", False)
    with pytest.raises(ValueError, match=r"SUVbw = value × weight\[g\] / decay-corrected dose\[Bq\]"):
        check_units(slips["pet_bqml"][1], "PT", "pet.nii.gz", False)


@pytest.mark.parametrize("key", sorted(UNIT_RANGES))
def test_each_bound_of_the_table_is_the_one_used(monkeypatch, phantom, key):
    code, name = key.split(".")
    plausible = UNIT_RANGES[key]
    volume = phantom.ct if code == "CT" else phantom.pet
    real = unit_figures(volume.array, code)

    def figures_with(value):
        return lambda array, modality: {**real, name: value}

    for bound in (plausible.low, plausible.high):
        if math.isinf(bound):
            continue
        monkeypatch.setattr(units, "unit_figures", figures_with(bound))
        assert check_units(volume, code, "x", False) is None  # bounds are inclusive
        step = max(abs(bound) * 1e-3, 1e-6)
        outside = bound - step if bound == plausible.low else bound + step
        monkeypatch.setattr(units, "unit_figures", figures_with(outside))
        with pytest.raises(ValueError, match=rf"the {re.escape(plausible.what)} is "):
            check_units(volume, code, "x", False)


def test_check_inputs_collects_the_override_with_the_others(phantom):
    raw = phantom.ct.with_array((phantom.ct.array.astype(np.int32) + 1024).astype(np.uint16))
    sources = {"CT": "ct.nii.gz", "PT": "pet.nii.gz"}
    with pytest.raises(ValueError, match=r"^ct\.nii\.gz: does not look like a CT in HU"):
        check_inputs({"CT": raw, "PT": phantom.pet}, sources, InputChecks())
    volumes, overrides = check_inputs({"CT": raw, "PT": phantom.pet}, sources, InputChecks(force_units=True))
    assert volumes["CT"] is raw and len(overrides) == 1 and overrides[0].startswith("ct.nii.gz: does not look like")


def test_segmenter_predict_refuses_a_raw_ct_and_records_the_forced_one():
    from diffseg.runtime import Segmenter

    ph = make_phantom(3, PhantomOptions(ct_size_xy=64, ct_slices=16))
    raw = ph.ct.with_array((ph.ct.array.astype(np.int32) + 1024).astype(np.uint16))
    seg = Segmenter("default", backend="onnxruntime", steps=1, samples=1)
    with pytest.raises(ValueError, match=r"^ct: does not look like a CT in HU.*raw stored values"):
        seg.predict(raw, ph.pet)
    result = seg.predict(raw, ph.pet, checks=InputChecks(force_units=True))
    assert len(result.overrides) == 1 and "does not look like a CT in HU" in result.overrides[0]
