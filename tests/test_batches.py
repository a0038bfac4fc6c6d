"""Arrow column views: zero-copy where promised, and per-row validation."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pytest
import scipy.sparse as sp

import streamfact as sf
from streamfact.batches import arrays_to_columns, fixed_size_list


def _batch(**cols: pa.Array) -> pa.RecordBatch:
    return pa.RecordBatch.from_arrays(list(cols.values()), names=list(cols))


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_dense_fixed_size_list_is_zero_copy(dtype: type) -> None:
    X = np.arange(24, dtype=dtype).reshape(6, 4)
    batch = _batch(x=fixed_size_list(X))
    view = sf.dense("x").view(batch)
    assert view.ok
    assert view.value.dtype == dtype
    np.testing.assert_array_equal(view.value, X)
    # The view must alias the Arrow buffer, which itself aliases X.
    assert np.shares_memory(view.value, X)


def test_sliced_fixed_size_list_respects_the_slice() -> None:
    # Pitfall: FixedSizeListArray.values ignores the slice offset, so a reshape
    # of it returns the first rows of the *unsliced* array. flatten() is right.
    X = np.arange(30, dtype=np.float64).reshape(10, 3)
    col = fixed_size_list(X)
    sliced = col.slice(4, 3)
    assert len(sliced.values) == 30  # the trap: the whole child array
    view = sf.dense("x").view(_batch(x=sliced))
    np.testing.assert_array_equal(view.value, X[4:7])
    assert np.shares_memory(view.value, X)
    # A sliced record batch behaves the same.
    view2 = sf.dense("x").view(_batch(x=col).slice(7, 2))
    np.testing.assert_array_equal(view2.value, X[7:9])


def test_dense_from_scalar_columns() -> None:
    batch = _batch(a=pa.array([1.0, 2.0, np.nan]), b=pa.array([4, 5, 6]))
    view = sf.dense(["a", "b"]).view(batch)
    np.testing.assert_array_equal(view.value[:2], [[1, 4], [2, 5]])
    assert view.bad.tolist() == [2]
    assert "NaN" in view.reasons[0]


def test_dense_rejects_rows_not_batches() -> None:
    X = np.ones((5, 2))
    X[1, 0] = np.inf
    X[3, 1] = np.nan
    view = sf.dense("x").view(_batch(x=fixed_size_list(X)))
    assert view.bad.tolist() == [1, 3]


def test_dense_null_rows_are_reported() -> None:
    col = pa.array([[1.0, 2.0], None, [3.0, 4.0]], type=pa.list_(pa.float64(), 2))
    view = sf.dense("x").view(_batch(x=col))
    assert view.bad.tolist() == [1]
    np.testing.assert_array_equal(view.value[[0, 2]], [[1, 2], [3, 4]])


@pytest.mark.parametrize(
    ("batch", "needle"),
    [
        (_batch(y=pa.array([1.0])), "missing column 'x'"),
        (_batch(x=pa.array([1.0])), "not fixed_size_list"),
        (_batch(x=pa.array([[1.0]], type=pa.list_(pa.float64()))), "variable lists"),
        (_batch(x=pa.array([[1]], type=pa.list_(pa.int64(), 1))), "not fixed_size_list"),
    ],
)
def test_dense_schema_errors_name_the_column(batch: pa.RecordBatch, needle: str) -> None:
    view = sf.dense("x").view(batch)
    assert view.whole is not None and needle in view.whole


def test_dense_width_check() -> None:
    view = sf.dense("x", width=3).view(_batch(x=fixed_size_list(np.ones((2, 4)))))
    assert view.whole is not None and "width 4, expected 3" in view.whole


def _sparse_batch(rows: list[list[int]], vals: list[list[float]]) -> pa.RecordBatch:
    return _batch(
        idx=pa.array(rows, type=pa.list_(pa.int32())),
        val=pa.array(vals, type=pa.list_(pa.float64())),
    )


def test_sparse_view_shares_value_buffers() -> None:
    rows = [[0, 3], [], [1, 2, 4]]
    vals = [[1.0, 2.0], [], [3.0, 4.0, 5.0]]
    batch = _sparse_batch(rows, vals)
    view = sf.sparse("idx", "val", n_features=5).view(batch)
    assert view.ok
    csr = view.value
    assert isinstance(csr, sp.csr_array)
    expected = np.zeros((3, 5))
    for r, (ii, vv) in enumerate(zip(rows, vals, strict=True)):
        expected[r, ii] = vv
    np.testing.assert_array_equal(csr.toarray(), expected)
    values_buf = batch.column(1).flatten().to_numpy(zero_copy_only=True)
    assert np.shares_memory(csr.data, values_buf)


def test_sparse_view_of_a_slice() -> None:
    batch = _sparse_batch([[0], [1, 2], [3], [0, 4]], [[1.0], [2.0, 3.0], [4.0], [5.0, 6.0]])
    view = sf.sparse("idx", "val", n_features=5).view(batch.slice(1, 2))
    np.testing.assert_array_equal(view.value.toarray(), [[0, 2, 3, 0, 0], [0, 0, 0, 4, 0]])


def test_sparse_bad_rows_are_isolated() -> None:
    rows = [[0, 1], [-1, 2], [1, 9], [2, 2], [3, 1], [0]]
    vals = [[1.0, 1.0], [1.0, 1.0], [1.0, 1.0], [1.0, 1.0], [2.0, 3.0], [np.nan]]
    view = sf.sparse("idx", "val", n_features=5).view(_sparse_batch(rows, vals))
    assert view.bad.tolist() == [1, 2, 3, 5]
    assert view.reasons == [
        "negative sparse index",
        "sparse index out of range",
        "duplicated sparse index in a row",
        "NaN or Inf value",
    ]
    csr = view.value
    # Row 4 was unsorted but valid: accepted, with its indices sorted.
    np.testing.assert_array_equal(csr.toarray()[4], [0, 3, 0, 2, 0])
    np.testing.assert_array_equal(csr.toarray()[0], [1, 1, 0, 0, 0])
    assert csr[[1, 2, 3, 5]].nnz == 0  # bad rows are blanked, never half-used


def test_sparse_length_mismatch() -> None:
    batch = _batch(
        idx=pa.array([[0, 1], [2]], type=pa.list_(pa.int64())),
        val=pa.array([[1.0], [2.0]], type=pa.list_(pa.float64())),
    )
    view = sf.sparse("idx", "val", n_features=3).view(batch)
    assert view.bad.tolist() == [0]
    np.testing.assert_array_equal(view.value.toarray(), [[0, 0, 0], [0, 0, 2]])


def test_sparse_schema_errors() -> None:
    batch = _batch(idx=pa.array([1, 2]), val=pa.array([1.0, 2.0]))
    view = sf.sparse("idx", "val").view(batch)
    assert view.whole is not None and "not list<int>" in view.whole


def test_keys_int_and_string() -> None:
    ints = sf.keys("k").view(_batch(k=pa.array([3, None, 5], type=pa.int64())))
    assert ints.value.dtype == np.int64 and ints.bad.tolist() == [1]
    strs = sf.keys("k").view(_batch(k=pa.array(["a", "b"])))
    assert strs.value.tolist() == ["a", "b"] and strs.ok
    bad = sf.keys("k").view(_batch(k=pa.array([1.5])))
    assert bad.whole is not None and "not int64 or string" in bad.whole


def test_arrays_to_columns_shapes() -> None:
    cols = arrays_to_columns("e", np.ones((3, 2)))
    assert pa.types.is_fixed_size_list(cols["e"].type)
    cols = arrays_to_columns(("a", "b"), (np.ones(3), np.zeros((3, 4))))
    assert set(cols) == {"a", "b"}
    cols = arrays_to_columns("m", {"x": np.ones(2)})
    assert set(cols) == {"m.x"}
    with pytest.raises(ValueError, match="tuple of names"):
        arrays_to_columns(("a", "b"), np.ones(3))
