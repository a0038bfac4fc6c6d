"""KafkaSource and KafkaSink against a real Kafka-protocol broker (Tansu or an external one).

Every test talks to the broker started by the session fixture ``kafka_broker``
(tests/kafka_broker.py); none uses a mock. Each test uses its own topics and
groups, so they are independent of order.
"""

from __future__ import annotations

import importlib.util
import json
import os
import sys
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pytest

pytest.importorskip("confluent_kafka")

from confluent_kafka import TopicPartition

from streamfact.connectors.kafka import (
    KafkaDecodeError,
    KafkaSink,
    KafkaSource,
    encode_arrow,
    encode_json,
    encode_raw,
)
from streamfact.io import Sink, Source, SourceCommitter

pytestmark = pytest.mark.kafka

try:  # tests/conftest.py registers the fixture and puts tests/ on sys.path
    import kafka_broker as _broker_module  # type: ignore[import-not-found]
except ImportError:  # run without that conftest: load the fixture module by path
    _spec = importlib.util.spec_from_file_location(
        "kafka_broker", Path(__file__).resolve().parents[1] / "kafka_broker.py"
    )
    assert _spec is not None and _spec.loader is not None
    _broker_module = importlib.util.module_from_spec(_spec)
    sys.modules["kafka_broker"] = _broker_module
    _spec.loader.exec_module(_broker_module)
    kafka_broker = _broker_module.kafka_broker

# Small poll timeouts keep bounded reads quick; the broker is on loopback.
FAST = {"poll_timeout": 0.1}


def produce(broker: Any, topic: str, values: list[bytes], *, partition: int | None = None,
            keys: list[bytes] | None = None, one_by_one: bool = False) -> None:
    """Produce ``values`` (batched by the client, as a real producer would) and wait.

    ``one_by_one`` sends each message in its own request, so that Tansu's
    ListOffsets (which counts record batches, not records) reports the true
    high watermark before anything was fetched.
    """
    producer = broker.producer(**{"linger.ms": 0 if one_by_one else 20})
    extra = {} if partition is None else {"partition": partition}
    for i, value in enumerate(values):
        producer.produce(topic, value=value, key=None if keys is None else keys[i], **extra)
        if one_by_one:
            producer.flush(30)
    assert producer.flush(30) == 0


def read_all(source: KafkaSource) -> pa.Table:
    try:
        batches = list(source.batches())
    finally:
        source.close()
    if not batches:
        return pa.table({})
    return pa.Table.from_batches(batches)


def ids_of(batches: list[pa.RecordBatch], column: str = "id") -> list[int]:
    out: list[int] = []
    for b in batches:
        out.extend(b.column(column).to_pylist())
    return out


# -- protocols and formats -------------------------------------------------------------------

def test_protocols_and_lazy_open() -> None:
    # No broker at this address: constructing, position() and close() must not connect.
    src = KafkaSource("t", "127.0.0.1:9", format="json")
    assert isinstance(src, Source) and isinstance(src, SourceCommitter)
    assert src.bounded is False
    assert src.position() == {"topic": "t", "partitions": {}}
    src.close()
    src.close()
    sink = KafkaSink("t", "127.0.0.1:9")
    assert isinstance(sink, Sink)
    assert sink.flush() == {"produced": 0, "rows": 0}
    sink.close()
    sink.close()
    with pytest.raises(ValueError, match="schema"):
        KafkaSource("t", "127.0.0.1:9", format="raw")
    with pytest.raises(ValueError, match="dead_letter_topic"):
        KafkaSource("t", "127.0.0.1:9", on_decode_error="dead_letter")
    with pytest.raises(ValueError, match="assign mode"):
        KafkaSource("t", "127.0.0.1:9", group="g", stop_at_end=True)
    with pytest.raises(ValueError, match="group.id"):
        KafkaSource("t", "127.0.0.1:9", config={"group.id": "x"})
    # A checkpointed position survives until partitions are actually assigned.
    grouped = KafkaSource("t", "127.0.0.1:9", group="g")
    assert grouped.subscribe
    grouped.seek({"topic": "t", "partitions": {"0": 5, "1": 7}})
    assert grouped.position() == {"topic": "t", "partitions": {"0": 5, "1": 7}}
    grouped.close()


