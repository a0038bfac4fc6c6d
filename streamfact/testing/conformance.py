"""The shared operator conformance suite, in the spirit of ``check_estimator``.

Every concrete :class:`~streamfact.operators.base.Operator` subclass defined in
a module of :mod:`streamfact.operators` is discovered automatically and every
check below runs on it (see ``tests/operators/test_conformance.py``). A new
operator joins the suite by existing and declaring a
:class:`~streamfact.operators.base.ConformanceSpec`.

Each check raises ``AssertionError`` with a message naming the operator.
"""

from __future__ import annotations

import copy
import importlib
import inspect
import itertools
import json
import pkgutil
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import scipy.sparse as sp

from streamfact.kernels.backend import to_numpy, torch_available
from streamfact.operators.base import (
    ConformanceSpec,
    NotMergeableError,
    Operator,
    OperatorState,
)

__all__ = ["CHECKS", "discover_operators", "run_all_checks"]

SEED = 20261122


def discover_operators() -> list[type[Operator]]:
    """Concrete Operator subclasses defined in ``streamfact.operators.*``."""
    import streamfact.operators as pkg

    found: dict[str, type[Operator]] = {}
    for info in pkgutil.iter_modules(pkg.__path__, prefix=pkg.__name__ + "."):
        module = importlib.import_module(info.name)
        for _, obj in inspect.getmembers(module, inspect.isclass):
            if (
                issubclass(obj, Operator)
                and obj is not Operator
                and obj.__module__ == module.__name__
                and not inspect.isabstract(obj)
                and not obj.__name__.startswith("_")
            ):
                found[f"{obj.__module__}.{obj.__qualname__}"] = obj
    return [found[k] for k in sorted(found)]


# -- helpers -----------------------------------------------------------------


def _rows(data: Any, start: int, stop: int) -> Any:
    if sp.issparse(data):
        return sp.csr_array(data)[start:stop]
    return data[start:stop]


def _n(data: Any) -> int:
    return int(data.shape[0])


def _feed_in_chunks(spec: ConformanceSpec, op: Operator, data: Any, cuts: list[int]) -> None:
    bounds = [0, *cuts, _n(data)]
    for a, b in itertools.pairwise(bounds):
        if b > a:
            spec.feed(op, _rows(data, a, b))


def _probe(spec: ConformanceSpec, op: Operator) -> np.ndarray:
    return np.asarray(to_numpy(spec.probe(op)), dtype=np.float64)


def _rel_err(a: np.ndarray, b: np.ndarray) -> float:
    denom = max(float(np.linalg.norm(b)), 1e-300)
    return float(np.linalg.norm(a - b)) / denom


