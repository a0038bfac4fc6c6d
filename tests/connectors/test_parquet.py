"""ParquetSource / ParquetSink on real files: positions, seek, follow mode, idempotent replay."""

from __future__ import annotations

import os
import threading
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from streamfact.connectors import ParquetSink, ParquetSource, fixed_size_list_array
from streamfact.io import Sink, Source

D = 4


def _table(start: int, n: int) -> pa.Table:
    ids = np.arange(start, start + n, dtype=np.int64)
    X = np.repeat(ids[:, None], D, axis=1).astype(np.float32) + np.arange(D, dtype=np.float32)
    return pa.table({"id": ids, "x": fixed_size_list_array(X)})


def _write(path: Path, start: int, n: int, row_group_size: int) -> None:
    pq.write_table(_table(start, n), path, row_group_size=row_group_size)


@pytest.fixture
def folder(tmp_path: Path) -> Path:
    """Four files: uneven row groups, an empty file, a single-group file."""
    d = tmp_path / "data"
    d.mkdir()
    _write(d / "a.parquet", 0, 23, row_group_size=10)  # groups 10, 10, 3
    _write(d / "b.parquet", 23, 0, row_group_size=10)  # empty
    _write(d / "c.parquet", 23, 7, row_group_size=100)  # one group of 7
    _write(d / "d.parquet", 30, 12, row_group_size=6)  # groups 6, 6
    # never listed: hidden, underscore, temporary, other extension
    (d / ".e.parquet").write_bytes(b"partial")
    (d / "_SUCCESS.parquet").write_bytes(b"")
    (d / "f.parquet.tmp").write_bytes(b"partial")
    (d / "notes.txt").write_text("hello")
    return d


def _ids(batches: list[pa.RecordBatch]) -> list[int]:
    return [i for b in batches for i in b.column("id").to_pylist()]


def test_reads_folder_in_name_order(folder: Path) -> None:
    src = ParquetSource(folder, batch_size=4)
    assert isinstance(src, Source)
    assert src.bounded
    out = list(src.batches())
    assert _ids(out) == list(range(42))
    # batches never span row groups: a: 4,4,2 | 4,4,2 | 3 ; c: 4,3 ; d: 4,2 | 4,2
    assert [b.num_rows for b in out] == [4, 4, 2, 4, 4, 2, 3, 4, 3, 4, 2, 4, 2]
    assert src.position() == {"file": "d.parquet", "row_group": 2, "row": 0}
    table = pa.Table.from_batches(out)
    expected = pa.concat_tables(
        [pq.read_table(folder / n) for n in ["a.parquet", "b.parquet", "c.parquet", "d.parquet"]]
    )
    assert table.equals(expected)
    assert table.schema.field("x").type == pa.list_(pa.float32(), D)


@pytest.mark.parametrize("batch_size", [3, 4, 10, 1000])
def test_seek_resumes_exactly_at_every_batch(folder: Path, batch_size: int) -> None:
    full = list(ParquetSource(folder, batch_size=batch_size).batches())
    expected = pa.Table.from_batches(full)
    positions = []
    for k in range(len(full) + 1):
        src = ParquetSource(folder, batch_size=batch_size)
        it = src.batches()
        head = [next(it) for _ in range(k)]
        pos = src.position()
        positions.append(pos)
        again = ParquetSource(folder, batch_size=batch_size)
        again.seek(pos)
        tail = list(again.batches())
        assert pa.Table.from_batches(head + tail).equals(expected), (k, pos)
        # resuming at a batch boundary reproduces the uninterrupted batch boundaries
        assert [b.num_rows for b in head + tail] == [b.num_rows for b in full]
    # the positions visited cover mid-group, group ends and file ends
    assert {"file": "a.parquet", "row_group": 1, "row": 0} in positions
    assert {"file": "a.parquet", "row_group": 3, "row": 0} in positions  # a finished
    assert positions[0] == {"file": None, "row_group": 0, "row": 0}
    if batch_size == 3:
        assert {"file": "a.parquet", "row_group": 0, "row": 6} in positions


