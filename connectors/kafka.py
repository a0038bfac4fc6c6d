"""Kafka source and sink (confluent-kafka): Arrow IPC, JSON or raw fixed-width messages.

:class:`KafkaSource` turns a topic into a stream of ``pyarrow.RecordBatch``
with an exact, checkpointable position (partition -> next offset);
:class:`KafkaSink` produces batches to a topic, at least once.

confluent-kafka is imported when a source or sink is first used, so
``import streamfact.connectors`` works without it.
"""

from __future__ import annotations

import collections
import itertools
import json
import logging
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import pyarrow as pa

from streamfact.io import Position

__all__ = [
    "KafkaDecodeError",
    "KafkaSink",
    "KafkaSource",
    "RejectedMessage",
    "encode_arrow",
    "encode_json",
    "encode_raw",
    "raw_row_dtype",
]

log = logging.getLogger(__name__)

Format = Literal["arrow", "json", "raw"]
DecodeErrorPolicy = Literal["raise", "skip", "dead_letter"]

#: Consumer settings applied before the user's ``config``. The two timeouts
#: make consumer-group joins take about a second instead of about twenty.
DEFAULT_CONSUMER_CONFIG: dict[str, Any] = {
    "enable.auto.commit": False,
    "enable.auto.offset.store": False,
    "auto.offset.reset": "earliest",
    "session.timeout.ms": 2000,
    "heartbeat.interval.ms": 500,
    "enable.partition.eof": False,
}

_FORMATS = ("arrow", "json", "raw")
_POLICIES = ("raise", "skip", "dead_letter")
_RESERVED_CONFIG = frozenset({
    "bootstrap.servers", "group.id", "enable.auto.commit", "enable.auto.offset.store",
})
_METADATA_COLUMNS = ("_partition", "_offset", "_timestamp")


class KafkaDecodeError(ValueError):
    """A message that could not be decoded, under ``on_decode_error="raise"``."""

    def __init__(self, topic: str, partition: int, offset: int, reason: str) -> None:
        self.topic, self.partition, self.offset, self.reason = topic, partition, offset, reason
        super().__init__(
            f"KafkaSource: cannot decode message at topic {topic!r} partition {partition} "
            f"offset {offset}: {reason}"
        )


@dataclass(frozen=True)
class RejectedMessage:
    """A message the source could not decode, as kept in :attr:`KafkaSource.rejected`."""

    topic: str
    partition: int
    offset: int
    reason: str
    value: bytes | None
    key: bytes | None = None


# -- encoders (also what producers of test data and benchmarks use) -------------------------

def encode_arrow(batch: pa.RecordBatch | pa.Table) -> bytes:
    """One Arrow IPC stream holding ``batch``: the ``format="arrow"`` message value.

    Examples
    --------
    >>> import pyarrow as pa
    >>> from streamfact.connectors.kafka import encode_arrow
    >>> msg = encode_arrow(pa.record_batch({"a": [1, 2]}))
    >>> pa.ipc.open_stream(msg).read_all().column("a").to_pylist()
    [1, 2]
    """
    sink = pa.BufferOutputStream()
    with pa.ipc.new_stream(sink, batch.schema) as writer:
        writer.write(batch)
    return sink.getvalue().to_pybytes()


def _json_default(value: Any) -> Any:
    if isinstance(value, (np.generic,)):
        return value.item()
    if hasattr(value, "isoformat"):
        return value.isoformat()
    raise TypeError(f"value of type {type(value).__name__} is not JSON-serialisable")


def encode_json(batch: pa.RecordBatch | pa.Table) -> list[bytes]:
    """One JSON object per row: the ``format="json"`` message values.

    Examples
    --------
    >>> import pyarrow as pa
    >>> from streamfact.connectors.kafka import encode_json
    >>> encode_json(pa.record_batch({"user": ["u1"], "weight": [0.5]}))
    [b'{"user":"u1","weight":0.5}']
    """
    dumps = json.dumps
    return [
        dumps(row, separators=(",", ":"), default=_json_default).encode()
        for row in batch.to_pylist()
    ]


def raw_row_dtype(schema: pa.Schema) -> np.dtype:
    """The packed little-endian numpy record type of one ``format="raw"`` row.

    Every field must be a fixed-width number (``int8`` ... ``float64``) or a
    ``fixed_size_list`` of one; a row is the fields' values back to back, in
    schema order, with no padding.

    Examples
    --------
    >>> import pyarrow as pa
    >>> from streamfact.connectors.kafka import raw_row_dtype
    >>> dt = raw_row_dtype(pa.schema([("x", pa.list_(pa.float32(), 3)), ("id", pa.int64())]))
    >>> dt.itemsize
    20
    """
    fields: list[tuple[Any, ...]] = []
    for field in schema:
        t = field.type
        shape: tuple[int, ...] = ()
        if pa.types.is_fixed_size_list(t):
            shape = (t.list_size,)
            t = t.value_type
        if not (pa.types.is_integer(t) or pa.types.is_floating(t)):
            raise ValueError(
                f"format='raw' needs fixed-width numeric fields or fixed_size_list of them; "
                f"field {field.name!r} has type {field.type}"
            )
        base = np.dtype(t.to_pandas_dtype()).newbyteorder("<")
        fields.append((field.name, base, shape) if shape else (field.name, base))
    if not fields:
        raise ValueError("format='raw' needs a schema with at least one field")
    return np.dtype(fields, align=False)


def encode_raw(batch: pa.RecordBatch, rows_per_message: int = 1) -> list[bytes]:
    """Pack ``batch`` into ``format="raw"`` message values of ``rows_per_message`` rows.

    Examples
    --------
    >>> import numpy as np, pyarrow as pa
    >>> from streamfact.connectors.kafka import encode_raw
    >>> x = pa.FixedSizeListArray.from_arrays(pa.array(np.ones(4, np.float32)), 2)
    >>> [len(m) for m in encode_raw(pa.record_batch({"x": x}))]
    [8, 8]
    """
    dtype = raw_row_dtype(batch.schema)
    n = batch.num_rows
    rec = np.empty(n, dtype=dtype)
    for name, column in zip(batch.schema.names, batch.columns, strict=True):
        if pa.types.is_fixed_size_list(column.type):
            values = column.flatten().to_numpy(zero_copy_only=False)
            rec[name] = values.reshape(n, column.type.list_size)
        else:
            rec[name] = column.to_numpy(zero_copy_only=False)
    data = rec.tobytes()
    step = dtype.itemsize * max(1, int(rows_per_message))
    return [data[i:i + step] for i in range(0, len(data), step)]


