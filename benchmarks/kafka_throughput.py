"""Kafka connector throughput on loopback: produce, consume and decode.

Against the Tansu test broker (started here on 127.0.0.1, memory storage) or
``--bootstrap host:port``. Each line compares the connector with the bare
confluent-kafka client doing the same transfer in the same run:

* produce single-row JSON messages: ``Producer.produce`` of pre-encoded
  values vs ``KafkaSink(format="json")`` (which also encodes the rows);
* consume single-row messages: ``Consumer.consume`` touching each message vs
  ``KafkaSource`` decoding JSON rows and raw float32 rows into record batches;
* consume 1024-row Arrow IPC messages: ``KafkaSource(format="arrow")``.

Usage::

    python benchmarks/kafka_throughput.py [--messages 300000] [--arrow-rows 2000000]
"""

from __future__ import annotations

import argparse
import importlib.util
import platform
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
from confluent_kafka import Consumer, Producer, TopicPartition

from streamfact.connectors.kafka import (
    KafkaSink,
    KafkaSource,
    encode_json,
    encode_raw,
)

D_RAW = 16


def _broker_module() -> Any:
    path = Path(__file__).resolve().parents[1] / "tests" / "kafka_broker.py"
    spec = importlib.util.spec_from_file_location("kafka_broker", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["kafka_broker"] = module
    spec.loader.exec_module(module)
    return module


@contextmanager
def broker(bootstrap: str | None) -> Iterator[Any]:
    module = _broker_module()
    if bootstrap:
        yield module.Broker(bootstrap=bootstrap)
    else:
        with module.start_broker() as b:
            yield b


def timed(fn: Callable[[], int]) -> tuple[float, int]:
    t0 = time.perf_counter()
    n = fn()
    return time.perf_counter() - t0, n


def produce_values(bootstrap: str, topic: str, values: list[bytes]) -> int:
    producer = Producer({"bootstrap.servers": bootstrap, "linger.ms": 5})
    for v in values:
        while True:
            try:
                producer.produce(topic, v)
                break
            except BufferError:
                producer.poll(0.05)
    if producer.flush(60):
        raise RuntimeError("undelivered messages")
    return len(values)


def consume_bare(bootstrap: str, topic: str, partitions: int, expected: int) -> int:
    consumer = Consumer({"bootstrap.servers": bootstrap, "group.id": "bench-bare",
                         "enable.auto.commit": False})
    consumer.assign([TopicPartition(topic, p, 0) for p in range(partitions)])
    n = 0
    size = 0
    while n < expected:
        for m in consumer.consume(1024, 1.0):
            if m.error() is None:
                size += len(m.value() or b"")
                n += 1
    consumer.close()
    return n


def consume_source(source: KafkaSource) -> int:
    rows = 0
    with source:
        for batch in source.batches():
            rows += batch.num_rows
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--messages", type=int, default=300_000, help="single-row messages")
    ap.add_argument("--arrow-rows", type=int, default=2_000_000)
    ap.add_argument("--rows-per-message", type=int, default=1024)
    ap.add_argument("--partitions", type=int, default=1)
    ap.add_argument("--bootstrap", default=None, help="external broker (default: start Tansu)")
    args = ap.parse_args()
    n, parts = args.messages, args.partitions
    rng = np.random.default_rng(0)
    events = pa.record_batch({
        "user": pa.array(rng.integers(0, 100_000, n)),
        "item": pa.array(rng.integers(0, 50_000, n)),
        "weight": pa.array(rng.random(n)),
    })
    json_values = encode_json(events)
    x = rng.standard_normal((n, D_RAW)).astype(np.float32)
    raw_batch = pa.record_batch(
        {"x": pa.FixedSizeListArray.from_arrays(pa.array(x.reshape(-1)), D_RAW)})
    raw_values = encode_raw(raw_batch)
    m = args.arrow_rows
    arrow_events = pa.record_batch({
        "user": pa.array(rng.integers(0, 100_000, m)),
        "item": pa.array(rng.integers(0, 50_000, m)),
        "weight": pa.array(rng.random(m)),
    })
    schema = events.schema
    print(f"# {platform.platform()}, {platform.processor() or platform.machine()}, "
          f"python {platform.python_version()}; {parts} partition(s)")
    rows_out: list[tuple[str, float, int, str]] = []

    def report(label: str, seconds: float, count: int, unit: str) -> None:
        rows_out.append((label, seconds, count, unit))
        print(f"{label:<58} {count / seconds:>12,.0f} {unit}/s  ({count:,} in {seconds:.2f} s)",
              flush=True)

    with broker(args.bootstrap) as b:
        boot = b.bootstrap
        t_json = b.create_topic(partitions=parts)
        report("produce 1-row JSON messages, bare Producer",
               *timed(lambda: produce_values(boot, t_json, json_values)), "msg")
        t_sink = b.create_topic(partitions=parts)

        def sink_json() -> int:
            with KafkaSink(t_sink, boot, format="json") as sink:
                for i in range(0, n, 65536):
                    sink.write(events.slice(i, 65536))
                return int(sink.flush()["produced"])

        report("produce 1-row JSON messages, KafkaSink (encodes too)", *timed(sink_json), "msg")
        report("consume 1-row messages, bare Consumer (no decoding)",
               *timed(lambda: consume_bare(boot, t_json, parts, n)), "msg")
        report("consume 1-row JSON messages -> batches, KafkaSource",
               *timed(lambda: consume_source(KafkaSource(
                   t_json, boot, format="json", schema=schema, stop_at_end=True, poll_timeout=0.1,
                   batch_size=4096))), "row")
        t_raw = b.create_topic(partitions=parts)
        produce_values(boot, t_raw, raw_values)
        report(f"consume 1-row raw float32x{D_RAW} messages, KafkaSource",
               *timed(lambda: consume_source(KafkaSource(
                   t_raw, boot, format="raw", schema=raw_batch.schema, stop_at_end=True,
                   poll_timeout=0.1,
                   batch_size=4096))), "row")
        t_arrow = b.create_topic(partitions=parts)
        rpm = args.rows_per_message

        def sink_arrow() -> int:
            with KafkaSink(t_arrow, boot, format="arrow", rows_per_message=rpm) as sink:
                for i in range(0, m, 65536):
                    sink.write(arrow_events.slice(i, 65536))
                sink.flush()
            return m

        report(f"produce {rpm}-row Arrow IPC messages, KafkaSink", *timed(sink_arrow), "row")
        report(f"consume {rpm}-row Arrow IPC messages, KafkaSource",
               *timed(lambda: consume_source(KafkaSource(
                   t_arrow, boot, format="arrow", stop_at_end=True, poll_timeout=0.1,
                   batch_size=64))), "row")


if __name__ == "__main__":
    main()
