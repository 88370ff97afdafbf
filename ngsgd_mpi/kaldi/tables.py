"""Kaldi tables without Kaldi binaries: rspecifiers and wspecifiers, matrix and alignment tables.

Reading goes through kaldiio (binary, text and compressed matrices, int32 vectors).  An
*rspecifier* is ``scp:x``, ``ark:x``, with options (``ark,s,cs:x``) or a bare path (``.scp`` =
script file); a *wspecifier* is ``ark[,scp][,t]:file[,file]``.
"""

from __future__ import annotations

import os
import re

import numpy as np

from ..faults import InputError


class TableError(InputError):
    """A Kaldi table that cannot be read (the message names the file and entry)."""


def kaldiio_module():
    """kaldiio, imported on first use (it is the optional extra ``kaldi``)."""
    try:
        import kaldiio  # noqa: PLC0415
    except ImportError:
        raise TableError("reading Kaldi files needs kaldiio: pip install 'ngsgd_mpi[kaldi]'") from None
    return kaldiio


def strip_rspecifier(spec: str) -> tuple[str, bool]:
    """(path, is_scp) from ``scp:x``, ``ark:x`` or a bare path (``.scp`` = script file)."""
    match = re.match(r"^(scp|ark)(,[a-z]+)*:(.*)$", spec)
    if match:
        return match.group(3), match.group(1) == "scp"
    return spec, spec.endswith(".scp")


class KaldiTable:
    """A Kaldi table of matrices or int32 vectors, read with kaldiio: an .scp
    (random access from the start) or an .ark (read sequentially once by
    :meth:`items`, which records every entry's offset for random access)."""

    def __init__(self, spec: str):
        self.kaldiio = kaldiio_module()
        self.path, self.is_scp = strip_rspecifier(spec)
        if not os.path.isfile(self.path):
            raise TableError(f"{self.path}: file does not exist")
        self.locations: dict[str, str] = {}     # key -> "file:offset" (kaldiio.load_mat form)
        self._fds: dict = {}                     # open ark files, by name
        if self.is_scp:
            with open(self.path, encoding="utf-8") as f:
                for line_no, line in enumerate(f, 1):
                    if not line.strip():
                        continue
                    parts = line.split(None, 1)
                    if len(parts) != 2:
                        raise TableError(f"{self.path}, line {line_no}: expected '<utt-id> <location>'")
                    self._add(parts[0], parts[1].strip())

    def _add(self, key: str, location: str) -> None:
        if key in self.locations:
            raise TableError(f"{self.path}: utterance id {key!r} appears twice")
        self.locations[key] = location

    def items(self, rank: int = 0, size: int = 1):
        """(key, array) of entries rank, rank + size, ... in table order."""
        if self.is_scp:
            for i, key in enumerate(list(self.locations)):
                if i % size == rank:
                    yield key, self.read(key)
            return
        matio = self.kaldiio.matio
        with open(self.path, "rb") as fd:
            i = 0
            while True:
                key = matio.read_token(fd)
                if key is None:
                    break
                offset = fd.tell()
                try:
                    array = matio.read_kaldi(fd)
                except Exception as exc:  # noqa: BLE001 - any failure here is a malformed user file
                    raise TableError(f"{self.path}: cannot read entry {key!r} at byte {offset} "
                                       f"({type(exc).__name__}: {exc})") from None
                self._add(key, f"{self.path}:{offset}")
                if i % size == rank:
                    yield key, array
                i += 1

    def __contains__(self, key) -> bool:
        return key in self.locations

    def read(self, key: str) -> np.ndarray:
        location = self.locations[key]
        try:
            return self.kaldiio.load_mat(location, fd_dict=self._fds)
        except Exception as exc:  # noqa: BLE001 - any failure here is a malformed user file
            raise TableError(f"{self.path}: cannot read {key!r} from {location} "
                               f"({type(exc).__name__}: {exc})") from None

    def close(self) -> None:
        for fd in self._fds.values():
            fd.close()
        self._fds.clear()


def _is_binary_ark(path: str) -> bool:
    """Whether the first entry of ``path`` is Kaldi binary (``key \\0B...``)."""
    with open(path, "rb") as f:
        head = f.read(4096)
    space = head.find(b" ")
    return space > 0 and head[space + 1:space + 3] == b"\0B"


