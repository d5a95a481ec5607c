"""Shipping repwatch results out: Prometheus exposition, alert rules, Grafana dashboards and
Kubernetes manifests.

Importable without torch: everything here reads plain-float Snapshots.
"""

from exporters.catalogue import CATALOGUE, MetricSpec
from exporters.prometheus import RepwatchCollector, make_registry, render

__all__ = ["CATALOGUE", "MetricSpec", "RepwatchCollector", "make_registry", "render"]
