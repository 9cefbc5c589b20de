"""Cohort discovery: case ids are file names, and CSVs read as spreadsheets write them (issue #15, item 3).

Every dialect a spreadsheet exports (Excel's "CSV UTF-8" with BOM and CRLF, ``;`` in European locales, tab, UTF-16
"Unicode Text", headers in other case with spaces, quoted values with commas, trailing empty rows) must give the
same cases; a bad id, a missing file or a non-UTF-8 file is refused with the CSV's path and line number.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from diffseg.runtime.cases import CASE_ID_RULE, Case, check_case_id, discover_cases
from diffseg.runtime.cli import main
from diffseg.runtime.output_paths import case_output_dir, path_under


@pytest.fixture
def images(tmp_path: Path) -> Path:
    """``tmp_path/cohort`` holding the image files the CSVs name (empty files: discovery only looks them up)."""
    root = tmp_path / "cohort"
    for rel in (
        "imgs/p1_ct.nii.gz",
        "imgs/p1_pet.nii.gz",
        "imgs/scan, second/ct.nii.gz",
        "imgs/scan, second/pet.nii.gz",
    ):
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_bytes(b"")
    return root


def expected(root: Path) -> list[Case]:
    return [
        Case("P001", (root / "imgs/p1_ct.nii.gz").resolve(), (root / "imgs/p1_pet.nii.gz").resolve()),
        Case(
            "P 002", (root / "imgs/scan, second/ct.nii.gz").resolve(), (root / "imgs/scan, second/pet.nii.gz").resolve()
        ),
    ]


PLAIN = (
    "case_id,ct,pet\nP001,imgs/p1_ct.nii.gz,imgs/p1_pet.nii.gz\n"
    'P 002,"imgs/scan, second/ct.nii.gz","imgs/scan, second/pet.nii.gz"\n'
)

DIALECTS = {
    "plain": PLAIN.encode(),
    # Excel "CSV UTF-8 (Comma delimited)": BOM, CRLF, and the empty rows a sheet with formatted cells exports
    "excel_utf8": (b"\xef\xbb\xbf" + PLAIN.replace("\n", "\r\n").encode() + b",,\r\n,,\r\n"),
    # Excel in a European locale: ';' between values (a ',' inside a value needs no quotes there)
    "semicolon": (
        "\ufeffcase_id;ct;pet\r\nP001;imgs/p1_ct.nii.gz;imgs/p1_pet.nii.gz\r\n"
        "P 002;imgs/scan, second/ct.nii.gz;imgs/scan, second/pet.nii.gz\r\n;;\r\n"
    ).encode(),
    "tab": (
        b"case_id\tct\tpet\nP001\timgs/p1_ct.nii.gz\timgs/p1_pet.nii.gz\n"
        b"P 002\timgs/scan, second/ct.nii.gz\timgs/scan, second/pet.nii.gz\n\n"
    ),
    # Excel "Unicode Text": UTF-16 LE with BOM, tab-delimited
    "utf16_tab": (
        "case_id\tct\tpet\r\nP001\timgs/p1_ct.nii.gz\timgs/p1_pet.nii.gz\r\n"
        "P 002\timgs/scan, second/ct.nii.gz\timgs/scan, second/pet.nii.gz\r\n"
    ).encode("utf-16"),
    # header names in other case with spaces, other column order, an extra column; spaces around values; blank rows
    "messy_header": (
        b" Pet , Case_ID ,CT , notes\r\n\r\n imgs/p1_pet.nii.gz , P001 , imgs/p1_ct.nii.gz ,first\r\n"
        b'"imgs/scan, second/pet.nii.gz", P 002 ,"imgs/scan, second/ct.nii.gz","a, b"\r\n\r\n  \r\n, , ,\r\n'
    ),
    "quoted_everything": (
        b'"case_id","ct","pet"\n"P001","imgs/p1_ct.nii.gz","imgs/p1_pet.nii.gz"\n'
        b'"P 002","imgs/scan, second/ct.nii.gz","imgs/scan, second/pet.nii.gz"\n'
    ),
}


@pytest.mark.parametrize("dialect", sorted(DIALECTS))
def test_every_spreadsheet_dialect_reads_to_the_same_cases(images: Path, tmp_path: Path, monkeypatch, dialect: str):
    csv_path = images / f"{dialect}.csv"
    csv_path.write_bytes(DIALECTS[dialect])
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)  # relative paths are the CSV folder's, not the working folder's
    assert discover_cases(csv_path) == expected(images)


def test_absolute_paths_and_a_tsv_file(images: Path):
    rows = [f"{c.case_id}\t{c.ct}\t{c.pet}" for c in expected(images)]
    tsv = images / "cohort.tsv"
    tsv.write_text("case_id\tct\tpet\n" + "\n".join(rows) + "\n", encoding="utf-8")
    assert discover_cases(tsv) == expected(images)


BAD_IDS = {
    "dot": (".", "starts with '.'"),
    "dotdot": ("..", "starts with '.'"),
    "parent_path": ("../../x", "path separator '/'"),
    "absolute": ("/abs", "path separator '/'"),
    "sub_path": ("a/b", "path separator '/'"),
    "backslash": ("a\\b", "path separator '\\'"),
    "nul": ("a\x00b", "NUL character"),
    "newline": ("a\nb", "control character"),
    "hidden": (".hidden", "starts with '.'"),
    "dash_first": ("-x", "starts with '-'"),
    "trailing_dot": ("x.", "ends with '.'"),
    "too_long": ("x" * 129, "has 129 characters"),
    "non_ascii": ("Müller", "holds 'ü'"),
    "colon": ("c:x", "holds ':'"),
}


@pytest.mark.parametrize("name", sorted(BAD_IDS))
def test_a_bad_case_id_is_refused_with_its_line_number(images: Path, name: str):
    bad, problem = BAD_IDS[name]
    quoted = '"' + bad.replace('"', '""') + '"'
    csv_path = images / "cohort.csv"
    csv_path.write_text(
        f"case_id,ct,pet\nP001,imgs/p1_ct.nii.gz,imgs/p1_pet.nii.gz\n{quoted},imgs/p1_ct.nii.gz,imgs/p1_pet.nii.gz\n",
        encoding="utf-8",
    )
    with pytest.raises(ValueError) as info:
        discover_cases(csv_path)
    msg = str(info.value)
    assert msg.startswith(f"{csv_path}: line 3: case id ")
    assert problem in msg and "change it in the CSV" in msg and CASE_ID_RULE in msg


def test_the_line_number_counts_physical_lines(images: Path):
    """A quoted value spanning two lines, and blank lines, move the following rows' line numbers as an editor shows."""
    csv_path = images / "cohort.csv"
    csv_path.write_text(
        'case_id,ct,pet,notes\r\nP001,imgs/p1_ct.nii.gz,imgs/p1_pet.nii.gz,"two\r\nlines"\r\n\r\n'
        "P/2,imgs/p1_ct.nii.gz,imgs/p1_pet.nii.gz,\r\n",
        encoding="utf-8",
    )
    with pytest.raises(ValueError, match=r": line 5: case id 'P/2' holds a path separator"):
        discover_cases(csv_path)


