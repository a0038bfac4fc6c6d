"""streamfact: online matrix factorization over Arrow record-batch streams.

Operators keep a model up to date batch by batch (:mod:`streamfact.operators`);
a :class:`Pipeline` binds Arrow columns to their methods, checkpoints them with
the source position, and applies a bad-input policy per stage.
"""

from streamfact.batches import dense, keys, scalar, sparse
from streamfact.error_policy import RowError
from streamfact.operators import (
    InvalidInputError,
    NotMergeableError,
    Operator,
    OperatorState,
    RunningMoments,
)
from streamfact.pipeline import Counters, Pipeline

__all__ = [
    "Counters",
    "InvalidInputError",
    "NotMergeableError",
    "Operator",
    "OperatorState",
    "Pipeline",
    "RowError",
    "RunningMoments",
    "dense",
    "keys",
    "scalar",
    "sparse",
]
__version__ = "0.1.0"
