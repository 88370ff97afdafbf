"""ngsgd-prepare: Kaldi/NumPy/demo input -> partitions, balance, messy input, repartition."""

import gzip
import json
import os
import re
import shutil
from pathlib import Path

import h5py
import kaldiio
import numpy as np
import pytest

from ngsgd_mpi import data, prepare
from ngsgd_mpi.kaldi.model import read_transition_model
from ngsgd_mpi.kaldi.pipeline import read_pipeline
from ngsgd_mpi.kaldi.tables import INT_VECTOR, SequentialTable

FEAT_DIM, NUM_CLASSES = 5, 7


def make_utts(seed=0, num_utts=40, min_len=5, max_len=60):
    rng = np.random.default_rng(seed)
    utts = {}
    for u in range(num_utts):
        n = int(rng.integers(min_len, max_len + 1))
        utts[f"spk{u % 4}-utt{u:03d}"] = (rng.standard_normal((n, FEAT_DIM)).astype(np.float32),
                                         rng.integers(0, NUM_CLASSES, n).astype(np.int32))
    return utts


def write_kaldi(root: Path, feats: dict, alis: dict):
    """feats.ark/feats.scp, ali.ark (int32 vectors, as ali-to-pdf writes) and ali.txt."""
    root.mkdir(parents=True, exist_ok=True)
    kaldiio.save_ark(str(root / "feats.ark"), feats, scp=str(root / "feats.scp"))
    kaldiio.save_ark(str(root / "ali.ark"), alis)
    with open(root / "ali.txt", "w") as f:
        for key, labels in alis.items():
            f.write(key + " " + " ".join(str(x) for x in labels) + "\n")
    return root


def read_back(out: Path) -> dict:
    """utt id -> (feats, labels, partition index), read with h5py; checks the
    format with open_partition and that no utterance appears twice."""
    found = {}
    paths = sorted((out / "train").glob("*.h5"), key=lambda p: int(p.name.split(".")[1]))
    for k, path in enumerate(paths):
        assert path.name == f"train.{k}.h5"
        info = data.open_partition(path)
        assert (info.partition_index, info.num_partitions) == (k, len(paths))
        with h5py.File(path) as f:
            ids = [s.decode() for s in f["utt_ids"][()]]
            o = f["utt_offsets"][()]
            for u, utt_id in enumerate(ids):
                assert utt_id not in found
                found[utt_id] = (f["feats"][o[u]:o[u + 1]], f["labels"][o[u]:o[u + 1]], k)
    return found


def opts(**kw):
    kw.setdefault("dtype", "float32")
    return prepare.PrepareOptions(**kw)


@pytest.fixture
def kaldi_dir(tmp_path):
    utts = make_utts()
    root = write_kaldi(tmp_path / "kaldi", {k: v[0] for k, v in utts.items()},
                       {k: v[1] for k, v in utts.items()})
    return root, utts


@pytest.mark.parametrize("feats_name,ali_name", [("feats.scp", "ali.ark"), ("feats.ark", "ali.txt"),
                                                 ("feats.scp", "ali.txt")])
def test_kaldi_round_trip(kaldi_dir, tmp_path, feats_name, ali_name):
    root, utts = kaldi_dir
    out = tmp_path / "out"
    stats = prepare.prepare_kaldi(str(root / feats_name), str(root / ali_name), str(out),
                                  opts(num_partitions=3, num_classes=NUM_CLASSES), log=lambda s: None)
    found = read_back(out)
    assert set(found) == set(utts)
    for utt_id, (feats, labels, _) in found.items():
        np.testing.assert_array_equal(feats, utts[utt_id][0])
        np.testing.assert_array_equal(labels, utts[utt_id][1])
    # the trainer's reader sees the same frames, utterance by utterance in stored order
    for k in range(3):
        info = data.open_partition(out / "train" / f"train.{k}.h5")
        with h5py.File(info.path) as f:
            ids = [s.decode() for s in f["utt_ids"][()]]
        blocks = list(data.iterate_utterance_blocks(info, 0, 0, block_frames=50))
        np.testing.assert_array_equal(np.concatenate([b[0] for b in blocks]),
                                      np.concatenate([utts[i][0] for i in ids]))
        np.testing.assert_array_equal(np.concatenate([b[1] for b in blocks]),
                                      np.concatenate([utts[i][1] for i in ids]))
    assert not (out / "valid.h5").exists()
    all_feats = np.concatenate([v[0] for v in utts.values()]).astype(np.float64)
    all_labels = np.concatenate([v[1] for v in utts.values()])
    on_disk = json.loads((out / "stats.json").read_text())
    assert on_disk == json.loads(json.dumps(stats))
    assert stats["train"]["frames"] == len(all_feats) and stats["train"]["utts"] == len(utts)
    np.testing.assert_allclose(stats["feat_mean"], all_feats.mean(0), rtol=1e-9, atol=1e-12)
    np.testing.assert_allclose(stats["feat_std"], all_feats.std(0), rtol=1e-7)
    assert stats["class_counts"] == np.bincount(all_labels, minlength=NUM_CLASSES).tolist()
    assert stats["skipped"] == {} and stats["trimmed"] == 0


