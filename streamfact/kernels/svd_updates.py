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

import numpy as np
import scipy.sparse as sp

from streamfact.kernels.orthogonalize import Basis, LinAlg

__all__ = ["ZSpace", "core_append", "core_low_rank", "truncated_core_svd", "z_space"]


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
