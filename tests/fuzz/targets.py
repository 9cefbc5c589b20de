"""Fuzz targets of diffseg's input paths, run by atheris (``benchmarks/fuzz.py`` drives them).

Each target turns the fuzzer's bytes into one input and calls the reader a user's input goes through:

- ``image``: an image file (first byte: the format) through ``read_volume``;
- ``dicom``: a small PET/CT study with one file replaced by the bytes (first byte: which file) through
  ``read_pet_ct`` (scan, select, geometry, SUV);
- ``manifest``: a manifest document, either the bytes as JSON or the default manifest with one field replaced by
  a fuzzed value, through ``parse_manifest``;
- ``csv``: a cohort CSV beside real case files through ``discover_cases``.

A crash is anything but diffseg's named errors: a ``ValueError`` (``DicomInputError`` and ``ManifestError`` are
ones) or ``FileNotFoundError`` whose message names the input, or a result that breaks a rule (a case id that is
not a plain file name, a case file that does not exist).

Run one target: ``python tests/fuzz/targets.py TARGET CORPUS_DIR [libFuzzer flags]``; without CORPUS_DIR's seeds
the target writes them first (``--seeds-only`` writes them and stops).
"""

from __future__ import annotations

import json
import shutil
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path

import atheris

with atheris.instrument_imports(include=["diffseg"]):
    from diffseg.runtime.cases import discover_cases
    from diffseg.runtime.dicom import read_pet_ct
    from diffseg.runtime.manifest import parse_manifest, shipped_models
    from diffseg.runtime.volume import read_volume

IMAGE_SUFFIXES = (".nii.gz", ".nii", ".nrrd", ".mha")
NAMED_ERRORS = (ValueError, FileNotFoundError)
WORK = Path(tempfile.mkdtemp(prefix="diffseg-fuzz-", dir="/dev/shm" if Path("/dev/shm").is_dir() else None))


def _small_volumes():
    """A small phantom: a plausible CT (HU) and PET (SUVbw)."""
    from diffseg.runtime.phantom import PhantomOptions, make_phantom

    ph = make_phantom(3, PhantomOptions(ct_size_xy=48, ct_slices=12))
    return ph


def _named(exc: BaseException, *names: str) -> None:
    """A named error must say which input it is about (any of ``names``)."""
    if not any(name in str(exc) for name in names):
        raise AssertionError(f"{type(exc).__name__} does not name the input {names}: {exc}") from exc


# --- image ---------------------------------------------------------------------------------------------------------


def image_seeds(corpus: Path) -> None:
    from diffseg.runtime.volume import write_volume

    ph = _small_volumes()
    for i, suffix in enumerate(IMAGE_SUFFIXES):
        path = WORK / f"seed{suffix}"
        write_volume(ph.ct, path)
        (corpus / f"image{i}").write_bytes(bytes([i]) + path.read_bytes())


def image_target(data: bytes) -> None:
    if not data:
        return
    path = WORK / f"input{IMAGE_SUFFIXES[data[0] % len(IMAGE_SUFFIXES)]}"
    path.write_bytes(data[1:])
    try:
        read_volume(path)
    except NAMED_ERRORS as exc:
        _named(exc, str(path))


# --- dicom ---------------------------------------------------------------------------------------------------------

_STUDY = WORK / "study"


def _study_files() -> list[Path]:
    if not _STUDY.is_dir():
        from diffseg.runtime.dicom import write_phantom_dicom

        write_phantom_dicom(_small_volumes(), _STUDY)
    return sorted(p for p in _STUDY.rglob("*") if p.is_file())


def dicom_seeds(corpus: Path) -> None:
    for index, path in list(enumerate(_study_files()))[::3]:  # the first byte picks the file the rest replaces
        (corpus / f"dicom{index}").write_bytes(bytes([index]) + path.read_bytes())


def dicom_target(data: bytes) -> None:
    if not data:
        return
    files = _study_files()
    victim = files[data[0] % len(files)]
    case = WORK / "case"
    shutil.rmtree(case, ignore_errors=True)
    shutil.copytree(_STUDY, case)
    target = case / victim.relative_to(_STUDY)
    target.write_bytes(data[1:])
    try:
        read_pet_ct(case)
    except NAMED_ERRORS as exc:
        _named(exc, str(case), "series")  # a DICOM error names the folder, a file in it, or the series


# --- manifest ------------------------------------------------------------------------------------------------------

_MANIFEST = json.loads((shipped_models()["default"] / "manifest.json").read_text())


