"""End-to-end tests of the corpus recipe (ngsgd_mpi/corpus/make_corpus.py).

These synthesise real speech with espeak-ng: they skip when the library is
missing, except in CI (CI set), where a missing install must fail loudly.
"""

import json
import os

import numpy as np
import pytest

from ngsgd_mpi.corpus import espeak, make_corpus
from ngsgd_mpi.corpus.demo import read_kaldi_split
from ngsgd_mpi.corpus.phones import PHONES

VOWELS = ("AA", "AE", "AH", "AO", "AW", "AY", "EH", "ER", "EY", "IH", "IY", "OW", "OY", "UH", "UW")
SIBILANTS = ("S", "SH", "Z")


def require_espeak():
    if not espeak.espeak_available():
        if os.environ.get("CI"):
            pytest.fail("espeak-ng is not installed in CI: apt-get install libespeak-ng1 espeak-ng-data")
        pytest.skip("espeak-ng library not installed")


def _read_table(path):
    with open(path, encoding="utf-8") as f:
        return [line.split() for line in f]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """~3.6 minutes, light noise, phone labels, 2 train + 1 test speakers, made through the CLI."""
    require_espeak()
    out = tmp_path_factory.mktemp("corpus")
    rc = make_corpus.main([str(out), "--hours", "0.06", "--noise", "light", "--labels", "phone",
                           "--num-speakers", "2", "--test-speakers", "1", "--jobs", "1", "--seed", "3",
                           "--text-sources", "pydoc"])
    assert rc == 0
    return out


def test_kaldi_dirs_are_complete_and_consistent(corpus):
    info = json.loads((corpus / "corpus_info.json").read_text())
    assert info["num_classes"] == 40 and info["unknown_phonemes"] == {}
    assert abs(info["splits"]["train"]["hours"] + info["splits"]["test"]["hours"] - 0.06) < 0.01
    for split in ("train", "test"):
        d = corpus / split
        ids, feats, labels = read_kaldi_split(str(d))
        assert ids and ids == [row[0] for row in _read_table(d / "utt2spk")]
        assert ids == [row[0] for row in _read_table(d / "text")]
        ali_txt = {row[0]: [int(x) for x in row[1:]] for row in _read_table(d / "ali.txt")}
        num_frames = {row[0]: int(row[1]) for row in _read_table(d / "utt2num_frames")}
        for utt, f, lab in zip(ids, feats, labels):
            assert f.shape == (len(lab), 40) and f.dtype == np.float32
            assert lab.dtype == np.int32 and 0 <= lab.min() and lab.max() < 40
            assert ali_txt[utt] == lab.tolist() and num_frames[utt] == len(lab)
            assert lab[0] == 0 and lab[-1] == 0          # padded with silence at both ends
        spk2utt = {row[0]: row[1:] for row in _read_table(d / "spk2utt")}
        assert sorted(u for us in spk2utt.values() for u in us) == ids
        # Per-speaker CMVN: each speaker's frames have zero mean, unit variance.
        for utts in spk2utt.values():
            stacked = np.concatenate([feats[ids.index(u)] for u in utts])
            np.testing.assert_allclose(stacked.mean(0), 0, atol=1e-3)
            np.testing.assert_allclose(stacked.std(0), 1, atol=1e-3)
        assert [row[0] for row in _read_table(d / "classes.txt")] == list(PHONES)


def test_alignments_match_the_acoustics(corpus):
    _, feats, labels = read_kaldi_split(str(corpus / "train"))
    feats, labels = np.concatenate(feats), np.concatenate(labels)
    # Kaldi mel bins: equally spaced on 1127 ln(1 + f / 700) between 20 Hz and 8 kHz.
    edges = np.linspace(1127.0 * np.log(1.0 + 20.0 / 700.0), 1127.0 * np.log(1.0 + 8000.0 / 700.0), 42)
    high_band = 700.0 * (np.exp(edges[1:-1] / 1127.0) - 1.0) > 4000.0
    sibilant = np.isin(labels, [PHONES.index(p) for p in SIBILANTS])
    vowel = np.isin(labels, [PHONES.index(p) for p in VOWELS])
    assert sibilant.sum() > 300 and vowel.sum() > 1000
    assert feats[sibilant][:, high_band].mean() > feats[vowel][:, high_band].mean() + 0.5
    energy = {p: feats[labels == i].mean() for i, p in enumerate(PHONES) if (labels == i).sum() >= 30}
    assert min(energy, key=energy.get) == "sil", energy


def test_train_and_test_are_disjoint_in_speakers_and_sentences(corpus):
    spk = {s: {row[1] for row in _read_table(corpus / s / "utt2spk")} for s in ("train", "test")}
    assert spk["train"] == {"s001", "s002"} and spk["test"] == {"t001"}
    text = {s: {" ".join(row[1:]) for row in _read_table(corpus / s / "text")} for s in ("train", "test")}
    assert text["train"] and text["test"] and not text["train"] & text["test"]
    info = json.loads((corpus / "corpus_info.json").read_text())
    assert info["speakers"]["t001"]["split"] == "test"


