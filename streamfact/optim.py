"""torch optimizers preconditioned by streamfact operators (needs the torch extra).

:class:`MFAC` is the M-FAC optimizer of Frantar, Kurtic & Alistarh (2021): each
step adds the current gradient to a :class:`~streamfact.operators.mfac.SlidingWindowMFAC`
window of the last ``window`` gradients and moves along ``F⁻¹ g``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import numpy as np

from streamfact.operators.base import OperatorState
from streamfact.operators.mfac import SlidingWindowMFAC

try:
    import torch

    _OptimizerBase: Any = torch.optim.Optimizer
except ImportError:  # pragma: no cover - exercised only without torch
    torch = None  # type: ignore[assignment]
    _OptimizerBase = object

__all__ = ["MFAC"]


class MFAC(_OptimizerBase):  # type: ignore[misc]
    """M-FAC: steps preconditioned by the inverse empirical Fisher of recent gradients.

    All parameters are flattened into one vector of length d. At each step,
    with ``g`` the flat gradient (plus ``weight_decay · p`` for the groups that
    set it)::

        u = F⁻¹ g,   F = λ I + (1/m) Σ_{last m steps} g_i g_iᵀ     (paper, eq. 1)
        v ← μ v + (1 − μ) u          (only when momentum μ > 0)
        p ← p − lr · v

    ``u`` comes from :meth:`SlidingWindowMFAC.add_and_ihvp`: two passes over the
    m×d gradient window and O(m²) float64 work per step, accurate in float32
    (see that class). The momentum is an exponential average of the
    preconditioned steps, as in the paper's optimizer; it is not SGD's heavy
    ball. Until m steps have been taken the missing gradients count as zero
    (the 1/m convention of the operator).

    Parameters
    ----------
    params:
        Parameters or parameter groups. ``lr``, ``momentum`` and
        ``weight_decay`` may differ per group; the window spans all of them.
    window:
        Number m of recent gradients kept (the paper uses 1024). Memory m·d.
    lr, damping, momentum, weight_decay:
        Step size, damping λ of F, momentum μ in [0, 1), L2 weight decay.
    damping_mode:
        ``"absolute"`` (λ = damping) or ``"relative"`` (see the operator).
    dtype:
        dtype of the gradient window; default: that of the first parameter.

    Attributes
    ----------
    preconditioner : SlidingWindowMFAC
        The window; its ``condition_estimate_`` is κ of the latest step.

    Notes
    -----
    ``state_dict()`` carries the window as tensors plus JSON-able metadata
    under the key ``"mfac"``, so ``torch.save``/``torch.load(weights_only=True)``
    round-trip it.

    Examples
    --------
    >>> import torch
    >>> from streamfact.optim import MFAC
    >>> gen = torch.Generator().manual_seed(0)
    >>> X = torch.randn(256, 5, generator=gen)
    >>> y = X @ torch.tensor([1.0, -2.0, 3.0, 0.5, 0.0])
    >>> w = torch.zeros(5, requires_grad=True)
    >>> opt = MFAC([w], window=8, lr=0.3, damping=1.0)
    >>> for i in range(60):
    ...     rows = torch.arange(16 * i, 16 * i + 16) % 256
    ...     opt.zero_grad()
    ...     loss = ((X[rows] @ w - y[rows]) ** 2).mean()
    ...     loss.backward()
    ...     _ = opt.step()
    >>> bool(((X @ w - y) ** 2).mean() < 0.1)
    True
    """

    def __init__(
        self,
        params: Iterable[Any],
        window: int = 1024,
        lr: float = 1e-3,
        damping: float = 1e-5,
        momentum: float = 0.0,
        weight_decay: float = 0.0,
        *,
        damping_mode: str = "absolute",
        dtype: str | None = None,
    ) -> None:
        if torch is None:
            raise ImportError("streamfact.optim.MFAC needs torch: pip install 'streamfact[torch]'")
        if lr < 0.0:
            raise ValueError(f"lr must be non-negative, got {lr}")
        if not 0.0 <= momentum < 1.0:
            raise ValueError(f"momentum must be in [0, 1), got {momentum}")
        if weight_decay < 0.0:
            raise ValueError(f"weight_decay must be non-negative, got {weight_decay}")
        defaults = {"lr": lr, "momentum": momentum, "weight_decay": weight_decay}
        super().__init__(params, defaults)
        plist = self._params()
        if not plist:
            raise ValueError("MFAC got no parameters")
        first = plist[0]
        devices = {p.device for p in plist}
        if len(devices) != 1:
            raise ValueError(
                f"all parameters must be on one device, got {sorted(map(str, devices))}"
            )
        self.window = int(window)
        self.damping = float(damping)
        self.damping_mode = damping_mode
        self.dtype = dtype or str(first.dtype).replace("torch.", "")
        self._op_device = str(first.device) if first.device.type == "cuda" else "torch"
        self.dim = int(sum(p.numel() for p in plist))
        self.preconditioner = SlidingWindowMFAC(
            self.dim,
            self.window,
            damping=self.damping,
            damping_mode=damping_mode,
            dtype=self.dtype,
            device=self._op_device,
        )

    def _params(self) -> list[Any]:
        return [p for group in self.param_groups for p in group["params"]]

    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        """One preconditioned step; returns the closure's loss when given one."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        with torch.no_grad():
            self._step()
        return loss

    def _step(self) -> None:
        pieces = []
        for group in self.param_groups:
            wd = group["weight_decay"]
            for p in group["params"]:
                g = torch.zeros_like(p) if p.grad is None else p.grad
                if g.is_sparse:
                    raise RuntimeError("MFAC does not support sparse gradients")
                if wd:
                    g = g.add(p, alpha=wd)
                pieces.append(g.reshape(-1))
        flat = torch.cat(pieces)
        update = self.preconditioner.add_and_ihvp(flat)
        offset = 0
        for group in self.param_groups:
            lr, mu = group["lr"], group["momentum"]
            for p in group["params"]:
                n = p.numel()
                u = update[offset : offset + n].view_as(p).to(p.dtype)
                offset += n
                if mu:
                    st = self.state[p]
                    buf = st.get("momentum_buffer")
                    if buf is None:
                        buf = st["momentum_buffer"] = torch.zeros_like(p)
                    buf.mul_(mu).add_(u, alpha=1.0 - mu)
                    u = buf
                p.add_(u, alpha=-lr)

    # -- checkpoints ----------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        sd: dict[str, Any] = super().state_dict()
        st = self.preconditioner.state()
        sd["mfac"] = {
            "arrays": {k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in st.arrays.items()},
            "meta": st.meta,
        }
        return sd

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        sd = dict(state_dict)
        mf = sd.pop("mfac", None)
        super().load_state_dict(sd)
        if mf is not None:
            arrays = {k: v.detach().cpu().numpy() for k, v in mf["arrays"].items()}
            restored = SlidingWindowMFAC.from_state(OperatorState(arrays, dict(mf["meta"])))
            if restored.dim != self.dim:
                raise ValueError(
                    f"state is for {restored.dim} parameters, this optimizer has {self.dim}"
                )
            self.preconditioner = restored
