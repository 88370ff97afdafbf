"""Word (and phone) error rates in Kaldi's format and layout.

What Kaldi's ``steps/scoring/score_kaldi_wer.sh`` writes, for each word
insertion penalty WIP and LM weight LMWT, given the 1-best hypotheses:

* ``DIR/scoring_kaldi/test_filt.txt``: the reference;
* ``DIR/scoring_kaldi/penalty_WIP/LMWT.txt``: ``utt w1 w2 ... `` (int2sym.pl
  style: every field followed by a space);
* ``DIR/wer_LMWT_WIP``: ``compute-wer --mode=present`` output (N1)::

      %WER 12.34 [ 56 / 454, 7 ins, 8 del, 41 sub ]
      %SER 50.00 [ 10 / 20 ]
      Scored 20 sentences, 0 not present in hyp.

  ``[PARTIAL]`` follows the first line when some references have no hypothesis
  (they are not scored); errors are Kaldi's LevenshteinEditDistance counts
  (kaldialign computes the same ins / del / sub split);
* ``DIR/scoring_kaldi/best_wer``: the line of the lowest WER, compared at two
  decimals with the first one kept on ties (utils/best_wer.sh), followed by the
  file it came from; ``wer_details/lmwt`` and ``wer_details/wip``.

For a phone graph the "words" are phones and the same lines are a phone error
rate, as Kaldi's TIMIT recipe reports it.
"""

from __future__ import annotations

import dataclasses
import os

from ngsgd_mpi.faults import InputError


class ScoringError(InputError):
    """A reference or hypothesis that cannot be scored (one line)."""


def read_text(path: str) -> dict[str, list[str]]:
    """``utt w1 w2 ...`` lines (Kaldi ``text``); utterance ids must be unique."""
    out: dict[str, list[str]] = {}
    try:
        with open(path, encoding="utf-8") as f:
            for number, line in enumerate(f, 1):
                fields = line.split()
                if not fields:
                    continue
                if fields[0] in out:
                    raise ScoringError(f"{path}: line {number}: utterance {fields[0]!r} appears twice")
                out[fields[0]] = fields[1:]
    except (OSError, UnicodeDecodeError) as exc:
        raise ScoringError(f"{path}: cannot read as UTF-8 text ({exc})") from None
    return out


@dataclasses.dataclass
class ErrorCounts:
    """compute-wer's totals."""

    words: int = 0
    insertions: int = 0
    deletions: int = 0
    substitutions: int = 0
    sentences: int = 0
    sentence_errors: int = 0
    absent: int = 0

    @property
    def errors(self) -> int:
        return self.insertions + self.deletions + self.substitutions

    @property
    def wer(self) -> float:
        return 100.0 * self.errors / self.words if self.words else 0.0

    def lines(self) -> str:
        """compute-wer's output, equation (N1)."""
        ser = 100.0 * self.sentence_errors / self.sentences if self.sentences else 0.0
        partial = " [PARTIAL]" if self.absent else ""
        return (f"%WER {self.wer:.2f} [ {self.errors} / {self.words}, {self.insertions} ins, "
                f"{self.deletions} del, {self.substitutions} sub ]{partial}\n"
                f"%SER {ser:.2f} [ {self.sentence_errors} / {self.sentences} ]\n"
                f"Scored {self.sentences} sentences, {self.absent} not present in hyp.\n")


def count_errors(ref: dict[str, list[str]], hyp: dict[str, list[str]]) -> ErrorCounts:
    """compute-wer --mode=present: references without a hypothesis are counted as absent."""
    import kaldialign  # noqa: PLC0415 - the 'decode' extra

    counts = ErrorCounts()
    for utt, words in ref.items():
        if utt not in hyp:
            counts.absent += 1
            continue
        d = kaldialign.edit_distance(words, hyp[utt])
        counts.words += len(words)
        counts.insertions += d["ins"]
        counts.deletions += d["del"]
        counts.substitutions += d["sub"]
        counts.sentences += 1
        counts.sentence_errors += d["total"] > 0
    return counts


def hyp_line(utt: str, words) -> str:
    """One line of ``penalty_WIP/LMWT.txt`` as int2sym.pl prints it."""
    return "".join(f"{field} " for field in [utt, *words]) + "\n"


def _write(path: str, text: str) -> None:
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
    os.replace(tmp, path)


def write_hypotheses(out_dir: str, hyps: dict[tuple[int, str], dict[str, list[str]]]) -> None:
    """``scoring_kaldi/penalty_WIP/LMWT.txt`` for every (lmwt, wip); keys are the
    LM weight and the penalty as spelt in the option (file names use them)."""
    for (lmwt, wip), by_utt in hyps.items():
        directory = os.path.join(out_dir, "scoring_kaldi", f"penalty_{wip}")
        os.makedirs(directory, exist_ok=True)
        _write(os.path.join(directory, f"{lmwt}.txt"), "".join(hyp_line(u, w) for u, w in by_utt.items()))


def check_references(ref: dict[str, list[str]], utterances, ref_path: str) -> None:
    missing = [u for u in utterances if u not in ref]
    if missing:
        raise ScoringError(f"--ref {ref_path}: no reference for utterance {missing[0]!r} "
                           f"({len(missing)} decoded utterance(s) missing)")


def score(out_dir: str, ref_path: str, hyps: dict[tuple[int, str], dict[str, list[str]]],
          penalties, lmwts) -> tuple[str, ErrorCounts, int, str]:
    """Write the wer_* files, test_filt.txt and best_wer; returns (best line, its
    counts, lmwt, wip).  Every hypothesis must have a reference."""
    ref = read_text(ref_path)
    check_references(ref, next(iter(hyps.values())), ref_path)
    scoring = os.path.join(out_dir, "scoring_kaldi")
    os.makedirs(os.path.join(scoring, "wer_details"), exist_ok=True)
    with open(ref_path, encoding="utf-8") as f:
        _write(os.path.join(scoring, "test_filt.txt"), f.read())
    best = None
    for wip in penalties:                          # the order of score_kaldi_wer.sh's loops
        for lmwt in lmwts:
            counts = count_errors(ref, hyps[(lmwt, wip)])
            name = os.path.join(out_dir, f"wer_{lmwt}_{wip}")
            _write(name, counts.lines())
            if best is None or round(counts.wer, 2) < round(best[1].wer, 2):
                best = (name, counts, lmwt, wip)
    name, counts, lmwt, wip = best
    line = f"{counts.lines().splitlines()[0]} {name}"
    _write(os.path.join(scoring, "best_wer"), line + "\n")
    _write(os.path.join(scoring, "wer_details", "lmwt"), f"{lmwt}\n")
    _write(os.path.join(scoring, "wer_details", "wip"), f"{wip}\n")
    return line, counts, lmwt, wip
