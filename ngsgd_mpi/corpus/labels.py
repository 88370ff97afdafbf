"""Frame labels from espeak phoneme events: phones, phone-states, triphone states.

Alignment of one utterance, from espeak's PHONEME events (start sample, mnemonic):

1. Each event lasts until the next event starts (the last one until the end of
   the audio); audio before the first event is silence.
2. An event of zero length (espeak folds a post-vocalic l or r into the end of
   the vowel, e.g. "sells" = E l(0) z) shares the span of the event before it:
   the span is split equally between that event's phones and its own.  A
   zero-length pause is just dropped (it holds no audio).
3. A span whose event maps to several ARPAbet phones is split equally
   (:mod:`ngsgd_mpi.corpus.phones`).  Adjacent silences are merged.

The result is a list of *segments* (start sample, end sample, phone id).  After
augmentation and feature extraction, each frame takes the segment under its
centre sample; segments that own no frame (shorter than a frame shift)
disappear.  An utterance's alignment is kept in run-length form:
``seg_phones[i]`` occupies the next ``seg_frames[i]`` frames.

Label sets (``--labels``):

* ``phone``: 40 classes (:data:`~ngsgd_mpi.corpus.phones.PHONES`).
* ``phone-state``: 120 classes, ``3 * phone + state``; a segment of n frames
  gives frame k state ``floor(3 k / n)`` (three equal-ish parts, Kaldi's
  3-state topology without self-loop statistics).
* ``triphone``: states of (left phone, phone, right phone); silence is context
  independent and utterance edges count as ``sil`` context.  Classes 0..119 are
  the monophone states (the back-off); then the most frequent triphone states
  of the *training* set, down to ``min_frames`` frames, up to ``num_classes``
  in all.  Any other triphone state (rare, or unseen in training) backs off to
  its monophone state -- a frequency cut standing in for Kaldi's decision tree,
  with a comparable output size (~2000).
"""

from __future__ import annotations

from collections import Counter

import numpy as np

from ngsgd_mpi.corpus.phones import PHONE_INDEX, PHONES, SILENCE, map_phonemes

NUM_STATES = 3
LABEL_KINDS = ("phone", "phone-state", "triphone")


def phone_segments(events, num_samples: int, accent: str):
    """Segments (starts, ends, phone ids) covering [0, num_samples) from espeak events.

    ``events``: [(start sample, espeak mnemonic), ...] in time order.  Raises
    UnknownPhonemeError for mnemonics the phone map lacks.
    """
    events = sorted(events, key=lambda e: e[0])  # stable: keeps espeak's order at equal times
    mapped = map_phonemes([m for _, m in events], accent)
    starts = [min(max(int(s), 0), num_samples) for s, _ in events]
    ends = starts[1:] + [num_samples]
    # Spans: [start, end, phones...]; zero-length events join the span before them.
    spans: list[list] = []
    pending: list[str] = []          # zero-length phones before the first span
    for start, end, phones in zip(starts, ends, mapped):
        if end > start:
            spans.append([start, end, pending + list(phones)])
            pending = []
        elif phones != ("sil",):
            if spans:
                spans[-1][2].extend(phones)
            else:
                pending.extend(phones)
    if pending:  # pending survives only if no event had any audio
        raise ValueError(f"phoneme events hold no audio (num_samples={num_samples})")
    segments = [(0, spans[0][0] if spans else num_samples, SILENCE)]
    for start, end, phones in spans:
        cuts = np.linspace(start, end, len(phones) + 1).round().astype(np.int64)
        for i, name in enumerate(phones):
            segments.append((int(cuts[i]), int(cuts[i + 1]), PHONE_INDEX[name]))
    merged: list[list[int]] = []
    for start, end, phone in segments:
        if end <= start:
            continue
        if merged and phone == SILENCE and merged[-1][2] == SILENCE:
            merged[-1][1] = end
        else:
            merged.append([start, end, phone])
    array = np.array(merged, dtype=np.int64).reshape(-1, 3)
    return array[:, 0], array[:, 1], array[:, 2].astype(np.int16)


def frame_alignment(seg_starts, seg_phones, num_frames: int, frame_shift: int, frame_length: int):
    """Run-length frame alignment (seg_phones, seg_frames) of segments given in samples.

    Frame t covers samples [t * frame_shift, t * frame_shift + frame_length)
    (Kaldi's snip_edges=true) and takes the segment under its centre.
    """
    centres = np.arange(num_frames) * frame_shift + frame_length // 2
    owner = np.searchsorted(np.asarray(seg_starts), centres, side="right") - 1
    owner = np.clip(owner, 0, len(seg_phones) - 1)
    change = np.flatnonzero(np.diff(owner)) + 1
    run_starts = np.concatenate([[0], change])
    run_lengths = np.diff(np.concatenate([run_starts, [num_frames]]))
    return np.asarray(seg_phones)[owner[run_starts]].astype(np.int16), run_lengths.astype(np.int32)


