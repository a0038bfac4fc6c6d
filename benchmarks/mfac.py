"""SlidingWindowMFAC vs the paper's O(dm + m³) recursion vs a dense solve.

One optimizer step = add a gradient to a full window of m gradients and return
F⁻¹g. Three implementations are timed on the same gradient stream:

* ``rolling``: streamfact's SlidingWindowMFAC.add_and_ihvp (rolling Cholesky,
  O(dm + m²), in-span float64 m×m algebra);
* ``paper``: the paper's dynamic algorithm written out below: after each
  replacement, unpivoted elimination of mI + c·GGᵀ (the D matrix), the B
  coefficient rows from the replaced slot on, the O(m²) q recursion, and the
  output c·g − Gᵀ(Bᵀ(q/denom)). Everything in the stream's dtype (float32), as
  in the authors' code, which is what its accuracy column shows;
* ``dense``: forming F and solving it (d = 4096 only).

Errors are relative to a float64 reference: a dense float64 solve at d = 4096,
the float64 rolling operator at d = 1e6 (that operator is checked against dense
solves in the tests). Bandwidth: the two passes over G read 2·m·d·itemsize
bytes; the fraction is against the same run's memcpy (read + write bytes / s).

Run (one thread, one run; about 3 minutes on two cores):

    python benchmarks/mfac.py
    python benchmarks/mfac.py --device cuda --sizes 1e7:1024   # with a GPU
"""

from __future__ import annotations

import os

for _var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS", "NUMBA_NUM_THREADS"):
    os.environ.setdefault(_var, "1")

import argparse  # noqa: E402
import gc  # noqa: E402
import platform  # noqa: E402
import time  # noqa: E402
from typing import Any  # noqa: E402

import numba  # noqa: E402
import numpy as np  # noqa: E402
import scipy.linalg as sla  # noqa: E402

from streamfact.operators.mfac import SlidingWindowMFAC  # noqa: E402

# -- the paper's recursion (baseline) ------------------------------------------------


@numba.njit(cache=True)
def _unpivoted_elimination(M: np.ndarray) -> np.ndarray:  # pragma: no cover - compiled
    """Upper factor U of M = L U without pivoting (Doolittle), in M's dtype."""
    n = M.shape[0]
    U = M.copy()
    for k in range(n):
        p = U[k, k]
        for i in range(k + 1, n):
            f = U[i, k] / p
            for j in range(k, n):
                U[i, j] -= f * U[k, j]
    return U


@numba.njit(cache=True)
def _coef_rows(
    D: np.ndarray, denom: np.ndarray, B: np.ndarray, start: int, c: float
) -> None:  # pragma: no cover - compiled
    """B_kk = c, B_{k,:k} = T_{k,:k} B_{:k,:k} with T_kj = −D_jk/denom_j, rows k ≥ start."""
    m = D.shape[0]
    for k in range(start, m):
        for j in range(k):
            B[k, j] = 0.0
        for j in range(k):
            t = -D[j, k] / denom[j]
            for q in range(j + 1):
                B[k, q] += t * B[j, q]
        B[k, k] = c


@numba.njit(cache=True)
def _q_recursion(q: np.ndarray, D: np.ndarray, denom: np.ndarray) -> None:  # pragma: no cover
    m = q.shape[0]
    for i in range(1, m):
        f = q[i - 1] / denom[i - 1]
        for j in range(i, m):
            q[j] -= D[i - 1, j] * f