def test_seek_mid_batch_offsets(folder: Path) -> None:
    """Positions not produced by this batch size (another run's) still resume exactly."""
    all_ids = list(range(42))
    cases = {
        ("a.parquet", 0, 7): 7,
        ("a.parquet", 2, 1): 21,
        ("a.parquet", 2, 3): 23,
        ("b.parquet", 0, 0): 23,
        ("c.parquet", 0, 5): 28,
        ("c.parquet", 1, 0): 30,
        ("d.parquet", 1, 6): 42,
    }
    for (file, rg, row), consumed in cases.items():
        src = ParquetSource(folder, batch_size=4)
        src.seek({"file": file, "row_group": rg, "row": row})
        assert _ids(list(src.batches())) == all_ids[consumed:], (file, rg, row)


def test_single_file_list_and_columns(folder: Path) -> None:
    one = ParquetSource(folder / "d.parquet", batch_size=5)
    out = list(one.batches())
    assert _ids(out) == list(range(30, 42))
    assert one.position()["file"] == "d.parquet"

    files = [str(folder / "d.parquet"), str(folder / "a.parquet")]
    lst = ParquetSource(files, batch_size=100)
    it = lst.batches()
    first = next(it)
    assert first.column("id").to_pylist() == list(range(30, 36))
    pos = lst.position()
    assert pos == {"file": files[0], "row_group": 1, "row": 0}
    again = ParquetSource(files, batch_size=100)
    again.seek(pos)
    assert _ids(list(again.batches())) == list(range(36, 42)) + list(range(23))

    cols = ParquetSource(folder, columns=["x"], batch_size=100)
    out = list(cols.batches())
    assert all(b.schema.names == ["x"] for b in out)
    assert sum(b.num_rows for b in out) == 42


def test_reads_one_row_group_at_a_time(tmp_path: Path) -> None:
    """Memory stays near one row group, far below the file."""
    n, d = 80_000, 16
    X = np.random.default_rng(0).standard_normal((n, d))
    path = tmp_path / "big.parquet"
    group_rows = 5_000  # 16 row groups
    pq.write_table(
        pa.table({"x": fixed_size_list_array(X)}), path, row_group_size=group_rows,
        compression="none",
    )
    group_bytes = group_rows * d * X.itemsize
    src = ParquetSource(path, batch_size=1000)
    it = src.batches()
    before = pa.total_allocated_bytes()
    first = next(it)
    peak_in_use = pa.total_allocated_bytes() - before
    # one row group held twice (raw column chunk + decoded values) plus slack;
    # reading the whole file would hold 16 groups
    assert peak_in_use < 3 * group_bytes, (peak_in_use, group_bytes)
    assert first.num_rows == 1000
    src.close()


def test_errors_are_clear(tmp_path: Path, folder: Path) -> None:
    with pytest.raises(FileNotFoundError, match="no such file or folder"):
        next(ParquetSource(tmp_path / "missing").batches())

    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "x.parquet").write_text("this is not parquet")
    with pytest.raises(ValueError, match=r"x\.parquet is not a readable Parquet file"):
        next(ParquetSource(bad).batches())

    src = ParquetSource(folder)
    src.seek({"file": "zzz.parquet", "row_group": 0, "row": 0})
    with pytest.raises(ValueError, match=r"bad position, file 'zzz\.parquet' not found"):
        next(src.batches())
    src = ParquetSource(folder)
    src.seek({"file": "a.parquet", "row_group": 7, "row": 0})
    with pytest.raises(ValueError, match="has 3 row groups"):
        next(src.batches())
    src = ParquetSource(folder)
    src.seek({"file": "a.parquet", "row_group": 2, "row": 4})
    with pytest.raises(ValueError, match="has 3 rows"):
        next(src.batches())
    with pytest.raises(ValueError, match="bad position"):
        ParquetSource(folder).seek({"row": 3})
    with pytest.raises(ValueError, match="negative"):
        ParquetSource(folder).seek({"file": None, "row_group": -1, "row": 0})
    with pytest.raises(ValueError, match="has no column"):
        next(ParquetSource(folder, columns=["nope"]).batches())
    with pytest.raises(ValueError, match="follow=True needs a folder"):
        ParquetSource([folder / "a.parquet"], follow=True)
    with pytest.raises(ValueError, match="follow=True needs a folder"):
        next(ParquetSource(folder / "a.parquet", follow=True).batches())