def test_output_depends_on_seed_not_on_jobs_and_triphones_work(tmp_path):
    require_espeak()
    runs = {}
    for jobs in (1, 2):
        config = make_corpus.CorpusConfig(hours=0.02, noise="medium", labels="triphone", num_speakers=1,
                                          test_speakers=1, jobs=jobs, seed=5, text_sources=("pydoc",),
                                          triphone_classes=300, min_class_frames=5)
        info = make_corpus.make_corpus(str(tmp_path / f"j{jobs}"), config, log=lambda *a: None)
        runs[jobs] = {s: read_kaldi_split(str(tmp_path / f"j{jobs}" / s)) for s in ("train", "test")}
        assert 120 < info["num_classes"] <= 300
    for split in ("train", "test"):
        ids1, feats1, labels1 = runs[1][split]
        ids2, feats2, labels2 = runs[2][split]
        assert ids1 == ids2
        for a, b in zip(feats1, feats2):
            np.testing.assert_array_equal(a, b)
        for a, b in zip(labels1, labels2):
            np.testing.assert_array_equal(a, b)
    # Triphone classes are in use, and monophone back-off too.
    train_labels = np.concatenate(runs[1]["train"][2])
    assert (train_labels >= 120).any() and ((train_labels < 120) & (train_labels > 2)).any()


def test_unmapped_phonemes_are_reported_and_their_utterances_skipped(tmp_path, monkeypatch):
    require_espeak()
    from ngsgd_mpi.corpus import phones

    monkeypatch.delitem(phones.ESPEAK_TO_ARPABET, "dZ")    # pretend the map lacks "j" as in "just"
    messages = []
    config = make_corpus.CorpusConfig(hours=0.01, noise="none", num_speakers=1, test_speakers=0,
                                      jobs=1, seed=1, text_sources=("pydoc",), accents=("en-us",))
    info = make_corpus.make_corpus(str(tmp_path / "c"), config, log=messages.append)
    assert info["unknown_phonemes"].get("dZ", 0) >= 1
    assert info["utterances_skipped_for_unknown_phonemes"] >= 1
    assert any("WARNING" in m and "dZ" in m for m in messages)
    labels = np.concatenate(read_kaldi_split(str(tmp_path / "c" / "train"))[2])
    assert not (labels == PHONES.index("JH")).any()


def test_missing_espeak_gives_one_clear_message(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(espeak, "_LIBRARY_NAMES", ("libespeak-ng-not-here.so.1",))
    monkeypatch.setattr(espeak.ctypes.util, "find_library", lambda name: None)
    monkeypatch.setattr(make_corpus, "get_synthesizer", espeak.load_library)
    assert make_corpus.main([str(tmp_path / "x"), "--hours", "0.01", "--text-sources", "pydoc"]) == 1
    err = capsys.readouterr().err
    assert "apt-get install libespeak-ng1 espeak-ng-data" in err and err.count("\n") == 1


def test_bad_options_are_rejected(tmp_path, capsys):
    assert make_corpus.main([str(tmp_path / "x"), "--hours", "0"]) == 1
    assert "hours must be > 0" in capsys.readouterr().err
    with pytest.raises(ValueError, match="accents"):
        make_corpus.CorpusConfig(accents=("en-au",)).validate()
    with pytest.raises(SystemExit):
        make_corpus.main([str(tmp_path / "x"), "--noise", "loud"])


def test_lang_dir_and_phone_text(corpus):
    info = json.loads((corpus / "corpus_info.json").read_text())
    assert info["lexicon"]["words"] > 30 and info["lexicon"]["train_words_without_pronunciation"] == 0
    lexicon = {row[0] for row in _read_table(corpus / "lang" / "lexiconp.txt")}
    assert {w for row in _read_table(corpus / "train" / "text") for w in row[1:]} == lexicon
    # phone_text is the alignment's phone sequence without silence (segments, so repeats stay apart)
    ali = {row[0]: [int(x) for x in row[1:]] for row in _read_table(corpus / "train" / "ali.txt")}
    phone_text = {row[0]: row[1:] for row in _read_table(corpus / "train" / "phone_text")}
    assert list(phone_text) == list(ali)

    def collapse(seq):
        return [p for i, p in enumerate(seq) if i == 0 or p != seq[i - 1]]
    for utt, labels in ali.items():
        assert collapse([PHONES[c] for c in collapse(labels) if c]) == collapse(phone_text[utt])


def test_corpus_to_graphs_to_wer_with_oracle_likelihoods(corpus, tmp_path):
    """The recipe's lang/ gives word and phone graphs that turn the training
    alignments (as one-hot log-likelihoods) back into the transcripts."""
    pytest.importorskip("numba")
    kaldiio = pytest.importorskip("kaldiio")
    from ngsgd_mpi import decode, graph

    loglikes = {}
    for utt, labels in kaldiio.load_ark(str(corpus / "train" / "ali.ark")):
        loglikes[utt] = np.full((len(labels), 40), -20.0, np.float32)
        loglikes[utt][np.arange(len(labels)), labels] = 0.0
    kaldiio.save_ark(str(tmp_path / "oracle.ark"), loglikes)
    for kind, ref, limit in (("word", "text", 2.0), ("phone", "phone_text", 5.0)):
        graph.make_graph(str(corpus), str(tmp_path / kind), kind, lm_order=2, log=lambda m: None)
        assert decode.main(["--graph-dir", str(tmp_path / kind), "--loglikes", f"ark:{tmp_path}/oracle.ark",
                            "--ref", str(corpus / "train" / ref), "--out", str(tmp_path / f"d{kind}")
                            ]) == 0
        best = (tmp_path / f"d{kind}" / "scoring_kaldi" / "best_wer").read_text().split()
        assert float(best[1]) < limit, best
