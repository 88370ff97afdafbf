"""Writing a Kaldi data directory of features and frame alignments.

Files of one data directory (all sorted by utterance id, as Kaldi requires):

* ``feats.ark`` / ``feats.scp``: float32 (frames x dim) matrices, written with
  kaldiio's ``WriteHelper("ark,scp:...")``.
* ``ali.ark``: one int32 vector per utterance, the class index (pdf-id) of each
  frame -- the binary format ``ali-to-pdf`` writes (Kaldi BasicVectorHolder);
  ``ali.txt``: the same in text form (``utt-id c1 c2 ...``).
* ``utt2spk``, ``spk2utt``, ``text``, ``utt2num_frames``; ``spk2gender`` when given.
* ``phone_text``: ``utt-id PH PH ...``, the phones of the alignment without
  silence (the reference for phone error rates), when given.
* ``classes.txt``: ``<class-name> <index>``, the meaning of the ids in ali.ark.
* ``phones.txt``: Kaldi-style phone symbol table (``<eps> 0``, ``sil 1``, ...).

:class:`KaldiDataDirWriter` streams utterances in (features first, alignments
possibly later, as the recipe needs the whole training set before it can
choose triphone classes); :func:`write_kaldi_data_dir` writes in-memory
utterances in one go.
"""

from __future__ import annotations

import dataclasses
import os

import numpy as np

from ngsgd_mpi.corpus.phones import PHONES


@dataclasses.dataclass
class Utterance:
    """One utterance in memory.

    Fields:
      utt_id:     Kaldi utterance id; must start with speaker_id.
      speaker_id: Kaldi speaker id.
      text:       transcript (upper-case words).
      feats:      (frames, dim) float32 features.
      labels:     (frames,) int32 class index per frame.
    """

    utt_id: str
    speaker_id: str
    text: str
    feats: np.ndarray
    labels: np.ndarray


def _check_id(field: str, value: str) -> None:
    if not value or any(c.isspace() for c in value):
        raise ValueError(f"{field} must be a non-empty string without whitespace, got {value!r}")


