"""OpenFst files (standard arcs) as NumPy arc tables, and the bridge to ``kaldifst``.

Why our own reader: kaldifst 1.7 (the version kaldi-hmm-gmm 1.1.4 works with)
cannot read the ``const`` FSTs that Kaldi's ``mkgraph.sh`` writes
(``HCLG.fst``), and it aborts the whole process on a malformed text FST.
So every FST we use is parsed and checked here first, then handed to kaldifst
as an OpenFst *vector* file that it reads back (:func:`to_kaldifst`).

Binary layout (OpenFst ``fst.h`` / ``vector-fst.h`` / ``const-fst.h``, little-endian):

* header: int32 magic 2125659606, string fst type, string arc type
  (``standard``), int32 version, int32 flags (1: input symbols follow,
  2: output symbols follow), uint64 properties, int64 start, int64 states,
  int64 arcs; strings are an int32 length plus bytes;
* ``vector`` (version 2): per state float32 final weight, int64 arc count,
  then its arcs;
* ``const`` (version 1: each array aligned to 16 bytes from the file start;
  version 2: unaligned): all states as (float32 final, uint32 first arc,
  uint32 arcs, uint32 input epsilons, uint32 output epsilons), then all arcs;
* an arc is (int32 ilabel, int32 olabel, float32 weight, int32 nextstate).

Weights are tropical costs; ``inf`` is the semiring zero (not final).  Kaldi's
lattices (arc type ``lattice4``) have a pair of costs (graph, acoustic) as
weight; they are read and written the same way (vector files only).
"""

from __future__ import annotations

import dataclasses
import math
import os
import struct
import tempfile

import numpy as np

from ngsgd_mpi.faults import InputError

FST_MAGIC = 2125659606
SYMBOL_TABLE_MAGIC = 2125658996
ARC_DTYPE = np.dtype([("ilabel", "<i4"), ("olabel", "<i4"), ("weight", "<f4"), ("nextstate", "<i4")])
LATTICE_ARC_DTYPE = np.dtype([("ilabel", "<i4"), ("olabel", "<i4"), ("weight", "<f4", (2,)), ("nextstate", "<i4")])
#: arc type name -> (arc dtype, dtype of a final weight)
ARC_TYPES = {"standard": (ARC_DTYPE, np.dtype("<f4")), "lattice4": (LATTICE_ARC_DTYPE, np.dtype(("<f4", (2,))))}
CONST_STATE_DTYPE = np.dtype([("final", "<f4"), ("pos", "<u4"), ("narcs", "<u4"), ("niepsilons", "<u4"),
                              ("noepsilons", "<u4")])
_EXPANDED_MUTABLE = 0x3            # the only property bits we claim for files we write


class FstError(InputError):
    """An FST file or text that is not a valid standard-arc FST (one line, names it)."""


@dataclasses.dataclass
class ArcFst:
    """An FST as arrays: the arcs of state s are ``arcs[offsets[s]:offsets[s + 1]]``.

    Fields:
      start:    start state (-1: empty FST).
      final:    (num_states,) float32 final cost, inf where not final
                ((num_states, 2) for lattices).
      offsets:  (num_states + 1,) int64.
      arcs:     (num_arcs,) ARC_DTYPE (LATTICE_ARC_DTYPE for lattices).
      arc_type: "standard" or "lattice4".
    """

    start: int
    final: np.ndarray
    offsets: np.ndarray
    arcs: np.ndarray
    arc_type: str = "standard"

    @property
    def num_states(self) -> int:
        return len(self.final)

    @property
    def num_arcs(self) -> int:
        return len(self.arcs)

    def sources(self) -> np.ndarray:
        """Source state of every arc."""
        return np.repeat(np.arange(self.num_states, dtype=np.int32), np.diff(self.offsets))

    @classmethod
    def from_arcs(cls, num_states: int, start: int, sources, arcs: np.ndarray, final,
                  arc_type: str = "standard") -> "ArcFst":
        """Build from unordered arcs with their source states (a stable sort keeps
        each state's arc order)."""
        sources = np.asarray(sources, dtype=np.int64)
        order = np.argsort(sources, kind="stable")
        offsets = np.zeros(num_states + 1, np.int64)
        np.cumsum(np.bincount(sources, minlength=num_states), out=offsets[1:])
        arc_dtype = ARC_TYPES[arc_type][0]
        return cls(int(start), np.asarray(final, np.float32), offsets, np.asarray(arcs, arc_dtype)[order], arc_type)

    def check(self, where: str) -> None:
        """States, labels and weights are in range (what kaldifst would otherwise trust)."""
        n = self.num_states
        if not (self.start == -1 and n == 0) and not 0 <= self.start < n:
            raise FstError(f"{where}: start state {self.start} is not one of the {n} states")
        if len(self.offsets) != n + 1 or self.offsets[0] != 0 or self.offsets[-1] != self.num_arcs \
                or np.any(np.diff(self.offsets) < 0):
            raise FstError(f"{where}: inconsistent arc counts")
        a = self.arcs
        if len(a) and (a["nextstate"].min() < 0 or a["nextstate"].max() >= n):
            raise FstError(f"{where}: an arc leads to a state outside 0..{n - 1}")
        if len(a) and (a["ilabel"].min() < 0 or a["olabel"].min() < 0):
            raise FstError(f"{where}: negative arc label")
        if np.any(np.isnan(a["weight"])) or np.any(np.isnan(self.final)) or np.any(a["weight"] == -np.inf):
            raise FstError(f"{where}: NaN or -inf weight")


