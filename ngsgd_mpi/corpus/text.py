"""Sentences to speak, from text that is on the machine already (no downloads).

Sources (``--text-sources``):

* ``fortunes``: Debian's ``fortunes`` package (/usr/share/games/fortunes): quotes,
  jokes, literature -- natural English sentences.
* ``pydoc``: Python's own reference documentation, shipped with every CPython
  as ``pydoc_data.topics`` (prose paragraphs only; code is skipped).
* ``docstrings``: docstrings of the Python standard library's own modules
  (parsed with :mod:`ast`, nothing is imported; about 2 s).
* ``words``: random word strings drawn from Debian's ``wamerican`` word list
  (/usr/share/dict/words) -- wide lexical coverage, no grammar.

Every sentence is normalised to a *spoken form*: lower-case words of letters
(with at most one inner apostrophe), separated by spaces, with commas kept as
pause marks; the transcript (Kaldi ``text``) is the same words in upper case
without commas.  Sentences with digits, symbols or code are dropped rather
than guessed at, so the transcript is what espeak reads.

Train and test sentences are disjoint by construction: a sentence belongs to
the test pool when the SHA-1 of its transcript falls in the first
``test_fraction`` of the hash range, independent of source and seed.
"""

from __future__ import annotations

import ast
import hashlib
import os
import re
import sysconfig

import numpy as np

FORTUNES_DIR = "/usr/share/games/fortunes"
WORDS_FILE = "/usr/share/dict/words"
TEXT_SOURCES = ("fortunes", "pydoc", "docstrings", "words")
DEFAULT_TEXT_SOURCES = ("fortunes", "pydoc", "docstrings")
MIN_WORDS, MAX_WORDS = 4, 20

_ALLOWED = re.compile(r"^[A-Za-z ,.;:!?'\"-]+$")
_WORD = re.compile(r"^[a-z]+(?:'[a-z]+)?$")
_SENTENCE_END = re.compile(r"(?<=[.!?])\s+")


def normalize_sentence(raw: str) -> str | None:
    """The spoken form of one sentence, or None when it is not plain English words."""
    sentence = " ".join(raw.split())
    if not _ALLOWED.match(sentence) or "--" in sentence.replace(" -- ", ""):
        return None
    spoken = []
    for token in sentence.replace(" -- ", ", ").replace("-", " ").split():
        pause = token.rstrip("\"'").endswith((",", ";", ":"))
        word = token.strip(",.;:!?\"'").lower()
        if not _WORD.match(word):
            return None
        if len(word) == 1 and word not in ("a", "i"):
            return None      # initials and stray letters are spelled oddly
        spoken.append(word + ("," if pause else ""))
    if not MIN_WORDS <= len(spoken) <= MAX_WORDS:
        return None
    spoken[-1] = spoken[-1].rstrip(",")
    return " ".join(spoken)


def transcript(spoken: str) -> str:
    """Kaldi ``text`` form of a spoken-form sentence: upper-case words, no punctuation."""
    return spoken.replace(",", "").upper()


def _split_sentences(paragraph: str) -> list[str]:
    return _SENTENCE_END.split(" ".join(paragraph.split()))


def fortune_sentences(directory: str = FORTUNES_DIR) -> list[str]:
    """Spoken-form sentences from the fortune files (offensive 'off/' ones excluded)."""
    sentences = []
    for name in sorted(os.listdir(directory)):
        path = os.path.join(directory, name)
        if "." in name or not os.path.isfile(path):
            continue  # skip the .dat indexes and .u8 links
        with open(path, encoding="utf-8", errors="replace") as f:
            entries = f.read().split("\n%\n")
        for entry in entries:
            # Drop attribution lines ("    -- Mark Twain") and keep the quote.
            lines = [line for line in entry.splitlines() if not line.strip().startswith("--")]
            for piece in _split_sentences(" ".join(lines)):
                spoken = normalize_sentence(piece)
                if spoken:
                    sentences.append(spoken)
    return sentences


def pydoc_sentences() -> list[str]:
    """Spoken-form sentences from the prose of Python's reference documentation."""
    from pydoc_data.topics import topics

    return [s for key in sorted(topics) for s in _prose_sentences(topics[key])]


