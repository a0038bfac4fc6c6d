"""IncrementalGMM (FIGMN) against closed-form and independent oracles."""

from __future__ import annotations

import json
import math
from typing import Any

import numpy as np
import pytest
from scipy.special import logsumexp
from scipy.stats import chi2, multivariate_normal

from streamfact.kernels.backend import cuda_available
from streamfact.operators.base import InvalidInputError, OperatorState
from streamfact.operators.gmm import IncrementalGMM

LOG2PI = math.log(2.0 * math.pi)


# -- helpers ------------------------------------------------------------------


def make_mixture(
    dim: int, k: int, sep: float, seed: int = 0
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.random.Generator]:
    """Random SPD covariances 0.5·AAᵀ/D + 0.5·I, Dirichlet(10) weights, mean pairwise
    distance ``sep`` (the benchmark mixture of the FIGMN notes)."""
    rng = np.random.default_rng(seed)
    A = rng.standard_normal((k, dim, dim))
    covs = 0.5 * A @ np.transpose(A, (0, 2, 1)) / dim + 0.5 * np.eye(dim)
    w = rng.dirichlet(np.full(k, 10.0))
    mu = rng.standard_normal((k, dim))
    dists = np.linalg.norm(mu[:, None] - mu[None], axis=2)[np.triu_indices(k, 1)]
    return w, mu * (sep / dists.mean()), covs, rng


def sample(
    w: np.ndarray, mu: np.ndarray, covs: np.ndarray, n: int, rng: np.random.Generator
) -> np.ndarray:
    lab = rng.choice(len(w), size=n, p=w)
    L = np.linalg.cholesky(covs)
    return mu[lab] + np.einsum("nij,nj->ni", L[lab], rng.standard_normal((n, mu.shape[1])))


def mixture_logpdf(w: np.ndarray, mu: np.ndarray, covs: np.ndarray, X: np.ndarray) -> np.ndarray:
    parts = [
        np.log(w[j]) + multivariate_normal(mu[j], covs[j]).logpdf(X) for j in range(len(w))
    ]
    return logsumexp(np.stack(parts, axis=1), axis=1)


