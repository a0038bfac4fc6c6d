"""The Source and Sink protocols that connectors implement.

Connectors (``streamfact.connectors``) depend on these protocols only; they
never import an operator. The pipeline depends on them too, never on a
concrete connector.

Positions and sink states are JSON-able dicts, stored verbatim in checkpoint
manifests.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any, Protocol, runtime_checkable

import pyarrow as pa

__all__ = ["Position", "Sink", "Source", "SourceCommitter"]

Position = dict[str, Any]


@runtime_checkable
class Source(Protocol):
    """A pull-based supplier of ``pyarrow.RecordBatch``.

    Contract:

    * ``batches()`` returns an iterator; no I/O happens before its first
      ``next()`` (files are opened lazily).
    * ``position()`` is the position *after* the last batch the iterator has
      yielded: seeking there and iterating again yields exactly the batches
      that follow, no row twice and none skipped.
    * ``seek(position)`` must be called before ``batches()``.
    * ``bounded`` is False for a source that may follow new data forever
      (``ParquetSource(follow=True)``, Kafka); a blocking stage refuses it.
    * ``close()`` releases files, threads and network clients; idempotent.
    """

    bounded: bool

    def batches(self) -> Iterator[pa.RecordBatch]: ...

    def position(self) -> Position: ...

    def seek(self, position: Position) -> None: ...

    def close(self) -> None: ...


@runtime_checkable
class SourceCommitter(Protocol):
    """A source that also tracks offsets upstream (Kafka consumer groups).

    ``commit(position)`` is called after a checkpoint made ``position``
    durable; correctness never depends on it (the checkpoint holds the truth).
    """

    def commit(self, position: Position) -> None: ...


@runtime_checkable
class Sink(Protocol):
    """A consumer of record batches.

    * ``write(batch)`` may buffer.
    * ``flush()`` makes everything written so far durable and returns the
      sink's state (JSON-able), which the checkpoint stores next to the source
      position.
    * ``restore(state)`` is called when resuming from a checkpoint, before any
      write: an idempotent sink discards whatever it wrote after that state so
      the replay leaves no duplicate rows.
    * ``close()`` flushes and releases resources; idempotent.
    """

    def write(self, batch: pa.RecordBatch) -> None: ...

    def flush(self) -> dict[str, Any]: ...

    def restore(self, state: dict[str, Any]) -> None: ...

    def close(self) -> None: ...
