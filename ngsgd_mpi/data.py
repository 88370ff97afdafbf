"""Training data: the HDF5 partition format, its writer, and the per-rank minibatch stream.

Format (version 2, see docs/data-format.md) -- one HDF5 file per partition:

    feats        (T, F) float16|float32, chunked by rows  un-spliced frames
    labels       (T,)   int32                             class id per frame
    utt_offsets  (U+1,) int64                             utterance u = frames [o[u], o[u+1])
    utt_ids      (U,)   utf-8 strings
    class_counts (C,)   int64   label histogram of this file  (for priors)
    feat_sum     (F,)   float64 sum of frames                (for mean/variance)
    feat_sumsq   (F,)   float64 sum of squared frames
    attrs: format="ngsgd_mpi.partition", format_version=2, feat_dim, num_classes,
           num_frames, num_utts, partition_index, num_partitions, role ("train"|"valid"),
           dataset_id (the same for every partition of one preparation; new in version 2)

Every dataset is stored plainly inside the file (no compression, links or external storage):
:func:`open_partition` refuses anything else before reading more than the header, and a
training set must be one preparation's partitions, each once (:func:`check_partition_set`).

Statistics are stored per file so that ranks can sum them with one Allreduce
instead of anyone reading the whole corpus.

Minibatch stream (one per rank).  The rank's utterances are cut into
*windows* of whole consecutive utterances (about ``window_frames`` frames,
read as one contiguous slice: HDF5 chunks, never per-row fancy indexing).
Epoch e visits the windows in an order shuffled by (seed, e, rank) and the
frames of each window in an order shuffled the same way.  The epoch's frames
form one stream; minibatch k is frames [k*B, (k+1)*B) of the endless
concatenation of epochs, so the position ``(epoch, frame_in_epoch)`` is a
complete cursor for resuming.  Context splicing (offsets -L..R) happens at
batch time by index arithmetic, with frames outside an utterance replaced by
its first/last frame.  Only one window per reader (plus the prefetch queue)
is in memory, so a partition larger than RAM still trains.
"""

from __future__ import annotations

import glob
import os
import queue
import re
import threading
import uuid
from dataclasses import dataclass
from typing import NamedTuple

import h5py
import numpy as np

from . import storage
from .faults import InputError

FORMAT_NAME = "ngsgd_mpi.partition"
FORMAT_VERSION = 2        # 2: + dataset_id (version 1 files are read, but not trained on)


class DataError(InputError):
    """Bad training data; the message names the file and what was expected."""


# --------------------------------------------------------------------------- writing

