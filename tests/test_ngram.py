"""N-gram estimation, ARPA checking and G.fst (ngsgd_mpi/ngram.py)."""

import itertools
import os

import numpy as np
import pytest

from ngsgd_mpi import ngram
from ngsgd_mpi.kaldi.fst import decoding_modules, read_fst

LANG = os.path.join(os.path.dirname(__file__), "..", "..", "shared", "kaldi", "yesno_decode", "data")
SENTENCES = [s.split() for s in ["a b c", "a b", "b c a", "c c", "a", "b a b a c"]]


def backed_off(model, history, word):
    """p(word | history) from the ARPA backoff form."""
    ngram_ = history + (word,)
    if ngram_ in model[len(ngram_)]:
        return 10 ** model[len(ngram_)][ngram_][0]
    bow = model[len(history)][history][1] if history in model.get(len(history), {}) else 0.0
    return 10 ** bow * backed_off(model, history[1:], word)


@pytest.mark.parametrize("order", [1, 2, 3])
def test_every_history_is_a_distribution(order):
    model = ngram.estimate(SENTENCES, order)
    vocabulary = ["a", "b", "c", ngram.EOS]
    histories = [()] + [h for n in range(1, order) for h in model[n] if h[-1] != ngram.EOS]
    histories += [("c", "b")] if order == 3 else []            # a history never seen
    for h in histories:
        assert sum(backed_off(model, h, w) for w in vocabulary) == pytest.approx(1.0, abs=1e-9)
    assert model[1][(ngram.BOS,)][0] == ngram.LOG10_ZERO


def test_counts_and_discounting():
    model = ngram.estimate(SENTENCES, 2)
    # unigrams are relative frequencies of the predicted tokens (words and </s>)
    tokens = [w for s in SENTENCES for w in s + [ngram.EOS]]
    assert 10 ** model[1][("a",)][0] == pytest.approx(tokens.count("a") / len(tokens))
    # a seen bigram gets less than its relative frequency: part of its mass went to the backoff
    c_ab = sum(s[i:i + 2] == ["a", "b"] for s in SENTENCES for i in range(len(s)))
    c_a = sum(s[:-1].count("a") for s in SENTENCES) + sum(s[-1] == "a" for s in SENTENCES)
    assert 10 ** model[2][("a", "b")][0] < c_ab / c_a


def test_arpa_round_trip(tmp_path):
    model = ngram.estimate(SENTENCES, 3)
    path = tmp_path / "lm.arpa"
    ngram.write_arpa(model, str(path))
    info = ngram.read_arpa(str(path))
    assert info["order"] == 3 and info["counts"] == {n: len(model[n]) for n in (1, 2, 3)}
    assert info["vocabulary"] == {"a", "b", "c", ngram.BOS, ngram.EOS}


GOOD = ["\\data\\", "ngram 1=4", "ngram 2=2", "", "\\1-grams:", "-0.5\t</s>", "-99\t<s>\t-0.3",
        "-0.6\tYES\t-0.2", "-0.7\tNO\t-0.2", "", "\\2-grams:", "-0.1\t<s> YES", "-0.2\tYES NO", "", "\\end\\"]


@pytest.mark.parametrize("edit, match", [
    (lambda l: l[1:], "no \\\\data"),                               # no \data\ header
    (lambda l: [x.replace("ngram 2=2", "ngram 2=3") for x in l], "has 2 entries"),
    (lambda l: [x.replace("ngram 2=2", "ngram 2=1") for x in l], "more"),
    (lambda l: [x.replace("-0.6\tYES", "foo\tYES") for x in l], "not a number"),
    (lambda l: [x.replace("-0.6\tYES", "0.6\tYES") for x in l], "<= 0"),
    (lambda l: [x.replace("YES NO", "YES MAYBE") for x in l], "not unigrams"),
    (lambda l: [x.replace("<s> YES", "YES <s>") for x in l], "may only start"),
    (lambda l: l[:-1], "expected \\\\end"),
    (lambda l: [x.replace("-0.2\tYES NO", "-0.2\tYES NO\t-0.1") for x in l], "logprob"),
])
def test_malformed_arpa_is_one_line(tmp_path, edit, match):
    path = tmp_path / "lm.arpa"
    path.write_text("\n".join(GOOD) + "\n")
    ngram.read_arpa(str(path))
    path.write_text("\n".join(edit(list(GOOD))) + "\n")
    with pytest.raises(ngram.ArpaError, match=match) as err:
        ngram.read_arpa(str(path))
    assert str(path) in str(err.value) and "\n" not in str(err.value)


def require_kaldilm():
    """kaldilm, imported after kaldifst (the other order hangs, see decoding_modules)."""
    try:
        decoding_modules()
    except ImportError as exc:
        pytest.skip(str(exc))


def test_G_is_kaldis_arpa2fst():
    """kaldilm is Kaldi's arpa2fst: the yesno recipe's G.fst, exactly."""
    require_kaldilm()
    arpa = os.path.join(LANG, "local", "lm_tg.arpa")
    if not os.path.exists(arpa):
        pytest.skip("shared Kaldi files not available")
    ours = ngram.arpa_to_fst(arpa, os.path.join(LANG, "lang_test_tg", "words.txt"))
    kaldi = read_fst(os.path.join(LANG, "lang_test_tg", "G.fst"))
    assert ours.start == kaldi.start
    np.testing.assert_array_equal(ours.arcs, kaldi.arcs)
    np.testing.assert_array_equal(ours.final, kaldi.final)


def test_G_of_an_estimated_model(tmp_path):
    require_kaldilm()
    model = ngram.estimate(SENTENCES, 2)
    ngram.write_arpa(model, str(tmp_path / "lm.arpa"))
    words = ["<eps>", "a", "b", "c", "#0", ngram.BOS, ngram.EOS]
    (tmp_path / "words.txt").write_text("".join(f"{w} {i}\n" for i, w in enumerate(words)))
    G = ngram.arpa_to_fst(str(tmp_path / "lm.arpa"), str(tmp_path / "words.txt"))
    assert set(G.arcs["olabel"].tolist()) <= {0, 1, 2, 3} and 4 in G.arcs["ilabel"]      # #0 on backoff arcs
    # the cost of "a b" through G is -ln p(a|<s>) p(b|a) p(</s>|b)
    expect = -np.log(backed_off(model, ("<s>",), "a") * backed_off(model, ("a",), "b")
                     * backed_off(model, ("b",), ngram.EOS))
    assert _best_cost(G, [1, 2]) == pytest.approx(expect, rel=1e-5)


def _best_cost(G, words):
    """Cheapest path of G accepting exactly ``words`` (backoff arcs allowed anywhere)."""
    best = {(G.start, 0): 0.0}
    frontier = dict(best)
    for _ in itertools.count():
        new = {}
        for (s, i), c in frontier.items():
            for a in G.arcs[G.offsets[s]:G.offsets[s + 1]]:
                j = i + 1 if a["olabel"] and i < len(words) and a["olabel"] == words[i] else i if not a["olabel"] else None
                if j is None:
                    continue
                key, cost = (int(a["nextstate"]), j), c + float(a["weight"])
                if cost < best.get(key, np.inf) - 1e-12:
                    best[key] = new[key] = cost
        if not new:
            break
        frontier = new
    return min(c + float(G.final[s]) for (s, i), c in best.items() if i == len(words))
