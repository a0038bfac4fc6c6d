"""Structured Kronecker products that never form an ``n²×n²`` matrix.

All vectors of length ``n²`` use the row-major ``vec`` of numpy's ``ravel``,
``vec(X)[p·n + q] = X[p, q]``, which is the convention of ``np.kron``. With it::

    vec(A)ᵀ (X ⊗ Y) = vec(Xᵀ A Y)          (kronecker.md §2)

so every product with ``X ⊗ Y`` is two ``n×n`` matrix products per row. The
functions here work on numpy arrays and on torch tensors alike (they only use
``@``, ``reshape``, ``transpose`` and broadcasting), so the operator writes its
dense batch math once for both backends.

Forms (``form`` argument):

* ``"w_kron_i"``: ``B = A (W ⊗ I)``, row i of B is ``vec(W A_i)``;
* ``"sqrt_w_kron_sqrt_w"``: ``B = A (W^½ ⊗ W^½)``, row i is ``vec(W^½ A_i W^½)``.
"""

from __future__ import annotations

import math
import time
from typing import Any

import numpy as np

__all__ = [
    "FORMS",
    "apply_weight",
    "coordinates_of",
    "general_update_factors",
    "measure_cost_ratio",
    "restart_cost",
    "rotate",
    "should_restart",
    "unrotate",
    "woodbury_step_cost",
]

FORMS = ("w_kron_i", "sqrt_w_kron_sqrt_w")


def _t(x: Any) -> Any:
    """Swap the last two axes (numpy and torch)."""
    return x.transpose(-1, -2) if hasattr(x, "detach") else np.swapaxes(x, -1, -2)


def rotate(H: Any, Q: Any, form: str) -> Any:
    """Map a batch ``H`` (q×n×n) to the eigenbasis: ``QᵀHQ`` ("ww") or ``QᵀH`` ("wi").

    This is ``(Q⊗Q)ᵀ vec(H)`` resp. ``(Q⊗I)ᵀ vec(H)`` (kronecker.md §4), 2n³ or
    4n³ flops per matrix.
    """
    if form == "sqrt_w_kron_sqrt_w":
        return _t(Q) @ H @ Q
    return _t(Q) @ H


def unrotate(H: Any, Q: Any, form: str) -> Any:
    """Inverse of :func:`rotate`: ``Q H Qᵀ`` ("ww") or ``Q H`` ("wi")."""
    if form == "sqrt_w_kron_sqrt_w":
        return Q @ H @ _t(Q)
    return Q @ H


def apply_weight(H: Any, form: str, *, lam: Any = None, half: Any = None, full: Any = None) -> Any:
    """Apply the rotated weight factor to a batch ``H`` (q×n×n); self-adjoint.

    Diagonal weights (``lam``, the eigenvalues): "ww" multiplies entry (a, b) by
    ``√(λ_a λ_b)``, "wi" multiplies row a by ``λ_a``. General rotated weights:
    "ww" computes ``Ŵ^½ H Ŵ^½`` (``half`` = Ŵ^½), "wi" computes ``Ŵ H``
    (``full`` = Ŵ). Since Ŵ is symmetric the map equals its adjoint, so it
    serves both ``B̃`` and ``B̃ᵀ``.
    """
    if lam is not None:
        if form == "sqrt_w_kron_sqrt_w":
            s = lam**0.5
            return H * (s[:, None] * s[None, :])
        return H * lam[:, None]
    if form == "sqrt_w_kron_sqrt_w":
        return half @ H @ half
    return full @ H


def coordinates_of(indices: np.ndarray, n: int, form: str) -> np.ndarray:
    """Flat coordinates whose weight depends on the eigenvalues at ``indices``.

    "ww": every pair (a, b) with a or b in the set, ``k = 2rn − r²``; "wi": the
    rows a in the set, ``k = rn`` (kronecker.md §4). Sorted, unique.
    """
    idx = np.asarray(indices, dtype=np.int64)
    rows = (idx[:, None] * n + np.arange(n)[None, :]).ravel()
    if form == "sqrt_w_kron_sqrt_w":
        cols = (np.arange(n)[:, None] * n + idx[None, :]).ravel()
        return np.unique(np.concatenate([rows, cols]))
    return np.unique(rows)


