"""RunningMoments against numpy's own mean and covariance."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.sparse as sp

import streamfact as sf


@pytest.fixture
def X() -> np.ndarray:
    rng = np.random.default_rng(3)
    return rng.standard_normal((500, 6)) @ rng.standard_normal((6, 6)) + 100.0


def test_matches_numpy_for_any_batching(X: np.ndarray) -> None:
    rm = sf.RunningMoments(6)
    for lo in range(0, 500, 37):
        rm.update(X[lo : lo + 37])
    assert rm.count == 500
    # Chan's merge loses nothing to cancellation even with a large offset (100):
    # the error is a few ulps of the covariance's scale.
    np.testing.assert_allclose(rm.mean, X.mean(axis=0), rtol=1e-13)
    np.testing.assert_allclose(rm.covariance(), np.cov(X, rowvar=False), rtol=1e-11)
    np.testing.assert_allclose(
        rm.covariance(ddof=0), np.cov(X, rowvar=False, bias=True), rtol=1e-11
    )


def test_merge_of_disjoint_parts_equals_the_whole(X: np.ndarray) -> None:
    a, b, whole = sf.RunningMoments(6), sf.RunningMoments(6), sf.RunningMoments(6)
    a.update(X[:123])
    b.update(X[123:])
    whole.update(X)
    merged = a.merge(b)
    assert merged.count == 500 and a.count == 123  # merge returns a new operator
    np.testing.assert_allclose(merged.covariance(), whole.covariance(), rtol=1e-12)
    with pytest.raises(sf.NotMergeableError):
        a.merge(sf.RunningMoments(5))


def test_sparse_rows_and_float32(X: np.ndarray) -> None:
    rm = sf.RunningMoments(6, dtype="float32")
    rm.update(sp.csr_array(X[:100]))
    assert rm.mean.dtype == np.float32
    # float32 accumulators: about 1e-6 relative on values of order 100.
    np.testing.assert_allclose(rm.mean, X[:100].mean(axis=0), rtol=1e-5)


def test_standardize_and_errors(X: np.ndarray) -> None:
    rm = sf.RunningMoments(6)
    with pytest.raises(ValueError, match="at least two rows"):
        rm.standardize(X[:2])
    rm.update(X)
    Z = rm.standardize(X)
    np.testing.assert_allclose(Z.mean(axis=0), 0.0, atol=1e-10)
    np.testing.assert_allclose(Z.std(axis=0, ddof=1), 1.0, rtol=1e-10)
    with pytest.raises(ValueError, match="columns, expected 6"):
        rm.update(X[:, :5])
    with pytest.raises(ValueError, match="dim must be positive"):
        sf.RunningMoments(0)
    with pytest.raises(ValueError, match="device"):
        sf.RunningMoments(3, device="tpu")
