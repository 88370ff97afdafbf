"""N-gram language models for decoding graphs: estimation, ARPA files, G.fst.

Estimation from sentences (lists of tokens) is interpolated absolute
discounting with one discount per order, ``D_n = n1 / (n1 + 2 n2)`` from the
counts of n-grams seen once and twice (Ney, Essen & Kneser 1994).  With
``c(h w)`` the count of word w after history h (N1)::

    p(w | h) = max(c(h w) - D, 0) / c(h) + D * N1+(h .) / c(h) * p(w | h')

where h' drops the oldest word and ``N1+(h .)`` is the number of distinct
words after h; unigrams are relative frequencies (every vocabulary word is
seen).  In the ARPA backoff form an n-gram that was seen keeps p(w | h) and a
history keeps the weight that makes the unseen rest sum to one (N2)::

    bow(h) = (1 - sum_{w seen after h} p(w | h)) / (1 - sum_{w seen after h} p(w | h'))

``<s>`` starts every sentence (never predicted: log10 p = -99) and ``</s>``
ends it.  ARPA files are read by :func:`read_arpa`, which checks every line
(kaldilm's arpa2fst aborts the process on a malformed file); :func:`arpa_to_fst`
then converts a checked file with kaldilm, ``#0`` on the backoff arcs.
"""

from __future__ import annotations

import math
import os
import tempfile
from collections import Counter, defaultdict

from ngsgd_mpi.faults import InputError

from ngsgd_mpi.kaldi.fst import ArcFst, decoding_modules, read_fst

BOS, EOS = "<s>", "</s>"
LOG10_ZERO = -99.0


class ArpaError(InputError):
    """A malformed ARPA file (one line, names the file and line)."""


def estimate(sentences, order: int) -> dict[int, dict[tuple, tuple[float, float | None]]]:
    """{n: {ngram: (log10 p, log10 backoff or None)}} for n = 1..order, equations (N1), (N2)."""
    if order < 1:
        raise ValueError(f"n-gram order must be >= 1, got {order}")
    counts = [Counter() for _ in range(order + 1)]       # counts[n][ngram]
    for sentence in sentences:
        tokens = [BOS] + list(sentence) + [EOS]
        for i in range(1, len(tokens)):                  # every predicted position (not <s>)
            for n in range(1, order + 1):
                if i - n + 1 < 0:
                    break
                counts[n][tuple(tokens[i - n + 1:i + 1])] += 1
    total = sum(counts[1].values())
    if total == 0:
        raise ValueError("no training text for the language model")
    prob: dict[int, dict[tuple, float]] = {1: {w: c / total for w, c in counts[1].items()}}
    prob[1][(BOS,)] = 0.0
    for n in range(2, order + 1):
        of_count = Counter(counts[n].values())
        n1, n2 = of_count.get(1, 0), of_count.get(2, 0)
        discount = n1 / (n1 + 2 * n2) if n1 + n2 else 0.5
        history_count, followers = Counter(), Counter()
        for ngram, c in counts[n].items():
            history_count[ngram[:-1]] += c
            followers[ngram[:-1]] += 1
        prob[n] = {}
        for ngram, c in counts[n].items():
            h = ngram[:-1]
            lower = _backed_off(prob, ngram[1:], n - 1)
            prob[n][ngram] = (max(c - discount, 0.0) + discount * followers[h] * lower) / history_count[h]
    model = {n: {} for n in range(1, order + 1)}
    seen_after: dict[int, dict[tuple, list]] = {n: defaultdict(list) for n in range(2, order + 1)}
    for n in range(2, order + 1):
        for ngram in prob[n]:
            seen_after[n][ngram[:-1]].append(ngram)
    for n in range(1, order + 1):
        for ngram, p in prob[n].items():
            log_p = LOG10_ZERO if p <= 0 else math.log10(p)
            bow = None
            if n < order:
                nexts = seen_after[n + 1].get(ngram, [])
                num = 1.0 - sum(prob[n + 1][g] for g in nexts)
                den = 1.0 - sum(_backed_off(prob, g[1:], n) for g in nexts)
                if not nexts:
                    bow = 0.0
                else:
                    bow = math.log10(num / den) if num > 0 and den > 0 else LOG10_ZERO
            model[n][ngram] = (log_p, bow)
    return model


def _backed_off(prob, ngram: tuple, n: int) -> float:
    """p(ngram[-1] | ngram[:-1]) from the interpolated tables (used while they are built)."""
    return prob[n][ngram] if ngram in prob[n] else 0.0


def write_arpa(model, path: str) -> None:
    lines = ["", "\\data\\"] + [f"ngram {n}={len(model[n])}" for n in sorted(model)]
    for n in sorted(model):
        lines += ["", f"\\{n}-grams:"]
        for ngram in sorted(model[n]):
            log_p, bow = model[n][ngram]
            lines.append(f"{log_p:.6f}\t{' '.join(ngram)}" + ("" if bow is None else f"\t{bow:.6f}"))
    lines += ["", "\\end\\", ""]
    with open(path, "w", encoding="utf-8") as f:
        f.write("\n".join(lines))


