"""Small dense pieces of the truncated-SVD updates: core matrices and the
sparse ("z-space") representation of Deng et al. (2024).

Notation (see :class:`streamfact.operators.svd.IncrementalSVD`): the current
factorisation is ``U diag(s) Vᵀ`` of rank r. An update augments a basis ``W``
(d×r, orthonormal, stored as ``W1 @ K``) with a block ``Y`` (d×p); ``C = Wᵀ Y``
and ``Q R`` is the residual ``(I − W Wᵀ) Y``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numba
import numpy as np
import scipy.sparse as sp

from streamfact.kernels.orthogonalize import Basis, LinAlg

__all__ = [
    "OneSidedStep",
    "ZSpace",
    "core_append",
    "core_low_rank",
    "csr_normal_apply",
    "one_sided_update",
    "truncated_core_svd",
    "z_space",
]


def core_append(s: np.ndarray, c: np.ndarray, r: np.ndarray) -> np.ndarray:
    """The (r+p)×(r+q) core of an append (Zha & Simon 1999, eq. for [A; E])::

    M = [ diag(s)   0  ]
        [   Cᵀ      Rᵀ ]
    """
    k = s.shape[0]
    p = c.shape[1]
    q = r.shape[0]
    m = np.zeros((k + p, k + q), dtype=s.dtype)
    m[:k, :k] = np.diag(s)
    m[k:, :k] = c.T
    m[k:, k:] = r.T
    return m


def core_low_rank(
    s: np.ndarray, cy: np.ndarray, ry: np.ndarray, cz: np.ndarray, rz: np.ndarray
) -> np.ndarray:
    """The core of ``A + Y Zᵀ`` (Brand 2006)::

    M = [diag(s) 0; 0 0] + [Cy; Ry] [Cz; Rz]ᵀ
    """
    k = s.shape[0]
    left = np.concatenate([cy, ry], axis=0)
    right = np.concatenate([cz, rz], axis=0)
    m = left @ right.T
    m[:k, :k] += np.diag(s)
    return m


def truncated_core_svd(
    m: np.ndarray, rank: int, rtol: float, la: LinAlg
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Top-``rank`` SVD ``M ≈ F diag(θ) Gᵀ``, dropping θ_i ≤ rtol·θ_1.

    Returns F (rows×t), θ (t,), G (cols×t) with t ≤ rank.
    """
    f, theta, gt = la.svd(m)
    if theta.size == 0:
        return f, theta, gt.T
    keep = theta > rtol * theta[0]
    keep[rank:] = False
    return f[:, keep], theta[keep], gt[keep].T


