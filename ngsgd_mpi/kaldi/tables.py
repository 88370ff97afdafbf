"""Kaldi tables without Kaldi binaries: rspecifiers, archives, script files, wspecifiers.

Rspecifiers (``util/kaldi-table.h``), read by :class:`SequentialTable` and :class:`IndexedTable`::

    ark[,OPTS]:RX    an archive: entries "key<space>object", one after another
    scp[,OPTS]:RX    a script file: lines "key LOCATION", LOCATION = RX[:offset][[rows]] or [rows,cols]
    RX               a path; "-" (standard input); "command |" (a shell pipe, /bin/sh as Kaldi's popen)
    OPTS             o s cs p b t bg and their negations (no, ns, ...); only p (permissive) changes
                     what happens here: a damaged scp entry counts as absent, a damaged archive ends
                     there.  The others are promises that let Kaldi save memory; they are accepted.

Beyond Kaldi: a bare name is an archive ("-" and "... |" as above; ``*.scp``: a script file); an
archive path may be a glob (``ali.*.gz``: every match, in natural order: ali.2 before ali.10);
gzipped files (magic ``1f 8b``) are decompressed on the fly, where Kaldi needs
``"ark:gunzip -c x.gz |"``.

Pipes are streamed: nothing is loaded whole.  At the end of the stream the command's exit status
is checked, so a failing command is an error (with its last line of stderr), never a short table.

Objects (``base/io-funcs.cc``, ``matrix/kaldi-matrix.cc``, ``matrix/compressed-matrix.cc``,
``util/kaldi-holder-inl.h``).  A binary object starts with ``"\\0B"``; an "int32" there is a size
byte 4 and 4 little-endian bytes:

* ``FM``/``DM`` rows cols, then raw float32/float64 rows;
* ``CM``/``CM2``/``CM3`` compressed matrices: a header (min, range float32; rows, cols int32) and
  bytes, decompressed exactly as ``CompressedMatrix::CopyToMat`` does, in float32 (C1-C3)::

      (C1) CM2:  x = min + u16 * float(range / 65535)
      (C2) CM3:  x = min + u8 * float(range / 255)
      (C3) CM:   per column four quantiles q = min + range * 1.52590218966964e-05f * u16, then
                 x = q0  + (q25  - q0)  * v        / 64     v <= 64
                     q25 + (q75  - q25) * (v - 64)  / 128    v <= 192
                     q75 + (q100 - q75) * (v - 192) / 63     otherwise
                 ((q - q') * v in float32, the rest in double, rounded to float32 at the end);

* int32 vectors (alignments, ``BasicVectorHolder``): the count, then count int32s.

A text object is ``[ rows on lines ]`` (a matrix) or ``1 2 3`` up to the end of the line (an int32
vector); Kaldi ends the line with a newline, so one that the end of the input cuts off is
truncated.  Every size is checked against what follows: a truncated archive or a corrupt entry
is a :class:`TableError` naming the source, the entry and the byte.

Random access (:class:`IndexedTable`): script files are random access already; plain archive
files by the byte offsets recorded while streaming them once; anything else (pipes, stdin,
gzipped files) is *spooled*: each entry is copied once, as it streams past, to a raw file in a
work directory, so memory holds only the index.

Writing (:class:`TableWriter`): ``ark[,scp][,t]:FILE[,FILE]`` with float32 matrices; files are
written under a temporary name and renamed at :meth:`TableWriter.close`; ``-`` writes the
archive to standard output and nothing else; ``| command`` pipes it into a command.
"""

from __future__ import annotations

import collections
import glob
import gzip
import os
import re
import signal
import struct
import subprocess
import sys
import tempfile
import threading
import zlib

import numpy as np

from ..faults import InputError

READ_OPTIONS = {"o", "no", "s", "ns", "cs", "ncs", "p", "np", "b", "t", "bg"}
WRITE_OPTIONS = {"b", "t", "f", "nf", "p"}
MAX_OBJECT_BYTES = 1 << 31       # one entry larger than this is a corrupt header, not an utterance
MAX_KEY_BYTES = 4096
GZIP_MAGIC = b"\x1f\x8b"
MATRIX, INT_VECTOR = "matrix", "int32 vector"


class TableError(InputError):
    """A Kaldi table that cannot be read or written (the message names the source and entry)."""


# --------------------------------------------------------------------------- rspecifiers

class Rspecifier:
    """A parsed rspecifier: ``kind`` ("ark" | "scp"), ``target`` (the rxfilename, a glob
    allowed), ``options`` and ``text`` (as given, for messages)."""

    def __init__(self, kind: str, target: str, options: frozenset, text: str):
        self.kind, self.target, self.options, self.text = kind, target, options, text

    @property
    def permissive(self) -> bool:
        return "p" in self.options

    @property
    def is_pipe(self) -> bool:
        return _is_pipe(self.target)

    @property
    def is_stdin(self) -> bool:
        return self.target.strip() in ("", "-")

    def __repr__(self) -> str:
        return self.text


def _is_pipe(rx: str) -> bool:
    return rx.rstrip().endswith("|")


