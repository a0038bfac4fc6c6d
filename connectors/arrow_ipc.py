"""Arrow IPC source and sink, stream and file formats."""

from __future__ import annotations

import contextlib
import os
import threading
from collections.abc import Iterator, Mapping
from typing import Any, BinaryIO

import pyarrow as pa

from streamfact.io import Position

__all__ = ["ArrowIPCSink", "ArrowIPCSource"]

PathLike = str | os.PathLike[str]

_FILE_MAGIC = b"ARROW1"
_FILE_PREFIX = 8  # magic padded to 8 bytes; a file-format body is a stream after it
_FORMATS = ("stream", "file")


def _fsync_dir(folder: str) -> None:
    try:
        fd = os.open(folder or ".", os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


class ArrowIPCSource:
    """Read the record batches of one Arrow IPC file, stream or file format.

    Parameters
    ----------
    path:
        The file.
    format:
        ``"stream"``, ``"file"`` or ``"auto"`` (default: ``"file"`` when the
        file starts with the ``ARROW1`` magic, else ``"stream"``).

    Attributes
    ----------
    bounded : bool
        Always True.

    Notes
    -----
    The file is memory-mapped, so batches are zero-copy views of it. Batches
    come as they were written. The position is ``{"batch": i}``, the number
    of batches yielded; in file format :meth:`seek` jumps straight to batch
    ``i`` through the footer, in stream format the first ``i`` batches are
    read past without being copied. A zero-byte file reads as empty.

    Examples
    --------
    >>> import tempfile, os
    >>> import pyarrow as pa
    >>> from streamfact.connectors import ArrowIPCSource
    >>> path = os.path.join(tempfile.mkdtemp(), "data.arrows")
    >>> with pa.OSFile(path, "wb") as f, pa.ipc.new_stream(f, pa.schema([("a", pa.int64())])) as w:
    ...     for i in range(3):
    ...         w.write_batch(pa.record_batch({"a": [i, i]}))
    >>> src = ArrowIPCSource(path)
    >>> src.seek({"batch": 1})
    >>> [b.column("a").to_pylist() for b in src.batches()]
    [[1, 1], [2, 2]]
    >>> src.position()
    {'batch': 3}
    """

    bounded: bool = True

    def __init__(self, path: PathLike, *, format: str = "auto") -> None:
        if format not in (*_FORMATS, "auto"):
            raise ValueError(f"format must be 'auto', 'stream' or 'file', got {format!r}")
        self.path = os.fspath(path)
        self.format = format
        self._batch = 0
        self._mmap: pa.MemoryMappedFile | None = None
        self._gen: Iterator[pa.RecordBatch] | None = None
        self._owner: int | None = None  # thread iterating, once started
        self._closed = False

    def position(self) -> Position:
        """Batches yielded so far, counted from the start of the file."""
        return {"batch": self._batch}

    def seek(self, position: Position) -> None:
        """Resume after ``position["batch"]`` batches on the next iteration."""
        try:
            i = int(position["batch"])
        except (KeyError, TypeError, ValueError) as exc:
            raise ValueError(f"ArrowIPCSource: bad position {position!r}") from exc
        if i < 0:
            raise ValueError(f"ArrowIPCSource: bad position {position!r} (negative)")
        self._batch = i

    def batches(self) -> Iterator[pa.RecordBatch]:
        """Iterate from the current position; the file is opened on the first ``next()``."""
        self._closed = False
        self._owner = None
        gen = self._gen = self._iterate()
        return gen

    def close(self) -> None:
        """Stop iteration at the next batch and unmap the file; idempotent.

        From a thread other than the one iterating it only signals; that
        thread's iterator ends at its next batch and unmaps the file itself.
        """
        self._closed = True
        gen = self._gen
        if gen is not None and self._owner in (None, threading.get_ident()):
            with contextlib.suppress(ValueError):  # closed from inside the iteration
                gen.close()  # type: ignore[attr-defined]
            self._gen = None

    def _detect(self, mm: pa.MemoryMappedFile) -> str:
        if self.format != "auto":
            return self.format
        head = mm.read(len(_FILE_MAGIC))
        mm.seek(0)
        return "file" if head == _FILE_MAGIC else "stream"

    def _iterate(self) -> Iterator[pa.RecordBatch]:
        self._owner = threading.get_ident()
        start = self._batch
        try:
            try:
                mm = self._mmap = pa.memory_map(self.path, "r")
            except FileNotFoundError as exc:
                raise FileNotFoundError(f"ArrowIPCSource: no such file: {self.path}") from exc
            if mm.size() == 0:
                if start:
                    raise ValueError(f"ArrowIPCSource: bad position {start}, {self.path} is empty")
                return
            try:
                if self._detect(mm) == "file":
                    reader = pa.ipc.open_file(mm)
                    n = reader.num_record_batches
                    if start > n:
                        raise ValueError(
                            f"ArrowIPCSource: bad position, {self.path} has {n} batches, "
                            f"not {start}"
                        )
                    for i in range(start, n):
                        batch = reader.get_batch(i)
                        self._batch = i + 1
                        yield batch
                        if self._closed:
                            return
                else:
                    i = 0
                    for batch in pa.ipc.open_stream(mm):
                        i += 1
                        if i <= start:
                            continue
                        self._batch = i
                        yield batch
                        if self._closed:
                            return
                    if start > i:
                        raise ValueError(
                            f"ArrowIPCSource: bad position, {self.path} has {i} batches, "
                            f"not {start}"
                        )
            except (pa.ArrowException, OSError) as exc:
                raise ValueError(
                    f"ArrowIPCSource: {self.path} is not a readable Arrow IPC file: {exc}"
                ) from exc
        finally:
            mm2, self._mmap = self._mmap, None
            if mm2 is not None:
                mm2.close()

    def __repr__(self) -> str:
        return f"ArrowIPCSource({self.path!r}, position={self.position()})"


class _Appender:
    """File-like object handed to a pyarrow IPC writer.

    Swallows the first ``skip`` bytes (the schema message a new stream writer
    emits, when appending to a stream that already has one) while reporting
    positions as if they had been written, so the writer's 8-byte alignment
    is unchanged (the schema message length is a multiple of 8).
    """

    def __init__(self, fh: BinaryIO, skip: int, base: int) -> None:
        self._fh = fh
        self._skip = skip
        self._pos = base
        self.closed = False

    def write(self, data: Any) -> int:
        view = memoryview(data).cast("B")
        n = len(view)
        if self._skip:
            k = min(self._skip, n)
            view = view[k:]
            self._skip -= k
        if len(view):
            self._fh.write(view)
        self._pos += n
        return n

    def tell(self) -> int:
        return self._pos

    def flush(self) -> None:
        self._fh.flush()

    def close(self) -> None:
        self.closed = True

    def writable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return False


def _schema_message_size(schema: pa.Schema) -> int:
    out = pa.BufferOutputStream()
    with pa.ipc.new_stream(out, schema):
        pass
    return int(out.tell()) - 8  # minus the end-of-stream marker


class ArrowIPCSink:
    """Write batches to one Arrow IPC file, stream or file format.

    Parameters
    ----------
    path:
        Output file; replaced if it exists (unless :meth:`restore` is used).
    format:
        ``"stream"`` (default, readable while being written) or ``"file"``
        (random access; readable once :meth:`close` wrote the footer).

    Notes
    -----
    ``flush()`` fsyncs what was written and returns
    ``{"offset": bytes, "batches": k, "rows": n}``. ``restore(state)``, called
    before any write when resuming from a checkpoint, truncates the file back
    to ``offset``, dropping batches written after that flush, and appends
    from there, so the replay leaves no duplicate rows. In stream format the
    new batches are appended after the kept ones; in file format (whose
    footer indexes every batch) the kept batches are copied into a fresh file
    that then replaces the old one. All batches must share one schema.

    Examples
    --------
    >>> import tempfile, os
    >>> import pyarrow as pa
    >>> from streamfact.connectors import ArrowIPCSink, ArrowIPCSource
    >>> path = os.path.join(tempfile.mkdtemp(), "out.arrows")
    >>> sink = ArrowIPCSink(path)
    >>> sink.write(pa.record_batch({"a": [1, 2]}))
    >>> state = sink.flush()
    >>> sink.write(pa.record_batch({"a": [3]}))  # lost in a crash, then replayed
    >>> del sink
    >>> sink = ArrowIPCSink(path)
    >>> sink.restore(state)
    >>> sink.write(pa.record_batch({"a": [3]}))
    >>> sink.close()
    >>> [b.column("a").to_pylist() for b in ArrowIPCSource(path).batches()]
    [[1, 2], [3]]
    """

    def __init__(self, path: PathLike, *, format: str = "stream") -> None:
        if format not in _FORMATS:
            raise ValueError(f"format must be 'stream' or 'file', got {format!r}")
        self.path = os.fspath(path)
        self.format = format
        self._fh: BinaryIO | None = None
        self._writer: pa.ipc.RecordBatchStreamWriter | pa.ipc.RecordBatchFileWriter | None = None
        self._schema: pa.Schema | None = None
        self._resume_offset = 0  # > 0 after restore: bytes kept at the head of the file
        self._offset = 0
        self._batches = 0
        self._rows = 0
        self._closed = False

    def _open(self, schema: pa.Schema) -> None:
        folder = os.path.dirname(self.path)
        if folder:
            os.makedirs(folder, exist_ok=True)
        keep = self._resume_offset
        if keep == 0:
            self._fh = open(self.path, "wb")
            self._writer = self._new_writer(self._fh, schema, skip=0, base=0)
            return
        old_schema = self._read_schema()
        if not schema.equals(old_schema):
            raise ValueError(
                f"ArrowIPCSink: batch schema differs from that of {self.path}:\n"
                f"{schema}\nvs\n{old_schema}"
            )
        if self.format == "stream":
            fh = open(self.path, "r+b")
            fh.seek(keep)
            self._fh = fh
            self._writer = self._new_writer(fh, schema, _schema_message_size(schema), keep)
        else:
            self._rewrite_file(schema)

    def _new_writer(
        self, fh: BinaryIO, schema: pa.Schema, skip: int, base: int
    ) -> pa.ipc.RecordBatchStreamWriter | pa.ipc.RecordBatchFileWriter:
        out = pa.PythonFile(_Appender(fh, skip, base), mode="w")
        if self.format == "stream":
            return pa.ipc.new_stream(out, schema)
        return pa.ipc.new_file(out, schema)

    def _read_schema(self) -> pa.Schema:
        mm = pa.memory_map(self.path, "r")
        try:
            if self.format == "file":
                mm.seek(_FILE_PREFIX)
            return pa.ipc.open_stream(mm).schema
        except pa.ArrowException as exc:
            raise ValueError(f"ArrowIPCSink: cannot resume {self.path}: {exc}") from exc
        finally:
            mm.close()

    def _rewrite_file(self, schema: pa.Schema) -> None:
        """Copy the kept batches of a footer-less file-format file into a new one."""
        tmp = self.path + ".tmp"
        mm = pa.memory_map(self.path, "r")
        try:
            mm.seek(_FILE_PREFIX)
            reader = pa.ipc.open_stream(mm)
            fh = open(tmp, "wb")
            writer = self._new_writer(fh, schema, skip=0, base=0)
            for batch in reader:
                writer.write_batch(batch)
            fh.flush()
            os.fsync(fh.fileno())
            os.replace(tmp, self.path)
            _fsync_dir(os.path.dirname(self.path))
        except pa.ArrowException as exc:
            raise ValueError(f"ArrowIPCSink: cannot resume {self.path}: {exc}") from exc
        finally:
            mm.close()
        self._fh, self._writer = fh, writer

    def write(self, batch: pa.RecordBatch) -> None:
        """Append ``batch`` to the file."""
        if self._closed:
            raise RuntimeError("ArrowIPCSink: write after close()")
        if not isinstance(batch, pa.RecordBatch):
            raise TypeError(f"ArrowIPCSink.write expects a RecordBatch, got {type(batch).__name__}")
        if self._writer is None:
            self._open(batch.schema)
            self._schema = batch.schema
        elif not batch.schema.equals(self._schema):
            raise ValueError(
                f"ArrowIPCSink: {self.path} holds one schema; got\n{batch.schema}\n"
                f"after\n{self._schema}"
            )
        assert self._writer is not None
        self._writer.write_batch(batch)
        self._batches += 1
        self._rows += batch.num_rows

    def flush(self) -> dict[str, Any]:
        """Fsync what was written; return ``{"offset", "batches", "rows"}``."""
        if self._fh is not None and not self._fh.closed:
            self._fh.flush()
            os.fsync(self._fh.fileno())
            self._offset = self._fh.tell()
        return {"offset": self._offset, "batches": self._batches, "rows": self._rows}

    def restore(self, state: Mapping[str, Any]) -> None:
        """Truncate the file to ``state["offset"]`` (from :meth:`flush`) and append from there."""
        if self._writer is not None:
            raise RuntimeError("ArrowIPCSink.restore must be called before any write")
        try:
            offset = int(state["offset"])
            batches = int(state["batches"])
            rows = int(state["rows"])
        except (KeyError, TypeError, ValueError) as exc:
            raise ValueError(f"ArrowIPCSink: bad state {state!r}") from exc
        if min(offset, batches, rows) < 0:
            raise ValueError(f"ArrowIPCSink: bad state {state!r}")
        with contextlib.suppress(FileNotFoundError):
            os.remove(self.path + ".tmp")
        if offset == 0:
            with contextlib.suppress(FileNotFoundError):
                os.truncate(self.path, 0)
        else:
            try:
                size = os.path.getsize(self.path)
            except FileNotFoundError as exc:
                raise FileNotFoundError(
                    f"ArrowIPCSink: cannot restore, {self.path} is missing"
                ) from exc
            if size < offset:
                raise ValueError(
                    f"ArrowIPCSink: cannot restore, {self.path} has {size} bytes, "
                    f"the state needs {offset}"
                )
            os.truncate(self.path, offset)
        self._resume_offset = self._offset = offset
        self._batches, self._rows = batches, rows
        self._closed = False

    def close(self) -> None:
        """Finish the file (end-of-stream marker or footer), fsync, close; idempotent."""
        if self._closed:
            return
        self._closed = True
        writer, self._writer = self._writer, None
        fh, self._fh = self._fh, None
        if writer is not None:
            writer.close()
        if fh is not None:
            fh.flush()
            os.fsync(fh.fileno())
            fh.close()

    def __repr__(self) -> str:
        return f"ArrowIPCSink({self.path!r}, format={self.format!r}, batches={self._batches})"
