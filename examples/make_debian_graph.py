"""Regenerate examples/data/debian-deps/ from a Debian machine's package index.

Real data for the embedding daemon's default run: the dependency graph of the
Debian archive. Each edge event is ``(src, dst, weight)``: package ``src``
depends on ``dst`` (``Depends`` and ``Pre-Depends``; for an alternative ``a | b``
only the first choice; version constraints and architecture qualifiers
dropped). Made on Debian 12 (bookworm, amd64) with::

    apt-get update
    apt-cache dumpavail > dumpavail.txt
    python examples/make_debian_graph.py dumpavail.txt

``weight`` is the inverse document frequency of the dependency,
``log(#packages / #packages depending on dst)``, so that a dependency on
``libc6`` says less about a package than a dependency on ``libgimp2.0``.
The edges are shuffled with a fixed seed (a random-order stream) and written
as eight Parquet files, so the daemon sees them arrive file by file.
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

_NAME = re.compile(r"^\s*([a-z0-9][a-z0-9+.\-]*)")


def parse(text: str) -> list[tuple[str, str]]:
    edges: set[tuple[str, str]] = set()
    for stanza in text.split("\n\n"):
        fields: dict[str, str] = {}
        last = None
        for line in stanza.splitlines():
            if line.startswith((" ", "\t")) and last:
                fields[last] += " " + line.strip()
            elif ":" in line:
                last, _, value = line.partition(":")
                fields[last] = value.strip()
        pkg = fields.get("Package")
        if not pkg:
            continue
        for key in ("Depends", "Pre-Depends"):
            for clause in filter(None, (c.strip() for c in fields.get(key, "").split(","))):
                match = _NAME.match(clause.split("|")[0])
                if match and match.group(1) != pkg:
                    edges.add((pkg, match.group(1)))
    return sorted(edges)


def main(path: str) -> None:
    edges = parse(Path(path).read_text(encoding="utf-8", errors="replace"))
    order = np.random.default_rng(2026).permutation(len(edges))
    src = np.array([edges[i][0] for i in order])
    dst = np.array([edges[i][1] for i in order])
    n_packages = len({e[0] for e in edges})
    _, dst_index, indegree = np.unique(dst, return_inverse=True, return_counts=True)
    idf = np.log(n_packages / indegree[dst_index])
    out = Path(__file__).parent / "data" / "debian-deps"
    out.mkdir(parents=True, exist_ok=True)
    for f in out.glob("*.parquet"):
        f.unlink()
    for i, rows in enumerate(np.array_split(np.arange(len(edges)), 8)):
        table = pa.table(
            {
                "src": pa.array(src[rows]),
                "dst": pa.array(dst[rows]),
                "weight": pa.array(idf[rows]),
            }
        )
        pq.write_table(table, out / f"edges-{i}.parquet", compression="zstd", row_group_size=16384)
    print(f"{len(edges)} edges, {len(set(src) | set(dst))} packages -> {out}")


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "dumpavail.txt")
