"""ngsgd-decode (ngsgd_mpi/decode.py): Kaldi's yesno run, a graph with known answers, bad input, MPI."""

import os
import shutil
import sys

import numpy as np
import pytest

import synthetic
import yesno
from ngsgd_mpi import decode, faults, inference
from ngsgd_mpi.kaldi.pipeline import InputPipeline
from ngsgd_mpi.kaldi.fst import ARC_DTYPE, ArcFst, parse_text_fst, write_fst
from ngsgd_mpi.kaldi.model import HmmTopology, TransitionModel
from ngsgd_mpi.model import Model
from ngsgd_mpi.network import Network, NetworkConfig

kaldiio = pytest.importorskip("kaldiio")
pytest.importorskip("numba")
pytest.importorskip("kaldialign")


def run_decode(*argv):
    """main() in this process; returns (exit code, stdout, stderr)."""
    import contextlib
    import io

    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = decode.main([str(a) for a in argv])
    return code, out.getvalue(), err.getvalue()


@pytest.fixture(scope="module")
def yesno_loglikes(tmp_path_factory):
    yesno.require()
    root = tmp_path_factory.mktemp("yesno")
    kaldiio.save_ark(str(root / "ll.ark"), yesno.loglikes(), scp=str(root / "ll.scp"))
    return root / "ll.scp"


def decode_log(out_dir):
    """utterance -> (words, log-like per frame) from our log/decode.log."""
    result, words = {}, {}
    with open(os.path.join(out_dir, "log", "decode.log")) as f:
        for line in f:
            fields = line.split()
            if line.startswith("Log-like per frame"):
                result[fields[5]] = (words[fields[5]], float(fields[7]))
            elif not line.startswith("WARNING"):
                words[fields[0]] = fields[1:]
    return result


def test_yesno_gives_kaldis_words_and_likelihoods(yesno_loglikes, tmp_path):
    """GMM log-likelihoods of Kaldi's final.mdl on apply-cmvn + add-deltas features,
    decoded on Kaldi's const HCLG.fst: Kaldi's words for all 29 utterances, its
    per-frame log-likelihood of the best path, its hypothesis files byte for byte."""
    out = tmp_path / "decode"
    code, stdout, stderr = run_decode("--graph-dir", yesno.GRAPH, "--loglikes", f"scp:{yesno_loglikes}",
                                      "--acwt", yesno.ACWT, "--ref", yesno.TEXT, "--out", out)
    assert code == 0, stderr
    kaldi = yesno.kaldi_decode_log()
    ours = decode_log(out)
    assert len(kaldi) == 29 and list(ours) == list(kaldi)
    for utt, (words, like, _) in kaldi.items():
        assert ours[utt][0] == words
        assert ours[utt][1] == pytest.approx(like, abs=2e-5)       # Kaldi prints 6 digits
    kaldi_scoring = os.path.join(yesno.DECODE, "scoring_kaldi")
    with open(os.path.join(kaldi_scoring, "best_wer")) as f:
        kaldi_best = f.read().split(" exp/")[0]
    with open(out / "scoring_kaldi" / "best_wer") as f:
        assert f.read().startswith(kaldi_best)
    for lmwt in range(7, 18):
        with open(os.path.join(kaldi_scoring, "penalty_0.0", f"{lmwt}.txt"), "rb") as f:
            assert (out / "scoring_kaldi" / "penalty_0.0" / f"{lmwt}.txt").read_bytes() == f.read()
    assert "WER 0.00 %" in stdout and not any(p.name.startswith(".part") for p in out.iterdir())


def test_two_ranks_equal_one(tmp_path):
    yesno.require()
    kaldiio.save_ark(str(tmp_path / "ll.ark"), dict(list(yesno.loglikes().items())[:7]), scp=str(tmp_path / "ll.scp"))
    args = ["--graph-dir", yesno.GRAPH, "--loglikes", f"scp:{tmp_path}/ll.scp", "--acwt", yesno.ACWT,
            "--ref", yesno.TEXT, "--lmwt", "9:10", "--word-ins-penalty", "0.0,1.5"]
    assert run_decode(*args, "--out", tmp_path / "one")[0] == 0
    res = synthetic.run([synthetic.mpiexec(), "-n", "2", sys.executable, "-m", "ngsgd_mpi.decode", *map(str, args),
                         "--out", str(tmp_path / "two")], timeout=240)
    assert res.returncode == 0, res.stdout + res.stderr
    for name in ("scoring_kaldi/penalty_0.0/9.txt", "scoring_kaldi/penalty_1.5/10.txt", "wer_10_1.5",
                 "scoring_kaldi/best_wer"):
        one = (tmp_path / "one" / name).read_text().replace(str(tmp_path / "one"), "")
        assert one == (tmp_path / "two" / name).read_text().replace(str(tmp_path / "two"), "")
    assert decode_log(tmp_path / "one") == decode_log(tmp_path / "two")


