"""Top eigenvector of AᵀA from one pass over rows: TopEigenvector vs Oja vs FD.

Instances (d = 512, n = 20000 by default; the notes on Kacham & Woodruff 2024):

* spiked    — rows N(0, diag(4, 1, …, 1)), randomly rotated; R ≈ 3, no heavy rows;
* heavytail — rows s_i g_i, g_i ~ N(0, diag(2, 1, 2^-½, 3^-½, …)), s_i ~ Pareto(2.5);
* hard2     — 2 heavy rows carry v₁, flat light bulk elsewhere, target R = 8;
* hard1     — 1 heavy row carries v₁, target R = 30.

Each algorithm sees the same rows in several random orders, fed in batches.
Cells: correlation ⟨v, v₁⟩² mean / min over the orders (oracle: numpy.linalg.eigh),
memory in float64 words of algorithm state (peak over the batches, measured from
the arrays via ``state_size``), and rows per second. Oja's rates are chosen by an
*oracle* on a grid (best mean correlation), so its row is an upper bound for any
fixed rate.

What is timed (wall clock, ``time.perf_counter``):

* "stream pass": one pass of ``y += Bᵀ(B z)`` (two BLAS gemv, z a d-vector) over
  the same float64 C-contiguous batches B — the cost floor of any one-pass method
  with a d-vector iterate;
* a streaming operator: its ``update(B)`` calls over the same batches (input
  validation, NaN/Inf checks and all per-row work included) plus the final
  ``.vector`` query.

Neither includes input conversion: the batches already have the operator's dtype
and layout, so no copy is made (like for like). The TopEigenvector / pass ratio
("× pass") is the median over ``--repeat`` × orders *paired* measurements (each
pass timed right before the operator on the same order), which cancels most of
the drift of a shared machine; the cell's rows/s is from the median time.

Run: ``python benchmarks/eigenvector.py [--n 20000 --d 512 --orders 5 --repeat 5]``.
"""

from __future__ import annotations

import argparse
import os
import time
from collections.abc import Callable
from typing import Any

import numpy as np

from streamfact.operators.eigenvector import TopEigenvector
from streamfact.operators.frequent_directions import FrequentDirections
from streamfact.operators.oja import OjaEigenvector

RATE_GRID = (0.25, 1.0, 4.0, 8.0, 16.0, 32.0, 64.0, 256.0, 1024.0)


def rotation(rng: np.random.Generator, d: int) -> np.ndarray:
    q, r = np.linalg.qr(rng.standard_normal((d, d)))
    return q * np.sign(np.diag(r))


def spiked(rng: np.random.Generator, n: int, d: int) -> np.ndarray:
    s = np.ones(d)
    s[0] = 2.0
    return (rng.standard_normal((n, d)) * s) @ rotation(rng, d).T


def heavytail(rng: np.random.Generator, n: int, d: int) -> np.ndarray:
    var = np.concatenate([[2.0], np.arange(1, d) ** -0.5])
    s = 1.0 + rng.pareto(2.5, size=n)
    return (s[:, None] * rng.standard_normal((n, d)) * np.sqrt(var)) @ rotation(rng, d).T


def hard(k: int, ratio: float) -> Callable[[np.random.Generator, int, int], np.ndarray]:
    def make(rng: np.random.Generator, n: int, d: int) -> np.ndarray:
        a = rng.standard_normal((n, d)) * np.sqrt(1.0 / ratio / (n - k))
        a[:k] = 0.0
        a[:, 0] = 0.0
        a[:k, 0] = np.sqrt(1.0 / k)
        return a @ rotation(rng, d).T

    return make


INSTANCES = {
    "spiked": spiked,
    "heavytail": heavytail,
    "hard2": hard(2, 8.0),
    "hard1": hard(1, 30.0),
}


def corr(v: np.ndarray, w: np.ndarray) -> float:
    return float(np.dot(v, w) ** 2 / (np.dot(v, v) * np.dot(w, w)))


def batches(x: np.ndarray, size: int) -> list[np.ndarray]:
    return [x[i : i + size] for i in range(0, x.shape[0], size)]


