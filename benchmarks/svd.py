"""IncrementalSVD against recomputation and the IncSVD package, side by side.

Workload (LSI-like, sparse, non-negative, decaying spectrum): m×n with topics of
Zipf(1) popularity, 2 topics per row, 10 terms per topic, 5 noise terms per
row (≈0.5 % density at 20000×5000). Rank k = 64; start from the first 50 %;
then 10 update batches per scenario:

* ``rows``: 10 appends of ``--batch-rows`` rows (default 1000);
* ``rows_small``: 10 appends of 20 rows (the paper's regime);
* ``cols``: 10 appends of n/20 columns;
* ``lowrank``: 10 rank-10 sparse weight updates A ← A + B Cᵀ;
* ``rows_drift``: 10 row appends whose rows come from topics unseen so far.

After every update each method is scored against ``svds(A_current, k)`` (whose
run time is the "svds recompute" row): relative singular-value error (mean and
top 10), Frobenius excess ``‖A − U S Vᵀ‖_F / ‖A − A_k‖_F − 1``, mean principal
angle error of span(V) and ``‖UᵀU − I‖₂``. Tables show the state after the last
update and the mean seconds per update. BLAS is pinned to one thread.

The IncSVD package (a bench-only peer) is used when ``--incsvd DIR`` names a
directory from which ``import IncSVD`` works (e.g. the site-packages of a
throwaway virtualenv); it is never a project dependency.

Run: ``python benchmarks/svd.py [--m 20000 --n 5000] [--scenarios rows,cols]``.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import os
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
os.environ.setdefault("MKL_NUM_THREADS", "1")

import numpy as np
import scipy.sparse as sp
import scipy.sparse.linalg as spla

from streamfact.operators.svd import IncrementalSVD

try:
    from threadpoolctl import threadpool_limits
except ImportError:  # pragma: no cover
    threadpool_limits = None


def make_workload(
    m: int, n: int, seed: int, n_topics: int = 1000, drift_from: int | None = None
) -> sp.csr_array:
    """Rows of 2 Zipf topics (10 terms each) plus 5 noise terms; values in [0.5, 1.5)."""
    rng = np.random.default_rng(seed)
    topic_terms = rng.integers(0, n, size=(n_topics, 10))
    pop = 1.0 / np.arange(1, n_topics + 1)
    rows, cols = [], []
    for part, (lo, hi) in enumerate(_topic_ranges(n_topics, drift_from)):
        p = pop[: hi - lo] / pop[: hi - lo].sum()
        sl = _part_rows(m, drift_from, part)
        k_rows = sl[1] - sl[0]
        t = lo + rng.choice(hi - lo, size=(k_rows, 2), p=p)
        terms = np.concatenate(
            [topic_terms[t[:, 0]], topic_terms[t[:, 1]], rng.integers(0, n, (k_rows, 5))], axis=1
        )
        rows.append(np.repeat(np.arange(sl[0], sl[1]), terms.shape[1]))
        cols.append(terms.ravel())
    r = np.concatenate(rows)
    c = np.concatenate(cols)
    vals = rng.uniform(0.5, 1.5, size=r.size)
    a = sp.coo_array((vals, (r, c)), shape=(m, n)).tocsr()
    a.sum_duplicates()
    return sp.csr_array(a)


def _topic_ranges(n_topics: int, drift_from: int | None) -> list[tuple[int, int]]:
    if drift_from is None:
        return [(0, n_topics)]
    # First half of the rows: the first half of the topics; each later tenth of
    # the rows draws from a fresh block of topics.
    half = n_topics // 2
    step = max(1, (n_topics - half) // 10)
    return [(0, half)] + [(half + i * step, half + (i + 1) * step) for i in range(10)]


def _part_rows(m: int, drift_from: int | None, part: int) -> tuple[int, int]:
    if drift_from is None:
        return (0, m)
    if part == 0:
        return (0, drift_from)
    step = (m - drift_from) // 10
    return (drift_from + (part - 1) * step, drift_from + part * step)


# -- methods -------------------------------------------------------------------------------


class Method:
    name = ""
    has_k = False

    def start(self, a0: sp.csr_array, k: int) -> None: ...
    def rows(self, e: sp.csr_array, a: sp.csr_array) -> None: ...
    def cols(self, e: sp.csr_array, a: sp.csr_array) -> None: ...
    def lowrank(self, b: sp.csr_array, c: sp.csr_array, a: sp.csr_array) -> None: ...
    def factors(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        raise NotImplementedError

    def cond(self) -> str:
        return "–"


class Streamfact(Method):
    """IncrementalSVD; with ``refine_every`` N, one warm-started refinement
    against the current matrix after every N-th update (oversampled
    directions carried from one refinement to the next)."""

    def __init__(self, method: str, refine_every: int = 0, **kw: Any) -> None:
        self.method = method
        self.kw = kw
        self.refine_every = refine_every
        suffix = f"+refine/{refine_every}" if refine_every else ""
        self.name = f"streamfact {method}{suffix}"

    def start(self, a0: sp.csr_array, k: int) -> None:
        self.op = IncrementalSVD(k, method=self.method, **self.kw)
        self.op.initialize(a0)
        self.step = 0
        self.extra: np.ndarray | None = None

    def _maybe_refine(self, a: sp.csr_array) -> None:
        self.step += 1
        if self.refine_every and self.step % self.refine_every == 0:
            ex = self.extra
            if ex is not None and ex.shape[0] < a.shape[1]:
                ex = np.concatenate([ex, np.zeros((a.shape[1] - ex.shape[0], ex.shape[1]))])
            self.extra = self.op.refine(a, oversample=32, extra=ex)

    def rows(self, e: sp.csr_array, a: sp.csr_array) -> None:
        self.op.append_rows(e)
        self._maybe_refine(a)

    def cols(self, e: sp.csr_array, a: sp.csr_array) -> None:
        self.op.append_columns(e)
        self._maybe_refine(a)

    def lowrank(self, b: sp.csr_array, c: sp.csr_array, a: sp.csr_array) -> None:
        self.op.update_low_rank(b, c)
        self._maybe_refine(a)

    def factors(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        return self.op.U, self.op.s, self.op.V

    def cond(self) -> str:
        cu, cv = self.op.condition_numbers()
        return f"{cu:.3g}/{cv:.3g}"


class Recompute(Method):
    """Recompute from scratch after every update (svds or randomized_svd)."""

    def __init__(self, kind: str, seed: int = 0) -> None:
        self.kind = kind
        self.name = "svds recompute" if kind == "svds" else "sklearn randomized_svd recompute"
        self.seed = seed

    def _fit(self, a: sp.csr_array) -> None:
        if self.kind == "svds":
            v0 = np.random.default_rng(self.seed).uniform(-1, 1, min(a.shape))
            u, s, vt = spla.svds(a, k=self.k, v0=v0)
        else:
            from sklearn.utils.extmath import randomized_svd

            u, s, vt = randomized_svd(a, self.k, n_oversamples=10, n_iter=4, random_state=self.seed)
        order = np.argsort(s)[::-1]
        self.u, self.s, self.v = u[:, order], s[order], vt[order].T

    def start(self, a0: sp.csr_array, k: int) -> None:
        self.k = k
        self._fit(a0)

    def rows(self, e: sp.csr_array, a: sp.csr_array) -> None:
        self._fit(a)

    cols = rows

    def lowrank(self, b: sp.csr_array, c: sp.csr_array, a: sp.csr_array) -> None:
        self._fit(a)

    def factors(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        return self.u, self.s, self.v


class GensimPeer(Method):
    """gensim LsiModel (V-only: U is recovered as A V S⁻¹ for scoring, untimed)."""

    name = "gensim LsiModel"

    def start(self, a0: sp.csr_array, k: int) -> None:
        from gensim.matutils import Sparse2Corpus
        from gensim.models import LsiModel

        self.k = k
        self.a = a0
        self.n = a0.shape[1]
        corpus = Sparse2Corpus(sp.csr_matrix(a0), documents_columns=False)
        self.lsi = LsiModel(
            corpus,
            num_topics=k,
            id2word={i: str(i) for i in range(self.n)},
            chunksize=1000,
            power_iters=2,
            extra_samples=100,
            random_seed=0,
        )

    def rows(self, e: sp.csr_array, a: sp.csr_array) -> None:
        from gensim.matutils import Sparse2Corpus

        self.lsi.add_documents(Sparse2Corpus(sp.csr_matrix(e), documents_columns=False))
        self.a = a

    def factors(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        v = np.asarray(self.lsi.projection.u)[:, : self.k]
        s = np.asarray(self.lsi.projection.s)[: self.k]
        u = np.asarray(self.a @ v) / s
        return u, s, v


class IncSVDPeer(Method):
    """The IncSVD package (Deng et al.'s code), when importable."""

    def __init__(self, method: str, sparse: bool, l_dirs: int, t: int) -> None:
        self.method = method
        self.sparse = sparse
        self.l, self.t = l_dirs, t
        self.name = f"IncSVD {method}-{'sparse' if sparse else 'orig'}"

    def _lt(self) -> dict[str, Any]:
        if self.method == "GKL":
            return {"l": self.l}
        if self.method == "RPI":
            return {"l": self.l, "t": self.t}
        return {}

    def start(self, a0: sp.csr_array, k: int) -> None:
        from IncSVD.EvolvingMatrix import EvolvingMatrix

        with contextlib.redirect_stdout(io.StringIO()):
            self.em = EvolvingMatrix(sp.csr_matrix(a0), k, sparse=self.sparse, method=self.method)

    def rows(self, e: sp.csr_array, a: sp.csr_array) -> None:
        self.em.add_row(sp.csr_matrix(e), **self._lt())

    def cols(self, e: sp.csr_array, a: sp.csr_array) -> None:
        self.em.add_column(sp.csc_matrix(e), **self._lt())

    def lowrank(self, b: sp.csr_array, c: sp.csr_array, a: sp.csr_array) -> None:
        self.em.update_weight(sp.csr_matrix(b), sp.csr_matrix(c), **self._lt())

    def factors(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        u = np.asarray(self.em.Uk)
        v = np.asarray(self.em.Vk)
        s = np.asarray(self.em.Sigmak).ravel()
        order = np.argsort(s)[::-1]
        return u[:, order], s[order], v[:, order]

    def cond(self) -> str:
        ku, kv = getattr(self.em, "_Ku", None), getattr(self.em, "_Kv", None)
        if ku is None or kv is None:
            return "–"
        return f"{np.linalg.cond(ku):.3g}/{np.linalg.cond(kv):.3g}"


# -- metrics -------------------------------------------------------------------------------


@dataclass
class Score:
    sv_mean: float
    sv_top10: float
    frob_excess: float
    subspace_v: float
    orth_u: float


def score(
    a: sp.csr_array,
    u: np.ndarray,
    s: np.ndarray,
    v: np.ndarray,
    s_ref: np.ndarray,
    v_ref: np.ndarray,
    a_fro2: float,
) -> Score:
    k = s_ref.size
    s_pad = np.zeros(k)
    s_pad[: min(k, s.size)] = s[:k]
    rel = np.abs(s_pad - s_ref) / s_ref
    av = np.asarray(a @ v)
    cross = float(np.sum(u * av * s))
    resid2 = max(a_fro2 - 2 * cross + float(s @ s), 0.0)
    opt2 = max(a_fro2 - float(s_ref @ s_ref), 1e-300)
    cosines = np.clip(np.linalg.svd(v_ref.T @ v, compute_uv=False), 0.0, 1.0)
    cos_full = np.zeros(k)
    cos_full[: cosines.size] = cosines[:k]
    orth = float(np.linalg.norm(u.T @ u - np.eye(u.shape[1]), 2))
    return Score(
        float(rel.mean()),
        float(rel[:10].mean()),
        float(np.sqrt(resid2 / opt2) - 1.0),
        float(np.mean(np.sqrt(1.0 - cos_full**2))),
        orth,
    )


# -- scenarios -----------------------------------------------------------------------------


def _bind(
    kind: str, x: sp.csr_array, y: sp.csr_array | None, a: sp.csr_array
) -> Callable[[Method], None]:
    def call(mt: Method) -> None:
        if kind == "rows":
            mt.rows(x, a)
        elif kind == "cols":
            mt.cols(x, a)
        else:
            assert y is not None
            mt.lowrank(x, y, a)

    return call


def run_scenario(
    name: str,
    a_full: sp.csr_array,
    k: int,
    methods: list[Method],
    batches: int,
    batch_rows: int,
    seed: int,
) -> list[tuple[str, float, Score, str]]:
    m, n = a_full.shape
    rng = np.random.default_rng(seed)
    if name == "cols":
        a0 = sp.csr_array(a_full[:, : n // 2])
    elif name == "lowrank":
        a0 = a_full
    elif name == "rows_small":
        a0 = sp.csr_array(a_full[: m // 2])
    else:
        a0 = sp.csr_array(a_full[: m // 2])
    for meth in methods:
        meth.start(a0, k)
    times = {meth.name: 0.0 for meth in methods}
    a = a0
    last: dict[str, Score] = {}
    failed: dict[str, str] = {}
    for step in range(batches):
        if name in ("rows", "rows_drift", "rows_small"):
            size = 20 if name == "rows_small" else batch_rows
            lo = m // 2 + step * size
            e = sp.csr_array(a_full[lo : lo + size])
            a = sp.csr_array(sp.vstack([a, e], format="csr"))
            call = _bind("rows", e, None, a)
        elif name == "cols":
            size = (n - n // 2) // batches
            lo = n // 2 + step * size
            e = sp.csr_array(a_full[:, lo : lo + size])
            a = sp.csr_array(sp.hstack([a, e], format="csr"))
            call = _bind("cols", e, None, a)
        else:
            b = sp.random_array((m, 10), density=0.002, random_state=rng, format="csr")
            c = sp.random_array((n, 10), density=0.01, random_state=rng, format="csr")
            b, c = sp.csr_array(b), sp.csr_array(c)
            a = sp.csr_array(a + b @ c.T)
            call = _bind("lowrank", b, c, a)
        for meth in methods:
            if meth.name in failed:
                continue
            t0 = time.perf_counter()
            try:
                call(meth)
            except Exception as exc:  # a peer that crashes is reported, not fatal
                failed[meth.name] = f"{type(exc).__name__}: {str(exc)[:60]}"
                continue
            times[meth.name] += time.perf_counter() - t0
        # The reference is the svds recompute's own result (first Recompute("svds")).
        ref = next(mt for mt in methods if isinstance(mt, Recompute) and mt.kind == "svds")
        _, s_ref, v_ref = ref.factors()
        a_fro2 = float(np.sum(a.data**2))
        for meth in methods:
            if meth.name not in failed:
                u, s, v = meth.factors()
                last[meth.name] = score(a, u, s, v, s_ref, v_ref, a_fro2)
    nan = Score(*(float("nan"),) * 5)
    return [
        (
            mt.name if mt.name not in failed else f"{mt.name} (failed: {failed[mt.name]})",
            times[mt.name] / batches,
            last.get(mt.name, nan) if mt.name not in failed else nan,
            mt.cond() if mt.name not in failed else "–",
        )
        for mt in methods
    ]


def run_scaling(ms: list[int], args: argparse.Namespace) -> None:
    """Per-update cost of row appends as m grows, nnz ∝ m, batch size fixed.

    For each m: the operator starts from the first m − batches·batch_rows rows
    (its initial svds is not timed), appends ``batches`` batches, and is
    compared with one ``svds`` recompute of the final matrix (timed) — its
    top-10 singular-value error against that svds is reported.
    """
    print(
        f"\n### scaling: n {args.n}, k {args.k}, {args.batches} appends of "
        f"{args.batch_rows} rows, method deng\n"
    )
    print(
        "| m | nnz | s/update (streamfact deng) | svds recompute s | speed-up "
        "| top-10 s err | orth_U |"
    )
    print("|---|---|---|---|---|---|---|")
    for m in ms:
        a_full = make_workload(m, args.n, args.seed)
        m0 = m - args.batches * args.batch_rows
        op = IncrementalSVD(args.k, method="deng", seed=args.seed)
        op.initialize(sp.csr_array(a_full[:m0]))
        t_upd = 0.0
        for step in range(args.batches):
            lo = m0 + step * args.batch_rows
            e = sp.csr_array(a_full[lo : lo + args.batch_rows])
            t0 = time.perf_counter()
            op.append_rows(e)
            t_upd += time.perf_counter() - t0
        t0 = time.perf_counter()
        v0 = np.random.default_rng(args.seed).uniform(-1, 1, min(a_full.shape))
        s_ref = np.sort(spla.svds(a_full, k=args.k, v0=v0, return_singular_vectors=False))[::-1]
        t_svds = time.perf_counter() - t0
        per = t_upd / args.batches
        top10 = float(np.max(np.abs(op.s[:10] - s_ref[:10]) / s_ref[:10]))
        orth = max(op.orthogonality_loss(exact=True))
        print(
            f"| {m} | {a_full.nnz} | {per:.4f} | {t_svds:.2f} | {t_svds / per:.0f}× | "
            f"{top10:.1e} | {orth:.1e} |"
        )
        sys.stdout.flush()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--m", type=int, default=20000)
    ap.add_argument("--n", type=int, default=5000)
    ap.add_argument("--k", type=int, default=64)
    ap.add_argument("--batches", type=int, default=10)
    ap.add_argument("--batch-rows", type=int, default=1000)
    ap.add_argument("--scenarios", default="rows,rows_small,cols,lowrank,rows_drift")
    ap.add_argument("--methods", default="zha-simon,deng,gkl,rpi")
    ap.add_argument("--incsvd", default=None, help="directory from which `import IncSVD` works")
    ap.add_argument("--incsvd-methods", default="ZhaSimon-orig,GKL-sparse,RPI-sparse")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--gensim", action="store_true", help="add gensim's LsiModel (row scenarios)")
    ap.add_argument(
        "--scaling",
        default="",
        help="comma list of m for the scaling run, e.g. "
        "50000,200000,1000000 (row appends of --batch-rows at fixed n)",
    )
    args = ap.parse_args()
    if args.incsvd:
        sys.path.insert(0, args.incsvd)
    ctx = threadpool_limits(1) if threadpool_limits is not None else contextlib.nullcontext()
    with ctx:
        if args.scaling:
            run_scaling([int(x) for x in args.scaling.split(",")], args)
            return
        for scen in args.scenarios.split(","):
            drift = args.m // 2 if scen == "rows_drift" else None
            a_full = make_workload(args.m, args.n, args.seed, drift_from=drift)
            methods: list[Method] = []
            for mn in filter(None, args.methods.split(",")):
                base, _, every = mn.partition("+refine")
                methods.append(Streamfact(base, refine_every=int(every or 0)))
            if args.gensim and scen in ("rows", "rows_drift", "rows_small"):
                methods.append(GensimPeer())
            methods += [Recompute("svds", args.seed), Recompute("randomized", args.seed)]
            if args.incsvd:
                for spec in args.incsvd_methods.split(","):
                    meth_name, variant = spec.split("-")
                    methods.append(IncSVDPeer(meth_name, variant == "sparse", 10, 3))
            rows = run_scenario(
                scen, a_full, args.k, methods, args.batches, args.batch_rows, args.seed
            )
            print(f"\n### {scen}: A {args.m}×{args.n}, nnz {a_full.nnz}, k {args.k}\n")
            print(
                "| method | s/update | sv_rel mean | sv_rel top10 | frob_excess | subspace_V "
                "| orth_U | cond Ku/Kv |"
            )
            print("|---|---|---|---|---|---|---|---|")
            for name, t, sc, cond in rows:
                print(
                    f"| {name} | {t:.4g} | {sc.sv_mean:.3g} | {sc.sv_top10:.3g} | "
                    f"{sc.frob_excess:.3g} | {sc.subspace_v:.3g} | {sc.orth_u:.2g} | {cond} |"
                )
            sys.stdout.flush()


if __name__ == "__main__":
    main()
