"""IncrementalGMM fed from Arrow fixed-size-list rows through the generic stage."""

from __future__ import annotations

import numpy as np

import streamfact as sf
from streamfact.connectors import MemorySink, MemorySource
from streamfact.operators.gmm import IncrementalGMM


def _data(n: int = 3000, d: int = 4) -> np.ndarray:
    rng = np.random.default_rng(0)
    centers = rng.standard_normal((3, d)) * 12.0
    return centers[rng.integers(0, 3, n)] + rng.standard_normal((n, d))


def test_pipeline_update_equals_direct_calls_and_emits_scores() -> None:
    X = _data()
    op = IncrementalGMM(4, delta=0.5, warmup=100)
    sink = MemorySink()
    counters = (
        sf.Pipeline(MemorySource({"x": X}, batch_size=128), progress=False)
        .update(op.update, X=sf.dense("x"))
        .emit(op.score_samples, X=sf.dense("x"), out="loglik")
        .to(sink)
        .run()
    )
    direct = IncrementalGMM(4, delta=0.5, warmup=100)
    direct.update(X)  # per-point mode: batch cuts do not matter, bit for bit
    np.testing.assert_array_equal(op.means, direct.means)
    np.testing.assert_array_equal(op.precisions, direct.precisions)
    assert counters.rows_out == len(X)
    loglik = np.asarray(sink.to_table().column("loglik").combine_chunks())
    # the last batch (3000 = 23·128 + 56 rows) is scored by the final model
    np.testing.assert_allclose(loglik[-56:], direct.score_samples(X[-56:]), rtol=1e-12)


def test_bad_rows_are_skipped_alone() -> None:
    X = _data(1000)
    X[[10, 500]] = np.nan
    op = IncrementalGMM(4, delta=0.5, warmup=100)
    counters = (
        sf.Pipeline(MemorySource({"x": X}, batch_size=64), progress=False)
        .update(op.update, X=sf.dense("x"))
        .on_error("skip")
        .run()
    )
    ref = IncrementalGMM(4, delta=0.5, warmup=100)
    ref.update(np.delete(X, [10, 500], axis=0))
    assert counters.rows_rejected == 2 and op.n_seen == ref.n_seen == 998
    np.testing.assert_array_equal(op.means, ref.means)
