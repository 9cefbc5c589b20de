"""SUVbw from the attributes of a classic PET Image series (QIBA vendor-neutral pseudo-code, extended).

Symbols: A stored activity concentration (Bq/ml, after RescaleSlope/Intercept), W PatientWeight (kg),
D RadionuclideTotalDose (Bq, classic PET IOD), T½ RadionuclideHalfLife (s), λ = ln 2 / T½, t_inj the
injection (RadiopharmaceuticalStartDateTime, else SeriesDate + RadiopharmaceuticalStartTime).

    SUVbw = A · W · 1000 / D_ref          (1000 g per kg: SUV in g/ml)

where D_ref is the dose decayed to the time A refers to:

1. ``DecayCorrection START``: images are decay-corrected to the series start t_scan = SeriesDate/SeriesTime
   (QIBA: when the series time is after the earliest AcquisitionDate/Time, the series was post-processed and
   the earliest acquisition time is used instead); D_ref = D · 2^(-(t_scan - t_inj)/T½).
2. ``ADMIN``: images are decay-corrected to the injection: D_ref = D.
3. ``NONE``: each slice holds the mean activity over its frame [t₀, t₀ + Δ] (t₀ its AcquisitionDate/Time,
   Δ its ActualFrameDuration); corrected to t₀ the value is A · λΔ / (1 - e^(-λΔ)), and
   D_ref = D · 2^(-(t₀ - t_inj)/T½), per slice.

Only ``Units BQML`` is converted (``GML`` is SUVbw already); ``CorrectedImage`` must hold ``ATTN``, and
``DECY`` unless DecayCorrection is NONE. Anything missing is refused with the attribute's name.

Every quantitative attribute that enters SUVbw is checked against the plausible range in ``PLAUSIBLE_RANGES``
(:mod:`.plausibility`; the usual failure is a unit slip: MBq written for Bq, grams for kg, which silently scales
every SUV by 10⁶ or 10³). A value outside is refused with the file, the attribute and the value, unless the caller
passes ``force_units=True``: the value is then used as written, a warning is logged and the override is listed in
``SuvConversion.overrides`` for the run report.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import TYPE_CHECKING

from .errors import DicomInputError
from .plausibility import PET_UNITS, PLAUSIBLE_RANGES, check_plausible, file_of, refuse_unless_forced
from .times import Refuse, injection_source, parse_dicom_datetime, parse_dicom_dt, scan_and_injection_times

if TYPE_CHECKING:
    from pydicom.dataset import Dataset

__all__ = ["SuvConversion", "parse_dicom_datetime", "parse_dicom_dt", "suv_conversion"]

logger = logging.getLogger("diffseg")


@dataclass(frozen=True)
class SuvConversion:
    """How a PET series' values become SUVbw: ``suv = value · factors[slice]``.

    Attributes:
        units: Units of the series (``BQML`` or ``GML``).
        decay_correction: DecayCorrection (``START``, ``ADMIN``, ``NONE``).
        weight_kg: PatientWeight.
        injected_dose_bq: RadionuclideTotalDose.
        injection_time: the injection date and time.
        reference_time: the time the values are decay-corrected to (series start for START, injection for
            ADMIN, None for NONE: per slice).
        half_life_s: RadionuclideHalfLife.
        factors: one factor per slice, in the order of the headers given (g/Bq: ml·SUV per Bq).
        overrides: values outside ``PLAUSIBLE_RANGES`` used as written because ``force_units`` was given,
            one line each (series, attribute, file, value, range) for the run report; empty otherwise.
    """

    units: str
    decay_correction: str
    weight_kg: float
    injected_dose_bq: float
    injection_time: datetime | None
    reference_time: datetime | None
    half_life_s: float
    factors: tuple[float, ...]
    overrides: tuple[str, ...] = ()


#: ``check(key, value, attribute, shown, ds)``: :func:`~.plausibility.check_plausible` for one series.
_Check = Callable[[str, float, str, str, "Dataset"], None]


def _positive(ds: Dataset, keyword: str, name: str, file_ds: Dataset, where: str = "") -> float:
    """A number > 0 that SUVbw needs, refused (naming the file of ``file_ds``) when missing or not > 0."""
    value = ds.get(keyword)
    of = f"{where} of {file_of(file_ds)}"
    if value in (None, ""):
        raise DicomInputError(f"{name}: {keyword}{of} is missing: cannot compute SUVbw")
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise DicomInputError(f"{name}: {keyword}{of} is not a number: {value!r}") from None
    if not math.isfinite(number) or number <= 0:
        raise DicomInputError(f"{name}: {keyword}{of} must be > 0 to compute SUVbw, got {number}")
    return number


def suv_conversion(headers: Sequence[Dataset], name: str = "PET series", *, force_units: bool = False) -> SuvConversion:
    """The SUVbw factors of a PET series, one per slice.

    Args:
        headers: the PET slices' datasets (pixel data not needed), in any order; factors come in this order.
        name: the series, as messages should name it.
        force_units: use PatientWeight, RadionuclideTotalDose, RadionuclideHalfLife and the injection-to-scan
            time as written even when outside ``PLAUSIBLE_RANGES``: each such value is logged as a warning and
            listed in ``SuvConversion.overrides``. False (default): such a value is refused.

    Returns:
        A ``SuvConversion``; ``value · factors[i]`` is the SUVbw of slice ``i``.

    Raises:
        TypeError: ``force_units`` is not a bool.
        DicomInputError: Units other than BQML/GML, CorrectedImage without ATTN (or DECY), an unknown
            DecayCorrection, or a missing/invalid PatientWeight, RadiopharmaceuticalInformationSequence,
            RadionuclideTotalDose, RadionuclideHalfLife, injection or scan time; without ``force_units``, one
            of them outside ``PLAUSIBLE_RANGES`` (the message names the file, the attribute, the value and the
            range). The message names the attribute.
    """
    if not isinstance(force_units, bool):
        raise TypeError(f"force_units must be True or False, got {force_units!r}")
    if not headers:
        raise DicomInputError(f"{name}: no slices")
    first = headers[0]
    units = str(first.get("Units", "")).strip().upper()
    n = len(headers)
    if units == "GML":
        logger.info("%s: Units GML, values are SUVbw already", name)
        return SuvConversion("GML", str(first.get("DecayCorrection", "")), 0.0, 0.0, None, None, 0.0, (1.0,) * n)
    overrides: list[str] = []

    def check(key: str, value: float, attribute: str, shown: str, ds: Dataset) -> None:
        check_plausible(key, value, attribute, shown, ds, name, force_units, overrides)

    def refuse(where: str, problem: str, hint: str) -> None:
        refuse_unless_forced(where, problem, hint, name, force_units, overrides)

    decay = _checked_decay_correction(first, units, name, refuse)
    weight, dose, half_life, info = _dose_inputs(first, name, check)
    acquired, scan, scan_source, injection = scan_and_injection_times(headers, info, name, refuse)
    decayed = _DoseDecay(name, check, weight, dose, half_life, injection, injection_source(info))
    if decay == "START":
        factors = _start_factors(decayed, headers, acquired, scan, scan_source)
        return SuvConversion(units, decay, weight, dose, injection, scan, half_life, factors, tuple(overrides))
    if decay == "ADMIN":  # decay-corrected to the injection: the times do not enter SUVbw
        factors = (decayed.factor(None),) * n
        return SuvConversion(units, decay, weight, dose, injection, injection, half_life, factors, tuple(overrides))
    factors = _per_slice_factors(decayed, headers, acquired)
    return SuvConversion(units, decay, weight, dose, injection, None, half_life, factors, tuple(overrides))


def _checked_decay_correction(first: Dataset, units: str, name: str, refuse: Refuse) -> str:
    """DecayCorrection of a series that is BQML, attenuation corrected and (unless NONE) decay corrected."""
    if units != "BQML":
        meaning = f" ({PET_UNITS[units]})" if units in PET_UNITS else ""
        raise DicomInputError(
            f"{name}: Units of {file_of(first)} is {units or 'missing'!r}{meaning}; SUVbw is computed from BQML "
            "(Bq/ml) only, and GML is used as SUVbw as it is"
        )
    corrected = {str(v).strip().upper() for v in (first.get("CorrectedImage") or [])}
    decay = str(first.get("DecayCorrection", "")).strip().upper()
    if "ATTN" not in corrected:
        raise DicomInputError(
            f"{name}: CorrectedImage {sorted(corrected)} lacks ATTN: not attenuation corrected, SUV is not quantitative"
        )
    if decay not in ("START", "ADMIN", "NONE"):
        raise DicomInputError(f"{name}: DecayCorrection is {decay or 'missing'!r}; expected START, ADMIN or NONE")
    if decay != "NONE" and "DECY" not in corrected:
        raise DicomInputError(f"{name}: DecayCorrection {decay} but CorrectedImage {sorted(corrected)} lacks DECY")
    if decay == "NONE" and "DECY" in corrected:
        refuse(
            f"DecayCorrection of {file_of(first)} is NONE",
            f"but CorrectedImage {sorted(corrected)} holds DECY (decay corrected)",
            "one of the two is wrong; read as NONE, each slice is decay-corrected again and its SUVs come out too "
            "large by the decay over the uptake",
        )
    return decay


def _dose_inputs(first: Dataset, name: str, check: _Check) -> tuple[float, float, float, Dataset]:
    """PatientWeight (kg), RadionuclideTotalDose (Bq) and RadionuclideHalfLife (s), each checked, and the
    RadiopharmaceuticalInformationSequence item that holds the last two."""
    weight = _positive(first, "PatientWeight", name, first)
    check("PatientWeight", weight, "PatientWeight", f"{weight:g} kg", first)
    sequence = first.get("RadiopharmaceuticalInformationSequence")
    if not sequence:
        raise DicomInputError(
            f"{name}: RadiopharmaceuticalInformationSequence of {file_of(first)} is missing or empty: cannot compute "
            "SUVbw"
        )
    info = sequence[0]
    where = " in RadiopharmaceuticalInformationSequence"
    dose = _positive(info, "RadionuclideTotalDose", name, first, where)
    check("RadionuclideTotalDose", dose, f"RadionuclideTotalDose{where}", f"{dose:g} Bq", first)
    half_life = _positive(info, "RadionuclideHalfLife", name, first, where)
    check("RadionuclideHalfLife", half_life, f"RadionuclideHalfLife{where}", f"{half_life:g} s", first)
    return weight, dose, half_life, info


@dataclass(frozen=True)
class _DoseDecay:
    """The injected dose of a series and its decay: what turns a decay reference time into an SUVbw factor."""

    name: str
    check: _Check
    weight: float
    dose: float
    half_life: float
    injection: datetime
    injection_source: str

    def elapsed_s(self, reference: datetime) -> float:
        return (reference - self.injection).total_seconds()

    def check_uptake(self, elapsed: float, reference: datetime, source: str, ds: Dataset, note: str = "") -> None:
        half_life = self.half_life
        shown = (
            f"{elapsed:g} s ({elapsed / 3600.0:.3g} h, {elapsed / half_life:.3g} half-lives of {half_life:g} s{note})"
        )
        attribute = f"the time from {self.injection_source} ({self.injection}) to {source} ({reference})"
        self.check("uptake", elapsed / half_life, attribute, shown, ds)

    def factor(self, reference: datetime | None) -> float:
        """``W · 1000 / D_ref``, D decayed to ``reference`` (None: not decayed, ADMIN)."""
        weight, dose, half_life = self.weight, self.dose, self.half_life
        elapsed = 0.0 if reference is None else self.elapsed_s(reference)
        try:
            if reference is None:
                value = weight * 1000.0 / dose
            else:
                value = weight * 1000.0 / (dose * 2.0 ** (-elapsed / half_life))
        except (OverflowError, ZeroDivisionError):  # 2^(-x) under- or overflows: only with forced values
            value = math.inf
        if not math.isfinite(value) or value <= 0:
            raise DicomInputError(
                f"{self.name}: the SUVbw factor of PatientWeight {weight:g} kg, RadionuclideTotalDose {dose:g} Bq, "
                f"RadionuclideHalfLife {half_life:g} s and {elapsed:g} s from injection to the decay reference "
                "is not a finite number: these values cannot be used, even with force_units"
            )
        return value


def _start_factors(
    decayed: _DoseDecay,
    headers: Sequence[Dataset],
    acquired: list[datetime | None],
    scan: datetime | None,
    scan_source: str,
) -> tuple[float, ...]:
    """DecayCorrection START: one factor for every slice, the dose decayed to the scan start."""
    if scan is None:
        raise DicomInputError(
            f"{decayed.name}: SeriesDate/SeriesTime and AcquisitionDate/Time are missing: "
            "no decay reference time for DecayCorrection START"
        )
    source_ds = headers[0] if scan_source == "SeriesDate/SeriesTime" else headers[acquired.index(scan)]
    decayed.check_uptake(decayed.elapsed_s(scan), scan, scan_source, source_ds)
    return (decayed.factor(scan),) * len(headers)


def _per_slice_factors(
    decayed: _DoseDecay, headers: Sequence[Dataset], acquired: list[datetime | None]
) -> tuple[float, ...]:
    """DecayCorrection NONE: each slice's factor, the dose decayed to its acquisition, corrected for decay over its
    frame."""
    name, half_life, n = decayed.name, decayed.half_life, len(headers)
    lam = math.log(2.0) / half_life
    times: list[datetime] = []
    for i, t0 in enumerate(acquired):
        if t0 is None:
            raise DicomInputError(
                f"{name}: slice {i} has no AcquisitionDate/AcquisitionTime, needed with DecayCorrection NONE"
            )
        times.append(t0)
    uptake = PLAUSIBLE_RANGES["uptake"]
    outside = [i for i, t0 in enumerate(times) if not uptake.low <= decayed.elapsed_s(t0) / half_life <= uptake.high]
    if outside:  # checked (refused or recorded) once, at the first such slice
        i = outside[0]
        note = f"; {len(outside)} of {n} slices outside" if len(outside) > 1 else ""
        source = f"AcquisitionDate/AcquisitionTime of slice {i}"
        decayed.check_uptake(decayed.elapsed_s(times[i]), times[i], source, headers[i], note)
    per_slice = []
    for i, (ds, t0) in enumerate(zip(headers, times, strict=True)):
        duration_s = _positive(ds, "ActualFrameDuration", name, ds, f" of slice {i}") / 1000.0
        lam_d = lam * duration_s
        value = decayed.factor(t0) * lam_d / -math.expm1(-lam_d)
        if not math.isfinite(value):  # only with forced values (a huge λΔ)
            raise DicomInputError(
                f"{name}: the SUVbw factor of slice {i} (RadionuclideHalfLife {half_life:g} s, ActualFrameDuration "
                f"{duration_s:g} s) is not a finite number: these values cannot be used, even with force_units"
            )
        per_slice.append(value)
    return tuple(per_slice)