def state_of_frames(seg_frames) -> np.ndarray:
    """HMM state (0, 1, 2) of each frame: each segment split into three equal-ish parts."""
    seg_frames = np.asarray(seg_frames, dtype=np.int64)
    total = int(seg_frames.sum())
    first = np.repeat(np.cumsum(seg_frames) - seg_frames, seg_frames)
    length = np.repeat(seg_frames, seg_frames)
    return ((np.arange(total) - first) * NUM_STATES // np.maximum(length, 1)).astype(np.int32)


def _contexts(seg_phones):
    """(left, right) phone of each segment; utterance edges are silence."""
    phones = np.asarray(seg_phones, dtype=np.int64)
    left = np.concatenate([[SILENCE], phones[:-1]])
    right = np.concatenate([phones[1:], [SILENCE]])
    return left, right


class LabelSet:
    """A frame-label inventory.

    Fields:
      kind:        "phone", "phone-state" or "triphone".
      class_names: name of each class index (what ali.ark holds).
      triphones:   (left, phone, right, state) -> class index, for the triphone states
                   that got their own class (empty for the other kinds).
    """

    def __init__(self, kind: str, class_names, triphones=None):
        if kind not in LABEL_KINDS:
            raise ValueError(f"labels must be one of {', '.join(LABEL_KINDS)}, got {kind!r}")
        self.kind = kind
        self.class_names = list(class_names)
        self.triphones = dict(triphones or {})

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    def frame_labels(self, seg_phones, seg_frames) -> np.ndarray:
        """int32 class index of every frame of one utterance."""
        seg_phones = np.asarray(seg_phones, dtype=np.int64)
        if self.kind == "phone":
            return np.repeat(seg_phones, seg_frames).astype(np.int32)
        # Class of each (segment, state); monophone states first, then triphone overrides.
        seg_classes = seg_phones[:, None] * NUM_STATES + np.arange(NUM_STATES)[None, :]
        if self.kind == "triphone" and self.triphones:
            left, right = _contexts(seg_phones)
            for i in np.flatnonzero(seg_phones != SILENCE):
                for s in range(NUM_STATES):
                    key = (int(left[i]), int(seg_phones[i]), int(right[i]), s)
                    seg_classes[i, s] = self.triphones.get(key, seg_classes[i, s])
        segment_of_frame = np.repeat(np.arange(len(seg_phones)), seg_frames)
        return seg_classes[segment_of_frame, state_of_frames(seg_frames)].astype(np.int32)


def monophone_state_names() -> list[str]:
    return [f"{p}_{s}" for p in PHONES for s in range(NUM_STATES)]


def make_label_set(kind: str, train_alignments=(), num_classes: int = 2000,
                   min_frames: int = 20) -> LabelSet:
    """The label inventory of ``kind``; triphone classes are chosen from ``train_alignments``.

    ``train_alignments``: iterable of (seg_phones, seg_frames) of the training set.
    """
    if kind == "phone":
        return LabelSet(kind, PHONES)
    if kind == "phone-state":
        return LabelSet(kind, monophone_state_names())
    if kind != "triphone":
        raise ValueError(f"labels must be one of {', '.join(LABEL_KINDS)}, got {kind!r}")
    base = monophone_state_names()
    if num_classes < len(base):
        raise ValueError(f"num_classes must be >= {len(base)} for triphone labels, got {num_classes}")
    counts: Counter = Counter()
    for seg_phones, seg_frames in train_alignments:
        left, right = _contexts(seg_phones)
        for l, p, r, n in zip(left, seg_phones, right, seg_frames):
            if p == SILENCE:
                continue
            for s, frames in enumerate(np.bincount(np.arange(n) * NUM_STATES // n, minlength=3)):
                if frames:
                    counts[(int(l), int(p), int(r), s)] += int(frames)
    # Most frequent first; ties broken by the context itself so the inventory is deterministic.
    ranked = sorted((item for item in counts.items() if item[1] >= min_frames),
                    key=lambda item: (-item[1], item[0]))
    chosen = [key for key, _ in ranked[: num_classes - len(base)]]
    triphones = {key: len(base) + i for i, key in enumerate(chosen)}
    names = base + [f"{PHONES[l]}-{PHONES[p]}+{PHONES[r]}_{s}" for l, p, r, s in chosen]
    return LabelSet(kind, names, triphones)
