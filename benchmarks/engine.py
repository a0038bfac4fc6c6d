"""Engine overhead: ParquetSource → Pipeline → a no-op operator vs raw pyarrow.

Both sides read the same Parquet file in the same run:

* raw: ``pyarrow.parquet.ParquetFile.iter_batches`` touching every batch;
* streamfact: ``ParquetSource`` → ``Pipeline.update(noop, X=sf.dense("x"))``,
  which also builds the zero-copy dense view and validates every row
  (NaN/Inf check) before calling the operator.

Usage::

    python benchmarks/engine.py [--rows 10000000] [--width 64] [--batch-size 65536]

The data file is generated once under ``bench_data/`` (git-ignored).
"""

from __future__ import annotations

import argparse
import platform
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

import streamfact as sf
from streamfact.batches import fixed_size_list
from streamfact.connectors import ParquetSource


def make_file(path: Path, rows: int, width: int) -> Path:
    if path.exists() and pq.ParquetFile(path).metadata.num_rows == rows:
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    chunk = 1_000_000
    schema = pa.schema([("x", pa.list_(pa.float32(), width))])
    tmp = path.with_suffix(".tmp")
    with pq.ParquetWriter(tmp, schema, compression="snappy") as writer:
        for start in range(0, rows, chunk):
            n = min(chunk, rows - start)
            X = rng.standard_normal((n, width), dtype=np.float32)
            writer.write_table(pa.table({"x": fixed_size_list(X)}), row_group_size=256_000)
    tmp.rename(path)
    return path


def run_raw(path: Path, batch_size: int) -> tuple[float, int]:
    t0 = time.perf_counter()
    rows = 0
    for batch in pq.ParquetFile(path).iter_batches(batch_size=batch_size):
        rows += batch.num_rows
    return time.perf_counter() - t0, rows


def run_pipeline(path: Path, batch_size: int) -> tuple[float, int]:
    seen = {"rows": 0}

    def noop(X: np.ndarray) -> None:
        seen["rows"] += X.shape[0]

    t0 = time.perf_counter()
    pipe = sf.Pipeline(ParquetSource(path, batch_size=batch_size), progress=False)
    with pipe:
        counters = pipe.update(noop, X=sf.dense("x")).run()
    elapsed = time.perf_counter() - t0
    assert counters.rows_in == seen["rows"]
    return elapsed, counters.rows_in


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=10_000_000)
    parser.add_argument("--width", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=65_536)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    path = make_file(
        Path("bench_data") / f"engine-{args.rows}x{args.width}.parquet", args.rows, args.width
    )
    raw_times, pipe_times = [], []
    for _ in range(args.repeats):  # interleaved so both see the same cache state
        t, n_raw = run_raw(path, args.batch_size)
        raw_times.append(t)
        t, n_pipe = run_pipeline(path, args.batch_size)
        pipe_times.append(t)
    assert n_raw == n_pipe == args.rows
    raw, pipe = min(raw_times), min(pipe_times)
    print(
        f"machine: {platform.machine()} {platform.processor() or ''}"
        f" python {platform.python_version()} pyarrow {pa.__version__}"
    )
    print(
        f"{args.rows} rows x {args.width} float32, batch {args.batch_size}, best of {args.repeats}"
    )
    print("| path | seconds | rows/s | ratio to raw |")
    print("|---|---|---|---|")
    print(f"| raw ParquetFile.iter_batches | {raw:.2f} | {args.rows / raw:,.0f} | 1.00 |")
    print(
        f"| ParquetSource → Pipeline → no-op | {pipe:.2f} | {args.rows / pipe:,.0f} "
        f"| {raw / pipe:.2f} |"
    )


if __name__ == "__main__":
    main()
