"""KroneckerProjection fed by Arrow batches through the generic pipeline stage."""

from __future__ import annotations

from pathlib import Path

import numpy as np

import streamfact as sf
from streamfact.connectors import MemorySink, MemorySource
from streamfact.operators.kronecker import KroneckerProjection

N, M = 5, 9


def _problem() -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(0)
    A3 = rng.standard_normal((M, N, N))
    A = (A3 + A3.transpose(0, 2, 1)).reshape(M, N * N)
    G = rng.standard_normal((N, N))
    return A, G @ G.T + np.eye(N)


def _stream(rows: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(1)
    return {
        "index": rng.integers(0, N, rows).astype(np.int64),
        "value": np.exp(rng.normal(0.5, 0.4, rows)),
        "h": rng.standard_normal((rows, N * N)),
    }


def _pipe(op: KroneckerProjection, data: dict[str, np.ndarray], sink: MemorySink) -> sf.Pipeline:
    return (
        sf.Pipeline(MemorySource(data, batch_size=8), progress=False)
        .update(op.update_eigenvalues, indices=sf.scalar("index"), values=sf.scalar("value"))
        .emit(op.project, h=sf.dense("h"), out="ph")
        .to(sink)
    )


def _oracle(A: np.ndarray, W: np.ndarray, H: np.ndarray) -> np.ndarray:
    lam, V = np.linalg.eigh(W)
    Wh = (V * np.sqrt(lam)) @ V.T
    B = (Wh @ A.reshape(M, N, N) @ Wh).reshape(M, N * N)
    return (B.T @ np.linalg.solve(B @ B.T, B @ H.T)).T


def test_pipeline_matches_direct_calls_and_oracle() -> None:
    A, W = _problem()
    data = _stream(40)
    op = KroneckerProjection(A, W, form="sqrt_w_kron_sqrt_w")
    sink = MemorySink()
    counters = _pipe(op, data, sink).run()
    assert counters.rows_in == 40 and counters.rows_rejected == 0

    direct = KroneckerProjection(A, W, form="sqrt_w_kron_sqrt_w")
    outs = []
    for a in range(0, 40, 8):
        direct.update_eigenvalues(data["index"][a : a + 8], data["value"][a : a + 8])
        outs.append(direct.project(data["h"][a : a + 8]))
    got = np.asarray(sink.to_table().column("ph").to_pylist())
    np.testing.assert_array_equal(got, np.concatenate(outs))
    np.testing.assert_array_equal(op.eigenvalues, direct.eigenvalues)
    ref = _oracle(A, op.W_current, data["h"][-8:])
    assert np.abs(got[-8:] - ref).max() <= 1e-12


def test_pipeline_skips_bad_rows_and_resumes_from_checkpoint(tmp_path: Path) -> None:
    A, W = _problem()
    data = _stream(40)
    data["index"][13] = N + 3  # out of range: rejected alone
    data["value"][22] = -1.0  # not PSD: rejected alone
    straight = KroneckerProjection(A, W, form="sqrt_w_kron_sqrt_w")
    counters = (
        sf.Pipeline(MemorySource(data, batch_size=8), progress=False)
        .update(straight.update_eigenvalues, indices=sf.scalar("index"), values=sf.scalar("value"))
        .on_error("skip")
        .run()
    )
    assert counters.rows_rejected == 2
    good = np.setdiff1d(np.arange(40), [13, 22])
    expected = KroneckerProjection(A, W, form="sqrt_w_kron_sqrt_w")
    for a in range(0, 40, 8):
        keep = good[(good >= a) & (good < a + 8)]
        expected.update_eigenvalues(data["index"][keep], data["value"][keep])
    np.testing.assert_array_equal(straight.eigenvalues, expected.eigenvalues)

    first = KroneckerProjection(A, W, form="sqrt_w_kron_sqrt_w")
    pipe = (
        sf.Pipeline(MemorySource(data, batch_size=8), progress=False)
        .update(first.update_eigenvalues, indices=sf.scalar("index"), values=sf.scalar("value"))
        .on_error("skip")
        .checkpoint(tmp_path, every_rows=16)
    )
    for i, _ in enumerate(pipe):
        if i == 2:
            break
    pipe.close()
    resumed = KroneckerProjection(A, W, form="sqrt_w_kron_sqrt_w")
    pipe2 = (
        sf.Pipeline(MemorySource(data, batch_size=8), progress=False)
        .update(resumed.update_eigenvalues, indices=sf.scalar("index"), values=sf.scalar("value"))
        .on_error("skip")
        .checkpoint(tmp_path, every_rows=16)
    )
    pipe2.run()
    assert pipe2.resumed_from is not None
    h = data["h"][:3]
    np.testing.assert_array_equal(resumed.project(h), straight.project(h))
    assert resumed.counters["steps"] == straight.counters["steps"]