@pytest.mark.parametrize("good", ["P001", "case 1", "a.b_c-d", "7", "A" * 128, "x.nii"])
def test_ids_in_the_safe_set_are_accepted(good: str, tmp_path: Path):
    assert check_case_id(good, "here") == good
    assert case_output_dir(tmp_path, good) == (tmp_path / good).resolve()


@pytest.mark.parametrize("bad", ["x ", " x", "", "a\tb", "a\rb"])
def test_ids_the_csv_reader_would_strip_are_refused_by_the_check(bad: str):
    with pytest.raises(ValueError, match=r"^here: case id "):
        check_case_id(bad, "here")


def test_a_missing_ct_or_pet_is_named_at_discovery(images: Path):
    csv_path = images / "cohort.csv"
    csv_path.write_text(
        "case_id,ct,pet\nP001,imgs/p1_ct.nii.gz,imgs/p1_pet.nii.gz\nP2,imgs/nope.nii.gz,imgs/p1_pet.nii.gz\n"
    )
    with pytest.raises(FileNotFoundError) as info:
        discover_cases(csv_path)
    assert str(info.value).startswith(f"{csv_path}: line 3: ct file {images / 'imgs/nope.nii.gz'} does not exist")
    csv_path.write_text("case_id,ct,pet\nP1,imgs/p1_ct.nii.gz,/no/such/pet.nii.gz\n")
    with pytest.raises(FileNotFoundError, match=r": line 2: pet file /no/such/pet.nii.gz does not exist$"):
        discover_cases(csv_path)


def test_a_file_paired_with_a_folder_is_refused_at_discovery(images: Path):
    csv_path = images / "cohort.csv"
    csv_path.write_text("case_id,ct,pet\nP1,imgs,imgs/p1_pet.nii.gz\n")
    with pytest.raises(ValueError, match=r": line 2: ct .*imgs is a folder but pet .*p1_pet.nii.gz is a file"):
        discover_cases(csv_path)


def test_a_missing_value_is_refused_with_its_line(images: Path):
    csv_path = images / "cohort.csv"
    csv_path.write_text("case_id,ct,pet\nP1,imgs/p1_ct.nii.gz\n")
    with pytest.raises(ValueError, match=r": line 2: no pet given"):
        discover_cases(csv_path)


