"""The operator contract shared by every streamfact model.

An operator is a plain numeric state machine over arrays (numpy, scipy.sparse or
torch). It knows nothing of Arrow, files or networks. The engine binds record
batch columns to its update and query methods through one generic stage.

Every concrete operator in :mod:`streamfact.operators`:

* stores its constructor parameters unchanged (learned attributes end in ``_``
  or are exposed as read-only properties);
* offers ``state()`` returning an :class:`OperatorState` (a flat mapping of
  named numpy arrays plus JSON-able metadata) and ``from_state()`` rebuilding
  an equal operator from it;
* offers ``merge(other)`` where the mathematics allows it and raises
  :class:`NotMergeableError` otherwise;
* declares a :class:`ConformanceSpec` through ``conformance_spec()`` so the
  shared suite in :mod:`streamfact.testing` runs on it automatically.
"""

from __future__ import annotations

import inspect
import json
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar, TypeVar

import numpy as np

__all__ = [
    "ConformanceSpec",
    "InvalidInputError",
    "NotMergeableError",
    "Operator",
    "OperatorState",
    "StateFormatError",
    "dense_row_bad_inputs",
]

OperatorT = TypeVar("OperatorT", bound="Operator")


class InvalidInputError(ValueError):
    """Input that an operator (or a column view) refuses.

    ``rows`` lists the offending row indices within the call's input when the
    problem is local to rows, so the engine can reject those rows alone and keep
    the good ones. ``rows=None`` means the whole input is unusable (wrong width,
    wrong type). ``column`` names the Arrow column when known.
    """

    def __init__(
        self,
        reason: str,
        *,
        rows: Sequence[int] | np.ndarray | None = None,
        column: str | None = None,
        row_reasons: Sequence[str] | None = None,
    ) -> None:
        self.reason = reason
        self.rows = None if rows is None else np.asarray(rows, dtype=np.int64)
        self.column = column
        self.row_reasons = None if row_reasons is None else list(row_reasons)
        parts = []
        if column is not None:
            parts.append(f"column {column!r}")
        if self.rows is not None and self.rows.size:
            shown = ", ".join(str(int(r)) for r in self.rows[:5])
            more = f" (+{self.rows.size - 5} more)" if self.rows.size > 5 else ""
            parts.append(f"row {shown}{more}")
        prefix = ", ".join(parts)
        super().__init__(f"{prefix}: {reason}" if prefix else reason)


class NotMergeableError(TypeError):
    """Raised by ``merge`` on operators whose mathematics admits no merge."""


class StateFormatError(ValueError):
    """A state mapping that does not describe a valid operator."""


def _check_json(value: Any, where: str) -> None:
    try:
        json.dumps(value, allow_nan=False)
    except (TypeError, ValueError) as exc:
        raise StateFormatError(f"{where} is not JSON-serialisable: {exc}") from exc


@dataclass
class OperatorState:
    """A flat, pickle-free snapshot of an operator.

    ``arrays`` maps names to numpy arrays of numeric, boolean or fixed-width
    unicode dtype (never object). ``meta`` is JSON-able: scalar counters,
    parameters, the format version of this operator's state layout.
    """

    arrays: dict[str, np.ndarray] = field(default_factory=dict)
    meta: dict[str, Any] = field(default_factory=dict)

    def validate(self) -> OperatorState:
        for name, arr in self.arrays.items():
            if not isinstance(arr, np.ndarray):
                raise StateFormatError(f"state array {name!r} is {type(arr).__name__}, not ndarray")
            if arr.dtype.hasobject:
                raise StateFormatError(f"state array {name!r} has object dtype; not allowed")
        _check_json(self.meta, "state meta")
        return self

    def nbytes(self, exclude: frozenset[str] = frozenset()) -> int:
        return int(sum(a.nbytes for k, a in self.arrays.items() if k not in exclude))


@dataclass(frozen=True)
class ConformanceSpec:
    """How the shared conformance suite exercises one operator class.

    Attributes
    ----------
    make:
        ``make(seed=int, dtype=np.dtype, device=str) -> Operator``; cheap parameters.
    stream:
        ``stream(rng, dtype, n_rows) -> rows``: a row-indexed input (2-D ndarray or
        CSR array) that ``feed`` accepts in any contiguous chunk.
    feed:
        ``feed(op, chunk)`` applies one update with a chunk of rows.
    probe:
        ``probe(op) -> np.ndarray``: a sign- and basis-invariant summary of the
        model used for comparisons (e.g. singular values and projectors).
    bad_inputs:
        ``bad_inputs(rng, dtype) -> [(label, chunk)]``; each must make ``feed``
        raise ``ValueError`` and leave the state unchanged.
    split_tolerance:
        ``0.0``: cutting the stream at different batch boundaries gives a
        bitwise-identical probe; ``> 0``: equal within this relative tolerance;
        ``None``: not invariant by design (``split_reason`` says why).
    growing_state:
        State arrays allowed to grow with the matrix dimensions or key count.
    backends:
        Devices to compare, e.g. ``("cpu", "torch")``; the first is the reference.
    backend_rtol / float32_rtol:
        Relative tolerances of the torch backend and of float32 against float64.
    mergeable / merge_exact / merge_reason:
        Whether ``merge`` exists; whether merging two halves must equal the
        whole stream (within ``split_tolerance``) or is approximate by nature,
        in which case ``merge_reason`` says why and the operator's own tests
        hold it to an accuracy bound.
    """

    make: Callable[..., Operator]
    stream: Callable[[np.random.Generator, np.dtype, int], Any]
    probe: Callable[[Operator], np.ndarray]
    feed: Callable[[Operator, Any], Any] = lambda op, chunk: op.update(chunk)  # type: ignore[attr-defined]
    bad_inputs: Callable[[np.random.Generator, np.dtype], list[tuple[str, Any]]] = (
        lambda rng, dtype: []
    )
    n_rows: int = 240
    split_tolerance: float | None = 1e-10
    split_reason: str = ""
    growing_state: frozenset[str] = frozenset()
    backends: tuple[str, ...] = ("cpu",)
    backend_rtol: float = 1e-8
    float32_rtol: float = 1e-3
    dtypes: tuple[str, ...] = ("float64", "float32")
    mergeable: bool = False
    merge_exact: bool = True
    merge_reason: str = ""


