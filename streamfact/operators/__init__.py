"""Numeric operators: pure state machines over arrays (no Arrow, no I/O).

One module per method; every :class:`Operator` subclass defined here joins the
shared conformance suite (:mod:`streamfact.testing`) automatically.
"""

from streamfact.operators.base import (
    ConformanceSpec,
    InvalidInputError,
    NotMergeableError,
    Operator,
    OperatorState,
)
from streamfact.operators.eigenvector import TopEigenvector
from streamfact.operators.frequent_directions import FrequentDirections
from streamfact.operators.gmm import IncrementalGMM
from streamfact.operators.keyed_svd import KeyedSVD
from streamfact.operators.kronecker import KroneckerProjection, SketchPool, SketchSpec
from streamfact.operators.mfac import SlidingWindowMFAC, StaticMFAC
from streamfact.operators.moments import RunningMoments
from streamfact.operators.oja import OjaEigenvector
from streamfact.operators.svd import IncrementalSVD

__all__ = [
    "ConformanceSpec",
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
    "RunningMoments",
    "SketchPool",
    "SketchSpec",
    "SlidingWindowMFAC",
    "StaticMFAC",
    "TopEigenvector",
]
