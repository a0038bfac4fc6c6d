"""TopEigenvector, OjaEigenvector and FrequentDirections through the generic pipeline stage."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import scipy.sparse as sp

import streamfact as sf
from streamfact.connectors import MemorySink, MemorySource
from streamfact.operators.eigenvector import TopEigenvector
from streamfact.operators.frequent_directions import FrequentDirections
from streamfact.operators.oja import OjaEigenvector

D, N = 24, 3000


def _rows() -> np.ndarray:
    rng = np.random.default_rng(0)
    x = 0.02 * rng.standard_normal((N, D))
    x[1717] = 0.0
    x[1717, 4] = 4.0  # one heavy row carries v₁
    return x


def test_three_operators_in_one_pipeline_match_direct_calls() -> None:
    x = _rows()
    x[100, 3] = np.nan  # rejected alone; its neighbours still count
    te = TopEigenvector(D, seed=1)
    oja = OjaEigenvector(D, learning_rate=0.5, seed=1)
    fd = FrequentDirections(D, 4)
    sink = MemorySink()
    counters = (
        sf.Pipeline(MemorySource({"x": x}, batch_size=256), progress=False)
        .update(te.update, rows=sf.dense("x"))
        .update(oja.update, X=sf.dense("x"))
        .update(fd.update, X=sf.dense("x"))
        .emit(te.transform, rows=sf.dense("x"), out="score")
        .on_error("skip")
        .to(sink)
        .run()
    )
    assert counters.rows_rejected >= 1
    good = np.delete(x, 100, axis=0)
    direct = [TopEigenvector(D, seed=1), OjaEigenvector(D, learning_rate=0.5, seed=1),
              FrequentDirections(D, 4)]
    for op in direct:
        op.update(good)  # type: ignore[attr-defined]
    v1 = np.linalg.eigh(good.T @ good)[1][:, -1]
    assert float(te.vector @ v1) ** 2 >= 0.999
    # Batch cuts do not matter beyond rounding for any of the three.
    assert float(te.vector @ direct[0].vector) ** 2 >= 1 - 1e-10  # type: ignore[attr-defined]
    assert float(oja.vector @ direct[1].vector) ** 2 >= 1 - 1e-10  # type: ignore[attr-defined]
    np.testing.assert_allclose(fd.covariance(), direct[2].covariance(), rtol=1e-10, atol=1e-12)  # type: ignore[attr-defined]
    scores = np.asarray(sink.to_table().column("score").to_pylist())
    assert scores.shape[0] == counters.rows_out


def test_sparse_columns_feed_top_eigenvector() -> None:
    x = _rows()
    csr = sp.csr_array(np.where(np.abs(x) > 0.02, x, 0.0))
    idx = [csr.indices[csr.indptr[i] : csr.indptr[i + 1]].astype(np.int64) for i in range(N)]
    val = [csr.data[csr.indptr[i] : csr.indptr[i + 1]] for i in range(N)]
    te = TopEigenvector(D, seed=2)
    (
        sf.Pipeline(
            MemorySource(
                {
                    "i": pa.array(idx, pa.list_(pa.int64())),
                    "v": pa.array(val, pa.list_(pa.float64())),
                },
                batch_size=500,
            ),
            progress=False,
        )
        .update(te.update, rows=sf.sparse("i", "v", n_features=D))
        .run()
    )
    direct = TopEigenvector(D, seed=2)
    direct.update(csr)
    assert float(te.vector @ direct.vector) ** 2 >= 1 - 1e-10
    assert te.rows_seen == direct.rows_seen
