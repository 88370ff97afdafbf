"""OpenFst files as arc tables (ngsgd_mpi/kaldi/fst.py), checked against kaldifst's own I/O."""

import os
import struct

import numpy as np
import pytest

from ngsgd_mpi.kaldi.fst import (ARC_DTYPE, ArcFst, FstError, from_kaldifst, parse_fst, parse_text_fst, read_fst,
                                 to_kaldifst, vector_fst_bytes, write_fst)

kaldifst = pytest.importorskip("kaldifst")
HCLG = os.path.join(os.path.dirname(__file__), "..", "..", "shared", "kaldi", "yesno_decode", "exp", "mono0a",
                    "graph_tgpr", "HCLG.fst")
TEXT = "0 1 3 4 0.5\n1 2 5 0 1.5\n1 1.25\n2 0 7 7 -0.25\n2\n"


def random_fst(seed=0, num_states=300, num_arcs=1500):
    rng = np.random.default_rng(seed)
    arcs = np.zeros(num_arcs, ARC_DTYPE)
    arcs["ilabel"], arcs["olabel"] = rng.integers(0, 50, num_arcs), rng.integers(0, 9, num_arcs)
    arcs["weight"], arcs["nextstate"] = rng.normal(size=num_arcs), rng.integers(0, num_states, num_arcs)
    final = np.where(rng.random(num_states) < 0.2, rng.random(num_states), np.inf).astype(np.float32)
    return ArcFst.from_arcs(num_states, 3, rng.integers(0, num_states, num_arcs), arcs, final)


def same(a: ArcFst, b: ArcFst):
    assert a.start == b.start and a.arc_type == b.arc_type
    np.testing.assert_array_equal(a.offsets, b.offsets)
    np.testing.assert_array_equal(a.arcs, b.arcs)
    np.testing.assert_array_equal(a.final, b.final)


def test_kaldis_const_hclg():
    if not os.path.exists(HCLG):
        pytest.skip("shared Kaldi files not available")
    fst = read_fst(HCLG)
    assert (fst.start, fst.num_states, fst.num_arcs) == (7, 24, 54)
    assert kaldifst.StdConstFst.read(HCLG) is None          # what this module works around
    k = to_kaldifst(fst)
    assert (k.start, k.num_states) == (7, 24)
    same(from_kaldifst(k), fst)


def test_vector_and_const_files_written_by_kaldifst(tmp_path):
    fst = random_fst()
    k = to_kaldifst(fst)
    k.write(str(tmp_path / "v.fst"))
    kaldifst.StdConstFst(k).write(str(tmp_path / "c.fst"))
    same(read_fst(str(tmp_path / "v.fst")), fst)
    same(read_fst(str(tmp_path / "c.fst")), fst)
    # our vector bytes are kaldifst's except two header fields: the property bits (34..42),
    # which we leave unknown, and the arc count (58..66), which kaldifst leaves 0
    ours, theirs = vector_fst_bytes(fst), (tmp_path / "v.fst").read_bytes()
    assert ours[:34] == theirs[:34] and ours[42:58] == theirs[42:58] and ours[66:] == theirs[66:]
    write_fst(fst, str(tmp_path / "w.fst"))
    same(read_fst(str(tmp_path / "w.fst")), fst)


def test_aligned_const_version_1(tmp_path):
    """OpenFst's const version 1 pads the state and arc arrays to 16 bytes."""
    fst = random_fst(1, 7, 11)
    kaldifst.StdConstFst(to_kaldifst(fst)).write(str(tmp_path / "c.fst"))
    data = (tmp_path / "c.fst").read_bytes()
    header = 4 + 4 + 5 + 4 + 8 + 4 + 4 + 8 + 24
    states_end = header + 20 * fst.num_states
    pad = lambda n: b"\0" * (-n % 16)  # noqa: E731
    v1 = bytearray(data[:header])
    v1[25:29] = struct.pack("<i", 1)
    v1 += pad(len(v1)) + data[header:states_end]
    v1 += pad(len(v1)) + data[states_end:]
    same(parse_fst(bytes(v1), "v1"), fst)


def test_lattices_round_trip():
    rng = np.random.default_rng(2)
    fst = random_fst(3, 40, 120)
    lat = ArcFst(fst.start, np.stack([fst.final, np.where(np.isinf(fst.final), np.inf, 0.5)], 1).astype(np.float32),
                 fst.offsets, np.zeros(fst.num_arcs, np.dtype([("ilabel", "<i4"), ("olabel", "<i4"),
                                                               ("weight", "<f4", (2,)), ("nextstate", "<i4")])),
                 "lattice4")
    for name in ("ilabel", "olabel", "nextstate"):
        lat.arcs[name] = fst.arcs[name]
    lat.arcs["weight"] = rng.normal(size=(fst.num_arcs, 2))
    k = to_kaldifst(lat)
    assert isinstance(k, kaldifst.Lattice)
    same(from_kaldifst(k), lat)


def test_text_fsts_are_checked_before_kaldifst():
    fst = parse_text_fst(TEXT, "t")
    assert (fst.start, fst.num_states, fst.num_arcs) == (0, 3, 3)
    same(fst, from_kaldifst(kaldifst.compile(TEXT)))
    for bad in ("0 1 a 2\n", "0 1 -3 2\n", "0 1 2 3 nan\n", "0 1 2\n", "0 -1 2 3\n", "", "1 2 3 4 5 6\n"):
        with pytest.raises(FstError):
            parse_text_fst(bad, "bad.txt")


def test_broken_binary_files(tmp_path):
    data = vector_fst_bytes(random_fst(4))
    for cut in (3, 30, 60, len(data) - 7):
        with pytest.raises(FstError) as err:
            parse_fst(data[:cut], "cut.fst")
        assert "cut.fst" in str(err.value) and "\n" not in str(err.value)
    with pytest.raises(FstError, match="magic"):
        parse_fst(b"not an fst at all", "x")
    bad_state = bytearray(data)
    bad_state[46:54] = struct.pack("<q", 99)                   # start state out of range
    with pytest.raises(FstError, match="start state"):
        parse_fst(bytes(bad_state), "x")
    arcs = random_fst(5)
    arcs.arcs["nextstate"][0] = 10 ** 6
    with pytest.raises(FstError, match="outside"):
        parse_fst(vector_fst_bytes(arcs), "x")
    with pytest.raises(FstError, match="cannot read"):
        read_fst(str(tmp_path / "missing.fst"))
