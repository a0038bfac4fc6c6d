"""KeyedSVD on the bundled Debian dependency graph: throughput and accuracy.

Data: ``examples/data/debian-deps`` (src → dst edges with an IDF ``weight``,
shuffled), fed in its stored order through :class:`KeyedSVD` in batches of
``--batch`` events, as the embedding daemon does. Reported per configuration:

* events/s, wall clock and CPU (process time), for the whole stream — key
  lookups, matrix building, updates and refinements included;
* accuracy against ``scipy.sparse.linalg.svds`` of the same final matrix
  (tol 1e-10): max relative error of the top-10 singular values, mean
  relative error of all k, mean principal-angle sine of span(V) and span(U),
  and neighbour overlap@10 — for ``--sample`` random rows with at least
  ``--min-degree`` edges, the share of their 10 cosine nearest rows in
  U√S that the reference embeddings also rank top 10;
* the same accuracy after one extra ``refine()`` at the end of the stream,
  and its time.

Reference rows: the ``svds`` recompute of the final matrix and sklearn's
``randomized_svd`` (what a periodic restart would cost). BLAS is pinned to one
thread.

Run: ``python benchmarks/keyed_svd.py [--configs default,norefine] [--rank 64]``.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
os.environ.setdefault("MKL_NUM_THREADS", "1")

import numpy as np
import pyarrow.parquet as pq
import scipy.sparse as sp
import scipy.sparse.linalg as spla

from streamfact.operators.keyed_svd import KeyedSVD
from streamfact.service.snapshots import unit_rows

try:
    from threadpoolctl import threadpool_limits
except ImportError:  # pragma: no cover
    threadpool_limits = None

DATA = Path(__file__).resolve().parent.parent / "examples" / "data" / "debian-deps"

# name → KeyedSVD keyword arguments
CONFIGS: dict[str, dict[str, Any]] = {
    "default": {},
    "norefine": {"refine_growth": None},
    "norefine-l64": {"refine_growth": None, "n_directions": 64},
    "fast": {"refine_growth": 0.05, "oversample": 32},
    "faster": {"refine_growth": 0.1, "oversample": 32},
    "accurate": {"refine_growth": 0.02, "oversample": 64},
    "fine": {"refine_growth": 0.01},
    "exact-split": {"method": "deng", "refine_growth": None},
}


@dataclass
class Accuracy:
    top10: float
    s_mean: float
    sub_v: float
    sub_u: float
    overlap: float


class Reference:
    """svds of the final matrix and the neighbour sets of the sampled rows."""

    def __init__(self, a: sp.csr_array, k: int, sample: int, min_degree: int, seed: int) -> None:
        t0 = time.process_time()
        v0 = np.random.default_rng(seed).uniform(-1.0, 1.0, min(a.shape))
        u, s, vt = spla.svds(a, k=k, v0=v0, tol=1e-10)
        self.seconds = time.process_time() - t0
        order = np.argsort(s)[::-1]
        self.u, self.s, self.v = u[:, order], s[order], vt[order].T
        deg = np.diff(a.indptr)
        rng = np.random.default_rng(seed + 1)
        unit = unit_rows(self.u * np.sqrt(self.s))
        cand = np.flatnonzero((deg >= min_degree) & unit.any(axis=1))
        self.rows = rng.choice(cand, size=min(sample, cand.size), replace=False)
        self.nbrs = self._neighbours(unit)

    def _neighbours(self, unit: np.ndarray) -> np.ndarray:
        """Top-10 cosine neighbours of the sampled rows, from unit rows."""
        sim = unit[self.rows] @ unit.T
        sim[np.arange(self.rows.size), self.rows] = -np.inf
        return np.argpartition(-sim, 10, axis=1)[:, :10]

    def score(self, u: np.ndarray, s: np.ndarray, v: np.ndarray) -> Accuracy:
        k = self.s.size
        s_pad = np.zeros(k)
        s_pad[: min(k, s.size)] = s[:k]
        rel = np.abs(s_pad - self.s) / self.s

        def sub(ref: np.ndarray, got: np.ndarray) -> float:
            cos = np.clip(np.linalg.svd(ref.T @ got, compute_uv=False), 0.0, 1.0)
            full = np.zeros(k)
            full[: cos.size] = cos[:k]
            return float(np.mean(np.sqrt(1.0 - full**2)))

        # Cosines as the daemon's /similar computes them (negligible rows: 0).
        nb = self._neighbours(unit_rows(u[:, :k] * np.sqrt(s[:k])))
        overlap = np.mean(
            [
                len(set(x.tolist()) & set(y.tolist())) / 10
                for x, y in zip(self.nbrs, nb, strict=True)
            ]
        )
        return Accuracy(
            float(rel[:10].max()),
            float(rel.mean()),
            sub(self.v, v),
            sub(self.u, u),
            float(overlap),
        )


def load() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    t = pq.read_table(DATA)
    src = t.column("src").to_numpy(zero_copy_only=False).astype(str)
    dst = t.column("dst").to_numpy(zero_copy_only=False).astype(str)
    return src, dst, t.column("weight").to_numpy().astype(np.float64)


def aligned(ks: KeyedSVD, rows_sorted: np.ndarray, cols_sorted: np.ndarray) -> tuple:
    """U, s, V of the operator in the reference's (sorted-key) order."""
    ri = np.searchsorted(rows_sorted, ks.row_keys)
    ci = np.searchsorted(cols_sorted, ks.column_keys)
    u = np.zeros((rows_sorted.size, ks.svd.s.size))
    v = np.zeros((cols_sorted.size, ks.svd.s.size))
    u[ri] = ks.svd.U
    v[ci] = ks.svd.V
    return u, ks.svd.s, v


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--rank", type=int, default=64)
    ap.add_argument("--batch", type=int, default=8192)
    ap.add_argument("--configs", default="default,fast,faster,accurate,norefine")
    ap.add_argument("--sample", type=int, default=200)
    ap.add_argument("--min-degree", type=int, default=5)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--no-recompute", action="store_true", help="skip randomized_svd rows")
    args = ap.parse_args()
    ctx = threadpool_limits(1) if threadpool_limits is not None else contextlib.nullcontext()
    with ctx:
        src, dst, w = load()
        rows_sorted, ri = np.unique(src, return_inverse=True)
        cols_sorted, ci = np.unique(dst, return_inverse=True)
        a = sp.csr_array(sp.coo_array((w, (ri, ci)), shape=(rows_sorted.size, cols_sorted.size)))
        a.sum_duplicates()
        ref = Reference(a, args.rank, args.sample, args.min_degree, args.seed)
        print(
            f"# Debian graph: {src.size} events, A {a.shape[0]}×{a.shape[1]}, nnz {a.nnz}, "
            f"rank {args.rank}, batches of {args.batch}; load avg {os.getloadavg()[0]:.2f}"
        )
        print(
            f"# reference svds(k={args.rank}, tol 1e-10): {ref.seconds:.2f} s CPU; "
            f"s1 {ref.s[0]:.1f}, s{args.rank} {ref.s[-1]:.1f}\n"
        )
        print(
            "| config | events/s (wall) | events/s (CPU) | methods | refines | top-10 s err "
            "| mean s err | subspace V | subspace U | overlap@10 | + final refine: s CPU "
            "| top-10 | subspace V | overlap@10 |"
        )
        print("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")
        for name in args.configs.split(","):
            kw = dict(CONFIGS[name])
            ks = KeyedSVD(args.rank, seed=args.seed, **kw)
            used: dict[str, int] = {}
            t0, c0 = time.perf_counter(), time.process_time()
            for lo in range(0, src.size, args.batch):
                sl = slice(lo, lo + args.batch)
                ks.update(src[sl], dst[sl], w[sl])
                used[ks.method_used_] = used.get(ks.method_used_, 0) + 1
            wall, cpu = time.perf_counter() - t0, time.process_time() - c0
            acc = ref.score(*aligned(ks, rows_sorted, cols_sorted))
            fin = "–", "–", "–", "–"
            if ks.refine_growth is not None:
                c1 = time.process_time()
                ks.refine()
                dt = time.process_time() - c1
                acc2 = ref.score(*aligned(ks, rows_sorted, cols_sorted))
                fin = (f"{dt:.2f}", f"{acc2.top10:.1e}", f"{acc2.sub_v:.3f}", f"{acc2.overlap:.3f}")
            methods = ", ".join(f"{k} {v}" for k, v in used.items())
            print(
                f"| {name} | {src.size / wall:,.0f} | {src.size / cpu:,.0f} | {methods} | "
                f"{ks.n_refines_} | {acc.top10:.1e} | {acc.s_mean:.1e} | {acc.sub_v:.3f} | "
                f"{acc.sub_u:.3f} | {acc.overlap:.3f} | {' | '.join(fin)} |"
            )
            sys.stdout.flush()
        if not args.no_recompute:
            from sklearn.utils.extmath import randomized_svd

            print(
                "\n| recompute on the final matrix | s CPU | top-10 s err | subspace V "
                "| overlap@10 |"
            )
            print("|---|---|---|---|---|")
            print(f"| svds (tol 1e-10) | {ref.seconds:.2f} | 0 | 0 | 1 |")
            for it, p in ((4, 10), (7, 10), (4, 64)):
                c0 = time.process_time()
                u, s, vt = randomized_svd(
                    a, args.rank, n_oversamples=p, n_iter=it, random_state=args.seed
                )
                dt = time.process_time() - c0
                acc = ref.score(u, s, vt.T)
                print(
                    f"| randomized_svd n_iter {it}, oversample {p} | {dt:.2f} | "
                    f"{acc.top10:.1e} | {acc.sub_v:.3f} | {acc.overlap:.3f} |"
                )


if __name__ == "__main__":
    main()
