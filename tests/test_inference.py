"""ngsgd-forward / ngsgd-eval against a tiny model and a direct NumPy computation."""

import json
import os
import subprocess
import sys
from pathlib import Path

import kaldiio
import numpy as np
import pytest

from ngsgd_mpi import data, inference, storage
from ngsgd_mpi.kaldi.pipeline import Cmvn, InputPipeline
from ngsgd_mpi.kaldi.tables import SequentialTable
from ngsgd_mpi.model import MODEL_FORMAT, Model
from ngsgd_mpi.network import Network, NetworkConfig

FEAT_DIM, NUM_CLASSES, CONTEXT = 4, 6, 2
CLASS_COUNTS = np.array([50, 0, 30, 20, 10, 90])      # class 1 has no training frames: disabled
DISABLED = np.float32(np.sqrt(np.finfo(np.float32).max))
YESNO = Path(__file__).resolve().parents[1].parent / "shared/kaldi/yesno"


def make_model(path, class_counts=CLASS_COUNTS, posterior_priors=None, pipeline=None, feat_dim=FEAT_DIM):
    cfg = NetworkConfig(input_dim=feat_dim * (2 * CONTEXT + 1), num_classes=NUM_CLASSES,
                        num_hidden_layers=1, pnorm_input_dim=12, pnorm_output_dim=4)
    network = Network(cfg, seed=0)
    rng = np.random.default_rng(1)
    network.params[...] = (0.4 * rng.standard_normal(network.params.size)).astype(np.float32)
    width = 2 * CONTEXT + 1
    mean, std = rng.standard_normal(feat_dim) * 0.1, 1 + rng.random(feat_dim)
    Model(cfg, network.params, CONTEXT, np.tile(mean, width), np.tile(std, width), class_counts,
          posterior_priors=posterior_priors, input_pipeline=pipeline).save(str(path))
    return str(path)


def spliced(feats, context=CONTEXT):
    """Independent splicing: pad by repeating the edge frames, then stack the windows."""
    padded = np.pad(feats.astype(np.float32), ((context, context), (0, 0)), mode="edge")
    return np.concatenate([padded[i:i + len(feats)] for i in range(2 * context + 1)], axis=1)


def reference_log_probs(model_path, feats):
    network = Model.load(model_path).network()
    return np.asarray(network.log_probs(spliced(feats)))


@pytest.fixture
def setup(tmp_path):
    rng = np.random.default_rng(0)
    utts = {}
    for u in range(9):
        n = int(rng.integers(1, 40))
        utts[f"utt{u}"] = (rng.standard_normal((n, FEAT_DIM)).astype(np.float32),
                           rng.integers(0, NUM_CLASSES, n).astype(np.int32))
    kaldiio.save_ark(str(tmp_path / "feats.ark"), {k: v[0] for k, v in utts.items()},
                     scp=str(tmp_path / "feats.scp"))
    kaldiio.save_ark(str(tmp_path / "ali.ark"), {k: v[1] for k, v in utts.items()})
    data.write_partition(tmp_path / "part.h5", [(k, v[0], v[1]) for k, v in utts.items()], FEAT_DIM,
                         NUM_CLASSES, dtype=np.float32)
    return tmp_path, make_model(tmp_path / "model.h5"), utts