def test_float16_storage_and_inferred_classes(kaldi_dir, tmp_path, capsys):
    root, utts = kaldi_dir
    out = tmp_path / "out"
    assert prepare.main(["kaldi", "--feats", str(root / "feats.scp"), "--ali", str(root / "ali.ark"),
                         "--out", str(out), "--num-partitions", "2"]) == 0
    printed = capsys.readouterr().out
    assert f"using max label + 1 = {NUM_CLASSES}" in printed and "2 training partition(s)" in printed
    found = read_back(out)
    for utt_id, (feats, labels, _) in found.items():
        assert feats.dtype == np.float16
        np.testing.assert_array_equal(feats, utts[utt_id][0].astype(np.float16))
    assert json.loads((out / "stats.json").read_text())["num_classes_inferred"] is True


def test_balanced_split_bound():
    for seed in range(20):
        rng = np.random.default_rng(seed)
        lengths = rng.integers(1, 500, int(rng.integers(10, 300)))
        k = int(rng.integers(1, 9))
        parts = prepare.balanced_split(lengths, k)
        assert sorted(i for p in parts for i in p) == list(range(len(lengths)))
        totals = [int(lengths[p].sum()) for p in parts]
        assert max(totals) - min(totals) <= lengths.max()


@pytest.mark.parametrize("num_partitions", [2, 5, 8])
def test_partitions_balanced_by_frames(tmp_path, num_partitions):
    utts = make_utts(seed=3, num_utts=300, min_len=20, max_len=400)
    root = write_kaldi(tmp_path / "k", {k: v[0] for k, v in utts.items()}, {k: v[1] for k, v in utts.items()})
    stats = prepare.prepare_kaldi(str(root / "feats.scp"), str(root / "ali.txt"), str(tmp_path / "o"),
                                  opts(num_partitions=num_partitions, seed=7), log=lambda s: None)
    frames = stats["train"]["partition_frames"]
    longest = max(len(v[1]) for v in utts.values())
    assert max(frames) - min(frames) <= 0.01 * np.mean(frames) + longest
    assert sum(frames) == sum(len(v[1]) for v in utts.values())


def test_seed_changes_the_order_not_the_content(kaldi_dir, tmp_path):
    root, utts = kaldi_dir
    runs = []
    for seed in (0, 0, 1):
        out = tmp_path / f"o{len(runs)}"
        prepare.prepare_kaldi(str(root / "feats.scp"), str(root / "ali.ark"), str(out),
                              opts(num_partitions=2, seed=seed), log=lambda s: None)
        runs.append({u: v[2] for u, v in read_back(out).items()})
    assert runs[0] == runs[1] and runs[0] != runs[2] and set(runs[0]) == set(runs[2])


def test_valid_fraction_and_valid_list(kaldi_dir, tmp_path):
    root, utts = kaldi_dir
    out = tmp_path / "frac"
    stats = prepare.prepare_kaldi(str(root / "feats.scp"), str(root / "ali.ark"), str(out),
                                  opts(num_partitions=2, valid_fraction=0.25), log=lambda s: None)
    with h5py.File(out / "valid.h5") as f:
        valid_ids = {s.decode() for s in f["utt_ids"][()]}
        assert f.attrs["role"] == "valid"
    assert len(valid_ids) == 10 and stats["valid"]["utts"] == 10
    assert valid_ids.isdisjoint(read_back(out)) and valid_ids | set(read_back(out)) == set(utts)

    wanted = sorted(utts)[:3]
    listed = wanted + ["not-there"]
    (tmp_path / "valid.list").write_text("".join(f"{u} extra-column\n" for u in listed))
    messages = []
    out = tmp_path / "listed"
    prepare.prepare_kaldi(str(root / "feats.scp"), str(root / "ali.ark"), str(out),
                          opts(num_partitions=2, valid_utts=str(tmp_path / "valid.list")),
                          log=messages.append)
    with h5py.File(out / "valid.h5") as f:
        assert sorted(s.decode() for s in f["utt_ids"][()]) == wanted
    assert set(read_back(out)) == set(utts) - set(wanted)
    assert any("1 of the 4 utterances" in m for m in messages)


# --------------------------------------------------------------------------- messy input

def messy_dir(tmp_path):
    """One utterance of every kind of problem, plus clean ones."""
    utts = make_utts(seed=5, num_utts=12, min_len=10, max_len=30)
    feats = {k: v[0].copy() for k, v in utts.items()}
    alis = {k: v[1].copy() for k, v in utts.items()}
    keys = sorted(utts)
    alis[keys[0]] = alis[keys[0]][:-2]                 # 2 frames short: trimmed
    feats[keys[1]] = feats[keys[1]][:-1]               # 1 frame short features: trimmed
    alis[keys[2]] = alis[keys[2]][:-3]                 # 3 frames short: skipped
    del alis[keys[3]]                                  # no alignment
    alis["orphan"] = np.zeros(4, np.int32)             # no features
    alis[keys[4]][3] = -2                              # negative labels
    alis[keys[5]][0] = -1
    feats[keys[6]][4, 1] = np.nan
    feats[keys[7]][0, 0] = np.inf
    feats[keys[8]] = np.zeros((0, FEAT_DIM), np.float32)
    alis[keys[8]] = np.zeros(0, np.int32)              # empty utterance
    feats[keys[9]][2, 2] = 1e5                         # overflows float16
    root = write_kaldi(tmp_path / "messy", feats, alis)
    return root, keys, feats, alis


