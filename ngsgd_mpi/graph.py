"""``ngsgd-mkgraph``: decoding graphs for corpora made by ``ngsgd-make-corpus``.

Kaldi's ``prepare_lang.sh`` + ``mkgraph.sh`` without Kaldi binaries, from the
corpus's ``lang/`` (lexicon, topology, context -> class map; see
:mod:`ngsgd_mpi.corpus.lang`) and its training data:

* ``--kind word``: H o C o L o G.  L is the lexicon with optional silence
  (probability ``--sil-prob``, Kaldi's make_lexicon_fst.py) and
  disambiguation symbols (add_lex_disambig.pl; ``#0`` self-loops for G's
  backoff arcs), G a word n-gram (``--lm-order``) estimated from the training
  transcripts (:mod:`ngsgd_mpi.ngram`) or the user's ``--lm`` ARPA file.
* ``--kind phone``: the same with every non-silence phone as a "word" (so the
  error rate is a phone error rate) and a phone n-gram (bigram by default)
  from the training alignments (``train/phone_text``); silence stays optional
  between phones and never appears in the output.

The composition follows mkgraph.sh (G1)::

    LG    = minimize_encoded(determinize_star_log(L_disambig o G))
    CLG   = C o LG                        (context width 3 for triphone pdfs, else 1)
    HCLGa = minimize_encoded(rmsymbols(determinize_star_log(H o CLG)))
    HCLG  = add_self_loops(HCLGa, scale 0.1, reorder)

missing fstpushspecial and fstrmepslocal (not in kaldifst); on Kaldi's yesno
recipe the result has one state and one arc more than Kaldi's graph and
decodes every utterance to the same words with the same acoustic cost
(tests/test_graph.py).  H (:mod:`ngsgd_mpi.kaldi.hmm`) is built from a
TransitionModel of the corpus's classes, whose transition probabilities are
the relative frequencies of the training alignments (a self-loop probability
per pdf: 1 - runs / frames, floored at 0.01 either way, as Kaldi's MLE update).

The graph directory gets ``HCLG.fst`` (OpenFst vector), ``words.txt``,
``phones.txt`` (with the disambiguation symbols), ``trans.mdl`` (the
TransitionModel, Kaldi text format: what ``ngsgd-decode`` maps transition-ids
to pdfs with), ``disambig_tid.int``, the language model ``lm.arpa`` and
``graph_info.json``.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import sys
import tempfile
import time

import numpy as np

from ngsgd_mpi.faults import EXIT_OK, InputError, report_bad_input

from ngsgd_mpi import ngram, scoring
from ngsgd_mpi.kaldi.fst import ARC_DTYPE, ArcFst, from_kaldifst, kaldifst_module, read_symbol_table, to_kaldifst, write_fst
from ngsgd_mpi.kaldi.hmm import GraphError, add_self_loops, h_transducer
from ngsgd_mpi.kaldi.model import HmmTopology, TransitionModel

SILENCE = "sil"
TRANSITION_FLOOR = 0.01


class MkgraphError(InputError):
    """Bad input to ngsgd-mkgraph (one line)."""


# --------------------------------------------------------------------------- the lang directory

def _read_lines(path: str) -> list[list[str]]:
    try:
        with open(path, encoding="utf-8") as f:
            return [line.split() for line in f if line.strip()]
    except (OSError, UnicodeDecodeError) as exc:
        raise MkgraphError(f"{path}: cannot read ({exc})") from None


class ContextDependency:
    """The corpus's "tree": pdf of (left, phone, right, pdf class), Kaldi phone ids.

    ``exact[(l, p, r, c)]`` for triphone classes, ``default[(p, c)]`` otherwise;
    window entries 0 (utterance edge) count as silence.
    """

    def __init__(self, exact: dict, default: dict, silence: int):
        self.exact, self.default, self.silence = exact, default, silence
        self.width = 3 if exact else 1
        self.central = 1 if exact else 0

    def pdf(self, window, pdf_class: int) -> int:
        phone = window[self.central]
        if self.width == 3:
            left, right = (w if w > 0 else self.silence for w in (window[0], window[2]))
            key = (left, phone, right, pdf_class)
            if key in self.exact:
                return self.exact[key]
        try:
            return self.default[(phone, pdf_class)]
        except KeyError:
            raise GraphError(f"pdf_map.txt has no class for phone {phone}, pdf class {pdf_class}") from None


class Lang:
    """Phones, topology, context dependency and lexicon of a corpus's ``lang/``.

    Fields:
      phones:      Kaldi phone names by id (0 = <eps>).
      phone_ids:   name -> id.
      topology:    HmmTopology.
      tree:        ContextDependency.
      num_pdfs:    number of classes.
      lexicon:     [(word, prob, phones)].
    """

    def __init__(self, lang_dir: str):
        self.dir = lang_dir
        ids = read_symbol_table(os.path.join(lang_dir, "phones.txt"), "the phone table")
        if sorted(ids.values()) != list(range(len(ids))) or ids.get("<eps>") != 0:
            raise MkgraphError(f"{lang_dir}/phones.txt: ids must be 0..N-1 with <eps> = 0")
        if SILENCE not in ids:
            raise MkgraphError(f"{lang_dir}/phones.txt: no '{SILENCE}' phone")
        self.phone_ids = ids
        self.phones = [name for name, _ in sorted(ids.items(), key=lambda kv: kv[1])]
        path = os.path.join(lang_dir, "topo")
        try:
            with open(path, encoding="utf-8") as f:
                self.topology = HmmTopology.from_text(f.read(), path)
        except OSError as exc:
            raise MkgraphError(f"{path}: cannot read ({exc.strerror})") from None
        self.tree, self.num_pdfs = self._read_pdf_map(os.path.join(lang_dir, "pdf_map.txt"))
        self.lexicon = self._read_lexicon(os.path.join(lang_dir, "lexiconp.txt"))

    def _phone(self, name: str, path: str) -> int:
        if name not in self.phone_ids or name == "<eps>":
            raise MkgraphError(f"{path}: unknown phone {name!r}")
        return self.phone_ids[name]

    def _read_pdf_map(self, path: str):
        exact, default = {}, {}
        classes = set()
        for fields in _read_lines(path):
            if len(fields) != 5:
                raise MkgraphError(f"{path}: expected 'class left phone right pdf_class', got {' '.join(fields)!r}")
            try:
                cls, pdf_class = int(fields[0]), int(fields[4])
            except ValueError:
                raise MkgraphError(f"{path}: class and pdf class must be integers: {' '.join(fields)!r}") from None
            phone = self._phone(fields[2], path)
            if phone not in self.topology.phone2entry or not 0 <= pdf_class < self.topology.num_pdf_classes(phone):
                raise MkgraphError(f"{path}: phone {fields[2]} has no pdf class {pdf_class} in the topology")
            if fields[1] == "*" and fields[3] == "*":
                default[(phone, pdf_class)] = cls
            elif "*" in (fields[1], fields[3]):
                raise MkgraphError(f"{path}: give both neighbours or neither: {' '.join(fields)!r}")
            else:
                exact[(self._phone(fields[1], path), phone, self._phone(fields[3], path), pdf_class)] = cls
            classes.add(cls)
        if sorted(classes) != list(range(len(classes))):
            raise MkgraphError(f"{path}: classes must be 0..N-1")
        for phone in self.topology.phones:
            for c in range(self.topology.num_pdf_classes(phone)):
                if (phone, c) not in default:
                    raise MkgraphError(f"{path}: no '* {self.phones[phone]} * {c}' line")
        return ContextDependency(exact, default, self.phone_ids[SILENCE]), len(classes)

    def _read_lexicon(self, path: str):
        entries = []
        for fields in _read_lines(path):
            try:
                prob = float(fields[1])
            except (IndexError, ValueError):
                prob = -1.0
            if len(fields) < 3 or not 0 < prob <= 1:
                raise MkgraphError(f"{path}: expected 'WORD prob PHONE...', prob in (0, 1]: {' '.join(fields)!r}")
            entries.append((fields[0], prob, tuple(self._phone(p, path) for p in fields[2:])))
        if not entries:
            raise MkgraphError(f"{path}: empty lexicon")
        return entries

    def transition_model(self) -> TransitionModel:
        """One transition-state per (phone, HMM state, class) the tree can produce."""
        tuples = set()
        pairs = [(p, c, cls) for (p, c), cls in self.tree.default.items()]
        pairs += [(p, c, cls) for (_, p, _, c), cls in self.tree.exact.items()]
        for phone, pdf_class, cls in pairs:
            for j, state in enumerate(self.topology.entry(phone)):
                if state.forward_pdf_class == pdf_class:
                    tuples.add((phone, j, cls, cls))
        return TransitionModel(self.topology, sorted(tuples), where=f"{self.dir} (transition model)")


def estimate_transitions(trans_model: TransitionModel, alignments) -> TransitionModel:
    """Self-loop probabilities from per-frame pdf alignments: 1 - runs / frames of
    each pdf, floored at TRANSITION_FLOOR either way (pdfs never seen keep the
    topology's); the other transitions share the rest as in the topology."""
    frames = np.zeros(trans_model.num_pdfs, np.int64)
    runs = np.zeros(trans_model.num_pdfs, np.int64)
    for labels in alignments:
        labels = np.asarray(labels, np.int64)
        if len(labels) == 0:
            continue
        if labels.min() < 0 or labels.max() >= trans_model.num_pdfs:
            raise MkgraphError(f"alignment label {labels.max()} outside the {trans_model.num_pdfs} classes")
        frames += np.bincount(labels, minlength=trans_model.num_pdfs)
        starts = labels[np.r_[True, labels[1:] != labels[:-1]]]
        runs += np.bincount(starts, minlength=trans_model.num_pdfs)
    log_probs = trans_model.log_probs.copy()
    for tstate in range(1, trans_model.num_transition_states + 1):
        loop = trans_model.tstate_self_loop[tstate]
        pdf = trans_model.tuples[tstate - 1, 3]
        if loop == 0 or frames[pdf] == 0:
            continue
        p_loop = float(np.clip(1.0 - runs[pdf] / frames[pdf], TRANSITION_FLOOR, 1.0 - TRANSITION_FLOOR))
        tids = range(trans_model.state2id[tstate], trans_model.state2id[tstate + 1])
        others = [t for t in tids if t != loop]
        rest = sum(math.exp(trans_model.log_probs[t]) for t in others)
        for t in others:
            log_probs[t] = math.log((1.0 - p_loop) * math.exp(trans_model.log_probs[t]) / rest)
        log_probs[loop] = math.log(p_loop)
    return TransitionModel(trans_model.topology, trans_model.tuples, log_probs)


# --------------------------------------------------------------------------- L

def add_disambig(lexicon) -> tuple[list, int]:
    """Kaldi's add_lex_disambig.pl: ``#n`` ends every pronunciation that is another's
    prefix or is shared; returns (entries with phone-symbol tuples, largest n)."""
    prons = [p for _, _, p in lexicon]
    count: dict[tuple, int] = {}
    for p in prons:
        count[p] = count.get(p, 0) + 1
    prefixes = {p[:k] for p in prons for k in range(len(p))}
    last: dict[tuple, int] = {}
    max_disambig = 0
    out = []
    for word, prob, pron in lexicon:
        symbols = list(pron)
        if pron in prefixes or count[pron] > 1:
            n = last.get(pron, 0) + 1
            last[pron] = n
            max_disambig = max(max_disambig, n)
            symbols.append(f"#{n}")
        out.append((word, prob, symbols))
    return out, max_disambig


def lexicon_fst(entries, phone_sym, word_sym, silence: int, sil_prob: float, sil_disambig: int) -> ArcFst:
    """Kaldi's make_lexicon_fst.py with optional silence (states: 0 start, 1 loop, 2 after-silence)."""
    sil_cost, no_sil_cost = -math.log(sil_prob), -math.log(1.0 - sil_prob)
    src = [0, 0, 2, 3]
    arcs = [(0, 0, no_sil_cost, 1), (0, 0, sil_cost, 2), (silence, 0, 0.0, 3), (sil_disambig, 0, 0.0, 1)]
    next_state = 4
    for word, prob, symbols in entries:
        pron_cost = -math.log(prob)
        labels = [phone_sym(s) for s in symbols]
        state = 1
        for i, label in enumerate(labels[:-1]):
            src.append(state)
            arcs.append((label, word_sym[word] if i == 0 else 0, pron_cost if i == 0 else 0.0, next_state))
            state, next_state = next_state, next_state + 1
        first = len(labels) == 1
        for cost, dest in ((no_sil_cost, 1), (sil_cost, 2)):
            src.append(state)
            arcs.append((labels[-1], word_sym[word] if first else 0, cost + (pron_cost if first else 0.0), dest))
    final = np.full(next_state, np.inf, np.float32)
    final[1] = 0.0
    return ArcFst.from_arcs(next_state, 0, src, np.array(arcs, ARC_DTYPE), final)


# --------------------------------------------------------------------------- mkgraph

def compose_hclg(L: ArcFst, G: ArcFst, trans_model: TransitionModel, tree: ContextDependency,
                 phone_disambig: list[int], self_loop_scale: float = 0.1, log=lambda _m: None):
    """Equation (G1); returns (HCLG, disambiguation tids)."""
    kaldifst = kaldifst_module()
    Lk, Gk = to_kaldifst(L), to_kaldifst(G)
    kaldifst.arcsort(Lk, "olabel")
    kaldifst.arcsort(Gk, "ilabel")
    LG = kaldifst.StdVectorFst(kaldifst.compose(Lk, Gk))
    kaldifst.determinize_star(LG, use_log=True)
    kaldifst.minimize_encoded(LG)
    log(f"LG: {LG.num_states} states")
    CLG, ilabels = kaldifst.compose_context(phone_disambig, tree.width, tree.central, LG)
    kaldifst.arcsort(CLG, "ilabel")
    log(f"CLG: {CLG.num_states} states, {len(ilabels)} context windows")
    H, disambig_tids = h_transducer(ilabels, tree.pdf, trans_model, tree.central)
    Hk = to_kaldifst(H)
    kaldifst.arcsort(Hk, "olabel")
    HCLG = kaldifst.StdVectorFst(kaldifst.compose(Hk, CLG))
    kaldifst.determinize_star(HCLG, use_log=True)
    hclg = from_kaldifst(HCLG)
    hclg.arcs["ilabel"][np.isin(hclg.arcs["ilabel"], disambig_tids)] = 0     # fstrmsymbols
    HCLG = to_kaldifst(hclg)
    kaldifst.minimize_encoded(HCLG)
    hclg = add_self_loops(from_kaldifst(HCLG), trans_model, disambig_tids, self_loop_scale)
    return hclg, disambig_tids


def _symbol_table(words) -> list[str]:
    """Kaldi words.txt order: <eps>, the sorted words, #0, <s>, </s>."""
    return ["<eps>"] + sorted(set(words) - {"<eps>", "#0", ngram.BOS, ngram.EOS}) + ["#0", ngram.BOS, ngram.EOS]


def _write_table(path: str, symbols) -> None:
    with open(path, "w", encoding="utf-8") as f:
        f.writelines(f"{s} {i}\n" for i, s in enumerate(symbols))


def make_graph(corpus: str, out_dir: str, kind: str = "word", lm: str | None = None, lm_order: int | None = None,
               sil_prob: float = 0.5, self_loop_scale: float = 0.1, log=print) -> dict:
    """Build ``out_dir`` (written in a temporary directory, then moved into place)."""
    if kind not in ("word", "phone"):
        raise MkgraphError(f"--kind must be word or phone, got {kind!r}")
    if not 0 < sil_prob < 1:
        raise MkgraphError(f"--sil-prob must be in (0, 1), got {sil_prob}")
    if not self_loop_scale > 0:
        raise MkgraphError(f"--self-loop-scale must be > 0, got {self_loop_scale}")
    if lm_order is None:
        lm_order = 3 if kind == "word" else 2
    if lm_order < 1:
        raise MkgraphError(f"--lm-order must be >= 1, got {lm_order}")
    start = time.time()
    lang = Lang(os.path.join(corpus, "lang"))
    train = os.path.join(corpus, "train")
    silence = lang.phone_ids[SILENCE]
    if kind == "word":
        lexicon = lang.lexicon
        text_file = os.path.join(train, "text")
    else:
        lexicon = [(name, 1.0, (i,)) for i, name in enumerate(lang.phones) if i and i != silence]
        text_file = os.path.join(train, "phone_text")
    entries, max_disambig = add_disambig(lexicon)
    phone_table = lang.phones + [f"#{n}" for n in range(max_disambig + 2)]   # + the silence disambig
    phone_disambig = list(range(len(lang.phones), len(phone_table)))
    words = _symbol_table(w for w, _, _ in lexicon)
    word_ids = {w: i for i, w in enumerate(words)}

    parent = os.path.dirname(os.path.abspath(out_dir)) or "."
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=".mkgraph-", dir=parent)
    try:
        _write_table(os.path.join(tmp, "words.txt"), words)
        _write_table(os.path.join(tmp, "phones.txt"), phone_table)
        arpa = os.path.join(tmp, "lm.arpa")
        if lm is None:
            sentences = list(scoring.read_text(text_file).values())
            model = ngram.estimate(sentences, lm_order)
            ngram.write_arpa(model, arpa)
            log(f"{kind} {lm_order}-gram from {text_file}: {len(sentences)} sentences, "
                f"{len(model[1])} unigrams")
        else:
            ngram.read_arpa(lm)
            shutil.copyfile(lm, arpa)
        G = ngram.arpa_to_fst(arpa, os.path.join(tmp, "words.txt"))

        def phone_sym(symbol):
            return symbol if isinstance(symbol, int) else phone_table.index(symbol)
        L = lexicon_fst(entries, phone_sym, word_ids, silence, sil_prob, phone_disambig[-1])
        kaldifst = kaldifst_module()
        Lk = to_kaldifst(L)
        kaldifst.add_self_loops(Lk, [phone_table.index("#0")], [word_ids["#0"]])
        L = from_kaldifst(Lk)

        trans_model = lang.transition_model()
        ali = os.path.join(train, "ali.ark")
        if os.path.isfile(ali):
            import kaldiio  # noqa: PLC0415 - the corpus extra
            trans_model = estimate_transitions(trans_model, (a for _, a in kaldiio.load_ark(ali)))
        hclg, disambig_tids = compose_hclg(L, G, trans_model, lang.tree, phone_disambig, self_loop_scale, log)
        write_fst(hclg, os.path.join(tmp, "HCLG.fst"))
        with open(os.path.join(tmp, "trans.mdl"), "w", encoding="utf-8") as f:
            f.write(trans_model.to_text())
        with open(os.path.join(tmp, "disambig_tid.int"), "w", encoding="utf-8") as f:
            f.writelines(f"{t}\n" for t in disambig_tids)
        info = {"kind": kind, "corpus": os.path.abspath(corpus), "lm": lm or "estimated", "lm_order":
                ngram.read_arpa(arpa)["order"], "sil_prob": sil_prob, "self_loop_scale": self_loop_scale,
                "context_width": lang.tree.width, "num_pdfs": trans_model.num_pdfs,
                "num_transition_ids": trans_model.num_transition_ids, "words": len(words),
                "states": hclg.num_states, "arcs": hclg.num_arcs, "seconds": round(time.time() - start, 2)}
        with open(os.path.join(tmp, "graph_info.json"), "w", encoding="utf-8") as f:
            json.dump(info, f, indent=1)
        if os.path.isdir(out_dir):
            shutil.rmtree(out_dir)
        os.replace(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    log(f"{kind} graph: {hclg.num_states:,} states, {hclg.num_arcs:,} arcs, "
        f"{trans_model.num_pdfs} pdfs -> {out_dir} ({info['seconds']} s)")
    return info


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="ngsgd-mkgraph", description="Build a decoding graph (HCLG.fst + words.txt "
                                "+ trans.mdl) for a corpus made by ngsgd-make-corpus, as Kaldi's mkgraph.sh.")
    p.add_argument("--corpus", required=True, help="the ngsgd-make-corpus output directory (has lang/, train/)")
    p.add_argument("--out", required=True, help="graph directory to write")
    p.add_argument("--kind", choices=("word", "phone"), default="word",
                   help="word graph (H C L G) or phone graph (phones as words, PER)")
    p.add_argument("--lm", help="ARPA language model to use instead of one estimated from the training text")
    p.add_argument("--lm-order", type=int, default=None, help="order of the estimated n-gram "
                   "(default 3 for words, 2 for phones)")
    p.add_argument("--sil-prob", type=float, default=0.5, help="optional-silence probability between words")
    p.add_argument("--self-loop-scale", type=float, default=0.1, help="scale of the HMM self-loop probabilities")
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        make_graph(args.corpus, args.out, args.kind, args.lm, args.lm_order, args.sil_prob, args.self_loop_scale)
    except InputError as exc:
        return report_bad_input("ngsgd-mkgraph", exc)
    return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
