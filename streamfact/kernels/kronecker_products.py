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
    "general_update_columns",
    "general_update_factors",
    "measure_cost_ratio",
    "pack_symmetric",
    "packed_positions",
    "pair_multiplicity",
    "restart_cost",
    "rotate",
    "should_restart",
    "unpack_symmetric",
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


def coordinates_of(
    indices: np.ndarray, n: int, form: str, *, symmetric: bool = False
) -> np.ndarray:
    """Flat coordinates whose weight depends on the eigenvalues at ``indices``.

    "ww": every pair (a, b) with a or b in the set, ``k = 2rn − r²``; "wi": the
    rows a in the set, ``k = rn`` (kronecker.md §4). With ``symmetric=True``
    (symmetric ``A_i`` rotated on both sides, ``Â_i = QᵀA_iQ``, where columns
    (a, b) and (b, a) are equal; both forms) each unordered pair is one
    coordinate ``a·n + b`` with ``a ≤ b``, so ``k = rn − r(r−1)/2``. Sorted, unique.
    """
    idx = np.asarray(indices, dtype=np.int64)
    rows = (idx[:, None] * n + np.arange(n)[None, :]).ravel()
    if form == "sqrt_w_kron_sqrt_w" or symmetric:
        cols = (np.arange(n)[:, None] * n + idx[None, :]).ravel()
        flat = np.concatenate([rows, cols])
        if symmetric:
            a, b = flat // n, flat % n
            flat = np.minimum(a, b) * n + np.maximum(a, b)
        return np.unique(flat)
    return np.unique(rows)


