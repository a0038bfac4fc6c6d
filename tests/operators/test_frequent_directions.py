"""FrequentDirections against the exact oracle AᵀA (numpy.linalg)."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.sparse as sp

from streamfact.operators.base import InvalidInputError, NotMergeableError
from streamfact.operators.frequent_directions import FrequentDirections


def top_eig(a: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    w, v = np.linalg.eigh(a.T @ a)
    return w[::-1], v[:, ::-1]


def corr(v: np.ndarray, v1: np.ndarray) -> float:
    return float(np.dot(v, v1) ** 2 / (np.dot(v, v) * np.dot(v1, v1)))


def tail_frob(a: np.ndarray, k: int) -> float:
    s = np.linalg.svd(a, compute_uv=False)
    return float(np.sum(s[k:] ** 2))


def decaying(rng: np.random.Generator, n: int, d: int) -> np.ndarray:
    q, _ = np.linalg.qr(rng.standard_normal((d, d)))
    return (rng.standard_normal((n, d)) * (1.0 / np.arange(1, d + 1) ** 0.7)) @ q.T


@pytest.mark.parametrize("ell", [2, 5, 12])
def test_covariance_error_bound_against_exact_oracle(ell: int) -> None:
    rng = np.random.default_rng(ell)
    a = decaying(rng, 700, 30)
    fd = FrequentDirections(30, ell)
    fd.update(a[:123])
    fd.update(a[123:])
    err = a.T @ a - fd.covariance()
    # 0 ⪯ AᵀA − BᵀB ⪯ Δ·I; the slack 1e-9·‖A‖² covers float64 rounding only.
    tol = 1e-9 * float(np.sum(a * a))
    eig = np.linalg.eigvalsh(err)
    assert eig.min() >= -tol
    assert eig.max() <= fd.error_bound + tol
    assert fd.error_bound > 0  # the shrinks really happened: the bound is not vacuous here
    for k in range(ell):
        assert fd.error_bound <= tail_frob(a, k) / (ell - k) + tol


def test_merge_keeps_the_bound_for_the_union() -> None:
    rng = np.random.default_rng(3)
    a = decaying(rng, 900, 25)
    ell = 6
    parts = np.array_split(a, 5)
    ops = []
    for p in parts:
        op = FrequentDirections(25, ell)
        op.update(p)
        ops.append(op)
    merged = ops[0].merge(ops[1]).merge(ops[2].merge(ops[3]).merge(ops[4]))
    err = a.T @ a - merged.covariance()
    tol = 1e-9 * float(np.sum(a * a))
    eig = np.linalg.eigvalsh(err)
    assert eig.min() >= -tol
    assert eig.max() <= merged.error_bound + tol
    for k in range(ell):
        assert merged.error_bound <= tail_frob(a, k) / (ell - k) + tol
    assert merged.rows_seen == a.shape[0]
    assert merged.frobenius_sq_ == pytest.approx(float(np.sum(a * a)), rel=1e-12)
    with pytest.raises(NotMergeableError):
        ops[0].merge(FrequentDirections(25, ell + 1))


def heavy_row_instance(rng: np.random.Generator, d: int = 64, n: int = 2000) -> np.ndarray:
    """A light Gaussian bulk (σ = 0.03) plus one heavy row 10·e₁; R ≈ 35."""
    a = 0.03 * rng.standard_normal((n, d))
    a[0] = 0.0
    a[0, 0] = 10.0
    return a[rng.permutation(n)]


def test_heavy_row_reached_wherever_the_bound_guarantees_it() -> None:
    rng = np.random.default_rng(11)
    a = heavy_row_instance(rng)
    w, v = top_eig(a)
    gap = w[0] - w[1]
    assert w[0] / w[1] >= 20
    guaranteed = 0
    for ell in (2, 8, 32, 48):
        fd = FrequentDirections(a.shape[1], ell)
        fd.update(a)
        c = corr(fd.vector, v[:, 0])
        delta = fd.error_bound
        assert delta <= tail_frob(a, 1) / (ell - 1) * (1 + 1e-9) if ell > 1 else True
        # Davis–Kahan with BᵀB ⪯ AᵀA ⪯ BᵀB + Δ·I: sin θ ≤ Δ / (λ₁ − λ₂ − Δ).
        if delta < gap:
            assert 1.0 - c <= (delta / (gap - delta)) ** 2 + 1e-12
        a_priori = tail_frob(a, 1) / (ell - 1) if ell > 1 else np.inf
        if a_priori < gap and (a_priori / (gap - a_priori)) ** 2 <= 1e-3:
            guaranteed += 1
            assert c >= 0.999
    assert guaranteed >= 1  # at least one ℓ of the sweep is covered by the a-priori bound


def test_small_sketch_fails_on_a_flat_bulk_as_the_bound_allows() -> None:
    # One heavy row on a flat bulk over d−1 directions, R = 20: ‖A − A₁‖_F²/(ℓ−1)
    # exceeds the gap for ℓ = 4, so no guarantee; FD loses the heavy direction
    # in most orders (it is order-independent in its bound, not in its output).
    d, n, ratio = 256, 10000, 20.0
    rng = np.random.default_rng(5)
    bulk = rng.standard_normal((n - 1, d))
    bulk[:, 0] = 0.0
    lam_bulk = n - 1
    heavy = np.zeros((1, d))
    heavy[0, 0] = np.sqrt(ratio * lam_bulk)
    a0 = np.vstack([heavy, bulk])
    w, v = top_eig(a0)
    gap = w[0] - w[1]
    ell = 4
    assert tail_frob(a0, 1) / (ell - 1) > gap  # outside the guarantee
    cs = []
    for seed in range(3):  # measured corr 0, 1, 0: lost unless it arrives late
        order = np.random.default_rng(seed).permutation(n)
        fd = FrequentDirections(d, ell)
        fd.update(a0[order])
        cs.append(corr(fd.vector, v[:, 0]))
    assert np.mean(cs) < 0.5
    big = FrequentDirections(d, 16)  # the bound is met with a large sketch
    big.update(a0[np.random.default_rng(0).permutation(n)])
    assert corr(big.vector, v[:, 0]) >= 0.999


def test_diagonal_matrix_is_exact() -> None:
    d = 40
    diag = np.linspace(1.0, 3.0, d)
    diag[17] = 5.0
    a = np.diag(diag)[np.random.default_rng(0).permutation(d)]
    # Rows are orthogonal, so B keeps coordinate rows and the answer is exact
    # whenever Δ < λ₁ − λ₂ = 16, which the bound ‖A − A₁‖_F²/ℓ guarantees for ℓ ≥ 12.
    for ell in (12, 20, 40):
        fd = FrequentDirections(d, ell)
        fd.update(a)
        assert tail_frob(a, 1) / ell < 25.0 - 9.0
        assert corr(fd.vector, np.eye(d)[17]) >= 1 - 1e-12
        assert 25.0 - fd.error_bound - 1e-12 <= fd.eigenvalue <= 25.0 + 1e-12


def test_invariances_rotation_scaling_zero_rows() -> None:
    rng = np.random.default_rng(9)
    d = 20
    a = decaying(rng, 300, d)
    q, _ = np.linalg.qr(rng.standard_normal((d, d)))
    base = FrequentDirections(d, 4)
    base.update(a)
    rot = FrequentDirections(d, 4)
    rot.update(a @ q.T)
    # Rotation: the sketch rotates with the rows (SVD is equivariant), so the top
    # vector of the rotated run is Q v up to rounding.
    assert corr(rot.vector, q @ base.vector) >= 1 - 1e-10
    scaled = FrequentDirections(d, 4)
    scaled.update(7.5 * a)
    assert corr(scaled.vector, base.vector) >= 1 - 1e-12
    assert scaled.error_bound == pytest.approx(56.25 * base.error_bound, rel=1e-10)
    padded = np.insert(a, [0, 10, 10, 150, 300], 0.0, axis=0)
    zeros = FrequentDirections(d, 4)
    zeros.update(padded)
    np.testing.assert_array_equal(zeros.buffer_, base.buffer_)
    assert zeros.rows_seen == base.rows_seen


def test_sparse_input_matches_dense() -> None:
    rng = np.random.default_rng(2)
    dense = sp.random_array((200, 30), density=0.2, random_state=rng, format="csr").toarray()
    a = FrequentDirections(30, 5)
    a.update(dense)
    b = FrequentDirections(30, 5)
    b.update(sp.csr_array(dense[:77]))
    b.update(sp.csr_array(dense[77:]))
    np.testing.assert_allclose(b.covariance(), a.covariance(), rtol=1e-12, atol=1e-12)


def test_torch_shrink_matches_numpy() -> None:
    pytest.importorskip("torch")
    rng = np.random.default_rng(4)
    a = decaying(rng, 400, 24)
    ref = FrequentDirections(24, 5)
    ref.update(a)
    tor = FrequentDirections(24, 5, device="torch")
    tor.update(a)
    np.testing.assert_allclose(tor.covariance(), ref.covariance(), rtol=1e-9, atol=1e-9)
    assert tor.error_bound == pytest.approx(ref.error_bound, rel=1e-9)


def test_state_size_components_transform_and_bad_input() -> None:
    rng = np.random.default_rng(1)
    a = decaying(rng, 100, 16)
    fd = FrequentDirections(16, 3, dtype="float32")
    assert fd.state_size == 2 * 3 * 16 == fd.state().nbytes() // 4
    fd.update(a)
    comps = fd.components(3)
    np.testing.assert_allclose(comps @ comps.T, np.eye(3), atol=1e-5)
    assert fd.transform(a[:5]).shape == (5, 3)
    before = fd.buffer_.copy()
    bad = a[:3].copy()
    bad[1, 2] = np.nan
    with pytest.raises(InvalidInputError) as info:
        fd.update(bad)
    assert info.value.rows is not None and list(info.value.rows) == [1]
    np.testing.assert_array_equal(fd.buffer_, before)
    with pytest.raises(ValueError):
        fd.components(7)
