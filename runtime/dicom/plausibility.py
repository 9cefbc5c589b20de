"""Plausible ranges of the quantitative DICOM attributes (the inputs of SUVbw, the CT and PET rescale), and the check
that refuses (or records) a value outside.

The usual failure is a unit slip: MBq written for Bq, grams for kg, which silently scales every SUV by 10⁶ or 10³.
A value outside its range is refused with the file, the attribute and the value, unless the caller passes
``force_units=True``: the value is then used as written, a warning is logged and the override is recorded for the
run report (``SuvConversion.overrides``).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING

from .errors import DicomInputError

if TYPE_CHECKING:
    from pydicom.dataset import Dataset

__all__ = ["PET_UNITS", "PLAUSIBLE_RANGES", "PlausibleRange", "check_plausible", "file_of", "refuse_unless_forced"]

logger = logging.getLogger("diffseg")


@dataclass(frozen=True)
class PlausibleRange:
    """The values of one SUVbw input that a real PET study can have.

    Attributes:
        low: smallest plausible value (inclusive).
        high: largest plausible value (inclusive).
        unit: unit of ``low`` and ``high`` (the unit DICOM prescribes).
        what: what the value is, for messages.
        hint: the likely mistake when a value falls outside, for messages.
    """

    low: float
    high: float
    unit: str
    what: str
    hint: str


#: The plausibility checks of ``suv_conversion``, in one place. Each range is wide enough for every real
#: study of its kind and narrow enough that the common unit slip lands outside it.
PLAUSIBLE_RANGES: dict[str, PlausibleRange] = {
    # Bq (PET IOD). Smallest real injections: paediatric FDG at the EANM minimum (26 MBq) and low-dose
    # protocols on long axial field-of-view scanners (a few tens of MBq); 1 MBq is 20x below them, while a
    # dose in MBq (<= 2e4 for any tracer) or in kBq (370 MBq -> 3.7e5) lies below 1e6. Largest: Rb-82 and
    # O-15 water, up to about 2 GBq; 20 GBq leaves 10x, while a value 1000x too large (mBq?) lies above.
    "RadionuclideTotalDose": PlausibleRange(
        1.0e6,
        2.0e10,
        "Bq",
        "injected activity",
        "RadionuclideTotalDose is in Bq: a dose in MBq (370 for 370 MBq) or kBq is 1e6 or 1e3 times too small "
        "and the SUVs as many times too large",
    ),
    # kg (PET IOD). Neonates weigh 2-4 kg; the heaviest patients a PET table takes are 200-300 kg. A weight
    # in grams (75 kg -> 75000; anyone above 0.5 kg -> > 500) lies above 500. 0 is refused as missing. A
    # weight in pounds (165 for 75 kg) cannot be told from a real one and is not caught.
    "PatientWeight": PlausibleRange(
        1.0,
        500.0,
        "kg",
        "patient weight",
        "PatientWeight is in kg: a weight in grams (75000 for 75 kg) makes the SUVs 1000 times too large",
    ),
    # s (PET IOD). Shortest PET nuclide in use: Rb-82 (75 s; O-15 122 s); longest: I-124 (4.18 d = 3.6e5 s)
    # and Zr-89 (78.4 h = 2.8e5 s); 1e6 s leaves ~3x. F-18 (6586 s) in hours (1.83) lies below 60 s, F-18,
    # Ga-68 and C-11 in ms (>= 1.2e6) above 1e6 s. A half-life in minutes (F-18: 109.8) lies inside, but is
    # caught by the uptake check below for any uptake over 18 min.
    "RadionuclideHalfLife": PlausibleRange(
        60.0,
        1.0e6,
        "s",
        "radionuclide half-life",
        "RadionuclideHalfLife is in s (F-18: 6586.2 s): a half-life in hours, minutes or ms gives wrong decay",
    ),
    # Half-lives of the nuclide, from the injection to the time the values are decay-corrected to (series
    # start for DecayCorrection START, each slice's acquisition for NONE; ADMIN does not use the times).
    # A scan cannot start before the injection (dynamic scans start at it: 0). After 10 half-lives 0.1 % of
    # the activity is left (F-18: 18.3 h, Zr-89: 33 d): a longer delay is a wrong date or time, or a
    # half-life in the wrong unit (F-18 in minutes makes a 60 min uptake 33 half-lives). Relative to the
    # half-life rather than in hours, so that late Zr-89 or Cu-64 imaging (days) passes.
    "uptake": PlausibleRange(
        0.0,
        10.0,
        "half-lives",
        "time from injection to decay reference",
        "the injection or the scan date/time is wrong (injection after the scan, a day off, clocks not set), "
        "or RadionuclideHalfLife is not in seconds",
    ),
    # Half-lives from an injection given as a time only (RadiopharmaceuticalStartTime) that lies after the scan,
    # taken as the day before, to the scan: an injection shortly before midnight and a scan after it (typical
    # uptakes: 1 h, delayed imaging up to 3-4 h of F-18 = 2 half-lives). 3 half-lives (F-18: 5.5 h, Ga-68: 3.4 h)
    # leaves room for those; an injection at 23:59 for a scan at 11:00 (11 h, 6 half-lives of F-18) is a clock
    # or typing error that the 10 half-lives of "uptake" would let through.
    "uptake over midnight": PlausibleRange(
        0.0,
        3.0,
        "half-lives",
        "time from an injection after the scan, taken as the day before, to the scan",
        "the injection or the scan time is wrong (a clock not set, a time typed in); RadiopharmaceuticalStartDateTime "
        "with the date settles it",
    ),
    # HU (CT Image IOD). −1024 (Siemens, GE and most), −1000 (Philips), 0 (signed HU: Canon/Toshiba and most
    # converters), down to −8192 or −32768 where a converter stores signed or extended-range values unsigned. A
    # positive intercept is no scanner's (air would be above 0 HU); RescaleSlope is only required > 0 (any other
    # slope is refused outright), and the HU that come out are checked again by ``diffseg.runtime.units``.
    "RescaleIntercept CT": PlausibleRange(
        -32768.0,
        0.0,
        "HU",
        "CT rescale intercept",
        "HU = stored × RescaleSlope + RescaleIntercept: a positive intercept puts air above 0 HU (a sign slip, or "
        "the intercept of another unit)",
    ),
    # Bq/ml (PET Image module, PS3.3 C.8.9.4: "The Rescale Intercept is always zero for PET images"); a
    # non-zero one is a wrongly written series.
    "RescaleIntercept PT": PlausibleRange(
        0.0,
        0.0,
        "",
        "PET rescale intercept (always 0 in a PET image, PS3.3 C.8.9.4)",
        "a non-zero PET RescaleIntercept is not written by any conformant scanner: the series was altered or "
        "wrongly converted",
    ),
}

#: DICOM PET Units (PS3.3 C.8.9.1.1.3), for messages: only BQML is converted, GML is taken as SUVbw.
PET_UNITS: dict[str, str] = {
    "CNTS": "counts: needs the vendor's scale factor, e.g. Philips' private SUV or activity scale factor",
    "NONE": "unitless",
    "CM2": "cm²",
    "CM2ML": "cm²/ml: SUVbsa",
    "PCNT": "percent",
    "CPS": "counts/s",
    "MGMINML": "mg/min/ml: a metabolic rate image",
    "UMOLMINML": "µmol/min/ml: a metabolic rate image",
    "MLMING": "ml/min/g: a perfusion image",
    "MLG": "ml/g",
    "1CM": "1/cm: an attenuation map",
    "UMOLML": "µmol/ml",
    "PROPCNTS": "proportional to counts",
    "PROPCPS": "proportional to counts/s",
    "MLMINML": "ml/min/ml",
    "MLML": "ml/ml",
    "STDDEV": "standard deviations",
}


_FORCE_HINT = "pass force_units=True (CLI: --force-units) to use it as written; the override is recorded"


def file_of(ds: Dataset) -> str:
    """The file a dataset was read from, for messages."""
    filename = getattr(ds, "filename", None)
    return str(filename) if filename else "its first slice"


def check_plausible(
    key: str,
    value: float,
    attribute: str,
    shown: str,
    ds: Dataset,
    name: str,
    force_units: bool,
    overrides: list[str],
) -> None:
    """Refuse ``value`` outside ``PLAUSIBLE_RANGES[key]``, or with ``force_units`` log and record it.

    Args:
        key: the entry of ``PLAUSIBLE_RANGES``.
        value: the value, in the range's unit.
        attribute: the attribute, as messages name it.
        shown: the value as messages show it (with its unit).
        ds: the dataset it comes from (messages name its file).
        name: the series, as messages name it.
        force_units: use a value outside the range as written (logged as a warning) instead of refusing it.
        overrides: where a value used as written is recorded, one line each.

    Raises:
        DicomInputError: the value is outside the range and ``force_units`` is False.
    """
    plausible = PLAUSIBLE_RANGES[key]
    if plausible.low <= value <= plausible.high:
        return
    span = f"{plausible.low:g}" if plausible.low == plausible.high else f"{plausible.low:g} … {plausible.high:g}"
    outside = f"outside the plausible range of the {plausible.what}, {span} {plausible.unit}".rstrip()
    refuse_unless_forced(
        f"{attribute} of {file_of(ds)} is {shown}", outside, plausible.hint, name, force_units, overrides
    )


def refuse_unless_forced(
    where: str, problem: str, hint: str, name: str, force_units: bool, overrides: list[str]
) -> None:
    """Refuse an implausible DICOM value, or with ``force_units`` log it and record it in ``overrides``.

    Args:
        where: the attribute, its file and its value, in words.
        problem: what is implausible about it.
        hint: the likely mistake.
        name: the series, as messages name it.
        force_units: use the value as written (logged as a warning) instead of refusing it.
        overrides: where a value used as written is recorded, one line each.

    Raises:
        DicomInputError: ``force_units`` is False; the message gives ``where``, ``problem``, ``hint`` and the
            override.
    """
    if not force_units:
        raise DicomInputError(
            f"{name}: {where}, {problem}: {hint}. Correct the DICOM export, or if the value is right, {_FORCE_HINT}."
        )
    logger.warning("%s: force_units: %s, %s; used as written", name, where, problem)
    overrides.append(f"{name}: {where}, {problem}; used as written (force_units)")