def test_messy_input_is_skipped_and_counted(tmp_path, capsys):
    root, keys, feats, alis = messy_dir(tmp_path)
    out = tmp_path / "out"
    assert prepare.main(["kaldi", "--feats", str(root / "feats.scp"), "--ali", str(root / "ali.txt"),
                         "--out", str(out), "--num-classes", str(NUM_CLASSES)]) == 0
    stats = json.loads((out / "stats.json").read_text())
    assert stats["skipped"] == {"length_mismatch": 1, "missing_labels": 1, "missing_feats": 1,
                                "label_out_of_range": 2, "nonfinite": 2, "empty": 1, "overflow": 1}
    assert stats["skipped_examples"]["missing_feats"] == ["orphan"]
    assert stats["skipped_examples"]["nonfinite"] == [keys[6], keys[7]]
    assert stats["trimmed"] == 2 and stats["trimmed_examples"] == [keys[0], keys[1]]
    found = read_back(out)
    assert set(found) == {keys[0], keys[1], keys[10], keys[11]}
    for key in (keys[0], keys[1]):                     # trimmed to the shorter, first frames kept
        n = min(len(feats[key]), len(alis[key]))
        np.testing.assert_array_equal(found[key][0], feats[key][:n].astype(np.float16))
        np.testing.assert_array_equal(found[key][1], alis[key][:n])
    printed = capsys.readouterr().out
    assert "skipped 9 utterance(s)" in printed and "trimmed 2 utterance(s)" in printed
    assert "1 alignment but no features (e.g. orphan)" in printed


def test_length_tolerance_option(tmp_path):
    root, keys, _, _ = messy_dir(tmp_path)
    stats = prepare.prepare_kaldi(str(root / "feats.scp"), str(root / "ali.ark"), str(tmp_path / "o"),
                                  opts(length_tolerance=0), log=lambda s: None)
    assert stats["skipped"]["length_mismatch"] == 3 and stats["trimmed"] == 0
    assert stats["skipped"]["label_out_of_range"] == 2
    assert stats["skipped"].get("overflow") is None              # float32 storage holds 1e5


@pytest.mark.parametrize("problem,match", [
    ("trim", "10 feature frames but 8 labels: trimmed to 8"),
    ("mismatch", "10 feature frames but 7 labels"),
    ("missing_labels", "has features but no alignment"),
    ("missing_feats", "has an alignment but no features"),
    ("range", r"labels in \[-1, 6\] are outside \[0, 7\)"),
    ("nan", "frame\\(s\\) with NaN/Inf features"),
    ("empty", "empty utterance"),
    ("overflow", r"do not fit the stored type \(\|x\| <= 65504; float16: use --dtype float32\)"),
])
def test_strict_makes_every_problem_an_error_and_writes_nothing(tmp_path, capsys, problem, match):
    rng = np.random.default_rng(0)
    feats = {f"u{i}": rng.standard_normal((10, FEAT_DIM)).astype(np.float32) for i in range(3)}
    alis = {k: np.arange(10, dtype=np.int32) % NUM_CLASSES for k in feats}
    if problem == "trim":
        alis["u1"] = alis["u1"][:8]
    elif problem == "mismatch":
        alis["u1"] = alis["u1"][:7]
    elif problem == "missing_labels":
        del alis["u1"]
    elif problem == "missing_feats":
        alis["u9"] = alis["u0"]
    elif problem == "range":
        alis["u1"][5] = -1
    elif problem == "nan":
        feats["u1"][3, 0] = np.nan
    elif problem == "empty":
        feats["u1"], alis["u1"] = np.zeros((0, FEAT_DIM), np.float32), np.zeros(0, np.int32)
    elif problem == "overflow":
        feats["u1"][0, 0] = -7e4
    root = write_kaldi(tmp_path / "k", feats, alis)
    out = tmp_path / "out"
    code = prepare.main(["kaldi", "--feats", str(root / "feats.scp"), "--ali", str(root / "ali.ark"),
                         "--out", str(out), "--num-classes", str(NUM_CLASSES), "--strict"])
    err = capsys.readouterr().err
    utt = "u9" if problem == "missing_feats" else "u1"
    assert code == 2 and err.startswith(f"ngsgd-prepare: error: utterance '{utt}': ")
    assert len(err.strip().splitlines()) == 1
    assert re.search(match, err)
    assert sorted(os.listdir(tmp_path)) == ["k"]                  # no output, no temporary dir


