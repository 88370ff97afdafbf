"""Kaldi's feature pipelines in NumPy: ``apply-cmvn`` and ``add-deltas``.

Both follow Kaldi's code (``transform/cmvn.cc``, ``feat/feature-functions.cc``)
down to where it rounds to float32, so results agree with the binaries to the
last bit or two (BLAS in Kaldi may fuse a multiply-add where NumPy rounds twice).

CMVN statistics of a speaker are a 2 x (D + 1) double matrix: row 0 holds
``sum_t x_t`` and the frame count in its last column, row 1 ``sum_t x_t^2``
(``compute-cmvn-stats``).  With ``n`` the count (C1)::

    mean = stats[0, :D] / n
    norm_means only:       x <- x + float(float(-1 / n) * stats[0, :D])
    norm_means, norm_vars: var = max(stats[1, :D] / n - mean^2, 1e-20)
                           x <- x * float(1 / sqrt(var)) + float(-mean / sqrt(var))

Deltas of order k use the window filter ``w_k = w_{k-1} * [-W..W] / sum j^2``
(a convolution), ``w_0 = [1]``; output block k of frame t is (D1)::

    y_k(t) = sum_j w_k[j] x(clamp(t + j, 0, T - 1))      (edge frames repeated)
"""

from __future__ import annotations

import numpy as np

from ngsgd_mpi.faults import InputError

VARIANCE_FLOOR = 1.0e-20


class CmvnError(InputError):
    """Statistics or options that apply-cmvn would refuse."""


def parse_cmvn_opts(text: str, where: str = "cmvn_opts") -> tuple[bool, bool]:
    """(norm_means, norm_vars) of a ``cmvn_opts`` file's options (empty: Kaldi's
    defaults, means only).  Accepts ``--norm-means[=true|false]`` and ``--norm-vars[=...]``."""
    norm_means, norm_vars = True, False
    for option in text.split():
        name, _, value = option.partition("=")
        if name not in ("--norm-means", "--norm-vars"):
            raise CmvnError(f"{where}: unsupported option {option!r} (only --norm-means, --norm-vars)")
        if value not in ("", "true", "false"):
            raise CmvnError(f"{where}: {name} takes true or false, got {value!r}")
        flag = value != "false"
        if name == "--norm-means":
            norm_means = flag
        else:
            norm_vars = flag
    if norm_vars and not norm_means:
        raise CmvnError(f"{where}: --norm-vars=true needs --norm-means=true (as apply-cmvn)")
    return norm_means, norm_vars


def apply_cmvn(feats: np.ndarray, stats: np.ndarray, norm_means: bool = True,
               norm_vars: bool = False) -> np.ndarray:
    """float32 features normalised with one speaker's statistics, equation (C1)."""
    x = np.asarray(feats, dtype=np.float32)
    stats = np.asarray(stats, dtype=np.float64)
    if x.ndim != 2:
        raise CmvnError(f"features must be a matrix, got shape {x.shape}")
    dim = x.shape[1]
    if stats.ndim != 2 or not 1 <= stats.shape[0] <= 2 or stats.shape[1] != dim + 1:
        raise CmvnError(f"CMVN stats of shape {stats.shape} do not fit {dim}-dim features "
                        f"(expected 2 x {dim + 1})")
    if norm_vars and not norm_means:
        raise CmvnError("variance normalisation needs mean normalisation (as apply-cmvn)")
    if not norm_means:
        return x.copy()
    if norm_vars and stats.shape[0] != 2:
        raise CmvnError("variance normalisation requested but the stats have no variance row")
    count = stats[0, dim]
    if not count >= 1.0:
        raise CmvnError(f"insufficient CMVN stats: count = {count}")
    if not norm_vars:
        # Vector<float>::AddVec(float alpha, Vector<double>): alpha rounded to float first
        offset = (np.float64(np.float32(-1.0 / count)) * stats[0, :dim]).astype(np.float32)
        return x + offset
    mean = stats[0, :dim] / count
    var = np.maximum(stats[1, :dim] / count - mean * mean, VARIANCE_FLOOR)
    scale = 1.0 / np.sqrt(var)
    return x * scale.astype(np.float32) + (-(mean * scale)).astype(np.float32)


def delta_windows(order: int = 2, window: int = 2) -> list[np.ndarray]:
    """The float32 filters w_0..w_order of (D1), built as DeltaFeatures does."""
    if not 0 <= order < 1000 or not 0 < window < 1000:
        raise ValueError(f"delta order must be in [0, 1000) and window in (0, 1000), got {order}, {window}")
    scales = [np.ones(1, np.float32)]
    normalizer = np.float32(sum(j * j for j in range(-window, window + 1)))
    for _ in range(order):
        prev = scales[-1]
        cur = np.zeros(len(prev) + 2 * window, np.float32)
        half = (len(prev) - 1) // 2
        for j in range(-window, window + 1):
            for k in range(-half, half + 1):
                cur[j + k + half + window] += np.float32(j) * prev[k + half]
        scales.append((cur * np.float32(1.0 / normalizer)).astype(np.float32))
    return scales


def add_deltas(feats: np.ndarray, order: int = 2, window: int = 2) -> np.ndarray:
    """(T, D * (order + 1)) float32: features and their deltas, equation (D1)."""
    x = np.asarray(feats, dtype=np.float32)
    if x.ndim != 2:
        raise ValueError(f"features must be a matrix, got shape {x.shape}")
    num_frames, dim = x.shape
    out = np.zeros((num_frames, dim * (order + 1)), np.float32)
    frames = np.arange(num_frames)
    for k, scales in enumerate(delta_windows(order, window)):
        block = out[:, k * dim:(k + 1) * dim]
        half = (len(scales) - 1) // 2
        for j in range(-half, half + 1):
            if scales[j + half] != 0:
                block += scales[j + half] * x[np.clip(frames + j, 0, num_frames - 1)]
    return out