def general_update_factors(
    At3: np.ndarray, Ut: np.ndarray, C: np.ndarray, W_old: np.ndarray, W_new: np.ndarray, form: str
) -> tuple[np.ndarray, np.ndarray]:
    """``X`` (m×k) and symmetric ``S`` (k×k) with ``M' − M = X S Xᵀ`` for ``ΔŴ = Ũ C Ũᵀ``.

    All in the rotated frame (kronecker.md §5): ``At3`` holds the rotated
    constraints ``Ã_i`` (m×n×n), ``Ut = QᵀU``.

    * "wi": ``Ŵ'² − Ŵ² = V S_V Vᵀ`` with ``V = [Ũ, ŴŨ]``,
      ``S_V = [[C ŨᵀŨ C, C], [C, 0]]``; ``X = Ã(V⊗I)`` (rows ``vec(VᵀÃ_i)``),
      ``S = S_V ⊗ I_n``; rank 2rn.
    * "ww": ``Ŵ'⊗Ŵ' − Ŵ⊗Ŵ = ΔŴ⊗Ŵ' + Ŵ⊗ΔŴ``; ``X = [Ã(Ũ⊗I), Ã(I⊗Ũ)]``
      (rows ``vec(ŨᵀÃ_i)`` and ``vec(Ã_i Ũ)``), ``S = blkdiag(C⊗Ŵ', Ŵ⊗C)``; rank 2rn.

    Cost O(m n² r) for ``X``; ``S`` is never inverted by the caller.
    """
    m, n, _ = At3.shape
    r = Ut.shape[1]
    if form == "w_kron_i":
        V = np.concatenate([Ut, W_old @ Ut], axis=1)
        CUUC = C @ (Ut.T @ Ut) @ C
        SV = np.block([[CUUC, C], [C, np.zeros_like(C)]])
        X = (V.T @ At3).reshape(m, 2 * r * n)
        S = np.kron(SV, np.eye(n))
        return X, S
    X1 = (Ut.T @ At3).reshape(m, r * n)
    X2 = (At3 @ Ut).reshape(m, n * r)
    S = np.zeros((2 * r * n, 2 * r * n))
    S[: r * n, : r * n] = np.kron(C, W_new)
    S[r * n :, r * n :] = np.kron(W_old, C)
    return np.concatenate([X1, X2], axis=1), S


# -- restart policy -----------------------------------------------------------


def woodbury_step_cost(m: int, j: int, k: int) -> float:
    """Flops of appending ``k`` Woodbury columns to an accumulated rank ``j``.

    ``Z = M̃⁻¹X`` by two triangular solves (2m²k), the new block of
    ``G = XᵀZ`` (2mjk + mk²), the LU of the ``(j+k)×(j+k)`` capacitance and the
    extra work of one query (4m(j+k)).
    """
    jk = j + k
    return 2.0 * m * m * k + 2.0 * m * j * k + m * k * k + (2.0 / 3.0) * jk**3 + 4.0 * m * jk


def restart_cost(m: int, cost_ratio: float = 1.0) -> float:
    """Flops of the Cholesky refactorisation ``m³/3`` scaled by ``cost_ratio``.

    The fold ``M̃ += X S Xᵀ`` is owed by every accumulated column whether it is
    folded now or later, so only the Cholesky decides between appending and
    restarting. ``cost_ratio`` is the measured time per Cholesky flop over the
    time per GEMM flop (:func:`measure_cost_ratio`); 1.0 is the flop model.
    """
    return cost_ratio * m**3 / 3.0


def should_restart(m: int, j: int, k: int, k_max: int, cost_ratio: float = 1.0) -> bool:
    """Restart (fold and refactor) instead of appending ``k`` columns to rank ``j``?

    True when the accumulated rank would pass ``k_max`` or when the Woodbury
    step would cost more than a restart (kronecker.md §8.3: switch to
    recomputation when the predicted Woodbury cost exceeds it).
    """
    if j + k > k_max:
        return True
    return woodbury_step_cost(m, j, k) > restart_cost(m, cost_ratio)


def measure_cost_ratio(m: int, k: int = 64, *, repeats: int = 3, seed: int = 0) -> float:
    """Measured (time per Cholesky flop) / (time per triangular-solve flop) at size ``m``.

    Machine dependent; pass the result as ``cost_ratio`` so that the operator
    itself stays deterministic.
    """
    import scipy.linalg as sla

    rng = np.random.default_rng(seed)
    X = rng.standard_normal((m, m))
    spd = X @ X.T + m * np.eye(m)
    L = np.linalg.cholesky(spd)
    Y = rng.standard_normal((m, k))

    def best(fn: Any) -> float:
        out = math.inf
        for _ in range(repeats):
            t0 = time.perf_counter()
            fn()
            out = min(out, time.perf_counter() - t0)
        return max(out, 1e-9)

    t_solve = best(lambda: sla.cho_solve((L, True), Y, check_finite=False)) / (2.0 * m * m * k)
    t_chol = best(lambda: sla.cholesky(spd, lower=True, check_finite=False)) / (m**3 / 3.0)
    return t_chol / t_solve