def rel(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


class CovarianceIGMN:
    """Independent O(K D³) oracle: the same algorithm in covariance form.

    Explicit inverses and determinants every row (no rank-one formulas), exact
    Welford recursion C' = (1-ω)(C + ω e eᵀ), same novelty / posterior / skip /
    pruning rules as documented for IncrementalGMM.
    """

    def __init__(self, dim, sigma2, chi2_thr, n0, v_min, sp_min, skip=1e-8):
        self.d, self.s2, self.thr, self.n0 = dim, sigma2, chi2_thr, n0
        self.v_min, self.sp_min, self.skip = v_min, sp_min, skip
        self.mu: list[np.ndarray] = []
        self.C: list[np.ndarray] = []
        self.sp: list[float] = []
        self.v: list[int] = []
        self.created = self.removed = 0

    def step(self, x: np.ndarray) -> None:
        d2 = [
            float((x - m) @ np.linalg.solve(C, x - m))
            for m, C in zip(self.mu, self.C, strict=True)
        ]
        if not self.mu or min(d2) > self.thr:
            self.mu.append(x.copy())
            self.C.append(np.diag(self.s2))
            self.sp.append(1.0)
            self.v.append(1)
            self.created += 1
            return
        tot = sum(self.sp)
        ll = np.array([
            math.log(s / tot) - 0.5 * (self.d * LOG2PI + np.linalg.slogdet(C)[1] + max(q, 0.0))
            for s, C, q in zip(self.sp, self.C, d2, strict=True)
        ])
        p = np.exp(ll - logsumexp(ll))
        for j in range(len(self.mu)):
            self.v[j] += 1
            self.sp[j] += p[j]
            if p[j] <= self.skip:
                continue
            w = p[j] / (self.sp[j] + self.n0 - 1.0)
            e = x - self.mu[j]
            self.C[j] = (1 - w) * (self.C[j] + w * np.outer(e, e))
            self.mu[j] = self.mu[j] + w * e
        keep = [
            not (v > self.v_min and s < self.sp_min)
            for v, s in zip(self.v, self.sp, strict=True)
        ]
        self.removed += keep.count(False)
        for name in ("mu", "C", "sp", "v"):
            setattr(self, name, [a for a, k in zip(getattr(self, name), keep, strict=True) if k])


# -- exact algebra ----------------------------------------------------------------


@pytest.mark.parametrize("n0", [1.0, None])
def test_single_component_matches_weighted_covariance(n0: float | None) -> None:
    rng = np.random.default_rng(1)
    d, n = 6, 500
    X = rng.standard_normal((n, d)) @ rng.standard_normal((d, d)) * 0.3 + 2.0
    sigma = np.linspace(1.0, 3.0, d)
    # beta tiny: the χ² threshold (~1.4e3) is never exceeded, so no creation.
    gmm = IncrementalGMM(d, sigma_ini=sigma, beta=1e-300, n0=n0, resync_every=0)
    gmm.update(X)
    assert gmm.n_components == 1 and gmm.n_created == 1
    m0 = d + 1.0 if n0 is None else n0
    wts = np.ones(n)
    wts[0] = m0
    mean = wts @ X / wts.sum()
    Xc = X - mean
    cov = (m0 * np.diag(sigma**2) + (Xc * wts[:, None]).T @ Xc) / (m0 + n - 1)
    if n0 == 1.0:  # the notes' special case: np.cov(bias=True) + diag(σ²)/N
        np.testing.assert_allclose(cov, np.cov(X.T, bias=True) + np.diag(sigma**2) / n, rtol=1e-12)
    # Sherman–Morrison recursion of a well-conditioned matrix: observed ~1e-13.
    assert rel(np.linalg.inv(gmm.precisions[0]), cov) <= 1e-10
    assert rel(gmm.means[0], mean) <= 1e-12
    assert abs(gmm.log_dets[0] - np.linalg.slogdet(cov)[1]) <= 1e-9 * d


def test_paper_mode_equals_covariance_recursion() -> None:
    rng = np.random.default_rng(2)
    d, n = 5, 400
    X = rng.standard_normal((n, d)) * 0.7 - 1.0
    sigma2 = np.full(d, 2.0)
    gmm = IncrementalGMM(d, sigma_ini=np.sqrt(sigma2), beta=1e-300, update_rule="paper",
                         resync_every=0)
    gmm.update(X)
    # eq. 11 in covariance form, n0 = D + 1
    n0 = d + 1.0
    mu, C, spm = X[0].copy(), np.diag(sigma2), 1.0
    for x in X[1:]:
        spm += 1.0
        w = 1.0 / (spm + n0 - 1.0)
        dmu = w * (x - mu)
        mu = mu + dmu
        es = x - mu
        C = (1 - w) * C + w * np.outer(es, es) - np.outer(dmu, dmu)
    assert gmm.n_guarded == 0
    assert rel(np.linalg.inv(gmm.precisions[0]), C) <= 1e-10  # observed ~1e-13
    assert rel(gmm.means[0], mu) <= 1e-12
    assert abs(gmm.log_dets[0] - np.linalg.slogdet(C)[1]) <= 1e-9 * d


def test_paper_mode_indefinite_guard_and_exact_stays_pd() -> None:
    # Finding 1: with n0 = 1 the paper's second update downdates C to ½σ² - ⅛ e eᵀ,
    # indefinite when ‖e‖²/σ² > 4, yet d² = 9 < χ²_{3, 0.999} so no component is created.
    d = 3
    x1 = np.zeros(d)
    x2 = np.array([3.0, 0.0, 0.0])
    X = np.stack([x1, x2])
    paper = IncrementalGMM(d, sigma_ini=1.0, n0=1.0, update_rule="paper")
    paper.update(X)
    assert paper.n_components == 1
    assert paper.n_guarded == 1
    exact = IncrementalGMM(d, sigma_ini=1.0, n0=1.0)
    exact.update(X)
    assert exact.n_guarded == 0
    np.linalg.cholesky(exact.precisions[0])
    # exact: C = ½(I + ½ e eᵀ)
    np.testing.assert_allclose(np.linalg.inv(exact.precisions[0]),
                               0.5 * (np.eye(d) + 0.5 * np.outer(x2, x2)), rtol=1e-13)


def test_matches_covariance_form_oracle_with_creation_and_pruning() -> None:
    rng = np.random.default_rng(3)
    d = 4
    centers = np.array([[0.0] * d, [15.0] + [0.0] * (d - 1), [0.0, 15.0] + [0.0] * (d - 2)])
    n = 600
    X = centers[rng.integers(0, 3, n)] + rng.standard_normal((n, d))
    X[rng.choice(n, 6, replace=False)] += 60.0  # outliers: created, later pruned
    gmm = IncrementalGMM(d, sigma_ini=2.0, beta=1e-3, v_min=100, sp_min=5.0, resync_every=50)
    oracle = CovarianceIGMN(d, np.full(d, 4.0), chi2.isf(1e-3, d), d + 1.0, 100, 5.0)
    for a in range(0, n, 50):
        gmm.update(X[a : a + 50])
        for x in X[a : a + 50]:
            oracle.step(x)
        # same component trajectory at every checkpoint
        assert (gmm.n_components, gmm.n_created, gmm.n_removed) == (
            len(oracle.mu), oracle.created, oracle.removed)
    assert gmm.n_removed > 0 and gmm.n_components == 3
    # Rank-one updates vs explicit inverses: rounding only (observed ~1e-13).
    assert rel(gmm.means, np.stack(oracle.mu)) <= 1e-9
    assert rel(gmm.covariances, np.stack(oracle.C)) <= 1e-9
    assert rel(gmm.masses, np.array(oracle.sp)) <= 1e-9
    ld = np.array([np.linalg.slogdet(C)[1] for C in oracle.C])
    assert np.abs(gmm.log_dets - ld).max() <= 1e-9 * d


def test_precision_consistency_and_pd_after_long_stream() -> None:
    w, mu, covs, rng = make_mixture(8, 4, 12.0, seed=4)
    X = sample(w, mu, covs, 20000, rng)
    gmm = IncrementalGMM(8, delta=0.5, beta=1e-3, resync_every=256)
    gmm.update(X)
    assert gmm.n_components >= 4
    for lam, ld in zip(gmm.precisions, gmm.log_dets, strict=True):
        np.testing.assert_allclose(lam, lam.T, rtol=0, atol=1e-12 * np.abs(lam).max())
        L = np.linalg.cholesky(lam)  # positive definite
        assert abs(ld + 2 * np.log(np.diag(L)).sum()) <= 1e-9 * 8
    np.testing.assert_allclose(np.linalg.inv(gmm.covariances), gmm.precisions, rtol=1e-9,
                               atol=1e-12)
    assert gmm.n_repaired == 0


# -- queries ----------------------------------------------------------------------


def _fitted(seed: int = 5, dim: int = 5, device: str = "cpu") -> tuple[IncrementalGMM, np.ndarray]:
    w, mu, covs, rng = make_mixture(dim, 3, 15.0, seed=seed)
    X = sample(w, mu, covs, 3000, rng)
    gmm = IncrementalGMM(dim, delta=0.5, device=device)
    gmm.update(X)
    return gmm, sample(w, mu, covs, 200, rng)


def test_score_predict_match_covariance_form() -> None:
    gmm, Xte = _fitted()
    covs = np.linalg.inv(gmm.precisions)
    ref = mixture_logpdf(gmm.weights, gmm.means, covs, Xte)
    np.testing.assert_allclose(gmm.score_samples(Xte), ref, rtol=1e-10)
    proba = gmm.predict_proba(Xte)
    np.testing.assert_allclose(proba.sum(axis=1), 1.0, rtol=1e-12)
    parts = np.stack(
        [
            np.log(gmm.weights[j]) + multivariate_normal(gmm.means[j], covs[j]).logpdf(Xte)
            for j in range(gmm.n_components)
        ],
        axis=1,
    )
    np.testing.assert_allclose(proba, np.exp(parts - logsumexp(parts, axis=1, keepdims=True)),
                               rtol=1e-8, atol=1e-14)
    np.testing.assert_array_equal(gmm.predict(Xte), np.argmax(parts, axis=1))


def test_torch_scoring_matches_numpy() -> None:
    pytest.importorskip("torch")
    gmm, Xte = _fitted()
    tg = IncrementalGMM.from_state({"arrays": gmm.state().arrays,
                                    "meta": {**gmm.state().meta,
                                             "params": {**gmm.json_params(), "device": "torch"}}})
    np.testing.assert_allclose(tg.score_samples(Xte), gmm.score_samples(Xte), rtol=1e-12)
    np.testing.assert_allclose(tg.predict_proba(Xte), gmm.predict_proba(Xte), rtol=1e-10,
                               atol=1e-15)
    np.testing.assert_allclose(tg.covariances, gmm.covariances, rtol=1e-10)


def test_recall_equals_conditional_gaussian_one_component() -> None:
    rng = np.random.default_rng(6)
    d = 6
    X = rng.standard_normal((300, d)) @ rng.standard_normal((d, d))
    gmm = IncrementalGMM(d, sigma_ini=3.0, beta=1e-300)
    gmm.update(X)
    assert gmm.n_components == 1
    mu, C = gmm.means[0], np.linalg.inv(gmm.precisions[0])
    obs = np.array([True, False, True, True, False, True])
    a, b = np.flatnonzero(obs), np.flatnonzero(~obs)
    Q = rng.standard_normal((20, d)) * 2.0
    Q_in = Q.copy()
    Q_in[:, b] = np.nan  # missing entries may be NaN
    got = gmm.recall(Q_in, observed=obs)
    want_b = mu[b] + (Q[:, a] - mu[a]) @ np.linalg.solve(C[np.ix_(a, a)], C[np.ix_(a, b)])
    np.testing.assert_allclose(got[:, b], want_b, rtol=1e-10)
    np.testing.assert_array_equal(got[:, a], Q[:, a])
    marg = multivariate_normal(mu[a], C[np.ix_(a, a)]).logpdf(Q[:, a])
    np.testing.assert_allclose(gmm.score_samples(Q_in, observed=obs), marg, rtol=1e-10)


def test_recall_mixture_and_per_row_masks() -> None:
    gmm, Xte = _fitted(dim=4)
    covs = np.linalg.inv(gmm.precisions)
    rng = np.random.default_rng(7)
    masks = rng.random((len(Xte), 4)) < 0.6
    masks[:, 0] = True
    got = gmm.recall(np.where(masks, Xte, np.nan), observed=masks)
    for i in range(0, len(Xte), 17):
        a, b = np.flatnonzero(masks[i]), np.flatnonzero(~masks[i])
        if b.size == 0:
            continue
        lp, cm = [], []
        for j in range(gmm.n_components):
            m, C = gmm.means[j], covs[j]
            lp.append(np.log(gmm.weights[j])
                      + multivariate_normal(m[a], C[np.ix_(a, a)]).logpdf(Xte[i, a]))
            cm.append(m[b] + C[np.ix_(b, a)] @ np.linalg.solve(C[np.ix_(a, a)], Xte[i, a] - m[a]))
        p = np.exp(np.array(lp) - logsumexp(lp))
        np.testing.assert_allclose(got[i, b], p @ np.array(cm), rtol=1e-9, atol=1e-9)


def test_recall_rejects_nan_in_observed() -> None:
    gmm, Xte = _fitted(dim=4)
    bad = Xte[:5].copy()
    bad[3, 0] = np.nan
    with pytest.raises(InvalidInputError) as err:
        gmm.recall(bad, observed=np.array([True, True, False, False]))
    assert err.value.rows is not None and err.value.rows.tolist() == [3]


# -- statistics -------------------------------------------------------------------


@pytest.fixture(scope="module")
def separated32() -> tuple[np.ndarray, np.ndarray, float]:
    w, mu, covs, rng = make_mixture(32, 8, 10.0, seed=0)
    Xtr = sample(w, mu, covs, 60000, rng)
    Xte = sample(w, mu, covs, 5000, rng)
    return Xtr, Xte, float(mixture_logpdf(w, mu, covs, Xte).mean())


def test_heldout_loglik_close_to_truth_d32(separated32) -> None:
    Xtr, Xte, true_ll = separated32
    # δ, β tuned on a validation split of the same generator (as in the notes); n0 = D+1,
    # sp_min = D+1 and v_min = 1000 are the defaults. Gap observed: 0.02-0.03 nats.
    gmm = IncrementalGMM(32, delta=0.65, beta=1e-4)
    gmm.update(Xtr)
    assert gmm.n_components == 8
    assert gmm.score_samples(Xte).mean() >= true_ll - 0.05


def test_minibatch_heldout_loglik_d32(separated32) -> None:
    Xtr, Xte, true_ll = separated32
    gmm = IncrementalGMM(32, delta=0.65, beta=1e-4, mode="minibatch", batch_size=1024)
    gmm.update(Xtr)
    # A late novel row can leave one young, not yet pruned extra component.
    assert 8 <= gmm.n_components <= 9
    assert gmm.score_samples(Xte).mean() >= true_ll - 0.05


def test_split_is_moment_preserving() -> None:
    w, mu, covs, rng = make_mixture(5, 2, 2.0, seed=17)
    X = sample(w, mu, covs, 2000, rng)
    gmm = IncrementalGMM(5, sigma_ini=3.0, beta=1e-12, mode="minibatch", split_target=2)
    gmm.update(X[:500])  # no component yet: learned per point into a single one
    assert gmm.n_components == 1
    m0, c0, s0 = gmm.means[0], gmm.covariances[0], gmm.masses[0]
    gmm._split_widest()
    assert gmm.n_components == 2 and gmm.n_split == 1
    # The two halves as a mixture: same mass, mean and covariance as the parent
    # (closed-form algebra; only the inverse/eigh rounding remains, ~1e-15).
    wt = gmm.masses / gmm.masses.sum()
    m = wt @ gmm.means
    C = sum(wt[j] * (gmm.covariances[j] + np.outer(gmm.means[j] - m, gmm.means[j] - m))
            for j in range(2))
    np.testing.assert_allclose(gmm.masses.sum(), s0, rtol=1e-15)
    np.testing.assert_allclose(m, m0, rtol=1e-12, atol=1e-12)
    assert rel(C, c0) <= 1e-12
    for lam, ld in zip(gmm.precisions, gmm.log_dets, strict=True):
        assert abs(ld + np.linalg.slogdet(lam)[1]) <= 1e-10
    # Splitting stops at the target: the next batch splits nothing more.
    gmm.update(X[500:])
    assert gmm.n_components == 2 and gmm.n_split == 1


def test_split_refinement_closes_overlapping_gap() -> None:
    # Overlapping clusters (mean separation 3 ≈ 3 within-cluster std): the χ²
    # novelty test fuses them, which is FIGMN's known failure (notes §10/§11).
    w, mu, covs, rng = make_mixture(16, 6, 3.0, seed=0)
    Xtr, Xte = sample(w, mu, covs, 20000, rng), sample(w, mu, covs, 5000, rng)
    true_ll = float(mixture_logpdf(w, mu, covs, Xte).mean())
    gmm = IncrementalGMM(16, delta=0.65, beta=1e-4, batch_size=2048, step_alpha=0.6,
                         split_target=6)
    gmm.update(Xtr)  # point mode: split_target plays no part here
    plain_gap = true_ll - gmm.score_samples(Xte).mean()
    assert gmm.n_components < 6 and plain_gap > 0.4  # observed: K = 2, gap 0.56
    perm = np.random.default_rng(1)
    for _ in range(2):
        gmm.update_batch(Xtr[perm.permutation(len(Xtr))])
    assert gmm.n_components == 6 and gmm.n_split >= 1
    # Observed gap after two refinement passes: 0.15. The floor at this size is
    # the estimation error of 6 full 16-D covariances from 20k rows (≈ p/2n ≈ 0.02
    # nats for EM to convergence) plus the extra variance of stepwise EM with
    # α = 0.6 (it weights recent batches more); the target is 0.3.
    assert true_ll - gmm.score_samples(Xte).mean() <= 0.3


def test_split_refinement_keeps_separated_case(separated32) -> None:
    Xtr, Xte, true_ll = separated32
    gmm = IncrementalGMM(32, delta=0.65, beta=1e-4, batch_size=4096, step_alpha=0.6,
                         split_target=8)
    gmm.update(Xtr)
    perm = np.random.default_rng(1)
    for _ in range(2):  # the benchmark's recipe: one point pass, two refinement passes
        gmm.update_batch(Xtr[perm.permutation(len(Xtr))])
    # FIGMN already finds the 8 clusters, so nothing is split. Stepwise EM with
    # α < 1 keeps an effective window of about B/γ_k rows (≈ 25k here), so its
    # estimate is a little noisier than the plain pass's: observed gap 0.040
    # against 0.036 for the plain pass (and 0.027 after a third pass).
    # A late novel row can leave one young, not yet pruned extra component.
    assert gmm.n_split == 0 and 8 <= gmm.n_components <= 9
    assert gmm.score_samples(Xte).mean() >= true_ll - 0.05


def test_close_to_sklearn_on_separated_clusters() -> None:
    from sklearn.mixture import GaussianMixture

    w, mu, covs, rng = make_mixture(6, 4, 12.0, seed=8)
    Xtr, Xte = sample(w, mu, covs, 20000, rng), sample(w, mu, covs, 4000, rng)
    sk = GaussianMixture(4, covariance_type="full", random_state=0).fit(Xtr)
    gmm = IncrementalGMM(6, delta=0.5)
    gmm.update(Xtr)
    # One pass with the n0 prior vs EM to convergence: FIGMN's components carry the
    # creating point with weight n0 and skip tiny posteriors, which costs a few
    # hundredths of a nat on separated clusters (observed gap ~0.01).
    # Components created by the last few hundred tail rows are still young (age < v_min)
    # and carry almost no mass; count the ones that matter.
    assert (gmm.weights > 0.01).sum() == 4
    assert gmm.score_samples(Xte).mean() >= sk.score(Xte) - 0.05


def test_float32_tracks_float64() -> None:
    w, mu, covs, rng = make_mixture(8, 3, 15.0, seed=9)
    X = sample(w, mu, covs, 5000, rng)
    Xte = sample(w, mu, covs, 500, rng)
    g64 = IncrementalGMM(8, delta=0.5)
    g32 = IncrementalGMM(8, delta=0.5, dtype="float32")
    g64.update(X)
    g32.update(X.astype(np.float32))
    assert g32.means.dtype == np.float32 and g32.precisions.dtype == np.float32
    assert g32.n_components == g64.n_components
    # float32 rank-one updates over 5000 rows: means agree to ~1e-5 relative.
    assert rel(g32.means.astype(np.float64), g64.means) <= 1e-4
    np.testing.assert_allclose(g32.score_samples(Xte), g64.score_samples(Xte), rtol=1e-3)


# -- state, modes, merge ---------------------------------------------------------------


def _roundtrip(st: OperatorState) -> OperatorState:
    return OperatorState({k: np.array(v) for k, v in st.arrays.items()},
                         json.loads(json.dumps(st.meta)))


@pytest.mark.parametrize(
    "kw",
    [dict(update_rule="exact"), dict(update_rule="paper"),
     dict(mode="minibatch", batch_size=300), dict(sigma_ini=np.array([1.0, 2.0, 1.0, 1.0, 3.0]))],
)
def test_checkpoint_resume_is_bit_identical(kw: dict[str, Any]) -> None:
    w, mu, covs, rng = make_mixture(5, 3, 12.0, seed=10)
    X = sample(w, mu, covs, 3000, rng)
    straight = IncrementalGMM(5, warmup=100, resync_every=64, **kw)
    straight.update(X[:1200])
    straight.update(X[1200:])
    first = IncrementalGMM(5, warmup=100, resync_every=64, **kw)
    first.update(X[:1200])
    resumed = IncrementalGMM.from_state(_roundtrip(first.state()))
    resumed.update(X[1200:])
    a, b = straight.state(), resumed.state()
    assert a.meta == b.meta
    for name in a.arrays:
        np.testing.assert_array_equal(a.arrays[name], b.arrays[name], err_msg=name)


def test_point_mode_split_invariant_but_order_dependent() -> None:
    w, mu, covs, rng = make_mixture(4, 3, 12.0, seed=11)
    X = sample(w, mu, covs, 2000, rng)
    one = IncrementalGMM(4, warmup=50)
    one.update(X)
    cut = IncrementalGMM(4, warmup=50)
    for a in range(0, 2000, 37):
        cut.update(X[a : a + 37])
    np.testing.assert_array_equal(one.means, cut.means)
    np.testing.assert_array_equal(one.precisions, cut.precisions)
    shuffled = IncrementalGMM(4, warmup=50)
    shuffled.update(X[::-1])
    assert not np.array_equal(np.sort(shuffled.means, axis=0), np.sort(one.means, axis=0))


def test_warmup_buffer_and_finish() -> None:
    rng = np.random.default_rng(12)
    X = rng.standard_normal((30, 3)) * np.array([1.0, 10.0, 100.0])
    gmm = IncrementalGMM(3, warmup=64, delta=1.0)
    gmm.update(X)
    assert gmm.n_components == 0 and gmm.sigma_ini_ is None
    with pytest.raises(InvalidInputError, match="warm-up"):
        gmm.score_samples(X)
    gmm.finish_warmup()
    assert gmm.sigma_ini_ is not None
    np.testing.assert_allclose(gmm.sigma_ini_, X.std(axis=0), rtol=1e-6)
    assert gmm.n_seen == 30 and gmm.n_components >= 1


def test_minibatch_torch_matches_numpy() -> None:
    pytest.importorskip("torch")
    w, mu, covs, rng = make_mixture(6, 3, 12.0, seed=13)
    X = sample(w, mu, covs, 4000, rng)
    a = IncrementalGMM(6, mode="minibatch", batch_size=500)
    b = IncrementalGMM(6, mode="minibatch", batch_size=500, device="torch")
    a.update(X)
    b.update(X)
    assert a.n_components == b.n_components
    # Same math, different BLAS/LAPACK: rounding only.
    assert rel(b.means, a.means) <= 1e-10
    assert rel(b.precisions, a.precisions) <= 1e-8


def test_minibatch_single_component_is_exact_chan_merge() -> None:
    rng = np.random.default_rng(14)
    d, n = 4, 2000
    X = rng.standard_normal((n, d)) * 2.0 + 1.0
    gmm = IncrementalGMM(d, sigma_ini=1.5, beta=1e-300, mode="minibatch", batch_size=250,
                         n0=1.0)
    gmm.update(X)
    # The first batch is learned per point (no components yet); later batches are merged
    # exactly, so the result is the weighted covariance with the σ_ini prior term.
    cov = np.cov(X.T, bias=True) + np.diag(np.full(d, 1.5**2)) / n
    assert gmm.n_components == 1
    assert rel(gmm.covariances[0], cov) <= 1e-10
    assert abs(gmm.log_dets[0] - np.linalg.slogdet(cov)[1]) <= 1e-9 * d


def test_merge_two_halves() -> None:
    w, mu, covs, rng = make_mixture(6, 4, 25.0, seed=3)
    X = sample(w, mu, covs, 16000, rng)
    Xte = sample(w, mu, covs, 2000, rng)
    whole = IncrementalGMM(6, delta=0.4)
    whole.update(X)
    a, b = IncrementalGMM(6, delta=0.4), IncrementalGMM(6, delta=0.4)
    a.update(X[:8000])
    b.update(X[8000:])
    m = a.merge(b)
    big = [(g.weights > 0.01).sum() for g in (a, b, whole, m)]
    assert big == [4, 4, 4, 4]
    assert m.n_merged >= 4
    assert m.n_seen == 16000
    np.testing.assert_allclose(m.masses.sum(), a.masses.sum() + b.masses.sum())
    # Moment matching of two halves vs one pass: both are near the truth (~0.01 nats).
    assert abs(m.score_samples(Xte).mean() - whole.score_samples(Xte).mean()) <= 0.05
    with pytest.raises(TypeError):
        a.merge(IncrementalGMM(5))  # type: ignore[arg-type]


def test_bad_input_leaves_state_unchanged() -> None:
    gmm, Xte = _fitted(dim=4)
    before = gmm.state()
    bad = Xte[:6].copy()
    bad[4, 2] = np.inf
    with pytest.raises(InvalidInputError) as err:
        gmm.update(bad)
    assert err.value.rows is not None and err.value.rows.tolist() == [4]
    with pytest.raises(InvalidInputError):
        gmm.update_batch(np.zeros((3, 5)))
    after = gmm.state()
    for k in before.arrays:
        np.testing.assert_array_equal(before.arrays[k], after.arrays[k])


@pytest.mark.gpu
@pytest.mark.skipif(not cuda_available(), reason="needs a CUDA device")
def test_cuda_minibatch_matches_cpu() -> None:
    w, mu, covs, rng = make_mixture(8, 3, 12.0, seed=16)
    X = sample(w, mu, covs, 4000, rng)
    a = IncrementalGMM(8, mode="minibatch", batch_size=1000)
    b = IncrementalGMM(8, mode="minibatch", batch_size=1000, device="cuda")
    a.update(X)
    b.update(X)
    assert a.n_components == b.n_components
    assert rel(b.means, a.means) <= 1e-9
    np.testing.assert_allclose(b.score_samples(X[:100]), a.score_samples(X[:100]), rtol=1e-9)
