"""The shipped default model on held-out test phantoms (the export issue's accuracy check, on one case).

Reference: the plain PyTorch sliding-window loop, DDIM 10 steps × 1 sample (5 in ``benchmarks/accuracy.py``, which
runs the whole split), threshold 0.5 on the mean foreground probability, Dice on the CT grid against the phantom's
ground truth.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

from diffseg.export.architectures import build_model
from diffseg.runtime.phantom import make_phantom
from diffseg.runtime.postprocess import dice

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))
from accuracy import reference_probability


@pytest.mark.slow
@pytest.mark.parametrize("seed", [1])
def test_default_model_dice_on_test_phantoms(default_package, seed):
    arch = dict(default_package.manifest.raw["architecture"])
    model = build_model({"architecture": arch.pop("type"), "model": arch})
    model.load_state_dict(torch.load(default_package.files["torch"].path, weights_only=True))
    case = make_phantom(seed)
    assert case.mask.array.any()
    # One sample of the ensemble keeps CI inside its budget; benchmarks/accuracy.py runs the whole split with five.
    prob = reference_probability(model.eval(), case, default_package.manifest, seed, steps=10, samples=1)
    assert dice(prob >= 0.5, case.mask.array) >= 0.80
