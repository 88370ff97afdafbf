"""ngsgd-mkgraph (ngsgd_mpi/graph.py): Kaldi's yesno graph rebuilt, corpus graphs with known answers."""

import os

import numpy as np
import pytest

import yesno
from ngsgd_mpi import decode, graph
from ngsgd_mpi.corpus.labels import make_label_set
from ngsgd_mpi.corpus.lang import write_lang
from ngsgd_mpi.corpus.phones import PHONE_INDEX, PHONES
from ngsgd_mpi.kaldi.fst import decoding_modules, read_fst
from ngsgd_mpi.kaldi.model import read_transition_model

try:
    decoding_modules()
except ImportError as exc:
    pytest.skip(str(exc), allow_module_level=True)
kaldiio = pytest.importorskip("kaldiio")


class MonophoneTree:
    """The monophone tree of a Kaldi model: pdf of (phone, pdf class) read off its tuples."""

    width, central = 1, 0

    def __init__(self, tm):
        self.map = {(p, tm.topology.entry(p)[h].forward_pdf_class): f for p, h, f, _ in tm.tuples.tolist()}

    def pdf(self, window, pdf_class):
        return self.map[(window[0], pdf_class)]


def test_yesno_graph_decodes_like_kaldis(tmp_path):
    """mkgraph.sh's steps on the recipe's L_disambig.fst and G.fst give a graph that
    decodes every utterance to Kaldi's words with Kaldi's acoustic cost."""
    yesno.require()
    lang = os.path.join(yesno.ROOT, "data", "lang_test_tg")
    tm = read_transition_model(os.path.join(yesno.EXP, "final.mdl"))
    with open(os.path.join(lang, "phones", "disambig.int")) as f:
        disambig = [int(x) for x in f.read().split()]
    hclg, disambig_tids = graph.compose_hclg(read_fst(os.path.join(lang, "L_disambig.fst")),
                                             read_fst(os.path.join(lang, "G.fst")), tm, MonophoneTree(tm), disambig)
    kaldi = read_fst(os.path.join(yesno.GRAPH, "HCLG.fst"))
    with open(os.path.join(yesno.GRAPH, "disambig_tid.int")) as f:
        assert disambig_tids == [int(x) for x in f.read().split()]
    # no fstpushspecial / fstrmepslocal in kaldifst: one state and one arc more than Kaldi's
    assert (hclg.num_states, hclg.num_arcs) == (kaldi.num_states + 1, kaldi.num_arcs + 1)
    ours_dir, kaldi_dir = tmp_path / "ours", yesno.GRAPH
    ours_dir.mkdir()
    from ngsgd_mpi.kaldi.fst import write_fst
    write_fst(hclg, str(ours_dir / "HCLG.fst"))
    (ours_dir / "words.txt").write_text(open(os.path.join(kaldi_dir, "words.txt")).read())
    (ours_dir / "trans.mdl").write_text(tm.to_text())
    decoders = [decode.Decoder(decode.Graph(d), yesno.ACWT) for d in (str(ours_dir), kaldi_dir)]
    for utt, ll in yesno.loglikes().items():
        (words, g, a), _, _ = decoders[0].decode(ll, [12], ["0.0"])
        (kwords, kg, ka), _, _ = decoders[1].decode(ll, [12], ["0.0"])
        assert words == kwords
        assert a == pytest.approx(ka, rel=1e-6) and g == pytest.approx(kg, abs=0.02)


# --------------------------------------------------------------------------- a corpus lang directory

WORDS = {"CAT": "K AE T", "AT": "AE T", "TACK": "T AE K", "ACT": "AE K T", "TAT": "T AE T"}
SENTENCES = ["CAT AT TACK", "ACT CAT", "TACK AT CAT", "AT ACT", "CAT ACT AT TAT", "TAT CAT"]


def make_corpus_dir(root, kind, triphones=None):
    """A corpus as ngsgd-make-corpus leaves it, reduced to what mkgraph reads."""
    label_set = make_label_set(kind) if triphones is None else make_label_set("triphone", triphones, 125, 1)
    write_lang(str(root / "lang"), label_set, [(w, 1.0, tuple(p.split())) for w, p in sorted(WORDS.items())])
    train = root / "train"
    train.mkdir()
    (train / "text").write_text("".join(f"s{i} {s}\n" for i, s in enumerate(SENTENCES)))
    (train / "phone_text").write_text("".join(f"s{i} {' '.join(WORDS[w] for w in s.split())}\n"
                                              for i, s in enumerate(SENTENCES)))
    return label_set


def loglikes_for(label_set, words, frames_per_state=4, silence=4):
    """Log-likelihoods that make the alignment of ``words`` (with silence around) the clear winner."""
    phones = [0] + [PHONE_INDEX[p] for w in words for p in WORDS[w].split()] + [0]
    seg_frames = np.array([silence] + [frames_per_state * (1 if label_set.kind == "phone" else 3)] * (len(phones) - 2)
                          + [silence])
    labels = label_set.frame_labels(np.array(phones), seg_frames)
    ll = np.full((len(labels), label_set.num_classes), -50.0, np.float32)   # a wrong frame outweighs the LM
    ll[np.arange(len(labels)), labels] = 0.0
    return ll