def test_error_while_writing_leaves_nothing(kaldi_dir, tmp_path, monkeypatch):
    root, _ = kaldi_dir
    calls = []
    original = prepare.KaldiSource.read

    def failing_read(self, utt):
        calls.append(utt.utt_id)
        if len(calls) == 25:                                      # in the second partition
            raise prepare.PrepareError("simulated read failure")
        return original(self, utt)

    monkeypatch.setattr(prepare.KaldiSource, "read", failing_read)
    with pytest.raises(prepare.PrepareError, match="simulated"):
        prepare.prepare_kaldi(str(root / "feats.scp"), str(root / "ali.ark"), str(tmp_path / "out"),
                              opts(num_partitions=2), log=lambda s: None)
    assert sorted(os.listdir(tmp_path)) == ["kaldi"]


def test_bad_inputs_exit_2_with_one_message(kaldi_dir, tmp_path, capsys, monkeypatch):
    root, _ = kaldi_dir
    args = ["kaldi", "--feats", str(root / "feats.scp"), "--ali", str(root / "ali.ark")]
    cases = [
        (["kaldi", "--feats", str(tmp_path / "none.scp"), "--ali", str(root / "ali.ark"), "--out",
          str(tmp_path / "o")], "none.scp: file does not exist"),
        (args + ["--out", str(tmp_path / "o"), "--num-partitions", "41"],
         "40 training utterance(s) for --num-partitions 41"),
        (args + ["--out", str(tmp_path / "o"), "--valid-fraction", "1.5"], "option valid_fraction: must be in"),
        (args + ["--out", str(root)], "exists and is not empty"),
    ]
    for argv, message in cases:
        assert prepare.main(argv) == 2
        err = capsys.readouterr().err
        assert err.startswith("ngsgd-prepare: error: ") and message in err, err
    assert sorted(os.listdir(tmp_path)) == ["kaldi"]


def test_labels_beyond_num_classes_stop_with_a_transition_id_hint(kaldi_dir, tmp_path, capsys):
    """Not mess to skip: a wrong --num-classes, or transition-ids taken for pdfs."""
    root, utts = kaldi_dir
    assert prepare.main(["kaldi", "--feats", str(root / "feats.scp"), "--ali", str(root / "ali.ark"),
                         "--out", str(tmp_path / "o"), "--num-classes", str(NUM_CLASSES - 1)]) == 2
    err = capsys.readouterr().err
    assert re.fullmatch(rf"ngsgd-prepare: error: --ali {root}/ali.ark: utterance '\S+' has label 6 >= "
                        rf"--num-classes 6: transition-id alignments need --transition-model final.mdl "
                        rf"\(or --ali-dir\); pdf alignments need a larger --num-classes\n", err), err
    assert sorted(os.listdir(tmp_path)) == ["kaldi"]


def test_overwrite_replaces_the_output(kaldi_dir, tmp_path):
    root, utts = kaldi_dir
    out = tmp_path / "out"
    for k in (3, 2):
        prepare.prepare_kaldi(str(root / "feats.scp"), str(root / "ali.ark"), str(out),
                              opts(num_partitions=k, overwrite=True), log=lambda s: None)
    assert sorted(p.name for p in (out / "train").iterdir()) == ["pipeline.json", "train.0.h5", "train.1.h5"]
    assert sorted(os.listdir(tmp_path)) == ["kaldi", "out"]


# --------------------------------------------------------------------------- numpy, demo, repartition

def write_npz(path, utts, with_ids=True, compressed=False, **override):
    arrays = {"feats": np.concatenate([v[0] for v in utts.values()]),
              "labels": np.concatenate([v[1] for v in utts.values()]),
              "utt_offsets": np.cumsum([0] + [len(v[1]) for v in utts.values()]).astype(np.int64)}
    if with_ids:
        arrays["utt_ids"] = np.array(list(utts))
    arrays.update(override)
    (np.savez_compressed if compressed else np.savez)(path, **arrays)


def test_numpy_input(tmp_path):
    utts = make_utts(seed=1, num_utts=30)
    keys = list(utts)
    first = {k: utts[k] for k in keys[:20]}
    second = {k: utts[k] for k in keys[20:]}
    write_npz(tmp_path / "a.npz", first)
    write_npz(tmp_path / "b.npz", second, with_ids=False, compressed=True)
    assert isinstance(prepare._npz_array(str(tmp_path / "a.npz"), "feats"), np.memmap)
    out = tmp_path / "out"
    assert prepare.main(["numpy", str(tmp_path / "a.npz"), str(tmp_path / "b.npz"), "--out", str(out),
                         "--num-partitions", "2", "--dtype", "float32", "--num-classes", "9"]) == 0
    found = read_back(out)
    expected = dict(first)
    expected.update({f"b-{u:06d}": v for u, v in enumerate(second.values())})
    assert set(found) == set(expected)
    for utt_id, (feats, labels, _) in found.items():
        np.testing.assert_array_equal(feats, expected[utt_id][0])
        np.testing.assert_array_equal(labels, expected[utt_id][1])
    assert json.loads((out / "stats.json").read_text())["num_classes"] == 9


