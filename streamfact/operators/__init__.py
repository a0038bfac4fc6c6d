"""Numeric operators: pure state machines over arrays (no Arrow, no I/O)."""

from streamfact.operators.base import (
    ConformanceSpec,
    InvalidInputError,
    NotMergeableError,
    Operator,
    OperatorState,
)
from streamfact.operators.moments import RunningMoments

__all__ = [
    "ConformanceSpec",
    "InvalidInputError",
    "NotMergeableError",
    "Operator",
    "OperatorState",
    "RunningMoments",
]
