"""Pipelines on Ray actors, one per group of Parquet files, merged in a tree."""

from __future__ import annotations

import sys

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

import streamfact as sf
from streamfact.batches import fixed_size_list
from streamfact.connectors import ParquetSource
from streamfact.distributed import run_on_ray

ray = pytest.importorskip("ray")
# Workers cannot import this test module by name; ship its functions by value.
ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])

DIM = 6


def _moments_and_sketch(files: list[str]) -> sf.Pipeline:
    moments = sf.RunningMoments(DIM)
    sketch = sf.FrequentDirections(DIM, 4)
    return (
        sf.Pipeline(ParquetSource(files, batch_size=100), progress=False)
        .update(moments.update, X=sf.dense("x"))
        .update(sketch.update, X=sf.dense("x"))
        .on_error("skip")
    )


def _oja(files: list[str]) -> sf.Pipeline:
    oja = sf.OjaEigenvector(DIM)
    return sf.Pipeline(ParquetSource(files), progress=False).update(oja.update, X=sf.dense("x"))


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> tuple[list[str], np.ndarray]:
    root = tmp_path_factory.mktemp("ray-data")
    rng = np.random.default_rng(0)
    X = rng.standard_normal((4000, DIM)) * np.arange(1, DIM + 1) + 3.0
    paths = []
    for i, rows in enumerate(np.array_split(np.arange(4000), 5)):
        path = root / f"part-{i}.parquet"
        pq.write_table(pa.table({"x": fixed_size_list(X[rows])}), path, row_group_size=300)
        paths.append(str(path))
    return paths, X


@pytest.fixture(scope="module")
def ray_cluster() -> object:
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield ray
    ray.shutdown()


def test_merged_result_equals_one_process(
    ray_cluster: object, files: tuple[list[str], np.ndarray]
) -> None:
    paths, X = files
    partitions = [paths[0:2], paths[2:4], paths[4:]]
    result = run_on_ray(_moments_and_sketch, partitions, num_cpus_per_worker=0.5)
    assert result.rows_in == 4000 and len(result.counters) == 3
    moments = result.operators["0:RunningMoments"]
    assert isinstance(moments, sf.RunningMoments) and moments.count == 4000
    # Chan's merge is exact up to the order of additions.
    np.testing.assert_allclose(moments.mean, X.mean(axis=0), rtol=1e-12)
    np.testing.assert_allclose(moments.covariance(), np.cov(X, rowvar=False), rtol=1e-10)
    # Frequent Directions stays within its certified bound after the merges.
    sketch = result.operators["1:FrequentDirections"]
    assert isinstance(sketch, sf.FrequentDirections)
    B = sketch.sketch
    # 0 ⪯ AᵀA − BᵀB ⪯ Δ·I (Liberty 2013; preserved by merges, Ghashami et al. 2016).
    gram_err = np.linalg.norm(X.T @ X - B.T @ B, 2)
    assert gram_err <= sketch.error_bound * (1 + 1e-9) + 1e-9 * np.linalg.norm(X) ** 2


def test_unmergeable_operators_say_so(
    ray_cluster: object, files: tuple[list[str], np.ndarray]
) -> None:
    paths, _ = files
    with pytest.raises(sf.NotMergeableError, match="shard its dimension"):
        run_on_ray(_oja, [paths[:2], paths[2:]], num_cpus_per_worker=0.5)
