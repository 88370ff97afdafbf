"""The schedule (schedule.py): the job ramp against Kaldi's formula, who is active, growth and
pick-best periods, the learning rate."""

import math

import pytest

from ngsgd_mpi.options import TrainConfig
from ngsgd_mpi.schedule import Plan


def plan(ranks, **opts):
    base = dict(train_data="x", minibatch_size=100, samples_per_average=1000, total_samples=0,
                num_epochs=1.0, lr_initial=0.01, lr_final=0.001)
    return Plan.make(TrainConfig(**{**base, **opts}), ranks, corpus_frames=opts.pop("frames", 200_000))


def periods(p):
    out, samples = [], 0
    while samples < p.total_samples:
        period = p.period(len(out), samples)
        out.append(period)
        samples += len(period.active) * p.frames_per_period
    return out, samples


def test_no_ramp_is_every_rank_every_period():
    p = plan(4)
    runs, samples = periods(p)
    assert all(r.active == (0, 1, 2, 3) for r in runs)
    assert len(runs) == p.num_periods(0, 0) == 50 and samples == 200_000
    assert all(r.lr_per_rank == pytest.approx(4 * r.lr) for r in runs)
    assert not any(r.pick_best or r.grows for r in runs)


def test_ramp_follows_kaldis_linear_rise_in_jobs():
    """accel2: J_x = int(0.5 + J0 + (J1 - J0) x / n), n = 2 * work / (J0 + J1)."""
    p = plan(16, ranks_initial=1, total_samples=1000 * 8 * 85)          # n = 85 * 8 * 2 / 17 = 80
    runs, samples = periods(p)
    n = 2 * 85 * 8 // 17
    assert abs(len(runs) - n) <= 2
    kaldi = [int(0.5 + 1 + 15 * x / n) for x in range(len(runs))]
    assert max(abs(len(r.active) - k) for r, k in zip(runs, kaldi)) <= 1
    assert len(runs[0].active) == 1 and len(runs[-1].active) == 16
    assert all(len(a.active) <= len(b.active) for a, b in zip(runs, runs[1:]))
    assert samples - p.total_samples < 16 * p.frames_per_period       # at most one period over
    # the n-times rule with the current number of jobs
    assert all(r.lr_per_rank == pytest.approx(len(r.active) * r.lr) for r in runs)


def test_active_ranks_rotate_so_every_partition_is_used_alike():
    p = plan(8, ranks_initial=2)
    runs, _ = periods(p)
    per_rank = [sum(rank in r.active for r in runs) for rank in range(8)]
    assert max(per_rank) - min(per_rank) <= 1
    assert runs[0].active == (0, 1) and runs[1].active == (2, 3)
    assert all(len(set(r.active)) == len(r.active) for r in runs)


def test_resuming_on_another_rank_count_continues_the_ramp_from_the_samples_done():
    p4, p8 = plan(4, ranks_initial=1), plan(8, ranks_initial=1)
    half = p4.total_samples // 2
    mid = (half + 6 * p8.frames_per_period / 2) / p8.total_samples              # (R3), J1 = 8
    assert len(p8.period(10, half).active) == round(math.sqrt(1 + mid * 63)) == 6
    assert p8.num_periods(10, half) == 10 + len(p8.starts(half))


def test_learning_rate_decays_geometrically_in_samples_from_first_to_last_period():
    p = plan(16, ranks_initial=2)
    runs, _ = periods(p)
    assert runs[0].lr == pytest.approx(0.01) and runs[-1].lr == pytest.approx(0.001)
    assert runs[-1].last and not any(r.last for r in runs[:-1])
    last = runs[-1].samples_before
    for r in runs:
        assert r.lr == pytest.approx(0.01 * 0.1 ** (r.samples_before / last))


def test_growth_and_pick_best_periods():
    p = plan(2, num_hidden_layers=3, add_layers_period=2, first_period_pick_best=True)
    runs, _ = periods(p)
    assert [r.hidden_layers for r in runs[:6]] == [1, 1, 2, 2, 3, 3]
    assert [r.index for r in runs if r.grows] == [2, 4]                 # accel2: x % period == 0
    assert [r.index for r in runs if r.pick_best] == [0, 2, 4]
    assert [p.minibatch_for(r) for r in runs[:3]] == [50, 100, 50]       # halved when picking
    averaged = plan(2, num_hidden_layers=3, add_layers_period=2, pick_best_after_growth=False)
    assert not any(r.pick_best for r in periods(averaged)[0])
    no_growth = plan(2, num_hidden_layers=3)
    assert all(r.hidden_layers == 3 and not r.pick_best for r in periods(no_growth)[0])
    assert plan(2, num_hidden_layers=1, add_layers_period=2).add_layers_period == 0
