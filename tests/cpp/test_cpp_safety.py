"""Safety of the C++ kernels (diffseg._ext) where they meet the process and the caller's buffers.

- A scratch allocation that fails inside a kernel's OpenMP region raises MemoryError and the process lives on (an
  exception that leaves an OpenMP region calls std::terminate: SIGABRT, the whole DICOM node gone). The call runs
  in a child process whose address space is capped with RLIMIT_AS just above what it already uses, so the kernel's
  scratch mapping really fails. Reference: the same call without the cap, after it (exact).
- The diffusion step with an output buffer that is one of its inputs (x_prev is x_t, as the sampler steps in place;
  x0 is model_output, as Scheduler.x0_for_output; x0 is noise or variance, which the binding allows too) equals the
  step into separate buffers bit for bit, with DDIM and DDPM coefficients.
"""

from __future__ import annotations

import subprocess
import sys
import textwrap

import numpy as np
import pytest

from diffseg import _ext
from diffseg.runtime.diffusion_schedule import SamplerOptions, SchedulerConfig

# Run in a child: builds the inputs and the uncapped reference, frees the kernels' cached scratch, caps the address
from diffseg.runtime.scheduler import Scheduler

# Run in a child: builds the inputs and the uncapped reference, frees the kernels' cached scratch, caps the address
# space at what is mapped now plus 32 MiB, runs the kernel (its scratch needs over 100 MiB), then lifts the cap and
# checks that the kernel still gives the reference. Exit code 0 only if MemoryError was caught and the rerun agrees.
_CHILD = textwrap.dedent(
    """
    import resource
    import sys

    import numpy as np

    from diffseg import _ext

    kind = sys.argv[1]
    if kind == "connected_components":
        # Every other x plane set: nx/2 runs per row, about 12 bytes of scratch per voxel (runs, parent, label).
        mask = np.zeros((64, 512, 512), np.uint8)
        mask[:, :, ::2] = 1

        def call():
            labels, n = _ext.connected_components(mask, connectivity=6, multilabel=False, threads=2)
            return labels, n
    else:
        # 4096-fold downsampling in y: each output row block reads all 16384 input rows, 128 MiB of x rows.
        src = (np.arange(2 * 16384 * 1024, dtype=np.int64).reshape(2, 16384, 1024) % 251).astype(np.uint8)
        geometry = (np.diag([1.0, 4096.0, 1.0]), np.zeros(3), np.eye(3), np.zeros(3), True)

        def call():
            out = np.zeros((2, 4, 1024), np.float32)
            _ext.resample_linear(src, out, geometry, 0.0, 2)
            return out, None

    reference = call()
    _ext.release_scratch()
    with open("/proc/self/status") as status:
        mapped = next(int(line.split()[1]) * 1024 for line in status if line.startswith("VmSize:"))
    soft, hard = resource.getrlimit(resource.RLIMIT_AS)
    resource.setrlimit(resource.RLIMIT_AS, (mapped + (32 << 20), hard))
    try:
        call()
    except MemoryError as error:
        print("MemoryError caught:", error)
    else:
        sys.exit("the kernel ran within the capped address space: no MemoryError to test")
    finally:
        resource.setrlimit(resource.RLIMIT_AS, (soft, hard))
    again = call()
    if not np.array_equal(again[0], reference[0]) or again[1] != reference[1]:
        sys.exit("after the MemoryError the kernel no longer gives the reference")
    print("rerun equals the reference")
    """
)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="RLIMIT_AS and /proc/self/status are Linux's")
@pytest.mark.skipif("sanitize" in _ext.build_info()["cxx_flags"], reason="sanitizers reserve terabytes of shadow")
@pytest.mark.parametrize("kernel", ["connected_components", "resample_linear"])
def test_failed_scratch_allocation_raises_memory_error_and_the_process_survives(kernel):
    child = subprocess.run(
        [sys.executable, "-c", _CHILD, kernel], capture_output=True, text=True, timeout=300, check=False
    )
    report = f"exit code {child.returncode}\nstdout:\n{child.stdout}\nstderr:\n{child.stderr}"
    assert child.returncode == 0, report  # before the fix: -6 (SIGABRT), "terminate called ... std::bad_alloc"
    assert "MemoryError caught" in child.stdout, report
    assert "rerun equals the reference" in child.stdout, report