def test_numpy_input_errors(tmp_path, capsys):
    utts = make_utts(seed=1, num_utts=3)
    write_npz(tmp_path / "offsets.npz", utts, utt_offsets=np.array([0, 5, 3], np.int64))
    write_npz(tmp_path / "pickled.npz", utts, utt_ids=np.array(list(utts), dtype=object))
    np.savez(tmp_path / "nolabels.npz", feats=np.zeros((3, 2), np.float32), utt_offsets=np.array([0, 3]))
    for name, message in [("offsets", "'utt_offsets' must be a non-decreasing"),
                          ("pickled", "cannot be read without pickle"),
                          ("nolabels", "array 'labels' is missing")]:
        assert prepare.main(["numpy", str(tmp_path / f"{name}.npz"), "--out", str(tmp_path / "o")]) == 2
        assert message in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def small_corpus(seed=0):
    train, test = make_utts(seed, 24), make_utts(seed + 1, 6)
    corpus = {"class_names": np.array([f"c{i}" for i in range(NUM_CLASSES)])}
    for prefix, utts in (("train", train), ("test", test)):
        corpus[f"{prefix}_feats"] = np.concatenate([v[0] for v in utts.values()]).astype(np.float16)
        corpus[f"{prefix}_labels"] = np.concatenate([v[1] for v in utts.values()])
        corpus[f"{prefix}_utt_offsets"] = np.cumsum([0] + [len(v[1]) for v in utts.values()])
        corpus[f"{prefix}_utt_ids"] = np.array([f"{prefix}-{k}" for k in utts])
    return corpus, train, test


def test_demo_subcommand_with_a_small_corpus(tmp_path, monkeypatch):
    import ngsgd_mpi.corpus

    corpus, train, test = small_corpus()
    monkeypatch.setattr(ngsgd_mpi.corpus, "load_demo_corpus", lambda: corpus, raising=False)
    out = tmp_path / "demo_data"
    assert prepare.main(["demo", "--out", str(out), "--num-partitions", "2"]) == 0
    assert sorted(p.name for p in (out / "train").iterdir()) == ["pipeline.json", "train.0.h5", "train.1.h5"]
    found = read_back(out)
    assert set(found) == {f"train-{k}" for k in train}
    for k, (feats, labels) in train.items():
        np.testing.assert_array_equal(found[f"train-{k}"][0], feats.astype(np.float16))
        np.testing.assert_array_equal(found[f"train-{k}"][1], labels)
    valid = data.open_partition(out / "valid.h5")
    with h5py.File(out / "valid.h5") as f:
        assert sorted(s.decode() for s in f["utt_ids"][()]) == sorted(f"test-{k}" for k in test)
    assert valid.num_frames == sum(len(v[1]) for v in test.values())
    stats = json.loads((out / "stats.json").read_text())
    assert stats["class_names"] == [f"c{i}" for i in range(NUM_CLASSES)]
    assert stats["num_classes"] == NUM_CLASSES


def test_demo_subcommand_without_a_corpus(tmp_path, monkeypatch, capsys):
    import ngsgd_mpi.corpus

    def missing():
        raise FileNotFoundError("demo corpus not found at x.npz")

    monkeypatch.setattr(ngsgd_mpi.corpus, "load_demo_corpus", missing, raising=False)
    assert prepare.main(["demo", "--out", str(tmp_path / "d")]) == 2
    assert capsys.readouterr().err == ("ngsgd-prepare: error: the demo corpus is not available "
                                       "(demo corpus not found at x.npz)\n")
    assert os.listdir(tmp_path) == []


DEMO_NPZ = Path(prepare.__file__).with_name("demo_corpus.npz")


@pytest.mark.skipif(not DEMO_NPZ.exists(), reason="ngsgd_mpi/demo_corpus.npz not built yet")
def test_demo_subcommand_with_the_shipped_corpus(tmp_path):
    from ngsgd_mpi.corpus import load_demo_corpus

    corpus = load_demo_corpus()
    out = tmp_path / "demo_data"
    assert prepare.main(["demo", "--out", str(out), "--num-partitions", "2"]) == 0
    assert (out / "train" / "train.0.h5").exists() and (out / "train" / "train.1.h5").exists()
    stats = json.loads((out / "stats.json").read_text())
    total = len(corpus["train_utt_ids"]) + len(corpus["test_utt_ids"])
    assert stats["train"]["utts"] + stats["valid"]["utts"] + sum(stats["skipped"].values()) == total
    assert stats["train"]["utts"] <= len(corpus["train_utt_ids"])
    assert stats["valid"]["utts"] <= len(corpus["test_utt_ids"])
    assert stats["num_classes"] == len(corpus["class_names"])