# -- decoders --------------------------------------------------------------------------------

class _BadMessage(Exception):
    pass


class _Decoder:
    """Turns a list of message values into one batch plus per-message failures."""

    def __init__(self, fmt: str, schema: pa.Schema | None) -> None:
        self.format = fmt
        self.schema = schema
        self._raw_dtype = raw_row_dtype(schema) if fmt == "raw" and schema is not None else None
        if fmt == "raw" and schema is None:
            raise ValueError("format='raw' needs a schema (fixed-width numeric fields)")

    def decode(
        self, values: list[bytes | None]
    ) -> tuple[pa.RecordBatch | None, list[int], dict[int, str]]:
        """Decode ``values``; return (batch of the good ones, rows per good message, bad)."""
        if self.format == "arrow":
            return self._arrow(values)
        if self.format == "json":
            return self._json(values)
        return self._raw(values)

    # Arrow IPC: one stream per message; the schema is fixed by ``schema`` or the first message.
    def _arrow(
        self, values: list[bytes | None]
    ) -> tuple[pa.RecordBatch | None, list[int], dict[int, str]]:
        parts: list[pa.RecordBatch] = []
        rows: list[int] = []
        bad: dict[int, str] = {}
        for i, value in enumerate(values):
            try:
                if not value:
                    raise _BadMessage("empty message")
                try:
                    table = pa.ipc.open_stream(value).read_all()
                except (pa.ArrowException, OSError) as exc:
                    raise _BadMessage(f"not an Arrow IPC stream ({exc})") from None
                if self.schema is None:
                    self.schema = table.schema.remove_metadata()
                elif not table.schema.equals(self.schema, check_metadata=False):
                    raise _BadMessage(
                        f"schema {table.schema.to_string(show_schema_metadata=False)!s} "
                        f"differs from the stream's {self.schema}".replace("\n", "; ")
                    )
            except _BadMessage as exc:
                bad[i] = str(exc)
                continue
            batches = table.to_batches()
            parts.extend(batches)
            rows.append(table.num_rows)
        if not parts:
            return None, rows, bad
        assert self.schema is not None
        parts = [b.replace_schema_metadata(None) for b in parts]
        batch = parts[0] if len(parts) == 1 else pa.concat_batches(parts)
        return batch, rows, bad

    # JSON: one object per message, converted column by column.
    def _json(
        self, values: list[bytes | None]
    ) -> tuple[pa.RecordBatch | None, list[int], dict[int, str]]:
        objects: list[dict[str, Any]] = []
        index: list[int] = []
        bad: dict[int, str] = {}
        loads = json.loads
        for i, value in enumerate(values):
            if not value:
                bad[i] = "empty message"
                continue
            try:
                obj = loads(value)
            except (ValueError, UnicodeDecodeError) as exc:
                bad[i] = f"invalid JSON ({exc})"
                continue
            if not isinstance(obj, dict):
                bad[i] = f"JSON value is a {type(obj).__name__}, not an object"
                continue
            objects.append(obj)
            index.append(i)
        if not objects:
            return None, [], bad
        if self.schema is None:
            self.schema = self._infer(objects)
        try:
            batch = self._convert(objects)
        except _BadMessage:
            # Find the culprits one by one; the good rows still go through.
            keep: list[dict[str, Any]] = []
            for obj, i in zip(objects, index, strict=True):
                try:
                    self._convert([obj])
                except _BadMessage as exc:
                    bad[i] = str(exc)
                    continue
                keep.append(obj)
            if not keep:
                return None, [], bad
            batch = self._convert(keep)
        return batch, [1] * batch.num_rows, bad

    def _infer(self, objects: list[dict[str, Any]]) -> pa.Schema:
        for candidate in (objects, objects[:1]):
            try:
                inferred = pa.RecordBatch.from_pylist(candidate).schema
            except (pa.ArrowException, TypeError, ValueError):
                continue
            return pa.schema([f.with_nullable(True) for f in inferred])
        return pa.schema([])

    def _convert(self, objects: list[dict[str, Any]]) -> pa.RecordBatch:
        assert self.schema is not None
        arrays = []
        for field in self.schema:
            name = field.name
            column = [obj.get(name) for obj in objects]
            if not field.nullable and any(v is None for v in column):
                raise _BadMessage(f"field {name!r} is missing or null")
            if pa.types.is_integer(field.type) and any(
                isinstance(v, float) and not v.is_integer() for v in column
            ):
                raise _BadMessage(f"field {name!r}: non-integral number for {field.type}")
            try:
                arrays.append(pa.array(column, type=field.type))
            except (pa.ArrowException, TypeError, ValueError, OverflowError) as exc:
                raise _BadMessage(f"field {name!r}: {exc}") from None
        return pa.RecordBatch.from_arrays(arrays, schema=self.schema)

    # Raw: packed little-endian rows of the declared fixed-width schema.
    def _raw(
        self, values: list[bytes | None]
    ) -> tuple[pa.RecordBatch | None, list[int], dict[int, str]]:
        dtype = self._raw_dtype
        assert dtype is not None and self.schema is not None
        width = dtype.itemsize
        good: list[bytes] = []
        rows: list[int] = []
        bad: dict[int, str] = {}
        for i, value in enumerate(values):
            size = len(value) if value is not None else 0
            if size == 0 or size % width:
                bad[i] = f"{size} bytes is not a positive multiple of the row width {width}"
                continue
            good.append(value)  # type: ignore[arg-type]
            rows.append(size // width)
        if not good:
            return None, rows, bad
        rec = np.frombuffer(b"".join(good), dtype=dtype)
        arrays: list[pa.Array] = []
        for field in self.schema:
            col = np.ascontiguousarray(rec[field.name])
            if not col.dtype.isnative:
                col = col.astype(col.dtype.newbyteorder("="))
            if pa.types.is_fixed_size_list(field.type):
                flat = pa.array(col.reshape(-1), type=field.type.value_type)
                arrays.append(pa.FixedSizeListArray.from_arrays(flat, field.type.list_size))
            else:
                arrays.append(pa.array(col, type=field.type))
        return pa.RecordBatch.from_arrays(arrays, schema=self.schema), rows, bad


def _load_kafka() -> Any:
    try:
        import confluent_kafka
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise ImportError(
            "the Kafka connector needs confluent-kafka: pip install 'streamfact[kafka]'"
        ) from exc
    return confluent_kafka


def _check_config(config: Mapping[str, Any] | None) -> dict[str, Any]:
    config = dict(config or {})
    clash = sorted(_RESERVED_CONFIG & config.keys())
    if clash:
        raise ValueError(f"config may not set {clash}: they are parameters or managed here")
    strategy = str(config.get("partition.assignment.strategy", ""))
    if "cooperative" in strategy:
        raise ValueError("KafkaSource supports the eager assignors only (range, roundrobin)")
    if config.get("group.protocol", "classic") != "classic":
        raise ValueError("KafkaSource supports group.protocol=classic only")
    return config


class KafkaSource:
    """Consume a Kafka topic as a stream of Arrow record batches.

    Parameters
    ----------
    topic:
        Topic to read.
    bootstrap:
        ``host:port[,host:port...]`` of the brokers.
    partitions:
        Partitions to read, assigned explicitly (``assign``). Default: every
        partition of the topic, assigned explicitly when ``group`` is None and
        through the group (``subscribe``) when it is set.
    format:
        ``"arrow"``: each message is an Arrow IPC stream (see
        :func:`encode_arrow`) of any number of rows; all must share one schema
        (``schema``, or the first message's). ``"json"``: each message is one
        JSON object; fields are taken from ``schema`` (missing ones become
        null, extra keys are ignored) or inferred from the first batch and
        then fixed. ``"raw"``: each message holds one or more packed
        little-endian rows of ``schema``, whose fields must be fixed-width
        numbers or ``fixed_size_list`` of them (see :func:`raw_row_dtype`).
    schema:
        ``pyarrow.Schema`` of the rows; required for ``"raw"``.
    group:
        Consumer group id. With ``partitions=None`` the source subscribes and
        the group balances partitions between its members; otherwise it is
        only where :meth:`commit` records offsets (for lag tools) and where a
        source that was never :meth:`seek`-ed starts.
    batch_size:
        Most messages per ``consume`` call; each call that returns good rows
        becomes one record batch.
    poll_timeout:
        Seconds one ``consume`` call waits for ``batch_size`` messages.
    stop_at_end:
        Make the source bounded (assign mode only): stop once every assigned
        partition reached its high watermark as of the start of iteration.
    stop_after_idle:
        Stop after this many seconds without a message (default: never).
    on_decode_error:
        What to do with a message that cannot be decoded: ``"raise"`` a
        :class:`KafkaDecodeError` naming topic, partition, offset and reason
        (after yielding the good messages before it); ``"skip"`` it;
        ``"dead_letter"``: produce it unchanged to ``dead_letter_topic``, with
        headers ``streamfact.topic``, ``streamfact.partition``,
        ``streamfact.offset`` and ``streamfact.reason``; or a callable taking
        a :class:`RejectedMessage` (then skipped; raise from it to stop).
        Except under ``"raise"`` every rejected message is also appended to
        :attr:`rejected`.
    dead_letter_topic:
        Topic for ``on_decode_error="dead_letter"``.
    on_revoke:
        Group mode: called with the sorted list of partitions about to be
        taken away, before they are released. Checkpoint there; when it
        returns, the source commits its position for those partitions so the
        next owner starts exactly after the last batch yielded. It may also be
        set later as an attribute.
    metadata_columns:
        Append ``_partition`` (int32), ``_offset`` (int64) and ``_timestamp``
        (message timestamp, ``timestamp[ms]``) columns, one value per row.
    max_rejected:
        Most entries :attr:`rejected` keeps (the oldest are dropped);
        :attr:`decode_errors` counts them all.
    config:
        Extra librdkafka consumer settings (applied over
        :data:`DEFAULT_CONSUMER_CONFIG`; ``group.id`` and the commit settings
        are managed here). Also used for the dead-letter producer, less the
        consumer-only keys.

    Attributes
    ----------
    bounded : bool
        True with ``stop_at_end``.
    rejected : collections.deque of RejectedMessage
        Messages rejected since the last :meth:`drain_rejected`.
    messages, rows, decode_errors, dead_lettered : int
        Counters: messages consumed, rows yielded, messages rejected,
        messages written to the dead-letter topic.

    Notes
    -----
    The position is ``{"topic": t, "partitions": {"<p>": next_offset}}``: the
    offset after the last message of each partition in the batches yielded so
    far (for a partition nothing was read from yet, where reading starts).
    :meth:`seek` there and iterating again yields exactly the messages that
    follow, whatever the group has committed: positions are assigned
    explicitly, so correctness never depends on group commits. Without a
    seek, reading starts at the group's committed offsets when ``group`` is
    set and at the beginning otherwise.

    In group mode the position lists the partitions the source owns now. A
    partition assigned to it starts at the later of the group's committed
    offset and the offset :meth:`seek` gave (a later committed offset means
    another member read further). Rebalancing uses the eager protocol.

    The consumer is created on the first ``next()`` of :meth:`batches`, not
    before. Each ``consume`` call costs one round trip through librdkafka;
    decoding is column-wise (one ``json.loads`` per JSON message, one numpy
    view for raw rows, one IPC read per Arrow message).

    Examples
    --------
    >>> from streamfact.connectors.kafka import KafkaSource
    >>> src = KafkaSource("events", "127.0.0.1:9092", format="json", stop_at_end=True)
    >>> src.bounded, src.position()
    (True, {'topic': 'events', 'partitions': {}})
    >>> src.seek({"topic": "events", "partitions": {"0": 42}})
    >>> src.position()
    {'topic': 'events', 'partitions': {'0': 42}}
    >>> src.close()
    """

    def __init__(
        self,
        topic: str,
        bootstrap: str,
        *,
        partitions: Sequence[int] | None = None,
        format: Format = "arrow",
        schema: pa.Schema | None = None,
        group: str | None = None,
        batch_size: int = 1024,
        poll_timeout: float = 0.5,
        stop_at_end: bool = False,
        stop_after_idle: float | None = None,
        on_decode_error: DecodeErrorPolicy | Callable[[RejectedMessage], None] = "raise",
        dead_letter_topic: str | None = None,
        on_revoke: Callable[[list[int]], None] | None = None,
        metadata_columns: bool = False,
        max_rejected: int = 10_000,
        config: Mapping[str, Any] | None = None,
    ) -> None:
        if not topic:
            raise ValueError("topic must be a non-empty string")
        if format not in _FORMATS:
            raise ValueError(f"format must be one of {_FORMATS}, got {format!r}")
        if int(batch_size) <= 0:
            raise ValueError(f"batch_size must be positive, got {batch_size}")
        if not poll_timeout > 0:
            raise ValueError(f"poll_timeout must be positive, got {poll_timeout}")
        if not callable(on_decode_error) and on_decode_error not in _POLICIES:
            raise ValueError(
                f"on_decode_error must be one of {_POLICIES} or a callable, got {on_decode_error!r}"
            )
        if on_decode_error == "dead_letter" and not dead_letter_topic:
            raise ValueError("on_decode_error='dead_letter' needs dead_letter_topic")
        if dead_letter_topic == topic:
            raise ValueError("dead_letter_topic must differ from topic")
        subscribe = group is not None and partitions is None
        if stop_at_end and subscribe:
            raise ValueError("stop_at_end needs assign mode: pass partitions or no group")
        if schema is not None and not isinstance(schema, pa.Schema):
            raise TypeError(f"schema must be a pyarrow.Schema, got {type(schema).__name__}")
        self.topic = topic
        self.bootstrap = bootstrap
        self.partitions = None if partitions is None else sorted({int(p) for p in partitions})
        self.format = format
        self.group = group
        self.batch_size = int(batch_size)
        self.poll_timeout = float(poll_timeout)
        self.stop_at_end = bool(stop_at_end)
        self.stop_after_idle = stop_after_idle
        self.on_decode_error = on_decode_error
        self.dead_letter_topic = dead_letter_topic
        self.on_revoke = on_revoke
        self.metadata_columns = bool(metadata_columns)
        self.config = _check_config(config)
        self.bounded = self.stop_at_end
        self.subscribe = subscribe
        self._decoder = _Decoder(format, schema)
        self.rejected: collections.deque[RejectedMessage] = collections.deque(
            maxlen=int(max_rejected)
        )
        self.messages = 0
        self.rows = 0
        self.decode_errors = 0
        self.dead_lettered = 0
        # Next offset per partition the source reads (owns), from seek or assignment.
        self._offsets: dict[int, int] = {}
        self._seek_offsets: dict[int, int] = {}
        self._end: dict[int, int] = {}
        self._end_checked: set[int] = set()
        self._consumer: Any = None
        self._dlq: Any = None
        self._dlq_failed: list[str] = []
        self._subscribed = False
        self._opened = False
        self._unknown_polls = 0
        self._high: dict[int, int] = {}
        self._high_time = 0.0
        self._closing = False
        self._closed = False
        self._close_pending = False
        self._busy_thread: int | None = None
        self._iterating = False
        self._callback_error: BaseException | None = None
        self._stop = threading.Event()
        self._lock = threading.RLock()

    # -- the Source protocol ----------------------------------------------------------------
    @property
    def schema(self) -> pa.Schema | None:
        """Schema of the yielded batches (before metadata columns), once known."""
        return self._decoder.schema

    def position(self) -> Position:
        """Next offset of each partition after the batches yielded so far (JSON-able)."""
        offsets = self._offsets if self._opened else self._seek_offsets
        return {
            "topic": self.topic,
            "partitions": {str(p): int(o) for p, o in sorted(offsets.items())},
        }

    def seek(self, position: Position) -> None:
        """Resume at ``position`` (from :meth:`position`) on the next :meth:`batches` call."""
        try:
            topic = position.get("topic", self.topic)
            offsets = {int(p): int(o) for p, o in dict(position["partitions"]).items()}
        except (AttributeError, KeyError, TypeError, ValueError) as exc:
            raise ValueError(f"KafkaSource: bad position {position!r}") from exc
        if topic != self.topic:
            raise ValueError(f"KafkaSource: position is for topic {topic!r}, not {self.topic!r}")
        if any(o < 0 or p < 0 for p, o in offsets.items()):
            raise ValueError(f"KafkaSource: bad position {position!r} (negative value)")
        if self.partitions is not None and not set(offsets) <= set(self.partitions):
            raise ValueError(
                f"KafkaSource: position names partitions {sorted(set(offsets))}, "
                f"the source reads {self.partitions}"
            )
        with self._lock:
            if self._iterating:
                raise RuntimeError("KafkaSource.seek must be called before batches()")
            self._seek_offsets = dict(offsets)
            if self._opened:
                if self.subscribe:
                    self._offsets.update({p: o for p, o in offsets.items() if p in self._offsets})
                else:
                    self._offsets = dict(offsets)

    def batches(self) -> Iterator[pa.RecordBatch]:
        """Iterate over record batches from the current position (lazily opened)."""
        if self._iterating:
            raise RuntimeError("KafkaSource is already being iterated")
        if self._closed:
            raise RuntimeError("KafkaSource: batches() after close()")
        return self._iterate()

    def close(self) -> None:
        """Stop iterating (within ``poll_timeout`` when called from another thread) and close
        the consumer and the dead-letter producer; idempotent."""
        self._stop.set()
        if self._busy_thread == threading.get_ident():
            # Called from a signal handler or a rebalance callback in the middle of a
            # consume: the iteration closes everything when it unwinds.
            self._close_pending = True
            return
        with self._lock:
            if self._closed:
                return
            self._closed = True
            self._closing = True
            consumer, self._consumer = self._consumer, None
            dlq, self._dlq = self._dlq, None
            try:
                if dlq is not None:
                    dlq.flush(10)
            finally:
                if consumer is not None:
                    consumer.close()

    # -- SourceCommitter ---------------------------------------------------------------------
    def commit(self, position: Position) -> None:
        """Commit ``position``'s offsets to the group (no-op without a group).

        Called once a checkpoint made ``position`` durable, so standard lag
        tools see the group's progress. In group mode only partitions the
        source still owns are committed. Failures are logged, not raised:
        correctness never depends on it.
        """
        if self.group is None:
            return
        ck = _load_kafka()
        offsets = {int(p): int(o) for p, o in dict(position.get("partitions", {})).items()}
        with self._lock:
            if self._closed:
                return
            consumer = self._ensure_consumer()
            if self.subscribe:
                offsets = {p: o for p, o in offsets.items() if p in self._offsets}
            if not offsets:
                return
            tps = [ck.TopicPartition(self.topic, p, o) for p, o in sorted(offsets.items())]
            try:
                result = consumer.commit(offsets=tps, asynchronous=False)
            except ck.KafkaException as exc:
                log.warning("KafkaSource %r: committing %s failed: %s", self.topic, offsets, exc)
                return
            for tp in result or ():
                if tp.error is not None:
                    log.warning("KafkaSource %r: committing partition %d failed: %s",
                                self.topic, tp.partition, tp.error)

    # -- observability -----------------------------------------------------------------------
    def lag(self) -> dict[int, int]:
        """Messages left per owned partition: high watermark minus position.

        High watermarks come from the latest fetch responses (exact and free),
        and from a ListOffsets request for partitions not fetched yet. Safe to
        call from another thread (an HTTP ``/metrics`` handler) while the
        source is iterating: it then uses the watermarks the iterating thread
        recorded at its last ``consume`` and leaves out partitions not fetched
        yet.
        """
        offsets = dict(self._offsets)
        high = dict(self._high)
        # A consumer call from a second thread blocks while consume() runs: only
        # talk to the consumer when nobody else is.
        if self._lock.acquire(blocking=False):
            try:
                consumer = self._consumer
                if consumer is not None and self._opened:
                    high = self._refresh_high(consumer)
                    unknown = [p for p in offsets if p not in high]
                    if unknown:
                        ck = _load_kafka()
                        try:
                            high.update(self._high_watermarks(consumer, unknown))
                        except ck.KafkaException as exc:
                            log.warning("KafkaSource %r: watermarks: %s", self.topic, exc)
            finally:
                self._lock.release()
        return {p: max(high[p] - o, 0) for p, o in sorted(offsets.items()) if p in high}

    def metrics(self) -> dict[str, int]:
        """The counters as a dict: messages, rows, decode_errors, dead_lettered, lag."""
        return {
            "messages": self.messages,
            "rows": self.rows,
            "decode_errors": self.decode_errors,
            "dead_lettered": self.dead_lettered,
            "lag": sum(self.lag().values()),
        }

    def drain_rejected(self) -> list[RejectedMessage]:
        """Return and forget the messages rejected so far."""
        out = []
        while self.rejected:
            out.append(self.rejected.popleft())
        return out

    def drain_rejected_batch(self) -> pa.RecordBatch:
        """:meth:`drain_rejected` as a record batch, e.g. for a dead-letter sink.

        Columns: ``_topic`` (string), ``_partition`` (int32), ``_offset`` (int64),
        ``_reason`` (string), ``_key`` and ``_value`` (binary, the raw message).
        """
        rejected = self.drain_rejected()
        return pa.RecordBatch.from_arrays(
            [
                pa.array([r.topic for r in rejected], type=pa.string()),
                pa.array([r.partition for r in rejected], type=pa.int32()),
                pa.array([r.offset for r in rejected], type=pa.int64()),
                pa.array([r.reason for r in rejected], type=pa.string()),
                pa.array([r.key for r in rejected], type=pa.binary()),
                pa.array([r.value for r in rejected], type=pa.binary()),
            ],
            names=["_topic", "_partition", "_offset", "_reason", "_key", "_value"],
        )

    def __repr__(self) -> str:
        mode = "subscribe" if self.subscribe else "assign"
        return (f"KafkaSource({self.topic!r}, format={self.format!r}, {mode}, "
                f"position={self.position()['partitions']})")

    def __enter__(self) -> KafkaSource:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- internals ---------------------------------------------------------------------------
    def _consumer_config(self) -> dict[str, Any]:
        conf: dict[str, Any] = {
            **DEFAULT_CONSUMER_CONFIG,
            "logger": log,
            **self.config,
            "bootstrap.servers": self.bootstrap,
            # librdkafka wants a group id even for assign(); this one never commits.
            "group.id": self.group if self.group is not None else f"streamfact-{id(self):x}",
            "enable.auto.commit": False,
            "enable.auto.offset.store": False,
        }
        return conf

    def _ensure_consumer(self) -> Any:
        if self._consumer is None:
            ck = _load_kafka()
            self._consumer = ck.Consumer(self._consumer_config())
        return self._consumer

    def _topic_partitions(self, consumer: Any) -> list[int]:
        deadline = time.monotonic() + 30.0
        while True:
            md = consumer.list_topics(topic=self.topic, timeout=10.0)
            meta = md.topics.get(self.topic)
            if meta is not None and meta.error is None and meta.partitions:
                return sorted(meta.partitions)
            if time.monotonic() > deadline or self._stop.is_set():
                err = None if meta is None else meta.error
                raise RuntimeError(f"KafkaSource: topic {self.topic!r} not found ({err})")
            time.sleep(0.2)

    def _high_watermarks(self, consumer: Any, parts: list[int]) -> dict[int, int]:
        # One ListOffsets round trip for all partitions (timestamp -1 means "latest").
        ck = _load_kafka()
        result = consumer.offsets_for_times(
            [ck.TopicPartition(self.topic, p, -1) for p in parts], timeout=10.0
        )
        out = {}
        for tp in result:
            if tp.error is not None:
                raise ck.KafkaException(tp.error)
            out[tp.partition] = max(int(tp.offset), 0)
        return out

    def _open(self) -> None:
        ck = _load_kafka()
        consumer = self._ensure_consumer()
        if self.subscribe:
            if not self._subscribed:
                consumer.subscribe([self.topic], on_assign=self._on_assign,
                                   on_revoke=self._on_revoke, on_lost=self._on_lost)
                self._subscribed = True
            else:
                for p, o in self._offsets.items():
                    try:
                        consumer.seek(ck.TopicPartition(self.topic, p, o))
                    except ck.KafkaException as exc:
                        log.warning("KafkaSource %r: seek of partition %d failed: %s",
                                    self.topic, p, exc)
            return  # _on_assign sets the offsets (until then position() is the seek's)
        if self._opened:
            # A later batches() call resumes exactly at the position (the consumer may
            # have fetched past it, e.g. before a KafkaDecodeError).
            self._seek_offsets = dict(self._offsets)
        parts = self.partitions if self.partitions is not None else self._topic_partitions(consumer)
        starts: dict[int, int] = {}
        missing = [p for p in parts if p not in self._seek_offsets]
        committed: dict[int, int] = {}
        if missing and self.group is not None:
            for tp in consumer.committed(
                [ck.TopicPartition(self.topic, p) for p in missing], timeout=10.0
            ):
                if tp.error is None and tp.offset >= 0:
                    committed[tp.partition] = int(tp.offset)
        for p in parts:
            # Offset 0 means "the beginning": below the low watermark (retention) the
            # consumer resets to the earliest offset it still has.
            starts[p] = self._seek_offsets[p] if p in self._seek_offsets else committed.get(p, 0)
        consumer.assign([ck.TopicPartition(self.topic, p, o) for p, o in starts.items()])
        self._offsets = starts
        self._opened = True
        if self.stop_at_end:
            self._end = self._high_watermarks(consumer, parts)
            self._end_checked = set()
            self._unknown_polls = 0

    def _on_assign(self, consumer: Any, partitions: list[Any]) -> None:
        ck = _load_kafka()
        try:
            mine = [tp.partition for tp in partitions if tp.topic == self.topic]
            committed = {}
            for tp in consumer.committed(
                [ck.TopicPartition(self.topic, p) for p in mine], timeout=10.0
            ):
                if tp.error is None and tp.offset >= 0:
                    committed[tp.partition] = int(tp.offset)
            starts = {}
            for p in mine:
                candidates = [o for o in (committed.get(p), self._seek_offsets.get(p))
                              if o is not None]
                starts[p] = max(candidates) if candidates else 0
            consumer.assign([ck.TopicPartition(self.topic, p, o) for p, o in starts.items()])
            self._offsets = dict(starts)
            self._opened = True
            log.info("KafkaSource %r: assigned %s", self.topic, starts)
        except BaseException as exc:
            self._callback_error = exc

    def _on_revoke(self, consumer: Any, partitions: list[Any]) -> None:
        mine = sorted(tp.partition for tp in partitions if tp.topic == self.topic)
        try:
            if not self._closing and self._callback_error is None:
                if self.on_revoke is not None:
                    self.on_revoke(list(mine))
                    self.commit({"partitions": {p: self._offsets[p]
                                                for p in mine if p in self._offsets}})
        except BaseException as exc:
            self._callback_error = exc
        finally:
            for p in mine:
                self._offsets.pop(p, None)
                self._seek_offsets.pop(p, None)
            consumer.unassign()
            log.info("KafkaSource %r: revoked %s", self.topic, mine)

    def _on_lost(self, consumer: Any, partitions: list[Any]) -> None:
        mine = sorted(tp.partition for tp in partitions if tp.topic == self.topic)
        for p in mine:
            self._offsets.pop(p, None)
        consumer.unassign()
        log.warning("KafkaSource %r: partitions %s lost (session timed out)", self.topic, mine)

    def _refresh_high(self, consumer: Any) -> dict[int, int]:
        # Only from the thread that consumes (or while nobody does): a Consumer call from a
        # second thread blocks while consume() runs.
        ck = _load_kafka()
        high = dict(self._high)
        for p in list(self._offsets):
            h = consumer.get_watermark_offsets(ck.TopicPartition(self.topic, p), cached=True)[1]
            if h is not None and h >= 0:
                high[p] = int(h)
        self._high = high
        self._high_time = time.monotonic()
        return high

    def _at_end(self, consumer: Any) -> bool:
        ck = _load_kafka()
        for p, end in self._end.items():
            if self._offsets.get(p, 0) < end:
                return False
            if p in self._end_checked or end == 0:  # 0: no record batch at all at the start
                continue
            # Some brokers (Tansu) under-report ListOffsets for batched produce; the
            # watermark from a fetch response is exact, so confirm with it once.
            high = consumer.get_watermark_offsets(ck.TopicPartition(self.topic, p), cached=True)[1]
            if high is None or high < 0:
                self._unknown_polls += 1
                if self._unknown_polls < 20:
                    return False
                high = end
            self._end[p] = max(end, int(high))
            self._end_checked.add(p)
            if self._offsets.get(p, 0) < self._end[p]:
                return False
        return True

    def _iterate(self) -> Iterator[pa.RecordBatch]:
        ck = _load_kafka()
        self._iterating = True
        try:
            with self._lock:
                if self._closed:
                    return
                self._busy_thread = threading.get_ident()
                try:
                    self._open()
                finally:
                    self._busy_thread = None
            last_message = time.monotonic()
            while not self._stop.is_set():
                with self._lock:
                    self._busy_thread = threading.get_ident()
                    try:
                        step = self._step(ck)
                    finally:
                        self._busy_thread = None
                if step is None:
                    return
                msgs, result = step
                if msgs:
                    last_message = time.monotonic()
                elif (self.stop_after_idle is not None
                      and time.monotonic() - last_message >= self.stop_after_idle):
                    return
                if result is None:
                    continue
                batch, offsets, error = result
                if batch is not None:
                    self._offsets.update(offsets)
                    self.rows += batch.num_rows
                    yield batch
                elif offsets:
                    self._offsets.update(offsets)
                if error is not None:
                    raise error
        finally:
            self._iterating = False
            if self._close_pending:
                self.close()

    def _step(self, ck: Any) -> tuple[list[Any], Any] | None:
        """One consume call and its decoding; None when the iteration is over."""
        consumer = self._consumer
        if consumer is None or self._close_pending:
            return None
        if self.stop_at_end and self._at_end(consumer):
            return None
        msgs = consumer.consume(self.batch_size, self.poll_timeout)
        if time.monotonic() - self._high_time >= self.poll_timeout:
            self._refresh_high(consumer)
        if self._callback_error is not None:
            exc, self._callback_error = self._callback_error, None
            raise exc
        return msgs, (self._handle(ck, msgs) if msgs else None)

    def _handle(
        self, ck: Any, msgs: list[Any]
    ) -> tuple[pa.RecordBatch | None, dict[int, int], KafkaDecodeError | None] | None:
        accepted: list[Any] = []
        values: list[bytes | None] = []
        nxt: dict[int, int] = {}
        start = self._offsets
        for m in msgs:  # the hot loop: one pass, no per-message allocation beyond the lists
            err = m.error()
            if err is not None:
                if err.code() == ck.KafkaError._PARTITION_EOF:
                    continue
                if err.fatal() or not err.retriable():
                    raise ck.KafkaException(err)
                log.warning("KafkaSource %r: %s", self.topic, err)
                continue
            p = m.partition()
            off = m.offset()
            expected = nxt.get(p)
            if expected is None:
                expected = start.get(p)
                if expected is None:
                    continue  # revoked meanwhile
            if off < expected:
                continue  # a replay after re-assignment
            accepted.append(m)
            values.append(m.value())
            nxt[p] = off + 1
        if not accepted:
            return None
        self.messages += len(accepted)
        batch, rows, bad = self._decoder.decode(values)
        error: KafkaDecodeError | None = None
        if bad:
            if self.on_decode_error == "raise":
                self.decode_errors += 1
                first = min(bad)
                m = accepted[first]
                error = KafkaDecodeError(self.topic, m.partition(), m.offset(), bad[first])
                self.messages -= len(accepted) - first
                if first == 0:
                    return None, {}, error
                accepted = accepted[:first]
                batch, rows, bad = self._decoder.decode([m.value() for m in accepted])
                nxt = {}
                for m in accepted:
                    nxt[m.partition()] = m.offset() + 1
            else:
                self.decode_errors += len(bad)
                self._reject(accepted, bad)
        if batch is not None and self.metadata_columns:
            good = [m for i, m in enumerate(accepted) if i not in bad]
            batch = self._with_metadata(batch, good, rows)
        return batch, nxt, error

    def _reject(self, accepted: list[Any], bad: dict[int, str]) -> None:
        for i, reason in sorted(bad.items()):
            m = accepted[i]
            rejection = RejectedMessage(self.topic, m.partition(), m.offset(), reason,
                                        m.value(), m.key())
            self.rejected.append(rejection)
            if callable(self.on_decode_error):
                self.on_decode_error(rejection)
            elif self.on_decode_error == "dead_letter":
                self._dead_letter(rejection)
        if self.on_decode_error == "dead_letter":
            self._flush_dead_letters()

    def _dead_letter(self, r: RejectedMessage) -> None:
        ck = _load_kafka()
        if self._dlq is None:
            conf = {k: v for k, v in self.config.items()
                    if k not in DEFAULT_CONSUMER_CONFIG and not k.startswith(
                        ("fetch.", "auto.", "partition.assignment", "group.", "max.poll",
                         "session.", "heartbeat.", "isolation."))}
            self._dlq = ck.Producer({"logger": log, **conf, "bootstrap.servers": self.bootstrap})

        def delivered(err: Any, msg: Any) -> None:
            if err is not None:
                self._dlq_failed.append(str(err))

        headers = [
            ("streamfact.topic", self.topic.encode()),
            ("streamfact.partition", str(r.partition).encode()),
            ("streamfact.offset", str(r.offset).encode()),
            ("streamfact.reason", r.reason.encode()),
        ]
        while True:
            try:
                self._dlq.produce(self.dead_letter_topic, value=r.value, key=r.key,
                                  headers=headers, on_delivery=delivered)
                break
            except BufferError:
                self._dlq.poll(0.1)
        self.dead_lettered += 1

    def _flush_dead_letters(self) -> None:
        # Delivered before the batch after them is yielded, so a checkpoint never covers a
        # rejected message that is not yet in the dead-letter topic.
        if self._dlq is None:
            return
        remaining = self._dlq.flush(30.0)
        if remaining or self._dlq_failed:
            failed, self._dlq_failed = self._dlq_failed, []
            raise RuntimeError(
                f"KafkaSource {self.topic!r}: dead-letter delivery to "
                f"{self.dead_letter_topic!r} failed ({remaining} undelivered; {failed[:3]})"
            )

    def _with_metadata(self, batch: pa.RecordBatch, good: list[Any],
                       rows: list[int]) -> pa.RecordBatch:
        counts = np.asarray(rows, dtype=np.int64)
        part = np.repeat(np.fromiter((m.partition() for m in good), np.int32, len(good)), counts)
        offs = np.repeat(np.fromiter((m.offset() for m in good), np.int64, len(good)), counts)
        ts = np.repeat(np.fromiter((m.timestamp()[1] for m in good), np.int64, len(good)), counts)
        arrays = [*batch.columns, pa.array(part), pa.array(offs),
                  pa.array(ts).cast(pa.timestamp("ms"))]
        names = [*batch.schema.names, *_METADATA_COLUMNS]
        return pa.RecordBatch.from_arrays(arrays, names=names)


class KafkaSink:
    """Produce record batches to a Kafka topic, at least once.

    Parameters
    ----------
    topic:
        Topic to write.
    bootstrap:
        ``host:port[,host:port...]`` of the brokers.
    format:
        ``"arrow"``: one Arrow IPC stream per message holding up to
        ``rows_per_message`` rows (what ``KafkaSource(format="arrow")``
        reads); ``"json"``: one JSON object per row.
    key_column:
        Column whose value becomes the message key (so rows with one key
        land in one partition, in order). Strings are UTF-8 encoded, bytes
        kept, other values formatted with ``str``. With ``"arrow"`` a message
        then holds a run of consecutive rows with one key.
    rows_per_message:
        Most rows per Arrow message.
    partition:
        Produce every message to this partition (default: by key, or the
        client's partitioner).
    flush_timeout:
        Seconds :meth:`flush` waits for delivery before raising.
    config:
        Extra librdkafka producer settings.

    Notes
    -----
    Delivery is at least once: :meth:`flush` returns only when every message
    produced so far has been acknowledged (``acks=all`` by default), and
    raises if any failed. :meth:`restore` does nothing, so after a crash the
    rows produced after the last checkpoint are produced again on replay:
    consumers may see duplicates and should be idempotent (e.g. by key).

    ``flush()`` returns ``{"produced": messages, "rows": rows}``, counted
    since this sink was created.

    Examples
    --------
    >>> from streamfact.connectors.kafka import KafkaSink
    >>> sink = KafkaSink("out", "127.0.0.1:9092", format="json")
    >>> sink.flush()            # nothing written: no connection is made
    {'produced': 0, 'rows': 0}
    >>> sink.close()
    """

    def __init__(
        self,
        topic: str,
        bootstrap: str,
        *,
        format: Literal["arrow", "json"] = "arrow",
        key_column: str | None = None,
        rows_per_message: int = 1024,
        partition: int | None = None,
        flush_timeout: float = 60.0,
        config: Mapping[str, Any] | None = None,
    ) -> None:
        if not topic:
            raise ValueError("topic must be a non-empty string")
        if format not in ("arrow", "json"):
            raise ValueError(f"format must be 'arrow' or 'json', got {format!r}")
        if int(rows_per_message) <= 0:
            raise ValueError(f"rows_per_message must be positive, got {rows_per_message}")
        self.topic = topic
        self.bootstrap = bootstrap
        self.format = format
        self.key_column = key_column
        self.rows_per_message = int(rows_per_message)
        self.partition = partition
        self.flush_timeout = float(flush_timeout)
        self.config = dict(config or {})
        self._producer: Any = None
        self._produced = 0
        self._rows = 0
        self._failed: list[str] = []
        self._failures = 0
        self._closed = False

    def _ensure_producer(self) -> Any:
        if self._producer is None:
            ck = _load_kafka()
            self._producer = ck.Producer({
                "linger.ms": 5,
                "logger": log,
                **self.config,
                "bootstrap.servers": self.bootstrap,
                "delivery.report.only.error": True,
                "on_delivery": self._delivered,
            })
        return self._producer

    def _delivered(self, err: Any, msg: Any) -> None:
        if err is not None:
            self._failures += 1
            if len(self._failed) < 10:
                self._failed.append(str(err))

    def _keys(self, batch: pa.RecordBatch) -> list[bytes] | None:
        if self.key_column is None:
            return None
        if self.key_column not in batch.schema.names:
            raise KeyError(f"KafkaSink: key column {self.key_column!r} not in {batch.schema.names}")
        out = []
        for v in batch.column(self.key_column).to_pylist():
            if v is None:
                out.append(b"")
            elif isinstance(v, bytes):
                out.append(v)
            else:
                out.append(str(v).encode())
        return out

    def _messages(self, batch: pa.RecordBatch) -> Iterable[tuple[bytes, bytes | None, int]]:
        keys = self._keys(batch)
        if self.format == "json":
            values = encode_json(batch)
            for i, value in enumerate(values):
                yield value, None if keys is None else keys[i], 1
            return
        n = batch.num_rows
        if keys is None:
            bounds = [*range(0, n, self.rows_per_message), n]
        else:
            cuts = [0] + [i for i in range(1, n) if keys[i] != keys[i - 1]] + [n]
            bounds = []
            for a, b in itertools.pairwise(cuts):
                bounds.extend(range(a, b, self.rows_per_message))
            bounds.append(n)
        for a, b in itertools.pairwise(bounds):
            piece = batch if (a == 0 and b == n) else batch.slice(a, b - a)
            yield encode_arrow(piece), None if keys is None else keys[a], b - a

    def write(self, batch: pa.RecordBatch) -> None:
        """Produce ``batch`` (asynchronously; :meth:`flush` waits for delivery)."""
        if self._closed:
            raise RuntimeError("KafkaSink: write after close()")
        if not isinstance(batch, pa.RecordBatch):
            raise TypeError(f"KafkaSink.write expects a RecordBatch, got {type(batch).__name__}")
        if batch.num_rows == 0:
            return
        producer = self._ensure_producer()
        extra = {} if self.partition is None else {"partition": int(self.partition)}
        for value, key, rows in self._messages(batch):
            while True:
                try:
                    producer.produce(self.topic, value=value, key=key, **extra)
                    break
                except BufferError:  # local queue full: let deliveries drain
                    producer.poll(0.05)
            self._produced += 1
            self._rows += rows
        producer.poll(0)

    def flush(self) -> dict[str, Any]:
        """Wait until every produced message is acknowledged; return ``{"produced", "rows"}``."""
        if self._producer is not None:
            deadline = time.monotonic() + self.flush_timeout
            remaining = self._producer.flush(self.flush_timeout)
            while remaining and time.monotonic() < deadline:
                remaining = self._producer.flush(max(deadline - time.monotonic(), 0.0))
            if remaining or self._failures:
                failures, failed = self._failures, self._failed
                self._failures, self._failed = 0, []
                raise RuntimeError(
                    f"KafkaSink {self.topic!r}: {remaining} message(s) undelivered after "
                    f"{self.flush_timeout} s, {failures} failed: {failed[:3]}"
                )
        return {"produced": self._produced - self._failures, "rows": self._rows}

    def restore(self, state: Mapping[str, Any]) -> None:
        """Nothing to undo: the sink is at-least-once (replayed rows are produced again)."""

    def close(self) -> None:
        """Flush and release the producer; idempotent."""
        if self._closed:
            return
        self._closed = True
        try:
            self.flush()
        finally:
            producer, self._producer = self._producer, None
            if producer is not None and hasattr(producer, "close"):
                producer.close()

    def __enter__(self) -> KafkaSink:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"KafkaSink({self.topic!r}, format={self.format!r}, produced={self._produced})"