def test_arrow_sink_to_source_round_trip(kafka_broker: Any) -> None:
    topic = kafka_broker.create_topic(partitions=1)
    rng = np.random.default_rng(0)
    n, d = 1000, 8
    x = rng.standard_normal((n, d)).astype(np.float32)
    batch = pa.record_batch({
        "id": pa.array(np.arange(n)),
        "x": pa.FixedSizeListArray.from_arrays(pa.array(x.reshape(-1)), d),
        "name": pa.array([f"r{i}" for i in range(n)]),
    })
    sink = KafkaSink(topic, kafka_broker.bootstrap, format="arrow", rows_per_message=128)
    sink.write(batch.slice(0, 600))
    sink.write(batch.slice(600))
    state = sink.flush()
    # 600 rows -> 5 messages, 400 rows -> 4 messages.
    assert state == {"produced": 9, "rows": n}
    sink.restore(state)  # at-least-once: a no-op
    sink.close()

    src = KafkaSource(topic, kafka_broker.bootstrap, format="arrow", stop_at_end=True, **FAST)
    assert src.bounded
    got = read_all(src)
    assert got.equals(pa.Table.from_batches([batch]))
    assert src.position() == {"topic": topic, "partitions": {"0": 9}}
    assert src.messages == 9 and src.rows == n and src.decode_errors == 0


def test_json_rows_with_schema_and_inferred(kafka_broker: Any) -> None:
    topic = kafka_broker.create_topic(partitions=3)
    n = 300
    rows = pa.record_batch({
        "user": [f"u{i % 7}" for i in range(n)],
        "item": list(range(n)),
        "weight": [0.25 * i for i in range(n)],
    })
    sink = KafkaSink(topic, kafka_broker.bootstrap, format="json", key_column="user")
    sink.write(rows)
    assert sink.flush() == {"produced": n, "rows": n}
    sink.close()

    schema = pa.schema([("user", pa.string()), ("item", pa.int64()), ("weight", pa.float64())])
    src = KafkaSource(topic, kafka_broker.bootstrap, format="json", schema=schema,
                      stop_at_end=True, metadata_columns=True, **FAST)
    got = read_all(src)
    assert got.num_rows == n
    assert got.select(["user", "item", "weight"]).schema == schema
    # Partitioning by key keeps one key's rows in one partition, in produce order.
    by_user: dict[str, list[int]] = {}
    part_of: dict[str, set[int]] = {}
    for user, item, part in zip(got["user"].to_pylist(), got["item"].to_pylist(),
                                got["_partition"].to_pylist(), strict=True):
        by_user.setdefault(user, []).append(item)
        part_of.setdefault(user, set()).add(part)
    assert all(len(p) == 1 for p in part_of.values())
    for user, items in by_user.items():
        assert items == [i for i in range(n) if f"u{i % 7}" == user]
    expected = {i: 0.25 * i for i in range(n)}
    assert dict(zip(got["item"].to_pylist(), got["weight"].to_pylist(), strict=True)) == expected
    assert sum(src.position()["partitions"].values()) == n

    inferred = KafkaSource(topic, kafka_broker.bootstrap, format="json", stop_at_end=True, **FAST)
    got2 = read_all(inferred)
    assert got2.num_rows == n
    assert inferred.schema is not None
    assert inferred.schema.field("weight").type == pa.float64()
    assert sorted(got2["item"].to_pylist()) == list(range(n))


def test_raw_fixed_width_rows(kafka_broker: Any) -> None:
    topic = kafka_broker.create_topic(partitions=2)
    d = 5
    schema = pa.schema([("x", pa.list_(pa.float32(), d)), ("id", pa.int64())])
    rng = np.random.default_rng(1)
    x = rng.standard_normal((64, d)).astype(np.float32)
    ids = np.arange(64, dtype=np.int64)
    batch = pa.record_batch(
        [pa.FixedSizeListArray.from_arrays(pa.array(x.reshape(-1)), d), pa.array(ids)],
        schema=schema,
    )
    # 32 one-row messages to partition 0, 8 four-row messages to partition 1.
    produce(kafka_broker, topic, encode_raw(batch.slice(0, 32)), partition=0)
    produce(kafka_broker, topic, encode_raw(batch.slice(32), rows_per_message=4), partition=1)
    src = KafkaSource(topic, kafka_broker.bootstrap, format="raw", schema=schema,
                      stop_at_end=True, **FAST)
    got = read_all(src).sort_by("id")
    assert got.schema == schema
    assert got["id"].to_pylist() == ids.tolist()
    got_x = np.stack(got["x"].to_numpy(zero_copy_only=False))
    np.testing.assert_array_equal(got_x, x)  # bit-exact: raw little-endian float32
    assert src.position()["partitions"] == {"0": 32, "1": 8}


