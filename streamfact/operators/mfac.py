"""Matrix-free inverse empirical Fisher products (M-FAC), sliding-window and static.

Both operators represent the damped empirical Fisher of ``m`` gradients

    F = λ I + (1/m) Σ_i g_i g_iᵀ = λ I + Gᵀ G / m,       G = [g_1; …; g_m]  (m×d)

and apply ``F⁻¹`` without ever forming a d×d matrix, following Frantar, Kurtic &
Alistarh (2021). The sliding-window operator keeps the last ``m`` gradients of a
stream (the paper's *dynamic* algorithm, used for optimisation); the static one
accumulates a fixed set of gradients once (the paper's *static* algorithm, used
for pruning).

torch is optional: with ``device="cpu"`` both operators run on numpy alone, and
torch is imported only when a torch device is requested.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Mapping
from typing import Any

import numba
import numpy as np
import scipy.linalg as sla
import scipy.sparse as sp

from streamfact.kernels.backend import (
    Backend,
    cuda_available,
    resolve_backend,
    torch_available,
    torch_dtype,
)
from streamfact.operators.base import (
    ConformanceSpec,
    InvalidInputError,
    Operator,
    OperatorState,
    StateFormatError,
    dense_row_bad_inputs,
)
from streamfact.operators.validation import check_dtype, check_matrix

__all__ = ["Float32PrecisionWarning", "SlidingWindowMFAC", "StaticMFAC"]

#: Above this κ a float32 IHVP of a vector outside the window's span loses more
#: than about 1e-3 of relative accuracy (error ≈ ε₃₂·κ, notes section 7.1).
KAPPA_WARN_GENERIC = 1e4
#: Above this κ even the in-span path of ``add_and_ihvp`` is untested in float32.
KAPPA_WARN_INSPAN = 1e7


class Float32PrecisionWarning(RuntimeWarning):
    """The condition estimate κ = ‖g‖²/(mλ) threatens float32 accuracy."""


# -- backend helpers ------------------------------------------------------------


def _resolve_device(device: str) -> Backend:
    """``"auto"``: CUDA when present, else torch on the CPU when installed, else numpy."""
    if device == "auto":
        if cuda_available():
            return Backend("torch", "cuda")
        if torch_available():
            return Backend("torch", "cpu")
        return Backend("numpy", "cpu")
    return resolve_backend(device)


def _is_tensor(x: Any) -> bool:
    return type(x).__module__.startswith("torch") and hasattr(x, "detach")


class _RowBuffer:
    """An n×d buffer of rows on numpy or torch, with the two passes over it.

    Both passes return or take the small side in float64 numpy, so all the
    n×n algebra stays in float64 on the host while the d-sized work runs in
    the operator's dtype where the buffer lives.
    """

    def __init__(self, backend: Backend, n: int, d: int, dtype: str) -> None:
        self.backend = backend
        self.dtype = dtype
        if backend.is_torch:
            import torch

            self.data: Any = torch.zeros((n, d), dtype=torch_dtype(dtype), device=backend.device)
        else:
            self.data = np.zeros((n, d), dtype=dtype)

    def rows_in(self, x: Any, name: str, dim: int) -> tuple[Any, bool]:
        """Validate rows (numpy, scipy.sparse or torch) and move them here.

        Returns the b×d array on this backend and whether the input was 1-D.
        Raises :class:`InvalidInputError` (with ``rows=`` for NaN/Inf rows).
        """
        if _is_tensor(x):
            import torch

            single = x.ndim == 1
            t = x[None, :] if single else x
            if t.ndim != 2:
                raise InvalidInputError(f"{name} must be 1-D or 2-D, got {x.ndim}-D")
            if t.is_complex() or t.dtype == torch.bool:
                raise InvalidInputError(f"{name} must be real numeric, got {t.dtype}")
            if t.shape[1] != dim:
                raise InvalidInputError(f"{name} has {t.shape[1]} columns, expected {dim}")
            finite = torch.isfinite(t).all(dim=1)
            if not bool(finite.all()):
                bad = torch.nonzero(~finite).flatten().cpu().numpy()
                raise InvalidInputError(f"{name} contains NaN or Inf", rows=bad)
            return self.backend.asarray(t.detach(), self.dtype), single
        single = not sp.issparse(x) and np.ndim(x) == 1
        arr: Any = check_matrix(x, n_cols=dim, dtype=np.dtype(self.dtype), name=name)
        if sp.issparse(arr):
            arr = arr.toarray()
        return self.backend.asarray(arr, self.dtype), single

    def output(self, y: Any, like_tensor: bool, single: bool) -> Any:
        """Hand a result back as the caller's kind of array (numpy or torch)."""
        if single:
            y = y[0]
        if like_tensor:
            if self.backend.is_torch:
                return y
            import torch

            return torch.from_numpy(np.ascontiguousarray(y))
        return self.backend.to_numpy(y)

    def sq_norms(self, x: Any) -> np.ndarray:
        return np.asarray(self.backend.to_numpy((x * x).sum(1)), dtype=np.float64)

    def set_rows(self, slots: np.ndarray, x: Any) -> None:
        if self.backend.is_torch:
            import torch

            self.data[torch.as_tensor(slots, device=self.data.device)] = x
        else:
            self.data[slots] = x

    def times(self, x: Any, n: int) -> np.ndarray:
        """``G[:n] @ xᵀ`` as float64 (n×b): one pass over the buffer."""
        if x.shape[0] == 1:  # matrix-vector kernels stream G faster than a 1-column GEMM
            out = (self.data[:n] @ x[0])[:, None]
        else:
            out = self.data[:n] @ x.T
        return np.asarray(self.backend.to_numpy(out), dtype=np.float64)

    def combine(self, y: np.ndarray, n: int) -> Any:
        """``yᵀ @ G[:n]`` (b×d) for a float64 n×b ``y``: one pass over the buffer."""
        coeff = self.backend.asarray(np.ascontiguousarray(y.T), self.dtype)
        if coeff.shape[0] == 1:
            return (coeff[0] @ self.data[:n])[None, :]
        return coeff @ self.data[:n]

    def scale(self, x: Any, alpha: float) -> Any:
        return x * alpha

    def numpy(self) -> np.ndarray:
        return np.array(self.backend.to_numpy(self.data), dtype=self.dtype, copy=True)

    def load(self, arr: np.ndarray) -> None:
        if self.backend.is_torch:
            self.data = self.backend.asarray(np.array(arr, copy=True), self.dtype)
        else:
            self.data = np.array(arr, dtype=self.dtype, copy=True)


