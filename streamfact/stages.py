"""Pipeline stages: the one generic operator binding, and plain batch maps.

:class:`BindStage` binds named Arrow columns to the parameters of any callable
(usually a bound operator method such as ``svd.append_rows``). It views the
columns (:mod:`streamfact.batches`), rejects bad rows under the stage's
:class:`~streamfact.error_policy.ErrorPolicy`, calls the method once on the
good rows, and, for ``emit`` stages, appends the method's result as columns.
An operator that raises :class:`~streamfact.operators.base.InvalidInputError`
naming rows gets those rows rejected and is called again on the rest; this is
safe because operators validate before they mutate.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa

from streamfact.batches import ColumnSpec, arrays_to_columns
from streamfact.error_policy import Rejection
from streamfact.operators.base import InvalidInputError, Operator

__all__ = ["BindStage", "MapStage", "Stage", "StageResult"]


@dataclass
class StageResult:
    """A stage's output batch (good rows only) and what it rejected."""

    batch: pa.RecordBatch
    kept: np.ndarray  # indices into the input batch of the rows in ``batch``
    rejections: list[Rejection]


class Stage:
    """A batch → batch step. ``name`` labels errors, counters and dead letters."""

    name: str

    def process(self, batch: pa.RecordBatch) -> StageResult:
        raise NotImplementedError

    @property
    def operator(self) -> Operator | None:
        return None


class MapStage(Stage):
    """Applies ``fn(batch) -> batch``; rows are neither validated nor rejected."""

    def __init__(self, fn: Callable[[pa.RecordBatch], pa.RecordBatch], name: str) -> None:
        self.fn = fn
        self.name = name

    def process(self, batch: pa.RecordBatch) -> StageResult:
        out = self.fn(batch)
        if not isinstance(out, pa.RecordBatch):
            raise TypeError(
                f"map stage {self.name!r} returned {type(out).__name__}, not RecordBatch"
            )
        return StageResult(out, np.arange(out.num_rows), [])


def _positional_target(method: Callable[..., Any]) -> str | None:
    """The single required parameter of ``method``, if it has exactly one."""
    try:
        params = inspect.signature(method).parameters.values()
    except (TypeError, ValueError):
        return None
    required = [
        p.name
        for p in params
        if p.default is p.empty and p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)
    ]
    return required[0] if len(required) == 1 else None


