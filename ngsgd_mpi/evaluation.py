"""How good a network is on labelled frames: the one evaluation loop.

Used for validation after every average (trainer), for choosing the final combination
(combine) and by ``ngsgd-eval``.  Everything is summed on the network's device and reaches
the host as one small vector per block.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from . import backend, data


@dataclass
class Evaluation:
    """Sums over the frames seen: log-probability of the correct class, and per class the
    frames and the frames whose most probable class is the right one."""
    class_frames: np.ndarray        # (C,) int64
    class_correct: np.ndarray       # (C,) int64
    logprob: float = 0.0
    utterances: int = 0

    @classmethod
    def empty(cls, num_classes: int) -> "Evaluation":
        return cls(np.zeros(num_classes, np.int64), np.zeros(num_classes, np.int64))

    @property
    def frames(self) -> int:
        return int(self.class_frames.sum())

    @property
    def objective(self) -> float:
        """Mean log-probability of the correct class per frame."""
        return self.logprob / self.frames

    @property
    def accuracy(self) -> float:
        return float(self.class_correct.sum() / self.frames)

    def per_class(self) -> list[dict]:
        return [{"class": c, "frames": int(n), "accuracy": float(self.class_correct[c] / n) if n else None}
                for c, n in enumerate(self.class_frames)]


def evaluate(network, blocks, num_utterances: int = 0) -> Evaluation:
    """Evaluate on ``blocks``: (spliced float32 features, integer labels) host pairs."""
    num_classes = network.config.num_classes
    result = Evaluation.empty(num_classes)
    for X, labels in blocks:
        labels = np.asarray(labels, np.int64)
        if len(labels) and (labels.min() < 0 or labels.max() >= num_classes):
            raise ValueError(f"labels: values outside [0, {num_classes})")
        log_probs = network.log_probs(backend.to_device(X))
        xp = backend.array_module(log_probs)
        y = xp.asarray(labels)
        correct = (log_probs.argmax(axis=1) == y).astype(np.float64)
        sums = xp.concatenate([log_probs[xp.arange(len(labels)), y].sum(dtype=np.float64)[None],
                               xp.bincount(y, minlength=num_classes).astype(np.float64),
                               xp.bincount(y, weights=correct, minlength=num_classes)])
        host = backend.to_host(sums)             # the block's one device-to-host transfer
        result.logprob += float(host[0])
        result.class_frames += host[1:1 + num_classes].astype(np.int64)
        result.class_correct += host[1 + num_classes:].astype(np.int64)
    result.utterances = num_utterances
    return result


def evaluate_partition(network, info: data.PartitionInfo, context: int,
                       block_frames: int = 8192) -> Evaluation:
    """Evaluate on a whole partition file (spliced with ``context`` as in training)."""
    blocks = data.iterate_utterance_blocks(info, context, context, block_frames)
    return evaluate(network, blocks, len(info.utt_offsets) - 1)