# -- the rolling Cholesky kernel ------------------------------------------------


@numba.njit(cache=True)
def _chol_roll(
    R: np.ndarray, n_old: int, n_pop: int, block: np.ndarray, mlam: float
) -> int:  # pragma: no cover - compiled
    """Drop the ``n_pop`` oldest rows/columns of ``K = RᵀR``, then append new ones.

    ``R`` (m×m, upper triangular, float64) holds the factor of the leading
    ``n_old`` block, in time order (oldest first). Dropping the oldest index is
    a positive rank-1 update of the trailing factor, shifted up-left by one.
    Row ``i`` of ``block`` holds the new gradient's Gram entries against the
    kept rows, the earlier new rows and itself (without ``mlam``); appending it
    is one triangular solve. Returns how many new diagonal pivots had to be
    raised to their exact lower bound ``mlam`` because of rounding.
    """
    m = R.shape[0]
    n = n_old
    x = np.empty(m)
    for _ in range(n_pop):
        for j in range(1, n):
            x[j] = R[0, j]
        for k in range(n - 1):
            a = R[k + 1, k + 1]
            xk = x[k + 1]
            r = math.hypot(a, xk)
            c = r / a
            s = xk / a
            R[k, k] = r
            for j in range(k + 1, n - 1):
                v = (R[k + 1, j + 1] + s * x[j + 1]) / c
                R[k, j] = v
                x[j + 1] = c * x[j + 1] - s * v
        for i in range(n):
            R[n - 1, i] = 0.0
            R[i, n - 1] = 0.0
        n -= 1
    clamps = 0
    lvec = np.empty(m)
    for i in range(block.shape[0]):
        for j in range(n):
            lvec[j] = block[i, j]
        ss = 0.0
        for j in range(n):
            lj = lvec[j] / R[j, j]
            lvec[j] = lj
            ss += lj * lj
            for q in range(j + 1, n):
                lvec[q] -= lj * R[j, q]
        d2 = block[i, n] + mlam - ss
        if d2 < mlam:
            # Exact arithmetic gives a Schur complement of mλI + GGᵀ ≥ mλ.
            d2 = mlam
            clamps += 1
        for j in range(n):
            R[j, n] = lvec[j]
        R[n, n] = math.sqrt(d2)
        n += 1
    return clamps


# -- shared validation of parameters ---------------------------------------------


def _check_positive(name: str, value: float) -> float:
    v = float(value)
    if not math.isfinite(v) or v <= 0.0:
        raise ValueError(f"{name} must be a positive finite number, got {value!r}")
    return v