@pytest.mark.parametrize("kind", ["phone", "phone-state", "triphone"])
def test_word_graph_known_answers(tmp_path, kind):
    triphones = None
    if kind == "triphone":       # training alignments that give K-AE+T and T-AE+K their own classes
        triphones = [(np.array([0, PHONE_INDEX["K"], PHONE_INDEX["AE"], PHONE_INDEX["T"], 0]), np.array([3] * 5)),
                     (np.array([0, PHONE_INDEX["T"], PHONE_INDEX["AE"], PHONE_INDEX["K"], 0]), np.array([3] * 5))]
    label_set = make_corpus_dir(tmp_path, kind, triphones)
    info = graph.make_graph(str(tmp_path), str(tmp_path / "graph"), "word", lm_order=2, log=lambda m: None)
    assert info["num_pdfs"] == label_set.num_classes and info["context_width"] == (3 if triphones else 1)
    if triphones:
        assert label_set.num_classes > 120
    g = decode.Graph(str(tmp_path / "graph"))
    decoder = decode.Decoder(g, 0.1)
    for words in (["CAT", "ACT"], ["TACK", "AT", "CAT"], ["AT"], ["TAT", "TACK"]):
        best, hyps, final = decoder.decode(loglikes_for(label_set, words), [10], ["0.0"])
        assert final and [g.words[w] for w in best[0]] == words
        assert [g.words[w] for w in hyps[(10, "0.0")]] == words


def test_phone_graph_outputs_phones(tmp_path):
    label_set = make_corpus_dir(tmp_path, "phone-state")
    graph.make_graph(str(tmp_path), str(tmp_path / "graph"), "phone", log=lambda m: None)
    g = decode.Graph(str(tmp_path / "graph"))
    assert g.kind == "phone" and "sil" not in g.words.values() and "AE" in g.words.values()
    best, _, _ = decode.Decoder(g, 0.1).decode(loglikes_for(label_set, ["CAT", "TACK"]), [10], ["0.0"])
    assert " ".join(g.words[w] for w in best[0]) == "K AE T T AE K"


def test_tree_gives_the_corpus_labels(tmp_path):
    """pdf_map.txt read back as a context dependency reproduces LabelSet.frame_labels."""
    rng = np.random.default_rng(0)
    train = [(np.r_[0, rng.integers(1, 40, 12), 0], rng.integers(1, 5, 14)) for _ in range(200)]
    label_set = make_label_set("triphone", train, 600, 2)
    write_lang(str(tmp_path / "lang"), label_set, [("A", 1.0, ("AH",))])
    lang = graph.Lang(str(tmp_path / "lang"))
    assert lang.num_pdfs == label_set.num_classes and lang.tree.width == 3
    for seg_phones, _ in train[:50]:
        labels = label_set.frame_labels(seg_phones, np.full(len(seg_phones), 3))
        for i, p in enumerate(seg_phones):
            left = seg_phones[i - 1] + 1 if i else 0              # Kaldi phone ids; 0 = utterance edge
            right = seg_phones[i + 1] + 1 if i + 1 < len(seg_phones) else 0
            for s in range(3):
                assert lang.tree.pdf([left, p + 1, right], s) == labels[3 * i + s]
    tm = lang.transition_model()
    assert tm.num_pdfs == label_set.num_classes
    assert set(tm.tid2phone[1:].tolist()) == set(range(1, len(PHONES) + 1))


def test_disambiguation_symbols_as_add_lex_disambig():
    lexicon = [("A", 1.0, (1, 2)), ("B", 1.0, (1, 2, 3)), ("C", 1.0, (4,)), ("D", 0.5, (4,)), ("E", 1.0, (5,))]
    entries, max_disambig = graph.add_disambig(lexicon)
    assert [e[2] for e in entries] == [[1, 2, "#1"], [1, 2, 3], [4, "#1"], [4, "#2"], [5]]
    assert max_disambig == 2


def test_transition_probabilities_from_alignments(tmp_path):
    make_corpus_dir(tmp_path, "phone")
    tm = graph.Lang(str(tmp_path / "lang")).transition_model()
    ae = PHONE_INDEX["AE"]
    new = graph.estimate_transitions(tm, [np.array([ae] * 4 + [0] * 2 + [ae] * 6)])
    loop = tm.tstate_self_loop[tm.tstate_of(ae + 1, 0, ae, ae)]
    assert np.exp(new.log_probs[loop]) == pytest.approx(1 - 2 / 10)            # 10 frames, 2 runs
    assert np.exp(new.log_probs[loop + 1]) == pytest.approx(2 / 10)
    unseen = tm.tstate_self_loop[tm.tstate_of(PHONE_INDEX["K"] + 1, 0, PHONE_INDEX["K"], PHONE_INDEX["K"])]
    assert new.log_probs[unseen] == tm.log_probs[unseen]


def test_bad_input_is_one_line(tmp_path, capsys):
    make_corpus_dir(tmp_path, "phone")
    assert graph.main(["--corpus", str(tmp_path / "nowhere"), "--out", str(tmp_path / "g")]) == 2
    assert "phones.txt: cannot read" in capsys.readouterr().err
    (tmp_path / "bad.arpa").write_text("\\data\\\nngram 1=2\n\n\\1-grams:\n-0.5 </s>\nfoo bar\n\\end\\\n")
    assert graph.main(["--corpus", str(tmp_path), "--out", str(tmp_path / "g"), "--lm", str(tmp_path / "bad.arpa")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "bad.arpa: line 6" in err
    with open(tmp_path / "lang" / "pdf_map.txt", "a") as f:
        f.write("7 * XX * 0\n")
    assert graph.main(["--corpus", str(tmp_path), "--out", str(tmp_path / "g")]) == 2
    assert "unknown phone 'XX'" in capsys.readouterr().err
    assert not (tmp_path / "g").exists() and not [n for n in os.listdir(tmp_path) if n.startswith(".mkgraph")]
