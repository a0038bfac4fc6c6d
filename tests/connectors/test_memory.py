"""MemorySource / MemorySink: column building, zero-copy, positions, sink truncation."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pytest

from streamfact.connectors import MemorySink, MemorySource, fixed_size_list_array
from streamfact.io import Sink, Source


def _concat(batches: list[pa.RecordBatch]) -> pa.Table:
    return pa.Table.from_batches(batches)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_fixed_size_list_is_zero_copy(dtype: type) -> None:
    X: np.ndarray = np.random.default_rng(0).standard_normal((7, 4)).astype(dtype)
    col = fixed_size_list_array(X)
    assert col.type == pa.list_(pa.from_numpy_dtype(np.dtype(dtype)), 4)
    values = col.values.to_numpy(zero_copy_only=True)
    assert np.shares_memory(values, X)
    np.testing.assert_array_equal(values.reshape(7, 4), X)

    src = MemorySource({"x": X}, batch_size=3)
    out = list(src.batches())
    for b in out:
        assert np.shares_memory(b.column("x").values.to_numpy(zero_copy_only=True), X)
    # a slice's view starts at its offset into the shared buffer
    second = out[1].column("x")
    view = second.values.to_numpy(zero_copy_only=True)[second.offset * 4 : (second.offset + 3) * 4]
    np.testing.assert_array_equal(view.reshape(3, 4), X[3:6])


def test_fixed_size_list_non_contiguous_is_copied_correctly() -> None:
    X = np.arange(24.0).reshape(4, 6)[:, ::2]  # strided view
    col = fixed_size_list_array(X)
    np.testing.assert_array_equal(
        col.values.to_numpy(zero_copy_only=True).reshape(4, 3), X
    )
    assert col.to_pylist()[1] == [6.0, 8.0, 10.0]
    with pytest.raises(ValueError, match="2-D"):
        fixed_size_list_array(np.zeros(3))


def test_dict_column_types() -> None:
    ids = np.arange(5, dtype=np.int64)
    src = MemorySource(
        {
            "id": ids,
            "name": np.array(["a", "b", "c", "d", "e"]),
            "obj": np.array(["x", None, "z", "w", "v"], dtype=object),
            "x": np.ones((5, 2), dtype=np.float32),
        }
    )
    (batch,) = list(src.batches())
    assert batch.schema.field("id").type == pa.int64()
    assert batch.schema.field("name").type == pa.string()
    assert batch.column("obj").to_pylist() == ["x", None, "z", "w", "v"]
    assert batch.schema.field("x").type == pa.list_(pa.float32(), 2)
    assert np.shares_memory(batch.column("id").to_numpy(zero_copy_only=True), ids)


def test_dict_errors() -> None:
    with pytest.raises(ValueError, match="differ in length"):
        MemorySource({"a": np.zeros(3), "b": np.zeros(4)})
    with pytest.raises(ValueError, match="1-D or 2-D"):
        MemorySource({"a": np.zeros((2, 2, 2))})
    with pytest.raises(ValueError, match="at least one column"):
        MemorySource({})
    with pytest.raises(TypeError, match="RecordBatch"):
        MemorySource([pa.record_batch({"a": [1]}), "nope"])
    with pytest.raises(TypeError):
        MemorySource(42)
    with pytest.raises(ValueError, match="batch_size"):
        MemorySource({"a": np.zeros(3)}, batch_size=0)


def _batch_list() -> list[pa.RecordBatch]:
    sizes = [5, 0, 3, 8, 1]
    start = 0
    out = []
    for n in sizes:
        out.append(pa.record_batch({"v": pa.array(np.arange(start, start + n))}))
        start += n
    return out


@pytest.mark.parametrize(
    "make",
    [
        lambda: {"v": np.arange(17), "x": np.arange(34.0).reshape(17, 2)},
        lambda: pa.Table.from_batches(_batch_list()),
        lambda: _batch_list(),
        lambda: pa.Table.from_batches(_batch_list()).combine_chunks().to_batches()[0],
        lambda: iter(_batch_list()),
    ],
    ids=["dict", "table", "list", "record_batch", "generator"],
)
def test_seek_resumes_exactly(make) -> None:  # type: ignore[no-untyped-def]
    full = list(MemorySource(make(), batch_size=3).batches())
    expected = _concat(full)
    assert all(0 < b.num_rows <= 3 for b in full)
    for k in range(len(full) + 1):
        src = MemorySource(make(), batch_size=3)
        it = src.batches()
        head = [next(it) for _ in range(k)]
        pos = src.position()
        assert pos == {"row": sum(b.num_rows for b in head)}
        again = MemorySource(make(), batch_size=3)
        again.seek(pos)
        tail = list(again.batches())
        assert _concat(head + tail).equals(expected)


def test_list_batches_are_sliced_not_merged() -> None:
    src = MemorySource(_batch_list(), batch_size=4)
    assert [b.num_rows for b in src.batches()] == [4, 1, 3, 4, 4, 1]
    assert src.position() == {"row": 17}


def test_seek_errors() -> None:
    src = MemorySource({"a": np.arange(4)})
    with pytest.raises(ValueError, match="past the end"):
        src.seek({"row": 5})
    with pytest.raises(ValueError, match="bad position"):
        src.seek({"file": "x"})
    with pytest.raises(ValueError, match="negative"):
        src.seek({"row": -1})
    lazy = MemorySource(iter(_batch_list()))
    lazy.seek({"row": 100})
    with pytest.raises(ValueError, match="past the end"):
        list(lazy.batches())


def test_close_stops_iteration() -> None:
    src = MemorySource({"a": np.arange(10)}, batch_size=2)
    it = src.batches()
    next(it)
    src.close()
    assert list(it) == []
    assert src.position() == {"row": 2}


def test_protocols() -> None:
    src = MemorySource({"a": np.arange(3)})
    assert isinstance(src, Source)
    assert src.bounded
    assert isinstance(MemorySink(), Sink)


def test_sink_flush_restore_truncates() -> None:
    sink = MemorySink()
    for i in range(3):
        sink.write(pa.record_batch({"a": [i, i]}))
    state = sink.flush()
    assert state == {"rows": 6, "batches": 3}
    sink.write(pa.record_batch({"a": [9]}))
    sink.write(pa.record_batch({"a": [9, 9]}))
    sink.restore(state)
    sink.write(pa.record_batch({"a": [3]}))
    assert sink.to_table().column("a").to_pylist() == [0, 0, 1, 1, 2, 2, 3]
    assert sink.flush() == {"rows": 7, "batches": 4}
    fresh = MemorySink()
    fresh.restore(state)  # nothing to drop: memory does not survive a crash
    assert len(fresh) == 0
    assert fresh.to_table().num_rows == 0
    with pytest.raises(ValueError, match="bad state"):
        sink.restore({"rows": 3})
    with pytest.raises(TypeError):
        sink.write(pa.table({"a": [1]}))  # type: ignore[arg-type]


def test_source_to_sink_round_trip() -> None:
    X = np.random.default_rng(1).standard_normal((50, 8))
    sink = MemorySink()
    for b in MemorySource({"x": X}, batch_size=16).batches():
        sink.write(b)
    col = sink.to_table().column("x").combine_chunks()
    np.testing.assert_array_equal(col.values.to_numpy().reshape(50, 8), X)