class PartitionWriter:
    """Append utterances to a new partition file, written atomically.

    Usage::

        with PartitionWriter(path, feat_dim=40, num_classes=2000) as w:
            w.add("utt1", feats, labels)

    The file appears under ``path`` only when the ``with`` block ends without
    an exception (temp file + rename), so readers never see a partial file.
    """

    def __init__(self, path, feat_dim: int, num_classes: int, partition_index: int = 0,
                 num_partitions: int = 1, role: str = "train", dtype=np.float16,
                 chunk_rows: int = 4096, dataset_id: str | None = None):
        if role not in ("train", "valid"):
            raise ValueError(f"role must be 'train' or 'valid', got {role!r}")
        self.path = os.fspath(path)
        # the preparation's id: every partition of one set carries the same one (pass it)
        self.dataset_id = dataset_id or new_dataset_id()
        self.feat_dim, self.num_classes = int(feat_dim), int(num_classes)
        self._tmp = f"{self.path}.tmp{os.getpid()}"
        self._file = h5py.File(self._tmp, "w")
        f = self._file
        f.attrs.update(format=FORMAT_NAME, format_version=FORMAT_VERSION, feat_dim=self.feat_dim,
                       num_classes=self.num_classes, partition_index=int(partition_index),
                       num_partitions=int(num_partitions), role=role, dataset_id=self.dataset_id)
        self._feats = f.create_dataset("feats", (0, self.feat_dim), dtype=dtype,
                                       maxshape=(None, self.feat_dim),
                                       chunks=(chunk_rows, self.feat_dim))
        self._labels = f.create_dataset("labels", (0,), dtype=np.int32, maxshape=(None,),
                                        chunks=(chunk_rows,))
        self._offsets = [0]
        self._utt_ids: list[str] = []
        self._class_counts = np.zeros(self.num_classes, np.int64)
        self._sum = np.zeros(self.feat_dim, np.float64)
        self._sumsq = np.zeros(self.feat_dim, np.float64)

    @property
    def num_frames(self) -> int:
        return self._offsets[-1]

    def add(self, utt_id: str, feats, labels) -> None:
        feats = np.asarray(feats)
        labels = np.asarray(labels)
        where = f"{self.path}: utterance {utt_id!r}"
        if feats.ndim != 2 or feats.shape[1] != self.feat_dim:
            raise DataError(f"{where}: feats must have shape (frames, {self.feat_dim}), got {feats.shape}")
        if labels.shape != (feats.shape[0],):
            raise DataError(f"{where}: labels must have shape ({feats.shape[0]},), got {labels.shape}")
        if feats.shape[0] == 0:
            raise DataError(f"{where}: empty utterance (0 frames)")
        if not np.all(np.isfinite(feats)):
            raise DataError(f"{where}: feats contain NaN or Inf")
        if labels.min() < 0 or labels.max() >= self.num_classes:
            raise DataError(f"{where}: labels must be in [0, {self.num_classes}), "
                            f"got range [{labels.min()}, {labels.max()}]")
        with np.errstate(over="ignore"):
            stored = feats.astype(self._feats.dtype)
        if not np.all(np.isfinite(stored)):
            raise DataError(f"{where}: feats overflow {self._feats.dtype} (|x| > 65504); "
                            "write float32 partitions")
        start, n = self.num_frames, feats.shape[0]
        self._feats.resize(start + n, axis=0)
        self._feats[start:] = stored
        self._labels.resize(start + n, axis=0)
        self._labels[start:] = labels
        self._offsets.append(start + n)
        self._utt_ids.append(str(utt_id))
        self._class_counts += np.bincount(labels, minlength=self.num_classes)
        x = stored.astype(np.float64)
        self._sum += x.sum(0)
        self._sumsq += (x * x).sum(0)

    def close(self) -> None:
        f = self._file
        f.create_dataset("utt_offsets", data=np.asarray(self._offsets, np.int64))
        f.create_dataset("utt_ids", data=np.asarray(self._utt_ids, dtype=object),
                         dtype=h5py.string_dtype("utf-8"))
        f.create_dataset("class_counts", data=self._class_counts)
        f.create_dataset("feat_sum", data=self._sum)
        f.create_dataset("feat_sumsq", data=self._sumsq)
        f.attrs.update(num_frames=self.num_frames, num_utts=len(self._utt_ids))
        f.close()
        os.replace(self._tmp, self.path)

    def abort(self) -> None:
        self._file.close()
        if os.path.exists(self._tmp):
            os.remove(self._tmp)

    def __enter__(self):
        return self

    def __exit__(self, exc_type, exc, tb):
        if exc_type is None:
            self.close()
        else:
            self.abort()


def new_dataset_id() -> str:
    """A fresh id for one preparation (all its partitions share it)."""
    return uuid.uuid4().hex


def write_partition(path, utterances, feat_dim, num_classes, **kwargs) -> None:
    """Write ``utterances`` (iterable of (utt_id, feats, labels)) as one partition file."""
    with PartitionWriter(path, feat_dim, num_classes, **kwargs) as writer:
        for utt_id, feats, labels in utterances:
            writer.add(utt_id, feats, labels)


# --------------------------------------------------------------------------- reading

@dataclass
class PartitionInfo:
    """Metadata of one partition file (everything but the frames)."""
    path: str
    feat_dim: int
    num_classes: int
    num_frames: int
    utt_offsets: np.ndarray
    class_counts: np.ndarray
    feat_sum: np.ndarray
    feat_sumsq: np.ndarray
    partition_index: int
    num_partitions: int
    role: str = "train"
    dataset_id: str | None = None      # None: written before format_version 2


