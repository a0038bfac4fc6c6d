"""Incremental truncated SVD under row appends, column appends and low-rank updates."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import scipy.linalg as sla
import scipy.sparse as sp
import scipy.sparse.linalg as spla

from streamfact.kernels.backend import resolve_backend, to_numpy
from streamfact.kernels.orthogonalize import (
    Basis,
    LinAlg,
    cholesky_qr,
    gram_factor,
    residual_basis,
)
from streamfact.kernels.svd_updates import (
    ZSpace,
    core_append,
    core_low_rank,
    csr_normal_apply,
    one_sided_update,
    truncated_core_svd,
    z_space,
)
from streamfact.operators.base import (
    ConformanceSpec,
    InvalidInputError,
    NotMergeableError,
    Operator,
    OperatorState,
    StateFormatError,
)
from streamfact.operators.validation import check_dtype, check_matrix

__all__ = ["IncrementalSVD"]

_METHODS = ("auto", "zha-simon", "deng", "gkl", "rpi")


class _Side:
    """One side (U or V) of the factorisation, held as ``W = W1 @ K``.

    ``W1`` lives in a row buffer with spare capacity so that row appends cost
    O(new rows), not a copy of everything. ``gram`` tracks ``W1ᵀ W1`` exactly
    under every change applied to W1, so ``‖Kᵀ gram K − I‖`` is the
    orthogonality loss of W for O(r³).
    """

    def __init__(self, w: np.ndarray, gram: np.ndarray | None = None) -> None:
        self.set(w, gram)

    def set(self, w: np.ndarray, gram: np.ndarray | None = None) -> None:
        self.buf = np.ascontiguousarray(w)
        self.n = int(w.shape[0])
        r = int(w.shape[1])
        self.k = np.eye(r, dtype=w.dtype)
        self.gram = (w.T @ w) if gram is None else gram
        self.cond = 1.0

    @property
    def w1(self) -> np.ndarray:
        return self.buf[: self.n]

    @property
    def r(self) -> int:
        return int(self.buf.shape[1])

    def append(self, rows: np.ndarray) -> None:
        need = self.n + rows.shape[0]
        if need > self.buf.shape[0]:
            cap = max(need, 2 * self.buf.shape[0], 16)
            grown = np.zeros((cap, self.r), dtype=self.buf.dtype)
            grown[: self.n] = self.w1
            self.buf = grown
        self.buf[self.n : need] = rows
        self.n = need

    def materialize(self, la: LinAlg) -> np.ndarray:
        if self.identity:
            return self.w1.copy()
        return la.mm(self.w1, self.k)

    @property
    def identity(self) -> bool:
        """Is K exactly the identity (after a fold)? O(r²)."""
        return bool(np.array_equal(self.k, np.eye(self.r, dtype=self.k.dtype)))

    def loss(self, bound: float | None = None) -> float:
        """‖WᵀW − I‖₂ from the tracked Gram, O(r³). With ``bound``, the
        Frobenius norm (an upper bound) is returned when it is ≤ ``bound``,
        which spares the eigenvalue solve in the common healthy case."""
        r = self.r
        if r == 0:
            return 0.0
        g = self.k.T @ self.gram @ self.k - np.eye(r, dtype=self.k.dtype)
        if bound is not None:
            fro = float(np.linalg.norm(g))
            if fro <= bound:
                return fro
        return float(np.max(np.abs(np.linalg.eigvalsh((g + g.T) / 2))))


@dataclass
class _Aug:
    """How one side is augmented by a block: C = Wᵀ Y, residual ≈ Q R."""

    c: np.ndarray
    r: np.ndarray
    q: np.ndarray | None = None  # dense residual basis (d×q)
    z: ZSpace | None = None  # or its sparse pair form
    b_hat: np.ndarray | None = None
    c_hat: np.ndarray | None = None


def _cond(k: np.ndarray) -> float:
    """2-norm condition number of a small square k, from the eigenvalues of
    kᵀk (cheaper than an SVD; accurate far beyond the reset thresholds)."""
    if k.shape[0] == 0:
        return 1.0
    lam = np.linalg.eigvalsh(k.T @ k)
    if lam[0] <= 0.0:
        sv = np.linalg.svd(k, compute_uv=False)
        return float(sv[0] / sv[-1]) if sv[-1] > 0 else float("inf")
    return float(np.sqrt(lam[-1] / lam[0]))


def _gram_cond2(t: np.ndarray) -> float:
    """cond² of Y (kept directions) from the factor ``t`` of :func:`gram_factor`."""
    lam = np.linalg.norm(t, axis=0) ** -2.0  # columns of t are w_i / sqrt(λ_i)
    return float(lam.max() / lam.min()) if lam.size else 1.0


def _right_solve(a: np.ndarray, k: np.ndarray) -> np.ndarray:
    """a @ k⁻¹ through the LU factors of the small k.

    Only called once cond(k) ≤ ``reset_cond`` has been checked, so forming
    k⁻¹ from its LU factors (k³) and applying it with one GEMM is as accurate
    as a triangular solve on every row of ``a`` (relative error ~ε·cond(k))
    and several times faster on tall ``a`` (OpenBLAS trsm is slow for a
    narrow triangle and many right-hand sides)."""
    if a.shape[0] == 0:
        return a @ k
    lu_piv = sla.lu_factor(k, check_finite=False)
    k_inv = sla.lu_solve(lu_piv, np.eye(k.shape[0], dtype=k.dtype), check_finite=False)
    return np.asarray(a @ k_inv)


class IncrementalSVD(Operator):
    """Truncated SVD ``A ≈ U diag(s) Vᵀ`` kept up to date as A grows and changes.

    Three kinds of change are applied without refactoring A:

    * ``append_rows(E)``: ``A ← [A; E]``;
    * ``append_columns(E)``: ``A ← [A, E]``;
    * ``update_low_rank(B, C)``: ``A ← A + B Cᵀ`` (also changes existing cells).

    Each is a Rayleigh–Ritz projection onto the current factors augmented with
    an orthonormal basis ``Q`` of the new directions (Zha & Simon 1999; Brand
    2006). For a row append, with ``(I − V Vᵀ) Eᵀ = Q R``::

        [A_k; E] = blkdiag(U, I) · M · [V, Q]ᵀ,   M = [diag(s) 0; E V  Rᵀ]   (ZS eq. 3.1)

    and the top-k SVD ``M = F Θ Gᵀ`` gives ``U' = [U F_top; F_bot]``, ``s' = θ``,
    ``V' = V G_top + Q G_bot``. Column appends are the transpose; a low-rank
    update uses ``M = [diag(s) 0; 0 0] + [Uᵀ B; R_B][Vᵀ C; R_C]ᵀ`` (Brand eq. 6).

    Methods (``method``):

    * ``"zha-simon"``: the exact projection with explicit rotations of U and V.
    * ``"deng"``: Deng et al. (2024). Factors are stored as ``U = U1 K_u`` and
      ``V = V1 K_v`` so an update only touches the rows it involves (new rows of
      U1; rows ``uid`` of V1 touched by a sparse batch), and the residual is
      orthogonalised in the (u + r)-dimensional sparse representation
      ``x = b − V c`` (SV-LCOV) — here realised as an isometric embedding in
      which ordinary re-orthogonalised QR runs (see
      :class:`streamfact.kernels.svd_updates.ZSpace`). When the batch touches
      more than ``sparse_fraction`` of the rows of V, or some direction of V
      lives almost entirely on the touched rows, the residual is formed
      densely, still without rotating V1. Row and column appends first try
      the QR-free Gram form (notes §3.5): the top-k eigenpairs of the
      (k+p)×(k+p) Gram ``M Mᵀ = [S², S C; Cᵀ S, EEᵀ]`` replace both the
      residual QR and the core SVD; it is used only while
      ε(θ_1/θ_k)² ≤ 1e-9 (never in float32), else the QR form runs.
    * ``"gkl"`` / ``"rpi"``: the new directions are approximated by
      ``n_directions`` Golub–Kahan–Lanczos vectors (Vecharynski & Saad 2014) or
      a randomized power iteration with ``power_iterations`` steps (Yamazaki et
      al. 2015), run in the same factored, sparse representation.
    * ``"auto"``: ``"deng"`` when the batch is sparse or small (fewer rows than
      half the side it extends), else ``"zha-simon"``. Only exact methods are
      chosen automatically by the three updates; :meth:`update_sparse` (a
      batch of keyed events) switches to the approximate ``"rpi-sparse"``
      path for batches touching more than ``sketch_above`` rows/columns. The
      choice of the last update is ``method_used_``.

    Numerical health: ``K_u``, ``K_v`` are running products of non-orthogonal
    k×k factors; when ``cond(K)`` would exceed ``reset_cond`` the factor is
    folded in (``U1 ← U1 K_u, K_u ← I``, O(m k²)). ``W1ᵀW1`` is tracked exactly
    under every change, so ``‖UᵀU − I‖₂`` and ``‖VᵀV − I‖₂`` cost O(k³) per
    update; above ``orth_tol`` both sides are re-orthogonalised (Brand's
    ``force_orth``: QR of U and V, SVD of ``R_U diag(s) R_Vᵀ``).

    All thresholds are relative: residual directions with singular value
    ≤ ``rtol·‖block‖_F`` and singular values ≤ ``rtol·s_1`` are dropped, so
    scaling the data by c scales ``s`` by c and changes nothing else.

    Parameters
    ----------
    rank:
        Target rank k (the number of singular triplets kept).
    method:
        ``"auto"``, ``"zha-simon"``, ``"deng"``, ``"gkl"`` or ``"rpi"``.
    n_directions, power_iterations:
        l and t of the GKL / RPI approximations.
    rtol:
        Relative drop threshold; default 1e-10 (float64) or 1e-5 (float32).
    reset_cond:
        Fold ``K`` into ``W1`` when its condition number would exceed this.
    orth_tol:
        Re-orthogonalise when ``‖WᵀW − I‖₂`` exceeds this; default 1e-12
        (float64) or 2e-5 (float32).
    sparse_fraction:
        ``"deng"`` uses the sparse representation only if the batch touches at
        most this fraction of the rows of the augmented side.
    sketch_above:
        :meth:`update_sparse` with ``method="auto"`` takes the one-sided
        randomized path when E touches more existing rows plus new rows plus
        new columns than this; default ``4·rank``.
    sketch_tau:
        That path leaves out the residual of directions of the sketched factor
        with more than ``1 − sketch_tau`` of their energy on the touched rows
        (they cannot be represented stably in pair form).
    seed:
        Seed of the operator's own random Generator (GKL / RPI start vectors,
        the ``svds`` start vector of a sparse initialisation).
    dtype, device:
        ``"float64"``/``"float32"``; ``"cpu"``, ``"torch"``, ``"cuda"``, ``"auto"``
        (where QR, the GEMMs and the core SVD run; state stays in numpy).

    Attributes
    ----------
    U, s, V : ndarray
        Factors (m×r, r, n×r) with r ≤ k; materialised on demand (O((m+n)k²)).
    shape : (m, n)
    method_used_ : str
        The method that ran the last update (resolves ``"auto"``).
    n_updates_, n_resets_, n_reorthogonalizations_ : int

    Notes
    -----
    Cost of appending p rows with r = k, u touched columns:

    * ``"zha-simon"``: O(n p (k + p) + (k + p)³ + (m + n) k²).
    * ``"deng"``, Gram form: O(nnz(E)(k + p) + nnz(EEᵀ) + (k + p)³ + u k²)
      with a subset eigensolver on the (k+p)² Gram; sparse path:
      O(nnz(E) k + u p (k + p) + u k² + (k + p)³), independent of m and of n;
      dense path: O(n p (k + p) + (k + p)³). A K
      reset adds O((m + n) k²) and happens only when ``cond(K) > reset_cond``.
    * ``"gkl"``/``"rpi"``: O((nnz(E) + u k) l t + (k + p)³).

    Memory O((m + n) k). Every method returns the exact rank-k SVD of the
    updated *approximation* ``[A_k; E]``, not of ``[A; E]``: the discarded tail
    never comes back, so the error against the true matrix grows with the
    number of updates whenever truncation bites. :meth:`refine` runs a
    warm-started subspace iteration against the true matrix to undo that drift.

    References
    ----------
    H. Zha, H. D. Simon, SIAM J. Sci. Comput. 21(2), 1999. M. Brand, Linear
    Algebra Appl. 415(1), 2006. E. Vecharynski, Y. Saad, SIAM J. Matrix Anal.
    Appl. 35(3), 2014. H. Deng et al., ICLR 2024 (arXiv:2401.09703).

    Examples
    --------
    >>> import numpy as np
    >>> from streamfact.operators.svd import IncrementalSVD
    >>> rng = np.random.default_rng(0)
    >>> A = rng.standard_normal((40, 6)) @ rng.standard_normal((6, 10))
    >>> svd = IncrementalSVD(6, method="deng")
    >>> svd.append_rows(A[:20]); svd.append_rows(A[20:])
    >>> bool(np.allclose(svd.s, np.linalg.svd(A, compute_uv=False)[:6]))
    True
    >>> svd.U.shape, svd.V.shape
    ((40, 6), (10, 6))
    """

    state_version = 1

    def __init__(
        self,
        rank: int,
        *,
        method: str = "auto",
        n_directions: int = 10,
        power_iterations: int = 3,
        rtol: float | None = None,
        reset_cond: float = 100.0,
        orth_tol: float | None = None,
        sparse_fraction: float = 0.5,
        sketch_above: int | None = None,
        sketch_tau: float = 1e-3,
        seed: int = 0,
        dtype: str = "float64",
        device: str = "cpu",
    ) -> None:
        if int(rank) <= 0:
            raise ValueError(f"rank must be positive, got {rank}")
        if method not in _METHODS:
            raise ValueError(f"method must be one of {_METHODS}, got {method!r}")
        if int(n_directions) <= 0 or int(power_iterations) < 0:
            raise ValueError("n_directions must be positive and power_iterations ≥ 0")
        if not reset_cond > 1.0:
            raise ValueError(f"reset_cond must exceed 1, got {reset_cond}")
        if not 0.0 <= sparse_fraction <= 1.0:
            raise ValueError(f"sparse_fraction must be in [0, 1], got {sparse_fraction}")
        self.rank = int(rank)
        self.method = method
        self.n_directions = int(n_directions)
        self.power_iterations = int(power_iterations)
        self.rtol = rtol
        self.reset_cond = float(reset_cond)
        self.orth_tol = orth_tol
        self.sparse_fraction = float(sparse_fraction)
        if sketch_above is not None and int(sketch_above) < 0:
            raise ValueError(f"sketch_above must be ≥ 0, got {sketch_above}")
        if not 0.0 < sketch_tau < 1.0:
            raise ValueError(f"sketch_tau must be in (0, 1), got {sketch_tau}")
        self.sketch_above = None if sketch_above is None else int(sketch_above)
        self._sketch_above = 4 * self.rank if sketch_above is None else int(sketch_above)
        self.sketch_tau = float(sketch_tau)
        self.seed = int(seed)
        self.dtype = check_dtype(dtype).name
        self.device = device
        self._backend = resolve_backend(device)
        self._la = LinAlg(self._backend)
        is64 = self.dtype == "float64"
        self._rtol = float(rtol) if rtol is not None else (1e-10 if is64 else 1e-5)
        self._orth_tol = float(orth_tol) if orth_tol is not None else (1e-12 if is64 else 2e-5)
        self._rng = np.random.default_rng(self.seed)
        self._sides: list[_Side] | None = None
        self._s = np.zeros(0, dtype=self.dtype)
        self.method_used_ = ""
        self.n_updates_ = 0
        self.n_resets_ = 0
        self.n_reorthogonalizations_ = 0
        self.n_sparse_updates_ = 0
        self._cache: dict[str, np.ndarray] = {}

    # -- validation -------------------------------------------------------------
    @property
    def _dt(self) -> np.dtype:
        return np.dtype(self.dtype)

    @property
    def initialized(self) -> bool:
        return self._sides is not None

    def _require_init(self) -> list[_Side]:
        if self._sides is None:
            raise InvalidInputError("IncrementalSVD has seen no data yet")
        return self._sides

    def _rows_block(self, x: Any, width: int | None, name: str) -> Any:
        """Validate a block whose rows are the new vectors (one per row)."""
        return check_matrix(x, n_cols=width, dtype=self._dt, name=name)

    def _cols_block(self, x: Any, height: int | None, name: str) -> Any:
        """Validate a block whose columns are the new vectors; return it as d×p.

        Rows reported in errors are the offending column indices of ``x``."""
        if sp.issparse(x):
            xt: Any = sp.csr_array(x).T
        else:
            arr = to_numpy(x)
            if arr.ndim == 1:
                arr = arr[:, None]
            xt = arr.T
        checked = check_matrix(xt, n_cols=height, dtype=self._dt, name=name)
        return checked.T if not sp.issparse(checked) else sp.csc_array(checked.T)

    # -- initialisation -----------------------------------------------------------
    def initialize(self, A: Any) -> None:
        """Start from the truncated SVD of ``A`` (dense or sparse), discarding any state."""
        arr = self._rows_block(A, None, "A")
        self._init_from(arr)

    def _init_from(self, a: Any) -> None:
        m, n = a.shape
        k = self.rank
        if sp.issparse(a) and min(m, n) > 4 * k + 10:
            v0 = self._rng.uniform(-1.0, 1.0, size=min(m, n)).astype(self.dtype)
            u, s, vt = spla.svds(sp.csr_array(a), k=k, v0=v0)
            order = np.argsort(s)[::-1]
            u, s, vt = u[:, order], s[order], vt[order]
        else:
            dense = a.toarray() if sp.issparse(a) else np.asarray(a)
            u, s, vt = self._la.svd(dense)
        u = np.asarray(u, dtype=self.dtype)
        s = np.asarray(s, dtype=self.dtype)
        vt = np.asarray(vt, dtype=self.dtype)
        keep = s > self._rtol * (s[0] if s.size else 0.0)
        keep[k:] = False
        self._sides = [_Side(u[:, keep].copy()), _Side(vt[keep].T.copy())]
        self._s = s[keep].copy()
        self._cache.clear()
        self.method_used_ = "init"
        self.n_updates_ += 1
        self._health()

    # -- method choice --------------------------------------------------------------
    def _choose(self, y: Any, extends: int) -> str:
        if self.method != "auto":
            return self.method
        p = y.shape[1]
        if sp.issparse(y) or 2 * p < max(extends, 1):
            return "deng"
        return "zha-simon"

    # -- augmentation -----------------------------------------------------------------
    def _augment(self, side: _Side, y: Any, method: str) -> _Aug:
        """C = Wᵀ Y and the residual basis of Y against W (dense or pair form)."""
        la = self._la
        kind = "exact" if method in ("zha-simon", "deng") else method
        kw = dict(
            kind=kind,
            rtol=self._rtol,
            la=la,
            n_directions=self.n_directions,
            power_iterations=self.power_iterations,
            rng=self._rng,
        )
        if method != "zha-simon" and sp.issparse(y) and side.r > 0:
            ycsr = sp.csr_array(y)
            uid = np.flatnonzero(np.diff(ycsr.indptr))
            if uid.size <= self.sparse_fraction * side.n:
                zs = z_space(side.w1, side.k, ycsr, uid, min_outside=1e-3, la=la)
                if zs is not None:
                    qz, r = residual_basis(zs.basis, zs.y, zs.c, **kw)  # type: ignore[arg-type]
                    b_hat, c_hat = zs.to_pair(qz)
                    self.n_sparse_updates_ += 1
                    return _Aug(c=zs.c, r=r, z=zs, b_hat=b_hat, c_hat=c_hat)
        basis = Basis(side.w1, side.k, la)
        c = basis.apply_t_any(y)
        q, r = residual_basis(basis, y, c, **kw)  # type: ignore[arg-type]
        return _Aug(c=c, r=r, q=q)

    # -- rotations ----------------------------------------------------------------------
    def _fold(self, side: _Side, w: np.ndarray, gram: np.ndarray | None = None) -> None:
        """W1 ← w, K ← I; ``gram`` = wᵀw when the caller knows it from small
        factors (else one O(d r²) GEMM)."""
        side.set(w, self._la.mm(w.T, w) if gram is None else gram)

    def _rotate_new(
        self, side: _Side, f_top: np.ndarray, new_rows: np.ndarray, factored: bool
    ) -> None:
        """W' = [W F_top; new_rows] with W = W1 K (Deng: K ← K F_top, append rows/K)."""
        k_new = side.k @ f_top
        if factored and k_new.shape[0] == k_new.shape[1] and side.r > 0:
            c = _cond(k_new)
            if c <= self.reset_cond:
                n_rows = _right_solve(new_rows, k_new)
                side.gram = side.gram + n_rows.T @ n_rows
                side.append(n_rows)
                side.k = k_new
                side.cond = c
                return
            self.n_resets_ += 1
        w = np.concatenate([self._la.mm(side.w1, k_new), new_rows], axis=0)
        self._fold(side, w)

    def _rotate_aug(
        self, side: _Side, aug: _Aug, g_top: np.ndarray, g_bot: np.ndarray, factored: bool
    ) -> None:
        """W' = W G_top + Q G_bot with W = W1 K."""
        la = self._la
        square = g_top.shape[0] == g_top.shape[1] and side.r > 0
        if aug.z is not None:
            assert aug.b_hat is not None and aug.c_hat is not None
            k_new = side.k @ (g_top - aug.c_hat @ g_bot)
            uid = aug.z.uid
            if factored and square:
                c = _cond(k_new)
                if c <= self.reset_cond:
                    e2 = _right_solve(g_bot, k_new)
                    delta = aug.b_hat @ e2
                    old = side.w1[uid]
                    cross = old.T @ delta
                    side.gram = side.gram + cross + cross.T + delta.T @ delta
                    side.buf[uid] = old + delta
                    side.k = k_new
                    side.cond = c
                    return
                self.n_resets_ += 1
            w = la.mm(side.w1, k_new)
            w[uid] += aug.b_hat @ g_bot
            self._fold(side, w)
            return
        assert aug.q is not None
        q = aug.q
        k_new = side.k @ g_top
        if factored and square:
            c = _cond(k_new)
            if c <= self.reset_cond:
                e2 = _right_solve(g_bot, k_new)
                w1 = side.w1
                delta = la.mm(q, e2)
                cross = la.mm(w1.T, q) @ e2
                # QᵀQ = I to rounding (Q is re-orthogonalised against itself and W).
                side.gram = side.gram + cross + cross.T + e2.T @ e2
                side.buf[: side.n] = w1 + delta
                side.k = k_new
                side.cond = c
                return
            self.n_resets_ += 1
        w = la.mm(side.w1, k_new) + la.mm(q, g_bot)
        self._fold(side, w)

    # -- updates ------------------------------------------------------------------------
    def _append(self, new_idx: int, y: Any, new_left: np.ndarray | None = None) -> None:
        """Append p vectors (columns of y) to the side ``1 − new_idx``; the
        side ``new_idx`` gains p rows (or ``new_left @ F_bot`` rows, for merge)."""
        sides = self._require_init()
        new, aug_side = sides[new_idx], sides[1 - new_idx]
        method = self._choose(y, new.n)
        if method == "deng" and new_left is None and self._append_gram(new, aug_side, y):
            self._after(method)
            return
        factored = method != "zha-simon"
        aug = self._augment(aug_side, y, method)
        r = self._s.shape[0]
        m_core = core_append(self._s, aug.c, aug.r)
        f, theta, g = truncated_core_svd(m_core, self.rank, self._rtol, self._la)
        new_rows = f[r:] if new_left is None else self._la.mm(new_left, f[r:])
        self._rotate_new(new, f[:r], new_rows, factored)
        self._rotate_aug(aug_side, aug, g[:r], g[r:], factored)
        self._s = theta.astype(self.dtype, copy=False)
        self._after(method)

    def _append_gram(self, new: _Side, aug_side: _Side, y: Any) -> bool:
        """The QR-free Gram form of an append (notes §3.5), in factored form.

        With ``C = Wᵀ Y`` (W the side being augmented), the Gram of the core
        ``M Mᵀ = [S², S C; Cᵀ S, YᵀY]`` gives ``F``, ``θ²`` (top k eigenpairs),
        then ``W_new' = [W_new F_top; F_bot]`` and ``W' = (W S F_top + Y F_bot)
        θ⁻¹`` — no residual, no QR and no orthogonalisation of p vectors.
        Only the rows of W touched by Y change (Deng et al.'s extended
        decomposition). Cost O(nnz(Y)(k + p) + (k + p)³ + u k²). Eigenvalues
        carry relative error ~ε(θ_1/θ_i)², so the form is used only while
        ε(θ_1/θ_k)² ≤ 1e-9 (never in float32); otherwise returns False and the
        caller runs the QR form.
        """
        r = self._s.shape[0]
        if r == 0 or aug_side.r != r:
            return False
        eps = float(np.finfo(self._dt).eps)
        if sp.issparse(y):
            # The new vectors as rows (p×d), compacted to the touched rows of W.
            et = sp.csr_array(y.T)
            uid = np.unique(et.indices)
            ec = sp.csr_array(
                (et.data, np.searchsorted(uid, et.indices), et.indptr),
                shape=(et.shape[0], uid.size),
            )
            y_u: Any = sp.csr_array(ec.T)
            wu = aug_side.w1[uid] @ aug_side.k
            c = np.asarray(ec @ wu).T
            yty = np.asarray((ec @ y_u).toarray())
        else:
            uid = np.arange(aug_side.n)
            y_u = np.asarray(y)
            wu = aug_side.materialize(self._la)
            c = self._la.mm(wu.T, y_u)
            yty = self._la.mm(y_u.T, y_u)
        p = c.shape[1]
        s = self._s
        sc = s[:, None] * c
        g = np.empty((r + p, r + p), dtype=self._dt)
        g[:r, :r] = np.diag(s * s)
        g[:r, r:] = sc
        g[r:, :r] = sc.T
        g[r:, r:] = (yty + yty.T) / 2
        n_top = min(self.rank, r + p)
        if self._la.is_torch:
            lam, f = self._la.eigh(g)
            lam, f = lam[::-1][:n_top], f[:, ::-1][:, :n_top]
        elif r + p <= 256:
            lam, f = np.linalg.eigh(g)
            lam, f = lam[::-1][:n_top], f[:, ::-1][:, :n_top]
        else:
            lam, f = sla.eigh(
                g, subset_by_index=[r + p - n_top, r + p - 1], driver="evx", check_finite=False
            )
            lam, f = lam[::-1], f[:, ::-1]
        if lam.size == 0 or lam[0] <= 0.0:
            return False
        theta = np.sqrt(np.maximum(lam, 0.0))
        keep = theta > self._rtol * theta[0]
        theta, f = theta[keep], f[:, keep]
        if eps * (theta[0] / theta[-1]) ** 2 > 1e-9:
            return False
        f_top, f_bot = f[:r], f[r:]
        d = np.asarray(y_u @ f_bot) / theta
        self._rotate_new(new, f_top, f_bot, True)
        self._apply_step(aug_side, uid, (s[:, None] * f_top) / theta, d)
        self._s = theta.astype(self.dtype, copy=False)
        self.n_sparse_updates_ += 1
        return True

    def append_rows(self, X: Any) -> None:
        """``A ← [A; X]`` for X (p×n), dense or sparse. The first call initialises."""
        if self._sides is None:
            self._init_from(self._rows_block(X, None, "X"))
            return
        e = self._rows_block(X, self.shape[1], "X")
        if e.shape[0] == 0:
            return
        y = sp.csc_array(e.T) if sp.issparse(e) else np.ascontiguousarray(e.T)
        self._append(0, y)

    def append_columns(self, X: Any) -> None:
        """``A ← [A, X]`` for X (m×p), dense or sparse. The first call initialises."""
        if self._sides is None:
            y0 = self._cols_block(X, None, "X")
            self._init_from(y0)
            return
        y = self._cols_block(X, self.shape[0], "X")
        if y.shape[1] == 0:
            return
        self._append(1, sp.csr_array(y) if sp.issparse(y) else y)

    def update_low_rank(self, B: Any, C: Any) -> None:
        """``A ← A + B Cᵀ`` for B (m×p) and C (n×p), dense or sparse (Brand 2006)."""
        sides = self._require_init()
        m, n = self.shape
        yb = self._cols_block(B, m, "B")
        yc = self._cols_block(C, n, "C")
        if yb.shape[1] != yc.shape[1]:
            raise InvalidInputError(
                f"B and C must have the same number of columns, got {yb.shape[1]} and {yc.shape[1]}"
            )
        if yb.shape[1] == 0:
            return
        yb = sp.csr_array(yb) if sp.issparse(yb) else yb
        yc = sp.csr_array(yc) if sp.issparse(yc) else yc
        method = self._choose(yb if sp.issparse(yb) else yc, max(m, n))
        factored = method != "zha-simon"
        aug_u = self._augment(sides[0], yb, method)
        aug_v = self._augment(sides[1], yc, method)
        r = self._s.shape[0]
        m_core = core_low_rank(self._s, aug_u.c, aug_u.r, aug_v.c, aug_v.r)
        f, theta, g = truncated_core_svd(m_core, self.rank, self._rtol, self._la)
        self._rotate_aug(sides[0], aug_u, f[:r], f[r:], factored)
        self._rotate_aug(sides[1], aug_v, g[:r], g[r:], factored)
        self._s = theta.astype(self.dtype, copy=False)
        self._after(method)

    def update_sparse(self, E: Any) -> None:
        """``A ← [A 0; 0 0] + E`` for E (m'×n') with m' ≥ m, n' ≥ n, dense or sparse.

        Changes existing cells, adds new rows and adds new columns in one call
        (the matrix of a batch of keyed events). The first call initialises.

        Exact methods (and ``"gkl"``) split E into a low-rank update of the
        touched existing rows, a column append and a row append. ``"rpi"``,
        and ``"auto"`` when E touches more than ``sketch_above`` rows plus new
        columns, run one Rayleigh–Ritz step instead
        (:func:`~streamfact.kernels.svd_updates.one_sided_update`): the side
        with more touched indices is resolved fully, the other is augmented
        with ``n_directions`` randomized range-finder directions of its
        residual, so the cost is O(nnz(E)(k + l)(t + 1) + u (k + l)² +
        (k + l)³) with u the touched indices — independent of m and n.
        ``method_used_`` reports ``"rpi-sparse"`` for that path.
        """
        if self._sides is None:
            self._init_from(self._rows_block(E, None, "E"))
            return
        e = self._rows_block(E, None, "E")
        m0, n0 = self.shape
        m1, n1 = e.shape
        if m1 < m0 or n1 < n0:
            raise InvalidInputError(f"E has shape {e.shape}, smaller than the matrix {(m0, n0)}")
        e = sp.csr_array(e)
        e.eliminate_zeros()
        rows_nz = np.flatnonzero(np.diff(e.indptr))
        if self.method == "rpi":
            method = "rpi-sparse"
        elif self.method == "auto":
            touched_old = int(np.count_nonzero(rows_nz < m0))
            p_total = touched_old + (m1 - m0) + (n1 - n0)
            method = "rpi-sparse" if p_total > self._sketch_above else "split"
        else:
            method = "split"
        if method == "split" or self._s.shape[0] == 0:
            self._update_split(e, m0, n0)
            return
        sides = self._require_init()
        r = self._s.shape[0]
        dt = self._dt
        for side, grow in zip(sides, (m1 - m0, n1 - n0), strict=True):
            if grow:
                side.append(np.zeros((grow, r), dtype=dt))
        if e.nnz == 0:
            self._after(method)
            return
        cols_nz = np.unique(e.indices)
        col_pos = np.full(n1, -1, dtype=np.int64)
        col_pos[cols_nz] = np.arange(cols_nz.size)
        indptr = np.concatenate([[0], e.indptr[rows_nz + 1]]).astype(np.int64)
        ec = sp.csr_array((e.data, col_pos[e.indices], indptr), shape=(rows_nz.size, cols_nz.size))
        uids = [rows_nz, cols_nz]
        full = 0 if rows_nz.size >= cols_nz.size else 1
        if full == 1:
            ec = sp.csr_array(ec.T)
        fside, sside = sides[full], sides[1 - full]
        fuid, suid = uids[full], uids[1 - full]
        step = one_sided_update(
            self._s,
            fside.w1[fuid] @ fside.k,
            sside.w1[suid] @ sside.k,
            ec,
            rank=self.rank,
            n_directions=self.n_directions,
            power_iterations=self.power_iterations,
            rtol=self._rtol,
            tau=self.sketch_tau,
            rng=self._rng,
        )
        self._apply_step(fside, fuid, step.a_full, step.d_full)
        self._apply_step(sside, suid, step.a_sketch, step.b_sketch)
        self._s = step.theta.astype(self.dtype, copy=False)
        self.n_sparse_updates_ += 1
        self._after(method)

    def _apply_step(self, side: _Side, uid: np.ndarray, a: np.ndarray, d: np.ndarray) -> None:
        """W' = W a + D̃ (D on rows ``uid``), in factored form when K stays well conditioned."""
        k_new = side.k @ a
        if k_new.shape[0] == k_new.shape[1] and side.r > 0:
            c = _cond(k_new)
            if c <= self.reset_cond:
                delta = _right_solve(d, k_new)
                old = side.w1[uid]
                cross = old.T @ delta
                side.gram = side.gram + cross + cross.T + delta.T @ delta
                side.buf[uid] = old + delta
                side.k = k_new
                side.cond = c
                return
            self.n_resets_ += 1
        w = self._la.mm(side.w1, k_new)
        w[uid] += d
        self._fold(side, w)

    def _update_split(self, e: sp.csr_array, m0: int, n0: int) -> None:
        """update_sparse as a low-rank update, a column append and a row append."""
        m1, n1 = e.shape
        old = sp.csr_array(e[:m0, :n0])
        old.eliminate_zeros()
        if old.nnz:
            touched = np.flatnonzero(np.diff(old.indptr))
            selector = sp.csr_array(
                (np.ones(touched.size, dtype=self.dtype), (touched, np.arange(touched.size))),
                shape=(m0, touched.size),
            )
            self.update_low_rank(selector, sp.csr_array(old[touched].T))
        if n1 > n0:
            self.append_columns(e[:m0, n0:])
        if m1 > m0:
            self.append_rows(e[m0:, :])

    def _after(self, method: str) -> None:
        self.method_used_ = method
        self.n_updates_ += 1
        self._cache.clear()
        self._health()

    def _health(self) -> None:
        sides = self._require_init()
        tol = self._orth_tol
        if max(sides[0].loss(bound=tol), sides[1].loss(bound=tol)) > tol:
            self.reorthogonalize()

    def reorthogonalize(self) -> None:
        """Brand's ``force_orth``: U = Q_U R_U, V = Q_V R_V, SVD of R_U diag(s) R_Vᵀ.

        Also folds K_u, K_v into U1, V1. The factors R come from the tracked
        Gram ``UᵀU = Kᵀ (U1ᵀU1) K`` (Cholesky-QR in eigen form, O(k³)), so the
        only O((m + n) k²) work is the fold itself (two GEMMs per side). The
        fold recomputes the Gram exactly; if the loss is still above half the
        tolerance a second pass runs on that exact Gram (Cholesky-QR2)."""
        self._require_init()
        for _ in range(2):
            self._force_orth()
            if max(side.loss() for side in self._require_init()) <= 0.5 * self._orth_tol:
                break
        self.n_reorthogonalizations_ += 1
        self._cache.clear()

    def _force_orth(self) -> None:
        sides = self._require_init()
        la = self._la
        rel = 100.0 * float(np.finfo(self._dt).eps)
        (tu, ru), (tv, rv) = (gram_factor(side.k.T @ side.gram @ side.k, rel) for side in sides)
        f, sig, gt = la.svd((ru * self._s) @ rv.T)
        self._fold(sides[0], la.mm(sides[0].w1, sides[0].k @ (tu @ f)))
        self._fold(sides[1], la.mm(sides[1].w1, sides[1].k @ (tv @ gt.T)))
        self._s = sig.astype(self.dtype, copy=False)

    def refine(
        self,
        A: Any,
        iterations: int = 1,
        *,
        oversample: int = 10,
        extra: np.ndarray | None = None,
    ) -> np.ndarray:
        """Pull the factors towards the true matrix ``A`` (m×n, dense or sparse).

        Each iteration is one step of block subspace iteration warm-started from
        ``[V, extra, Ω]`` (``extra``: directions kept from an earlier call, Ω:
        random columns up to ``oversample`` extra in all; oversampling speeds
        convergence from (s_{k+1}/s_k)² to (s_{k+p+1}/s_k)² per step):
        ``Y = A V``, ``Q = Y T`` with ``T`` from the column-equilibrated Gram
        ``D YᵀY D`` (Cholesky-QR; explicit Cholesky-QR2 when cond(Y D)² > 1e4),
        then the SVD of ``Qᵀ A``
        through the Gram of ``Aᵀ Q = (Aᵀ Y) T``: ``Tᵀ(Z0ᵀZ0)T = F Σ² Fᵀ``,
        ``U = Y T F``, ``s = Σ``, ``V = (Aᵀ Y) T F Σ⁻¹``; the top k are kept.
        Everything dense is a GEMM on a tall block (no Householder QR), so one
        iteration costs O(nnz(A)(k + p) + (m + n)(k + p)²) flops at GEMM
        speed, never a fresh decomposition of A. V's orthogonality is
        ~ε(σ_1/σ_k)²; the usual re-orthogonalisation check runs afterwards.

        Returns the next ``oversample`` right Ritz vectors (n×p), to pass as
        ``extra`` to the next call: a warm start for the oversampled part.
        """
        sides = self._require_init()
        a = self._rows_block(A, self.shape[1], "A")
        if a.shape[0] != self.shape[0]:
            raise InvalidInputError(f"A has {a.shape[0]} rows, expected {self.shape[0]}")
        if int(iterations) < 1:
            raise ValueError(f"iterations must be at least 1, got {iterations}")
        la = self._la
        n = self.shape[1]
        blocks = [sides[1].w1 if sides[1].identity else sides[1].materialize(la)]
        if extra is not None:
            ex = np.asarray(extra, dtype=self.dtype)
            if ex.ndim != 2 or ex.shape[0] != n:
                raise InvalidInputError(f"extra must be {n}×p, got shape {ex.shape}")
            blocks.append(ex[:, : max(0, int(oversample))])
        have = sum(b.shape[1] for b in blocks)
        n_rand = max(0, min(self.rank + int(oversample), n) - have)
        if n_rand:
            blocks.append(self._rng.standard_normal((n, n_rand)).astype(self.dtype))
        v = np.concatenate(blocks, axis=1) if len(blocks) > 1 else blocks[0]
        eps = float(np.finfo(self._dt).eps)
        rel = 100.0 * eps
        n_it = int(iterations)
        for it in range(n_it):
            if sp.issparse(a) and not la.is_torch:
                y, z0 = csr_normal_apply(a, v)  # A V and Aᵀ A V in one pass
            else:
                y = np.asarray(a @ v) if sp.issparse(a) else la.mm(a, v)
                z0 = np.asarray(a.T @ y) if sp.issparse(a) else la.mm(a.T, y)
            gy = la.mm(y.T, y)
            # Column-equilibrated Gram factor: the warm-started columns of Y
            # are ≈ u_i σ_i, orthogonal but scaled over σ_1/σ_q (thousands on
            # Zipf-like data). Scaling them to unit norm first makes the Gram
            # well conditioned, so Q = Y T is orthonormal to ~ε·cond(Y D)²
            # instead of ε·cond(Y)², and the explicit QR below is rarely due.
            d = 1.0 / np.sqrt(np.maximum(np.diag(gy), np.finfo(self._dt).tiny))
            ts, _ = gram_factor(gy * np.outer(d, d), rel)
            t = d[:, None] * ts
            if _gram_cond2(ts) > 1e4:
                # Ill-conditioned block: explicit Cholesky-QR2 for Q.
                y, _ = cholesky_qr(y, la, rel=rel)
                gy = la.mm(y.T, y)
                t = np.eye(y.shape[1], dtype=y.dtype)
                z0 = np.asarray(a.T @ y) if sp.issparse(a) else la.mm(a.T, y)
            # Q = Y T (implicit). Aᵀ Q = (Aᵀ Y) T; its SVD through the Gram
            # Tᵀ (Z0ᵀ Z0) T = F Σ² Fᵀ: V = Z0 T F Σ⁻¹, U = Y T F.
            gz = t.T @ la.mm(z0.T, z0) @ t
            lam, f = np.linalg.eigh((gz + gz.T) / 2)
            lam, f = lam[::-1], f[:, ::-1]
            pos = lam > rel * (lam[0] if lam.size else 0.0)
            lam, f = lam[pos], f[:, pos]
            sig = np.sqrt(lam)
            tf = t @ f
            if it < n_it - 1:
                v = la.mm(z0, tf / sig)
        # Last iteration: only the kept columns of U and V, and the extra
        # right Ritz vectors, each computed straight into a contiguous block.
        keep = sig > self._rtol * (sig[0] if sig.size else 0.0)
        keep[self.rank :] = False
        n_keep = int(keep.sum())
        # U's Gram follows from the small factors (U = Y T F, and T was made
        # from YᵀY itself), so it needs no pass over the m rows. V = Z0 T F Σ⁻¹
        # goes through the Gram of Z0, whose rounding is amplified by
        # (σ_1/σ_k)²; its Gram is formed explicitly (O(n k²)) so the
        # orthogonality check sees the true loss.
        tf_k = tf[:, :n_keep]
        gram_u = tf_k.T @ gy @ tf_k
        self._fold(sides[0], la.mm(y, tf_k), (gram_u + gram_u.T) / 2)
        self._fold(sides[1], la.mm(z0, tf_k / sig[:n_keep]))
        extra_v = la.mm(z0, tf[:, n_keep:] / sig[n_keep:])
        self._s = sig[:n_keep].astype(self.dtype, copy=True)
        self._cache.clear()
        self.n_updates_ += 1
        self._health()
        return extra_v

    def merge(self, other: IncrementalSVD) -> IncrementalSVD:
        """Combine with an operator fed a disjoint set of rows of the same columns.

        With ``A1 ≈ U1 S1 V1ᵀ`` (this) and ``A2 ≈ U2 S2 V2ᵀ`` (other), the SVD of
        ``[A1; A2]`` is taken through the stacked ``[S1 V1ᵀ; S2 V2ᵀ]``: a
        Zha–Simon row append of ``S2 V2ᵀ`` whose new rows are multiplied by U2.
        The rows of ``other`` follow the rows of ``self``. Exact when
        rank ≥ rank(A1) + rank(A2); otherwise the rank-k truncation of the
        two rank-k approximations.
        """
        if not isinstance(other, IncrementalSVD) or other.rank != self.rank:
            raise NotMergeableError("can only merge IncrementalSVD operators of the same rank")
        if other._sides is None:
            return type(self).from_state(self.state())
        if self._sides is None:
            return type(self).from_state(other.state())
        if other.shape[1] != self.shape[1]:
            raise NotMergeableError(
                f"merge needs the same columns: {self.shape[1]} vs {other.shape[1]}"
            )
        out = type(self).from_state(self.state())
        la = out._la
        v2 = other._sides[1].materialize(la).astype(out.dtype)
        u2 = other._sides[0].materialize(la).astype(out.dtype)
        y = v2 * other._s.astype(out.dtype)
        saved = out.method
        out.method = "zha-simon"
        try:
            out._append(0, y, new_left=u2)
        finally:
            out.method = saved
        return out

    # -- queries --------------------------------------------------------------------------
    @property
    def shape(self) -> tuple[int, int]:
        sides = self._require_init()
        return sides[0].n, sides[1].n

    def _factor(self, idx: int) -> np.ndarray:
        key = "UV"[idx]
        if key not in self._cache:
            self._cache[key] = self._require_init()[idx].materialize(self._la)
        return self._cache[key]

    @property
    def U(self) -> np.ndarray:
        """Left singular vectors (m×r)."""
        return self._factor(0).copy()

    @property
    def V(self) -> np.ndarray:
        """Right singular vectors (n×r)."""
        return self._factor(1).copy()

    @property
    def s(self) -> np.ndarray:
        """Singular values (r,), descending."""
        return self._s.copy()

    def transform(self, X: Any) -> np.ndarray:
        """Embed rows ``X`` (b×n) as ``X V diag(s)^-½``.

        For a row of A this equals its row of :meth:`row_embeddings` (U√S), so
        new rows land in the same space as the stored ones. O(nnz(X) k)."""
        self._require_init()
        x = self._rows_block(X, self.shape[1], "X")
        v = self._factor(1)
        xv = np.asarray(x @ v) if sp.issparse(x) else self._la.mm(x, v)
        return np.asarray(xv / np.sqrt(self._s), dtype=self.dtype)

    def row_embeddings(self) -> np.ndarray:
        """U √S (m×r)."""
        return self._factor(0) * np.sqrt(self._s)

    def column_embeddings(self) -> np.ndarray:
        """V √S (n×r)."""
        return self._factor(1) * np.sqrt(self._s)

    @property
    def nbytes(self) -> int:
        """Bytes held by the factors (U1, V1 with their spare capacity, K, Grams)."""
        if self._sides is None:
            return int(self._s.nbytes)
        held = sum(
            np.asarray(a).nbytes for side in self._sides for a in (side.buf, side.k, side.gram)
        )
        return int(held + self._s.nbytes)

    def orthogonality_loss(self, exact: bool = False) -> tuple[float, float]:
        """(‖UᵀU − I‖₂, ‖VᵀV − I‖₂): tracked in O(k³), or recomputed from the
        materialised factors in O((m + n) k²) with ``exact=True``."""
        sides = self._require_init()
        if not exact:
            return sides[0].loss(), sides[1].loss()
        out = []
        for idx in (0, 1):
            w = self._factor(idx).astype(np.float64)
            g = w.T @ w - np.eye(w.shape[1])
            out.append(float(np.linalg.norm(g, 2)) if w.shape[1] else 0.0)
        return out[0], out[1]

    def condition_numbers(self) -> tuple[float, float]:
        """(cond K_u, cond K_v) of the extended decomposition (1 when folded)."""
        sides = self._require_init()
        return _cond(sides[0].k), _cond(sides[1].k)

    # -- state ----------------------------------------------------------------------------
    def state(self) -> OperatorState:
        meta: dict[str, Any] = {
            **self._state_header(),
            "initialized": self._sides is not None,
            "method_used": self.method_used_,
            "n_updates": self.n_updates_,
            "n_resets": self.n_resets_,
            "n_reorthogonalizations": self.n_reorthogonalizations_,
            "n_sparse_updates": self.n_sparse_updates_,
            "rng": _rng_to_json(self._rng),
        }
        arrays: dict[str, np.ndarray] = {"s": self._s.copy()}
        if self._sides is not None:
            for name, side in zip(("U", "V"), self._sides, strict=True):
                arrays[f"{name}1"] = side.w1.copy()
                arrays[f"K{name.lower()}"] = side.k.copy()
                arrays[f"gram_{name.lower()}"] = np.asarray(side.gram).copy()
                meta[f"cond_{name.lower()}"] = float(side.cond)
        return OperatorState(arrays=arrays, meta=meta)

    @classmethod
    def from_state(cls, state: OperatorState | Mapping[str, Any]) -> IncrementalSVD:
        st, op = cls._begin_from_state(state)
        dt = op._dt
        op._s = st.arrays["s"].astype(dt, copy=True)
        if st.meta.get("initialized"):
            sides = []
            for name in ("U", "V"):
                w1 = st.arrays[f"{name}1"].astype(dt, copy=True)
                k = st.arrays[f"K{name.lower()}"].astype(dt, copy=True)
                gram = st.arrays[f"gram_{name.lower()}"].astype(dt, copy=True)
                r = op._s.shape[0]
                if w1.ndim != 2 or w1.shape[1] != r or k.shape != (r, r) or gram.shape != (r, r):
                    raise StateFormatError(f"state arrays of {name} do not match rank {r}")
                side = _Side(w1, gram)
                side.k = k
                side.cond = float(st.meta.get(f"cond_{name.lower()}", 1.0))
                sides.append(side)
            op._sides = sides
        op.method_used_ = str(st.meta.get("method_used", ""))
        op.n_updates_ = int(st.meta.get("n_updates", 0))
        op.n_resets_ = int(st.meta.get("n_resets", 0))
        op.n_reorthogonalizations_ = int(st.meta.get("n_reorthogonalizations", 0))
        op.n_sparse_updates_ = int(st.meta.get("n_sparse_updates", 0))
        if "rng" in st.meta:
            op._rng = _rng_from_json(st.meta["rng"])
        return op

    @classmethod
    def conformance_spec(cls) -> ConformanceSpec:
        # 12 columns and rank 12: the stream never needs truncation, so the
        # result is the exact SVD whatever the batch cuts (split/merge exact up
        # to rounding). Sparse rows with ~3 nonzeros make small batches take
        # the sparse (z-space) path and large ones the dense path.
        n_cols = 12

        def make(seed: int = 0, dtype: str = "float64", device: str = "cpu") -> IncrementalSVD:
            return cls(n_cols, method="deng", seed=seed, dtype=dtype, device=device)

        def stream(rng: np.random.Generator, dtype: np.dtype, n_rows: int) -> Any:
            mask = rng.random((n_rows, n_cols)) < 0.25
            vals = rng.standard_normal((n_rows, n_cols)) * np.linspace(3.0, 0.5, n_cols)
            return sp.csr_array(np.where(mask, vals, 0.0).astype(dtype))

        def feed(op: Operator, chunk: Any) -> None:
            assert isinstance(op, IncrementalSVD)
            op.append_rows(chunk)

        def probe(op: Operator) -> np.ndarray:
            assert isinstance(op, IncrementalSVD)
            s = np.zeros(op.rank)
            s[: op._s.shape[0]] = op._s
            recon = (op.U * op._s) @ op.V.T
            return np.concatenate([s, recon.ravel()]).astype(np.float64)

        def bad_inputs(rng: np.random.Generator, dtype: np.dtype) -> list[tuple[str, Any]]:
            good = rng.standard_normal((4, n_cols)).astype(dtype)
            nan = good.copy()
            nan[2, 1] = np.nan
            bad_idx = sp.csr_array(good)
            bad_idx.indices[3] = n_cols + 5
            return [
                ("wrong width", rng.standard_normal((3, n_cols + 1))),
                ("NaN", nan),
                ("Inf", np.full((1, n_cols), np.inf)),
                ("3-D", np.zeros((2, 2, n_cols))),
                ("strings", np.array([["a"] * n_cols])),
                ("sparse index out of range", bad_idx),
            ]

        return ConformanceSpec(
            make=make,
            stream=stream,
            feed=feed,
            probe=probe,
            bad_inputs=bad_inputs,
            split_tolerance=1e-9,
            growing_state=frozenset({"U1"}),
            backends=("cpu", "torch"),
            backend_rtol=1e-9,
            float32_rtol=1e-4,
            mergeable=True,
        )


def _rng_to_json(rng: np.random.Generator) -> dict[str, Any]:
    st = rng.bit_generator.state
    inner = st["state"]
    return {
        "bit_generator": st["bit_generator"],
        "state": str(inner["state"]),
        "inc": str(inner["inc"]),
        "has_uint32": int(st["has_uint32"]),
        "uinteger": int(st["uinteger"]),
    }


def _rng_from_json(meta: Mapping[str, Any]) -> np.random.Generator:
    if meta.get("bit_generator") != "PCG64":
        raise StateFormatError(f"unsupported bit generator {meta.get('bit_generator')!r}")
    bg = np.random.PCG64()
    bg.state = {
        "bit_generator": "PCG64",
        "state": {"state": int(meta["state"]), "inc": int(meta["inc"])},
        "has_uint32": int(meta["has_uint32"]),
        "uinteger": int(meta["uinteger"]),
    }
    return np.random.Generator(bg)
