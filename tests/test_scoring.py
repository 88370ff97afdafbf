"""Kaldi-format scoring (ngsgd_mpi/scoring.py): compute-wer lines, best_wer, the file layout."""

import os

import pytest

from ngsgd_mpi import scoring

pytest.importorskip("kaldialign")
KALDI = os.path.join(os.path.dirname(__file__), "..", "..", "shared", "kaldi", "yesno_decode", "exp", "mono0a",
                     "decode_test_yesno", "scoring_kaldi")


def test_counts_and_lines():
    ref = {"u1": "a b c d".split(), "u2": "e f".split(), "u3": "g".split()}
    hyp = {"u1": "a x c d d".split(), "u2": "e f".split()}
    counts = scoring.count_errors(ref, hyp)
    assert (counts.words, counts.insertions, counts.deletions, counts.substitutions) == (6, 1, 0, 1)
    assert (counts.sentences, counts.sentence_errors, counts.absent) == (2, 1, 1)
    assert counts.lines() == ("%WER 33.33 [ 2 / 6, 1 ins, 0 del, 1 sub ] [PARTIAL]\n"
                              "%SER 50.00 [ 1 / 2 ]\n"
                              "Scored 2 sentences, 1 not present in hyp.\n")


def test_hypothesis_lines_are_int2sym_style():
    assert scoring.hyp_line("u1", ["YES", "NO"]) == "u1 YES NO \n"
    assert scoring.hyp_line("u2", []) == "u2 \n"


def test_best_wer_layout_and_ties(tmp_path):
    ref = tmp_path / "text"
    ref.write_text("u1 a b c\nu2 d e\n")
    hyps = {(7, "0.0"): {"u1": ["a", "b"], "u2": ["d", "e"]},           # 20.00
            (8, "0.0"): {"u1": ["a", "b", "c"], "u2": ["d"]},            # 20.00: a tie, the first stays
            (7, "0.5"): {"u1": ["a", "b", "c"], "u2": ["d", "e", "f"]},  # 20.00
            (8, "0.5"): {"u1": ["a", "x", "c"], "u2": ["d", "e", "e"]}}  # 40.00
    out = str(tmp_path / "decode")
    scoring.write_hypotheses(out, hyps)
    line, counts, lmwt, wip = scoring.score(out, str(ref), hyps, ["0.0", "0.5"], [7, 8])
    assert (lmwt, wip) == (7, "0.0")
    assert line == f"%WER 20.00 [ 1 / 5, 0 ins, 1 del, 0 sub ] {out}/wer_7_0.0"
    assert (tmp_path / "decode" / "scoring_kaldi" / "best_wer").read_text() == line + "\n"
    assert (tmp_path / "decode" / "scoring_kaldi" / "penalty_0.5" / "8.txt").read_text() == \
        "u1 a x c \nu2 d e e \n"
    assert (tmp_path / "decode" / "wer_8_0.5").read_text().startswith("%WER 40.00 [ 2 / 5, 1 ins, 0 del, 1 sub ]")
    assert (tmp_path / "decode" / "scoring_kaldi" / "test_filt.txt").read_text() == ref.read_text()
    assert (tmp_path / "decode" / "scoring_kaldi" / "wer_details" / "lmwt").read_text() == "7\n"


def test_kaldis_own_files(tmp_path):
    """Kaldi's yesno hypotheses, scored here, give Kaldi's best_wer line."""
    if not os.path.isdir(KALDI):
        pytest.skip("shared Kaldi files not available")
    lmwts = list(range(7, 18))
    hyps = {(lmwt, "0.0"): scoring.read_text(os.path.join(KALDI, "penalty_0.0", f"{lmwt}.txt")) for lmwt in lmwts}
    out = str(tmp_path / "exp")
    line, *_ = scoring.score(out, os.path.join(KALDI, "test_filt.txt"), hyps, ["0.0"], lmwts)
    with open(os.path.join(KALDI, "best_wer")) as f:
        kaldi = f.read().strip()
    assert line.rsplit(" ", 1)[0] == kaldi.rsplit(" ", 1)[0] == "%WER 0.00 [ 0 / 232, 0 ins, 0 del, 0 sub ]"
    assert line.endswith("/wer_7_0.0") and kaldi.endswith("/wer_7_0.0")


def test_missing_reference_and_bad_text(tmp_path):
    ref = tmp_path / "text"
    ref.write_text("u1 a\n")
    with pytest.raises(scoring.ScoringError, match="no reference for utterance 'u2'"):
        scoring.score(str(tmp_path / "d"), str(ref), {(7, "0.0"): {"u1": ["a"], "u2": []}}, ["0.0"], [7])
    ref.write_text("u1 a\nu1 b\n")
    with pytest.raises(scoring.ScoringError, match="appears twice"):
        scoring.read_text(str(ref))
    with pytest.raises(scoring.ScoringError, match="cannot read"):
        scoring.read_text(str(tmp_path / "missing"))
