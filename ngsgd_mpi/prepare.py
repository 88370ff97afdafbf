"""ngsgd-prepare: write the trainer's HDF5 partitions from Kaldi, NumPy or the demo corpus.

Output layout (every subcommand; format in docs/data-format.md)::

    OUT/train/train.0.h5 ... train.{K-1}.h5   training partitions, one or more per rank
    OUT/train/pipeline.json                    the input pipeline (CMVN options, targets), for the model
    OUT/valid.h5                               held-out utterances (when asked for; demo: its test split)
    OUT/stats.json                             global mean/std, class counts, what was skipped

Kaldi input is a recipe's data and alignment directories (``--data DATA --ali-dir ALI``:
DATA/feats.scp with per-speaker CMVN from DATA/cmvn.scp + utt2spk and ALI/cmvn_opts, the
transition-id alignments ALI/ali.*.gz mapped to pdf-ids or phones through ALI/final.mdl), or any
rspecifiers (``--feats``, ``--ali``; kaldi/tables.py).

Two passes; memory holds one utterance plus an index of O(#utterances):

1. *scan*: every utterance is read once and checked (:func:`check_utterance`);
   the usable ones are kept as (id, frames, where to find it again) and the
   problems are counted in a :class:`SkipReport` (``--strict``: the first one
   is an error).  Tables that cannot be re-read (pipes, stdin, gzip) are
   spooled to the temporary output directory as they stream past.
2. *write*: the usable utterances are shuffled with ``--seed`` and dealt, in
   that order, to the partition with the fewest frames so far; then each
   partition is written by reading its utterances again by random access
   (Kaldi scp/ark offsets or the spool, memory-mapped .npy members, HDF5 row ranges).

Balance: let partition k end with the most frames and let its last
utterance have length l.  When k received it, k had the fewest frames, at
most the final count of every other partition, so
``max - min <= l <= longest utterance``.

Nothing half-written: everything goes to a hidden temporary directory beside
OUT, renamed to OUT at the end; any error removes it.
"""

from __future__ import annotations

import argparse
import heapq
import json
import os
import shutil
import struct
import sys
import zipfile
from dataclasses import dataclass, field

import numpy as np

from . import data
from .faults import EXIT_OK, InputError, report_bad_input
from .kaldi.feats import CmvnError, parse_cmvn_opts
from .kaldi.model import KaldiFormatError, read_transition_model
from .kaldi.pipeline import Cmvn, Features, InputPipeline, data_dir_features, read_cmvn_opts, \
    read_pipeline, write_pipeline
from .kaldi.tables import INT_VECTOR, IndexedTable, gzipped_files, parse_rspecifier
from .options import Option, add_arguments, convert_given, record_class
from .utterances import FLOAT16_MAX, Checks, SkipReport, check_utterance


class PrepareError(InputError):
    """Bad input to ngsgd-prepare; the message names file and utterance."""


@dataclass
class Utt:
    """A usable utterance found by a scan."""
    utt_id: str
    num_frames: int                   # after trimming
    where: object = None              # the source's locator for reading it again


@dataclass
class Scan:
    utts: list[Utt]
    feat_dim: int | None
    max_label: int                    # over the usable utterances (-1 when none)


def _feat_dim_of(utt_id: str, feats: np.ndarray, feat_dim: int | None, where: str) -> int:
    """The common feature dimension, checked against this (non-empty) utterance."""
    if feat_dim is not None and feats.shape[1] != feat_dim:
        raise PrepareError(f"{where}: utterance {utt_id!r} has {feats.shape[1]}-dim features, "
                           f"earlier utterances {feat_dim}")
    return int(feats.shape[1])


# --------------------------------------------------------------------------- sources

class TargetMap:
    """Transition-ids -> classes through a Kaldi TransitionModel (``final.mdl``): pdf-ids
    (``--targets pdf``; C = the model's pdfs, as ali-to-pdf) or phone ids (``--targets phone``;
    C = largest phone id + 1, class 0 = <eps> never occurs, as ali-to-phones --per-frame)."""

    def __init__(self, model_path: str, targets: str):
        if not os.path.isfile(model_path):
            raise PrepareError(f"{model_path} does not exist: Kaldi alignments (ali.*.gz) hold "
                               f"transition-ids, which need the model to become {targets} ids")
        try:
            model = read_transition_model(model_path)
        except KaldiFormatError as exc:
            raise PrepareError(str(exc)) from None
        self.path, self.targets = model_path, targets
        self.lookup = model.tid2pdf if targets == "pdf" else model.tid2phone
        self.num_classes = model.num_pdfs if targets == "pdf" else model.num_phones + 1
        self.num_transition_ids = model.num_transition_ids

    def __call__(self, key: str, tids: np.ndarray, where: str) -> np.ndarray:
        if len(tids) and (tids.min() < 1 or tids.max() > self.num_transition_ids):
            bad = int(tids.min() if tids.min() < 1 else tids.max())
            raise PrepareError(f"{where}: utterance {key!r} has transition-id {bad}, but {self.path} has "
                               f"transition-ids 1..{self.num_transition_ids}: the alignment is not "
                               f"from this model")
        return self.lookup[tids]


