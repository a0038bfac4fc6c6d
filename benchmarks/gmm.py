"""IncrementalGMM (FIGMN) against a plain-numpy per-point FIGMN and sklearn's GaussianMixture.

Single thread (BLAS, numba and torch). For each case (K = 8 components, random
SPD covariances 0.5·AAᵀ/D + 0.5·I, Dirichlet(10) weights, mean pairwise distance
``sep``) it prints, in one run:

* sklearn ``GaussianMixture(covariance_type="full")`` fit time and held-out
  log-likelihood (mean nats per sample);
* the true parameters' held-out log-likelihood;
* per-point throughput of streamfact exact and paper modes, and of a
  plain-numpy per-point implementation of the same algorithm (the reference,
  timed on a prefix of the stream);
* minibatch mode (B = 1024) throughput and log-likelihood;
* "refine": one per-point pass followed by two stepwise-EM passes over
  shuffled rows (α = 0.6, B = 4096) with ``split_target=8`` (moment-preserving
  splits of the widest component until there are 8), its wall time, K, LL and
  gap to the true LL.

Throughputs are medians over ``--repeats`` runs, with exact, paper and
minibatch runs interleaved so that a change of machine load hits all three
alike; "exact/paper" is the median of the per-repeat ratios. "upd/row" is the
mean number of components with a posterior above the skip threshold (1e-8)
per training row under the final exact-mode model: exact mode saves work only
on those components (the E-step, 2·K·D² flops per row, is common to both
rules), so its advantage over paper mode is bounded by about
(2K + 9m) / (2K + 3m) for m updated components per row.

Usage: ``python benchmarks/gmm.py [--n 100000] [--repeats 3] [--cases 8:10,32:10,32:3,128:20]``
"""

from __future__ import annotations

import os

for _var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS", "NUMBA_NUM_THREADS"):
    os.environ[_var] = "1"

import argparse  # noqa: E402
import math  # noqa: E402
import time  # noqa: E402

import numpy as np  # noqa: E402
from scipy.special import logsumexp  # noqa: E402
from scipy.stats import chi2  # noqa: E402

from streamfact.operators.gmm import IncrementalGMM  # noqa: E402

LOG2PI = math.log(2 * math.pi)
# δ and β per dimension, chosen on a validation split of the same generator.
PARAMS = {8: (0.5, 1e-3), 32: (0.65, 1e-4), 128: (0.9, 1e-4)}


def make_mixture(dim: int, k: int, sep: float, seed: int = 0):
    rng = np.random.default_rng(seed)
    A = rng.standard_normal((k, dim, dim))
    covs = 0.5 * A @ np.transpose(A, (0, 2, 1)) / dim + 0.5 * np.eye(dim)
    w = rng.dirichlet(np.full(k, 10.0))
    mu = rng.standard_normal((k, dim))
    dists = np.linalg.norm(mu[:, None] - mu[None], axis=2)[np.triu_indices(k, 1)]
    return w, mu * (sep / dists.mean()), covs, rng


def sample(w, mu, covs, n, rng):
    lab = rng.choice(len(w), size=n, p=w)
    L = np.linalg.cholesky(covs)
    return mu[lab] + np.einsum("nij,nj->ni", L[lab], rng.standard_normal((n, mu.shape[1])))


def true_ll(w, mu, covs, X):
    out = []
    for j in range(len(w)):
        L = np.linalg.cholesky(covs[j])
        z = np.linalg.solve(L, (X - mu[j]).T)
        ld = 2 * np.log(np.diag(L)).sum()
        out.append(np.log(w[j]) - 0.5 * (X.shape[1] * LOG2PI + ld + (z * z).sum(0)))
    return float(logsumexp(np.stack(out, 1), axis=1).mean())


def numpy_figmn(X, sigma2, thr, n0, v_min, sp_min, skip=1e-8):
    """Reference: the same exact-mode algorithm, one row at a time, vectorised over K in numpy."""
    d = X.shape[1]
    mu = np.empty((0, d))
    lam = np.empty((0, d, d))
    ld = np.empty(0)
    spm = np.empty(0)
    age = np.empty(0)
    for x in X:
        if len(spm):
            e = x - mu
            u = np.einsum("kab,kb->ka", lam, e)
            d2 = np.maximum(np.einsum("ka,ka->k", u, e), 0.0)
        if not len(spm) or d2.min() > thr:
            mu = np.vstack([mu, x])
            lam = np.concatenate([lam, np.diag(1 / sigma2)[None]])
            ld = np.append(ld, np.log(sigma2).sum())
            spm = np.append(spm, 1.0)
            age = np.append(age, 1.0)
            continue
        ll = np.log(spm / spm.sum()) - 0.5 * (d * LOG2PI + ld + d2)
        p = np.exp(ll - logsumexp(ll))
        age += 1
        spm += p
        for j in np.flatnonzero(p > skip):
            w = p[j] / (spm[j] + n0 - 1)
            c = w / (1 + w * d2[j])
            lam[j] = (lam[j] - c * np.outer(u[j], u[j])) / (1 - w)
            ld[j] += d * math.log1p(-w) + math.log1p(w * d2[j])
            mu[j] += w * e[j]
        keep = ~((age > v_min) & (spm < sp_min))
        mu, lam, ld, spm, age = mu[keep], lam[keep], ld[keep], spm[keep], age[keep]
    return len(spm)


def timed(fn):
    t = time.perf_counter()
    out = fn()
    return time.perf_counter() - t, out


