import h5py
import numpy as np
import pytest

from ngsgd_mpi import data


def make_utts(rng, num_utts, feat_dim=3, num_classes=5, min_len=2, max_len=30):
    utts = []
    for u in range(num_utts):
        n = int(rng.integers(min_len, max_len + 1))
        utts.append((f"utt{u:03d}", rng.standard_normal((n, feat_dim)).astype(np.float32),
                     rng.integers(0, num_classes, n).astype(np.int32)))
    return utts


@pytest.fixture
def partition(tmp_path):
    rng = np.random.default_rng(0)
    utts = make_utts(rng, 40)
    path = tmp_path / "train.0.h5"
    data.write_partition(path, utts, feat_dim=3, num_classes=5, dtype=np.float32)
    return str(path), utts


def test_writer_round_trip_and_stats(partition):
    path, utts = partition
    info = data.open_partition(path)
    feats = np.concatenate([u[1] for u in utts])
    labels = np.concatenate([u[2] for u in utts])
    assert info.num_frames == len(feats) and info.feat_dim == 3 and info.num_classes == 5
    with h5py.File(path) as f:
        np.testing.assert_array_equal(f["feats"][()], feats)
        np.testing.assert_array_equal(f["labels"][()], labels)
        assert [s.decode() for s in f["utt_ids"][()]] == [u[0] for u in utts]
        assert f.attrs["format_version"] == data.FORMAT_VERSION
    np.testing.assert_array_equal(info.class_counts, np.bincount(labels, minlength=5))
    np.testing.assert_allclose(info.feat_sum, feats.sum(0), rtol=1e-6)
    np.testing.assert_allclose(info.feat_sumsq, (feats.astype(np.float64) ** 2).sum(0), rtol=1e-6)


def test_writer_is_atomic_on_error(tmp_path):
    path = tmp_path / "p.h5"
    with pytest.raises(data.DataError, match="labels must be in"):
        with data.PartitionWriter(path, 2, 3) as w:
            w.add("a", np.zeros((4, 2)), np.array([0, 1, 2, 1]))
            w.add("b", np.zeros((2, 2)), np.array([0, 3]))
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("feats,labels,match", [
    (np.zeros((3, 2)), np.zeros(2, int), "labels must have shape"),
    (np.zeros((3, 4)), np.zeros(3, int), "feats must have shape"),
    (np.full((3, 2), np.nan), np.zeros(3, int), "NaN or Inf"),
    (np.zeros((0, 2)), np.zeros(0, int), "empty utterance"),
    (np.full((1, 2), 1e6), np.zeros(1, int), "overflow float16"),
])
def test_writer_rejects_bad_utterances(tmp_path, feats, labels, match):
    with pytest.raises(data.DataError, match=match):
        with data.PartitionWriter(tmp_path / "p.h5", 2, 3) as w:
            w.add("bad", feats, labels)


def corrupt(path, name, fn):
    with h5py.File(path, "r+") as f:
        fn(f[name])


def test_open_partition_detects_bad_values(partition, tmp_path):
    path, _ = partition
    corrupt(path, "labels", lambda d: d.__setitem__(5, 7))
    with pytest.raises(data.DataError, match=r"label 7 at frame 5 .* outside \[0, 5\)"):
        data.open_partition(path)
    corrupt(path, "labels", lambda d: d.__setitem__(5, 0))
    corrupt(path, "feats", lambda d: d.__setitem__((9, 1), np.inf))
    with pytest.raises(data.DataError, match="NaN/Inf at frame 9"):
        data.open_partition(path)


def test_open_partition_checks_dims_and_existence(partition, tmp_path):
    path, _ = partition
    with pytest.raises(data.DataError, match="feat_dim is 3, expected 4"):
        data.open_partition(path, feat_dim=4)
    with pytest.raises(data.DataError, match="num_classes is 5, expected 6"):
        data.open_partition(path, num_classes=6)
    with pytest.raises(data.DataError, match="does not exist"):
        data.open_partition(tmp_path / "missing.h5")
    (tmp_path / "junk.h5").write_text("not hdf5")
    with pytest.raises(data.DataError, match="not a readable HDF5"):
        data.open_partition(tmp_path / "junk.h5")


def test_partition_assignment():
    paths = [f"p{i}" for i in range(5)]
    assert data.partitions_for_rank(paths, 0, 2) == ["p0", "p2", "p4"]
    assert data.partitions_for_rank(paths, 1, 2) == ["p1", "p3"]
    with pytest.raises(data.DataError, match="5 training partition.* for 6 ranks"):
        data.partitions_for_rank(paths, 0, 6)


