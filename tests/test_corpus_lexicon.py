"""The corpus lexicon from espeak's word events (ngsgd_mpi/corpus/lexicon.py), without espeak."""

from ngsgd_mpi.corpus.lexicon import LexiconCounts, split_group, word_pronunciations, write_lexiconp

ISOLATED = {"of": ["AH", "V"], "the": ["DH", "AH"], "sells": ["S", "EH", "L", "Z"], "cat": ["K", "AE", "T"],
            "character": ["K", "AE", "R", "IH", "K", "T", "ER"], "is": ["IH", "Z"]}


def test_split_group_follows_the_isolated_pronunciations():
    assert split_group(["AH", "V", "DH", "AH"], [ISOLATED["of"], ISOLATED["the"]]) == [["AH", "V"], ["DH", "AH"]]
    # espeak's linking r: an inserted phone goes with the word before it
    spoken = ["K", "AE", "R", "IH", "K", "T", "ER", "R", "IH", "Z"]
    assert split_group(spoken, [ISOLATED["character"], ISOLATED["is"]]) == [spoken[:8], ["IH", "Z"]]
    # a reduced function word keeps what aligns with it
    assert split_group(["V", "DH", "AH"], [ISOLATED["of"], ISOLATED["the"]]) == [["V"], ["DH", "AH"]]


def test_word_pronunciations_from_events():
    # "the sells of the cat,": espeak fused "of the" into one word event
    spoken = "the sells of the cat,"
    phonemes = [(0, "D"), (1, "@2"), (2, "s"), (3, "E"), (4, "l"), (4, "z"), (5, "V"), (6, "v"), (7, "D"),
                (8, "@2"), (9, "k"), (10, "a"), (11, "t"), (12, "_:")]
    words = [(0, 1), (2, 5), (6, 11), (10, 18), (13, 99)]        # 99: espeak's trailing event, no word there
    prons = word_pronunciations(spoken, phonemes, words, "en-us", ISOLATED.get)
    assert prons == [("THE", ("DH", "AH")), ("SELLS", ("S", "EH", "L", "Z")), ("OF", ("AH", "V")),
                     ("THE", ("DH", "AH")), ("CAT", ("K", "AE", "T"))]
    # no isolated pronunciation for a fused word: those words get none, the others still count
    prons = word_pronunciations(spoken, phonemes, words, "en-us", {"of": ["AH", "V"]}.get)
    assert [p is None for _, p in prons] == [False, False, True, True, False]


def test_lexicon_counts(tmp_path):
    counts = LexiconCounts()
    for _ in range(9):
        counts.add_utterance([("THE", ("DH", "AH")), ("CAT", ("K", "AE", "T"))])
    counts.add_utterance([("THE", ("DH", "IY")), ("CAT", None)])
    for _ in range(30):
        counts.add_utterance([("A", ("AH",))])
    counts.add_utterance([("A", ("EY",))])                   # 1/30 of the best: dropped (MIN_RATIO 0.1)
    entries = counts.entries()
    assert entries == [("A", 1.0, ("AH",)), ("CAT", 1.0, ("K", "AE", "T")), ("THE", 1.0, ("DH", "AH")),
                       ("THE", 1 / 9, ("DH", "IY"))]
    assert counts.words_without_pronunciation == 1
    write_lexiconp(str(tmp_path / "lexiconp.txt"), entries)
    assert (tmp_path / "lexiconp.txt").read_text().splitlines()[3] == "THE 0.111111 DH IY"
