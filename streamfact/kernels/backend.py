"""Where dense batch math runs: numpy on the CPU, or torch on a CPU or GPU.

``device`` is the one user-facing knob shared by all operators:

* ``"cpu"``: numpy/scipy (the reference path, default);
* ``"torch"``: torch on the CPU (what CI uses to check the torch path);
* ``"cuda"`` / ``"cuda:N"``: torch on that GPU;
* ``"auto"``: ``"cuda"`` when torch sees a GPU, else ``"cpu"``.

Operators write their dense math once against the array-API namespace returned
by :func:`Backend.xp` where practical, and convert at the boundary with
:meth:`Backend.asarray` / :meth:`Backend.to_numpy`.
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from functools import cache
from typing import Any

import numpy as np

__all__ = ["Backend", "cuda_available", "resolve_backend", "torch_available"]


def torch_available() -> bool:
    return importlib.util.find_spec("torch") is not None


@cache
def cuda_available() -> bool:
    if not torch_available():
        return False
    import torch

    return bool(torch.cuda.is_available())


@dataclass(frozen=True)
class Backend:
    """A resolved device: ``kind`` is ``"numpy"`` or ``"torch"``."""

    kind: str
    device: str  # "cpu" for numpy; a torch device string otherwise

    @property
    def is_torch(self) -> bool:
        return self.kind == "torch"

    @property
    def xp(self) -> Any:
        """The array-API namespace (numpy or array_api_compat's torch)."""
        if self.is_torch:
            import array_api_compat.torch as xp_torch

            return xp_torch
        import array_api_compat.numpy as xp_numpy

        return xp_numpy

    def asarray(self, x: Any, dtype: np.dtype | str | None = None) -> Any:
        """Move ``x`` (numpy or torch) onto this backend with ``dtype``."""
        if self.is_torch:
            import torch

            tdtype = torch_dtype(dtype) if dtype is not None else None
            if isinstance(x, torch.Tensor):
                return x.to(device=self.device, dtype=tdtype or x.dtype)
            arr = np.asarray(x, dtype=dtype)
            return torch.as_tensor(arr, device=self.device)
        if _is_torch_tensor(x):
            x = x.detach().cpu().numpy()
        return np.asarray(x, dtype=dtype)

    def to_numpy(self, x: Any) -> np.ndarray:
        return to_numpy(x)


def _is_torch_tensor(x: Any) -> bool:
    return type(x).__module__.startswith("torch") and hasattr(x, "detach")


def to_numpy(x: Any) -> np.ndarray:
    """A numpy view or copy of ``x`` (numpy array, torch tensor or scalar)."""
    if _is_torch_tensor(x):
        return np.asarray(x.detach().cpu().numpy())
    return np.asarray(x)


def torch_dtype(dtype: np.dtype | str | None) -> Any:
    import torch

    name = np.dtype(dtype).name
    table = {
        "float64": torch.float64,
        "float32": torch.float32,
        "int64": torch.int64,
        "int32": torch.int32,
        "bool": torch.bool,
    }
    if name not in table:
        raise TypeError(f"dtype {name} has no torch counterpart here")
    return table[name]


def resolve_backend(device: str | None) -> Backend:
    """Turn a ``device`` parameter into a :class:`Backend`, with a clear error."""
    dev = "cpu" if device is None else str(device)
    if dev == "cpu":
        return Backend("numpy", "cpu")
    if dev == "auto":
        return Backend("torch", "cuda") if cuda_available() else Backend("numpy", "cpu")
    if dev == "torch" or dev.startswith("cuda"):
        if not torch_available():
            raise ImportError(
                f"device={dev!r} needs torch; install the extra: pip install 'streamfact[torch]'"
            )
        if dev.startswith("cuda") and not cuda_available():
            raise RuntimeError(f"device={dev!r} requested but torch sees no CUDA device")
        return Backend("torch", "cpu" if dev == "torch" else dev)
    raise ValueError(f"device must be 'cpu', 'torch', 'cuda[:N]' or 'auto', got {dev!r}")
