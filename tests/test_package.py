import subprocess
import sys

import numpy as np


def test_public_api_is_importable_without_mpi_or_hdf5():
    code = ("import sys, ngsgd_mpi\n"
            "from ngsgd_mpi import OnlineNaturalGradient, precondition_simple, Network, make_updater\n"
            "print(sorted(m for m in ('mpi4py', 'h5py', 'cupy') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_public_api_round_trip():
    from ngsgd_mpi import OnlineNaturalGradient, precondition_simple

    rng = np.random.default_rng(0)
    ng = OnlineNaturalGradient(rank=4)
    X = rng.standard_normal((16, 10)).astype(np.float32)
    X_hat, gamma = ng.precondition(X)
    assert X_hat.shape == X.shape and isinstance(gamma, float)
    np.testing.assert_allclose(np.linalg.norm(gamma * X_hat), np.linalg.norm(X), rtol=1e-5)
    P = precondition_simple(X, 4.0)
    np.testing.assert_allclose(np.linalg.norm(P), np.linalg.norm(X), rtol=1e-5)


def test_only_the_backend_imports_cupy():
    from pathlib import Path

    pkg = Path(__file__).resolve().parents[1] / "ngsgd_mpi"
    offenders = [p.name for p in pkg.rglob("*.py") if p.name != "backend.py"
                 and any(line.strip().startswith(("import cupy", "from cupy"))
                         for line in p.read_text().splitlines())]
    assert offenders == []
