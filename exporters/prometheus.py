"""Prometheus exposition of the latest Snapshot: a custom Collector on a private registry.

The collector reads plain floats at scrape time; a scrape never touches a tensor or the GPU.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Sequence

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from exporters.catalogue import CATALOGUE, MetricSpec
from monitor.alerts import DEFAULT_RULES, AlertRule
from monitor.snapshot import Snapshot

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


class RepwatchCollector(Collector):
    """Yields every catalogue metric from ``source()``, the latest Snapshot (or None)."""

    def __init__(self, source: Callable[[], Snapshot | None],
                 rules: Sequence[AlertRule] = DEFAULT_RULES) -> None:
        self._source = source
        self._rules = tuple(rules)

    def describe(self) -> list[Metric]:
        return []  # families depend on the snapshot; no checks at registration

    def collect(self) -> Iterator[Metric]:
        snap = self._source()
        if snap is None:
            return
        for spec in CATALOGUE:
            family = self._family(spec)
            for labels, value in self._samples(spec, snap):
                if math.isfinite(value):
                    family.add_metric(labels, value)
            yield family

    @staticmethod
    def _family(spec: MetricSpec) -> GaugeMetricFamily | CounterMetricFamily:
        if spec.kind == "counter":
            return CounterMetricFamily(spec.name, spec.help, labels=list(spec.labels))
        return GaugeMetricFamily(spec.name, spec.help, labels=list(spec.labels))

    def _samples(self, spec: MetricSpec, snap: Snapshot) -> Iterator[tuple[list[str], float]]:
        if spec.source == "stream":
            for stream, values in sorted(snap.streams.items()):
                if spec.signal in values:
                    yield [snap.run, stream], float(values[spec.signal])
        elif spec.source == "counter":
            for stream, values in sorted(snap.counters.items()):
                if spec.signal in values:
                    yield [snap.run, stream], float(values[spec.signal])
        elif spec.source == "run":
            run_values = {"training_step": float(snap.step), "time": snap.time,
                          "publish_duration_seconds": snap.publish_duration_seconds}
            yield [snap.run], run_values[spec.signal]
        elif spec.source == "errors":
            for component, count in sorted(snap.errors.items()):
                yield [snap.run, component], float(count)
        elif spec.source == "alerts":
            firing = {(a.name, a.stream) for a in snap.alerts}
            for rule in self._rules:
                for stream, values in sorted(snap.streams.items()):
                    if any(sig in values for sig in rule.signals):
                        yield ([snap.run, stream, rule.name, rule.severity],
                               1.0 if (rule.name, stream) in firing else 0.0)


def make_registry(source: Callable[[], Snapshot | None],
                  rules: Sequence[AlertRule] = DEFAULT_RULES) -> CollectorRegistry:
    """A private registry holding only the repwatch collector."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(RepwatchCollector(source, rules))
    return registry


def render(registry: CollectorRegistry) -> bytes:
    """The Prometheus text exposition of ``registry``."""
    return generate_latest(registry)
