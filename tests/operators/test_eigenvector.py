"""TopEigenvector against the exact oracle numpy.linalg.eigh(AᵀA).

Scores are ⟨v, v₁⟩² (sign-free). Instances follow the notes on the
Kacham–Woodruff paper: the Oja-hard family (a few heavy rows carry v₁, a flat
light bulk everywhere else), a spiked Gaussian, diagonal matrices, and
adversarial (sorted) orders.
"""

from __future__ import annotations

import numpy as np
import pytest
import scipy.sparse as sp

from streamfact.kernels.backend import cuda_available
from streamfact.operators.base import InvalidInputError, NotMergeableError
from streamfact.operators.eigenvector import TopEigenvector
from streamfact.operators.oja import OjaEigenvector


def corr(v: np.ndarray, w: np.ndarray) -> float:
    return float(np.dot(v, w) ** 2 / (np.dot(v, v) * np.dot(w, w)))


def top_vector(a: np.ndarray) -> tuple[np.ndarray, float]:
    w, v = np.linalg.eigh(a.T @ a)
    return v[:, -1], float(w[-1] / w[-2])


def householder_rotation(rng: np.random.Generator, a: np.ndarray, k: int = 3) -> np.ndarray:
    """Apply k random reflections to the rows (an orthogonal map, O(n d) each)."""
    for _ in range(k):
        u = np.asarray(rng.standard_normal(a.shape[1]))
        u = u / float(np.linalg.norm(u))
        a = a - 2.0 * np.outer(a @ u, u)
    return a


def hard_instance(seed: int, k: int, ratio: float, d: int = 512, n: int = 20000) -> np.ndarray:
    """Notes §6: k heavy rows √(1/k)·e₁ and a flat bulk of eigenvalue 1/R on e₂..e_d."""
    rng = np.random.default_rng(seed)
    a = rng.standard_normal((n, d)) * np.sqrt(1.0 / ratio / (n - k))
    a[:k] = 0.0
    a[:, 0] = 0.0
    a[:k, 0] = np.sqrt(1.0 / k)
    return householder_rotation(rng, a)


def feed(op: TopEigenvector, x: np.ndarray, chunk: int = 2500) -> int:
    """Feed in chunks; return the peak state size seen after any chunk."""
    peak = 0
    for start in range(0, x.shape[0], chunk):
        op.update(x[start : start + chunk])
        peak = max(peak, op.state_size)
    return peak


@pytest.mark.parametrize(("k", "ratio"), [(1, 30.0), (2, 8.0)])
def test_hard_family_topeigenvector_succeeds_where_oja_fails(k: int, ratio: float) -> None:
    d, n = 512, 20000
    a = hard_instance(10 + k, k, ratio, d, n)
    v1, r = top_vector(a)
    assert r > 4  # measured 22.4 (k=1) and 6.0 (k=2)
    te_corrs = []
    orders = [np.random.default_rng(s).permutation(n) for s in range(3)]
    for s, order in enumerate(orders):
        # stream_length known for two orders, the doubling guess for the third.
        te = TopEigenvector(d, stream_length=None if s == 2 else n, seed=s)
        peak = feed(te, a[order])
        te_corrs.append(corr(te.vector, v1))
        # Issue bound 3(h+2)·d; formula (2b+h)·d + h² = 3d+1 / 4d+4; measured peak
        # 3d+1 (k=1) and 4d+1 (k=2: the two heavy rows are parallel, rank 1).
        assert peak <= 3 * (k + 2) * d
        assert te.heavy_rows == k
    assert min(te_corrs) >= 0.999  # measured 1.0000 on all orders
    # Oja with the oracle-best fixed rate η = L/λ₁ on a grid (best mean over the
    # orders, an upper bound on any fixed rate): notes §6 predict corr ≲ 0.13
    # (k=1) and ≲ 0.08 (k=2); measured best means 0.009 (k=1) and 0.018 (k=2),
    # both at L = 16. 0.2 is the bar.
    lam1 = 1.0
    best = 0.0
    for L in (0.25, 1.0, 4.0, 16.0, 64.0, 256.0, 1024.0):
        cs = []
        for s, order in enumerate(orders):
            oja = OjaEigenvector(d, learning_rate=L / lam1, seed=s)
            oja.update(a[order])
            cs.append(corr(oja.vector, v1))
        best = max(best, float(np.mean(cs)))
    assert best < 0.2


