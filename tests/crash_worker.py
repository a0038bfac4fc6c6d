"""Child process for the crash test: ParquetSource → RunningMoments → ParquetSink.

Run as ``python crash_worker.py DATA CKPT OUT [--delay S] [--every K] [--hang-at STEP]``.
``--hang-at`` makes the checkpoint writer stop forever at that step of a save
(after writing a marker file), so the parent can SIGKILL it mid-checkpoint.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import pyarrow as pa

import streamfact as sf
from streamfact.checkpoint import CheckpointStore
from streamfact.connectors import ParquetSink, ParquetSource


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("data")
    parser.add_argument("ckpt")
    parser.add_argument("out")
    parser.add_argument("--delay", type=float, default=0.0)
    parser.add_argument("--every", type=int, default=700)
    parser.add_argument("--hang-at", default=None)
    args = parser.parse_args()
    marker = Path(args.ckpt).parent / "hanging"
    saves = {"n": 0}

    def fault_hook(step: str) -> None:
        if args.hang_at is not None and step == args.hang_at:
            saves["n"] += 1
            if saves["n"] >= 2:  # let one checkpoint complete first, then hang mid-way
                marker.write_text(step)
                while True:
                    time.sleep(1)

    def slow(batch: pa.RecordBatch) -> pa.RecordBatch:
        if args.delay:
            time.sleep(args.delay)
        return batch

    moments = sf.RunningMoments(8)
    store = CheckpointStore(args.ckpt, keep=3, fault_hook=fault_hook)
    pipe = (
        sf.Pipeline(ParquetSource(args.data, batch_size=128), progress=False)
        .map(slow)
        .update(moments.update, X=sf.dense("x"))
        .to(ParquetSink(args.out, rows_per_file=900))
        .checkpoint(store, every_rows=args.every)
    )
    print("started", flush=True)
    with pipe:
        counters = pipe.run()
    print(f"done {counters.rows_in}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