class SlidingWindowMFAC(Operator):
    """Inverse-Fisher-vector products over a sliding window of the last m gradients.

    Keeps the last ``window = m`` gradients of a stream in a ring buffer ``G``
    (m×d, slot ``k mod m`` for the k-th gradient) and applies the inverse of the
    damped empirical Fisher

        F = λ I + (1/m) Gᵀ G                                          (paper, eq. 1)

    through the Woodbury identity with the m×m kernel matrix
    ``K = mλ I + G Gᵀ``::

        F⁻¹ x = (x − Gᵀ K⁻¹ G x) / λ

    This is the quantity the paper's dynamic algorithm (its Sherman–Morrison
    chain, eqs. 3–5, and Algorithm 1's ``D``/``B`` recursions) computes; the
    chain is the unpivoted elimination of ``K/λ``. Instead of redoing that
    elimination in O(m³) per new gradient, this operator keeps the Cholesky
    factor ``K = RᵀR`` with rows in *time order* (oldest first), in float64:

    * evicting the oldest gradient is a positive rank-1 update of the trailing
      factor (stable, O(m²)); it does not touch ``G``;
    * appending a gradient ``g`` costs one pass ``t = G g`` (which also updates
      the float64 Gram matrix ``G Gᵀ``) and one triangular solve (O(m²));
    * ``ihvp`` takes exactly two passes over ``G`` (``G x`` and ``Gᵀ y``) plus
      two triangular solves;
    * ``add_and_ihvp(g)``, the optimizer step, uses the push-through identity
      ``F⁻¹ Gᵀ = m Gᵀ K⁻¹`` for a vector inside the window:
      ``F⁻¹ g_j = m Gᵀ K⁻¹ e_j``. The m×m solve is float64 and the one remaining
      pass over ``G`` is a plain weighted sum, so no two large terms cancel and
      float32 keeps its accuracy where the direct formula loses ε₃₂·κ.

    Parameters
    ----------
    dim:
        Gradient length d.
    window:
        Number m of gradients kept.
    damping:
        λ in absolute mode; the factor ρ in relative mode.
    damping_mode:
        ``"absolute"`` (λ = ``damping``, as in the paper) or ``"relative"``
        (λ = ρ · mean‖g‖² / m over the window, so that κ ≈ 1/ρ). In relative
        mode λ is set from the first gradients added and re-estimated at every
        refactorisation (every ``refactor_every`` additions, default ``window``,
        an amortised O(m²) per addition), since changing λ changes every
        diagonal entry of K. If every gradient seen is zero, λ = ρ / m.
    refactor_every:
        Rebuild the factor from the float64 Gram matrix (O(m³)) after every so
        many additions; ``None`` (default in absolute mode) never does.
        The rolling factor needs none to stay accurate (it only applies positive
        updates), but :meth:`refactor` is available.
    dtype:
        ``"float64"`` (default) or ``"float32"``: the dtype of ``G`` and of the
        d-sized passes. The Gram matrix and the factor are always float64.
    device:
        ``"auto"`` (default: CUDA if present, else torch on the CPU if installed,
        else numpy), ``"cpu"`` (numpy), ``"torch"`` (torch on the CPU) or
        ``"cuda[:N]"``. Only ``G`` and the d-sized passes live there; the m×m
        algebra runs in float64 on the host.

    Attributes
    ----------
    n_seen_ : int
        Gradients added since construction.
    fill_ : int
        Gradients currently in the window, ``min(n_seen_, window)``.
    lambda_ : float
        The absolute damping in use (0 before the first gradient in relative mode).
    condition_estimate_ : float
        κ = max ‖g‖² / (m λ) over the gradients of the latest ``add`` call; the
        relative error of a float32 IHVP of a vector outside the window is about
        ε₃₂·κ. A :class:`Float32PrecisionWarning` is raised in float32 when the
        window's κ exceeds 1e4 in :meth:`ihvp` or 1e7 in :meth:`add_and_ihvp`.

    Notes
    -----
    **The 1/m convention.** The factor is always ``1/window``, never ``1/fill``:
    while the window is still filling, F is exactly what the paper's
    zero-initialised window gives (zero rows count in the average), i.e.
    ``F = λI + (1/m) Σ_{i ≤ fill} g_i g_iᵀ``.

    Time per added gradient O(d m + m²) (the paper's recursion: O(d m + m³));
    per IHVP O(d m + m²) for each right-hand side. Memory: ``G`` m·d in ``dtype``
    plus two float64 m×m matrices. A batch of b gradients costs one GEMM pass
    over ``G`` and O(b m²) for the factor. Not mergeable: the window is a
    sequence.

    State: ``grads`` (G in ring order), ``gram`` (G Gᵀ, float64, ring order),
    ``factor`` (R, float64, time order), and in meta the ring pointer, fill,
    gradient counter, λ, κ and the clamp counter.

    References
    ----------
    E. Frantar, E. Kurtic, D. Alistarh. M-FAC: Efficient Matrix-Free
    Approximations of Second-Order Information. NeurIPS 2021.

    Examples
    --------
    >>> import numpy as np
    >>> from streamfact.operators.mfac import SlidingWindowMFAC
    >>> rng = np.random.default_rng(0)
    >>> op = SlidingWindowMFAC(50, 4, damping=0.1, device="cpu")
    >>> G = rng.standard_normal((10, 50))
    >>> op.add(G)                       # the window keeps the last 4 rows
    >>> F = 0.1 * np.eye(50) + G[-4:].T @ G[-4:] / 4
    >>> x = rng.standard_normal(50)
    >>> bool(np.allclose(op.ihvp(x), np.linalg.solve(F, x)))
    True
    >>> g = rng.standard_normal(50)
    >>> step = op.add_and_ihvp(g)       # optimizer step: add g, return F⁻¹ g
    >>> F = 0.1 * np.eye(50) + np.vstack([G[-3:], g]).T @ np.vstack([G[-3:], g]) / 4
    >>> bool(np.allclose(step, np.linalg.solve(F, g)))
    True
    """

    state_version = 1

    def __init__(
        self,
        dim: int,
        window: int,
        *,
        damping: float = 1e-5,
        damping_mode: str = "absolute",
        refactor_every: int | None = None,
        dtype: str = "float64",
        device: str = "auto",
    ) -> None:
        if int(dim) <= 0:
            raise ValueError(f"dim must be positive, got {dim}")
        if int(window) <= 0:
            raise ValueError(f"window must be positive, got {window}")
        if damping_mode not in ("absolute", "relative"):
            raise ValueError(f"damping_mode must be 'absolute' or 'relative', got {damping_mode!r}")
        if refactor_every is not None and int(refactor_every) <= 0:
            raise ValueError(f"refactor_every must be positive or None, got {refactor_every}")
        self.dim = int(dim)
        self.window = int(window)
        self.damping = _check_positive("damping", damping)
        self.damping_mode = damping_mode
        self.refactor_every = None if refactor_every is None else int(refactor_every)
        self.dtype = check_dtype(dtype).name
        self.device = device
        self._backend = _resolve_device(device)
        m = self.window
        self._buf = _RowBuffer(self._backend, m, self.dim, self.dtype)
        self.gram_ = np.zeros((m, m), dtype=np.float64)
        self.factor_ = np.zeros((m, m), dtype=np.float64)
        self.n_seen_ = 0
        self.fill_ = 0
        self.lambda_ = self.damping if damping_mode == "absolute" else 0.0
        self.condition_estimate_ = 0.0
        self.clamps_ = 0

    # -- derived quantities -----------------------------------------------------
    @property
    def ring_pointer(self) -> int:
        """The slot the next gradient is written to."""
        return self.n_seen_ % self.window

    @property
    def _refactor_period(self) -> int | None:
        if self.refactor_every is not None:
            return self.refactor_every
        return self.window if self.damping_mode == "relative" else None

    def _time_slots(self, fill: int | None = None, n_seen: int | None = None) -> np.ndarray:
        """Ring slots of the window's gradients, oldest first."""
        f = self.fill_ if fill is None else fill
        n = self.n_seen_ if n_seen is None else n_seen
        start = n % self.window if f == self.window else 0
        return (start + np.arange(f)) % self.window

    def _relative_lambda(self, sq_norms: np.ndarray) -> float:
        mean = float(np.mean(sq_norms)) if sq_norms.size else 0.0
        if mean > 0.0:
            return self.damping * mean / self.window
        return self.lambda_ if self.lambda_ > 0.0 else self.damping / self.window

    def window_condition_estimate(self) -> float:
        """κ = max ‖g‖² / (mλ) over the gradients now in the window. O(m)."""
        if self.fill_ == 0 or self.lambda_ <= 0.0:
            return 0.0
        diag = np.diag(self.gram_)[self._time_slots()]
        return float(diag.max() / (self.window * self.lambda_))

    @property
    def grads(self) -> Any:
        """The ring buffer G (m×d) on the operator's device; rows ≥ fill are zero."""
        return self._buf.data

    def fisher_matrix(self) -> np.ndarray:
        """The dense d×d F (float64 numpy), for tests and small d only. O(d² m)."""
        G = np.asarray(self._buf.numpy()[: self.fill_], dtype=np.float64)
        return self.lambda_ * np.eye(self.dim) + G.T @ G / self.window

    # -- updates ------------------------------------------------------------------
    def add(self, g: Any) -> None:
        """Add one gradient (d,) or a batch of rows (b×d); evicts the oldest when full.

        One GEMM pass over ``G`` per call (per refactorisation period), plus
        O(b m²) float64 work on the factor.
        """
        X, _ = self._buf.rows_in(g, "g", self.dim)
        self._add_rows(X)

    update = add

    def _add_rows(self, X: Any) -> None:
        b = int(X.shape[0])
        if b == 0:
            return
        sq = self._buf.sq_norms(X)
        period = self._refactor_period
        pos = 0
        while pos < b:
            end = b if period is None else min(b, pos + period - self.n_seen_ % period)
            self._add_segment(X[pos:end], sq[pos:end])
            pos = end
            if period is not None and self.n_seen_ % period == 0:
                self.refactor()

    def _add_segment(self, X: Any, sq: np.ndarray) -> None:
        m = self.window
        b = int(X.shape[0])
        p = min(b, m)
        Xs = X[b - p :]
        f_old = self.fill_
        new_fill = min(f_old + b, m)
        n_pop = f_old + p - new_fill
        n_seen = self.n_seen_ + b
        slots = (self.n_seen_ + b - p + np.arange(p)) % m
        if self.lambda_ <= 0.0:
            self.lambda_ = self._relative_lambda(sq[b - p :])
        self._buf.set_rows(slots, Xs)
        T = self._buf.times(Xs, new_fill)  # pass over G: new_fill × p
        inner = T[slots]
        T[slots] = 0.5 * (inner + inner.T)
        self.gram_[:new_fill, slots] = T
        self.gram_[slots, :new_fill] = T.T
        tslots = self._time_slots(new_fill, n_seen)
        block = np.ascontiguousarray(self.gram_[np.ix_(tslots[new_fill - p :], tslots)])
        mlam = m * self.lambda_
        self.clamps_ += int(_chol_roll(self.factor_, f_old, n_pop, block, mlam))
        self.n_seen_ = n_seen
        self.fill_ = new_fill
        self.condition_estimate_ = float(sq.max() / mlam)

    def refactor(self) -> None:
        """Rebuild the factor from the float64 Gram matrix. O(m³).

        In relative damping mode this is also where λ is re-estimated.
        """
        f = self.fill_
        if f == 0:
            return
        tslots = self._time_slots()
        gram = self.gram_[np.ix_(tslots, tslots)]
        if self.damping_mode == "relative":
            self.lambda_ = self._relative_lambda(np.diag(gram))
        mlam = self.window * self.lambda_
        self.factor_[:] = 0.0
        try:
            self.factor_[:f, :f] = sla.cholesky(gram + mlam * np.eye(f), lower=False)
        except np.linalg.LinAlgError:
            # Rounding beat mλ: rebuild by appending rows, clamping pivots at mλ.
            self.factor_[:] = 0.0
            self.clamps_ += int(_chol_roll(self.factor_, 0, 0, np.ascontiguousarray(gram), mlam))

    # -- queries ------------------------------------------------------------------
    def _solve_time(self, rhs_ring: np.ndarray) -> np.ndarray:
        """K⁻¹ rhs for ring-ordered float64 rhs (fill×k); result in ring order."""
        tslots = self._time_slots()
        f = self.fill_
        R = self.factor_[:f, :f]
        # Two O(f²) triangular solves; scipy passes the C-ordered R to LAPACK as
        # its transpose, so nothing is copied (cho_solve would copy R each call).
        z = sla.solve_triangular(R, rhs_ring[tslots], trans="T", check_finite=False)
        y_time = sla.solve_triangular(R, z, check_finite=False)
        out = np.empty_like(y_time)
        out[tslots] = y_time
        return out

    def _require_lambda(self) -> None:
        if self.lambda_ <= 0.0:
            raise RuntimeError("relative damping is set from the gradients: add one first")

    def ihvp(self, x: Any) -> Any:
        """``F⁻¹ x`` for one vector (d,) or a batch of rows (k×d).

        Exactly two passes over ``G``: ``G x`` and ``Gᵀ y``. Returns numpy for
        numpy input and a tensor on the operator's device for tensor input.
        """
        self._require_lambda()
        X, single = self._buf.rows_in(x, "x", self.dim)
        if self.dtype == "float32":
            kappa = self.window_condition_estimate()
            if kappa > KAPPA_WARN_GENERIC:
                warnings.warn(
                    f"float32 ihvp with κ = {kappa:.3g}: relative error up to about "
                    f"{kappa * float(np.finfo(np.float32).eps):.1g}; use float64 or more damping",
                    Float32PrecisionWarning,
                    stacklevel=2,
                )
        lam = self.lambda_
        if self.fill_ == 0:
            out = X / lam
        else:
            T = self._buf.times(X, self.fill_)
            Y = self._solve_time(T)
            out = (X - self._buf.combine(Y, self.fill_)) / lam
        return self._buf.output(out, _is_tensor(x), single)

    def add_and_ihvp(self, g: Any) -> Any:
        """Add gradient(s), then return ``F⁻¹ g`` with the updated window (the optimizer step).

        Uses the in-span identity ``F⁻¹ g_j = m Gᵀ K⁻¹ e_j``: the pass that
        updates the Gram matrix plus one weighted sum over ``G``, i.e. exactly
        two passes, and a float64 m×m solve. A batch of b ≤ window rows returns
        b rows, each preconditioned with the window after the whole batch.
        """
        X, single = self._buf.rows_in(g, "g", self.dim)
        b = int(X.shape[0])
        if b > self.window:
            raise InvalidInputError(
                f"add_and_ihvp takes at most window={self.window} rows, got {b}"
            )
        self._add_rows(X)
        if b == 0:
            return self._buf.output(X, _is_tensor(g), False)
        if self.dtype == "float32" and self.condition_estimate_ > KAPPA_WARN_INSPAN:
            warnings.warn(
                f"float32 add_and_ihvp with κ = {self.condition_estimate_:.3g} > 1e7; "
                "use float64 or more damping",
                Float32PrecisionWarning,
                stacklevel=2,
            )
        f = self.fill_
        slots = (self.n_seen_ - b + np.arange(b)) % self.window
        rhs = np.zeros((f, b))
        rhs[slots, np.arange(b)] = float(self.window)
        Y = self._solve_time(rhs)
        return self._buf.output(self._buf.combine(Y, f), _is_tensor(g), single)

    # -- state --------------------------------------------------------------------
    def state(self) -> OperatorState:
        return OperatorState(
            arrays={
                "grads": self._buf.numpy(),
                "gram": self.gram_.copy(),
                "factor": self.factor_.copy(),
            },
            meta={
                **self._state_header(),
                "n_seen": int(self.n_seen_),
                "fill": int(self.fill_),
                "ring_pointer": int(self.ring_pointer),
                "lambda": float(self.lambda_),
                "condition_estimate": float(self.condition_estimate_),
                "clamps": int(self.clamps_),
            },
        )

    @classmethod
    def from_state(cls, state: OperatorState | Mapping[str, Any]) -> SlidingWindowMFAC:
        st, op = cls._begin_from_state(state)
        m, d = op.window, op.dim
        grads, gram, factor = st.arrays["grads"], st.arrays["gram"], st.arrays["factor"]
        if grads.shape != (m, d) or gram.shape != (m, m) or factor.shape != (m, m):
            raise StateFormatError("state arrays do not match dim and window")
        n_seen = int(st.meta["n_seen"])
        fill = int(st.meta["fill"])
        if fill != min(n_seen, m) or int(st.meta["ring_pointer"]) != n_seen % m:
            raise StateFormatError("inconsistent ring counters in state")
        op._buf.load(grads)
        op.gram_ = np.array(gram, dtype=np.float64, copy=True)
        op.factor_ = np.array(factor, dtype=np.float64, copy=True)
        op.n_seen_ = n_seen
        op.fill_ = fill
        op.lambda_ = float(st.meta["lambda"])
        op.condition_estimate_ = float(st.meta["condition_estimate"])
        op.clamps_ = int(st.meta["clamps"])
        return op

    @classmethod
    def conformance_spec(cls) -> ConformanceSpec:
        dim, window = 12, 7
        backends = ("torch", "cpu") if torch_available() else ("cpu",)

        def make(seed: int = 0, dtype: str = "float64", device: str = "cpu") -> SlidingWindowMFAC:
            return cls(dim, window, damping=0.05, dtype=dtype, device=device)

        def stream(rng: np.random.Generator, dtype: np.dtype, n_rows: int) -> np.ndarray:
            return rng.standard_normal((n_rows, dim)).astype(dtype)

        def probe(op: Operator) -> np.ndarray:
            assert isinstance(op, SlidingWindowMFAC)
            xs = np.random.default_rng(99).standard_normal((3, dim))
            out = np.asarray(op.ihvp(xs.astype(op.dtype)), dtype=np.float64)
            return np.concatenate([[op.n_seen_], out.ravel()])

        return ConformanceSpec(
            make=make,
            stream=stream,
            probe=probe,
            feed=lambda op, chunk: op.add(chunk),  # type: ignore[attr-defined]
            bad_inputs=dense_row_bad_inputs(dim),
            # Batch cuts change GEMM blocking and the order of evict/append
            # updates of the factor: rounding only.
            split_tolerance=1e-10,
            backends=backends,
            backend_rtol=1e-10,
            # F here has condition number ≈ 40; float32 inputs and passes.
            float32_rtol=1e-4,
        )