def parse_rspecifier(spec: str, what: str = "rspecifier") -> Rspecifier:
    """``ark,s,cs:x`` / ``scp:x`` / a bare name (see the module docstring)."""
    match = re.match(r"^(ark|scp)((?:,[a-z]+)*):(.*)$", spec, re.DOTALL)
    if match:
        kind, opts, target = match.group(1), match.group(2), match.group(3)
        options = frozenset(o for o in opts.split(",") if o)
        unknown = sorted(options - READ_OPTIONS)
        if unknown:
            raise TableError(f"{what} {spec!r}: unknown option(s) {','.join(unknown)} "
                             f"(Kaldi's are {', '.join(sorted(READ_OPTIONS))})")
        if not target.strip() and kind == "scp":
            raise TableError(f"{what} {spec!r}: no script file named")
        return Rspecifier(kind, target, options, spec)
    if re.match(r"^[a-z]+(,[a-z]+)*:", spec) and not os.path.exists(spec):
        raise TableError(f"{what} {spec!r}: expected ark:..., scp:... or a file name")
    kind = "scp" if spec.endswith(".scp") and not _is_pipe(spec) else "ark"
    return Rspecifier(kind, spec, frozenset(), spec)


def natural_key(text: str):
    return [int(tok) if tok.isdigit() else tok for tok in re.split(r"(\d+)", text)]


def expand_paths(target: str, what: str) -> list[str]:
    """The files an archive path names: itself, or every match of a glob in natural order."""
    if os.path.exists(target) or not glob.has_magic(target):
        if not os.path.isfile(target):
            raise TableError(f"{what}: {target}: file does not exist")
        return [target]
    found = sorted(glob.glob(target), key=natural_key)
    if not found:
        raise TableError(f"{what}: no file matches {target}")
    return found


def gzipped_files(spec: Rspecifier, what: str) -> list[str]:
    """The files of a file (or glob) archive that are gzipped, judged by their first bytes."""
    if spec.kind != "ark" or spec.is_pipe or spec.is_stdin:
        return []
    found = []
    for path in expand_paths(spec.target, what):
        with open(path, "rb") as f:
            if f.read(2) == GZIP_MAGIC:
                found.append(path)
    return found


# --------------------------------------------------------------------------- input streams

class _Pipe:
    """A shell command whose stdout we read; its stderr is drained by a thread that keeps the
    last lines (for the error message), so a chatty command never blocks."""

    def __init__(self, command: str, what: str):
        self.command = command.rstrip()[:-1].strip()
        self.what = what
        try:       # its own process group, so that stopping early ends every part of a pipeline
            self.proc = subprocess.Popen(self.command, shell=True, stdin=subprocess.DEVNULL,
                                         stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                         start_new_session=True)
        except OSError as exc:
            raise TableError(f"{what}: cannot run command '{self.command}' ({exc})") from None
        self.tail: collections.deque = collections.deque(maxlen=4)
        self._drain = threading.Thread(target=self._read_stderr, daemon=True)
        self._drain.start()

    def _read_stderr(self) -> None:
        for line in self.proc.stderr:
            line = line.decode("utf-8", "replace").strip()
            if line:
                self.tail.append(line)

    def check(self) -> None:
        """Wait for the command; TableError if it failed."""
        code = self.proc.wait()
        self._close_pipes()
        if code != 0:
            how = f"exit status {code}" if code > 0 else f"killed by signal {-code}"
            last = f": {self.tail[-1][:300]}" if self.tail else ""
            raise TableError(f"{self.what}: command '{self.command}' failed ({how}){last}")

    def kill(self) -> None:
        """Stop reading early: end the command and everything it started."""
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
        self.proc.wait()
        self._close_pipes()

    def _close_pipes(self) -> None:
        self.proc.stdout.close()
        self._drain.join(timeout=5)
        if not self._drain.is_alive():        # else a straggler still holds stderr: leave it
            self.proc.stderr.close()


