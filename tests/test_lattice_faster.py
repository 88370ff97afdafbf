"""The lattice search (ngsgd_mpi/lattice_faster.py) against Kaldi's own LatticeFasterDecoder."""

import numpy as np
import pytest

import yesno
from synthetic import load_script
from ngsgd_mpi import lattice_faster as lf
from ngsgd_mpi.kaldi.fst import ARC_DTYPE, LATTICE_ARC_DTYPE, ArcFst, read_fst

khg = pytest.importorskip("kaldi_hmm_gmm")        # after kaldifst (tests/conftest.py loads them in order)


def random_graph(rng, num_states=60, num_tids=12, words=6):
    """An HCLG-like FST: emitting arcs everywhere, acyclic epsilon arcs (some with words),
    a few final states."""
    arcs, sources = [], []
    for s in range(num_states):
        for _ in range(rng.integers(1, 4)):
            arcs.append((rng.integers(1, num_tids + 1), rng.integers(0, words + 1) * (rng.random() < 0.3),
                         rng.exponential(2.0), rng.integers(0, num_states)))
            sources.append(s)
        if s + 1 < num_states and rng.random() < 0.4:             # epsilon arcs lead to later states: no cycle
            arcs.append((0, rng.integers(0, words + 1), rng.exponential(1.0), rng.integers(s + 1, num_states)))
            sources.append(s)
    final = np.where(rng.random(num_states) < 0.2, rng.exponential(1.0, num_states), np.inf)
    return ArcFst.from_arcs(num_states, 0, sources, np.array(arcs, ARC_DTYPE), final)


Kaldi = load_script("bench_decode").KaldiLatticeFaster      # Kaldi's C++ search, its 1-best


def our_best(search, loglikes, acwt):
    lattice, _ = search.decode(loglikes, acwt)
    words, graph, acoustic = lf.best_paths(lattice, np.array([1.0]), np.array([0.0]))[0]
    return words, graph + acoustic, lattice


def same_lattice(a, b):
    return a.start == b.start and np.array_equal(a.final, b.final) and np.array_equal(a.offsets, b.offsets) \
        and np.array_equal(a.arcs, b.arcs)


@pytest.mark.parametrize("seed", range(4))
def test_random_graphs_give_kaldis_best_path(seed):
    """max-active, min-active and beam all bind (a few hundred tokens per frame, kept to
    20): every utterance's 1-best is Kaldi's, words and cost."""
    rng = np.random.default_rng(seed)
    fst = random_graph(rng, num_states=300)
    tid2pdf = np.r_[0, rng.integers(0, 8, 12)]                   # 12 transition-ids on 8 pdfs
    search = lf.LatticeFasterDecoder(lf.hclg_for_search(fst, tid2pdf), beam=8.0, lattice_beam=4.0,
                                     max_active=20, min_active=5)
    kaldi = Kaldi(fst, tid2pdf, search)
    for _ in range(3):
        loglikes = rng.normal(0.0, 3.0, (int(rng.integers(30, 80)), 8)).astype(np.float32)
        words, cost, _ = our_best(search, loglikes, 0.5)
        kaldi_words, kaldi_cost = kaldi.best(loglikes, 0.5)
        assert words == kaldi_words
        assert cost == pytest.approx(kaldi_cost, rel=1e-5)


def test_yesno_graph_with_noise_gives_kaldis_best_path():
    """Kaldi's own (const) HCLG, the GMM log-likelihoods with noise, a tight max-active."""
    yesno.require()
    from ngsgd_mpi.kaldi.model import read_transition_model

    fst = read_fst(f"{yesno.GRAPH}/HCLG.fst")
    tid2pdf = read_transition_model(f"{yesno.EXP}/final.mdl").tid2pdf
    search = lf.LatticeFasterDecoder(lf.hclg_for_search(fst, tid2pdf), beam=13.0, lattice_beam=6.0,
                                     max_active=4, min_active=1)
    kaldi = Kaldi(fst, tid2pdf, search)
    rng = np.random.default_rng(0)
    for loglikes in list(yesno.loglikes().values())[:6]:
        noisy = loglikes + rng.normal(0.0, 20.0, loglikes.shape).astype(np.float32)
        words, cost, _ = our_best(search, noisy, yesno.ACWT)
        kaldi_words, kaldi_cost = kaldi.best(noisy, yesno.ACWT)
        assert words == kaldi_words and cost == pytest.approx(kaldi_cost, rel=1e-5)


