"""``streamfact serve``: keep row and column embeddings fresh from an event stream.

The daemon composes the engine's parts and adds no numerics of its own:

* a source — a followed Parquet folder or a Kafka topic;
* a :class:`~streamfact.pipeline.Pipeline` whose one update stage feeds the
  events to a :class:`~streamfact.operators.keyed_svd.KeyedSVD`, with the
  configured bad-input policy and checkpoints every N events / seconds;
* a publisher thread that turns the model into an immutable
  :class:`~streamfact.service.snapshots.Snapshot` at most every
  ``snapshots.every_seconds``, written as versioned Parquet at most every
  ``snapshots.write_every_seconds`` and at shutdown. Before publishing it
  refines the model against its retained matrix when the last refinement is
  older than ``model.refine_every_seconds`` and events arrived since: the
  incremental updates between refinements drift on skewed streams, and a
  slow stream would otherwise wait long for its next event-count refinement;
* the HTTP API on 127.0.0.1 by default.

SIGTERM (or SIGINT) makes it finish the batch in hand, checkpoint, publish a
final snapshot and exit 0. After SIGKILL the next start resumes from the last
checkpoint and replays from its source position, so no event is lost or
counted twice.
"""

from __future__ import annotations

import logging
import signal
import threading
import time
from collections import deque
from collections.abc import Callable
from typing import Any

import numpy as np
import pyarrow as pa

import streamfact as sf
from streamfact.io import Sink, Source
from streamfact.operators.keyed_svd import KeyedSVD
from streamfact.pipeline import Pipeline
from streamfact.service.allocator import pin_mmap_threshold
from streamfact.service.config import ServeConfig
from streamfact.service.http import ApiServer
from streamfact.service.metrics import make_registry, render
from streamfact.service.snapshots import Snapshot, SnapshotWriter

__all__ = ["EmbeddingDaemon", "make_source"]

log = logging.getLogger("streamfact.serve")

# An idle daemon refines until the singular values settle, but at most this
# many times in a row, in case a near-degenerate spectrum never quite settles.
_POLISH_ROUNDS_MAX = 30


def make_source(cfg: ServeConfig, on_decode_error: Callable[[Any], None] | None = None) -> Source:
    """The configured source (connectors are imported here, at the edge).

    ``on_decode_error`` receives Kafka messages that cannot be decoded when
    the error policy is ``dead_letter``; under ``skip`` they are counted and
    dropped, under ``raise`` they stop the daemon.
    """
    idle = float(cfg["source.stop_after_idle"])
    if cfg["source.kind"] == "kafka":
        from streamfact.connectors.kafka import KafkaSource

        policy = cfg["errors.policy"]
        return KafkaSource(
            cfg["source.topic"],
            cfg["source.bootstrap"],
            partitions=[int(p) for p in cfg["source.partitions"]] or None,
            group=cfg["source.group"] or None,
            format=cfg["source.format"],
            batch_size=cfg["source.batch_size"],
            stop_after_idle=idle if idle > 0 else None,
            on_decode_error=on_decode_error
            if policy == "dead_letter" and on_decode_error
            else ("skip" if policy != "raise" else "raise"),
        )
    from streamfact.connectors import ParquetSource

    folder = cfg.source_path
    if not folder.exists():
        raise FileNotFoundError(f"source.path {folder} does not exist")
    return ParquetSource(
        folder,
        batch_size=cfg["source.batch_size"],
        follow=cfg["source.follow"],
        poll_interval=float(cfg["source.poll_interval"]),
        stop_after_idle=idle if idle > 0 else None,
        strict_schema=False,  # a stray file is rejected row by row, not fatal
    )


def _dead_letter_sink(cfg: ServeConfig) -> Sink | None:
    if cfg["errors.policy"] != "dead_letter":
        return None
    from streamfact.connectors import ParquetSink

    return ParquetSink(cfg.path("errors.dead_letter_path"), rows_per_file=100_000)


