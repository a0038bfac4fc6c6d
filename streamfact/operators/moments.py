"""Running count, mean and covariance of a row stream (Welford / Chan et al.)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

from streamfact.kernels.backend import resolve_backend, to_numpy
from streamfact.operators.base import (
    ConformanceSpec,
    InvalidInputError,
    NotMergeableError,
    Operator,
    OperatorState,
    dense_row_bad_inputs,
)
from streamfact.operators.validation import check_dense_matrix, check_dtype

__all__ = ["RunningMoments"]


class RunningMoments(Operator):
    """Count, mean and covariance of rows seen so far, updated batch by batch.

    Each batch ``X`` (b×d) is summarised by its own count, mean and centred
    scatter ``M2_b = (X - x̄_b)ᵀ(X - x̄_b)``, then merged into the running
    summary with the pairwise formula of Chan, Golub & LeVeque (1979)::

        n  = n_a + n_b
        δ  = x̄_b - x̄_a
        x̄  = x̄_a + δ · n_b / n
        M2 = M2_a + M2_b + δ δᵀ · n_a n_b / n

    which is Welford's recursion when ``b = 1``. The same formula merges two
    operators fed disjoint parts of a stream, so the result does not depend on
    how the stream was cut into batches (up to floating-point rounding).

    Parameters
    ----------
    dim:
        Row width d.
    dtype:
        ``"float64"`` (default) or ``"float32"``; the accumulators use it.
    device:
        ``"cpu"`` (numpy), ``"torch"``, ``"cuda"`` or ``"auto"``: where the batch
        scatter GEMM runs. The running summary always lives in numpy.

    Attributes
    ----------
    count : int
        Rows seen.
    mean : ndarray (d,)
    covariance(ddof=1) : ndarray (d, d)

    Notes
    -----
    Time O(b d²) per batch (one GEMM), memory O(d²) independent of rows seen.
    Sparse batches are densified per batch.

    Examples
    --------
    >>> import numpy as np
    >>> from streamfact import RunningMoments
    >>> rm = RunningMoments(3)
    >>> X = np.arange(12.0).reshape(4, 3)
    >>> rm.update(X[:1]); rm.update(X[1:])
    >>> bool(np.allclose(rm.covariance(), np.cov(X, rowvar=False)))
    True
    """

    def __init__(self, dim: int, *, dtype: str = "float64", device: str = "cpu") -> None:
        if int(dim) <= 0:
            raise ValueError(f"dim must be positive, got {dim}")
        self.dim = int(dim)
        self.dtype = check_dtype(dtype).name
        self.device = device
        self._backend = resolve_backend(device)
        self.count_ = 0
        self.mean_ = np.zeros(self.dim, dtype=self.dtype)
        self.m2_ = np.zeros((self.dim, self.dim), dtype=self.dtype)

    # -- updates --------------------------------------------------------------
    def update(self, X: Any) -> None:
        """Add the rows of ``X`` (b×d dense or sparse). O(b d²)."""
        arr = check_dense_matrix(X, n_cols=self.dim, dtype=np.dtype(self.dtype), name="X")
        n_b = arr.shape[0]
        if n_b == 0:
            return
        mean_b, m2_b = self._batch_summary(arr)
        self._combine(n_b, mean_b, m2_b)

    def _batch_summary(self, arr: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        be = self._backend
        x = be.asarray(arr, self.dtype)
        xp = be.xp
        mean_b = xp.mean(x, axis=0)
        centred = x - mean_b
        m2_b = centred.T @ centred
        return to_numpy(mean_b).astype(self.dtype), to_numpy(m2_b).astype(self.dtype)

    def _combine(self, n_b: int, mean_b: np.ndarray, m2_b: np.ndarray) -> None:
        n_a = self.count_
        n = n_a + n_b
        delta = mean_b - self.mean_
        self.mean_ = self.mean_ + delta * (n_b / n)
        self.m2_ = self.m2_ + m2_b + np.outer(delta, delta) * (n_a * n_b / n)
        self.count_ = n

    def merge(self, other: RunningMoments) -> RunningMoments:
        """Combine with an operator fed a disjoint part of the stream (Chan et al.)."""
        if not isinstance(other, RunningMoments) or other.dim != self.dim:
            raise NotMergeableError("can only merge RunningMoments of the same dim")
        out = RunningMoments.from_state(self.state())
        if other.count_:
            out._combine(other.count_, other.mean_.astype(self.dtype), other.m2_.astype(self.dtype))
        return out

    # -- queries --------------------------------------------------------------
    @property
    def count(self) -> int:
        return self.count_

    @property
    def mean(self) -> np.ndarray:
        return self.mean_.copy()

    def covariance(self, ddof: int = 1) -> np.ndarray:
        """Sample covariance with ``ddof`` (1: unbiased, 0: maximum likelihood)."""
        if self.count_ - ddof <= 0:
            raise ValueError(f"covariance needs more than {ddof} rows, have {self.count_}")
        return self.m2_ / (self.count_ - ddof)

    @property
    def variance(self) -> np.ndarray:
        return np.diag(self.covariance()).copy()

    def standardize(self, X: Any) -> np.ndarray:
        """``(X - mean) / std`` with the running moments; zero-variance columns stay centred."""
        arr = check_dense_matrix(X, n_cols=self.dim, dtype=np.dtype(self.dtype), name="X")
        if self.count_ < 2:
            raise InvalidInputError("standardize needs at least two rows seen")
        std = np.sqrt(np.maximum(self.variance, 0.0))
        std[std == 0] = 1.0
        return np.asarray((arr - self.mean_) / std, dtype=self.dtype)

    # -- state ----------------------------------------------------------------
    def state(self) -> OperatorState:
        return OperatorState(
            arrays={"mean": self.mean_.copy(), "m2": self.m2_.copy()},
            meta={
                **self._state_header(),
                "count": int(self.count_),
            },
        )

    @classmethod
    def from_state(cls, state: OperatorState | Mapping[str, Any]) -> RunningMoments:
        st, op = cls._begin_from_state(state)
        mean, m2 = st.arrays["mean"], st.arrays["m2"]
        if mean.shape != (op.dim,) or m2.shape != (op.dim, op.dim):
            raise InvalidInputError("state arrays do not match dim")
        op.mean_ = mean.astype(op.dtype, copy=True)
        op.m2_ = m2.astype(op.dtype, copy=True)
        op.count_ = int(st.meta["count"])
        return op

    @classmethod
    def conformance_spec(cls) -> ConformanceSpec:
        dim = 5

        def make(seed: int = 0, dtype: str = "float64", device: str = "cpu") -> RunningMoments:
            return cls(dim, dtype=dtype, device=device)

        def stream(rng: np.random.Generator, dtype: np.dtype, n_rows: int) -> np.ndarray:
            return (rng.standard_normal((n_rows, dim)) * 3.0 + 1.0).astype(dtype)

        def probe(op: Operator) -> np.ndarray:
            assert isinstance(op, RunningMoments)
            return np.concatenate([[op.count_], op.mean_, op.m2_.ravel()]).astype(np.float64)

        return ConformanceSpec(
            make=make,
            stream=stream,
            probe=probe,
            bad_inputs=dense_row_bad_inputs(dim),
            # Chan's merge reorders additions, so batch cuts change rounding only.
            split_tolerance=1e-9,
            backends=("cpu", "torch"),
            backend_rtol=1e-9,
            float32_rtol=1e-4,
            mergeable=True,
        )
