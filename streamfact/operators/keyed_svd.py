"""Truncated SVD of the matrix defined by keyed events (user–item, src–dst)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np
import scipy.sparse as sp

from streamfact.operators.base import (
    ConformanceSpec,
    InvalidInputError,
    Operator,
    OperatorState,
    as_state,
    check_state_class,
)
from streamfact.operators.key_index import KeyIndex
from streamfact.operators.svd import IncrementalSVD

__all__ = ["KeyedSVD"]

_SVD_PREFIX = "svd."


class KeyedSVD(Operator):
    """An :class:`~streamfact.operators.svd.IncrementalSVD` addressed by keys.

    Each event ``(row key, column key, weight)`` adds ``weight`` to one cell of
    a matrix A whose rows and columns are keys in order of first appearance.
    A batch of events becomes at most three updates of the inner SVD:

    1. cells of existing rows and columns → one sparse low-rank update
       ``A + B Cᵀ`` with ``B`` the m×r selector of the r touched rows and
       ``C = E[touched, :]ᵀ`` (Brand 2006, eq. 6; Deng et al. 2024 exploit its
       sparsity);
    2. cells in *new columns* on existing rows → ``append_columns``;
    3. cells in *new rows* (over all columns) → ``append_rows``.

    The first batch initialises the SVD from its own matrix. Duplicate events
    in a batch add up. The key→index maps are part of the state.

    Parameters
    ----------
    rank:
        Target rank k.
    key_kind:
        ``"str"`` or ``"int"`` (int64) keys, for both rows and columns.
    method, dtype, device, seed:
        Passed to the inner :class:`IncrementalSVD`.

    Notes
    -----
    Per batch of b events touching r existing rows: O(b log b) key lookups plus
    the inner updates (see :class:`IncrementalSVD`); memory O((m + n) k).

    Examples
    --------
    >>> import numpy as np
    >>> from streamfact.operators.keyed_svd import KeyedSVD
    >>> ks = KeyedSVD(2)
    >>> ks.update(np.array(["ann", "bob"]), np.array(["tea", "jam"]), np.array([1.0, 2.0]))
    >>> ks.update(np.array(["ann"]), np.array(["jam"]), np.array([0.5]))
    >>> ks.shape, np.round(ks.svd.s, 3).tolist()
    ((2, 2), [2.08, 0.962])
    """

    def __init__(
        self,
        rank: int,
        *,
        key_kind: str = "str",
        method: str = "auto",
        dtype: str = "float64",
        device: str = "cpu",
        seed: int = 0,
    ) -> None:
        self.rank = int(rank)
        self.key_kind = key_kind
        self.method = method
        self.dtype = dtype
        self.device = device
        self.seed = int(seed)
        self.svd = IncrementalSVD(self.rank, method=method, dtype=dtype, device=device, seed=seed)
        self.rows = KeyIndex(key_kind)
        self.cols = KeyIndex(key_kind)
        self.events_seen_ = 0

    @property
    def shape(self) -> tuple[int, int]:
        return len(self.rows), len(self.cols)

    # -- updates ----------------------------------------------------------------
    def _check(self, rows: Any, cols: Any, weights: Any) -> tuple[Any, Any, np.ndarray]:
        r, c = np.asarray(rows), np.asarray(cols)
        if r.ndim != 1 or c.shape != r.shape:
            raise InvalidInputError(
                f"rows and cols must be 1-D of equal length, got {r.shape} and {c.shape}"
            )
        w = np.ones(r.shape, dtype=self.dtype) if weights is None else np.asarray(weights)
        if w.shape != r.shape:
            raise InvalidInputError(f"weights has shape {w.shape}, expected {r.shape}")
        if w.dtype.kind not in "fiu":
            raise InvalidInputError(f"weights must be numeric, got dtype {w.dtype}")
        bad = np.flatnonzero(~np.isfinite(w))
        if bad.size:
            raise InvalidInputError("weight is NaN or Inf", rows=bad, column="weight")
        for name, keys in (("rows", r), ("cols", c)):
            try:
                self.rows._coerce(keys)
            except ValueError as exc:
                raise InvalidInputError(f"{name}: {exc}") from exc
        return r, c, w.astype(self.dtype, copy=False)

    def update(self, rows: Any, cols: Any, weights: Any = None) -> None:
        """Add ``weights[i]`` to cell ``(rows[i], cols[i])`` for every event."""
        r_keys, c_keys, w = self._check(rows, cols, weights)
        if r_keys.size == 0:
            return
        m0, n0 = self.shape
        r_idx = self.rows.add(r_keys)
        c_idx = self.cols.add(c_keys)
        m1, n1 = self.shape
        E = sp.csr_array(sp.coo_array((w, (r_idx, c_idx)), shape=(m1, n1)))
        E.sum_duplicates()
        if not self.svd.initialized:
            self.svd.initialize(E)
        else:
            old = E[:m0, :n0]
            old.eliminate_zeros()
            if old.nnz:
                touched = np.flatnonzero(np.diff(old.indptr))
                selector = sp.csr_array(
                    (np.ones(touched.size, dtype=self.dtype), (touched, np.arange(touched.size))),
                    shape=(m0, touched.size),
                )
                self.svd.update_low_rank(selector, old[touched].T.tocsr())
            if n1 > n0:
                self.svd.append_columns(E[:m0, n0:])
            if m1 > m0:
                self.svd.append_rows(E[m0:, :])
        self.events_seen_ += int(r_keys.size)

    # -- queries ----------------------------------------------------------------
    def _embed(self, which: str, keys: Any = None) -> np.ndarray:
        emb = self.svd.row_embeddings() if which == "rows" else self.svd.column_embeddings()
        if keys is None:
            return emb
        index = self.rows if which == "rows" else self.cols
        idx = index.lookup(keys)
        if (idx < 0).any():
            raise KeyError(f"unknown {which[:-1]} key(s): {np.asarray(keys)[idx < 0][:5].tolist()}")
        return emb[idx]

    def row_embeddings(self, keys: Any = None) -> np.ndarray:
        """U√S for all rows (in key order of appearance) or for ``keys``."""
        return self._embed("rows", keys)

    def column_embeddings(self, keys: Any = None) -> np.ndarray:
        """V√S for all columns or for ``keys``."""
        return self._embed("cols", keys)

    @property
    def row_keys(self) -> np.ndarray:
        return self.rows.keys.copy()

    @property
    def column_keys(self) -> np.ndarray:
        return self.cols.keys.copy()

    # -- state ------------------------------------------------------------------
    def state(self) -> OperatorState:
        inner = self.svd.state()
        arrays = {f"{_SVD_PREFIX}{k}": v for k, v in inner.arrays.items()}
        arrays["row_keys"] = self.rows.keys.copy()
        arrays["col_keys"] = self.cols.keys.copy()
        return OperatorState(
            arrays=arrays,
            meta={
                "class": type(self).__name__,
                "state_version": self.state_version,
                "params": self.json_params(),
                "events_seen": self.events_seen_,
                "svd": inner.meta,
            },
        )

    @classmethod
    def from_state(cls, state: OperatorState | Mapping[str, Any]) -> KeyedSVD:
        st = as_state(state)
        check_state_class(st, cls)
        op = cls(**st.meta["params"])
        inner = OperatorState(
            {k[len(_SVD_PREFIX) :]: v for k, v in st.arrays.items() if k.startswith(_SVD_PREFIX)},
            st.meta["svd"],
        )
        op.svd = IncrementalSVD.from_state(inner)
        op.rows = KeyIndex.from_arrays(op.key_kind, st.arrays["row_keys"])
        op.cols = KeyIndex.from_arrays(op.key_kind, st.arrays["col_keys"])
        op.events_seen_ = int(st.meta["events_seen"])
        if op.svd.initialized and op.svd.shape != op.shape:
            raise InvalidInputError(f"key maps {op.shape} do not match the SVD {op.svd.shape}")
        return op

    @classmethod
    def conformance_spec(cls) -> ConformanceSpec:
        n_rows_keys, n_col_keys = 12, 7

        def make(seed: int = 0, dtype: str = "float64", device: str = "cpu") -> KeyedSVD:
            # rank ≥ min(m, n): nothing is truncated, so updates are exact.
            return cls(n_col_keys, key_kind="int", dtype=dtype, device=device, seed=seed)

        def stream(rng: np.random.Generator, dtype: np.dtype, n_rows: int) -> np.ndarray:
            events = np.empty((n_rows, 3), dtype=np.float64)
            events[:, 0] = rng.integers(0, n_rows_keys, n_rows)
            events[:, 1] = rng.integers(0, n_col_keys, n_rows)
            events[:, 2] = rng.uniform(0.5, 2.0, n_rows)
            return events  # keys are small integers; weights are cast by the operator

        def feed(op: Operator, chunk: np.ndarray) -> None:
            assert isinstance(op, KeyedSVD)
            op.update(chunk[:, 0].astype(np.int64), chunk[:, 1].astype(np.int64), chunk[:, 2])

        def probe(op: Operator) -> np.ndarray:
            assert isinstance(op, KeyedSVD)
            dense = np.zeros((n_rows_keys, n_col_keys))
            recon = (op.svd.U * op.svd.s) @ op.svd.V.T
            rows, cols = op.rows.keys.astype(np.int64), op.cols.keys.astype(np.int64)
            dense[np.ix_(rows, cols)] = recon
            return dense

        def bad_inputs(rng: np.random.Generator, dtype: np.dtype) -> list[tuple[str, Any]]:
            return [
                ("NaN weight", np.array([[0.0, 1.0, np.nan]])),
                ("Inf weight", np.array([[1.0, 1.0, np.inf], [2.0, 2.0, 1.0]])),
            ]

        return ConformanceSpec(
            make=make,
            stream=stream,
            feed=feed,
            probe=probe,
            bad_inputs=bad_inputs,
            # No truncation (rank ≥ min(m, n)), so any batch cut gives the same
            # matrix; only the rounding of the projections differs.
            split_tolerance=1e-9,
            growing_state=frozenset(
                {"row_keys", "col_keys", f"{_SVD_PREFIX}U1", f"{_SVD_PREFIX}V1"}
            ),
            float32_rtol=1e-4,
        )