def test_repartition_round_trip(kaldi_dir, tmp_path, capsys):
    root, utts = kaldi_dir
    first = tmp_path / "three"
    prepare.prepare_kaldi(str(root / "feats.scp"), str(root / "ali.ark"), str(first),
                          opts(num_partitions=3, valid_fraction=0.1, dtype="float16"), log=lambda s: None)
    before = read_back(first)
    out = tmp_path / "five"
    assert prepare.main(["repartition", str(first), "--num-partitions", "5", "--out", str(out),
                         "--seed", "4"]) == 0
    after = read_back(out)
    assert set(after) == set(before) and {v[2] for v in after.values()} == set(range(5))
    for utt_id, (feats, labels, _) in after.items():
        assert feats.dtype == np.float16
        np.testing.assert_array_equal(feats, before[utt_id][0])
        np.testing.assert_array_equal(labels, before[utt_id][1])
    assert (out / "valid.h5").read_bytes() == (first / "valid.h5").read_bytes()
    stats = json.loads((out / "stats.json").read_text())
    old = json.loads((first / "stats.json").read_text())
    assert stats["class_counts"] == old["class_counts"] and stats["train"]["frames"] == old["train"]["frames"]
    np.testing.assert_allclose(stats["feat_mean"], old["feat_mean"], rtol=1e-12)
    frames = stats["train"]["partition_frames"]
    assert max(frames) - min(frames) <= 60                       # the longest utterance
    assert "5 training partition(s)" in capsys.readouterr().out
    assert prepare.main(["repartition", str(tmp_path / "none"), "--out", str(tmp_path / "x")]) == 2


# --------------------------------------------------------------------------- Kaldi recipe directories

YESNO = Path(__file__).resolve().parents[1].parent / "shared/kaldi/yesno"


def recipe_data_dir(tmp_path, name="train", edit_utt2spk=None):
    """A copy of yesno/data/NAME whose scp locations point at the shared arks (Kaldi's are
    relative to the recipe directory); ``edit_utt2spk`` may change the utt2spk text."""
    d = tmp_path / name
    d.mkdir()
    for fname in ("feats.scp", "cmvn.scp"):
        lines = (YESNO / "data" / name / fname).read_text().splitlines()
        (d / fname).write_text("".join(f"{k} {YESNO / loc}\n" for k, loc in (line.split() for line in lines)))
    utt2spk = (YESNO / "data" / name / "utt2spk").read_text()
    (d / "utt2spk").write_text(edit_utt2spk(utt2spk) if edit_utt2spk else utt2spk)
    return d


def raw_features(split="train"):
    table = SequentialTable(f"{YESNO}/mfcc/raw_mfcc_{split}.1.ark")      # checked against Kaldi's reader
    return {key: value for key, value, _ in table}


def transition_ids(model_dir):
    return {k: v for k, v, _ in SequentialTable(f"{YESNO}/exp/{model_dir}/ali.1.gz", INT_VECTOR)}


def cmvn_stats(split="train"):
    (key, stats, _), = SequentialTable(f"{YESNO}/mfcc/cmvn_{split}.ark")
    return stats


def occs(model_dir):
    return np.array((YESNO / "exp" / model_dir / "final.occs").read_text().strip(" []\n").split(), float)


def read_all(out):
    found = read_back(out)
    if (out / "valid.h5").exists():
        with h5py.File(out / "valid.h5") as f:
            o = f["utt_offsets"][()]
            for u, utt in enumerate(s.decode() for s in f["utt_ids"][()]):
                found[utt] = (f["feats"][o[u]:o[u + 1]], f["labels"][o[u]:o[u + 1]], -1)
    return found


@pytest.mark.parametrize("model_dir", ["mono", "tri1"])
def test_recipe_dirs_transition_ids_to_pdfs_match_final_occs(tmp_path, model_dir):
    out = tmp_path / "out"
    messages = []
    stats = prepare.prepare_kaldi(
        None, None, str(out), opts(num_partitions=2, valid_fraction=0.1), log=messages.append,
        data_dir=str(recipe_data_dir(tmp_path)), ali_dir=str(YESNO / "exp" / model_dir))
    tm = read_transition_model(str(YESNO / "exp" / model_dir / "final.mdl"))
    tids = transition_ids(model_dir)
    # every transition-id alignment mapped through the model: exactly Kaldi's occupation counts
    all_counts = sum(np.bincount(tm.tid2pdf[t], minlength=tm.num_pdfs) for t in tids.values())
    np.testing.assert_array_equal(all_counts, occs(model_dir))
    assert stats["num_classes"] == tm.num_pdfs and not stats["num_classes_inferred"]
    assert stats["skipped"] == {"missing_feats": 8}                # their features were damaged (README)
    found = read_all(out)
    assert len(found) == 42 and set(found) <= set(tids)
    for utt, (_, labels, _) in found.items():
        np.testing.assert_array_equal(labels, tm.tid2pdf[tids[utt]])
    kept = sum(np.bincount(tm.tid2pdf[tids[u]], minlength=tm.num_pdfs) for u in found if found[u][2] >= 0)
    assert stats["class_counts"] == kept.tolist()
    assert stats["transition_model"] == str(YESNO / "exp" / model_dir / "final.mdl")
    assert stats["input_pipeline"]["cmvn"] == {"norm_means": True, "norm_vars": False}   # empty cmvn_opts
    assert read_pipeline(str(out / "train")).to_dict() == stats["input_pipeline"]
    assert sorted(os.listdir(out)) == ["stats.json", "train", "valid.h5"]                # no spool left


