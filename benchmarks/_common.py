"""What the benchmark scripts share: the machine line, result files, the torch model, the model-grid input.

Each script writes ``benchmarks/results/<name>.json`` (every figure, the machine, versions, the command) and
``benchmarks/results/<name>.md`` (the table the README quotes, headed by the machine and the command).
"""

from __future__ import annotations

import contextlib
import json
import os
import shlex
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

__all__ = [
    "RESULTS",
    "command_line",
    "load_average",
    "machine_header",
    "model_input",
    "on_ct_grid",
    "torch_model",
    "write_results",
]

RESULTS = Path(__file__).resolve().parent / "results"


def command_line() -> str:
    script = Path(sys.argv[0])
    with contextlib.suppress(ValueError):
        script = script.resolve().relative_to(Path(__file__).resolve().parent.parent)
    return " ".join(["python", str(script), *map(shlex.quote, sys.argv[1:])])


def load_average() -> list[float] | None:
    return [round(v, 2) for v in os.getloadavg()] if hasattr(os, "getloadavg") else None


def machine_header(machine: dict[str, Any]) -> str:
    return (
        f"{machine['cpu']}, {machine['usable_cores']} cores ({', '.join(machine['isa'])}), "
        f"{machine['memory_gb']} GB, {machine['os'].split('-with-')[0]}"
    )


def write_results(name: str, doc: dict[str, Any], markdown: str, folder: Path = RESULTS) -> tuple[Path, Path]:
    """Write ``<name>.json`` and ``<name>.md`` atomically; return their paths."""
    from diffseg.runtime.atomic import write_json_atomic, write_text_atomic

    doc = {"command": command_line(), "date": time.strftime("%Y-%m-%d %H:%M"), **doc}
    folder.mkdir(parents=True, exist_ok=True)
    j = write_json_atomic(folder / f"{name}.json", json.loads(json.dumps(doc, default=_plain)))
    m = write_text_atomic(folder / f"{name}.md", markdown.rstrip() + "\n")
    return j, m


def _plain(value: Any) -> Any:
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, Path):
        return str(value)
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")


def torch_model(package):
    """The trained denoiser in PyTorch eager mode: the manifest's architecture and the package's weights."""
    import torch

    from diffseg.export.architectures import build_model

    arch = dict(package.manifest.raw["architecture"])
    model = build_model({"architecture": arch.pop("type"), "model": arch})
    model.load_state_dict(torch.load(package.files["torch"].path, map_location="cpu", weights_only=True))
    return model.eval()


def model_input(ct, pet, manifest):
    """The model input exactly as the pipeline makes it (``prepare_input``: model grid, body box, normalisation):
    returns ``(image [C, z, y, x] float32, grid, box)``."""
    from diffseg.runtime.preprocess import prepare_input

    prepared = prepare_input({"CT": ct, "PT": pet}, manifest.modalities, manifest.normalisation, manifest.spacing_mm)
    return prepared.image, prepared.grid, prepared.box


def on_ct_grid(probability, grid, box, ct, pet, post_options):
    """A model-grid probability (cropped to ``box``) back onto the CT's grid, thresholded and cleaned by diffseg's
    postprocessing: returns the ``Postprocessed`` result (mask, labels, lesions)."""
    from diffseg.runtime.postprocess import postprocess
    from diffseg.runtime.preprocess import ModelInput, resample_to

    ct_grid = ct.grid
    prob = resample_to(ModelInput(probability[None], grid, box, None).uncrop(probability), ct_grid, "linear")
    return postprocess(prob, resample_to(pet, ct_grid, "linear", default=0.0), post_options)
