"""Finding the cases of a cohort: a folder of case folders, a CSV, or one case; and loading a case's CT and PET.

A case is either two image files (NIfTI/NRRD/MHA, named ``ct.*`` and ``pet.*`` inside a case folder) or DICOM (a study
folder holding a CT and a PET series, or two series folders).
"""

from __future__ import annotations

import codecs
import csv
import io
import os
import string
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from .input_checks import InputChecks
from .volume import Volume, read_volume

__all__ = [
    "CASE_ID_RULE",
    "Case",
    "LoadedCase",
    "check_case_id",
    "discover_cases",
    "load_case",
    "select_part",
]

#: The inputs with an argument of their own (``ct``, ``pet``: ``--ct``/``--pet``, ``predict(ct, pet)``, the report's
#: ``inputs``); every other input goes by its lower-case code (``--image MR=PATH``, ``images={"MR": ...}``).
INPUT_ARGUMENTS = {"CT": "ct", "PT": "pet"}


def input_argument(code: str) -> str:
    """What an input is called as an argument (``ct``, ``pet``, else the lower-case code)."""
    return INPUT_ARGUMENTS.get(code, code.lower())


IMAGE_SUFFIXES = (".nii.gz", ".nii", ".nrrd", ".nhdr", ".mha", ".mhd")


@dataclass(frozen=True)
class Case:
    """One case to segment: ``ct`` and ``pet`` are image files or DICOM folders (``pet`` None: one study folder, or a
    model without a PET); ``images`` the model's other inputs by modality code."""

    case_id: str
    ct: Path | None
    pet: Path | None
    images: Mapping[str, Path] = field(default_factory=dict)


@dataclass
class LoadedCase:
    """A case as read: its volumes by modality code, the DICOM study they came from, and the input checks
    overridden on the way."""

    volumes: dict[str, Volume]
    study: object | None = None  # a PetCtStudy for DICOM PET/CT input (used to write DICOM SEG)
    overrides: tuple[str, ...] = ()  # each input check overridden while reading, said in words
    sources: dict[str, str] = field(default_factory=dict)  # what to call each input in messages, by modality
    reference: str = "CT"  # the input whose grid the outputs lie on

    @property
    def ct(self) -> Volume | None:
        return self.volumes.get("CT")

    @property
    def pet(self) -> Volume | None:
        return self.volumes.get("PT")

    @property
    def grid_volume(self) -> Volume:
        """The reference input (the outputs lie on its grid)."""
        return self.volumes[self.reference]


def _image_named(folder: Path, stem: str) -> Path | None:
    hits = [
        p
        for p in sorted(folder.iterdir())
        if p.is_file() and p.name.lower().startswith(stem + ".") and p.name.lower().endswith(IMAGE_SUFFIXES)
    ]
    if len(hits) > 1:
        raise ValueError(f"{folder}: several {stem} images ({', '.join(p.name for p in hits)}); keep one")
    return hits[0] if hits else None


def _dicom_modalities(folder: Path, wanted: frozenset[str] = frozenset({"CT", "PT"})) -> dict[str, dict]:
    """The DICOM files under ``folder`` per modality and series (headers only, files without the Part 10 preamble
    included; stops once every modality of ``wanted`` was seen): see ``dicom.folders.series_counts``."""
    from .dicom.folders import series_counts

    return series_counts(folder, stop_when=wanted)


CASE_ID_MAX = 128
"""The longest case id, in characters."""

_ALNUM = frozenset(string.ascii_letters + string.digits)
CASE_ID_CHARS = _ALNUM | frozenset("._- ")
"""The characters a case id may hold: ASCII letters and digits, ``.``, ``_``, ``-`` and space."""

CASE_ID_RULE = (
    "a case id names its output folder (OUT/<case id>), so it must be a plain file name: at most 128 characters, "
    "ASCII letters, digits, '.', '_', '-' and spaces, starting with a letter or digit and not ending in '.' or a space"
)

CSV_SUFFIXES = (".csv", ".tsv")
CSV_DELIMITERS = (",", ";", "\t")
CSV_COLUMNS = ("case_id", "ct", "pet")
_SAVE_AS = 'save it from the spreadsheet as "CSV UTF-8 (Comma delimited) (*.csv)"'
_SEPARATORS = {"/": "a path separator '/'", "\\": "a path separator '\\'", "\x00": "a NUL character"}