# --------------------------------------------------------------------------- a graph with known answers

TOPOLOGY = ("<Topology> <TopologyEntry> <ForPhones> 1 2 3 </ForPhones> <State> 0 <PdfClass> 0 "
            "<Transition> 0 0.5 <Transition> 1 0.5 </State> <State> 1 </State> </TopologyEntry> </Topology>")


def tiny_graph(root):
    """Phones 1..3 with one pdf each (pdf = phone - 1; tid 2p - 1 loops, 2p exits) and
    HCLG = (A | B | C)+ where word w spells phone w: the answer is the phone sequence."""
    tm = TransitionModel(HmmTopology.from_text(TOPOLOGY), [(p, 0, p - 1, p - 1) for p in (1, 2, 3)])
    lines = []
    for p in (1, 2, 3):             # word p: enter with the exit tid, loop, back to 0 by an epsilon
        lines += [f"0 {p} {2 * p} {p} 0.5", f"{p} {p} {2 * p - 1} 0 0.1", f"{p} 0 0 0 0.3"]
    lines += ["0"]
    graph = root / "graph"
    graph.mkdir()
    write_fst(parse_text_fst("\n".join(lines), "tiny"), str(graph / "HCLG.fst"))
    (graph / "words.txt").write_text("<eps> 0\nA 1\nB 2\nC 3\n")
    (graph / "trans.mdl").write_text(tm.to_text())
    return graph, tm


def one_hot_loglikes(pdfs, good=0.0, bad=-8.0):
    ll = np.full((len(pdfs), 3), bad, np.float32)
    ll[np.arange(len(pdfs)), pdfs] = good
    return ll


def test_known_answers(tmp_path):
    graph, _ = tiny_graph(tmp_path)
    utts = {"u1": one_hot_loglikes([0] * 6 + [1] * 5 + [2] * 4), "u2": one_hot_loglikes([2] * 3 + [0] * 8),
            "u3": one_hot_loglikes([1] * 12)}
    kaldiio.save_ark(str(tmp_path / "ll.ark"), utts)
    (tmp_path / "ref").write_text("u1 A B C\nu2 C A\nu3 B B\n")           # one B too many for u3
    out = tmp_path / "decode"
    code, stdout, stderr = run_decode("--graph-dir", graph, "--loglikes", f"ark:{tmp_path}/ll.ark",
                                      "--ref", tmp_path / "ref", "--out", out, "--lmwt", "10:11")
    assert code == 0, stderr
    for wip in ("0.0", "0.5", "1.0"):
        assert (out / "scoring_kaldi" / f"penalty_{wip}" / "10.txt").read_text() == "u1 A B C \nu2 C A \nu3 B \n"
    assert (out / "scoring_kaldi" / "best_wer").read_text().startswith("%WER 14.29 [ 1 / 7, 0 ins, 1 del, 0 sub ]")


def test_network_log_likelihoods_are_ngsgd_forwards(tmp_path):
    """--model --data runs the network exactly as ngsgd-forward --output log-likelihood."""
    graph, tm = tiny_graph(tmp_path)
    context, feat_dim = 1, 4
    cfg = NetworkConfig(input_dim=feat_dim * 3, num_classes=tm.num_pdfs, num_hidden_layers=1,
                        pnorm_input_dim=10, pnorm_output_dim=5)
    network = Network(cfg, seed=0)
    model = str(tmp_path / "model.h5")
    Model(cfg, network.params, context, np.zeros(feat_dim * 3), np.ones(feat_dim * 3), np.array([5, 3, 2]),
          input_pipeline=InputPipeline(None, "pdf")).save(model)
    data = tmp_path / "data"
    data.mkdir()
    rng = np.random.default_rng(0)
    feats = {f"u{i}": rng.standard_normal((int(rng.integers(3, 9)), feat_dim)).astype(np.float32) for i in range(5)}
    kaldiio.save_ark(str(data / "feats.ark"), feats, scp=str(data / "feats.scp"))
    inference.forward(model, str(data / "feats.scp"), f"ark:{tmp_path}/like.ark", output="log-likelihood")
    expect = dict(kaldiio.load_ark(str(tmp_path / "like.ark")))
    got = dict(decode.network_log_likelihoods(model, str(data), 0, 1, batch_frames=7))
    assert list(got) == list(feats)
    for utt in feats:
        np.testing.assert_allclose(got[utt], expect[utt], rtol=1e-6, atol=1e-6)
    code, _, stderr = run_decode("--graph-dir", graph, "--model", model, "--data", data, "--out", tmp_path / "d")
    assert code == 0, stderr
    assert len((tmp_path / "d" / "scoring_kaldi" / "penalty_0.0" / "7.txt").read_text().splitlines()) == 5