# -- positions, seek, commit ---------------------------------------------------------------------

def test_seek_resumes_exactly_across_partitions(kafka_broker: Any) -> None:
    topic = kafka_broker.create_topic(partitions=3)
    n = 3000
    values = encode_json(pa.record_batch({"id": list(range(n))}))
    produce(kafka_broker, topic, values)  # the client's partitioner spreads them
    schema = pa.schema([("id", pa.int64())])
    rng = np.random.default_rng(2)
    seen: list[int] = []
    position = None
    for _round in range(20):
        src = KafkaSource(topic, kafka_broker.bootstrap, format="json", schema=schema,
                          batch_size=int(rng.integers(7, 200)), stop_at_end=True, **FAST)
        if position is not None:
            src.seek(json.loads(json.dumps(position)))  # as stored in a checkpoint manifest
        it = src.batches()
        stop_after = int(rng.integers(1, 6))
        finished = True
        for k, batch in enumerate(it):
            seen.extend(batch.column("id").to_pylist())
            if k + 1 == stop_after:
                finished = False
                break
        position = src.position()
        src.close()
        if finished:
            break
    assert finished, "20 interrupted runs did not reach the end"
    assert len(seen) == n, "duplicates or gaps after resuming"
    assert sorted(seen) == list(range(n))
    assert position is not None and sum(position["partitions"].values()) == n


def test_commit_shows_in_group_and_seek_wins_over_it(kafka_broker: Any) -> None:
    topic = kafka_broker.create_topic(partitions=2)
    n = 200
    produce(kafka_broker, topic, encode_json(pa.record_batch({"id": list(range(n))})),
            one_by_one=True)
    group = kafka_broker.unique_topic("group")
    schema = pa.schema([("id", pa.int64())])
    src = KafkaSource(topic, kafka_broker.bootstrap, format="json", schema=schema,
                      partitions=[0, 1], group=group, batch_size=50, **FAST)
    it = src.batches()
    first = [next(it), next(it)]
    position = src.position()
    src.commit(position)
    lag = src.lag()
    src.close()
    offsets = {int(p): o for p, o in position["partitions"].items()}
    assert sum(offsets.values()) == sum(b.num_rows for b in first) == 100
    # Lag is what is left of each partition (fetched or not yet).
    assert lag.keys() == {0, 1}
    assert sum(lag.values()) == n - 100

    # What a lag tool sees: the group's committed offsets.
    probe = kafka_broker.consumer(group)
    committed = probe.committed([TopicPartition(topic, p) for p in (0, 1)], timeout=10)
    probe.close()
    assert {tp.partition: tp.offset for tp in committed} == offsets

    # Without a seek a new member starts at the committed offsets ...
    rest = KafkaSource(topic, kafka_broker.bootstrap, format="json", schema=schema,
                       partitions=[0, 1], group=group, stop_at_end=True, **FAST)
    rest_ids = read_all(rest)["id"].to_pylist()
    assert sorted(ids_of(first) + rest_ids) == list(range(n))
    # ... but a checkpoint's position wins over the group (correctness never depends on it).
    again = KafkaSource(topic, kafka_broker.bootstrap, format="json", schema=schema,
                        partitions=[0, 1], group=group, stop_at_end=True, **FAST)
    again.seek({"topic": topic, "partitions": {"0": 0, "1": 0}})
    assert sorted(read_all(again)["id"].to_pylist()) == list(range(n))
    with pytest.raises(ValueError, match="topic"):
        KafkaSource(topic, kafka_broker.bootstrap).seek({"topic": "other", "partitions": {}})


