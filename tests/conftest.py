"""Shared test helpers: where the Kaldi golden vectors live and how to read them.

The goldens are not in the repo; CI clones it with ``../shared`` beside it.
"""

from __future__ import annotations

import importlib
import json
from pathlib import Path

import numpy as np
import pytest

# The Kaldi wheels' shared libraries deadlock in their static initialisers when kaldi-hmm-gmm (a
# test oracle) or kaldifst is loaded after kaldilm: load them once, in the one order that works,
# before any test module imports one of them (kaldi.fst.decoding_modules keeps the same order).
for _name in ("kaldifst", "kaldi_hmm_gmm", "kaldilm"):
    try:
        importlib.import_module(_name)
    except ImportError:
        pass

GOLDEN_DIR = Path(__file__).resolve().parents[1].parent / "shared/reference/golden"


def golden_names(prefix: str) -> list[str]:
    """Case names (file stems) of every golden file starting with ``prefix``;
    fails loudly if the golden directory is missing, so tests cannot silently
    collect nothing."""
    if not GOLDEN_DIR.is_dir():
        raise FileNotFoundError(f"golden vectors not found at {GOLDEN_DIR}")
    names = sorted(path.stem for path in GOLDEN_DIR.glob(f"{prefix}*.npz"))
    if not names:
        raise FileNotFoundError(f"no {prefix}*.npz golden files in {GOLDEN_DIR}")
    return names


def load_golden(name: str) -> tuple[dict, dict[str, np.ndarray]]:
    """``(config, arrays)`` of one golden case; arrays are read eagerly."""
    with np.load(GOLDEN_DIR / f"{name}.npz") as npz:
        arrays = {key: npz[key] for key in npz.files}
    return json.loads(str(arrays.pop("config_json"))), arrays


@pytest.fixture(scope="session")
def golden_dir() -> Path:
    return GOLDEN_DIR