def run_case(dim: int, sep: float, n: int, n_ref: int, with_sklearn: bool, repeats: int) -> dict:
    delta, beta = PARAMS[dim]
    w, mu, covs, rng = make_mixture(dim, 8, sep)
    n_train = n if dim < 128 else n // 2
    Xtr = sample(w, mu, covs, n_train, rng)
    Xte = sample(w, mu, covs, 20000, rng)
    row: dict = {"case": f"D={dim}, sep {sep:g}", "N": n_train, "true": true_ll(w, mu, covs, Xte)}
    if with_sklearn:
        from sklearn.mixture import GaussianMixture

        sk = GaussianMixture(8, covariance_type="full", tol=1e-3, max_iter=200, random_state=0)
        t, _ = timed(lambda: sk.fit(Xtr))
        row["sk_time"], row["sk_ll"], row["sk_iter"] = t, float(sk.score(Xte)), sk.n_iter_

    def fit(**kw):
        g = IncrementalGMM(dim, delta=delta, beta=beta, **kw)
        g.update(Xtr[:2048])  # warm-up and JIT outside the timing
        t, _ = timed(lambda: g.update(Xtr[2048:]))
        return g, (n_train - 2048) / t

    for rule in ("exact", "paper"):
        IncrementalGMM(dim, sigma_ini=1.0, update_rule=rule).update(Xtr[:10])  # compile
    kinds = {"exact": dict(update_rule="exact"), "paper": dict(update_rule="paper"),
             "mb": dict(mode="minibatch", batch_size=1024)}
    rates: dict[str, list[float]] = {name: [] for name in kinds}
    models = {}
    for _ in range(repeats):
        for name, kw in kinds.items():
            models[name], rate = fit(**kw)
            rates[name].append(rate)
    for name, g in models.items():
        row[name] = (float(np.median(rates[name])), g.n_components,
                     float(g.score_samples(Xte).mean()))
    row["ratio"] = float(np.median(np.array(rates["exact"]) / np.array(rates["paper"])))
    proba = models["exact"].predict_proba(Xtr[:20000])
    row["upd"] = float((proba > 1e-8).sum(axis=1).mean())
    g_ex = IncrementalGMM(dim, delta=delta, beta=beta)
    g_ex.update(Xtr[:256])
    sigma2 = g_ex.sigma_ini_ ** 2
    t, _ = timed(lambda: numpy_figmn(Xtr[:n_ref], sigma2, chi2.isf(beta, dim), dim + 1.0,
                                     max(1000.0, 20 * (dim + 1)), dim + 1.0))
    row["numpy_rate"] = n_ref / t

    # refine: one per-point pass, then two stepwise-EM passes (α < 1) over shuffled
    # rows, splitting the widest component until there are 8.
    def refine():
        gr = IncrementalGMM(dim, delta=delta, beta=beta, batch_size=4096, step_alpha=0.6,
                            split_target=8)
        gr.update(Xtr)
        perm = np.random.default_rng(1)
        for _ in range(2):
            gr.update_batch(Xtr[perm.permutation(n_train)])
        return gr

    t, gr = timed(refine)
    row["refine"] = (t, gr.n_components, float(gr.score_samples(Xte).mean()), gr.n_split)
    return row


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=100000)
    ap.add_argument("--n-ref", type=int, default=3000)
    ap.add_argument("--cases", default="8:10,32:10,32:3,128:20")
    ap.add_argument("--no-sklearn", action="store_true")
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    try:
        import torch

        torch.set_num_threads(1)
    except ImportError:
        pass
    with open("/proc/loadavg") if os.path.exists("/proc/loadavg") else open(os.devnull) as f:
        print(f"load average at start: {f.read().strip() or 'n/a'}")
    hdr = ("| case | N | true LL | sklearn fit (iters) | sklearn LL | numpy ref pts/s "
           "| exact pts/s (x ref), K, LL | paper pts/s, LL | exact/paper (upd/row) "
           "| minibatch B=1024 pts/s, K, LL "
           "| refine α=0.6 + splits: time, K (splits), LL, gap |")
    print(hdr)
    print("|" + " --- |" * 11)
    for spec in args.cases.split(","):
        dim, sep = spec.split(":")
        r = run_case(int(dim), float(sep), args.n, args.n_ref, not args.no_sklearn,
                     args.repeats)
        ex, pa, mb, rf = r["exact"], r["paper"], r["mb"], r["refine"]
        sk = (f"{r['sk_time']:.1f} s ({r['sk_iter']}) | {r['sk_ll']:.3f}"
              if "sk_time" in r else "– | –")
        print(
            f"| {r['case']} | {r['N']} | {r['true']:.3f} | {sk} | {r['numpy_rate']:.0f} "
            f"| {ex[0]:.0f} ({ex[0] / r['numpy_rate']:.0f}x), K={ex[1]}, {ex[2]:.3f} "
            f"| {pa[0]:.0f}, {pa[2]:.3f} | {r['ratio']:.2f} ({r['upd']:.2f}) "
            f"| {mb[0]:.0f}, K={mb[1]}, {mb[2]:.3f} "
            f"| {rf[0]:.2f} s, K={rf[1]} ({rf[3]}), {rf[2]:.3f}, {r['true'] - rf[2]:.3f} |",
            flush=True,
        )
    with open("/proc/loadavg") if os.path.exists("/proc/loadavg") else open(os.devnull) as f:
        print(f"load average at end: {f.read().strip() or 'n/a'}")


if __name__ == "__main__":
    main()
