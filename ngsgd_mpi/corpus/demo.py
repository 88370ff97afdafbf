"""The small demo corpus shipped as ``ngsgd_mpi/demo_corpus.npz``.

Made by this recipe (``python -m ngsgd_mpi.corpus.make_demo``: phone labels,
light noise, about 8 minutes of audio) and packed into one ``.npz`` that loads with
``allow_pickle=False``:

* ``train_feats``: (frames, 40) float16, per-speaker CMVN'd log-mel fbank;
  ``train_labels``: (frames,) int32 phone class per frame;
  ``train_utt_offsets``: (utterances + 1,) int64, utterance i is frames
  ``offsets[i]:offsets[i+1]`` (starts at 0, ends at frames);
  ``train_utt_ids``: (utterances,) fixed-width unicode;
* the same four ``test_*`` arrays (test speakers and sentences are disjoint from train);
* ``class_names``: (40,) unicode, ``label_kind``: 0-d unicode ("phone"),
  ``sample_rate``: 0-d int (16000), ``frame_shift_ms``: 0-d int (10).

:func:`load_demo_corpus` needs only numpy.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np

DEMO_CORPUS_PATH = Path(__file__).resolve().parent.parent / "demo_corpus.npz"
SPLIT_KEYS = ("feats", "labels", "utt_offsets", "utt_ids")
SCALAR_KEYS = ("label_kind", "sample_rate", "frame_shift_ms")


def load_demo_corpus(path: str | os.PathLike | None = None) -> dict:
    """The demo corpus as a dict of arrays (keys as in the module docstring).

    ``label_kind`` is returned as str and ``sample_rate``/``frame_shift_ms`` as int.
    Raises ValueError if the file is inconsistent.
    """
    path = Path(path) if path is not None else DEMO_CORPUS_PATH
    if not path.is_file():
        raise FileNotFoundError(f"demo corpus not found at {path}; rebuild it with "
                                f"`python -m ngsgd_mpi.corpus.make_demo {path}`")
    with np.load(path, allow_pickle=False) as archive:
        data = {key: archive[key] for key in archive.files}
    expected = [f"{s}_{k}" for s in ("train", "test") for k in SPLIT_KEYS] + ["class_names", *SCALAR_KEYS]
    missing = [key for key in expected if key not in data]
    if missing:
        raise ValueError(f"demo corpus {path} lacks keys {missing}")
    num_classes = len(data["class_names"])
    for split in ("train", "test"):
        feats, labels = data[f"{split}_feats"], data[f"{split}_labels"]
        offsets, ids = data[f"{split}_utt_offsets"], data[f"{split}_utt_ids"]
        if feats.ndim != 2 or labels.shape != (feats.shape[0],):
            raise ValueError(f"{split}_labels must have one entry per row of {split}_feats, got "
                             f"{labels.shape} for {feats.shape}")
        if offsets[0] != 0 or offsets[-1] != feats.shape[0] or np.any(np.diff(offsets) <= 0) \
                or len(offsets) != len(ids) + 1:
            raise ValueError(f"{split}_utt_offsets must rise from 0 to {feats.shape[0]} with one "
                             f"step per utterance id")
        if labels.min() < 0 or labels.max() >= num_classes:
            raise ValueError(f"{split}_labels must lie in [0, {num_classes})")
    data["label_kind"] = str(data["label_kind"])
    data["sample_rate"] = int(data["sample_rate"])
    data["frame_shift_ms"] = int(data["frame_shift_ms"])
    return data


def read_kaldi_split(data_dir: str) -> tuple[list[str], list[np.ndarray], list[np.ndarray]]:
    """(utt ids, feature matrices, label vectors) of a data dir written by the recipe."""
    import kaldiio

    feats = kaldiio.load_scp(os.path.join(data_dir, "feats.scp"))
    labels = dict(kaldiio.load_ark(os.path.join(data_dir, "ali.ark")))
    ids = sorted(feats.keys())
    return ids, [np.asarray(feats[u]) for u in ids], [np.asarray(labels[u]) for u in ids]


def pack_corpus(corpus_dir: str, out_path: str) -> dict:
    """Pack OUT_DIR/{train,test} of a recipe run into the demo ``.npz`` format."""
    arrays = {}
    for split in ("train", "test"):
        ids, feats, labels = read_kaldi_split(os.path.join(corpus_dir, split))
        lengths = [len(f) for f in feats]
        arrays[f"{split}_feats"] = np.concatenate(feats).astype(np.float16)
        arrays[f"{split}_labels"] = np.concatenate(labels).astype(np.int32)
        arrays[f"{split}_utt_offsets"] = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
        arrays[f"{split}_utt_ids"] = np.array(ids, dtype=str)
    with open(os.path.join(corpus_dir, "train", "classes.txt"), encoding="utf-8") as f:
        arrays["class_names"] = np.array([line.split()[0] for line in f], dtype=str)
    with open(os.path.join(corpus_dir, "corpus_info.json"), encoding="utf-8") as f:
        info = json.load(f)
    arrays["label_kind"] = np.array(info["label_kind"], dtype=str)
    arrays["sample_rate"] = np.array(info["sample_rate"], dtype=np.int64)
    arrays["frame_shift_ms"] = np.array(info["frame_shift_ms"], dtype=np.int64)
    np.savez_compressed(out_path, **arrays)
    return {key: value.shape for key, value in arrays.items()}
