"""The pull-based pipeline: laziness, errors, policies, counters, checkpoints."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pytest

import streamfact as sf
from streamfact.batches import fixed_size_list
from streamfact.connectors import MemorySink, MemorySource
from streamfact.operators import InvalidInputError
from streamfact.pipeline import _progress_bar


class RecordingSource:
    """A source that records what was asked of it."""

    bounded = True

    def __init__(self, batches: list[pa.RecordBatch]) -> None:
        self._batches = batches
        self.index = 0
        self.pulled = 0
        self.closed = False

    def batches(self) -> Iterator[pa.RecordBatch]:
        while self.index < len(self._batches):
            self.pulled += 1
            batch = self._batches[self.index]
            self.index += 1
            yield batch

    def position(self) -> dict[str, Any]:
        return {"batch": self.index}

    def seek(self, position: dict[str, Any]) -> None:
        self.index = int(position["batch"])

    def close(self) -> None:
        self.closed = True


def _batches(X: np.ndarray, size: int) -> list[pa.RecordBatch]:
    return [
        pa.RecordBatch.from_arrays(
            [pa.array(np.arange(i, min(i + size, len(X)))), fixed_size_list(X[i : i + size])],
            names=["id", "x"],
        )
        for i in range(0, len(X), size)
    ]


@pytest.fixture
def data() -> np.ndarray:
    return np.random.default_rng(0).standard_normal((50, 3))


def test_nothing_runs_before_the_first_pull(data: np.ndarray) -> None:
    src = RecordingSource(_batches(data, 10))
    rm = sf.RunningMoments(3)
    pipe = sf.Pipeline(src, progress=False).update(rm.update, X=sf.dense("x"))
    it = iter(pipe)
    assert src.pulled == 0 and rm.count == 0
    first = next(it)
    assert src.pulled == 1 and rm.count == 10 and first.num_rows == 10
    pipe.close()
    assert src.closed


def test_iteration_yields_output_batches_with_results(data: np.ndarray) -> None:
    rm = sf.RunningMoments(3)
    rm.update(data)
    pipe = sf.Pipeline(MemorySource({"x": data}, batch_size=16), progress=False).emit(
        rm.standardize, X=sf.dense("x"), out="z"
    )
    outs = list(pipe)
    assert [b.num_rows for b in outs] == [16, 16, 16, 2]
    z = np.vstack([sf.dense("z").view(b).value for b in outs])
    np.testing.assert_allclose(z, rm.standardize(data))


def test_positional_binding_and_tuple_outputs(data: np.ndarray) -> None:
    def split(rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        return rows[:, 0], rows[:, 1:]

    sink = MemorySink()
    sf.Pipeline(MemorySource({"x": data}), progress=False).emit(
        split, anything=sf.dense("x"), out=("first", "rest")
    ).to(sink).run()
    table = sink.to_table()
    np.testing.assert_array_equal(table.column("first").to_numpy(), data[:, 0])


def test_unknown_binding_fails_when_built() -> None:
    def two(a: np.ndarray, b: np.ndarray) -> None: ...

    src = MemorySource({"x": np.ones((2, 2))})
    with pytest.raises(TypeError, match="no parameter"):
        sf.Pipeline(src).update(two, c=sf.dense("x"))
    with pytest.raises(TypeError, match="column spec"):
        sf.Pipeline(src).update(two, a="x")  # type: ignore[arg-type]


def test_errors_travel_and_stop_the_stream(data: np.ndarray) -> None:
    src = RecordingSource(_batches(data, 10))
    calls = {"n": 0}

    def flaky(X: np.ndarray) -> None:
        calls["n"] += 1
        if calls["n"] == 2:
            raise RuntimeError("operator exploded")

    pipe = sf.Pipeline(src, progress=False).update(flaky, X=sf.dense("x"))
    with pytest.raises(RuntimeError, match="exploded"):
        pipe.run()
    assert src.pulled == 2  # nothing pulled after the failure
    pipe.close()
    assert src.closed


def _with_bad_rows(data: np.ndarray) -> np.ndarray:
    bad = data.copy()
    bad[3, 1] = np.nan
    bad[17, 0] = np.inf
    bad[18, 2] = -np.inf
    return bad


def test_raise_policy_names_column_row_and_reason(data: np.ndarray) -> None:
    rm = sf.RunningMoments(3)
    pipe = sf.Pipeline(MemorySource({"x": _with_bad_rows(data)}, batch_size=10), progress=False)
    pipe.update(rm.update, X=sf.dense("x"))
    with pytest.raises(sf.RowError) as info:
        pipe.run()
    err = info.value
    assert (err.column, err.row, err.reason) == ("x", 3, "NaN or Inf value")
    assert "column 'x'" in str(err) and "row 3" in str(err)


def test_skip_policy_keeps_every_good_row(data: np.ndarray) -> None:
    bad = _with_bad_rows(data)
    rm = sf.RunningMoments(3)
    sink = MemorySink()
    counters = (
        sf.Pipeline(MemorySource({"x": bad}, batch_size=10), progress=False)
        .update(rm.update, X=sf.dense("x"))
        .to(sink)
        .on_error("skip")
        .run()
    )
    good = np.delete(data, [3, 17, 18], axis=0)
    assert rm.count == 47 and counters.rows_rejected == 3 and counters.rows_out == 47
    oracle = sf.RunningMoments(3)
    oracle.update(good)
    np.testing.assert_allclose(rm.covariance(), oracle.covariance(), rtol=1e-12)
    assert sink.to_table().num_rows == 47


def test_dead_letter_policy_writes_rows_with_reasons(data: np.ndarray) -> None:
    rm = sf.RunningMoments(3)
    dead = MemorySink()
    counters = (
        sf.Pipeline(MemorySource({"x": _with_bad_rows(data)}, batch_size=10), progress=False)
        .update(rm.update, X=sf.dense("x"), on_error="dead_letter", dead_letter=dead)
        .run()
    )
    rejected = dead.to_table()
    assert rejected.column("_row").to_pylist() == [3, 17, 18]
    assert set(rejected.column("_reason").to_pylist()) == {"NaN or Inf value"}
    assert set(rejected.column("_column").to_pylist()) == {"x"}
    assert counters.rows_rejected == 3 and rm.count == 47


def test_operator_rejections_are_per_row(data: np.ndarray) -> None:
    """An operator naming bad rows gets only those rejected; the rest go through."""
    seen: list[np.ndarray] = []

    def picky(X: np.ndarray) -> None:
        big = np.flatnonzero(np.abs(X).max(axis=1) > 2.0)
        if big.size:
            raise InvalidInputError("value above 2", rows=big)
        seen.append(X.copy())

    counters = (
        sf.Pipeline(MemorySource({"x": data}, batch_size=10), progress=False)
        .update(picky, X=sf.dense("x"))
        .on_error("skip")
        .run()
    )
    accepted = np.vstack(seen)
    expected = data[np.abs(data).max(axis=1) <= 2.0]
    np.testing.assert_array_equal(accepted, expected)
    assert counters.rows_rejected == len(data) - len(expected)


def test_missing_column_rejects_whole_batches_under_skip(data: np.ndarray) -> None:
    rm = sf.RunningMoments(3)
    counters = (
        sf.Pipeline(MemorySource({"y": data}, batch_size=25), progress=False)
        .update(rm.update, X=sf.dense("x"))
        .on_error("skip")
        .run()
    )
    assert counters.rows_rejected == 50 and rm.count == 0


def test_counters_and_seconds(data: np.ndarray) -> None:
    rm = sf.RunningMoments(3)
    pipe = sf.Pipeline(MemorySource({"x": data}, batch_size=20), progress=False)
    counters = pipe.update(rm.update, X=sf.dense("x"), name="moments").run()
    assert (counters.rows_in, counters.rows_out, counters.batches) == (50, 50, 3)
    assert {"source", "moments"} <= set(counters.seconds)
    assert all(v >= 0 for v in counters.seconds.values())


def test_progress_bar_is_off_when_not_a_terminal() -> None:
    bar = _progress_bar(None, "t", sf.Counters())
    assert bar is not None and bar.disable  # pytest captures stderr: not a TTY
    bar.close()
    assert _progress_bar(False, "t", sf.Counters()) is None


def test_checkpoint_resume_equals_uninterrupted(data: np.ndarray, tmp_path: Path) -> None:
    straight = sf.RunningMoments(3)
    sf.Pipeline(MemorySource({"x": data}, batch_size=7), progress=False).update(
        straight.update, X=sf.dense("x")
    ).run()

    first = sf.RunningMoments(3)
    pipe = (
        sf.Pipeline(MemorySource({"x": data}, batch_size=7), progress=False)
        .update(first.update, X=sf.dense("x"))
        .checkpoint(tmp_path, every_rows=14)
    )
    for i, _ in enumerate(pipe):
        if i == 3:  # stop mid-stream after the batch-4 checkpoint is due
            break
    pipe.close()

    resumed = sf.RunningMoments(3)
    pipe2 = (
        sf.Pipeline(MemorySource({"x": data}, batch_size=7), progress=False)
        .update(resumed.update, X=sf.dense("x"))
        .checkpoint(tmp_path, every_rows=14)
    )
    counters = pipe2.run()
    assert pipe2.resumed_from is not None
    assert resumed.count == 50 and counters.rows_in == 50
    np.testing.assert_allclose(resumed.covariance(), straight.covariance(), rtol=1e-12)


def test_stop_checkpoints_and_returns(data: np.ndarray, tmp_path: Path) -> None:
    rm = sf.RunningMoments(3)
    pipe = (
        sf.Pipeline(MemorySource({"x": data}, batch_size=5), progress=False)
        .update(rm.update, X=sf.dense("x"))
        .checkpoint(tmp_path / "c")
    )
    for i, _ in enumerate(pipe):
        if i == 1:
            pipe.stop()
    assert rm.count == 10
    rm2 = sf.RunningMoments(3)
    sf.Pipeline(MemorySource({"x": data}, batch_size=5), progress=False).update(
        rm2.update, X=sf.dense("x")
    ).checkpoint(tmp_path / "c").run()
    assert rm2.count == 50