class StaticMFAC(Operator):
    """The static M-FAC algorithm: F⁻¹ products and its diagonal for a fixed gradient set.

    Accumulates up to ``n_grads = m`` gradients and represents

        F = λ I + (1/m) Σ_i g_i g_iᵀ

    through the paper's Sherman–Morrison chain (static algorithm, Section 3):
    it stores ``h_i = F_{i−1}⁻¹ g_i`` and ``denom_i = m + g_iᵀ h_i``, with
    ``F_0 = λ I``, so that

        F⁻¹ x = x/λ − Σ_i h_i (h_iᵀ x) / denom_i
        [F⁻¹]_jj = 1/λ − Σ_i h_i[j]² / denom_i

    A batch ``X`` (b×d) of new gradients is added with two GEMM passes over
    the stored ``h`` (giving ``P = F_old⁻¹ Xᵀ``), the float64 LDLᵀ factorisation
    ``m I + X P = L diag(denom) Lᵀ`` (the chain's within-batch coefficients),
    and ``h_new = L⁻¹ P``. Total setup O(d m²) whatever the batch sizes.

    Parameters
    ----------
    dim:
        Gradient length d.
    n_grads:
        The number m of gradients F averages over (capacity; rows not yet added
        count as zero, the same 1/m convention as :class:`SlidingWindowMFAC`).
    damping:
        λ (absolute).
    dtype, device:
        As for :class:`SlidingWindowMFAC` (``h`` lives on ``device`` in ``dtype``;
        the m×m algebra is float64 on the host).

    Attributes
    ----------
    count_ : int
        Gradients added so far (≤ n_grads).

    Notes
    -----
    Setup O(d m²) time and O(d m) memory; :meth:`ihvp` O(d m) per vector;
    :meth:`inverse_diagonal` O(d m); :meth:`inverse_entry` O(m). Adding more
    than ``n_grads`` gradients raises :class:`InvalidInputError`.
    State: ``hgrads`` (m×d), ``denom`` (m, float64) and the count.

    References
    ----------
    E. Frantar, E. Kurtic, D. Alistarh. M-FAC: Efficient Matrix-Free
    Approximations of Second-Order Information. NeurIPS 2021.
    B. Hassibi, D. Stork. Second order derivatives for network pruning:
    Optimal Brain Surgeon. NeurIPS 1992.

    Examples
    --------
    >>> import numpy as np
    >>> from streamfact.operators.mfac import StaticMFAC
    >>> rng = np.random.default_rng(0)
    >>> G = rng.standard_normal((6, 30))
    >>> op = StaticMFAC(30, 6, damping=0.1, device="cpu")
    >>> op.update(G)
    >>> Finv = np.linalg.inv(0.1 * np.eye(30) + G.T @ G / 6)
    >>> bool(np.allclose(op.inverse_diagonal(), np.diag(Finv)))
    True
    """

    state_version = 1

    def __init__(
        self,
        dim: int,
        n_grads: int,
        *,
        damping: float = 1e-5,
        dtype: str = "float64",
        device: str = "auto",
    ) -> None:
        if int(dim) <= 0:
            raise ValueError(f"dim must be positive, got {dim}")
        if int(n_grads) <= 0:
            raise ValueError(f"n_grads must be positive, got {n_grads}")
        self.dim = int(dim)
        self.n_grads = int(n_grads)
        self.damping = _check_positive("damping", damping)
        self.dtype = check_dtype(dtype).name
        self.device = device
        self._backend = _resolve_device(device)
        self._buf = _RowBuffer(self._backend, self.n_grads, self.dim, self.dtype)
        self.denom_ = np.zeros(self.n_grads, dtype=np.float64)
        self.count_ = 0

    def update(self, g: Any) -> None:
        """Add gradient rows (b×d or one (d,)). O(b d k + b² d + b³) with k already added."""
        X, _ = self._buf.rows_in(g, "g", self.dim)
        b = int(X.shape[0])
        k = self.count_
        if k + b > self.n_grads:
            raise InvalidInputError(
                f"StaticMFAC holds at most n_grads={self.n_grads} gradients; "
                f"{k} added, {b} more given",
                rows=np.arange(self.n_grads - k, b),
            )
        if b == 0:
            return
        P = self._apply(X, k)  # F_old⁻¹ Xᵀ, as rows (b×d)
        W = np.asarray(self._backend.to_numpy(X @ P.T), dtype=np.float64)
        W = 0.5 * (W + W.T)
        Lc = sla.cholesky(W + self.n_grads * np.eye(b), lower=True)
        piv = np.diag(Lc).copy()
        unit = Lc / piv[None, :]
        Linv = sla.solve_triangular(unit, np.eye(b), lower=True, unit_diagonal=True)
        H = self._backend.asarray(Linv, self.dtype) @ P
        self._buf.set_rows(np.arange(k, k + b), H)
        self.denom_[k : k + b] = piv * piv
        self.count_ = k + b

    def _apply(self, X: Any, k: int) -> Any:
        """``F_k⁻¹`` applied to rows of X (two passes over the first k rows of h)."""
        c = 1.0 / self.damping
        if k == 0:
            return X * c
        T = self._buf.times(X, k) / self.denom_[:k, None]
        return X * c - self._buf.combine(T, k)

    def ihvp(self, x: Any) -> Any:
        """``F⁻¹ x`` for one vector (d,) or rows (k×d): two passes over the stored h. O(d m)."""
        X, single = self._buf.rows_in(x, "x", self.dim)
        return self._buf.output(self._apply(X, self.count_), _is_tensor(x), single)

    def inverse_diagonal(self) -> Any:
        """``diag(F⁻¹)`` (d,), one pass over the stored h. O(d m)."""
        k = self.count_
        c = 1.0 / self.damping
        if k == 0:
            return np.full(self.dim, c, dtype=self.dtype)
        h = self._buf.data[:k]
        w = self._backend.asarray(1.0 / self.denom_[:k], self.dtype)
        diag = c - w @ (h * h)
        return np.asarray(self._backend.to_numpy(diag), dtype=self.dtype)

    def inverse_entry(self, i: int, j: int) -> float:
        """One entry ``[F⁻¹]_ij``. O(m)."""
        if not (0 <= i < self.dim and 0 <= j < self.dim):
            raise InvalidInputError(f"index ({i}, {j}) out of range for dim {self.dim}")
        k = self.count_
        hi = np.asarray(self._backend.to_numpy(self._buf.data[:k, i]), dtype=np.float64)
        hj = np.asarray(self._backend.to_numpy(self._buf.data[:k, j]), dtype=np.float64)
        base = 1.0 / self.damping if i == j else 0.0
        return float(base - np.sum(hi * hj / self.denom_[:k]))

    def obs_scores(self, w: Any) -> np.ndarray:
        """Optimal Brain Surgeon saliency ``w_j² / (2 [F⁻¹]_jj)`` of each weight."""
        wv = np.asarray(self._backend.to_numpy(w) if _is_tensor(w) else w, dtype=np.float64)
        if wv.shape != (self.dim,) or not np.isfinite(wv).all():
            raise InvalidInputError(f"w must be a finite vector of length {self.dim}")
        return wv * wv / (2.0 * np.asarray(self.inverse_diagonal(), dtype=np.float64))

    # -- state --------------------------------------------------------------------
    def state(self) -> OperatorState:
        return OperatorState(
            arrays={"hgrads": self._buf.numpy(), "denom": self.denom_.copy()},
            meta={
                **self._state_header(),
                "count": int(self.count_),
            },
        )

    @classmethod
    def from_state(cls, state: OperatorState | Mapping[str, Any]) -> StaticMFAC:
        st, op = cls._begin_from_state(state)
        h, denom = st.arrays["hgrads"], st.arrays["denom"]
        if h.shape != (op.n_grads, op.dim) or denom.shape != (op.n_grads,):
            raise StateFormatError("state arrays do not match dim and n_grads")
        count = int(st.meta["count"])
        if not 0 <= count <= op.n_grads:
            raise StateFormatError("count out of range")
        op._buf.load(h)
        op.denom_ = np.array(denom, dtype=np.float64, copy=True)
        op.count_ = count
        return op

    @classmethod
    def conformance_spec(cls) -> ConformanceSpec:
        dim, n_rows = 9, 40
        backends = ("torch", "cpu") if torch_available() else ("cpu",)

        def make(seed: int = 0, dtype: str = "float64", device: str = "cpu") -> StaticMFAC:
            # Capacity 3 × n_rows: the suite's longest stream fits; storage is
            # preallocated, so the state size is fixed by construction.
            return cls(dim, 3 * n_rows, damping=0.1, dtype=dtype, device=device)

        def stream(rng: np.random.Generator, dtype: np.dtype, n: int) -> np.ndarray:
            return rng.standard_normal((n, dim)).astype(dtype)

        def probe(op: Operator) -> np.ndarray:
            assert isinstance(op, StaticMFAC)
            xs = np.random.default_rng(98).standard_normal((2, dim))
            out = np.asarray(op.ihvp(xs.astype(op.dtype)), dtype=np.float64)
            diag = np.asarray(op.inverse_diagonal(), dtype=np.float64)
            return np.concatenate([[op.count_], out.ravel(), diag])

        def bad_inputs(rng: np.random.Generator, dtype: np.dtype) -> list[tuple[str, Any]]:
            over = ("over capacity", rng.standard_normal((400, dim)))
            return [*dense_row_bad_inputs(dim)(rng, dtype), over]

        return ConformanceSpec(
            make=make,
            stream=stream,
            probe=probe,
            bad_inputs=bad_inputs,
            n_rows=n_rows,
            # Batches change the elimination's grouping: rounding only.
            split_tolerance=1e-10,
            backends=backends,
            backend_rtol=1e-10,
            float32_rtol=1e-4,
        )
