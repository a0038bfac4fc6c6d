"""SlidingWindowMFAC fed from Arrow fixed-size-list rows through the generic stage."""

from __future__ import annotations

import numpy as np

import streamfact as sf
from streamfact.connectors import MemorySink, MemorySource
from streamfact.operators.mfac import SlidingWindowMFAC


def test_pipeline_steps_equal_direct_calls() -> None:
    rng = np.random.default_rng(0)
    d, m = 40, 8
    G = rng.standard_normal((60, d)).astype(np.float32)
    op = SlidingWindowMFAC(d, m, damping=0.05, dtype="float32", device="cpu")
    sink = MemorySink()
    pipe = (
        sf.Pipeline(MemorySource({"g": G}, batch_size=m), progress=False)
        .emit(op.add_and_ihvp, g=sf.dense("g"), out="step")
        .to(sink)
    )
    counters = pipe.run()
    direct = SlidingWindowMFAC(d, m, damping=0.05, dtype="float32", device="cpu")
    expected = np.vstack([direct.add_and_ihvp(G[i : i + m]) for i in range(0, len(G), m)])
    table = sink.to_table()
    steps = np.asarray(table.column("step").combine_chunks().flatten()).reshape(-1, d)
    assert counters.rows_out == len(G)
    np.testing.assert_array_equal(steps, expected)
    assert op.n_seen_ == direct.n_seen_ == len(G)
    np.testing.assert_array_equal(op.factor_, direct.factor_)


def test_bad_gradient_rows_are_skipped_alone() -> None:
    rng = np.random.default_rng(1)
    d, m = 12, 5
    G = rng.standard_normal((30, d))
    G[[4, 17]] = np.nan
    op = SlidingWindowMFAC(d, m, damping=0.1, device="cpu")
    counters = (
        sf.Pipeline(MemorySource({"g": G}, batch_size=7), progress=False)
        .update(op.add, g=sf.dense("g"))
        .on_error("skip")
        .run()
    )
    good = np.delete(G, [4, 17], axis=0)
    ref = SlidingWindowMFAC(d, m, damping=0.1, device="cpu")
    ref.add(good)
    assert counters.rows_rejected == 2 and op.n_seen_ == len(good)
    x = rng.standard_normal(d)
    np.testing.assert_allclose(op.ihvp(x), ref.ihvp(x), rtol=1e-12)