# name: (allowed dtype kinds, description) -- shapes are checked against the attributes
_DATASETS = {"feats": ("f", "float16/float32 frames"), "labels": ("iu", "integer class ids"),
             "utt_offsets": ("iu", "integer frame offsets"), "utt_ids": ("OSU", "utf-8 strings"),
             "class_counts": ("iu", "integer counts"), "feat_sum": ("f", "floats"),
             "feat_sumsq": ("f", "floats")}
_INT_ATTRS = ("feat_dim", "num_classes", "num_frames", "num_utts", "partition_index", "num_partitions")
SCAN_BYTES = 1 << 24        # at most this much of a file is in memory at once during the scan


def open_partition(path, feat_dim: int | None = None, num_classes: int | None = None,
                   scan: bool = True) -> PartitionInfo:
    """Read and check a partition's metadata; with ``scan`` also check every label and
    frame (streamed in blocks of SCAN_BYTES).  Raises DataError naming the file.

    Cheap checks come first and nothing large is read before the file is known to store
    what it declares (``storage.check_self_contained``: no links out of the file, no
    external or virtual storage, every declared byte present), so the time and memory of
    the check are bounded by the file's real size, whatever its header claims."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise DataError(f"{path}: partition file does not exist")
    try:
        f = h5py.File(path, "r")
    except OSError as exc:
        raise DataError(f"{path}: not a readable HDF5 file ({exc})") from None
    try:
        with f:
            info = _checked_metadata(f, path)
            if feat_dim is not None and info.feat_dim != feat_dim:
                raise DataError(f"{path}: feat_dim is {info.feat_dim}, expected {feat_dim}")
            if num_classes is not None and info.num_classes != num_classes:
                raise DataError(f"{path}: num_classes is {info.num_classes}, expected {num_classes}")
            if scan:
                _scan_values(f, info)
    except (OSError, RuntimeError, KeyError, TypeError) as exc:     # h5py on a damaged file
        raise DataError(f"{path}: unreadable partition file ({exc})") from None
    return info


def _checked_metadata(f, path: str) -> PartitionInfo:
    attrs = f.attrs
    if _attr(attrs, "format", str, path) != FORMAT_NAME:
        raise DataError(f"{path}: attribute 'format' must be {FORMAT_NAME!r}, got {attrs.get('format')!r}")
    version = _attr(attrs, "format_version", int, path)
    if version not in (1, FORMAT_VERSION):
        raise DataError(f"{path}: format_version {version} is not supported "
                        f"(this ngsgd_mpi reads versions 1 and {FORMAT_VERSION})")
    n = {name: _attr(attrs, name, int, path) for name in _INT_ATTRS}
    role = _attr(attrs, "role", str, path)
    dataset_id = _attr(attrs, "dataset_id", str, path) if version >= 2 else None
    if role not in ("train", "valid"):
        raise DataError(f"{path}: attribute 'role' must be 'train' or 'valid', got {role!r}")
    if n["feat_dim"] < 1 or n["num_classes"] < 2 or not 1 <= n["num_utts"] <= n["num_frames"]:
        raise DataError(f"{path}: attributes must have feat_dim >= 1, num_classes >= 2 and "
                        f"1 <= num_utts <= num_frames, got {n}")
    if not 0 <= n["partition_index"] < n["num_partitions"]:
        raise DataError(f"{path}: partition_index {n['partition_index']} must be in "
                        f"[0, num_partitions={n['num_partitions']})")
    datasets = storage.check_self_contained(f, path, DataError)
    frames, dims, utts, classes = n["num_frames"], n["feat_dim"], n["num_utts"], n["num_classes"]
    shapes = {"feats": (frames, dims), "labels": (frames,), "utt_offsets": (utts + 1,), "utt_ids": (utts,),
              "class_counts": (classes,), "feat_sum": (dims,), "feat_sumsq": (dims,)}
    for name, (kinds, what) in _DATASETS.items():
        if name not in datasets:
            raise DataError(f"{path}: dataset '{name}' is missing")
        d = datasets[name]
        if d.dtype.kind not in kinds or (name == "feats" and d.dtype.itemsize not in (2, 4)):
            raise DataError(f"{path}: dataset '{name}' must hold {what}, got dtype {d.dtype}")
        if d.shape != shapes[name]:
            raise DataError(f"{path}: dataset '{name}' must have shape {shapes[name]} (from the file's "
                            f"attributes), got {d.shape}")
    # everything below is small and known to be stored in the file
    info = PartitionInfo(path=path, feat_dim=dims, num_classes=classes, num_frames=frames,
                         utt_offsets=f["utt_offsets"][()].astype(np.int64),
                         class_counts=f["class_counts"][()].astype(np.int64),
                         feat_sum=f["feat_sum"][()].astype(np.float64),
                         feat_sumsq=f["feat_sumsq"][()].astype(np.float64),
                         partition_index=n["partition_index"], num_partitions=n["num_partitions"],
                         role=role, dataset_id=dataset_id)
    o = info.utt_offsets
    if o[0] != 0 or o[-1] != frames or np.any(np.diff(o) <= 0):
        raise DataError(f"{path}: 'utt_offsets' must rise strictly from 0 to num_frames={frames}")
    if np.any(info.class_counts < 0) or int(info.class_counts.sum()) != frames:
        raise DataError(f"{path}: 'class_counts' must be non-negative and sum to num_frames={frames}")
    if not (np.all(np.isfinite(info.feat_sum)) and np.all(np.isfinite(info.feat_sumsq))):
        raise DataError(f"{path}: 'feat_sum'/'feat_sumsq' must be finite")
    return info


def _attr(attrs, name: str, kind: type, path: str):
    """Attribute ``name`` as a Python int or str; DataError naming it when missing or mistyped."""
    if name not in attrs:
        raise DataError(f"{path}: attribute '{name}' is missing")
    value = attrs[name]
    if isinstance(value, np.ndarray) and value.shape == ():
        value = value[()]
    if kind is int and isinstance(value, (int, np.integer)) and not isinstance(value, (bool, np.bool_)):
        return int(value)
    if kind is str and isinstance(value, (str, bytes)):
        try:
            return value if isinstance(value, str) else value.decode("utf-8")
        except UnicodeDecodeError:
            pass
    raise DataError(f"{path}: attribute '{name}' must be {'an integer' if kind is int else 'a string'}, "
                    f"got {value!r}")


def _scan_values(f, info: PartitionInfo) -> None:
    feats, labels = f["feats"], f["labels"]
    block = max(1, SCAN_BYTES // (info.feat_dim * feats.dtype.itemsize))
    for start in range(0, info.num_frames, block):
        stop = min(start + block, info.num_frames)
        check_frames(info, start, feats[start:stop], labels[start:stop])


def check_frames(info: PartitionInfo, start: int, feats: np.ndarray, labels: np.ndarray) -> None:
    """DataError naming the file, frame and utterance of the first bad label or non-finite
    frame among frames [start, start + len(labels)) of ``info``'s file."""
    bad = np.flatnonzero((labels < 0) | (labels >= info.num_classes))
    if bad.size:
        frame = start + int(bad[0])
        raise DataError(f"{info.path}: label {labels[bad[0]]} at frame {frame} "
                        f"(utterance #{_utt_of(info, frame)}) is outside [0, {info.num_classes})")
    rows_ok = np.isfinite(feats).all(axis=1)
    if not rows_ok.all():
        frame = start + int(np.argmin(rows_ok))
        raise DataError(f"{info.path}: feats contain NaN/Inf at frame {frame} "
                        f"(utterance #{_utt_of(info, frame)})")


