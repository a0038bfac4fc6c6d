"""In-memory source and sink: numpy arrays or Arrow batches in, a list of batches out."""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping
from typing import Any

import numpy as np
import pyarrow as pa

from streamfact.io import Position

__all__ = ["MemorySink", "MemorySource", "fixed_size_list_array"]

_ZERO_COPY_KINDS = frozenset("iuf")


def fixed_size_list_array(arr2d: np.ndarray) -> pa.FixedSizeListArray:
    """Wrap a 2-D numpy array as a ``fixed_size_list<T>[d]`` Arrow column.

    Row ``i`` of the array becomes list ``i`` of the column. For an integer or
    floating dtype in C order the Arrow values buffer *is* the numpy memory (no
    copy); the array is kept alive by the column. Other layouts are copied
    once into C order first.

    Parameters
    ----------
    arr2d:
        Array of shape ``(n, d)``.

    Returns
    -------
    pyarrow.FixedSizeListArray
        Length ``n``, list size ``d``, value type from the numpy dtype.

    Raises
    ------
    ValueError
        If ``arr2d`` is not 2-D.

    Examples
    --------
    >>> import numpy as np
    >>> from streamfact.connectors import fixed_size_list_array
    >>> X = np.arange(6, dtype=np.float32).reshape(3, 2)
    >>> col = fixed_size_list_array(X)
    >>> col.type
    FixedSizeListType(fixed_size_list<item: float>[2])
    >>> bool(np.shares_memory(col.values.to_numpy(), X))
    True
    """
    arr = np.asarray(arr2d)
    if arr.ndim != 2:
        raise ValueError(f"fixed_size_list_array needs a 2-D array, got shape {arr.shape}")
    d = arr.shape[1]
    flat = np.ascontiguousarray(arr).reshape(-1)
    if flat.dtype.kind in _ZERO_COPY_KINDS and flat.dtype.isnative:
        value_type = pa.from_numpy_dtype(flat.dtype)
        values = pa.Array.from_buffers(value_type, flat.size, [None, pa.py_buffer(flat)])
    else:
        values = pa.array(flat)
    return pa.FixedSizeListArray.from_arrays(values, list_size=d)


def _column_from_numpy(name: str, value: Any) -> pa.Array | pa.ChunkedArray:
    if isinstance(value, (pa.Array, pa.ChunkedArray)):
        return value
    arr = np.asarray(value)
    if arr.ndim == 1:
        if arr.dtype.kind in "US" or arr.dtype == object:
            return pa.array(arr, type=pa.string() if arr.dtype.kind != "S" else pa.binary())
        return pa.array(arr)
    if arr.ndim == 2:
        return fixed_size_list_array(arr)
    raise ValueError(f"column {name!r}: expected a 1-D or 2-D array, got shape {arr.shape}")


def _to_batches(data: Any) -> list[pa.RecordBatch] | Iterable[pa.RecordBatch]:
    if isinstance(data, pa.RecordBatch):
        return [data]
    if isinstance(data, pa.Table):
        return data.to_batches()
    if isinstance(data, Mapping):
        if not data:
            raise ValueError("MemorySource needs at least one column")
        columns = {str(k): _column_from_numpy(str(k), v) for k, v in data.items()}
        lengths = {k: len(v) for k, v in columns.items()}
        if len(set(lengths.values())) > 1:
            raise ValueError(f"MemorySource columns differ in length: {lengths}")
        table = pa.table(columns)
        return table.to_batches() or [
            pa.RecordBatch.from_pylist([], schema=table.schema)
        ]
    if isinstance(data, (list, tuple)):
        for i, b in enumerate(data):
            if not isinstance(b, pa.RecordBatch):
                raise TypeError(f"MemorySource item {i} is {type(b).__name__}, not a RecordBatch")
        return list(data)
    if isinstance(data, Iterable):
        return data
    raise TypeError(
        "MemorySource data must be a dict of arrays, a pyarrow Table or RecordBatch, "
        f"or an iterable of RecordBatch; got {type(data).__name__}"
    )