def _paths(doc, prefix=()):
    """Every (path, value) of a JSON document, depth first."""
    yield prefix
    if isinstance(doc, dict):
        for k, v in doc.items():
            yield from _paths(v, (*prefix, k))
    elif isinstance(doc, list):
        for i, v in enumerate(doc):
            yield from _paths(v, (*prefix, i))


_MANIFEST_PATHS = list(_paths(_MANIFEST))[1:]


def _fuzzed_value(fdp: atheris.FuzzedDataProvider):
    kind = fdp.ConsumeIntInRange(0, 7)
    return [
        None,
        fdp.ConsumeBool(),
        fdp.ConsumeInt(8),
        fdp.ConsumeFloat(),
        fdp.ConsumeUnicodeNoSurrogates(16),
        [fdp.ConsumeInt(2) for _ in range(fdp.ConsumeIntInRange(0, 4))],
        {fdp.ConsumeUnicodeNoSurrogates(6): fdp.ConsumeFloat()},
        [],
    ][kind]


def manifest_seeds(corpus: Path) -> None:
    (corpus / "manifest-json").write_bytes(b"\x00" + json.dumps(_MANIFEST).encode())
    for i in range(8):
        (corpus / f"manifest-field{i}").write_bytes(bytes([1, i * 13 % 256, i, i * 7 % 256]) + b"\x00" * 16)


def manifest_target(data: bytes) -> None:
    if not data:
        return
    if data[0] % 2 == 0:  # the bytes as a JSON document
        try:
            doc = json.loads(data[1:].decode("utf-8"))
        except (UnicodeDecodeError, ValueError, RecursionError):
            return
        if not isinstance(doc, dict):
            return
    else:  # the default manifest with one field replaced
        fdp = atheris.FuzzedDataProvider(data[1:])
        doc = json.loads(json.dumps(_MANIFEST))
        path = _MANIFEST_PATHS[fdp.ConsumeIntInRange(0, len(_MANIFEST_PATHS) - 1)]
        parent = doc
        for key in path[:-1]:
            parent = parent[key]
        parent[path[-1]] = _fuzzed_value(fdp)
    try:
        parse_manifest(doc, "fuzz/manifest.json")
    except ValueError as exc:
        _named(exc, "fuzz/manifest.json")


# --- csv -----------------------------------------------------------------------------------------------------------

_COHORT = WORK / "cohort"


def _cohort() -> Path:
    if not _COHORT.is_dir():
        for case in ("a", "b"):
            (_COHORT / case).mkdir(parents=True)
            for name in ("ct.nii.gz", "pet.nii.gz"):
                (_COHORT / case / name).write_bytes(b"")  # discovery checks that files exist, not their content
    return _COHORT


def csv_seeds(corpus: Path) -> None:
    rows = ["case_id,ct,pet", "a,a/ct.nii.gz,a/pet.nii.gz", "b,b/ct.nii.gz,b/pet.nii.gz"]
    (corpus / "csv-plain").write_bytes("\n".join(rows).encode())
    (corpus / "csv-excel").write_bytes(("\ufeff" + "\r\n".join(r.replace(",", ";") for r in rows)).encode())
    (corpus / "csv-quoted").write_bytes(b'case_id,ct,pet\n"a","a/ct.nii.gz","a/pet.nii.gz"\n')


def csv_target(data: bytes) -> None:
    from diffseg.runtime.cases import check_case_id

    path = _cohort() / "cohort.csv"
    path.write_bytes(data)
    try:
        cases = discover_cases(path)
    except NAMED_ERRORS as exc:
        _named(exc, str(path))
        return
    for case in cases:
        check_case_id(case.case_id, str(path))  # raises (a crash here) if an unsafe id got through
        for file in (case.ct, case.pet):
            if file is None or not file.exists():
                raise AssertionError(f"case {case.case_id!r}: {file} does not exist but was accepted")


TARGETS: dict[str, tuple[Callable[[bytes], None], Callable[[Path], None]]] = {
    "image": (image_target, image_seeds),
    "dicom": (dicom_target, dicom_seeds),
    "manifest": (manifest_target, manifest_seeds),
    "csv": (csv_target, csv_seeds),
}


def main(argv: list[str]) -> None:
    name, corpus = argv[1], Path(argv[2])
    target, seeds = TARGETS[name]
    corpus.mkdir(parents=True, exist_ok=True)
    if not any(corpus.iterdir()):
        seeds(corpus)
    if "--seeds-only" in argv:
        return
    atheris.Setup([argv[0], str(corpus), *argv[3:]], target)
    atheris.Fuzz()


if __name__ == "__main__":
    main(sys.argv)
