"""What every utterance must satisfy before it becomes training or evaluation data.

:func:`check_utterance` decides per utterance (trim a small length difference between
features and labels, or skip it for a reason in :data:`REASONS`); :class:`SkipReport` counts
the skipped ones by reason with a few example ids (``--strict``: the first one is an error).
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass

import numpy as np

from .faults import InputError

FLOAT16_MAX = 65504.0

REASONS = {
    "missing_labels": "features but no alignment",
    "missing_feats": "alignment but no features",
    "empty": "no frames",
    "length_mismatch": "feature and label lengths differ by more than --length-tolerance",
    "label_out_of_range": "labels outside [0, num_classes)",
    "nonfinite": "NaN/Inf in the features",
    "overflow": "feature values beyond the stored type (float16: |x| > 65504; use --dtype float32)",
}


class UtteranceError(InputError):
    """An utterance that may not be skipped (``--strict``); the message names it."""


@dataclass
class Checks:
    """What every utterance must satisfy."""
    num_classes: int | None = None    # None: only negative labels are bad (C inferred later)
    length_tolerance: int = 2         # |frames - labels| <= this: trim both to the shorter
    max_abs: float = FLOAT16_MAX      # largest |feature| the stored dtype can hold


class SkipReport:
    """Counts of skipped (and trimmed) utterances by reason, with a few example ids."""

    def __init__(self, strict: bool = False, num_examples: int = 3):
        self.strict = strict
        self.num_examples = num_examples
        self.counts: Counter = Counter()
        self.examples: dict[str, list[str]] = {}
        self.trimmed = 0
        self.trimmed_examples: list[str] = []

    def skip(self, utt_id: str, reason: str, detail: str) -> None:
        if self.strict:
            raise UtteranceError(f"utterance {utt_id!r}: {detail} (--strict)")
        self.counts[reason] += 1
        ids = self.examples.setdefault(reason, [])
        if len(ids) < self.num_examples:
            ids.append(utt_id)

    def trim(self, utt_id: str, detail: str) -> None:
        if self.strict:
            raise UtteranceError(f"utterance {utt_id!r}: {detail} (--strict)")
        self.trimmed += 1
        if len(self.trimmed_examples) < self.num_examples:
            self.trimmed_examples.append(utt_id)

    @property
    def num_skipped(self) -> int:
        return sum(self.counts.values())

    def to_dict(self) -> dict:
        return {"skipped": dict(self.counts), "skipped_examples": self.examples,
                "trimmed": self.trimmed, "trimmed_examples": self.trimmed_examples}

    def lines(self, length_tolerance: int) -> list[str]:
        out = []
        if self.num_skipped:
            parts = [f"{n:,} {REASONS[r]} (e.g. {', '.join(self.examples[r])})"
                     for r, n in sorted(self.counts.items())]
            out.append(f"skipped {self.num_skipped:,} utterance(s): " + "; ".join(parts))
        if self.trimmed:
            out.append(f"trimmed {self.trimmed:,} utterance(s) to the shorter of features/labels "
                       f"(difference <= {length_tolerance} frames; e.g. {', '.join(self.trimmed_examples)})")
        return out


def check_utterance(utt_id: str, feats: np.ndarray, labels: np.ndarray, checks: Checks,
                    report: SkipReport) -> int | None:
    """Frames to keep of one utterance (the first n of both), or None when it
    is skipped (counted in ``report``)."""
    num_feats, num_labels = len(feats), len(labels)
    if num_feats == 0 or num_labels == 0:
        report.skip(utt_id, "empty", f"empty utterance ({num_feats} feature frames, {num_labels} labels)")
        return None
    if abs(num_feats - num_labels) > checks.length_tolerance:
        report.skip(utt_id, "length_mismatch", f"{num_feats} feature frames but {num_labels} labels "
                    f"(more than --length-tolerance {checks.length_tolerance} apart)")
        return None
    n = min(num_feats, num_labels)
    lab = labels[:n]
    lo, hi = int(lab.min()), int(lab.max())
    if lo < 0 or (checks.num_classes is not None and hi >= checks.num_classes):
        bound = checks.num_classes if checks.num_classes is not None else "num_classes"
        report.skip(utt_id, "label_out_of_range", f"labels in [{lo}, {hi}] are outside [0, {bound})")
        return None
    x = feats[:n]
    finite = np.isfinite(x).all(axis=1)
    if not finite.all():
        report.skip(utt_id, "nonfinite", f"{int((~finite).sum())} frame(s) with NaN/Inf features "
                    f"(first: frame {int(np.argmin(finite))})")
        return None
    if np.abs(x).max() > checks.max_abs:
        report.skip(utt_id, "overflow", f"feature values up to {float(np.abs(x).max()):.4g} do not "
                    f"fit the stored type (|x| <= {checks.max_abs:.6g}; float16: use --dtype float32)")
        return None
    if num_feats != num_labels:
        report.trim(utt_id, f"{num_feats} feature frames but {num_labels} labels: trimmed to {n}")
    return n
