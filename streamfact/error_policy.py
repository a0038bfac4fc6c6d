"""What a stage does with rows it cannot use: raise, skip, or dead-letter.

``raise`` stops the pipeline with a :class:`RowError` naming the stage, the
column, the stream row number and the reason. ``skip`` counts and drops the
rows. ``dead_letter`` writes them, with the reason, to a sink. Rows are
rejected one at a time, so the good rows of a batch always go through.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import numpy as np
import pyarrow as pa

from streamfact.io import Sink

__all__ = ["POLICIES", "ErrorPolicy", "Rejection", "RowError", "dead_letter_batch"]

PolicyName = Literal["raise", "skip", "dead_letter"]
POLICIES: tuple[str, ...] = ("raise", "skip", "dead_letter")


class RowError(ValueError):
    """Bad input under the ``raise`` policy: names stage, column, row and reason."""

    def __init__(self, stage: str, column: str | None, row: int | None, reason: str) -> None:
        self.stage, self.column, self.row, self.reason = stage, column, row, reason
        where = [f"stage {stage!r}"]
        if column:
            where.append(f"column {column!r}")
        if row is not None:
            where.append(f"row {row}")
        super().__init__(f"{', '.join(where)}: {reason}")


@dataclass(frozen=True)
class ErrorPolicy:
    """A stage's bad-input policy; ``sink`` is required for ``dead_letter``."""

    mode: PolicyName = "raise"
    sink: Sink | None = None

    def __post_init__(self) -> None:
        if self.mode not in POLICIES:
            raise ValueError(f"on_error must be one of {POLICIES}, got {self.mode!r}")
        if self.mode == "dead_letter" and self.sink is None:
            raise ValueError("on_error='dead_letter' needs a sink")


@dataclass
class Rejection:
    """Rows of one batch rejected by one stage (indices within the batch)."""

    rows: np.ndarray
    reasons: list[str]
    column: str | None


def dead_letter_batch(
    batch: pa.RecordBatch, rejection: Rejection, row_ids: np.ndarray, stage: str
) -> pa.RecordBatch:
    """The rejected rows with ``_stage``, ``_column``, ``_row`` and ``_reason`` columns."""
    taken = batch.take(pa.array(rejection.rows, type=pa.int64()))
    n = taken.num_rows
    extra = {
        "_stage": pa.array([stage] * n, type=pa.string()),
        "_column": pa.array([rejection.column or ""] * n, type=pa.string()),
        "_row": pa.array(row_ids[rejection.rows], type=pa.int64()),
        "_reason": pa.array(rejection.reasons, type=pa.string()),
    }
    arrays = list(taken.columns) + list(extra.values())
    names = list(taken.schema.names) + list(extra)
    return pa.RecordBatch.from_arrays(arrays, names=names)