def _case_id_problem(case_id: object) -> str | None:
    """What is wrong with ``case_id`` (None: it is in the safe set)."""
    if not isinstance(case_id, str):
        return f"is a {type(case_id).__name__}, not text"
    if not case_id:
        return "is empty"
    if len(case_id) > CASE_ID_MAX:
        return f"has {len(case_id)} characters"
    bad = next((c for c in case_id if c not in CASE_ID_CHARS), None)
    if bad is not None:
        what = _SEPARATORS.get(bad) or (f"a control character {bad!r}" if not bad.isprintable() else repr(bad))
        return f"holds {what}"
    if case_id[0] not in _ALNUM:
        return f"starts with {case_id[0]!r}"
    if case_id[-1] in ". ":
        return f"ends with {case_id[-1]!r}"
    return None


def check_case_id(case_id: str, where: str, fix: str = "") -> str:
    """Return ``case_id`` if it is a safe output folder name (see ``CASE_ID_RULE``), else raise.

    Args:
        case_id: the id.
        where: where it comes from, for the message (``"cohort.csv: line 3"``, a folder).
        fix: what the user should do, appended to the message (``"change it in the CSV"``).

    Raises:
        ValueError: naming ``where``, the id, what is wrong with it and the rule.
    """
    problem = _case_id_problem(case_id)
    if problem is not None:
        shown = case_id if not isinstance(case_id, str) or len(case_id) <= 80 else case_id[:80] + "..."
        raise ValueError(f"{where}: case id {shown!r} {problem}; {CASE_ID_RULE}{'; ' + fix if fix else ''}")
    return case_id


def _folder_case(folder: Path) -> Case | None:
    """An image case (ct.*/pet.*), a DICOM study holding CT and PT, or None; its id is the folder's name.

    Raises:
        ValueError: only one of ct.*/pet.*, or DICOM with a CT series and no PT series (or the reverse), naming
            the series found.
    """
    ct, pet = _image_named(folder, "ct"), _image_named(folder, "pet")
    if ct or pet:
        if not (ct and pet):
            raise ValueError(f"{folder}: needs both ct.* and pet.* images, found only {(ct or pet).name}")
        case = Case(_folder_id(folder), ct, pet)
    elif {"CT", "PT"} <= (found := _dicom_modalities(folder)).keys():
        case = Case(_folder_id(folder), folder, None)  # a DICOM study folder; read_pet_ct selects the series
    else:
        from .dicom.folders import missing_modality

        # A CT without its PET (or the reverse) is an incomplete case, not "no case": unless a sibling folder
        # holds the other half of the same study (study/ct + study/pet, found as one case at the parent).
        if (incomplete := missing_modality(folder, found)) is not None:
            raise ValueError(incomplete)
        return None
    check_case_id(case.case_id, f"{folder}", "rename the folder")
    return case


def _folder_id(folder: Path) -> str:
    """The folder's own name, with ``.``/``..`` resolved lexically (a symlinked case folder keeps its name)."""
    return Path(os.path.abspath(folder)).name


def _csv_text(src: Path) -> str:
    """The text of a CSV: UTF-8 (a BOM, as Excel's "CSV UTF-8" writes, is dropped) or UTF-16 with a BOM."""
    data = src.read_bytes()
    if data.startswith((codecs.BOM_UTF16_LE, codecs.BOM_UTF16_BE)):  # Excel's "Unicode Text"
        try:
            return data.decode("utf-16")
        except UnicodeDecodeError:
            raise ValueError(f"{src}: not valid UTF-16 text; {_SAVE_AS}") from None
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        line = data[: exc.start].count(b"\n") + 1
        raise ValueError(
            f"{src}: line {line}: not UTF-8 text (byte 0x{data[exc.start]:02x}; an older Excel or another program "
            f"saved it in a local code page such as cp1252); {_SAVE_AS}"
        ) from None


def _csv_column(name: str) -> str:
    return name.strip().strip('"').strip().lower().replace(" ", "_").replace("-", "_")


def _csv_records(src: Path, text: str, delimiter: str) -> list[tuple[int, list[str]]]:
    """Each non-empty record with the line it starts on; values stripped."""
    reader = csv.reader(io.StringIO(text, newline=""), delimiter=delimiter)
    out = []
    line = 1
    try:
        for row in reader:
            values = [v.strip() for v in row]
            if any(values):
                out.append((line, values))
            line = reader.line_num + 1
    except csv.Error as exc:
        raise ValueError(f"{src}: line {reader.line_num}: {exc}") from None
    return out


