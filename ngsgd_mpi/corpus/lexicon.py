"""The corpus lexicon: every word's pronunciations as espeak actually spoke them.

espeak-ng emits a WORD event (the word's 1-based character position in the
text it was given) before the PHONEME events of that word
(:mod:`ngsgd_mpi.corpus.espeak`).  The phonemes between one word event and the
next are the pronunciation in context, in the speaker's accent; they go
through the same phone map as the frame labels
(:func:`ngsgd_mpi.corpus.phones.map_phonemes`, over the whole utterance so the
r-merging rule sees across word boundaries), pauses dropped.

espeak joins unstressed function words to a neighbour into one phonological
word with a single WORD event ("of the" = ``V v D @2``, "character is").
Such a group's phones are split among its words by a minimum edit-distance
alignment to the words' isolated pronunciations (espeak's
``TextToPhonemes`` of each word alone): a phone belongs to the word of the
isolated phone it is aligned with; an inserted phone to the word before it.
A word that ends up with no phone gets no pronunciation from that utterance.

Training utterances are counted per (word, pronunciation); the lexicon keeps a
word's pronunciations seen at least ``MIN_RATIO`` times as often as its most
frequent one, with Kaldi's ``lexiconp.txt`` probabilities (count divided by
the most frequent pronunciation's count, so the best one has probability 1).
"""

from __future__ import annotations

from collections import Counter

from ngsgd_mpi.corpus.phones import UnknownPhonemeError, map_phonemes
from ngsgd_mpi.corpus.text import transcript

MIN_RATIO = 0.1


def split_group(phones, isolated) -> list[list[str]]:
    """Split ``phones`` among words whose isolated pronunciations are ``isolated``
    (a list of phone lists) by a minimum edit-distance alignment."""
    ref = [p for pron in isolated for p in pron]
    owner = [w for w, pron in enumerate(isolated) for _ in pron]
    n, m = len(phones), len(ref)
    # cost[i][j]: edit distance of phones[:i] and ref[:j]
    cost = [[i + j if i == 0 or j == 0 else 0 for j in range(m + 1)] for i in range(n + 1)]
    for i in range(1, n + 1):
        for j in range(1, m + 1):
            cost[i][j] = min(cost[i - 1][j - 1] + (phones[i - 1] != ref[j - 1]),
                             cost[i - 1][j] + 1, cost[i][j - 1] + 1)
    word_of = [0] * n
    i, j = n, m
    while i > 0:
        if j > 0 and cost[i][j] == cost[i - 1][j - 1] + (phones[i - 1] != ref[j - 1]):
            word_of[i - 1] = owner[j - 1]
            i, j = i - 1, j - 1
        elif j > 0 and cost[i][j] == cost[i][j - 1] + 1:
            j -= 1
        else:                                   # inserted phone: the word of the phone before it
            word_of[i - 1] = owner[j - 1] if j > 0 else 0
            i -= 1
    parts: list[list[str]] = [[] for _ in isolated]
    for phone, word in zip(phones, word_of):
        parts[word].append(phone)
    return parts


def word_pronunciations(spoken: str, phonemes, words, accent: str, isolated):
    """[(WORD, phones or None), ...] of one utterance, in transcript order.

    ``spoken``: the spoken-form text given to espeak; ``phonemes``: its
    [(sample, mnemonic), ...]; ``words``: its [(first phoneme index, text
    position), ...]; ``isolated(token)``: the ARPAbet phones of a word spoken
    alone (or None).  Raises UnknownPhonemeError like the labels do.
    """
    tokens = [t.rstrip(",") for t in spoken.split(" ")]
    names = transcript(spoken).split()
    if len(names) != len(tokens):
        return [(name, None) for name in names]
    starts, position = {}, 1
    for i, token in enumerate(spoken.split(" ")):
        starts[position] = i
        position += len(token) + 1
    mapped = map_phonemes([m for _, m in phonemes], accent)
    events = sorted({starts[pos]: first for first, pos in words if pos in starts}.items())
    prons: list = [None] * len(tokens)
    for k, (word, first) in enumerate(events):
        next_word, last = events[k + 1] if k + 1 < len(events) else (len(tokens), len(mapped))
        phones = [p for group in mapped[first:last] for p in group if p != "sil"]
        if next_word - word == 1:
            prons[word] = phones
            continue
        alone = [isolated(t) for t in tokens[word:next_word]]
        if all(alone):
            prons[word:next_word] = split_group(phones, alone)
    return [(name, tuple(p) if p else None) for name, p in zip(names, prons)]


def isolated_pronunciation(synthesizer, accent: str, cache: dict):
    """``isolated(token)`` for :func:`word_pronunciations`: espeak's TextToPhonemes of
    the word alone in the current voice, mapped to ARPAbet (cached)."""
    def isolated(token: str):
        if token not in cache:
            mnemonics = [m for word in synthesizer.text_to_phonemes(token) for m in word]
            try:
                cache[token] = [p for group in map_phonemes(mnemonics, accent) for p in group if p != "sil"]
            except UnknownPhonemeError:
                cache[token] = None
        return cache[token]
    return isolated


class LexiconCounts:
    """Counts of (word, pronunciation) over the training utterances.

    Fields:
      counts:           Counter of (WORD, phones).
      words_without_pronunciation: words of counted utterances that got none.
    """

    def __init__(self):
        self.counts: Counter = Counter()
        self.words_without_pronunciation = 0

    def add_utterance(self, prons) -> None:
        for word, pron in prons:
            if pron is None:
                self.words_without_pronunciation += 1
            else:
                self.counts[(word, pron)] += 1

    def entries(self, min_ratio: float = MIN_RATIO) -> list[tuple[str, float, tuple[str, ...]]]:
        """(word, probability, phones), sorted by word then most frequent first."""
        best: dict[str, int] = {}
        for (word, _), n in self.counts.items():
            best[word] = max(best.get(word, 0), n)
        kept = [(word, n / best[word], pron) for (word, pron), n in self.counts.items()
                if n >= min_ratio * best[word]]
        return sorted(kept, key=lambda e: (e[0], -e[1], e[2]))


def write_lexiconp(path: str, entries) -> None:
    """Kaldi's ``lexiconp.txt``: ``WORD prob PH1 PH2 ...``."""
    with open(path, "w", encoding="utf-8") as f:
        f.writelines(f"{word} {prob:.6g} {' '.join(pron)}\n" for word, prob, pron in entries)