def _utt_of(info: PartitionInfo, frame: int) -> int:
    return int(np.searchsorted(info.utt_offsets, frame, side="right") - 1)


class PartitionLabel(NamedTuple):
    """What identifies a partition within its preparation (small: exchanged between ranks)."""
    path: str
    role: str
    dataset_id: str | None
    partition_index: int
    num_partitions: int

    @classmethod
    def of(cls, info: PartitionInfo) -> "PartitionLabel":
        return cls(info.path, info.role, info.dataset_id, info.partition_index, info.num_partitions)


def check_partition_set(infos: list[PartitionLabel]) -> str | None:
    """The training partitions of all ranks form one preparation's set: role 'train', one
    dataset id, each partition index once.  DataError otherwise; a note (str) when only a
    subset of the preparation's partitions is used."""
    for info in infos:
        if info.role != "train":
            raise DataError(f"{info.path}: role is {info.role!r}, not training data (train_data must "
                            f"name the train/ partitions, e.g. {os.path.join(os.path.dirname(info.path), 'train')})")
        if info.dataset_id is None:
            raise DataError(f"{info.path}: written by an older ngsgd-prepare (format_version 1, no "
                            f"dataset_id); rewrite the set with: ngsgd-prepare repartition")
    ids = {}
    for info in infos:
        ids.setdefault(info.dataset_id, []).append(info.path)
    if len(ids) > 1:
        raise DataError("train_data mixes partitions of different preparations: "
                        + "; ".join(f"dataset {i[:12]}: {', '.join(paths[:3])}"
                                    + (" ..." if len(paths) > 3 else "") for i, paths in ids.items()))
    seen = {}
    for info in infos:
        if info.num_partitions != infos[0].num_partitions:
            raise DataError(f"{info.path}: num_partitions {info.num_partitions} differs from "
                            f"{infos[0].path} ({infos[0].num_partitions})")
        if info.partition_index in seen:
            raise DataError(f"{info.path} and {seen[info.partition_index]} are the same partition "
                            f"(index {info.partition_index}): a copy or a link; use each partition once")
        seen[info.partition_index] = info.path
    if len(infos) < infos[0].num_partitions:
        return (f"note: training on {len(infos)} of the {infos[0].num_partitions} partitions of "
                f"dataset {infos[0].dataset_id[:12]}")
    return None


