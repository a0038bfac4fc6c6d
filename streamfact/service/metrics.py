"""Prometheus metrics read from the daemon at scrape time (prometheus-client)."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

__all__ = ["DaemonCollector", "make_registry", "render"]


class DaemonCollector(Collector):
    """Turns ``read()`` (a dict of current values) into Prometheus families.

    Reading at scrape time keeps totals exact across restarts: they come from
    the checkpointed pipeline counters, not from in-process counters.
    """

    def __init__(self, read: Callable[[], dict[str, Any]]) -> None:
        self.read = read

    def collect(self) -> Iterator[Any]:
        v = self.read()
        yield CounterMetricFamily(
            "streamfact_events", "Events applied to the model", value=v["events"]
        )
        yield CounterMetricFamily(
            "streamfact_events_rejected", "Events rejected as bad input", value=v["rejected"]
        )
        yield GaugeMetricFamily(
            "streamfact_events_per_second", "Events/s over the last minute", value=v["rate"]
        )
        lag = GaugeMetricFamily(
            "streamfact_consumer_lag", "Messages behind the source head", labels=["partition"]
        )
        for partition, value in sorted(v["lag"].items()):
            lag.add_metric([str(partition)], value)
        yield lag
        yield GaugeMetricFamily(
            "streamfact_checkpoint_age_seconds",
            "Seconds since the last checkpoint",
            value=v["checkpoint_age"],
        )
        orth = GaugeMetricFamily(
            "streamfact_orthogonality_loss", "‖WᵀW − I‖₂ of the factors", labels=["side"]
        )
        orth.add_metric(["rows"], v["orthogonality"][0])
        orth.add_metric(["columns"], v["orthogonality"][1])
        yield orth
        yield GaugeMetricFamily("streamfact_rank", "Current rank of the SVD", value=v["rank"])
        yield GaugeMetricFamily(
            "streamfact_model_bytes",
            "Bytes held by the model's arrays (factors, key maps, retained matrix)",
            value=v["model_bytes"],
        )
        yield CounterMetricFamily(
            "streamfact_refinements",
            "Refinements of the SVD against the retained matrix",
            value=v["refinements"],
        )
        keys = GaugeMetricFamily("streamfact_keys", "Distinct keys", labels=["side"])
        keys.add_metric(["rows"], v["keys"][0])
        keys.add_metric(["columns"], v["keys"][1])
        yield keys
        yield GaugeMetricFamily(
            "streamfact_snapshot_version", "Published snapshot version", value=v["snapshot"]
        )


def make_registry(read: Callable[[], dict[str, Any]]) -> CollectorRegistry:
    """A private registry (not the process-global one) holding the daemon's collector."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(DaemonCollector(read))
    return registry


def render(registry: CollectorRegistry) -> bytes:
    """Prometheus text exposition format."""
    return generate_latest(registry)