class KaldiSource:
    """Utterances of a Kaldi feature table (optionally through per-speaker CMVN) with a
    frame alignment (class ids, or transition-ids mapped by a :class:`TargetMap`)."""
    kind = "kaldi"
    class_names = None
    dtype = None

    def __init__(self, features, ali: str, targets: TargetMap | None = None,
                 pipeline: InputPipeline | None = None, num_classes: int | None = None):
        """``features``: a callable workdir -> :class:`Features` (tables that spool need to know
        where); ``ali``: an rspecifier."""
        self._features, self.ali_spec, self.targets = features, ali, targets
        self.pipeline = pipeline or InputPipeline(targets=targets.targets if targets else "labels")
        self.num_classes = targets.num_classes if targets else None
        if targets and num_classes is not None and num_classes != targets.num_classes:
            raise PrepareError(f"--num-classes {num_classes} differs from the {targets.num_classes} "
                               f"{targets.targets} classes of {targets.path}")
        self.given_classes = num_classes
        spec = parse_rspecifier(ali, "--ali")
        if targets is None:
            gz = gzipped_files(spec, "--ali")
            if gz:
                raise PrepareError(f"--ali {gz[0]} is gzipped, as the transition-id alignments of Kaldi "
                                   f"training (ali.*.gz) are: give --transition-model final.mdl (or use "
                                   f"--ali-dir); pdf alignments are written by ali-to-pdf")
        self.feats = self.ali = None

    def scan(self, checks: Checks, report: SkipReport, workdir: str | None = None) -> Scan:
        self.feats = self._features(workdir)
        self.ali = IndexedTable(self.ali_spec, INT_VECTOR, "--ali", workdir,
                                self._to_classes if self.targets is not None else None)
        if self.feats.spec.is_stdin and self.ali.spec.is_stdin:
            raise PrepareError("--feats and --ali cannot both be standard input")
        self.ali.index()
        utts, feat_dim, max_label, seen = [], None, -1, set()
        for key, feats in self.feats.items():
            seen.add(key)
            if key not in self.ali:
                report.skip(key, "missing_labels", f"has features but no alignment in {self.ali.name}")
                continue
            labels = self.ali.read(key)
            self._check_not_transition_ids(key, labels)
            if len(feats):
                feat_dim = _feat_dim_of(key, feats, feat_dim, self.feats.name)
            n = check_utterance(key, feats, labels, checks, report)
            if n is not None:
                utts.append(Utt(key, n))
                max_label = max(max_label, int(labels[:n].max()))
        for key in self.ali.keys():
            if key not in seen:
                report.skip(key, "missing_feats", f"has an alignment but no features in {self.feats.name}")
        return Scan(utts, feat_dim, max_label)

    def _to_classes(self, key: str, tids: np.ndarray) -> np.ndarray:
        return self.targets(key, tids, self.ali.table.current)

    def _check_not_transition_ids(self, key: str, labels: np.ndarray) -> None:
        """Without a model, a label beyond --num-classes is not mess but a wrong class count or
        transition-ids taken for pdfs: stop."""
        c = self.given_classes
        if self.targets is None and c is not None and len(labels) and int(labels.max()) >= c:
            raise PrepareError(f"{self.ali.name}: utterance {key!r} has label {int(labels.max())} >= "
                               f"--num-classes {c}: transition-id alignments need --transition-model "
                               f"final.mdl (or --ali-dir); pdf alignments need a larger --num-classes")

    def read(self, utt: Utt):
        return self.feats.read(utt.utt_id)[:utt.num_frames], self.ali.read(utt.utt_id)[:utt.num_frames]

    def close(self) -> None:
        for table in (self.feats, self.ali):
            if table is not None:
                table.close()