# --------------------------------------------------------------------------- binary files

class _Bytes:
    def __init__(self, data: bytes, where: str):
        self.data, self.pos, self.where = data, 0, where

    def take(self, n: int, what: str) -> bytes:
        if n < 0 or self.pos + n > len(self.data):
            raise FstError(f"{self.where}: truncated FST file (reading {what})")
        chunk = self.data[self.pos:self.pos + n]
        self.pos += n
        return chunk

    def unpack(self, fmt: str, what: str):
        return struct.unpack(fmt, self.take(struct.calcsize(fmt), what))

    def string(self, what: str) -> str:
        (n,) = self.unpack("<i", what)
        if not 0 <= n <= 4096:
            raise FstError(f"{self.where}: not an OpenFst file (bad {what} length {n})")
        return self.take(n, what).decode("latin-1")

    def array(self, dtype: np.dtype, count: int, what: str) -> np.ndarray:
        return np.frombuffer(self.take(count * dtype.itemsize, what), dtype).copy()

    def align(self) -> None:
        self.pos = (self.pos + 15) // 16 * 16


def _skip_symbol_table(b: _Bytes) -> None:
    (magic,) = b.unpack("<i", "symbol table")
    if magic != SYMBOL_TABLE_MAGIC:
        raise FstError(f"{b.where}: bad symbol table in the FST header")
    b.string("symbol table name")
    _, size = b.unpack("<qq", "symbol table size")
    if size < 0:
        raise FstError(f"{b.where}: bad symbol table size {size}")
    for _ in range(size):
        b.string("symbol")
        b.unpack("<q", "symbol key")


def parse_fst(data: bytes, where: str) -> ArcFst:
    """A binary vector or const FST of standard (tropical float) arcs."""
    b = _Bytes(data, where)
    if len(data) < 4 or b.unpack("<i", "magic")[0] != FST_MAGIC:
        raise FstError(f"{where}: not an OpenFst binary FST (bad magic number)")
    fst_type, arc_type = b.string("FST type"), b.string("arc type")
    version, flags, _props, start, num_states, num_arcs = b.unpack("<iiQqqq", "header")
    if arc_type not in ARC_TYPES or (fst_type == "const" and arc_type != "standard"):
        raise FstError(f"{where}: arc type {arc_type!r}, expected 'standard' (tropical float)")
    if flags & 1:
        _skip_symbol_table(b)
    if flags & 2:
        _skip_symbol_table(b)
    if fst_type == "vector":
        if version != 2:
            raise FstError(f"{where}: vector FST version {version}, expected 2")
        return _parse_vector(b, start, arc_type)
    if fst_type == "const":
        if version not in (1, 2) or not 0 <= num_states < 2 ** 31 or not 0 <= num_arcs < 2 ** 32:
            raise FstError(f"{where}: unsupported const FST (version {version}, {num_states} states, "
                           f"{num_arcs} arcs)")
        if version == 1:
            b.align()
        states = b.array(CONST_STATE_DTYPE, num_states, "states")
        if version == 1:
            b.align()
        arcs = b.array(ARC_DTYPE, num_arcs, "arcs")
        offsets = np.concatenate([[0], np.cumsum(states["narcs"].astype(np.int64))])
        if offsets[-1] != num_arcs or np.any(states["pos"].astype(np.int64) != offsets[:-1]):
            raise FstError(f"{where}: const FST arc table does not match its states")
        fst = ArcFst(int(start), states["final"].astype(np.float32), offsets, arcs)
    else:
        raise FstError(f"{where}: FST type {fst_type!r}, expected 'vector' or 'const'")
    if b.pos != len(data):
        raise FstError(f"{where}: {len(data) - b.pos} unexpected bytes after the FST")
    fst.check(where)
    return fst