def mean_and_std(feat_sum, feat_sumsq, num_frames: int) -> tuple[np.ndarray, np.ndarray]:
    """Per-dimension mean and standard deviation from the stored sums (std floored at 1e-5)."""
    mean = np.asarray(feat_sum, np.float64) / num_frames
    var = np.asarray(feat_sumsq, np.float64) / num_frames - mean ** 2
    return mean, np.sqrt(np.maximum(var, 1e-10))


def find_partitions(pattern: str) -> list[str]:
    """Partition files from a glob or a directory, in natural order (train.2 before
    train.10; partition order decides which rank reads which file)."""
    def natural(path):
        return [int(tok) if tok.isdigit() else tok for tok in re.split(r"(\d+)", path)]

    found = glob.glob(os.path.join(pattern, "*.h5")) if os.path.isdir(pattern) else glob.glob(pattern)
    paths = sorted(found, key=natural)
    if not paths:
        raise DataError(f"option train_data: no partition files match {pattern!r}")
    return paths


def partitions_for_rank(paths: list[str], rank: int, size: int) -> list[str]:
    """Rank r takes partitions r, r+N, r+2N, ...; fewer partitions than ranks is an error."""
    if len(paths) < size:
        raise DataError(f"{len(paths)} training partition(s) for {size} ranks: every rank needs "
                        f"at least one (re-split with: ngsgd-prepare repartition)")
    return paths[rank::size]


def splice_offsets(context_left: int, context_right: int) -> np.ndarray:
    return np.arange(-context_left, context_right + 1)


def splice(feats: np.ndarray, frame_idx: np.ndarray, utt_start: np.ndarray,
           utt_end: np.ndarray, offsets: np.ndarray) -> np.ndarray:
    """Spliced rows for frames ``frame_idx`` of ``feats``: row i concatenates, in
    offset order, frames frame_idx[i]+c clipped to [utt_start[i], utt_end[i]-1]
    (edge frames repeated; never crosses an utterance)."""
    idx = frame_idx[:, None] + offsets[None, :]
    np.clip(idx, utt_start[:, None], utt_end[:, None] - 1, out=idx)
    return feats[idx].reshape(len(frame_idx), -1)


@dataclass
class Window:
    """A run of whole consecutive utterances of one partition, read as one slice."""
    part: int          # index into the reader's partition list
    first_frame: int
    num_frames: int


def make_windows(infos: list[PartitionInfo], window_frames: int) -> list[Window]:
    windows = []
    for part, info in enumerate(infos):
        o = info.utt_offsets
        start = 0
        for u in range(1, len(o)):
            if o[u] - o[start] >= window_frames or u == len(o) - 1:
                windows.append(Window(part, int(o[start]), int(o[u] - o[start])))
                start = u
    return windows


