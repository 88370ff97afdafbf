"""backend.py: device selection, counted transfers, the SPD inverse, GEMM accumulation, row dots."""

from __future__ import annotations

import numpy as np
import pytest

from ngsgd_mpi import backend, standin


@pytest.fixture
def restore_cpu():
    yield
    backend.use_device("cpu")


def test_device_selection(restore_cpu, monkeypatch):
    assert backend.device() == "cpu" and backend.xp() is np
    backend.use_device("standin")
    assert backend.device() == "standin" and backend.xp() is standin.xp
    a = backend.to_device(np.ones(3))
    assert backend.array_module(a) is standin.xp and backend.is_device_array(a)
    assert backend.array_module(np.ones(3)) is np          # host arrays stay NumPy's
    backend.use_device("cpu")
    assert backend.array_module(a) is standin.xp           # owned arrays keep their module
    monkeypatch.setenv("NGSGD_GPU_STANDIN", "1")           # whole runs: "gpu" is the stand-in
    backend.use_device("gpu")
    assert backend.device() == "standin"
    with pytest.raises(ValueError, match="device must be one of"):
        backend.use_device("tpu")


def test_transfers_are_counted_for_device_arrays_only(restore_cpu):
    before = backend.transfer_counts()
    backend.to_host(np.ones(4))
    backend.synchronize()
    assert backend.transfer_counts() == before             # NumPy: nothing moves
    backend.use_device("standin")
    a = backend.to_device(np.ones(4))
    backend.to_host(a)
    backend.synchronize()
    after = backend.transfer_counts()
    assert {k: after[k] - before[k] for k in after} == {"to_host": 1, "to_device": 1, "synchronize": 1}


def test_implicit_syncs_forbidden_on_the_standin(restore_cpu):
    backend.use_device("standin")
    total = backend.to_device(np.arange(4.0)).sum()
    with standin.implicit_syncs("count"):
        with backend.implicit_syncs_forbidden():
            with pytest.raises(standin.ImplicitSync):
                float(total)
            assert backend.to_host(total) == 6.0            # the explicit transfer is allowed
        assert float(total) == 6.0


@pytest.mark.parametrize("dtype,tolerance", [(np.float32, 1e-5), (np.float64, 1e-13)])
@pytest.mark.parametrize("n", [1, 7, 300])
def test_spd_inverse(n, dtype, tolerance):
    rng = np.random.default_rng(n)
    R = rng.standard_normal((2 * n + 3, n))
    S = (R.T @ R / len(R) + 0.1 * np.eye(n)).astype(dtype)
    S_copy = S.copy()
    inverse = backend.spd_inverse(S)
    np.testing.assert_array_equal(S, S_copy)                    # input untouched
    assert inverse.dtype == dtype and inverse.flags.c_contiguous
    np.testing.assert_array_equal(inverse, inverse.T)           # exactly symmetric
    reference = np.linalg.inv(S.astype(np.float64))
    assert np.abs(inverse - reference).max() <= tolerance * np.abs(reference).max()


def test_spd_inverse_uses_numpys_lapack_and_rejects_indefinite_matrices():
    assert set(backend._lapack_routines()) == {np.dtype(np.float32), np.dtype(np.float64)}
    with pytest.raises(np.linalg.LinAlgError, match="not positive definite"):
        backend.spd_inverse(np.diag([1.0, -1.0, 2.0]))
    with pytest.raises(ValueError, match="square"):
        backend.spd_inverse(np.ones((2, 3)))


@pytest.mark.parametrize("dtype,tolerance", [(np.float32, 2e-5), (np.float64, 1e-12)])
def test_gemm_accumulates_in_place_for_every_layout(dtype, tolerance, restore_cpu):
    """C <- alpha A B + beta C: through BLAS for C of >= GEMM_MIN_OUTPUT elements
    (C-, Fortran-ordered, strided and transposed operands), through matmul below
    that, for strides BLAS cannot take, and on the device."""
    rng = np.random.default_rng(3)
    A = rng.standard_normal((300, 40)).astype(dtype)
    B = rng.standard_normal((40, 260)).astype(dtype)
    wide = rng.standard_normal((300, 50)).astype(dtype)
    operands_A = [A, np.asfortranarray(A), wide[:, 5:45], rng.standard_normal((40, 300)).astype(dtype).T,
                  rng.standard_normal((300, 80)).astype(dtype)[:, ::2]]          # last: no unit stride
    operands_B = [B, np.asfortranarray(B), rng.standard_normal((40, 270)).astype(dtype)[:, 3:263]]
    for a in operands_A:
        for b in operands_B:
            for alpha, beta in ((1.0, 1.0), (-1.0, 1.0), (0.5, 0.0), (2.0, 0.25)):
                C = rng.standard_normal((300, 260)).astype(dtype)
                expected = alpha * (a.astype(np.float64) @ b) + beta * C
                assert backend.gemm(alpha, a, b, beta, C) is C
                np.testing.assert_allclose(C, expected, rtol=tolerance, atol=tolerance * 40)
    assert backend._blas_gemm() and 300 * 260 >= backend.GEMM_MIN_OUTPUT
    small = np.ones((4, 5), dtype)
    backend.gemm(1.0, np.ones((4, 3), dtype), np.ones((3, 5), dtype), 1.0, small)   # below the threshold
    np.testing.assert_array_equal(small, 4.0)
    backend.use_device("standin")
    C = backend.to_device(np.ones((300, 260), dtype))
    backend.gemm(-1.0, backend.to_device(A), backend.to_device(B), 1.0, C)
    np.testing.assert_allclose(backend.to_host(C), 1.0 - A.astype(np.float64) @ B, rtol=tolerance,
                               atol=tolerance * 40)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_row_dots(dtype, restore_cpu):
    rng = np.random.default_rng(5)
    A = rng.standard_normal((37, 301)).astype(dtype)
    B = rng.standard_normal((37, 301)).astype(dtype)
    rows = backend.row_dots(A, B)
    assert rows.dtype == dtype and rows.shape == (37,)
    np.testing.assert_allclose(rows, np.einsum("ij,ij->i", A.astype(np.float64), B),
                               rtol=1e-5 if dtype == np.float32 else 1e-12, atol=1e-4)
    np.testing.assert_allclose(backend.row_dots(A[:, ::2], A[:, ::2]),     # strided views too
                               np.einsum("ij,ij->i", A[:, ::2].astype(np.float64), A[:, ::2]),
                               rtol=1e-5 if dtype == np.float32 else 1e-12)
    backend.use_device("standin")                       # the device path: the host routine
    device_rows = backend.row_dots(backend.to_device(A), backend.to_device(B))
    assert backend.array_module(device_rows) is standin.xp
    np.testing.assert_array_equal(backend.to_host(device_rows), rows)
