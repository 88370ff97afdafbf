"""Kaldi model files (ngsgd_mpi/kaldi/model.py) against real Kaldi-written files."""

import gzip
import math
import os

import numpy as np
import pytest

from ngsgd_mpi.kaldi.model import (AmDiagGmm, HmmTopology, KaldiFormatError, ObjectReader, TransitionModel,
                                   read_gmm_model, read_transition_model)

SHARED = os.path.join(os.path.dirname(__file__), "..", "..", "shared", "kaldi")
EXPS = ["yesno/exp/mono", "yesno/exp/tri1", "yesno_decode/exp/mono0a"]


def shared(*parts):
    path = os.path.join(SHARED, *parts)
    if not os.path.exists(path):
        pytest.skip(f"{path} not available")
    return path


def read_occs(path):
    with open(path) as f:
        fields = f.read().split()
    assert fields[0] == "[" and fields[-1] == "]"
    return np.array(fields[1:-1], float)


@pytest.mark.parametrize("exp", EXPS)
def test_tid_to_pdf_reproduces_final_occs(exp):
    """Kaldi's final.occs are the pdf counts of the final alignment: mapping every
    transition-id of ali.1.gz through our tid -> pdf must give them exactly."""
    kaldiio = pytest.importorskip("kaldiio")
    tm = read_transition_model(shared(exp, "final.mdl"))
    occs = read_occs(shared(exp, "final.occs"))
    assert tm.num_pdfs == len(occs)
    counts = np.zeros(tm.num_pdfs)
    with gzip.open(shared(exp, "ali.1.gz"), "rb") as f:
        for _, ali in kaldiio.load_ark(f):
            assert ali.min() >= 1 and ali.max() <= tm.num_transition_ids
            counts += np.bincount(tm.tid2pdf[ali], minlength=tm.num_pdfs)
    np.testing.assert_array_equal(counts, occs)


def test_mono0a_sizes_and_tables():
    tm, am = read_gmm_model(shared("yesno_decode/exp/mono0a/final.mdl"))
    assert (tm.num_pdfs, tm.num_phones, tm.num_transition_ids, tm.num_transition_states) == (11, 3, 30, 11)
    assert (am.num_pdfs, am.dim) == (11, 39)
    with open(shared("yesno_decode/exp/mono0a/graph_tgpr/num_pdfs")) as f:
        assert int(f.read()) == tm.num_pdfs
    # the topology inside the model is the recipe's topo file
    with open(shared("yesno_decode/data/lang_test_tg/topo")) as f:
        topo = HmmTopology.from_text(f.read())
    assert topo.phones == tm.topology.phones and topo.entries == tm.topology.entries
    # every tid of a tstate reads that tstate's pdf; exactly the self-loops go back to their state
    for tid in range(1, tm.num_transition_ids + 1):
        phone, hmm_state, pdf, _ = tm.tuples[tm.tid2tstate[tid] - 1]
        assert tm.tid2pdf[tid] == pdf and tm.tid2phone[tid] == phone
        dest = tm.topology.entry(phone)[hmm_state].transitions[tm.tid2index[tid]][0]
        assert tm.tid_is_self_loop[tid] == (dest == hmm_state)
    # each transition-state's probabilities sum to one
    for tstate in range(1, tm.num_transition_states + 1):
        tids = range(tm.state2id[tstate], tm.state2id[tstate + 1])
        assert math.isclose(sum(math.exp(tm.log_probs[t]) for t in tids), 1.0, rel_tol=1e-4)


def test_transition_model_text_round_trip():
    tm = read_transition_model(shared("yesno/exp/tri1/final.mdl"))
    again = TransitionModel.read(ObjectReader(tm.to_text().encode(), "text"))
    np.testing.assert_array_equal(again.tuples, tm.tuples)
    np.testing.assert_allclose(again.log_probs, tm.log_probs, rtol=1e-6)
    np.testing.assert_array_equal(again.tid2pdf, tm.tid2pdf)


def test_tables_match_kaldi_hmm_gmm():
    """kaldi-hmm-gmm's TransitionModel (Kaldi's C++) from the same topology and tuples."""
    pytest.importorskip("kaldifst")
    khg = pytest.importorskip("kaldi_hmm_gmm")
    with open(shared("yesno_decode/data/lang_test_tg/topo")) as f:
        text = f.read()
    topo = khg.HmmTopology()
    topo.read(text)
    ctx = khg.monophone_context_dependency(topo.phones, topo.get_phone_to_num_pdf_classes())
    theirs = khg.TransitionModel(ctx, topo)
    ours_topo = HmmTopology.from_text(text)
    first_pdf, tuples = 0, []                # a monophone tree numbers pdfs phone by phone
    for phone in ours_topo.phones:
        for j, state in enumerate(ours_topo.entry(phone)):
            if state.forward_pdf_class >= 0:
                tuples.append((phone, j, first_pdf + state.forward_pdf_class, first_pdf + state.self_loop_pdf_class))
        first_pdf += ours_topo.num_pdf_classes(phone)
    ours = TransitionModel(ours_topo, sorted(tuples))
    assert ours.num_transition_ids == theirs.num_transition_ids and ours.num_pdfs == theirs.num_pdfs
    for tid in range(1, ours.num_transition_ids + 1):
        assert ours.tid2pdf[tid] == theirs.transition_id_to_pdf(tid)
        assert ours.tid2phone[tid] == theirs.transition_id_to_phone(tid)
        assert ours.tid_is_self_loop[tid] == theirs.is_self_loop(tid)
        assert ours.tid_is_final[tid] == theirs.is_final(tid)
        assert math.isclose(ours.log_probs[tid], theirs.log_probs[tid], abs_tol=1e-6)