def read_arpa(path: str) -> dict:
    """Check an ARPA file line by line; returns {"order", "counts", "vocabulary"}."""
    try:
        with open(path, encoding="utf-8") as f:
            lines = f.read().splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise ArpaError(f"{path}: cannot read as UTF-8 text ({exc})") from None

    def fail(number, what):
        return ArpaError(f"{path}: line {number}: {what}")

    i = 0
    while i < len(lines) and lines[i].strip() != "\\data\\":
        i += 1
    if i == len(lines):
        raise ArpaError(f"{path}: no \\data\\ section (not an ARPA file)")
    i += 1
    declared = {}
    while i < len(lines) and lines[i].strip().startswith("ngram "):
        key, _, value = lines[i].strip()[6:].partition("=")
        try:
            n, count = int(key), int(value)
        except ValueError:
            raise fail(i + 1, f"expected 'ngram N=COUNT', got {lines[i][:60]!r}") from None
        if n != len(declared) + 1 or count < 0:
            raise fail(i + 1, "n-gram orders must be declared as 1, 2, ... with counts >= 0")
        declared[n] = count
        i += 1
    if not declared or declared[1] == 0:
        raise ArpaError(f"{path}: the \\data\\ section declares no unigrams")
    order = len(declared)
    vocabulary = set()
    for n in range(1, order + 1):
        while i < len(lines) and not lines[i].strip():
            i += 1
        if i == len(lines) or lines[i].strip() != f"\\{n}-grams:":
            raise fail(min(i + 1, len(lines)), f"expected the \\{n}-grams: section")
        i += 1
        for k in range(declared[n]):
            if i == len(lines) or not lines[i].strip() or lines[i].startswith("\\"):
                raise fail(min(i + 1, len(lines)), f"the \\{n}-grams: section has {k} entries, "
                           f"\\data\\ declared {declared[n]}")
            fields = lines[i].split()
            if len(fields) not in (n + 1, n + 2) or (len(fields) == n + 2 and n == order):
                raise fail(i + 1, f"expected 'logprob' + {n} word(s)" + ("" if n == order else " [+ backoff]"))
            try:
                numbers = [float(fields[0])] + ([float(fields[-1])] if len(fields) == n + 2 else [])
            except ValueError:
                raise fail(i + 1, f"not a number in {lines[i][:60]!r}") from None
            if not all(math.isfinite(x) for x in numbers) or numbers[0] > 0:
                raise fail(i + 1, "log-probabilities must be finite and <= 0")
            words = fields[1:n + 1]
            if BOS in words[1:] or EOS in words[:-1]:
                raise fail(i + 1, f"{BOS} may only start and {EOS} only end an n-gram")
            if n == 1:
                vocabulary.add(words[0])
            elif not set(words) <= vocabulary:
                raise fail(i + 1, f"word(s) {sorted(set(words) - vocabulary)} are not unigrams")
            i += 1
        if i < len(lines) and lines[i].strip() and not lines[i].startswith("\\"):
            raise fail(i + 1, f"more \\{n}-grams: entries than the {declared[n]} declared")
    while i < len(lines) and not lines[i].strip():
        i += 1
    if i == len(lines) or lines[i].strip() != "\\end\\":
        raise fail(min(i + 1, len(lines)), "expected \\end\\")
    if BOS not in vocabulary or EOS not in vocabulary:
        raise ArpaError(f"{path}: the unigrams must include {BOS} and {EOS}")
    return {"order": order, "counts": declared, "vocabulary": vocabulary}


def arpa_to_fst(arpa_path: str, words_txt: str) -> ArcFst:
    """G as an arc table: kaldilm's arpa2fst of a checked ARPA file with the
    symbol table ``words_txt`` (which must have ``#0``); n-grams with words
    outside the table are skipped, as Kaldi's arpa2fst does."""
    read_arpa(arpa_path)
    kaldilm = decoding_modules()[1]
    with tempfile.TemporaryDirectory(prefix="ngsgd-lm-") as tmp, tempfile.TemporaryFile(mode="w+b") as log:
        g_path = os.path.join(tmp, "G.fst")
        saved = os.dup(2)
        os.dup2(log.fileno(), 2)                         # kaldilm logs to fd 2: keep it quiet
        try:
            kaldilm.arpa2fst(arpa_path, output_fst=g_path, disambig_symbol="#0", read_symbol_table=words_txt)
        finally:
            os.dup2(saved, 2)
            os.close(saved)
        return read_fst(g_path)         # the binary file: full float precision (the text has 6 digits)