class KaldiDataDirWriter:
    """Streams utterances into one Kaldi data directory.

    Fields:
      data_dir:    the directory being written.
      utt2spk:     utterance id -> speaker id, in the order added (sorted).
      texts:       utterance id -> transcript.
      num_frames:  utterance id -> feature frame count.
      phone_texts: utterance id -> space-separated phones (written as ``phone_text``).
      aligned:     utterance ids whose alignment has been written.
      _feats, _ali, _ali_txt: open kaldiio writers / text file (ali ones opened on first use).
    """

    def __init__(self, data_dir: str):
        import kaldiio

        # Absolute, so feats.scp stays valid from any working directory.
        data_dir = os.path.abspath(data_dir)
        if "," in data_dir or ":" in data_dir:
            raise ValueError(f"data_dir must not contain ',' or ':' (Kaldi wspecifier syntax), "
                             f"got {data_dir!r}")
        os.makedirs(data_dir, exist_ok=True)
        self.data_dir = data_dir
        self.utt2spk: dict[str, str] = {}
        self.texts: dict[str, str] = {}
        self.num_frames: dict[str, int] = {}
        self.phone_texts: dict[str, str] = {}
        self.aligned: set[str] = set()
        self._kaldiio = kaldiio
        self._feats = kaldiio.WriteHelper(
            f"ark,scp:{os.path.join(data_dir, 'feats.ark')},{os.path.join(data_dir, 'feats.scp')}")
        self._ali = None
        self._ali_txt = None
        self._last_utt = ""

    def add_features(self, utt_id: str, speaker_id: str, text: str, feats: np.ndarray) -> None:
        _check_id("utt_id", utt_id)
        _check_id("speaker_id", speaker_id)
        if not utt_id.startswith(speaker_id):
            raise ValueError(f"utt_id must start with its speaker_id (Kaldi sorting), "
                             f"got utt_id={utt_id!r}, speaker_id={speaker_id!r}")
        if utt_id <= self._last_utt:
            raise ValueError(f"utt_id must be added in increasing order, got {utt_id!r} after "
                             f"{self._last_utt!r}")
        feats = np.asarray(feats)
        if feats.ndim != 2 or feats.shape[0] == 0:
            raise ValueError(f"feats must be a non-empty (frames, dim) matrix, got shape {feats.shape}")
        self._feats(utt_id, feats.astype(np.float32))
        self._last_utt = utt_id
        self.utt2spk[utt_id] = speaker_id
        self.texts[utt_id] = " ".join(text.split())
        self.num_frames[utt_id] = int(feats.shape[0])

    def add_phone_text(self, utt_id: str, phones) -> None:
        if utt_id not in self.num_frames:
            raise ValueError(f"utt_id {utt_id!r} has no features; add_features first")
        self.phone_texts[utt_id] = " ".join(phones)

    def add_alignment(self, utt_id: str, labels: np.ndarray) -> None:
        if utt_id not in self.num_frames:
            raise ValueError(f"utt_id {utt_id!r} has no features; add_features first")
        labels = np.asarray(labels)
        if labels.shape != (self.num_frames[utt_id],):
            raise ValueError(f"labels of {utt_id} must have shape ({self.num_frames[utt_id]},) "
                             f"to match its features, got {labels.shape}")
        if self._ali is None:
            self._ali = self._kaldiio.WriteHelper(f"ark:{os.path.join(self.data_dir, 'ali.ark')}")
            # Stays open across add_alignment calls; close() closes it.
            self._ali_txt = open(os.path.join(self.data_dir, "ali.txt"), "w", encoding="utf-8")  # noqa: SIM115
        labels = labels.astype(np.int32)
        self._ali(utt_id, labels)
        self._ali_txt.write(utt_id + " " + " ".join(map(str, labels.tolist())) + "\n")
        self.aligned.add(utt_id)

    def close(self, class_names, spk2gender: dict[str, str] | None = None) -> None:
        """Finish the directory; every utterance must have an alignment by now."""
        self._feats.close()
        if self._ali is not None:
            self._ali.close()
            self._ali_txt.close()
        missing = sorted(set(self.num_frames) - self.aligned)
        if missing:
            raise ValueError(f"utterances without alignment: {missing[:5]} ({len(missing)} in all)")
        d = self.data_dir

        def write_lines(name, lines):
            with open(os.path.join(d, name), "w", encoding="utf-8") as f:
                f.writelines(line + "\n" for line in lines)

        write_lines("utt2spk", (f"{u} {s}" for u, s in self.utt2spk.items()))
        write_lines("text", (f"{u} {t}" for u, t in self.texts.items()))
        write_lines("utt2num_frames", (f"{u} {n}" for u, n in self.num_frames.items()))
        if self.phone_texts:
            write_lines("phone_text", (f"{u} {self.phone_texts[u]}".rstrip() for u in self.num_frames
                                       if u in self.phone_texts))
        spk2utt: dict[str, list[str]] = {}
        for utt, spk in self.utt2spk.items():
            spk2utt.setdefault(spk, []).append(utt)
        write_lines("spk2utt", (f"{s} {' '.join(us)}" for s, us in sorted(spk2utt.items())))
        if spk2gender:
            write_lines("spk2gender", (f"{s} {spk2gender[s]}" for s in sorted(spk2utt)))
        write_lines("classes.txt", (f"{name} {i}" for i, name in enumerate(class_names)))
        write_lines("phones.txt", ["<eps> 0"] + [f"{p} {i + 1}" for i, p in enumerate(PHONES)])


def write_kaldi_data_dir(data_dir: str, utterances, class_names,
                         spk2gender: dict[str, str] | None = None) -> dict:
    """Write in-memory :class:`Utterance` objects as a Kaldi data directory.

    Utterances are sorted by id first.  Returns {"utterances": n, "frames": total}.
    """
    writer = KaldiDataDirWriter(data_dir)
    utterances = sorted(utterances, key=lambda u: u.utt_id)
    num_classes = len(class_names)
    for utt in utterances:
        labels = np.asarray(utt.labels)
        if labels.size and (labels.min() < 0 or labels.max() >= num_classes):
            raise ValueError(f"labels of {utt.utt_id} must lie in [0, {num_classes}), "
                             f"got range [{labels.min()}, {labels.max()}]")
        writer.add_features(utt.utt_id, utt.speaker_id, utt.text, utt.feats)
        writer.add_alignment(utt.utt_id, labels)
    writer.close(class_names, spk2gender)
    return {"utterances": len(utterances), "frames": int(sum(writer.num_frames.values()))}
