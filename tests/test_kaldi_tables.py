"""Kaldi tables: real Kaldi-written files, every rspecifier form, streaming pipes, bad input,
and the writer (read back by kaldiio, an independent reader)."""

import gzip
import hashlib
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import kaldiio
import numpy as np
import pytest

from ngsgd_mpi.kaldi import tables
from ngsgd_mpi.kaldi.tables import INT_VECTOR, MATRIX, IndexedTable, SequentialTable, TableError, TableWriter

KALDI = Path(__file__).resolve().parents[1].parent / "shared/kaldi"

# sha256 over "key (rows, cols)" + float32 bytes of every entry, as Kaldi's own C++ reads them
# (kaldi-native-io 1.23.0 wraps Kaldi's CompressedMatrix and text readers)
KALDI_READS = {
    "yesno/mfcc/raw_mfcc_train.1.ark": (42, "287c0c2aa96e7e8e85f46806d565c999a61f353b492cdb24662f918824464d02"),
    "yesno/mfcc/raw_mfcc_test.1.ark": (9, "a80331a4b1edc5b4d22ce40567a2b54233e0aad9c018c9adb3109355b22d9eb6"),
    "arks/kaldiio/test.cm1.ark": (3, "4a333dfffa802b6f37e9889c773498eb0fb2cf7519cfb6c634a1794dc34e021a"),
    "arks/kaldiio/test.cm3.ark": (3, "4cfe08e0e1e4cbd1ca1bdeb5a3a967ecca1204687e24bcc6fb15f53cc812b095"),
    "arks/kaldiio/test.cm5.ark": (3, "0b507339a0766028ce371e45175dc2be94416e78db8e8f06cdf17e485ee8738e"),
    "arks/vesis/feats_compressed.ark": (10, "e45b590fc3bf2c8ed71e5f44fbe89547ef7dfb110a4e0957f6799237b52b9f68"),
    "arks/vesis/feats_ascii.ark": (2, "d7f308f8283143deb0070f450184284f55ea8212f3f6fc5c9b96ccb6f98cdc89"),
    "arks/kaldiio/test.text.ark": (3, "300d29ea1e597a2727895a33696f385be26d28debf2c52bb0653f2dfce8a7fb3"),
}


def entries(spec, kind=MATRIX):
    table = SequentialTable(spec, kind)
    try:
        return [(key, value) for key, value, _ in table]
    finally:
        table.close()


def digest(items):
    h = hashlib.sha256()
    for key, value in items:
        a = np.ascontiguousarray(value, "<f4")
        h.update(key.encode() + b" " + str(a.shape).encode() + a.tobytes())
    return len(items), h.hexdigest()


# --------------------------------------------------------------------------- real Kaldi files

@pytest.mark.parametrize("name", sorted(KALDI_READS))
def test_compressed_and_text_matrices_read_exactly_as_kaldi_does(name):
    assert digest(entries(str(KALDI / name))) == KALDI_READS[name]


@pytest.mark.parametrize("name", sorted(KALDI_READS))
def test_against_kaldi_native_io_when_installed(name):
    kio = pytest.importorskip("kaldi_native_io")
    with kio.SequentialFloatMatrixReader(f"ark:{KALDI / name}") as reader:
        expected = [(key, np.array(value)) for key, value in reader]
    got = entries(str(KALDI / name))
    assert [k for k, _ in got] == [k for k, _ in expected]
    for (_, a), (_, b) in zip(got, expected):
        np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("name,kind", [("arks/kaldiio/test.ark", MATRIX), ("arks/vesis/feats.ark", MATRIX),
                                       ("arks/vesis/ali.ark", INT_VECTOR), ("arks/vesis/ali_ascii.ark", INT_VECTOR)])
def test_plain_matrices_and_alignments_equal_kaldiio(name, kind):
    expected = dict(kaldiio.load_ark(str(KALDI / name)))
    got = entries(str(KALDI / name), kind)
    assert [k for k, _ in got] == list(expected)
    for key, value in got:
        assert value.dtype == (np.float32 if kind == MATRIX else np.int32)
        np.testing.assert_array_equal(value, expected[key])


