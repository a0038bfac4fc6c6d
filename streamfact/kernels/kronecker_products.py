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
    "measured_restart_rank",
    "model_restart_rank",
    "rotate",
    "unrotate",
    "woodbury_cycle_cost",
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


def woodbury_cycle_cost(
    m: int, k_step: int, k_max: int, *, speeds: tuple[float, float, float] = (1.0, 1.0, 1.0)
) -> float:
    """Predicted mean cost of one step (update + one query) over a restart cycle.

    The accumulated Woodbury rank grows by ``k_step`` per step from 0 until the
    next step would pass ``k_max``; then the correction is folded into the base
    (``M̃ += X S Xᵀ``) and the base is refactored by Cholesky. ``speeds`` are
    relative flop rates of (GEMM/TRSM, LU of the capacitance, Cholesky); the
    unit is one GEMM flop. Steps whose own rank exceeds ``k_max`` fold at once.
    """
    gemm, lu, chol = speeds
    k_step = max(int(k_step), 1)
    steps = max(int(k_max) // k_step, 1)
    total = 0.0
    j = 0
    for _ in range(steps):
        jn = j + k_step
        total += (2.0 * m * m * k_step + 2.0 * m * j * k_step + 4.0 * m * jn) / gemm
        total += (2.0 / 3.0) * jn**3 / lu
        j = jn
    total += (2.0 * m * m * j + 2.0 * m * j * j) / gemm + (m**3 / 3.0) / chol
    return total / steps


def model_restart_rank(
    m: int, k_step: int, *, speeds: tuple[float, float, float] = (1.0, 1.0, 1.0)
) -> int:
    """The restart threshold ``k_max`` minimising :func:`woodbury_cycle_cost`.

    Deterministic (a flop model); :func:`measured_restart_rank` feeds it speeds
    measured on this machine. At least ``k_step`` so one step always fits.
    """
    k_step = max(int(k_step), 1)
    best_k, best = k_step, math.inf
    for mult in range(1, 65):
        k = mult * k_step
        if k > 4 * max(m, k_step):
            break
        c = woodbury_cycle_cost(m, k_step, k, speeds=speeds)
        if c < best:
            best_k, best = k, c
    return int(best_k)


def measured_restart_rank(
    m: int, k_step: int, *, repeats: int = 3, seed: int = 0
) -> tuple[int, tuple[float, float, float]]:
    """Measure relative GEMM / LU / Cholesky speeds here and return ``(k_max, speeds)``.

    Times one ``m×m·m×k`` GEMM, one ``k×k`` LU and one ``m×m`` Cholesky (best of
    ``repeats``) and plugs the measured rates into :func:`model_restart_rank`.
    The result is machine dependent; pass it as ``restart_rank`` to keep an
    operator deterministic.
    """
    import scipy.linalg as sla

    rng = np.random.default_rng(seed)
    k = max(int(k_step), 8)
    X = rng.standard_normal((m, m))
    Y = rng.standard_normal((m, k))
    K = rng.standard_normal((k, k)) + k * np.eye(k)
    spd = X @ X.T + m * np.eye(m)

    def best(fn: Any) -> float:
        out = math.inf
        for _ in range(repeats):
            t0 = time.perf_counter()
            fn()
            out = min(out, time.perf_counter() - t0)
        return max(out, 1e-9)

    t_gemm = best(lambda: X @ Y) / (2.0 * m * m * k)
    t_lu = best(lambda: sla.lu_factor(K, check_finite=False)) / ((2.0 / 3.0) * k**3)
    t_chol = best(lambda: sla.cholesky(spd, lower=True, check_finite=False)) / (m**3 / 3.0)
    speeds = (1.0, t_gemm / t_lu, t_gemm / t_chol)
    return model_restart_rank(m, k_step, speeds=speeds), speeds
