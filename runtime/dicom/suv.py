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
"""

from __future__ import annotations

import logging
import math
import re
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import TYPE_CHECKING

from .errors import DicomInputError

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
    """

    units: str
    decay_correction: str
    weight_kg: float
    injected_dose_bq: float
    injection_time: datetime | None
    reference_time: datetime | None
    half_life_s: float
    factors: tuple[float, ...]


_TM = re.compile(r"^(\d{2})(\d{2})?(\d{2})?(\.\d{1,6})?$")


def parse_dicom_dt(value: str | None) -> datetime | None:
    """A ``datetime`` from a DT value (``YYYYMMDDHHMMSS.FFFFFF&ZZXX``); None when absent.

    The time-zone offset is ignored: all times of one study are taken as local.

    Raises:
        ValueError: a value is present but malformed.
    """
    text = str(value or "").strip()
    if not text:
        return None
    text = re.split(r"[+-]", text, maxsplit=1)[0]
    if len(text) < 8:
        raise ValueError(f"DT value {value!r} has no full date")
    return parse_dicom_datetime(text[:8], text[8:] or "000000")


def parse_dicom_datetime(date: str | None, time: str | None) -> datetime | None:
    """A ``datetime`` from a DA and a TM value; None when either is absent.

    The old ``HH:MM:SS`` TM form is accepted.

    Raises:
        ValueError: a value is present but malformed.
    """
    date = str(date or "").strip()
    time = str(time or "").strip().replace(":", "")
    if not date or not time:
        return None
    try:
        day = datetime.strptime(date.replace(".", ""), "%Y%m%d")
    except ValueError:
        raise ValueError(f"DA value {date!r} is not YYYYMMDD") from None
    m = _TM.match(time)
    if not m:
        raise ValueError(f"TM value {time!r} is not HHMMSS.FFFFFF")
    hh, mm, ss, frac = m.groups()
    micro = round(float(frac) * 1e6) if frac else 0
    return day + timedelta(hours=int(hh), minutes=int(mm or 0), seconds=int(ss or 0), microseconds=micro)


def _positive(ds: Dataset, keyword: str, name: str, where: str = "") -> float:
    value = ds.get(keyword)
    if value in (None, ""):
        raise DicomInputError(f"{name}: {keyword}{where} is missing: cannot compute SUVbw")
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise DicomInputError(f"{name}: {keyword}{where} is not a number: {value!r}") from None
    if not math.isfinite(number) or number <= 0:
        raise DicomInputError(f"{name}: {keyword}{where} must be > 0 to compute SUVbw, got {number}")
    return number


def _acquisition_time(ds: Dataset) -> datetime | None:
    if ds.get("AcquisitionDateTime"):
        return parse_dicom_dt(ds.AcquisitionDateTime)
    return parse_dicom_datetime(ds.get("AcquisitionDate") or ds.get("SeriesDate"), ds.get("AcquisitionTime"))


def _injection_time(info: Dataset, first: Dataset, scan: datetime | None, name: str) -> datetime:
    where = " in RadiopharmaceuticalInformationSequence"
    if info.get("RadiopharmaceuticalStartDateTime"):
        return parse_dicom_dt(info.RadiopharmaceuticalStartDateTime)  # type: ignore[return-value]
    start = info.get("RadiopharmaceuticalStartTime")
    if not start:
        raise DicomInputError(
            f"{name}: RadiopharmaceuticalStartDateTime and RadiopharmaceuticalStartTime{where} "
            "are both missing: cannot compute SUVbw"
        )
    day = first.get("SeriesDate") or first.get("AcquisitionDate") or first.get("StudyDate")
    if not day:
        raise DicomInputError(
            f"{name}: RadiopharmaceuticalStartTime has no date (SeriesDate, AcquisitionDate "
            "and StudyDate missing): cannot compute SUVbw"
        )
    injection = parse_dicom_datetime(day, start)
    if injection is None:
        raise DicomInputError(f"{name}: RadiopharmaceuticalStartTime {start!r} cannot be read")
    if scan is not None and injection > scan:
        # Injected before midnight, scanned after: the start time belongs to the day before.
        injection -= timedelta(days=1)
        logger.info("%s: injection time %s is after the scan: taken as the day before", name, start)
    return injection


