"""Training checkpoints: where they live, how all ranks write one, and how a run resumes.

Layout of an output directory::

    out_dir/checkpoints/ckpt-000012/model.h5         averaged model after 12 averages (rank 0)
    out_dir/checkpoints/ckpt-000012/state-r0000.h5   rank 0's training state (see below)
    out_dir/checkpoints/ckpt-000012/COMPLETE         written last, after every rank's file
    out_dir/checkpoints/ckpt-000012-000031/...       stopped on a signal 31 minibatches into
                                                     period 13 (state files hold each rank's params)
    out_dir/final.h5                                 final model (same format as model.h5)
    out_dir/RUN                                      the run id (JSON), written when the run starts

``model.h5`` is a ``model.Model``; a state file is one nested record (``storage.py``):
``{"optimizer": updater.state_dict(), "progress": {...}, "params": ... (mid-period only)}``.
A checkpoint directory counts only once its COMPLETE marker exists; every file in it is
written atomically and checksummed, so a crash at any moment leaves the previous checkpoint
usable.

Ownership of the output directory (:func:`check_out_dir` before anything is written,
:func:`claim_out_dir` once every input is checked): one run per directory.  A new run needs
an ``out_dir`` without an earlier run's files (:data:`RUN_FILES`; a log file or anything
else of the user's may be there and is left alone); ``--resume`` continues the run in it;
``--overwrite`` deletes the earlier run's files first.  While a run is active,
rank 0 holds an advisory lock on the directory, so a second job is refused instead of
interleaving its files.  Claiming collects what a killed run left: temp files
(``*.tmp<pid>``) and checkpoint directories without COMPLETE (torn writes, half-pruned).
Every COMPLETE marker records the run id; a checkpoint of another run is ignored.
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import re
import shutil
import socket
import time
import uuid
from typing import NamedTuple

from . import storage
from .faults import AgreedInputError, InputError
from .model import Model

STATE_FORMAT = "ngsgd_mpi.state"
MODEL_FILE = "model.h5"
RUN_FILE = "RUN"
_CKPT_RE = re.compile(r"^ckpt-(\d{6})(?:-(\d{6}))?$")
_TEMP_RE = re.compile(r"\.tmp\d*$")          # storage.write's and the writers' temp names


class CheckpointError(InputError):
    """A checkpoint that cannot be used (the message names it); an older one may do."""


class MismatchError(CheckpointError):
    """A checkpoint written with another configuration: no older checkpoint of the run will do."""


class RankCountError(CheckpointError):
    """A mid-period checkpoint of another number of ranks: usable only with that number."""


class OutDirError(InputError):
    """The output directory cannot be used for this run (the message says what to do)."""


class Checkpoint(NamedTuple):
    period: int       # averages completed
    batch: int        # minibatches into the next period (0: right after an average)
    path: str
    scheduled: bool   # False: written only because training was stopped on a signal
    num_ranks: int    # how many ranks wrote it

    @property
    def model_path(self) -> str:
        return os.path.join(self.path, MODEL_FILE)


# ----------------------------------------------------------------------------- the out_dir

def read_run_id(out_dir: str) -> str | None:
    """The run id in ``out_dir/RUN`` (None: no readable RUN file)."""
    try:
        with open(os.path.join(out_dir, RUN_FILE), encoding="utf-8") as f:
            run_id = json.load(f).get("run_id")
    except (OSError, ValueError, AttributeError):
        return None
    return run_id if isinstance(run_id, str) else None


RUN_FILES = (RUN_FILE, "checkpoints", "metrics.jsonl", "final.h5", "combined.h5")   # what a run writes


def run_files(out_dir: str) -> list[str]:
    """The names in ``out_dir`` that a run wrote (logs and other files are not a run)."""
    return [name for name in RUN_FILES if os.path.lexists(os.path.join(out_dir, name))]


def check_out_dir(out_dir: str, resume: bool, overwrite: bool) -> None:
    """OutDirError unless ``out_dir`` can be this run's output directory.  Writes nothing."""
    where = f"option out_dir: {out_dir}"
    if os.path.exists(out_dir) and not os.path.isdir(out_dir):
        raise OutDirError(f"{where} exists and is not a directory")
    existing = out_dir
    while not os.path.exists(existing):                 # the directory that would hold it
        existing = os.path.dirname(os.path.abspath(existing))
    if not os.path.isdir(existing):
        raise OutDirError(f"{where} cannot be created: {existing} is a file")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise OutDirError(f"{where}: {existing} is not writable (read-only file system or no permission)")
    found = run_files(out_dir) if existing == out_dir else []
    if found and not (resume or overwrite):
        raise OutDirError(f"{where} holds an earlier run ({', '.join(found)}; "
                          f"{len(complete_checkpoints(out_dir))} checkpoint(s)): continue it with --resume, "
                          f"delete it and start over with --overwrite, or choose another out_dir")