def test_lattice_holds_every_path_within_the_lattice_beam():
    """Every arc of the lattice lies on a path at most lattice_beam worse than the best
    (forward + backward costs), and pruning during the search changes nothing: the
    same search pruning after every frame gives the same lattice."""
    rng = np.random.default_rng(7)
    fst = random_graph(rng, num_states=200)
    tid2pdf = np.r_[0, rng.integers(0, 8, 12)]
    graph = lf.hclg_for_search(fst, tid2pdf)
    loglikes = rng.normal(0.0, 2.0, (120, 8)).astype(np.float32)
    search = lf.LatticeFasterDecoder(graph, beam=10.0, lattice_beam=3.0, max_active=60, min_active=5)
    lattice, _ = search.decode(loglikes, 0.5)
    src, dst = lattice.sources().astype(np.int64), lattice.arcs["nextstate"].astype(np.int64)
    w = lattice.arcs["weight"].astype(np.float64).sum(axis=1)
    forward, backward = np.full(lattice.num_states, np.inf), lattice.final.astype(np.float64).sum(axis=1)
    forward[lattice.start] = 0.0
    for _ in range(lattice.num_states):                       # Bellman-Ford both ways (small lattice)
        np.minimum.at(forward, dst, forward[src] + w)
        np.minimum.at(backward, src, backward[dst] + w)
    best = backward[lattice.start]
    assert np.all(forward[src] + w + backward[dst] <= best + 3.0 + 1e-4)
    assert np.isfinite(forward).all() and np.isfinite(backward).all()

    pruning_every_frame = lf.LatticeFasterDecoder(graph, beam=10.0, lattice_beam=3.0, max_active=60, min_active=5)
    pruning_every_frame.prune_interval, pruning_every_frame.prune_scale = 1, 0.0
    assert same_lattice(pruning_every_frame.decode(loglikes, 0.5)[0], lattice)


def test_full_pools_are_grown_and_the_utterance_searched_again():
    rng = np.random.default_rng(3)
    fst = random_graph(rng)
    graph = lf.hclg_for_search(fst, np.r_[0, rng.integers(0, 8, 12)])
    loglikes = rng.normal(0.0, 2.0, (50, 8)).astype(np.float32)
    roomy = lf.LatticeFasterDecoder(graph, max_active=100)
    tight = lf.LatticeFasterDecoder(graph, max_active=100)
    tight._pools = lf.new_pools(fst.num_states, tokens=4, links=4, frames=3)
    a, _ = roomy.decode(loglikes, 0.3)
    b, _ = tight.decode(loglikes, 0.3)
    assert len(tight._pools.tokens) > 4 and len(tight._pools.frame_head) > 50
    assert same_lattice(a, b)


def test_best_paths_of_a_small_lattice():
    """Two word sequences: A (graph 1, acoustic 5) and B C (graph 4, acoustic 1); which
    wins depends on the acoustic scale and the word insertion penalty."""
    arcs = np.array([(1, 1, (1.0, 5.0), 1), (2, 2, (2.0, 0.5), 2), (3, 3, (2.0, 0.5), 1)], LATTICE_ARC_DTYPE)
    lattice = ArcFst.from_arcs(3, 0, [0, 0, 2], arcs, np.array([(np.inf, np.inf), (0, 0), (np.inf, np.inf)]),
                               "lattice4")
    (a, ga, aa), (b, gb, ab), (c, _, _) = lf.best_paths(lattice, np.array([1.0, 0.25, 0.25]),
                                                        np.array([0.0, 0.0, 5.0]))
    assert (a, ga, aa) == ([2, 3], 4.0, 1.0)          # 4 + 1 < 1 + 5
    assert b == [1]                                   # 1 + 1.25 < 4 + 0.25
    assert c == [1]
    assert lf.best_paths(lattice, np.array([1.0]), np.array([-10.0]))[0][0] == [2, 3]   # a bonus per word
    cyclic = ArcFst.from_arcs(2, 0, [0, 1], np.array([(1, 0, (0, 0), 1), (1, 0, (0, 0), 1)], LATTICE_ARC_DTYPE),
                              np.zeros((2, 2)), "lattice4")
    cyclic.arcs["nextstate"][1] = 1
    with pytest.raises(lf.LatticeError, match="cyclic"):
        lf.best_paths(cyclic, np.array([1.0]), np.array([0.0]))
