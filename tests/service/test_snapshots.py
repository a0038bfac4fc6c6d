"""Snapshot neighbour search: negligible rows and scale."""

from __future__ import annotations

import numpy as np

from streamfact.service.snapshots import Snapshot


def _snapshot(rows: np.ndarray) -> Snapshot:
    keys = np.array([f"r{i}" for i in range(rows.shape[0])])
    cols = np.array(["c0", "c1"])
    return Snapshot.build(
        1, 10, np.ones(rows.shape[1]), keys, rows, cols, np.eye(2, rows.shape[1]), "str"
    )


def test_negligible_rows_are_nobodys_neighbours() -> None:
    # A row at 1e-160 (where a long run of refinements leaves keys outside the
    # rank-k subspace) has only a rounding-noise direction. Normalised like
    # any other row it scored 0.74 against r0 and pushed r2 out of its top 2;
    # with entries a little smaller, ‖x‖² underflows and the scores explode.
    rows = np.array(
        [
            [1.0, 0.1, 0.0],
            [0.9, 0.2, 0.0],
            [0.0, 1.0, 0.1],
            [3e-160, -2e-160, 1e-160],
            [0.0, 0.0, 0.0],
        ]
    )
    snap = _snapshot(rows)
    neighbours = snap.similar("r0", 4)
    assert neighbours is not None
    assert [k for k, _ in neighbours[:2]] == ["r1", "r2"]
    assert all(abs(score) <= 1.0 + 1e-12 for _, score in neighbours)
    assert dict(neighbours)["r3"] == 0.0 and dict(neighbours)["r4"] == 0.0
    assert snap.similar("r3", 3) == [] and snap.similar("r4", 3) == []


def test_neighbours_do_not_depend_on_the_scale() -> None:
    rng = np.random.default_rng(0)
    rows = rng.standard_normal((50, 4))
    for scale in (1e-200, 1.0, 1e200):
        got = _snapshot(rows * scale).similar("r7", 5)
        assert got is not None
        want = _snapshot(rows).similar("r7", 5)
        assert want is not None
        assert [k for k, _ in got] == [k for k, _ in want]
        np.testing.assert_allclose([v for _, v in got], [v for _, v in want], rtol=1e-12)
