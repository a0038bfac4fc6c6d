"""Batched Gaussian-mixture math on a :class:`~streamfact.kernels.backend.Backend`.

Written once against the array-API namespace, so the same code runs on numpy
and on torch (CPU or GPU). Used by :class:`streamfact.IncrementalGMM` for batched
scoring and for the mini-batch stepwise-EM update (E-step as K batched GEMMs,
per-component Chan merge, one batched Cholesky per batch).
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from streamfact.kernels.backend import Backend

__all__ = [
    "chan_merge",
    "log_joint",
    "logsumexp_rows",
    "minibatch_stats",
    "precision_to_covariance",
    "to_backend",
]

_LOG_2PI = math.log(2.0 * math.pi)


def log_joint(
    be: Backend, X: Any, means: Any, precisions: Any, logdet: Any, log_w: Any
) -> tuple[Any, Any]:
    """``log π_j + log N(x_i; μ_j, Λ_j⁻¹)`` (B×K) and the squared distances d² (B×K).

    Cost 2·K·B·D² flops (K batched GEMMs) and K·B·D memory.
    """
    xp = be.xp
    d = X.shape[1]
    E = X[None, :, :] - means[:, None, :]
    T = xp.matmul(E, precisions)
    d2 = xp.sum(T * E, axis=2)
    d2 = xp.where(d2 < 0, xp.zeros_like(d2), d2)
    ll = log_w[:, None] - 0.5 * (d * _LOG_2PI + logdet[:, None] + d2)
    return xp.permute_dims(ll, (1, 0)), xp.permute_dims(d2, (1, 0))


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
    ``x̄ = 0`` and ``C_b = 0``.
    """
    xp = be.xp
    ll, d2 = log_joint(be, X, means, precisions, logdet, log_w)
    novel = xp.min(d2, axis=1) > chi2_thr
    logr = ll - logsumexp_rows(be, ll)[:, None]
    R = xp.where(logr < flush_log, xp.zeros_like(logr), xp.exp(logr))
    R = xp.where(novel[:, None], xp.zeros_like(R), R)
    N = xp.sum(R, axis=0)
    safe = xp.where(N > 0, N, xp.ones_like(N))
    xbar = xp.matmul(xp.permute_dims(R, (1, 0)), X) / safe[:, None]
    Xc = X[None, :, :] - xbar[:, None, :]
    Rt = xp.permute_dims(R, (1, 0))
    M2 = xp.matmul(xp.permute_dims(Xc * Rt[:, :, None], (0, 2, 1)), Xc)
    Cb = M2 / safe[:, None, None]
    return novel, N, xbar, Cb


def _spd_inverse_logdet(be: Backend, A: Any) -> tuple[Any, Any]:
    """Inverse and log-determinant of a stack of SPD matrices by one batched Cholesky."""
    xp = be.xp
    L = xp.linalg.cholesky(A)
    logdet = 2.0 * xp.sum(xp.log(xp.linalg.diagonal(L)), axis=1)
    Li = xp.linalg.inv(L)
    inv = xp.matmul(xp.permute_dims(Li, (0, 2, 1)), Li)
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
    """
    xp = be.xp
    C = precision_to_covariance(be, precisions)
    upd = N > min_mass
    w = xp.where(upd, N / (mass + N), xp.zeros_like(N))
    dl = xbar - means
    w1 = w[:, None, None]
    outer = dl[:, :, None] * dl[:, None, :]
    C_new = (1.0 - w1) * C + w1 * Cb + (w1 * (1.0 - w1)) * outer
    mu_new = means + w[:, None] * dl
    prec_new, logdet_new = _spd_inverse_logdet(be, C_new)
    prec_new = xp.where(upd[:, None, None], prec_new, precisions)
    mu_new = xp.where(upd[:, None], mu_new, means)
    return mu_new, prec_new, logdet_new, upd


def to_backend(be: Backend, *arrays: np.ndarray, dtype: str) -> list[Any]:
    """Move numpy arrays onto the backend with ``dtype``."""
    return [be.asarray(a, dtype) for a in arrays]
