"""The CuPy stand-in (ngsgd_mpi/standin.py) and the engine run on it.

The stand-in does NumPy's arithmetic behind a device wall, so every result
must be bit-identical to the CPU path, and every host transfer is counted.
The engine tests run under the strict policy (an implicit host read raises)
and pin the design: no device-to-host transfer in a training step except
ng-online's on minibatches that update the Fisher factors -- one for the
whole network, one more when an orthonormality check (O10) is due -- plus
the objective statistics of ``Network.train_gradients``.
A change that adds a host synchronisation fails here.
"""

from __future__ import annotations

import numpy as np
import pytest

from ngsgd_mpi import backend, checkpoint, costs, standin
from ngsgd_mpi.distributed import Dist
from ngsgd_mpi.network import Network, NetworkConfig
from ngsgd_mpi.ng_online import OnlineNaturalGradient
from ngsgd_mpi.ng_simple import leave_one_out, precondition_simple
from ngsgd_mpi.optim import OptimizerConfig, make_updater

# Hidden 400-wide affine outputs with 21-wide inputs at N = 64: the online
# output side is factored there (costs.use_factored_output), formed on the last layer.
NET = NetworkConfig(input_dim=20, num_classes=9, num_hidden_layers=2, pnorm_input_dim=400,
                    pnorm_output_dim=40)
N = 64


@pytest.fixture
def device():
    backend.use_device("standin")
    standin.reset_counters()
    try:
        with standin.implicit_syncs("raise"):
            yield standin.xp
    finally:
        backend.use_device("cpu")


def transfers(before):
    """Device-to-host transfers since the ``before`` snapshot."""
    return standin.counters().to_host - before.to_host


# ---------------------------------------------------------------------- the wall

def test_implicit_host_reads_raise_or_are_counted(device):
    xp = device
    a = backend.to_device(np.arange(6.0).reshape(2, 3))
    total = a.sum()
    assert isinstance(total, standin.DeviceArray) and total.shape == ()   # reductions stay put
    for read in (lambda: float(total), lambda: bool(total > 0), lambda: total.item(),
                 lambda: int(a[0, 0]), lambda: a[a > 2], lambda: a.tolist()):
        with pytest.raises(standin.ImplicitSync):
            read()
    with standin.implicit_syncs("count"):
        before = standin.counters().implicit_syncs
        assert float(total) == 15.0 and bool(total > 0)
        assert standin.counters().implicit_syncs == before + 2
    for misuse in (lambda: np.asarray(a), lambda: np.sqrt(a), lambda: np.concatenate([a, a]),
                   lambda: a + np.ones(3), lambda: np.ones(3) * a,
                   lambda: xp.einsum("ij->i", a, out=xp.empty(2)),
                   lambda: a.__setitem__((slice(None), 0), np.ones(2))):
        with pytest.raises(TypeError):
            misuse()
    with pytest.raises(AttributeError, match="not provided by the CuPy stand-in"):
        xp.fft                                     # noqa: B018 - an API CuPy may lack
    a[:, 0] = 1.0                                  # scalars and device values are fine
    a[0] = a[1]
    np.testing.assert_array_equal(backend.to_host(a), [[1.0, 4.0, 5.0], [1.0, 4.0, 5.0]])


def test_transfers_are_counted_with_their_bytes(device):
    xp = device
    before = standin.counters()
    host = np.ones((4, 5), np.float32)
    a = backend.to_device(host)
    b = xp.asarray(a)                               # already on the device: no transfer
    host[...] = 2.0                                 # the device copy is separate memory
    assert b is a and backend.is_device_array(a) and not backend.is_device_array(host)
    back = backend.to_host(xp.matmul(a, a.T))
    after = standin.counters()
    assert (after.to_device - before.to_device, after.to_device_bytes - before.to_device_bytes) == (1, 80)
    assert (after.to_host - before.to_host, after.to_host_bytes - before.to_host_bytes) == (1, 64)
    np.testing.assert_array_equal(back, np.full((4, 4), 5.0, np.float32))


def test_spd_inverse_on_the_device_is_the_host_routine(device):
    rng = np.random.default_rng(0)
    R = rng.standard_normal((30, 12))
    S = R.T @ R + np.eye(12)
    before = standin.counters()
    inverse = backend.spd_inverse(backend.to_device(S))
    assert transfers(before) == 0
    np.testing.assert_array_equal(backend.to_host(inverse), backend.spd_inverse(S))


# ---------------------------------------------------------------------- preconditioners

def lowrank(rng, count, rows, dim):
    basis = rng.standard_normal((8, dim))
    return [(rng.standard_normal((rows, 8)) @ basis + 0.3 * rng.standard_normal((rows, dim)))
            .astype(np.float32) for _ in range(count)]


@pytest.mark.parametrize("schedule", ["nnet2", "nnet3"])
@pytest.mark.parametrize("factored", [False, True])
def test_online_preconditioner_matches_numpy_and_transfers_only_to_update(device, schedule, factored):
    host, dev = (OnlineNaturalGradient(6, 4, schedule=schedule) for _ in range(2))
    per_call = []
    for X in lowrank(np.random.default_rng(1), 30, 48, 40):
        expected = host.precondition(X.copy(), row_norms=True, factored=factored)
        before = standin.counters()
        got = dev.precondition(backend.to_device(X), row_norms=True, factored=factored)
        per_call.append((transfers(before), dev.state.t, dev.state.skipped))
        for e, g in zip(expected[::2], got[::2]):           # X̂ (or its parts) and row norms
            for e_part, g_part in zip(e if isinstance(e, tuple) else (e,),
                                      g if isinstance(g, tuple) else (g,)):
                np.testing.assert_array_equal(backend.to_host(g_part), e_part)
        assert float(backend.to_host(got[1])) == expected[1]
    np.testing.assert_array_equal(backend.to_host(dev.state.W), host.state.W)
    # Steady state (after the 10 initial updates): one transfer on updating calls, none otherwise.
    steady = per_call[14:]
    updating = [n for n, t, skipped in steady if n]
    assert updating and all(n in (1, 2) for n in updating)      # 2: an (O10) check was due
    assert len(updating) == len(steady) // 4 + (len(steady) % 4 > 2)


