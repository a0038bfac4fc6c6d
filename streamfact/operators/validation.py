"""Input checks shared by operators: shapes, dtypes, finiteness, sparse indices.

Each check raises :class:`~streamfact.operators.base.InvalidInputError` naming
the offending rows, *before* any state is touched, so the engine can reject
bad rows alone and retry the good ones.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import scipy.sparse as sp

from streamfact.kernels.backend import to_numpy
from streamfact.operators.base import InvalidInputError

__all__ = ["check_dense_matrix", "check_dtype", "check_matrix", "check_vector", "is_sparse"]

_FLOAT_DTYPES = ("float32", "float64")


def check_dtype(dtype: Any) -> np.dtype:
    """Validate an operator's ``dtype`` parameter (float32 or float64)."""
    dt = np.dtype(dtype)
    if dt.name not in _FLOAT_DTYPES:
        raise ValueError(f"dtype must be float32 or float64, got {dt.name}")
    return dt


def is_sparse(x: Any) -> bool:
    return sp.issparse(x)


def _bad_rows_dense(x: np.ndarray) -> np.ndarray:
    finite = np.isfinite(x)
    if finite.all():
        return np.empty(0, dtype=np.int64)
    return np.flatnonzero(~finite.reshape(x.shape[0], -1).all(axis=1))


def check_matrix(
    x: Any,
    *,
    n_cols: int | None,
    dtype: np.dtype,
    name: str = "X",
    allow_sparse: bool = True,
) -> np.ndarray | sp.csr_array:
    """Return ``x`` as a 2-D float array (or canonical CSR) of ``dtype``.

    Checks the width against ``n_cols`` (when given), rejects NaN/Inf per row,
    and for sparse input rejects negative, out-of-range and duplicated indices.
    """
    if sp.issparse(x):
        if not allow_sparse:
            raise InvalidInputError(f"{name} must be dense here, got a sparse matrix")
        csr = sp.csr_array(x)
        if csr.ndim != 2:
            raise InvalidInputError(f"{name} must be 2-D, got {csr.ndim}-D")
        if n_cols is not None and csr.shape[1] != n_cols:
            raise InvalidInputError(f"{name} has {csr.shape[1]} columns, expected {n_cols}")
        if csr.data.size and not np.isfinite(csr.data).all():
            bad_nz = np.flatnonzero(~np.isfinite(csr.data))
            rows = np.unique(np.searchsorted(csr.indptr, bad_nz, side="right") - 1)
            raise InvalidInputError(f"{name} contains NaN or Inf", rows=rows)
        if csr.indices.size and (csr.indices.min() < 0 or csr.indices.max() >= csr.shape[1]):
            bad_nz = np.flatnonzero((csr.indices < 0) | (csr.indices >= csr.shape[1]))
            rows = np.unique(np.searchsorted(csr.indptr, bad_nz, side="right") - 1)
            raise InvalidInputError(f"{name} has column indices out of range", rows=rows)
        if not csr.has_canonical_format:
            csr = csr.copy()
            csr.sort_indices()
            nz_rows = np.repeat(np.arange(csr.shape[0]), np.diff(csr.indptr))
            dup = (np.diff(csr.indices) == 0) & (np.diff(nz_rows) == 0)
            if dup.any():
                raise InvalidInputError(
                    f"{name} has duplicated column indices within a row",
                    rows=np.unique(nz_rows[1:][dup]),
                )
        if csr.dtype != dtype:
            csr = csr.astype(dtype)
        return csr
    arr = to_numpy(x)
    if arr.ndim == 1:
        arr = arr[None, :]
    if arr.ndim != 2:
        raise InvalidInputError(f"{name} must be 1-D or 2-D, got {arr.ndim}-D")
    if not np.issubdtype(arr.dtype, np.number) or np.iscomplexobj(arr):
        raise InvalidInputError(f"{name} must be real numeric, got dtype {arr.dtype}")
    if n_cols is not None and arr.shape[1] != n_cols:
        raise InvalidInputError(f"{name} has {arr.shape[1]} columns, expected {n_cols}")
    arr = np.asarray(arr, dtype=dtype)
    bad = _bad_rows_dense(arr)
    if bad.size:
        raise InvalidInputError(f"{name} contains NaN or Inf", rows=bad)
    return arr


def check_dense_matrix(
    x: Any, *, n_cols: int | None, dtype: np.dtype, name: str = "X"
) -> np.ndarray:
    """:func:`check_matrix`, then densify sparse input (for dense-only math)."""
    arr = check_matrix(x, n_cols=n_cols, dtype=dtype, name=name)
    if isinstance(arr, np.ndarray):
        return arr
    return np.asarray(arr.toarray(), dtype=dtype)


def check_vector(x: Any, *, size: int, dtype: np.dtype, name: str = "x") -> np.ndarray:
    arr = np.asarray(to_numpy(x), dtype=dtype)
    if arr.shape != (size,):
        raise InvalidInputError(f"{name} must have shape ({size},), got {arr.shape}")
    if not np.isfinite(arr).all():
        raise InvalidInputError(f"{name} contains NaN or Inf")
    return arr
