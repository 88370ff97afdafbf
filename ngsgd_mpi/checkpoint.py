"""Model files and training checkpoints, in HDF5, written atomically, checksummed.

Layout of an output directory::

    out_dir/checkpoints/ckpt-000012/model.h5         averaged model after 12 averages (rank 0)
    out_dir/checkpoints/ckpt-000012/state-r0000.h5   rank 0's optimizer state and data cursor
    out_dir/checkpoints/ckpt-000012/COMPLETE         written last, after every rank's file
    out_dir/checkpoints/ckpt-000012-000031/...       stopped on a signal 31 minibatches into
                                                     period 13 (state files hold each rank's params)
    out_dir/final.h5                                 final model (same format as model.h5)

A model file holds ``params`` (the flat float32 parameter buffer), the
network architecture and training config as JSON attributes, the input
normalisation and the class priors.  A state file holds one flat record of
arrays and scalars.  Every file carries a SHA-256 of its arrays, verified on
load.  Each file is written to a temporary name, flushed to disk and renamed,
so a crash at any moment leaves either the old or the new file; a checkpoint
directory counts only once its COMPLETE marker exists.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
from typing import NamedTuple

import h5py
import numpy as np

MODEL_FORMAT = "ngsgd_mpi.model"
STATE_FORMAT = "ngsgd_mpi.state"
FORMAT_VERSION = 1
_CKPT_RE = re.compile(r"^ckpt-(\d{6})(?:-(\d{6}))?$")


class CheckpointError(ValueError):
    """A missing, partial or corrupt model/checkpoint file (the message names it)."""


def _digest(arrays: dict) -> str:
    h = hashlib.sha256()
    for key in sorted(arrays):
        a = np.ascontiguousarray(arrays[key])
        h.update(f"{key}|{a.dtype.str}|{a.shape}|".encode())
        h.update(a.tobytes())
    return h.hexdigest()


def _write_atomic(path: str, fmt: str, arrays: dict, attrs: dict) -> None:
    tmp = f"{path}.tmp{os.getpid()}"
    try:
        with h5py.File(tmp, "w") as f:
            for key, value in arrays.items():
                f.create_dataset(key, data=np.asarray(value))
            f.attrs.update(format=fmt, format_version=FORMAT_VERSION, sha256=_digest(arrays), **attrs)
            f.flush()
        with open(tmp, "rb") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def _read_verified(path: str, fmt: str) -> tuple[dict, dict]:
    if not os.path.isfile(path):
        raise CheckpointError(f"{path}: file does not exist")
    try:
        with h5py.File(path, "r") as f:
            attrs = dict(f.attrs)
            arrays = {}
            f.visititems(lambda name, obj: arrays.__setitem__(name, obj[()])
                         if isinstance(obj, h5py.Dataset) else None)
    except (OSError, KeyError, RuntimeError) as exc:    # h5py's errors for torn/corrupt files
        raise CheckpointError(f"{path}: unreadable or truncated HDF5 file ({exc})") from None
    if attrs.get("format") != fmt:
        raise CheckpointError(f"{path}: attribute 'format' must be {fmt!r}, got {attrs.get('format')!r}")
    if int(attrs.get("format_version", -1)) != FORMAT_VERSION:
        raise CheckpointError(f"{path}: format_version {attrs.get('format_version')} is not supported")
    if attrs.get("sha256") != _digest(arrays):
        raise CheckpointError(f"{path}: checksum mismatch (file is corrupt)")
    return arrays, attrs


# --------------------------------------------------------------------------- model files

def save_model(path: str, params, network_config: dict, train_config: dict | None = None,
               input_mean=None, input_std=None, class_counts=None, extra_attrs: dict | None = None) -> None:
    """Write a model file (``params`` is a host float32 vector)."""
    arrays = {"params": np.asarray(params, np.float32)}
    if input_mean is not None:
        arrays["input_mean"] = np.asarray(input_mean, np.float32)
        arrays["input_std"] = np.asarray(input_std, np.float32)
    if class_counts is not None:
        counts = np.asarray(class_counts, np.float64)
        arrays["class_counts"] = counts
        arrays["class_priors"] = counts / max(counts.sum(), 1.0)
    attrs = {"network_config": json.dumps(network_config),
             "train_config": json.dumps(train_config or {})}
    attrs.update(extra_attrs or {})
    _write_atomic(path, MODEL_FORMAT, arrays, attrs)


def load_model_file(path: str) -> tuple[dict, dict]:
    """(arrays, attrs) of a verified model file; attrs' JSON fields are decoded."""
    arrays, attrs = _read_verified(path, MODEL_FORMAT)
    if "params" not in arrays:
        raise CheckpointError(f"{path}: dataset 'params' is missing")
    attrs["network_config"] = json.loads(attrs["network_config"])
    attrs["train_config"] = json.loads(attrs["train_config"])
    return arrays, attrs