def _parse_vector(b: _Bytes, start: int, arc_type: str) -> ArcFst:
    arc_dtype, final_dtype = ARC_TYPES[arc_type]
    hsize = final_dtype.itemsize + 8
    count_at = struct.Struct("<q").unpack_from
    data, pos, end = b.data, b.pos, len(b.data)
    heads = []
    while pos + hsize <= end:        # a state is (final, int64 count, arcs): find where each one starts
        heads.append(pos)
        pos += hsize + count_at(data, pos + final_dtype.itemsize)[0] * arc_dtype.itemsize
    if pos != end:
        raise FstError(f"{b.where}: truncated FST file (reading a state)")
    raw = np.frombuffer(data, np.uint8)
    heads = np.array(heads, np.int64)
    head_dtype = np.dtype([("final", final_dtype), ("narcs", "<i8")])
    head = raw[(heads[:, None] + np.arange(hsize)).ravel()].view(head_dtype) if len(heads) else np.zeros(0, head_dtype)
    counts = head["narcs"].astype(np.int64)
    if np.any(counts < 0):
        raise FstError(f"{b.where}: negative arc count")
    offsets = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
    first = heads + hsize - offsets[:-1] * arc_dtype.itemsize      # byte of arc k of state s: first[s] + k * size
    byte_index = np.repeat(first, counts) + np.arange(offsets[-1]) * arc_dtype.itemsize
    arcs = raw[(byte_index[:, None] + np.arange(arc_dtype.itemsize)).ravel()].view(arc_dtype) \
        if len(byte_index) else np.zeros(0, arc_dtype)
    fst = ArcFst(int(start), head["final"].astype(np.float32), offsets, arcs.copy(), arc_type)
    fst.check(b.where)
    return fst


def read_fst(path: str) -> ArcFst:
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError as exc:
        raise FstError(f"{path}: cannot read ({exc.strerror})") from None
    return parse_fst(data, path)


def vector_fst_bytes(fst: ArcFst, chunk_arcs: int = 1 << 18) -> bytes:
    """The OpenFst vector-format file of ``fst``."""
    header = struct.pack("<i", FST_MAGIC)
    for name in ("vector", fst.arc_type):
        header += struct.pack("<i", len(name)) + name.encode()
    header += struct.pack("<iiQqqq", 2, 0, _EXPANDED_MUTABLE, fst.start, fst.num_states, fst.num_arcs)
    parts = [header]
    counts = np.diff(fst.offsets)
    arc_dtype, final_dtype = ARC_TYPES[fst.arc_type]
    state_dtype = np.dtype([("final", final_dtype), ("narcs", "<i8")])
    hsize, asize = state_dtype.itemsize, arc_dtype.itemsize
    s0 = 0
    while s0 < fst.num_states:       # states in chunks of about chunk_arcs arcs (bounded temporaries)
        s1 = int(np.searchsorted(fst.offsets, fst.offsets[s0] + chunk_arcs, side="right"))
        s1 = min(max(s1 - 1, s0 + 1), fst.num_states)
        heads = np.zeros(s1 - s0, state_dtype)
        heads["final"], heads["narcs"] = fst.final[s0:s1], counts[s0:s1]
        sizes = hsize + asize * counts[s0:s1]
        starts = np.concatenate([[0], np.cumsum(sizes)[:-1]])
        out = np.empty(int(sizes.sum()), np.uint8)
        out[(starts[:, None] + np.arange(hsize)).ravel()] = heads.view(np.uint8)
        a0, a1 = fst.offsets[s0], fst.offsets[s1]
        if a1 > a0:
            src = np.repeat(np.arange(s1 - s0), counts[s0:s1])
            pos = starts[src] + hsize + asize * (np.arange(a0, a1) - fst.offsets[s0:s1][src])
            out[(pos[:, None] + np.arange(asize)).ravel()] = fst.arcs[a0:a1].view(np.uint8)
        parts.append(out.tobytes())
        s0 = s1
    return b"".join(parts)


def write_fst(fst: ArcFst, path: str) -> None:
    """Write a vector FST atomically (a temporary file renamed into place)."""
    directory = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=".fst", dir=directory)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(vector_fst_bytes(fst))
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


# --------------------------------------------------------------------------- text FSTs