class Batch:
    """One minibatch on the host plus the stream position right after it."""
    __slots__ = ("feats", "labels", "epoch", "frame_in_epoch")

    def __init__(self, feats, labels, epoch, frame_in_epoch):
        self.feats, self.labels = feats, labels
        self.epoch, self.frame_in_epoch = epoch, frame_in_epoch


class MinibatchStream:
    """Endless, deterministic, shuffled stream of spliced minibatches of one rank.

    ``start=(epoch, frame_in_epoch)`` resumes exactly where a previous stream
    was when it had produced the batch whose cursor that is.
    """

    def __init__(self, infos: list[PartitionInfo], batch_size: int, context_left: int,
                 context_right: int, seed: int, rank: int, window_frames: int = 100_000,
                 start: tuple[int, int] = (0, 0), shuffle: bool = True):
        self.infos = infos
        self.batch_size = int(batch_size)
        self.offsets = splice_offsets(context_left, context_right)
        self.seed, self.rank, self.shuffle = int(seed), int(rank), shuffle
        self.windows = make_windows(infos, window_frames)
        self.frames_per_epoch = sum(w.num_frames for w in self.windows)
        self.epoch, self.frame_in_epoch = start
        self._files = [h5py.File(i.path, "r") for i in infos]

    def close(self) -> None:
        for f in self._files:
            f.close()

    def _epoch_order(self, epoch: int):
        if not self.shuffle:
            return np.arange(len(self.windows)), None
        rng = np.random.default_rng([self.seed, epoch, self.rank])
        return rng.permutation(len(self.windows)), rng

    def load_window(self, window: Window, rng):
        """Frames of one window in this epoch's order, with their utterance bounds."""
        info, f = self.infos[window.part], self._files[window.part]
        lo, hi = window.first_frame, window.first_frame + window.num_frames
        feats = f["feats"][lo:hi].astype(np.float32)
        labels = f["labels"][lo:hi]
        check_frames(info, lo, feats, labels)      # the file may have changed since the start-up scan
        o = info.utt_offsets
        u0, u1 = np.searchsorted(o, [lo, hi])
        lengths = np.diff(o[u0:u1 + 1])
        utt_start = np.repeat(o[u0:u1] - lo, lengths)
        utt_end = np.repeat(o[u0 + 1:u1 + 1] - lo, lengths)
        order = rng.permutation(window.num_frames) if rng is not None else np.arange(window.num_frames)
        return feats, labels, utt_start, utt_end, order

    def __iter__(self):
        """Yield Batch objects forever (wrapping around epochs)."""
        pending_x, pending_y, pending_n = [], [], 0
        epoch, skip = self.epoch, self.frame_in_epoch
        while True:
            order, rng = self._epoch_order(epoch)
            pos = 0                                   # frames of this epoch emitted or skipped
            for w in order:
                window = self.windows[w]
                if pos + window.num_frames <= skip:  # resuming: skip whole windows unread
                    pos += window.num_frames
                    if rng is not None:
                        rng.permutation(window.num_frames)  # keep the RNG sequence identical
                    continue
                feats, labels, us, ue, perm = self.load_window(window, rng)
                begin = max(0, skip - pos)
                pos += begin
                while begin < window.num_frames:
                    take = min(self.batch_size - pending_n, window.num_frames - begin)
                    sel = perm[begin:begin + take]
                    pending_x.append(splice(feats, sel, us[sel], ue[sel], self.offsets))
                    pending_y.append(labels[sel])
                    pending_n += take
                    begin += take
                    pos += take
                    if pending_n == self.batch_size:
                        x = pending_x[0] if len(pending_x) == 1 else np.concatenate(pending_x)
                        y = pending_y[0] if len(pending_y) == 1 else np.concatenate(pending_y)
                        next_epoch, next_pos = (epoch, pos) if pos < self.frames_per_epoch else (epoch + 1, 0)
                        yield Batch(x, y.astype(np.int64), next_epoch, next_pos)
                        pending_x, pending_y, pending_n = [], [], 0
            epoch, skip = epoch + 1, 0