class Input:
    """A binary input with exact reads, a pushback buffer and a byte count.

    ``path`` is set only for a plain (uncompressed, seekable) file, where byte offsets can be
    used for random access later."""

    def __init__(self, raw, name: str, path: str | None = None, pipe: _Pipe | None = None,
                 owns_raw: bool = True):
        self.raw, self.name, self.path, self.pipe = raw, name, path, pipe
        self.pos = 0
        self._pushed = b""
        self._owns_raw = owns_raw

    def read(self, n: int) -> bytes:
        """Up to n bytes (fewer only at the end of the input)."""
        out = b""
        if self._pushed:
            out, self._pushed = self._pushed[:n], self._pushed[n:]
        while len(out) < n:
            try:
                chunk = self.raw.read(n - len(out))
            except (EOFError, OSError, zlib.error) as exc:
                raise self._read_error(exc) from None
            if not chunk:
                break
            out += chunk
        self.pos += len(out)
        return out

    def exact(self, n: int, what: str) -> bytes:
        start = self.pos
        data = self.read(n)
        if len(data) != n:
            self._fail_if_pipe_failed()
            raise TableError(f"{self.name}: truncated: {what} needs {n} bytes at byte {start}, "
                             f"only {len(data)} are left")
        return data

    def unread(self, data: bytes) -> None:
        self._pushed = data + self._pushed
        self.pos -= len(data)

    def readline(self) -> bytes:
        """Bytes up to and including the next newline (or the end of the input)."""
        if b"\n" in self._pushed:
            line, self._pushed = self._pushed.split(b"\n", 1)
            self.pos += len(line) + 1
            return line + b"\n"
        head, self._pushed = self._pushed, b""
        try:
            rest = self.raw.readline()
        except (EOFError, OSError, zlib.error) as exc:
            raise self._read_error(exc) from None
        self.pos += len(head) + len(rest)
        return head + rest

    def _read_error(self, exc: Exception) -> TableError:
        if isinstance(self.raw, gzip.GzipFile):      # EOFError, BadGzipFile, zlib.error
            return TableError(f"{self.name}: truncated or corrupt compressed data ({exc})")
        return TableError(f"{self.name}: read error ({exc})")

    def _fail_if_pipe_failed(self) -> None:
        if self.pipe is not None:
            self.pipe.check()

    def finish(self) -> None:
        """The input was read to its end: close it; a failed pipe command is an error."""
        self.close(check=True)

    def close(self, check: bool = False) -> None:
        if self._owns_raw and self.raw is not None:
            self.raw.close()
        self.raw = None
        if self.pipe is not None:
            pipe, self.pipe = self.pipe, None
            if check:
                pipe.check()
            else:
                pipe.kill()


def open_input(rx: str, what: str, offset: int | None = None) -> Input:
    """An Input for an rxfilename: a path (gzip decompressed), "-" or "command |"."""
    if _is_pipe(rx):
        if offset is not None:
            raise TableError(f"{what}: a pipe has no byte offsets ({rx!r})")
        pipe = _Pipe(rx, what)
        return Input(pipe.proc.stdout, f"{what}: command '{pipe.command}'", pipe=pipe, owns_raw=False)
    if rx.strip() in ("", "-"):
        if offset is not None:
            raise TableError(f"{what}: standard input has no byte offsets")
        return Input(sys.stdin.buffer, f"{what}: standard input", owns_raw=False)
    if not os.path.isfile(rx):
        raise TableError(f"{what}: {rx}: file does not exist")
    try:
        raw = open(rx, "rb")
    except OSError as exc:
        raise TableError(f"{what}: {rx}: cannot open ({exc.strerror})") from None
    magic = raw.read(2)
    raw.seek(0)
    if magic == GZIP_MAGIC:
        raw.close()
        if offset is not None:
            raise TableError(f"{what}: {rx} is gzipped: byte offsets into it are not supported")
        return Input(gzip.open(rx, "rb"), rx)
    if rx.endswith(".gz"):
        raw.close()
        raise TableError(f"{what}: {rx}: not a gzip file (it does not start with 1f 8b)")
    inp = Input(raw, rx, path=rx)
    if offset:
        raw.seek(offset)
        inp.pos = offset
    return inp


# --------------------------------------------------------------------------- objects

def read_key(inp: Input) -> str | None:
    """The next entry's key (whitespace before it skipped), or None at the end of the input."""
    c = inp.read(1)
    while c in (b" ", b"\t", b"\n", b"\r"):
        c = inp.read(1)
    if not c:
        return None
    start, key = inp.pos - 1, bytearray(c)
    while True:
        c = inp.read(1)
        if c in (b" ", b"\t"):
            break
        if c == b"\n":                    # Kaldi allows it: the object starts on the next line
            inp.unread(c)
            break
        if not c:
            inp._fail_if_pipe_failed()
            raise TableError(f"{inp.name}: truncated (or not a Kaldi archive): the input ends inside "
                             f"the key that starts at byte {start}")
        key += c
        if c[0] < 0x21 or c[0] == 0x7f or len(key) > MAX_KEY_BYTES:
            break
    if any(b < 0x21 or b == 0x7f for b in key) or len(key) > MAX_KEY_BYTES:   # Kaldi keys are printable
        raise TableError(f"{inp.name}: not a Kaldi archive: no 'key object' entry at byte {start}")
    try:
        return key.decode("utf-8")
    except UnicodeDecodeError:
        raise TableError(f"{inp.name}: not a Kaldi archive: the key at byte {start} is not text") from None


def _binary_int32(inp: Input, what: str) -> int:
    size_and_value = inp.exact(5, what)
    if size_and_value[0] != 4:
        raise TableError(f"{inp.name}: {what} at byte {inp.pos - 5}: expected a 4-byte integer, "
                         f"got size byte {size_and_value[0]}")
    return struct.unpack("<i", size_and_value[1:])[0]


def _check_size(inp: Input, where: str, nbytes: int, *dims: int) -> None:
    if any(d < 0 for d in dims) or nbytes > MAX_OBJECT_BYTES:
        raise TableError(f"{inp.name}: {where}: implausible size {' x '.join(map(str, dims))} "
                         f"(corrupt entry?)")