class AlignmentTable:
    """Frame labels per utterance, by key: a Kaldi int32-vector table (.scp,
    or a binary .ark as ``ali-to-pdf`` writes), or a text file of lines
    ``utt-id label label ...`` (what ``ali-to-pdf ... ark,t:-`` writes)."""

    def __init__(self, spec: str):
        path, is_scp = strip_rspecifier(spec)
        if not os.path.isfile(path):
            raise TableError(f"{path}: alignment file does not exist")
        self.path = path
        self._table = None
        self._line_offsets: dict[str, int] = {}
        if is_scp or _is_binary_ark(path):
            self._table = KaldiTable(spec)
            for _ in self._table.items():    # indexes an .ark (an .scp is indexed already)
                pass
        else:
            self._text = open(path, "rb")
            offset = 0
            for line in self._text:
                key = line.split(None, 1)[0].decode("utf-8") if line.strip() else None
                if key is not None:
                    if key in self._line_offsets:
                        raise TableError(f"{path}: utterance id {key!r} appears twice")
                    self._line_offsets[key] = offset
                offset += len(line)

    def keys(self):
        return list(self._table.locations) if self._table else list(self._line_offsets)

    def __contains__(self, key) -> bool:
        return key in (self._table.locations if self._table else self._line_offsets)

    def read(self, key: str) -> np.ndarray:
        if self._table is not None:
            labels = self._table.read(key)
        else:
            self._text.seek(self._line_offsets[key])
            tokens = self._text.readline().decode("utf-8").split()[1:]
            try:
                labels = np.array([int(t) for t in tokens], dtype=np.int64)
            except ValueError:
                raise TableError(f"{self.path}: the labels of {key!r} must be integers, "
                                   f"got {' '.join(tokens[:5])} ...") from None
        labels = np.asarray(labels)
        if labels.ndim != 1 or labels.dtype.kind not in "iu":
            raise TableError(f"{self.path}: the alignment of {key!r} must be an integer vector, "
                               f"got a {labels.dtype} array of shape {labels.shape}")
        return labels

    def close(self) -> None:
        if self._table is not None:
            self._table.close()
        else:
            self._text.close()


def as_feature_matrix(utt_id: str, feats, where: str) -> np.ndarray:
    feats = np.asarray(feats)
    if feats.ndim != 2 or feats.dtype.kind != "f":
        raise TableError(f"{where}: the features of {utt_id!r} must be a float matrix, "
                           f"got a {feats.dtype} array of shape {feats.shape}")
    return feats


# --------------------------------------------------------------------------- writing

def rank_path(path: str, rank: int) -> str:
    """out.ark -> out.<rank>.ark"""
    root, ext = os.path.splitext(path)
    return f"{root}.{rank}{ext}"


def parse_wspecifier(wspecifier: str) -> tuple[list[str], list[str]]:
    """(types, files) of ``ark[,scp][,t...]:file[,file]``; the files follow
    the order of 'ark'/'scp' among the types (see :func:`output_files`)."""
    if ":" not in wspecifier:
        raise TableError(f"--out must be a Kaldi wspecifier like ark,scp:out.ark,out.scp, "
                             f"got {wspecifier!r}")
    types_part, files_part = wspecifier.split(":", 1)
    types = types_part.split(",")
    num_files = sum(t in ("ark", "scp") for t in types)
    files = files_part.split(",", num_files - 1) if num_files else []
    if "ark" not in types or len(files) != num_files or not all(files):
        raise TableError(f"--out must name an ark (and optionally an scp), e.g. "
                             f"ark,scp:out.ark,out.scp, got {wspecifier!r}")
    return types, files


def output_files(types: list[str], files: list[str]) -> dict[str, str]:
    """{"ark": path, "scp": path (if requested)} of a parsed wspecifier."""
    return dict(zip([t for t in types if t in ("ark", "scp")], files))


def rank_wspecifier(wspecifier: str, rank: int, size: int) -> tuple[str, list[str]]:
    """(wspecifier, files) that this rank writes: the requested ones with one
    rank, ``out.<rank>.ark`` etc. with several."""
    types, files = parse_wspecifier(wspecifier)
    if size == 1:
        return wspecifier, files
    if any(f.strip() == "-" or "|" in f for f in files):
        raise TableError("with several ranks --out must name files (each rank writes its own)")
    files = [rank_path(f, rank) for f in files]
    return ",".join(types) + ":" + ",".join(files), files