def test_gmm_log_likelihoods_are_the_mixture_densities():
    _, am = read_gmm_model(shared("yesno_decode/exp/mono0a/final.mdl"))
    rng = np.random.default_rng(0)
    x = rng.standard_normal((5, am.dim))
    ours = am.log_likelihoods(x)
    for pdf in range(am.num_pdfs):
        n = am.num_gauss[pdf]
        inv_var = am.inv_vars[pdf, :n]
        mean = am.means_invvars[pdf, :n] / inv_var
        log_w = am.gconsts[pdf, :n] - (-0.5 * am.dim * math.log(2 * math.pi) + 0.5 * np.log(inv_var).sum(1)
                                       - 0.5 * (mean * mean * inv_var).sum(1))      # undo the gconst
        for t in range(len(x)):
            comp = (log_w - 0.5 * am.dim * math.log(2 * math.pi) + 0.5 * np.log(inv_var).sum(1)
                    - 0.5 * ((x[t] - mean) ** 2 * inv_var).sum(1))
            assert math.isclose(ours[t, pdf], np.logaddexp.reduce(comp), rel_tol=1e-9, abs_tol=1e-9)


def test_text_gmm():
    text = (b"<DIMENSION> 2 <NUMPDFS> 1 <DiagGMM> <WEIGHTS> [ 0.25 0.75 ]\n"
            b"<MEANS_INVVARS> [\n 0 0\n 2 4 ]\n<INV_VARS> [\n 1 1\n 1 2 ]\n</DiagGMM>\n")
    am = AmDiagGmm.read(ObjectReader(text, "text gmm"))
    x = np.array([[0.5, -1.0]])
    g0 = math.log(0.25) - math.log(2 * math.pi) - 0.5 * (0.5 ** 2 + 1.0)
    g1 = math.log(0.75) - math.log(2 * math.pi) + 0.5 * math.log(2) - 0.5 * ((0.5 - 2) ** 2 + 2 * (-1 - 2) ** 2)
    assert math.isclose(am.log_likelihoods(x)[0, 0], np.logaddexp(g0, g1), rel_tol=1e-12)


def test_truncated_or_foreign_files_are_one_line_errors(tmp_path):
    with open(shared("yesno_decode/exp/mono0a/final.mdl"), "rb") as f:
        data = f.read()
    for cut in (1, 3, 20, 200, 2000, len(data) // 2, len(data) - 3):
        path = tmp_path / f"cut{cut}.mdl"
        path.write_bytes(data[:cut])
        with pytest.raises(KaldiFormatError) as err:
            read_gmm_model(str(path))
        message = str(err.value)
        assert str(path) in message and "\n" not in message
    path = tmp_path / "extra.mdl"
    path.write_bytes(data + b"junk")
    with pytest.raises(KaldiFormatError, match="unexpected data after"):
        read_gmm_model(str(path))
    with pytest.raises(KaldiFormatError, match="expected <TransitionModel>"):
        read_transition_model(shared("yesno_decode/exp/mono0a/graph_tgpr/HCLG.fst"))
    with pytest.raises(KaldiFormatError, match="cannot read"):
        read_transition_model(str(tmp_path / "missing.mdl"))


@pytest.mark.parametrize("exp", ["yesno/exp/mono", "yesno/exp/tri1"])
def test_damaged_gmms_are_reported_not_misread(exp):
    """These two final.mdl lost bytes to a CRLF -> LF normalisation inside their
    GMM matrices (not one CR LF pair is left in 300-500 kB of float data); the
    reader must say where the structure breaks instead of returning garbage."""
    with pytest.raises(KaldiFormatError) as err:
        read_gmm_model(shared(exp, "final.mdl"))
    assert "expected" in str(err.value) and "\n" not in str(err.value)


def test_topology_checks():
    good = ("<Topology> <TopologyEntry> <ForPhones> 1 2 </ForPhones> "
            "<State> 0 <PdfClass> 0 <Transition> 0 0.5 <Transition> 1 0.5 </State> <State> 1 </State> "
            "</TopologyEntry> </Topology>")
    topo = HmmTopology.from_text(good)
    assert topo.phones == [1, 2] and topo.num_pdf_classes(2) == 1 and topo.is_hmm
    assert HmmTopology.from_text(topo.to_text()).entries == topo.entries
    for bad, match in [(good.replace("<Transition> 1 0.5 ", ""), "no incoming"),
                       (good.replace("0 0.5", "0 0"), "not > 0"),
                       (good.replace("<PdfClass> 0", "<PdfClass> 1"), "contiguous"),
                       (good.replace("<State> 1 </State>", "<State> 1 <Transition> 0 1 </State>"), "final"),
                       (good.replace("</Topology>", ""), "end of file")]:
        with pytest.raises(KaldiFormatError, match=match):
            HmmTopology.from_text(bad)
