"""Kaldi model files without Kaldi: TransitionModel and diagonal-GMM acoustic models.

A Kaldi ``final.mdl`` is a TransitionModel followed by the acoustic model
(``AmDiagGmm`` for GMM systems, an nnet for neural ones), written with
Kaldi's basic-type I/O (``base/io-funcs.h``): binary files start with
``"\\0B"``, then tokens are space-terminated strings, integers and floats are
a size byte plus little-endian raw bytes, integer vectors a size byte, an
int32 count and raw data, float vectors/matrices a ``FV``/``DV``/``FM``/``DM``
token, sizes, raw data.  Text files hold the same items separated by
whitespace, vectors as ``[ 1 2 3 ]``, matrices as rows of a bracketed block.

What is read (``hmm/transition-model.cc``, ``hmm/hmm-topology.cc``,
``gmm/diag-gmm.cc``):

* :class:`HmmTopology`: per phone an HMM of states, each with a forward and a
  self-loop pdf class (-1: non-emitting) and transitions ``(dest, prob)``.
* :class:`TransitionModel`: *tuples* ``(phone, hmm_state, forward_pdf,
  self_loop_pdf)``, sorted; tuple ``i`` is transition-state ``i + 1``, whose
  transitions are numbered consecutively from ``state2id[tstate]``: these are
  the transition-ids (1-based) that graphs and alignments hold.  A self-loop
  transition reads the self-loop pdf, any other the forward pdf (T1)::

      pdf(tid) = self_loop_pdf if dest(tid) == hmm_state else forward_pdf

  Log-probabilities are one per transition-id (element 0 unused).
* :class:`AmDiagGmm`: per pdf a diagonal GMM with weights, ``means * inv_vars``
  and ``inv_vars``; the log-likelihood of a frame x is (G1)::

      log p(x | pdf) = logsumexp_m( gconst_m + means_invvars_m . x - 0.5 inv_vars_m . x^2 )
      gconst_m = log w_m - 0.5 D log(2 pi) + 0.5 sum_d log inv_var_md
                 - 0.5 sum_d means_invvars_md^2 / inv_var_md

  The gconsts are recomputed from the other fields, as ``DiagGmm::Read`` does.

Every size and token is checked; a truncated or foreign file raises
:class:`KaldiFormatError` with one line naming the file and what was expected.
"""

from __future__ import annotations

import dataclasses
import math
import struct

import numpy as np

from ngsgd_mpi.faults import InputError

NO_PDF = -1


class KaldiFormatError(InputError):
    """A Kaldi object file that is not what it should be (one line, names the file)."""


# --------------------------------------------------------------------------- basic-type reader

