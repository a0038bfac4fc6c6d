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

#: Reassociation lets LLVM vectorise the dot-product reductions; NaN and Inf
#: semantics are kept (no ``nnan``/``ninf``), so the finiteness tests below hold.
_FAST = {"reassoc", "contract", "nsz", "arcp"}

__all__ = [
    "absorb_dense",
    "classify_rows",
    "heavy_basis",
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
def _add_probe(det: np.ndarray, p: float, k: int) -> None:  # pragma: no cover - compiled
    """Order-test sums of probe k: Σp (mean shifts) and Σp², Σp⁴ (energy shifts)."""
    p2 = p * p
    det[3 + 3 * k] += p
    det[4 + 3 * k] += p2
    det[5 + 3 * k] += p2 * p2


@numba.njit(cache=True)
def classify_rows(
    norms2: np.ndarray,
    probes: np.ndarray,
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
    light rows of the block, [count, Σx, Σx²] for x = ‖a‖², then
    [Σp, Σp², Σp⁴] for each order-test probe p = gₖᵀa (``probes``, n×2).
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
                _add_probe(det, probes[i, k], k)
        i += 1
    scal[0] = t
    scal[3] = s_light
    scal[4] = s_heavy
    return i


@numba.njit(cache=True, fastmath=_FAST)
def _row_dot(x: np.ndarray, i: int, w: np.ndarray, k: int) -> float:  # pragma: no cover
    acc = 0.0
    for j in range(x.shape[1]):
        acc += float(x[i, j]) * w[k, j]
    return acc


@numba.njit(cache=True, fastmath=_FAST)
def _row_sqnorm(x: np.ndarray, i: int) -> float:  # pragma: no cover - compiled
    acc = 0.0
    for j in range(x.shape[1]):
        v = float(x[i, j])
        acc += v * v
    return acc


@numba.njit(cache=True)
def _row_has_nonfinite(x: np.ndarray, i: int) -> bool:  # pragma: no cover - compiled
    for j in range(x.shape[1]):
        if not np.isfinite(x[i, j]):
            return True
    return False


@numba.njit(cache=True, fastmath=_FAST)
def row_stats_dense(
    x: np.ndarray, gt: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:  # pragma: no cover - compiled
    """One pass over the rows: ``‖a‖²`` and ``gₖᵀa`` for the rows of ``gt`` (m×d).

    Each row is read from memory once; the m + 1 reductions then run on it
    from L1 cache.
    """
    n = x.shape[0]
    m = gt.shape[0]
    norms2 = np.empty(n, dtype=np.float64)
    probes = np.empty((n, m), dtype=np.float64)
    for i in range(n):
        norms2[i] = _row_sqnorm(x, i)
        for k in range(m):
            probes[i, k] = _row_dot(x, i, gt, k)
    return norms2, probes


@numba.njit(cache=True, fastmath=_FAST)
def _norm_and_dots(
    x: np.ndarray, i: int, wt: np.ndarray, m0: int
) -> tuple[float, float, float]:  # pragma: no cover - compiled
    """``‖a‖²`` and ``a·w₀``, ``a·w₁`` (the first ``m0 ≤ 2`` rows of ``wt``) for
    row i in one loop over the row: independent sums, one load of each entry."""
    d = x.shape[1]
    s = 0.0
    c0 = 0.0
    c1 = 0.0
    if m0 == 0:
        for j in range(d):
            v = float(x[i, j])
            s += v * v
    elif m0 == 1:
        for j in range(d):
            v = float(x[i, j])
            s += v * v
            c0 += v * wt[0, j]
    else:
        for j in range(d):
            v = float(x[i, j])
            s += v * v
            c0 += v * wt[0, j]
            c1 += v * wt[1, j]
    return s, c0, c1


@numba.njit(cache=True, fastmath=_FAST)
def _light_update(
    x: np.ndarray, i: int, wt: np.ndarray, p: int, yt: np.ndarray, gk: np.ndarray, c: np.ndarray
) -> None:  # pragma: no cover - compiled
    """Light row i: ``c = W a`` (``c[0], c[1]`` given, the rest computed here),
    ``yt += c[:p] aᵀ`` for the p power columns (two per loop over the row), and
    ``gk += c[p:] c[p:]ᵀ`` for the heavy columns (a small Gram, no pass over a)."""
    d = x.shape[1]
    m = wt.shape[0]
    k = 2
    while k + 1 < m:
        c0 = 0.0
        c1 = 0.0
        for j in range(d):
            v = float(x[i, j])
            c0 += v * wt[k, j]
            c1 += v * wt[k + 1, j]
        c[k] = c0
        c[k + 1] = c1
        k += 2
    if k < m:
        c0 = 0.0
        for j in range(d):
            c0 += float(x[i, j]) * wt[k, j]
        c[k] = c0
    k = 0
    while k + 1 < p:
        c0 = c[k]
        c1 = c[k + 1]
        for j in range(d):
            v = float(x[i, j])
            yt[k, j] += c0 * v
            yt[k + 1, j] += c1 * v
        k += 2
    if k < p:
        c0 = c[k]
        for j in range(d):
            yt[k, j] += c0 * float(x[i, j])
    for r1 in range(m - p):
        cr = c[p + r1]
        for r2 in range(m - p):
            gk[r1, r2] += cr * c[p + r2]


@numba.njit(cache=True)
def _sparse_probe(
    x: np.ndarray, i: int, idx: np.ndarray, val: np.ndarray, k: int
) -> float:  # pragma: no cover - compiled
    acc = 0.0
    for t in range(idx.shape[1]):
        acc += val[k, t] * float(x[i, idx[k, t]])
    return acc


@numba.njit(cache=True, fastmath=_FAST)
def absorb_dense(
    x: np.ndarray,
    start: int,
    wt: np.ndarray,
    p: int,
    pidx: np.ndarray,
    pval: np.ndarray,
    scal: np.ndarray,
    det: np.ndarray,
    c_h: float,
    kappa: float,
    flags: np.ndarray,
    yt: np.ndarray,
    gk: np.ndarray,
) -> int:  # pragma: no cover - compiled
    """TopEigenvector's whole per-row work in one pass over dense rows.

    For rows ``start..`` up to the block end (see :func:`classify_rows` for
    ``scal``, ``det``, ``c_h``, ``kappa`` and ``flags``), each row is read from
    memory once and, from cache: its squared norm (which doubles as the NaN/Inf
    test: it is finite unless an entry is not, or it overflows) together with
    its products with the first two columns of W, the heavy test, and for a
    light row the two sparse order-test projections (``pidx``/``pval``, 2×s) and
    the power-iteration update: ``yt += (Wₚᵀa) aᵀ`` for the first ``p`` (power)
    columns of W and ``gk += (Wₖᵀa)(Wₖᵀa)ᵀ`` for the other k (heavy) columns
    (``wt`` = Wᵀ, m×d; ``yt`` p×d; ``gk`` k×k). With ``m = 0`` it only classifies.

    Returns the index of the first row not consumed (a row that would start
    the next block), or ``-(i + 1)`` when row ``i`` holds NaN or Inf: then the
    caller discards ``scal``, ``det``, ``flags``, ``yt`` and ``gk`` (scratch).
    """
    n = x.shape[0]
    m = wt.shape[0]
    m0 = min(m, 2)
    c = np.zeros(max(m, 2), dtype=np.float64)
    t = scal[0]
    n_guess = scal[1]
    block_end = scal[2]
    s_light = scal[3]
    s_heavy = scal[4]
    i = start
    while i < n:
        a2, c0, c1 = _norm_and_dots(x, i, wt, m0)
        if not np.isfinite(a2) and _row_has_nonfinite(x, i):
            return -(i + 1)
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
                _add_probe(det, _sparse_probe(x, i, pidx, pval, k), k)
            if m:
                c[0] = c0
                c[1] = c1
                _light_update(x, i, wt, p, yt, gk, c)
        i += 1
    scal[0] = t
    scal[3] = s_light
    scal[4] = s_heavy
    return i


@numba.njit(cache=True, fastmath=_FAST)
def heavy_basis(h: np.ndarray, rtol: float) -> np.ndarray:  # pragma: no cover - compiled
    """Orthonormal basis (r×d, as rows) of the rows of ``h`` by Gram–Schmidt.

    Rows are taken in order and orthogonalised twice against the basis so far;
    a row whose residual is at most ``rtol`` times its norm adds nothing. The
    result is a canonical function of ``h`` (no sign or rotation freedom), so
    it can be recomputed from the stored rows instead of being stored.
    """
    k, d = h.shape
    q = np.zeros((k, d), dtype=np.float64)
    v = np.empty(d, dtype=np.float64)
    r = 0
    for i in range(k):
        nrm0 = 0.0
        for j in range(d):
            v[j] = float(h[i, j])
            nrm0 += v[j] * v[j]
        if nrm0 == 0.0:
            continue
        for _ in range(2):
            for p in range(r):
                c = 0.0
                for j in range(d):
                    c += q[p, j] * v[j]
                for j in range(d):
                    v[j] -= c * q[p, j]
        nrm = 0.0
        for j in range(d):
            nrm += v[j] * v[j]
        if nrm > rtol * rtol * nrm0:
            inv = 1.0 / math.sqrt(nrm)
            for j in range(d):
                q[r, j] = v[j] * inv
            r += 1
    return q[:r].copy()