def test_stop_at_end_reads_everything_batched_and_stops(kafka_broker: Any) -> None:
    empty = kafka_broker.create_topic(partitions=2)
    src = KafkaSource(empty, kafka_broker.bootstrap, format="json", stop_at_end=True, **FAST)
    assert list(src.batches()) == []
    src.close()

    topic = kafka_broker.create_topic(partitions=2)
    # Produced in client-side batches: the broker's ListOffsets under-reports this case.
    produce(kafka_broker, topic, encode_json(pa.record_batch({"id": list(range(500))})))
    src = KafkaSource(topic, kafka_broker.bootstrap, format="json", stop_at_end=True,
                      batch_size=64, **FAST)
    assert sorted(read_all(src)["id"].to_pylist()) == list(range(500))
    # Resuming at the end of a bounded source yields nothing more.
    again = KafkaSource(topic, kafka_broker.bootstrap, format="json", stop_at_end=True, **FAST)
    again.seek(src.position())
    assert list(again.batches()) == []
    again.close()


# -- undecodable messages ------------------------------------------------------------------------

GOOD = [json.dumps({"id": i, "w": float(i)}).encode() for i in range(10)]
BAD_AT = (3, 7)  # offsets of the corrupt messages in partition 0


def corrupt_topic(broker: Any) -> str:
    topic = broker.create_topic(partitions=1)
    values = list(GOOD)
    values.insert(BAD_AT[0], b"\x00not json")
    values.insert(BAD_AT[1], json.dumps({"id": "seven", "w": 1.0}).encode())  # bad type
    produce(broker, topic, values, partition=0)
    return topic


SCHEMA = pa.schema([("id", pa.int64()), ("w", pa.float64())])


def test_undecodable_skip_keeps_every_good_row(kafka_broker: Any) -> None:
    topic = corrupt_topic(kafka_broker)
    src = KafkaSource(topic, kafka_broker.bootstrap, format="json", schema=SCHEMA,
                      on_decode_error="skip", stop_at_end=True, **FAST)
    got = read_all(src)
    assert got["id"].to_pylist() == list(range(10))
    assert src.decode_errors == 2 and src.messages == 12
    rejected = src.drain_rejected()
    assert [(r.partition, r.offset) for r in rejected] == [(0, 3), (0, 7)]
    assert "invalid JSON" in rejected[0].reason and rejected[0].value == b"\x00not json"
    assert "'id'" in rejected[1].reason
    assert src.rejected == type(src.rejected)()  # drained
    assert src.drain_rejected_batch().num_rows == 0
    assert src.position()["partitions"] == {"0": 12}


def test_undecodable_dead_letter(kafka_broker: Any) -> None:
    topic = corrupt_topic(kafka_broker)
    dlq = kafka_broker.create_topic(partitions=1)
    seen: list[int] = []
    src = KafkaSource(topic, kafka_broker.bootstrap, format="json", schema=SCHEMA,
                      on_decode_error="dead_letter", dead_letter_topic=dlq,
                      stop_at_end=True, **FAST)
    got = read_all(src)
    assert got["id"].to_pylist() == list(range(10))
    assert src.dead_lettered == 2 and len(src.rejected) == 2
    table = src.drain_rejected_batch()
    assert table["_offset"].to_pylist() == list(BAD_AT)
    assert table["_value"][0].as_py() == b"\x00not json"
    # The dead-letter topic holds the raw messages with where they came from and why.
    consumer = kafka_broker.consumer(kafka_broker.unique_topic("dlq"))
    consumer.assign([TopicPartition(dlq, 0, 0)])
    letters: list[Any] = []
    deadline = time.monotonic() + 10
    while len(letters) < 2 and time.monotonic() < deadline:
        letters.extend(m for m in consumer.consume(10, 0.2) if m.error() is None)
    consumer.close()
    assert [m.value() for m in letters] == [b"\x00not json",
                                            json.dumps({"id": "seven", "w": 1.0}).encode()]
    for m, offset in zip(letters, BAD_AT, strict=True):
        headers = dict(m.headers())
        assert headers["streamfact.topic"] == topic.encode()
        assert headers["streamfact.partition"] == b"0"
        assert headers["streamfact.offset"] == str(offset).encode()
        assert headers["streamfact.reason"]
        seen.append(offset)
    assert seen == list(BAD_AT)

    # A callable policy sees each rejection and keeps going.
    calls: list[int] = []
    src = KafkaSource(topic, kafka_broker.bootstrap, format="json", schema=SCHEMA,
                      on_decode_error=lambda r: calls.append(r.offset), stop_at_end=True, **FAST)
    assert read_all(src)["id"].to_pylist() == list(range(10))
    assert calls == list(BAD_AT)


