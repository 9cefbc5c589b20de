"""Choose the series to segment from what a folder or a study holds, by explicit rules.

Like MONAI Deploy's ``DICOMSeriesSelectorOperator`` (modality, description pattern, axial orientation, slice
thickness range, largest series first), with two differences: every rejected series is listed with its reason
when nothing matches, and a tie is an error naming the candidates, never a silent first pick.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from .errors import DicomInputError
from .scan import SeriesInfo

__all__ = ["CT_RULES", "PET_RULES", "SeriesRules", "select_series", "series_mismatches"]

logger = logging.getLogger("diffseg")


@dataclass(frozen=True)
class SeriesRules:
    """What a series must be to be selected.

    Attributes:
        modality: the DICOM Modality (``CT``, ``PT``, ``MR``).
        description_regex: a regular expression searched (case-insensitive) in SeriesDescription; None: any.
        axial: the slice normal must be within ``axial_tolerance_deg`` of the patient's z axis.
        axial_tolerance_deg: the tolerance of ``axial`` in degrees.
        slice_thickness_mm: (min, max) SliceThickness in mm, bounds included; None: any.
        min_slices: fewest images in the series.
        corrected: values that CorrectedImage must hold (PET: ``("ATTN",)`` rejects non-attenuation-corrected
            series).
        exclude_image_types: ImageType values that reject a series (``LOCALIZER`` scouts, ``DERIVED``
            MIPs...).
        most_slices: among several matches, take the one with the most images (a tie is still an error);
            False: several matches are an error.
    """

    modality: str = "CT"
    description_regex: str | None = None
    axial: bool = True
    axial_tolerance_deg: float = 10.0
    slice_thickness_mm: tuple[float, float] | None = None
    min_slices: int = 3
    corrected: tuple[str, ...] = ()
    exclude_image_types: tuple[str, ...] = ("LOCALIZER",)
    most_slices: bool = True

    def __post_init__(self) -> None:
        if not self.modality or self.modality != self.modality.strip().upper():
            raise ValueError(f"modality must be an upper-case DICOM Modality such as 'CT', got {self.modality!r}")
        if self.description_regex is not None:
            try:
                re.compile(self.description_regex)
            except re.error as exc:
                raise ValueError(f"description_regex {self.description_regex!r} is not valid: {exc}") from None
        if not 0 <= self.axial_tolerance_deg < 90:
            raise ValueError(f"axial_tolerance_deg must be in [0, 90), got {self.axial_tolerance_deg}")
        if self.slice_thickness_mm is not None:
            lo, hi = self.slice_thickness_mm
            if not 0 <= lo <= hi:
                raise ValueError(
                    f"slice_thickness_mm must be (min, max) with 0 <= min <= max, got {self.slice_thickness_mm}"
                )
        if self.min_slices < 1:
            raise ValueError(f"min_slices must be >= 1, got {self.min_slices}")


#: Default rules of a PET/CT study: an axial CT, and an axial attenuation-corrected PET.
CT_RULES = SeriesRules(modality="CT")
PET_RULES = SeriesRules(modality="PT", corrected=("ATTN",))


def series_mismatches(series: SeriesInfo, rules: SeriesRules) -> list[str]:
    """The reasons ``series`` fails ``rules`` (empty when it matches)."""
    reasons = []
    if series.modality != rules.modality:
        reasons.append(f"Modality {series.modality or 'missing'} is not {rules.modality}")
        return reasons
    if rules.description_regex is not None and not re.search(
        rules.description_regex, series.series_description, flags=re.IGNORECASE
    ):
        reasons.append(f"SeriesDescription does not match {rules.description_regex!r}")
    if rules.axial:
        angle = float(np.degrees(np.arccos(min(1.0, abs(float(series.slice_normal[2]))))))
        if angle > rules.axial_tolerance_deg:
            reasons.append(f"not axial (slice normal {angle:.0f}° from the z axis)")
    if rules.slice_thickness_mm is not None:
        lo, hi = rules.slice_thickness_mm
        thickness = series.slice_thickness
        if thickness is None or not lo <= thickness <= hi:
            reasons.append(f"SliceThickness {thickness} mm not in [{lo}, {hi}]")
    if series.num_instances < rules.min_slices:
        reasons.append(f"{series.num_instances} image(s), fewer than {rules.min_slices}")
    missing = [c for c in rules.corrected if c.upper() not in series.corrected_image]
    if missing:
        reasons.append(f"CorrectedImage {list(series.corrected_image)} lacks {', '.join(missing)}")
    excluded = [t for t in rules.exclude_image_types if t.upper() in series.image_type]
    if excluded:
        reasons.append(f"ImageType holds {', '.join(excluded)}")
    return reasons


def select_series(series: Sequence[SeriesInfo], rules: SeriesRules | None = None) -> SeriesInfo:
    """The one series that matches ``rules``.

    Args:
        series: candidates, e.g. from ``scan_dicom_folder``.
        rules: the selection rules; ``None`` selects a CT (``CT_RULES``).

    Returns:
        The selected series.

    Raises:
        DicomInputError: no series matches (each candidate is listed with its reasons), or several match and
            ``most_slices`` cannot break the tie (the candidates are listed).
    """
    rules = rules or CT_RULES
    matches, rejected = [], []
    for s in series:
        reasons = series_mismatches(s, rules)
        if reasons:
            rejected.append(f"{s.describe()}: {'; '.join(reasons)}")
        else:
            matches.append(s)
    if not matches:
        listing = "\n  ".join(rejected) if rejected else "(no image series at all)"
        raise DicomInputError(f"no {rules.modality} series matches {rules}:\n  {listing}")
    if len(matches) == 1:
        return matches[0]
    if rules.most_slices:
        most = max(s.num_instances for s in matches)
        best = [s for s in matches if s.num_instances == most]
        if len(best) == 1:
            logger.info("selected %s: the most images of %d matching series", best[0].describe(), len(matches))
            return best[0]
        matches = best
    listing = "\n  ".join(s.describe() for s in matches)
    raise DicomInputError(
        f"{len(matches)} {rules.modality} series match equally; narrow the rules (e.g. description_regex):\n  {listing}"
    )
