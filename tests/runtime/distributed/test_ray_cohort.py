"""``diffseg predict --ray`` on a real two-node Ray cluster (in a private network namespace) against a local run.

One cohort of six small phantoms and one damaged case runs locally (no Ray) and on the cluster with the same
seeds; then again with a sampling actor SIGKILLed mid-run; then resumed, split with ``--num-parts``. References:
the local run's own files (masks voxel for voxel, maps to 1e-6, lesion tables and reports field by field,
failures.json as is).
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from ray_net import RayCluster, private_netns, ray_unavailable_reason, wait_for

from diffseg.runtime.phantom import PhantomOptions, make_phantom, write_phantom
from diffseg.runtime.volume import read_volume

_REASON = ray_unavailable_reason()
needs_cluster = pytest.mark.skipif(_REASON is not None, reason=f"no Ray cluster here: {_REASON}")

GOOD = [f"case{i}" for i in range(1, 7)]
BROKEN = "case9"
COMMON = ["--backend", "onnxruntime", "--steps", "2", "--samples", "1", "--threads", "1", "--no-progress"]
MAPS = ("probability", "uncertainty", "entropy")
TIMES = {"timings_s", "engine_seconds", "sampler_seconds"}


def diffseg(*args: str, env: dict | None = None, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "diffseg", *args], capture_output=True, text=True, env=env, timeout=timeout
    )


@pytest.fixture(scope="module")
def cohort(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("cohort")
    small = PhantomOptions(ct_size_xy=96, ct_slices=24)
    for i, case in enumerate(GOOD, start=1):
        write_phantom(make_phantom(i, small), root / case)
    broken = root / BROKEN
    broken.mkdir()
    (broken / "ct.nii.gz").write_bytes((root / "case1" / "ct.nii.gz").read_bytes()[:200])  # truncated
    (broken / "pet.nii.gz").write_bytes((root / "case1" / "pet.nii.gz").read_bytes())
    return root


@pytest.fixture(scope="module")
def local_out(cohort, tmp_path_factory) -> Path:
    """The reference: the same cohort run locally, one process, no Ray."""
    out = tmp_path_factory.mktemp("local") / "out"
    run = diffseg("predict", "-i", str(cohort), "-o", str(out), *COMMON)
    assert run.returncode == 1, run.stderr
    assert f"case {BROKEN} FAILED" in run.stdout and "done: 6 ok, 1 failed" in run.stdout
    return out


@pytest.fixture(scope="module")
def cluster():
    """Two Ray nodes in a private network namespace, stopped (every process in it ended) even on failure."""
    if _REASON is not None:
        pytest.skip(f"no Ray cluster here: {_REASON}")
    host = _netns_of_thread()
    with private_netns():
        c = RayCluster(host_netns=host)
        try:
            yield c.start()
        finally:
            c.stop()
            assert not c.pids(), f"Ray processes left after stop: {c.pids()}"


def _netns_of_thread() -> str:
    import os

    return os.readlink("/proc/thread-self/ns/net")


def _ray_args(cluster: RayCluster, cohort: Path, out: Path, *more: str) -> list[str]:
    return ["predict", "-i", str(cohort), "-o", str(out), *COMMON, "--ray", cluster.address, *more]


def assert_same_outputs(local: Path, ray: Path, cases: list[str], address: str) -> None:
    """Each case of ``ray`` equals ``local``: masks exactly, maps to 1e-6, lesions, reports but timings."""
    for case in cases:
        a, b = local / case, ray / case
        assert np.array_equal(read_volume(a / "mask.nii.gz").array, read_volume(b / "mask.nii.gz").array), case
        for name in MAPS:
            x, y = read_volume(a / f"{name}.nii.gz"), read_volume(b / f"{name}.nii.gz")
            assert x.same_grid(y), (case, name)
            np.testing.assert_allclose(y.array, x.array, atol=1e-6, rtol=0, err_msg=f"{case} {name}")
        assert json.loads((a / "lesions.json").read_text()) == json.loads((b / "lesions.json").read_text()), case
        assert (a / "lesions.csv").read_text() == (b / "lesions.csv").read_text(), case
        ra, rb = (json.loads((d / "report.json").read_text()) for d in (a, b))
        assert set(rb) == set(ra) | {"ray"}, case
        assert set(rb["timings_s"]) == set(ra["timings_s"]), case
        assert {k: v for k, v in ra.items() if k not in TIMES} == {
            k: v for k, v in rb.items() if k not in TIMES | {"ray"}
        }, case
        assert rb["ray"]["address"] == address and rb["ray"]["actors"] == 2, rb["ray"]
        assert rb["ray"]["num_cpus_per_actor"] == 1.0 and rb["ray"]["num_gpus_per_actor"] == 0.0
        assert not list(b.glob(".*.tmp*")), f"{case}: temporary files left: {list(b.glob('.*.tmp*'))}"


def ray_figures(out: Path, name: str = "ray_run.json") -> dict:
    return json.loads((out / name).read_text())["figures"]


@needs_cluster
@pytest.mark.slow
def test_ray_run_equals_the_local_run(cluster, cohort, local_out, tmp_path):
    out = tmp_path / "ray"
    run = diffseg(*_ray_args(cluster, cohort, out, "--ray-actors", "2"), env=cluster.env)
    assert run.returncode == 1, run.stdout + run.stderr
    assert "7 case(s) in this part, 0 already done, 7 to run" in run.stdout
    assert f"case {BROKEN} FAILED" in run.stdout and "done: 6 ok, 1 failed" in run.stdout
    assert json.loads((out / "failures.json").read_text()) == json.loads((local_out / "failures.json").read_text())
    assert not (out / BROKEN / "report.json").exists()
    assert_same_outputs(local_out, out, GOOD, cluster.address)

    figures = ray_figures(out)
    assert figures["nodes"] == 2 and figures["ok"] == 6 and figures["failed"] == 1
    assert sorted(c["case_id"] for c in figures["per_case"]) == GOOD  # each case once
    workers = figures["workers"]
    actors = {w["pid"] for w in workers if w["role"] == "sample"}
    cpu_tasks = {w["pid"] for w in workers if w["role"] != "sample"}
    assert len(actors) == 2 and not actors & cpu_tasks, workers  # read/write never ran inside an actor
    assert all(w["peak_rss_mb"] > 50 for w in workers), workers
    assert figures["ray_overhead_s"]["mean"] >= 0 and figures["bytes_per_case"]["model_input"]["mean"] > 1e5
    assert "Ray's overhead per case" in run.stdout

    # Resume, and --num-parts composing with --ray: part 1 (case2, case4, case6) is done, nothing runs;
    # part 0 reruns only the damaged case.
    part1 = diffseg(*_ray_args(cluster, cohort, out, "--num-parts", "2", "--part-id", "1"), env=cluster.env)
    assert part1.returncode == 0 and "3 case(s) in this part, 3 already done, 0 to run" in part1.stdout
    before = {c: (out / c / "report.json").stat().st_mtime_ns for c in GOOD}
    part0 = diffseg(*_ray_args(cluster, cohort, out, "--num-parts", "2", "--part-id", "0"), env=cluster.env)
    assert part0.returncode == 1, part0.stdout + part0.stderr
    assert "4 case(s) in this part, 3 already done, 1 to run" in part0.stdout
    assert list(json.loads((out / "failures.part0.json").read_text())) == [BROKEN]
    assert ray_figures(out, "ray_run.part0.json")["cases"] == 1
    assert {c: (out / c / "report.json").stat().st_mtime_ns for c in GOOD} == before  # nothing rewritten


@needs_cluster
@pytest.mark.slow
def test_a_killed_actor_is_retried_and_every_case_written_once(cluster, cohort, local_out, tmp_path):
    out = tmp_path / "killed"
    cmd = [sys.executable, "-m", "diffseg", *_ray_args(cluster, cohort, out, "--ray-actors", "2")]
    log = tmp_path / "driver.log"
    with open(log, "w") as fh:
        driver = subprocess.Popen(cmd, env=cluster.env, stdout=fh, stderr=subprocess.STDOUT, text=True)
    try:
        reports = lambda: [c for c in GOOD if (out / c / "report.json").exists()]  # noqa: E731
        wait_for(lambda: cluster.actor_pids("SampleStage") and reports(), 240, f"a first report (log {log})", 0.05)
        victims = cluster.actor_pids("SampleStage")
        done_at_kill = len(reports())
        cluster.kill(victims[0])
        assert done_at_kill < len(GOOD), "the kill came after the run had finished"
        assert driver.wait(timeout=300) == 1, log.read_text()[-3000:]
    finally:
        if driver.poll() is None:
            driver.kill()
            driver.wait()
    text = log.read_text()
    assert "done: 6 ok, 1 failed" in text, text[-3000:]
    assert_same_outputs(local_out, out, GOOD, cluster.address)
    figures = ray_figures(out)
    assert sorted(c["case_id"] for c in figures["per_case"]) == GOOD  # each case came back (and was written) once
    sampled_by = {w["pid"] for w in figures["workers"] if w["role"] == "sample"}
    assert sampled_by - set(victims), f"no case ran on a restarted actor: {figures['workers']}"


@needs_cluster
@pytest.mark.slow
def test_streaming_holds_back_cases_under_a_small_object_store_budget(cluster, cohort, tmp_path):
    """The Python entry point, one actor, one read task at a time and a 2 MB object store budget (about one case's
    payloads): Ray Data's backpressure keeps the other cases unread, never the cohort at once."""
    code = (
        "import json, sys\n"
        "from diffseg.runtime.cases import discover_cases\n"
        "from diffseg.runtime.distributed import RayOptions, run_cohort_on_ray\n"
        "cases = [c for c in discover_cases(sys.argv[1]) if c.case_id != 'case9']\n"
        "options = RayOptions(sys.argv[3], actors=1, prepare_tasks=1, object_store_memory=2_000_000)\n"
        "args = {'backend': 'onnxruntime', 'steps': 1, 'samples': 1, 'threads': 1}\n"
        "run = run_cohort_on_ray(cases, sys.argv[2], args, options=options)\n"
        "print(json.dumps({'failures': run.failures, 'figures': run.figures}))\n"
    )
    out = tmp_path / "bounded"
    run = subprocess.run(
        [sys.executable, "-c", code, str(cohort), str(out), cluster.address],
        capture_output=True,
        text=True,
        env=cluster.env,
        timeout=300,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    result = json.loads(run.stdout.strip().splitlines()[-1])
    assert result["failures"] == {} and result["figures"]["ok"] == len(GOOD)
    assert result["figures"]["max_cases_in_flight"] <= 2, result["figures"]["max_cases_in_flight"]
    assert all((out / c / "report.json").is_file() for c in GOOD)


def test_ray_without_ray_installed_names_the_extra(tmp_path):
    """A Python where ``import ray`` fails (None in sys.modules, as for a missing package): the extra is named."""
    hide = "import sys; sys.modules['ray'] = None; from diffseg.runtime.cli import main; raise SystemExit(main())"
    args = ["predict", "-i", str(tmp_path / "cohort"), "-o", str(tmp_path / "out"), "--ray"]
    out = subprocess.run([sys.executable, "-c", hide, *args], capture_output=True, text=True, timeout=120)
    assert out.returncode == 2, out.stderr
    assert 'pip install "diffseg[ray]"' in out.stderr and "ray[data]>=2.40,<3" in out.stderr, out.stderr
    assert not (tmp_path / "out").exists()


def test_ray_options_are_checked_before_anything_runs(tmp_path):
    cohort, out = str(tmp_path / "cohort"), str(tmp_path / "out")
    alone = diffseg("predict", "-i", cohort, "-o", out, "--ray-actors", "2", timeout=120)
    assert alone.returncode == 2 and "--ray-actors: only with --ray" in alone.stderr, alone.stderr
    one_case = diffseg("predict", "--ct", cohort, "--pet", cohort, "-o", out, "--ray", timeout=120)
    assert one_case.returncode == 2, one_case.stderr
    bad = diffseg("predict", "-i", cohort, "-o", out, "--ray", "no address", timeout=120)
    assert bad.returncode == 2 and "address must be" in bad.stderr, bad.stderr


def test_ray_options_name_what_is_wrong():
    from diffseg.runtime.distributed import RayOptions

    assert RayOptions("auto").address == "auto" and RayOptions("10.0.0.2:6379").actors is None
    with pytest.raises(ValueError, match="address must be"):
        RayOptions("10.0.0.2")
    with pytest.raises(ValueError, match="actors must be an int >= 1, got 0"):
        RayOptions(actors=0)
    with pytest.raises(ValueError, match="num_cpus_per_actor must be a number > 0"):
        RayOptions(num_cpus_per_actor=0)
    with pytest.raises(ValueError, match="num_gpus_per_actor must be a number >= 0"):
        RayOptions(num_gpus_per_actor=-1)


def test_stages_without_ray_equal_segment_files_for_a_dicom_study(tmp_path):
    """The three stage functions in one process, their payloads pickled as Ray moves them (the DICOM study's
    pydicom headers included), write what segment_files writes: the same mask, the same SEG frames, the report."""
    import pickle

    import pydicom

    from diffseg.runtime.dicom import write_phantom_dicom
    from diffseg.runtime.distributed import _segment_options
    from diffseg.runtime.distributed._stages import CaseSpec, SampleStage, dumps, finish_write, read_prepare
    from diffseg.runtime.pipeline import segment_files
    from diffseg.runtime.segmenter import Segmenter

    write_phantom_dicom(make_phantom(2, PhantomOptions(ct_size_xy=96, ct_slices=24)), tmp_path / "study")
    args = {"model": "default", "backend": "onnxruntime", "steps": 1, "samples": 1, "threads": 1}
    with Segmenter(**args) as segmenter:
        local = segment_files(segmenter, tmp_path / "study", None, tmp_path / "local", case_id="study")
    manifest, options = _segment_options(args)  # what the driver gives the stages
    stage = SampleStage(args, options)
    spec = CaseSpec("study", str(tmp_path / "study"), None, str(tmp_path), str(tmp_path / "ray" / "study"))
    row = read_prepare({"case_id": "study", "spec": dumps(spec)}, manifest=manifest, options=options, checks=None)
    assert row["error"] == ""
    study = pickle.loads(row["case"]).loaded.study
    assert isinstance(study.ct_headers[0], pydicom.Dataset) and study.ct_headers[0].SOPInstanceUID
    sampled = stage.one(row)
    done = finish_write(sampled, write=None, extra={"ray": {"address": "none"}})
    stage.segmenter.close()
    assert done["error"] == "" and done["report"].endswith("report.json")
    ray_dir = tmp_path / "ray" / "study"
    assert np.array_equal(read_volume(ray_dir / "mask.nii.gz").array, local.result.mask.array)
    seg_local, seg_ray = (pydicom.dcmread(d / "seg.dcm") for d in (tmp_path / "local", ray_dir))
    assert seg_ray.PixelData == seg_local.PixelData and seg_ray.StudyInstanceUID == seg_local.StudyInstanceUID
    report = json.loads((ray_dir / "report.json").read_text())
    assert report["ray"] == {"address": "none"} and report["lesion_count"] == local.report["lesion_count"]
    figures = json.loads(done["figures"])
    assert set(figures) == {"prepare", "sample", "write"}
    assert figures["prepare"]["bytes"]["model_input"] > 0 and figures["sample"]["bytes"]["samples"] > 0
    assert all(f["peak_rss_mb"] > 0 and f["end"] >= f["start"] for f in figures.values())


def test_overhead_figures_from_stage_records():
    """Two cases on one actor, the second prepared while the first samples: hand-overs, the wait for the busy
    actor (not overhead) and the cases alive at once, by hand."""
    from diffseg.runtime.distributed._figures import case_figures, summarise

    def stage(start, end, work, pid, serialise=0.0):
        entry = {"start": start, "end": end, "work_s": work, "serialise_s": serialise, "bytes": {"x": 10}}
        return {**entry, "host": "h", "node": "n", "pid": pid, "peak_rss_mb": 100.0 + pid}

    a = {"prepare": stage(0, 1, 1, 1), "sample": stage(1.1, 3, 1.9, 2), "write": stage(3.2, 4, 0.7, 3, 0.1)}
    b = {"prepare": stage(0, 1.5, 1.5, 1), "sample": stage(3.05, 5, 1.95, 2), "write": stage(5.1, 6, 0.9, 3)}
    records = [{"case_id": "a", "error": "", "figures": a}, {"case_id": "b", "error": "", "figures": b}]
    fa, fb = case_figures(records)
    assert fa["to_actor_s"] == pytest.approx(0.1) and fa["to_writer_s"] == pytest.approx(0.2)
    assert fa["ray_overhead_s"] == pytest.approx(0.1 + 0.2 + 0.1) and fa["actor_wait_s"] == 0.0
    assert fb["to_actor_s"] == pytest.approx(0.05) and fb["actor_wait_s"] == pytest.approx(1.5)
    assert fb["latency_s"] == pytest.approx(6.0) and fb["work_s"] == pytest.approx(4.35)
    summary = summarise([*records, {"case_id": "c", "error": "unreadable", "figures": {}}], wall_seconds=6.0)
    assert summary["ok"] == 2 and summary["failed"] == 1 and summary["max_cases_in_flight"] == 2
    assert summary["peak_rss_mb"] == {"prepare": 101.0, "sample": 102.0, "write": 103.0}
    assert summary["cases_per_minute"] == pytest.approx(20.0)
