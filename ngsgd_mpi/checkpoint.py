"""Training checkpoints: where they live, how all ranks write one, and how a run resumes.

Layout of an output directory::

    out_dir/checkpoints/ckpt-000012/model.h5         averaged model after 12 averages (rank 0)
    out_dir/checkpoints/ckpt-000012/state-r0000.h5   rank 0's training state (see below)
    out_dir/checkpoints/ckpt-000012/COMPLETE         written last, after every rank's file
    out_dir/checkpoints/ckpt-000012-000031/...       stopped on a signal 31 minibatches into
                                                     period 13 (state files hold each rank's params)
    out_dir/final.h5                                 final model (same format as model.h5)

``model.h5`` is a ``model.Model``; a state file is one nested record (``storage.py``):
``{"optimizer": updater.state_dict(), "progress": {...}, "params": ... (mid-period only)}``.
A checkpoint directory counts only once its COMPLETE marker exists; every file in it is
written atomically and checksummed, so a crash at any moment leaves the previous checkpoint
usable.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from typing import NamedTuple

from . import storage
from .faults import InputError
from .model import Model

STATE_FORMAT = "ngsgd_mpi.state"
MODEL_FILE = "model.h5"
_CKPT_RE = re.compile(r"^ckpt-(\d{6})(?:-(\d{6}))?$")


class CheckpointError(InputError):
    """A checkpoint that cannot be used (the message names it)."""


class Checkpoint(NamedTuple):
    period: int       # averages completed
    batch: int        # minibatches into the next period (0: right after an average)
    path: str
    scheduled: bool   # False: written only because training was stopped on a signal
    num_ranks: int    # how many ranks wrote it

    @property
    def model_path(self) -> str:
        return os.path.join(self.path, MODEL_FILE)


def checkpoint_dir(out_dir: str, period: int, batch: int = 0) -> str:
    name = f"ckpt-{period:06d}" + (f"-{batch:06d}" if batch else "")
    return os.path.join(out_dir, "checkpoints", name)


def state_path(ckpt: str, rank: int) -> str:
    return os.path.join(ckpt, f"state-r{rank:04d}.h5")


def save_state(path: str, record: dict) -> None:
    storage.write(path, STATE_FORMAT, record)


def load_state(path: str) -> dict:
    return storage.read(path, STATE_FORMAT)[0]


def mark_complete(ckpt: str, info: dict) -> None:
    tmp = os.path.join(ckpt, "COMPLETE.tmp")
    with open(tmp, "w") as f:
        json.dump(info, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, os.path.join(ckpt, "COMPLETE"))


def read_complete_info(ckpt: str) -> dict:
    """The COMPLETE marker's record: period, batch, num_ranks, scheduled."""
    path = os.path.join(ckpt, "COMPLETE")
    try:
        with open(path) as f:
            info = json.load(f)
    except (OSError, ValueError) as exc:
        raise CheckpointError(f"{path}: unreadable COMPLETE marker ({exc})") from None
    if not isinstance(info, dict) or not isinstance(info.get("num_ranks"), int) or info["num_ranks"] < 1:
        raise CheckpointError(f"{path}: COMPLETE marker must be a JSON object with num_ranks >= 1")
    return info


def complete_checkpoints(out_dir: str) -> list[Checkpoint]:
    """Every checkpoint with a readable COMPLETE marker, oldest first."""
    root = os.path.join(out_dir, "checkpoints")
    if not os.path.isdir(root):
        return []
    found = []
    for name in os.listdir(root):
        m = _CKPT_RE.match(name)
        path = os.path.join(root, name)
        if m and os.path.isfile(os.path.join(path, "COMPLETE")):
            try:
                info = read_complete_info(path)
            except CheckpointError:
                continue                          # a damaged marker: not a usable checkpoint
            found.append(Checkpoint(int(m.group(1)), int(m.group(2) or 0), path,
                                    bool(info.get("scheduled", True)), info["num_ranks"]))
    return sorted(found)


def averaged_checkpoints(out_dir: str) -> list[Checkpoint]:
    """The scheduled checkpoints taken right after an average (candidates for combination)."""
    return [c for c in complete_checkpoints(out_dir) if c.batch == 0 and c.scheduled]


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


def write(out_dir: str, dist, period: int, batch: int, scheduled: bool, state: dict,
          model: Model | None, keep_last_k: int) -> None:
    """All ranks: rank 0 writes ``model`` (the averaged model), every rank its ``state``,
    then rank 0 the COMPLETE marker.  Returns only when the checkpoint is complete on disk,
    so no rank exits (e.g. with 75) before it is."""
    ckpt = checkpoint_dir(out_dir, period, batch)
    if dist.rank == 0:
        os.makedirs(ckpt, exist_ok=True)
    dist.barrier()
    save_state(state_path(ckpt, dist.rank), state)
    if dist.rank == 0:
        model.save(os.path.join(ckpt, MODEL_FILE))
    dist.barrier()
    if dist.rank == 0:
        mark_complete(ckpt, {"period": period, "batch": batch, "num_ranks": dist.size,
                             "scheduled": scheduled})
        prune(out_dir, keep_last_k)
    dist.barrier()


def resume(out_dir: str, dist, restore, log):
    """``restore(ckpt)`` on every rank for the newest checkpoint that every rank can load.

    ``restore`` raises InputError when its rank cannot use a checkpoint (corrupt,
    truncated, written by an incompatible run); the next older one is then tried, unless
    the problem is ``fatal`` (an architecture mismatch: no older checkpoint will do).
    Returns restore's result, or None when there is no checkpoint at all."""
    found = complete_checkpoints(out_dir)
    for ckpt in reversed(found):
        try:
            return dist.agree(lambda: restore(ckpt))
        except InputError as exc:
            if "architecture" in str(exc):
                raise
            log(f"checkpoint {ckpt.path} is unusable ({'; '.join(str(exc).splitlines())}); "
                f"trying an older one")
    if found:
        raise CheckpointError(f"{out_dir}: no usable checkpoint (all {len(found)} failed to load)")
    return None