def test_splice_pads_edges_within_utterance():
    feats = np.arange(10, dtype=np.float32)[:, None]          # two utterances: 0..3, 4..9
    starts = np.array([0, 0, 4, 4])
    ends = np.array([4, 4, 10, 10])
    out = data.splice(feats, np.array([0, 3, 4, 9]), starts, ends, data.splice_offsets(2, 1))
    np.testing.assert_array_equal(out, [[0, 0, 0, 1], [1, 2, 3, 3], [4, 4, 4, 5], [7, 8, 9, 9]])


def reference_spliced(utts, context):
    """Every frame spliced by brute force, keyed by (utt, frame)."""
    rows = {}
    for u, (_, f, lab) in enumerate(utts):
        for t in range(len(f)):
            idx = [min(max(t + c, 0), len(f) - 1) for c in range(-context, context + 1)]
            rows[f[idx].ravel().tobytes()] = lab[t]
    return rows


def test_stream_covers_each_frame_once_per_epoch(partition):
    path, utts = partition
    info = data.open_partition(path)
    ref = reference_spliced(utts, 2)
    stream = data.MinibatchStream([info], 16, 2, 2, seed=1, rank=0, window_frames=100)
    seen = []
    total = info.num_frames
    it = iter(stream)
    while len(seen) < total:
        b = next(it)
        seen.extend(zip(map(bytes, b.feats), b.labels))
    stream.close()
    seen = seen[:total]
    assert len({k for k, _ in seen}) == total        # a permutation of the epoch's frames
    for key, label in seen:
        assert ref[key] == label


def test_stream_shuffling_is_deterministic_and_depends_on_epoch_and_rank(partition):
    path, _ = partition
    info = data.open_partition(path)

    def first_batches(seed, rank, n=6):
        s = data.MinibatchStream([info], 32, 1, 1, seed=seed, rank=rank, window_frames=64)
        it = iter(s)
        out = [next(it) for _ in range(n)]
        s.close()
        return out

    a, b = first_batches(3, 0), first_batches(3, 0)
    for x, y in zip(a, b):
        np.testing.assert_array_equal(x.feats, y.feats)
    assert not np.array_equal(a[0].feats, first_batches(4, 0)[0].feats)
    assert not np.array_equal(a[0].feats, first_batches(3, 1)[0].feats)


def test_stream_resume_from_cursor_is_exact(partition):
    path, _ = partition
    info = data.open_partition(path)
    full = data.MinibatchStream([info], 24, 1, 1, seed=5, rank=0, window_frames=50)
    it = iter(full)
    batches = [next(it) for _ in range(120)]        # several epochs
    full.close()
    for k in (0, 7, 33, 80):
        cursor = (batches[k].epoch, batches[k].frame_in_epoch)
        resumed = data.MinibatchStream([info], 24, 1, 1, seed=5, rank=0, window_frames=50, start=cursor)
        rit = iter(resumed)
        for j in range(k + 1, k + 20):
            b = next(rit)
            np.testing.assert_array_equal(b.feats, batches[j].feats)
            np.testing.assert_array_equal(b.labels, batches[j].labels)
        resumed.close()


def test_prefetcher_forwards_items_and_errors():
    def gen():
        yield 1
        yield 2
        raise data.DataError("boom")

    p = data.Prefetcher(gen(), depth=1)
    assert next(p) == 1 and next(p) == 2
    with pytest.raises(data.DataError, match="boom"):
        next(p)
    p.close()


def test_iterate_utterance_blocks_in_order(partition):
    path, utts = partition
    info = data.open_partition(path)
    feats = np.concatenate([x for x, _ in data.iterate_utterance_blocks(info, 0, 0, block_frames=37)])
    np.testing.assert_array_equal(feats, np.concatenate([u[1] for u in utts]))


def test_find_partitions_natural_order(tmp_path):
    for i in (0, 1, 2, 10):
        (tmp_path / f"train.{i}.h5").write_text("")
    expected = [str(tmp_path / f"train.{i}.h5") for i in (0, 1, 2, 10)]     # natural order
    assert data.find_partitions(str(tmp_path)) == expected
    assert data.find_partitions(str(tmp_path / "train.*.h5")) == expected
    with pytest.raises(data.DataError, match="no partition files match"):
        data.find_partitions(str(tmp_path / "nothing*.h5"))
