"""Files of nested records in HDF5: written atomically, checksummed, checked on read.

A record is a nested ``dict`` whose leaves are NumPy arrays, Python scalars or strings; a
``list`` of records is stored as a group of numbered members.  Plain JSON metadata goes into
one attribute.  The layout is the record's own nesting::

    /optimizer/layers/0/input/W      dataset
    attrs: format, format_version, meta (JSON), sha256

The SHA-256 covers every dataset (name, dtype, shape, bytes), the format and the metadata, so
editing any value that is read back is detected.  A file is written to a temporary name in
the same directory, flushed, fsynced and renamed: a crash leaves the old file or the new
one, never a torn one under the real name.

Reading trusts nothing before it is checked (:func:`check_self_contained`, also used for
training partitions by ``data.py``): every link must be a hard link inside the file (no
external or soft links, which HDF5 would follow to other files), no dataset may keep its
bytes elsewhere (external raw storage, virtual datasets), and every dataset must really
store the bytes its shape declares (no compression, no unallocated chunks), so a crafted
header cannot make a reader allocate or scan more than the file holds.
"""

from __future__ import annotations

import hashlib
import json
import os

import h5py
import numpy as np

from .faults import InputError

FORMAT_VERSION = 2
_LIST = "list"          # group attribute marking a list of records


class StorageError(InputError):
    """A missing, torn, corrupt or foreign file (the message names it)."""


MAX_OBJECTS = 10_000    # groups + datasets walked in one file (bounds the walk, breaks link cycles)


def check_self_contained(f, path: str, error=StorageError) -> dict:
    """{name: dataset} of every dataset in the open h5py file ``f``, after checking that the
    file keeps everything inside itself (module docstring); ``error`` naming ``path`` otherwise.
    Links are inspected before anything follows them."""
    file_size = os.path.getsize(path)
    datasets, stack, walked = {}, [("", f)], 0
    while stack:
        prefix, group = stack.pop()
        for name in group:
            full = f"{prefix}/{name}"
            link = group.get(name, getlink=True)
            if isinstance(link, h5py.ExternalLink):
                raise error(f"{path}: {full} is an external link to {link.filename}:{link.path}; "
                            f"the file must be self-contained")
            if not isinstance(link, h5py.HardLink):
                raise error(f"{path}: {full} is a {type(link).__name__}; only plain members are allowed")
            walked += 1
            if walked > MAX_OBJECTS:
                raise error(f"{path}: more than {MAX_OBJECTS} objects (not a file this program wrote)")
            obj = group[name]
            if isinstance(obj, h5py.Group):
                stack.append((full, obj))
                continue
            if not isinstance(obj, h5py.Dataset):
                raise error(f"{path}: {full} is a {type(obj).__name__}, expected a dataset or group")
            _check_stored(obj, full, path, file_size, error)
            datasets[full.lstrip("/")] = obj
    return datasets


def _check_stored(dset, name: str, path: str, file_size: int, error) -> None:
    plist = dset.id.get_create_plist()
    if dset.is_virtual:
        raise error(f"{path}: {name} is a virtual dataset (its data lives in other files)")
    if plist.get_external_count():
        raise error(f"{path}: {name} keeps its data in an external file "
                    f"({plist.get_external(0)[0].decode(errors='replace')}); the file must be self-contained")
    if plist.get_nfilters():
        raise error(f"{path}: {name} is compressed or filtered; this program writes and reads plain datasets")
    declared = dset.size * dset.dtype.itemsize
    stored = dset.id.get_storage_size()
    if stored < declared or declared > file_size:
        raise error(f"{path}: {name} declares {dset.shape} x {dset.dtype} = {declared:,} bytes but the "
                    f"file stores {stored:,} of them (file size {file_size:,}): truncated or crafted")


