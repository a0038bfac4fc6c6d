"""Per-point FIGMN kernel (Pinto & Engel 2015) on precision matrices, in numba.

One call walks the rows of ``X`` in order. For each row it computes every
component's Mahalanobis distance, then either creates a component (novelty
test) or updates every component with a non-negligible posterior by a rank-one
change of its precision matrix and log-determinant. Cost O(K D²) per row.

The component arrays are preallocated with a capacity; when a row needs a new
component and the capacity is full, the kernel stops and returns that row's
index, so the caller can grow the arrays and call again from there. Row order is
the only thing that matters: cutting the same sequence into different calls
gives bit-identical results.

Counters (``counters`` int64 array, in order): points seen, components created,
components removed, log-det resyncs, precision repairs, paper-mode guards.
"""

from __future__ import annotations

import math

import numba
import numpy as np

__all__ = [
    "CNT_CREATED",
    "CNT_GUARDS",
    "CNT_REMOVED",
    "CNT_REPAIRS",
    "CNT_RESYNCS",
    "CNT_SEEN",
    "N_COUNTERS",
    "figmn_points",
    "resync_component",
    "scatter_stats",
]

CNT_SEEN = 0
CNT_CREATED = 1
CNT_REMOVED = 2
CNT_RESYNCS = 3
CNT_REPAIRS = 4
CNT_GUARDS = 5
N_COUNTERS = 6

_LOG_2PI = math.log(2.0 * math.pi)
# exp() below this is subnormal or zero; flushing avoids slow subnormal arithmetic.
_FLUSH_LOG = -700.0

# No nnan/ninf: the kernel must keep IEEE semantics for its checks.
_FASTMATH = {"reassoc", "contract", "arcp", "nsz"}


@numba.njit(cache=True)
def _cholesky_lower(a: np.ndarray, out: np.ndarray) -> bool:
    """In-place-free Cholesky of the symmetric ``a`` into ``out`` (lower); False if not PD."""
    d = a.shape[0]
    for i in range(d):
        for j in range(i + 1):
            s = a[i, j]
            for k in range(j):
                s -= out[i, k] * out[j, k]
            if i == j:
                if not (s > 0.0):
                    return False
                out[i, i] = math.sqrt(s)
            else:
                out[i, j] = s / out[j, j]
        for j in range(i + 1, d):
            out[i, j] = 0.0
    return True


@numba.njit(cache=True)
def resync_component(
    lam: np.ndarray, logdet: np.ndarray, j: int, work: np.ndarray, tol: float, counters: np.ndarray
) -> None:
    """Re-symmetrise Λ_j, check it by Cholesky and resync log|C_j|.

    On a failed Cholesky the precision is repaired by clipping its eigenvalues
    to a small positive fraction of the largest one.
    """
    d = lam.shape[1]
    for a in range(d):
        for b in range(a + 1, d):
            m = 0.5 * (lam[j, a, b] + lam[j, b, a])
            lam[j, a, b] = m
            lam[j, b, a] = m
    if _cholesky_lower(lam[j], work):
        ld = 0.0
        for a in range(d):
            ld -= 2.0 * math.log(work[a, a])
        if abs(ld - logdet[j]) > tol * d:
            logdet[j] = ld
            counters[CNT_RESYNCS] += 1
        return
    sym = np.empty((d, d), dtype=np.float64)
    for a in range(d):
        for b in range(d):
            sym[a, b] = lam[j, a, b]
    w, v = np.linalg.eigh(sym)
    floor = max(w[d - 1], 1e-300) * 1e-12
    ld = 0.0
    for a in range(d):
        if w[a] < floor:
            w[a] = floor
        ld -= math.log(w[a])
    for a in range(d):
        for b in range(d):
            s = 0.0
            for k in range(d):
                s += v[a, k] * w[k] * v[b, k]
            lam[j, a, b] = s
    logdet[j] = ld
    counters[CNT_REPAIRS] += 1