class BindStage(Stage):
    """Calls ``method(**{param: view(column)})`` per batch.

    Parameters
    ----------
    method:
        Any callable; a bound :class:`Operator` method makes that operator part
        of the pipeline's checkpoints.
    bindings:
        Parameter name → :class:`~streamfact.batches.ColumnSpec`. When the
        method has exactly one required parameter and one binding is given,
        the binding's name is free (``rows=sf.dense("x")`` feeds ``X``).
    out:
        ``None`` for an update stage (the batch passes through unchanged);
        otherwise the name(s) of the column(s) that receive the result.
    """

    def __init__(
        self,
        method: Callable[..., Any],
        bindings: Mapping[str, ColumnSpec],
        *,
        out: str | Sequence[str] | None,
        name: str,
    ) -> None:
        if not callable(method):
            raise TypeError(f"stage {name!r}: {method!r} is not callable")
        for key, spec in bindings.items():
            if not isinstance(spec, ColumnSpec):
                raise TypeError(
                    f"stage {name!r}: binding {key}= must be a column spec such as "
                    f"sf.dense('col'), got {type(spec).__name__}"
                )
        self.method = method
        self.bindings = dict(bindings)
        self.out = out if out is None or isinstance(out, str) else tuple(out)
        self.name = name
        self._call_names = self._resolve_names()

    def _resolve_names(self) -> dict[str, str | None]:
        try:
            params = inspect.signature(self.method).parameters
        except (TypeError, ValueError):
            return {k: k for k in self.bindings}
        accepts_kwargs = any(p.kind is p.VAR_KEYWORD for p in params.values())
        unknown = [k for k in self.bindings if k not in params and not accepts_kwargs]
        if not unknown:
            return {k: k for k in self.bindings}
        target = _positional_target(self.method)
        if len(self.bindings) == 1 and target is not None:
            return {unknown[0]: None}  # pass positionally
        raise TypeError(
            f"stage {self.name!r}: {getattr(self.method, '__qualname__', self.method)} has no "
            f"parameter(s) {unknown}; it takes {list(params)}"
        )

    @property
    def operator(self) -> Operator | None:
        owner = getattr(self.method, "__self__", None)
        return owner if isinstance(owner, Operator) else None

    def process(self, batch: pa.RecordBatch) -> StageResult:
        rejections: list[Rejection] = []
        kept = np.arange(batch.num_rows)
        current = batch
        # Each pass either returns or drops at least one row, so this ends.
        while True:
            if current.num_rows == 0:
                return StageResult(current, kept, rejections)
            views, rejection = self._views(current)
            if rejection is not None:
                rejections.append(_remap(rejection, kept))
                keep_local = np.setdiff1d(np.arange(current.num_rows), rejection.rows)
                current, kept = _take(current, keep_local), kept[keep_local]
                continue
            try:
                result = self._call(views)
            except InvalidInputError as exc:
                if exc.rows is None or exc.rows.size == 0:
                    rows = np.arange(current.num_rows)
                else:
                    rows = np.unique(exc.rows)
                    if rows.min() < 0 or rows.max() >= current.num_rows:
                        raise
                reasons = (
                    exc.row_reasons
                    if exc.row_reasons and len(exc.row_reasons) == len(rows)
                    else [exc.reason] * rows.size
                )
                column = exc.column or ",".join(",".join(s.columns) for s in self.bindings.values())
                rejections.append(_remap(Rejection(rows, list(reasons), column), kept))
                keep_local = np.setdiff1d(np.arange(current.num_rows), rows)
                current, kept = _take(current, keep_local), kept[keep_local]
                continue
            if self.out is not None:
                current = _append(current, arrays_to_columns(self.out, result), self.name)
            return StageResult(current, kept, rejections)

    def _views(self, batch: pa.RecordBatch) -> tuple[dict[str, Any], Rejection | None]:
        values: dict[str, Any] = {}
        for key, spec in self.bindings.items():
            view = spec.view(batch)
            if view.whole is not None:
                rows = np.arange(batch.num_rows)
                return {}, Rejection(rows, [view.whole] * rows.size, spec.label)
            if view.bad.size:
                return {}, Rejection(view.bad, view.reasons, spec.label)
            values[key] = view.value
        return values, None

    def _call(self, views: Mapping[str, Any]) -> Any:
        args: list[Any] = []
        kwargs: dict[str, Any] = {}
        for key, value in views.items():
            target = self._call_names[key]
            if target is None:
                args.append(value)
            else:
                kwargs[target] = value
        return self.method(*args, **kwargs)


def _remap(rejection: Rejection, kept: np.ndarray) -> Rejection:
    return Rejection(kept[rejection.rows], rejection.reasons, rejection.column)


def _take(batch: pa.RecordBatch, rows: np.ndarray) -> pa.RecordBatch:
    return batch.take(pa.array(rows, type=pa.int64()))


def _append(batch: pa.RecordBatch, columns: Mapping[str, pa.Array], stage: str) -> pa.RecordBatch:
    arrays = list(batch.columns)
    names = list(batch.schema.names)
    for name, col in columns.items():
        if len(col) != batch.num_rows:
            raise ValueError(
                f"stage {stage!r} returned {len(col)} rows for column {name!r}, "
                f"batch has {batch.num_rows}"
            )
        if name in names:
            arrays[names.index(name)] = col
        else:
            arrays.append(col)
            names.append(name)
    return pa.RecordBatch.from_arrays(arrays, names=names)