class ObjectReader:
    """Kaldi basic-type input over the bytes of one file, binary or text."""

    def __init__(self, data: bytes, path: str):
        self.data, self.path = data, path
        self.binary = data.startswith(b"\0B")
        self.pos = 2 if self.binary else 0

    def error(self, what: str) -> KaldiFormatError:
        return KaldiFormatError(f"{self.path}: {what} (at byte {self.pos})")

    # -- primitives
    def _take(self, n: int, what: str) -> bytes:
        if self.pos + n > len(self.data):
            raise self.error(f"unexpected end of file reading {what}")
        chunk = self.data[self.pos:self.pos + n]
        self.pos += n
        return chunk

    def _skip_space(self) -> None:
        data, n = self.data, len(self.data)
        while self.pos < n and data[self.pos] in b" \t\n\r":
            self.pos += 1

    def _word(self, what: str) -> str:
        """Next whitespace-delimited word (text mode)."""
        self._skip_space()
        start = self.pos
        data, n = self.data, len(self.data)
        while self.pos < n and data[self.pos] not in b" \t\n\r":
            self.pos += 1
        if self.pos == start:
            raise self.error(f"unexpected end of file reading {what}")
        return data[start:self.pos].decode("latin-1")

    def at_end(self) -> bool:
        if not self.binary:
            self._skip_space()
        return self.pos >= len(self.data)

    # -- Kaldi basic types
    def token(self) -> str:
        if not self.binary:
            return self._word("a token")
        end = self.data.find(b" ", self.pos)
        if end < 0:
            raise self.error("unexpected end of file reading a token")
        word = self.data[self.pos:end].decode("latin-1")
        self.pos = end + 1
        return word

    def expect(self, token: str) -> None:
        start = self.pos
        got = self.token()
        if got != token:
            self.pos = start
            raise self.error(f"expected {token}, got {got[:40]!r}")

    def int32(self) -> int:
        if not self.binary:
            word = self._word("an integer")
            try:
                return int(word)
            except ValueError:
                raise self.error(f"expected an integer, got {word[:40]!r}") from None
        size = self._take(1, "an integer")[0]
        if size != 4:
            self.pos -= 1
            raise self.error(f"expected a 4-byte integer, got size byte {size}")
        return struct.unpack("<i", self._take(4, "an integer"))[0]

    def float(self) -> float:
        if not self.binary:
            word = self._word("a number")
            try:
                return float(word)
            except ValueError:
                raise self.error(f"expected a number, got {word[:40]!r}") from None
        size = self._take(1, "a number")[0]
        if size not in (4, 8):
            self.pos -= 1
            raise self.error(f"expected a 4- or 8-byte float, got size byte {size}")
        return struct.unpack("<f" if size == 4 else "<d", self._take(size, "a number"))[0]

    def int32_vector(self) -> np.ndarray:
        if not self.binary:
            return np.array(self._bracketed("an integer vector"), dtype=np.int64).astype(np.int32)
        size = self._take(1, "an integer vector")[0]
        if size != 4:
            self.pos -= 1
            raise self.error(f"expected an int32 vector, got element size {size}")
        (n,) = struct.unpack("<i", self._take(4, "a vector size"))
        if n < 0:
            raise self.error(f"negative vector size {n}")
        return np.frombuffer(self._take(4 * n, "vector data"), dtype="<i4").astype(np.int32)

    def float_vector(self) -> np.ndarray:
        if not self.binary:
            return np.array(self._bracketed("a vector"), dtype=np.float64)
        kind = self.token()
        if kind not in ("FV", "DV"):
            raise self.error(f"expected a float vector (FV or DV), got {kind[:40]!r}")
        n = self.int32()
        if n < 0:
            raise self.error(f"negative vector size {n}")
        dtype = "<f4" if kind == "FV" else "<f8"
        return np.frombuffer(self._take(n * np.dtype(dtype).itemsize, "vector data"), dtype).astype(np.float64)

    def float_matrix(self) -> np.ndarray:
        if not self.binary:
            return self._text_matrix()
        kind = self.token()
        if kind not in ("FM", "DM"):
            raise self.error(f"expected a float matrix (FM or DM), got {kind[:40]!r}")
        rows, cols = self.int32(), self.int32()
        if rows < 0 or cols < 0:
            raise self.error(f"negative matrix size {rows} x {cols}")
        dtype = np.dtype("<f4" if kind == "FM" else "<f8")
        raw = self._take(rows * cols * dtype.itemsize, "matrix data")
        with np.errstate(invalid="ignore"):            # damaged data is caught by the callers' checks
            return np.frombuffer(raw, dtype).astype(np.float64).reshape(rows, cols)

    def _bracketed(self, what: str) -> list[str]:
        if self._word(what) != "[":
            raise self.error(f"expected '[' opening {what}")
        items = []
        while True:
            word = self._word(what)
            if word == "]":
                return items
            items.append(word)

    def _text_matrix(self) -> np.ndarray:
        """``[ r1 \\n r2 ... ]``: rows end at newlines (Kaldi's text matrix)."""
        if self._word("a matrix") != "[":
            raise self.error("expected '[' opening a matrix")
        end = self.data.find(b"]", self.pos)
        if end < 0:
            raise self.error("unexpected end of file reading a matrix")
        rows = [line.split() for line in self.data[self.pos:end].decode("latin-1").splitlines()]
        rows = [r for r in rows if r]
        self.pos = end + 1
        if not rows:
            return np.zeros((0, 0))
        if len({len(r) for r in rows}) != 1:
            raise self.error("matrix rows of different lengths")
        try:
            return np.array(rows, dtype=np.float64)
        except ValueError:
            raise self.error("non-numeric matrix entry") from None


def read_file(path: str) -> ObjectReader:
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError as exc:
        raise KaldiFormatError(f"{path}: cannot read ({exc.strerror})") from None
    if not data:
        raise KaldiFormatError(f"{path}: empty file")
    return ObjectReader(data, path)


# --------------------------------------------------------------------------- topology

