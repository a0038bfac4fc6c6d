"""Per-row validation of CSR structure, in one numba pass.

The codes returned per row are :data:`ROW_OK`, :data:`NEGATIVE_INDEX`,
:data:`INDEX_OUT_OF_RANGE`, :data:`DUPLICATE_INDEX`, :data:`NON_FINITE_VALUE`
and :data:`LENGTH_MISMATCH`; unsorted rows (no duplicates) are flagged
separately so the caller can sort them instead of rejecting them.
"""

from __future__ import annotations

import numba
import numpy as np

__all__ = [
    "DUPLICATE_INDEX",
    "INDEX_OUT_OF_RANGE",
    "LENGTH_MISMATCH",
    "NEGATIVE_INDEX",
    "NON_FINITE_VALUE",
    "REASONS",
    "ROW_OK",
    "check_csr_rows",
]

ROW_OK = 0
NEGATIVE_INDEX = 1
INDEX_OUT_OF_RANGE = 2
DUPLICATE_INDEX = 3
NON_FINITE_VALUE = 4
LENGTH_MISMATCH = 5

REASONS = {
    NEGATIVE_INDEX: "negative sparse index",
    INDEX_OUT_OF_RANGE: "sparse index out of range",
    DUPLICATE_INDEX: "duplicated sparse index in a row",
    NON_FINITE_VALUE: "NaN or Inf value",
    LENGTH_MISMATCH: "indices and values lists differ in length",
}


@numba.njit(cache=True, nogil=True)
def _check_rows(indptr, indices, values, n_cols, codes, unsorted):  # type: ignore[no-untyped-def]
    n_rows = indptr.shape[0] - 1
    for r in range(n_rows):
        start = indptr[r]
        stop = indptr[r + 1]
        code = 0
        is_sorted = True
        for p in range(start, stop):
            j = indices[p]
            v = values[p]
            if not np.isfinite(v):
                code = NON_FINITE_VALUE
                break
            if j < 0:
                code = NEGATIVE_INDEX
                break
            if n_cols >= 0 and j >= n_cols:
                code = INDEX_OUT_OF_RANGE
                break
            if p > start:
                prev = indices[p - 1]
                if j == prev:
                    code = DUPLICATE_INDEX
                    break
                if j < prev:
                    is_sorted = False
        if code == 0 and not is_sorted:
            row = np.sort(indices[start:stop])
            for p in range(1, row.shape[0]):
                if row[p] == row[p - 1]:
                    code = DUPLICATE_INDEX
                    break
            unsorted[r] = code == 0
        codes[r] = code


def check_csr_rows(
    indptr: np.ndarray, indices: np.ndarray, values: np.ndarray, n_cols: int | None
) -> tuple[np.ndarray, np.ndarray]:
    """Return ``(codes, unsorted)``: a reason code and an unsorted flag per row.

    O(nnz) for sorted rows; an unsorted row costs a sort of its own indices.
    ``n_cols=None`` skips the upper range check.
    """
    n_rows = indptr.shape[0] - 1
    codes = np.zeros(n_rows, dtype=np.int8)
    unsorted = np.zeros(n_rows, dtype=np.bool_)
    if n_rows > 0:
        _check_rows(
            np.ascontiguousarray(indptr, dtype=np.int64),
            np.ascontiguousarray(indices),
            np.ascontiguousarray(values),
            -1 if n_cols is None else int(n_cols),
            codes,
            unsorted,
        )
    return codes, unsorted