def test_undecodable_raise_names_partition_and_offset(kafka_broker: Any) -> None:
    topic = corrupt_topic(kafka_broker)
    src = KafkaSource(topic, kafka_broker.bootstrap, format="json", schema=SCHEMA,
                      stop_at_end=True, **FAST)
    got: list[int] = []
    with pytest.raises(KafkaDecodeError, match=r"partition 0 offset 3: invalid JSON") as info:
        for batch in src.batches():
            got.extend(batch.column("id").to_pylist())
    assert info.value.topic == topic and info.value.offset == 3
    assert got == [0, 1, 2]  # the good messages before it were delivered
    assert src.position()["partitions"] == {"0": 3}  # the bad message is next
    # Iterating again resumes at the bad message, so it raises again: nothing is skipped silently.
    with pytest.raises(KafkaDecodeError, match="offset 3"):
        list(src.batches())
    src.close()
    # An operator who decides to skip it seeks past it.
    after = KafkaSource(topic, kafka_broker.bootstrap, format="json", schema=SCHEMA,
                        on_decode_error="skip", stop_at_end=True, **FAST)
    after.seek({"topic": topic, "partitions": {"0": 4}})
    assert read_all(after)["id"].to_pylist() == list(range(3, 10))


def test_arrow_and_raw_corruption(kafka_broker: Any) -> None:
    topic = kafka_broker.create_topic(partitions=1)
    good = pa.record_batch({"a": [1.0, 2.0]})
    other_schema = pa.record_batch({"b": ["x"]})
    produce(kafka_broker, topic,
            [encode_arrow(good), b"garbage", encode_arrow(other_schema), encode_arrow(good)],
            partition=0)
    src = KafkaSource(topic, kafka_broker.bootstrap, format="arrow", on_decode_error="skip",
                      stop_at_end=True, **FAST)
    assert read_all(src)["a"].to_pylist() == [1.0, 2.0, 1.0, 2.0]
    reasons = [r.reason for r in src.rejected]
    assert "Arrow IPC" in reasons[0] and "differs" in reasons[1]

    raw_topic = kafka_broker.create_topic(partitions=1)
    schema = pa.schema([("x", pa.list_(pa.float64(), 2))])
    row = np.array([1.5, -2.0], dtype="<f8").tobytes()
    produce(kafka_broker, raw_topic, [row, row[:5], row + row], partition=0)
    src = KafkaSource(raw_topic, kafka_broker.bootstrap, format="raw", schema=schema,
                      on_decode_error="skip", stop_at_end=True, **FAST)
    got = read_all(src)
    assert got.num_rows == 3
    assert [(r.offset, r.reason) for r in src.rejected] == [
        (1, "5 bytes is not a positive multiple of the row width 16")
    ]


# -- group mode ------------------------------------------------------------------------------------

