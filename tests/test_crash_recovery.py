"""SIGKILL a checkpointing pipeline at random points; the resumed result is exact.

A subprocess runs ParquetSource → RunningMoments → ParquetSink with a
checkpoint every K rows. It is killed several times — once before its first
checkpoint, several times at random, and once in the middle of each step of a
checkpoint write — and resumed each time. The final operator state must equal
an uninterrupted run, every row must be counted exactly once, and the sink must
hold every row exactly once.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from streamfact.batches import fixed_size_list
from streamfact.checkpoint import CheckpointStore, instantiate
from streamfact.operators import RunningMoments

WORKER = Path(__file__).with_name("crash_worker.py")
N_FILES, ROWS_PER_FILE, ROW_GROUP = 3, 1500, 400
N_ROWS = N_FILES * ROWS_PER_FILE


@pytest.fixture(scope="module")
def dataset(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, np.ndarray]:
    root = tmp_path_factory.mktemp("crash-data")
    rng = np.random.default_rng(42)
    X = rng.standard_normal((N_ROWS, 8)) * np.arange(1, 9) + 5.0
    for f in range(N_FILES):
        sl = slice(f * ROWS_PER_FILE, (f + 1) * ROWS_PER_FILE)
        table = pa.table({"id": np.arange(N_ROWS)[sl], "x": fixed_size_list(X[sl])})
        pq.write_table(table, root / f"part-{f}.parquet", row_group_size=ROW_GROUP)
    return root, X


def _start(data: Path, work: Path, *extra: str) -> subprocess.Popen[str]:
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    return subprocess.Popen(
        [sys.executable, str(WORKER), str(data), str(work / "ckpt"), str(work / "out"), *extra],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )


def _wait_started(proc: subprocess.Popen[str]) -> None:
    assert proc.stdout is not None
    line = proc.stdout.readline()
    assert line.strip() == "started", proc.stderr.read() if proc.stderr else line


def _kill(proc: subprocess.Popen[str]) -> None:
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    for stream in (proc.stdout, proc.stderr):
        if stream is not None:
            stream.close()


def _finish(data: Path, work: Path) -> str:
    proc = _start(data, work)
    out, err = proc.communicate(timeout=240)
    assert proc.returncode == 0, err
    return out


def _checkpoints(work: Path) -> list[int]:
    root = work / "ckpt"
    return CheckpointStore(root).sequences() if root.exists() else []


def _assert_exact(work: Path, X: np.ndarray) -> None:
    ckpt = CheckpointStore(work / "ckpt").load_latest()
    assert ckpt is not None
    (entry,) = ckpt.operators.values()
    resumed = instantiate(entry)
    assert isinstance(resumed, RunningMoments)
    straight = RunningMoments(8)
    straight.update(X)
    # Every row counted exactly once: exact integer equality.
    assert resumed.count == N_ROWS
    assert ckpt.counters["rows_in"] == N_ROWS
    # The replay feeds the same batches, so the only difference to one big
    # batch is the summation order of Chan's merge: rounding, ~1e-15 relative.
    np.testing.assert_allclose(resumed.mean, straight.mean, rtol=1e-12)
    np.testing.assert_allclose(resumed.covariance(), straight.covariance(), rtol=1e-11)
    # The sink holds every row exactly once (no duplicates after replay).
    ids = pq.read_table(work / "out").column("id").to_numpy()
    assert ids.size == N_ROWS
    np.testing.assert_array_equal(np.sort(ids), np.arange(N_ROWS))


def test_random_sigkills_resume_exactly(dataset: tuple[Path, np.ndarray], tmp_path: Path) -> None:
    data, X = dataset
    rng = np.random.default_rng(7)
    # 1. Killed before its first checkpoint.
    proc = _start(data, tmp_path, "--delay", "0.02")
    _wait_started(proc)
    time.sleep(0.05)
    _kill(proc)
    assert _checkpoints(tmp_path) == []
    # 2. Killed at random points, each run resuming from the last checkpoint.
    progress = []
    for _ in range(4):
        proc = _start(data, tmp_path, "--delay", "0.02")
        _wait_started(proc)
        time.sleep(float(rng.uniform(0.3, 0.9)))
        _kill(proc)
        progress.append(len(_checkpoints(tmp_path)))
    assert progress[-1] > 0, "no checkpoint was ever written; the kills came too early"
    # 3. Run to the end.
    out = _finish(data, tmp_path)
    assert out.strip().endswith(f"done {N_ROWS}")
    _assert_exact(tmp_path, X)


@pytest.mark.parametrize(
    "step", ["arrays_written", "manifest_written", "tmpdir_synced", "renamed", "pointer_written"]
)
def test_sigkill_during_checkpoint_write(
    dataset: tuple[Path, np.ndarray], tmp_path: Path, step: str
) -> None:
    data, X = dataset
    proc = _start(data, tmp_path, "--hang-at", step, "--every", "500")
    _wait_started(proc)
    marker = tmp_path / "hanging"
    deadline = time.monotonic() + 120
    while not marker.exists():
        assert proc.poll() is None, proc.stderr.read() if proc.stderr else "worker exited"
        assert time.monotonic() < deadline, "worker never reached the checkpoint step"
        time.sleep(0.01)
    _kill(proc)
    # Whatever step it died in, the latest checkpoint must be readable.
    assert CheckpointStore(tmp_path / "ckpt").load_latest() is not None
    _finish(data, tmp_path)
    _assert_exact(tmp_path, X)
