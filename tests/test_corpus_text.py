"""Tests of sentence sources and the train/test split (ngsgd_mpi/corpus/text.py)."""

import pytest

from ngsgd_mpi.corpus import text


def test_normalize_keeps_plain_english_and_pause_commas():
    assert text.normalize_sentence('"Well, it\'s a long way -- to the top."') == \
        "well, it's a long way, to the top"
    assert text.transcript("well, it's a long way") == "WELL IT'S A LONG WAY"


@pytest.mark.parametrize("raw", ["Call foo() with 3 arguments now.", "Too short.",
                                 "See section B for the details please.",
                                 " ".join(["word"] * (text.MAX_WORDS + 1))])
def test_normalize_rejects_code_digits_initials_and_bad_lengths(raw):
    assert text.normalize_sentence(raw) is None


def test_pydoc_source_is_always_available_and_normalised():
    sentences = text.pydoc_sentences()
    assert len(sentences) > 300
    assert all(text.normalize_sentence(s) == s for s in sentences[:200])


def test_split_is_disjoint_deterministic_and_about_the_requested_fraction():
    sentences, used = text.load_sentences(("pydoc",))
    assert used == ["pydoc"]
    train, test = text.split_train_test(sentences, 0.2)
    assert not {text.transcript(s) for s in train} & {text.transcript(s) for s in test}
    assert 0.1 < len(test) / len(sentences) < 0.3
    assert text.split_train_test(sentences, 0.2) == (train, test)
    # Same transcript, different pause marks: same side.
    assert text.is_test_sentence("a b, c d", 0.5) == text.is_test_sentence("a b c d", 0.5)


def test_bad_arguments_raise_value_error():
    with pytest.raises(ValueError, match="test_fraction"):
        text.split_train_test(["a b c d"], 1.5)
    with pytest.raises(ValueError, match="text source"):
        text.source_available("wikipedia")


def test_no_available_source_raises_with_install_hint(monkeypatch):
    monkeypatch.setattr(text, "source_available", lambda name: False)
    with pytest.raises(ValueError, match="apt-get install fortunes wamerican"):
        text.load_sentences(("fortunes",))
