"""What the ranks' models become at the end of a period (Kaldi's safeguards around the average).

* Normally: the average of every rank's parameters (one Allreduce of the flat buffer).
* ``outlier_threshold`` > 0 (nnet3's ``get_successful_models``): ranks whose training
  objective is more than that many nats/frame below the best rank's are left out (weight 0).
* ``pick_best`` (nnet2's iteration 0): no average; every rank takes the parameters of the rank
  with the best training objective.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np


@dataclass
class Outcome:
    picked: int | None = None                           # the rank copied instead of averaging
    excluded: list[int] = field(default_factory=list)   # ranks left out of the average

    @property
    def note(self) -> str | None:
        """For the period's metrics record (None when it was a plain average)."""
        if self.picked is not None:
            return f"picked rank {self.picked} (best training objective) instead of averaging"
        if self.excluded:
            return f"excluded rank(s) {self.excluded} (objective far below the best)"
        return None


def combine_ranks(dist, params, rank_objectives: np.ndarray, pick_best: bool,
                  outlier_threshold: float) -> Outcome:
    """Replace ``params`` (this rank's flat buffer) in place by what every rank agrees on;
    ``rank_objectives`` are all ranks' training objectives (the same on every rank)."""
    objs = np.asarray(rank_objectives, np.float64)
    if pick_best:
        best = int(np.argmax(objs))
        dist.broadcast_(params, root=best)
        return Outcome(picked=best)
    keep = np.ones(len(objs), bool)
    if outlier_threshold > 0:
        keep = objs >= objs.max() - outlier_threshold
    dist.average_(params, weight=float(keep[dist.rank]), total_weight=float(keep.sum()))
    return Outcome(excluded=[int(r) for r in np.flatnonzero(~keep)])