def test_recipe_scp_cmvn_stats_and_gzipped_alignments(monkeypatch):
    monkeypatch.chdir(KALDI / "yesno")              # scp paths are relative to the recipe, as in Kaldi
    feats = entries("scp:data/train/feats.scp")
    assert len(feats) == 42 and all(v.shape[1] == 13 and v.dtype == np.float32 for _, v in feats)
    assert digest(feats) == KALDI_READS["yesno/mfcc/raw_mfcc_train.1.ark"]      # same entries, same order
    (speaker, stats), = entries("scp:data/train/cmvn.scp")
    assert speaker == "Speaker1" and stats.dtype == np.float64 and stats.shape == (2, 14)
    alis = entries("exp/mono/ali.1.gz", INT_VECTOR)
    assert len(alis) == 50 and all(v.dtype == np.int32 and v.min() >= 1 for _, v in alis)
    # the stats (and alignments) cover all 50 utterances; 8 lost their features (see the README)
    assert stats[0, 13] == sum(len(v) for _, v in alis) == 30498
    assert len({k for k, _ in alis} - {k for k, _ in feats}) == 8


# --------------------------------------------------------------------------- rspecifier forms

@pytest.fixture
def arks(tmp_path):
    """Two binary archives of 3 utterances each, their scp, gzipped copies, and the reference."""
    rng = np.random.default_rng(0)
    ref = {}
    for part in (1, 2):
        mats = {f"utt{part}{i}": rng.standard_normal((int(rng.integers(1, 9)), 4)).astype(np.float32)
                for i in range(3)}
        kaldiio.save_ark(str(tmp_path / f"f.{part}.ark"), mats, scp=str(tmp_path / f"f.{part}.scp"))
        with open(tmp_path / f"f.{part}.ark", "rb") as src, gzip.open(tmp_path / f"f.{part}.ark.gz", "wb") as dst:
            shutil.copyfileobj(src, dst)
        ref.update(mats)
    (tmp_path / "all.scp").write_text((tmp_path / "f.1.scp").read_text() + (tmp_path / "f.2.scp").read_text())
    return tmp_path, ref


@pytest.mark.parametrize("spec", [
    "scp:{d}/all.scp", "{d}/all.scp", "scp,s,cs:{d}/all.scp", "ark:{d}/f.*.ark", "ark,s,cs:{d}/f.*.ark",
    "{d}/f.*.ark.gz", "ark:{d}/f.[12].ark.gz", "ark:cat {d}/f.1.ark {d}/f.2.ark |",
    "ark,s,cs:gunzip -c {d}/f.*.ark.gz|", "scp:cat {d}/all.scp |", "ark,bg:{d}/f.*.ark"])
def test_every_rspecifier_form_reads_the_same_table(arks, spec):
    d, ref = arks
    got = entries(spec.format(d=d))
    assert [k for k, _ in got] == list(ref)
    for key, value in got:
        np.testing.assert_array_equal(value, ref[key])


def test_glob_is_in_natural_order(tmp_path):
    for n in (10, 2, 1):
        kaldiio.save_ark(str(tmp_path / f"a.{n}.ark"), {f"u{n}": np.full((1, 2), n, np.float32)})
    assert [k for k, _ in entries(f"{tmp_path}/a.*.ark")] == ["u1", "u2", "u10"]


