"""What the ranks' models become at the end of a period (Kaldi's safeguards around the average).

Only the period's *active* ranks (schedule.py: the job ramp) trained; the idle ones take
weight 0 and receive the result like everyone else.

* Normally: the average of the active ranks' parameters (one Allreduce of the flat buffer,
  idle ranks contributing weight 0).
* ``outlier_threshold`` > 0 (nnet3's ``get_successful_models``): active ranks whose training
  objective is more than that many nats/frame below the best active rank's are left out too.
* ``pick_best`` (nnet2's iteration 0, and the period after a layer was added): no average;
  every rank takes the parameters of the active rank with the best training objective.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np


@dataclass
class Outcome:
    picked: int | None = None                           # the rank copied instead of averaging
    excluded: list[int] = field(default_factory=list)   # active ranks left out of the average

    @property
    def note(self) -> str | None:
        """For the period's metrics record (None when it was a plain average)."""
        if self.picked is not None:
            return f"picked rank {self.picked} (best training objective) instead of averaging"
        if self.excluded:
            return f"excluded rank(s) {self.excluded} (objective far below the best)"
        return None


def combine_ranks(dist, params, rank_objectives: np.ndarray, pick_best: bool,
                  outlier_threshold: float, active=None) -> Outcome:
    """Replace ``params`` (this rank's flat buffer) in place by what every rank agrees on.
    ``rank_objectives``: all ranks' training objectives (the same on every rank; idle ranks'
    entries are ignored); ``active``: the ranks that trained (None: all)."""
    objs = np.asarray(rank_objectives, np.float64)
    trained = np.zeros(len(objs), bool)
    trained[list(range(len(objs)) if active is None else active)] = True
    best_obj = objs[trained].max()
    if pick_best:
        best = int(np.flatnonzero(trained & (objs == best_obj))[0])
        dist.broadcast_(params, root=best)
        return Outcome(picked=best)
    keep = trained.copy()
    if outlier_threshold > 0:
        keep &= objs >= best_obj - outlier_threshold
    dist.average_(params, weight=float(keep[dist.rank]), total_weight=float(keep.sum()))
    return Outcome(excluded=[int(r) for r in np.flatnonzero(trained & ~keep)])