# --------------------------------------------------------------------------- bad input

def assert_bad(code, stderr, match, out=None):
    assert code == faults.EXIT_BAD_INPUT
    lines = stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("ngsgd-decode: error: ") and match in lines[0], stderr
    if out is not None and os.path.isdir(out):
        assert not os.path.exists(os.path.join(out, "scoring_kaldi"))
        assert not [n for n in os.listdir(out) if n.startswith(".part")]


def test_bad_input_is_one_line(yesno_loglikes, tmp_path):
    graph, tm = tiny_graph(tmp_path)
    ok = ["--loglikes", f"scp:{yesno_loglikes}", "--acwt", yesno.ACWT]
    out = tmp_path / "out"
    # the yesno graph's transition-ids (up to 30) against the tiny model's 6
    assert_bad(*run_decode("--graph-dir", yesno.GRAPH, "--transition-model", graph / "trans.mdl", *ok,
                           "--out", out)[::2], "exceeds the 6 transition-ids", out)
    # words.txt that does not hold the graph's words
    broken = tmp_path / "broken"
    shutil.copytree(yesno.GRAPH, broken)
    (broken / "words.txt").write_text("<eps> 0\n<SIL> 1\nNO 2\n")
    shutil.copy(os.path.join(yesno.EXP, "final.mdl"), tmp_path / "final.mdl")
    assert_bad(*run_decode("--graph-dir", broken, *ok, "--out", out)[::2], "does not match", out)
    # a truncated HCLG.fst
    (broken / "words.txt").write_text(open(os.path.join(yesno.GRAPH, "words.txt")).read())
    (broken / "HCLG.fst").write_bytes(open(os.path.join(yesno.GRAPH, "HCLG.fst"), "rb").read()[:500])
    assert_bad(*run_decode("--graph-dir", broken, *ok, "--out", out)[::2], "truncated", out)
    write_fst(ArcFst(-1, np.zeros(0, np.float32), np.zeros(1, np.int64), np.zeros(0, ARC_DTYPE)),
              str(broken / "HCLG.fst"))
    assert_bad(*run_decode("--graph-dir", broken, *ok, "--out", out)[::2], "the graph is empty", out)
    # a reference without one of the decoded utterances
    ref = tmp_path / "ref"
    ref.write_text("".join(open(yesno.TEXT).readlines()[1:]))
    assert_bad(*run_decode("--graph-dir", yesno.GRAPH, *ok, "--ref", ref, "--out", out)[::2],
               "no reference for utterance '1_0_0_0_0_0_0_0'", out)
    # log-likelihoods of another model (10 pdfs instead of 11)
    kaldiio.save_ark(str(tmp_path / "ten.ark"), {"x": np.zeros((5, 10), np.float32)})
    assert_bad(*run_decode("--graph-dir", yesno.GRAPH, "--loglikes", f"ark:{tmp_path}/ten.ark",
                           "--out", out)[::2], "11 pdfs", out)
    # options
    assert_bad(*run_decode("--graph-dir", yesno.GRAPH, *ok, "--lmwt", "9:7", "--out", out)[::2], "--lmwt")
    assert_bad(*run_decode("--graph-dir", yesno.GRAPH, "--data", tmp_path, "--out", out)[::2], "--model")
    assert_bad(*run_decode("--graph-dir", tmp_path, *ok, "--out", out)[::2], "--transition-model")


def test_a_bad_utterance_on_one_rank_fails_the_job(tmp_path):
    yesno.require()
    lls = dict(list(yesno.loglikes().items())[:6])
    lls[list(lls)[3]] = np.full((7, 11), np.nan, np.float32)          # utterance 3 goes to rank 1
    kaldiio.save_ark(str(tmp_path / "bad.ark"), lls, scp=str(tmp_path / "bad.scp"))
    res = synthetic.run([synthetic.mpiexec(), "-n", "2", sys.executable, "-m", "ngsgd_mpi.decode",
                         "--graph-dir", yesno.GRAPH, "--loglikes", f"scp:{tmp_path}/bad.scp",
                         "--out", str(tmp_path / "out")], timeout=240)
    assert res.returncode == faults.EXIT_BAD_INPUT, res.stdout + res.stderr
    assert res.stderr.strip().endswith("log-likelihoods are not all finite") and res.stderr.count("error:") == 1
    assert not os.path.exists(tmp_path / "out" / "scoring_kaldi")
