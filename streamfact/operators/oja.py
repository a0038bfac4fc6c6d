"""Oja's rule for the top eigenvector of AᵀA, per row (numba) or per block (BLAS)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np
import scipy.sparse as sp

from streamfact.kernels.backend import resolve_backend, to_numpy
from streamfact.kernels.eigen_numba import oja_csr, oja_dense
from streamfact.operators.base import (
    ConformanceSpec,
    NotMergeableError,
    Operator,
    OperatorState,
    StateFormatError,
    dense_row_bad_inputs,
)
from streamfact.operators.frequent_directions import nonzero_rows
from streamfact.operators.validation import check_dtype, check_matrix

__all__ = ["OjaEigenvector"]

#: Renormalise at least this often (rows); the direction is unchanged.
RENORM_EVERY = 32


class OjaEigenvector(Operator):
    """Streaming top eigenvector of ``AᵀA`` by Oja's rule with a fixed rate.

    Per row (``block=1``, Oja 1982)::

        v ← v + η a (aᵀ v)

    Per block of ``B`` rows (``block=B``, block Oja)::

        z ← normalise(z + η A_Bᵀ (A_B z))

    The learning rate ``η`` is fixed and absolute: it must be of order
    ``L / λ₁`` for some ``L`` of order 1–100, and the best ``L`` depends on the
    data (Jain et al. 2016 analyse ``η_t ∝ 1 / ((λ₁ − λ₂) t)`` for i.i.d.
    rows). Scaling A by c needs η scaled by 1/c² to give the same answer.
    With any fixed η, Oja fails on streams where the top direction is carried
    by a few heavy rows (Kacham & Woodruff 2024; the instance family is in the
    tests); :class:`~streamfact.operators.eigenvector.TopEigenvector` handles
    those.

    Renormalisation cannot overflow: ``‖v‖²`` is tracked in O(1) per row
    (``‖v + ηc a‖² = ν + 2ηc² + η²c²‖a‖²``); v is renormalised every
    ``32`` nonzero rows, before any step that could push ``ν·(1 + η‖a‖²)²``
    past a safe bound, and a step whose own growth factor is that large is
    divided by it. Renormalisation never changes the direction, so the result
    does not depend on when it happens beyond rounding.

    Parameters
    ----------
    dim:
        Row width d.
    learning_rate:
        η > 0 (absolute, see above).
    block:
        1 for per-row Oja (numba loop), ``B > 1`` for block Oja (two GEMVs per
        block on the chosen device). Blocks are counted over the whole stream,
        so batch boundaries do not move them.
    seed:
        Seed of the random unit start vector.
    dtype, device:
        ``"float64"``/``"float32"``; ``"cpu"``/``"torch"``/``"cuda"``/``"auto"``
        for the block products (per-row Oja always runs in numba on the CPU).

    Attributes
    ----------
    vector : ndarray (d,)
        Unit estimate of v₁.
    state_size : int
        d floats (per row) or 2d (block: the vector and the block accumulator).

    Notes
    -----
    Time O(d) per row (O(nnz) for sparse rows with ``block=1``); memory d or 2d.

    References
    ----------
    E. Oja. Simplified neuron model as a principal component analyzer.
    J. Math. Biology 15, 1982. P. Jain et al. Streaming PCA: Matching Matrix
    Bernstein and Near-Optimal Finite Sample Guarantees for Oja's Algorithm.
    COLT 2016.

    Examples
    --------
    >>> import numpy as np
    >>> from streamfact.operators.oja import OjaEigenvector
    >>> rng = np.random.default_rng(0)
    >>> X = rng.standard_normal((4000, 10)) * np.array([3.0] + [1.0] * 9)
    >>> oja = OjaEigenvector(10, learning_rate=0.01, seed=1)
    >>> oja.update(X)
    >>> bool(abs(oja.vector[0]) > 0.95)
    True
    """

    def __init__(
        self,
        dim: int,
        *,
        learning_rate: float = 0.01,
        block: int = 1,
        seed: int = 0,
        dtype: str = "float64",
        device: str = "cpu",
    ) -> None:
        if int(dim) <= 0:
            raise ValueError(f"dim must be positive, got {dim}")
        if not (np.isfinite(learning_rate) and learning_rate > 0):
            raise ValueError(f"learning_rate must be a positive finite number, got {learning_rate}")
        if int(block) <= 0:
            raise ValueError(f"block must be positive, got {block}")
        self.dim = int(dim)
        self.learning_rate = float(learning_rate)
        self.block = int(block)
        self.seed = int(seed)
        self.dtype = check_dtype(dtype).name
        self.device = device
        self._backend = resolve_backend(device)
        start = np.random.default_rng(self.seed).standard_normal(self.dim)
        self.v_ = (start / np.linalg.norm(start)).astype(self.dtype)
        self.acc_ = np.zeros(self.dim if self.block > 1 else 0, dtype=np.float64)
        self.nu_ = 1.0
        self.count_ = 0
        self.in_block_ = 0

    @property
    def _big(self) -> float:
        return 1e30 if self.dtype == "float32" else 1e200

    # -- updates --------------------------------------------------------------
    def update(self, X: Any) -> None:
        """Apply the rule to the rows of ``X`` (b×d dense or CSR), in order."""
        arr = check_matrix(X, n_cols=self.dim, dtype=np.dtype(self.dtype), name="X")
        if arr.shape[0] == 0:
            return
        if self.block == 1:
            self._update_rows(arr)
        else:
            keep = nonzero_rows(arr)
            if keep.size:
                self._update_blocks(arr[keep] if keep.size != arr.shape[0] else arr)

    def _update_rows(self, arr: np.ndarray | sp.csr_array) -> None:
        v = self.v_.copy()
        if sp.issparse(arr):
            csr = sp.csr_array(arr)
            nu, count = oja_csr(
                csr.indptr,
                csr.indices,
                csr.data,
                v,
                self.learning_rate,
                self.nu_,
                self.count_,
                RENORM_EVERY,
                self._big,
            )
        else:
            nu, count = oja_dense(
                np.ascontiguousarray(arr),
                v,
                self.learning_rate,
                self.nu_,
                self.count_,
                RENORM_EVERY,
                self._big,
            )
        self.v_, self.nu_, self.count_ = v, float(nu), int(count)

    def _update_blocks(self, arr: np.ndarray | sp.csr_array) -> None:
        be = self._backend
        dense_on_device = be.is_torch
        if dense_on_device:
            dense: Any = arr
            x_all: Any = be.asarray(dense.toarray() if sp.issparse(dense) else dense, self.dtype)
        else:
            x_all = arr
        z = self.v_.astype(np.float64)
        acc = self.acc_.copy()
        in_block = self.in_block_
        pos, n = 0, arr.shape[0]
        while pos < n:
            take = min(self.block - in_block, n - pos)
            chunk = x_all[pos : pos + take]
            if dense_on_device:
                zt = be.asarray(z, self.dtype)
                acc += to_numpy(chunk.T @ (chunk @ zt)).astype(np.float64)
            else:
                acc += np.asarray(chunk.T @ (chunk @ z.astype(self.dtype)), dtype=np.float64)
            in_block += take
            pos += take
            if in_block == self.block:
                step = self.learning_rate * acc
                # z is unit; divide the step by its size when large so nothing overflows.
                scale = max(1.0, float(np.max(np.abs(step))))
                z = z / scale + step / scale
                z = z / np.linalg.norm(z)
                acc[:] = 0.0
                in_block = 0
        self.v_ = z.astype(self.dtype)
        self.acc_ = acc
        self.in_block_ = in_block
        self.count_ += n

    def merge(self, other: OjaEigenvector) -> OjaEigenvector:
        raise NotMergeableError("Oja's rule is sequential; two runs cannot be merged")

    # -- queries --------------------------------------------------------------
    @property
    def vector(self) -> np.ndarray:
        """Unit estimate of the top eigenvector (float64 copy)."""
        v = self.v_.astype(np.float64)
        return v / np.linalg.norm(v)

    @property
    def rows_seen(self) -> int:
        return int(self.count_)

    @property
    def state_size(self) -> int:
        """Floats held in the state arrays: d, plus d for the block accumulator."""
        return int(self.v_.size + self.acc_.size)

    def transform(self, X: Any) -> np.ndarray:
        """Scores ``X v`` of the rows on the current direction (b,)."""
        arr = check_matrix(X, n_cols=self.dim, dtype=np.dtype(self.dtype), name="X")
        return np.asarray(arr @ self.vector.astype(self.dtype), dtype=self.dtype)

    # -- state ----------------------------------------------------------------
    def state(self) -> OperatorState:
        return OperatorState(
            arrays={"v": self.v_.copy(), "block_acc": self.acc_.copy()},
            meta={
                **self._state_header(),
                "nu": float(self.nu_),
                "count": int(self.count_),
                "in_block": int(self.in_block_),
            },
        )

    @classmethod
    def from_state(cls, state: OperatorState | Mapping[str, Any]) -> OjaEigenvector:
        st, op = cls._begin_from_state(state)
        v, acc = st.arrays["v"], st.arrays["block_acc"]
        if v.shape != op.v_.shape or acc.shape != op.acc_.shape:
            raise StateFormatError("state arrays do not match dim/block")
        op.v_ = v.astype(op.dtype, copy=True)
        op.acc_ = acc.astype(np.float64, copy=True)
        op.nu_ = float(st.meta["nu"])
        op.count_ = int(st.meta["count"])
        op.in_block_ = int(st.meta["in_block"])
        return op

    @classmethod
    def conformance_spec(cls) -> ConformanceSpec:
        dim = 6

        def make(seed: int = 0, dtype: str = "float64", device: str = "cpu") -> OjaEigenvector:
            # Block mode, so the suite also compares the numpy and torch block
            # products; per-row mode is checked in tests/operators/test_oja.py.
            return cls(dim, learning_rate=0.02, block=16, seed=seed, dtype=dtype, device=device)

        def stream(rng: np.random.Generator, dtype: np.dtype, n_rows: int) -> np.ndarray:
            scale = np.array([3.0, 1.5, 1.0, 1.0, 0.5, 0.5])
            return (rng.standard_normal((n_rows, dim)) * scale).astype(dtype)

        def probe(op: Operator) -> np.ndarray:
            assert isinstance(op, OjaEigenvector)
            v = op.vector
            return np.outer(v, v).ravel()

        return ConformanceSpec(
            make=make,
            stream=stream,
            probe=probe,
            bad_inputs=dense_row_bad_inputs(dim),
            # Block sums split at batch cuts are added in another order: rounding only.
            split_tolerance=1e-10,
            backends=("cpu", "torch"),
            backend_rtol=1e-9,
            float32_rtol=1e-4,
            mergeable=False,
        )