@pytest.mark.parametrize("cmvn_opts", [None, "--norm-vars=true"])
def test_recipe_features_equal_an_independent_apply_cmvn(tmp_path, cmvn_opts):
    out = tmp_path / "out"
    extra = {} if cmvn_opts is None else {"cmvn_opts": cmvn_opts}
    prepare.prepare_kaldi(None, None, str(out), opts(), log=lambda s: None,
                          data_dir=str(recipe_data_dir(tmp_path)), ali_dir=str(YESNO / "exp" / "mono"), **extra)
    raw, stats = raw_features(), cmvn_stats()
    count, dim = stats[0, -1], raw[next(iter(raw))].shape[1]
    mean = stats[0, :dim] / count
    std = np.sqrt(stats[1, :dim] / count - mean ** 2)
    for utt, (feats, _, _) in read_back(out).items():
        x = raw[utt].astype(np.float64)
        if cmvn_opts is None:
            # apply-cmvn, means only, in Kaldi's float32 steps: x + float(float(-1/n) * sum)
            offset = (np.float64(np.float32(-1.0 / count)) * stats[0, :dim]).astype(np.float32)
            np.testing.assert_array_equal(feats, raw[utt] + offset)
            np.testing.assert_allclose(feats, x - mean, atol=2e-5)
        else:
            np.testing.assert_allclose(feats, (x - mean) / std, atol=2e-5)
    assert json.loads((out / "stats.json").read_text())["input_pipeline"]["cmvn"]["norm_vars"] == bool(cmvn_opts)


def test_recipe_rspecifier_forms_and_no_cmvn_give_the_same_partitions(tmp_path, monkeypatch):
    monkeypatch.chdir(YESNO)                        # the scp paths are relative to the recipe, as in Kaldi
    a, b = tmp_path / "a", tmp_path / "b"
    prepare.prepare_kaldi(None, None, str(a), opts(num_partitions=2), log=lambda s: None,
                          data_dir="data/train", ali_dir="exp/tri1", no_cmvn=True)
    assert prepare.main(["kaldi", "--feats", "ark,s,cs:cat mfcc/raw_mfcc_train.1.ark |",
                         "--ali", "ark:gunzip -c exp/tri1/ali.*.gz |", "--transition-model",
                         "exp/tri1/final.mdl", "--out", str(b), "--num-partitions", "2",
                         "--dtype", "float32"]) == 0
    found_a, found_b = read_back(a), read_back(b)
    assert found_a.keys() == found_b.keys() and len(found_a) == 42
    raw = raw_features()
    for utt in found_a:
        np.testing.assert_array_equal(found_a[utt][0], raw[utt])               # --no-cmvn: as read
        np.testing.assert_array_equal(found_b[utt][0], raw[utt])
        np.testing.assert_array_equal(found_a[utt][1], found_b[utt][1])
    assert read_pipeline(str(a / "train")).cmvn is None
    assert sorted(os.listdir(b)) == ["stats.json", "train"]                    # the spool is gone
    c = tmp_path / "c"                              # --norm-means=false: apply-cmvn copies its input
    prepare.prepare_kaldi(None, None, str(c), opts(), log=lambda s: None, data_dir="data/train",
                          ali_dir="exp/tri1", cmvn_opts="--norm-means=false")
    assert read_pipeline(str(c / "train")).cmvn is None
    for utt, (feats, _, _) in read_back(c).items():
        np.testing.assert_array_equal(feats, raw[utt])


def test_recipe_phone_targets(tmp_path):
    out = tmp_path / "out"
    stats = prepare.prepare_kaldi(None, None, str(out), opts(), log=lambda s: None,
                                  data_dir=str(recipe_data_dir(tmp_path)), ali_dir=str(YESNO / "exp" / "tri1"),
                                  targets="phone")
    tm = read_transition_model(str(YESNO / "exp" / "tri1" / "final.mdl"))
    assert stats["num_classes"] == tm.num_phones + 1 and stats["input_pipeline"]["targets"] == "phone"
    tids = transition_ids("tri1")
    for utt, (_, labels, _) in read_back(out).items():
        np.testing.assert_array_equal(labels, tm.tid2phone[tids[utt]])
    assert stats["class_counts"][0] == 0                                       # <eps> is never a target


def one_line_error(capsys, argv, tmp_path, *keep):
    assert prepare.main(argv) == 2
    captured = capsys.readouterr()
    assert captured.out == "" and captured.err.startswith("ngsgd-prepare: error: ")
    assert len(captured.err.splitlines()) == 1, captured.err
    assert sorted(os.listdir(tmp_path)) == sorted(keep)                       # nothing written
    return captured.err


