"""The embedding daemon consuming a real Kafka-protocol broker (Tansu, on loopback)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from streamfact.service.config import load_config
from streamfact.service.daemon import EmbeddingDaemon

pytest.importorskip("confluent_kafka")
from daemon_helpers import (
    final_model,
    kill_repeatedly,
    planted_events,
    replayable_model,
    write_config,
)
from kafka_broker import Broker

from streamfact.connectors.kafka import encode_arrow

N_USERS, N_ITEMS = 30, 12
RANK = N_ITEMS  # rank ≥ min(m, n): no truncation, so batch cuts change only rounding


def _events(n: int, seed: int) -> pa.Table:
    return planted_events(n, seed, N_USERS, N_ITEMS)


def _produce(broker: Broker, topic: str, table: pa.Table, rows_per_message: int) -> None:
    producer = broker.producer()
    for start in range(0, table.num_rows, rows_per_message):
        chunk = table.slice(start, rows_per_message).to_batches()[0]
        producer.produce(topic, encode_arrow(chunk), partition=(start // rows_per_message) % 2)
    assert producer.flush(30) == 0


def _config(tmp: Path, broker: Broker, topic: str, **over: Any) -> Path:
    sections: dict[str, dict[str, Any]] = {
        "source": {"kind": "kafka", "bootstrap": broker.bootstrap, "topic": topic, "batch_size": 5},
        "events": {"kind": "interactions", "weight": "weight"},
        "model": replayable_model(RANK),
        "checkpoint": {"path": str(tmp / "ckpt"), "every_rows": 300, "every_seconds": 60.0},
        "snapshots": {"path": str(tmp / "snap"), "every_seconds": 0.2},
        "http": {"port": 0},
        "errors": {"policy": "dead_letter", "dead_letter_path": str(tmp / "rejected")},
    }
    return write_config(tmp, sections, **over)


def _final(tmp: Path) -> tuple[np.ndarray, np.ndarray, int]:
    model = final_model(tmp)
    order = np.argsort(model.rows.keys)
    col_order = np.argsort(model.cols.keys)
    recon = (model.svd.U * model.svd.s) @ model.svd.V.T
    return model.svd.s, recon[np.ix_(order, col_order)], model.events_seen_


def test_sigkill_with_kafka_loses_and_doubles_nothing(kafka_broker: Broker, tmp_path: Path) -> None:
    n = 3000
    topic = kafka_broker.create_topic(partitions=2)
    _produce(kafka_broker, topic, _events(n, seed=9), rows_per_message=50)

    straight = tmp_path / "straight"
    straight.mkdir()
    cfg = load_config(_config(straight, kafka_broker, topic, source__stop_after_idle=1.5))
    assert EmbeddingDaemon(cfg).run() == 0
    s_ref, recon_ref, events_ref = _final(straight)
    assert events_ref == n

    work = tmp_path / "killed"
    work.mkdir()
    config = _config(work, kafka_broker, topic)
    # The first kill comes before any checkpoint; the others at random points.
    delays = [0.0, *np.random.default_rng(4).uniform(0.2, 1.2, 4).tolist()]
    kill_repeatedly(config, work / "ckpt", delays)
    cfg = load_config(_config(work, kafka_broker, topic, source__stop_after_idle=1.5))
    assert EmbeddingDaemon(cfg).run() == 0
    s, recon, events = _final(work)
    assert events == n  # exactly once
    # Kafka batch boundaries depend on timing, but with no truncation the
    # factorisation is of the same matrix; only rounding differs.
    np.testing.assert_allclose(s, s_ref, rtol=1e-9)
    np.testing.assert_allclose(recon, recon_ref, atol=1e-9 * np.abs(recon_ref).max())


def test_bad_kafka_events_are_rejected_and_the_daemon_goes_on(
    kafka_broker: Broker, tmp_path: Path
) -> None:
    topic = kafka_broker.create_topic(partitions=1)
    good = _events(400, seed=2)
    weights = good.column("weight").to_numpy().copy()
    weights[7] = np.nan
    producer = kafka_broker.producer()
    producer.produce(
        topic,
        encode_arrow(
            good.slice(0, 200).set_column(2, "weight", pa.array(weights[:200])).to_batches()[0]
        ),
        partition=0,
    )
    producer.produce(topic, b"\x00 not an arrow stream", partition=0)
    producer.produce(
        topic, encode_arrow(pa.record_batch({"who": ["x"], "what": ["y"]})), partition=0
    )
    producer.produce(topic, encode_arrow(good.slice(200).to_batches()[0]), partition=0)
    assert producer.flush(30) == 0
    cfg = load_config(_config(tmp_path, kafka_broker, topic, source__stop_after_idle=1.5))
    daemon = EmbeddingDaemon(cfg)
    assert daemon.run() == 0
    assert daemon.model.events_seen_ == 399  # every good event, none lost
    values = daemon._metric_values()
    assert values["rejected"] == 3  # NaN weight, undecodable bytes, unknown schema
    reasons = pq.read_table(tmp_path / "rejected").column("_reason").to_pylist()
    assert len(reasons) == 3 and any("NaN" in r for r in reasons)
    assert any("offset 1" in r for r in reasons)