@dataclasses.dataclass(frozen=True)
class HmmState:
    """One state of a topology entry: pdf classes (NO_PDF: non-emitting) and
    transitions ``((dest_state, prob), ...)`` in file order (= transition index)."""

    forward_pdf_class: int
    self_loop_pdf_class: int
    transitions: tuple[tuple[int, float], ...]


class HmmTopology:
    """Kaldi's HmmTopology: ``entries[phone2entry[phone]]`` is that phone's HMM."""

    def __init__(self, phones, phone2entry: dict[int, int], entries, where: str = "topology"):
        self.phones = sorted(int(p) for p in phones)
        self.phone2entry = dict(phone2entry)
        self.entries = [list(e) for e in entries]
        self._check(where)

    def entry(self, phone: int) -> list[HmmState]:
        return self.entries[self.phone2entry[phone]]

    def num_pdf_classes(self, phone: int) -> int:
        return 1 + max(max(s.forward_pdf_class, s.self_loop_pdf_class) for s in self.entry(phone))

    @property
    def is_hmm(self) -> bool:
        return all(s.forward_pdf_class == s.self_loop_pdf_class for e in self.entries for s in e)

    def _check(self, where: str) -> None:
        """HmmTopology::Check: a fault here is a one-line KaldiFormatError."""
        def bad(msg):
            return KaldiFormatError(f"{where}: {msg}")
        if not self.phones or not self.entries:
            raise bad("empty topology")
        if len(set(self.phones)) != len(self.phones) or self.phones[0] <= 0:
            raise bad("phones must be distinct and > 0")
        used = set()
        for p in self.phones:
            if not 0 <= self.phone2entry.get(p, -1) < len(self.entries):
                raise bad(f"phone {p} has no topology entry")
            used.add(self.phone2entry[p])
        for i, entry in enumerate(self.entries):
            if i not in used:
                raise bad(f"topology entry {i} has no phones")
            n = len(entry)
            if n <= 1:
                raise bad(f"topology entry {i} needs an emitting state and a final state")
            if entry[-1].transitions or entry[-1].forward_pdf_class != NO_PDF:
                raise bad(f"topology entry {i}: the last state must be final (no pdf, no transitions)")
            has_in = [False] * n
            classes = set()
            for j, state in enumerate(entry):
                if state.forward_pdf_class != NO_PDF:
                    classes.update((state.forward_pdf_class, state.self_loop_pdf_class))
                dests = [d for d, _ in state.transitions]
                if len(set(dests)) != len(dests):
                    raise bad(f"topology entry {i} state {j}: duplicate transition")
                for dest, prob in state.transitions:
                    if not 0 <= dest < n:
                        raise bad(f"topology entry {i} state {j}: invalid destination state {dest}")
                    if not prob > 0:
                        raise bad(f"topology entry {i} state {j}: transition probability {prob} is not > 0")
                    if state.forward_pdf_class == NO_PDF and (dest == j or dest == n - 1):
                        raise bad(f"topology entry {i} state {j}: a non-emitting state may not loop "
                                  "or go to the final state")
                    has_in[dest] = True
                if j + 1 < n and not state.transitions:
                    raise bad(f"topology entry {i} state {j}: a non-final state needs transitions")
            if not all(has_in[1:]):
                raise bad(f"topology entry {i}: a state has no incoming transition")
            if sorted(classes) != list(range(len(classes))):
                raise bad(f"topology entry {i}: pdf classes must be contiguous from 0")

    # -- reading and writing
    @classmethod
    def read(cls, r: ObjectReader) -> "HmmTopology":
        r.expect("<Topology>")
        if r.binary:
            phones = r.int32_vector()
            phone2idx = r.int32_vector()
            size = r.int32()
            is_hmm = size != -1
            if not is_hmm:
                size = r.int32()
            if not 0 < size <= 100000:
                raise r.error(f"implausible number of topology entries {size}")
            entries = []
            for _ in range(size):
                num_states = r.int32()
                if not 0 < num_states <= 10000:
                    raise r.error(f"implausible number of HMM states {num_states}")
                states = []
                for _ in range(num_states):
                    forward = r.int32()
                    self_loop = forward if is_hmm else r.int32()
                    num_trans = r.int32()
                    if not 0 <= num_trans <= 10000:
                        raise r.error(f"implausible number of transitions {num_trans}")
                    trans = tuple((r.int32(), r.float()) for _ in range(num_trans))
                    states.append(HmmState(forward, self_loop, trans))
                entries.append(states)
            r.expect("</Topology>")
            mapping = {int(p): int(phone2idx[p]) for p in phones if 0 <= p < len(phone2idx)}
            return cls(phones, mapping, entries, r.path)
        return cls._read_text(r)

    @classmethod
    def _read_text(cls, r: ObjectReader) -> "HmmTopology":
        phones, mapping, entries = [], {}, []
        while True:
            token = r.token()
            if token == "</Topology>":
                break
            if token != "<TopologyEntry>":
                raise r.error(f"expected <TopologyEntry> or </Topology>, got {token[:40]!r}")
            r.expect("<ForPhones>")
            entry_phones = []
            while (word := r.token()) != "</ForPhones>":
                try:
                    entry_phones.append(int(word))
                except ValueError:
                    raise r.error(f"expected a phone id, got {word[:40]!r}") from None
            states = []
            token = r.token()
            while token != "</TopologyEntry>":
                if token != "<State>":
                    raise r.error(f"expected <State> or </TopologyEntry>, got {token[:40]!r}")
                if r.int32() != len(states):
                    raise r.error(f"states must be numbered in order from 0 (expected {len(states)})")
                token = r.token()
                forward = self_loop = NO_PDF
                if token == "<PdfClass>":
                    forward = self_loop = r.int32()
                    token = r.token()
                elif token == "<ForwardPdfClass>":
                    forward = r.int32()
                    r.expect("<SelfLoopPdfClass>")
                    self_loop = r.int32()
                    token = r.token()
                trans = []
                while token == "<Transition>":
                    trans.append((r.int32(), r.float()))
                    token = r.token()
                if token != "</State>":
                    raise r.error(f"expected </State>, got {token[:40]!r}")
                states.append(HmmState(forward, self_loop, tuple(trans)))
                token = r.token()
            for p in entry_phones:
                if p in mapping:
                    raise r.error(f"phone {p} is in two topology entries")
                mapping[p] = len(entries)
                phones.append(p)
            entries.append(states)
        return cls(phones, mapping, entries, r.path)

    @classmethod
    def from_text(cls, text: str, where: str = "topology") -> "HmmTopology":
        """A topology in Kaldi's text form (``data/lang/topo``)."""
        return cls.read(ObjectReader(text.encode("latin-1"), where))

    def to_text(self) -> str:
        """Kaldi's text form (HmmTopology::Write with binary=false)."""
        lines = ["<Topology>"]
        for i, entry in enumerate(self.entries):
            lines += ["<TopologyEntry>", "<ForPhones>",
                      " ".join(str(p) for p in self.phones if self.phone2entry[p] == i), "</ForPhones>"]
            for j, s in enumerate(entry):
                pdf = ""
                if s.forward_pdf_class != NO_PDF:
                    pdf = (f"<PdfClass> {s.forward_pdf_class} " if self.is_hmm else
                           f"<ForwardPdfClass> {s.forward_pdf_class} <SelfLoopPdfClass> {s.self_loop_pdf_class} ")
                trans = "".join(f"<Transition> {d} {p!r} " for d, p in s.transitions)
                lines.append(f"<State> {j} {pdf}{trans}</State>")
            lines.append("</TopologyEntry>")
        lines.append("</Topology>")
        return "\n".join(lines) + "\n"