def test_forward_log_posteriors_equal_the_model(setup):
    root, model, utts = setup
    summary = inference.forward(model, str(root / "feats.scp"), f"ark,scp:{root}/post.ark,{root}/post.scp",
                                batch_frames=50)
    assert summary == {"utterances": 9, "frames": sum(len(v[0]) for v in utts.values()),
                       "wspecifier": f"ark,scp:{root}/post.ark,{root}/post.scp"}
    out = kaldiio.load_scp(str(root / "post.scp"))
    assert list(out) == list(utts)
    for key, (feats, _) in utts.items():
        assert out[key].shape == (len(feats), NUM_CLASSES) and out[key].dtype == np.float32
        np.testing.assert_allclose(out[key], reference_log_probs(model, feats), rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(np.exp(out[key]).sum(1), 1.0, rtol=1e-5)


@pytest.mark.parametrize("source", ["{root}/feats.ark", "{root}/part.h5", "scp:{root}/feats.scp"])
def test_forward_reads_ark_and_partitions_alike(setup, source):
    root, model, utts = setup
    inference.forward(model, str(root / "feats.scp"), f"ark:{root}/a.ark", batch_frames=7)
    inference.forward(model, source.format(root=root), f"ark:{root}/b.ark", batch_frames=1000)
    a, b = dict(kaldiio.load_ark(str(root / "a.ark"))), dict(kaldiio.load_ark(str(root / "b.ark")))
    assert list(a) == list(b) == list(utts)
    for key in utts:
        np.testing.assert_allclose(a[key], b[key], rtol=1e-5, atol=1e-6)


def test_log_likelihood_divides_by_label_frequencies_without_averaged_priors(setup, capsys):
    root, model, utts = setup
    inference.forward(model, str(root / "feats.scp"), f"ark:{root}/post.ark")
    inference.forward(model, str(root / "feats.scp"), f"ark:{root}/like.ark", output="log-likelihood")
    assert "has no averaged-posterior priors" in capsys.readouterr().err
    post = dict(kaldiio.load_ark(str(root / "post.ark")))
    like = dict(kaldiio.load_ark(str(root / "like.ark")))
    freq = CLASS_COUNTS / CLASS_COUNTS.sum()
    for key in utts:
        seen = [0, 2, 3, 4, 5]
        np.testing.assert_allclose(like[key][:, seen], post[key][:, seen] - np.log(freq[seen]), rtol=1e-6, atol=1e-5)
        np.testing.assert_allclose(like[key][:, 1], post[key][:, 1] - DISABLED, rtol=1e-6)
        assert not (like[key].argmax(1) == 1).any()


def test_log_likelihood_with_averaged_priors_scale_and_posteriors(setup, tmp_path, capsys):
    root, _, utts = setup
    p = np.array([0.3, 0.05, 0.2, 0.2, 0.05, 0.2])
    model = make_model(tmp_path / "p.h5", posterior_priors=p)
    inference.forward(model, str(root / "feats.scp"), f"ark:{root}/post.ark")
    inference.forward(model, str(root / "feats.scp"), f"ark:{root}/like.ark", output="log-likelihood",
                      prior_scale=0.7)
    inference.forward(model, str(root / "feats.scp"), f"ark:{root}/prob.ark", output="posterior")
    assert "no averaged-posterior priors" not in capsys.readouterr().err
    post, like, prob = (dict(kaldiio.load_ark(str(root / f"{n}.ark"))) for n in ("post", "like", "prob"))
    for key in utts:
        seen = [0, 2, 3, 4, 5]
        np.testing.assert_allclose(like[key][:, seen], post[key][:, seen] - 0.7 * np.log(p[seen]),
                                   rtol=1e-6, atol=1e-5)
        np.testing.assert_allclose(like[key][:, 1], post[key][:, 1] - DISABLED, rtol=1e-6)
        np.testing.assert_allclose(prob[key], np.exp(post[key]), rtol=1e-6)
    # --prior-floor is on the training frequency: 10/200 = 0.05 < 0.06 also disables class 4
    inference.forward(model, str(root / "feats.scp"), f"ark:{root}/f.ark", output="log-likelihood",
                      prior_floor=0.06)
    floored = dict(kaldiio.load_ark(str(root / "f.ark")))
    np.testing.assert_allclose(floored["utt0"][:, 4], post["utt0"][:, 4] - DISABLED, rtol=1e-6)


def test_out_ark_stdout_carries_only_the_archive(setup):
    """ngsgd-forward ... --out ark:- | reader: the reader sees a clean archive."""
    root, model, utts = setup
    reader = ("import sys, kaldiio, numpy as np\n"
              "d = dict(kaldiio.load_ark(sys.stdin.buffer))\n"
              "np.savez(sys.argv[1], **d)\n")
    env = dict(os.environ, OMP_NUM_THREADS="1", OPENBLAS_NUM_THREADS="1")
    fwd = subprocess.Popen([sys.executable, "-m", "ngsgd_mpi.inference", "forward", "--model", model,
                            "--feats", f"ark:cat {root}/feats.ark |", "--output", "log-likelihood",
                            "--out", "ark:-"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env)
    read = subprocess.run([sys.executable, "-c", reader, str(root / "piped.npz")], stdin=fwd.stdout,
                          capture_output=True, timeout=120)
    fwd.stdout.close()
    err = fwd.stderr.read().decode()
    fwd.stderr.close()
    assert fwd.wait(timeout=120) == 0 and read.returncode == 0, err + read.stderr.decode()
    assert "ngsgd-forward: 9 utterances" in err                     # messages on stderr
    inference.forward(model, str(root / "feats.scp"), f"ark:{root}/direct.ark", output="log-likelihood")
    direct = dict(kaldiio.load_ark(str(root / "direct.ark")))
    with np.load(root / "piped.npz") as piped:
        assert list(piped.keys()) == list(utts)
        for key in utts:
            np.testing.assert_array_equal(piped[key], direct[key])


def data_dir(root, utts, speakers=2):
    """A Kaldi data directory: feats.scp, utt2spk (utterances round-robin over speakers), cmvn.scp."""
    d = root / "data"
    d.mkdir()
    feats = {k: v[0] for k, v in utts.items()}
    kaldiio.save_ark(str(d / "feats.ark"), feats, scp=str(d / "feats.scp"))
    spk = {k: f"spk{i % speakers}" for i, k in enumerate(utts)}
    (d / "utt2spk").write_text("".join(f"{k} {s}\n" for k, s in spk.items()))
    stats = {}
    for s in sorted(set(spk.values())):
        x = np.concatenate([feats[k] for k in utts if spk[k] == s]).astype(np.float64)
        stats[s] = np.vstack([np.append(x.sum(0), len(x)), np.append((x ** 2).sum(0), 0)])
    kaldiio.save_ark(str(d / "cmvn.ark"), stats, scp=str(d / "cmvn.scp"))
    return d, spk, stats


@pytest.mark.parametrize("cmvn", [Cmvn(True, False), Cmvn(True, True), None])
def test_forward_data_dir_applies_the_models_cmvn(setup, tmp_path, cmvn):
    root, _, utts = setup
    d, spk, stats = data_dir(tmp_path, utts)
    model = make_model(tmp_path / "m.h5", pipeline=InputPipeline(cmvn, "pdf"))
    inference.forward(model, None, f"ark:{tmp_path}/o.ark", data_dir=str(d), batch_frames=13)
    out = dict(kaldiio.load_ark(str(tmp_path / "o.ark")))
    assert list(out) == list(utts)
    for key, (feats, _) in utts.items():
        s = stats[spk[key]]
        mean = s[0, :-1] / s[0, -1]
        x = feats.astype(np.float64)
        if cmvn is not None:
            x = x - mean
            if cmvn.norm_vars:
                x = x / np.sqrt(s[1, :-1] / s[0, -1] - mean ** 2)
        np.testing.assert_allclose(out[key], reference_log_probs(model, x.astype(np.float32)), atol=5e-5)


def test_forward_data_dir_bad_input(setup, tmp_path, capsys):
    root, old_model, utts = setup
    d, _, _ = data_dir(tmp_path, utts)
    model = make_model(tmp_path / "m.h5", pipeline=InputPipeline(Cmvn(), "pdf"))
    (d / "utt2spk").write_text((d / "utt2spk").read_text().replace("utt3 spk1", "utt3 spk7"))
    cases = [([old_model, str(d)], "the model does not say which input pipeline it was trained with"),
             ([model, str(d)], "cmvn.scp: no CMVN statistics for speaker 'spk7' (of utterance 'utt3')"),
             ([model, str(tmp_path / "none")], "not a directory"),
             ([model, str(d)], "feats.ark: file does not exist")]
    for (m, dd), message in cases:
        if "feats.ark" in message:
            os.remove(d / "feats.ark")
        code = inference.forward_main(["--model", m, "--data", dd, "--out", f"ark,scp:{tmp_path}/o.ark,"
                                       f"{tmp_path}/o.scp"])
        err = capsys.readouterr().err
        assert code == 2 and err.startswith("ngsgd-forward: error: ") and message in err, err
        assert len(err.splitlines()) == 1
    assert not [n for n in os.listdir(tmp_path) if n.startswith("o.")]


def test_forward_yesno_data_dir_through_a_pipe(tmp_path):
    """A Kaldi recipe's test directory (compressed features, CMVN stats) -> ark:- -> a reader."""
    model = make_model(tmp_path / "m.h5", pipeline=InputPipeline(Cmvn(), "pdf"), feat_dim=13,
                       posterior_priors=np.full(NUM_CLASSES, 1 / NUM_CLASSES))
    env = dict(os.environ, OMP_NUM_THREADS="1", OPENBLAS_NUM_THREADS="1")
    reader = f"{sys.executable} -c 'import sys, kaldiio, numpy as np; np.savez(sys.argv[1], " \
             f"**dict(kaldiio.load_ark(sys.stdin.buffer)))' {tmp_path}/out.npz"
    res = subprocess.run(f"{sys.executable} -m ngsgd_mpi.inference forward --model {model} --data data/test "
                         f"--output log-likelihood --out ark:- | {reader}", shell=True, cwd=YESNO,
                         capture_output=True, text=True, timeout=120, env=env)
    assert res.returncode == 0 and res.stdout == "", res.stderr
    assert res.stderr.strip() == "ngsgd-forward: 9 utterances, 5,611 frames, log-likelihood -> ark:-"
    (_, stats, _), = SequentialTable(f"{YESNO}/mfcc/cmvn_test.ark")
    raw = {k: v for k, v, _ in SequentialTable(f"{YESNO}/mfcc/raw_mfcc_test.1.ark")}
    with np.load(tmp_path / "out.npz") as out:
        assert sorted(out.keys()) == sorted(raw)
        for key, feats in raw.items():
            x = (feats - stats[0, :13] / stats[0, 13]).astype(np.float32)
            expected = reference_log_probs(model, x) - np.log(1 / NUM_CLASSES)
            expected[:, 1] = reference_log_probs(model, x)[:, 1] - DISABLED
            np.testing.assert_allclose(out[key], expected, rtol=1e-6, atol=5e-5)


def forward_two_ranks(*argv):
    mpiexec = os.path.join(os.path.dirname(sys.executable), "mpiexec")
    env = dict(os.environ, OMP_NUM_THREADS="1", OPENBLAS_NUM_THREADS="1")
    return subprocess.run([mpiexec, "-n", "2", sys.executable, "-m", "ngsgd_mpi.inference", "forward",
                           *argv], capture_output=True, text=True, timeout=120, env=env)


def test_forward_with_two_ranks_equals_one_rank(setup):
    root, model, utts = setup
    inference.forward(model, str(root / "feats.scp"), f"ark,scp:{root}/one.ark,{root}/one.scp",
                      output="log-likelihood")
    res = forward_two_ranks("--model", model, "--feats", str(root / "feats.scp"),
                            "--output", "log-likelihood", "--batch-frames", "16",
                            "--out", f"ark,scp:{root}/two.ark,{root}/two.scp")
    assert res.returncode == 0, res.stdout + res.stderr
    assert res.stdout == "" and "9 utterances" in res.stderr
    one, two = kaldiio.load_scp(str(root / "one.scp")), kaldiio.load_scp(str(root / "two.scp"))
    assert list(two) == list(one) == list(utts)                   # input order, not rank order
    for key in utts:
        np.testing.assert_allclose(two[key], one[key], rtol=1e-5, atol=1e-6)
    rank_keys = [list(kaldiio.load_scp(str(root / f"two.{r}.scp"))) for r in range(2)]
    assert rank_keys == [list(utts)[0::2], list(utts)[1::2]]
    assert {line.split()[1].rsplit(":", 1)[0] for line in (root / "two.scp").read_text().splitlines()} == \
        {f"{root}/two.0.ark", f"{root}/two.1.ark"}


def test_bad_utterance_on_one_rank_stops_both_and_leaves_no_output(setup, tmp_path):
    root, model, utts = setup
    feats = {k: v[0] for k, v in utts.items()}
    feats["utt7"] = np.zeros((5, FEAT_DIM + 1), np.float32)          # utterance 7 goes to rank 1
    kaldiio.save_ark(str(tmp_path / "bad.ark"), feats, scp=str(tmp_path / "bad.scp"))
    res = forward_two_ranks("--model", model, "--feats", str(tmp_path / "bad.scp"),
                            "--out", f"ark,scp:{tmp_path}/o.ark,{tmp_path}/o.scp")
    assert res.returncode == 2, res.stdout + res.stderr
    assert res.stderr == (f"ngsgd-forward: error: {tmp_path}/bad.scp: utterance 'utt7' has 5-dim "
                          f"features, the model expects 4\n")
    assert not [name for name in os.listdir(tmp_path) if name.startswith("o.")]


def test_forward_bad_input(setup, tmp_path, capsys):
    root, model, _ = setup
    no_priors = make_model(tmp_path / "np.h5", class_counts=None)
    record, meta = storage.read(make_model(tmp_path / "nc.h5"), MODEL_FORMAT)
    del meta["context"]
    storage.write(str(tmp_path / "nc.h5"), MODEL_FORMAT, record, meta)
    no_context = str(tmp_path / "nc.h5")
    base = ["--feats", str(root / "feats.scp"), "--out", f"ark,scp:{tmp_path}/o.ark,{tmp_path}/o.scp"]
    cases = [
        (["--model", no_priors, "--output", "log-likelihood"] + base, "no priors stored"),
        (["--model", no_context] + base, "context None does not divide input_dim 20"),
        (["--model", model, "--context", "1"] + base,
         "input_dim 20 is not a multiple of 2 * context + 1 = 3"),
        (["--model", model, "--feats", str(root / "none.scp"), "--out", f"ark:{tmp_path}/o.ark"],
         "none.scp: file does not exist"),
        (["--model", model, "--feats", f"ark:cat {root}/none.ark |", "--out", f"ark:{tmp_path}/o.ark"],
         "failed (exit status 1)"),
        (["--model", model, "--feats", str(root / "feats.scp"), "--out", f"{tmp_path}/o.ark"],
         "--out must be a Kaldi wspecifier"),
    ]
    for argv, message in cases:
        assert inference.forward_main(argv) == 2
        err = capsys.readouterr().err
        assert err.startswith("ngsgd-forward: error: ") and message in err, err
    assert not (tmp_path / "o.ark").exists()


def test_forward_removes_partial_output_on_bad_utterance(setup, tmp_path):
    root, model, utts = setup
    bad = dict((k, v[0]) for k, v in utts.items())
    bad["utt7"] = np.zeros((5, FEAT_DIM + 1), np.float32)
    kaldiio.save_ark(str(tmp_path / "bad.ark"), bad)
    with pytest.raises(inference.InferenceError, match="'utt7' has 5-dim features, the model expects 4"):
        inference.forward(model, str(tmp_path / "bad.ark"), f"ark,scp:{tmp_path}/o.ark,{tmp_path}/o.scp",
                          batch_frames=10)
    assert not (tmp_path / "o.ark").exists() and not (tmp_path / "o.scp").exists()


def direct_eval(model, utts):
    """Objective, accuracy, per-class accuracy by plain NumPy over all frames."""
    lp = np.concatenate([reference_log_probs(model, f).astype(np.float64) for f, _ in utts.values()])
    labels = np.concatenate([lab for _, lab in utts.values()]).astype(np.int64)
    correct = lp.argmax(1) == labels
    per_class = {c: (int((labels == c).sum()), correct[labels == c].mean() if (labels == c).any() else None)
                 for c in range(NUM_CLASSES)}
    return lp[np.arange(len(labels)), labels].mean(), correct.mean(), per_class, len(labels)


def check_eval(result, model, utts):
    objective, accuracy, per_class, frames = direct_eval(model, utts)
    assert result["frames"] == frames and result["utterances"] == len(utts)
    assert result["objective"] == pytest.approx(objective, rel=1e-5)
    assert result["frame_accuracy"] == pytest.approx(accuracy, abs=1e-12)
    for row in result["per_class"]:
        n, acc = per_class[row["class"]]
        assert row["frames"] == n
        assert (row["accuracy"] is None) if acc is None else row["accuracy"] == pytest.approx(acc, abs=1e-12)


def test_eval_on_a_partition_equals_numpy(setup, capsys):
    root, model, utts = setup
    assert inference.eval_main(["--model", model, "--data", str(root / "part.h5"),
                                "--json", str(root / "eval.json"), "--batch-frames", "32"]) == 0
    result = json.loads((root / "eval.json").read_text())
    check_eval(result, model, utts)
    printed = capsys.readouterr().out
    assert f"objective (log-prob/frame) {result['objective']:.6f}" in printed
    assert f"frame accuracy             {100 * result['frame_accuracy']:.2f} %" in printed


def test_eval_on_kaldi_features_with_alignment(setup, tmp_path):
    root, model, utts = setup
    kept = dict(utts)
    feats = {k: v[0] for k, v in utts.items()}
    alis = {k: v[1] for k, v in utts.items()}
    alis["utt3"] = alis["utt3"][:-1] if len(alis["utt3"]) > 1 else alis["utt3"]   # trimmed, still used
    kept["utt3"] = (feats["utt3"][:len(alis["utt3"])], alis["utt3"])
    del alis["utt5"]                                                              # skipped
    del kept["utt5"]
    kaldiio.save_ark(str(tmp_path / "ali.ark"), alis)
    result = inference.evaluate(model, str(root / "feats.scp"), str(tmp_path / "ali.ark"), batch_frames=20)
    check_eval(result, model, kept)
    assert result["skipped"] == {"missing_labels": 1}
    with pytest.raises(inference.InferenceError, match="--ali is needed"):
        inference.evaluate(model, str(root / "feats.scp"))


def test_eval_rejects_mismatched_data(setup, tmp_path, capsys):
    root, model, utts = setup
    data.write_partition(tmp_path / "other.h5", [("a", np.zeros((3, FEAT_DIM + 1)), np.zeros(3, int))],
                         FEAT_DIM + 1, NUM_CLASSES)
    assert inference.eval_main(["--model", model, "--data", str(tmp_path / "other.h5")]) == 2
    assert "feat_dim is 5, expected 4" in capsys.readouterr().err


def test_eval_on_a_data_dir_uses_the_models_cmvn(setup, tmp_path):
    root, _, utts = setup
    d, spk, stats = data_dir(tmp_path, utts)
    model = make_model(tmp_path / "m.h5", pipeline=InputPipeline(Cmvn(True, False), "pdf"))
    normalised = {}
    for key, (feats, _) in utts.items():
        s = stats[spk[key]]
        normalised[key] = (feats.astype(np.float64) - s[0, :-1] / s[0, -1]).astype(np.float32)
    kaldiio.save_ark(str(tmp_path / "cmvn_feats.ark"), normalised)
    via_dir = inference.evaluate(model, str(d), f"ark:{root}/ali.ark")
    via_feats = inference.evaluate(model, str(tmp_path / "cmvn_feats.ark"), f"ark:{root}/ali.ark")
    assert via_dir["frames"] == via_feats["frames"] == sum(len(v[1]) for v in utts.values())
    assert via_dir["objective"] == pytest.approx(via_feats["objective"], abs=1e-5)
    assert via_dir["frame_accuracy"] == pytest.approx(via_feats["frame_accuracy"], abs=2e-3)
