"""streamfact: online matrix factorization over Arrow record-batch streams.

Operators keep a model up to date batch by batch (:mod:`streamfact.operators`);
a :class:`Pipeline` binds Arrow columns to their methods, checkpoints them with
the source position, and applies a bad-input policy per stage.
"""

from streamfact.batches import dense, keys, scalar, sparse
from streamfact.error_policy import RowError
from streamfact.operators import (
    FrequentDirections,
    IncrementalGMM,
    IncrementalSVD,
    InvalidInputError,
    KeyedSVD,
    KroneckerProjection,
    NotMergeableError,
    OjaEigenvector,
    Operator,
    OperatorState,
    RunningMoments,
    SketchSpec,
    SlidingWindowMFAC,
    StaticMFAC,
    TopEigenvector,
)
from streamfact.pipeline import Counters, Pipeline

__all__ = [
    "Counters",
    "FrequentDirections",
    "IncrementalGMM",
    "IncrementalSVD",
    "InvalidInputError",
    "KeyedSVD",
    "KroneckerProjection",
    "NotMergeableError",
    "OjaEigenvector",
    "Operator",
    "OperatorState",
    "Pipeline",
    "RowError",
    "RunningMoments",
    "SketchSpec",
    "SlidingWindowMFAC",
    "StaticMFAC",
    "TopEigenvector",
    "dense",
    "keys",
    "scalar",
    "sparse",
]
__version__ = "0.1.0"
