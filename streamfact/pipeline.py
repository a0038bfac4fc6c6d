"""The pull-based pipeline: Source → stages → Sink, with checkpoints.

Nothing runs until the first batch is pulled. Each pull takes one record batch
from the source, passes it through every stage in order and hands the result
to the sink and/or the consumer, so backpressure is built in. Errors travel
down the stream and stop it; closing the pipeline closes the source, the sinks
and the progress bar.

Checkpoints save every operator bound into a stage, the source position, the
sink states and the counters together (:mod:`streamfact.checkpoint`). ``run()``
and iteration resume from the latest good checkpoint when one exists; replaying
from its position gives the state of an uninterrupted run.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
import pyarrow as pa

from streamfact.batches import ColumnSpec
from streamfact.error_policy import ErrorPolicy, PolicyName, RowError, dead_letter_batch
from streamfact.io import Sink, Source, SourceCommitter
from streamfact.operators.base import Operator
from streamfact.stages import BindStage, MapStage, Stage

if TYPE_CHECKING:
    from streamfact.checkpoint import CheckpointStore

__all__ = ["Counters", "Pipeline"]

log = logging.getLogger("streamfact.pipeline")


@dataclass
class Counters:
    """What a pipeline has done, readable from code at any time.

    Restored from checkpoints, so after a crash and resume the totals count
    every source row exactly once.
    """

    rows_in: int = 0
    rows_out: int = 0
    rows_rejected: int = 0
    batches: int = 0
    checkpoints: int = 0
    seconds: dict[str, float] = field(default_factory=dict)
    rejected_by_stage: dict[str, int] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Counters:
        known = {k: data[k] for k in cls.__dataclass_fields__ if k in data}
        return cls(**known)


@dataclass
class _CheckpointPlan:
    path: str
    every_rows: int | None
    every_seconds: float | None
    keep: int
    store: CheckpointStore | None = None


class Pipeline:
    """A lazily evaluated chain of stages over a :class:`~streamfact.io.Source`.

    Parameters
    ----------
    source:
        Where record batches come from.
    progress:
        ``True`` / ``False`` forces the progress bar; ``None`` (default) shows
        it only when stderr is a terminal.
    name:
        Label for logs and metrics.

    Examples
    --------
    >>> import numpy as np, streamfact as sf
    >>> from streamfact.connectors import MemorySource, MemorySink
    >>> rm = sf.RunningMoments(2)
    >>> out = MemorySink()
    >>> X = np.arange(20.0).reshape(10, 2)
    >>> pipe = (sf.Pipeline(MemorySource({"x": X}, batch_size=4), progress=False)
    ...         .update(rm.update, X=sf.dense("x"))
    ...         .emit(rm.standardize, X=sf.dense("x"), out="z")
    ...         .to(out))
    >>> counters = pipe.run()
    >>> rm.count, counters.rows_out, out.to_table().column_names
    (10, 10, ['x', 'z'])
    """

    def __init__(self, source: Source, *, progress: bool | None = None, name: str = "pipeline"):
        for attr in ("batches", "position", "seek", "close"):
            if not callable(getattr(source, attr, None)):
                raise TypeError(f"{type(source).__name__} is not a Source: it lacks {attr}()")
        self.source = source
        self.name = name
        self.progress = progress
        self.stages: list[Stage] = []
        self._policies: list[ErrorPolicy | None] = []
        self._default_policy = ErrorPolicy("raise")
        self.sinks: list[Sink] = []
        self._checkpoint: _CheckpointPlan | None = None
        self.counters = Counters()
        self._stop = threading.Event()
        self._active: Iterator[pa.RecordBatch] | None = None
        self._closed = False
        self.resumed_from: int | None = None
        self._restored = False

    # -- building -----------------------------------------------------------
    def update(
        self,
        method: Callable[..., Any],
        *,
        on_error: PolicyName | None = None,
        dead_letter: Sink | None = None,
        name: str | None = None,
        **bindings: ColumnSpec,
    ) -> Pipeline:
        """Feed bound columns to ``method``; the batch passes through unchanged."""
        return self._add_bind(method, bindings, None, on_error, dead_letter, name)

    def emit(
        self,
        method: Callable[..., Any],
        *,
        out: str | Sequence[str],
        on_error: PolicyName | None = None,
        dead_letter: Sink | None = None,
        name: str | None = None,
        **bindings: ColumnSpec,
    ) -> Pipeline:
        """Call ``method`` on bound columns and append its result as column(s) ``out``."""
        return self._add_bind(method, bindings, out, on_error, dead_letter, name)

    def map(
        self, fn: Callable[[pa.RecordBatch], pa.RecordBatch], *, name: str | None = None
    ) -> Pipeline:
        """Apply a plain ``RecordBatch -> RecordBatch`` function."""
        self._check_building()
        self.stages.append(MapStage(fn, name or f"{len(self.stages)}:map"))
        self._policies.append(None)
        return self

    def to(self, sink: Sink) -> Pipeline:
        """Write output batches to ``sink`` (several sinks may be attached)."""
        self._check_building()
        for attr in ("write", "flush", "restore", "close"):
            if not callable(getattr(sink, attr, None)):
                raise TypeError(f"{type(sink).__name__} is not a Sink: it lacks {attr}()")
        self.sinks.append(sink)
        return self

    def checkpoint(
        self,
        path: str | os.PathLike[str] | CheckpointStore,
        *,
        every_rows: int | None = None,
        every_seconds: float | None = None,
        keep: int = 3,
    ) -> Pipeline:
        """Checkpoint to ``path`` every N rows and/or seconds, and at the end.

        ``path`` may also be a ready :class:`~streamfact.checkpoint.CheckpointStore`.
        """
        self._check_building()
        if every_rows is not None and every_rows <= 0:
            raise ValueError("every_rows must be positive")
        if every_seconds is not None and every_seconds <= 0:
            raise ValueError("every_seconds must be positive")
        if isinstance(path, str | os.PathLike):
            self._checkpoint = _CheckpointPlan(os.fspath(path), every_rows, every_seconds, keep)
        else:
            self._checkpoint = _CheckpointPlan(
                os.fspath(path.root), every_rows, every_seconds, keep, store=path
            )
        return self

    def on_error(self, policy: PolicyName, *, sink: Sink | None = None) -> Pipeline:
        """Default bad-input policy for stages that set none: raise, skip or dead_letter."""
        self._check_building()
        self._default_policy = ErrorPolicy(policy, sink)
        return self

    def _add_bind(
        self,
        method: Callable[..., Any],
        bindings: dict[str, ColumnSpec],
        out: str | Sequence[str] | None,
        on_error: PolicyName | None,
        dead_letter: Sink | None,
        name: str | None,
    ) -> Pipeline:
        self._check_building()
        if not bindings:
            raise TypeError("bind at least one column, e.g. X=sf.dense('features')")
        label = name or f"{len(self.stages)}:{getattr(method, '__qualname__', 'call')}"
        self.stages.append(BindStage(method, bindings, out=out, name=label))
        self._policies.append(None if on_error is None else ErrorPolicy(on_error, dead_letter))
        return self

    def _check_building(self) -> None:
        if self._active is not None:
            raise RuntimeError("the pipeline is already running; build it before iterating")

    # -- inspection -----------------------------------------------------------
    @property
    def operators(self) -> dict[str, Operator]:
        """Operators bound into stages, keyed by a stable name (stage order, class)."""
        named: dict[str, Operator] = {}
        seen: set[int] = set()
        for i, stage in enumerate(self.stages):
            op = stage.operator
            if op is not None and id(op) not in seen:
                seen.add(id(op))
                named[f"{i}:{type(op).__name__}"] = op
        return named

    def _policy(self, i: int) -> ErrorPolicy:
        return self._policies[i] or self._default_policy

    def _dead_letter_sinks(self) -> list[Sink]:
        found: list[Sink] = []
        for i in range(len(self.stages)):
            sink = self._policy(i).sink
            if sink is not None and all(sink is not s for s in found):
                found.append(sink)
        return found

    # -- running --------------------------------------------------------------
    def __iter__(self) -> Iterator[pa.RecordBatch]:
        if self._active is not None:
            raise RuntimeError("a pipeline can be iterated once")
        self._active = self._drive()
        return self._active

    def run(self) -> Counters:
        """Drive the pipeline to the end of its source (or until :meth:`stop`)."""
        for _ in self:
            pass
        return self.counters

    def stop(self) -> None:
        """Ask a running pipeline to finish its current batch, checkpoint and return.

        Safe to call from a signal handler or another thread.
        """
        self._stop.set()

    def close(self) -> None:
        """Release the source, the sinks and the progress bar (idempotent)."""
        if self._closed:
            return
        self._closed = True
        active, self._active = self._active, None
        if active is not None and hasattr(active, "close"):
            active.close()
        errors: list[BaseException] = []
        for closer in [
            self.source.close,
            *(s.close for s in self.sinks),
            *(s.close for s in self._dead_letter_sinks()),
        ]:
            try:
                closer()
            except Exception as exc:  # keep closing the rest
                errors.append(exc)
        if errors:
            raise errors[0]

    def __enter__(self) -> Pipeline:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def checkpoint_now(self) -> int | None:
        """Take a checkpoint immediately (between batches); returns its sequence."""
        if self._checkpoint is None:
            raise RuntimeError("no checkpoint location; call .checkpoint(path) first")
        return self._save_checkpoint(self._last_position)

    # -- the driver -----------------------------------------------------------
    def _drive(self) -> Iterator[pa.RecordBatch]:
        bar = None
        try:
            self.restore()
            self._last_position = self.source.position()
            bar = _progress_bar(self.progress, self.name, self.counters)
            rows_since = 0
            last_ckpt_time = time.monotonic()
            seconds = self.counters.seconds
            upstream = self.source.batches()
            while not self._stop.is_set():
                t0 = time.perf_counter()
                batch = next(upstream, None)
                seconds["source"] = seconds.get("source", 0.0) + time.perf_counter() - t0
                if batch is None:
                    break
                position = self.source.position()
                out = self._process(batch)
                t0 = time.perf_counter()
                for sink in self.sinks if out.num_rows else ():
                    sink.write(out)
                if self.sinks:
                    seconds["sink"] = seconds.get("sink", 0.0) + time.perf_counter() - t0
                self.counters.rows_out += out.num_rows
                if bar is not None:
                    bar.update(batch.num_rows)
                    bar.set_postfix(rejected=self.counters.rows_rejected, refresh=False)
                yield out
                self._last_position = position
                rows_since += batch.num_rows
                plan = self._checkpoint
                if plan is not None and (
                    (plan.every_rows is not None and rows_since >= plan.every_rows)
                    or (
                        plan.every_seconds is not None
                        and time.monotonic() - last_ckpt_time >= plan.every_seconds
                    )
                ):
                    self._save_checkpoint(position)
                    rows_since, last_ckpt_time = 0, time.monotonic()
            if self._checkpoint is not None and (rows_since or self._stop.is_set()):
                self._save_checkpoint(self._last_position)
            else:
                self._flush_sinks()
        finally:
            if bar is not None:
                bar.close()

    def _process(self, batch: pa.RecordBatch) -> pa.RecordBatch:
        counters = self.counters
        start = counters.rows_in
        counters.rows_in += batch.num_rows
        counters.batches += 1
        row_ids = np.arange(start, start + batch.num_rows, dtype=np.int64)
        current = batch
        for i, stage in enumerate(self.stages):
            t0 = time.perf_counter()
            result = stage.process(current)
            counters.seconds[stage.name] = counters.seconds.get(stage.name, 0.0) + (
                time.perf_counter() - t0
            )
            for rejection in result.rejections:
                policy = self._policy(i)
                if policy.mode == "raise":
                    first = int(rejection.rows[0])
                    raise RowError(
                        stage.name, rejection.column, int(row_ids[first]), rejection.reasons[0]
                    )
                n_bad = int(rejection.rows.size)
                counters.rows_rejected += n_bad
                counters.rejected_by_stage[stage.name] = (
                    counters.rejected_by_stage.get(stage.name, 0) + n_bad
                )
                if policy.mode == "dead_letter":
                    assert policy.sink is not None
                    policy.sink.write(dead_letter_batch(current, rejection, row_ids, stage.name))
            row_ids = row_ids[result.kept]
            current = result.batch
        return current

    # -- checkpoints ------------------------------------------------------------
    def _store(self) -> CheckpointStore | None:
        plan = self._checkpoint
        if plan is None:
            return None
        if plan.store is None:
            from streamfact.checkpoint import CheckpointStore

            plan.store = CheckpointStore(plan.path, keep=plan.keep)
        return plan.store

    def _all_sinks(self) -> dict[str, Sink]:
        named = {f"sink{i}": s for i, s in enumerate(self.sinks)}
        named.update({f"dead_letter{i}": s for i, s in enumerate(self._dead_letter_sinks())})
        return named

    def _flush_sinks(self) -> dict[str, dict[str, Any]]:
        return {name: sink.flush() for name, sink in self._all_sinks().items()}

    def _save_checkpoint(self, position: dict[str, Any]) -> int | None:
        store = self._store()
        if store is None:
            return None
        from streamfact.checkpoint import OperatorEntry

        t0 = time.perf_counter()
        sink_states = self._flush_sinks()
        entries = {
            name: OperatorEntry(f"{type(op).__module__}.{type(op).__qualname__}", op.state())
            for name, op in self.operators.items()
        }
        self.counters.checkpoints += 1
        ckpt = store.save(
            operators=entries,
            source_position=position,
            sink_states=sink_states,
            counters=self.counters.as_dict(),
        )
        if isinstance(self.source, SourceCommitter):
            try:
                self.source.commit(position)
            except Exception:  # offsets upstream are advisory; the checkpoint is the truth
                log.exception("committing source offsets upstream failed")
        self.counters.seconds["checkpoint"] = self.counters.seconds.get("checkpoint", 0.0) + (
            time.perf_counter() - t0
        )
        return ckpt.sequence

    def restore(self) -> int | None:
        """Load the latest good checkpoint now (otherwise the first pull does it).

        Restores the operators in place, seeks the source and rolls the sinks
        back. Returns the checkpoint's sequence, or None when there is none.
        Idempotent.
        """
        if not self._restored:
            self._restored = True
            self._restore()
        return self.resumed_from

    def _restore(self) -> None:
        store = self._store()
        if store is None:
            return
        ckpt = store.load_latest()  # reports any corrupt checkpoint it skipped
        if ckpt is None:
            return
        operators = self.operators
        missing = set(ckpt.operators) ^ set(operators)
        if missing:
            raise RuntimeError(
                f"checkpoint {ckpt.path} holds operators {sorted(ckpt.operators)} but the "
                f"pipeline has {sorted(operators)}; build the same pipeline to resume"
            )
        for name, op in operators.items():
            entry = ckpt.operators[name]
            expected = f"{type(op).__module__}.{type(op).__qualname__}"
            if entry.class_path != expected:
                raise RuntimeError(
                    f"checkpoint operator {name} is {entry.class_path}, not {expected}"
                )
            op.load_state(entry.state)
        self.source.seek(ckpt.source_position)
        sinks = self._all_sinks()
        for name, state in ckpt.sink_states.items():
            if name in sinks:
                sinks[name].restore(state)
        self.counters = Counters.from_dict(ckpt.counters)
        self.resumed_from = ckpt.sequence
        log.info("resumed from checkpoint %s at %s", ckpt.sequence, ckpt.source_position)


def _progress_bar(progress: bool | None, name: str, counters: Counters) -> Any:
    if progress is False:
        return None
    from tqdm.auto import tqdm

    # disable=None lets tqdm turn itself off when stderr is not a terminal.
    return tqdm(
        desc=name,
        unit="rows",
        unit_scale=True,
        initial=counters.rows_in,
        disable=None if progress is None else False,
        dynamic_ncols=True,
    )