def claim_out_dir(out_dir: str, resume: bool, overwrite: bool, log) -> str:
    """Rank 0, once every input is checked: make ``out_dir`` this run's (create it, lock it,
    delete an earlier run for --overwrite, collect what a killed run left); returns the run id."""
    try:
        os.makedirs(out_dir, exist_ok=True)
        _lock(out_dir)
        if overwrite and run_files(out_dir):
            for name in run_files(out_dir):
                path = os.path.join(out_dir, name)
                if os.path.isdir(path) and not os.path.islink(path):
                    shutil.rmtree(path)
                else:
                    os.remove(path)
            log(f"--overwrite: deleted the earlier run in {out_dir}")
        collect_orphans(out_dir, log)
        run_id = read_run_id(out_dir) if resume else None
        if run_id is None:
            run_id = uuid.uuid4().hex
            _write_json(os.path.join(out_dir, RUN_FILE), {"run_id": run_id, "started": time.time(),
                                                          "host": socket.gethostname(), "pid": os.getpid()})
    except OSError as exc:
        raise OutDirError(f"option out_dir: {out_dir}: cannot write there ({exc.strerror or exc})") from None
    return run_id


_LOCKS: dict[str, int] = {}     # out_dir -> the open descriptor holding its lock


def _lock(out_dir: str) -> None:
    if os.path.realpath(out_dir) in _LOCKS:
        return
    fd = os.open(out_dir, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as exc:
        os.close(fd)
        if exc.errno in (errno.EWOULDBLOCK, errno.EAGAIN):
            raise OutDirError(f"option out_dir: {out_dir} is in use by another ngsgd-train "
                              f"(run {read_run_id(out_dir)}); wait for it or choose another out_dir") from None
        return                                 # no advisory locks on this file system
    _LOCKS[os.path.realpath(out_dir)] = fd


def release_out_dir(out_dir: str) -> None:
    """Drop the lock of :func:`claim_out_dir` (the end of the process drops it too)."""
    fd = _LOCKS.pop(os.path.realpath(out_dir), None)
    if fd is not None:
        os.close(fd)


def collect_orphans(out_dir: str, log) -> None:
    """Delete the temp files and the checkpoint directories without COMPLETE that a killed run
    left behind (rank 0 holds the directory's lock: no one else is writing)."""
    removed = []
    ckpts = os.path.join(out_dir, "checkpoints")
    own = [(out_dir, None, [f for f in os.listdir(out_dir) if os.path.isfile(os.path.join(out_dir, f))])]
    for root, _, files in [*own, *os.walk(ckpts)]:              # not the user's other directories
        for name in files:
            if _TEMP_RE.search(name):
                removed.append(os.path.join(root, name))
                os.remove(removed[-1])
    for name in sorted(os.listdir(ckpts)) if os.path.isdir(ckpts) else []:
        path = os.path.join(ckpts, name)
        if _CKPT_RE.match(name) and not os.path.isfile(os.path.join(path, "COMPLETE")):
            shutil.rmtree(path, ignore_errors=True)
            removed.append(path + "/")
    if removed:
        log(f"collected {len(removed)} leftover(s) of an interrupted run: "
            + ", ".join(os.path.relpath(p, out_dir) for p in removed[:5]) + (" ..." if len(removed) > 5 else ""))


def _write_json(path: str, record: dict) -> None:
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(record, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


# ----------------------------------------------------------------------------- checkpoints

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
    _write_json(os.path.join(ckpt, "COMPLETE"), info)


def read_complete_info(ckpt: str) -> dict:
    """The COMPLETE marker's record: period, batch, num_ranks, scheduled."""
    path = os.path.join(ckpt, "COMPLETE")
    try:
        with open(path) as f:
            info = json.load(f)
    except (OSError, ValueError) as exc:
        raise CheckpointError(f"{path}: unreadable COMPLETE marker ({exc})") from None
    if not isinstance(info, dict) or type(info.get("num_ranks")) is not int or info["num_ranks"] < 1:
        raise CheckpointError(f"{path}: COMPLETE marker must be a JSON object with num_ranks >= 1")
    return info


def complete_checkpoints(out_dir: str) -> list[Checkpoint]:
    """Every checkpoint of this out_dir's run with a readable COMPLETE marker, oldest first."""
    root = os.path.join(out_dir, "checkpoints")
    if not os.path.isdir(root):
        return []
    run_id = read_run_id(out_dir)
    found = []
    for name in os.listdir(root):
        m = _CKPT_RE.match(name)
        path = os.path.join(root, name)
        if m and os.path.isfile(os.path.join(path, "COMPLETE")):
            try:
                info = read_complete_info(path)
            except CheckpointError:
                continue                          # a damaged marker: not a usable checkpoint
            if run_id and info.get("run_id", run_id) != run_id:
                continue                          # another run's (copied in by hand)
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
    dist.barrier(f"the checkpoint barrier before writing {ckpt}")
    save_state(state_path(ckpt, dist.rank), state)
    if dist.rank == 0:
        model.save(os.path.join(ckpt, MODEL_FILE))
    dist.barrier(f"the checkpoint barrier after every rank wrote {ckpt}")
    if dist.rank == 0:
        mark_complete(ckpt, {"period": period, "batch": batch, "num_ranks": dist.size,
                             "scheduled": scheduled, "run_id": read_run_id(out_dir)})
        prune(out_dir, keep_last_k)
    dist.barrier(f"the checkpoint barrier after {ckpt} was marked complete")


def resume(out_dir: str, dist, restore, log):
    """``restore(ckpt)`` on every rank for the newest checkpoint that every rank can load.

    ``restore`` raises CheckpointError when its rank cannot use a checkpoint (corrupt,
    truncated, written by an incompatible run); the next older one is then tried, unless it
    is a MismatchError (another configuration: no older checkpoint will do).  Returns
    restore's result, or None when no checkpoint is usable: the run starts over, and the
    unusable ones are first set aside as ``<name>.unusable`` so that nothing of them mixes
    with the new checkpoints."""
    found, unusable = complete_checkpoints(out_dir), []
    for ckpt in reversed(found):
        try:
            return dist.agree(lambda: restore(ckpt), "the choice of the checkpoint to resume from")
        except AgreedInputError as exc:
            if exc.raised(MismatchError):
                raise
            log(f"checkpoint {ckpt.path} is unusable ({'; '.join(str(exc).splitlines())}); "
                f"trying an older one")
            unusable.append((ckpt, exc))
    for ckpt, exc in unusable:
        if exc.raised(RankCountError):              # not damaged: the wrong number of ranks

            def refuse(ckpt=ckpt):
                raise RankCountError(f"{ckpt.path}: no checkpoint fits {dist.size} ranks; this one is "
                                     f"mid-period, written by {ckpt.num_ranks}: resume with "
                                     f"{ckpt.num_ranks} ranks")
            dist.agree(refuse, "the choice of the checkpoint to resume from")
    if dist.rank == 0:
        for ckpt, _ in unusable:
            aside, n = f"{ckpt.path}.unusable", 1
            while os.path.exists(aside):                    # set aside before, by an earlier resume
                aside, n = f"{ckpt.path}.unusable{n}", n + 1
            os.rename(ckpt.path, aside)
            log(f"set aside {ckpt.path} as {os.path.basename(aside)}")
    dist.barrier("the barrier after setting unusable checkpoints aside")
    return None
