"""Dynamic maintenance of the Kronecker projection ``P = Bᵀ(BBᵀ)⁻¹B``.

``B = A(W⊗I)`` or ``B = A(W^½⊗W^½)``, after Song, Yang, Yang & Zhang (ICML 2023);
see :class:`KroneckerProjection`.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import scipy.linalg.blas as _blas
import scipy.linalg.lapack as _lapack

from streamfact.kernels.backend import resolve_backend, to_numpy
from streamfact.kernels.kronecker_products import (
    FORMS,
    apply_weight,
    coordinates_of,
    general_update_columns,
    pack_symmetric,
    packed_positions,
    pair_multiplicity,
    restart_cost,
    rotate,
    should_restart,
    unpack_symmetric,
    unrotate,
    woodbury_step_cost,
)
from streamfact.operators.base import (
    ConformanceSpec,
    InvalidInputError,
    Operator,
    OperatorState,
    StateFormatError,
    as_state,
    check_state_class,
)
from streamfact.operators.validation import check_dtype, check_matrix

__all__ = ["KroneckerProjection", "SketchPool", "SketchSpec"]

_AGGREGATES = ("private_median", "median", "first")


@dataclass(frozen=True)
class SketchSpec:
    """Configuration of the sketch pool behind ``project_coordinates``.

    Parameters
    ----------
    rows:
        Rows ``b`` of each Gaussian sketch; one answer has standard error about
        ``√(2/b)`` relative (kronecker.md §7).
    horizon:
        ``T``, the number of coordinate answers one pool serves; after that a
        fresh pool is drawn (the privacy budget is spent).
    pool:
        Number of independent sketches; ``None`` means ``⌈√T⌉`` (Beimel et al.).
    dp_epsilon:
        Privacy parameter of each private-median answer (exponential mechanism).
    aggregate:
        ``"private_median"`` (robust mode), ``"median"`` (plain median, no
        privacy) or ``"first"`` (always the first sketch: the non-robust control).
    """

    rows: int = 32
    horizon: int = 1024
    pool: int | None = None
    dp_epsilon: float = 1.0
    aggregate: str = "private_median"

    def __post_init__(self) -> None:
        if int(self.rows) < 1 or int(self.horizon) < 1:
            raise ValueError("SketchSpec rows and horizon must be positive")
        if self.pool is not None and int(self.pool) < 1:
            raise ValueError("SketchSpec pool must be positive")
        if not self.dp_epsilon > 0:
            raise ValueError("SketchSpec dp_epsilon must be positive")
        if self.aggregate not in _AGGREGATES:
            raise ValueError(f"SketchSpec aggregate must be one of {_AGGREGATES}")

    @property
    def pool_size(self) -> int:
        """``⌈√T⌉`` unless given."""
        return int(self.pool) if self.pool is not None else math.ceil(math.sqrt(self.horizon))

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> SketchSpec:
        return cls(**dict(d))


class SketchPool:
    """A pool of independent Gaussian sketches answered through a private median.

    Each member ``R_j`` is ``b×N`` with i.i.d. ``N(0, 1/b)`` entries, so
    ``⟨R_j u, R_j v⟩`` is an unbiased estimate of ``⟨u, v⟩`` with standard
    deviation ``√((‖u‖²‖v‖² + ⟨u,v⟩²)/b)``. A query is answered from all ``s``
    members by an exponential-mechanism median in the spirit of Beimel et al.
    (STOC 2022): the gaps between consecutive sorted estimates (clipped to
    ``[lo, hi]``) are weighted by ``length · exp(−ε·|rank − s/2| / 2)``, one gap
    is drawn and a point is drawn uniformly in it. The two unbounded outer gaps
    (below the smallest and above the largest estimate) are left out: with
    ``s ≈ √T`` members the range-bounded mechanism picks them too often; the
    price is that the output range depends on the extreme estimates, so this is
    a randomised median, not a certified (ε, δ)-DP one (the paper's exact
    mechanism and constants are unverified, kronecker.md §12). After
    ``horizon`` answers the pool is redrawn. Members are
    regenerated from ``(pool_seed, generation, j)`` and never stored in state.

    Parameters
    ----------
    spec:
        The :class:`SketchSpec`.
    dim:
        Ambient dimension ``N``.
    rng:
        The owner's ``numpy.random.Generator`` (draws pool seeds and the
        mechanism's randomness).
    """

    def __init__(self, spec: SketchSpec, dim: int, rng: np.random.Generator) -> None:
        self.spec = spec
        self.dim = int(dim)
        self.rng = rng
        self.pool_seed = int(rng.integers(0, 2**62))
        self.generation = 0
        self.answered = 0
        self._cache: np.ndarray | None = None

    @property
    def size(self) -> int:
        return 1 if self.spec.aggregate == "first" else self.spec.pool_size

    def sketches(self) -> np.ndarray:
        """The stacked members, ``(s·b) × N``."""
        if self._cache is None:
            b, s = int(self.spec.rows), self.size
            seq = np.random.SeedSequence([self.pool_seed, self.generation])
            mats = [
                np.random.default_rng(child).standard_normal((b, self.dim)) / math.sqrt(b)
                for child in seq.spawn(s)
            ]
            self._cache = np.concatenate(mats, axis=0)
        return self._cache

    def estimates(self, U: np.ndarray, V: np.ndarray) -> np.ndarray:
        """Per-member estimates ``⟨R_j u_i, R_j v_i⟩``, shape ``(s, q)`` for U, V of q×N."""
        R = self.sketches()
        s, b = self.size, int(self.spec.rows)
        RU = (R @ U.T).reshape(s, b, -1)
        RV = RU if V is U else (R @ V.T).reshape(s, b, -1)
        return np.einsum("sbq,sbq->sq", RU, RV)

    def answer(self, U: np.ndarray, V: np.ndarray, lo: np.ndarray, hi: np.ndarray) -> np.ndarray:
        """Aggregated answers for the q pairs (rows of U and V), accounting the budget."""
        q = U.shape[0]
        if self.answered + q > int(self.spec.horizon):
            self.generation += 1
            self.answered = 0
            self._cache = None
        est = self.estimates(U, V)
        self.answered += q
        if self.spec.aggregate == "first":
            return est[0]
        if self.spec.aggregate == "median":
            return np.median(est, axis=0)
        return self._private_median(est, lo, hi)

    def _private_median(self, est: np.ndarray, lo: np.ndarray, hi: np.ndarray) -> np.ndarray:
        s, q = est.shape
        vals = np.sort(np.clip(est, lo[None, :], hi[None, :]), axis=0)
        if s == 1:
            return vals[0]
        length = np.diff(vals, axis=0)  # (s-1, q): gap k has k+1 estimates below it
        score = -np.abs(np.arange(1, s) - s / 2.0)
        eps = float(self.spec.dp_epsilon)
        logw = np.log(np.maximum(length, 1e-300)) + 0.5 * eps * score[:, None]
        logw[length <= 0] = -np.inf
        top = logw.max(axis=0, keepdims=True)
        tied = ~np.isfinite(top[0])  # all estimates equal
        logw[:, tied] = 0.0
        w = np.exp(logw - np.where(np.isfinite(top), top, 0.0))
        cdf = np.cumsum(w, axis=0)
        u = self.rng.random(q) * cdf[-1]
        k = np.minimum((cdf < u[None, :]).sum(axis=0), s - 2)
        cols = np.arange(q)
        return vals[k, cols] + self.rng.random(q) * length[k, cols]

    def state_meta(self) -> dict[str, Any]:
        return {
            "pool_seed": self.pool_seed,
            "generation": self.generation,
            "answered": self.answered,
        }

    def load_meta(self, meta: Mapping[str, Any]) -> None:
        self.pool_seed = int(meta["pool_seed"])
        self.generation = int(meta["generation"])
        self.answered = int(meta["answered"])
        self._cache = None


def _fold(M: np.ndarray, X: np.ndarray, s: np.ndarray) -> np.ndarray:
    """``M += X diag(s) Xᵀ`` on the lower triangle of the F-ordered ``M``, in place.

    Two symmetric rank-k products (``dsyrk``), one for the positive and one for the
    negative weights, so only ``m²k`` flops and no m×m temporary.
    """
    XT = X.T  # row gathers of an F-ordered X are contiguous
    for sign in (1.0, -1.0):
        sel = s * sign > 0
        if sel.any():
            YT = XT[sel]
            YT *= np.sqrt(np.abs(s[sel]))[:, None]
            M = _blas.dsyrk(sign, YT.T, beta=1.0, c=M, trans=0, lower=1, overwrite_c=1)
    return M


def _symmetric_from_lower(M: np.ndarray) -> np.ndarray:
    return np.tril(M) + np.tril(M, -1).T


class _Capacitance:
    """Factor of the Woodbury capacitance ``C = Σ + A G A`` (kronecker.md §4, symmetric form).

    With ``s = A Σ A`` (``A = diag(√|s|)``, ``Σ = diag(±1)``) and ``V = L⁻¹X``,
    ``M̃ + X diag(s) Xᵀ = L (I + VAΣAVᵀ) Lᵀ`` and, since ``Σ⁻¹ = Σ``,
    ``(I + VAΣAVᵀ)⁻¹ = I − VA C⁻¹ AVᵀ``. ``s`` is never inverted, so zero or
    negative weights are fine. ``C`` is SPD when all weights are ≥ 0 (Cholesky),
    symmetric indefinite otherwise (Bunch–Kaufman ``LDLᵀ``); ``j³/3`` either way.
    """

    def __init__(self, G: np.ndarray, s: np.ndarray) -> None:
        j = s.size
        self.a = np.sqrt(np.abs(s))
        sigma = np.where(s < 0, -1.0, 1.0)
        C = np.asfortranarray(G * np.outer(self.a, self.a))
        C[np.diag_indices(j)] += sigma
        anorm = float(np.abs(C).sum(axis=0).max())
        eps = np.finfo(np.float64).eps
        self.spd = bool((s >= 0).all())
        if self.spd:
            F, info = _lapack.dpotrf(C, lower=1, clean=0)
            if info == 0:
                rcond, _ = _lapack.dpocon(F, anorm, uplo="L")
                self.F, self.piv = F, np.zeros(0, dtype=np.int32)
            else:
                rcond = 0.0
        else:
            F, piv, info = _lapack.dsytrf(C, lower=1, lwork=max(64 * j, 1))
            rcond = 0.0
            if info == 0:
                rcond, _ = _lapack.dsycon(F, piv, anorm, lower=1)
            self.F, self.piv = F, piv
        if not rcond > eps * max(j, 1):
            raise InvalidInputError("this update makes BBᵀ singular (or numerically so)")

    def solve(self, t: np.ndarray) -> np.ndarray:
        if self.spd:
            x, _ = _lapack.dpotrs(self.F, t, lower=1)
        else:
            x, _ = _lapack.dsytrs(self.F, self.piv, t, lower=1)
        return np.asarray(x)


def _cholesky(M: np.ndarray) -> np.ndarray:
    """Lower Cholesky factor (F-ordered, upper triangle not zeroed) of the F-ordered ``M``.

    Refuses ``M`` whose pivots fall to round-off level relative to its diagonal
    (``min L_ii²/M_ii ≤ 8·m·eps``: BBᵀ singular or numerically so).
    """
    m = M.shape[0]
    # clean=0: the upper triangle keeps M's values (zeroing it costs a third of
    # the factorisation here); every user of L reads the lower triangle only.
    L, info = _lapack.dpotrf(M, lower=1, clean=0)
    if info != 0:
        raise InvalidInputError("this update makes BBᵀ singular")
    d = np.diag(M)
    if not (d > 0).all() or (np.diag(L) ** 2 / d).min() <= 8 * m * np.finfo(np.float64).eps:
        raise InvalidInputError("this update makes BBᵀ singular (or numerically so)")
    return np.asarray(L)


class KroneckerProjection(Operator):
    """Dynamic ``P h = Bᵀ(BBᵀ)⁻¹B h`` for ``B = A(W⊗I)`` or ``B = A(W^½⊗W^½)``.

    A practical form of the dynamic Kronecker projection maintenance of Song,
    Yang, Yang & Zhang (ICML 2023), the Schur-complement projection of
    interior-point methods for semidefinite programs. ``A`` is ``m×n²`` with rows
    ``vec(A_i)`` (row-major, as ``np.kron``); ``W`` is ``n×n`` PSD and changes by
    low-rank steps. ``P`` (``n²×n²``) is never formed.

    **Fixed-eigenbasis reduction** (kronecker.md §4). ``W = Q diag(λ) Qᵀ`` is
    decomposed once and the constraints rotated once, ``Ã_i = QᵀA_iQ`` ("ww") or
    ``QᵀA_i`` ("wi"), so ``M = BBᵀ = Ã diag(c) Ãᵀ`` with coordinate weights
    ``c_(a,b) = λ_aλ_b`` ("ww") or ``λ_a²`` ("wi"). A query rotates ``h``, applies
    ``√c``, ``Ã``, ``M⁻¹``, ``Ãᵀ``, ``√c`` and rotates back (§3), in
    ``O(m n² + m² + n³)``.

    **Symmetric constraints.** When every ``A_i`` is symmetric (the SDP case;
    detected at construction) both forms rotate on both sides, ``Â_i = QᵀA_iQ``,
    whose columns (a, b) and (b, a) are equal, and work on the ``n(n+1)/2``
    unordered pairs: ``M = Σ_{a≤b} w_ab Â_ab Â_abᵀ`` with
    ``w_ab = mult·λ_aλ_b`` ("ww") or ``mult·(λ_a² + λ_b²)/2`` ("wi", from
    ``tr(A_iW²A_j) = tr(Â_iΛ²Â_j)``), ``mult = 2`` off the diagonal. Changing r
    eigenvalues then changes ``k = rn − r(r−1)/2`` pair weights instead of
    ``2rn − r²`` ("ww"), and ``Â`` (stored once, ``n(n+1)/2 × m``) halves the
    memory traffic of queries and the flops of a recomputation. Otherwise the
    coordinates are the ``n²`` entries of ``Ã``.

    **Updates as a factored Woodbury correction.** The state is the Cholesky
    factor ``L`` of a base ``M̃`` plus accumulated weighted columns,
    ``M = M̃ + X diag(s) Xᵀ`` (``X`` m×j gathers columns of ``Â``/``Ã``,
    ``s = Δw``; a coordinate changed twice keeps one column). With
    ``V = L⁻¹X`` (one triangular solve per new column block),
    ``G = VᵀV`` and ``s = AΣA`` (``A = diag(√|s|)``, ``Σ = diag(±1)``),
    queries use the symmetric form that never inverts ``s`` (§4)::

        M⁻¹ = L⁻ᵀ (I − VA C⁻¹ AVᵀ) L⁻¹,     C = Σ + A G A,

    so weight changes may be negative or zero; ``C`` is factored by Cholesky
    (all ``s ≥ 0``) or Bunch–Kaufman, ``j³/3``. A general ``ΔW = U C Uᵀ``
    appends the §5 factors ``[Ã(Ũ⊗I), Ã(I⊗Ũ)]``, ``blkdiag(C⊗Ŵ', Ŵ⊗C)`` ("ww")
    or ``Ã(V⊗I)``, ``S_V⊗I`` ("wi"), ``Ũ = QᵀU``, diagonalised through their
    Kronecker factors (symmetric ``A_i`` merge the two "ww" blocks into
    ``Â(Ũ⊗I)``, ``C⊗(Ŵ + Ŵ')``: rank rn).

    **Restarts** fold the columns into ``M̃`` (two ``dsyrk``, ``m²j``) and
    refactor it by Cholesky (``m³/3``; never an explicit inverse). The rule is a
    renewal rule: restart when the modelled cost of the next append
    (:func:`~streamfact.kernels.kronecker_products.woodbury_step_cost`) exceeds
    the mean cost per update of the current cycle (the restart plus the appends
    since), or when the rank would pass ``restart_rank``. Every
    ``refresh_every`` restarts ``M̃`` is recomputed from scratch (``O(m²n²)``)
    to bound round-off drift (§8.1).

    **Lazy mode** (§6, CLS19-style): an eigenvalue is pushed only when
    ``|log(λ/λ̃)|`` exceeds :attr:`push_threshold` (``epsilon`` for "ww",
    ``epsilon/2`` for "wi", whose B-row weights move twice as much per unit
    drift); queries use the synced ``λ̃`` everywhere, so the answer is the exact
    projection for ``λ̃``, measured within ``epsilon/2`` of ``P h`` for both
    forms. Once ``W`` leaves the fixed eigenbasis (a non-diagonal
    ``update_weight``) every change is pushed.

    **Sketched coordinates** (§6–7): ``project_coordinates(h, idx)`` answers
    ``(P h)_i ≈ ⟨R P e_i, R P h⟩`` from a pool of ``⌈√T⌉`` independent sketches
    through a differentially private median (:class:`SketchPool`), which keeps
    answers accurate when queries depend on earlier answers. In this practical
    version the sketches are applied to exactly computed vectors, so the pool
    buys robustness of a randomised answer, not speed.

    Parameters
    ----------
    A:
        ``m×n²`` constraint matrix (rows ``vec(A_i)``).
    W:
        ``n×n`` symmetric PSD weight; ``BBᵀ`` must be nonsingular.
    form:
        ``"w_kron_i"`` (``B = A(W⊗I)``) or ``"sqrt_w_kron_sqrt_w"`` (``B = A(W^½⊗W^½)``).
    mode:
        ``"exact"`` (push every change) or ``"lazy"``.
    epsilon:
        Lazy accuracy: eigenvalues are pushed when ``|log(λ/λ̃)|`` exceeds
        ``epsilon`` ("ww") or ``epsilon/2`` ("wi"), see :attr:`push_threshold`.
    sketch:
        :class:`SketchSpec` enabling ``project_coordinates``; ``None`` disables it.
    seed:
        Seed of the operator's ``numpy.random.Generator`` (sketch pool only).
    restart_rank:
        Cap on the accumulated Woodbury rank; ``None`` means ``m``.
    cost_ratio:
        Measured time per Cholesky flop over time per triangular-solve flop
        (:func:`~streamfact.kernels.kronecker_products.measure_cost_ratio`); it
        scales the modelled restart cost ``m³/3`` that opens each restart cycle
        (the fold ``M̃ += X diag(s) Xᵀ`` is owed either way). 1.0 is the pure flop
        model.
    refresh_every:
        Recompute ``M̃`` from scratch every this many restarts.
    dtype:
        ``"float64"`` or ``"float32"``: storage of ``Ã`` and the dense ``n²``-side
        products; the ``m×m`` factor and Woodbury state stay float64 (§8.1).
    device:
        ``"cpu"``, ``"torch"``, ``"cuda"`` or ``"auto"``: where ``Ã`` lives and the
        rotations, ``Ã z``, ``Ãᵀ y`` and Gram products run.

    Attributes
    ----------
    counters : dict
        ``steps``, ``restarts``, ``refreshes``, ``pushed`` (eigenvalues pushed),
        ``rank`` (accumulated Woodbury rank), ``queries``.
    eigenvalues : ndarray (n,)
        Current eigenvalues λ in the fixed basis (diagonal phase).
    W_current : ndarray (n, n)
        The current weight ``W``.

    Notes
    -----
    Memory ``O(m n² + m² + m·restart_rank)``: ``Â`` once as ``n(n+1)/2 × m``
    (symmetric ``A_i``; else ``Ã`` as ``n² × m``; a second copy only for float32
    or torch), ``M̃`` and ``L`` (m×m each), ``X`` and ``V`` (m×j). Time per step
    with k new columns and accumulated rank ``j``: ``O(m²k + mjk + (j+k)³)``; a
    restart ``O(m²j + m³)``; a full refresh ``O(m²n²)`` (plus ``O(mn³)`` when W
    has left the eigenbasis). Query ``O(m n² + m² + mj + n³)``. Construction
    ``O(m n³ + m²n² + m³)``. State layout (version 2): ``A``, ``W``, ``Q``, ``λ``,
    ``λ̃``, the base weights, ``M̃``, ``L`` and the accumulator ``X``, ``V``,
    ``s``, ``G``, ``cols`` padded to ``restart_rank``. Equations refer to the
    research notes (kronecker.md §3–§8); the paper's own theorems are not
    reproduced here.

    References
    ----------
    Z. Song, X. Yang, Y. Yang, L. Zhang. Sketching Meets Differential Privacy:
    Fast Algorithm for Dynamic Kronecker Projection Maintenance. ICML 2023.
    A. Beimel, H. Kaplan, Y. Mansour, K. Nissim, T. Saranurak, U. Stemmer.
    Dynamic Algorithms Against an Adaptive Adversary. STOC 2022.

    Examples
    --------
    >>> import numpy as np
    >>> from streamfact.operators.kronecker import KroneckerProjection
    >>> rng = np.random.default_rng(0)
    >>> n, m = 3, 4
    >>> A = np.stack([(a + a.T).ravel() for a in rng.standard_normal((m, n, n))])
    >>> W = np.diag([1.0, 2.0, 3.0])
    >>> op = KroneckerProjection(A, W, form="sqrt_w_kron_sqrt_w")
    >>> op.update_eigenvalues([0], [1.5])
    >>> Wh = np.diag(np.sqrt(op.eigenvalues))
    >>> B = A @ np.kron(Wh, Wh)
    >>> P = B.T @ np.linalg.solve(B @ B.T, B)
    >>> h = rng.standard_normal(n * n)
    >>> bool(np.allclose(op.project(h), P @ h, atol=1e-12))
    True
    """

    state_version = 2

    def __init__(
        self,
        A: Any,
        W: Any,
        *,
        form: str = "w_kron_i",
        mode: str = "exact",
        epsilon: float = 0.01,
        sketch: SketchSpec | None = None,
        seed: int = 0,
        restart_rank: int | None = None,
        cost_ratio: float = 1.0,
        refresh_every: int = 64,
        dtype: str = "float64",
        device: str = "cpu",
    ) -> None:
        if form not in FORMS:
            raise ValueError(f"form must be one of {FORMS}, got {form!r}")
        if mode not in ("exact", "lazy"):
            raise ValueError(f"mode must be 'exact' or 'lazy', got {mode!r}")
        if not (float(epsilon) >= 0 and math.isfinite(float(epsilon))):
            raise ValueError(f"epsilon must be a finite number >= 0, got {epsilon}")
        if sketch is not None and not isinstance(sketch, SketchSpec):
            raise ValueError("sketch must be a SketchSpec or None")
        if restart_rank is not None and int(restart_rank) < 1:
            raise ValueError("restart_rank must be positive")
        if not (float(cost_ratio) > 0 and math.isfinite(float(cost_ratio))):
            raise ValueError("cost_ratio must be a positive number")
        if int(refresh_every) < 1:
            raise ValueError("refresh_every must be positive")
        self.A = A
        self.W = W
        self.form = form
        self.mode = mode
        self.epsilon = float(epsilon)
        self.sketch = sketch
        self.seed = int(seed)
        self.restart_rank = None if restart_rank is None else int(restart_rank)
        self.cost_ratio = float(cost_ratio)
        self.refresh_every = int(refresh_every)
        self.dtype = check_dtype(dtype).name
        self.device = device
        self._backend = resolve_backend(device)

        W64 = np.asarray(to_numpy(W), dtype=np.float64)
        if W64.ndim != 2 or W64.shape[0] != W64.shape[1]:
            raise ValueError(f"W must be square, got shape {W64.shape}")
        n = W64.shape[0]
        A64 = np.asarray(to_numpy(A), dtype=np.float64)
        if A64.ndim != 2 or A64.shape[1] != n * n or A64.shape[0] < 1:
            raise ValueError(f"A must be m×n² = m×{n * n}, got shape {A64.shape}")
        if not (np.isfinite(A64).all() and np.isfinite(W64).all()):
            raise ValueError("A and W must be finite")
        scale = max(float(np.abs(W64).max()), 1e-300)
        if float(np.abs(W64 - W64.T).max()) > 1e-10 * scale:
            raise ValueError("W must be symmetric")
        lam, Q = np.linalg.eigh((W64 + W64.T) / 2)
        if lam.min() < -1e-10 * max(float(lam.max()), 1e-300):
            raise ValueError(f"W must be positive semidefinite (min eigenvalue {lam.min():.3g})")
        self._n, self._m = n, A64.shape[0]
        self._k_max = self.restart_rank or self._m
        self._setup(A64, Q, np.maximum(lam, 0.0))

    # -- construction helpers ---------------------------------------------------
    def _setup(self, A64: np.ndarray, Q: np.ndarray, lam: np.ndarray) -> None:
        n = self._n
        self._setup_constraints(A64, Q)
        self._lam_true = lam.astype(np.float64).copy()
        self._W_sync = np.diag(lam).astype(np.float64)
        self._W_base = self._W_sync.copy()
        self._sync_diag = True
        self._base_diag = True
        self._half: dict[str, Any] | None = None
        self._Mbase = self._gram(self._W_sync, True)
        try:
            self._L = _cholesky(self._Mbase)
        except InvalidInputError as exc:
            raise ValueError("BBᵀ is singular for this A and W") from exc
        self._clear_acc()
        self._new_cycle()
        self._steps = self._restarts = self._refreshes = self._pushed = self._queries = 0
        self._rng = np.random.default_rng(self.seed)
        self._pool = SketchPool(self.sketch, n * n, self._rng) if self.sketch is not None else None

    def _setup_constraints(self, A64: np.ndarray, Q: np.ndarray) -> None:
        """Rotate the constraints once; pack them when the "ww" form sees symmetric ``A_i``."""
        n, m = self._n, self._m
        be = self._backend
        self._Q = Q
        self._Qb = be.asarray(Q, self.dtype)
        A3 = A64.reshape(m, n, n)
        asym = np.abs(A3 - A3.transpose(0, 2, 1)).max(axis=(1, 2))
        scale = np.abs(A3).max(axis=(1, 2))
        self._sym = bool((asym <= 16 * np.finfo(np.float64).eps * scale).all())
        # Symmetric A_i: both forms use the two-sided rotation Â_i = QᵀA_iQ, packed.
        self._frame = "sqrt_w_kron_sqrt_w" if self._sym else self.form
        iu0, iu1, where = packed_positions(n)
        if self._sym:
            self._iu = (be.asarray(iu0, "int64"), be.asarray(iu1, "int64"))
            self._offdiag = be.asarray((iu0 != iu1).astype(np.float64), self.dtype)
        At3 = rotate(be.asarray(A3, self.dtype), self._Qb, self._frame)
        if self._sym:
            # Â_i is symmetric up to round-off; averaging the two triangles makes
            # columns (a, b) and (b, a) of Â equal, so they merge into one.
            Ac = (At3[..., iu0, iu1] + At3[..., iu1, iu0]) / 2
            self._unit_of = np.where(where >= 0, where, where.reshape(n, n).T.ravel())
            self._ua, self._ub = iu0, iu1
            self._mult = pair_multiplicity(iu0 * n + iu1, n)
        else:
            Ac = At3.reshape(m, n * n)
            self._unit_of = np.arange(n * n, dtype=np.int64)
            flat = np.arange(n * n, dtype=np.int64)
            self._ua, self._ub = flat // n, flat % n
            self._mult = np.ones(n * n)
        del At3
        # Column gathers of Ã become contiguous row gathers of Ãᵀ; on the numpy
        # float64 path the backend copy is a view of the same memory.
        self._AcT64 = np.ascontiguousarray(np.asarray(to_numpy(Ac), dtype=np.float64).T)
        if not be.is_torch and np.dtype(self.dtype) == np.float64:
            Ac = self._AcT64.T
        self._Ac = Ac

    def _full_At3(self, backend: bool) -> Any:
        """Rotated constraints as m×n×n (backend dtype, or float64 numpy); O(m n²) memory."""
        n, m = self._n, self._m
        if backend:
            src = self._Ac
        else:
            src = self._AcT64.T
        if self._sym:
            iu0, iu1 = self._iu if backend else (self._ua, self._ub)
            return unpack_symmetric(src, iu0, iu1, n)
        if backend:
            return src.reshape(m, n, n)
        return np.ascontiguousarray(src).reshape(m, n, n)

    def _clear_acc(self) -> None:
        self._j = 0
        self._Xb = np.zeros((self._m, 0), order="F")
        self._Vb = np.zeros((self._m, 0), order="F")
        self._G = np.zeros((0, 0))
        self._s = np.zeros(0)
        self._cols = np.zeros(0, dtype=np.int64)  # coordinate unit, or -1 for general columns
        self._cap: _Capacitance | None = None

    def _new_cycle(self) -> None:
        self._cycle_cost = restart_cost(self._m, self.cost_ratio)
        self._cycle_n = 1

    # -- dense products (backend) -------------------------------------------------
    def _weight_kwargs(self, W_sync: np.ndarray, diag: bool) -> dict[str, Any]:
        be = self._backend
        if diag:
            return {"lam": be.asarray(np.diag(W_sync).copy(), self.dtype)}
        if self.form == "sqrt_w_kron_sqrt_w":
            lam, V = np.linalg.eigh(W_sync)
            half = (V * np.sqrt(np.maximum(lam, 0.0))) @ V.T
            return {"half": be.asarray(half, self.dtype)}
        return {"full": be.asarray(W_sync, self.dtype)}

    def _gram(self, W_sync: np.ndarray, diag: bool) -> np.ndarray:
        """``M = B̃B̃ᵀ`` from scratch (rotated recomputation): O(m²n²), F-ordered.

        Packed ("ww", symmetric ``A_i``): ``M = Σ_{a≤b} mult·c_ab Ã_ab Ã_abᵀ``, half the flops.
        """
        be = self._backend
        if diag:
            w = self._unit_weight(np.diag(W_sync), np.arange(self._mult.size))
            Bc = self._Ac * be.asarray(np.sqrt(np.maximum(w, 0.0)), self.dtype)
        else:
            B3 = apply_weight(self._full_At3(True), self.form, **self._weight_kwargs(W_sync, False))
            if self._sym and self.form == "sqrt_w_kron_sqrt_w":
                iu0, iu1 = self._iu
                Bc = B3[..., iu0, iu1] * be.asarray(np.sqrt(self._mult), self.dtype)
            else:
                Bc = B3.reshape(self._m, self._n * self._n)
        M = np.asarray(to_numpy(Bc @ Bc.T), dtype=np.float64)
        return np.asfortranarray((M + M.T) / 2)

    def _weights(self) -> dict[str, Any]:
        if self._sync_diag:
            return self._weight_kwargs(self._W_sync, True)
        if self._half is None:
            self._half = self._weight_kwargs(self._W_sync, False)
        return self._half

    # -- Woodbury bookkeeping ------------------------------------------------------
    def _unit_weight(self, lam: np.ndarray, units: np.ndarray) -> np.ndarray:
        """Weight of coordinate units in ``M = Σ_u w_u Ã_u Ã_uᵀ``.

        "ww": ``mult·λ_aλ_b``. "wi": ``λ_a²`` in the one-sided frame; with symmetric
        ``A_i`` in the two-sided frame ``tr(A_iW²A_j) = Σ_ab λ_b² Â_iab Â_jab``, so the
        pair {a, b} weighs ``mult·(λ_a² + λ_b²)/2``.
        """
        a = self._ua[units]
        if self.form == "sqrt_w_kron_sqrt_w":
            return self._mult[units] * lam[a] * lam[self._ub[units]]
        if self._sym:
            return self._mult[units] * (lam[a] ** 2 + lam[self._ub[units]] ** 2) / 2
        return lam[a] ** 2

    def _cycle_mean(self) -> float:
        return self._cycle_cost / self._cycle_n

    def _apply(
        self,
        X_new: np.ndarray,
        s_new: np.ndarray,
        cols_new: np.ndarray,
        s_existing: np.ndarray,
        W_sync: np.ndarray,
        sync_diag: bool,
    ) -> None:
        """Add ``X_new diag(s_new) X_newᵀ`` (and the revised ``s_existing``) to M; commit.

        Everything is computed into locals first; state changes only at the end.
        """
        m, j, k = self._m, self._j, X_new.shape[1]
        if j + k == 0:  # nothing changes M (e.g. only zero weight changes)
            self._commit_weights(W_sync, sync_diag)
            return
        if should_restart(m, j, k, self._k_max, self.cost_ratio, self._cycle_mean()):
            self._restart(X_new, s_new, s_existing, W_sync, sync_diag)
            return
        V_new = np.zeros((m, 0), order="F")
        if k:
            V_new, info = _lapack.dtrtrs(self._L, np.asfortranarray(X_new), lower=1)
            if info != 0:
                raise InvalidInputError("Cholesky factor is singular")
        V_old = self._Vb[:, :j]
        G = np.empty((j + k, j + k))
        G[:j, :j] = self._G
        G12 = V_old.T @ V_new
        G[:j, j:] = G12
        G[j:, :j] = G12.T
        G22 = V_new.T @ V_new
        G[j:, j:] = (G22 + G22.T) / 2
        s = np.concatenate([s_existing, s_new])
        cap = _Capacitance(G, s)
        self._reserve(j + k)
        self._Xb[:, j : j + k] = X_new
        self._Vb[:, j : j + k] = V_new
        self._j = j + k
        self._G, self._s, self._cap = G, s, cap
        self._cols = np.concatenate([self._cols, cols_new])
        self._cycle_cost += woodbury_step_cost(m, j, k)
        self._cycle_n += 1
        self._commit_weights(W_sync, sync_diag)

    def _reserve(self, k: int) -> None:
        """Grow the F-ordered column buffers of X and V to hold ``k`` columns."""
        cap = self._Xb.shape[1]
        if k <= cap:
            return
        size = min(max(2 * cap, k, 64), max(self._k_max, k))
        for name in ("_Xb", "_Vb"):
            old = getattr(self, name)
            buf = np.zeros((self._m, size), order="F")
            buf[:, : self._j] = old[:, : self._j]
            setattr(self, name, buf)

    def _restart(
        self,
        X_new: np.ndarray,
        s_new: np.ndarray,
        s_existing: np.ndarray,
        W_sync: np.ndarray,
        sync_diag: bool,
    ) -> None:
        """Fold the correction into M̃ and refactor by Cholesky (or refresh from scratch)."""
        refresh = (self._restarts + 1) % self.refresh_every == 0
        if refresh:
            M = self._gram(W_sync, sync_diag)
        else:
            M = np.array(self._Mbase, order="F", copy=True)
            if self._j:
                M = _fold(M, self._Xb[:, : self._j], s_existing)
            if X_new.shape[1]:
                M = _fold(M, X_new, s_new)
        L = _cholesky(M)
        self._Mbase, self._L = M, L
        self._clear_acc()
        self._new_cycle()
        self._restarts += 1
        self._refreshes += int(refresh)
        self._commit_weights(W_sync, sync_diag)
        self._W_base = W_sync.copy()
        self._base_diag = sync_diag

    def _commit_weights(self, W_sync: np.ndarray, sync_diag: bool) -> None:
        self._W_sync = W_sync
        self._sync_diag = sync_diag
        self._half = None

    def _push_diag(self, lam_sync_new: np.ndarray, changed: np.ndarray) -> None:
        """Diagonal-weight Woodbury step for eigenvalues ``changed`` (§4)."""
        coords = coordinates_of(changed, self._n, self.form, symmetric=self._sym)
        units = self._unit_of[coords]
        lam_base = np.diag(self._W_base)
        dc = self._unit_weight(lam_sync_new, units) - self._unit_weight(lam_base, units)
        pos = np.full(self._mult.size, -1, dtype=np.int64)
        is_coord = self._cols >= 0
        pos[self._cols[is_coord]] = np.flatnonzero(is_coord)
        where = pos[units]
        fresh = where < 0
        s_existing = self._s.copy()
        s_existing[where[~fresh]] = dc[~fresh]
        # A fresh unit with no weight change (λ_b = 0) adds nothing to M.
        add = fresh & (dc != 0)
        cols_new = units[add]
        X_new = self._AcT64[cols_new].T
        self._apply(X_new, dc[add], cols_new, s_existing, np.diag(lam_sync_new), True)

    def _push_general(self, Ut: np.ndarray, C: np.ndarray) -> None:
        """General ``ΔŴ = Ũ C Ũᵀ`` in the rotated frame (§5), as weighted columns."""
        W_old = self._W_sync
        W_new = W_old + Ut @ C @ Ut.T
        W_new = (W_new + W_new.T) / 2
        X, s = general_update_columns(
            self._full_At3(False), Ut, C, W_old, W_new, self.form, symmetric=self._sym
        )
        keep = s != 0
        X, s = X[:, keep], s[keep]
        cols = -np.ones(X.shape[1], dtype=np.int64)
        self._apply(X, s, cols, self._s.copy(), W_new, False)

    # -- validation of update input ----------------------------------------------
    def _check_eigen_input(self, indices: Any, values: Any) -> tuple[np.ndarray, np.ndarray]:
        idx_raw = np.asarray(to_numpy(indices))
        val = np.asarray(to_numpy(values))
        if idx_raw.ndim != 1 or val.ndim != 1 or idx_raw.shape != val.shape:
            raise InvalidInputError(
                f"indices and values must be 1-D of equal length: {idx_raw.shape}, {val.shape}"
            )
        if not np.issubdtype(val.dtype, np.number) or np.iscomplexobj(val):
            raise InvalidInputError("values must be real numbers")
        if not np.issubdtype(idx_raw.dtype, np.number) or np.iscomplexobj(idx_raw):
            raise InvalidInputError("indices must be integers")
        idx_f = idx_raw.astype(np.float64)
        bad_idx = (
            ~np.isfinite(idx_f) | (idx_f != np.round(idx_f)) | (idx_f < 0) | (idx_f >= self._n)
        )
        if bad_idx.any():
            raise InvalidInputError(
                f"eigenvalue indices must be integers in [0, {self._n})",
                rows=np.flatnonzero(bad_idx),
            )
        val = val.astype(np.float64)
        bad_val = ~np.isfinite(val) | (val < 0)
        if bad_val.any():
            raise InvalidInputError(
                "eigenvalues must be finite and >= 0 (W is PSD)", rows=np.flatnonzero(bad_val)
            )
        return idx_f.astype(np.int64), val

    # -- updates -----------------------------------------------------------------------
    def update_eigenvalues(self, indices: Any, values: Any) -> None:
        """Set the eigenvalues at ``indices`` (in the basis of W at construction) to ``values``.

        Repeated indices: the last value wins. Exact mode pushes every changed
        eigenvalue; lazy mode only those with ``|log(λ/λ̃)| > epsilon``. Cost
        ``O(m²k + mjk + j³)`` with ``k = 2rn − r²`` ("ww") or ``rn`` ("wi").
        """
        idx, val = self._check_eigen_input(indices, values)
        if idx.size:
            # last occurrence wins
            _, first_rev = np.unique(idx[::-1], return_index=True)
            keep = idx.size - 1 - first_rev
            idx, val = idx[keep], val[keep]
        if not self._sync_diag or not self._base_diag:
            delta = val - np.diag(self._W_sync)[idx]
            nz = delta != 0
            if nz.any():
                Ut = np.eye(self._n)[:, idx[nz]]
                self._push_general(Ut, np.diag(delta[nz]))
            self._lam_true = np.diag(self._W_sync).copy()
            self._pushed += int(nz.sum())
            self._steps += 1
            return
        lam_true = self._lam_true.copy()
        lam_true[idx] = val
        lam_sync = np.diag(self._W_sync).copy()
        cand = idx[lam_true[idx] != lam_sync[idx]]
        if self.mode == "lazy" and cand.size:
            a, b = lam_true[cand], lam_sync[cand]
            both = (a > 0) & (b > 0)
            drift = np.full(cand.size, np.inf)
            drift[both] = np.abs(np.log(a[both] / b[both]))
            cand = cand[drift > self.push_threshold]
        if cand.size:
            lam_new = lam_sync.copy()
            lam_new[cand] = lam_true[cand]
            self._push_diag(lam_new, np.sort(cand))
        self._lam_true = lam_true
        self._pushed += int(cand.size)
        self._steps += 1

    def update_weight(self, U: Any, C: Any) -> None:
        """General symmetric low-rank change ``W ← W + U C Uᵀ`` (U n×r, C r×r symmetric).

        When ``QᵀU C UᵀQ`` is diagonal (U spans eigenvectors of the fixed basis)
        this is an eigenvalue update; otherwise the §5 Woodbury factors of rank
        ``2rn`` are appended and W leaves the fixed eigenbasis for good (the
        "ww" query then refreshes ``Ŵ^½`` by an O(n³) eigendecomposition).
        """
        U64 = np.asarray(to_numpy(U), dtype=np.float64)
        if U64.ndim == 1:
            U64 = U64[:, None]
        C64 = np.atleast_2d(np.asarray(to_numpy(C), dtype=np.float64))
        if U64.ndim != 2 or U64.shape[0] != self._n:
            raise InvalidInputError(f"U must be n×r with n={self._n}, got {U64.shape}")
        r = U64.shape[1]
        if C64.shape != (r, r):
            raise InvalidInputError(f"C must be {r}×{r}, got {C64.shape}")
        if not (np.isfinite(U64).all() and np.isfinite(C64).all()):
            raise InvalidInputError("U and C must be finite")
        cscale = max(float(np.abs(C64).max()), 1e-300)
        if float(np.abs(C64 - C64.T).max()) > 1e-12 * cscale:
            raise InvalidInputError("C must be symmetric")
        C64 = (C64 + C64.T) / 2
        Ut = self._Q.T @ U64
        dW = Ut @ C64 @ Ut.T
        off = dW - np.diag(np.diag(dW))
        dscale = max(float(np.abs(dW).max()), 1e-300)
        in_basis = self._sync_diag and self._base_diag
        if in_basis and float(np.abs(off).max()) <= 1e-13 * dscale:
            lam_target = self._lam_true + np.diag(dW)
            if lam_target.min() < -1e-12 * max(float(np.abs(lam_target).max()), 1e-300):
                raise InvalidInputError("update makes W indefinite")
            changed = np.flatnonzero(np.diag(dW) != 0)
            self.update_eigenvalues(changed, np.maximum(lam_target[changed], 0.0))
            return
        W_true = np.diag(self._lam_true) if self._sync_diag else self._W_sync
        target = W_true + dW
        ev = np.linalg.eigvalsh((target + target.T) / 2)
        if ev.min() < -1e-10 * max(float(np.abs(ev).max()), 1e-300):
            raise InvalidInputError("update makes W indefinite")
        if self._sync_diag:
            pending = np.flatnonzero(self._lam_true != np.diag(self._W_sync))
            if pending.size:
                # lazy mode: sync every pending eigenvalue before leaving the basis
                self._push_diag(self._lam_true.copy(), pending)
                self._pushed += int(pending.size)
        self._push_general(Ut, C64)
        self._lam_true = np.diag(self._W_sync).copy()
        self._steps += 1

    # -- queries ---------------------------------------------------------------------
    def _check_h(self, h: Any) -> tuple[np.ndarray, bool]:
        arr = to_numpy(h)
        single = arr.ndim == 1
        H = check_matrix(
            arr, n_cols=self._n * self._n, dtype=np.dtype(self.dtype), name="h", allow_sparse=False
        )
        return np.asarray(H), single

    def _solve(self, b: np.ndarray) -> np.ndarray:
        """``M⁻¹ b`` through the base Cholesky factor and the Woodbury correction.

        ``M⁻¹ = L⁻ᵀ (I − VA C⁻¹ AVᵀ) L⁻¹``: two triangular solves plus ``4mj`` per column.
        """
        v, _ = _lapack.dtrtrs(self._L, b, lower=1)
        if self._j:
            assert self._cap is not None
            a = self._cap.a[:, None]
            V = self._Vb[:, : self._j]
            u = self._cap.solve(a * (V.T @ v))
            v = v - V @ (a * u)
        x, _ = _lapack.dtrtrs(self._L, v, lower=1, trans=1)
        return np.asarray(x)

    def _project_rows(self, H: np.ndarray) -> np.ndarray:
        n, q = self._n, H.shape[0]
        be = self._backend
        Hb = be.asarray(H.reshape(q, n, n), self.dtype)
        wk = self._weights()
        Z3 = apply_weight(rotate(Hb, self._Qb, self._frame), self.form, **wk)
        if self._sym:
            Zc = pack_symmetric(Z3, *self._iu, self._offdiag)
        else:
            Zc = Z3.reshape(q, n * n)
        rhs = np.asarray(to_numpy(self._Ac @ Zc.T), dtype=np.float64)
        y = self._solve(rhs)
        backc = (self._Ac.T @ be.asarray(y, self.dtype)).T
        if self._sym:
            back = unpack_symmetric(backc, *self._iu, n)
        else:
            back = backc.reshape(q, n, n)
        out = unrotate(apply_weight(back, self.form, **wk), self._Qb, self._frame)
        return np.asarray(to_numpy(out.reshape(q, n * n)), dtype=self.dtype)

    def project(self, h: Any) -> np.ndarray:
        """``P h`` for one vector (n²,) or a batch (q×n²), row-major vec. O(q(mn² + n³) + m²q)."""
        H, single = self._check_h(h)
        out = self._project_rows(H)
        self._queries += H.shape[0]
        return out[0] if single else out

    def project_coordinates(self, h: Any, idx: Any) -> np.ndarray:
        """Sketched ``(P h)_i`` for coordinates ``idx`` via the private-median sketch pool.

        Each answer is ``⟨R_j P e_i, R_j P h⟩`` aggregated over the pool
        (:class:`SketchPool`); accurate to about ``√(2/b)·‖P e_i‖‖P h‖`` even when
        ``h`` depends on earlier answers. Needs ``sketch=SketchSpec(...)``.
        """
        if self._pool is None:
            raise ValueError("project_coordinates needs sketch=SketchSpec(...)")
        H, _ = self._check_h(h)
        if H.shape[0] != 1:
            raise InvalidInputError("project_coordinates takes one vector h")
        ids = np.asarray(to_numpy(idx))
        if ids.ndim != 1 or not np.issubdtype(ids.dtype, np.integer):
            raise InvalidInputError("idx must be a 1-D integer array")
        N = self._n * self._n
        if ids.size and (ids.min() < 0 or ids.max() >= N):
            raise InvalidInputError(f"idx out of range [0, {N})")
        E = np.zeros((ids.size, N), dtype=self.dtype)
        E[np.arange(ids.size), ids] = 1.0
        vecs = self._project_rows(np.concatenate([H, E], axis=0)).astype(np.float64)
        ph, pe = vecs[0], vecs[1:]
        bound = np.linalg.norm(pe, axis=1) * np.linalg.norm(ph)
        V = np.broadcast_to(ph, pe.shape)
        ans = self._pool.answer(pe, np.ascontiguousarray(V), -bound, bound)
        self._queries += 1
        return ans.astype(self.dtype)

    # -- read-only views ------------------------------------------------------------
    @property
    def n(self) -> int:
        return self._n

    @property
    def m(self) -> int:
        return self._m

    @property
    def eigenvalues(self) -> np.ndarray:
        """Current eigenvalues λ in the fixed basis (true values, not the lazy λ̃)."""
        return self._lam_true.copy()

    @property
    def synced_eigenvalues(self) -> np.ndarray:
        """λ̃: the eigenvalues the structure currently answers for."""
        return np.diag(self._W_sync).copy()

    @property
    def basis(self) -> np.ndarray:
        return self._Q.copy()

    @property
    def W_current(self) -> np.ndarray:
        """Current W (lazy mode: with the true, not the synced, eigenvalues)."""
        Wr = np.diag(self._lam_true) if self._sync_diag else self._W_sync
        return self._Q @ Wr @ self._Q.T

    @property
    def push_threshold(self) -> float:
        """Lazy push threshold on ``|log(λ/λ̃)|``: ``epsilon`` ("ww"), ``epsilon/2`` ("wi").

        In "ww" a drift δ of λ_a moves the B-row weights ``√(λ_aλ_b)`` by δ/2
        (δ only for b = a); in "wi" it moves the whole block ``λ_a`` by δ. Halving
        the threshold for "wi" gives both forms the same weight drift, and the
        measured error ≤ ε/2 for both (kronecker.md §6, §10).
        """
        if self.form == "w_kron_i":
            return self.epsilon / 2
        return self.epsilon

    @property
    def restart_threshold(self) -> int:
        return int(self._k_max)

    @property
    def counters(self) -> dict[str, int]:
        return {
            "steps": self._steps,
            "restarts": self._restarts,
            "refreshes": self._refreshes,
            "pushed": self._pushed,
            "rank": int(self._j),
            "queries": self._queries,
        }

    # -- state -----------------------------------------------------------------------------
    _ACC = ("X", "V", "s", "G", "cols")

    def state(self) -> OperatorState:
        j, K = self._j, self._k_max
        m = self._m

        def pad(a: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
            out = np.zeros(shape, dtype=a.dtype)
            out[tuple(slice(0, d) for d in a.shape)] = a
            return out

        cols = -np.ones(K, dtype=np.int64)
        cols[:j] = self._cols
        arrays = {
            "A": np.asarray(to_numpy(self.A), dtype=np.float64).copy(),
            "W": np.asarray(to_numpy(self.W), dtype=np.float64).copy(),
            "Q": self._Q.copy(),
            "lam_true": self._lam_true.copy(),
            "W_sync": self._W_sync.copy(),
            "W_base": self._W_base.copy(),
            "M_base": np.ascontiguousarray(_symmetric_from_lower(self._Mbase)),
            "L": np.ascontiguousarray(np.tril(self._L)),
            "X": pad(self._Xb[:, :j], (m, K)),
            "V": pad(self._Vb[:, :j], (m, K)),
            "s": pad(self._s, (K,)),
            "G": pad(self._G, (K, K)),
            "cols": cols,
        }
        meta: dict[str, Any] = {
            **self._state_header(),
            "sketch": None if self.sketch is None else self.sketch.to_dict(),
            "rank": j,
            "k_max": int(K),
            "sync_diag": bool(self._sync_diag),
            "base_diag": bool(self._base_diag),
            "cycle": [float(self._cycle_cost), int(self._cycle_n)],
            "counters": {
                "steps": self._steps,
                "restarts": self._restarts,
                "refreshes": self._refreshes,
                "pushed": self._pushed,
                "queries": self._queries,
            },
            "rng": self._rng.bit_generator.state,
            "pool": None if self._pool is None else self._pool.state_meta(),
        }
        return OperatorState(arrays=arrays, meta=meta)

    @classmethod
    def from_state(cls, state: OperatorState | Mapping[str, Any]) -> KroneckerProjection:
        st = as_state(state)
        check_state_class(st, cls)
        if int(st.meta.get("state_version", 1)) < cls.state_version:
            raise StateFormatError(
                "state layout version 1 (Woodbury Z/S form) is no longer read; rebuild the "
                "operator from A and the current W"
            )
        a = st.arrays
        missing = {"A", "W", "Q", "lam_true", "W_sync", "W_base", "M_base", "L", *cls._ACC} - set(a)
        if missing:
            raise StateFormatError(f"state lacks arrays {sorted(missing)}")
        meta = st.meta
        sketch = None if meta.get("sketch") is None else SketchSpec.from_dict(meta["sketch"])
        op = cls.__new__(cls)
        params = dict(meta["params"])
        Operator.__init__(op)
        # Rebuild parameters and the rotated constraints from A and the stored basis.
        op.A, op.W, op.sketch = a["A"].copy(), a["W"].copy(), sketch
        op.form, op.mode = params["form"], params["mode"]
        op.epsilon, op.seed = float(params["epsilon"]), int(params["seed"])
        op.restart_rank = params.get("restart_rank")
        op.cost_ratio = float(params.get("cost_ratio", 1.0))
        op.refresh_every = int(params["refresh_every"])
        op.dtype, op.device = check_dtype(params["dtype"]).name, params["device"]
        op._backend = resolve_backend(op.device)
        n = a["Q"].shape[0]
        op._n, op._m = n, a["A"].shape[0]
        if a["A"].shape != (op._m, n * n):
            raise StateFormatError("state arrays A and Q disagree in n")
        op._k_max = int(meta["k_max"])
        op._setup_from_state(a, meta)
        return op

    def _setup_from_state(self, a: Mapping[str, np.ndarray], meta: Mapping[str, Any]) -> None:
        n, m = self._n, self._m
        self._setup_constraints(
            np.asarray(a["A"], dtype=np.float64), a["Q"].astype(np.float64, copy=True)
        )
        self._lam_true = a["lam_true"].astype(np.float64, copy=True)
        self._W_sync = a["W_sync"].astype(np.float64, copy=True)
        self._W_base = a["W_base"].astype(np.float64, copy=True)
        self._sync_diag = bool(meta["sync_diag"])
        self._base_diag = bool(meta["base_diag"])
        self._half = None
        # The factor routines read F-ordered arrays; the same layout as a live
        # operator keeps the continued run bit-identical.
        self._Mbase = np.array(a["M_base"], dtype=np.float64, order="F", copy=True)
        self._L = np.array(a["L"], dtype=np.float64, order="F", copy=True)
        self._clear_acc()
        j = int(meta["rank"])
        if j:
            self._reserve(j)
            self._Xb[:, :j] = a["X"][:, :j]
            self._Vb[:, :j] = a["V"][:, :j]
            self._j = j
            self._s = a["s"][:j].astype(np.float64, copy=True)
            self._G = np.array(a["G"][:j, :j], dtype=np.float64, copy=True)
            self._cols = a["cols"][:j].astype(np.int64, copy=True)
            self._cap = _Capacitance(self._G, self._s)
        cyc = meta["cycle"]
        self._cycle_cost, self._cycle_n = float(cyc[0]), int(cyc[1])
        c = meta["counters"]
        self._steps, self._restarts = int(c["steps"]), int(c["restarts"])
        self._refreshes, self._pushed = int(c["refreshes"]), int(c["pushed"])
        self._queries = int(c["queries"])
        self._rng = np.random.default_rng(self.seed)
        self._pool = None
        if self.sketch is not None:
            self._pool = SketchPool(self.sketch, n * n, self._rng)
            self._pool.load_meta(meta["pool"])
        self._rng.bit_generator.state = meta["rng"]  # after the pool drew its seed
        del m

    # -- conformance -----------------------------------------------------------------------
    @classmethod
    def conformance_spec(cls) -> ConformanceSpec:
        n, m = 4, 6
        base = np.random.default_rng(11)
        A = np.stack([(x + x.T).ravel() for x in base.standard_normal((m, n, n))])
        G = base.standard_normal((n, n))
        W = G @ G.T + n * np.eye(n)
        probes = base.standard_normal((3, n * n))

        def make(seed: int = 0, dtype: str = "float64", device: str = "cpu") -> KroneckerProjection:
            return cls(
                A,
                W,
                form="sqrt_w_kron_sqrt_w",
                seed=seed,
                restart_rank=12,
                refresh_every=4,
                dtype=dtype,
                device=device,
            )

        def stream(rng: np.random.Generator, dtype: np.dtype, n_rows: int) -> np.ndarray:
            idx = rng.integers(0, n, size=n_rows).astype(dtype)
            val = np.exp(rng.normal(1.5, 0.3, size=n_rows)).astype(dtype)
            return np.stack([idx, val], axis=1)

        def feed(op: Operator, chunk: np.ndarray) -> None:
            assert isinstance(op, KroneckerProjection)
            arr = np.asarray(chunk)
            if arr.ndim != 2 or arr.shape[1] != 2:
                raise InvalidInputError(f"eigenvalue rows must be [index, value], got {arr.shape}")
            op.update_eigenvalues(arr[:, 0], arr[:, 1])

        def probe(op: Operator) -> np.ndarray:
            assert isinstance(op, KroneckerProjection)
            return np.asarray(op.project(probes), dtype=np.float64).ravel()

        def bad_inputs(rng: np.random.Generator, dtype: np.dtype) -> list[tuple[str, Any]]:
            good = np.array([[0.0, 2.0], [1.0, 3.0], [2.0, 4.0]])
            nan = good.copy()
            nan[1, 1] = np.nan
            inf = good.copy()
            inf[2, 1] = np.inf
            oob = good.copy()
            oob[0, 0] = n
            neg = good.copy()
            neg[2, 1] = -1.0
            frac = good.copy()
            frac[1, 0] = 0.5
            return [
                ("NaN value", nan),
                ("Inf value", inf),
                ("index out of range", oob),
                ("negative eigenvalue", neg),
                ("fractional index", frac),
                ("wrong width", np.zeros((2, 3))),
            ]

        return ConformanceSpec(
            make=make,
            stream=stream,
            feed=feed,
            probe=probe,
            bad_inputs=bad_inputs,
            # Different cuts push different Woodbury blocks and restart at other
            # points; the answers then differ by round-off only (cond(M) ~ 1e2).
            split_tolerance=1e-10,
            backends=("cpu", "torch"),
            backend_rtol=1e-10,
            float32_rtol=1e-4,
        )