def _prose_sentences(text: str) -> list[str]:
    """Spoken-form sentences of the unindented (non-code) paragraphs of ``text``."""
    sentences = []
    for paragraph in text.split("\n\n"):
        lines = paragraph.splitlines()
        if not lines or any(line.startswith((" ", "\t")) for line in lines):
            continue  # indented = code, grammar or a literal block
        for piece in _split_sentences(paragraph):
            spoken = normalize_sentence(piece)
            if spoken:
                sentences.append(spoken)
    return sentences


_SKIPPED_STDLIB_DIRS = {"test", "tests", "site-packages", "dist-packages", "idlelib", "lib2to3",
                        "turtledemo", "__pycache__"}


def docstring_sentences() -> list[str]:
    """Spoken-form sentences from the docstrings of the standard library's .py files."""
    sentences = []
    for directory, subdirs, files in os.walk(sysconfig.get_paths()["stdlib"]):
        subdirs[:] = sorted(d for d in subdirs if d not in _SKIPPED_STDLIB_DIRS)
        for name in sorted(files):
            if not name.endswith(".py"):
                continue
            with open(os.path.join(directory, name), encoding="utf-8", errors="replace") as f:
                try:
                    tree = ast.parse(f.read())
                except (SyntaxError, ValueError):
                    continue
            for node in ast.walk(tree):
                if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
                    docstring = ast.get_docstring(node)
                    if docstring:
                        sentences.extend(_prose_sentences(docstring))
    return sentences


def word_sentences(count: int = 20000, path: str = WORDS_FILE, seed: int = 0) -> list[str]:
    """``count`` random strings of 5-12 dictionary words (fixed seed: the same list every time)."""
    with open(path, encoding="utf-8", errors="replace") as f:
        vocabulary = sorted({w for w in (line.strip() for line in f)
                             if _WORD.match(w) and "'" not in w and 2 <= len(w) <= 12})
    rng = np.random.default_rng(seed)
    lengths = rng.integers(5, 13, size=count)
    return [" ".join(vocabulary[i] for i in rng.integers(0, len(vocabulary), size=n)) for n in lengths]


def source_available(name: str) -> bool:
    if name == "fortunes":
        return os.path.isdir(FORTUNES_DIR)
    if name == "words":
        return os.path.isfile(WORDS_FILE)
    if name == "docstrings":
        return os.path.isdir(sysconfig.get_paths()["stdlib"])
    if name == "pydoc":
        try:
            import pydoc_data.topics  # noqa: F401
        except ImportError:
            return False
        return True
    raise ValueError(f"text source must be one of {', '.join(TEXT_SOURCES)}, got {name!r}")


def load_sentences(sources=DEFAULT_TEXT_SOURCES) -> tuple[list[str], list[str]]:
    """Deduplicated, sorted spoken-form sentences from the available ``sources``.

    Returns (sentences, sources actually used).  A named source that is not
    installed is skipped; if none is left, ValueError says what to install.
    """
    used, sentences = [], set()
    for name in sources:
        if not source_available(name):
            continue
        used.append(name)
        if name == "fortunes":
            sentences.update(fortune_sentences())
        elif name == "pydoc":
            sentences.update(pydoc_sentences())
        elif name == "docstrings":
            sentences.update(docstring_sentences())
        else:
            sentences.update(word_sentences())
    if not sentences:
        raise ValueError(f"text_sources: none of {list(sources)} is available "
                         f"(apt-get install fortunes wamerican, or use 'pydoc')")
    return sorted(sentences), used


def is_test_sentence(spoken: str, test_fraction: float) -> bool:
    """Whether a sentence belongs to the test pool (by hash of its transcript)."""
    digest = hashlib.sha1(transcript(spoken).encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "big") < test_fraction * 2.0 ** 64


def split_train_test(sentences, test_fraction: float = 0.1) -> tuple[list[str], list[str]]:
    """Disjoint (train, test) sentence pools; sentences with equal transcripts go to one side."""
    if not 0.0 < test_fraction < 1.0:
        raise ValueError(f"test_fraction must be in (0, 1), got {test_fraction}")
    train, test = [], []
    for spoken in sentences:
        (test if is_test_sentence(spoken, test_fraction) else train).append(spoken)
    return train, test
