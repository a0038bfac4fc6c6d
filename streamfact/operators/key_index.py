"""A growing map from keys (int64 or strings) to dense indices, vectorised.

Operators that grow with new keys (users, items, packages) keep one of these in
their state. Keys get indices in order of first appearance. Lookups are
batched: ``np.unique`` of the batch, then ``np.searchsorted`` into a sorted copy
of the known keys kept between batches; new keys are merged into that copy by
insertion. A batch of b keys against N known ones costs
O(b log b + b log N + N) with no per-key Python loop and no re-sort.
"""

from __future__ import annotations

from typing import Any

import numpy as np

__all__ = ["KeyIndex"]


class KeyIndex:
    """Keys in order of first appearance, plus the permutation that sorts them.

    Parameters
    ----------
    kind:
        ``"int"`` (int64 keys) or ``"str"`` (unicode keys).

    Examples
    --------
    >>> idx = KeyIndex("str")
    >>> idx.add(np.array(["b", "a", "b"])).tolist()
    [0, 1, 0]
    >>> idx.lookup(np.array(["a", "zz"])).tolist()
    [1, -1]
    """

    def __init__(self, kind: str = "str") -> None:
        if kind not in ("int", "str"):
            raise ValueError(f"key kind must be 'int' or 'str', got {kind!r}")
        self.kind = kind
        self.keys = np.empty(0, dtype=np.int64 if kind == "int" else np.str_)
        self.order = np.empty(0, dtype=np.int64)  # keys[order] is sorted
        self._sorted = self.keys[self.order]  # kept in step with keys and order

    def __len__(self) -> int:
        return int(self.keys.size)

    @property
    def nbytes(self) -> int:
        """Bytes held: the keys, their sorted copy and the order."""
        return int(self.keys.nbytes + self._sorted.nbytes + self.order.nbytes)

    def _coerce(self, keys: Any) -> np.ndarray:
        arr = np.asarray(keys)
        if self.kind == "int":
            if arr.dtype.kind not in "iu":
                raise ValueError(f"expected integer keys, got dtype {arr.dtype}")
            return arr.astype(np.int64, copy=False)
        if arr.dtype.kind == "O":
            arr = arr.astype(np.str_)
        if arr.dtype.kind != "U":
            raise ValueError(f"expected string keys, got dtype {arr.dtype}")
        return arr

    def lookup(self, keys: Any) -> np.ndarray:
        """Indices of ``keys``; -1 for keys never seen."""
        arr = self._coerce(keys)
        out = np.full(arr.shape, -1, dtype=np.int64)
        if not self.keys.size or not arr.size:
            return out
        pos = np.minimum(np.searchsorted(self._sorted, arr), self._sorted.size - 1)
        hit = self._sorted[pos] == arr
        out[hit] = self.order[pos[hit]]
        return out

    def add(self, keys: Any) -> np.ndarray:
        """Indices of ``keys``, giving new keys the next indices in order of appearance."""
        arr = self._coerce(keys)
        if not arr.size:
            return np.empty(0, dtype=np.int64)
        uniq, first, inverse = np.unique(arr, return_index=True, return_inverse=True)
        found = self.lookup(uniq)
        new = np.flatnonzero(found < 0)
        if new.size:
            # Numbered in order of first occurrence in this batch; merged into
            # the sorted copy in sorted order (uniq is sorted).
            by_first = new[np.argsort(first[new], kind="stable")]
            start = self.keys.size
            found[by_first] = np.arange(start, start + new.size)
            self.keys = np.concatenate([self.keys, uniq[by_first]])
            fresh = uniq[new]
            base = self._sorted.astype(self.keys.dtype, copy=False)  # '<U' may widen
            at = np.searchsorted(base, fresh)
            self._sorted = np.insert(base, at, fresh)
            self.order = np.insert(self.order, at, found[new])
        return found[inverse.reshape(-1)].reshape(arr.shape)

    def state(self, prefix: str) -> dict[str, np.ndarray]:
        return {f"{prefix}keys": self.keys.copy()}

    @classmethod
    def from_arrays(cls, kind: str, keys: np.ndarray) -> KeyIndex:
        idx = cls(kind)
        idx.keys = idx._coerce(keys).copy()
        if np.unique(idx.keys).size != idx.keys.size:
            raise ValueError("key index state holds duplicate keys")
        idx.order = np.argsort(idx.keys, kind="stable")
        idx._sorted = idx.keys[idx.order]
        return idx
