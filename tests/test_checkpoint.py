import os

from ngsgd_mpi import checkpoint


def test_complete_marker_and_pruning(tmp_path):
    out = str(tmp_path)
    for period, batch, scheduled in ((1, 0, True), (2, 0, True), (2, 7, False), (3, 0, False), (4, 0, True)):
        d = checkpoint.checkpoint_dir(out, period, batch)
        os.makedirs(d)
        if period != 4:                          # period 4 never completed (crash mid-write)
            checkpoint.mark_complete(d, {"period": period, "num_ranks": 1, "scheduled": scheduled})
    found = checkpoint.complete_checkpoints(out)
    assert [(c.period, c.batch, c.scheduled) for c in found] == [
        (1, 0, True), (2, 0, True), (2, 7, False), (3, 0, False)]
    assert [c.period for c in checkpoint.averaged_checkpoints(out)] == [1, 2]
    checkpoint.prune(out, 1)
    # newest scheduled and newest overall survive; the superseded unscheduled one goes
    assert [(c.period, c.batch) for c in checkpoint.complete_checkpoints(out)] == [(2, 0), (3, 0)]
    assert not os.path.exists(checkpoint.checkpoint_dir(out, 1))
    assert not os.path.exists(checkpoint.checkpoint_dir(out, 2, 7))


def test_a_damaged_complete_marker_does_not_count(tmp_path):
    out = str(tmp_path)
    for period in (1, 2):
        d = checkpoint.checkpoint_dir(out, period)
        os.makedirs(d)
        checkpoint.mark_complete(d, {"period": period, "num_ranks": 2})
    open(os.path.join(checkpoint.checkpoint_dir(out, 2), "COMPLETE"), "w").close()    # emptied
    assert [(c.period, c.num_ranks) for c in checkpoint.complete_checkpoints(out)] == [(1, 2)]
