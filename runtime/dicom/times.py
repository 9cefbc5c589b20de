"""DICOM dates and times (DA, TM, DT) as ``datetime``, and the scan and injection times of a PET series for SUVbw.

Each malformed value is refused naming its attribute and file; an injection time that the attributes leave
ambiguous (a time without a date for a long-lived nuclide, a time after the scan, two injection times that
disagree) is refused unless forced (``refuse``, see :func:`~.plausibility.refuse_unless_forced`).
"""

from __future__ import annotations

import logging
import re
from collections.abc import Callable, Sequence
from datetime import datetime, timedelta
from typing import TYPE_CHECKING

from .errors import DicomInputError
from .plausibility import PLAUSIBLE_RANGES, file_of

if TYPE_CHECKING:
    from pydicom.dataset import Dataset

__all__ = ["Refuse", "injection_source", "parse_dicom_datetime", "parse_dicom_dt", "scan_and_injection_times"]

logger = logging.getLogger("diffseg")

#: ``refuse(where, problem, hint)``: :func:`~.plausibility.refuse_unless_forced` for one series.
Refuse = Callable[[str, str, str], None]

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


def _dated(parse: Callable[..., datetime | None], attribute: str, ds: Dataset, name: str, *values) -> datetime | None:
    """``parse(*values)``; a malformed value is refused naming the attribute and the file."""
    try:
        return parse(*values)
    except ValueError as exc:
        raise DicomInputError(
            f"{name}: {attribute} of {file_of(ds)} is malformed ({exc}): the decay of the dose cannot be computed"
        ) from None


def _acquisition_time(ds: Dataset, name: str) -> datetime | None:
    if ds.get("AcquisitionDateTime"):
        return _dated(parse_dicom_dt, "AcquisitionDateTime", ds, name, ds.AcquisitionDateTime)
    day = ds.get("AcquisitionDate") or ds.get("SeriesDate")
    return _dated(parse_dicom_datetime, "AcquisitionDate/AcquisitionTime", ds, name, day, ds.get("AcquisitionTime"))


def _dated_injection(info: Dataset, first: Dataset, scan: datetime | None, name: str, refuse: Refuse) -> datetime:
    """RadiopharmaceuticalStartDateTime, refused (unless forced) when RadiopharmaceuticalStartTime says another
    time of day: one of the two is wrong, and which one cannot be told."""
    where = " in RadiopharmaceuticalInformationSequence"
    value = info.RadiopharmaceuticalStartDateTime
    injection = _dated(parse_dicom_dt, f"RadiopharmaceuticalStartDateTime{where}", first, name, value)
    start = info.get("RadiopharmaceuticalStartTime")
    if injection is None or not start:
        return injection  # type: ignore[return-value]
    day = injection.strftime("%Y%m%d")
    same_day = _dated(parse_dicom_datetime, f"RadiopharmaceuticalStartTime{where}", first, name, day, start)
    apart = abs((same_day - injection).total_seconds()) % 86400.0  # type: ignore[operator]
    if min(apart, 86400.0 - apart) > 60.0:
        after = ", after the scan" if scan is not None and same_day.time() > scan.time() else ""  # type: ignore[union-attr]
        refuse(
            f"RadiopharmaceuticalStartTime{where} of {file_of(first)} is {start}{after}",
            f"but RadiopharmaceuticalStartDateTime is {value} ({injection}): the two injection times disagree by "
            f"{min(apart, 86400.0 - apart) / 3600:.3g} h",
            "one of them was entered or copied wrongly (RadiopharmaceuticalStartDateTime is used when forced)",
        )
    return injection