def test_standard_input(arks):
    d, ref = arks
    code = ("import sys; from ngsgd_mpi.kaldi.tables import SequentialTable\n"
            "print(' '.join(k for k, v, _ in SequentialTable('ark:-')))")
    with open(d / "f.1.ark", "rb") as stdin:
        out = subprocess.run([sys.executable, "-c", code], stdin=stdin, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["utt10", "utt11", "utt12"]


def test_scp_offsets_ranges_and_pipe_locations(arks):
    d, ref = arks
    first = (d / "f.1.scp").read_text().split("\n")[0].split()[1]               # f.1.ark:OFFSET
    (d / "x.scp").write_text(f"a {first}\nb {first}[1:2]\nc {first}[0:1,1:2]\n"
                             f"d cat {d}/f.1.ark | tail -c +{int(first.rsplit(':', 1)[1]) + 1} |\n")
    got = dict(entries(f"scp:{d}/x.scp"))
    full = ref["utt10"]
    np.testing.assert_array_equal(got["a"], full)
    np.testing.assert_array_equal(got["b"], full[1:3])
    np.testing.assert_array_equal(got["c"], full[0:2, 1:3])
    np.testing.assert_array_equal(got["d"], full)


def test_pipes_are_streamed_not_loaded_whole(tmp_path):
    """The command writes one entry and then sleeps: that entry must arrive before it ends."""
    kaldiio.save_ark(str(tmp_path / "one.ark"), {"first": np.ones((2, 3), np.float32)})
    cmd = f"cat {tmp_path}/one.ark; sleep 60 |"
    t0 = time.monotonic()
    table = SequentialTable(f"ark:{cmd}")
    it = iter(table)
    key, value, location = next(it)
    assert key == "first" and location is None and time.monotonic() - t0 < 30
    proc = table._inputs[0].pipe.proc
    it.close()                                         # stop early: the command is ended, not waited for
    assert proc.poll() is not None and time.monotonic() - t0 < 30


def test_indexed_table_spools_streams_for_random_access(arks, tmp_path):
    d, ref = arks
    table = IndexedTable(f"ark:gunzip -c {d}/f.*.ark.gz |", MATRIX, "--feats", workdir=str(tmp_path / "spool"))
    assert [k for k, _ in table.items()] == list(ref)
    assert len(os.listdir(tmp_path / "spool")) == 1
    for key in reversed(list(ref)):
        np.testing.assert_array_equal(table.read(key), ref[key])
    table.close()
    assert os.listdir(tmp_path / "spool") == []
    plain = IndexedTable(f"ark:{d}/f.*.ark").index()            # plain files: byte offsets, no spool
    assert plain._spool is None
    np.testing.assert_array_equal(plain.read("utt21"), ref["utt21"])
    plain.close()


def test_duplicate_keys_are_an_error(arks):
    d, _ = arks
    with pytest.raises(TableError, match="key 'utt10' appears twice"):
        IndexedTable(f"ark:cat {d}/f.1.ark {d}/f.1.ark |").index()


def test_text_formats(tmp_path):
    (tmp_path / "t.ark").write_text("m1  [\n  0 1.5 -2 \n  3 4 5e-1 ]\nm2  [ ]\nm3 [ 7 8 ]\n")
    got = dict(entries(str(tmp_path / "t.ark")))
    np.testing.assert_array_equal(got["m1"], [[0, 1.5, -2], [3, 4, 0.5]])    # kaldiio reads this as int
    assert got["m2"].shape == (0, 0) and got["m3"].tolist() == [[7, 8]]
    (tmp_path / "a.txt").write_text("u1 3 4 5 \nu2\nu3 1\n")
    assert {k: v.tolist() for k, v in entries(str(tmp_path / "a.txt"), INT_VECTOR)} == \
        {"u1": [3, 4, 5], "u2": [], "u3": [1]}
    (tmp_path / "cut.txt").write_text("u1 3 4 5 \nu2 7 8")           # Kaldi ends each line with \n
    with pytest.raises(TableError, match=r"truncated: entry 'u2' at byte 13: the input ends inside its line"):
        entries(str(tmp_path / "cut.txt"), INT_VECTOR)


def test_permissive_option(arks):
    d, ref = arks
    (d / "p.scp").write_text(f"a {d}/missing.ark:5\n" + (d / "f.1.scp").read_text())
    with pytest.raises(TableError, match="missing.ark: file does not exist"):
        entries(f"scp:{d}/p.scp")
    table = SequentialTable(f"scp,p:{d}/p.scp")
    assert [k for k, _, _ in table] == ["utt10", "utt11", "utt12"] and table.damaged == 1
    data = (d / "f.1.ark").read_bytes()
    (d / "cut.ark").write_bytes(data[:-7])
    table = SequentialTable(f"ark,p:{d}/cut.ark")
    assert [k for k, _, _ in table] == ["utt10", "utt11"] and table.damaged == 1


# --------------------------------------------------------------------------- bad input

def test_a_failing_pipe_command_is_one_error(arks):
    d, _ = arks
    with pytest.raises(TableError) as err:
        entries(f"ark:cat {d}/no-such.ark |")
    message = str(err.value)
    assert "command 'cat " in message and "failed (exit status 1)" in message and "No such file" in message
    assert "\n" not in message
    with pytest.raises(TableError, match=r"failed \(exit status 3\)"):       # after good entries
        entries(f"ark:cat {d}/f.1.ark; exit 3 |")
    with pytest.raises(TableError, match=r"command 'no-such-command-xyz' failed \(exit status 127\)"):
        entries("ark:no-such-command-xyz |")


@pytest.mark.parametrize("cut", [3, 8, 14, 25, 40])
def test_a_truncated_archive_is_one_error_naming_the_byte(arks, cut):
    d, _ = arks
    data = (d / "f.1.ark").read_bytes()
    (d / "t.ark").write_bytes(data[:cut])
    with pytest.raises(TableError, match=r"truncated") as err:
        entries(str(d / "t.ark"))
    assert str(d / "t.ark") in str(err.value) and "\n" not in str(err.value)
    with gzip.open(d / "t.ark.gz", "wb") as f:
        f.write(data)
    (d / "cut.ark.gz").write_bytes((d / "t.ark.gz").read_bytes()[:-10])
    with pytest.raises(TableError, match="truncated or corrupt compressed data"):
        entries(str(d / "cut.ark.gz"))


def test_alignment_truncated_and_wrong_types(tmp_path):
    kaldiio.save_ark(str(tmp_path / "ali.ark"), {"u": np.arange(1, 50, dtype=np.int32)})
    data = (tmp_path / "ali.ark").read_bytes()
    (tmp_path / "cut.ark").write_bytes(data[:-3])
    with pytest.raises(TableError, match=r"truncated: entry 'u' at byte 2: 49 integers needs 245 bytes"):
        entries(str(tmp_path / "cut.ark"), INT_VECTOR)
    with pytest.raises(TableError, match="an int32 vector where a matrix was expected"):
        entries(str(tmp_path / "ali.ark"))
    kaldiio.save_ark(str(tmp_path / "m.ark"), {"u": np.zeros((2, 2), np.float32)})
    with pytest.raises(TableError, match="a FM object where an int32 vector"):
        entries(str(tmp_path / "m.ark"), INT_VECTOR)


def test_not_gzip_not_an_archive_and_no_pickle(tmp_path):
    (tmp_path / "ali.1.gz").write_bytes(b"utt 1 2 3\n")
    with pytest.raises(TableError, match=r"ali.1.gz: not a gzip file \(it does not start with 1f 8b\)"):
        entries(str(tmp_path / "ali.1.gz"), INT_VECTOR)
    (tmp_path / "gz.ark").write_bytes(gzip.compress(b"u 1 2 3\n"))      # gzipped without .gz: read
    assert [(k, v.tolist()) for k, v in entries(str(tmp_path / "gz.ark"), INT_VECTOR)] == [("u", [1, 2, 3])]
    (tmp_path / "raw.ark").write_bytes(gzip.compress(b"x" * 100))
    with pytest.raises(TableError, match="not a Kaldi archive"):
        entries(str(tmp_path / "raw.ark"))
    (tmp_path / "bin.ark").write_bytes(bytes(range(256)) * 4)
    with pytest.raises(TableError, match="not a Kaldi archive"):
        entries(str(tmp_path / "bin.ark"))
    kaldiio.save_ark(str(tmp_path / "pkl.ark"), {"u": {"some": "object"}}, write_function="pickle")
    with pytest.raises(TableError, match="expected a binary object or a text matrix"):
        entries(str(tmp_path / "pkl.ark"))                        # never unpickled


@pytest.mark.parametrize("spec,match", [
    ("ark,zz:x.ark", r"unknown option\(s\) zz"), ("arc:x.ark", "expected ark:..., scp:... or a file name"),
    ("scp:", "no script file named"), ("ark:{d}/none.ark", "none.ark: file does not exist"),
    ("{d}/*.nothing", "no file matches"), ("scp:{d}/none.scp", "none.scp: file does not exist")])
def test_bad_rspecifiers(tmp_path, spec, match):
    with pytest.raises(TableError, match=match):
        SequentialTable(spec.format(d=tmp_path))


def test_huge_sizes_in_a_corrupt_header_are_refused(tmp_path):
    (tmp_path / "h.ark").write_bytes(b"u \0BFM \x04\xff\xff\xff\x7f\x04\xff\xff\xff\x7f")
    with pytest.raises(TableError, match="implausible size"):
        entries(str(tmp_path / "h.ark"))


# --------------------------------------------------------------------------- writing

def matrices():
    rng = np.random.default_rng(3)
    return {f"u{i}": rng.standard_normal((i, 5)).astype(np.float32) for i in (3, 0, 7)}


def test_writer_ark_scp_and_text_read_back_by_kaldiio(tmp_path):
    mats = matrices()
    with TableWriter(f"ark,scp:{tmp_path}/o.ark,{tmp_path}/o.scp") as w:
        for k, v in mats.items():
            w.write(k, v)
        assert not (tmp_path / "o.ark").exists() and not (tmp_path / "o.scp").exists()   # not before close
    back = kaldiio.load_scp(str(tmp_path / "o.scp"))
    assert list(back) == list(mats)
    for k, v in mats.items():
        np.testing.assert_array_equal(back[k], v)
    with TableWriter(f"ark,t:{tmp_path}/t.ark") as w:
        for k, v in mats.items():
            w.write(k, v)
    got = dict(entries(str(tmp_path / "t.ark")))
    for k, v in mats.items():
        np.testing.assert_array_equal(got[k].reshape(v.shape) if v.size else got[k].reshape(0, 5), v)
    assert sorted(os.listdir(tmp_path)) == ["o.ark", "o.scp", "t.ark"]


def test_writer_abort_leaves_nothing_and_pipes_work(tmp_path):
    with pytest.raises(RuntimeError):
        with TableWriter(f"ark,scp:{tmp_path}/o.ark,{tmp_path}/o.scp") as w:
            w.write("u", np.zeros((2, 2)))
            raise RuntimeError("stop")
    assert os.listdir(tmp_path) == []
    mats = matrices()
    with TableWriter(f"ark:| gzip -c > {tmp_path}/o.ark.gz") as w:
        for k, v in mats.items():
            w.write(k, v)
    got = dict(entries(f"{tmp_path}/o.ark.gz"))
    assert list(got) == list(mats)
    with pytest.raises(TableError, match=r"command 'exit 4' failed \(exit status 4\)"):
        with TableWriter("ark:| exit 4") as w:
            pass


def test_writer_to_stdout_carries_only_the_archive(tmp_path):
    code = ("import numpy as np; from ngsgd_mpi.kaldi.tables import TableWriter\n"
            "with TableWriter('ark:-') as w:\n"
            "    w.write('a', np.ones((2, 3))); w.write('b', np.zeros((1, 3)))\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, timeout=60)
    assert out.returncode == 0, out.stderr
    (tmp_path / "o.ark").write_bytes(out.stdout)
    got = dict(kaldiio.load_ark(str(tmp_path / "o.ark")))
    assert list(got) == ["a", "b"] and got["a"].tolist() == [[1.0] * 3] * 2


@pytest.mark.parametrize("wspec,match", [
    ("o.ark", "must be a Kaldi wspecifier"), ("scp:o.scp", "must name an ark"),
    ("ark,scp:-,o.scp", "an scp needs the ark in a file"), ("ark,q:o.ark", r"unknown option\(s\) q")])
def test_bad_wspecifiers(wspec, match):
    with pytest.raises(TableError, match=match):
        TableWriter(wspec)


def test_rank_wspecifier():
    assert tables.rank_wspecifier("ark,scp:o.ark,o.scp", 1, 2) == ("ark,scp:o.1.ark,o.1.scp", ["o.1.ark", "o.1.scp"])
    assert tables.rank_wspecifier("ark:-", 0, 1) == ("ark:-", [])
    with pytest.raises(TableError, match="with several ranks"):
        tables.rank_wspecifier("ark:-", 0, 2)