def _csv_table(src: Path) -> tuple[dict[str, int], list[tuple[int, list[str]]]]:
    """The column index of ``case_id``, ``ct`` and ``pet`` and the data records, the delimiter found from the header.

    The header is the first non-empty record; column names are matched ignoring case and surrounding spaces
    (``Case_ID``, `` ct ``); the delimiter is the one of ``,``, ``;`` or tab under which it names all three.
    """
    text = _csv_text(src)
    widest: tuple[int, list[str]] | None = None
    for delimiter in CSV_DELIMITERS:
        records = _csv_records(src, text, delimiter)
        if not records:
            break
        line, header = records[0]
        names = [_csv_column(h) for h in header]
        if set(CSV_COLUMNS) <= set(names):
            for col in CSV_COLUMNS:
                if names.count(col) > 1:
                    raise ValueError(f"{src}: line {line}: the header names column {col!r} twice")
            return {col: names.index(col) for col in CSV_COLUMNS}, records[1:]
        if widest is None or len(header) > len(widest[1]):
            widest = (line, header)
    if widest is None:
        raise ValueError(f"{src}: empty; a cohort CSV has a header row case_id,ct,pet and one row per case")
    line, header = widest
    missing = [c for c in CSV_COLUMNS if c not in {_csv_column(h) for h in header}]
    raise ValueError(
        f"{src}: line {line}: the header {header} lacks column(s) {missing}; the first row must name the columns "
        "case_id, ct and pet, separated by ',', ';' or tabs"
    )


def _csv_input(src: Path, where: str, column: str, value: str) -> Path:
    """An input path of a CSV row (relative: to the CSV's folder), which must exist; it is only ever read."""
    if "\x00" in value:
        raise ValueError(f"{where}: the {column} path holds a NUL character")
    path = Path(value)
    if not path.is_absolute():
        path = src.parent / path
    try:
        exists = path.exists()
    except (OSError, ValueError) as exc:
        raise ValueError(f"{where}: {column} file {path} cannot be looked at ({exc})") from None
    if not exists:
        relative = "" if Path(value).is_absolute() else " (relative paths are taken from the CSV's folder)"
        raise FileNotFoundError(f"{where}: {column} file {path} does not exist{relative}")
    return path.resolve()


def _csv_cases(src: Path) -> list[Case]:
    """The cases of a cohort CSV (``case_id``, ``ct``, ``pet``; see ``_csv_table`` for the dialects read)."""
    index, records = _csv_table(src)
    cases: list[Case] = []
    lines: dict[str, int] = {}
    folded: dict[str, tuple[str, int]] = {}
    for line, values in records:
        where = f"{src}: line {line}"
        row = {col: values[i] if i < len(values) else "" for col, i in index.items()}
        missing = [col for col in CSV_COLUMNS if not row[col]]
        if missing:
            raise ValueError(f"{where}: no {' or '.join(missing)} given; each row needs case_id, ct and pet")
        case_id = check_case_id(row["case_id"], where, "change it in the CSV")
        if case_id in lines:
            raise ValueError(
                f"{where}: case id {case_id!r} is already used on line {lines[case_id]}; each case id must be unique "
                "(it names the case's output folder)"
            )
        if case_id.lower() in folded:
            other, first = folded[case_id.lower()]
            raise ValueError(
                f"{where}: case id {case_id!r} differs only in case from {other!r} on line {first}; their output "
                "folders would be one folder on a case-insensitive disk (Windows, macOS): make them differ"
            )
        lines[case_id] = line
        folded[case_id.lower()] = (case_id, line)
        ct = _csv_input(src, where, "ct", row["ct"])
        pet = _csv_input(src, where, "pet", row["pet"])
        if ct.is_dir() != pet.is_dir():
            kinds = {True: "a folder", False: "a file"}
            raise ValueError(
                f"{where}: ct {ct} is {kinds[ct.is_dir()]} but pet {pet} is {kinds[pet.is_dir()]}; give two image "
                "files or two DICOM series folders"
            )
        cases.append(Case(case_id, ct, pet))
    return cases


def _cohort_cases(src: Path) -> list[Case]:
    """A cohort folder (one case per sub-folder), or one DICOM study whose series sit in sub-folders."""
    subfolders = [d for d in sorted(src.iterdir()) if d.is_dir() and not d.name.startswith(".")]
    cases = [c for c in map(_folder_case, subfolders) if c is not None]
    if not cases and (study := _folder_case(src)) is not None:
        return [study]
    folded: dict[str, str] = {}
    for case in cases:
        if (other := folded.setdefault(case.case_id.lower(), case.case_id)) != case.case_id:
            raise ValueError(
                f"{src}: case folders {other!r} and {case.case_id!r} differ only in case; their output folders would "
                "be one folder on a case-insensitive disk (Windows, macOS): rename one"
            )
    return cases