class PaperMFAC:
    """The paper's dynamic algorithm, everything in ``dtype`` (float32: as published)."""

    def __init__(self, G: np.ndarray, damping: float) -> None:
        self.G = np.array(G, copy=True)
        self.m = G.shape[0]
        self.dtype = G.dtype
        self.c = self.dtype.type(1.0 / damping)
        self.dots = (self.G @ self.G.T).astype(self.dtype)
        self.last = 0
        self.B = np.zeros((self.m, self.m), dtype=self.dtype)
        self._setup(0)

    def _setup(self, start: int) -> None:
        m = self.m
        M = self.c * self.dots + m * np.eye(m, dtype=self.dtype)
        try:
            # U = diag(L)·Lᵀ for the Cholesky factor L of the SPD M is exactly
            # the unpivoted elimination's U, computed by LAPACK.
            L = sla.cholesky(M, lower=True)
            U = (np.diag(L)[:, None] * L.T).astype(self.dtype)
        except np.linalg.LinAlgError:
            U = _unpivoted_elimination(M)
        self.D = np.triu(U) - m * np.eye(m, dtype=self.dtype)
        self.denom = (m + np.diag(self.D)).astype(self.dtype)
        _coef_rows(self.D, self.denom, self.B, start, self.c)

    def update_mul(self, g: np.ndarray) -> np.ndarray:
        last = self.last
        self.G[last] = g
        t = self.G @ g  # pass 1
        self.dots[last, :] = t
        self.dots[:, last] = t
        self._setup(last)
        self.last = (last + 1) % self.m
        q = self.c * t
        _q_recursion(q, self.D, self.denom)
        coef = self.B.T @ (q / self.denom)
        return self.c * g - self.G.T @ coef  # pass 2


# -- measurements ------------------------------------------------------------------


