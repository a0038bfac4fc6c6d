"""KeyIndex against a plain dict that numbers keys in order of first appearance."""

from __future__ import annotations

import numpy as np
import pytest

from streamfact.operators.key_index import KeyIndex


@pytest.mark.parametrize("kind", ["str", "int"])
def test_matches_a_dict_oracle(kind: str) -> None:
    rng = np.random.default_rng(9)
    index, oracle = KeyIndex(kind), {}
    for step in range(40):
        raw = rng.integers(0, 3000, 200)
        if kind == "str":
            # Longer keys arrive later: the sorted copy must widen its dtype.
            keys: np.ndarray = np.array([f"{'k' * (step // 10)}{x}" for x in raw])
        else:
            keys = raw.astype(np.int64)
        expected = [oracle.setdefault(k, len(oracle)) for k in keys.tolist()]
        np.testing.assert_array_equal(index.add(keys), expected)
        probe = rng.integers(-5, 3500, 50)
        probe_keys = probe if kind == "int" else np.array([str(x) for x in probe])
        want = [oracle.get(k, -1) for k in probe_keys.tolist()]
        np.testing.assert_array_equal(index.lookup(probe_keys), want)
    assert len(index) == len(oracle)
    again = KeyIndex.from_arrays(kind, index.keys)
    np.testing.assert_array_equal(again.lookup(index.keys), np.arange(len(index)))
    np.testing.assert_array_equal(again.add(index.keys[:7]), np.arange(7))


def test_bad_keys_and_duplicate_state() -> None:
    with pytest.raises(ValueError, match="integer keys"):
        KeyIndex("int").add(np.array(["a"]))
    with pytest.raises(ValueError, match="string keys"):
        KeyIndex("str").add(np.array([1.5]))
    with pytest.raises(ValueError, match="duplicate"):
        KeyIndex.from_arrays("int", np.array([1, 2, 1]))
    with pytest.raises(ValueError, match="'int' or 'str'"):
        KeyIndex("float")