def suv_conversion(headers: Sequence[Dataset], name: str = "PET series") -> SuvConversion:
    """The SUVbw factors of a PET series, one per slice.

    Args:
        headers: the PET slices' datasets (pixel data not needed), in any order; factors come in this order.
        name: the series, as messages should name it.

    Returns:
        A ``SuvConversion``; ``value · factors[i]`` is the SUVbw of slice ``i``.

    Raises:
        DicomInputError: Units other than BQML/GML, CorrectedImage without ATTN (or DECY), an unknown
            DecayCorrection, or a missing/invalid PatientWeight, RadiopharmaceuticalInformationSequence,
            RadionuclideTotalDose, RadionuclideHalfLife, injection or scan time. The message names the
            attribute.
    """
    if not headers:
        raise DicomInputError(f"{name}: no slices")
    first = headers[0]
    units = str(first.get("Units", "")).strip().upper()
    n = len(headers)
    if units == "GML":
        logger.info("%s: Units GML, values are SUVbw already", name)
        return SuvConversion("GML", str(first.get("DecayCorrection", "")), 0.0, 0.0, None, None, 0.0, (1.0,) * n)
    if units != "BQML":
        raise DicomInputError(
            f"{name}: Units is {units or 'missing'!r}; SUVbw is computed from BQML only "
            "(CNTS needs vendor scale factors)"
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
    weight = _positive(first, "PatientWeight", name)
    sequence = first.get("RadiopharmaceuticalInformationSequence")
    if not sequence:
        raise DicomInputError(
            f"{name}: RadiopharmaceuticalInformationSequence is missing or empty: cannot compute SUVbw"
        )
    info = sequence[0]
    where = " in RadiopharmaceuticalInformationSequence"
    dose = _positive(info, "RadionuclideTotalDose", name, where)
    half_life = _positive(info, "RadionuclideHalfLife", name, where)
    if dose < 1.0e5:
        logger.warning("%s: RadionuclideTotalDose %.4g Bq is below 0.1 MBq: MBq written where Bq is due?", name, dose)
    try:
        acquired = [_acquisition_time(ds) for ds in headers]
        series_time = parse_dicom_datetime(first.get("SeriesDate"), first.get("SeriesTime"))
        earliest = min((t for t in acquired if t is not None), default=None)
        scan = series_time
        if series_time is None or (earliest is not None and series_time > earliest):
            scan = earliest
            if series_time is not None:
                logger.info(
                    "%s: SeriesTime is after the first AcquisitionTime (post-processed series): "
                    "decay reference taken as the first acquisition, %s",
                    name,
                    earliest,
                )
        injection = _injection_time(info, first, scan, name)
    except ValueError as exc:
        if isinstance(exc, DicomInputError):
            raise
        raise DicomInputError(f"{name}: {exc}") from None
    lam = math.log(2.0) / half_life

    def factor(reference: datetime) -> float:
        elapsed = (reference - injection).total_seconds()
        if elapsed < 0:
            raise DicomInputError(f"{name}: decay reference time {reference} is before the injection {injection}")
        return weight * 1000.0 / (dose * 2.0 ** (-elapsed / half_life))

    if decay == "START":
        if scan is None:
            raise DicomInputError(
                f"{name}: SeriesDate/SeriesTime and AcquisitionDate/Time are missing: "
                "no decay reference time for DecayCorrection START"
            )
        return SuvConversion(units, decay, weight, dose, injection, scan, half_life, (factor(scan),) * n)
    if decay == "ADMIN":
        return SuvConversion(units, decay, weight, dose, injection, injection, half_life, (weight * 1000.0 / dose,) * n)
    factors = []
    for i, (ds, t0) in enumerate(zip(headers, acquired, strict=True)):
        if t0 is None:
            raise DicomInputError(
                f"{name}: slice {i} has no AcquisitionDate/AcquisitionTime, needed with DecayCorrection NONE"
            )
        duration_s = _positive(ds, "ActualFrameDuration", name, f" of slice {i}") / 1000.0
        lam_d = lam * duration_s
        factors.append(factor(t0) * lam_d / -math.expm1(-lam_d))
    return SuvConversion(units, decay, weight, dose, injection, None, half_life, tuple(factors))