def test_simple_preconditioner_matches_numpy_without_transfers(device):
    rng = np.random.default_rng(2)
    for shape, alpha in (((64, 21), 4.0), ((16, 40), 0.1)):
        R = rng.standard_normal(shape).astype(np.float32)
        before = standin.counters()
        P = precondition_simple(backend.to_device(R), alpha)
        parts = leave_one_out(backend.to_device(R), alpha, form=False)
        assert transfers(before) == 0
        np.testing.assert_array_equal(backend.to_host(P), precondition_simple(R, alpha))
        expected = leave_one_out(R, alpha, form=False)
        for e, g in zip(expected, parts):
            if e is not None:
                np.testing.assert_array_equal(backend.to_host(g), e)


# ---------------------------------------------------------------------- the training step

def batches(count, seed=3):
    rng = np.random.default_rng(seed)
    return [(rng.standard_normal((N, NET.input_dim)).astype(np.float32),
             rng.integers(0, NET.num_classes, N)) for _ in range(count)]


@pytest.mark.parametrize("optimizer,options", [
    ("sgd", {}), ("ng-simple", {}), ("ng-online", {}), ("ng-online", {"ng_schedule": "nnet3"}),
    ("ng-online", {"max_param_change": 0.05}), ("ng-simple", {"max_change": 0.01}),
])
def test_training_step_matches_numpy_and_transfers_only_to_update(device, optimizer, options):
    assert costs.use_factored_output(N, 20, 400, 80) and not costs.use_factored_output(N, 40, 9, 80)
    config = OptimizerConfig(optimizer=optimizer, **options)
    backend.use_device("cpu")
    host = Network(NET, seed=0)
    host.set_input_normalization(np.full(NET.input_dim, 0.1), np.full(NET.input_dim, 2.0))
    backend.use_device("standin")
    dev = Network(NET, params=backend.to_device(host.params))
    dev.set_input_normalization(np.full(NET.input_dim, 0.1), np.full(NET.input_dim, 2.0))
    updaters = [make_updater(host, config), make_updater(dev, config)]
    period = config.update_period
    for k, (X, labels) in enumerate(batches(18)):
        expected = host.train_gradients(X, labels)
        before = standin.counters()
        got = dev.train_gradients(backend.to_device(X), backend.to_device(labels))
        assert transfers(before) == 1                    # the objective statistics
        assert got == expected
        updaters[0].step(0.01)
        before = standin.counters()
        updaters[1].step(0.01)
        moved = transfers(before)
        if optimizer != "ng-online":
            assert moved == 0, k
        elif k >= 11:                                    # past the 10 initial updates
            updating = (k - 9) % period == 0 if config.ng_schedule == "nnet2" else (k - 10) % period == 0
            # the whole network's Fisher updates in one transfer, one more for the (O10) checks
            assert moved in ((1, 2) if updating else (0,)), k
        np.testing.assert_array_equal(backend.to_host(dev.params), host.params)
    assert standin.counters().implicit_syncs == 0


# ---------------------------------------------------------------------- averaging and checkpoints

class TwoRankComm:
    """A fake 2-rank communicator: the other rank holds ``other``."""

    def __init__(self, other):
        self.other = other

    def Get_rank(self):
        return 0

    def Get_size(self):
        return 2

    def Allreduce(self, send, buf, op):
        assert isinstance(buf, np.ndarray), "MPI must see host memory (not CUDA-aware)"
        buf += self.other


def test_averaging_stages_the_flat_buffer_through_the_host_once(device):
    net = Network(NET, seed=0)
    other = np.random.default_rng(4).standard_normal(NET.num_params()).astype(np.float32)
    expected = (backend.to_host(net.params) + other) * np.float32(0.5)
    dist = Dist(comm=TwoRankComm(other), cuda_aware=False)
    before = standin.counters()
    dist.average_(net.params)
    after = standin.counters()
    assert (after.to_host - before.to_host, after.to_device - before.to_device,
            after.stream_syncs - before.stream_syncs) == (1, 1, 1)
    np.testing.assert_array_equal(backend.to_host(net.params), expected)
    assert after.to_host_bytes - before.to_host_bytes == net.params.nbytes


def test_checkpointed_state_resumes_bit_identically_on_the_device(device, tmp_path):
    config = OptimizerConfig(optimizer="ng-online")
    data = batches(20, seed=5)
    net = Network(NET, seed=0)
    updater = make_updater(net, config)

    def train(network, upd, part):
        for X, labels in part:
            network.train_gradients(backend.to_device(X), backend.to_device(labels))
            upd.step(0.01)

    train(net, updater, data[:13])                   # mid update period
    before = standin.counters()
    state = updater.state_dict()
    assert transfers(before) == 2 * len(net.affine_layers)     # each side's W
    checkpoint.save_state(str(tmp_path / "state.h5"), {"optimizer": state})
    params = backend.to_host(net.params)
    train(net, updater, data[13:])

    resumed = Network(NET, params=backend.to_device(params))
    resumed_updater = make_updater(resumed, config)
    resumed_updater.load_state_dict(checkpoint.load_state(str(tmp_path / "state.h5"))["optimizer"])
    train(resumed, resumed_updater, data[13:])
    np.testing.assert_array_equal(backend.to_host(resumed.params), backend.to_host(net.params))