def test_recipe_bad_input_is_one_line_and_writes_nothing(tmp_path, capsys):
    data_dir = recipe_data_dir(tmp_path)
    out = ["--out", str(tmp_path / "out")]
    base = ["kaldi", "--data", str(data_dir)] + out
    keep = ("train",)
    # a .gz that is not gzip
    fake = tmp_path / "fake_ali"
    fake.mkdir()
    shutil.copy(YESNO / "exp" / "mono" / "final.mdl", fake)
    (fake / "ali.1.gz").write_bytes(b"not gzip at all")
    err = one_line_error(capsys, base + ["--ali-dir", str(fake)], tmp_path, *keep, "fake_ali")
    assert "ali.1.gz: not a gzip file" in err
    # a truncated ark (of gzipped alignments, and of features)
    data = gzip.decompress((YESNO / "exp" / "mono" / "ali.1.gz").read_bytes())
    (fake / "ali.1.gz").write_bytes(gzip.compress(data[:len(data) // 2]))
    err = one_line_error(capsys, base + ["--ali-dir", str(fake)], tmp_path, *keep, "fake_ali")
    assert "truncated" in err
    (tmp_path / "cut.ark").write_bytes((YESNO / "mfcc" / "raw_mfcc_train.1.ark").read_bytes()[:50000])
    err = one_line_error(capsys, ["kaldi", "--feats", str(tmp_path / "cut.ark"), "--ali-dir",
                                  str(YESNO / "exp" / "mono")] + out, tmp_path, *keep, "fake_ali", "cut.ark")
    assert f"{tmp_path}/cut.ark: truncated" in err
    # a model whose transition-ids do not cover the alignment
    err = one_line_error(capsys, base + ["--ali", str(YESNO / "exp" / "mono" / "ali.1.gz"), "--transition-model",
                                         str(YESNO.parent / "yesno_decode/exp/mono0a/final.mdl")],
                         tmp_path, *keep, "fake_ali", "cut.ark")
    assert re.search(r"has transition-id \d+, but \S+final.mdl has transition-ids 1..30: the alignment is "
                     r"not from this model", err)
    # cmvn.scp missing a speaker
    moved = recipe_data_dir(tmp_path / "fake_ali", edit_utt2spk=lambda t: t.replace(
        "Speaker1_0_0_1_0_0_1_1_0 Speaker1", "Speaker1_0_0_1_0_0_1_1_0 Speaker2"))
    err = one_line_error(capsys, ["kaldi", "--data", str(moved), "--ali-dir", str(YESNO / "exp" / "mono")] + out,
                         tmp_path, *keep, "fake_ali", "cut.ark")
    assert "cmvn.scp: no CMVN statistics for speaker 'Speaker2' (of utterance 'Speaker1_0_0_1_0_0_1_1_0')" in err
    # a pipe command that fails
    err = one_line_error(capsys, ["kaldi", "--feats", f"ark:cat {tmp_path}/none.ark |", "--ali-dir",
                                  str(YESNO / "exp" / "mono")] + out, tmp_path, *keep, "fake_ali", "cut.ark")
    assert re.search(r"--feats: command 'cat \S+none.ark' failed \(exit status 1\): .*No such file", err)


@pytest.mark.parametrize("argv,message", [
    (["--ali", "{yesno}/exp/mono/ali.1.gz"], "is gzipped, as the transition-id alignments of Kaldi training"),
    (["--ali-dir", "{tmp}"], "final.mdl does not exist: Kaldi alignments (ali.*.gz) hold transition-ids"),
    (["--ali", "{yesno}/exp/mono/ali.1.gz", "--targets", "phone"], "--targets phone needs transition-id"),
    (["--ali-dir", "{yesno}/exp/mono", "--feats", "x.ark"], "give exactly one of --data DATA_DIR and --feats"),
    (["--ali-dir", "{yesno}/exp/mono", "--num-classes", "30"], "--num-classes 30 differs from the 22 pdf"),
    (["--ali-dir", "{yesno}/exp/mono", "--cmvn-opts=--norm-vars=maybe"], "--norm-vars takes true or false"),
])
def test_recipe_inconsistent_options(tmp_path, capsys, argv, message):
    data_dir = recipe_data_dir(tmp_path)
    shutil.copy(YESNO / "exp" / "mono" / "ali.1.gz", tmp_path)
    argv = [a.format(yesno=YESNO, tmp=tmp_path) for a in argv]
    err = one_line_error(capsys, ["kaldi", "--data", str(data_dir), "--out", str(tmp_path / "out")] + argv,
                         tmp_path, "train", "ali.1.gz")
    assert message in err, err


def test_repartition_keeps_the_input_pipeline(tmp_path):
    first, second = tmp_path / "a", tmp_path / "b"
    prepare.prepare_kaldi(None, None, str(first), opts(num_partitions=2), log=lambda s: None,
                          data_dir=str(recipe_data_dir(tmp_path)), ali_dir=str(YESNO / "exp" / "mono"),
                          cmvn_opts="--norm-vars=true")
    assert prepare.main(["repartition", str(first), "--out", str(second), "--num-partitions", "3"]) == 0
    assert read_pipeline(str(second / "train")) == read_pipeline(str(first / "train"))
    assert read_pipeline(str(second / "train")).cmvn.norm_vars
