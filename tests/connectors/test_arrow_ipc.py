"""ArrowIPCSource / ArrowIPCSink on real files: both formats, seek, truncating restore."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest

from streamfact.connectors import ArrowIPCSink, ArrowIPCSource, fixed_size_list_array
from streamfact.io import Sink, Source


def _batch(start: int, n: int) -> pa.RecordBatch:
    ids = np.arange(start, start + n, dtype=np.int64)
    X = np.stack([ids, -ids], axis=1).astype(np.float64)
    return pa.record_batch({"id": ids, "x": fixed_size_list_array(X)})


def _ids(batches: list[pa.RecordBatch]) -> list[int]:
    return [i for b in batches for i in b.column("id").to_pylist()]


SIZES = [3, 0, 5, 1, 4]


def _batches() -> list[pa.RecordBatch]:
    out, start = [], 0
    for n in SIZES:
        out.append(_batch(start, n))
        start += n
    return out


def _write_with_pyarrow(path: Path, fmt: str) -> None:
    schema = _batches()[0].schema
    with pa.OSFile(str(path), "wb") as f:
        writer = pa.ipc.new_stream(f, schema) if fmt == "stream" else pa.ipc.new_file(f, schema)
        with writer:
            for b in _batches():
                writer.write_batch(b)


@pytest.mark.parametrize("fmt", ["stream", "file"])
@pytest.mark.parametrize("declared", ["auto", "same"])
def test_source_reads_and_seeks(tmp_path: Path, fmt: str, declared: str) -> None:
    path = tmp_path / f"data.{fmt}"
    _write_with_pyarrow(path, fmt)
    kind = fmt if declared == "same" else "auto"
    src = ArrowIPCSource(path, format=kind)
    assert isinstance(src, Source)
    assert src.bounded
    full = list(src.batches())
    assert [b.num_rows for b in full] == SIZES  # batches come as written
    assert src.position() == {"batch": len(SIZES)}
    expected = pa.Table.from_batches(_batches())
    for k in range(len(SIZES) + 1):
        src = ArrowIPCSource(path, format=kind)
        it = src.batches()
        head = [next(it) for _ in range(k)]
        pos = src.position()
        assert pos == {"batch": k}
        again = ArrowIPCSource(path, format=kind)
        again.seek(pos)
        assert pa.Table.from_batches(head + list(again.batches())).equals(expected)


def test_file_format_is_memory_mapped(tmp_path: Path) -> None:
    path = tmp_path / "data.arrow"
    _write_with_pyarrow(path, "file")
    src = ArrowIPCSource(path)
    it = src.batches()
    before = pa.total_allocated_bytes()
    first = next(it)
    assert pa.total_allocated_bytes() == before  # nothing copied into Arrow's pool
    values = first.column("x").values.buffers()[1]
    mm = src._mmap
    assert mm is not None
    mm.seek(0)
    mapped = mm.read_buffer()  # whole-file view, shares the mapping
    assert mapped.address <= values.address < mapped.address + mapped.size
    src.close()
    assert src._mmap is None
    assert list(it) == []
    src.close()  # idempotent
    assert first.column("id").to_pylist() == [0, 1, 2]  # still valid after unmapping


def test_source_errors(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="no such file"):
        next(ArrowIPCSource(tmp_path / "missing.arrows").batches())
    junk = tmp_path / "junk.arrows"
    junk.write_bytes(b"definitely not arrow data at all" * 4)
    with pytest.raises(ValueError, match=r"junk\.arrows is not a readable Arrow IPC file"):
        list(ArrowIPCSource(junk).batches())
    path = tmp_path / "data.arrow"
    _write_with_pyarrow(path, "file")
    with pytest.raises(ValueError, match=r"junk\.arrows is not a readable"):
        list(ArrowIPCSource(junk, format="file").batches())
    for fmt in ("stream", "file"):
        p = tmp_path / f"x.{fmt}"
        _write_with_pyarrow(p, fmt)
        src = ArrowIPCSource(p)
        src.seek({"batch": 9})
        with pytest.raises(ValueError, match="has 5 batches, not 9"):
            list(src.batches())
    with pytest.raises(ValueError, match="bad position"):
        ArrowIPCSource(path).seek({"row": 1})
    with pytest.raises(ValueError, match="format"):
        ArrowIPCSource(path, format="feather")
    empty = tmp_path / "empty.arrows"
    empty.write_bytes(b"")
    assert list(ArrowIPCSource(empty).batches()) == []


def test_truncated_stream_reads_up_to_last_whole_batch(tmp_path: Path) -> None:
    path = tmp_path / "s.arrows"
    _write_with_pyarrow(path, "stream")
    raw = path.read_bytes()
    path.write_bytes(raw[: len(raw) - 40])  # cut into the last batch
    with pytest.raises(ValueError, match=r"s\.arrows"):
        list(ArrowIPCSource(path).batches())


@pytest.mark.parametrize("fmt", ["stream", "file"])
def test_sink_round_trip(tmp_path: Path, fmt: str) -> None:
    path = tmp_path / "sub" / f"out.{fmt}"
    sink = ArrowIPCSink(path, format=fmt)
    assert isinstance(sink, Sink)
    for b in _batches():
        sink.write(b)
    state = sink.flush()
    assert state["batches"] == 5
    assert state["rows"] == sum(SIZES)
    assert state["offset"] == os.path.getsize(path)
    sink.close()
    sink.close()
    got = list(ArrowIPCSource(path, format=fmt).batches())
    assert pa.Table.from_batches(got).equals(pa.Table.from_batches(_batches()))
    with pytest.raises(RuntimeError, match="after close"):
        sink.write(_batch(0, 1))


@pytest.mark.parametrize("fmt", ["stream", "file"])
def test_sink_replay_after_crash_leaves_no_duplicates(tmp_path: Path, fmt: str) -> None:
    path = tmp_path / f"out.{fmt}"
    batches = [_batch(i * 3, 3) for i in range(8)]
    sink = ArrowIPCSink(path, format=fmt)
    for b in batches[:3]:
        sink.write(b)
    state = sink.flush()  # the checkpoint
    for b in batches[3:6]:  # written after the checkpoint, then the process dies
        sink.write(b)
    sink.flush()
    del sink  # crash: no close(), so no end-of-stream marker or footer

    resumed = ArrowIPCSink(path, format=fmt)
    resumed.restore(state)
    for b in batches[3:]:  # replay from the checkpointed source position
        resumed.write(b)
    after = resumed.flush()
    assert after["batches"] == 8
    assert after["rows"] == 24

    # crash again after restore, and restore once more from the newer state
    resumed.write(_batch(1000, 2))
    resumed.flush()
    del resumed
    third = ArrowIPCSink(path, format=fmt)
    third.restore(after)
    third.write(_batch(24, 1))
    third.close()
    got = list(ArrowIPCSource(path, format=fmt).batches())
    assert _ids(got) == list(range(25))
    assert [b.num_rows for b in got] == [3] * 8 + [1]


@pytest.mark.parametrize("fmt", ["stream", "file"])
def test_sink_restore_to_empty_state(tmp_path: Path, fmt: str) -> None:
    path = tmp_path / f"out.{fmt}"
    sink = ArrowIPCSink(path, format=fmt)
    initial = sink.flush()
    assert initial == {"offset": 0, "batches": 0, "rows": 0}
    sink.write(_batch(100, 4))
    sink.flush()
    del sink
    again = ArrowIPCSink(path, format=fmt)
    again.restore(initial)
    assert os.path.getsize(path) == 0
    again.write(_batch(0, 2))
    again.close()
    assert _ids(list(ArrowIPCSource(path).batches())) == [0, 1]


def test_sink_errors(tmp_path: Path) -> None:
    path = tmp_path / "out.arrows"
    sink = ArrowIPCSink(path)
    sink.write(_batch(0, 1))
    with pytest.raises(ValueError, match="one schema"):
        sink.write(pa.record_batch({"other": [1]}))
    with pytest.raises(RuntimeError, match="before any write"):
        sink.restore({"offset": 0, "batches": 0, "rows": 0})
    state = sink.flush()
    sink.close()
    with pytest.raises(ValueError, match="bad state"):
        ArrowIPCSink(path).restore({"offset": 1})
    with pytest.raises(FileNotFoundError, match="missing"):
        ArrowIPCSink(tmp_path / "gone.arrows").restore(state)
    resumed = ArrowIPCSink(path)
    resumed.restore(state)
    with pytest.raises(ValueError, match="schema differs"):
        resumed.write(pa.record_batch({"other": [1]}))
    with pytest.raises(ValueError, match="format"):
        ArrowIPCSink(path, format="auto")
