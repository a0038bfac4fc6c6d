"""Top eigenvector of AᵀA from a random-order row stream (Kacham & Woodruff 2024)."""

from __future__ import annotations

import functools
import math
from collections.abc import Mapping
from typing import Any

import numpy as np
import scipy.sparse as sp

from streamfact.kernels.backend import resolve_backend, to_numpy
from streamfact.kernels.eigen_numba import (
    absorb_dense,
    classify_rows,
    heavy_basis,
    row_sqnorms_csr,
    row_stats_dense,
)
from streamfact.operators.base import (
    ConformanceSpec,
    InvalidInputError,
    NotMergeableError,
    Operator,
    OperatorState,
    StateFormatError,
    dense_row_bad_inputs,
)
from streamfact.operators.frequent_directions import FrequentDirections
from streamfact.operators.validation import check_dtype, check_matrix

__all__ = ["TopEigenvector"]

#: A row is also heavy, while the Frobenius estimate is still blind to it,
#: when it exceeds this multiple of the running mean squared norm.
BLIND_KAPPA = 8.0
#: A stored heavy row is demoted when ‖a‖²·c_h falls below F̂ / DEMOTE_SLACK.
DEMOTE_SLACK = 2.0
#: |z| of a block mean against the earlier blocks above which the order is not random.
ORDER_Z = 6.0
#: Order-test sums: [count, Σ‖a‖², Σ‖a‖⁴] and [Σp, Σp², Σp⁴] for two probes.
ORDER_STATS = 9
#: (sum, sum of squares) slots of the statistics compared across blocks:
#: ‖a‖², then p and p² for each probe p.
_ORDER_PAIRS = ((1, 2), (3, 4), (4, 5), (6, 7), (7, 8))
#: Fewest light rows in a block (and before it) for the order test to run.
ORDER_MIN_ROWS = 16
#: Nonzero coordinates of each order-test probe.
PROBE_NNZ = 32
#: A heavy row adds a direction to the iterate when its residual against the
#: earlier heavy rows exceeds this fraction of its norm.
HEAVY_RTOL = 1e-8

_MODES = ("exact", "heavy_sketch", "sketch")
#: Attributes an update may change (see TopEigenvector._snapshot).
_MUTABLE = (
    "Z_",
    "Y_",
    "G_",
    "H_",
    "h0_",
    "p_",
    "scal_",
    "det_block_",
    "det_prev_",
    "order_random_",
    "order_z_",
    "block_index_",
    "epoch_start_",
    "heavy_seen_",
    "heavy_fd_",
    "fd_",
)


def _orth(m: np.ndarray, rtol: float = 1e-10) -> np.ndarray:
    """Orthonormal basis (d × r) of the column span of ``m`` (d × k).

    Through the k×k Gram matrix (one GEMM and a small eigh) plus one
    re-orthonormalisation pass; directions with σ² ≤ rtol·σ₁² are dropped.
    """
    if m.shape[1] == 0:
        return m[:, :0].copy()
    g = m.T @ m
    w, u = np.linalg.eigh(g)
    top = float(w[-1]) if w.size else 0.0
    if top <= 0.0:
        return m[:, :0].copy()
    keep = w > rtol * top
    q = (m @ u[:, keep]) / np.sqrt(w[keep])
    w2, u2 = np.linalg.eigh(q.T @ q)
    return np.asarray((q @ u2) / np.sqrt(np.maximum(w2, 1e-300)))