@dataclass
class ArraySet:
    """One set of utterances held as arrays (an .npz file or a corpus split)."""
    name: str
    feats: np.ndarray               # (T, F) float, may be a np.memmap
    labels: np.ndarray              # (T,) int
    utt_offsets: np.ndarray         # (U+1,) utterance u = rows [o[u], o[u+1])
    utt_ids: list[str] = field(default_factory=list)

    def check(self) -> None:
        def bad(name, what):
            raise PrepareError(f"{self.name}: '{name}' must be {what}")

        f, lab, o = self.feats, self.labels, self.utt_offsets
        if f.ndim != 2 or f.dtype.kind != "f":
            bad("feats", f"a float (frames, feat_dim) array, got {f.dtype} {f.shape}")
        if lab.shape != (f.shape[0],) or lab.dtype.kind not in "iu":
            bad("labels", f"an integer array of shape ({f.shape[0]},), got {lab.dtype} {lab.shape}")
        if o.ndim != 1 or o.dtype.kind not in "iu" or len(o) < 1 or o[0] != 0 or o[-1] != f.shape[0] \
                or np.any(np.diff(o) < 0):
            bad("utt_offsets", f"a non-decreasing integer vector from 0 to {f.shape[0]} (number of frames)")
        if len(self.utt_ids) != len(o) - 1:
            bad("utt_ids", f"{len(o) - 1} ids (one per utterance), got {len(self.utt_ids)}")


def _npz_array(path: str, name: str) -> np.ndarray:
    """Array ``name`` of an .npz: memory-mapped when the member is stored
    uncompressed (``np.savez``), so only the rows used are read; read whole
    when compressed (``np.savez_compressed``)."""
    with zipfile.ZipFile(path) as zf:
        try:
            info = zf.getinfo(name + ".npy")
        except KeyError:
            raise PrepareError(f"{path}: array '{name}' is missing (has: "
                               f"{', '.join(n[:-4] for n in zf.namelist())})") from None
        if info.compress_type == zipfile.ZIP_STORED:
            with zf.open(info) as member:
                version = np.lib.format.read_magic(member)
                if version in ((1, 0), (2, 0)):
                    read_header = (np.lib.format.read_array_header_1_0 if version == (1, 0)
                                   else np.lib.format.read_array_header_2_0)
                    shape, fortran, dtype = read_header(member)
                    header_size = member.tell()
                    if not dtype.hasobject and int(np.prod(shape)) > 0:
                        with open(path, "rb") as raw:       # the member's local file header
                            raw.seek(info.header_offset)
                            local = raw.read(30)
                        name_len, extra_len = struct.unpack("<HH", local[26:30])
                        start = info.header_offset + 30 + name_len + extra_len + header_size
                        return np.memmap(path, dtype=dtype, mode="r", offset=start, shape=shape,
                                         order="F" if fortran else "C")
    try:
        with np.load(path, allow_pickle=False) as npz:
            return npz[name]
    except ValueError as exc:
        raise PrepareError(f"{path}: array '{name}' cannot be read without pickle ({exc}); "
                           f"store ids as a unicode array") from None


def load_npz_set(path: str) -> ArraySet:
    """An ArraySet from an .npz with feats, labels, utt_offsets and optional utt_ids."""
    if not os.path.isfile(path):
        raise PrepareError(f"{path}: file does not exist")
    if not zipfile.is_zipfile(path):
        raise PrepareError(f"{path}: not an .npz file")
    with zipfile.ZipFile(path) as zf:
        has_ids = "utt_ids.npy" in zf.namelist()
    offsets = np.asarray(_npz_array(path, "utt_offsets"))
    if has_ids:
        ids = [str(i) for i in _npz_array(path, "utt_ids").tolist()]
    else:   # ids from the file name and position
        stem = os.path.splitext(os.path.basename(path))[0]
        ids = [f"{stem}-{u:06d}" for u in range(max(len(offsets) - 1, 0))]
    arrays = ArraySet(path, _npz_array(path, "feats"), _npz_array(path, "labels"), offsets, ids)
    arrays.check()
    return arrays


class ArraySource:
    """Utterances of one or more ArraySets (.npz files, the demo corpus)."""
    kind = "numpy"
    dtype = None
    pipeline = InputPipeline()

    def __init__(self, sets: list[ArraySet], num_classes: int | None = None, class_names=None):
        self.sets = sets
        self.num_classes = num_classes
        self.class_names = class_names

    def scan(self, checks: Checks, report: SkipReport, workdir: str | None = None) -> Scan:
        utts, feat_dim, max_label, seen = [], None, -1, set()
        for s, arrays in enumerate(self.sets):
            o = arrays.utt_offsets
            for u, utt_id in enumerate(arrays.utt_ids):
                if utt_id in seen:
                    raise PrepareError(f"{arrays.name}: utterance id {utt_id!r} appears twice")
                seen.add(utt_id)
                feats = np.asarray(arrays.feats[o[u]:o[u + 1]])
                labels = np.asarray(arrays.labels[o[u]:o[u + 1]])
                if len(feats):
                    feat_dim = _feat_dim_of(utt_id, feats, feat_dim, arrays.name)
                n = check_utterance(utt_id, feats, labels, checks, report)
                if n is not None:
                    utts.append(Utt(utt_id, n, (s, u)))
                    max_label = max(max_label, int(labels.max()))
        return Scan(utts, feat_dim, max_label)

    def read(self, utt: Utt):
        s, u = utt.where
        arrays = self.sets[s]
        lo, hi = int(arrays.utt_offsets[u]), int(arrays.utt_offsets[u + 1])
        return np.asarray(arrays.feats[lo:hi]), np.asarray(arrays.labels[lo:hi])

    def close(self) -> None:
        pass