def _binary_token(inp: Input, where: str) -> str:
    token = bytearray()
    while True:
        c = inp.exact(1, f"{where}: the type token")
        if c == b" ":
            return token.decode("latin-1")
        token += c
        if len(token) > 8:
            raise TableError(f"{inp.name}: {where}: unknown object type {bytes(token)[:8]!r}")


def _decompress(inp: Input, token: str, where: str) -> np.ndarray:
    header = inp.exact(16, f"{where}: the compressed-matrix header")
    min_value, value_range = np.frombuffer(header[:8], "<f4")
    rows, cols = struct.unpack("<ii", header[8:])
    if cols == 0 or rows == 0:
        return np.zeros((max(rows, 0), max(cols, 0)), np.float32)
    per_col = 8 * cols if token == "CM" else 0
    nbytes = per_col + rows * cols * (2 if token == "CM2" else 1)
    _check_size(inp, where, nbytes, rows, cols)
    body = inp.exact(nbytes, f"{where}: {rows} x {cols} compressed values")
    f32 = np.float32
    if token == "CM2":                                                   # (C1)
        increment = f32(np.float64(value_range) * (1.0 / 65535.0))
        data = np.frombuffer(body, "<u2").reshape(rows, cols)
        return min_value + data.astype(f32) * increment
    if token == "CM3":                                                   # (C2)
        increment = f32(np.float64(value_range) * (1.0 / 255.0))
        data = np.frombuffer(body, "u1").reshape(rows, cols)
        return min_value + data.astype(f32) * increment
    quantiles = np.frombuffer(body[:per_col], "<u2").reshape(cols, 4).astype(f32)   # (C3)
    q = min_value + value_range * f32(1.52590218966964e-05) * quantiles
    q0, q25, q75, q100 = (q[:, i:i + 1] for i in range(4))
    v = np.frombuffer(body[per_col:], "u1").reshape(cols, rows)
    vf = v.astype(f32)
    low = q0.astype(np.float64) + ((q25 - q0) * vf).astype(np.float64) * (1 / 64.0)
    mid = q25.astype(np.float64) + ((q75 - q25) * (vf - f32(64))).astype(np.float64) * (1 / 128.0)
    high = q75.astype(np.float64) + ((q100 - q75) * (vf - f32(192))).astype(np.float64) * (1 / 63.0)
    out = np.where(v <= 64, low, np.where(v <= 192, mid, high)).astype(f32)
    return np.ascontiguousarray(out.T)


def _read_binary(inp: Input, kind: str, where: str) -> np.ndarray:
    first = inp.exact(1, f"{where}: the object type")
    if first == b"\x04":
        if kind != INT_VECTOR:
            raise TableError(f"{inp.name}: {where}: an int32 vector where a matrix was expected")
        inp.unread(first)
        count = _binary_int32(inp, f"{where}: the vector length")
        _check_size(inp, where, 5 * count, count)
        items = np.frombuffer(inp.exact(5 * count, f"{where}: {count} integers"),
                              dtype=[("size", "u1"), ("value", "<i4")])
        if count and np.any(items["size"] != 4):
            raise TableError(f"{inp.name}: {where}: corrupt int32 vector (a size byte is not 4)")
        return items["value"].astype(np.int32)
    inp.unread(first)
    token = _binary_token(inp, where)
    if kind == INT_VECTOR:
        raise TableError(f"{inp.name}: {where}: a {token} object where an int32 vector (alignment) "
                         f"was expected")
    if token in ("CM", "CM2", "CM3"):
        return _decompress(inp, token, where)
    if token not in ("FM", "DM"):
        raise TableError(f"{inp.name}: {where}: object type {token!r} is not a matrix "
                         f"(expected FM, DM, CM, CM2 or CM3)")
    rows = _binary_int32(inp, f"{where}: the number of rows")
    cols = _binary_int32(inp, f"{where}: the number of columns")
    dtype = np.dtype("<f4" if token == "FM" else "<f8")
    _check_size(inp, where, rows * cols * dtype.itemsize, rows, cols)
    data = inp.exact(rows * cols * dtype.itemsize, f"{where}: {rows} x {cols} values")
    return np.frombuffer(data, dtype).reshape(rows, cols).astype(dtype.newbyteorder("="))


