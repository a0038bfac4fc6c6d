"""streamfact: online matrix factorization over Arrow record-batch streams."""

from streamfact.operators import (
    InvalidInputError,
    NotMergeableError,
    Operator,
    OperatorState,
    RunningMoments,
)

__all__ = [
    "InvalidInputError",
    "NotMergeableError",
    "Operator",
    "OperatorState",
    "RunningMoments",
]
__version__ = "0.1.0"
