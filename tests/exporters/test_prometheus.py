"""Prometheus exposition: catalogue conventions, collector output, promtool, torch-free import."""

from __future__ import annotations

import dataclasses
import math
import re
import subprocess
import sys

import pytest
from prometheus_client.parser import text_string_to_metric_families

from exporters.catalogue import CATALOGUE
from exporters.prometheus import make_registry, render
from monitor.snapshot import Alert, Histogram, SignalKey, Snapshot


def _snapshot() -> Snapshot:
    alert = Alert(name="RepwatchRepresentationCollapse", stream="proj", severity="critical",
                  value=0.01, signal="embedding_std_ratio", summary="s", description="d",
                  runbook_url="docs/runbooks.md#x", run="r")
    return Snapshot(run="r", step=120, time=1_700_000_000.0,
                    streams={"proj": {"effective_rank": 1.2, "embedding_std_ratio": 0.01,
                                      "effective_rank_ratio": 0.02, "window_samples": 512.0,
                                      "spectrum_alpha": math.nan},
                             "enc": {"effective_rank": 40.0, "embedding_std_ratio": 0.9,
                                     "effective_rank_ratio": 0.6, "window_samples": 512.0}},
                    counters={"proj": {"samples": 1024.0, "nonfinite_values": 3.0}},
                    layers={"fc1": {SignalKey.of("dormant_units_ratio", tau=0.0): 0.25,
                                    SignalKey.of("dormant_units_ratio", tau=0.1): 0.5,
                                    "effective_rank": 7.5, "window_samples": 512.0}},
                    params={"fc1.weight": {"weight_norm": 3.0, "grad_norm": math.nan}},
                    run_signals={SignalKey.of("earlybird_mask_distance", sparsity=0.5): 0.05},
                    histograms={"qscore": {"proj": Histogram([0.1, 1.0, math.inf],
                                                             [2.0, 5.0, 6.0], 4.5, 6.0)}},
                    alerts=[alert], errors={"capture": 2}, publish_duration_seconds=0.004)


def test_catalogue_conventions() -> None:
    names = [m.name for m in CATALOGUE]
    assert len(names) == len(set(names))
    for m in CATALOGUE:
        assert re.fullmatch(r"repwatch_[a-z0-9_]+", m.name)
        assert m.help and m.signal
        assert (m.kind == "counter") == m.name.endswith("_total")
        assert set(m.labels) <= {"run", "stream", "layer", "param", "tau", "sparsity",
                                 "component", "alertname", "severity", "reason"}


def test_collector_values_and_nan_skipped() -> None:
    text = render(make_registry(lambda: [_snapshot()])).decode()
    fams = {f.name: f for f in text_string_to_metric_families(text)}
    rank = {s.labels["stream"]: s.value for s in fams["repwatch_effective_rank"].samples}
    assert rank == {"proj": 1.2, "enc": 40.0}
    assert fams["repwatch_spectrum_alpha"].samples == []  # NaN is not exported
    samples = [s for s in fams["repwatch_samples"].samples if s.name == "repwatch_samples_total"]
    assert samples[0].value == 1024.0 and fams["repwatch_samples"].type == "counter"
    firing = {(s.labels["stream"], s.labels["alertname"]): s.value
              for s in fams["repwatch_alerts_firing"].samples}
    assert firing[("proj", "RepwatchRepresentationCollapse")] == 1.0
    assert firing[("enc", "RepwatchRepresentationCollapse")] == 0.0
    errors = [s for s in fams["repwatch_errors"].samples if s.name.endswith("_total")]
    assert errors[0].labels == {"run": "r", "component": "capture"} and errors[0].value == 2
    step = fams["repwatch_training_step"].samples[0]
    assert step.value == 120 and step.labels == {"run": "r"}


def test_layer_param_run_signals_and_histogram() -> None:
    text = render(make_registry(lambda: [_snapshot()])).decode()
    fams = {f.name: f for f in text_string_to_metric_families(text)}
    dormant = {s.labels["tau"]: s.value for s in fams["repwatch_dormant_units_ratio"].samples}
    assert dormant == {"0": 0.25, "0.1": 0.5}
    assert fams["repwatch_dormant_units_ratio"].samples[0].labels["layer"] == "fc1"
    act = fams["repwatch_activation_effective_rank"].samples
    assert [(s.labels, s.value) for s in act] == [({"run": "r", "layer": "fc1"}, 7.5)]
    assert {s.labels["stream"] for s in fams["repwatch_effective_rank"].samples} == {"proj", "enc"}
    assert fams["repwatch_weight_norm"].samples[0].labels == {"run": "r", "param": "fc1.weight"}
    assert fams["repwatch_grad_norm"].samples == []
    eb = fams["repwatch_earlybird_mask_distance"].samples[0]
    assert eb.labels == {"run": "r", "sparsity": "0.5"} and eb.value == 0.05
    q = fams["repwatch_qscore"]
    assert q.type == "histogram"
    buckets = {s.labels["le"]: s.value for s in q.samples if s.name == "repwatch_qscore_bucket"}
    assert buckets == {"0.1": 2.0, "1.0": 5.0, "+Inf": 6.0}
    assert [s.value for s in q.samples if s.name == "repwatch_qscore_count"] == [6.0]


def test_no_snapshot_exports_nothing() -> None:
    assert render(make_registry(list)) == b""


def test_runs_share_one_family_per_metric() -> None:
    """Snapshots of several runs: one family per metric holding every run's samples; a
    per-rank snapshot's samples (only those) carry its rank."""
    other = dataclasses.replace(_snapshot(), run="r2", dropped={"overload": 4.0}, rank=1)
    text = render(make_registry(lambda: [_snapshot(), other])).decode()
    helps = [line for line in text.splitlines() if line.startswith("# HELP")]
    assert len(helps) == len(set(helps))
    fams = {f.name: f for f in text_string_to_metric_families(text)}
    rank = {(s.labels["run"], s.labels["stream"], s.labels.get("rank")): s.value
            for s in fams["repwatch_effective_rank"].samples}
    assert rank == {("r", "proj", None): 1.2, ("r", "enc", None): 40.0,
                    ("r2", "proj", "1"): 1.2, ("r2", "enc", "1"): 40.0}
    assert {s.labels["run"] for s in fams["repwatch_qscore"].samples} == {"r", "r2"}
    dropped = [(s.labels, s.value) for s in fams["repwatch_dropped_samples"].samples
               if s.name.endswith("_total")]
    assert dropped == [({"run": "r2", "reason": "overload", "rank": "1"}, 4.0)]


@pytest.mark.e2e
def test_promtool_check_metrics(promtool: str) -> None:
    text = render(make_registry(lambda: [_snapshot()]))
    proc = subprocess.run([promtool, "check", "metrics"], input=text, capture_output=True,
                          timeout=60)
    assert proc.returncode == 0, proc.stdout.decode() + proc.stderr.decode()


@pytest.mark.e2e
def test_exporters_import_without_torch() -> None:
    code = ("import sys, exporters, exporters.prometheus, monitor.snapshot, monitor.alerts; "
            "assert 'torch' not in sys.modules, 'torch was imported'")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