def _default_cuts(n: int) -> list[int]:
    return [n // 3, (2 * n) // 3]


def _roundtrip(state: OperatorState) -> OperatorState:
    """Pass a state through what a checkpoint does: JSON meta, copied arrays."""
    meta = json.loads(json.dumps(state.meta, allow_nan=False))
    arrays = {k: np.array(v, copy=True) for k, v in state.arrays.items()}
    return OperatorState(arrays=arrays, meta=meta)


def _spec(cls: type[Operator]) -> ConformanceSpec:
    spec = cls.conformance_spec()
    assert isinstance(spec, ConformanceSpec), (
        f"{cls.__name__}.conformance_spec() must return a ConformanceSpec"
    )
    return spec


def _stream(spec: ConformanceSpec, dtype: str = "float64", n_rows: int | None = None) -> Any:
    rng = np.random.default_rng(SEED)
    return spec.stream(rng, np.dtype(dtype), n_rows or spec.n_rows)


# -- checks ------------------------------------------------------------------


def check_state_roundtrip(cls: type[Operator]) -> None:
    """state() → from_state() → continue equals an uninterrupted run, bitwise."""
    spec = _spec(cls)
    data = _stream(spec)
    n = _n(data)
    cuts = _default_cuts(n)
    straight = spec.make(seed=1, dtype="float64", device=spec.backends[0])
    _feed_in_chunks(spec, straight, data, cuts)

    first = spec.make(seed=1, dtype="float64", device=spec.backends[0])
    _feed_in_chunks(spec, first, _rows(data, 0, cuts[0]), [])
    state = first.state()
    state.validate()
    resumed = cls.from_state(_roundtrip(state))
    assert type(resumed) is cls
    np.testing.assert_array_equal(
        _probe(spec, resumed), _probe(spec, first), err_msg=f"{cls.__name__}: from_state differs"
    )
    _feed_in_chunks(spec, resumed, _rows(data, cuts[0], n), [cuts[1] - cuts[0]])
    np.testing.assert_array_equal(
        _probe(spec, resumed),
        _probe(spec, straight),
        err_msg=f"{cls.__name__}: resumed run differs from an uninterrupted one",
    )
    # load_state restores in place (what a resuming pipeline does).
    target = spec.make(seed=1, dtype="float64", device=spec.backends[0])
    target.load_state(_roundtrip(straight.state()))
    np.testing.assert_array_equal(_probe(spec, target), _probe(spec, straight))


def check_determinism(cls: type[Operator]) -> None:
    """Same input and seed → identical output; no global RNG is touched."""
    spec = _spec(cls)
    data = _stream(spec)
    np.random.seed(123)  # noqa: NPY002 - checks the global RNG is untouched
    before = np.random.get_state()[1].copy()  # type: ignore[index]  # noqa: NPY002
    probes = []
    for _ in range(2):
        op = spec.make(seed=7, dtype="float64", device=spec.backends[0])
        _feed_in_chunks(spec, op, data, _default_cuts(_n(data)))
        probes.append(_probe(spec, op))
    after = np.random.get_state()[1]  # type: ignore[index]  # noqa: NPY002
    np.testing.assert_array_equal(
        probes[0], probes[1], err_msg=f"{cls.__name__}: not deterministic"
    )
    np.testing.assert_array_equal(
        before, after, err_msg=f"{cls.__name__} used the global numpy RNG"
    )


def check_batch_split_invariance(cls: type[Operator]) -> None:
    """Different batch cuts of one stream end in the declared-equal state."""
    spec = _spec(cls)
    if spec.split_tolerance is None:
        assert spec.split_reason, (
            f"{cls.__name__} declares no batch-split invariance; it must say why (split_reason)"
        )
        return
    data = _stream(spec)
    n = _n(data)
    probes = []
    for cuts in ([], _default_cuts(n), [1, 2, n // 2, n - 1], list(range(7, n, 29))):
        op = spec.make(seed=3, dtype="float64", device=spec.backends[0])
        _feed_in_chunks(spec, op, data, cuts)
        probes.append(_probe(spec, op))
    for p in probes[1:]:
        if spec.split_tolerance == 0.0:
            np.testing.assert_array_equal(
                p, probes[0], err_msg=f"{cls.__name__}: split changes state"
            )
        else:
            err = _rel_err(p, probes[0])
            assert err <= spec.split_tolerance, (
                f"{cls.__name__}: batch cuts change the result by {err:.3g} "
                f"> declared {spec.split_tolerance:.3g}"
            )


def check_state_bounded(cls: type[Operator]) -> None:
    """State size does not grow with rows seen, outside declared growing arrays."""
    spec = _spec(cls)
    sizes = []
    for n_rows in (spec.n_rows, 3 * spec.n_rows):
        data = _stream(spec, n_rows=n_rows)
        op = spec.make(seed=5, dtype="float64", device=spec.backends[0])
        _feed_in_chunks(spec, op, data, _default_cuts(_n(data)))
        sizes.append(op.state().nbytes(exclude=spec.growing_state))
    assert sizes[1] <= sizes[0], (
        f"{cls.__name__}: state grew from {sizes[0]} to {sizes[1]} bytes with 3x the rows "
        f"(arrays allowed to grow: {sorted(spec.growing_state)})"
    )


def check_bad_input(cls: type[Operator]) -> None:
    """Bad shapes, NaN/Inf and bad indices raise ValueError and change nothing."""
    spec = _spec(cls)
    rng = np.random.default_rng(SEED)
    cases = spec.bad_inputs(rng, np.dtype("float64"))
    assert cases, f"{cls.__name__} declares no bad inputs to check"
    data = _stream(spec)
    for label, bad in cases:
        op = spec.make(seed=2, dtype="float64", device=spec.backends[0])
        _feed_in_chunks(spec, op, _rows(data, 0, _n(data) // 2), [])
        before = _probe(spec, op)
        state_before = copy.deepcopy(op.state())
        try:
            spec.feed(op, bad)
        except ValueError as exc:
            assert str(exc), f"{cls.__name__}: empty error message for {label}"
        else:
            raise AssertionError(f"{cls.__name__} accepted bad input: {label}")
        np.testing.assert_array_equal(
            _probe(spec, op), before, err_msg=f"{cls.__name__}: state changed by rejected {label}"
        )
        after = op.state()
        for k, arr in state_before.arrays.items():
            np.testing.assert_array_equal(
                after.arrays[k], arr, err_msg=f"{cls.__name__}: {k} changed by {label}"
            )


def check_dtypes(cls: type[Operator]) -> None:
    """float32 and float64 both run; float32 agrees with float64 to its tolerance."""
    spec = _spec(cls)
    probes = {}
    for dtype in spec.dtypes:
        data = _stream(spec, dtype=dtype)
        op = spec.make(seed=4, dtype=dtype, device=spec.backends[0])
        _feed_in_chunks(spec, op, data, _default_cuts(_n(data)))
        p = _probe(spec, op)
        assert np.isfinite(p).all(), f"{cls.__name__}: non-finite probe in {dtype}"
        probes[dtype] = p
    if "float32" in probes and "float64" in probes:
        err = _rel_err(probes["float32"], probes["float64"])
        assert err <= spec.float32_rtol, (
            f"{cls.__name__}: float32 differs from float64 by {err:.3g} > {spec.float32_rtol:.3g}"
        )


def check_backend_agreement(cls: type[Operator]) -> None:
    """numpy and torch backends give the same probe within backend_rtol."""
    spec = _spec(cls)
    if len(spec.backends) < 2:
        return
    if not torch_available():
        import pytest

        pytest.skip("torch is not installed")
    data = _stream(spec)
    probes = []
    for device in spec.backends:
        op = spec.make(seed=6, dtype="float64", device=device)
        _feed_in_chunks(spec, op, data, _default_cuts(_n(data)))
        probes.append(_probe(spec, op))
    for device, p in zip(spec.backends[1:], probes[1:], strict=True):
        err = _rel_err(p, probes[0])
        assert err <= spec.backend_rtol, (
            f"{cls.__name__}: device={device!r} differs from {spec.backends[0]!r} by {err:.3g}"
        )


def check_merge(cls: type[Operator]) -> None:
    """Mergeable operators: merge of two halves equals the whole; others say no clearly."""
    spec = _spec(cls)
    data = _stream(spec)
    n = _n(data)
    a = spec.make(seed=8, dtype="float64", device=spec.backends[0])
    b = spec.make(seed=8, dtype="float64", device=spec.backends[0])
    if not spec.mergeable:
        try:
            a.merge(b)
        except NotMergeableError:
            return
        raise AssertionError(f"{cls.__name__} is declared not mergeable but merge() succeeded")
    whole = spec.make(seed=8, dtype="float64", device=spec.backends[0])
    _feed_in_chunks(spec, whole, data, [n // 2])
    _feed_in_chunks(spec, a, _rows(data, 0, n // 2), [])
    _feed_in_chunks(spec, b, _rows(data, n // 2, n), [])
    merged = a.merge(b)
    assert type(merged) is cls, f"{cls.__name__}.merge returned {type(merged).__name__}"
    if not spec.merge_exact:
        assert spec.merge_reason, f"{cls.__name__}: an approximate merge must say why"
        assert np.isfinite(_probe(spec, merged)).all()
        return
    tol = spec.split_tolerance if spec.split_tolerance is not None else 1e-8
    err = _rel_err(_probe(spec, merged), _probe(spec, whole))
    assert err <= max(tol, 1e-12), f"{cls.__name__}: merge differs from the whole by {err:.3g}"


def check_params(cls: type[Operator]) -> None:
    """Parameters after the first are keyword-only; clone() rebuilds from them."""
    spec = _spec(cls)
    sig = inspect.signature(cls.__init__)
    params = [p for p in sig.parameters.values() if p.name != "self"]
    positional = [p for p in params if p.kind is p.POSITIONAL_OR_KEYWORD]
    assert len(positional) <= 3, f"{cls.__name__}: too many positional parameters {positional}"
    op = spec.make(seed=0, dtype="float64", device=spec.backends[0])
    assert set(op.get_params()) == {p.name for p in params}
    fresh = op.clone()
    assert type(fresh) is cls


CHECKS: dict[str, Callable[[type[Operator]], None]] = {
    "state_roundtrip": check_state_roundtrip,
    "determinism": check_determinism,
    "batch_split_invariance": check_batch_split_invariance,
    "state_bounded": check_state_bounded,
    "bad_input": check_bad_input,
    "dtypes": check_dtypes,
    "backend_agreement": check_backend_agreement,
    "merge": check_merge,
    "params": check_params,
}


def iter_cases() -> Iterator[tuple[type[Operator], str, Callable[[type[Operator]], None]]]:
    for cls in discover_operators():
        for name, check in CHECKS.items():
            yield cls, name, check


def run_all_checks(cls: type[Operator]) -> None:
    """Run every check on ``cls`` (for use outside pytest)."""
    for check in CHECKS.values():
        check(cls)
