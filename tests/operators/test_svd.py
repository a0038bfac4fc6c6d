"""Oracle tests for IncrementalSVD (issue oracles 1–5 and the extras).

Tolerances are float64 and explained where they are set. Singular vectors are
compared as subspaces (projectors), never as raw vectors.
"""

from __future__ import annotations

import numpy as np
import pytest
import scipy.sparse as sp

from streamfact.operators.base import InvalidInputError, NotMergeableError
from streamfact.operators.svd import IncrementalSVD

EXACT = ("zha-simon", "deng")


def _orthonormal(rng: np.random.Generator, d: int, k: int) -> np.ndarray:
    q, _ = np.linalg.qr(rng.standard_normal((d, k)))
    return q


def _subspace(a: np.ndarray, b: np.ndarray) -> float:
    """sin of the largest principal angle between span(a) and span(b)."""
    qa, _ = np.linalg.qr(a)
    qb, _ = np.linalg.qr(b)
    return float(np.linalg.norm(qa @ qa.T - qb @ qb.T, 2))


def _recon(op: IncrementalSVD) -> np.ndarray:
    return (op.U * op.s) @ op.V.T


def _best_rank(a: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    u, s, vt = np.linalg.svd(a, full_matrices=False)
    return u[:, :k], s[:k], vt[:k].T


def _maybe_sparse(x: np.ndarray, sparse: bool) -> np.ndarray | sp.csr_array:
    return sp.csr_array(x) if sparse else x


# -- oracle 1: one update against a dense SVD --------------------------------------------


@pytest.mark.parametrize("kind", ["rows", "columns", "low_rank"])
@pytest.mark.parametrize(
    ("method", "sparse"), [("zha-simon", False), ("deng", True), ("deng", False)]
)
def test_one_update_matches_dense_svd(kind: str, method: str, sparse: bool) -> None:
    rng = np.random.default_rng(11)
    m, n, k, p = 120, 80, 10, 6
    s0 = np.linspace(10.0, 1.0, k)
    a0 = (_orthonormal(rng, m, k) * s0) @ _orthonormal(rng, n, k).T
    op = IncrementalSVD(k, method=method)
    op.initialize(a0)
    # Sparse blocks touching few coordinates exercise Deng's z-space path.
    if kind == "rows":
        e = rng.standard_normal((p, n)) * (rng.random((p, n)) < 0.05)
        op.append_rows(_maybe_sparse(e, sparse))
        full = np.vstack([a0, e])
    elif kind == "columns":
        e = rng.standard_normal((m, p)) * (rng.random((m, p)) < 0.05)
        op.append_columns(_maybe_sparse(e, sparse))
        full = np.hstack([a0, e])
    else:
        b = rng.standard_normal((m, 2)) * (rng.random((m, 2)) < 0.05)
        c = rng.standard_normal((n, 2)) * (rng.random((n, 2)) < 0.05)
        op.update_low_rank(_maybe_sparse(b, sparse), _maybe_sparse(c, sparse))
        full = a0 + b @ c.T
    if method == "deng" and sparse:
        assert op.n_sparse_updates_ >= 1, "the sparse path was not exercised"
    u_ref, s_ref, v_ref = _best_rank(full, k)
    # rtol 1e-10: the update is exact algebra; rounding is ~1e-15·s_1/s_i.
    np.testing.assert_allclose(op.s, s_ref, rtol=1e-10)
    best = (u_ref * s_ref) @ v_ref.T
    assert np.linalg.norm(_recon(op) - best) <= 1e-10 * np.linalg.norm(best)
    # Per-vector angle bounded by 1e-9·s_1/gap_i (Davis–Kahan), gap to all others.
    s_all = np.linalg.svd(full, compute_uv=False)
    for i in range(k):
        gap = min(abs(s_ref[i] - s_all[j]) for j in range(len(s_all)) if j != i)
        if gap < 1e-6 * s_ref[0]:
            continue
        bound = 1e-9 * s_ref[0] / gap
        for got, ref in ((op.U[:, i], u_ref[:, i]), (op.V[:, i], v_ref[:, i])):
            # ‖got − (got·ref) ref‖: accurate for tiny angles (1 − cos² is not).
            sin = float(np.linalg.norm(got - (got @ ref) * ref))
            assert sin <= bound, (i, sin, bound)


# -- oracle 2: no truncation → the SVD of the full matrix ----------------------------------


@pytest.mark.parametrize(
    ("method", "sparse"), [("zha-simon", False), ("deng", True), ("rpi", True)]
)
def test_no_truncation_equals_full_svd_after_50_updates(method: str, sparse: bool) -> None:
    rng = np.random.default_rng(2)
    a = rng.standard_normal((30, 3)) @ rng.standard_normal((3, 20))
    op = IncrementalSVD(60, method=method, n_directions=4)
    op.initialize(a)
    for i in range(50):
        kind = i % 3
        if kind == 0:
            e = rng.standard_normal((1, a.shape[1])) * (rng.random((1, a.shape[1])) < 0.3)
            op.append_rows(_maybe_sparse(e, sparse))
            a = np.vstack([a, e])
        elif kind == 1:
            e = rng.standard_normal((a.shape[0], 1)) * (rng.random((a.shape[0], 1)) < 0.3)
            op.append_columns(_maybe_sparse(e, sparse))
            a = np.hstack([a, e])
        else:
            b = rng.standard_normal((a.shape[0], 1)) * (rng.random((a.shape[0], 1)) < 0.3)
            c = rng.standard_normal((a.shape[1], 1)) * (rng.random((a.shape[1], 1)) < 0.3)
            op.update_low_rank(_maybe_sparse(b, sparse), _maybe_sparse(c, sparse))
            a = a + b @ c.T
    # rank ≥ rank(A) + appended rank (3 + 50 ≤ 60): nothing is ever truncated,
    # so the result is the SVD of A up to rounding accumulated over 50 updates.
    assert op.shape == a.shape
    assert np.linalg.norm(_recon(op) - a) <= 1e-10 * np.linalg.norm(a)
    s_ref = np.linalg.svd(a, compute_uv=False)
    np.testing.assert_allclose(op.s, s_ref[: op.s.size], rtol=1e-9, atol=1e-12 * s_ref[0])


# -- oracle 3: methods agree ------------------------------------------------------------------


def _sparse_stream(rng: np.random.Generator, m: int, n: int, density: float) -> sp.csr_array:
    # Decaying column scales give a decaying spectrum with gaps at the top.
    scales = 1.0 / np.sqrt(np.arange(1, n + 1))
    x = sp.random_array((m, n), density=density, random_state=rng, format="csr")
    return sp.csr_array(x @ sp.diags_array(scales))


def _run(method: str, a: sp.csr_array, k: int, step: int, **kw: object) -> IncrementalSVD:
    op = IncrementalSVD(k, method=method, **kw)  # type: ignore[arg-type]
    op.append_rows(a[:200])
    for i in range(200, a.shape[0], step):
        op.append_rows(a[i : i + step])
    return op


def test_deng_sparse_matches_dense_zha_simon() -> None:
    rng = np.random.default_rng(3)
    a = _sparse_stream(rng, 500, 300, 0.02)
    dense = _run("zha-simon", sp.csr_array(a.toarray()), 12, 15)
    deng = _run("deng", a, 12, 15)
    assert deng.n_sparse_updates_ > 0
    # Same mathematics, different rounding: s to 1e-9, subspaces to 1e-8 (issue oracle 3).
    np.testing.assert_allclose(deng.s, dense.s, rtol=1e-9)
    assert _subspace(deng.V, dense.V) <= 1e-8
    assert _subspace(deng.U, dense.U) <= 1e-8


@pytest.mark.parametrize("method", ["gkl", "rpi"])
def test_gkl_rpi_with_l_at_least_batch_match_exact(method: str) -> None:
    rng = np.random.default_rng(4)
    a = _sparse_stream(rng, 400, 250, 0.03)
    exact = _run("zha-simon", a, 10, 8)
    approx = _run(method, a, 10, 8, n_directions=8, power_iterations=1)
    # l ≥ batch size: the Krylov / range space is all of range(X), so the
    # approximation is the exact method up to rounding (1e-8).
    np.testing.assert_allclose(approx.s, exact.s, rtol=1e-8)
    assert _subspace(approx.V, exact.V) <= 1e-8


def test_gkl_rpi_small_l_are_approximate_but_close() -> None:
    rng = np.random.default_rng(5)
    a = _sparse_stream(rng, 400, 250, 0.03)
    exact = _run("zha-simon", a, 10, 40)
    for method in ("gkl", "rpi"):
        approx = _run(method, a, 10, 40, n_directions=5)
        err = np.max(np.abs(approx.s - exact.s) / exact.s)
        # l = 5 < 40 new rows: approximate, but the top triplets stay close.
        assert 0 < err < 0.1, (method, err)


def test_auto_reports_its_choice() -> None:
    rng = np.random.default_rng(6)
    op = IncrementalSVD(5)
    op.append_rows(rng.standard_normal((50, 20)))
    op.append_rows(sp.csr_array(rng.standard_normal((3, 20))))
    assert op.method_used_ == "deng"
    op.append_rows(rng.standard_normal((200, 20)))  # a big dense batch: plain rotations
    assert op.method_used_ == "zha-simon"


# -- oracle 4: orthogonality with reset and re-orthogonalisation --------------------------------


def test_orthogonality_after_200_updates_with_drift() -> None:
    rng = np.random.default_rng(7)
    m, n, k = 150, 120, 16
    op = IncrementalSVD(k, method="deng", reset_cond=100.0)
    op.append_rows(_sparse_stream(rng, m, n, 0.05))
    cond_max = 1.0
    for i in range(200):
        # Drift: the active columns move across the matrix over time.
        lo = (i * 3) % (n - 20)
        kind = i % 4
        if kind in (0, 1):
            e = np.zeros((4, op.shape[1]))
            e[:, lo : lo + 20] = rng.standard_normal((4, 20)) * (rng.random((4, 20)) < 0.3)
            op.append_rows(sp.csr_array(e))
        elif kind == 2:
            e = rng.standard_normal((op.shape[0], 2)) * (rng.random((op.shape[0], 2)) < 0.05)
            op.append_columns(sp.csr_array(e))
        else:
            b = rng.standard_normal((op.shape[0], 2)) * (rng.random((op.shape[0], 2)) < 0.05)
            c = rng.standard_normal((op.shape[1], 2)) * (rng.random((op.shape[1], 2)) < 0.05)
            op.update_low_rank(sp.csr_array(b), sp.csr_array(c))
        cond_max = max(cond_max, *op.condition_numbers())
    lu, lv = op.orthogonality_loss(exact=True)
    # Issue oracle 4: ≤ 1e-11 with the rules active (trigger 1e-12 is below it).
    assert lu <= 1e-11 and lv <= 1e-11, (lu, lv)
    assert cond_max <= 100.0
    assert op.n_sparse_updates_ > 0
    assert op.n_resets_ > 0  # the reset rule was needed (35 times when measured)
    # The tracked estimate follows the exact value (both are ≪ 1e-11).
    est = op.orthogonality_loss()
    assert max(est) <= 1e-11


def test_reset_rule_bounds_condition_number() -> None:
    rng = np.random.default_rng(8)
    op = IncrementalSVD(8, method="deng", reset_cond=5.0)
    op.append_rows(rng.standard_normal((40, 30)))
    for _ in range(60):
        b = rng.standard_normal((op.shape[0], 3)) * 5
        c = rng.standard_normal((op.shape[1], 3))
        op.update_low_rank(b, c)
        assert max(op.condition_numbers()) <= 5.0
    assert op.n_resets_ > 0


def test_reorthogonalization_trigger_fires_and_restores() -> None:
    rng = np.random.default_rng(21)
    # A trigger below the rounding level forces Brand's force_orth on every update.
    op = IncrementalSVD(6, method="deng", orth_tol=1e-17)
    op.append_rows(rng.standard_normal((30, 20)))
    for _ in range(5):
        op.append_rows(rng.standard_normal((3, 20)))
    assert op.n_reorthogonalizations_ >= 5
    assert op.condition_numbers() == (1.0, 1.0)
    assert max(op.orthogonality_loss(exact=True)) <= 1e-14


# -- oracle 5: metamorphic ----------------------------------------------------------------------


@pytest.mark.parametrize("method", ["zha-simon", "deng", "gkl", "rpi"])
def test_zero_rows_leave_s_unchanged(method: str) -> None:
    rng = np.random.default_rng(9)
    op = IncrementalSVD(6, method=method)
    op.append_rows(rng.standard_normal((30, 15)))
    s_before = op.s
    op.append_rows(np.zeros((5, 15)))
    op.append_rows(sp.csr_array((3, 15)))
    np.testing.assert_allclose(op.s, s_before, rtol=1e-12)
    assert op.shape == (38, 15)
    np.testing.assert_array_equal(op.U[30:], 0.0)


@pytest.mark.parametrize("method", ["zha-simon", "deng", "gkl", "rpi"])
@pytest.mark.parametrize("c", [1e-6, 1e6])
def test_scaling_scales_s(method: str, c: float) -> None:
    rng = np.random.default_rng(10)
    a = _sparse_stream(rng, 200, 80, 0.05)

    def run(scale: float) -> IncrementalSVD:
        op = IncrementalSVD(8, method=method, n_directions=6, seed=3)
        op.append_rows(a[:60] * scale)
        for i in range(60, 200, 20):
            op.append_rows(a[i : i + 20] * scale)
        return op

    # All thresholds are relative, so scaling is exact up to rounding (1e-12).
    np.testing.assert_allclose(run(c).s, c * run(1.0).s, rtol=1e-12)


@pytest.mark.parametrize("method", EXACT)
def test_rows_on_stream_equal_columns_on_transposed(method: str) -> None:
    rng = np.random.default_rng(12)
    a = _sparse_stream(rng, 150, 60, 0.08)
    rows = IncrementalSVD(7, method=method)
    cols = IncrementalSVD(7, method=method)
    for i in range(0, 150, 25):
        rows.append_rows(a[i : i + 25])
        cols.append_columns(sp.csr_array(a[i : i + 25].T))
    np.testing.assert_allclose(rows.s, cols.s, rtol=1e-12)
    assert _subspace(rows.U, cols.V) <= 1e-10
    assert _subspace(rows.V, cols.U) <= 1e-10


# -- drift control, merge, state, backends --------------------------------------------------------


def test_refine_restores_accuracy() -> None:
    rng = np.random.default_rng(13)
    m, n, k = 600, 200, 10
    # A slowly decaying spectrum makes truncation drift visible.
    a = (rng.standard_normal((m, 40)) * (0.9 ** np.arange(40))) @ rng.standard_normal((40, n))
    op = IncrementalSVD(k, method="deng")
    op.append_rows(a[:100])
    for i in range(100, m, 50):
        op.append_rows(a[i : i + 50])
    _, s_ref, v_ref = _best_rank(a, k)
    before = _subspace(op.V, v_ref)
    err_s_before = np.max(np.abs(op.s - s_ref) / s_ref)
    op.refine(a, iterations=1)
    after = _subspace(op.V, v_ref)
    err_s_after = np.max(np.abs(op.s - s_ref) / s_ref)
    op.refine(sp.csr_array(a), iterations=3)
    after3 = _subspace(op.V, v_ref)
    # Measured (seed 13): V-subspace error 0.156 before, 0.039 after one
    # refinement (4x), 0.003 after four; top-k s error 8.8e-3 → 6.5e-4.
    # Asserted with margin against seed-to-seed variation.
    assert after < 0.4 * before, (before, after)
    assert err_s_after < 0.2 * err_s_before
    assert after3 < 0.25 * after
    assert max(op.orthogonality_loss(exact=True)) < 1e-12


def test_merge_of_row_disjoint_halves_equals_whole() -> None:
    rng = np.random.default_rng(14)
    a = rng.standard_normal((80, 5)) @ rng.standard_normal((5, 30))
    whole = IncrementalSVD(12)
    left, right = IncrementalSVD(12), IncrementalSVD(12)
    for i in range(0, 80, 20):
        whole.append_rows(a[i : i + 20])
        (left if i < 40 else right).append_rows(a[i : i + 20])
    merged = left.merge(right)
    assert merged.shape == (80, 30)
    # rank 12 ≥ 5 + 5: exact, so the merged factors reproduce A.
    assert np.linalg.norm(_recon(merged) - a) <= 1e-12 * np.linalg.norm(a)
    np.testing.assert_allclose(merged.s, whole.s, rtol=1e-12)
    with pytest.raises(NotMergeableError):
        left.merge(IncrementalSVD(3))


def test_state_roundtrip_mid_stream_with_rng() -> None:
    rng = np.random.default_rng(15)
    a = _sparse_stream(rng, 300, 100, 0.05)
    straight = IncrementalSVD(8, method="rpi", n_directions=4, seed=5)
    first = IncrementalSVD(8, method="rpi", n_directions=4, seed=5)
    for i in range(0, 150, 30):
        straight.append_rows(a[i : i + 30])
        first.append_rows(a[i : i + 30])
    resumed = IncrementalSVD.from_state(first.state())
    for i in range(150, 300, 30):
        straight.append_rows(a[i : i + 30])
        resumed.append_rows(a[i : i + 30])
    np.testing.assert_array_equal(resumed.s, straight.s)
    np.testing.assert_array_equal(resumed.U, straight.U)


def test_torch_backend_agrees_with_numpy() -> None:
    pytest.importorskip("torch")
    rng = np.random.default_rng(16)
    a = _sparse_stream(rng, 200, 80, 0.05)
    ops = []
    for device in ("cpu", "torch"):
        op = IncrementalSVD(8, method="deng", device=device)
        op.append_rows(a[:80])
        for i in range(80, 200, 10):
            op.append_rows(a[i : i + 10])
        op.update_low_rank(sp.csr_array(a[:, :2].toarray()), np.ones((80, 2)))
        ops.append(op)
    np.testing.assert_allclose(ops[1].s, ops[0].s, rtol=1e-10)
    assert _subspace(ops[1].V, ops[0].V) <= 1e-9


@pytest.mark.skipif(
    not pytest.importorskip("torch").cuda.is_available(), reason="needs a CUDA device"
)
def test_cuda_backend_agrees_with_numpy() -> None:
    rng = np.random.default_rng(17)
    a = rng.standard_normal((100, 40))
    ops = [IncrementalSVD(6, device=d) for d in ("cpu", "cuda")]
    for op in ops:
        for i in range(0, 100, 20):
            op.append_rows(a[i : i + 20])
    np.testing.assert_allclose(ops[1].s, ops[0].s, rtol=1e-10)


def test_embeddings_and_transform() -> None:
    rng = np.random.default_rng(18)
    a = rng.standard_normal((50, 4)) @ rng.standard_normal((4, 12))
    op = IncrementalSVD(4)
    op.append_rows(a[:25])
    op.append_rows(a[25:])
    np.testing.assert_allclose(op.transform(a), op.row_embeddings(), atol=1e-10)
    np.testing.assert_allclose(op.transform(sp.csr_array(a)), op.row_embeddings(), atol=1e-10)
    np.testing.assert_allclose(
        op.row_embeddings() @ op.column_embeddings().T, a, atol=1e-10 * np.abs(a).max()
    )


def test_float32_runs_and_is_close() -> None:
    rng = np.random.default_rng(19)
    a = _sparse_stream(rng, 200, 60, 0.1)
    ref = _run("deng", a, 6, 20)
    op = _run("deng", sp.csr_array(a, dtype=np.float32), 6, 20, dtype="float32")
    assert op.s.dtype == np.float32 and op.U.dtype == np.float32
    np.testing.assert_allclose(op.s, ref.s, rtol=1e-4)


def test_bad_input_is_rejected_before_state_changes() -> None:
    rng = np.random.default_rng(20)
    op = IncrementalSVD(3)
    with pytest.raises(InvalidInputError):
        op.update_low_rank(np.ones((2, 1)), np.ones((2, 1)))
    op.append_rows(rng.standard_normal((10, 5)))
    s = op.s
    bad = rng.standard_normal((3, 5))
    bad[1, 2] = np.nan
    with pytest.raises(InvalidInputError) as info:
        op.append_rows(bad)
    assert info.value.rows is not None and list(info.value.rows) == [1]
    with pytest.raises(InvalidInputError):
        op.append_columns(np.ones((9, 2)))
    with pytest.raises(InvalidInputError):
        op.update_low_rank(np.ones((10, 2)), np.ones((5, 3)))
    np.testing.assert_array_equal(op.s, s)
    with pytest.raises(ValueError):
        IncrementalSVD(3, method="svd")


@pytest.mark.parametrize("spread", [1e1, 1e6])
def test_deng_append_gram_form_and_its_fallback(spread: float) -> None:
    # Deng appends take the QR-free Gram form while ε(θ_1/θ_k)² ≤ 1e-9 and
    # the QR form otherwise (spread 1e6 puts θ_1/θ_k far beyond that). Both
    # must give the exact SVD of the updated approximation (oracle 1).
    rng = np.random.default_rng(21)
    m, n, k = 120, 60, 8
    u, _ = np.linalg.qr(rng.standard_normal((m, k)))
    v, _ = np.linalg.qr(rng.standard_normal((n, k)))
    a0 = (u * np.geomspace(1.0, 1.0 / spread, k)) @ v.T
    e = sp.random_array((15, n), density=0.1, random_state=22, format="csr") / spread
    op = IncrementalSVD(k, method="deng")
    op.initialize(a0)
    before = op.n_sparse_updates_
    op.append_rows(e)
    full = np.vstack([a0, e.toarray()])
    uu, ss, vt = np.linalg.svd(full)
    np.testing.assert_allclose(op.s, ss[:k], rtol=1e-10)
    best = (uu[:, :k] * ss[:k]) @ vt[:k]
    recon = (op.U * op.s) @ op.V.T
    assert np.linalg.norm(recon - best) <= 1e-10 * np.linalg.norm(best)
    assert max(op.orthogonality_loss(exact=True)) < 1e-12
    # The Gram form counts as a sparse update; the QR fallback with a dense
    # residual does not.
    assert (op.n_sparse_updates_ > before) == (spread < 1e3)
