"""Parquet source (file, folder, file list; optional folder tailing) and rolling Parquet sink."""

from __future__ import annotations

import contextlib
import os
import re
import threading
import time
import warnings
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from streamfact.io import Position

__all__ = ["ParquetSink", "ParquetSource"]

PathLike = str | os.PathLike[str]


def _is_data_file(name: str) -> bool:
    return (
        name.endswith(".parquet") and not name.startswith((".", "_")) and not name.endswith(".tmp")
    )


def _fsync_dir(folder: str) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:  # platforms without directory handles
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _fsync_file(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class ParquetSource:
    """Stream record batches from Parquet files, row group by row group.

    Parameters
    ----------
    path:
        One ``.parquet`` file, a folder, or a list of files. A folder means
        every ``*.parquet`` file directly inside it, in name order, ignoring
        names that start with ``.`` or ``_`` or end in ``.tmp`` (files being
        written). A list is read in the order given.
    batch_size:
        Largest number of rows per batch. Batches never span row groups, so a
        row group's last batch may be shorter.
    columns:
        Top-level column names to read (default: all).
    follow:
        Tail a folder: once the known files are read, poll it every
        ``poll_interval`` seconds for files whose names sort after the last
        file read, and read those too. The source is then unbounded; it ends
        when :meth:`close` is called (from any thread) or after
        ``stop_after_idle`` seconds without a new file.
    poll_interval:
        Seconds between folder listings in follow mode.
    stop_after_idle:
        Follow mode only: stop after this many seconds with no new file
        (default: never).
    strict_schema:
        ``True`` (default): every file must have the first file's schema.
        ``False``: batches keep their own file's schema, and the stage that
        binds columns rejects rows lacking a column under its error policy
        (what a long-running service following a shared folder wants).

    Attributes
    ----------
    bounded : bool
        ``not follow``.

    Notes
    -----
    Only one row group's batches are decoded at a time (through
    ``ParquetFile.iter_batches``); no file is loaded whole. Per batch the
    source adds a few integer updates to pyarrow's own cost.

    The position is ``{"file": name, "row_group": g, "row": r}``: the source
    has yielded the first ``r`` rows of row group ``g`` of ``name`` and every
    row before them. ``name`` is relative to the folder (or the file's base
    name for a single file, the path as given for a list); ``file`` is None
    before anything was read. When a row group ends the position moves to
    ``(g + 1, 0)``, so a finished file reads ``row_group == num_row_groups``.
    :meth:`seek` to a position and iterating again yields exactly the rows
    that follow, with the same batch boundaries an uninterrupted run would
    have had whenever ``r`` is a multiple of ``batch_size``.

    Files are consumed in name order: in follow mode a file that appears with
    a name sorting before one already read is skipped with a warning (write
    files with increasing names, e.g. with :class:`ParquetSink`, and rename
    them into place so a half-written file is never listed).

    With ``strict_schema`` all files must have the same Arrow schema (metadata
    aside); a file that differs, is missing, or is not valid Parquet raises an
    error naming it.

    Examples
    --------
    >>> import tempfile, os
    >>> import pyarrow as pa, pyarrow.parquet as pq
    >>> from streamfact.connectors import ParquetSource
    >>> folder = tempfile.mkdtemp()
    >>> pq.write_table(pa.table({"a": list(range(10))}), os.path.join(folder, "0.parquet"),
    ...                row_group_size=4)
    >>> src = ParquetSource(folder, batch_size=3)
    >>> [b.num_rows for b in src.batches()]
    [3, 1, 3, 1, 2]
    >>> it = ParquetSource(folder, batch_size=3).batches()
    >>> src = ParquetSource(folder, batch_size=3)
    >>> it = src.batches(); _ = next(it); _ = next(it); _ = next(it)
    >>> pos = src.position(); pos
    {'file': '0.parquet', 'row_group': 1, 'row': 3}
    >>> again = ParquetSource(folder, batch_size=3)
    >>> again.seek(pos)
    >>> [b.column("a").to_pylist() for b in again.batches()]
    [[7], [8, 9]]
    """

    def __init__(
        self,
        path: PathLike | Sequence[PathLike],
        *,
        batch_size: int = 65536,
        columns: Sequence[str] | None = None,
        follow: bool = False,
        poll_interval: float = 1.0,
        stop_after_idle: float | None = None,
        strict_schema: bool = True,
    ) -> None:
        if int(batch_size) <= 0:
            raise ValueError(f"batch_size must be positive, got {batch_size}")
        if poll_interval <= 0:
            raise ValueError(f"poll_interval must be positive, got {poll_interval}")
        if isinstance(path, (str, os.PathLike)):
            self._path: str | None = os.fspath(path)
            self._list: list[str] | None = None
        else:
            self._path = None
            self._list = [os.fspath(p) for p in path]
            if follow:
                raise ValueError("follow=True needs a folder, not a list of files")
        self.batch_size = int(batch_size)
        self.columns = None if columns is None else [str(c) for c in columns]
        self.follow = bool(follow)
        self.bounded = not self.follow
        self.poll_interval = float(poll_interval)
        self.stop_after_idle = None if stop_after_idle is None else float(stop_after_idle)
        self.strict_schema = bool(strict_schema)
        self._file: str | None = None
        self._rg = 0
        self._row = 0
        self._stop = threading.Event()
        self._pf: pq.ParquetFile | None = None
        self._gen: Iterator[pa.RecordBatch] | None = None
        self._owner: int | None = None  # thread iterating, once started
        self._schema: pa.Schema | None = None
        self._schema_file: str | None = None
        self._known: set[str] = set()  # names listed so far (follow mode)

    # -- Source protocol -------------------------------------------------

    def position(self) -> Position:
        """Where the last yielded batch ended (see the class Notes)."""
        return {"file": self._file, "row_group": self._rg, "row": self._row}

    def seek(self, position: Position) -> None:
        """Resume at ``position`` (one this source type reported) on the next iteration.

        The file named in the position is looked up when iteration starts; a
        position naming a file that is not there raises ``ValueError``.
        """
        if not isinstance(position, Mapping):
            raise ValueError(f"ParquetSource: bad position {position!r}")
        try:
            file = position["file"]
            rg = int(position.get("row_group", 0))
            row = int(position.get("row", 0))
        except (KeyError, TypeError, ValueError) as exc:
            raise ValueError(f"ParquetSource: bad position {position!r}") from exc
        if file is not None and not isinstance(file, str):
            raise ValueError(f"ParquetSource: bad position {position!r} (file must be a str)")
        if rg < 0 or row < 0:
            raise ValueError(f"ParquetSource: bad position {position!r} (negative)")
        self._file, self._rg, self._row = file, rg, row

    def batches(self) -> Iterator[pa.RecordBatch]:
        """Iterate from the current position; opens nothing until the first ``next()``."""
        self._stop.clear()
        self._owner = None
        gen = self._iterate()
        self._gen = gen
        return gen

    def close(self) -> None:
        """End iteration and close open files; idempotent.

        Called from a thread other than the one iterating, it only signals:
        that thread's iterator ends at its next batch or poll and closes the
        files itself (closing them under it could fail its read).
        """
        self._stop.set()
        gen = self._gen
        if gen is not None and self._owner in (None, threading.get_ident()):
            with contextlib.suppress(ValueError):  # closed from inside the iteration
                gen.close()  # type: ignore[attr-defined]
            self._gen = None

    @property
    def schema(self) -> pa.Schema | None:
        """Arrow schema of the files read so far (None before the first file)."""
        return self._schema

    def __repr__(self) -> str:
        where = self._path if self._path is not None else f"{len(self._list or [])} files"
        return f"ParquetSource({where!r}, position={self.position()})"

    # -- internals --------------------------------------------------------

    def _entries(self) -> list[tuple[str, str]]:
        """(name, full path) of every data file, in reading order."""
        if self._list is not None:
            return [(p, p) for p in self._list]
        assert self._path is not None
        path = self._path
        if os.path.isdir(path):
            names = sorted(n for n in os.listdir(path) if _is_data_file(n))
            return [(n, os.path.join(path, n)) for n in names]
        if os.path.exists(path):
            if self.follow:
                raise ValueError(f"ParquetSource: follow=True needs a folder, {path} is a file")
            return [(os.path.basename(path), path)]
        raise FileNotFoundError(f"ParquetSource: no such file or folder: {path}")

    def _start_index(self, entries: list[tuple[str, str]]) -> int:
        if self._file is None:
            return 0
        for i, (name, _) in enumerate(entries):
            if name == self._file:
                return i
        raise ValueError(
            f"ParquetSource: bad position, file {self._file!r} not found in "
            f"{self._path if self._path is not None else 'the file list'}"
        )

    def _open(self, full: str) -> pq.ParquetFile:
        try:
            pf = pq.ParquetFile(full)
        except FileNotFoundError as exc:
            raise FileNotFoundError(f"ParquetSource: no such file: {full}") from exc
        except (pa.ArrowException, OSError) as exc:
            raise ValueError(
                f"ParquetSource: {full} is not a readable Parquet file: {exc}"
            ) from exc
        try:
            schema = pf.schema_arrow
            if self.columns is not None:
                missing = [c for c in self.columns if schema.get_field_index(c) < 0]
                if missing:
                    raise ValueError(f"ParquetSource: {full} has no column(s) {missing}")
                schema = pa.schema([schema.field(c) for c in self.columns])
            if self._schema is None:
                self._schema, self._schema_file = schema, full
            elif self.strict_schema and not schema.equals(self._schema, check_metadata=False):
                raise ValueError(
                    f"ParquetSource: schema of {full} differs from that of {self._schema_file}:\n"
                    f"{schema}\nvs\n{self._schema}"
                )
        except BaseException:
            pf.close()
            raise
        return pf

    def _close_file(self) -> None:
        pf, self._pf = self._pf, None
        if pf is not None:
            pf.close()

    def _iterate(self) -> Iterator[pa.RecordBatch]:
        self._owner = threading.get_ident()
        try:
            entries = self._entries()
            self._known.update(e[0] for e in entries)
            i = self._start_index(entries)
            rg, row = self._rg, self._row
            while True:
                while i < len(entries):
                    if self._stop.is_set():
                        return
                    yield from self._read_file(entries[i], rg, row)
                    rg = row = 0
                    i += 1
                if not self.follow:
                    return
                new = self._wait_for_new_files()
                if not new:
                    return
                entries, i = new, 0
        finally:
            self._close_file()

    def _wait_for_new_files(self) -> list[tuple[str, str]]:
        idle_since = time.monotonic()
        while True:
            entries = self._entries()
            last = self._file
            new = entries if last is None else [e for e in entries if e[0] > last]
            if last is not None:
                for name, _ in entries:
                    if name < last and name not in self._known:
                        warnings.warn(
                            f"ParquetSource: {name!r} appeared after {last!r} was read "
                            "and sorts before it; it is skipped",
                            stacklevel=2,
                        )
            self._known.update(e[0] for e in entries)
            if new:
                return new
            wait = self.poll_interval
            if self.stop_after_idle is not None:
                left = self.stop_after_idle - (time.monotonic() - idle_since)
                if left <= 0:
                    return []
                wait = min(wait, left)
            if self._stop.wait(wait):
                return []

    def _read_file(self, entry: tuple[str, str], rg: int, row: int) -> Iterator[pa.RecordBatch]:
        name, full = entry
        self._close_file()
        pf = self._pf = self._open(full)
        meta = pf.metadata
        n_groups = meta.num_row_groups
        if rg > n_groups:
            raise ValueError(
                f"ParquetSource: bad position, {full} has {n_groups} row groups, not {rg}"
            )
        self._file, self._rg, self._row = name, rg, row
        batch_size, columns, stop = self.batch_size, self.columns, self._stop
        try:
            while rg < n_groups:
                group_rows = meta.row_group(rg).num_rows
                if row >= group_rows:
                    if row > group_rows:
                        raise ValueError(
                            f"ParquetSource: bad position, row group {rg} of {full} has "
                            f"{group_rows} rows, not {row}"
                        )
                    rg, row = rg + 1, 0
                    self._rg, self._row = rg, 0
                    continue
                skip = row
                for batch in pf.iter_batches(
                    batch_size=batch_size, row_groups=[rg], columns=columns
                ):
                    n = batch.num_rows
                    if skip:
                        if skip >= n:
                            skip -= n
                            continue
                        batch = batch.slice(skip)
                        n -= skip
                        skip = 0
                    row += n
                    if row >= group_rows:
                        self._rg, self._row = rg + 1, 0
                    else:
                        self._row = row
                    yield batch
                    if stop.is_set():
                        return
                rg, row = rg + 1, 0
        except (pa.ArrowException, OSError) as exc:
            raise ValueError(f"ParquetSource: cannot read {full}: {exc}") from exc
        self._close_file()


class ParquetSink:
    """Write batches to rolling Parquet files, idempotently on replay.

    Files are named ``{prefix}-{seq:08d}.parquet`` in ``folder``. Each is
    written under a hidden temporary name (``.{prefix}-{seq:08d}.parquet.tmp``)
    and renamed into place, after an fsync, when it reaches
    ``rows_per_file`` rows, when the batch schema changes, or on
    :meth:`flush`, so a reader (or a following :class:`ParquetSource`) never
    sees a partial file.

    Parameters
    ----------
    folder:
        Output folder, created if missing.
    rows_per_file:
        Rows per file; batches are split to fill files exactly.
    prefix:
        File name prefix.
    compression:
        Parquet codec (``"zstd"``, ``"snappy"``, ``"none"``, ...).
    row_group_size:
        Rows buffered per row group (small incoming batches are gathered).

    Notes
    -----
    ``flush()`` closes the current file and returns
    ``{"next_seq": s, "rows": n}``: files ``< s`` hold the ``n`` rows written
    so far. ``restore(state)``, called before any write when resuming from a
    checkpoint, deletes every part file numbered ``>= s`` and every temporary
    file, then numbers new files from ``s``; replaying the source from the
    checkpoint's position then writes each row exactly once. A sink that was
    not restored starts after the highest existing part number (call
    ``flush()`` before the first write to capture that starting state).

    Every ``flush`` ends a file, so checkpoint often and files get small.

    Examples
    --------
    >>> import tempfile, os
    >>> import pyarrow as pa, pyarrow.parquet as pq
    >>> from streamfact.connectors import ParquetSink
    >>> folder = tempfile.mkdtemp()
    >>> sink = ParquetSink(folder, rows_per_file=3)
    >>> sink.write(pa.record_batch({"a": [1, 2, 3, 4]}))
    >>> state = sink.flush(); state
    {'next_seq': 2, 'rows': 4}
    >>> sink.write(pa.record_batch({"a": [5]}))   # lost in a crash, then replayed
    >>> del sink
    >>> sink = ParquetSink(folder, rows_per_file=3)
    >>> sink.restore(state)
    >>> sink.write(pa.record_batch({"a": [5]}))
    >>> sink.close()
    >>> sorted(os.listdir(folder))
    ['part-00000000.parquet', 'part-00000001.parquet', 'part-00000002.parquet']
    >>> pq.read_table(folder).column("a").to_pylist()
    [1, 2, 3, 4, 5]
    """

    def __init__(
        self,
        folder: PathLike,
        *,
        rows_per_file: int = 1_000_000,
        prefix: str = "part",
        compression: str = "zstd",
        row_group_size: int = 65536,
    ) -> None:
        if int(rows_per_file) <= 0:
            raise ValueError(f"rows_per_file must be positive, got {rows_per_file}")
        if int(row_group_size) <= 0:
            raise ValueError(f"row_group_size must be positive, got {row_group_size}")
        if not prefix or os.sep in prefix or prefix.startswith((".", "_")):
            raise ValueError(f"bad prefix {prefix!r}")
        self.folder = os.fspath(folder)
        self.rows_per_file = int(rows_per_file)
        self.prefix = prefix
        self.compression = compression
        self.row_group_size = int(row_group_size)
        self._pattern = re.compile(rf"^{re.escape(prefix)}-(\d+)\.parquet$")
        self._seq: int | None = None  # resolved lazily (folder scan) unless restored
        self._rows = 0
        self._file_rows = 0
        self._schema: pa.Schema | None = None
        self._writer: pq.ParquetWriter | None = None
        self._pending: list[pa.RecordBatch] = []
        self._pending_rows = 0
        self._closed = False

    def _name(self, seq: int) -> str:
        return f"{self.prefix}-{seq:08d}.parquet"

    def _tmp_name(self, seq: int) -> str:
        return f".{self._name(seq)}.tmp"

    def _ensure_seq(self) -> int:
        if self._seq is None:
            os.makedirs(self.folder, exist_ok=True)
            seqs = [
                int(m.group(1))
                for m in map(self._pattern.match, os.listdir(self.folder))
                if m is not None
            ]
            self._seq = max(seqs) + 1 if seqs else 0
        return self._seq

    def _write_pending(self) -> None:
        if not self._pending:
            return
        seq = self._ensure_seq()
        assert self._schema is not None
        if self._writer is None:
            self._writer = pq.ParquetWriter(
                os.path.join(self.folder, self._tmp_name(seq)),
                self._schema,
                compression=self.compression,
            )
        table = pa.Table.from_batches(self._pending, schema=self._schema)
        self._writer.write_table(table, row_group_size=self.row_group_size)
        self._pending.clear()
        self._pending_rows = 0

    def _roll(self) -> None:
        """Finish the current file: write, close, fsync, rename into place."""
        self._write_pending()
        writer, self._writer = self._writer, None
        if writer is None:
            return
        writer.close()
        seq = self._ensure_seq()
        tmp = os.path.join(self.folder, self._tmp_name(seq))
        _fsync_file(tmp)
        os.replace(tmp, os.path.join(self.folder, self._name(seq)))
        _fsync_dir(self.folder)
        self._seq = seq + 1
        self._file_rows = 0

    def write(self, batch: pa.RecordBatch) -> None:
        """Buffer ``batch``; full row groups are written, full files rolled."""
        if self._closed:
            raise RuntimeError("ParquetSink: write after close()")
        if not isinstance(batch, pa.RecordBatch):
            raise TypeError(f"ParquetSink.write expects a RecordBatch, got {type(batch).__name__}")
        if self._schema is not None and not batch.schema.equals(self._schema):
            self._roll()
        self._schema = batch.schema
        n = batch.num_rows
        offset = 0
        while offset < n:
            take = min(self.rows_per_file - self._file_rows, n - offset)
            piece = batch if take == n else batch.slice(offset, take)
            self._pending.append(piece)
            self._pending_rows += take
            self._file_rows += take
            self._rows += take
            offset += take
            if self._pending_rows >= self.row_group_size:
                self._write_pending()
            if self._file_rows >= self.rows_per_file:
                self._roll()

    def flush(self) -> dict[str, Any]:
        """Close the current file into place; return ``{"next_seq": s, "rows": n}``."""
        if not self._closed:
            self._roll()
        return {"next_seq": self._ensure_seq(), "rows": self._rows}

    def restore(self, state: Mapping[str, Any]) -> None:
        """Delete files written after ``state`` (from :meth:`flush`) and number on from it."""
        if self._writer is not None or self._pending:
            raise RuntimeError("ParquetSink.restore must be called before any write")
        try:
            next_seq = int(state["next_seq"])
            rows = int(state["rows"])
        except (KeyError, TypeError, ValueError) as exc:
            raise ValueError(f"ParquetSink: bad state {state!r}") from exc
        if next_seq < 0 or rows < 0:
            raise ValueError(f"ParquetSink: bad state {state!r}")
        os.makedirs(self.folder, exist_ok=True)
        tmp_prefix = f".{self.prefix}-"
        for name in os.listdir(self.folder):
            m = self._pattern.match(name)
            stale = m is not None and int(m.group(1)) >= next_seq
            if stale or (name.startswith(tmp_prefix) and name.endswith(".tmp")):
                os.remove(os.path.join(self.folder, name))
        _fsync_dir(self.folder)
        self._seq = next_seq
        self._rows = rows
        self._file_rows = 0
        self._schema = None
        self._closed = False

    def close(self) -> None:
        """Flush; further writes raise. Idempotent."""
        if not self._closed:
            self.flush()
            self._closed = True

    def __repr__(self) -> str:
        return f"ParquetSink({self.folder!r}, next_seq={self._seq}, rows={self._rows})"
