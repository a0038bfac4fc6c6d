"""Per-row sequential loops for the top-eigenvector operators (numba, CPU).

Oja's rule is inherently sequential (each row sees the vector left by the one
before), and the heavy-row test of :class:`~streamfact.operators.eigenvector.TopEigenvector`
compares each row with a running Frobenius estimate; both are O(1) or O(d)
per row and run here. Batched products stay in BLAS / torch.
"""

from __future__ import annotations

import math

import numba
import numpy as np

__all__ = [
    "classify_rows",
    "oja_csr",
    "oja_dense",
    "row_sqnorms_csr",
    "row_sqnorms_dense",
    "row_stats_dense",
]


@numba.njit(cache=True)
def row_sqnorms_dense(x: np.ndarray) -> np.ndarray:  # pragma: no cover - compiled
    """Squared Euclidean norm of each row, accumulated in float64."""
    n, d = x.shape
    out = np.empty(n, dtype=np.float64)
    for i in range(n):
        acc = 0.0
        for j in range(d):
            acc += float(x[i, j]) * float(x[i, j])
        out[i] = acc
    return out


@numba.njit(cache=True)
def row_sqnorms_csr(
    indptr: np.ndarray, data: np.ndarray
) -> np.ndarray:  # pragma: no cover - compiled
    n = indptr.shape[0] - 1
    out = np.empty(n, dtype=np.float64)
    for i in range(n):
        acc = 0.0
        for k in range(indptr[i], indptr[i + 1]):
            acc += float(data[k]) * float(data[k])
        out[i] = acc
    return out


@numba.njit(cache=True)
def _renormalise(v: np.ndarray) -> float:  # pragma: no cover - compiled
    acc = 0.0
    for j in range(v.shape[0]):
        acc += float(v[j]) * float(v[j])
    norm = math.sqrt(acc)
    if norm > 0.0:
        for j in range(v.shape[0]):
            v[j] = v[j] / norm
    return norm


@numba.njit(cache=True)
def _oja_step(
    v: np.ndarray, c: float, a2: float, eta: float, nu: float, big: float
) -> tuple[float, float, float, float]:  # pragma: no cover - compiled
    """Coefficients (alpha, beta) of v ← alpha·v + beta·a, the new ‖v‖², and c.

    ``nu`` tracks ‖v‖² (exact in exact arithmetic):
    ‖v + ηc a‖² = ν + 2ηc² + η²c²‖a‖² ≤ ν·g², g = 1 + η‖a‖². When ν·g² could
    pass ``big`` the vector is renormalised first (in place; c is rescaled);
    when g² alone passes ``big`` the whole step is divided by g, which keeps
    the direction and cannot overflow.
    """
    g = 1.0 + eta * a2
    if nu * g * g > big:
        norm = _renormalise(v)
        c = c / norm
        nu = 1.0
    if g * g > big:
        alpha = 1.0 / g
        beta = (eta / g) * c
        nu = (nu + 2.0 * eta * c * c + eta * eta * c * c * a2) / (g * g)
    else:
        alpha = 1.0
        beta = eta * c
        nu = nu + 2.0 * eta * c * c + eta * eta * c * c * a2
    return alpha, beta, nu, c


@numba.njit(cache=True)
def oja_dense(
    x: np.ndarray,
    v: np.ndarray,
    eta: float,
    nu: float,
    count: int,
    every: int,
    big: float,
) -> tuple[float, int]:  # pragma: no cover - compiled
    """Oja's rule ``v ← v + η a (aᵀv)`` over the rows of ``x``, in place on ``v``.

    Zero rows are skipped (they leave v unchanged and do not advance the
    renormalisation counter). Returns the tracked ``‖v‖²`` and the row count.
    """
    n, d = x.shape
    for i in range(n):
        a2 = 0.0
        c = 0.0
        for j in range(d):
            a2 += float(x[i, j]) * float(x[i, j])
            c += float(x[i, j]) * float(v[j])
        if a2 == 0.0:
            continue
        alpha, beta, nu_new, c = _oja_step(v, c, a2, eta, nu, big)
        for j in range(d):
            v[j] = alpha * v[j] + beta * x[i, j]
        nu = nu_new
        count += 1
        if count % every == 0:
            _renormalise(v)
            nu = 1.0
    return nu, count