def test_group_rebalance_calls_on_revoke_and_hands_over_exactly(kafka_broker: Any) -> None:
    topic = kafka_broker.create_topic(partitions=4)
    # Alone, the slow first member needs ~9 s for all rows (batches of 20 every
    # 30 ms), far more than a rebalance takes (~1 s, several on a loaded
    # machine), so the second member always finds work left. With 4000 rows
    # at 20 ms per batch the first member once finished alone.
    n = 6000
    produce(kafka_broker, topic, encode_json(pa.record_batch({"id": list(range(n))})))
    group = kafka_broker.unique_topic("rebalance")
    schema = pa.schema([("id", pa.int64())])
    lock = threading.Lock()
    seen: dict[str, list[int]] = {"a": [], "b": []}
    revoked: dict[str, list[list[int]]] = {"a": [], "b": []}
    checkpoints: dict[str, list[dict[str, Any]]] = {"a": [], "b": []}
    sources: dict[str, KafkaSource] = {}
    errors: list[BaseException] = []

    def make(name: str) -> KafkaSource:
        src = KafkaSource(topic, kafka_broker.bootstrap, format="json", schema=schema,
                          group=group, batch_size=20, poll_timeout=0.1)

        def on_revoke(partitions: list[int]) -> None:
            # What a pipeline does here: checkpoint the position of what it processed.
            revoked[name].append(partitions)
            checkpoints[name].append(src.position())

        src.on_revoke = on_revoke
        return src

    def run(name: str, slow: bool) -> None:
        try:
            for batch in sources[name].batches():
                with lock:
                    seen[name].extend(batch.column("id").to_pylist())
                if slow:
                    time.sleep(0.03)  # leaves work for the second member
        except BaseException as exc:
            errors.append(exc)

    def total() -> int:
        with lock:
            return len(seen["a"]) + len(seen["b"])

    sources["a"] = make("a")
    ta = threading.Thread(target=run, args=("a", True))
    ta.start()
    deadline = time.monotonic() + 20
    while not seen["a"] and time.monotonic() < deadline:
        time.sleep(0.02)
    assert seen["a"], "the first member got no data"
    sources["b"] = make("b")
    tb = threading.Thread(target=run, args=("b", True))
    tb.start()
    deadline = time.monotonic() + 40
    while total() < n and time.monotonic() < deadline and not errors:
        time.sleep(0.02)
    for name in ("a", "b"):
        sources[name].close()
    ta.join(10)
    tb.join(10)
    assert not ta.is_alive() and not tb.is_alive()
    assert not errors, errors
    # The second member joined: the first was asked to give up partitions, checkpointed first.
    assert revoked["a"] and revoked["a"][0] == [0, 1, 2, 3]
    assert checkpoints["a"][0]["partitions"].keys() == {"0", "1", "2", "3"}
    assert seen["b"], "the second member got no partition"
    # Exactly once across the hand-over: nothing lost, nothing read twice.
    everything = seen["a"] + seen["b"]
    assert len(everything) == n
    assert sorted(everything) == list(range(n))
    # The revoke committed the position the callback checkpointed.
    probe = kafka_broker.consumer(group)
    committed = probe.committed([TopicPartition(topic, p) for p in range(4)], timeout=10)
    probe.close()
    assert all(tp.offset >= 0 for tp in committed)


# -- lifecycle -------------------------------------------------------------------------------

def _os_threads() -> int:
    return len(os.listdir("/proc/self/task"))


@pytest.mark.skipif(not os.path.isdir("/proc/self/task"), reason="needs /proc")
def test_close_from_another_thread_and_no_threads_left(kafka_broker: Any) -> None:
    topic = kafka_broker.create_topic(partitions=1)
    produce(kafka_broker, topic, [encode_arrow(pa.record_batch({"a": [1]}))])
    before = _os_threads()
    src = KafkaSource(topic, kafka_broker.bootstrap, format="arrow", **FAST)
    got: list[pa.RecordBatch] = []
    done = threading.Event()

    def follow() -> None:
        got.extend(src.batches())  # follows forever until close()
        done.set()

    t = threading.Thread(target=follow)
    t.start()
    deadline = time.monotonic() + 10
    while not got and time.monotonic() < deadline:
        time.sleep(0.01)
    assert got and src.lag() == {0: 0}
    src.close()
    assert done.wait(5), "close() did not stop the iteration"
    t.join(5)
    src.close()  # idempotent
    with pytest.raises(RuntimeError, match="after close"):
        src.batches()
    # librdkafka's native threads are gone once the client is destroyed.
    deadline = time.monotonic() + 5
    while _os_threads() > before and time.monotonic() < deadline:
        time.sleep(0.05)
    assert _os_threads() <= before


