"""Keep a truncated SVD of a growing sparse term-document matrix up to date.

Run: ``python examples/svd_quickstart.py``. It builds a small synthetic LSI-like
matrix, streams its rows in batches into :class:`IncrementalSVD`, then adds
columns and a low-rank weight change, and compares with a fresh SVD.
"""

from __future__ import annotations

import numpy as np
import scipy.sparse as sp

from streamfact.operators.svd import IncrementalSVD


def main() -> None:
    rng = np.random.default_rng(0)
    m, n, k = 2000, 600, 20
    topics = rng.integers(0, n, size=(50, 8))
    rows = np.repeat(np.arange(m), 16)
    cols = topics[rng.integers(0, 50, size=(m, 2))].reshape(m, 16).ravel()
    a = sp.csr_array(sp.coo_array((rng.uniform(0.5, 1.5, rows.size), (rows, cols)), (m, n)))

    svd = IncrementalSVD(k, method="deng", seed=0)
    svd.append_rows(a[:1000])  # initialise from the first block
    for start in range(1000, m, 100):  # then stream the rest in batches
        svd.append_rows(a[start : start + 100])
    print("method used:", svd.method_used_, "| shape:", svd.shape)

    s_ref = np.linalg.svd(a.toarray(), compute_uv=False)[:k]
    print("top-5 singular values  :", np.round(svd.s[:5], 4))
    print("recomputed from scratch:", np.round(s_ref[:5], 4))
    err = np.max(np.abs(svd.s[:10] - s_ref[:10]) / s_ref[:10])
    print(f"max relative error (top 10): {err:.2e}")
    print("first document embedding:", np.round(svd.transform(a[:1])[0, :4], 4))
    svd.refine(a)  # one warm-started subspace iteration against the true matrix
    err = np.max(np.abs(svd.s[:10] - s_ref[:10]) / s_ref[:10])
    print(f"after refine(A): max relative error (top 10): {err:.2e}")

    svd.append_columns(sp.csr_array(rng.random((m, 5)) * (rng.random((m, 5)) < 0.01)))
    cells = sp.csr_array(([2.0], ([3], [0])), shape=(m, 1))  # A[3, 7] += 2
    svd.update_low_rank(cells, sp.csr_array(([1.0], ([7], [0])), shape=(svd.shape[1], 1)))
    print("after column append + weight update, shape:", svd.shape)
    print("orthogonality loss (U, V):", svd.orthogonality_loss(exact=True))
    print("cond(K_u), cond(K_v):", svd.condition_numbers())


if __name__ == "__main__":
    main()
