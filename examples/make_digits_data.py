"""Regenerate examples/data/digits/ from the UCI handwritten digits that scikit-learn ships.

1797 real 8×8 images (pixel intensities 0–16) written as four Parquet files with
columns ``id`` (int64), ``label`` (int64) and ``pixels`` (fixed_size_list<float64>[64]).
The files are committed, so the demo needs neither this script nor scikit-learn.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from sklearn.datasets import load_digits


def main() -> None:
    digits = load_digits()
    X = digits.data.astype(np.float64)
    y = digits.target.astype(np.int64)
    out = Path(__file__).parent / "data" / "digits"
    out.mkdir(parents=True, exist_ok=True)
    for i, rows in enumerate(np.array_split(np.arange(len(X)), 4)):
        table = pa.table(
            {
                "id": pa.array(rows.astype(np.int64)),
                "label": pa.array(y[rows]),
                "pixels": pa.FixedSizeListArray.from_arrays(pa.array(X[rows].ravel()), 64),
            }
        )
        pq.write_table(table, out / f"digits-{i}.parquet", row_group_size=128, compression="zstd")


if __name__ == "__main__":
    main()
