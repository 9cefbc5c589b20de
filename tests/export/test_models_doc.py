"""docs/models.md's five commands, run as written: a MONAI checkpoint to ``diffseg predict`` with its config.

The config and the commands are read from the document itself, so the page cannot drift from what works.
"""

from __future__ import annotations

import json
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("torch")
pytest.importorskip("monai")

DOC = Path(__file__).resolve().parents[2] / "docs" / "models.md"


def _blocks(language: str) -> list[str]:
    return re.findall(rf"```{language}\n(.*?)```", DOC.read_text(encoding="utf-8"), flags=re.S)


def _argv(line: str) -> list[str]:
    """A command of the page as argv, run by this interpreter (``python``, ``diffseg`` → ``python -m diffseg``)."""
    words = shlex.split(line)
    if words[0] == "python":
        return [sys.executable, *words[1:]]
    if words[0] == "diffseg":
        return [sys.executable, "-m", "diffseg", *words[1:]]
    raise AssertionError(f"docs/models.md: unexpected command {line!r}")


@pytest.mark.slow
def test_five_commands_from_checkpoint_to_predict(tmp_path):
    config = json.loads(_blocks("json")[0])
    (tmp_path / "unet.json").write_text(json.dumps(config))
    commands = [line for line in _blocks("bash")[0].splitlines() if line.strip()]
    assert len(commands) == 5, commands
    for line in commands:
        done = subprocess.run(_argv(line), cwd=tmp_path, capture_output=True, text=True, timeout=600)
        assert done.returncode == 0, f"{line}\n{done.stdout}\n{done.stderr}"
        if line.startswith("diffseg info"):
            assert "input CT: unit HU; normalisation {'method': 'dataset_zscore'" in done.stdout, done.stdout
            assert "window skipping off; retirement off" in done.stdout
    manifest = json.loads((tmp_path / "unet_pkg" / "manifest.json").read_text())
    assert manifest["schema_version"] == 2 and manifest["targets"] == [{"name": "GTVp"}]
    assert manifest["provenance"]["licence"] == "CC-BY-4.0"
    assert manifest["provenance"]["checkpoint"]["source"]  # the adapter that read the bare MONAI state_dict
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    sampler = report["settings"]["sampler"]
    assert (sampler["steps"], sampler["num_samples"], sampler["activation"]) == (4, 2, "affine")
    assert (tmp_path / "out" / "mask.nii.gz").is_file() and (tmp_path / "out" / "lesions.csv").is_file()
