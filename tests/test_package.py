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


PACKAGE = __import__("pathlib").Path(__file__).resolve().parents[1] / "ngsgd_mpi"


def _modules():
    """{module name: (source, is_package)} of every module of the package."""
    out = {}
    for path in PACKAGE.rglob("*.py"):
        rel = path.relative_to(PACKAGE.parent).with_suffix("")
        is_package = rel.name == "__init__"
        out[".".join(rel.parts[:-1] if is_package else rel.parts)] = (path.read_text(), is_package)
    return out


def _imports(name: str, source: str, is_package: bool) -> set[str]:
    """ngsgd_mpi modules that ``name`` imports (at module level or inside functions)."""
    import ast

    package = name.split(".") if is_package else name.split(".")[:-1]
    found = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = package[:len(package) - node.level + 1] if node.level else []
            module = ".".join(base + ([node.module] if node.module else []))
            found |= {module} | {f"{module}.{a.name}" for a in node.names}
    return {m for m in found if m.startswith("ngsgd_mpi") and m != name}


def _cycles(graph: dict) -> list[list[str]]:
    cycles, state = [], {}

    def visit(node, path):
        state[node] = "open"
        for nxt in sorted(graph[node]):
            if state.get(nxt) == "open":
                cycles.append(path[path.index(nxt):] + [nxt])
            elif nxt not in state:
                visit(nxt, path + [nxt])
        state[node] = "done"

    for name in sorted(graph):
        if name not in state:
            visit(name, [name])
    return cycles


def test_mpi_lives_in_distributed_only():
    offenders = []
    for name, (source, _) in _modules().items():
        if name == "ngsgd_mpi.distributed":
            continue
        for number, line in enumerate(source.splitlines(), 1):
            code = line.split("#")[0]
            if "mpi4py" in code or ".comm." in code or "dist.comm" in code:
                offenders.append(f"{name}:{number}: {line.strip()}")
    assert offenders == []


def test_partition_and_storage_files_are_opened_by_the_data_layer_only():
    allowed = {"ngsgd_mpi.data", "ngsgd_mpi.storage"}
    offenders = [name for name, (source, _) in _modules().items() if name not in allowed and "h5py" in source]
    assert offenders == []


def test_no_import_cycles():
    modules = _modules()
    graph = {name: {m for m in _imports(name, src, pkg) if m in modules and not m.startswith(name + ".")}
             for name, (src, pkg) in modules.items()}
    assert {"ngsgd_mpi.checkpoint", "ngsgd_mpi.faults"} <= graph["ngsgd_mpi.trainer"]   # the graph is real
    assert "ngsgd_mpi.faults" in graph["ngsgd_mpi.kaldi.tables"]                       # relative ..imports
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == [["a", "b", "c", "a"]]      # and cycles are found
    assert _cycles(graph) == []


def test_math_modules_import_no_mpi_and_no_hdf5():
    code = ("import sys\n"
            "import ngsgd_mpi.ng_online, ngsgd_mpi.ng_simple, ngsgd_mpi.layers, ngsgd_mpi.network, "
            "ngsgd_mpi.optim, ngsgd_mpi.options, ngsgd_mpi.schedule, ngsgd_mpi.averaging, ngsgd_mpi.lda\n"
            "print(sorted(m for m in ('mpi4py', 'h5py', 'cupy') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