# --------------------------------------------------------------------------- transition model

class TransitionModel:
    """Kaldi's TransitionModel; transition-ids are 1-based, index 0 of every
    per-tid array is a placeholder (-1 / 0 / False).

    Fields (all derived from ``topology``, ``tuples``, ``log_probs``):
      tuples:           (num_tstates, 4) int32 (phone, hmm_state, forward_pdf, self_loop_pdf).
      log_probs:        (num_tids + 1,) float64, log transition probabilities.
      state2id:         (num_tstates + 2,) first tid of each transition-state (1-based).
      tid2tstate, tid2index, tid2pdf, tid2phone: (num_tids + 1,) int32.
      tid_is_self_loop, tid_is_final: (num_tids + 1,) bool (final: goes to the final state).
      tstate_self_loop: (num_tstates + 1,) the self-loop tid of each tstate, 0 if none.
      non_self_loop_log_prob: (num_tstates + 1,) log(1 - p_self_loop) (0 without a loop).
    """

    def __init__(self, topology: HmmTopology, tuples, log_probs=None, where: str = "transition model"):
        self.topology = topology
        self.tuples = np.asarray(tuples, dtype=np.int32).reshape(-1, 4)
        self._where = where
        self._derive()
        if log_probs is None:
            log_probs = self._topology_log_probs()
        self.log_probs = np.asarray(log_probs, dtype=np.float64)
        self._check()
        self._derive_probs()

    # -- derived tables (TransitionModel::ComputeDerived)
    def _derive(self) -> None:
        bad = lambda msg: KaldiFormatError(f"{self._where}: {msg}")  # noqa: E731
        t = self.tuples
        if len(t) == 0:
            raise bad("no transition states")
        keys = [tuple(row) for row in t.tolist()]
        if any(a >= b for a, b in zip(keys, keys[1:])):
            raise bad("tuples are not sorted and unique")
        counts = np.empty(len(t), np.int64)
        for i, (phone, hmm_state, fpdf, spdf) in enumerate(keys):
            if phone not in self.topology.phone2entry:
                raise bad(f"tuple {i}: phone {phone} is not in the topology")
            entry = self.topology.entry(phone)
            if not 0 <= hmm_state < len(entry) or entry[hmm_state].forward_pdf_class == NO_PDF:
                raise bad(f"tuple {i}: phone {phone} has no emitting HMM state {hmm_state}")
            if fpdf < 0 or spdf < 0:
                raise bad(f"tuple {i}: negative pdf")
            counts[i] = len(entry[hmm_state].transitions)
        self.state2id = np.concatenate([[0, 1], 1 + np.cumsum(counts)]).astype(np.int32)
        num_tids = int(counts.sum())
        self.tid2tstate = np.concatenate([[0], np.repeat(np.arange(1, len(t) + 1), counts)]).astype(np.int32)
        self.tid2index = (np.arange(num_tids + 1) - self.state2id[self.tid2tstate]).astype(np.int32)
        self.tid2index[0] = -1
        rows = t[self.tid2tstate[1:] - 1]
        dest = np.array([self.topology.entry(p)[h].transitions[k][0]
                         for (p, h), k in zip(rows[:, :2].tolist(), self.tid2index[1:].tolist())], np.int32)
        last = np.array([len(self.topology.entry(p)) - 1 for p in rows[:, 0].tolist()], np.int32)
        self.tid_is_self_loop = np.concatenate([[False], dest == rows[:, 1]])
        self.tid_is_final = np.concatenate([[False], dest == last])
        self.tid2pdf = np.concatenate([[-1], np.where(self.tid_is_self_loop[1:], rows[:, 3], rows[:, 2])]).astype(np.int32)
        self.tid2phone = np.concatenate([[0], rows[:, 0]]).astype(np.int32)
        self.tstate_self_loop = np.zeros(len(t) + 1, np.int32)
        loops = np.flatnonzero(self.tid_is_self_loop)
        self.tstate_self_loop[self.tid2tstate[loops]] = loops

    def _topology_log_probs(self) -> np.ndarray:
        """TransitionModel::InitializeProbs: the topology's probabilities."""
        rows = self.tuples[self.tid2tstate[1:] - 1]
        probs = [self.topology.entry(p)[h].transitions[k][1]
                 for (p, h), k in zip(rows[:, :2].tolist(), self.tid2index[1:].tolist())]
        return np.log(np.concatenate([[1.0], probs]))

    def _check(self) -> None:
        if self.log_probs.shape != (self.num_transition_ids + 1,):
            raise KaldiFormatError(f"{self._where}: {len(self.log_probs)} log-probabilities for "
                                   f"{self.num_transition_ids} transition-ids (expected "
                                   f"{self.num_transition_ids + 1})")
        lp = self.log_probs[1:]
        if not np.all(np.isfinite(lp)) or np.any(lp > 1e-5):
            raise KaldiFormatError(f"{self._where}: transition log-probabilities must be finite and <= 0")

    def _derive_probs(self) -> None:
        """TransitionModel::ComputeDerivedOfProbs."""
        self.non_self_loop_log_prob = np.zeros(self.num_transition_states + 1)
        has = self.tstate_self_loop > 0
        p_loop = np.exp(self.log_probs[self.tstate_self_loop[has]])
        self.non_self_loop_log_prob[has] = np.log(np.maximum(1.0 - p_loop, 1e-10))

    # -- sizes
    @property
    def num_transition_ids(self) -> int:
        return len(self.tid2pdf) - 1

    @property
    def num_transition_states(self) -> int:
        return len(self.tuples)

    @property
    def num_pdfs(self) -> int:
        return int(self.tuples[:, 2:].max()) + 1

    @property
    def num_phones(self) -> int:
        """The largest phone id (Kaldi's NumPhones)."""
        return int(self.tuples[:, 0].max())

    @property
    def phones(self) -> list[int]:
        return self.topology.phones

    # -- lookups
    def tstate_of(self, phone: int, hmm_state: int, forward_pdf: int, self_loop_pdf: int) -> int:
        """TupleToTransitionState (1-based); KeyError if the model has no such tuple."""
        if not hasattr(self, "_tuple_index"):
            self._tuple_index = {tuple(row): i + 1 for i, row in enumerate(self.tuples.tolist())}
        return self._tuple_index[(phone, hmm_state, forward_pdf, self_loop_pdf)]

    def transition_id(self, tstate: int, index: int) -> int:
        return int(self.state2id[tstate]) + index

    def log_prob_ignoring_self_loops(self, tid: int) -> float:
        return float(self.log_probs[tid] - self.non_self_loop_log_prob[self.tid2tstate[tid]])

    # -- reading and writing
    @classmethod
    def read(cls, r: ObjectReader) -> "TransitionModel":
        r.expect("<TransitionModel>")
        topology = HmmTopology.read(r)
        kind = r.token()
        if kind not in ("<Triples>", "<Tuples>"):
            raise r.error(f"expected <Triples> or <Tuples>, got {kind[:40]!r}")
        size = r.int32()
        if not 0 < size <= 10_000_000:
            raise r.error(f"implausible number of transition states {size}")
        width = 3 if kind == "<Triples>" else 4
        values = np.array([r.int32() for _ in range(size * width)], np.int64).reshape(size, width)
        if width == 3:
            values = np.column_stack([values, values[:, 2]])
        r.expect("</Triples>" if width == 3 else "</Tuples>")
        r.expect("<LogProbs>")
        log_probs = r.float_vector()
        r.expect("</LogProbs>")
        r.expect("</TransitionModel>")
        return cls(topology, values, log_probs, r.path)

    def to_text(self) -> str:
        """Kaldi's text form (TransitionModel::Write with binary=false)."""
        hmm = self.topology.is_hmm
        rows = self.tuples[:, :3] if hmm else self.tuples
        body = "\n".join(" ".join(map(str, row)) for row in rows.tolist())
        probs = " ".join(repr(float(np.float32(p))) for p in self.log_probs)
        kind = "Triples" if hmm else "Tuples"
        return (f"<TransitionModel>\n{self.topology.to_text()}<{kind}> {len(rows)}\n{body}\n</{kind}>\n"
                f"<LogProbs>\n [ {probs} ]\n</LogProbs>\n</TransitionModel>\n")


