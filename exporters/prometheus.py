"""Prometheus exposition of Snapshots: a custom Collector on a private registry.

The collector reads plain floats at scrape time; a scrape never touches a tensor or the GPU.
:class:`BuildInfoCollector` adds ``repwatch_build_info`` (the repwatch, Python and torch
versions) without importing torch.
"""

from __future__ import annotations

import importlib.metadata
import math
import platform
import sys
from collections.abc import Callable, Iterator, Sequence

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    InfoMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector

from exporters.catalogue import CATALOGUE, KEYED_SOURCES, MetricSpec
from monitor.alerts import DEFAULT_RULES, AlertRule
from monitor.snapshot import SignalKey, Snapshot

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

_Family = GaugeMetricFamily | CounterMetricFamily | HistogramMetricFamily


class RepwatchCollector(Collector):
    """Yields every catalogue metric of ``snapshots()``, the latest Snapshot of each run (one
    in process, every run in the sidecar): one family per metric, samples of every run."""

    def __init__(self, snapshots: Callable[[], Sequence[Snapshot]],
                 rules: Sequence[AlertRule] = DEFAULT_RULES) -> None:
        self._snapshots = snapshots
        self._rules = tuple(rules)

    def describe(self) -> list[Metric]:
        return []  # families depend on the snapshots; no checks at registration

    def collect(self) -> Iterator[Metric]:
        snaps = list(self._snapshots())
        if not snaps:
            return
        for spec in CATALOGUE:
            if spec.source == "sidecar":
                continue            # the sidecar service's own collector exports these
            if spec.source == "dropped" and not any(s.dropped for s in snaps):
                continue            # only a trainer with a sink has these
            family = self._family(spec)
            for snap in snaps:
                first = len(family.samples)
                self._add(family, spec, snap)
                if snap.rank is not None:   # Monitor(per_rank=True): its samples get a rank label
                    for sample in family.samples[first:]:
                        sample.labels["rank"] = str(snap.rank)
            if family.samples or spec.kind != "histogram":
                yield family

    def _add(self, family: _Family, spec: MetricSpec, snap: Snapshot) -> None:
        if isinstance(family, HistogramMetricFamily):
            for stream, hist in sorted(snap.histograms.get(spec.signal, {}).items()):
                buckets = [(_le(b), c) for b, c in zip(hist.bounds, hist.cumulative, strict=False)]
                if not buckets or buckets[-1][0] != "+Inf":
                    buckets.append(("+Inf", hist.count))
                family.add_metric([snap.run, stream], buckets, hist.sum)
            return
        for labels, value in self._samples(spec, snap):
            if math.isfinite(value):
                family.add_metric(labels, value)

    @staticmethod
    def _family(spec: MetricSpec) -> _Family:
        cls = {"counter": CounterMetricFamily, "histogram": HistogramMetricFamily}.get(
            spec.kind, GaugeMetricFamily)
        return cls(spec.name, spec.help, labels=list(spec.labels))

    def _samples(self, spec: MetricSpec, snap: Snapshot) -> Iterator[tuple[list[str], float]]:
        if spec.source in KEYED_SOURCES:
            variants = spec.labels[2:]
            for key, values in sorted(snap.group(spec.source).items()):
                for signal_key, value in values.items():
                    sk = SignalKey.parse(signal_key)
                    if sk.signal == spec.signal and _has_labels(sk, variants):
                        labels = sk.label_dict
                        yield [snap.run, key, *(labels[v] for v in variants)], float(value)
        elif spec.source == "run_signal":
            variants = spec.labels[1:]
            for signal_key, value in sorted(snap.run_signals.items()):
                sk = SignalKey.parse(signal_key)
                if sk.signal == spec.signal and _has_labels(sk, variants):
                    labels = sk.label_dict
                    yield [snap.run, *(labels[v] for v in variants)], float(value)
        elif spec.source == "counter":
            for stream, values in sorted(snap.counters.items()):
                if spec.signal in values:
                    yield [snap.run, stream], float(values[spec.signal])
        elif spec.source == "run":
            run_values = {"training_step": float(snap.step), "time": snap.time,
                          "publish_duration_seconds": snap.publish_duration_seconds,
                          "overhead_ratio": snap.overhead_ratio,
                          "effective_cadence_steps": snap.effective_cadence_steps}
            yield [snap.run], run_values[spec.signal]
        elif spec.source == "dropped":
            for reason, count in sorted(snap.dropped.items()):
                yield [snap.run, reason], float(count)
        elif spec.source == "errors":
            for component, count in sorted(snap.errors.items()):
                yield [snap.run, component], float(count)
        elif spec.source == "alerts":
            firing = {(a.name, a.stream) for a in snap.alerts}
            for rule in self._rules:
                for key, values in sorted(snap.group(rule.scope).items()):
                    if any(sig in values for sig in rule.signals):
                        yield ([snap.run, key, rule.name, rule.severity],
                               1.0 if (rule.name, key) in firing else 0.0)


def _has_labels(key: SignalKey, names: Sequence[str]) -> bool:
    """Whether ``key``'s labels are exactly ``names`` (in any order)."""
    return {k for k, _ in key.labels} == set(names)


def _le(bound: float) -> str:
    return "+Inf" if math.isinf(bound) else repr(float(bound))


def torch_version() -> str:
    """The installed torch's version, read without importing torch (the sidecar runs without
    it): ``torch.__version__`` when torch is imported already, else the distribution's metadata;
    ``""`` when torch is not installed."""
    torch = sys.modules.get("torch")
    if torch is not None and isinstance(getattr(torch, "__version__", None), str):
        return str(torch.__version__)
    try:
        return importlib.metadata.version("torch")
    except importlib.metadata.PackageNotFoundError:
        return ""


class BuildInfoCollector(Collector):
    """``repwatch_build_info{version, python, torch} 1`` (an OpenMetrics info metric; ``torch``
    is ``""`` where torch is not installed). The versions are read once, when it is made."""

    def __init__(self, version: str | None = None) -> None:
        if version is None:
            from monitor._version import __version__ as version
        self.labels = {"version": str(version), "python": platform.python_version(),
                       "torch": torch_version()}

    def describe(self) -> list[Metric]:
        return list(self.collect())

    def collect(self) -> Iterator[Metric]:
        yield InfoMetricFamily("repwatch_build", "repwatch, Python and torch versions of this "
                               "process (torch empty: not installed)", value=self.labels)


def make_registry(snapshots: Callable[[], Sequence[Snapshot]],
                  rules: Sequence[AlertRule] = DEFAULT_RULES) -> CollectorRegistry:
    """A private registry holding the repwatch collector over ``snapshots()``."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(RepwatchCollector(snapshots, rules))
    return registry


def render(registry: CollectorRegistry) -> bytes:
    """The Prometheus text exposition of ``registry``."""
    return generate_latest(registry)