def test_close_inside_the_iteration_is_deferred(kafka_broker: Any) -> None:
    # As from a signal handler or a callback running inside consume(): the consumer is
    # closed when the iteration unwinds, not underneath it.
    topic = corrupt_topic(kafka_broker)
    holder: dict[str, KafkaSource] = {}

    def close_now(rejection: Any) -> None:
        holder["src"].close()

    src = holder["src"] = KafkaSource(topic, kafka_broker.bootstrap, format="json",
                                      schema=SCHEMA, on_decode_error=close_now, **FAST)
    ids = ids_of(list(src.batches()))  # a following source: ends only because of close()
    assert ids and ids == list(range(len(ids)))  # the batch in hand was still delivered
    assert src._consumer is None and src._closed
    with pytest.raises(RuntimeError, match="after close"):
        src.batches()


def test_sink_arrow_key_runs(kafka_broker: Any) -> None:
    topic = kafka_broker.create_topic(partitions=3)
    batch = pa.record_batch({"k": ["a", "a", "b", "b", "b", "a"], "v": [0, 1, 2, 3, 4, 5]})
    with KafkaSink(topic, kafka_broker.bootstrap, key_column="k", rows_per_message=2) as sink:
        sink.write(batch)
        # runs: a a | b b b -> b b, b | a  => 4 messages
        assert sink.flush() == {"produced": 4, "rows": 6}
    consumer = kafka_broker.consumer(kafka_broker.unique_topic("keys"))
    consumer.assign([TopicPartition(topic, p, 0) for p in range(3)])
    msgs: list[Any] = []
    deadline = time.monotonic() + 10
    while len(msgs) < 4 and time.monotonic() < deadline:
        msgs.extend(m for m in consumer.consume(10, 0.2) if m.error() is None)
    consumer.close()
    by_key: dict[bytes, list[int]] = {}
    for m in msgs:
        keys = set(pa.ipc.open_stream(m.value()).read_all()["k"].to_pylist())
        assert keys == {m.key().decode()}
        by_key.setdefault(m.key(), []).append(m.partition())
    assert {k: len(set(p)) for k, p in by_key.items()} == {b"a": 1, b"b": 1}


# -- with the pipeline ---------------------------------------------------------------------------

def test_pipeline_checkpoint_resume_and_group_commit(kafka_broker: Any, tmp_path: Path) -> None:
    import streamfact as sf

    topic = kafka_broker.create_topic(partitions=3)
    rng = np.random.default_rng(3)
    n, d = 3000, 4
    x = rng.standard_normal((n, d)) * np.arange(1, d + 1) + 2.0
    values = [
        encode_arrow(pa.record_batch({
            "id": pa.array(np.arange(i, i + 50)),
            "x": pa.FixedSizeListArray.from_arrays(pa.array(x[i:i + 50].reshape(-1)), d),
        }))
        for i in range(0, n, 50)
    ]
    produce(kafka_broker, topic, values)
    group = kafka_broker.unique_topic("pipeline")

    def build() -> tuple[Any, KafkaSource, Any]:
        moments = sf.RunningMoments(d)
        src = KafkaSource(topic, kafka_broker.bootstrap, format="arrow", group=group,
                          partitions=[0, 1, 2], batch_size=3, stop_at_end=True, **FAST)
        pipe = (sf.Pipeline(src, progress=False)
                .update(moments.update, X=sf.dense("x"))
                .checkpoint(tmp_path / "ckpt", every_rows=400))
        return moments, src, pipe

    # First run: dies (no final checkpoint) after about half the rows.
    _, src, pipe = build()
    done = 0
    for out in pipe:
        done += out.num_rows
        if done >= 1500:
            break
    src.close()  # what a crash leaves: the rows after the last checkpoint are lost
    # Second run resumes from the checkpoint: every row counted exactly once.
    moments, src, pipe = build()
    pipe.run()
    assert pipe.resumed_from is not None
    assert moments.count == n
    # Welford updates in float64 against numpy's two-pass mean: rounding only.
    np.testing.assert_allclose(moments.mean, x.mean(axis=0), rtol=1e-12)
    # Each checkpoint committed its offsets: the group has the final position.
    probe = kafka_broker.consumer(group)
    committed = probe.committed([TopicPartition(topic, p) for p in range(3)], timeout=10)
    probe.close()
    assert {str(tp.partition): tp.offset for tp in committed} == src.position()["partitions"]
    assert sum(tp.offset for tp in committed) == len(values)
