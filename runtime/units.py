"""Does the CT look like HU and the PET like SUVbw? The check of what the model will see, before it sees it.

A model trained on CT in HU and PET in SUVbw gives a wrong result, with no error, from a CT in raw stored values
(RescaleSlope/Intercept not applied: 7 lesions instead of 3 on a phantom), a PET in Bq/ml (no lesion at all) or a
label image given as either. Each of these leaves figures that no real scan has; ``check_units`` measures them,
compares them with ``UNIT_RANGES`` and refuses the image with the figures, the ranges and the likely cause, unless
``force_units`` is given (the image is then used as it is, a warning is logged and the override is recorded).

The figures (on a strided sample of at most ``SAMPLE_VOXELS`` voxels, so that a 512×512×600 CT costs ~0.1 s):

- CT ``air``: the ``CT_AIR_PERCENTILE``th percentile of the voxels at or above ``CT_PADDING_BELOW`` (outside the
  reconstruction circle scanners write −1024, −2048 or −3024; the last two are padding, not tissue, and are left
  out);
- CT ``body``: the median of the body voxels, those above −500 HU;
- PT ``low``: the 1st percentile; PT ``max``: the largest value; PT ``body``: the median of the voxels above
  ``PET_BODY_FRACTION`` of the 99.9th percentile (the patient, whatever the field of view holds outside it);
- any image: its distinct values, ``label`` (a mask or label map has a handful: 0/1, or 0…N integers).

Only the modality codes ``CT`` and ``PT`` are checked; other inputs (``MR``...) have no absolute scale to check and
pass as they are. A PET in kBq/ml (values 0.1…100) cannot be told from SUVbw by its values and is not caught.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass

import numpy as np

from .volume import Volume

__all__ = [
    "CT_AIR_PERCENTILE",
    "CT_PADDING_BELOW",
    "LABEL_MAX_INTEGER_VALUES",
    "UNIT_RANGES",
    "UnitRange",
    "check_units",
    "unit_figures",
]

logger = logging.getLogger("diffseg")

#: At most this many voxels (a fixed stride through the array) go into the percentiles and medians.
SAMPLE_VOXELS = 1 << 21
#: HU below which a CT voxel is padding outside the reconstruction circle (−2048 Siemens, −3024 GE/Canon, stored
#: −2000 with intercept −1024) rather than air (−1000; scanners clip at −1024, Philips pads with −1024 = air).
CT_PADDING_BELOW = -1500.0
#: The CT's air (or fat) level is this percentile of its voxels. The smallest phantoms (32×32×8, a 3 cm field of
#: view) hold 2…3 % air at least (their 2nd percentile is -983 HU at most over seeds 0-200, the 3rd up to +8), so
#: 1 % leaves 2x; a real PET/CT field of view holds far more. A higher one would also see through the ~7 % of voxels
#: that lossy compression smears from the padding towards air (pydicom-data's 693_UNCI.dcm stored values: 1st
#: percentile -440, 5th -34), but would refuse such phantoms: a raw CT that was lossy-compressed with padding is
#: not caught (its body median, 133 as stored, is not either).
CT_AIR_PERCENTILE = 1.0
#: The PET body: voxels above this fraction of the 99.9th percentile (the percentile, not the maximum, so that
#: one hot voxel does not move it). Background outside the patient is ~0; the dimmest tissue is ~5-10 % of the
#: brain, bladder or a lesion, which set the percentile.
PET_BODY_FRACTION = 0.05
#: An integer image with at most this many distinct values is a label image (a real CT of even 32×32×8 voxels has
#: ~180 distinct HU, a PET thousands of values); any image with at most 3 distinct values is one too (or empty).
LABEL_MAX_INTEGER_VALUES = 32
LABEL_MAX_VALUES = 3


@dataclass(frozen=True)
class UnitRange:
    """The values one figure of a real CT (HU) or PET (SUVbw) image can have.

    Attributes:
        low: smallest plausible value (inclusive).
        high: largest plausible value (inclusive; ``math.inf`` for none).
        unit: unit of ``low`` and ``high``.
        what: the figure, for messages.
        cause_low: the likely mistake when the figure is below ``low`` (a phrase that starts with a verb).
        cause_high: the likely mistake when it is above ``high``.
        cause_none: the likely mistake when the image has no voxel to measure the figure on.
    """

    low: float
    high: float
    unit: str
    what: str
    cause_low: str
    cause_high: str
    cause_none: str


def _nth(p: float) -> str:
    return {1.0: "1st", 2.0: "2nd", 3.0: "3rd"}.get(p, f"{p:g}th")


_RAW_CT = (
    "looks like raw stored values: apply RescaleSlope/RescaleIntercept (HU = stored × slope + intercept), or it is "
    "not a CT (a PET or a label image given as the CT?)"
)
_BQML = (
    "looks like Bq/ml: convert to SUVbw = value × weight[g] / decay-corrected dose[Bq] (or read the DICOM series, "
    "which converts it), or like a scaled SUV (SUV × 1000?)"
)
_NOT_SUV_LOW = "looks like MBq/ml or an image scaled to a small range (divided by its maximum?), not SUVbw"

#: The checks of ``check_units``, in one place, keyed ``MODALITY.figure``. Each range is wide enough for every
#: real scan and narrow enough that the slip it is there for lands outside it.
UNIT_RANGES: dict[str, UnitRange] = {
    # Air is −1000 HU, clipped at −1024 by most scanners (Philips: −1000); a PET/CT CT always holds some, since the
    # reconstruction circle is wider than the patient and the airways are in every H&N field of view (phantoms of
    # 32×32 voxels: −1024…−1001). A crop inside the body without air holds fat (−150…−50 HU), and small real
    # crops hold partial-volume air (pydicom's CT_small.dcm: −850, a 16×16 calcium-score thumbnail: −857): −50
    # lets them pass. Raw stored values have no value below −24 (stored = HU − intercept, intercept −1024 or
    # −1000, HU >= −1024; CT_small.dcm raw: +174, 693_UNCR.dcm raw: +18, the thumbnail raw: +167) and lie above
    # −50; a PET or a mask given as the CT (>= 0) too. No lower bound beyond leaving out the padding: lossy
    # compression smears the −3024 padding into −3024…−1024 (693_J2KI.dcm: −1134), and real air is never too low.
    "CT.air": UnitRange(
        -math.inf,
        -50.0,
        "HU",
        f"{_nth(CT_AIR_PERCENTILE)} percentile of the voxels above {CT_PADDING_BELOW:g} HU (air, or fat in a crop "
        "without air)",
        _RAW_CT,
        _RAW_CT,
        "is only padding (every voxel below -1500 HU)",
    ),
    # Soft tissue is 20…80 HU, fat −150…−50, brain 30, bone 300…1900: the body median (voxels above −500 HU) of
    # a real scan lies between a fat-rich −100 and a bone-rich 100 (pydicom's CTs: 26…37, its calcium-score
    # thumbnail −26; phantoms: 32…52). Raw stored values without air put soft tissue at ~1060 (above); a rescale
    # applied twice leaves only bone above −500, at ~−300 (below).
    "CT.body": UnitRange(
        -200.0,
        200.0,
        "HU",
        "median of the body voxels (above -500 HU)",
        _RAW_CT,
        _RAW_CT,
        "holds no body (no voxel above -500 HU): an empty scan, or a rescale applied twice",
    ),
    # OSEM PET is >= 0; FBP and some regularised reconstructions dip to about −1 SUV in noise. A CT given as the
    # PET (air at −1000) lies far below −5. No upper bound: a crop inside the body has no background.
    "PT.low": UnitRange(
        -5.0,
        math.inf,
        "SUV",
        "1st percentile",
        "looks like a CT (values down to -1000 HU: CT and PET swapped?)",
        "",
        "",
    ),
    # SUVmax of a real field of view: blood pool ~2, brain 8-15, bladder, kidneys and the hottest lesions (PSMA,
    # DOTATATE) up to ~200-300; 0.5 is below any (phantoms of 32×32 voxels without lesion or brain: 1.1), 1000
    # leaves 3x above the hottest. In Bq/ml one SUV is 120…5000 Bq/ml (Zr-89 at 7 days … 370 MBq FDG at 1 h),
    # so a maximum above SUV 8 (any brain, bladder or lesion) lies above 1000; in MBq/ml everything is < 0.01.
    "PT.max": UnitRange(0.5, 1000.0, "SUV", "maximum", _NOT_SUV_LOW, _BQML, ""),
    # The median SUV of the patient (voxels above 5 % of the 99.9th percentile) is near 1 by the definition of
    # SUV (activity spread evenly through the body): 0.3…3 on real scans (phantoms: 0.7…1.4), up to ~20 on a crop
    # filled by a hot tumour. In Bq/ml the same median is >= ~80 even at the lowest doses and latest times (120
    # Bq/ml per SUV), thousands at usual ones; MBq/ml gives ~0.001. 0.05 and 30 leave >= 3x on each side.
    "PT.body": UnitRange(
        0.05,
        30.0,
        "SUV",
        f"median of the body voxels (above {PET_BODY_FRACTION:g} × the 99.9th percentile)",
        _NOT_SUV_LOW,
        _BQML,
        "holds no activity (no voxel above 0)",
    ),
}

_FORCE = "pass --force-units (API: InputChecks(force_units=True)) to use it as it is; the override is recorded"
_WHAT = {"CT": "a CT in HU", "PT": "a PET in SUVbw"}


def _sample(array: np.ndarray) -> np.ndarray:
    """At most ``SAMPLE_VOXELS`` voxels at a fixed stride, as float64."""
    flat = array.reshape(-1)
    step = max(1, -(-flat.size // SAMPLE_VOXELS))
    return np.asarray(flat[::step], dtype=np.float64)


def _distinct(values: np.ndarray) -> np.ndarray:
    """The distinct values of an array; by counting for small non-negative integers (a mask: O(n), no sort)."""
    if values.dtype.kind in "bu" and values.size and int(values.max()) < 1 << 16:
        return np.flatnonzero(np.bincount(values.reshape(-1).astype(np.intp, copy=False)))
    return np.unique(values)


def _few_values(values: np.ndarray) -> bool:
    integer = bool(np.all(values == np.round(values)))
    return values.size <= (LABEL_MAX_INTEGER_VALUES if integer else LABEL_MAX_VALUES)


def _label_like(array: np.ndarray, sample: np.ndarray) -> str | None:
    """The distinct values of an image that has as few as a label image, in words; None for any other."""
    if not _few_values(np.unique(sample[:: max(1, sample.size // 100_000)])):
        return None
    values = _distinct(array)  # the whole image: the sample may have missed a rare label
    if not _few_values(values):
        return None
    if values.size == 1:
        return f"every voxel is {float(values[0]):g}: an empty image"
    shown = ", ".join(f"{float(v):g}" for v in values[:8]) + (", ..." if values.size > 8 else "")
    return f"it holds only {values.size} distinct values ({shown})"


def unit_figures(array: np.ndarray, modality_code: str) -> dict[str, float]:
    """The figures ``check_units`` compares with ``UNIT_RANGES``, by figure name (``air``, ``body``...).

    Args:
        array: the image (finite values).
        modality_code: ``CT`` or ``PT``; any other gives ``{}``.

    Returns:
        The figures; NaN where the image has no voxel to measure one on (no voxel above −1500 or −500 HU, no PET
        voxel above 0).
    """
    sample = _sample(array)
    if modality_code == "CT":
        tissue = sample[sample >= CT_PADDING_BELOW]
        body = sample[sample > -500.0]
        return {
            "air": float(np.percentile(tissue, CT_AIR_PERCENTILE)) if tissue.size else math.nan,
            "body": float(np.median(body)) if body.size else math.nan,
        }
    if modality_code == "PT":
        peak = float(np.percentile(sample, 99.9))
        body = sample[sample > PET_BODY_FRACTION * peak] if peak > 0 else sample[:0]
        return {
            "low": float(np.percentile(sample, 1.0)),
            "max": float(array.max()),
            "body": float(np.median(body)) if body.size else math.nan,
        }
    return {}


def _expected(plausible: UnitRange) -> str:
    if math.isinf(plausible.high):
        return f"expected {plausible.low:g} {plausible.unit} or more"
    if math.isinf(plausible.low):
        return f"expected {plausible.high:g} {plausible.unit} or less"
    return f"expected {plausible.low:g} … {plausible.high:g} {plausible.unit}"


def _outside(code: str, figures: dict[str, float]) -> tuple[list[str], list[str]]:
    """Each figure outside its range said in words, and the likely causes (each once)."""
    said, causes = [], []
    for name, value in figures.items():
        plausible = UNIT_RANGES[f"{code}.{name}"]
        if math.isnan(value):
            said.append(f"the image {plausible.cause_none}")
            continue
        if plausible.low <= value <= plausible.high:
            continue
        said.append(f"the {plausible.what} is {value:.4g} ({_expected(plausible)})")
        cause = plausible.cause_low if value < plausible.low else plausible.cause_high
        if cause not in causes:
            causes.append(cause)
    return said, causes


def check_units(volume: Volume, modality_code: str, source: str, force_units: bool) -> str | None:
    """Refuse a CT that does not look like HU or a PET that does not look like SUVbw (see ``UNIT_RANGES``).

    Only ``CT`` and ``PT`` are checked: another modality code (``MR``...) has no absolute scale and passes.

    Args:
        volume: the image, with finite voxels (NaN/Inf are dealt with before).
        modality_code: ``CT``, ``PT``, or another code (not checked).
        source: what to call the image in messages (its file or series).
        force_units: use an implausible image as it is (logged as a warning) instead of refusing it.

    Returns:
        None when the image is plausible (or not checked); with ``force_units``, the override said in words.

    Raises:
        ValueError: the image looks like a label image, or a figure lies outside its range, and ``force_units``
            is False; the message names ``source``, the figures, the ranges, the likely cause and the override.
    """
    if modality_code not in _WHAT:
        return None
    array = volume.array
    labels = _label_like(array, _sample(array))
    if labels is not None:
        said = [labels]
        causes = ["looks like a label image (a mask or a segmentation) or an empty image, not the scan"]
    else:
        said, causes = _outside(modality_code, unit_figures(array, modality_code))
    if not said:
        return None
    problem = f"{source}: does not look like {_WHAT[modality_code]}: {'; '.join(said)}"
    if not force_units:
        cause = f" It {'; or it '.join(causes)}." if causes else ""
        raise ValueError(f"{problem}.{cause} Fix the input, or if it is right, {_FORCE}.")
    logger.warning("%s; used as it is (force_units)", problem)
    return f"{problem}; used as it is (force_units)"