# --------------------------------------------------------------------------- GMM acoustic model

class AmDiagGmm:
    """Per-pdf diagonal GMMs (Kaldi's AmDiagGmm), stacked for vectorised scoring.

    Fields:
      dim:            feature dimension.
      gconsts:        (num_pdfs, max_gauss), -inf for padding components.
      means_invvars:  (num_pdfs, max_gauss, dim).
      inv_vars:       (num_pdfs, max_gauss, dim).
      num_gauss:      (num_pdfs,) components of each pdf.
    """

    def __init__(self, weights, means_invvars, inv_vars, where: str = "GMM"):
        num_pdfs = len(weights)
        if num_pdfs == 0:
            raise KaldiFormatError(f"{where}: no pdfs")
        dim = means_invvars[0].shape[1]
        self.dim = dim
        self.num_gauss = np.array([len(w) for w in weights])
        g = int(self.num_gauss.max())
        self.means_invvars = np.zeros((num_pdfs, g, dim))
        self.inv_vars = np.ones((num_pdfs, g, dim))
        self.gconsts = np.full((num_pdfs, g), -np.inf)
        for i, (w, mi, iv) in enumerate(zip(weights, means_invvars, inv_vars)):
            n = len(w)
            if mi.shape != (n, dim) or iv.shape != (n, dim):
                raise KaldiFormatError(f"{where}: pdf {i}: {n} weights but means {mi.shape}, "
                                       f"inverse variances {iv.shape} (dimension {dim})")
            if not (np.all(w >= 0) and np.all(iv > 0) and np.all(np.isfinite(iv)) and np.all(np.isfinite(mi))):
                raise KaldiFormatError(f"{where}: pdf {i}: negative weight, non-finite mean or "
                                       "non-positive inverse variance")
            self.means_invvars[i, :n], self.inv_vars[i, :n] = mi, iv
            with np.errstate(divide="ignore"):          # a zero weight gives gconst -inf, as in Kaldi
                self.gconsts[i, :n] = (np.log(w) - 0.5 * dim * math.log(2 * math.pi)
                                       + 0.5 * np.log(iv).sum(1) - 0.5 * (mi * mi / iv).sum(1))

    @property
    def num_pdfs(self) -> int:
        return len(self.gconsts)

    @classmethod
    def read(cls, r: ObjectReader) -> "AmDiagGmm":
        r.expect("<DIMENSION>")
        dim = r.int32()
        r.expect("<NUMPDFS>")
        num_pdfs = r.int32()
        if not 0 < num_pdfs <= 10_000_000 or not 0 < dim <= 100000:
            raise r.error(f"implausible AmDiagGmm sizes: {num_pdfs} pdfs of dimension {dim}")
        weights, means_invvars, inv_vars = [], [], []
        for i in range(num_pdfs):
            token = r.token()
            if token not in ("<DiagGMM>", "<DiagGMMBegin>"):
                raise r.error(f"pdf {i}: expected <DiagGMM>, got {token[:40]!r}")
            token = r.token()
            if token == "<GCONSTS>":
                r.float_vector()                        # recomputed below, as DiagGmm::Read does
                token = r.token()
            if token != "<WEIGHTS>":
                raise r.error(f"pdf {i}: expected <WEIGHTS>, got {token[:40]!r}")
            weights.append(r.float_vector())
            r.expect("<MEANS_INVVARS>")
            means_invvars.append(r.float_matrix())
            r.expect("<INV_VARS>")
            inv_vars.append(r.float_matrix())
            token = r.token()
            if token not in ("</DiagGMM>", "<DiagGMMEnd>"):
                raise r.error(f"pdf {i}: expected </DiagGMM>, got {token[:40]!r}")
            if means_invvars[-1].shape[1:] != (dim,):
                raise r.error(f"pdf {i}: means of dimension {means_invvars[-1].shape[1:]}, "
                              f"the model says {dim}")
        return cls(weights, means_invvars, inv_vars, r.path)

    def log_likelihoods(self, feats: np.ndarray) -> np.ndarray:
        """(T, num_pdfs) float64 log p(x_t | pdf), equation (G1)."""
        x = np.asarray(feats, dtype=np.float64)
        if x.ndim != 2 or x.shape[1] != self.dim:
            raise ValueError(f"features of shape {x.shape}, the GMM expects dimension {self.dim}")
        # (T, P, G): gconst + x . means_invvars - 0.5 x^2 . inv_vars
        comp = (self.gconsts[None] + np.einsum("td,pgd->tpg", x, self.means_invvars)
                - 0.5 * np.einsum("td,pgd->tpg", x * x, self.inv_vars))
        top = comp.max(axis=2, keepdims=True)
        return (top + np.log(np.exp(comp - top).sum(axis=2, keepdims=True)))[:, :, 0]


# --------------------------------------------------------------------------- files

def read_transition_model(path: str) -> TransitionModel:
    """The TransitionModel at the start of a Kaldi model file (final.mdl, any acoustic model)."""
    return TransitionModel.read(read_file(path))


def read_gmm_model(path: str) -> tuple[TransitionModel, AmDiagGmm]:
    """A GMM ``final.mdl``: TransitionModel + AmDiagGmm, and nothing after them."""
    r = read_file(path)
    trans_model = TransitionModel.read(r)
    am = AmDiagGmm.read(r)
    if am.num_pdfs != trans_model.num_pdfs:
        raise KaldiFormatError(f"{path}: the GMM has {am.num_pdfs} pdfs, the transition model "
                               f"{trans_model.num_pdfs}")
    if not r.at_end():
        raise r.error("unexpected data after the acoustic model")
    return trans_model, am
