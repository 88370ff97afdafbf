"""Priors like nnet2, and the rule that keeps pdfs without training frames from winning.

A hybrid decoder wants ``log p(x | s)``, which Bayes gives up to a per-frame constant as
``log p(s | x) - log p(s)``.  Two choices decide whether that works: which ``p(s)``, and what
happens to a pdf the network never saw.

(P1) ``p(s) = (1/T) sum_t p(s | x_t)``: the average posterior of the *final* model over T
     training frames, renormalised (nnet2: ``nnet-compute-from-egs | matrix-sum-rows |
     vector-sum``, then ``nnet-adjust-priors``).  These are the priors the network's outputs are
     calibrated to, which label frequencies are not: a softmax trained with cross-entropy
     smooths its outputs, so a rare pdf's average posterior is above its frequency.

(P2) ``llk(s | x) = log p(s | x) - k log p(s)`` with k = ``--prior-scale`` (default 1; nnet1's
     ``--prior-scale``).

(P3) A pdf is *disabled* when its relative training frequency ``c_s / sum_r c_r`` is below
     ``--prior-floor`` (default 1e-10: in practice, when it has no training frames)::

         llk(s | x) = log p(s | x) - sqrt(FLT_MAX)         (about -1.8e19)

     This is nnet1's ``PdfPrior`` ("disables DNN output when decoding").  Why not floor the
     prior, as this project did before: the network has learnt nothing about such a pdf, so its
     ``p(s | x)`` is a small number that does not depend on x much; divided by a floored prior
     of 1e-8 it gains about +18 and wins every frame (issue 10: 100 % of the Digits test
     frames).  Even with (P1) its ratio hovers around 1, which on ambiguous frames beats every
     pdf the network does know about.  A disabled pdf can never win a frame; a decoding graph
     that needs one for a word cannot output that word, which is the honest outcome: there was
     no training data for it.

A model file without (P1) priors (checkpoints, older models) falls back to label frequencies
``c_s / sum c`` in (P2), and (P3) still applies.
"""

from __future__ import annotations

import math

import numpy as np

from . import backend, data

PRIOR_SUBSET_FRAMES = 100_000     # nnet2's train_pnorm_fast.sh: 10 jobs x prior_subset_size 10k
DISABLED_LOG_PRIOR = math.sqrt(np.finfo(np.float32).max)   # nnet1: sqrt(FLT_MAX)
LOG_FLOOR = 1e-20                 # only against log(0) of a prior that underflowed (nnet1: + 1e-20)


def average_posteriors(network, blocks) -> tuple[np.ndarray, int]:
    """(P1): (the renormalised sum of ``p(s | x)`` over the rows of the host blocks, rows)."""
    total, frames = None, 0
    for X in blocks:
        probs = backend.xp().exp(network.log_probs(backend.to_device(X)))
        block_sum = backend.to_host(probs.sum(axis=0, dtype=np.float64))    # one transfer per block
        total = block_sum if total is None else total + block_sum
        frames += len(X)
    if total is None or not total.sum() > 0:
        raise ValueError("average_posteriors: no frames")
    return total / total.sum(), frames


def disabled(class_counts, prior_floor: float) -> np.ndarray:
    """(P3): which classes have a relative training frequency below ``prior_floor``."""
    counts = np.asarray(class_counts, np.float64)
    return counts / max(counts.sum(), 1.0) < prior_floor


def log_prior_offsets(priors, class_counts, prior_scale: float = 1.0,
                      prior_floor: float = 1e-10) -> np.ndarray:
    """The (C,) float32 vector that (P2)/(P3) subtract from ``log p(s | x)``.

    ``priors``: (P1) priors or label frequencies; ``class_counts``: training frames per class
    (None: no class is disabled)."""
    offsets = prior_scale * np.log(np.maximum(np.asarray(priors, np.float64), LOG_FLOOR))
    if class_counts is not None:
        offsets[disabled(class_counts, prior_floor)] = DISABLED_LOG_PRIOR
    return offsets.astype(np.float32)


def first_training_frames(train_data: str, context: int, max_frames: int = PRIOR_SUBSET_FRAMES,
                    block_frames: int = 8192):
    """Spliced blocks of the first ``max_frames`` training frames, partitions in order.

    Partition 0 is always rank 0's own (the caller runs on rank 0), and ngsgd-prepare stores
    utterances in a shuffled order, so its first frames are a random sample of utterances."""
    left = max_frames
    for path in data.find_partitions(train_data):
        blocks = data.iterate_utterance_blocks(data.open_partition(path, scan=False), context, context,
                                               block_frames)
        try:
            for X, _ in blocks:
                yield X[:left]
                left -= min(left, len(X))
                if not left:
                    return
        finally:
            blocks.close()


def finalize(model, train_data: str, log=print):
    """The final model with (P1) priors from the first training frames."""
    priors, frames = average_posteriors(model.network(), first_training_frames(train_data, model.context))
    off = 0 if model.class_counts is None else int((np.asarray(model.class_counts) == 0).sum())
    log(f"priors: average posterior of the final model over {frames:,} training frames (nnet2); "
        f"{off} of {len(priors)} classes have no training frames and are disabled in "
        f"log-likelihood output")
    return model.replace(posterior_priors=priors)
