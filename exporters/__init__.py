"""Shipping repwatch results out: Prometheus exposition, (later) rules and dashboards.

Importable without torch: everything here reads plain-float Snapshots.
"""

from exporters.catalogue import CATALOGUE, MetricSpec
from exporters.prometheus import RepwatchCollector, make_registry, render

__all__ = ["CATALOGUE", "MetricSpec", "RepwatchCollector", "make_registry", "render"]
