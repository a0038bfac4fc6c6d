"""Orthonormal bases for the part of a block that a basis does not explain.

Every truncated-SVD updater (Zha & Simon 1999, Brand 2006, Vecharynski & Saad
2014, Yamazaki et al. 2015, Deng et al. 2024) needs, for an orthonormal basis
``J`` (d×r) and a block ``Y`` (d×p), an orthonormal ``Q`` spanning (or, for the
approximate variants, approximating) the range of the residual::

    X = (I − J Jᵀ) Y = Y − J C,      C = Jᵀ Y,

together with ``R = Qᵀ X`` so that ``X ≈ Q R``. This module computes that pair
in three ways (exact, Golub–Kahan–Lanczos, randomized power iteration) with
the dense math routed through :class:`LinAlg` (numpy or torch).

All drop thresholds are relative to ``‖Y‖_F``: rescaling the data rescales
nothing else.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import scipy.linalg as sla
import scipy.sparse as sp

from streamfact.kernels.backend import Backend, to_numpy, torch_dtype

__all__ = ["Basis", "LinAlg", "cholesky_qr", "gram_factor", "residual_basis"]


class LinAlg:
    """QR, thin SVD, symmetric eigendecomposition and GEMM on one backend.

    Arguments and results are numpy arrays; with a torch backend the work is
    done by torch on its device and copied back.
    """

    def __init__(self, backend: Backend) -> None:
        self.backend = backend

    @property
    def is_torch(self) -> bool:
        return self.backend.is_torch

    def _t(self, a: np.ndarray) -> Any:
        import torch

        return torch.as_tensor(np.ascontiguousarray(a), device=self.backend.device)

    def mm(self, a: np.ndarray, b: np.ndarray) -> np.ndarray:
        if not self.is_torch or a.size == 0 or b.size == 0:
            return np.asarray(a @ b)
        return to_numpy(self._t(a) @ self._t(b))

    def qr(self, a: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Reduced QR, ``a`` (d×p) → Q (d×min(d,p)), R (min(d,p)×p)."""
        if a.shape[0] == 0 or a.shape[1] == 0:
            kk = min(a.shape)
            return np.zeros((a.shape[0], kk), a.dtype), np.zeros((kk, a.shape[1]), a.dtype)
        if self.is_torch:
            import torch

            q, r = torch.linalg.qr(self._t(a), mode="reduced")
            return to_numpy(q), to_numpy(r)
        q, r = np.linalg.qr(a)
        return np.asarray(q), np.asarray(r)

    def svd(self, a: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Thin SVD with singular values descending."""
        d, p = a.shape
        kk = min(d, p)
        if kk == 0:
            return (np.zeros((d, 0), a.dtype), np.zeros(0, a.dtype), np.zeros((0, p), a.dtype))
        if self.is_torch:
            import torch

            u, s, vt = torch.linalg.svd(self._t(a), full_matrices=False)
            return to_numpy(u), to_numpy(s), to_numpy(vt)
        try:
            u, s, vt = sla.svd(a, full_matrices=False, lapack_driver="gesdd", check_finite=False)
        except np.linalg.LinAlgError:  # gesdd occasionally fails to converge; gesvd does not
            u, s, vt = sla.svd(a, full_matrices=False, lapack_driver="gesvd", check_finite=False)
        return u, s, vt

    def eigh(self, a: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        if a.shape[0] == 0:
            return np.zeros(0, a.dtype), np.zeros((0, 0), a.dtype)
        if self.is_torch:
            import torch

            w, v = torch.linalg.eigh(self._t(a).to(torch_dtype(a.dtype)))
            return to_numpy(w), to_numpy(v)
        w, v = np.linalg.eigh(a)
        return w, v


class Basis:
    """An orthonormal basis held as ``J = J1 @ K`` (``K`` may be the identity).

    Products with ``J`` never form ``J1 @ K`` (which would cost O(d r²)).
    """

    def __init__(self, j1: np.ndarray, k: np.ndarray | None, la: LinAlg) -> None:
        self.j1 = j1
        self.k = k
        self.la = la

    @property
    def r(self) -> int:
        return int(self.j1.shape[1])

    def apply(self, c: np.ndarray) -> np.ndarray:
        """J c."""
        kc = c if self.k is None else self.k @ c
        return self.la.mm(self.j1, kc)

    def apply_t(self, x: np.ndarray) -> np.ndarray:
        """Jᵀ x for dense x."""
        jx = self.la.mm(self.j1.T, x)
        return jx if self.k is None else self.k.T @ jx

    def apply_t_any(self, y: Any) -> np.ndarray:
        """Jᵀ y for dense or sparse y (d×p)."""
        if sp.issparse(y):
            jy = np.asarray((sp.csr_array(y.T) @ self.j1).T)
            return jy if self.k is None else self.k.T @ jy
        return self.apply_t(np.asarray(y))

    def project_out(self, x: np.ndarray) -> np.ndarray:
        return x - self.apply(self.apply_t(x))


def gram_factor(g: np.ndarray, rel: float) -> tuple[np.ndarray, np.ndarray]:
    """From a Gram ``g = YᵀY`` (p×p) return ``(T, R)`` with ``Y T`` orthonormal
    and ``Y ≈ (Y T) R``; eigen-directions below ``rel·λ_max`` are dropped, so a
    rank-deficient Y gives fewer columns instead of a breakdown. O(p³)."""
    lam, w = np.linalg.eigh((g + g.T) / 2)
    if lam.size == 0 or lam[-1] <= 0.0:
        p = g.shape[0]
        return np.zeros((p, 0), dtype=g.dtype), np.zeros((0, p), dtype=g.dtype)
    keep = lam > rel * lam[-1]
    lam, w = lam[keep][::-1], w[:, keep][:, ::-1]
    root = np.sqrt(lam)
    return w / root, root[:, None] * w.T


def cholesky_qr(
    y: np.ndarray, la: LinAlg, passes: int = 2, rel: float | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Orthonormal ``Q`` (d×q) and ``R`` (q×p) with ``Y = Q R``, through the Gram.

    Cholesky-QR2 (Fukaya et al. 2014) in its eigen-decomposition form: each
    pass costs two GEMMs (YᵀY and Y T), far cheaper than Householder QR on
    tall blocks, and two passes are orthonormal to O(ε) when
    cond(Y) ≲ ε^-½. Directions with ``σ² ≤ rel·σ_max²`` (default 100·ε) are
    dropped. O(d p²).
    """
    eps = float(np.finfo(y.dtype).eps)
    rel_ = 100.0 * eps if rel is None else rel
    r_acc = np.eye(y.shape[1], dtype=y.dtype)
    q = y
    for _ in range(passes):
        t, r = gram_factor(la.mm(q.T, q), rel_)
        q = la.mm(q, t)
        r_acc = r @ r_acc
    return q, r_acc


def _fro(y: Any) -> float:
    if sp.issparse(y):
        return float(np.linalg.norm(sp.csr_array(y).data))
    return float(np.linalg.norm(y))


def _dense(y: Any) -> np.ndarray:
    return np.asarray(y.toarray()) if sp.issparse(y) else np.asarray(y)


def _finish(
    q: np.ndarray, y: Any, c: np.ndarray, basis: Basis, cutoff: float, la: LinAlg
) -> tuple[np.ndarray, np.ndarray]:
    """Rotate an orthonormal ``q`` so that ``R = Qᵀ X`` is diagonal-dominant and
    drop the directions whose share of ``X`` is below ``cutoff``."""
    if q.shape[1] == 0:
        return q, np.zeros((0, c.shape[1]), dtype=q.dtype)
    if sp.issparse(y):
        qty = np.asarray((sp.csr_array(y.T) @ q).T)
    else:
        qty = la.mm(q.T, np.asarray(y))
    r = qty - basis.apply_t(q).T @ c
    fr, sig, gt = la.svd(r)
    keep = sig > cutoff
    return la.mm(q, fr[:, keep]), sig[keep, None] * gt[keep]


def _well_conditioned(r: np.ndarray, cutoff: float, limit: float = 1e3) -> bool:
    """Is the triangular ``r`` (q×p) square, with cond₁ ≤ ``limit`` and all
    diagonal entries above ``cutoff``? O(p²) via LAPACK ``trcon``."""
    if r.shape[0] != r.shape[1] or r.shape[0] == 0:
        return False
    diag = np.abs(np.diag(r))
    if diag.min() <= cutoff:
        return False
    trcon = sla.get_lapack_funcs("trcon", (r,))
    rcond, info = trcon(np.asfortranarray(r), norm="1", uplo="U", diag="N")
    return bool(info == 0 and rcond * limit >= 1.0)


def residual_basis(
    basis: Basis,
    y: Any,
    c: np.ndarray,
    *,
    kind: str,
    rtol: float,
    la: LinAlg,
    n_directions: int = 10,
    power_iterations: int = 3,
    rng: np.random.Generator | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """An orthonormal ``Q`` (d×q), ``Q ⟂ J``, and ``R`` (q×p) with ``X ≈ Q R``.

    ``X = Y − J C`` with ``C = Jᵀ Y`` given. ``kind``:

    * ``"exact"``: the full range of X (Zha–Simon), projected twice against J
      ("twice is enough") and once more after normalisation, then a rank
      revealing SVD of the small triangular factor. O(d p (r + p)).
    * ``"gkl"``: ``n_directions`` steps of Golub–Kahan–Lanczos bidiagonalisation
      of X with full re-orthogonalisation (Vecharynski & Saad 2014), restarted
      on breakdown so that ``n_directions ≥ p`` reproduces the exact range.
      O((nnz(Y) + d r) l + d l²).
    * ``"rpi"``: randomized range finder with ``power_iterations`` QR-stabilised
      power steps (Yamazaki et al. 2015). O((nnz(Y) + d r) l t + d l² t).

    Directions whose singular value in X is ≤ ``rtol·‖Y‖_F`` are dropped.
    """
    d, p = y.shape
    dtype = c.dtype
    scale = _fro(y)
    empty = (np.zeros((d, 0), dtype=dtype), np.zeros((0, p), dtype=dtype))
    if p == 0 or scale == 0.0 or d == 0:
        return empty
    cutoff = rtol * scale
    if kind == "exact":
        x = _dense(y) - basis.apply(c)
        x = basis.project_out(x)
        q0, r0 = la.qr(x)
        if _well_conditioned(r0, cutoff):
            # Q0's component along J is ~ε‖X‖·‖R0⁻¹‖ ≤ ε·1e3: no rank drop and
            # no third projection needed (the common case, one QR in all).
            return q0, r0
        fr, sig, gt = la.svd(r0)
        keep = sig > cutoff
        if not keep.any():
            return empty
        q = la.mm(q0, fr[:, keep])
        r = sig[keep, None] * gt[keep]
        # q's residual component along J is ~ε‖X‖/σ_i; one more projection and
        # a QR make it ε for every kept direction.
        q, r2 = la.qr(basis.project_out(q))
        return q, r2 @ r
    if rng is None:
        raise ValueError("approximate residual bases need a random Generator")
    ysp = sp.csr_array(y) if sp.issparse(y) else None
    yt = sp.csr_array(y.T) if ysp is not None else None

    def xmul(a: np.ndarray) -> np.ndarray:
        ya = (ysp @ a) if ysp is not None else la.mm(np.asarray(y), a)
        return np.asarray(ya) - basis.apply(c @ a)

    def xtmul(z: np.ndarray) -> np.ndarray:
        ytz = (yt @ z) if yt is not None else la.mm(np.asarray(y).T, z)
        return np.asarray(ytz) - c.T @ basis.apply_t(z)

    limit = min(p, d - basis.r)
    if limit <= 0:
        return empty
    l_dirs = min(int(n_directions), limit)
    if kind == "rpi":
        omega = rng.standard_normal((p, l_dirs)).astype(dtype)
        q, _ = la.qr(basis.project_out(xmul(omega)))
        for _ in range(int(power_iterations)):
            q, _ = la.qr(basis.project_out(xmul(xtmul(q))))
        return _finish(q, y, c, basis, cutoff, la)
    if kind == "gkl":
        qs = np.zeros((d, 0), dtype=dtype)
        ps = np.zeros((p, 0), dtype=dtype)
        v = rng.standard_normal(p).astype(dtype)
        v /= np.linalg.norm(v)
        restarts = 0
        while qs.shape[1] < l_dirs:
            u = xmul(v[:, None])[:, 0]
            for _ in range(2):
                u = basis.project_out(u[:, None])[:, 0]
                u = u - qs @ (qs.T @ u)
            alpha = float(np.linalg.norm(u))
            ps = np.concatenate([ps, v[:, None]], axis=1)
            if alpha > cutoff:
                qs = np.concatenate([qs, (u / alpha)[:, None]], axis=1)
                w = xtmul(qs[:, -1:])[:, 0]
            else:
                w = np.zeros(p, dtype=dtype)
            for _ in range(2):
                w = w - ps @ (ps.T @ w)
            beta = float(np.linalg.norm(w))
            if beta <= cutoff:
                # Krylov space exhausted: restart from a fresh random direction
                # orthogonal to the ones used, so that l ≥ p reaches all of X.
                if ps.shape[1] >= p or restarts > p:
                    break
                restarts += 1
                w = rng.standard_normal(p).astype(dtype)
                for _ in range(2):
                    w = w - ps @ (ps.T @ w)
                beta = float(np.linalg.norm(w))
                if beta == 0.0:
                    break
            v = w / beta
        return _finish(qs, y, c, basis, cutoff, la)
    raise ValueError(f"unknown residual kind {kind!r}")
