"""Batched Gaussian-mixture math on a :class:`~streamfact.kernels.backend.Backend`.

Written once against the array-API namespace, so the same code runs on numpy
and on torch (CPU or GPU). Used by :class:`streamfact.IncrementalGMM` for batched
scoring and for the mini-batch stepwise-EM update (E-step and M-step as one
large GEMM each, per-component Chan merge, batched Cholesky per batch).

Layout of the E-step: with Λ_j = L_j L_jᵀ (Cholesky), d²_j(x) = ‖(x - μ_j)ᵀ L_j‖².
The K factors are laid side by side in one D × KD matrix W, so the K
Mahalanobis transforms of a batch are a single (B × D)·(D × KD) GEMM, which
BLAS runs near peak, instead of K small batched products over a materialised
K × B × D difference tensor.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from streamfact.kernels import gmm_numba as _kn
from streamfact.kernels.backend import Backend

__all__ = [
    "chan_merge",
    "log_joint",
    "logsumexp_rows",
    "mahalanobis",
    "minibatch_stats",
    "precision_to_covariance",
    "to_backend",
]

_LOG_2PI = math.log(2.0 * math.pi)


def _einsum(be: Backend) -> Any:
    if be.is_torch:
        import torch

        return torch.einsum
    return np.einsum


def mahalanobis(be: Backend, X: Any, means: Any, precisions: Any) -> Any:
    """Squared Mahalanobis distances d²_ij = (x_i-μ_j)ᵀ Λ_j (x_i-μ_j), B×K, clamped at 0.

    One batched Cholesky (K D³/3) and one (B × D)·(D × KD) GEMM (2 B K D²
    flops). Rows and means are first shifted by the mean of the component
    means, so that the difference of the two transformed terms does not
    cancel for data far from the origin; the result for a row does not depend
    on the other rows of ``X``.
    """
    xp = be.xp
    k, d = means.shape
    ref = xp.mean(means, axis=0)
    try:
        L = xp.linalg.cholesky(precisions)
    except Exception:  # numpy LinAlgError or torch RuntimeError
        # Not positive definite (e.g. paper mode with repairs disabled): the
        # plain form still gives the quadratic form of the symmetric matrix.
        E = X[None, :, :] - means[:, None, :]
        d2 = xp.permute_dims(xp.sum(xp.matmul(E, precisions) * E, axis=2), (1, 0))
        return xp.where(d2 < 0, xp.zeros_like(d2), d2)
    W = xp.reshape(xp.permute_dims(L, (1, 0, 2)), (d, k * d))
    offs = xp.reshape(xp.matmul((means - ref)[:, None, :], L), (1, k * d))
    # The offsets ride in the GEMM as an extra column of ones (saves a B×KD pass).
    ones = xp.ones((X.shape[0], 1), dtype=X.dtype, device=be.device if be.is_torch else None)
    Y = xp.matmul(xp.concat([X - ref, ones], axis=1), xp.concat([W, -offs], axis=0))
    Y3 = xp.reshape(Y, (X.shape[0], k, d))
    d2 = _einsum(be)("bkd,bkd->bk", Y3, Y3)
    return xp.where(d2 < 0, xp.zeros_like(d2), d2)


def log_joint(
    be: Backend, X: Any, means: Any, precisions: Any, logdet: Any, log_w: Any
) -> tuple[Any, Any]:
    """``log π_j + log N(x_i; μ_j, Λ_j⁻¹)`` (B×K) and the squared distances d² (B×K).

    Cost 2·K·B·D² flops in one GEMM (see :func:`mahalanobis`).
    """
    d = X.shape[1]
    d2 = mahalanobis(be, X, means, precisions)
    ll = log_w[None, :] - 0.5 * (d * _LOG_2PI + logdet[None, :] + d2)
    return ll, d2


def logsumexp_rows(be: Backend, ll: Any) -> Any:
    """Row-wise log-sum-exp of a B×K array (K ≥ 1)."""
    xp = be.xp
    m = xp.max(ll, axis=1)
    return m + xp.log(xp.sum(xp.exp(ll - m[:, None]), axis=1))


def minibatch_stats(
    be: Backend,
    X: Any,
    means: Any,
    precisions: Any,
    logdet: Any,
    log_w: Any,
    chi2_thr: float,
    flush_log: float = -40.0,
) -> tuple[Any, Any, Any, Any]:
    """E-step of one frozen batch: ``(novel, N, x̄, C_b)``.

    ``novel`` (B,) marks rows whose smallest d² exceeds the χ² threshold; they get
    no responsibility. Responsibilities below ``exp(flush_log)`` are flushed to
    zero (subnormal arithmetic would slow the GEMMs). ``N`` (K,) are the
    responsibility masses, ``x̄`` (K×D) the weighted means and ``C_b`` (K×D×D)
    the weighted covariances about ``x̄``. Components with ``N = 0`` get
    ``x̄ = μ`` and ``C_b = 0``.

    With e_ij = x_i - μ_j and s_j = Σ_i r_ij e_ij, the scatter about x̄_j is
    Σ_i r_ij e_ij e_ijᵀ - s_j s_jᵀ / N_j (centred on the frozen mean, so no
    cancellation of raw second moments). On torch the first term is one
    (KD × B)·(B × D) GEMM, written as Σ_i r_ij e_ij (x_i - c)ᵀ - s_j (μ_j - c)ᵀ
    with c the mean of the means; on the CPU a numba loop visits only the
    nonzero responsibilities (:func:`~streamfact.kernels.gmm_numba.scatter_stats`).
    """
    xp = be.xp
    k, d = means.shape
    b = X.shape[0]
    ll, d2 = log_joint(be, X, means, precisions, logdet, log_w)
    novel = xp.min(d2, axis=1) > chi2_thr
    logr = ll - logsumexp_rows(be, ll)[:, None]
    R = xp.where(logr < flush_log, xp.zeros_like(logr), xp.exp(logr))
    R = xp.where(novel[:, None], xp.zeros_like(R), R)
    N = xp.sum(R, axis=0)
    safe = xp.where(N > 0, N, xp.ones_like(N))
    if be.is_torch:
        ref = xp.mean(means, axis=0)
        Xc = X - ref
        mc = means - ref
        Z = (Xc[:, None, :] - mc[None, :, :]) * R[:, :, None]  # r_ij e_ij, B×K×D
        S = xp.sum(Z, axis=0)  # s_j
        Zt = xp.permute_dims(xp.reshape(Z, (b, k * d)), (1, 0))
        G = xp.reshape(xp.matmul(Zt, Xc), (k, d, d)) - S[:, :, None] * mc[:, None, :]
    else:
        # CPU: visit only the nonzero responsibilities (sparse on separated data).
        _, Sn, Gn = _kn.scatter_stats(np.asarray(X), np.asarray(R), np.asarray(means))
        S = be.asarray(Sn, X.dtype)
        G = be.asarray(Gn, X.dtype)
    M2 = G - (S[:, :, None] * S[:, None, :]) / safe[:, None, None]
    M2 = 0.5 * (M2 + xp.permute_dims(M2, (0, 2, 1)))
    xbar = means + S / safe[:, None]
    Cb = M2 / safe[:, None, None]
    return novel, N, xbar, Cb


def _spd_inverse_logdet(be: Backend, A: Any) -> tuple[Any, Any]:
    """Inverse and log-determinant of a stack of SPD matrices.

    The Cholesky factor gives the log-determinant and certifies definiteness
    (it raises otherwise); the inverse is one batched LU inverse, symmetrised.
    """
    xp = be.xp
    L = xp.linalg.cholesky(A)
    logdet = 2.0 * xp.sum(xp.log(xp.linalg.diagonal(L)), axis=1)
    inv = xp.linalg.inv(A)
    inv = 0.5 * (inv + xp.permute_dims(inv, (0, 2, 1)))
    return inv, logdet


def precision_to_covariance(be: Backend, precisions: Any) -> Any:
    """C = Λ⁻¹ for a stack of precision matrices."""
    return _spd_inverse_logdet(be, precisions)[0]


def chan_merge(
    be: Backend,
    means: Any,
    precisions: Any,
    mass: Any,
    N: Any,
    xbar: Any,
    Cb: Any,
    min_mass: float,
) -> tuple[Any, Any, Any, Any]:
    """Merge batch statistics into the components, exactly (Chan, Golub & LeVeque).

    With ``ω = N / (mass + N)``::

        C' = (1-ω) C + ω C_b + ω(1-ω) (x̄ - μ)(x̄ - μ)ᵀ,   μ' = μ + ω (x̄ - μ)

    Every term is PSD (no downdate). Components with ``N <= min_mass`` are left
    unchanged. Returns ``(means', precisions', logdet', updated_mask)``.
    Cost O(K D³): two batched inverses and one batched Cholesky.
    """
    xp = be.xp
    C = xp.linalg.inv(precisions)
    upd = N > min_mass
    w = xp.where(upd, N / (mass + N), xp.zeros_like(N))
    dl = xbar - means
    w1 = w[:, None, None]
    outer = dl[:, :, None] * dl[:, None, :]
    C_new = (1.0 - w1) * C + w1 * Cb + (w1 * (1.0 - w1)) * outer
    C_new = 0.5 * (C_new + xp.permute_dims(C_new, (0, 2, 1)))
    mu_new = means + w[:, None] * dl
    prec_new, logdet_new = _spd_inverse_logdet(be, C_new)
    prec_new = xp.where(upd[:, None, None], prec_new, precisions)
    mu_new = xp.where(upd[:, None], mu_new, means)
    return mu_new, prec_new, logdet_new, upd


def to_backend(be: Backend, *arrays: np.ndarray, dtype: str) -> list[Any]:
    """Move numpy arrays onto the backend with ``dtype``."""
    return [be.asarray(a, dtype) for a in arrays]