def dense_row_bad_inputs(
    dim: int,
) -> Callable[[np.random.Generator, np.dtype], list[tuple[str, Any]]]:
    """The bad inputs every operator fed dense rows of width ``dim`` must refuse:
    a wrong width, NaN and Inf in one row of several, 3-D input and strings."""

    def cases(rng: np.random.Generator, dtype: np.dtype) -> list[tuple[str, Any]]:
        nan = rng.standard_normal((4, dim)).astype(dtype)
        nan[2, 1] = np.nan
        return [
            ("wrong width", rng.standard_normal((3, dim + 1))),
            ("NaN", nan),
            ("Inf", np.full((1, dim), np.inf)),
            ("3-D", np.zeros((2, 2, dim))),
            ("strings", np.array([["a"] * dim])),
        ]

    return cases


class Operator:
    """Base class of all streamfact operators.

    Subclasses implement ``state``, ``from_state`` and ``conformance_spec``, and
    ``merge`` when meaningful. ``__init__`` stores parameters verbatim so that
    :meth:`get_params` and :meth:`clone` work by introspection.
    """

    #: Version of this operator's state layout; bump on incompatible change.
    state_version: ClassVar[int] = 1

    # -- parameters ---------------------------------------------------------
    @classmethod
    def _param_names(cls) -> list[str]:
        sig = inspect.signature(cls.__init__)
        return [
            p.name
            for p in sig.parameters.values()
            if p.name != "self" and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)
        ]

    def get_params(self) -> dict[str, Any]:
        """Constructor parameters, read back from attributes of the same name."""
        return {name: getattr(self, name) for name in self._param_names()}

    def json_params(self) -> dict[str, Any]:
        """The JSON-able subset of :meth:`get_params` (arrays go into the state)."""
        out: dict[str, Any] = {}
        for key, value in self.get_params().items():
            if isinstance(value, np.dtype | type) and value is not None:
                value = np.dtype(value).name
            try:
                json.dumps(value, allow_nan=False)
            except (TypeError, ValueError):
                continue
            out[key] = value
        return out

    def clone(self: OperatorT) -> OperatorT:
        """A fresh, unfitted operator with the same parameters."""
        return type(self)(**self.get_params())

    # -- state --------------------------------------------------------------
    def state(self) -> OperatorState:
        raise NotImplementedError

    @classmethod
    def from_state(cls: type[OperatorT], state: OperatorState | Mapping[str, Any]) -> OperatorT:
        raise NotImplementedError

    def load_state(self, state: OperatorState) -> None:
        """Replace this operator's state in place (used when resuming a pipeline
        whose stages hold bound methods of this very object)."""
        fresh = type(self).from_state(state)
        self.__dict__.clear()
        self.__dict__.update(fresh.__dict__)

    def _state_header(self) -> dict[str, Any]:
        """The meta entries every state starts with: class, layout version, parameters."""
        return {
            "class": type(self).__name__,
            "state_version": self.state_version,
            "params": self.json_params(),
        }

    @classmethod
    def _begin_from_state(
        cls: type[OperatorT], state: OperatorState | Mapping[str, Any]
    ) -> tuple[OperatorState, OperatorT]:
        """Validate ``state`` for this class and build a fresh operator from its params."""
        st = as_state(state)
        check_state_class(st, cls)
        return st, cls(**st.meta["params"])

    # -- combination ----------------------------------------------------------
    def merge(self: OperatorT, other: OperatorT) -> OperatorT:
        raise NotMergeableError(f"{type(self).__name__} cannot be merged")

    # -- conformance ----------------------------------------------------------
    @classmethod
    def conformance_spec(cls) -> ConformanceSpec:
        raise NotImplementedError(f"{cls.__name__} declares no ConformanceSpec")

    def __repr__(self) -> str:
        params = ", ".join(f"{k}={v!r}" for k, v in self.json_params().items())
        return f"{type(self).__name__}({params})"


def as_state(state: OperatorState | Mapping[str, Any]) -> OperatorState:
    """Accept an :class:`OperatorState` or a ``{"arrays":..., "meta":...}`` mapping."""
    if isinstance(state, OperatorState):
        return state.validate()
    if isinstance(state, Mapping) and "arrays" in state and "meta" in state:
        return OperatorState(dict(state["arrays"]), dict(state["meta"])).validate()
    raise StateFormatError("expected an OperatorState or a mapping with 'arrays' and 'meta'")


def check_state_class(state: OperatorState, cls: type) -> None:
    """Refuse a state written by another operator class or a newer layout."""
    name = state.meta.get("class")
    if name is not None and name != cls.__name__:
        raise StateFormatError(f"state belongs to {name}, not {cls.__name__}")
    version = int(state.meta.get("state_version", 1))
    if version > getattr(cls, "state_version", 1):
        raise StateFormatError(
            f"state layout version {version} is newer than this {cls.__name__} understands"
        )