class MemorySource:
    """A bounded source over numpy arrays or Arrow record batches held in memory.

    Parameters
    ----------
    data:
        One of

        * a dict ``name -> array``: a 1-D numeric array becomes a scalar
          column, a 1-D array of ``str`` a string column, and a 2-D array of
          shape ``(n, d)`` a ``fixed_size_list<T>[d]`` column that shares the
          numpy memory (see :func:`fixed_size_list_array`);
        * a ``pyarrow.Table`` or ``pyarrow.RecordBatch``;
        * a list of ``RecordBatch`` (they may differ in length);
        * any other iterable of ``RecordBatch`` (e.g. a generator). It is
          consumed lazily and only once, so such a source can seek forward
          only, before iteration.
    batch_size:
        Largest number of rows per yielded batch. Input batches longer than
        this are sliced (zero-copy); shorter ones are never merged.

    Attributes
    ----------
    bounded : bool
        Always True.

    Notes
    -----
    The position is ``{"row": n}``, the number of rows yielded so far counted
    from the start of the data; :meth:`seek` skips that many rows. Empty
    batches are not yielded.

    Examples
    --------
    >>> import numpy as np
    >>> from streamfact.connectors import MemorySource
    >>> src = MemorySource({"x": np.zeros((5, 3)), "id": np.arange(5)}, batch_size=2)
    >>> [b.num_rows for b in src.batches()]
    [2, 2, 1]
    >>> src.position()
    {'row': 5}
    >>> src2 = MemorySource({"x": np.zeros((5, 3)), "id": np.arange(5)}, batch_size=2)
    >>> src2.seek({"row": 3})
    >>> [b.column("id").to_pylist() for b in src2.batches()]
    [[3, 4]]
    """

    bounded: bool = True

    def __init__(self, data: Any, *, batch_size: int = 1024) -> None:
        if int(batch_size) <= 0:
            raise ValueError(f"batch_size must be positive, got {batch_size}")
        self.batch_size = int(batch_size)
        self._data = _to_batches(data)
        self._row = 0
        self._start = 0
        self._closed = False

    @property
    def schema(self) -> pa.Schema | None:
        """Schema of the data, or None for a lazy iterable not yet read."""
        if isinstance(self._data, list) and self._data:
            return self._data[0].schema
        return None

    def position(self) -> Position:
        """Rows yielded so far, counted from the start of the data."""
        return {"row": self._row}

    def seek(self, position: Position) -> None:
        """Resume after ``position["row"]`` rows on the next :meth:`batches` call."""
        try:
            row = int(position["row"])
        except (KeyError, TypeError, ValueError) as exc:
            raise ValueError(f"MemorySource: bad position {position!r}") from exc
        if row < 0:
            raise ValueError(f"MemorySource: bad position {position!r} (negative row)")
        if isinstance(self._data, list):
            total = sum(b.num_rows for b in self._data)
            if row > total:
                raise ValueError(f"MemorySource: position row {row} is past the end ({total} rows)")
        self._start = row
        self._row = row

    def batches(self) -> Iterator[pa.RecordBatch]:
        """Yield batches of at most ``batch_size`` rows from the current position."""
        skip = self._start
        self._row = self._start
        size = self.batch_size
        for batch in self._data:
            n = batch.num_rows
            if skip >= n:
                skip -= n
                continue
            offset, skip = skip, 0
            while offset < n:
                if self._closed:
                    return
                piece = batch if (offset == 0 and n <= size) else batch.slice(offset, size)
                offset += piece.num_rows
                self._row += piece.num_rows
                yield piece
        if skip:
            raise ValueError(f"MemorySource: position row {self._start} is past the end")

    def close(self) -> None:
        """Stop any running iteration at its next batch; idempotent."""
        self._closed = True

    def __repr__(self) -> str:
        return f"MemorySource(batch_size={self.batch_size}, position={self.position()})"


class MemorySink:
    """A sink that keeps every written batch in a list.

    Attributes
    ----------
    batches : list of pyarrow.RecordBatch
        Batches in write order (zero-row batches are kept too).

    Notes
    -----
    ``flush()`` returns ``{"rows": n, "batches": k}``; ``restore(state)``
    truncates the list back to ``k`` batches, so a replay after resuming from
    a checkpoint appends each row once. Restoring onto a sink that holds fewer
    batches (a fresh one, the old one having died with its process) keeps what
    it has: memory does not survive a crash.

    Examples
    --------
    >>> import pyarrow as pa
    >>> from streamfact.connectors import MemorySink
    >>> sink = MemorySink()
    >>> sink.write(pa.record_batch({"a": [1, 2]}))
    >>> state = sink.flush(); state
    {'rows': 2, 'batches': 1}
    >>> sink.write(pa.record_batch({"a": [3]}))
    >>> sink.restore(state)
    >>> sink.to_table().column("a").to_pylist()
    [1, 2]
    """

    def __init__(self) -> None:
        self.batches: list[pa.RecordBatch] = []

    @property
    def num_rows(self) -> int:
        """Rows held."""
        return sum(b.num_rows for b in self.batches)

    def write(self, batch: pa.RecordBatch) -> None:
        """Append ``batch``."""
        if not isinstance(batch, pa.RecordBatch):
            raise TypeError(f"MemorySink.write expects a RecordBatch, got {type(batch).__name__}")
        self.batches.append(batch)

    def flush(self) -> dict[str, Any]:
        """Return ``{"rows": n, "batches": k}`` for everything written so far."""
        return {"rows": self.num_rows, "batches": len(self.batches)}

    def restore(self, state: Mapping[str, Any]) -> None:
        """Drop batches written after ``state`` (as returned by :meth:`flush`)."""
        try:
            keep = int(state["batches"])
        except (KeyError, TypeError, ValueError) as exc:
            raise ValueError(f"MemorySink: bad state {state!r}") from exc
        if keep < 0:
            raise ValueError(f"MemorySink: bad state {state!r}")
        del self.batches[keep:]

    def to_table(self) -> pa.Table:
        """All batches as one table (an empty, column-less table if none)."""
        if not self.batches:
            return pa.table({})
        return pa.Table.from_batches(self.batches)

    def close(self) -> None:
        """Nothing to release; the batches stay readable."""

    def __len__(self) -> int:
        return len(self.batches)

    def __repr__(self) -> str:
        return f"MemorySink(batches={len(self.batches)}, rows={self.num_rows})"