def write(path: str, fmt: str, record: dict, meta: dict | None = None) -> None:
    """Write ``record`` (and JSON-able ``meta``) to ``path`` atomically."""
    leaves = dict(_flatten(record))
    meta_json = json.dumps(meta or {}, sort_keys=True)
    tmp = f"{path}.tmp{os.getpid()}"
    try:
        with h5py.File(tmp, "w") as f:
            for name, value in leaves.items():
                if isinstance(value, str):
                    f.create_dataset(name, data=value, dtype=h5py.string_dtype("utf-8"))
                else:
                    f.create_dataset(name, data=np.asarray(value))
            for group, is_list in _groups(record):
                f.require_group(group).attrs[_LIST] = is_list
            f.attrs.update(format=fmt, format_version=FORMAT_VERSION, meta=meta_json,
                           sha256=_digest(fmt, meta_json, leaves))
            f.flush()
        with open(tmp, "rb") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def read(path: str, fmt: str) -> tuple[dict, dict]:
    """(record, meta) of a verified file; StorageError naming the file otherwise."""
    if not os.path.isfile(path):
        raise StorageError(f"{path}: file does not exist")
    try:
        with h5py.File(path, "r") as f:
            attrs = dict(f.attrs)
            _check_format(path, attrs, fmt)               # before reading anything large
            datasets = check_self_contained(f, path)
            leaves, groups = {}, {}

            def visit(name, obj):
                if isinstance(obj, h5py.Group):
                    groups[name] = bool(obj.attrs.get(_LIST, False))
            f.visititems(visit)
            for name, obj in datasets.items():
                value = obj[()]
                if h5py.check_string_dtype(obj.dtype) is not None:
                    value = value.decode("utf-8") if isinstance(value, bytes) else str(value)
                leaves[name] = value
    except StorageError:
        raise
    except (OSError, KeyError, RuntimeError, ValueError, TypeError) as exc:   # h5py's errors for torn files
        raise StorageError(f"{path}: unreadable or truncated HDF5 file ({exc})") from None
    meta_json = attrs.get("meta")
    if not isinstance(meta_json, str) or attrs.get("sha256") != _digest(fmt, meta_json, leaves):
        raise StorageError(f"{path}: checksum mismatch (file is corrupt or was edited)")
    meta = json.loads(meta_json)
    if not isinstance(meta, dict):
        raise StorageError(f"{path}: attribute 'meta' must be a JSON object")
    try:
        return _unflatten(leaves, groups), meta
    except (KeyError, TypeError, ValueError) as exc:
        raise StorageError(f"{path}: malformed record layout ({exc})") from None


def _check_format(path: str, attrs: dict, fmt: str) -> None:
    if attrs.get("format") != fmt:
        raise StorageError(f"{path}: attribute 'format' must be {fmt!r}, got {attrs.get('format')!r}")
    if _int(attrs.get("format_version")) != FORMAT_VERSION:
        raise StorageError(f"{path}: format_version {attrs.get('format_version')!r} is not supported "
                           f"(this ngsgd_mpi reads {FORMAT_VERSION})")


def _int(value):
    try:
        return int(value)
    except (TypeError, ValueError):
        return None


def _digest(fmt: str, meta_json: str, leaves: dict) -> str:
    h = hashlib.sha256(f"{fmt}|{FORMAT_VERSION}|{meta_json}|".encode())
    for name in sorted(leaves):
        value = leaves[name]
        if isinstance(value, str):
            h.update(f"{name}|str|{value}|".encode())
            continue
        a = np.ascontiguousarray(value)
        h.update(f"{name}|{a.dtype.str}|{a.shape}|".encode())
        h.update(a.tobytes())
    return h.hexdigest()


def _members(node):
    return enumerate(node) if isinstance(node, list) else node.items()


def _flatten(record, prefix: str = ""):
    """(path, leaf) pairs of a nested record; list items are members named 0, 1, ..."""
    for key, value in _members(record):
        if isinstance(key, str) and ("/" in key or not key):
            raise ValueError(f"record key {key!r}: must be non-empty and contain no '/'")
        if isinstance(value, (dict, list)):
            yield from _flatten(value, f"{prefix}{key}/")
        else:
            yield f"{prefix}{key}", value


def _groups(record, prefix: str = ""):
    """(path, is_list) of every dict and list inside a record (so empty ones survive)."""
    for key, value in _members(record):
        if isinstance(value, (dict, list)):
            yield f"{prefix}{key}", isinstance(value, list)
            yield from _groups(value, f"{prefix}{key}/")


def _unflatten(leaves: dict, groups: dict) -> dict:
    root: dict = {}

    def node_at(path: str) -> dict:
        node = root
        for part in path.split("/") if path else []:
            node = node.setdefault(part, {})
        return node

    for name in groups:
        node_at(name)
    for name, value in leaves.items():
        parent, _, leaf = name.rpartition("/")
        node_at(parent)[leaf] = value.item() if isinstance(value, np.generic) else value
    return _as_lists(root, groups, "")


def _as_lists(node, groups: dict, path: str):
    if not isinstance(node, dict):
        return node
    node = {k: _as_lists(v, groups, f"{path}/{k}" if path else k) for k, v in node.items()}
    if groups.get(path):
        return [node[str(i)] for i in range(len(node))]
    return node