def _read_text(inp: Input, kind: str, where: str) -> np.ndarray:
    start = inp.pos
    line = inp.readline()
    text = line.decode("utf-8", "replace")
    if kind == INT_VECTOR:
        if not line.endswith(b"\n"):            # Kaldi ends the line with one; "]" ends a matrix
            inp._fail_if_pipe_failed()
            raise TableError(f"{inp.name}: truncated: {where}: the input ends inside its line "
                             f"(byte {start}), without the newline Kaldi writes")
        try:
            return np.array([int(t) for t in text.split()], dtype=np.int64).astype(np.int32)
        except (ValueError, OverflowError):
            raise TableError(f"{inp.name}: {where}: expected integers, got "
                             f"{' '.join(text.split()[:5])[:80]!r}") from None
    if not text.strip().startswith("["):
        raise TableError(f"{inp.name}: {where}: expected a binary object or a text matrix '[ ... ]'")
    body = [text.split("[", 1)[1]]
    while "]" not in body[-1]:
        line = inp.readline()
        if not line:
            inp._fail_if_pipe_failed()
            raise TableError(f"{inp.name}: truncated: {where}: the text matrix has no closing ']'")
        body.append(line.decode("utf-8", "replace"))
    body[-1] = body[-1].split("]", 1)[0]
    try:
        rows = [[float(t) for t in row.split()] for row in body]
    except ValueError:
        raise TableError(f"{inp.name}: {where}: a text matrix holds a value that is not a number") from None
    rows = [r for r in rows if r]
    if len({len(r) for r in rows}) > 1:
        raise TableError(f"{inp.name}: {where}: the rows of the text matrix differ in length")
    return np.array(rows, dtype=np.float32).reshape(len(rows), len(rows[0]) if rows else 0)


def read_object(inp: Input, kind: str, where: str) -> np.ndarray:
    """One object (binary or text) of the given kind, from the current position."""
    head = inp.read(2)
    if head == b"\0B":
        return _read_binary(inp, kind, where)
    inp.unread(head)
    return _read_text(inp, kind, where)


def read_archive(inp: Input, kind: str):
    """(key, object, offset of the object) of every entry of one archive input, to its end."""
    while True:
        key = read_key(inp)
        if key is None:
            inp.finish()
            return
        offset = inp.pos
        yield key, read_object(inp, kind, f"entry {key!r} at byte {offset}"), offset


# --------------------------------------------------------------------------- script-file locations

_LOCATION = re.compile(r"^(?P<rx>.*?)(?::(?P<offset>\d+))?(?:\[(?P<range>[0-9:,\s]*)\])?$", re.DOTALL)


def _parse_range(text: str, where: str):
    """Kaldi's "[r1:r2]" / "[r1:r2,c1:c2]" (inclusive ends) as slices."""
    slices = []
    for part in text.split(","):
        part = part.strip()
        if part in ("", ":"):
            slices.append(slice(None))
            continue
        ends = part.split(":")
        if len(ends) != 2 or not all(e.strip().isdigit() for e in ends):
            raise TableError(f"{where}: bad range [{text}] (expected [first:last] or [rows,cols])")
        first, last = int(ends[0]), int(ends[1])
        if last < first:
            raise TableError(f"{where}: bad range [{text}]: the last index is before the first")
        slices.append(slice(first, last + 1))
    if len(slices) > 2:
        raise TableError(f"{where}: bad range [{text}]")
    return tuple(slices)


class LocationReader:
    """Reads the objects named by script-file locations, keeping plain files open."""

    MAX_OPEN = 32

    def __init__(self, kind: str, what: str):
        self.kind, self.what = kind, what
        self._open: collections.OrderedDict = collections.OrderedDict()

    def read(self, key: str, location: str) -> np.ndarray:
        where = f"{self.what}: the location {location!r} of {key!r}"
        if _is_pipe(location):
            inp = open_input(location, where)
            try:
                value = read_object(inp, self.kind, f"entry {key!r}")
                inp.finish()
            finally:
                inp.close()
            return value
        match = _LOCATION.match(location)
        rx, offset, ranges = match.group("rx"), match.group("offset"), match.group("range")
        if offset is None and ranges is None and os.path.isfile(location):
            rx = location                                  # a file name that merely ends in digits
        value = self.read_at(key, rx, int(offset or 0), where)
        if ranges is not None:
            if value.ndim != 2:
                raise TableError(f"{where}: a range needs a matrix")
            sl = _parse_range(ranges, where)
            rows = sl[0]
            if rows.stop is not None and rows.stop > len(value):
                raise TableError(f"{where}: the range asks for rows up to {rows.stop - 1}, "
                                 f"the matrix has {len(value)}")
            value = np.ascontiguousarray(value[sl])
        return value

    def read_at(self, key: str, path: str, offset: int, where: str | None = None) -> np.ndarray:
        """The object at byte ``offset`` of the plain file ``path``."""
        inp = self._input(path, where or f"{self.what}: {key!r} at {path}:{offset}")
        inp.raw.seek(offset)
        inp.pos, inp._pushed = offset, b""
        return read_object(inp, self.kind, f"entry {key!r} at byte {offset}")

    def _input(self, rx: str, where: str) -> Input:
        inp = self._open.pop(rx, None)
        if inp is None:
            inp = open_input(rx, where, offset=0)
            if inp.path is None:
                inp.close()
                raise TableError(f"{where}: a script-file location must be a plain file or a pipe")
            if len(self._open) >= self.MAX_OPEN:
                self._open.popitem(last=False)[1].close()
        self._open[rx] = inp
        return inp

    def close(self) -> None:
        for inp in self._open.values():
            inp.close()
        self._open.clear()