class PartitionSource:
    """Utterances of existing partition files (for re-splitting)."""
    kind = "repartition"
    class_names = None

    def __init__(self, paths: list[str]):
        self.infos = [data.open_partition(p) for p in paths]
        first = self.infos[0]
        for info in self.infos[1:]:
            if (info.feat_dim, info.num_classes) != (first.feat_dim, first.num_classes):
                raise PrepareError(f"{info.path}: feat_dim/num_classes {info.feat_dim}/{info.num_classes} "
                                   f"differ from {first.path} ({first.feat_dim}/{first.num_classes})")
        self.num_classes = first.num_classes
        self.pipeline = read_pipeline(os.path.dirname(paths[0])) or InputPipeline()
        self.readers = [data.PartitionReader(info) for info in self.infos]
        self.dtype = self.readers[0].feats_dtype

    def scan(self, checks: Checks, report: SkipReport, workdir: str | None = None) -> Scan:
        """Partitions were checked when written and by open_partition: nothing to skip."""
        utts, seen = [], set()
        for p, (info, reader) in enumerate(zip(self.infos, self.readers)):
            for u, utt_id in enumerate(reader.utt_ids):
                if utt_id in seen:
                    raise PrepareError(f"{info.path}: utterance id {utt_id!r} appears in more than one "
                                       f"partition")
                seen.add(utt_id)
                utts.append(Utt(utt_id, int(info.utt_offsets[u + 1] - info.utt_offsets[u]), (p, u)))
        return Scan(utts, self.infos[0].feat_dim, self.num_classes - 1)

    def read(self, utt: Utt):
        p, u = utt.where
        return self.readers[p].read(u)

    def close(self) -> None:
        for reader in self.readers:
            reader.close()


# --------------------------------------------------------------------------- the split

def balanced_split(lengths, num_parts: int) -> list[list[int]]:
    """Deal items, in the given order, each to the part with the fewest frames
    so far (ties: the lowest index); see the module docstring for the bound."""
    heap = [(0, k) for k in range(num_parts)]
    parts: list[list[int]] = [[] for _ in range(num_parts)]
    for i, n in enumerate(lengths):
        total, k = heapq.heappop(heap)
        parts[k].append(i)
        heapq.heappush(heap, (total + int(n), k))
    return parts


PREPARE_OPTIONS = [
    Option("num_partitions", int, 1, "training partitions (>= number of ranks)", group="output", minimum=1),
    Option("seed", int, 0, "seed of the utterance shuffle", group="output"),
    Option("overwrite", bool, False, "replace a non-empty --out", group="output"),
    Option("dtype", str, "float16", "stored feature type (repartition: default as in the input)",
           group="storage", choices=("float16", "float32")),
    Option("strict", bool, False, "any skipped or trimmed utterance is an error (nothing is written)",
           group="storage"),
    Option("num_classes", int, None, "number of classes (default: the model's; without one, max label + 1)",
           group="labels", minimum=2),
    Option("valid_fraction", float, 0.0, "fraction of the utterances held out as valid.h5", group="labels",
           minimum=0, below=1),
    Option("valid_utts", str, None, "file listing the held-out utterance ids (first token per line)",
           group="labels"),
    Option("length_tolerance", int, 2, "frame-count difference trimmed away (larger: utterance skipped)",
           group="alignment", minimum=0),
]


class PrepareOptions(record_class("PrepareOptions", PREPARE_OPTIONS)):
    """How ngsgd-prepare splits and stores (every field validated against PREPARE_OPTIONS)."""

    def validate(self) -> None:
        super().validate()
        if self.valid_utts and self.valid_fraction:
            raise PrepareError("give --valid-utts or --valid-fraction, not both")


def _options(*groups: str) -> list[Option]:
    return [o for o in PREPARE_OPTIONS if o.group in groups]


