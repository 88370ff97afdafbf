"""Smoke tests: every benchmark script runs end to end at a tiny size and writes
its figures (no assertions on timings)."""

import importlib.util
import json
import sys
from pathlib import Path

import numpy as np
import pytest

import synthetic
from ngsgd_mpi import backend

SCRIPTS = Path(__file__).resolve().parents[1] / "scripts"


def run_script(name, *args, timeout=180):
    res = synthetic.run([sys.executable, str(SCRIPTS / name), *args], timeout=timeout)
    assert res.returncode == 0, res.stdout + res.stderr
    return res.stdout


def test_bench_step_tiny(tmp_path):
    out = tmp_path / "step.json"
    stdout = run_script("bench_step.py", "--sizes", "tiny", "--threads", "1", "--reps", "2",
                        "--batches", "1", "--warmup", "1", "--breakdown-reps", "1", "--settle", "0",
                        "--json", str(out))
    report = json.loads(out.read_text())
    (run,) = report["runs"]
    assert run["size"] == "tiny" and run["threads"] == 1
    assert {"ng-online/sgd", "ng-simple/sgd"} <= set(run["ratios"])
    assert all(v > 0 for v in run["ratios"].values())
    # The FLOP counts are printed beside the measured ratios.
    assert run["sgd_macs"] > 0 and run["ng_online_extra_macs_factored"] > 0
    assert "multiply-adds per minibatch" in stdout
    # Breakdown: every affine layer has a precondition and an update part under ng-online.
    parts = run["breakdown_ms"]["ng-online"]
    assert {"Affine0/precondition", "Affine0/update", "Affine1/precondition",
            "Pnorm0/forward", "SoftmaxCrossEntropy0/backward"} <= set(parts)
    if importlib.util.find_spec("torch") is None:
        assert "skipping the PyTorch baseline" in stdout
    else:
        assert "sgd/torch-sgd" in run["ratios"]


def test_bench_step_flop_counts_paper_size():
    sys.path.insert(0, str(SCRIPTS))
    try:
        import bench_step
    finally:
        sys.path.remove(str(SCRIPTS))
    size = bench_step.SIZES["paper"]
    # 360 -> 3000, 2 x 300 -> 3000, 300 -> 2000 at N = 512: forward + weight gradient
    # everywhere, input derivative for all but the first layer.
    expected = 512 * (2 * 360 * 3000 + 3 * 2 * 300 * 3000 + 3 * 300 * 2000)
    assert bench_step.sgd_macs(size.net, 512) == expected
    ratio = 1 + bench_step.online_extra_macs(size.net, 512, bench_step.OptimizerConfig(),
                                             factored=False) / expected
    assert 1.20 < ratio < 1.25          # the "about 22 %" for the straightforward form


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


def test_gpu_selftest_without_cupy_fails_clearly():
    if importlib.util.find_spec("cupy") is not None:
        pytest.skip("CuPy is installed here: the no-GPU exit is not reachable")
    res = synthetic.run([sys.executable, str(SCRIPTS / "gpu_selftest.py")], timeout=60)
    assert res.returncode == 2
    assert "CuPy is not installed" in res.stderr and "nothing was tested" in res.stderr


def test_gpu_selftest_checks_pass_with_numpy_standing_in_for_cupy(monkeypatch, capsys):
    """The comparison logic itself (not the GPU): NumPy on both sides must agree exactly."""
    spec = importlib.util.spec_from_file_location("gpu_selftest", SCRIPTS / "gpu_selftest.py")
    selftest = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(selftest)
    monkeypatch.setattr(backend, "use_device", lambda device: None)
    report = selftest.Report()
    selftest.check_preconditioner(np, report)
    selftest.check_network_and_steps(np, "small", report)
    out = capsys.readouterr().out
    assert report.failures == 0, out
    assert out.count("[ok]") >= 20 and "FAIL" not in out


def test_bench_decode_tiny(tmp_path):
    import yesno

    yesno.require()
    kaldiio = pytest.importorskip("kaldiio")
    pytest.importorskip("kaldi_decoder")
    lls = dict(list(yesno.loglikes().items())[:2])
    kaldiio.save_ark(str(tmp_path / "ll.ark"), lls, scp=str(tmp_path / "ll.scp"))
    out = tmp_path / "decode.json"
    stdout = run_script("bench_decode.py", "--graph", f"yesno={yesno.GRAPH}", "--loglikes", f"scp:{tmp_path}/ll.scp",
                        "--utterances", "2", "--acwt", str(yesno.ACWT), "--reps", "1", "--json", str(out))
    report = json.loads(out.read_text())
    assert report["frames"] == sum(len(v) for v in lls.values())
    assert {(r["graph"], r["search"]) for r in report["runs"]} == {("yesno", "lattice"), ("yesno", "faster")}
    assert all(r["frames_per_s"] > 0 for r in report["runs"]) and "frames/s" in stdout
