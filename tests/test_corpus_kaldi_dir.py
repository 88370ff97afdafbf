"""Tests of the Kaldi data-directory writer (ngsgd_mpi/corpus/kaldi_dir.py)."""

import os

import numpy as np
import pytest

from ngsgd_mpi.corpus import KaldiDataDirWriter, Utterance, write_kaldi_data_dir

kaldiio = pytest.importorskip("kaldiio")


def _utterances():
    rng = np.random.default_rng(0)
    return [Utterance(f"spk{s}-{u}", f"spk{s}", "HELLO WORLD",
                      rng.standard_normal((n, 40)).astype(np.float32),
                      rng.integers(0, 5, size=n).astype(np.int32))
            for s, u, n in ((2, 0, 7), (1, 1, 5), (1, 0, 9))]


def _read(path):
    with open(path, encoding="utf-8") as f:
        return [line.split() for line in f]


def test_written_directory_reads_back_with_kaldiio(tmp_path):
    utts = _utterances()
    summary = write_kaldi_data_dir(str(tmp_path / "d"), utts, ["a", "b", "c", "d", "e"],
                                   spk2gender={"spk1": "m", "spk2": "f"})
    assert summary == {"utterances": 3, "frames": 21}
    d = tmp_path / "d"
    feats = kaldiio.load_scp(str(d / "feats.scp"))
    ali = dict(kaldiio.load_ark(str(d / "ali.ark")))
    ids = [u.utt_id for u in sorted(utts, key=lambda u: u.utt_id)]
    assert list(feats.keys()) == ids == [row[0] for row in _read(d / "utt2spk")]
    for utt in utts:
        np.testing.assert_array_equal(feats[utt.utt_id], utt.feats)
        assert ali[utt.utt_id].dtype == np.int32
        np.testing.assert_array_equal(ali[utt.utt_id], utt.labels)
    ali_txt = {row[0]: [int(x) for x in row[1:]] for row in _read(d / "ali.txt")}
    assert ali_txt == {u.utt_id: u.labels.tolist() for u in utts}
    assert _read(d / "spk2utt") == [["spk1", "spk1-0", "spk1-1"], ["spk2", "spk2-0"]]
    assert _read(d / "text")[0] == ["spk1-0", "HELLO", "WORLD"]
    assert _read(d / "classes.txt")[4] == ["e", "4"]
    assert _read(d / "phones.txt")[:2] == [["<eps>", "0"], ["sil", "1"]]
    assert _read(d / "utt2num_frames")[0] == ["spk1-0", "9"]
    assert _read(d / "spk2gender") == [["spk1", "m"], ["spk2", "f"]]
    assert os.path.isabs(_read(d / "feats.scp")[0][1].split(":")[0])


def test_bad_input_is_rejected_with_a_clear_error(tmp_path):
    utts = _utterances()
    with pytest.raises(ValueError, match="labels of spk1-0 must lie in"):
        write_kaldi_data_dir(str(tmp_path / "a"), utts, ["a", "b"])
    writer = KaldiDataDirWriter(str(tmp_path / "b"))
    with pytest.raises(ValueError, match="start with its speaker_id"):
        writer.add_features("x-1", "spk1", "", np.zeros((3, 40)))
    writer.add_features("spk1-5", "spk1", "A", np.zeros((3, 40)))
    with pytest.raises(ValueError, match="increasing order"):
        writer.add_features("spk1-4", "spk1", "A", np.zeros((3, 40)))
    with pytest.raises(ValueError, match=r"shape \(3,\)"):
        writer.add_alignment("spk1-5", np.zeros(4, dtype=np.int32))
    with pytest.raises(ValueError, match="without alignment"):
        writer.close(["a"])
    with pytest.raises(ValueError, match="data_dir"):
        KaldiDataDirWriter(str(tmp_path / "c,d"))


def test_phone_text(tmp_path):
    writer = KaldiDataDirWriter(str(tmp_path / "d"))
    writer.add_features("s1-0", "s1", "HI", np.zeros((3, 40)))
    writer.add_features("s1-1", "s1", "", np.zeros((2, 40)))
    writer.add_phone_text("s1-0", ["HH", "AY"])
    writer.add_phone_text("s1-1", [])
    with pytest.raises(ValueError, match="no features"):
        writer.add_phone_text("s1-9", ["AY"])
    for utt in ("s1-0", "s1-1"):
        writer.add_alignment(utt, np.zeros(writer.num_frames[utt], np.int32))
    writer.close(["sil"])
    assert (tmp_path / "d" / "phone_text").read_text() == "s1-0 HH AY\ns1-1\n"