# (config, options, t, t_prev, noise kind): both samplers, the three prediction types, clipped and not, without noise,
# with a constant σ and with DDPM's learned range.
_STEPS = {
    "ddim-epsilon-clip": (SchedulerConfig(), SamplerOptions(sampler="ddim"), 999, 899, "none"),
    "ddim-eta1-v": (
        SchedulerConfig(prediction_type="v_prediction", clip_sample=False),
        SamplerOptions(sampler="ddim", eta=1.0),
        501,
        401,
        "constant",
    ),
    "ddpm-sample": (SchedulerConfig(prediction_type="sample"), SamplerOptions(sampler="ddpm"), 999, 899, "constant"),
    "ddpm-learned-range": (
        SchedulerConfig(variance_type="learned_range", output_channels=2),
        SamplerOptions(sampler="ddpm"),
        500,
        400,
        "learned",
    ),
}
_SHAPE = (3, 48, 64, 64)  # 589,824 elements: several threads' shares (the kernel splits above 65,536)


def _inputs(seed: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {
        "model_output": rng.standard_normal(_SHAPE, dtype=np.float32),
        "x_t": 3 * rng.standard_normal(_SHAPE, dtype=np.float32),
        "noise": rng.standard_normal(_SHAPE, dtype=np.float32),
        "variance": rng.uniform(-1, 1, _SHAPE).astype(np.float32),
    }


def _bits(a: np.ndarray) -> np.ndarray:
    return a.view(np.uint32)


@pytest.mark.parametrize("scaled", [False, True], ids=["unscaled", "scaled"])
@pytest.mark.parametrize(
    ("output", "buffer"), [("x_prev", "x_t"), ("x0", "model_output"), ("x0", "noise"), ("x0", "variance")]
)
@pytest.mark.parametrize("case", list(_STEPS))
def test_step_into_an_input_buffer_equals_the_step_into_new_buffers(case, output, buffer, scaled):
    config, options, t, t_prev, noise_kind = _STEPS[case]
    coef = Scheduler(config, options).step_coefficients(t, t_prev)
    assert coef["noise"] == noise_kind
    inputs = _inputs(seed=len(case))
    scale = np.linspace(0.5, 2.0, 64 * 64, dtype=np.float32).reshape(64, 64) if scaled else None

    separate = {name: a.copy() for name, a in inputs.items()}
    expected = {"x_prev": np.empty(_SHAPE, np.float32), "x0": np.empty(_SHAPE, np.float32)}
    _ext.diffusion_step(coefficients=coef, scale=scale, threads=2, **separate, **expected)
    for name, a in separate.items():
        assert np.array_equal(_bits(a), _bits(inputs[name])), f"the step into new buffers changed {name}"

    aliased = {name: a.copy() for name, a in inputs.items()}
    outputs = {"x_prev": np.empty(_SHAPE, np.float32), "x0": np.empty(_SHAPE, np.float32)}
    outputs[output] = aliased[buffer]
    _ext.diffusion_step(coefficients=coef, scale=scale, threads=2, **aliased, **outputs)
    for name in ("x_prev", "x0"):
        assert np.array_equal(_bits(outputs[name]), _bits(expected[name])), f"{name} differs ({output} is {buffer})"


@pytest.mark.parametrize("case", list(_STEPS))
def test_scheduler_step_in_place_equals_out_of_place(case):
    config, options, t, t_prev, _ = _STEPS[case]
    scheduler = Scheduler(config, options)
    inputs = _inputs(seed=7)
    kwargs = {"noise": inputs["noise"]}
    if case == "ddpm-learned-range":
        kwargs["variance_output"] = inputs["variance"]
    x_prev, x0 = scheduler.step(inputs["model_output"], inputs["x_t"].copy(), t, t_prev, **kwargs)

    x_t = inputs["x_t"].copy()
    x0_buffer = np.empty(_SHAPE, np.float32)
    got_prev, got_x0 = scheduler.step(inputs["model_output"], x_t, t, t_prev, out=(x_t, x0_buffer), **kwargs)
    assert got_prev is x_t and got_x0 is x0_buffer
    assert np.array_equal(_bits(x_t), _bits(x_prev))
    assert np.array_equal(_bits(x0_buffer), _bits(x0))
    assert not np.array_equal(_bits(x_t), _bits(inputs["x_t"]))  # the step did move x_t