def test_a_non_utf8_csv_is_refused_saying_to_save_as_csv_utf8(images: Path):
    csv_path = images / "cohort.csv"
    csv_path.write_bytes("case_id;ct;pet\r\nP1;imgs/p1_ct.nii.gz;imgs/p1_pet.nii.gz\r\nMüller;a;b\r\n".encode("cp1252"))
    with pytest.raises(ValueError) as info:
        discover_cases(csv_path)
    msg = str(info.value)
    assert msg.startswith(f"{csv_path}: line 3: not UTF-8 text (byte 0xfc")
    assert '"CSV UTF-8' in msg


def test_a_header_without_the_columns_is_refused(images: Path):
    csv_path = images / "cohort.csv"
    csv_path.write_text("\n\nid;ct;pet\nP1;imgs/p1_ct.nii.gz;imgs/p1_pet.nii.gz\n")
    with pytest.raises(ValueError, match=r": line 3: the header \['id', 'ct', 'pet'\] lacks column\(s\) \['case_id'\]"):
        discover_cases(csv_path)
    csv_path.write_bytes(b"\xef\xbb\xbf\r\n,,\r\n")
    with pytest.raises(ValueError, match="empty"):
        discover_cases(csv_path)


def test_duplicate_ids_name_both_lines(images: Path):
    row = "imgs/p1_ct.nii.gz,imgs/p1_pet.nii.gz"
    csv_path = images / "cohort.csv"
    csv_path.write_text(f"case_id,ct,pet\nP1,{row}\nP2,{row}\n\nP1 ,{row}\n")
    with pytest.raises(ValueError, match=r": line 5: case id 'P1' is already used on line 2; each case id must be"):
        discover_cases(csv_path)
    csv_path.write_text(f"case_id,ct,pet\nCase1,{row}\ncase1,{row}\n")
    with pytest.raises(ValueError, match=r": line 3: case id 'case1' differs only in case from 'Case1' on line 2"):
        discover_cases(csv_path)


def _image_case(folder: Path) -> None:
    folder.mkdir(parents=True)
    (folder / "ct.nii.gz").write_bytes(b"")
    (folder / "pet.nii.gz").write_bytes(b"")


def test_a_folder_cohort_refuses_a_case_folder_outside_the_set(tmp_path: Path):
    cohort = tmp_path / "cohort"
    _image_case(cohort / "case1")
    _image_case(cohort / "case (2)")
    (cohort / "not a case!").mkdir()  # no images: not a case, so its name does not matter
    with pytest.raises(ValueError) as info:
        discover_cases(cohort)
    assert str(info.value).startswith(f"{cohort / 'case (2)'}: case id 'case (2)' holds '('")
    assert "rename the folder" in str(info.value)
    (cohort / "case (2)").rename(cohort / "case 2")
    assert [c.case_id for c in discover_cases(cohort)] == ["case 2", "case1"]
    _image_case(cohort / "Case1")
    with pytest.raises(ValueError, match="case folders 'Case1' and 'case1' differ only in case"):
        discover_cases(cohort)


def test_a_single_case_folder_given_as_dot_is_named_by_its_folder(tmp_path: Path, monkeypatch):
    _image_case(tmp_path / "P7")
    monkeypatch.chdir(tmp_path / "P7")
    assert [c.case_id for c in discover_cases(".")] == ["P7"]


def test_output_paths_never_leave_the_output_folder(tmp_path: Path):
    out = tmp_path / "out"
    outside = tmp_path / "outside"
    outside.mkdir()
    out.mkdir()
    (out / "planted").symlink_to(outside)
    (out / "file.json").symlink_to(outside / "victim.json")
    for name in ("../x", "/abs/x", "planted", "planted/x", "file.json", "."):
        with pytest.raises(ValueError, match="outside the output folder"):
            path_under(out, name)
    assert path_under(out, "case1/mask.nii.gz") == out.resolve() / "case1/mask.nii.gz"
    with pytest.raises(ValueError, match="outside the output folder"):
        case_output_dir(out, "planted")
    with pytest.raises(ValueError, match="holds a path separator"):
        case_output_dir(out, "../x")


def test_predict_refuses_a_bad_csv_before_writing_anything(images: Path, tmp_path: Path, capsys):
    csv_path = images / "cohort.csv"
    csv_path.write_text("case_id,ct,pet\n../../escape,imgs/p1_ct.nii.gz,imgs/p1_pet.nii.gz\n")
    out = tmp_path / "out"
    assert main(["predict", "-i", str(csv_path), "-o", str(out), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert f"{csv_path}: line 2: case id '../../escape' holds a path separator '/'" in err
    assert sorted(os.listdir(tmp_path)) == ["cohort"]  # no -o folder, nothing beside it
