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
    StateFormatError,
)
from streamfact.operators.key_index import KeyIndex
from streamfact.operators.svd import IncrementalSVD

__all__ = ["KeyedSVD"]

_SVD_PREFIX = "svd."
# Re-orthogonalise at √ε-level loss rather than IncrementalSVD's 1e-12: each
# refinement recomputes the factors through Grams, which leaves V with a loss
# of ~ε(σ_1/σ_k)² — ~1e-9 on Zipf-like event matrices (σ_1/σ_k in the
# thousands) — so a 1e-12 threshold re-orthogonalised after every batch, for
# no visible gain: a loss of 1e-8 moves cosine similarities by ~1e-8.
_ORTH_TOL_FLOAT64 = 1e-8


class KeyedSVD(Operator):
    """An :class:`~streamfact.operators.svd.IncrementalSVD` addressed by keys.

    Each event ``(row key, column key, weight)`` adds ``weight`` to one cell of
    a matrix A whose rows and columns are keys in order of first appearance.
    A batch of events is one sparse matrix E over the grown key sets, applied
    with :meth:`IncrementalSVD.update_sparse` (``A ← [A 0; 0 0] + E``):

    * small batches (touching at most ``4·rank`` existing rows + new rows + new
      columns) and the exact methods split E into a sparse low-rank update of
      the touched cells ``A + B Cᵀ`` (Brand 2006, eq. 6), a column append and
      a row append — exact updates of the rank-k approximation;
    * larger batches with ``method="auto"`` (or ``"rpi"``) take one
      Rayleigh–Ritz step whose one side is resolved fully and whose other side
      is augmented by ``n_directions`` randomized range-finder directions of
      the residual, all in Deng et al.'s sparse pair form: O(nnz(E)(k + l) +
      u(k + l)² + (k + l)³) per batch, independent of m and n
      (``method_used_ == "rpi-sparse"``).

    Every incremental updater returns the SVD of the updated *approximation*,
    so truncation drift accumulates; on shuffled event streams (every batch a
    random sample of the cells) it is severe even for exact updaters — on the
    bundled Debian graph (34 batches of 8192 events, rank 64) the sketched
    path alone ends with a top-10 singular-value error of 0.24, and an exact
    updater on the first 3 batches already loses 23 % of s_64. With
    ``refine_growth`` set, the accumulated matrix is retained (sparse, O(nnz)
    memory) and, whenever the event count has grown by that fraction since
    the last refinement, the batch is applied by growing the factors with
    zero rows/columns and running one warm-started subspace iteration against
    the whole matrix (:meth:`IncrementalSVD.refine`: O(nnz(A)(k + p) +
    (m + n)(k + p)²) at GEMM speed, ``method_used_ == "refine"``), with
    ``oversample`` extra directions carried from one refinement to the next.
    Such batches cost O(m + n), not O(batch); the number of refinements over
    N events grows like log(N)/log(1 + refine_growth). With the default 0.02
    every batch of ≥ 2 % of the events seen is a refinement; on the Debian
    graph (batches of 8192) that measured ~50k events/s on one core with a
    top-10 singular value error of 3.6e-3 and neighbour overlap@10 of 0.81
    against a batch ``svds``, versus ~64k events/s and 0.72 with
    ``refine_growth=0.05, oversample=32`` and ~42–54k events/s and 0.86
    with ``refine_growth=0.01``, which refines nearly the same batches
    (``benchmarks/keyed_svd.py``). Between refinements the batch updates
    drift; :meth:`refine_pending` tells a caller with idle time (the daemon's
    timer) whether another :meth:`refine` can still change the model.

    The first batch initialises the SVD from its own matrix. Duplicate events
    add up. The key→index maps (and the retained matrix) are part of the state.

    Parameters
    ----------
    rank:
        Target rank k.
    key_kind:
        ``"str"`` or ``"int"`` (int64) keys, for both rows and columns.
    method, dtype, device, seed:
        Passed to the inner :class:`IncrementalSVD`.
    n_directions, power_iterations:
        l and t of the randomized range finder of large batches.
    refine_growth:
        Refine after the event count has grown by this fraction since the last
        refinement; ``None`` keeps no matrix and never refines.
    oversample:
        Extra directions p of the refinement's subspace iteration; default
        ``max(8, 3·rank // 4)``.
    orth_tol:
        Re-orthogonalise the factors when ``‖WᵀW − I‖₂`` exceeds this; default
        1e-8 for float64 (see ``_ORTH_TOL_FLOAT64``), IncrementalSVD's 2e-5
        for float32.

    Notes
    -----
    Per batch of b events: O(b log b + N) key lookups (N known keys; sorted
    insertion), the inner update, and now and then a refinement. Memory
    O((m + n)(k + p) + nnz(A)).

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
        n_directions: int = 16,
        power_iterations: int = 1,
        refine_growth: float | None = 0.02,
        oversample: int | None = None,
        orth_tol: float | None = None,
    ) -> None:
        if refine_growth is not None and not refine_growth > 0.0:
            raise ValueError(f"refine_growth must be positive or None, got {refine_growth}")
        self.rank = int(rank)
        self.key_kind = key_kind
        self.method = method
        self.dtype = dtype
        self.device = device
        self.seed = int(seed)
        self.n_directions = int(n_directions)
        self.power_iterations = int(power_iterations)
        self.refine_growth = None if refine_growth is None else float(refine_growth)
        self.oversample = None if oversample is None else int(oversample)
        self._oversample = max(8, 3 * self.rank // 4) if oversample is None else int(oversample)
        self.orth_tol = None if orth_tol is None else float(orth_tol)
        if orth_tol is None and np.dtype(dtype) == np.float64:
            orth_tol = _ORTH_TOL_FLOAT64
        self.svd = IncrementalSVD(
            self.rank,
            method=method,
            dtype=dtype,
            device=device,
            seed=seed,
            n_directions=self.n_directions,
            power_iterations=self.power_iterations,
            orth_tol=orth_tol,
        )
        self.rows: KeyIndex = KeyIndex(key_kind)
        self.cols: KeyIndex = KeyIndex(key_kind)
        self.events_seen_ = 0
        self.method_used_ = ""
        self.n_refines_ = 0
        # The accumulated matrix, when retained: a consolidated CSR plus the
        # COO chunks of the batches since (merged lazily).
        self._a = sp.csr_array((0, 0), dtype=dtype)
        self._chunks: list[tuple[np.ndarray, np.ndarray, np.ndarray]] = []
        self._extra = np.zeros((0, 0), dtype=dtype)  # refine's oversampled warm start
        self._events_at_refine = 0
        self.refine_change_ = float("inf")  # max relative change of s in the last refinement

    @property
    def shape(self) -> tuple[int, int]:
        return len(self.rows), len(self.cols)

    @property
    def nbytes(self) -> int:
        """Bytes held by the model: factors, key maps and the retained matrix."""
        a = self._a
        pending = sum(x.nbytes for chunk in self._chunks for x in chunk)
        return int(
            self.svd.nbytes
            + self.rows.nbytes
            + self.cols.nbytes
            + a.data.nbytes
            + a.indices.nbytes
            + a.indptr.nbytes
            + pending
            + self._extra.nbytes
        )

    @property
    def unrefined_events(self) -> int:
        """Events applied since the last refinement (0 when nothing is retained)."""
        if self.refine_growth is None or not self.svd.initialized:
            return 0
        return self.events_seen_ - self._events_at_refine

    def refine_pending(self, settled: float = 1e-10) -> bool:
        """Whether :meth:`refine` can still change the model: events arrived
        since the last refinement, or the last one moved a singular value by
        more than ``settled`` (relative), i.e. the subspace iteration against
        the current matrix has not converged yet."""
        if self.refine_growth is None or not self.svd.initialized:
            return False
        return self.unrefined_events > 0 or self.refine_change_ > settled

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
        r_idx = self.rows.add(r_keys)
        c_idx = self.cols.add(c_keys)
        m1, n1 = self.shape
        E = sp.csr_array(sp.coo_array((w, (r_idx, c_idx)), shape=(m1, n1)))
        E.sum_duplicates()
        first = not self.svd.initialized
        events = self.events_seen_ + int(r_keys.size)
        due = (
            self.refine_growth is not None
            and not first
            and events >= (1.0 + self.refine_growth) * self._events_at_refine
        )
        if due:
            # The refinement recomputes the factors from the whole matrix:
            # only grow them (zero rows/columns for the new keys) and refine.
            self.svd.update_sparse(sp.csr_array((m1, n1), dtype=E.dtype))
        else:
            self.svd.update_sparse(E)
        self.method_used_ = self.svd.method_used_
        self.events_seen_ = events
        if self.refine_growth is None:
            return
        self._chunks.append((r_idx.astype(np.int64), c_idx.astype(np.int64), w.copy()))
        if first:
            self._events_at_refine = self.events_seen_  # initialised exactly
        elif due:
            self.refine()
            self.method_used_ = "refine"

    def matrix(self) -> sp.csr_array:
        """The accumulated matrix A (m×n CSR; needs ``refine_growth`` set)."""
        if self.refine_growth is None:
            raise InvalidInputError("the matrix is not retained (refine_growth=None)")
        m, n = self.shape
        if self._chunks:
            r, c, w = self._pending()
            new = sp.csr_array(sp.coo_array((w, (r, c)), shape=(m, n)))
            new.sum_duplicates()
            old = self._a
            if old.shape != (m, n):  # new keys: pad with empty rows and columns
                pad = np.full(m - old.shape[0], old.indptr[-1], dtype=old.indptr.dtype)
                indptr = np.concatenate([old.indptr, pad])
                old = sp.csr_array((old.data, old.indices, indptr), shape=(m, n))
            self._a = sp.csr_array(old + new)
            self._chunks = []
        return self._a

    def _pending(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        if not self._chunks:
            return (
                np.zeros(0, dtype=np.int64),
                np.zeros(0, dtype=np.int64),
                np.zeros(0, dtype=self.dtype),
            )
        return (
            np.concatenate([ch[0] for ch in self._chunks]),
            np.concatenate([ch[1] for ch in self._chunks]),
            np.concatenate([ch[2] for ch in self._chunks]),
        )

    def refine(self, iterations: int = 1) -> None:
        """One warm-started subspace iteration of the SVD against the retained
        matrix (:meth:`IncrementalSVD.refine`), with ``oversample`` extra
        directions carried over from the previous refinement. O(nnz(A)(k + p)
        + (m + n)(k + p)²)."""
        if not self.svd.initialized:
            return
        a = self.matrix()
        n = a.shape[1]
        extra = self._extra
        if extra.shape[0] < n:
            extra = np.concatenate(
                [extra, np.zeros((n - extra.shape[0], extra.shape[1]), dtype=extra.dtype)]
            )
        before = self.svd.s.copy()
        self._extra = self.svd.refine(
            a, iterations, oversample=self._oversample, extra=extra if extra.size else None
        )
        after = self.svd.s
        if after.size == before.size and after.size:
            scale = np.maximum(after, np.finfo(after.dtype).tiny)
            self.refine_change_ = float(np.max(np.abs(after - before) / scale))
        else:
            self.refine_change_ = float("inf")
        self._events_at_refine = self.events_seen_
        self.n_refines_ += 1

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
        meta: dict[str, Any] = {
            **self._state_header(),
            "events_seen": self.events_seen_,
            "method_used": self.method_used_,
            "svd": inner.meta,
        }
        if self.refine_growth is not None:
            # The consolidated part and the pending chunks are stored apart:
            # merging them here would change the order in which duplicate
            # cells are summed, and a resumed run would differ in the last bit.
            a = self._a
            pend = self._pending()
            arrays["pending_rows"], arrays["pending_cols"], arrays["pending_data"] = pend
            arrays["matrix_indptr"] = a.indptr.astype(np.int64)
            arrays["matrix_indices"] = a.indices.astype(np.int64)
            arrays["matrix_data"] = a.data.copy()
            arrays["refine_extra"] = self._extra.copy()
            meta["matrix_shape"] = [int(a.shape[0]), int(a.shape[1])]
            meta["events_at_refine"] = self._events_at_refine
            meta["n_refines"] = self.n_refines_
        return OperatorState(arrays=arrays, meta=meta)

    @classmethod
    def from_state(cls, state: OperatorState | Mapping[str, Any]) -> KeyedSVD:
        st, op = cls._begin_from_state(state)
        inner = OperatorState(
            {k[len(_SVD_PREFIX) :]: v for k, v in st.arrays.items() if k.startswith(_SVD_PREFIX)},
            st.meta["svd"],
        )
        op.svd = IncrementalSVD.from_state(inner)
        op.rows = KeyIndex.from_arrays(op.key_kind, st.arrays["row_keys"])
        op.cols = KeyIndex.from_arrays(op.key_kind, st.arrays["col_keys"])
        op.events_seen_ = int(st.meta["events_seen"])
        op.method_used_ = str(st.meta.get("method_used", ""))
        if op.refine_growth is not None and "matrix_data" in st.arrays:
            shape = tuple(int(x) for x in st.meta["matrix_shape"])
            try:
                op._a = sp.csr_array(
                    (
                        st.arrays["matrix_data"].astype(op.dtype, copy=True),
                        st.arrays["matrix_indices"].copy(),
                        st.arrays["matrix_indptr"].copy(),
                    ),
                    shape=shape,
                )
            except ValueError as exc:
                raise StateFormatError(f"bad retained matrix: {exc}") from exc
            pend = (
                st.arrays["pending_rows"].astype(np.int64),
                st.arrays["pending_cols"].astype(np.int64),
                st.arrays["pending_data"].astype(op.dtype, copy=True),
            )
            op._chunks = [pend] if pend[0].size else []
            op._extra = st.arrays["refine_extra"].astype(op.dtype, copy=True)
            op._events_at_refine = int(st.meta["events_at_refine"])
            op.n_refines_ = int(st.meta["n_refines"])
            if shape[0] > op.shape[0] or shape[1] > op.shape[1]:
                raise StateFormatError(f"retained matrix {shape} exceeds the keys {op.shape}")
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
                {
                    "row_keys",
                    "col_keys",
                    f"{_SVD_PREFIX}U1",
                    f"{_SVD_PREFIX}V1",
                    "matrix_indptr",
                    "matrix_indices",
                    "matrix_data",
                    "pending_rows",
                    "pending_cols",
                    "pending_data",
                    "refine_extra",
                }
            ),
            float32_rtol=1e-4,
        )