@numba.njit(cache=True)
def _create(
    x: np.ndarray,
    mu: np.ndarray,
    lam: np.ndarray,
    logdet: np.ndarray,
    sp: np.ndarray,
    age: np.ndarray,
    ucount: np.ndarray,
    k: int,
    sigma2: np.ndarray,
) -> None:
    d = x.shape[0]
    ld = 0.0
    for a in range(d):
        mu[k, a] = x[a]
        for b in range(d):
            lam[k, a, b] = 0.0
        lam[k, a, a] = 1.0 / sigma2[a]
        ld += math.log(sigma2[a])
    logdet[k] = ld
    sp[k] = 1.0
    age[k] = 1
    ucount[k] = 0


@numba.njit(cache=True)
def _remove(
    j: int,
    k: int,
    mu: np.ndarray,
    lam: np.ndarray,
    logdet: np.ndarray,
    sp: np.ndarray,
    age: np.ndarray,
    ucount: np.ndarray,
) -> None:
    for i in range(j, k - 1):
        mu[i] = mu[i + 1]
        lam[i] = lam[i + 1]
        logdet[i] = logdet[i + 1]
        sp[i] = sp[i + 1]
        age[i] = age[i + 1]
        ucount[i] = ucount[i + 1]


@numba.njit(cache=True, fastmath=_FASTMATH)
def figmn_points(
    X: np.ndarray,
    start: int,
    mu: np.ndarray,
    lam: np.ndarray,
    logdet: np.ndarray,
    sp: np.ndarray,
    age: np.ndarray,
    ucount: np.ndarray,
    k_in: int,
    sigma2: np.ndarray,
    chi2_thr: float,
    n0: float,
    v_min: float,
    sp_min: float,
    skip: float,
    paper: bool,
    resync_every: int,
    resync_tol: float,
    counters: np.ndarray,
) -> tuple[int, int]:
    """Process rows ``start..`` of ``X``; return ``(K, next_row)``.

    ``next_row < len(X)`` means the capacity ``mu.shape[0]`` was exhausted.
    """
    n, d = X.shape
    cap = mu.shape[0]
    k = k_in
    dt = lam.dtype
    E = np.empty((cap, d), dtype=dt)
    U = np.empty((cap, d), dtype=dt)
    d2 = np.empty(cap, dtype=np.float64)
    ll = np.empty(cap, dtype=np.float64)
    q = np.empty(d, dtype=dt)
    z = np.empty(d, dtype=dt)
    es = np.empty(d, dtype=dt)
    dmu = np.empty(d, dtype=dt)
    work = np.empty((d, d), dtype=np.float64)
    half_dlog2pi = 0.5 * d * _LOG_2PI
    for i in range(start, n):
        x = X[i]
        # 1. distances to every component (step 1)
        dmin = np.inf
        for j in range(k):
            for a in range(d):
                E[j, a] = x[a] - mu[j, a]
            s = 0.0
            for a in range(d):
                acc = 0.0
                for b in range(d):
                    acc += lam[j, a, b] * E[j, b]
                U[j, a] = acc
                s += acc * E[j, a]
            if s < 0.0:
                s = 0.0
            d2[j] = s
            if s < dmin:
                dmin = s
        # 2. novelty: create XOR update
        if k == 0 or dmin > chi2_thr:
            if k == cap:
                return k, i
            _create(x, mu, lam, logdet, sp, age, ucount, k, sigma2)
            k += 1
            counters[CNT_CREATED] += 1
            counters[CNT_SEEN] += 1
            continue
        # 3. log-domain posterior
        tot = 0.0
        for j in range(k):
            tot += sp[j]
        log_tot = math.log(tot)
        m = -np.inf
        for j in range(k):
            v = math.log(sp[j]) - log_tot - half_dlog2pi - 0.5 * (logdet[j] + d2[j])
            ll[j] = v
            if v > m:
                m = v
        z_sum = 0.0
        for j in range(k):
            t = ll[j] - m
            if t < _FLUSH_LOG:
                ll[j] = 0.0
            else:
                ll[j] = math.exp(t)
                z_sum += ll[j]
        for j in range(k):
            p = ll[j] / z_sum
            # 4. accumulators
            age[j] += 1
            sp[j] += p
            if p <= skip:
                continue
            w = p / (sp[j] + n0 - 1.0)
            # 5. mean / precision / log-det
            if not paper:
                # exact weighted Welford: C' = (1-w)(C + w e eᵀ) via Sherman–Morrison
                dj = d2[j]
                c = w / (1.0 + w * dj)
                sc = 1.0 / (1.0 - w)
                for a in range(d):
                    ua = U[j, a]
                    for b in range(d):
                        lam[j, a, b] = (lam[j, a, b] - c * (ua * U[j, b])) * sc
                logdet[j] += d * math.log1p(-w) + math.log1p(w * dj)
                for a in range(d):
                    mu[j, a] += w * E[j, a]
            else:
                # paper eqs 11, 20, 21, 25, 26
                for a in range(d):
                    dmu[a] = w * E[j, a]
                    mu[j, a] += dmu[a]
                    es[a] = x[a] - mu[j, a]
                s1 = 0.0
                for a in range(d):
                    acc = 0.0
                    for b in range(d):
                        acc += lam[j, a, b] * es[b]
                    q[a] = acc
                    s1 += acc * es[a]
                r = w / (1.0 - w)
                c1 = (w / ((1.0 - w) * (1.0 - w))) / (1.0 + r * s1)
                sc = 1.0 / (1.0 - w)
                for a in range(d):
                    qa = q[a]
                    for b in range(d):
                        lam[j, a, b] = lam[j, a, b] * sc - c1 * (qa * q[b])
                t2 = 0.0
                for a in range(d):
                    acc = 0.0
                    for b in range(d):
                        acc += lam[j, a, b] * dmu[b]
                    z[a] = acc
                    t2 += acc * dmu[a]
                logdet[j] += d * math.log1p(-w) + math.log1p(r * s1)
                if 1.0 - t2 > 0.0:
                    c2 = 1.0 / (1.0 - t2)
                    for a in range(d):
                        za = z[a]
                        for b in range(d):
                            lam[j, a, b] += c2 * (za * z[b])
                    logdet[j] += math.log(1.0 - t2)
                else:
                    # eq. 21 would make C indefinite (Finding 1): keep Λ̄ and count it.
                    counters[CNT_GUARDS] += 1
            ucount[j] += 1
            if resync_every > 0 and ucount[j] >= resync_every:
                ucount[j] = 0
                resync_component(lam, logdet, j, work, resync_tol, counters)
        counters[CNT_SEEN] += 1
        # 6. pruning
        j = 0
        while j < k:
            if age[j] > v_min and sp[j] < sp_min:
                _remove(j, k, mu, lam, logdet, sp, age, ucount)
                k -= 1
                counters[CNT_REMOVED] += 1
            else:
                j += 1
    return k, n