def _read_id_list(path: str) -> set[str]:
    if not os.path.isfile(path):
        raise PrepareError(f"--valid-utts: {path} does not exist")
    with open(path, encoding="utf-8") as f:
        return {line.split()[0] for line in f if line.strip()}


def _split_valid(utts: list[Utt], opts: PrepareOptions, log) -> tuple[list[Utt], list[Utt]]:
    """(train, valid), both in the order shuffled by the seed."""
    order = np.random.default_rng(opts.seed).permutation(len(utts))
    shuffled = [utts[i] for i in order]
    if opts.valid_utts:
        wanted = _read_id_list(opts.valid_utts)
        valid = [u for u in shuffled if u.utt_id in wanted]
        if not valid:
            raise PrepareError(f"--valid-utts: none of the {len(wanted)} utterances listed in "
                               f"{opts.valid_utts} is among the usable ones")
        if len(valid) < len(wanted):
            log(f"note: {len(wanted) - len(valid)} of the {len(wanted)} utterances in {opts.valid_utts} "
                f"are not among the usable ones")
        return [u for u in shuffled if u.utt_id not in wanted], valid
    num_valid = int(round(opts.valid_fraction * len(utts)))
    if opts.valid_fraction > 0:
        num_valid = max(num_valid, 1)
    return shuffled[num_valid:], shuffled[:num_valid]


def _write_file(path, source, utts, feat_dim, num_classes, dtype, index, count, role, dataset_id) -> None:
    with data.PartitionWriter(path, feat_dim, num_classes, partition_index=index, num_partitions=count,
                              role=role, dtype=dtype, dataset_id=dataset_id) as writer:
        for utt in utts:
            feats, labels = source.read(utt)
            writer.add(utt.utt_id, feats, labels)


def _check_out_dir(out_dir: str, overwrite: bool) -> None:
    if os.path.exists(out_dir) and not os.path.isdir(out_dir):
        raise PrepareError(f"--out {out_dir} exists and is not a directory")
    if os.path.isdir(out_dir) and os.listdir(out_dir) and not overwrite:
        raise PrepareError(f"--out {out_dir} exists and is not empty (remove it or pass --overwrite)")


def _publish(tmp: str, out_dir: str) -> None:
    """Rename the finished temporary directory to OUT (replacing an old OUT)."""
    old = None
    if os.path.isdir(out_dir) and os.listdir(out_dir):
        old = os.path.join(os.path.dirname(out_dir), f".{os.path.basename(out_dir)}.old{os.getpid()}")
        os.replace(out_dir, old)
    elif os.path.isdir(out_dir):
        os.rmdir(out_dir)
    os.replace(tmp, out_dir)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


SPOOL_DIR = ".spool"          # copies of streamed tables, inside the temporary output directory


