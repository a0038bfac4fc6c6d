"""The end-to-end demo behind ``make demo``: bundled real data, no external server.

1. A pipeline streams the UCI handwritten digits (examples/data/digits, four
   Parquet files) through RunningMoments and an IncrementalSVD, writes the
   embeddings to Parquet and checkpoints; the streamed singular values are
   compared with a batch SVD of the same data.
2. The embedding daemon (``streamfact serve``) follows the Debian dependency
   graph (examples/data/debian-deps), publishes snapshots and answers
   ``/similar`` for a few well-known packages; then it is stopped with SIGTERM
   and must exit 0.

Everything is written under ``out/demo/`` (recreated on each run).
"""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq

import streamfact as sf
from streamfact.connectors import ParquetSink, ParquetSource

HERE = Path(__file__).resolve().parent
OUT = HERE.parent / "out" / "demo"
PACKAGES = ["python3-numpy", "emacs", "gimp", "libreoffice-writer", "openssh-server"]


def digits_pipeline() -> None:
    print("== 1. digits: Parquet -> RunningMoments + IncrementalSVD -> Parquet ==")
    data = HERE / "data" / "digits"
    moments = sf.RunningMoments(64)
    svd = sf.IncrementalSVD(16)
    pipe = (
        sf.Pipeline(ParquetSource(data, batch_size=128), name="digits")
        .update(moments.update, X=sf.dense("pixels"))
        .update(svd.append_rows, X=sf.dense("pixels"))
        .emit(svd.transform, X=sf.dense("pixels"), out="embedding")
        .to(ParquetSink(OUT / "digits-embeddings"))
        .checkpoint(OUT / "digits-checkpoints", every_rows=512)
    )
    with pipe:
        counters = pipe.run()
    X = pq.read_table(data).column("pixels").combine_chunks().flatten().to_numpy()
    X = X.reshape(-1, 64)
    exact = np.linalg.svd(X, compute_uv=False)[:16]
    err = np.abs(svd.s - exact) / exact
    print(
        f"rows in {counters.rows_in}, out {counters.rows_out}, rejected {counters.rows_rejected},"
        f" checkpoints {counters.checkpoints}"
    )
    print(f"pixel mean (first 8): {np.round(moments.mean[:8], 2).tolist()}")
    print(f"top-5 singular values, streamed: {np.round(svd.s[:5], 2).tolist()}")
    print(f"top-5 singular values, batch SVD: {np.round(exact[:5], 2).tolist()}")
    print(f"relative error: top-5 max {err[:5].max():.1e}, all 16 max {err.max():.1e}")
    written = pq.read_table(OUT / "digits-embeddings")
    print(f"embeddings written: {written.num_rows} rows, columns {written.column_names}\n")


def _get(base: str, path: str) -> dict:
    with urllib.request.urlopen(base + path, timeout=10) as resp:
        return json.loads(resp.read())


def daemon_demo() -> None:
    print("== 2. streamfact serve on the Debian dependency graph ==")
    edges = sorted((HERE / "data" / "debian-deps").glob("*.parquet"))
    total = sum(pq.ParquetFile(f).metadata.num_rows for f in edges)
    config = OUT / "serve.toml"
    config.write_text(
        "[model]\nrank = 32\n"
        '[checkpoint]\npath = "checkpoints"\n'
        '[snapshots]\npath = "snapshots"\nevery_seconds = 0.5\n'
        "[http]\nport = 0\n"
    )
    proc = subprocess.Popen(
        [sys.executable, "-m", "streamfact.cli", "serve", "--config", str(config)],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()
        base = line.strip().rsplit(" ", 1)[-1]
        print(line.strip())
        t0 = time.monotonic()
        last, printed = -1, -10.0
        while True:
            try:
                snap = _get(base, "/snapshot")
            except OSError:
                snap = {"events": 0}
            now = time.monotonic() - t0
            if snap["events"] != last:
                last = snap["events"]
                if now - printed >= 1.5 or last >= total:  # a line every ~2 s
                    printed = now
                    print(
                        f"  snapshot v{snap.get('version', 0)}: {last:,}/{total:,} edges "
                        f"({now:.1f} s)"
                    )
            if last >= total:
                break
            if proc.poll() is not None:
                raise SystemExit("the daemon exited early")
            time.sleep(0.1)
        rate = total / (time.monotonic() - t0)
        print(
            f"  {snap['rows']:,} packages with dependencies, {snap['columns']:,} dependencies,"
            f" ~{rate:,.0f} edges/s"
        )
        for package in PACKAGES:
            sim = _get(base, f"/similar/{package}?k=5")
            names = ", ".join(n["key"] for n in sim["neighbours"])
            print(f"  {package:20s} -> {names}")
        metrics = urllib.request.urlopen(base + "/metrics", timeout=10).read().decode()
        lines = [
            m
            for m in metrics.splitlines()
            if m.startswith(
                ("streamfact_events_total", "streamfact_orthogonality_loss", "streamfact_rank")
            )
        ]
        print("  " + "\n  ".join(lines))
    finally:
        proc.send_signal(signal.SIGTERM)
        code = proc.wait(timeout=60)
    print(f"daemon stopped with exit code {code}")
    if code != 0:
        raise SystemExit(code)


def main() -> None:
    shutil.rmtree(OUT, ignore_errors=True)
    OUT.mkdir(parents=True)
    digits_pipeline()
    daemon_demo()
    print(f"\ndone; outputs under {OUT}")


if __name__ == "__main__":
    main()
