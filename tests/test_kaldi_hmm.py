"""H transducer and add-self-loops (ngsgd_mpi/kaldi/hmm.py) against Kaldi's C++ (kaldi-hmm-gmm).

kaldi-hmm-gmm can build Kaldi's TransitionModel, GetHTransducer and AddSelfLoops
for monophone context dependencies; the same inputs must give the same FSTs.
"""

import os

import numpy as np
import pytest

from ngsgd_mpi.kaldi.fst import ARC_DTYPE, ArcFst, from_kaldifst, to_kaldifst
from ngsgd_mpi.kaldi.hmm import GraphError, add_self_loops, h_transducer
from ngsgd_mpi.kaldi.model import HmmTopology, TransitionModel

kaldifst = pytest.importorskip("kaldifst")
khg = pytest.importorskip("kaldi_hmm_gmm")       # after kaldifst (see ngsgd_mpi.kaldi.fst.decoding_modules)
TOPO = os.path.join(os.path.dirname(__file__), "..", "..", "shared", "kaldi", "yesno_decode", "data",
                    "lang_test_tg", "topo")
# a 3-state left-to-right topology for phones 1..3 and the yesno silence topology (with skips) for 4
THREE_STATE = ("<TopologyEntry> <ForPhones> 1 2 3 </ForPhones> "
               + "".join(f"<State> {s} <PdfClass> {s} <Transition> {s} 0.6 <Transition> {s + 1} 0.4 </State> "
                         for s in range(3))
               + "<State> 3 </State> </TopologyEntry>")


def topology_text():
    if not os.path.exists(TOPO):
        pytest.skip("shared Kaldi files not available")
    with open(TOPO) as f:
        sil = f.read().split("<TopologyEntry>")[2].split("</TopologyEntry>")[0].replace("1\n</ForPhones>",
                                                                                         "4\n</ForPhones>")
    return f"<Topology> {THREE_STATE} <TopologyEntry>{sil}</TopologyEntry> </Topology>"


@pytest.fixture(scope="module")
def models():
    """(ours, kaldi-hmm-gmm's) TransitionModel of a monophone tree over the topology."""
    text = topology_text()
    topo = khg.HmmTopology()
    topo.read(text)
    ctx = khg.monophone_context_dependency(topo.phones, topo.get_phone_to_num_pdf_classes())
    theirs = khg.TransitionModel(ctx, topo)
    ours_topo = HmmTopology.from_text(text)
    first_pdf, tuples, pdf_of_class = 0, [], {}
    for phone in ours_topo.phones:
        for c in range(ours_topo.num_pdf_classes(phone)):
            pdf_of_class[(phone, c)] = first_pdf + c
        for j, state in enumerate(ours_topo.entry(phone)):
            if state.forward_pdf_class >= 0:
                tuples.append((phone, j, pdf_of_class[(phone, state.forward_pdf_class)],
                               pdf_of_class[(phone, state.self_loop_pdf_class)]))
        first_pdf += ours_topo.num_pdf_classes(phone)
    ours = TransitionModel(ours_topo, sorted(tuples))
    assert ours.num_transition_ids == theirs.num_transition_ids
    return ours, theirs, ctx, (lambda window, c: pdf_of_class[(window[0], c)])


def arc_set(fst: ArcFst):
    return sorted((int(s), int(a["ilabel"]), int(a["olabel"]), round(float(a["weight"]), 4), int(a["nextstate"]))
                  for s, a in zip(fst.sources(), fst.arcs))


def test_h_transducer_is_kaldis(models):
    ours, theirs, ctx, pdf_of = models
    ilabels = [[], [1], [2], [-5], [3], [4], [1], [-6], [4]]          # repeats share their HMM
    config = khg.HTransducerConfig()
    config.transition_scale = 1.0
    h_k, disambig_k = khg.get_h_transducer(ilabels, ctx, theirs, config)
    h, disambig = h_transducer(ilabels, pdf_of, ours, central=0)
    assert disambig == list(disambig_k)
    assert h.start == h_k.start and h.num_states == h_k.num_states
    assert arc_set(h) == arc_set(from_kaldifst(h_k))
    np.testing.assert_array_equal(h.final, from_kaldifst(h_k).final)


def test_add_self_loops_is_kaldis(models):
    """A tid graph with a state entered from two transition-states (Kaldi splits it),
    a disambiguation symbol, epsilons and several final states."""
    ours, theirs, _, _ = models
    n = ours.num_transition_ids
    forward = [t for t in range(1, n + 1) if not ours.tid_is_self_loop[t]]
    rng = np.random.default_rng(0)
    num_states = 12
    src = list(range(num_states - 1)) + [0, 2, 5, 5, 7]
    dest = list(range(1, num_states)) + [3, 3, 9, 6, 7]
    labels = [int(rng.choice(forward)) for _ in dest]
    labels[-2] = 0                  # epsilon
    labels[-1] = n + 1              # disambiguation symbol (a self-loop of its own)
    arcs = np.zeros(len(dest), ARC_DTYPE)
    arcs["ilabel"], arcs["olabel"] = labels, rng.integers(0, 3, len(dest))
    arcs["weight"], arcs["nextstate"] = rng.random(len(dest)), dest
    final = np.full(num_states, np.inf, np.float32)
    final[[4, 11]] = [0.5, 0.0]
    fst = ArcFst.from_arcs(num_states, 0, src, arcs, final)
    ours_out = add_self_loops(fst, ours, [n + 1], 0.1)
    theirs_out = from_kaldifst(khg.add_self_loops(self_loop_scale=0.1, disambig_syms=[n + 1], reorder=True,
                                                  trans_model=theirs, ifst=to_kaldifst(fst)))
    assert ours_out.num_states == theirs_out.num_states > num_states      # some state was split
    assert arc_set(ours_out) == arc_set(theirs_out)
    np.testing.assert_allclose(ours_out.final, theirs_out.final, rtol=1e-6)


def test_mismatched_model_and_windows(models):
    ours, _, _, pdf_of = models
    with pytest.raises(GraphError, match="phone 9"):
        h_transducer([[], [9]], lambda w, c: 0, ours, central=0)
    with pytest.raises(GraphError, match="no transition state"):
        h_transducer([[], [1]], lambda w, c: 99, ours, central=0)
    loop = ArcFst.from_arcs(2, 0, [0], np.array([(int(np.flatnonzero(ours.tid_is_self_loop)[0]), 0, 0.0, 1)],
                                                ARC_DTYPE), [np.inf, 0.0])
    with pytest.raises(GraphError, match="already has self-loops"):
        add_self_loops(loop, ours)
