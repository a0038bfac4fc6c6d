"""Immutable embedding snapshots: published atomically in memory and on disk.

A :class:`Snapshot` is built from copies of the embeddings after a batch and
never changes afterwards. The daemon swaps the current snapshot by assigning
one reference, so an HTTP reader holding a snapshot always sees one consistent
version while updates continue.

On disk each version is a folder ``v{version:010d}/`` with ``rows.parquet``,
``columns.parquet`` (``key``, ``embedding``) and ``meta.json``, written to a
hidden temporary folder, fsynced and renamed into place.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from streamfact.batches import fixed_size_list
from streamfact.operators.key_index import KeyIndex

__all__ = ["Snapshot", "SnapshotWriter"]


# A row whose embedding is below this fraction of the largest row norm has no
# direction: its key lies (numerically) outside the rank-k subspace. Repeated
# refinements drive such rows geometrically towards zero (1e-160 after a long
# run), where ‖x‖² underflows; normalising them would turn rounding noise into
# "perfect" neighbours of everything. They get a zero unit vector instead.
NEGLIGIBLE_ROW = 1e-8


def unit_rows(emb: np.ndarray) -> np.ndarray:
    """Unit rows for cosine scores; negligible rows (see ``NEGLIGIBLE_ROW``)
    become zero. Scaled by the largest entry first, so no norm under- or
    overflows whatever the data's scale. O(N·rank)."""
    scale = float(np.max(np.abs(emb))) if emb.size else 0.0
    if not scale > 0.0 or not np.isfinite(scale):
        return np.zeros_like(emb)
    unit = emb / scale
    norms = np.linalg.norm(unit, axis=1)
    live = norms > NEGLIGIBLE_ROW * norms.max()
    unit[live] /= norms[live, None]
    unit[~live] = 0.0
    return unit


@dataclass(frozen=True)
class Snapshot:
    """One published version of the row and column embeddings."""

    version: int
    created: float
    events: int
    singular_values: np.ndarray
    row_keys: np.ndarray
    row_embeddings: np.ndarray
    column_keys: np.ndarray
    column_embeddings: np.ndarray
    _index: dict[str, KeyIndex] = field(default_factory=dict, repr=False, compare=False)
    _unit: dict[str, np.ndarray] = field(default_factory=dict, repr=False, compare=False)

    @classmethod
    def build(
        cls,
        version: int,
        events: int,
        singular_values: np.ndarray,
        row_keys: np.ndarray,
        row_embeddings: np.ndarray,
        column_keys: np.ndarray,
        column_embeddings: np.ndarray,
        key_kind: str,
    ) -> Snapshot:
        snap = cls(
            version,
            time.time(),
            events,
            np.array(singular_values, copy=True),
            np.array(row_keys, copy=True),
            np.array(row_embeddings, copy=True),
            np.array(column_keys, copy=True),
            np.array(column_embeddings, copy=True),
        )
        snap._index["rows"] = KeyIndex.from_arrays(key_kind, snap.row_keys)
        snap._index["columns"] = KeyIndex.from_arrays(key_kind, snap.column_keys)
        snap._unit["rows"] = unit_rows(snap.row_embeddings)
        snap._unit["columns"] = unit_rows(snap.column_embeddings)
        for arr in (
            snap.singular_values,
            snap.row_keys,
            snap.row_embeddings,
            snap.column_keys,
            snap.column_embeddings,
            *snap._unit.values(),
        ):
            arr.flags.writeable = False
        return snap

    def _coerce_key(self, key: str) -> Any:
        kind = self._index["rows"].kind
        if kind == "int":
            try:
                return int(key)
            except ValueError:
                return None
        return key

    def locate(self, key: str, side: str) -> int:
        """Index of ``key`` on ``side`` (``"rows"`` or ``"columns"``), or -1."""
        k = self._coerce_key(key)
        if k is None:
            return -1
        return int(self._index[side].lookup(np.array([k]))[0])

    def embedding(self, key: str) -> dict[str, list[float]]:
        """The key's row and/or column embedding; empty when the key is unknown."""
        out: dict[str, list[float]] = {}
        for side, emb in (("rows", self.row_embeddings), ("columns", self.column_embeddings)):
            i = self.locate(key, side)
            if i >= 0:
                out["row" if side == "rows" else "column"] = emb[i].tolist()
        return out

    def similar(self, key: str, k: int, side: str | None = None) -> list[tuple[str, float]] | None:
        """Cosine top-``k`` neighbours of ``key`` on its side (rows first);
        ``[]`` when its embedding is negligible. O(N·rank)."""
        sides = [side] if side else ["rows", "columns"]
        for sd in sides:
            i = self.locate(key, sd)
            if i < 0:
                continue
            unit = self._unit[sd]
            if not unit[i].any():
                return []  # a negligible embedding has no neighbours
            scores = unit @ unit[i]
            scores[i] = -np.inf
            k_eff = min(k, scores.size - 1)
            if k_eff <= 0:
                return []
            top = np.argpartition(-scores, k_eff - 1)[:k_eff]
            top = top[np.argsort(-scores[top], kind="stable")]
            keys = self.row_keys if sd == "rows" else self.column_keys
            return [(str(keys[j]), float(scores[j])) for j in top]
        return None

    def meta(self) -> dict[str, Any]:
        return {
            "version": self.version,
            "created": self.created,
            "events": self.events,
            "rank": int(self.singular_values.size),
            "rows": int(self.row_keys.size),
            "columns": int(self.column_keys.size),
            "singular_values": self.singular_values[:10].tolist(),
        }


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class SnapshotWriter:
    """Writes snapshot versions as Parquet folders atomically; keeps the newest ``keep``."""

    def __init__(self, root: str | os.PathLike[str], *, keep: int = 3) -> None:
        self.root = Path(root)
        self.keep = keep

    def versions(self) -> list[int]:
        if not self.root.is_dir():
            return []
        found = []
        for entry in self.root.iterdir():
            if entry.name.startswith("v") and entry.name[1:].isdigit():
                found.append(int(entry.name[1:]))
        return sorted(found)

    def write(self, snap: Snapshot) -> Path:
        self.root.mkdir(parents=True, exist_ok=True)
        final = self.root / f"v{snap.version:010d}"
        tmp = self.root / f".tmp-v{snap.version:010d}-{os.getpid()}"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
        for name, keys, emb in (
            ("rows", snap.row_keys, snap.row_embeddings),
            ("columns", snap.column_keys, snap.column_embeddings),
        ):
            table = pa.table({"key": pa.array(keys), "embedding": fixed_size_list(emb)})
            pq.write_table(table, tmp / f"{name}.parquet", compression="zstd")
            _fsync(tmp / f"{name}.parquet")
        (tmp / "meta.json").write_text(json.dumps(snap.meta(), indent=2), encoding="utf-8")
        _fsync(tmp / "meta.json")
        _fsync(tmp)
        if final.exists():  # a replay after a crash re-publishes the same version
            shutil.rmtree(final)
        os.rename(tmp, final)
        _fsync(self.root)
        for old in self.versions()[: -self.keep]:
            shutil.rmtree(self.root / f"v{old:010d}", ignore_errors=True)
        # The Parquet encoder's buffers (tens of MB for a large snapshot) would
        # otherwise stay cached in Arrow's allocator until the next write.
        pa.default_memory_pool().release_unused()
        return final
