"""Arrow record batch columns viewed as arrays, with per-row validation.

A *column spec* names the Arrow column(s) that feed one operator argument and
turns a record batch into the array the operator expects:

* :func:`dense` — a ``fixed_size_list<float32|float64>[d]`` column viewed as a
  zero-copy ``(rows, d)`` ndarray, or a list of scalar columns stacked into one;
* :func:`sparse` — an ``indices`` list column and a ``values`` list column
  viewed as a ``scipy.sparse.csr_array`` whose ``indices`` and ``data`` are the
  Arrow buffers (only ``indptr`` is rebased, and only when the batch is a slice);
* :func:`keys` — an int64 or string key column;
* :func:`scalar` — any numeric scalar column.

A view never raises for a bad *row*: it returns the value together with the
rows it found bad and why (:class:`View`), so the engine can reject those rows
alone. A missing or mistyped column makes every row bad (``View.whole``).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import scipy.sparse as sp

from streamfact.kernels.sparse_checks import REASONS, ROW_OK, check_csr_rows

__all__ = [
    "ColumnSpec",
    "DenseColumns",
    "KeyColumn",
    "ScalarColumn",
    "SparseColumns",
    "View",
    "arrays_to_columns",
    "dense",
    "keys",
    "scalar",
    "sparse",
]

_FLOAT_TYPES = (pa.float32(), pa.float64())


@dataclass
class View:
    """The array for a batch plus the rows that must be rejected.

    ``bad`` holds row indices within the batch and ``reasons`` one message per
    bad row. ``whole`` is set when the column itself is unusable (missing or
    of the wrong type): then every row is bad for that reason and ``value`` is
    None.
    """

    value: Any
    bad: np.ndarray = field(default_factory=lambda: np.empty(0, dtype=np.int64))
    reasons: list[str] = field(default_factory=list)
    whole: str | None = None

    @property
    def ok(self) -> bool:
        return self.whole is None and self.bad.size == 0


class ColumnSpec:
    """Base of the column specs: ``columns`` names the Arrow columns read."""

    columns: tuple[str, ...]

    @property
    def label(self) -> str:
        return ",".join(self.columns)

    def view(self, batch: pa.RecordBatch) -> View:
        raise NotImplementedError

    def _column(self, batch: pa.RecordBatch, name: str) -> pa.Array | str:
        """The column, or a message saying why it cannot be used."""
        idx = batch.schema.get_field_index(name)
        if idx < 0:
            return f"missing column {name!r} (have {batch.schema.names})"
        col = batch.column(idx)
        return col.combine_chunks() if isinstance(col, pa.ChunkedArray) else col


def _null_rows(arr: pa.Array) -> np.ndarray:
    if arr.null_count == 0:
        return np.empty(0, dtype=np.int64)
    valid = arr.is_valid().to_numpy(zero_copy_only=False)
    return np.flatnonzero(~valid).astype(np.int64)


def _merge_bad(parts: Sequence[tuple[np.ndarray, str | list[str]]]) -> tuple[np.ndarray, list[str]]:
    """Union of bad rows, keeping the first reason found for each row."""
    found: dict[int, str] = {}
    for rows, reason in parts:
        for i, r in enumerate(rows.tolist()):
            if r not in found:
                found[r] = reason[i] if isinstance(reason, list) else reason
    order = sorted(found)
    return np.asarray(order, dtype=np.int64), [found[r] for r in order]


def _nonfinite_rows(mat: np.ndarray) -> np.ndarray:
    finite = np.isfinite(mat)
    if finite.all():
        return np.empty(0, dtype=np.int64)
    return np.flatnonzero(~finite.all(axis=1)).astype(np.int64)


class DenseColumns(ColumnSpec):
    """Dense rows from a fixed-size-list column or from several scalar columns."""

    def __init__(self, columns: str | Sequence[str], *, width: int | None = None) -> None:
        self.columns = (columns,) if isinstance(columns, str) else tuple(columns)
        if not self.columns:
            raise ValueError("dense() needs at least one column name")
        self.width = width
        self.is_list = isinstance(columns, str)

    def view(self, batch: pa.RecordBatch) -> View:
        if self.is_list:
            return self._view_list(batch)
        return self._view_scalars(batch)

    def _view_list(self, batch: pa.RecordBatch) -> View:
        name = self.columns[0]
        col = self._column(batch, name)
        if isinstance(col, str):
            return View(None, whole=col)
        if not pa.types.is_fixed_size_list(col.type) or col.type.value_type not in _FLOAT_TYPES:
            if pa.types.is_list(col.type) or pa.types.is_large_list(col.type):
                return View(
                    None,
                    whole=f"column {name!r} is {col.type}; dense rows need "
                    "fixed_size_list<float32|float64>[d] (variable lists are sparse rows)",
                )
            return View(None, whole=f"column {name!r} is {col.type}, not fixed_size_list<float>[d]")
        d = col.type.list_size
        if self.width is not None and d != self.width:
            return View(None, whole=f"column {name!r} has width {d}, expected {self.width}")
        n = len(col)
        bad_parts: list[tuple[np.ndarray, str | list[str]]] = []
        if col.null_count == 0 and col.values.null_count == 0:
            # .flatten() honours the slice offset; .values would return the whole
            # unsliced child array and a reshape of it would be silently wrong.
            mat = col.flatten().to_numpy(zero_copy_only=True).reshape(n, d)
        else:
            child = col.values.slice(col.offset * d, n * d)
            flat = child.to_numpy(zero_copy_only=False).astype(child.type.to_pandas_dtype())
            mat = flat.reshape(n, d)
            bad_parts.append((_null_rows(col), "null row"))
            if child.null_count:
                child_null = ~child.is_valid().to_numpy(zero_copy_only=False).reshape(n, d)
                bad_parts.append((np.flatnonzero(child_null.any(axis=1)), "null element"))
        bad_parts.append((_nonfinite_rows(mat), "NaN or Inf value"))
        bad, reasons = _merge_bad(bad_parts)
        return View(mat, bad, reasons)

    def _view_scalars(self, batch: pa.RecordBatch) -> View:
        cols = []
        bad_parts: list[tuple[np.ndarray, str | list[str]]] = []
        for name in self.columns:
            col = self._column(batch, name)
            if isinstance(col, str):
                return View(None, whole=col)
            if not (pa.types.is_floating(col.type) or pa.types.is_integer(col.type)):
                return View(None, whole=f"column {name!r} is {col.type}, not numeric")
            bad_parts.append((_null_rows(col), f"null in column {name!r}"))
            cols.append(col.to_numpy(zero_copy_only=False))
        dtype = np.result_type(*[c.dtype for c in cols], np.float32)
        mat = np.empty((batch.num_rows, len(cols)), dtype=dtype)
        for j, c in enumerate(cols):
            mat[:, j] = c
        bad_parts.append((_nonfinite_rows(mat), "NaN or Inf value"))
        bad, reasons = _merge_bad(bad_parts)
        return View(mat, bad, reasons)


class SparseColumns(ColumnSpec):
    """Sparse rows from an ``indices`` list column and a ``values`` list column.

    Rows with negative, out-of-range (``>= n_features``) or duplicated indices,
    non-finite values, nulls or mismatched list lengths are reported bad.
    Unsorted but otherwise valid rows are accepted; the returned CSR then has
    its indices sorted (which copies). ``n_features=None`` infers the width as
    one past the largest index in the batch.
    """

    def __init__(self, indices: str, values: str, *, n_features: int | None = None) -> None:
        self.columns = (indices, values)
        self.n_features = n_features

    def view(self, batch: pa.RecordBatch) -> View:
        idx_name, val_name = self.columns
        idx_col = self._column(batch, idx_name)
        if isinstance(idx_col, str):
            return View(None, whole=idx_col)
        val_col = self._column(batch, val_name)
        if isinstance(val_col, str):
            return View(None, whole=val_col)
        if not (pa.types.is_list(idx_col.type) or pa.types.is_large_list(idx_col.type)) or not (
            pa.types.is_integer(idx_col.type.value_type)
        ):
            return View(None, whole=f"column {idx_name!r} is {idx_col.type}, not list<int>")
        if not (pa.types.is_list(val_col.type) or pa.types.is_large_list(val_col.type)) or (
            val_col.type.value_type not in _FLOAT_TYPES
        ):
            return View(None, whole=f"column {val_name!r} is {val_col.type}, not list<float>")
        n = len(idx_col)
        idx_off = idx_col.offsets.to_numpy()
        val_off = val_col.offsets.to_numpy()
        indptr = idx_off - idx_off[0]
        bad_parts: list[tuple[np.ndarray, str | list[str]]] = [
            (_null_rows(idx_col), f"null in column {idx_name!r}"),
            (_null_rows(val_col), f"null in column {val_name!r}"),
        ]
        lengths_differ = np.diff(idx_off) != np.diff(val_off)
        if lengths_differ.any():
            bad_parts.append((np.flatnonzero(lengths_differ), REASONS[5]))
            return self._rebuild_rows(batch, idx_col, val_col, bad_parts)
        indices = idx_col.flatten()
        values = val_col.flatten()
        if indices.null_count or values.null_count:
            bad_parts.append((np.arange(n), "null element in a sparse row"))
            return View(None, *(_merge_bad(bad_parts)))
        ind_np = indices.to_numpy(zero_copy_only=True)
        val_np = values.to_numpy(zero_copy_only=True)
        codes, unsorted = check_csr_rows(indptr, ind_np, val_np, self.n_features)
        bad_rows = np.flatnonzero(codes != ROW_OK)
        if bad_rows.size:
            bad_parts.append((bad_rows, [REASONS[int(c)] for c in codes[bad_rows]]))
        width = self.n_features
        if width is None:
            width = int(ind_np.max()) + 1 if ind_np.size else 0
        if bad_rows.size:
            keep_nz = np.repeat(codes == ROW_OK, np.diff(indptr))
            ind_np, val_np = ind_np[keep_nz], val_np[keep_nz]
            lens = np.where(codes == ROW_OK, np.diff(indptr), 0)
            indptr = np.concatenate([[0], np.cumsum(lens)])
            width = max(width, int(ind_np.max()) + 1 if ind_np.size else 0)
        csr = sp.csr_array((val_np, ind_np, indptr), shape=(n, width))
        if unsorted.any():
            csr = csr.copy()
            csr.sort_indices()
        else:
            csr.has_sorted_indices = True
        bad, reasons = _merge_bad(bad_parts)
        return View(csr, bad, reasons)

    def _rebuild_rows(
        self,
        batch: pa.RecordBatch,
        idx_col: pa.Array,
        val_col: pa.Array,
        bad_parts: list[tuple[np.ndarray, str | list[str]]],
    ) -> View:
        """Slow path for structurally broken rows: blank them and view the rest."""
        bad, _ = _merge_bad(bad_parts)
        keep = np.ones(len(idx_col), dtype=bool)
        keep[bad] = False
        mask = pa.array(keep)
        blank_idx = pc.if_else(mask, idx_col, pa.scalar([], type=idx_col.type))
        blank_val = pc.if_else(mask, val_col, pa.scalar([], type=val_col.type))
        inner = pa.RecordBatch.from_arrays([blank_idx, blank_val], names=list(self.columns))
        view = self.view(inner)
        merged_bad, merged_reasons = _merge_bad([*bad_parts, (view.bad, view.reasons)])
        return View(view.value, merged_bad, merged_reasons, view.whole)


class KeyColumn(ColumnSpec):
    """An int64 (or other integer) or string key column, as a numpy array."""

    def __init__(self, column: str) -> None:
        self.columns = (column,)

    def view(self, batch: pa.RecordBatch) -> View:
        name = self.columns[0]
        col = self._column(batch, name)
        if isinstance(col, str):
            return View(None, whole=col)
        if pa.types.is_integer(col.type):
            values = col.fill_null(0).to_numpy(zero_copy_only=False).astype(np.int64, copy=False)
        elif pa.types.is_string(col.type) or pa.types.is_large_string(col.type):
            values = col.fill_null("").to_numpy(zero_copy_only=False)
        else:
            return View(None, whole=f"key column {name!r} is {col.type}, not int64 or string")
        bad = _null_rows(col)
        return View(values, bad, ["null key"] * bad.size)


class ScalarColumn(ColumnSpec):
    """One numeric scalar column (weights, timestamps) as a 1-D ndarray."""

    def __init__(self, column: str, *, finite: bool = True) -> None:
        self.columns = (column,)
        self.finite = finite

    def view(self, batch: pa.RecordBatch) -> View:
        name = self.columns[0]
        col = self._column(batch, name)
        if isinstance(col, str):
            return View(None, whole=col)
        if not (
            pa.types.is_floating(col.type)
            or pa.types.is_integer(col.type)
            or pa.types.is_timestamp(col.type)
        ):
            return View(None, whole=f"column {name!r} is {col.type}, not numeric")
        if pa.types.is_timestamp(col.type):
            col = col.cast(pa.int64())
        values = col.to_numpy(zero_copy_only=False)
        parts: list[tuple[np.ndarray, str | list[str]]] = [(_null_rows(col), "null value")]
        if self.finite and values.dtype.kind == "f":
            parts.append((np.flatnonzero(~np.isfinite(values)), "NaN or Inf value"))
        bad, reasons = _merge_bad(parts)
        return View(values, bad, reasons)


def dense(columns: str | Sequence[str], *, width: int | None = None) -> DenseColumns:
    """Dense rows: one ``fixed_size_list<float>[d]`` column (zero-copy) or scalar columns."""
    return DenseColumns(columns, width=width)


def sparse(indices: str, values: str, *, n_features: int | None = None) -> SparseColumns:
    """Sparse rows from list columns of indices and values, as a CSR array."""
    return SparseColumns(indices, values, n_features=n_features)


def keys(column: str) -> KeyColumn:
    """An int64 or string key column."""
    return KeyColumn(column)


def scalar(column: str, *, finite: bool = True) -> ScalarColumn:
    """A numeric scalar column."""
    return ScalarColumn(column, finite=finite)


def fixed_size_list(mat: np.ndarray) -> pa.FixedSizeListArray:
    """A ``(rows, d)`` float array as a fixed-size-list column, without copying."""
    arr = np.ascontiguousarray(mat)
    if arr.ndim != 2:
        raise ValueError(f"expected a 2-D array, got {arr.ndim}-D")
    return pa.FixedSizeListArray.from_arrays(pa.array(arr.reshape(-1)), arr.shape[1])


def arrays_to_columns(name: str | Sequence[str], result: Any) -> dict[str, pa.Array]:
    """Turn an operator's return value into named Arrow columns.

    2-D arrays become fixed-size-list columns, 1-D arrays scalar columns, a
    tuple fills the names of a tuple ``name``, and a dict adds ``name.key``
    columns (or ``key`` when ``name`` is empty).
    """
    from streamfact.kernels.backend import to_numpy

    if isinstance(result, dict):
        out: dict[str, pa.Array] = {}
        for key, value in result.items():
            col = f"{name}.{key}" if isinstance(name, str) and name else str(key)
            out.update(arrays_to_columns(col, value))
        return out
    if isinstance(result, tuple):
        if isinstance(name, str) or len(name) != len(result):
            raise ValueError(
                f"the method returned {len(result)} values; give out= as that many names"
            )
        out = {}
        for n, value in zip(name, result, strict=True):
            out.update(arrays_to_columns(n, value))
        return out
    if not isinstance(name, str):
        raise ValueError("out= is a tuple of names but the method returned one value")
    if sp.issparse(result):
        result = result.toarray()
    arr = to_numpy(result)
    if arr.ndim == 2:
        return {name: fixed_size_list(arr)}
    if arr.ndim == 1:
        return {name: pa.array(arr)}
    raise ValueError(f"cannot turn a {arr.ndim}-D result into a column")
