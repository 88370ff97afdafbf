"""Smoke tests: every benchmark script runs end to end at a tiny size and writes
its figures (no assertions on timings)."""

import importlib.util
import json
import sys
from pathlib import Path

import pytest

import synthetic

SCRIPTS = Path(__file__).resolve().parents[1] / "scripts"


def run_script(name, *args, timeout=180):
    res = synthetic.run([sys.executable, str(SCRIPTS / name), *args], timeout=timeout)
    assert res.returncode == 0, res.stdout + res.stderr
    return res.stdout


def test_bench_step_tiny(tmp_path):
    out = tmp_path / "step.json"
    stdout = run_script("bench_step.py", "--sizes", "tiny", "--threads", "1", "--reps", "2",
                        "--batches", "1", "--warmup", "1", "--breakdown-reps", "1", "--settle", "0",
                        "--memory", "--memory-steps", "2", "--json", str(out))
    report = json.loads(out.read_text())
    (run,) = report["runs"]
    assert run["size"] == "tiny" and run["threads"] == 1
    for ratios in (run["ratios"], run["ratios_cpu"]):
        assert {"ng-online/sgd", "ng-simple/sgd"} <= set(ratios)
        assert all(v > 0 for v in ratios.values())
    # The FLOP counts (ngsgd_mpi.costs) are printed beside the measured ratios.
    assert run["sgd_macs"] > 0 and run["ng_online_extra_macs_factored"] > 0
    assert run["ng_simple_extra_macs"] > 0 and "multiply-adds per minibatch" in stdout
    # Breakdown: every affine layer has a precondition and an update part under ng-online,
    # and the deferred Fisher updates of the whole step have their own row.
    parts = run["breakdown_ms"]["ng-online"]
    assert {"Affine0/precondition", "Affine0/update", "Affine1/precondition",
            "Pnorm0/forward", "SoftmaxCrossEntropy0/backward", "Fisher updates/precondition"} <= set(parts)
    assert "Affine1/precondition" in run["breakdown_ms"]["ng-simple"]
    # Memory: one fresh process per optimiser, peak RSS split into known parts.
    assert [r["optimizer"] for r in report["memory"]] == ["sgd", "ng-online", "ng-simple"]
    assert all(r["peak_rss_mb"] >= r["baseline_mb"] > 0 for r in report["memory"])
    assert report["memory"][1]["optimizer_state_mb"] > 0 == report["memory"][0]["optimizer_state_mb"]
    if importlib.util.find_spec("torch") is None:
        assert "skipping the PyTorch baseline" in stdout
    else:
        assert "sgd/torch-sgd" in run["ratios"]


def test_bench_precondition_tiny(tmp_path):
    out = tmp_path / "pre.json"
    stdout = run_script("bench_precondition.py", "--sizes", "16x12:3:1,16x12:3:2", "--blocks", "1",
                        "--min-seconds", "0.001", "--json", str(out))
    rows = json.loads(out.read_text())["rows"]
    assert [(r["N"], r["D"], r["rank"], r["period"]) for r in rows] == [(16, 12, 3, 1), (16, 12, 3, 2)]
    assert all(r[s]["cpu_ms"] > 0 for r in rows for s in ("nnet2", "nnet3"))
    assert "Kaldi" in stdout


def test_bench_scaling_tiny(tmp_path):
    out = tmp_path / "scaling.json"
    run_script("bench_scaling.py", "--out", str(tmp_path / "work"), "--samples-per-average", "256",
               "--periods", "2", "--frames-per-partition", "1500", "--hidden-layers", "1",
               "--pnorm-input-dim", "20", "--pnorm-output-dim", "4", "--classes", "6",
               "--minibatch", "32", "--frequent-factor", "2", "--json", str(out), timeout=240)
    results = json.loads(out.read_text())["results"]
    assert [(r["setting"], r["ranks"]) for r in results] == [
        ("default", 1), ("default", 2), ("2x frequent", 1), ("2x frequent", 2)]
    for r in results:
        assert r["frames_per_sec"] > 0 and r["periods_used"] >= 1
        assert 0 <= r["allreduce_fraction"] < 1 and 0 <= r["data_wait_fraction"] < 1
    assert results[1]["samples_per_average"] == 256 and results[3]["samples_per_average"] == 128
    assert "speedup_vs_1_rank" in results[1] and results[1]["cpu_normalised_speedup"] > 0
    assert all(r["cpu_ms_per_1000_frames"] > 0 for r in results)


def test_gpu_selftest_without_a_gpu_tests_nothing_and_says_so():
    if importlib.util.find_spec("cupy") is not None:
        pytest.skip("CuPy is installed here: the no-GPU exit is not reachable")
    res = synthetic.run([sys.executable, str(SCRIPTS / "gpu_selftest.py")], timeout=60)
    assert res.returncode == 2
    assert "no usable GPU" in res.stderr and "nothing was tested" in res.stderr


def test_gpu_selftest_runs_end_to_end_on_the_standin(tmp_path):
    """Sections 1-4 at small sizes on the CuPy stand-in (section 5 trains twice for
    a minute; docs/gpu.md records its stand-in run): the golden cases agree, the
    transfer counts match the design, the two-rank averaging is correct."""
    out = tmp_path / "gpu.json"
    stdout = run_script("gpu_selftest.py", "--standin", "--sections", "1,2,3,4", "--check-size", "tiny",
                        "--sizes", "tiny", "--reps", "1", "--timeout", "120", "--json", str(out))
    report = json.loads(out.read_text())
    assert report["standin"] and report["failures"] == 0 and not report["skipped"], stdout
    assert stdout.count("[ok]") >= 100 and "FAIL" not in stdout
    transfers = report["figures"]["transfers_per_minibatch"]
    assert transfers["sgd"]["step"] == [0] * 8 and transfers["ng-simple"]["step"] == [0] * 8
    assert sum(n > 0 for n in transfers["ng-online"]["step"]) == 2
    assert all(n == 1 for name in transfers for n in transfers[name]["train_gradients"])
    averaging = report["figures"]["allreduce"]
    assert averaging["ranks"] == 2 and averaging["staged"]["correct"]
    assert {"ng-online/sgd", "ng-simple/sgd"} <= set(report["figures"]["ratios_tiny"])


def test_bench_decode_tiny(tmp_path):
    import yesno

    yesno.require()
    kaldiio = pytest.importorskip("kaldiio")
    pytest.importorskip("kaldi_hmm_gmm")
    lls = dict(list(yesno.loglikes().items())[:2])
    kaldiio.save_ark(str(tmp_path / "ll.ark"), lls, scp=str(tmp_path / "ll.scp"))
    out = tmp_path / "decode.json"
    stdout = run_script("bench_decode.py", "--graph", f"yesno={yesno.GRAPH}", "--loglikes", f"scp:{tmp_path}/ll.scp",
                        "--utterances", "2", "--acwt", str(yesno.ACWT), "--reps", "1", "--json", str(out))
    report = json.loads(out.read_text())
    assert report["frames"] == sum(len(v) for v in lls.values())
    assert {(r["graph"], r["search"]) for r in report["runs"]} == {("yesno", "ours"), ("yesno", "kaldi")}
    assert [r.get("same_1best") for r in report["runs"]] == [None, 2]
    assert all(r["frames_per_s"] > 0 for r in report["runs"]) and "frames/s" in stdout