def read_script(inp: Input):
    """(key, location) of every line of a script file."""
    line_no = 0
    while True:
        line = inp.readline()
        if not line:
            inp.finish()
            return
        line_no += 1
        text = line.decode("utf-8", "replace").strip()
        if not text:
            continue
        parts = text.split(None, 1)
        if len(parts) != 2:
            raise TableError(f"{inp.name}, line {line_no}: expected '<key> <location>'")
        yield parts[0], parts[1]


# --------------------------------------------------------------------------- reading tables

class SequentialTable:
    """Every entry of an rspecifier in order, streamed: iterate for (key, value, location).

    ``location`` says where the entry can be read again: ("scp", text) for a script-file entry,
    ("file", path, offset) for a plain archive file, None for a stream (pipe, stdin, gzip)."""

    def __init__(self, spec: str, kind: str = MATRIX, what: str = "table"):
        self.spec = parse_rspecifier(spec, what)
        self.kind, self.what = kind, what
        self.name = f"{what} {spec}"
        self.damaged = 0                      # entries given up on under option p
        self.current = self.name              # the file or command being read (for messages)
        self._inputs: list[Input] = []
        self.locations = LocationReader(kind, self.name)
        self.paths = None                     # the files of a file (or glob) archive
        if self.spec.kind == "ark" and not (self.spec.is_pipe or self.spec.is_stdin):
            self.paths = expand_paths(self.spec.target, self.name)   # fail early
        elif self.spec.kind == "scp" and not (self.spec.is_pipe or self.spec.is_stdin) \
                and not os.path.isfile(self.spec.target):
            raise TableError(f"{self.name}: {self.spec.target}: file does not exist")

    def __iter__(self):
        return self.entries()

    def entries(self, rank: int = 0, size: int = 1):
        """(key, value, location) of entries rank, rank + size, ... (script files read only
        those; archives must be read through)."""
        try:
            if self.spec.kind == "scp":
                yield from self._script_entries(rank, size)
            else:
                i = 0
                for rx in self.paths or [self.spec.target]:
                    for entry in self._archive_entries(rx):
                        if i % size == rank:
                            yield entry
                        i += 1
        finally:
            self.close()

    def _archive_entries(self, rx: str):
        inp = open_input(rx, self.what)
        self._inputs.append(inp)
        self.current = inp.name
        entries = read_archive(inp, self.kind)
        while True:
            try:
                key, value, offset = next(entries)
            except StopIteration:
                break
            except TableError:
                if not self.spec.permissive:
                    raise
                self.damaged += 1             # Kaldi's p: a damaged archive ends here
                break
            yield key, value, (("file", inp.path, offset) if inp.path else None)
        inp.close()
        self._inputs.remove(inp)

    def _script_entries(self, rank: int = 0, size: int = 1):
        inp = open_input(self.spec.target, self.name)
        self._inputs.append(inp)
        for i, (key, location) in enumerate(read_script(inp)):
            if i % size != rank:
                continue
            try:
                value = self.locations.read(key, location)
            except TableError:
                if not self.spec.permissive:
                    raise
                self.damaged += 1             # Kaldi's p: an unreadable entry is absent
                continue
            yield key, value, ("scp", location)

    def close_inputs(self) -> None:
        for inp in self._inputs:
            inp.close()
        self._inputs.clear()

    def close(self) -> None:
        self.close_inputs()
        self.locations.close()


class Spool:
    """Arrays copied to one raw file as they stream past, read back by (offset, dtype, shape)."""

    def __init__(self, workdir: str | None):
        if workdir is None:
            self._tmpdir = tempfile.TemporaryDirectory(prefix="ngsgd-spool-")
            workdir = self._tmpdir.name
        else:
            self._tmpdir = None
            os.makedirs(workdir, exist_ok=True)
        fd, self.path = tempfile.mkstemp(prefix="spool-", suffix=".raw", dir=workdir)
        self._file = os.fdopen(fd, "w+b")
        self._end = 0

    def append(self, array: np.ndarray) -> tuple:
        array = np.ascontiguousarray(array)
        self._file.seek(self._end)
        self._file.write(array.tobytes())
        handle = (self._end, array.dtype.str, array.shape)
        self._end += array.nbytes
        return handle

    def read(self, handle: tuple) -> np.ndarray:
        offset, dtype, shape = handle
        dtype = np.dtype(dtype)
        self._file.seek(offset)
        data = self._file.read(int(np.prod(shape)) * dtype.itemsize)
        return np.frombuffer(data, dtype).reshape(shape)

    def close(self) -> None:
        self._file.close()
        os.remove(self.path)
        if self._tmpdir is not None:
            self._tmpdir.cleanup()


