"""Run one pipeline per partition of a stream on Ray, then merge the operators.

Each Ray actor owns one partition (a list of Parquet files, a set of Kafka
partitions, …), builds its pipeline with the user's ``make_pipeline`` and runs
it with local operator state (and its own checkpoints, if the pipeline has
them). The actors send back their operator *states* — arrays and JSON
metadata, as in a checkpoint — and the driver rebuilds the operators and
combines them pairwise in a tree with :meth:`Operator.merge`, so merging costs
O(log P) rounds for P partitions.

Operators whose mathematics admits no merge (M-FAC, Kronecker projection,
order-dependent estimators) raise :class:`~streamfact.operators.base.NotMergeableError`;
they are meant to shard their dimension rather than their rows.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from streamfact.operators.base import NotMergeableError, Operator, OperatorState
from streamfact.pipeline import Counters, Pipeline

__all__ = ["RayResult", "run_on_ray"]


@dataclass
class RayResult:
    """Merged operators (by pipeline stage name) and the per-partition counters."""

    operators: dict[str, Operator]
    counters: list[Counters]

    @property
    def rows_in(self) -> int:
        return sum(c.rows_in for c in self.counters)

    @property
    def rows_rejected(self) -> int:
        return sum(c.rows_rejected for c in self.counters)


def _class_path(op: Operator) -> str:
    return f"{type(op).__module__}.{type(op).__qualname__}"


def _run_partition(make_pipeline: Callable[[Any], Pipeline], partition: Any) -> dict[str, Any]:
    """Body of one actor's work: build, run, close, and export plain states."""
    pipe = make_pipeline(partition)
    if not isinstance(pipe, Pipeline):
        raise TypeError(f"make_pipeline returned {type(pipe).__name__}, not a Pipeline")
    with pipe:
        counters = pipe.run()
    states = {}
    for name, op in pipe.operators.items():
        st = op.state()
        states[name] = {"class": _class_path(op), "arrays": st.arrays, "meta": st.meta}
    return {"states": states, "counters": counters.as_dict()}


def _rebuild(entry: dict[str, Any]) -> Operator:
    module, _, name = entry["class"].rpartition(".")
    if not module.startswith("streamfact."):
        raise ValueError(f"refusing to rebuild {entry['class']}: not a streamfact operator")
    cls = getattr(importlib.import_module(module), name)
    return cls.from_state(OperatorState(dict(entry["arrays"]), dict(entry["meta"])))


def _tree_merge(ops: list[Operator], name: str) -> Operator:
    while len(ops) > 1:
        merged = []
        for i in range(0, len(ops) - 1, 2):
            try:
                merged.append(ops[i].merge(ops[i + 1]))
            except NotMergeableError as exc:
                raise NotMergeableError(
                    f"stage {name}: {exc}; run it on one worker or shard its dimension"
                ) from exc
        if len(ops) % 2:
            merged.append(ops[-1])
        ops = merged
    return ops[0]


def run_on_ray(
    make_pipeline: Callable[[Any], Pipeline],
    partitions: Sequence[Any],
    *,
    num_cpus_per_worker: float = 1.0,
    ray_address: str | None = None,
) -> RayResult:
    """Run ``make_pipeline(partition)`` for every partition on Ray actors and merge.

    Parameters
    ----------
    make_pipeline:
        Builds the pipeline for one partition, including its operators (fresh
        per call). It is shipped to the workers, so it must be importable or
        picklable by Ray (a module-level function is safest).
    partitions:
        One entry per actor, e.g. lists of Parquet files.
    num_cpus_per_worker:
        Ray CPU reservation of each actor.
    ray_address:
        Passed to ``ray.init`` when Ray is not initialised yet (``None`` starts
        or joins a local cluster).

    Returns
    -------
    RayResult
        ``operators`` maps each stage's operator name (as in
        :attr:`Pipeline.operators`) to the merge of all partitions' operators.

    Notes
    -----
    Work is O(rows / P) per actor plus the merges; the driver holds one state
    per partition at a time of each merge round.
    """
    try:
        import ray
    except ImportError as exc:  # pragma: no cover - exercised only without ray
        raise ImportError("run_on_ray needs Ray: pip install 'streamfact[ray]'") from exc
    if not partitions:
        raise ValueError("run_on_ray needs at least one partition")
    if not ray.is_initialized():
        ray.init(address=ray_address, include_dashboard=False, log_to_driver=False)

    @ray.remote(num_cpus=num_cpus_per_worker)
    class PartitionWorker:
        def run(self, make: Callable[[Any], Pipeline], partition: Any) -> dict[str, Any]:
            return _run_partition(make, partition)

    workers = [PartitionWorker.remote() for _ in partitions]  # type: ignore[attr-defined]
    try:
        results = ray.get(
            [w.run.remote(make_pipeline, p) for w, p in zip(workers, partitions, strict=True)]
        )
    finally:
        for w in workers:
            ray.kill(w)
    names = list(results[0]["states"])
    for r in results[1:]:
        if list(r["states"]) != names:
            raise ValueError("partitions built pipelines with different operators")
    operators = {
        name: _tree_merge([_rebuild(r["states"][name]) for r in results], name) for name in names
    }
    return RayResult(operators, [Counters.from_dict(r["counters"]) for r in results])