class Prefetcher:
    """Runs an iterator in a background thread, ``depth`` items ahead.

    Exceptions in the thread are re-raised in the consumer, so a data error on
    one rank surfaces as an ordinary exception (and aborts the job)."""

    _END = object()

    def __init__(self, iterable, depth: int = 4):
        self._queue: queue.Queue = queue.Queue(maxsize=depth)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, args=(iterable,), daemon=True)
        self._thread.start()

    def _run(self, iterable):
        try:
            for item in iterable:
                while not self._stop.is_set():
                    try:
                        self._queue.put(item, timeout=0.1)
                        break
                    except queue.Full:
                        continue
                if self._stop.is_set():
                    return
            self._queue.put(self._END)
        except BaseException as exc:  # noqa: BLE001 - forwarded to the consumer
            self._queue.put(exc)

    def __next__(self):
        item = self._queue.get()
        if item is self._END:
            raise StopIteration
        if isinstance(item, BaseException):
            raise item
        return item

    def __iter__(self):
        return self

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)


def read_utt_ids(path: str) -> list[str]:
    """The utterance ids of a partition file, in file order."""
    with h5py.File(path, "r") as f:
        if "utt_ids" not in f:
            raise DataError(f"{path}: dataset 'utt_ids' is missing")
        return [i.decode("utf-8") if isinstance(i, bytes) else str(i) for i in f["utt_ids"][()]]


class PartitionReader:
    """Random access to the utterances of one partition file: (features, labels) of
    utterance u as stored (float16/float32 features)."""

    def __init__(self, info: PartitionInfo):
        self.info = info
        self.utt_ids = read_utt_ids(info.path)
        self._file = h5py.File(info.path, "r")
        self.feats_dtype = self._file["feats"].dtype

    def __len__(self) -> int:
        return len(self.utt_ids)

    def read(self, u: int):
        o = self.info.utt_offsets
        return self._file["feats"][o[u]:o[u + 1]], self._file["labels"][o[u]:o[u + 1]]

    def close(self) -> None:
        self._file.close()


def read_utterances(path: str, rank: int = 0, size: int = 1):
    """(utt_id, features) of utterances rank, rank + size, ... of a partition file."""
    reader = PartitionReader(open_partition(path, scan=False))
    try:
        for u in range(rank, len(reader), size):
            yield reader.utt_ids[u], reader.read(u)[0]
    finally:
        reader.close()


def iterate_utterance_blocks(info: PartitionInfo, context_left: int, context_right: int,
                             block_frames: int = 16384):
    """Yield (spliced feats float32, labels) for a whole file in order, block by
    block (used for validation and evaluation; memory bounded)."""
    offsets = splice_offsets(context_left, context_right)
    stream = MinibatchStream([info], block_frames, context_left, context_right, seed=0, rank=0,
                             window_frames=block_frames, shuffle=False)
    try:
        for window in stream.windows:
            feats, labels, us, ue, order = stream.load_window(window, None)
            yield splice(feats, order, us, ue, offsets), labels.astype(np.int64)
    finally:
        stream.close()


def splice_utterance(feats: np.ndarray, offsets: np.ndarray) -> np.ndarray:
    """One utterance (T, F) -> (T, F * len(offsets)) float32, edge frames repeated (as training)."""
    num_frames = len(feats)
    if num_frames == 0:
        return np.zeros((0, feats.shape[1] * len(offsets)), np.float32)
    return splice(np.asarray(feats, np.float32), np.arange(num_frames), np.zeros(num_frames, np.int64),
                  np.full(num_frames, num_frames), offsets)


def read_spliced(info: PartitionInfo, utterances, context_left: int, context_right: int):
    """(spliced float32 feats, int64 labels) of the chosen utterances of a partition (indices
    in file order), concatenated; for the recipe's statistics and combination subsets."""
    offsets = splice_offsets(context_left, context_right)
    reader = PartitionReader(info)
    xs, ys = [], []
    try:
        for u in utterances:
            feats, labels = reader.read(int(u))
            xs.append(splice_utterance(feats, offsets))
            ys.append(labels.astype(np.int64))
    finally:
        reader.close()
    if not xs:
        return np.zeros((0, info.feat_dim * len(offsets)), np.float32), np.zeros(0, np.int64)
    return np.concatenate(xs), np.concatenate(ys)