def prepare(source, out_dir: str, opts: PrepareOptions, valid_source=None, copy_valid: str | None = None,
            log=print) -> dict:
    """Scan ``source``, split it and write OUT (see the module docstring).
    ``valid_source``: write all its usable utterances as valid.h5 (demo);
    ``copy_valid``: copy this file as valid.h5 (repartition).  Returns the
    content of stats.json."""
    out_dir = os.path.abspath(out_dir)
    tmp = os.path.join(os.path.dirname(out_dir), f".{os.path.basename(out_dir)}.tmp{os.getpid()}")
    try:
        try:
            _check_out_dir(out_dir, opts.overwrite)
            report = SkipReport(opts.strict)
            stats = _scan_and_write(source, tmp, opts, valid_source, copy_valid, report, log)
        finally:
            source.close()
            if valid_source is not None:
                valid_source.close()
            shutil.rmtree(os.path.join(tmp, SPOOL_DIR), ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    _publish(tmp, out_dir)
    for line in _summary(stats, out_dir) + report.lines(opts.length_tolerance):
        log(line)
    return stats


def _scan_and_write(source, tmp, opts, valid_source, copy_valid, report, log) -> dict:
    dtype = np.dtype(opts.dtype or source.dtype or "float16")
    given_classes = opts.num_classes or source.num_classes
    checks = Checks(given_classes, opts.length_tolerance,
                    FLOAT16_MAX if dtype == np.float16 else float(np.finfo(dtype).max))

    scan = source.scan(checks, report, os.path.join(tmp, SPOOL_DIR))
    valid_scan = valid_source.scan(checks, report) if valid_source is not None else None
    if not scan.utts:
        raise PrepareError("no usable utterances. " + " ".join(report.lines(opts.length_tolerance)))
    feat_dim = scan.feat_dim
    if valid_scan is not None and valid_scan.utts and valid_scan.feat_dim != feat_dim:
        raise PrepareError(f"the validation data has {valid_scan.feat_dim}-dim features, "
                           f"the training data {feat_dim}")
    num_classes = given_classes
    if num_classes is None:
        num_classes = max(scan.max_label, valid_scan.max_label if valid_scan else -1) + 1
        log(f"note: --num-classes not given; using max label + 1 = {num_classes}"
            + (" (if these are Kaldi transition-ids, give --transition-model final.mdl)"
               if source.kind == "kaldi" else ""))
        if num_classes < 2:
            raise PrepareError("only label 0 occurs; pass --num-classes (>= 2)")

    train, valid = _split_valid(scan.utts, opts, log)
    if valid_scan is not None:
        valid = valid_scan.utts
    if len(train) < opts.num_partitions:
        raise PrepareError(f"{len(train)} training utterance(s) for --num-partitions "
                           f"{opts.num_partitions}: every partition needs at least one")
    parts = balanced_split([u.num_frames for u in train], opts.num_partitions)

    os.makedirs(os.path.join(tmp, "train"))
    train_paths, dataset_id = [], data.new_dataset_id()     # one id for this preparation's files
    for k, members in enumerate(parts):
        path = os.path.join(tmp, "train", f"train.{k}.h5")
        _write_file(path, source, [train[i] for i in members], feat_dim, num_classes, dtype, k,
                    opts.num_partitions, "train", dataset_id)
        train_paths.append(path)
    write_pipeline(os.path.join(tmp, "train"), source.pipeline)
    valid_path = os.path.join(tmp, "valid.h5")
    if copy_valid is not None:
        shutil.copyfile(copy_valid, valid_path)
    elif valid:
        _write_file(valid_path, valid_source or source, valid, feat_dim, num_classes, dtype, 0, 1, "valid",
                    dataset_id)
    valid_info = data.open_partition(valid_path, scan=False) if os.path.exists(valid_path) else None
    stats = _stats([data.open_partition(p, scan=False) for p in train_paths], valid_info, report,
                   source, opts, dtype, given_classes is None)
    with open(os.path.join(tmp, "stats.json"), "w") as f:
        json.dump(stats, f, indent=1)
    return stats


def _stats(infos, valid_info, report, source, opts, dtype, inferred) -> dict:
    frames = sum(i.num_frames for i in infos)
    mean, std = data.mean_and_std(sum(i.feat_sum for i in infos), sum(i.feat_sumsq for i in infos), frames)
    stats = {
        "format": "ngsgd_mpi.prepare-stats", "source": source.kind, "seed": opts.seed,
        "feat_dim": int(infos[0].feat_dim), "num_classes": int(infos[0].num_classes),
        "num_classes_inferred": bool(inferred), "dtype": str(dtype),
        "train": {"num_partitions": len(infos), "frames": int(frames),
                  "utts": int(sum(len(i.utt_offsets) - 1 for i in infos)),
                  "partition_frames": [int(i.num_frames) for i in infos],
                  "partition_utts": [int(len(i.utt_offsets) - 1) for i in infos]},
        "valid": None if valid_info is None else {"frames": int(valid_info.num_frames),
                                                  "utts": int(len(valid_info.utt_offsets) - 1)},
        "feat_mean": mean.tolist(), "feat_std": std.tolist(),
        "class_counts": [int(c) for c in sum(i.class_counts for i in infos)],
        "input_pipeline": source.pipeline.to_dict(),
    }
    if getattr(source, "targets", None) is not None:
        stats["transition_model"] = source.targets.path
    if source.class_names is not None:
        stats["class_names"] = [str(c) for c in source.class_names]
    stats.update(report.to_dict())
    return stats


def _summary(stats: dict, out_dir: str) -> list[str]:
    t = stats["train"]
    lines = [f"ngsgd-prepare: wrote {out_dir}: {t['num_partitions']} training partition(s), "
             f"{t['utts']:,} utterances, {t['frames']:,} frames ({min(t['partition_frames']):,} to "
             f"{max(t['partition_frames']):,} per partition); feat_dim {stats['feat_dim']}, "
             f"{stats['num_classes']} classes"]
    if stats["valid"]:
        lines.append(f"valid.h5: {stats['valid']['utts']:,} utterances, {stats['valid']['frames']:,} frames")
    return lines


# --------------------------------------------------------------------------- subcommands

@dataclass
class KaldiInputs:
    """What ``ngsgd-prepare kaldi`` reads: features (``data_dir`` or ``feats``) and an alignment
    (``ali_dir`` or ``ali``), see :func:`kaldi_source`."""
    feats: str | None = None              # an rspecifier, used as read
    data_dir: str | None = None           # DATA/feats.scp + per-speaker CMVN
    ali: str | None = None                # an rspecifier of class ids (or transition-ids, with a model)
    ali_dir: str | None = None            # ALI/ali.*.gz, ALI/final.mdl, ALI/cmvn_opts
    transition_model: str | None = None   # final.mdl for --ali (default with --ali-dir: ALI/final.mdl)
    targets: str = "pdf"                  # pdf | phone (with a model)
    no_cmvn: bool = False
    cmvn_opts: str | None = None          # apply-cmvn options (default: ALI/cmvn_opts, or Kaldi's)


def kaldi_source(inputs: KaldiInputs, num_classes: int | None = None) -> KaldiSource:
    """The KaldiSource for ``inputs``; every inconsistent combination is a PrepareError."""
    i = inputs
    if (i.feats is None) == (i.data_dir is None):
        raise PrepareError("give exactly one of --data DATA_DIR and --feats FEATS")
    if (i.ali is None) == (i.ali_dir is None):
        raise PrepareError("give exactly one of --ali-dir ALI_DIR and --ali ALI")
    if i.targets not in ("pdf", "phone"):
        raise PrepareError(f"--targets must be pdf or phone, got {i.targets!r}")
    if i.data_dir is None and (i.no_cmvn or i.cmvn_opts is not None):
        raise PrepareError("--no-cmvn and --cmvn-opts go with --data (--feats is used as read)")
    model_path = i.transition_model
    if i.ali_dir is not None:
        if not os.path.isdir(i.ali_dir):
            raise PrepareError(f"--ali-dir {i.ali_dir}: not a directory")
        ali = os.path.join(i.ali_dir, "ali.*.gz")
        model_path = model_path or os.path.join(i.ali_dir, "final.mdl")
    else:
        ali = i.ali
    if model_path is None and i.targets == "phone":
        raise PrepareError("--targets phone needs transition-id alignments and their model "
                           "(--ali-dir, or --transition-model)")
    targets = TargetMap(model_path, i.targets) if model_path is not None else None

    cmvn = None
    if i.data_dir is not None and not i.no_cmvn:
        if i.cmvn_opts is not None:
            try:
                cmvn = Cmvn(*parse_cmvn_opts(i.cmvn_opts, "--cmvn-opts"))
            except CmvnError as exc:
                raise PrepareError(str(exc)) from None
        else:
            cmvn = read_cmvn_opts(os.path.join(i.ali_dir, "cmvn_opts")) if i.ali_dir else Cmvn()
        if not cmvn.norm_means:
            cmvn = None                   # apply-cmvn --norm-means=false copies its input
    if i.data_dir is not None:
        def features(workdir):
            return data_dir_features(i.data_dir, cmvn, workdir)
    else:
        def features(workdir):
            return Features(i.feats, "--feats", None, workdir)
    pipeline = InputPipeline(cmvn, targets.targets if targets else "labels")
    return KaldiSource(features, ali, targets, pipeline, num_classes)


def prepare_kaldi(feats: str | None, ali: str | None, out_dir: str, opts: PrepareOptions, log=print,
                  **inputs) -> dict:
    """Partitions from Kaldi features and a frame alignment (``inputs``: the other fields of
    :class:`KaldiInputs`)."""
    source = kaldi_source(KaldiInputs(feats=feats, ali=ali, **inputs), opts.num_classes)
    return prepare(source, out_dir, opts, log=log)


def prepare_numpy(paths: list[str], out_dir: str, opts: PrepareOptions, log=print) -> dict:
    """Partitions from .npz files (feats, labels, utt_offsets, optional utt_ids)."""
    return prepare(ArraySource([load_npz_set(p) for p in paths], opts.num_classes), out_dir, opts, log=log)


def demo_sources(corpus: dict) -> tuple[ArraySource, ArraySource]:
    """(train, test) sources of a corpus dict as ``load_demo_corpus()`` returns."""
    names = list(corpus["class_names"])

    def split(prefix):
        ids = [str(i) for i in np.asarray(corpus[f"{prefix}_utt_ids"]).tolist()]
        arrays = ArraySet(f"demo corpus ({prefix})", np.asarray(corpus[f"{prefix}_feats"]),
                          np.asarray(corpus[f"{prefix}_labels"]),
                          np.asarray(corpus[f"{prefix}_utt_offsets"]), ids)
        arrays.check()
        return ArraySource([arrays], len(names), names)

    return split("train"), split("test")


def prepare_demo(out_dir: str, opts: PrepareOptions, log=print) -> dict:
    """Train partitions and valid.h5 (its test split) from the embedded demo corpus."""
    try:
        from .corpus import load_demo_corpus  # noqa: PLC0415
        corpus = load_demo_corpus()
    except (ImportError, OSError, ValueError) as exc:   # not built / not shipped / inconsistent
        raise PrepareError(f"the demo corpus is not available ({exc})") from None
    train, test = demo_sources(corpus)
    return prepare(train, out_dir, opts, valid_source=test, log=log)


def repartition(in_dir: str, out_dir: str, opts: PrepareOptions, log=print) -> dict:
    """Re-split IN/train/*.h5 into ``opts.num_partitions`` files; copy IN/valid.h5."""
    train_dir = os.path.join(in_dir, "train")
    if not os.path.isdir(train_dir):
        raise PrepareError(f"{in_dir}: expected a prepared directory with train/train.K.h5")
    paths = data.find_partitions(train_dir)
    valid = os.path.join(in_dir, "valid.h5")
    if os.path.exists(valid):
        data.open_partition(valid, scan=False)
    return prepare(PartitionSource(paths), out_dir, opts,
                   copy_valid=valid if os.path.exists(valid) else None, log=log)


SUBCOMMAND_OPTIONS = {"kaldi": ("output", "storage", "labels", "alignment"),
                      "numpy": ("output", "storage", "labels"), "demo": ("output", "storage"),
                      "repartition": ("output", "storage")}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="ngsgd-prepare", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    helps = {"kaldi": "from a Kaldi data dir and alignment dir (or any feature and alignment tables)",
             "numpy": "from .npz files (feats, labels, utt_offsets, optional utt_ids)",
             "demo": "from the embedded demo corpus",
             "repartition": "re-split prepared partitions for another number of ranks"}
    commands = {}
    for name, groups in SUBCOMMAND_OPTIONS.items():
        commands[name] = command = sub.add_parser(name, help=helps[name])
        command.add_argument("--out", required=True,
                             help="output directory (train/train.K.h5, valid.h5, stats.json)")
        add_arguments(command, _options(*groups))
    kaldi = commands["kaldi"]
    kaldi.add_argument("--data", help="Kaldi data directory: feats.scp, with per-speaker CMVN from "
                       "cmvn.scp and utt2spk (options from ALI_DIR/cmvn_opts)")
    kaldi.add_argument("--feats", help="instead of --data: any feature rspecifier, used as read "
                       "(scp:, ark:, ark,s,cs:, 'ark:cmd |', ark:-, .gz, globs)")
    kaldi.add_argument("--ali-dir", help="Kaldi alignment directory: ali.*.gz (transition-ids), "
                       "final.mdl, cmvn_opts")
    kaldi.add_argument("--ali", help="instead of --ali-dir: an alignment rspecifier of class ids "
                       "(ali-to-pdf output; binary or text), or of transition-ids with --transition-model")
    kaldi.add_argument("--transition-model", help="final.mdl that maps --ali's transition-ids "
                       "(default with --ali-dir: ALI_DIR/final.mdl)")
    kaldi.add_argument("--targets", choices=("pdf", "phone"), default="pdf",
                       help="classes from transition-ids: pdf-ids (ali-to-pdf) or phones (ali-to-phones)")
    kaldi.add_argument("--no-cmvn", action="store_true", help="with --data: no CMVN")
    kaldi.add_argument("--cmvn-opts", help="with --data: apply-cmvn options, e.g. '--norm-vars=true' "
                       "(default: ALI_DIR/cmvn_opts; empty: Kaldi's defaults)")
    commands["numpy"].add_argument("npz", nargs="+", help=".npz files")
    commands["repartition"].add_argument("in_dir", help="a directory written by ngsgd-prepare")
    return parser


def options_from_args(args) -> PrepareOptions:
    given = vars(args)
    values = convert_given(given, _options(*SUBCOMMAND_OPTIONS[args.command]))
    if args.command == "repartition":
        values.setdefault("dtype", None)          # as in the input
    return PrepareOptions(**values)


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        opts = options_from_args(args)
        if args.command == "kaldi":
            prepare_kaldi(args.feats, args.ali, args.out, opts, data_dir=args.data, ali_dir=args.ali_dir,
                          transition_model=args.transition_model, targets=args.targets,
                          no_cmvn=args.no_cmvn, cmvn_opts=args.cmvn_opts)
        elif args.command == "numpy":
            prepare_numpy(args.npz, args.out, opts)
        elif args.command == "demo":
            prepare_demo(args.out, opts)
        else:
            repartition(args.in_dir, args.out, opts)
    except InputError as exc:
        return report_bad_input("ngsgd-prepare", exc)
    return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
