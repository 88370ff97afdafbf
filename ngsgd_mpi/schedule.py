"""The training schedule: what each period is (who trains, how deep the network is, whether it
ends in an average or a pick-best), how many periods there are, and the learning rate.

A *period* is what the active ranks train between two averages: ``batches_per_period``
minibatches of ``minibatch_size`` frames per rank (``samples_per_average`` rounded up to whole
minibatches; Kaldi's ``--samples-per-iter``).  Every active rank does the same number,
wrapping around its own data, so the collectives line up without coordination.

Job ramp (Kaldi's accel2 recipes, ``--num-jobs-initial`` -> ``--num-jobs-final``).  Kaldi runs
``J_x = round(J0 + (J1 - J0) x / n)`` jobs in iteration x of n.  Here J0 = ``ranks_initial``
and J1 = the MPI world size; the other ranks idle through the period.  The ramp is written
as a function of the fraction f of the planned samples already processed, so that a run
resumed on another number of ranks continues it:

    (R1)  S(x) = P (J0 x + (J1 - J0) x^2 / (2n))        samples before period x (P per job)
    (R2)  J(x)^2 = J0^2 + 2 (J1 - J0) S(x) / (n P)      (expand J(x)^2 and compare with R1)
    (R3)  J(f) = round(sqrt(J0^2 + f (J1^2 - J0^2)))    f = S / S_total, S_total = S(n)

with f taken at the middle of the period (S + P J(S) / 2), which matches Kaldi's J_x within
one job (Kaldi's integer rounding processes slightly less than planned; this plan ends
when S_total is reached, a period or two later or earlier).

Which ranks are active rotates like Kaldi's archive index ``k = archives_processed + j``:
period x uses ranks ``(K + j) mod N`` for j < J, where K counts the rank-periods done
before it (= samples before it / P), so every rank's partitions are used about equally.

Learning rate (accel2).  The *effective* rate decays geometrically with the fraction of
samples processed, from ``lr_initial`` in the first period to ``lr_final`` in the last;
each active rank steps with J times it (``lr_scale_by_ranks``): averaging J models divides
each one's contribution by J (the paper's "n times" rule, with the *current* number of jobs).

    (R4)  lr(S) = lr_initial (lr_final / lr_initial)^(S / S_last),   S_last = S before the last period

Layer-wise growth (``add_layers_period`` P_add > 0, accel2's rule): training starts with one
hidden layer and one more is inserted before periods P_add, 2 P_add, ... until
``num_hidden_layers``.  No average after period 0 (``first_period_pick_best``) nor after a
period that started with a new layer (``pick_best_after_growth``): the best active rank's
model is kept, and those
periods step with half-size minibatches (the same samples in twice the steps), Kaldi's rule
"when the model is changing fast, averaging hurts and small minibatches keep it stable".
"""

from __future__ import annotations

import math
from dataclasses import dataclass


@dataclass(frozen=True)
class Period:
    """One period of the plan (every rank computes the same)."""
    index: int                 # 0-based
    samples_before: int        # samples processed by all ranks before it
    active: tuple[int, ...]    # ranks that train in it (sorted); the others idle
    hidden_layers: int         # hidden layers of the network it trains
    grows: bool                # a hidden layer is inserted before it
    pick_best: bool            # ends by keeping the best active rank's model instead of the average
    lr: float                  # effective learning rate
    lr_per_rank: float         # the rate each active rank steps with
    last: bool                 # the last period of the run