def run_streaming(make: Callable[[int], Any], streams: list[np.ndarray], v1: np.ndarray,
                  batch: int) -> tuple[list[float], int, float]:
    cs, peak, seconds = [], 0, 0.0
    for s, x in enumerate(streams):
        op = make(s)
        for part in batches(x, batch):
            t0 = time.perf_counter()
            op.update(part)  # type: ignore[attr-defined]
            seconds += time.perf_counter() - t0
            peak = max(peak, int(op.state_size))  # type: ignore[attr-defined]
        t0 = time.perf_counter()
        v = op.vector  # type: ignore[attr-defined]
        seconds += time.perf_counter() - t0
        cs.append(corr(v, v1))
    return cs, peak, seconds


def pass_seconds(x: np.ndarray, batch: int, seed: int = 0) -> float:
    """One pass of y += Bᵀ(B z) over the batches of x."""
    z = np.random.default_rng(seed).standard_normal(x.shape[1])
    parts = batches(x, batch)
    y = np.zeros_like(z)
    t0 = time.perf_counter()
    for part in parts:
        y += part.T @ (part @ z)
    return time.perf_counter() - t0


def operator_seconds(op: Any, x: np.ndarray, batch: int) -> float:
    """update() over the batches of x, then the final .vector query."""
    parts = batches(x, batch)
    t0 = time.perf_counter()
    for part in parts:
        op.update(part)
    _ = op.vector
    return time.perf_counter() - t0


def paired_timing(
    make: Callable[[int], Any], streams: list[np.ndarray], batch: int, repeat: int
) -> tuple[float, float, float, float]:
    """Median operator seconds and pass seconds (all orders), and the median and
    minimum of the per-order ratio operator/pass over ``repeat`` rounds."""
    ratios, op_s, pass_s = [], [], []
    for _ in range(repeat):
        tot_op = tot_pass = 0.0
        for s, x in enumerate(streams):
            tp = pass_seconds(x, batch)
            to = operator_seconds(make(s), x, batch)
            ratios.append(to / tp)
            tot_op += to
            tot_pass += tp
        op_s.append(tot_op)
        pass_s.append(tot_pass)
    return (float(np.median(op_s)), float(np.median(pass_s)),
            float(np.median(ratios)), float(np.min(ratios)))


