"""Paths a run writes, each proven to lie under its output folder (``-o``) before anything is opened there.

A path is resolved (every symlink followed) and refused unless it is inside the resolved output folder: a case id
that is a path (``../x``, ``/abs``), or a symlink planted under ``-o`` that points elsewhere, never leads a write out.
"""

from __future__ import annotations

from pathlib import Path

from .cases import check_case_id

__all__ = ["case_is_done", "case_output_dir", "path_under"]


def path_under(root: str | Path, name: str | Path) -> Path:
    """``root / name``, resolved, if it lies under ``root`` (resolved); else a ValueError naming both.

    Args:
        root: the output folder (it need not exist yet).
        name: a path relative to it (a file name, or ``case_id/file``).

    Raises:
        ValueError: the path leaves ``root`` (``..``, an absolute ``name``, or a symlink pointing out).
    """
    base = Path(root).resolve()
    path = (base / name).resolve()
    if path == base or not path.is_relative_to(base):
        how = f" (it resolves to {path})" if path != base / name else ""
        raise ValueError(
            f"{Path(root) / name}: outside the output folder {base}{how}; nothing is written there (remove the "
            "symlink, or choose another -o)"
        )
    return path


def case_output_dir(root: str | Path, case_id: str) -> Path:
    """The output folder of a case, ``root/<case_id>``, resolved and proven to lie under ``root``.

    Raises:
        ValueError: ``case_id`` is not a safe file name (``cases.CASE_ID_RULE``), or the folder leaves ``root``
            (a symlink there pointing out).
    """
    check_case_id(case_id, f"{root}")
    return path_under(root, case_id)


def case_is_done(root: str | Path, case_id: str, marker: str) -> bool:
    """Whether a case's ``marker`` file (``report.json``: a finished case) is in its output folder under ``root``.

    False when that folder is not provably under ``root``: the case then runs, and fails there naming the path
    (:func:`case_output_dir`), as any failing case of a cohort does.
    """
    try:
        return (case_output_dir(root, case_id) / marker).is_file()
    except ValueError:
        return False
