"""IncrementalSVD driven by a Pipeline over Arrow columns (dense and sparse rows)."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import scipy.sparse as sp

import streamfact as sf
from streamfact.connectors import MemorySink, MemorySource
from streamfact.operators.svd import IncrementalSVD


def test_dense_rows_through_pipeline_match_direct_use() -> None:
    rng = np.random.default_rng(0)
    x = rng.standard_normal((300, 5)) @ rng.standard_normal((5, 16))
    svd = IncrementalSVD(5)
    sink = MemorySink()
    pipe = (
        sf.Pipeline(MemorySource({"x": x}, batch_size=64), progress=False)
        .update(svd.append_rows, X=sf.dense("x"))
        .emit(svd.transform, X=sf.dense("x"), out="embedding")
        .to(sink)
    )
    pipe.run()
    assert svd.shape == (300, 16)
    # Rank 5 data, rank 5 operator: exact, whatever the batch cuts.
    np.testing.assert_allclose(svd.s, np.linalg.svd(x, compute_uv=False)[:5], rtol=1e-10)
    emb = np.stack(sink.to_table().column("embedding").to_numpy(zero_copy_only=False))
    assert emb.shape == (300, 5)
    # The last batch was embedded with the final factors.
    np.testing.assert_allclose(emb[-44:], svd.row_embeddings()[-44:], atol=1e-8)


def test_sparse_rows_through_pipeline() -> None:
    rng = np.random.default_rng(1)
    n = 200
    # ~4 nonzeros per row: a 25-row batch touches < half the columns (sparse path).
    dense = rng.standard_normal((200, n)) * (rng.random((200, n)) < 0.02)
    csr = sp.csr_array(dense)
    idx = [csr.indices[csr.indptr[i] : csr.indptr[i + 1]].astype(np.int64) for i in range(200)]
    val = [csr.data[csr.indptr[i] : csr.indptr[i + 1]] for i in range(200)]
    table = pa.table(
        {"idx": pa.array(idx, pa.list_(pa.int64())), "val": pa.array(val, pa.list_(pa.float64()))}
    )
    svd = IncrementalSVD(8, method="deng")
    pipe = sf.Pipeline(MemorySource(table, batch_size=25), progress=False).update(
        svd.append_rows, X=sf.sparse("idx", "val", n_features=n)
    )
    pipe.run()
    direct = IncrementalSVD(8, method="deng")
    for i in range(0, 200, 25):
        direct.append_rows(csr[i : i + 25])
    np.testing.assert_allclose(svd.s, direct.s, rtol=1e-12)
    assert svd.n_sparse_updates_ > 0