def test_schema_mismatch_names_the_file(folder: Path) -> None:
    pq.write_table(pa.table({"id": pa.array([1], pa.int32())}), folder / "e.parquet")
    src = ParquetSource(folder, batch_size=100)
    msg = r"schema of .*e\.parquet differs from that of .*a\.parquet"
    with pytest.raises(ValueError, match=msg):
        list(src.batches())


def test_corrupted_file_names_the_file(tmp_path: Path) -> None:
    path = tmp_path / "c.parquet"
    pq.write_table(_table(0, 2000), path, row_group_size=1000, compression="none")
    raw = bytearray(path.read_bytes())
    truncated = tmp_path / "t.parquet"
    truncated.write_bytes(bytes(raw[: len(raw) // 2]))
    with pytest.raises(ValueError, match=r"t\.parquet is not a readable Parquet file"):
        next(ParquetSource(truncated).batches())
    # scribble over the data pages, keep the footer intact
    start = 4
    raw[start : start + 3000] = b"\xff" * 3000
    path.write_bytes(bytes(raw))
    with pytest.raises(ValueError, match=r"c\.parquet"):
        list(ParquetSource(path).batches())


def test_lazy_open_and_close(folder: Path, tmp_path: Path) -> None:
    src = ParquetSource(tmp_path / "not-yet")
    it = src.batches()  # no I/O yet, so no error yet
    (tmp_path / "not-yet").mkdir()
    _write(tmp_path / "not-yet" / "x.parquet", 0, 5, row_group_size=5)
    assert _ids(list(it)) == list(range(5))

    src = ParquetSource(folder, batch_size=4)
    it = src.batches()
    next(it)
    assert src._pf is not None
    src.close()
    assert src._pf is None
    assert list(it) == []
    src.close()  # idempotent


def test_close_from_another_thread_between_batches(folder: Path) -> None:
    src = ParquetSource(folder, batch_size=2)
    it = src.batches()
    first = next(it)
    closer = threading.Thread(target=src.close)
    closer.start()
    closer.join()
    assert src._pf is not None  # not closed under the iterating thread
    rest = list(it)  # ends at the next batch, without error
    assert len(rest) <= 1
    assert src._pf is None
    assert first.num_rows == 2


def _write_atomically(folder: Path, name: str, start: int, n: int) -> None:
    tmp = folder / f".{name}"
    _write(tmp, start, n, row_group_size=4)
    os.replace(tmp, folder / name)


def test_follow_picks_up_new_files(tmp_path: Path) -> None:
    d = tmp_path / "live"
    d.mkdir()
    _write_atomically(d, "000.parquet", 0, 5)
    src = ParquetSource(d, batch_size=3, follow=True, poll_interval=0.02, stop_after_idle=0.5)
    assert not src.bounded
    seen: list[int] = []
    it = src.batches()
    seen.extend(next(it).column("id").to_pylist())

    def producer() -> None:
        time.sleep(0.05)
        _write_atomically(d, "001.parquet", 5, 6)
        time.sleep(0.1)
        _write_atomically(d, "002.parquet", 11, 2)

    t = threading.Thread(target=producer)
    t.start()
    for b in it:
        seen.extend(b.column("id").to_pylist())
    t.join()
    assert seen == list(range(13))
    pos = src.position()
    assert pos == {"file": "002.parquet", "row_group": 1, "row": 0}

    # resume in follow mode: only files after the position are read
    _write_atomically(d, "003.parquet", 13, 4)
    again = ParquetSource(d, follow=True, poll_interval=0.02, stop_after_idle=0.1)
    again.seek(pos)
    assert _ids(list(again.batches())) == [13, 14, 15, 16]


def test_follow_stops_on_close_from_another_thread(tmp_path: Path) -> None:
    d = tmp_path / "live"
    d.mkdir()
    _write_atomically(d, "000.parquet", 0, 3)
    src = ParquetSource(d, follow=True, poll_interval=0.02)
    got: list[int] = []
    done = threading.Event()

    def consume() -> None:
        for b in src.batches():
            got.extend(b.column("id").to_pylist())
        done.set()

    t = threading.Thread(target=consume)
    t.start()
    time.sleep(0.1)
    _write_atomically(d, "001.parquet", 3, 2)
    time.sleep(0.1)
    src.close()
    t.join(timeout=5)
    assert done.is_set()
    assert got == [0, 1, 2, 3, 4]


def test_follow_warns_on_late_file_sorting_before(tmp_path: Path) -> None:
    d = tmp_path / "live"
    d.mkdir()
    _write_atomically(d, "002.parquet", 0, 3)
    src = ParquetSource(d, follow=True, poll_interval=0.02, stop_after_idle=0.3)
    it = src.batches()
    next(it)
    _write_atomically(d, "001.parquet", 100, 3)
    with pytest.warns(UserWarning, match="001.parquet.*skipped"):
        rest = list(it)
    assert rest == []


def test_follow_empty_folder_then_file(tmp_path: Path) -> None:
    d = tmp_path / "live"
    d.mkdir()
    src = ParquetSource(d, follow=True, poll_interval=0.02, stop_after_idle=0.5)
    timer = threading.Timer(0.1, _write_atomically, args=(d, "a.parquet", 0, 2))
    timer.start()
    out = list(src.batches())
    timer.join()
    assert _ids(out) == [0, 1]


# -- sink ---------------------------------------------------------------------


def _read_folder_ids(d: Path) -> list[int]:
    return _ids(list(ParquetSource(d, batch_size=1 << 16).batches()))


def test_sink_rolls_files(tmp_path: Path) -> None:
    out = tmp_path / "out"
    sink = ParquetSink(out, rows_per_file=5, row_group_size=2)
    assert isinstance(sink, Sink)
    for start in range(0, 12, 3):
        sink.write(_table(start, 3).to_batches()[0])
    # finished files are in place, the open one is still hidden
    assert sorted(os.listdir(out)) == [
        ".part-00000002.parquet.tmp",
        "part-00000000.parquet",
        "part-00000001.parquet",
    ]
    state = sink.flush()
    assert state == {"next_seq": 3, "rows": 12}
    assert sorted(os.listdir(out)) == [f"part-{i:08d}.parquet" for i in range(3)]
    assert [pq.ParquetFile(out / f"part-{i:08d}.parquet").metadata.num_rows for i in range(3)] == [
        5,
        5,
        2,
    ]
    assert pq.ParquetFile(out / "part-00000000.parquet").metadata.num_row_groups == 3
    assert _read_folder_ids(out) == list(range(12))
    got = pq.read_table(out / "part-00000000.parquet")
    assert got.schema.field("x").type == pa.list_(pa.float32(), D)
    assert got.equals(_table(0, 5))
    sink.close()
    sink.close()
    with pytest.raises(RuntimeError, match="after close"):
        sink.write(_table(0, 1).to_batches()[0])


def test_sink_schema_change_rolls(tmp_path: Path) -> None:
    sink = ParquetSink(tmp_path, prefix="emb")
    sink.write(pa.record_batch({"a": [1, 2]}))
    sink.write(pa.record_batch({"b": ["x"]}))
    sink.write(pa.record_batch({"b": ["y"]}))
    sink.close()
    assert sorted(os.listdir(tmp_path)) == ["emb-00000000.parquet", "emb-00000001.parquet"]
    assert pq.read_table(tmp_path / "emb-00000001.parquet").column("b").to_pylist() == ["x", "y"]


def test_sink_replay_after_crash_leaves_no_duplicates(tmp_path: Path) -> None:
    out = tmp_path / "out"
    batches = [_table(i * 4, 4).to_batches()[0] for i in range(10)]

    sink = ParquetSink(out, rows_per_file=6, row_group_size=3)
    initial = sink.flush()  # state before any write
    assert initial == {"next_seq": 0, "rows": 0}
    for b in batches[:4]:
        sink.write(b)
    state = sink.flush()  # the checkpoint: 16 rows durable, in files of 6, 6, 4
    assert state == {"next_seq": 3, "rows": 16}
    for b in batches[4:7]:  # written after the checkpoint, then the process dies
        sink.write(b)
    assert len([n for n in os.listdir(out) if not n.startswith(".")]) > 4
    del sink  # crash: no close(), the open temp file is left behind

    resumed = ParquetSink(out, rows_per_file=6, row_group_size=3)
    resumed.restore(state)
    assert not any(n.startswith(".") for n in os.listdir(out))
    for b in batches[4:]:  # replay from the checkpointed source position
        resumed.write(b)
    assert resumed.flush()["rows"] == 40
    resumed.close()
    assert _read_folder_ids(out) == list(range(40))

    # a crash before the first checkpoint resumes from the initial state
    again = ParquetSink(out, rows_per_file=6)
    again.restore(initial)
    assert os.listdir(out) == []
    for b in batches:
        again.write(b)
    again.close()
    assert _read_folder_ids(out) == list(range(40))


def test_sink_continues_numbering_and_restore_guards(tmp_path: Path) -> None:
    first = ParquetSink(tmp_path)
    first.write(pa.record_batch({"a": [1]}))
    first.close()
    second = ParquetSink(tmp_path)
    second.write(pa.record_batch({"a": [2]}))
    assert second.flush() == {"next_seq": 2, "rows": 1}
    with pytest.raises(RuntimeError, match="before any write"):
        second.write(pa.record_batch({"a": [3]}))
        second.restore({"next_seq": 0, "rows": 0})
    with pytest.raises(ValueError, match="bad state"):
        ParquetSink(tmp_path).restore({"rows": 1})
    with pytest.raises(ValueError, match="rows_per_file"):
        ParquetSink(tmp_path, rows_per_file=0)
    with pytest.raises(ValueError, match="prefix"):
        ParquetSink(tmp_path, prefix=".hidden")


def test_follower_never_sees_partial_files(tmp_path: Path) -> None:
    """A following source reading a folder a sink writes sees whole files, each once."""
    out = tmp_path / "out"
    out.mkdir()
    sink = ParquetSink(out, rows_per_file=7, row_group_size=4)
    src = ParquetSource(out, batch_size=5, follow=True, poll_interval=0.01, stop_after_idle=0.5)
    got: list[int] = []
    errors: list[BaseException] = []

    def follow() -> None:
        try:
            got.extend(_ids(list(src.batches())))
        except BaseException as exc:  # surfaced by the assertion below
            errors.append(exc)

    t = threading.Thread(target=follow)
    sink.write(_table(0, 1).to_batches()[0])
    t.start()
    for i in range(1, 30):
        sink.write(_table(i * 3 - 2, 3).to_batches()[0])
        if i % 10 == 0:
            sink.flush()
    sink.close()
    t.join(timeout=10)
    assert errors == []
    assert got == list(range(88))