def test_spiked_gaussian_without_tuned_rate() -> None:
    d, n = 512, 20000
    rng = np.random.default_rng(7)
    scale = np.ones(d)
    scale[0] = 2.0
    a = householder_rotation(rng, rng.standard_normal((n, d)) * scale)
    v1, r = top_vector(a)
    assert 2.5 < r < 3.5
    cs = []
    for s in range(3):
        te = TopEigenvector(d, stream_length=n, seed=s)
        peak = feed(te, a[np.random.default_rng(50 + s).permutation(n)])
        assert peak <= 2 * d  # Z and Y, one column each; no heavy rows
        assert te.order_looks_random
        cs.append(corr(te.vector, v1))
    # Measured mean 0.957 (notes: 0.957 / min 0.949). The residual is the
    # sampling noise of the last block (n/p rows) in the final Ritz step.
    assert np.mean(cs) >= 0.95


def heavy_row_on_bulk(seed: int, d: int = 64, n: int = 4000) -> np.ndarray:
    """One heavy row 10·e₁ on a light isotropic Gaussian bulk (σ = 0.03): R ≈ 35."""
    rng = np.random.default_rng(seed)
    a = 0.03 * rng.standard_normal((n, d))
    a[0] = 0.0
    a[0, 0] = 10.0
    return a