def power_iteration(x: np.ndarray, passes: int, seed: int) -> np.ndarray:
    z: np.ndarray = np.asarray(np.random.default_rng(seed).standard_normal(x.shape[1]))
    for _ in range(passes):
        y = x.T @ (x @ z)
        z = np.asarray(y / np.linalg.norm(y))
    return z


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=20000)
    ap.add_argument("--d", type=int, default=512)
    ap.add_argument("--orders", type=int, default=5)
    ap.add_argument("--batch", type=int, default=1000)
    ap.add_argument("--instances", default=",".join(INSTANCES))
    ap.add_argument("--repeat", type=int, default=5,
                    help="paired pass/TopEigenvector timing rounds")
    ap.add_argument("--fd", default="4,16,32,128", help="FD sketch sizes ℓ")
    args = ap.parse_args()
    n, d, batch = args.n, args.d, args.batch
    load0 = os.getloadavg()
    rows: dict[str, dict[str, str]] = {}
    notes: list[str] = []
    # Compile the numba kernels before anything is timed.
    warm = np.random.default_rng(0).standard_normal((300, d))
    TopEigenvector(d, seed=0).update(warm)
    OjaEigenvector(d).update(warm)

    def put(
        alg: str, inst: str, cs: list[float], mem: int, seconds: float, extra: str = ""
    ) -> None:
        rate = n * len(cs) / seconds if seconds > 0 else float("inf")
        acc = "–" if np.isnan(cs).all() else f"{np.mean(cs):.3f} / {min(cs):.3f}"
        cell = f"{acc} @ {mem} · {rate / 1e3:.0f}k r/s{extra}"
        rows.setdefault(alg, {})[inst] = cell

    for inst in args.instances.split(","):
        rng = np.random.default_rng(2024)
        a = INSTANCES[inst](rng, n, d)
        t0 = time.perf_counter()
        w, vecs = np.linalg.eigh(a.T @ a)
        exact_s = time.perf_counter() - t0
        v1 = vecs[:, -1]
        ratio = w[-1] / w[-2]
        streams = [a[np.random.default_rng(100 + s).permutation(n)] for s in range(args.orders)]
        put("exact eigh(AᵀA)", inst, [1.0] * args.orders, d * d, exact_s * args.orders)

        def te(s: int) -> TopEigenvector:
            return TopEigenvector(d, stream_length=n, seed=s)

        cs, mem, _ = run_streaming(te, streams, v1, batch)
        sec, floor, t_ratio, t_ratio_min = paired_timing(te, streams, batch, args.repeat)
        put("stream pass y += Aᵀ(Az)", inst, [float("nan")] * args.orders, 2 * d, floor)
        probe = te(0)
        for part in batches(streams[0], batch):
            probe.update(part)
        put("TopEigenvector p=8 b=1", inst, cs, mem, sec,
            f" [h={probe.heavy_rows}, {probe.mode}, {t_ratio:.2f}× pass (min {t_ratio_min:.2f})]")
        cs_u, mem_u, sec_u = run_streaming(
            lambda s: TopEigenvector(d, seed=s), streams, v1, batch
        )
        put("TopEigenvector, n unknown", inst, cs_u, mem_u, sec_u)

        lam1 = float(w[-1])
        best: tuple[float, float, list[float], int, float] = (-1.0, 0.0, [], 0, 0.0)
        for L in RATE_GRID:
            res = run_streaming(
                lambda s, L=L, lam1=lam1: OjaEigenvector(  # type: ignore[misc]
                    d, learning_rate=L / lam1, seed=s
                ),
                streams, v1, batch,
            )
            if np.mean(res[0]) > best[0]:
                best = (float(np.mean(res[0])), L, *res)
        put("Oja, oracle-best fixed η=L/λ₁", inst, best[2], best[3], best[4], f" [L={best[1]:g}]")
        bbest: tuple[float, float, list[float], int, float] = (-1.0, 0.0, [], 0, 0.0)
        for L in RATE_GRID:
            res = run_streaming(
                lambda s, L=L, lam1=lam1: OjaEigenvector(  # type: ignore[misc]
                    d, learning_rate=L / lam1, block=64, seed=s
                ),
                streams, v1, batch,
            )
            if np.mean(res[0]) > bbest[0]:
                bbest = (float(np.mean(res[0])), L, *res)
        put("block Oja (64 rows), oracle-best η", inst, bbest[2], bbest[3], bbest[4],
            f" [L={bbest[1]:g}]")
        for ell in (int(v) for v in args.fd.split(",")):
            cs, mem, sec = run_streaming(
                lambda s, ell=ell: FrequentDirections(d, ell),  # type: ignore[misc]
                streams, v1, batch,
            )
            put(f"FD ℓ={ell}", inst, cs, mem, sec)
        for passes in (4, 8):
            cs, sec = [], 0.0
            for s, x in enumerate(streams):
                t0 = time.perf_counter()
                v = power_iteration(x, passes, s)
                sec += time.perf_counter() - t0
                cs.append(corr(v, v1))
            put(f"power iteration, {passes} passes", inst, cs, d, sec)
        notes.append(f"{inst}: R = {ratio:.2f}")
        print(f"done {inst} (R = {ratio:.2f})", flush=True)

    insts = args.instances.split(",")
    print()
    load1 = os.getloadavg()
    print(f"d = {d}, n = {n}, {args.orders} random orders, batches of {batch} rows; "
          "cells: mean corr / min corr @ peak state floats · rows per second; "
          f"× pass: median (min) of {args.repeat}×{args.orders} paired ratios; "
          f"load average {load0[0]:.2f} at start, {load1[0]:.2f} at end")
    heads = [f"{i} (R={r.split('= ')[1]})" for i, r in zip(insts, notes, strict=True)]
    print("| algorithm | " + " | ".join(heads) + " |")
    print("|---|" + "---|" * len(insts))
    for alg, cells in rows.items():
        print(f"| {alg} | " + " | ".join(cells.get(i, "") for i in insts) + " |")


if __name__ == "__main__":
    main()