@numba.njit(cache=True)
def oja_csr(
    indptr: np.ndarray,
    indices: np.ndarray,
    data: np.ndarray,
    v: np.ndarray,
    eta: float,
    nu: float,
    count: int,
    every: int,
    big: float,
) -> tuple[float, int]:  # pragma: no cover - compiled
    """:func:`oja_dense` for CSR rows (O(nnz) per row plus O(d) when α ≠ 1)."""
    n = indptr.shape[0] - 1
    for i in range(n):
        a2 = 0.0
        c = 0.0
        for k in range(indptr[i], indptr[i + 1]):
            a2 += float(data[k]) * float(data[k])
            c += float(data[k]) * float(v[indices[k]])
        if a2 == 0.0:
            continue
        alpha, beta, nu_new, c = _oja_step(v, c, a2, eta, nu, big)
        if alpha != 1.0:
            for j in range(v.shape[0]):
                v[j] = alpha * v[j]
        for k in range(indptr[i], indptr[i + 1]):
            v[indices[k]] += beta * data[k]
        nu = nu_new
        count += 1
        if count % every == 0:
            _renormalise(v)
            nu = 1.0
    return nu, count


@numba.njit(cache=True)
def classify_rows(
    norms2: np.ndarray,
    probes2: np.ndarray,
    start: int,
    scal: np.ndarray,
    det: np.ndarray,
    c_h: float,
    kappa: float,
    flags: np.ndarray,
) -> int:  # pragma: no cover - compiled
    """Heavy-row test of TopEigenvector for rows ``start..`` up to the block end.

    ``scal`` = [t, n_guess, block_end, s_light, s_heavy] is updated in place:
    t counts nonzero rows, the estimate of ‖A‖_F² is
    ``F̂ = (S_L + ‖a‖²)·n/t + S_H`` and a row is heavy when ``‖a‖²·c_h ≥ F̂``.
    While ``t·c_h ≤ 2n`` that test cannot fire (the row's own share is
    extrapolated by n/t), so there a row is also heavy when it exceeds
    ``kappa`` times the running mean of ‖a‖². ``det`` accumulates, over the
    light rows of the block, [count, Σx, Σx²] for x = ‖a‖², (g₁ᵀa)², (g₂ᵀa)².
    ``flags``: 0 light, 1 heavy, 2 zero row (ignored). Returns the index of the
    first row not consumed (a row that would start the next block).
    """
    n = norms2.shape[0]
    t = scal[0]
    n_guess = scal[1]
    block_end = scal[2]
    s_light = scal[3]
    s_heavy = scal[4]
    i = start
    while i < n:
        a2 = norms2[i]
        if a2 == 0.0:
            flags[i] = 2
            i += 1
            continue
        if t >= block_end:
            break
        t += 1.0
        f_hat = (s_light + a2) * n_guess / t + s_heavy
        heavy = a2 * c_h >= f_hat
        if not heavy and t >= 2.0 and t * c_h <= 2.0 * n_guess:
            heavy = a2 * (t - 1.0) >= kappa * (s_light + s_heavy)
        if heavy:
            s_heavy += a2
            flags[i] = 1
        else:
            s_light += a2
            flags[i] = 0
            det[0] += 1.0
            det[1] += a2
            det[2] += a2 * a2
            for k in range(2):
                p = probes2[i, k]
                det[3 + 2 * k] += p
                det[4 + 2 * k] += p * p
        i += 1
    scal[0] = t
    scal[3] = s_light
    scal[4] = s_heavy
    return i


@numba.njit(cache=True)
def row_stats_dense(
    x: np.ndarray, g: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:  # pragma: no cover - compiled
    """One pass over the rows: ‖a‖² and (gₖᵀa)² for the columns of ``g`` (d×m)."""
    n, d = x.shape
    m = g.shape[1]
    norms2 = np.empty(n, dtype=np.float64)
    probes2 = np.empty((n, m), dtype=np.float64)
    acc = np.empty(m, dtype=np.float64)
    for i in range(n):
        s = 0.0
        for k in range(m):
            acc[k] = 0.0
        for j in range(d):
            xij = float(x[i, j])
            s += xij * xij
            for k in range(m):
                acc[k] += xij * g[j, k]
        norms2[i] = s
        for k in range(m):
            probes2[i, k] = acc[k] * acc[k]
    return norms2, probes2