def _injection_time(info: Dataset, first: Dataset, scan: datetime | None, name: str, refuse: Refuse) -> datetime:
    where = " in RadiopharmaceuticalInformationSequence"
    if info.get("RadiopharmaceuticalStartDateTime"):
        return _dated_injection(info, first, scan, name, refuse)
    start = info.get("RadiopharmaceuticalStartTime")
    if not start:
        raise DicomInputError(
            f"{name}: RadiopharmaceuticalStartDateTime and RadiopharmaceuticalStartTime{where} of {file_of(first)} "
            "are both missing: cannot compute SUVbw"
        )
    day = first.get("SeriesDate") or first.get("AcquisitionDate") or first.get("StudyDate")
    if not day:
        raise DicomInputError(
            f"{name}: RadiopharmaceuticalStartTime of {file_of(first)} has no date (SeriesDate, AcquisitionDate "
            "and StudyDate missing): cannot compute SUVbw"
        )
    injection = _dated(parse_dicom_datetime, f"RadiopharmaceuticalStartTime{where} (on {day})", first, name, day, start)
    if injection is None:
        raise DicomInputError(f"{name}: RadiopharmaceuticalStartTime {start!r} of {file_of(first)} cannot be read")
    half_life = float(info.get("RadionuclideHalfLife") or 0)  # checked > 0 by _dose_inputs
    if scan is not None and injection > scan:
        # Injected before midnight, scanned after: the start time belongs to the day before, if that gives an
        # uptake such a scan has; a longer one means a wrong time (23:59 for a scan at 11:00 is 11 h).
        injection -= timedelta(days=1)
        uptake, midnight = (scan - injection).total_seconds(), PLAUSIBLE_RANGES["uptake over midnight"]
        if uptake / half_life > midnight.high:
            refuse(
                f"RadiopharmaceuticalStartTime{where} of {file_of(first)} is {start}, after the scan ({scan})",
                f"and taken as the day before it gives {uptake / 3600:.3g} h ({uptake / half_life:.3g} half-lives) "
                f"of uptake, more than the {midnight.high:g} of an injection shortly before midnight",
                midnight.hint,
            )
        logger.info("%s: injection time %s is after the scan: taken as the day before", name, start)
    if 86400.0 / half_life < PLAUSIBLE_RANGES["uptake"].high:
        # A day is fewer half-lives than the uptake check allows: a date one or more days off would pass unseen.
        refuse(
            f"RadiopharmaceuticalStartTime{where} of {file_of(first)} is {start} without a date",
            f"and with a half-life of {half_life / 3600:.3g} h an injection days before the scan cannot be told "
            "from one on the scan day (taken as the scan day, or the day before when after the scan)",
            "RadiopharmaceuticalStartDateTime (with the date) is needed for a long-lived nuclide",
        )
    return injection


def scan_and_injection_times(
    headers: Sequence[Dataset], info: Dataset, name: str, refuse: Refuse
) -> tuple[list[datetime | None], datetime | None, str, datetime]:
    """Each slice's acquisition time, the scan start and the attributes it comes from, and the injection time."""
    first = headers[0]
    acquired = [_acquisition_time(ds, name) for ds in headers]
    series_time = _dated(
        parse_dicom_datetime, "SeriesDate/SeriesTime", first, name, first.get("SeriesDate"), first.get("SeriesTime")
    )
    earliest = min((t for t in acquired if t is not None), default=None)
    scan, scan_source = series_time, "SeriesDate/SeriesTime"
    if series_time is None or (earliest is not None and series_time > earliest):
        scan, scan_source = earliest, "AcquisitionDate/AcquisitionTime"
        if series_time is not None:
            logger.info(
                "%s: SeriesTime is after the first AcquisitionTime (post-processed series): "
                "decay reference taken as the first acquisition, %s",
                name,
                earliest,
            )
    injection = _injection_time(info, first, scan, name, refuse)
    return acquired, scan, scan_source, injection


def injection_source(info: Dataset) -> str:
    """The attribute the injection time is read from, for messages."""
    return (
        "RadiopharmaceuticalStartDateTime"
        if info.get("RadiopharmaceuticalStartDateTime")
        else "RadiopharmaceuticalStartTime"
    )
