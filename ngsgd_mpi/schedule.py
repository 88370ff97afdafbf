"""The training schedule: how long the periods are, how many there are, the learning rate.

A *period* is what every rank trains between two averages: ``batches_per_period``
minibatches of ``minibatch_size`` frames (``samples_per_average`` rounded up to whole
minibatches).  Every rank does the same number, wrapping around its own data, so the
collectives line up without coordination.

Learning rate (Kaldi's accel2 recipes): the *effective* rate decays geometrically with the
fraction of the planned samples already processed, from ``lr_initial`` (first period) to
``lr_final`` (last period); each rank steps with N times it (``lr_scale_by_ranks``), because
averaging N models divides each rank's contribution by N (the paper's "n times" rule).
"""

from __future__ import annotations

import math
from dataclasses import dataclass


@dataclass(frozen=True)
class Plan:
    minibatch_size: int
    batches_per_period: int
    num_ranks: int
    total_samples: int        # planned samples, all ranks together
    lr_initial: float
    lr_final: float
    lr_scale: int             # each rank's step uses lr_scale x the effective rate

    @classmethod
    def make(cls, cfg, num_ranks: int, corpus_frames: int) -> "Plan":
        return cls(minibatch_size=cfg.minibatch_size,
                   batches_per_period=math.ceil(cfg.samples_per_average / cfg.minibatch_size),
                   num_ranks=num_ranks,
                   total_samples=cfg.total_samples or int(cfg.num_epochs * corpus_frames),
                   lr_initial=cfg.lr_initial, lr_final=cfg.lr_final,
                   lr_scale=num_ranks if cfg.lr_scale_by_ranks else 1)

    @property
    def frames_per_period(self) -> int:
        """Per rank."""
        return self.batches_per_period * self.minibatch_size

    @property
    def samples_per_period(self) -> int:
        """All ranks together."""
        return self.frames_per_period * self.num_ranks

    def num_periods(self, periods_done: int, samples_done: int) -> int:
        """Periods in the whole run, given where it is (resuming on another rank count changes it)."""
        return periods_done + max(0, math.ceil((self.total_samples - samples_done) / self.samples_per_period))

    def learning_rate(self, samples_done: int) -> float:
        """The effective rate of the period that starts after ``samples_done`` samples."""
        frac = min(1.0, samples_done / max(self.total_samples - self.samples_per_period, 1))
        return self.lr_initial * math.exp(frac * math.log(self.lr_final / self.lr_initial))