# --------------------------------------------------------------------------- per-rank state

def save_state(path: str, record: dict, attrs: dict | None = None) -> None:
    """Write a flat record of arrays and scalars (strings go to attributes)."""
    arrays = {k: v for k, v in record.items() if not isinstance(v, str)}
    strings = {f"str:{k}": v for k, v in record.items() if isinstance(v, str)}
    _write_atomic(path, STATE_FORMAT, arrays, {**strings, **(attrs or {})})


def load_state(path: str) -> tuple[dict, dict]:
    """(record, attrs); 0-d arrays come back as Python scalars of the same kind."""
    arrays, attrs = _read_verified(path, STATE_FORMAT)
    record = {k: (v.item() if np.ndim(v) == 0 else v) for k, v in arrays.items()}
    for key in [k for k in attrs if k.startswith("str:")]:
        record[key[4:]] = str(attrs.pop(key))
    return record, attrs


# --------------------------------------------------------------------------- directories

class Checkpoint(NamedTuple):
    period: int       # averages completed
    batch: int        # minibatches into the next period (0: right after an average)
    path: str
    scheduled: bool   # False: written only because training was stopped on a signal


def checkpoint_dir(out_dir: str, period: int, batch: int = 0) -> str:
    name = f"ckpt-{period:06d}" + (f"-{batch:06d}" if batch else "")
    return os.path.join(out_dir, "checkpoints", name)


def state_path(ckpt: str, rank: int) -> str:
    return os.path.join(ckpt, f"state-r{rank:04d}.h5")


def mark_complete(ckpt: str, info: dict) -> None:
    tmp = os.path.join(ckpt, "COMPLETE.tmp")
    with open(tmp, "w") as f:
        json.dump(info, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, os.path.join(ckpt, "COMPLETE"))


def complete_checkpoints(out_dir: str) -> list[Checkpoint]:
    """Every checkpoint with a COMPLETE marker, oldest first."""
    root = os.path.join(out_dir, "checkpoints")
    if not os.path.isdir(root):
        return []
    found = []
    for name in os.listdir(root):
        m = _CKPT_RE.match(name)
        path = os.path.join(root, name)
        if m and os.path.isfile(os.path.join(path, "COMPLETE")):
            scheduled = bool(read_complete_info(path).get("scheduled", True))
            found.append(Checkpoint(int(m.group(1)), int(m.group(2) or 0), path, scheduled))
    return sorted(found)


def averaged_checkpoints(out_dir: str) -> list[Checkpoint]:
    """The scheduled checkpoints taken right after an average (candidates for combination)."""
    return [c for c in complete_checkpoints(out_dir) if c.batch == 0 and c.scheduled]


def read_complete_info(ckpt: str) -> dict:
    with open(os.path.join(ckpt, "COMPLETE")) as f:
        return json.load(f)


def prune(out_dir: str, keep_last_k: int) -> None:
    """Keep the newest ``keep_last_k`` scheduled checkpoints (0 = all) and the newest
    checkpoint of any kind; unscheduled ones are dropped once a newer one exists."""
    found = complete_checkpoints(out_dir)
    scheduled = [c for c in found if c.scheduled]
    keep = set(scheduled[-keep_last_k:] if keep_last_k > 0 else scheduled) | set(found[-1:])
    for ckpt in found:
        if ckpt in keep:
            continue
        os.remove(os.path.join(ckpt.path, "COMPLETE"))   # first un-complete it, then delete
        shutil.rmtree(ckpt.path, ignore_errors=True)


def load_network(path: str):
    """(Network, arrays, attrs) from a model file, with its input normalisation applied."""
    from .network import Network, NetworkConfig  # noqa: PLC0415

    arrays, attrs = load_model_file(path)
    try:
        net_cfg = NetworkConfig.from_dict(attrs["network_config"])
    except (TypeError, ValueError) as exc:
        raise CheckpointError(f"{path}: bad network_config ({exc})") from None
    if arrays["params"].shape != (net_cfg.num_params(),):
        raise CheckpointError(f"{path}: 'params' has {arrays['params'].size} values, the architecture "
                              f"needs {net_cfg.num_params()}")
    network = Network(net_cfg, params=arrays["params"])
    if "input_mean" in arrays:
        network.set_input_normalization(arrays["input_mean"], arrays["input_std"])
    return network, arrays, attrs