@functools.lru_cache(maxsize=32)
def _probe_spec(dim: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Two fixed sparse random probes for the order test: coordinates (2×s) and
    values ±1/√s (2×s), s = min(d, PROBE_NNZ) distinct coordinates each.

    A function of (dim, seed) only: not part of the state (a constant table of
    4·s numbers, cached here). Sparse, so a probe costs s gathers per row, not d.
    """
    rng = np.random.default_rng([int(seed), 0x5EED])
    s = min(dim, PROBE_NNZ)
    idx = np.stack([rng.permutation(dim)[:s] for _ in range(2)]).astype(np.int64)
    val = rng.choice([-1.0, 1.0], size=(2, s)) / math.sqrt(s)
    idx.flags.writeable = False
    val.flags.writeable = False
    return idx, val


def _probe_matrix(dim: int, seed: int) -> np.ndarray:
    """The probes of :func:`_probe_spec` as a dense d×2 matrix (generic path)."""
    idx, val = _probe_spec(dim, seed)
    g = np.zeros((dim, 2))
    for k in range(2):
        g[idx[k], k] = val[k]
    return g


def _heavy_q(rows: np.ndarray) -> np.ndarray:
    """Canonical orthonormal basis (d × r, float64) of the span of ``rows``."""
    if rows.shape[0] == 0:
        return np.zeros((rows.shape[1], 0))
    return np.asarray(heavy_basis(np.ascontiguousarray(rows, dtype=np.float64), HEAVY_RTOL).T)


def _bad_rows_error(x: np.ndarray) -> InvalidInputError:
    bad = np.flatnonzero(~np.isfinite(x).all(axis=1))
    return InvalidInputError("rows contains NaN or Inf", rows=bad)


class TopEigenvector(Operator):
    """Top eigenvector of ``AᵀA`` from one pass over rows in random order.

    A reconstruction of the heavy-row + block-power idea of Kacham & Woodruff
    (NeurIPS 2024): in a uniformly random order every contiguous block of the
    stream is a uniform sample of the rows, so each block serves as one step of
    block power iteration — except for *heavy* rows, which break the matrix
    Chernoff bound and are kept exactly instead.

    With ``n`` the stream length (known, or a doubling guess), ``p`` blocks per
    epoch, iterate width ``b`` and ``c_h = d·log₂ d``, on each nonzero row ``a``:

    1. ``t ← t + 1``; ``F̂ = (S_L + ‖a‖²)·n/t + S_H`` estimates ``‖A‖_F²``
       (unbiased under random order).
    2. If ``‖a‖² ≥ F̂ / c_h`` (the paper's threshold ``‖a‖ ≥ ‖A‖_F/√(d·polylog d)``)
       the row is heavy: appended to ``H``, ``S_H += ‖a‖²``. Otherwise it is
       light: ``S_L += ‖a‖²``, ``Y += a (aᵀP)`` for the b power columns P of
       the iterate ``W = [P, K]``, and ``G += (Kᵀa)(Kᵀa)ᵀ`` for its heavy
       columns ``K = Q_H``.
    3. At the end of a block (applied when the next row arrives), with
       ``s`` = (light rows seen)/(light rows in block) and ``L̂`` the scaled
       light Gram of the block::

           L̂P = s·Y,   L̂K ≈ P (L̂P)ᵀK + K (s·G)      (the part inside span W)
           M̂W = L̂W + Hᵀ(H W)
           P  ← top-b directions of (I − Q_H Q_Hᵀ) M̂W,   K ← Q_H = orth(Hᵀ)

       so ``span(Hᵀ)`` always stays inside the iterate: heavy rows that arrive
       late are not annihilated by earlier power steps (notes §4). Keeping only
       ``KᵀL̂K`` (k×k) instead of ``L̂K`` (d×k) drops the light coupling of the
       heavy directions *outside* span W from the power step — a perturbation
       of order ``‖(I − P_W)L̂K‖² / (λ₁ − λ₂)²`` — and saves d·k floats; it is
       the difference between 3d and 4d floats with one heavy row.
    4. Output: Rayleigh–Ritz over ``span([W, Hᵀ])`` with the operator ``M̂``:
       ``WᵀL̂W`` (exact: from Y and G), the exact heavy part ``HᵀH`` everywhere.
       A heavy row that arrived in the last block is outside ``span W`` and
       only the Ritz step over ``[W, Hᵀ]`` recovers it (notes §9 item 7).

    Guarantee of the paper (for its algorithm, with polylog factors):
    correlation ``⟨v, v₁⟩² ≥ 1 − O(1/√R)`` for ``R = λ₁/λ₂ = Ω(1)`` using
    O(h·d·polylog d) bits, ``h`` the number of heavy rows. The order of the rows
    matters by design; batch boundaries do not (beyond rounding).

    Safeguards:

    * **Order test.** Per block, the means of ``‖a‖²`` and of ``gᵀa`` and
      ``(gᵀa)²`` for two fixed sparse random probes g (32 random coordinates,
      ±1/√32) over the light rows are compared with the earlier blocks (Welch
      z-score, |z| > 6). A stream sorted by norm or by cluster
      trips it: :attr:`order_looks_random` turns ``False`` and the operator
      falls back to a :class:`FrequentDirections` sketch (order-independent),
      seeded with the heavy rows and the current light estimate on ``span Z``.
    * **Heavy budget.** Past ``heavy_budget`` stored rows, the heavy store
      becomes a Frequent Directions sketch of ``sketch_size`` rows (its rows play
      the part of ``H``).
    * **Unknown length.** ``stream_length=None`` starts from a guess ``n₀`` and
      doubles it each time the stream outgrows it; every epoch has ``p`` blocks.
    * **Blind start.** While ``t·c_h ≤ 2n`` the threshold cannot fire (a row's
      own share is extrapolated by ``n/t``), so there a row is also heavy when it
      exceeds 8× the mean ``‖a‖²`` of the rows before it; a stored row that falls below
      half the threshold at a block end is demoted (it then counts as a light
      row of its block). Only a heavy *first* row stays undetectable.
    * Zero rows are ignored: they change neither ``AᵀA`` nor the state.

    Parameters
    ----------
    dim:
        Row width d.
    stream_length:
        Number of nonzero rows, if known; ``None`` for the doubling guess.
    blocks:
        Power steps per epoch p (default 8; the notes use ⌈log d / log R⌉ + 2).
    width:
        Iterate width b (power columns besides the heavy directions).
    heavy_budget:
        Most heavy rows stored exactly (default 32); beyond, an FD sketch.
    sketch_size:
        ℓ of the Frequent Directions fallbacks (default 16: on the notes' heavy-tailed
        instance ℓ = 16 gives correlation 0.982 at 34k floats, ℓ = 8 gives 0.954 at 17k).
    seed:
        Seed of the random start block and of the order-test probes.
    dtype, device:
        ``"float64"``/``"float32"``; ``"cpu"``/``"torch"``/``"cuda"``/``"auto"``
        for the block products ``Aᵀ(A Z)`` and the fallback's SVD.

    Attributes
    ----------
    vector : ndarray (d,)
        Unit estimate of v₁ (Rayleigh–Ritz over ``[Z, Hᵀ]``).
    eigenvalue : float
        Its Rayleigh quotient under the estimated ``AᵀA`` of the rows seen.
    state_size : int
        Floats held in the state arrays: ``(2b + h)·d + h²`` at most in exact
        mode (P and Y are d×b, H is h×d, G is rank H × rank H; the heavy
        columns K are rebuilt from H, not stored); in heavy-sketch mode
        ``(2b + 2ℓ)·d + 4ℓ²`` for W and Y plus ``2ℓ·d`` for the FD sketch.
    order_looks_random : bool
    heavy_rows : int
        Rows currently stored exactly.

    Notes
    -----
    Time O(d (b + k) + k²) per light row, O(d) per heavy row, plus
    O(d (b + h)²) per block (k = rank H ≤ h). On CPU with dense rows all the
    per-row work — norm, NaN/Inf test, heavy test, order statistics, ``Wᵀa``
    and ``Y += a(aᵀP)`` — is one numba pass that reads each row from memory
    once; sparse rows and ``device="torch"/"cuda"`` use BLAS/torch products.

    References
    ----------
    P. Kacham, D. P. Woodruff. Approximating the Top Eigenvector in Random Order
    Streams. NeurIPS 2024 (arXiv:2412.11963). E. Price, Z. Xun. Spectral
    Guarantees for Adversarial Streaming PCA. FOCS 2024.

    Examples
    --------
    >>> import numpy as np
    >>> from streamfact.operators.eigenvector import TopEigenvector
    >>> rng = np.random.default_rng(0)
    >>> A = 0.02 * rng.standard_normal((3000, 32))
    >>> A[1234] = 0.0; A[1234, 5] = 3.0          # one heavy row carries v1
    >>> te = TopEigenvector(32, stream_length=3000, seed=1)
    >>> te.update(A[:1000]); te.update(A[1000:])
    >>> v1 = np.linalg.eigh(A.T @ A)[1][:, -1]
    >>> bool(np.dot(te.vector, v1) ** 2 > 0.999)
    True
    >>> te.heavy_rows, te.order_looks_random
    (1, True)
    """

    #: 3: ``basis`` holds only the stored columns of the iterate (the first
    #: ``heavy_in_basis`` heavy rows supply the rest); ``light_product`` covers the
    #: ``power_columns`` only and ``heavy_light_gram`` the heavy ones. Versions
    #: 1 (all columns stored) and 2 load too.
    state_version = 3

    def __init__(
        self,
        dim: int,
        *,
        stream_length: int | None = None,
        blocks: int | None = None,
        width: int = 1,
        heavy_budget: int = 32,
        sketch_size: int = 16,
        seed: int = 0,
        dtype: str = "float64",
        device: str = "cpu",
    ) -> None:
        if int(dim) <= 0:
            raise ValueError(f"dim must be positive, got {dim}")
        if stream_length is not None and int(stream_length) <= 0:
            raise ValueError(f"stream_length must be positive, got {stream_length}")
        if blocks is not None and int(blocks) <= 0:
            raise ValueError(f"blocks must be positive, got {blocks}")
        if int(width) <= 0 or int(heavy_budget) < 0 or int(sketch_size) <= 0:
            raise ValueError("width and sketch_size must be positive, heavy_budget >= 0")
        self.dim = int(dim)
        self.stream_length = None if stream_length is None else int(stream_length)
        self.blocks = None if blocks is None else int(blocks)
        self.width = int(width)
        self.heavy_budget = int(heavy_budget)
        self.sketch_size = int(sketch_size)
        self.seed = int(seed)
        self.dtype = check_dtype(dtype).name
        self.device = device
        self._backend = resolve_backend(device)

        d = self.dim
        self.c_h_ = d * max(1.0, math.log2(d))
        p = self.n_blocks
        n0 = self.stream_length or max(math.ceil(4 * self.c_h_), 32 * p)
        n0 = max(n0, p)
        b = min(self.width, d)
        start = np.random.default_rng(self.seed).standard_normal((d, b))
        self.Z_ = _orth(start).astype(self.dtype)
        self.Y_ = np.zeros_like(self.Z_)
        self.H_ = np.zeros((0, d), dtype=self.dtype)
        # The first p_ columns of Z_ are power columns (Y_ holds L·Z_[:, :p_]);
        # the rest of Z_ and the first h0_ rows of H_ give the heavy columns K,
        # on which only the light Gram KᵀLK (G_) is kept (see _iterate).
        self.p_ = int(self.Z_.shape[1])
        self.h0_ = 0
        self.G_ = np.zeros((0, 0), dtype=self.dtype)
        self.heavy_fd_: FrequentDirections | None = None
        self.fd_: FrequentDirections | None = None
        # [t, n_guess, block_end, S_L, S_H]
        self.scal_ = np.array([0.0, float(n0), 0.0, 0.0, 0.0])
        self.epoch_start_ = 0
        self.block_index_ = 1
        self.scal_[2] = float(self._block_end())
        self.heavy_seen_ = 0
        # Order test: current block [cnt, Σx, Σx², Σp₁, Σp₁², Σp₂, Σp₂²], earlier blocks the same.
        self.det_block_ = np.zeros(ORDER_STATS)
        self.det_prev_ = np.zeros(ORDER_STATS)
        self.order_random_ = True
        self.order_z_ = 0.0

    # -- layout ---------------------------------------------------------------
    @property
    def n_blocks(self) -> int:
        return self.blocks if self.blocks is not None else 8

    @property
    def mode(self) -> str:
        """``"exact"`` (heavy rows kept), ``"heavy_sketch"`` (heavy store is an
        FD sketch) or ``"sketch"`` (order fallback: everything in FD)."""
        if self.fd_ is not None:
            return "sketch"
        return "heavy_sketch" if self.heavy_fd_ is not None else "exact"

    def _block_end(self) -> int:
        length = int(self.scal_[1]) - self.epoch_start_
        p = self.n_blocks
        return self.epoch_start_ + max(1, (self.block_index_ * length) // p)

    def _heavy_matrix(self) -> np.ndarray:
        if self.heavy_fd_ is not None:
            return self.heavy_fd_.buffer_[: self.heavy_fd_.filled_]
        return self.H_

    # -- updates --------------------------------------------------------------
    def _dense_rows(self, rows: Any) -> np.ndarray:
        """Shape and type checks of :func:`check_matrix`, without its NaN/Inf scan:
        the fused pass finds non-finite rows from their squared norms."""
        arr = to_numpy(rows)
        if arr.ndim == 1:
            arr = arr[None, :]
        if arr.ndim != 2:
            raise InvalidInputError(f"rows must be 1-D or 2-D, got {arr.ndim}-D")
        if not np.issubdtype(arr.dtype, np.number) or np.iscomplexobj(arr):
            raise InvalidInputError(f"rows must be real numeric, got dtype {arr.dtype}")
        if arr.shape[1] != self.dim:
            raise InvalidInputError(f"rows has {arr.shape[1]} columns, expected {self.dim}")
        return np.ascontiguousarray(arr, dtype=self.dtype)

    def update(self, rows: Any) -> None:
        """Absorb rows (b×d dense or CSR) in stream order."""
        fused = not sp.issparse(rows) and not self._backend.is_torch and self.fd_ is None
        if fused:
            x = self._dense_rows(rows)
            if x.shape[0]:
                self._update_fused(x)
            return
        arr = check_matrix(rows, n_cols=self.dim, dtype=np.dtype(self.dtype), name="rows")
        if arr.shape[0] == 0:
            return
        if self.fd_ is not None:
            self._to_fallback(arr)
            return
        self._update_generic(arr)

    def _to_fallback(self, arr: Any) -> None:
        assert self.fd_ is not None
        before = self.fd_.rows_seen_
        self.fd_.update(arr)
        self.scal_[0] += self.fd_.rows_seen_ - before

    def _snapshot(self) -> dict[str, Any]:
        """Copies of everything an update mutates (O((b + h)·d + ℓ·d) floats)."""
        snap: dict[str, Any] = {}
        for name in _MUTABLE:
            value = getattr(self, name)
            snap[name] = value.copy() if isinstance(value, np.ndarray) else value
        if self.heavy_fd_ is not None:
            snap["heavy_fd_"] = FrequentDirections.from_state(self.heavy_fd_.state())
        return snap

    def _restore(self, snap: dict[str, Any]) -> None:
        for name, value in snap.items():
            setattr(self, name, value)

    def _update_fused(self, x: np.ndarray) -> None:
        """CPU, dense rows: one pass per block segment (:func:`absorb_dense`).

        The kernel finds NaN/Inf rows from their squared norms in the same pass
        and works on scratch copies of the counters and block sums, committed
        after each segment. A batch that crosses a block boundary is validated
        only as it goes: the state is snapshotted (a few small copies) before its
        first commit and restored if a later row is rejected, so a rejected batch
        changes nothing, without a separate NaN scan over the rows.
        """
        n = x.shape[0]
        flags = np.empty(n, dtype=np.int8)
        pidx, pval = _probe_spec(self.dim, self.seed)
        pos = 0
        snap: dict[str, Any] | None = None
        while pos < n:
            if self.fd_ is not None:
                try:
                    self._to_fallback(x[pos:])
                except InvalidInputError:
                    if snap is not None:
                        self._restore(snap)
                    raise _bad_rows_error(x) from None
                return
            wt = self._iterate_rows()
            p, k = self.p_, wt.shape[0] - self.p_
            scal, det = self.scal_.copy(), self.det_block_.copy()
            yt = np.zeros((p, self.dim))
            gk = np.zeros((k, k))
            stop = absorb_dense(
                x, pos, wt, p, pidx, pval, scal, det, self.c_h_, BLIND_KAPPA, flags, yt, gk
            )
            if stop < 0:
                if snap is not None:
                    self._restore(snap)
                raise _bad_rows_error(x)
            if stop < n and snap is None:
                snap = self._snapshot()
            self.scal_, self.det_block_ = scal, det
            self.Y_ += yt.T.astype(self.dtype, copy=False)
            self.G_ += gk.astype(self.dtype, copy=False)
            heavy = np.flatnonzero(flags[pos:stop] == 1) + pos
            if heavy.size:
                self._add_heavy(x[heavy])
            pos = stop
            if pos < n:
                self._end_block()

    def _update_generic(self, arr: Any) -> None:
        """Sparse rows, or block products on a torch device."""
        n = arr.shape[0]
        gt = np.ascontiguousarray(_probe_matrix(self.dim, self.seed).T)
        if sp.issparse(arr):
            csr = sp.csr_array(arr)
            norms2 = row_sqnorms_csr(csr.indptr, csr.data)
            probes = np.asarray(csr @ gt.T)
        else:
            norms2, probes = row_stats_dense(np.ascontiguousarray(arr), gt)
        flags = np.full(n, 2, dtype=np.int8)
        pos = 0
        while pos < n:
            if self.fd_ is not None:
                self._to_fallback(arr[pos:])
                return
            stop = classify_rows(
                norms2, probes, pos, self.scal_, self.det_block_, self.c_h_, BLIND_KAPPA, flags
            )
            self._absorb(arr, flags, pos, stop)
            pos = stop
            if pos < n:
                self._end_block()

    def _absorb(self, arr: Any, flags: np.ndarray, lo: int, hi: int) -> None:
        seg_flags = flags[lo:hi]
        heavy = np.flatnonzero(seg_flags == 1) + lo
        light = seg_flags == 0
        if light.any():
            seg = arr[lo:hi]
            w = self._iterate()
            p = self.p_
            be = self._backend
            if be.is_torch:
                xt = be.asarray(seg.toarray() if sp.issparse(seg) else seg, self.dtype)
                ut = (xt @ be.asarray(w, self.dtype)) * be.asarray(
                    light[:, None].astype(self.dtype), self.dtype
                )
                self.Y_ += to_numpy(xt.T @ ut[:, :p]).astype(self.dtype)
                self.G_ += to_numpy(ut[:, p:].T @ ut[:, p:]).astype(self.dtype)
            else:
                u = np.asarray(seg @ w.astype(self.dtype))
                u[~light] = 0.0
                self.Y_ += np.asarray(seg.T @ u[:, :p], dtype=self.dtype)
                self.G_ += (u[:, p:].T @ u[:, p:]).astype(self.dtype)
        if heavy.size:
            picked = arr[heavy]
            dense = picked.toarray() if sp.issparse(picked) else picked
            self._add_heavy(np.asarray(dense, dtype=self.dtype))

    def _iterate_rows(self) -> np.ndarray:
        """``_iterate().T`` as a C-contiguous m×d array (the kernel's layout)."""
        z = self.Z_
        if not self.h0_:
            return np.ascontiguousarray(z.T, dtype=np.float64)
        q = heavy_basis(np.ascontiguousarray(self.H_[: self.h0_], dtype=np.float64), HEAVY_RTOL)
        return np.vstack([z.T, q])

    def _iterate(self) -> np.ndarray:
        """The block-power iterate W = [P, K] (d × m, float64, orthonormal).

        P = ``Z_[:, :p_]`` are the power columns, with ``Y_ = L̂_block P`` (d×p).
        K are the heavy columns: the rest of ``Z_`` (heavy-sketch mode) and, in
        exact mode, the canonical basis of the first ``h0_`` heavy rows
        (recomputed from H, not stored). On K only the light Gram
        ``G_ = KᵀL̂_block K`` is kept (k×k instead of d×k).
        """
        z = self.Z_.astype(np.float64)
        if self.h0_:
            z = np.hstack([z, _heavy_q(self.H_[: self.h0_])])
        return z

    def _light_times_iterate(self, w: np.ndarray) -> np.ndarray:
        """L̂W (d×m) for the light Gram L̂ of the block, scaled to the stream.

        ``L̂P`` is exact (``Y_``); ``L̂K`` is its Galerkin part inside span W,
        ``P(PᵀL̂K) + K(KᵀL̂K)`` with ``PᵀL̂K = (L̂P)ᵀK`` — so ``WᵀL̂W`` is exact,
        and only the part of ``L̂K`` outside span W is not kept.
        """
        scale = self._light_scale()
        p = self.p_
        lp = self.Y_.astype(np.float64) * scale
        pw, kw = w[:, :p], w[:, p:]
        if kw.shape[1] == 0:
            return lp
        lk = pw @ (lp.T @ kw) + kw @ (self.G_.astype(np.float64) * scale)
        return np.hstack([lp, lk])

    def _add_heavy(self, rows: np.ndarray) -> None:
        """Store heavy rows (already validated, nonzero), in stream order."""
        self.heavy_seen_ += rows.shape[0]
        if self.heavy_fd_ is None and self.H_.shape[0] + rows.shape[0] <= self.heavy_budget:
            self.H_ = np.vstack([self.H_, rows])
            return
        if self.heavy_fd_ is None:
            # Past the budget: the heavy store becomes a Frequent Directions sketch,
            # and the heavy columns of the iterate are stored explicitly from now on.
            if self.h0_:
                self.Z_ = np.hstack([self.Z_, _heavy_q(self.H_[: self.h0_]).astype(self.dtype)])
                self.h0_ = 0
            self.heavy_fd_ = FrequentDirections(
                self.dim, self.sketch_size, dtype=self.dtype, device=self.device
            )
            rows = np.vstack([self.H_, rows])
            self.H_ = np.zeros((0, self.dim), dtype=self.dtype)
        self.heavy_fd_._insert(rows)

    # -- block transitions ------------------------------------------------------
    def _light_scale(self) -> float:
        ell = self.det_block_[0]
        light_seen = self.scal_[0] - self.heavy_seen_
        return float(light_seen / ell) if ell > 0 else 0.0

    def _order_test(self) -> None:
        cur, prev = self.det_block_, self.det_prev_
        if cur[0] >= ORDER_MIN_ROWS and prev[0] >= ORDER_MIN_ROWS:
            zmax = 0.0
            for i1, i2 in _ORDER_PAIRS:
                m_c, m_p = cur[i1] / cur[0], prev[i1] / prev[0]
                v_c = max(cur[i2] / cur[0] - m_c * m_c, 0.0)
                v_p = max(prev[i2] / prev[0] - m_p * m_p, 0.0)
                se = math.sqrt(v_c / cur[0] + v_p / prev[0])
                scale = max(abs(m_c), abs(m_p), 1e-300)
                if se > 1e-12 * scale:
                    zmax = max(zmax, abs(m_c - m_p) / se)
                elif abs(m_c - m_p) > 1e-9 * scale:
                    zmax = math.inf
            self.order_z_ = max(self.order_z_, zmax)
            if zmax > ORDER_Z:
                self.order_random_ = False
        self.det_prev_ += cur

    def _end_block(self) -> None:
        """Close the current block (lazily, when the next row arrives)."""
        self._order_test()
        if not self.order_random_:
            self._fall_back_to_sketch()
        else:
            self._power_step()
        self.det_block_[:] = 0.0
        self.block_index_ += 1
        if self.block_index_ > self.n_blocks:
            # Doubling guess: the next epoch is as long as everything so far.
            self.epoch_start_ = int(self.scal_[1])
            self.scal_[1] *= 2.0
            self.block_index_ = 1
        self.scal_[2] = float(self._block_end())

    def _power_step(self) -> None:
        z = self._iterate()
        g = self._heavy_matrix().astype(np.float64)
        mz = self._light_times_iterate(z)
        if g.shape[0]:
            mz += g.T @ (g @ z)
        if self.heavy_fd_ is None:
            self._demote()
            g = self.H_.astype(np.float64)
        q_h = _heavy_q(g)
        r = q_h.shape[1]
        b = min(self.width, self.dim - r)
        cols = np.zeros((self.dim, 0))
        if b > 0:
            resid = mz - q_h @ (q_h.T @ mz) if r else mz
            w, u = np.linalg.eigh(resid.T @ resid)
            top = float(w[-1]) if w.size else 0.0
            good = [i for i in range(w.size - 1, -1, -1)[:b] if w[i] > 1e-20 * top and w[i] > 0]
            if good:
                cols = (resid @ u[:, good]) / np.sqrt(w[good])
            if cols.shape[1] < b:
                # Not enough new directions (all mass in span H): keep old power columns.
                cols = np.hstack([cols, z])
        # Gram–Schmidt over [heavy rows, new columns]: the first r rows reproduce
        # q_h exactly (the same sequence of operations), the next ones are the b
        # power columns orthogonalised against span(H) and each other.
        rows = heavy_basis(np.ascontiguousarray(np.vstack([g, cols.T])), HEAVY_RTOL)
        power = rows[r : r + b].T if b > 0 else np.zeros((self.dim, 0))
        if self.heavy_fd_ is None:
            # The heavy columns stay implicit: _iterate() rebuilds q_h from H.
            self.Z_ = power.astype(self.dtype)
            self.h0_ = int(self.H_.shape[0])
        else:
            self.Z_ = np.hstack([power, q_h]).astype(self.dtype)
            self.h0_ = 0
        self.p_ = int(power.shape[1])
        self.Y_ = np.zeros((self.dim, self.p_), dtype=self.dtype)
        self.G_ = np.zeros((r, r), dtype=self.dtype)

    def _demote(self) -> None:
        if self.H_.shape[0] == 0:
            return
        t, n_guess, _, s_light, s_heavy = self.scal_
        f_hat = s_light * n_guess / max(t, 1.0) + s_heavy
        h64 = self.H_.astype(np.float64)
        norms2 = np.einsum("ij,ij->i", h64, h64)
        low = norms2 * self.c_h_ * DEMOTE_SLACK < f_hat
        if low.any():
            moved = float(norms2[low].sum())
            self.scal_[3] += moved
            self.scal_[4] -= moved
            self.heavy_seen_ -= int(low.sum())
            self.H_ = self.H_[~low]

    def _light_summary(self) -> np.ndarray:
        """Rows R with RᵀR ≈ the light Gram of the rows seen, restricted to span W."""
        z = self._iterate()
        ly = self._light_times_iterate(z)
        t = z.T @ ly
        w, u = np.linalg.eigh((t + t.T) / 2)
        keep = w > 0
        return np.sqrt(w[keep])[:, None] * (z @ u[:, keep]).T

    def _fall_back_to_sketch(self) -> None:
        fd = FrequentDirections(self.dim, self.sketch_size, dtype=self.dtype, device=self.device)
        g = self._heavy_matrix()
        seeds = np.vstack([g.astype(np.float64), self._light_summary()])
        if seeds.shape[0]:
            fd.update(seeds.astype(self.dtype))
        self.fd_ = fd
        self.heavy_fd_ = None
        self.h0_ = 0
        self.p_ = 0
        self.H_ = np.zeros((0, self.dim), dtype=self.dtype)
        self.Z_ = np.zeros((self.dim, 0), dtype=self.dtype)
        self.Y_ = np.zeros((self.dim, 0), dtype=self.dtype)
        self.G_ = np.zeros((0, 0), dtype=self.dtype)

    def merge(self, other: TopEigenvector) -> TopEigenvector:
        raise NotMergeableError(
            "TopEigenvector relies on the order of one stream (its blocks are power "
            "steps); merge FrequentDirections sketches instead"
        )

    # -- queries --------------------------------------------------------------
    def _ritz(self) -> tuple[np.ndarray, float]:
        if self.fd_ is not None:
            return self.fd_.vector, self.fd_.eigenvalue
        z = self._iterate()
        g = self._heavy_matrix().astype(np.float64)
        ly = self._light_times_iterate(z)
        q = np.zeros((self.dim, 0))
        if g.shape[0]:
            # Heavy directions outside span Z (rows that arrived in this block).
            extra = g.T - z @ (z.T @ g.T)
            g_norm = float(np.linalg.norm(g))
            if float(np.linalg.norm(extra)) > 1e-7 * g_norm:
                q = _orth(extra, rtol=1e-12)
                q = _orth(q - z @ (z.T @ q), rtol=1e-12)
                q = q[:, np.linalg.norm(q.T @ extra, axis=1) > 1e-7 * g_norm]
        w_basis = np.hstack([z, q])
        k, m = z.shape[1], w_basis.shape[1]
        t = np.zeros((m, m))
        tzz = z.T @ ly
        t[:k, :k] = (tzz + tzz.T) / 2
        cross = q.T @ ly
        t[k:, :k] = cross
        t[:k, k:] = cross.T
        if g.shape[0]:
            gw = g @ w_basis
            t += gw.T @ gw
        if m == 0 or not np.any(t):
            v = z[:, 0] if k else np.zeros(self.dim)
            return v, 0.0
        w, u = np.linalg.eigh(t)
        v = w_basis @ u[:, -1]
        norm = np.linalg.norm(v)
        return v / norm, float(w[-1])

    @property
    def vector(self) -> np.ndarray:
        """Unit estimate of the top eigenvector of ``AᵀA`` (rows seen so far)."""
        return self._ritz()[0]

    @property
    def eigenvalue(self) -> float:
        """Rayleigh-quotient estimate of λ₁ of the rows seen so far."""
        return self._ritz()[1]

    @property
    def order_looks_random(self) -> bool:
        """False once a block was clearly out of line with the earlier ones."""
        return bool(self.order_random_)

    @property
    def heavy_rows(self) -> int:
        return int(self.H_.shape[0])

    @property
    def rows_seen(self) -> int:
        return int(self.scal_[0])

    @property
    def stream_length_guess(self) -> int:
        return int(self.scal_[1])

    @property
    def state_size(self) -> int:
        """Floats held in the state arrays (measured from the arrays)."""
        held = self.Z_.size + self.Y_.size + self.H_.size + self.G_.size
        for fd in (self.heavy_fd_, self.fd_):
            if fd is not None:
                held += fd.buffer_.size
        return int(held)

    def transform(self, rows: Any) -> np.ndarray:
        """Scores ``rows · v`` on the current estimate (b,)."""
        arr = check_matrix(rows, n_cols=self.dim, dtype=np.dtype(self.dtype), name="rows")
        return np.asarray(arr @ self.vector.astype(self.dtype), dtype=self.dtype)

    # -- state ----------------------------------------------------------------
    def state(self) -> OperatorState:
        arrays: dict[str, np.ndarray] = {
            "basis": self.Z_.copy(),
            "light_product": self.Y_.copy(),
            "heavy": self.H_.copy(),
            "heavy_light_gram": self.G_.copy(),
        }
        meta: dict[str, Any] = {
            **self._state_header(),
            "counters": [float(x) for x in self.scal_],
            "epoch_start": int(self.epoch_start_),
            "block_index": int(self.block_index_),
            "heavy_seen": int(self.heavy_seen_),
            "heavy_in_basis": int(self.h0_),
            "power_columns": int(self.p_),
            "order_block": [float(x) for x in self.det_block_],
            "order_prev": [float(x) for x in self.det_prev_],
            "order_random": bool(self.order_random_),
            "order_z": float(self.order_z_) if math.isfinite(self.order_z_) else 1e300,
        }
        for name, fd in (("heavy_sketch", self.heavy_fd_), ("sketch", self.fd_)):
            if fd is not None:
                sub = fd.state()
                arrays[f"{name}_buffer"] = sub.arrays["buffer"]
                meta[name] = {k: v for k, v in sub.meta.items() if k != "params"}
        return OperatorState(arrays=arrays, meta=meta)

    @classmethod
    def from_state(cls, state: OperatorState | Mapping[str, Any]) -> TopEigenvector:
        st, op = cls._begin_from_state(state)
        z, y, h = st.arrays["basis"], st.arrays["light_product"], st.arrays["heavy"]
        if z.ndim != 2 or y.ndim != 2 or h.ndim != 2 or h.shape[1] != op.dim:
            raise StateFormatError("state arrays do not match dim")
        # Version 1 keeps every iterate column in "basis" (h0 = 0); versions 1-2
        # keep L̂W for every column. Both load as "all stored columns are power
        # columns", with L̂K of the implicit heavy columns reduced to KᵀL̂K.
        h0 = int(st.meta.get("heavy_in_basis", 0))
        if not 0 <= h0 <= h.shape[0] or z.shape[0] != op.dim or y.shape[0] != op.dim:
            raise StateFormatError("state arrays do not match dim")
        q0 = _heavy_q(h[:h0])
        if int(st.meta.get("state_version", 1)) < 3:
            p = z.shape[1]
            if y.shape[1] != p + q0.shape[1]:
                raise StateFormatError("light_product does not match the iterate")
            gk = q0.T @ y[:, p:].astype(np.float64)
            gram = (gk + gk.T) / 2
            y = y[:, :p]
        else:
            p = int(st.meta["power_columns"])
            gram = st.arrays["heavy_light_gram"]
            k = z.shape[1] - p + q0.shape[1]
            if not 0 <= p <= z.shape[1] or y.shape != (op.dim, p) or gram.shape != (k, k):
                raise StateFormatError("light_product does not match the iterate")
        op.Z_ = z.astype(op.dtype, copy=True)
        op.Y_ = y.astype(op.dtype, copy=True)
        op.H_ = h.astype(op.dtype, copy=True)
        op.G_ = np.asarray(gram, dtype=op.dtype).copy()
        op.p_ = p
        op.h0_ = h0
        op.scal_ = np.array(st.meta["counters"], dtype=np.float64)
        op.epoch_start_ = int(st.meta["epoch_start"])
        op.block_index_ = int(st.meta["block_index"])
        op.heavy_seen_ = int(st.meta["heavy_seen"])
        op.det_block_ = np.array(st.meta["order_block"], dtype=np.float64)
        op.det_prev_ = np.array(st.meta["order_prev"], dtype=np.float64)
        if op.det_block_.shape != (ORDER_STATS,) or op.det_prev_.shape != (ORDER_STATS,):
            # Version-1 order statistics (other probes): the test restarts.
            op.det_block_ = np.zeros(ORDER_STATS)
            op.det_prev_ = np.zeros(ORDER_STATS)
        op.order_random_ = bool(st.meta["order_random"])
        op.order_z_ = float(st.meta["order_z"])
        for name in ("heavy_sketch", "sketch"):
            if name in st.meta:
                sub_meta = dict(st.meta[name])
                sub_meta["params"] = {
                    "dim": op.dim,
                    "sketch_size": op.sketch_size,
                    "dtype": op.dtype,
                    "device": op.device,
                }
                sub_meta["class"] = "FrequentDirections"
                fd = FrequentDirections.from_state(
                    OperatorState({"buffer": st.arrays[f"{name}_buffer"]}, sub_meta)
                )
                if name == "heavy_sketch":
                    op.heavy_fd_ = fd
                else:
                    op.fd_ = fd
        return op

    @classmethod
    def conformance_spec(cls) -> ConformanceSpec:
        dim = 6

        def make(seed: int = 0, dtype: str = "float64", device: str = "cpu") -> TopEigenvector:
            return cls(dim, blocks=4, seed=seed, dtype=dtype, device=device)

        def stream(rng: np.random.Generator, dtype: np.dtype, n_rows: int) -> np.ndarray:
            q, _ = np.linalg.qr(rng.standard_normal((dim, dim)))
            scale = np.array([3.0, 1.5, 1.0, 1.0, 0.5, 0.5])
            x = (rng.standard_normal((n_rows, dim)) * scale) @ q.T
            # Two heavy rows (‖a‖² ≈ 0.1–0.2 of ‖A‖_F²) at fixed fractions of the stream,
            # so the heavy path runs and the state size does not depend on n_rows.
            for pos, direction in ((n_rows // 3 + 1, q[:, 1]), ((2 * n_rows) // 3 + 3, q[:, 2])):
                x[pos] = direction * math.sqrt(2.5 * n_rows)
            return x.astype(dtype)

        def probe(op: Operator) -> np.ndarray:
            assert isinstance(op, TopEigenvector)
            v = op.vector
            return np.concatenate([np.outer(v, v).ravel(), [op.rows_seen, op.heavy_rows]])

        return ConformanceSpec(
            make=make,
            stream=stream,
            probe=probe,
            bad_inputs=dense_row_bad_inputs(dim),
            # The result depends on the ORDER of the rows by design (blocks are power
            # steps; see the class docstring), but not on where batches are cut: the
            # heavy test and block boundaries run row by row, and only the block sums
            # Σ a(aᵀZ) are added in another grouping. Rounding only.
            split_tolerance=1e-8,
            backends=("cpu", "torch"),
            backend_rtol=1e-8,
            float32_rtol=1e-3,
            mergeable=False,
        )