class IndexedTable:
    """A table read by key: :meth:`items` streams it once, remembering where every entry can
    be read again (:meth:`read`); :meth:`index` does that without yielding.

    ``convert(key, value)`` is applied to every entry once, as it streams past (e.g. mapping
    transition-ids to pdfs); entries from a stream are spooled after conversion."""

    def __init__(self, spec: str, kind: str = MATRIX, what: str = "table", workdir: str | None = None,
                 convert=None):
        self.table = SequentialTable(spec, kind, what)
        self.spec, self.what, self.name = self.table.spec, what, self.table.name
        self.convert = convert
        self.workdir = workdir
        self._where: dict[str, tuple] = {}
        self._spool: Spool | None = None
        self._files = LocationReader(kind, self.name)
        self.indexed = False

    def items(self, rank: int = 0, size: int = 1):
        """(key, value) of entries rank, rank + size, ... in table order (all of them indexed)."""
        if self.indexed:
            for i, key in enumerate(list(self._where)):
                if i % size == rank:
                    yield key, self.read(key)
            return
        for i, (key, value, location) in enumerate(self.table):
            if key in self._where:
                raise TableError(f"{self.name}: key {key!r} appears twice")
            if self.convert is not None:
                value = self.convert(key, value)
            if location is None:                  # a stream: keep a copy
                if self._spool is None:
                    self._spool = Spool(self.workdir)
                location = ("spool", self._spool.append(value))
            self._where[key] = location
            if i % size == rank:
                yield key, value
        self.indexed = True

    def index(self) -> "IndexedTable":
        """Stream the whole table once (a table that fails to read is closed)."""
        try:
            for _ in self.items():
                pass
        except BaseException:
            self.close()
            raise
        return self

    def keys(self) -> list[str]:
        return list(self._where)

    def __contains__(self, key) -> bool:
        return key in self._where

    def __len__(self) -> int:
        return len(self._where)

    def read(self, key: str) -> np.ndarray:
        location = self._where[key]
        if location[0] == "spool":
            return self._spool.read(location[1])
        if location[0] == "file":
            value = self._files.read_at(key, location[1], location[2])
        else:
            value = self.table.locations.read(key, location[1])
        return value if self.convert is None else self.convert(key, value)

    def close(self) -> None:
        self.table.close()
        self._files.close()
        if self._spool is not None:
            self._spool.close()
            self._spool = None


def as_feature_matrix(utt_id: str, feats, where: str) -> np.ndarray:
    """A float32 (frames, dim) matrix, as Kaldi's BaseFloat matrix readers give."""
    feats = np.asarray(feats)
    if feats.ndim != 2 or feats.dtype.kind != "f":
        raise TableError(f"{where}: the features of {utt_id!r} must be a float matrix, "
                         f"got a {feats.dtype} array of shape {feats.shape}")
    return feats.astype(np.float32, copy=False)


def read_text_map(path: str, what: str) -> dict[str, str]:
    """A text table of "key value" lines (utt2spk, spk2gender, ...); duplicates are errors."""
    if not os.path.isfile(path):
        raise TableError(f"{what}: {path}: file does not exist")
    out = {}
    with open(path, encoding="utf-8", errors="replace") as f:
        for line_no, line in enumerate(f, 1):
            parts = line.split()
            if not parts:
                continue
            if len(parts) != 2:
                raise TableError(f"{path}, line {line_no}: expected '<key> <value>'")
            if parts[0] in out:
                raise TableError(f"{path}, line {line_no}: key {parts[0]!r} appears twice")
            out[parts[0]] = parts[1]
    return out


# --------------------------------------------------------------------------- writing

def rank_path(path: str, rank: int) -> str:
    """out.ark -> out.<rank>.ark"""
    root, ext = os.path.splitext(path)
    return f"{root}.{rank}{ext}"


def parse_wspecifier(wspecifier: str) -> tuple[list[str], list[str]]:
    """(types, files) of ``ark[,scp][,t...]:file[,file]``; the files follow the order of
    'ark'/'scp' among the types (see :func:`output_files`)."""
    if ":" not in wspecifier:
        raise TableError(f"--out must be a Kaldi wspecifier like ark,scp:out.ark,out.scp, "
                         f"got {wspecifier!r}")
    types_part, files_part = wspecifier.split(":", 1)
    types = types_part.split(",")
    unknown = [t for t in types if t not in WRITE_OPTIONS | {"ark", "scp"}]
    if unknown:
        raise TableError(f"--out {wspecifier!r}: unknown option(s) {','.join(unknown)}")
    num_files = sum(t in ("ark", "scp") for t in types)
    files = files_part.split(",", num_files - 1) if num_files else []
    if "ark" not in types or len(files) != num_files or not all(f.strip() for f in files):
        raise TableError(f"--out must name an ark (and optionally an scp), e.g. "
                         f"ark,scp:out.ark,out.scp, got {wspecifier!r}")
    named = output_files(types, files)
    if "scp" in named and not _is_plain_output(named["ark"]):
        raise TableError(f"--out {wspecifier!r}: an scp needs the ark in a file (not a pipe or -)")
    return types, files


def _is_plain_output(wx: str) -> bool:
    return wx.strip() != "-" and not wx.lstrip().startswith("|")


def output_files(types: list[str], files: list[str]) -> dict[str, str]:
    """{"ark": path, "scp": path (if requested)} of a parsed wspecifier."""
    return dict(zip([t for t in types if t in ("ark", "scp")], files))