class EmbeddingDaemon:
    """The long-running embedding service; :meth:`run` blocks until stopped."""

    def __init__(self, cfg: ServeConfig, *, source: Source | None = None) -> None:
        self.cfg = cfg
        self.model = KeyedSVD(
            cfg["model.rank"],
            key_kind=cfg["events.key_type"],
            method=cfg["model.method"],
            dtype=cfg["model.dtype"],
            device=cfg["model.device"],
            refine_growth=float(cfg["model.refine_growth"]) or None,
            oversample=cfg["model.oversample"] or None,
        )
        self._dead_letters = _dead_letter_sink(cfg)
        self.source = source if source is not None else make_source(cfg, self._dead_letter)
        bindings: dict[str, Any] = {
            "rows": sf.keys(cfg.row_column),
            "cols": sf.keys(cfg.col_column),
        }
        if cfg.weight_column:
            bindings["weights"] = sf.scalar(cfg.weight_column)
        # The model lock is taken when a batch enters the pipeline and released
        # once it has been applied, so the publisher never reads a half update.
        self._lock = threading.Lock()
        self._holding = False
        self.pipeline = (
            Pipeline(self.source, progress=False, name="serve")
            .map(self._enter_batch, name="lock")
            .update(self.model.update, name="svd", **bindings)
            .checkpoint(
                cfg.path("checkpoint.path"),
                every_rows=cfg["checkpoint.every_rows"],
                every_seconds=float(cfg["checkpoint.every_seconds"]),
                keep=cfg["checkpoint.keep"],
            )
            .on_error(cfg["errors.policy"], sink=self._dead_letters)
        )
        if hasattr(self.source, "on_revoke"):
            # Kafka group rebalance: make the position durable before letting go.
            self.source.on_revoke = lambda partitions: self.pipeline.checkpoint_now()
        self.writer = SnapshotWriter(cfg.path("snapshots.path"), keep=cfg["snapshots.keep"])
        self._snapshot: Snapshot | None = None
        self._version = max(self.writer.versions(), default=0)
        self._published = (-1, -1)  # (events, SVD revision) of the served snapshot
        self._refines_seen = 0
        self._last_refine = time.monotonic()
        self.refines_by_time = 0
        self._polish_rounds = 0  # timer refinements in a row with no new events
        self._written_version = self._version
        self._last_write = time.monotonic()
        self._stop = threading.Event()
        self._rate: deque[tuple[float, int]] = deque(maxlen=600)
        self._last_checkpoint = time.time()
        self._seen_checkpoints = 0
        self.registry = make_registry(self._metric_values)
        self.http = ApiServer(
            cfg["http.host"],
            cfg["http.port"],
            current=lambda: self._snapshot,
            health=self._health,
            metrics=lambda: render(self.registry),
        )

    # -- lifecycle --------------------------------------------------------------
    def stop(self) -> None:
        """Finish the batch in hand, checkpoint, publish and return from :meth:`run`."""
        self._stop.set()
        self.pipeline.stop()
        if not getattr(self.source, "bounded", True):
            self.source.close()  # ends a follow/poll wait; the position stays valid

    def _install_signals(self) -> None:
        if threading.current_thread() is not threading.main_thread():
            return
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, lambda *_: self.stop())

    def run(self) -> int:
        self._install_signals()
        pin_mmap_threshold()
        if self.pipeline.restore() is not None:
            self.publish(write=True)  # serve the restored embeddings before any new event
        self.http.start()
        host, port = self.http.address
        log.info("serving on http://%s:%d", host, port)
        print(f"streamfact serve: listening on http://{host}:{port}", flush=True)
        publisher = threading.Thread(target=self._publish_loop, name="publisher", daemon=True)
        publisher.start()
        try:
            for _ in self.pipeline:
                self._leave_batch()
                self._note_progress()
            self._note_progress()
        finally:
            self._leave_batch()
            self._stop.set()
            publisher.join(timeout=30)
            self.publish(write=True)
            self.http.stop()
            self.pipeline.close()
        print(
            f"streamfact serve: stopped after {self.pipeline.counters.rows_in} events", flush=True
        )
        return 0

    def _dead_letter(self, message: Any) -> None:
        """An undecodable source message, written with its partition and offset."""
        if self._dead_letters is None:
            return
        row = pa.RecordBatch.from_pydict(
            {
                "_stage": ["decode"],
                "_column": [""],
                "_row": pa.array([-1], type=pa.int64()),
                "_reason": [
                    f"partition {message.partition} offset {message.offset}: {message.reason}"
                ],
                "_value": pa.array([message.value], type=pa.binary()),
            }
        )
        self._dead_letters.write(row)

    def _decode_errors(self) -> int:
        metrics = getattr(self.source, "metrics", None)
        return int(metrics().get("decode_errors", 0)) if callable(metrics) else 0

    def _enter_batch(self, batch: pa.RecordBatch) -> pa.RecordBatch:
        self._lock.acquire()
        self._holding = True
        return batch

    def _leave_batch(self) -> None:
        if self._holding:
            self._holding = False
            self._lock.release()

    def _note_progress(self) -> None:
        counters = self.pipeline.counters
        self._rate.append((time.monotonic(), counters.rows_in))
        if counters.checkpoints != self._seen_checkpoints:
            self._seen_checkpoints = counters.checkpoints
            self._last_checkpoint = time.time()

    # -- publishing -------------------------------------------------------------
    def _publish_loop(self) -> None:
        every = float(self.cfg["snapshots.every_seconds"])
        while not self._stop.wait(max(every, 0.05)):
            try:
                self.refine_if_due()
                self.publish()
            except Exception:  # a failed publish must not stop the updates
                log.exception("publishing a snapshot failed")

    def refine_if_due(self) -> bool:
        """Refine the model if ``model.refine_every_seconds`` passed since the
        last refinement (by time or by the model's own event schedule) and a
        refinement can still change it: events arrived since, or the last one
        had not converged (:meth:`KeyedSVD.refine_pending`) — so an idle
        daemon polishes its embeddings for a few rounds and then rests. Holds
        the model lock for one refinement, O(nnz(A)(k + p) + (m + n)(k + p)²)."""
        every = float(self.cfg["model.refine_every_seconds"])
        model = self.model
        if model.n_refines_ != self._refines_seen:  # the event schedule refined
            self._refines_seen = model.n_refines_
            self._last_refine = time.monotonic()
        if every <= 0 or time.monotonic() - self._last_refine < every:
            return False
        with self._lock:
            if not model.refine_pending():
                return False
            polishing = model.unrefined_events == 0
            if polishing and self._polish_rounds >= _POLISH_ROUNDS_MAX:
                return False
            self._polish_rounds = self._polish_rounds + 1 if polishing else 0
            model.refine()
            self._refines_seen = model.n_refines_
        self._last_refine = time.monotonic()
        self.refines_by_time += 1
        return True

    def publish(self, *, write: bool = False) -> Snapshot | None:
        """Publish the model as a new in-memory snapshot version if it changed.

        The model lock is held only while the embeddings are materialised
        (O((m + n) k²)); indexing, normalising and writing happen outside it.
        The snapshot goes to disk when ``write`` is set or the last write is
        older than ``snapshots.write_every_seconds``.
        """
        with self._lock:
            events = self.model.events_seen_
            revision = (events, self.model.svd.n_updates_)
            changed = revision != self._published and self.model.svd.initialized
            if changed:
                self._version += 1
                self._published = revision
                raw = (
                    self._version,
                    events,
                    self.model.svd.s,
                    self.model.rows.keys,
                    self.model.row_embeddings(),
                    self.model.cols.keys,
                    self.model.column_embeddings(),
                )
        if changed:
            self._snapshot = Snapshot.build(*raw, self.model.key_kind)  # one reference swap
        snap = self._snapshot
        due = time.monotonic() - self._last_write >= float(
            self.cfg["snapshots.write_every_seconds"]
        )
        if snap is not None and snap.version != self._written_version and (write or due):
            self.writer.write(snap)
            self._written_version = snap.version
            self._last_write = time.monotonic()
        return snap

    @property
    def snapshot(self) -> Snapshot | None:
        return self._snapshot

    # -- observability ----------------------------------------------------------
    def _events_per_second(self) -> float:
        if len(self._rate) < 2:
            return 0.0
        now = time.monotonic()
        recent = [(t, n) for t, n in self._rate if now - t <= 60.0] or list(self._rate)[-2:]
        (t0, n0), (t1, n1) = recent[0], self._rate[-1]
        return (n1 - n0) / (t1 - t0) if t1 > t0 else 0.0

    def _metric_values(self) -> dict[str, Any]:
        counters = self.pipeline.counters
        svd = self.model.svd
        orth = svd.orthogonality_loss() if svd.initialized else (0.0, 0.0)
        lag_fn = getattr(self.source, "lag", None)
        lag: dict[Any, float] = {}
        if callable(lag_fn):
            try:
                lag = {k: float(v) for k, v in lag_fn().items()}
            except Exception:
                log.debug("lag query failed", exc_info=True)
        snap = self._snapshot
        return {
            "events": counters.rows_in - counters.rows_rejected,
            "rejected": counters.rows_rejected + self._decode_errors(),
            "rate": self._events_per_second(),
            "lag": lag,
            "checkpoint_age": time.time() - self._last_checkpoint,
            "orthogonality": (float(orth[0]), float(orth[1])),
            "rank": int(np.asarray(svd.s).size) if svd.initialized else 0,
            "refinements": self.model.n_refines_,
            "model_bytes": self.model.nbytes,
            "keys": self.model.shape,
            "snapshot": snap.version if snap is not None else 0,
        }

    def _health(self) -> dict[str, Any]:
        snap = self._snapshot
        counters = self.pipeline.counters
        return {
            "status": "ok",
            "events_in": counters.rows_in,
            "rejected": counters.rows_rejected + self._decode_errors(),
            "snapshot": snap.version if snap is not None else None,
            "resumed_from_checkpoint": self.pipeline.resumed_from,
        }
