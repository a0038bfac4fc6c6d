"""Hot loops by backend: numba per-row kernels (CPU) and torch/numpy batch math.

Importing this package sets one LLVM code-generation option for the process:
loop headers are aligned to 64 bytes. The fused per-row loops are short, hot
and bound by the front end; depending on where a compilation happened to place
them, the same kernel ran 1× or 2–2.5× slower (4 of 10 fresh compilations of
``eigen_numba.absorb_dense`` were slow on the 2-core reference machine; all 16
were fast with the option). It only inserts padding before loops.
"""

import llvmlite.binding as _llvm

_llvm.set_option("", "-align-loops=64")