def rank_wspecifier(wspecifier: str, rank: int, size: int) -> tuple[str, list[str]]:
    """(wspecifier, files) that this rank writes: the requested ones with one rank,
    ``out.<rank>.ark`` etc. with several."""
    types, files = parse_wspecifier(wspecifier)
    plain = [f for f in files if _is_plain_output(f)]
    if size == 1:
        return wspecifier, plain
    if len(plain) != len(files):
        raise TableError("with several ranks --out must name files (each rank writes its own)")
    files = [rank_path(f, rank) for f in files]
    return ",".join(types) + ":" + ",".join(files), files


class TableWriter:
    """Float32 matrices as a Kaldi archive (binary, or text with ``t``) and optionally a script.

    Files appear under their names only at :meth:`close` (temporary name, fsync, rename);
    :meth:`abort` removes what was written.  ``-`` is standard output: only the archive goes
    there.  ``| command`` pipes the archive into a shell command (its failure is an error)."""

    def __init__(self, wspecifier: str, what: str = "--out"):
        types, files = parse_wspecifier(wspecifier)
        named = output_files(types, files)
        self.what, self.text = what, "t" in types
        self.ark_name, self.scp_name = named["ark"].strip(), named.get("scp")
        self._renames: list[tuple[str, str]] = []
        self._pipe = None
        if self.ark_name == "-":
            self._ark, self._owns_ark = sys.stdout.buffer, False
        elif self.ark_name.startswith("|"):
            command = self.ark_name[1:].strip()
            try:
                self._pipe = subprocess.Popen(command, shell=True, stdin=subprocess.PIPE)
            except OSError as exc:
                raise TableError(f"{what}: cannot run command '{command}' ({exc})") from None
            self._pipe_command = command
            self._ark, self._owns_ark = self._pipe.stdin, False
        else:
            self._ark, self._owns_ark = self._open_temp(self.ark_name), True
        self._scp = self._open_temp(self.scp_name, text=True) if self.scp_name else None
        self._offset = 0

    def _open_temp(self, path: str, text: bool = False):
        directory = os.path.dirname(os.path.abspath(path))
        if not os.path.isdir(directory):
            self.abort()
            raise TableError(f"{self.what}: directory {directory} does not exist")
        tmp = f"{path}.tmp{os.getpid()}"
        self._renames.append((tmp, path))
        return open(tmp, "w", encoding="utf-8") if text else open(tmp, "wb")

    def write(self, key: str, matrix: np.ndarray) -> None:
        if not key or any(c.isspace() for c in key):
            raise TableError(f"{self.what}: key {key!r} is empty or has whitespace")
        matrix = np.asarray(matrix, np.float32)
        rows, cols = matrix.shape
        head = key.encode("utf-8") + b" "
        if self.text:
            lines = ["  " + " ".join(f"{v:.9g}" for v in row) for row in matrix]
            body = (" [\n" + " \n".join(lines) + " ]\n").encode() if rows else b" [ ]\n"
        else:
            body = b"\0BFM \x04" + struct.pack("<i", rows) + b"\x04" + struct.pack("<i", cols) + \
                np.ascontiguousarray(matrix, "<f4").tobytes()
        try:
            self._ark.write(head)
            if self._scp is not None:
                self._scp.write(f"{key} {self.ark_name}:{self._offset + len(head)}\n")
            self._ark.write(body)
        except BrokenPipeError:
            raise TableError(f"{self.what}: the reader of {self.ark_name!r} went away "
                             f"(broken pipe)") from None
        self._offset += len(head) + len(body)

    def close(self) -> None:
        """Finish: flush, fsync and rename the files; check a pipe command's status."""
        try:
            for handle, owned in ((self._ark, self._owns_ark), (self._scp, True)):
                if handle is None:
                    continue
                handle.flush()
                if owned:
                    os.fsync(handle.fileno())
                    handle.close()
        except BrokenPipeError:
            self.abort()
            raise TableError(f"{self.what}: the reader of {self.ark_name!r} went away "
                             f"(broken pipe)") from None
        if self._pipe is not None:
            self._pipe.stdin.close()
            code = self._pipe.wait()
            self._pipe = None
            if code != 0:
                self.abort()
                raise TableError(f"{self.what}: command '{self._pipe_command}' failed "
                                 f"(exit status {code})")
        for tmp, path in self._renames:
            os.replace(tmp, path)
        self._renames = []

    def abort(self) -> None:
        """Remove what was written (temporary files); stop a pipe command."""
        for handle, owned in ((getattr(self, "_ark", None), getattr(self, "_owns_ark", False)),
                              (getattr(self, "_scp", None), True)):
            if handle is not None and owned and not handle.closed:
                handle.close()
        if self._pipe is not None:
            self._pipe.kill()
            self._pipe.wait()
            self._pipe = None
        for tmp, _ in self._renames:
            if os.path.exists(tmp):
                os.remove(tmp)
        self._renames = []

    def __enter__(self):
        return self

    def __exit__(self, exc_type, exc, tb):
        if exc_type is None:
            self.close()
        else:
            self.abort()