@dataclass(frozen=True)
class Plan:
    minibatch_size: int
    batches_per_period: int
    num_ranks: int             # J1: the MPI world size
    ranks_initial: int         # J0 (= num_ranks: no ramp)
    total_samples: int         # planned samples, all ranks together
    lr_initial: float
    lr_final: float
    lr_scale_by_ranks: bool
    num_hidden_layers: int     # the final depth
    add_layers_period: int     # 0: all layers from the start
    first_period_pick_best: bool
    pick_best_after_growth: bool

    @classmethod
    def make(cls, cfg, num_ranks: int, corpus_frames: int) -> "Plan":
        initial = cfg.ranks_initial or num_ranks
        return cls(minibatch_size=cfg.minibatch_size,
                   batches_per_period=math.ceil(cfg.samples_per_average / cfg.minibatch_size),
                   num_ranks=num_ranks, ranks_initial=min(initial, num_ranks),
                   total_samples=cfg.total_samples or int(cfg.num_epochs * corpus_frames),
                   lr_initial=cfg.lr_initial, lr_final=cfg.lr_final,
                   lr_scale_by_ranks=cfg.lr_scale_by_ranks, num_hidden_layers=cfg.num_hidden_layers,
                   add_layers_period=cfg.add_layers_period if cfg.num_hidden_layers > 1 else 0,
                   first_period_pick_best=cfg.first_period_pick_best,
                   pick_best_after_growth=cfg.pick_best_after_growth)

    @property
    def frames_per_period(self) -> int:
        """Per active rank."""
        return self.batches_per_period * self.minibatch_size

    def num_active(self, samples_done: int) -> int:
        """J of the period that starts after ``samples_done`` samples (R3, at its middle)."""
        j0, j1 = self.ranks_initial, self.num_ranks
        if j0 >= j1:
            return j1

        def jobs(samples):
            f = min(1.0, samples / max(self.total_samples, 1))
            return max(j0, min(j1, int(math.floor(math.sqrt(j0 * j0 + f * (j1 * j1 - j0 * j0)) + 0.5))))
        return jobs(samples_done + jobs(samples_done) * self.frames_per_period / 2)

    def hidden_layers(self, period: int) -> int:
        """Depth of the network in ``period``: 1 + one per add_layers_period periods, capped."""
        if not self.add_layers_period:
            return self.num_hidden_layers
        return min(self.num_hidden_layers, 1 + period // self.add_layers_period)

    def starts(self, samples_done: int) -> list[tuple[int, int]]:
        """(samples before, active ranks) of every remaining period, from where the run is."""
        out, samples = [], samples_done
        while samples < self.total_samples:
            j = self.num_active(samples)
            out.append((samples, j))
            samples += j * self.frames_per_period
        return out

    def num_periods(self, periods_done: int, samples_done: int) -> int:
        """Periods in the whole run, given where it is (resuming on another rank count changes it)."""
        return periods_done + len(self.starts(samples_done))

    def learning_rate(self, samples_done: int, last_start: int) -> float:
        """The effective rate of the period that starts after ``samples_done`` samples (R4);
        ``last_start``: samples before the last period."""
        frac = 1.0 if last_start <= 0 else min(1.0, samples_done / last_start)
        return self.lr_initial * math.exp(frac * math.log(self.lr_final / self.lr_initial))

    def period(self, index: int, samples_done: int) -> Period:
        """Period ``index`` (= periods done) starting after ``samples_done`` samples."""
        rest = self.starts(samples_done)
        last_start = rest[-1][0] if rest else samples_done
        j = self.num_active(samples_done)
        first = (samples_done // self.frames_per_period) % self.num_ranks     # rank-periods done, mod N
        active = tuple(sorted((first + k) % self.num_ranks for k in range(j)))
        grows = index > 0 and self.hidden_layers(index) > self.hidden_layers(index - 1)
        pick_best = (grows and self.pick_best_after_growth) or (index == 0 and self.first_period_pick_best)
        lr = self.learning_rate(samples_done, last_start)
        return Period(index, samples_done, active, self.hidden_layers(index), grows, pick_best, lr,
                      lr * (j if self.lr_scale_by_ranks else 1), len(rest) <= 1)

    def minibatch_for(self, period: Period) -> int:
        """Step size in frames: halved in pick-best periods (Kaldi), else minibatch_size."""
        return max(1, self.minibatch_size // 2) if period.pick_best else self.minibatch_size
