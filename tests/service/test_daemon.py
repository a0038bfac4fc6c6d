"""The embedding daemon over a real socket and as a real process."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from daemon_helpers import (  # tests/ on sys.path
    final_model,
    kill_repeatedly,
    planted_events,
    replayable_model,
    serve,
    write_config,
)

from streamfact.checkpoint import CheckpointStore
from streamfact.service.config import ConfigError, describe_keys, load_config
from streamfact.service.daemon import EmbeddingDaemon
from streamfact.service.snapshots import Snapshot

N_USERS, N_ITEMS, RANK = 60, 40, 6


def _events(n: int, seed: int = 0) -> pa.Table:
    return planted_events(n, seed, N_USERS, N_ITEMS)


def _write_events(folder: Path, table: pa.Table, files: int) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for f, rows in enumerate(np.array_split(np.arange(table.num_rows), files)):
        pq.write_table(table.take(rows), folder / f"events-{f:03d}.parquet", row_group_size=250)


def _config(tmp: Path, **over: Any) -> Path:
    sections: dict[str, dict[str, Any]] = {
        "source": {"path": str(tmp / "events"), "batch_size": 250, "poll_interval": 0.05},
        "events": {"kind": "interactions", "weight": "weight"},
        "model": replayable_model(RANK),
        "checkpoint": {"path": str(tmp / "ckpt"), "every_rows": 500, "every_seconds": 60.0},
        "snapshots": {"path": str(tmp / "snap"), "every_seconds": 0.2},
        "http": {"port": 0},
        "errors": {"policy": "dead_letter", "dead_letter_path": str(tmp / "rejected")},
    }
    return write_config(tmp, sections, **over)


def _get(base: str, path: str) -> tuple[int, Any]:
    try:
        with urllib.request.urlopen(base + path, timeout=10) as resp:
            body = resp.read()
            ctype = resp.headers.get("Content-Type", "")
            return resp.status, json.loads(body) if "json" in ctype else body.decode()
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read())


# -- configuration ----------------------------------------------------------------


def test_config_errors_name_the_key(tmp_path: Path) -> None:
    bad = tmp_path / "bad.toml"
    for text, message in (
        ("[model]\nrnak = 3\n", "'model.rnak'"),
        ("[model]\nrank = 'three'\n", "model.rank: expected int"),
        ("[errors]\npolicy = 'ignore'\n", "errors.policy"),
        ("[source]\nkind = 'kafka'\n", "source.topic"),
        ("[model\n", "not valid TOML"),
    ):
        bad.write_text(text)
        with pytest.raises(ConfigError, match=message):
            load_config(bad)


def test_help_documents_every_key() -> None:
    from streamfact.service.config import KEYS

    text = describe_keys()
    for key in KEYS:
        assert key.name.split(".", 1)[1] in text
    out = subprocess.run(
        [sys.executable, "-m", "streamfact.cli", "serve", "--help"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    assert "every_seconds" in out and "dead_letter_path" in out


# -- the HTTP API, in process ---------------------------------------------------


@pytest.fixture
def running(tmp_path: Path) -> Any:
    table = _events(3000)
    _write_events(tmp_path / "events", table, 3)
    cfg = load_config(_config(tmp_path))
    daemon = EmbeddingDaemon(cfg)
    published: dict[int, Snapshot] = {}
    original = daemon.publish

    def recording_publish(**kwargs: Any) -> Snapshot | None:
        snap = original(**kwargs)
        if snap is not None:
            published[snap.version] = snap
        return snap

    daemon.publish = recording_publish  # type: ignore[method-assign]
    thread = threading.Thread(target=daemon.run, daemon=True)
    thread.start()
    host, port = daemon.http.address
    base = f"http://{host}:{port}"
    deadline = time.monotonic() + 60
    while _get(base, "/snapshot")[0] != 200:
        assert time.monotonic() < deadline, "no snapshot within 60 s"
        time.sleep(0.05)
    yield daemon, base, published, table, tmp_path
    daemon.stop()
    thread.join(timeout=30)
    assert not thread.is_alive()


def test_http_endpoints(running: Any) -> None:
    daemon, base, _, table, _ = running
    assert daemon.http.address[0] == "127.0.0.1"
    status, health = _get(base, "/healthz")
    assert status == 200 and health["status"] == "ok"
    status, snap = _get(base, "/snapshot")
    assert status == 200 and snap["version"] >= 1 and snap["rank"] <= RANK
    status, emb = _get(base, "/embeddings/u7")
    assert status == 200 and len(emb["row"]) == snap["rank"]
    status, sim = _get(base, "/similar/u7?k=5")
    assert status == 200 and len(sim["neighbours"]) == 5
    assert all(n["key"].startswith("u") and n["key"] != "u7" for n in sim["neighbours"])
    status, err = _get(base, "/embeddings/nobody")
    assert status == 404 and "unknown key" in err["error"]
    status, err = _get(base, "/similar/nobody")
    assert status == 404 and err["status"] == 404
    status, err = _get(base, "/similar/u7?k=zero")
    assert status == 400
    status, metrics = _get(base, "/metrics")
    assert status == 200
    for name in (
        "streamfact_events_total",
        "streamfact_events_per_second",
        "streamfact_checkpoint_age_seconds",
        "streamfact_orthogonality_loss",
        "streamfact_rank",
        "streamfact_keys",
        "streamfact_events_rejected_total",
    ):
        assert name in metrics


def test_neighbours_follow_the_planted_groups(running: Any) -> None:
    daemon, base, _, _, _ = running
    deadline = time.monotonic() + 60
    while _get(base, "/snapshot")[1]["events"] < 3000:
        assert time.monotonic() < deadline
        time.sleep(0.05)
    # Users u, u+3, u+6, ... share an item group, so their nearest users do too.
    for user in (1, 2, 7):
        _, sim = _get(base, f"/similar/u{user}?k=5")
        groups = {int(n["key"][1:]) % 3 for n in sim["neighbours"]}
        assert groups == {user % 3}


def test_concurrent_reads_see_whole_snapshots(running: Any) -> None:
    daemon, base, published, table, tmp = running
    # Feed more events while readers hammer the API.
    _write_events(tmp / "events-more", _events(3000, seed=1), 1)
    os.replace(tmp / "events-more" / "events-000.parquet", tmp / "events" / "events-900.parquet")
    seen: list[tuple[int, list[float]]] = []
    errors: list[str] = []

    def reader() -> None:
        for _ in range(40):
            status, body = _get(base, "/embeddings/u5")
            if status != 200:
                errors.append(f"{status} {body}")
            else:
                seen.append((body["version"], body["row"]))

    threads = [threading.Thread(target=reader) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    assert len({v for v, _ in seen}) >= 1
    for version, row in seen:
        snap = published[version]
        i = snap.locate("u5", "rows")
        np.testing.assert_array_equal(np.asarray(row), snap.row_embeddings[i])


def test_bad_events_are_dead_lettered_and_the_daemon_goes_on(tmp_path: Path) -> None:
    good = _events(1000)
    weights = good.column("weight").to_numpy().copy()
    weights[[10, 500]] = np.nan
    with_nan = good.set_column(2, "weight", pa.array(weights))
    folder = tmp_path / "events"
    _write_events(folder, with_nan, 1)
    pq.write_table(pa.table({"who": ["x"], "what": ["y"]}), folder / "events-001.parquet")
    _write_events(tmp_path / "tail", _events(500, seed=3), 1)
    os.replace(tmp_path / "tail" / "events-000.parquet", folder / "events-002.parquet")
    cfg = load_config(_config(tmp_path, source__stop_after_idle=1.0))
    daemon = EmbeddingDaemon(cfg)
    assert daemon.run() == 0
    counters = daemon.pipeline.counters
    assert counters.rows_rejected == 3
    assert daemon.model.events_seen_ == 1498  # every good row, none lost
    rejected = pq.read_table(tmp_path / "rejected")
    reasons = sorted(rejected.column("_reason").to_pylist())
    assert reasons[0].startswith("NaN") and "missing column" in reasons[-1]


def test_timer_refinement_is_served(tmp_path: Path) -> None:
    # The event schedule is pushed out of reach (refine_growth 1000), so only
    # the publisher's timer can refine. After the stream ends it keeps
    # refining until a refinement moves no singular value by more than 1e-10
    # (relative); singular values converge quadratically in the subspace
    # error, so that refinement is within ~1e-10 of the truncated SVD, and
    # rtol 1e-8 leaves room for the rounding of the Gram-based refinement.
    # Without the timer the sketched batch updates (250 events touch every
    # user) leave an error of ~1e-2.
    table = _events(3000)
    _write_events(tmp_path / "events", table, 3)
    config = _config(
        tmp_path,
        model__rank=3,
        model__method="auto",
        model__refine_growth=1000.0,
        model__refine_every_seconds=0.2,
    )
    daemon = EmbeddingDaemon(load_config(config))
    thread = threading.Thread(target=daemon.run, daemon=True)
    thread.start()
    try:
        deadline = time.monotonic() + 60
        while True:
            snap = daemon.snapshot
            if (
                snap is not None
                and snap.events == table.num_rows
                and daemon.refines_by_time >= 1
                and not daemon.model.refine_pending()
                and np.array_equal(snap.singular_values, daemon.model.svd.s)
            ):
                break
            assert time.monotonic() < deadline, "no refined snapshot within 60 s"
            time.sleep(0.05)
    finally:
        daemon.stop()
        thread.join(timeout=30)
    users = np.array([int(u[1:]) for u in table.column("user").to_pylist()])
    items = np.array([int(i[1:]) for i in table.column("item").to_pylist()])
    dense = np.zeros((N_USERS, N_ITEMS))
    np.add.at(dense, (users, items), table.column("weight").to_numpy())
    exact = np.linalg.svd(dense, compute_uv=False)[:3]
    np.testing.assert_allclose(snap.singular_values, exact, rtol=1e-8)
    assert daemon.model.n_refines_ >= 1


# -- the daemon as a process -------------------------------------------------------


def test_sigterm_checkpoints_and_exits_zero(tmp_path: Path) -> None:
    _write_events(tmp_path / "events", _events(2000), 2)
    config = _config(tmp_path)  # follows forever: only a signal stops it
    proc, base = serve(config)
    deadline = time.monotonic() + 60
    while _get(base, "/healthz")[1]["events_in"] < 2000:
        assert time.monotonic() < deadline
        time.sleep(0.05)
    t0 = time.monotonic()
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=20) == 0
    assert time.monotonic() - t0 < 10
    ckpt = CheckpointStore(tmp_path / "ckpt").load_latest()
    assert ckpt is not None and ckpt.counters["rows_in"] == 2000
    # The next start resumes from it and reads nothing twice.
    proc, base = serve(config)
    status, health = _get(base, "/healthz")
    assert health["resumed_from_checkpoint"] == ckpt.sequence
    time.sleep(0.5)
    assert _get(base, "/healthz")[1]["events_in"] == 2000
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=20) == 0


def _final_state(tmp: Path) -> tuple[np.ndarray, np.ndarray, int]:
    model = final_model(tmp)
    emb = model.row_embeddings()[np.argsort(model.rows.keys)]
    return model.svd.s, emb @ emb.T, model.events_seen_


def test_sigkill_resumes_with_nothing_lost_or_doubled(tmp_path: Path) -> None:
    n = 4000
    table = _events(n, seed=5)
    straight_dir = tmp_path / "straight"
    _write_events(straight_dir / "events", table, 4)
    cfg = load_config(_config(straight_dir, source__stop_after_idle=0.5))
    assert EmbeddingDaemon(cfg).run() == 0
    s_ref, gram_ref, events_ref = _final_state(straight_dir)
    assert events_ref == n

    work = tmp_path / "killed"
    _write_events(work / "events", table, 4)
    config = _config(work, checkpoint__every_rows=250)
    # The first kill lands before any checkpoint; the rest at random points.
    delays = [0.0, *np.random.default_rng(11).uniform(0.1, 0.6, 4).tolist()]
    kill_repeatedly(config, work / "ckpt", delays)
    final = load_config(_config(work, checkpoint__every_rows=250, source__stop_after_idle=0.5))
    assert EmbeddingDaemon(final).run() == 0
    s, gram, events = _final_state(work)
    assert events == n  # every event applied exactly once
    # The replay applies the same batches in the same order, so the result is
    # the uninterrupted one up to rounding.
    np.testing.assert_allclose(s, s_ref, rtol=1e-9)
    np.testing.assert_allclose(gram, gram_ref, rtol=1e-7, atol=1e-9 * np.abs(gram_ref).max())