@pytest.mark.parametrize("position", ["random0", "random1", "random2", "second", "middle", "last"])
def test_one_heavy_row_every_order(position: str) -> None:
    a = heavy_row_on_bulk(3)
    n, d = a.shape
    v1, r = top_vector(a)
    assert r >= 20
    rest = np.random.default_rng(hash(position) % 1000).permutation(np.arange(1, n))
    where = {"second": 1, "middle": n // 2, "last": n - 1}.get(position)
    if where is None:
        order = np.random.default_rng(int(position[-1])).permutation(n)
    else:
        order = np.insert(rest, where, 0)
    te = TopEigenvector(d, stream_length=n, seed=1)
    te.update(a[order])
    assert te.heavy_rows >= 1
    assert corr(te.vector, v1) >= 0.999


def test_final_ritz_over_heavy_rows_recovers_a_heavy_row_in_the_last_block() -> None:
    d, n = 128, 6000
    a = hard_instance(4, 1, 30.0, d, n)
    v1, _ = top_vector(a)
    order = np.random.default_rng(0).permutation(np.arange(1, n))
    order = np.append(order, 0)  # the heavy row arrives last
    te = TopEigenvector(d, stream_length=n, seed=2)
    te.update(a[order])
    assert corr(te.vector, v1) >= 0.999
    # The Ritz step over span(Z) alone (no Hᵀ) misses it: that is why the final
    # step is over [Z, Hᵀ] (notes §9 item 7).
    z, y = te.Z_, te.Y_
    t = z.T @ y
    u = np.linalg.eigh((t + t.T) / 2)[1][:, -1]
    assert corr(z @ u, v1) < 0.01


def test_diagonal_matrix_is_exact() -> None:
    d = 64
    diag = np.linspace(1.0, 2.0, d)
    diag[41] = 3.0
    a = np.diag(diag)[np.random.default_rng(0).permutation(d)]
    te = TopEigenvector(d, stream_length=d, heavy_budget=d, seed=0)
    te.update(a)
    assert corr(te.vector, np.eye(d)[41]) >= 1 - 1e-12
    assert te.eigenvalue == pytest.approx(9.0, rel=1e-12)


def test_invariances_rotation_scaling_zero_rows() -> None:
    d, n = 64, 5000
    rng = np.random.default_rng(8)
    scale = np.ones(d)
    scale[0] = 3.0
    a = rng.standard_normal((n, d)) * scale
    a[17] = 0.0
    a[17, 5] = 40.0  # plus a heavy row
    v1, _ = top_vector(a)
    base = TopEigenvector(d, stream_length=n, seed=4)
    base.update(a)
    assert corr(base.vector, v1) >= 0.99
    # Rotation: the random start block is not rotated with the data, so the
    # answers agree to the accuracy of each (both ≥ 0.99 against their oracles).
    q, _ = np.linalg.qr(rng.standard_normal((d, d)))
    rot = TopEigenvector(d, stream_length=n, seed=4)
    rot.update(a @ q.T)
    assert corr(rot.vector, q @ v1) >= 0.99
    assert corr(rot.vector, q @ base.vector) >= 0.98
    # Scaling: every threshold is relative, so the same decisions are taken.
    scaled = TopEigenvector(d, stream_length=n, seed=4)
    scaled.update(1e-3 * a)
    assert corr(scaled.vector, base.vector) >= 1 - 1e-12
    assert scaled.eigenvalue == pytest.approx(1e-6 * base.eigenvalue, rel=1e-9)
    # Zero rows are ignored entirely.
    padded = np.insert(a, [0, 100, 100, 2500, n], 0.0, axis=0)
    zeros = TopEigenvector(d, stream_length=n, seed=4)
    zeros.update(padded[:3000])
    zeros.update(padded[3000:])
    np.testing.assert_allclose(zeros.Z_, base.Z_, rtol=1e-10, atol=1e-12)
    assert zeros.rows_seen == base.rows_seen
    assert corr(zeros.vector, base.vector) >= 1 - 1e-12


def sorted_streams(seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Rows of 4 clusters (means 4·μ_c, μ_c random unit vectors) around a common
    top direction e₀ (variance 25); returned shuffled, sorted by norm, and sorted
    by cluster (as per-user or per-topic batches would arrive)."""
    d, per = 64, 2000
    rng = np.random.default_rng(seed)
    scale = np.ones(d)
    scale[0] = 5.0
    parts = []
    for _ in range(4):
        mu = rng.standard_normal(d)
        mu *= 4.0 / np.linalg.norm(mu)
        parts.append(mu + rng.standard_normal((per, d)) * scale)
    clustered = np.vstack(parts)
    shuffled = clustered[rng.permutation(clustered.shape[0])]
    by_norm = clustered[np.argsort(np.linalg.norm(clustered, axis=1))]
    return shuffled, by_norm, clustered


def test_order_detector_fires_on_sorted_streams_only() -> None:
    shuffled, by_norm, by_cluster = sorted_streams(0)
    n, d = shuffled.shape
    v1, _ = top_vector(shuffled)
    for seed in range(3):
        quiet = TopEigenvector(d, stream_length=n, seed=seed)
        quiet.update(shuffled[np.random.default_rng(seed).permutation(n)])
        assert quiet.order_looks_random and quiet.mode == "exact"
        assert quiet.order_z_ < 6.0
    for stream in (by_norm, by_cluster):
        op = TopEigenvector(d, stream_length=n, seed=0)
        op.update(stream)
        assert not op.order_looks_random
        assert op.mode == "sketch"
        assert op.state_size == 2 * op.sketch_size * d
        # The fallback is Frequent Directions (ℓ = sketch_size = 16) over the rest
        # of the stream, seeded with the heavy rows and the light estimate on
        # span W so far. Measured 0.99998 (norm-sorted, flagged at block 2) and
        # 0.991 (cluster-sorted, flagged at block 5: the summary of the first
        # blocks keeps only span W).
        assert corr(op.vector, v1) >= 0.95


def _state_equal(a: TopEigenvector, b: TopEigenvector) -> None:
    sa, sb = a.state(), b.state()
    assert sa.meta == sb.meta
    assert sa.arrays.keys() == sb.arrays.keys()
    for k in sa.arrays:
        np.testing.assert_array_equal(sa.arrays[k], sb.arrays[k], err_msg=k)


@pytest.mark.parametrize("stream", ["shuffled", "norm-sorted"])
def test_rejected_batch_across_block_boundaries_changes_nothing(stream: str) -> None:
    # The NaN row sits two block boundaries (every 1000 rows) into the batch, so
    # blocks were closed before it is found (and, norm-sorted, the order test has
    # already switched to the FD fallback): the update must still leave no trace.
    shuffled, by_norm, _ = sorted_streams(2)
    a = shuffled if stream == "shuffled" else by_norm
    n, d = a.shape
    a = a.copy()
    a[1300, 7] = 60.0  # a heavy row inside the rejected batch
    # heavy_budget=0: heavy rows go to the FD heavy sketch, which must be restored too.
    op = TopEigenvector(d, stream_length=n, heavy_budget=0, seed=0)
    ref = TopEigenvector(d, stream_length=n, heavy_budget=0, seed=0)
    for t in (op, ref):
        t.update(a[:900])
    bad = a[900:3900].copy()
    bad[2500, 3] = np.nan
    with pytest.raises(InvalidInputError) as info:
        op.update(bad)
    assert info.value.rows is not None and info.value.rows.tolist() == [2500]
    _state_equal(op, ref)
    for t in (op, ref):
        t.update(a[900:3900])
    assert op.mode == ("heavy_sketch" if stream == "shuffled" else "sketch")
    for t in (op, ref):
        t.update(a[3900:])
    np.testing.assert_array_equal(op.vector, ref.vector)


def test_heavy_budget_degrades_to_frequent_directions() -> None:
    d, n = 64, 6000
    rng = np.random.default_rng(2)
    a = 0.05 * rng.standard_normal((n, d))
    heavy_idx = rng.choice(n, 200, replace=False)
    # 200 heavy rows, all near one direction u: v₁ ≈ u lives in the heavy rows.
    u = np.zeros(d)
    u[3] = 1.0
    a[heavy_idx] = 5.0 * u + 0.5 * rng.standard_normal((200, d))
    v1, _ = top_vector(a)
    te = TopEigenvector(d, stream_length=n, heavy_budget=16, sketch_size=8, seed=0)
    peak = feed(te, a, chunk=500)
    assert te.mode == "heavy_sketch"
    assert te.heavy_rows == 0
    # Z: d×(b + ≤2ℓ), Y: d×b, G: ≤2ℓ×2ℓ, and the 2ℓ-row FD buffer (measured 36.5·d).
    assert peak <= (2 * (1 + 16) + 16) * d
    assert corr(te.vector, v1) >= 0.99


def test_sparse_rows_match_dense() -> None:
    rng = np.random.default_rng(6)
    dense = sp.random_array((3000, 40), density=0.1, random_state=rng, format="csr").toarray()
    dense[:, 2] *= 4.0
    a = TopEigenvector(40, stream_length=3000, seed=1)
    a.update(dense)
    b = TopEigenvector(40, stream_length=3000, seed=1)
    b.update(sp.csr_array(dense[:1111]))
    b.update(sp.csr_array(dense[1111:]))
    assert corr(a.vector, b.vector) >= 1 - 1e-10
    assert a.heavy_rows == b.heavy_rows


def test_not_mergeable_and_state_roundtrip_in_sketch_modes() -> None:
    _, by_norm, _ = sorted_streams(1)
    op = TopEigenvector(64, stream_length=by_norm.shape[0], seed=0)
    op.update(by_norm[:5000])
    assert op.mode == "sketch"
    again = TopEigenvector.from_state(op.state())
    op.update(by_norm[5000:])
    again.update(by_norm[5000:])
    np.testing.assert_array_equal(again.vector, op.vector)
    with pytest.raises(NotMergeableError):
        op.merge(again)


@pytest.mark.skipif(not cuda_available(), reason="needs a CUDA device")
def test_cuda_block_products_match_cpu() -> None:
    a = hard_instance(1, 1, 30.0, 128, 4000)
    cpu = TopEigenvector(128, stream_length=4000, seed=0)
    cpu.update(a)
    gpu = TopEigenvector(128, stream_length=4000, seed=0, device="cuda")
    gpu.update(a)
    assert corr(cpu.vector, gpu.vector) >= 1 - 1e-9