def memcpy_bandwidth(nbytes: int) -> float:
    """Bytes read + written per second by np.copyto on a buffer of ``nbytes``."""
    n = max(nbytes // 4, 1 << 24)
    src = np.ones(n, dtype=np.float32)
    dst = np.empty_like(src)
    best = np.inf
    for _ in range(3):
        t = time.perf_counter()
        np.copyto(dst, src)
        best = min(best, time.perf_counter() - t)
    return 2.0 * src.nbytes / best


def rel(a: Any, b: np.ndarray) -> float:
    a = np.asarray(a, dtype=np.float64)
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def gradients(rng: np.random.Generator, n: int, d: int, scale: float) -> np.ndarray:
    out = np.empty((n, d), dtype=np.float32)
    for i in range(n):
        out[i] = rng.standard_normal(d, dtype=np.float32) * np.float32(scale)
    return out


def bench_size(
    d: int, m: int, steps: int, damping: float, device: str, dense: bool
) -> list[dict[str, Any]]:
    rng = np.random.default_rng(0)
    scale = 1.0 / np.sqrt(d)  # ‖g‖² ≈ 1, as in the paper's optimizer setting
    G0 = gradients(rng, m, d, scale)
    new = gradients(rng, steps, d, scale)
    rows: list[dict[str, Any]] = []
    moved = 2.0 * m * d * 4
    bw = memcpy_bandwidth(m * d * 4)

    # float64 reference for the errors.
    refs: list[np.ndarray] = []
    if dense:
        W = G0.astype(np.float64)
        F = damping * np.eye(d) + W.T @ W / m
        for i, g in enumerate(new):
            g64, old = g.astype(np.float64), W[i]
            F += (np.outer(g64, g64) - np.outer(old, old)) / m
            refs.append(np.linalg.solve(F, g64))
    else:
        ref_op = SlidingWindowMFAC(d, m, damping=damping, dtype="float64", device="cpu")
        ref_op.add(G0)
        refs = [ref_op.add_and_ihvp(g) for g in new]
        del ref_op
        gc.collect()

    def record(name: str, times: list[float], outs: list[Any]) -> None:
        med = float(np.median(times))
        errs = [rel(o, r) for o, r in zip(outs, refs, strict=True)]
        rows.append({
            "d": d, "m": m, "method": name, "ms": 1e3 * med, "min_ms": 1e3 * min(times),
            "bw_frac": moved / med / bw if name != "dense" else float("nan"),
            "err": max(errs), "mem_GBps": bw / 1e9,
        })

    op = SlidingWindowMFAC(d, m, damping=damping, dtype="float32", device=device)
    op.add(G0)
    times, outs = [], []
    for g in new:
        x: Any = g
        if device != "cpu":
            import torch

            x = torch.from_numpy(g).to(op._backend.device)
            torch.cuda.synchronize() if device.startswith("cuda") else None
        t = time.perf_counter()
        out = op.add_and_ihvp(x)
        if device.startswith("cuda"):
            import torch

            torch.cuda.synchronize()
        times.append(time.perf_counter() - t)
        outs.append(np.asarray(out.cpu() if hasattr(out, "cpu") else out))
    record(f"rolling[{device}]", times, outs)
    del op
    gc.collect()

    base = PaperMFAC(G0, damping)
    times, outs = [], []
    for g in new:
        t = time.perf_counter()
        out = base.update_mul(g)
        times.append(time.perf_counter() - t)
        outs.append(out)
    record("paper", times, outs)
    del base
    gc.collect()

    if dense:
        W = G0.astype(np.float64)
        g = new[0]
        t = time.perf_counter()
        W = np.vstack([W[1:], g.astype(np.float64)])
        F = damping * np.eye(d) + W.T @ W / m
        out = np.linalg.solve(F, g.astype(np.float64))
        record("dense", [time.perf_counter() - t], [out, *refs[1:]])
    return rows


def accuracy_table(d: int, m: int, damping: float) -> list[tuple[str, float, float]]:
    """float32 optimizer-step error at high κ (unscaled Gaussian gradients)."""
    rng = np.random.default_rng(1)
    G = rng.standard_normal((m + 3, d)).astype(np.float32)
    W = G[-m:].astype(np.float64)
    ref = np.linalg.solve(damping * np.eye(d) + W.T @ W / m, W[-1])
    op = SlidingWindowMFAC(d, m, damping=damping, dtype="float32", device="cpu")
    op.add(G[:-1])
    ours = op.add_and_ihvp(G[-1])
    kappa = op.condition_estimate_
    base = PaperMFAC(G[:m], damping)
    for g in G[m:]:
        paper = base.update_mul(g)
    return [("rolling (in-span)", kappa, rel(ours, ref)), ("paper", kappa, rel(paper, ref))]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--device", default="cpu", help="cpu (numpy), torch, or cuda")
    ap.add_argument("--sizes", default="1e6:16,1e6:64,1e6:256,4096:1024",
                    help="comma-separated d:m pairs")
    ap.add_argument("--steps", type=int, default=7)
    ap.add_argument("--damping", type=float, default=1e-5)
    args = ap.parse_args()
    try:
        import torch

        torch.set_num_threads(1)
    except ImportError:
        pass
    print(f"# M-FAC step benchmark: {platform.processor() or platform.machine()}, "
          f"{os.cpu_count()} cores visible, 1 thread, numpy {np.__version__}, float32 G, "
          f"damping {args.damping:g}, median of {args.steps} steps")
    print("| d | m | method | ms/step (median) | min ms | two-pass bandwidth / memcpy | "
          "max rel. error vs float64 |")
    print("|---|---|---|---|---|---|---|")
    for spec in args.sizes.split(","):
        d_s, m_s = spec.split(":")
        d, m = int(float(d_s)), int(m_s)
        dense = d <= 8192
        steps = min(args.steps, 3) if dense else args.steps  # dense float64 references are slow
        rows = bench_size(d, m, steps, args.damping, args.device, dense)
        for r in rows:
            bwf = "-" if np.isnan(r["bw_frac"]) else f"{100 * r['bw_frac']:.0f}%"
            print(f"| {r['d']:.0e} | {r['m']} | {r['method']} | {r['ms']:.2f} | {r['min_ms']:.2f} "
                  f"| {bwf} | {r['err']:.1e} |", flush=True)
        print(f"<!-- memcpy {rows[0]['mem_GBps']:.1f} GB/s (read+write) at d={d}, m={m} -->",
              flush=True)
    print()
    print("# float32 optimizer step at high κ (Gaussian gradients, ‖g‖² ≈ d), vs dense float64")
    print("| d | m | damping | method | κ | rel. error |")
    print("|---|---|---|---|---|---|")
    for d, m in ((4096, 64),):
        for name, kappa, err in accuracy_table(d, m, args.damping):
            print(f"| {d} | {m} | {args.damping:g} | {name} | {kappa:.1e} | {err:.1e} |",
                  flush=True)


if __name__ == "__main__":
    main()