def discover_cases(source: str | Path) -> list[Case]:
    """Cases of a cohort folder (one case folder each), a CSV (``case_id,ct,pet``), or a single case folder.

    A case id is a file name (``CASE_ID_RULE``): a CSV's ids are checked with their line numbers, a folder's name
    when it is a case. CSVs are read as spreadsheets write them: UTF-8 with or without a BOM (or UTF-16 with one),
    CRLF or LF, ``,``, ``;`` or tab between values, header names in any case with spaces around, quoted values,
    empty rows ignored, spaces around values stripped; relative paths are taken from the CSV's folder and every
    ``ct``/``pet`` must exist.

    Raises:
        FileNotFoundError: ``source``, or a ``ct``/``pet`` a CSV names, does not exist.
        ValueError: a malformed CSV (not UTF-8, no header, a missing value, a bad or duplicate case id) or case
            folder; the message names it (and the CSV line).
    """
    src = Path(source)
    if not src.exists():
        raise FileNotFoundError(f"{src}: no such folder or CSV file")
    if src.is_file():
        if src.suffix.lower() not in CSV_SUFFIXES:
            raise ValueError(f"{src}: -i takes a folder or a .csv file (case_id,ct,pet)")
        cases = _csv_cases(src)
    else:
        single = _image_named(src, "ct") or _image_named(src, "pet")
        if single or any(p.is_file() and not p.name.startswith(".") for p in src.iterdir()):
            one = _folder_case(src)
            cases = [one] if one else []
        else:
            cases = _cohort_cases(src)
    ids = [c.case_id for c in cases]
    dupes = sorted({i for i in ids if ids.count(i) > 1})
    if dupes:
        raise ValueError(f"{src}: duplicate case ids {dupes}")
    if not cases:
        raise ValueError(f"{src}: no cases found (case folders with ct.*/pet.* images or DICOM, or a CSV)")
    return cases


def select_part(cases: list[Case], num_parts: int, part_id: int) -> list[Case]:
    """Every ``num_parts``-th case starting at ``part_id`` (cases sorted by id), to split a cohort."""
    if num_parts < 1 or not 0 <= part_id < num_parts:
        raise ValueError(f"need num_parts >= 1 and 0 <= part_id < num_parts, got {num_parts} and {part_id}")
    return sorted(cases, key=lambda c: c.case_id)[part_id::num_parts]


def _read_image_input(code: str, path: Path, checks: InputChecks) -> tuple[Volume, str, tuple[str, ...]]:
    """One input given by itself: an image file, or a DICOM folder holding exactly one series of modality ``code``
    (volume, what to call it, overrides)."""
    if not path.is_dir():
        return read_volume(path), str(path), ()
    from .dicom.study import read_single_series

    loaded, info = read_single_series(path, code, force_units=checks.force_units)
    return loaded.volume, f"{code} series {info.series_instance_uid}", tuple(loaded.overrides)


def load_case(
    ct: Path | None,
    pet: Path | None,
    *,
    images: Mapping[str, Path] | None = None,
    modalities: Sequence[str] = ("PT", "CT"),
    checks: InputChecks | None = None,
) -> LoadedCase:
    """Read a case: image files, DICOM series folders, or one DICOM PET/CT study folder (``pet`` None).

    Args:
        ct: CT image file or DICOM series folder, or a DICOM study folder (PET/CT models); None: no CT.
        pet: PET image file or DICOM series folder; None with a study folder, or for a model without a PET.
        images: the other inputs by modality code (``{"MR": path}``): image files or DICOM folders holding one series
            of that modality.
        modalities: the model's input codes: a model without a PT input reads ``ct`` as one CT (file or series).
        checks: the overrides of the input checks (None: none); DICOM SUV attributes used as written under
            ``force_units`` are recorded in ``study.overrides``.
    """
    checks = checks or InputChecks()
    given = {code: p for code, p in {"CT": ct, "PT": pet, **(images or {})}.items() if p is not None}
    if not given:
        raise ValueError("no input image given")
    petct_study = ct is not None and pet is None and ct.is_dir() and "PT" in modalities and "PT" not in given
    if not petct_study and not (ct is not None and pet is not None and ct.is_dir() and pet.is_dir()):
        if ct is not None and pet is not None and ct.is_dir() != pet.is_dir():
            raise ValueError(f"--ct {ct} and --pet {pet} must both be image files or both DICOM series folders")
        volumes, sources, overrides = {}, {}, []
        for code, path in given.items():
            volumes[code], sources[code], more = _read_image_input(code, path, checks)
            overrides += more
        return LoadedCase(volumes, overrides=tuple(overrides), sources=sources)
    from .dicom import read_pet_ct

    study = read_pet_ct(ct if pet is None else (ct, pet), force_units=checks.force_units)  # type: ignore[arg-type]
    sources = {"CT": f"CT series {study.ct_series_uid}", "PT": f"PT series {study.pet_series_uid}"}
    volumes, overrides = {"CT": study.ct, "PT": study.pet}, list(study.overrides)
    for code, path in (images or {}).items():
        volumes[code], sources[code], more = _read_image_input(code, path, checks)
        overrides += more
    return LoadedCase(volumes, study, tuple(overrides), sources)