def parse_text_fst(text: str, where: str) -> ArcFst:
    """OpenFst's text format (``src dst ilabel olabel [cost]`` / ``state [cost]``,
    integer labels, the first arc's source is the start state), fully checked."""
    sources, arcs, finals = [], [], {}
    start = -1
    for number, line in enumerate(text.splitlines(), 1):
        fields = line.split()
        if not fields:
            continue
        try:
            if len(fields) in (4, 5):
                src, dst, ilabel, olabel = (int(x) for x in fields[:4])
                cost = float(fields[4]) if len(fields) == 5 else 0.0
                if min(src, dst, ilabel, olabel) < 0 or not -math.inf < cost or math.isnan(cost):
                    raise ValueError
                start = src if start < 0 else start
                sources.append(src)
                arcs.append((ilabel, olabel, cost, dst))
            elif len(fields) in (1, 2):
                state = int(fields[0])
                cost = float(fields[1]) if len(fields) == 2 else 0.0
                if state < 0 or math.isnan(cost) or cost == -math.inf:
                    raise ValueError
                start = state if start < 0 else start
                finals[state] = cost
            else:
                raise ValueError
        except ValueError:
            raise FstError(f"{where}: line {number} is not an FST arc or final state: {line[:80]!r}") from None
    if start < 0:
        raise FstError(f"{where}: empty FST")
    num_states = 1 + max([start] + sources + [a[3] for a in arcs] + list(finals))
    final = np.full(num_states, np.inf, np.float32)
    for state, cost in finals.items():
        final[state] = cost
    fst = ArcFst.from_arcs(num_states, start, sources, np.array(arcs, ARC_DTYPE), final)
    fst.check(where)
    return fst


def read_symbol_table(path: str, what: str = "symbol table") -> dict[str, int]:
    """An OpenFst text symbol table (``symbol id`` lines: words.txt, phones.txt) as
    {symbol: id}; symbols and ids unique."""
    table: dict[str, int] = {}
    ids: set[int] = set()
    try:
        with open(path, encoding="utf-8") as f:
            for number, line in enumerate(f, 1):
                fields = line.split()
                if not fields:
                    continue
                if len(fields) != 2 or not fields[1].isdigit():
                    raise FstError(f"{path}: line {number}: expected 'symbol id', got {line.strip()[:60]!r}")
                if fields[0] in table or int(fields[1]) in ids:
                    raise FstError(f"{path}: line {number}: {fields[0]!r} or id {fields[1]} appears twice")
                table[fields[0]] = int(fields[1])
                ids.add(table[fields[0]])
    except (OSError, UnicodeDecodeError) as exc:
        raise FstError(f"{path}: cannot read {what} ({exc})") from None
    if not table:
        raise FstError(f"{path}: empty {what}")
    return table


# --------------------------------------------------------------------------- kaldifst bridge

def decoding_modules():
    """(kaldifst, kaldilm), imported in an order that works.

    Importing kaldilm before kaldifst (or kaldi-hmm-gmm) hangs the process in a
    shared library's initialiser (seen with kaldilm 1.15.5, kaldifst 1.7.17,
    kaldi-hmm-gmm 1.1.4), so every use goes through here, kaldilm last (the
    tests load kaldi-hmm-gmm, their oracle, before kaldilm: tests/conftest.py)."""
    try:
        import kaldifst  # noqa: PLC0415 - optional dependencies (the 'decode' extra)
        import kaldilm  # noqa: PLC0415
    except ImportError as exc:
        raise ImportError(f"decoding needs the 'decode' extra ({exc.name} is missing): "
                          "pip install 'ngsgd_mpi[decode]'") from exc
    return kaldifst, kaldilm


def kaldifst_module():
    return decoding_modules()[0]


def to_kaldifst(fst: ArcFst):
    """A kaldifst.StdVectorFst (kaldifst.Lattice for lattices) with the same states and arcs."""
    kaldifst = kaldifst_module()
    reader = kaldifst.Lattice if fst.arc_type == "lattice4" else kaldifst.StdVectorFst
    with tempfile.TemporaryDirectory(prefix="ngsgd-fst-") as tmp:
        path = os.path.join(tmp, "g.fst")
        with open(path, "wb") as f:
            f.write(vector_fst_bytes(fst))
        out = reader.read(path)
    if out is None:
        raise FstError("kaldifst could not read an FST we wrote (OpenFst version mismatch?)")
    return out


def from_kaldifst(kfst) -> ArcFst:
    """The arcs of a kaldifst FST or lattice (written to a temporary vector file and parsed)."""
    kaldifst = kaldifst_module()
    with tempfile.TemporaryDirectory(prefix="ngsgd-fst-") as tmp:
        path = os.path.join(tmp, "g.fst")
        (kfst if isinstance(kfst, kaldifst.Lattice) else kaldifst.StdVectorFst(kfst)).write(path)
        return read_fst(path)