def pair_multiplicity(coords: np.ndarray, n: int) -> np.ndarray:
    """Multiplicity of packed pairs: 2 for ``a < b`` (both (a, b) and (b, a)), 1 for ``a = b``."""
    c = np.asarray(coords, dtype=np.int64)
    return np.where(c // n == c % n, 1.0, 2.0)


def packed_positions(n: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Upper-triangle packing of symmetric n×n matrices (row-major ``a ≤ b``).

    Returns ``(iu0, iu1, where)``: the row and column of each packed entry and
    ``where[a·n + b]``, the packed position of flat coordinate (a, b) with
    ``a ≤ b`` (−1 below the diagonal).
    """
    iu0, iu1 = np.triu_indices(n)
    where = np.full(n * n, -1, dtype=np.int64)
    where[iu0 * n + iu1] = np.arange(iu0.size)
    return iu0.astype(np.int64), iu1.astype(np.int64), where


def pack_symmetric(H: Any, iu0: Any, iu1: Any, offdiag: Any) -> Any:
    """Fold a batch ``H`` (q×n×n) onto the packed pairs: ``H_ab + H_ba`` (a < b), ``H_aa``.

    For symmetric ``Ã_i``, ``⟨Ã_i, H⟩ = ⟨pack(Ã_i), pack_symmetric(H)⟩`` where
    ``pack`` takes the upper triangle (``offdiag`` is 1 off and 0 on the diagonal).
    numpy and torch alike.
    """
    return H[..., iu0, iu1] + H[..., iu1, iu0] * offdiag


def unpack_symmetric(P: Any, iu0: Any, iu1: Any, n: int) -> Any:
    """Symmetric q×n×n batch from packed upper triangles ``P`` (q×n(n+1)/2)."""
    shape = (*P.shape[:-1], n, n)
    out = P.new_zeros(shape) if hasattr(P, "new_zeros") else np.zeros(shape, dtype=P.dtype)
    out[..., iu0, iu1] = P
    out[..., iu1, iu0] = P
    return out


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


def general_update_columns(
    At3: np.ndarray,
    Ut: np.ndarray,
    C: np.ndarray,
    W_old: np.ndarray,
    W_new: np.ndarray,
    form: str,
    *,
    symmetric: bool = False,
) -> tuple[np.ndarray, np.ndarray]:
    """The factors of :func:`general_update_factors` with a diagonal ``S``: ``(X, s)``.

    ``M' − M = X diag(s) Xᵀ``. The Kronecker blocks of ``S`` are diagonalised
    through their factors (``eigh`` of r×r and n×n matrices, never of ``S``),
    and the eigenvectors are folded into the structured products, so the cost
    stays ``O(m n² r)``:

    * "wi": ``S_V = E diag(s_V) Eᵀ``; rows ``vec((VE)ᵀÃ_i)``, ``s = s_V ⊗ 1_n``.
    * "ww": ``C = E_C Λ_C E_Cᵀ``, ``Ŵ' = E' Λ' E'ᵀ``, ``Ŵ = E Λ Eᵀ``; rows
      ``vec(E_CᵀŨᵀÃ_iE')`` with ``s = λ_C ⊗ λ'`` and ``vec(EᵀÃ_iŨE_C)`` with
      ``s = λ ⊗ λ_C``. With ``symmetric=True`` (``Ã_i = Ã_iᵀ``) the second block
      equals the first up to a permutation, so the two merge into rows
      ``vec(E_CᵀŨᵀÃ_iE_+)`` with ``Ŵ + Ŵ' = E_+ Λ_+ E_+ᵀ``, ``s = λ_C ⊗ λ_+``:
      rank rn instead of 2rn.
    """
    m, n, _ = At3.shape
    if form == "w_kron_i":
        V = np.concatenate([Ut, W_old @ Ut], axis=1)
        CUUC = C @ (Ut.T @ Ut) @ C
        SV = np.block([[CUUC, C], [C, np.zeros_like(C)]])
        sV, E = np.linalg.eigh((SV + SV.T) / 2)
        VE = V @ E
        X = (VE.T @ At3).reshape(m, VE.shape[1] * n)
        return X, np.repeat(sV, n)
    lc, Ec = np.linalg.eigh(C)
    UE = Ut @ Ec
    r = UE.shape[1]
    if symmetric:
        lp, Ep = np.linalg.eigh((W_old + W_new + (W_old + W_new).T) / 4)
        X = (UE.T @ At3 @ Ep).reshape(m, r * n)
        return X, np.kron(lc, 2.0 * lp)
    l1, E1 = np.linalg.eigh((W_new + W_new.T) / 2)
    l2, E2 = np.linalg.eigh((W_old + W_old.T) / 2)
    X1 = (UE.T @ At3 @ E1).reshape(m, r * n)
    X2 = (E2.T @ At3 @ UE).reshape(m, n * r)
    return np.concatenate([X1, X2], axis=1), np.concatenate([np.kron(lc, l1), np.kron(l2, lc)])


# -- restart policy -----------------------------------------------------------


def woodbury_step_cost(m: int, j: int, k: int) -> float:
    """Modelled flops of appending ``k`` Woodbury columns to an accumulated rank ``j``.

    ``V = L⁻¹X`` by one triangular solve (m²k), the new blocks of the Gram
    ``G = VᵀV`` (2mjk + mk²), the symmetric factorisation of the
    ``(j+k)×(j+k)`` capacitance ((j+k)³/3) and the extra work of one query
    (4m(j+k)); plus a carrying cost 2mk²: columns kept until the next restart
    make the next push of similar size pay its cross block against them.
    """
    jk = j + k
    return m * m * k + 2.0 * m * j * k + 3.0 * m * k * k + jk**3 / 3.0 + 4.0 * m * jk


def restart_cost(m: int, cost_ratio: float = 1.0) -> float:
    """Flops of the Cholesky refactorisation ``m³/3`` scaled by ``cost_ratio``.

    The fold ``M̃ += X S Xᵀ`` is owed by every accumulated column whether it is
    folded now or later, so only the Cholesky decides between appending and
    restarting. ``cost_ratio`` is the measured time per Cholesky flop over the
    time per triangular-solve flop (:func:`measure_cost_ratio`); 1.0 is the
    flop model.
    """
    return cost_ratio * m**3 / 3.0


def should_restart(
    m: int,
    j: int,
    k: int,
    k_max: int,
    cost_ratio: float = 1.0,
    cycle_mean: float | None = None,
) -> bool:
    """Restart (fold and refactor) instead of appending ``k`` columns to rank ``j``?

    True when the accumulated rank would pass ``k_max`` or when the Woodbury
    step costs more than the mean cost per update of the current restart cycle
    (``cycle_mean``: the restart's Cholesky plus the appends since, over their
    count; the renewal rule, optimal when the step cost grows with ``j``).
    Without ``cycle_mean`` the bar is one restart (kronecker.md §8.3: switch to
    recomputation when the predicted Woodbury cost exceeds it).
    """
    if j + k > k_max:
        return True
    bar = restart_cost(m, cost_ratio) if cycle_mean is None else cycle_mean
    return woodbury_step_cost(m, j, k) > bar


def measure_cost_ratio(m: int, k: int = 64, *, repeats: int = 3, seed: int = 0) -> float:
    """Measured (time per Cholesky flop) / (time per triangular-solve flop) at size ``m``.

    The solve is ``L⁻¹X`` for an m×k block, as in a Woodbury append. Machine
    dependent; pass the result as ``cost_ratio`` so that the operator itself
    stays deterministic.
    """
    import scipy.linalg as sla

    rng = np.random.default_rng(seed)
    X = rng.standard_normal((m, m))
    spd = np.asfortranarray(X @ X.T + m * np.eye(m))
    L = np.linalg.cholesky(spd)
    Y = np.asfortranarray(rng.standard_normal((m, k)))

    def best(fn: Any) -> float:
        out = math.inf
        for _ in range(repeats):
            t0 = time.perf_counter()
            fn()
            out = min(out, time.perf_counter() - t0)
        return max(out, 1e-9)

    t_solve = best(lambda: sla.solve_triangular(L, Y, lower=True, check_finite=False)) / float(
        m * m * k
    )
    t_chol = best(lambda: sla.lapack.dpotrf(spd, lower=1)) / (m**3 / 3.0)
    return t_chol / t_solve