@numba.njit(cache=True, fastmath=_FASTMATH)
def scatter_stats(
    X: np.ndarray, R: np.ndarray, means: np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Responsibility-weighted sums of one batch about the frozen means.

    Returns N_j = Σ_i r_ij, s_j = Σ_i r_ij e_ij and G_j = Σ_i r_ij e_ij e_ijᵀ
    with e_ij = x_i - μ_j, in float64. Only the (row, component) pairs with
    r_ij > 0 are visited (responsibilities are flushed to exact zeros
    upstream), so the cost is O(D²) per such pair: close to B·D² on
    separated data instead of the dense K·B·D². The scatter about the batch
    mean is then G_j - s_j s_jᵀ / N_j, which is centred per component and so
    free of the cancellation of raw second moments.
    """
    b, d = X.shape
    k = means.shape[0]
    N = np.zeros(k, dtype=np.float64)
    S = np.zeros((k, d), dtype=np.float64)
    G = np.zeros((k, d, d), dtype=np.float64)
    e = np.empty(d, dtype=np.float64)
    for i in range(b):
        for j in range(k):
            r = R[i, j]
            if r <= 0.0:
                continue
            N[j] += r
            for a in range(d):
                e[a] = X[i, a] - means[j, a]
                S[j, a] += r * e[a]
            for a in range(d):
                ra = r * e[a]
                for c in range(a + 1):
                    G[j, a, c] += ra * e[c]
    for j in range(k):
        for a in range(d):
            for c in range(a):
                G[j, c, a] = G[j, a, c]
    return N, S, G
