"""Kaldi's safeguards around the average, with three in-process ranks (thread_world)."""

import numpy as np

from ngsgd_mpi import averaging
from thread_world import run_ranks

PARAMS = [np.full(5, v, np.float32) for v in (1.0, 2.0, 6.0)]


def combine(objectives, **kwargs):
    def rank(dist):
        params = PARAMS[dist.rank].copy()
        outcome = averaging.combine_ranks(dist, params, np.array(objectives), **kwargs)
        return params, outcome
    return run_ranks(3, rank)


def test_plain_average_is_the_mean_on_every_rank():
    for params, outcome in combine([-1.0, -1.1, -1.2], pick_best=False, outlier_threshold=0.0):
        np.testing.assert_allclose(params, np.full(5, 3.0))
        assert outcome.note is None


def test_ranks_far_below_the_best_are_left_out():
    results = combine([-1.0, -1.5, -3.0], pick_best=False, outlier_threshold=1.0)
    for params, outcome in results:
        np.testing.assert_allclose(params, np.full(5, 1.5))        # ranks 0 and 1 only
        assert outcome.excluded == [2] and outcome.note.startswith("excluded rank(s) [2]")


def test_pick_best_copies_the_best_rank():
    for params, outcome in combine([-2.0, -1.0, -3.0], pick_best=True, outlier_threshold=1.0):
        np.testing.assert_array_equal(params, PARAMS[1])
        assert outcome.picked == 1 and outcome.note.startswith("picked rank 1")


def test_idle_ranks_take_weight_zero_and_receive_the_average():
    for params, outcome in combine([-1.0, 0.0, -1.2], pick_best=False, outlier_threshold=1.0,
                                   active=(0, 2)):
        np.testing.assert_allclose(params, np.full(5, 3.5))        # ranks 0 and 2 only
        assert outcome.note is None                                # idle is not "excluded"


def test_pick_best_chooses_among_the_active_ranks_only():
    for params, outcome in combine([-2.0, -1.0, -3.0], pick_best=True, outlier_threshold=1.0,
                                   active=(0, 2)):
        np.testing.assert_array_equal(params, PARAMS[0])
        assert outcome.picked == 0


def test_outliers_are_judged_against_the_best_active_rank():
    for params, outcome in combine([-1.0, 5.0, -2.5], pick_best=False, outlier_threshold=1.0,
                                   active=(0, 2)):
        np.testing.assert_allclose(params, PARAMS[0])
        assert outcome.excluded == [2]