@dataclass
class ZSpace:
    """The (u + r)-dimensional isometric image of ``span(e_uid) ⊕ span(W)``.

    A vector ``x = b̃ − W c`` with ``b`` supported on the touched rows ``uid``
    maps to ``z = [b − W_u c; Lᵀ c]`` where ``L Lᵀ = P = I − W_uᵀ W_u`` is the
    Gram of W's rows outside ``uid``. Then ``‖z‖ = ‖x‖`` and ``⟨z, z'⟩ = ⟨x, x'⟩``,
    so Gram–Schmidt, Lanczos and power iteration run on (u + r)-vectors instead
    of d-vectors (Deng et al. 2024, SV-LCOV, §3), with explicit vectors and
    therefore the usual re-orthogonalisation safeguards.
    """

    uid: np.ndarray  # touched row indices of W (u,)
    wu: np.ndarray  # W[uid] (u×r)
    evecs: np.ndarray  # eigenvectors of P (r×r)
    sqrt_lam: np.ndarray  # sqrt of eigenvalues of P (r,)
    basis: Basis  # J_z = [W_u; −Lᵀ] ((u+r)×r), orthonormal
    y: Any  # [Y_u; 0] ((u+r)×p), sparse or dense
    c: np.ndarray  # C = W_uᵀ Y_u (r×p)

    def to_pair(self, qz: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Map z-space columns back to pairs (B̂ on uid, Ĉ) with x = B̃̂ − W Ĉ."""
        u = self.uid.shape[0]
        c_hat = self.evecs @ (qz[u:] / self.sqrt_lam[:, None])
        b_hat = qz[:u] + self.wu @ c_hat
        return b_hat, c_hat


def z_space(
    w1: np.ndarray,
    k: np.ndarray,
    y: Any,
    uid: np.ndarray,
    *,
    min_outside: float,
    la: LinAlg,
) -> ZSpace | None:
    """Build the z-space of ``W = w1 @ k`` for a block ``y`` (d×p) supported on ``uid``.

    Returns ``None`` when some direction of W has less than ``min_outside`` of
    its energy outside ``uid`` (λ_min(P) < min_outside): mapping back would
    amplify rounding by 1/λ_min, so the caller uses the dense residual.
    Cost O(u r² + r³ + nnz(Y) r).
    """
    r = k.shape[0]
    wu = w1[uid] @ k
    p_mat = np.eye(r, dtype=k.dtype) - wu.T @ wu
    lam, evecs = np.linalg.eigh((p_mat + p_mat.T) / 2)
    if r and lam[0] < min_outside:
        return None
    sqrt_lam = np.sqrt(lam)
    lt = sqrt_lam[:, None] * evecs.T  # Lᵀ with L = evecs diag(sqrt_lam)
    jz = np.concatenate([wu, -lt], axis=0)
    if sp.issparse(y):
        yu = sp.csr_array(y)[uid]
        yz: Any = sp.vstack([yu, sp.csr_array((r, y.shape[1]), dtype=yu.dtype)], format="csr")
        c = np.asarray((sp.csr_array(yu.T) @ wu).T)
    else:
        yu_d = np.asarray(y)[uid]
        yz = np.concatenate([yu_d, np.zeros((r, yu_d.shape[1]), dtype=yu_d.dtype)], axis=0)
        c = wu.T @ yu_d
    return ZSpace(uid, wu, evecs, sqrt_lam, Basis(jz, None, la), yz, c)


@dataclass
class OneSidedStep:
    """Result of :func:`one_sided_update`: the new factors as changes of the old.

    With ``W_f`` the fully resolved side and ``W_s`` the sketched side (both
    orthonormal, ``r`` columns), the updated factors are::

        W_f' = W_f a_full + D̃,    D̃ = d_full placed on the touched rows of W_f
        W_s' = W_s a_sketch + B̃,  B̃ = b_sketch placed on the touched rows of W_s

    and the new singular values are ``theta``.
    """

    theta: np.ndarray  # (t,)
    a_full: np.ndarray  # (r×t)
    d_full: np.ndarray  # (u_f×t)
    a_sketch: np.ndarray  # (r×t)
    b_sketch: np.ndarray  # (u_s×t)
    n_directions: int  # residual directions used on the sketched side
    n_excluded: int  # directions of W_s (almost) inside the touched rows


def _metric_orth(
    b: np.ndarray, ws: np.ndarray, z_bad: np.ndarray, rel: float, passes: int
) -> tuple[np.ndarray, np.ndarray]:
    """Orthonormalise the vectors ``x_i = b̃_i − W c_i`` (``c = W_sᵀ b``).

    ``b`` lives on the touched rows (u×q) and ``ws = W[touched]``; because
    ``c = Wᵀ b̃``, ``⟨x_i, x_j⟩ = b_iᵀ b_j − c_iᵀ c_j`` (Deng et al. 2024,
    SV-LCOV) and Cholesky-QR in that metric needs no d-vector. Directions of
    W that lie almost entirely on the touched rows (``z_bad``) are removed
    first, so that ‖x‖² ≥ τ‖b‖² for every remaining b and the metric Gram is
    accurate to ε/τ; ``passes = 2`` is Cholesky-QR2. Eigen-directions of the
    Gram below ``rel`` times its largest eigenvalue are dropped.
    """
    if z_bad.shape[1]:
        b = b - z_bad @ (z_bad.T @ b)
    c = ws.T @ b
    for _ in range(passes):
        g = b.T @ b - c.T @ c
        lam, w = np.linalg.eigh((g + g.T) / 2)
        if lam.size == 0 or lam[-1] <= 0.0:
            return b[:, :0], c[:, :0]
        keep = lam > rel * lam[-1]
        t = w[:, keep] / np.sqrt(lam[keep])
        b = b @ t
        c = c @ t
    return b, c


def one_sided_update(
    s: np.ndarray,
    wf: np.ndarray,
    ws: np.ndarray,
    e: sp.csr_array,
    *,
    rank: int,
    n_directions: int,
    power_iterations: int,
    rtol: float,
    tau: float,
    rng: np.random.Generator,
) -> OneSidedStep:
    """Rank-``rank`` update of ``Â = W_f diag(s) W_sᵀ + E`` touching only rows of E.

    ``E`` is given compactly (``e``: u_f×u_s, its nonzero rows × nonzero
    columns), ``wf`` and ``ws`` are the rows of the two orthonormal factors
    at those indices (zero rows for indices that are new).

    Rayleigh–Ritz with the sketched-side space ``R = [W_s, Q]`` and the *full*
    other side (the whole range of ``Â R``, which is what an exact row append
    uses for its new rows)::

        T = Â R = W_f [diag(s), 0] + Ẽ R,   TᵀT = G Θ² Gᵀ,
        W_s' = R G_k,   W_f' = T G_k Θ_k⁻¹,   s' = θ_k.

    ``Q`` (⟂ W_s) spans ``n_directions`` directions of the residual
    ``X = (I − W_s W_sᵀ) Eᵀ`` found by a randomized range finder with
    ``power_iterations`` power steps (Halko et al. 2011; Yamazaki et al.
    2015), or all of range(X) when ``min(u_f, u_s) ≤ n_directions``; in both
    cases X is applied in Deng et al.'s pair form ``x = b̃ − W_s c``, so no
    vector of the full length is formed. The core is the (r+q)×(r+q) Gram TᵀT
    (the QR-free form of the notes, §3.5), accumulated from
    ``ER`` (u_f×(r+q)) and ``W_fᵀ ER``; its eigenvalues carry relative error
    ~ε(θ_1/θ_i)².

    The result is the exact top-``rank`` SVD of Â when Q spans range(X)
    (l ≥ rank(X)) and no direction of W_s was excluded (those whose energy on
    the touched rows exceeds ``1 − tau``: their residual cannot be represented
    stably in pair form and is left out).

    Cost O(nnz(E)(r + l)(t + 1) + (u_f + u_s)(r + l)² + (r + l)³), independent
    of the dimensions of the matrix.
    """
    dtype = s.dtype
    r = s.shape[0]
    u_f, u_s = e.shape
    ew = np.asarray(e @ ws)  # E W_s (u_f×r)
    # Directions of W_s that (almost) live on the touched rows: σ²(W_s[uid]) > 1 − τ.
    sig2, y = np.linalg.eigh(ws.T @ ws)
    bad = sig2 > 1.0 - tau
    if bad.any():
        z_bad, _ = np.linalg.qr(ws @ (y[:, bad] / np.sqrt(sig2[bad])))
    else:
        z_bad = np.zeros((u_s, 0), dtype=dtype)
    eps = float(np.finfo(dtype).eps)
    l_dirs = int(n_directions)
    et = sp.csr_array(e.T)
    if min(u_f, u_s) <= l_dirs:
        # The whole residual range: exact.
        b = np.eye(u_s, dtype=dtype) if u_s <= u_f else np.asarray(e.T.toarray(), dtype=dtype)
        b, c = _metric_orth(b, ws, z_bad, max(rtol**2, 16 * eps), 2)
    else:
        omega = rng.standard_normal((u_f, l_dirs)).astype(dtype)
        b = np.asarray(et @ omega)
        for _ in range(int(power_iterations)):
            b, c = _metric_orth(b, ws, z_bad, 16 * eps, 1)
            b = np.asarray(et @ (np.asarray(e @ b) - ew @ c))
        b, c = _metric_orth(b, ws, z_bad, 16 * eps, 2)
    q = b.shape[1]
    er = np.empty((u_f, r + q), dtype=dtype)
    er[:, :r] = ew
    er[:, r:] = np.asarray(e @ b) - ew @ c
    sh = s[:, None] * (wf.T @ er)  # diag(s) W_fᵀ E R  (r×(r+q))
    gam = er.T @ er
    gam[:r] += sh
    gam[:, :r] += sh.T
    gam[np.arange(r), np.arange(r)] += s * s
    lam, g = np.linalg.eigh((gam + gam.T) / 2)
    lam, g = lam[::-1][:rank], g[:, ::-1][:, :rank]
    if lam.size == 0 or lam[0] <= 0.0:
        theta = np.zeros(0, dtype=dtype)
        g = g[:, :0]
    else:
        theta = np.sqrt(np.maximum(lam, 0.0))
        keep = theta > max(rtol, 4.0 * np.sqrt(eps)) * theta[0]
        theta, g = theta[keep], g[:, keep]
    g_top, g_bot = g[:r], g[r:]
    return OneSidedStep(
        theta=theta.astype(dtype, copy=False),
        a_full=(s[:, None] * g_top) / theta,
        d_full=(er @ g) / theta,
        a_sketch=g_top - c @ g_bot,
        b_sketch=b @ g_bot,
        n_directions=q,
        n_excluded=int(bad.sum()),
    )


@numba.njit(cache=True, nogil=True)
def _csr_normal_kernel(
    indptr: np.ndarray,
    indices: np.ndarray,
    data: np.ndarray,
    v: np.ndarray,
    y: np.ndarray,
    z: np.ndarray,
) -> None:  # pragma: no cover - compiled
    k = v.shape[1]
    for i in range(indptr.size - 1):
        lo, hi = indptr[i], indptr[i + 1]
        for p in range(lo, hi):
            a = data[p]
            j = indices[p]
            for c in range(k):
                y[i, c] += a * v[j, c]
        for p in range(lo, hi):
            a = data[p]
            j = indices[p]
            for c in range(k):
                z[j, c] += a * y[i, c]


def csr_normal_apply(a: sp.csr_array, v: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``Y = A V`` and ``Z = Aᵀ Y`` in one pass over the rows of a CSR ``A``.

    Row i's ``y_i = a_i V`` is formed and immediately scattered into
    ``Z += a_iᵀ y_i`` while it is in cache, so A is read once and no
    transposed copy is built (a per-row sequential numba loop). O(nnz(A) k).
    """
    m, n = a.shape
    vc = np.ascontiguousarray(v)
    y = np.zeros((m, vc.shape[1]), dtype=vc.dtype)
    z = np.zeros((n, vc.shape[1]), dtype=vc.dtype)
    _csr_normal_kernel(a.indptr, a.indices, a.data.astype(vc.dtype, copy=False), vc, y, z)
    return y, z
