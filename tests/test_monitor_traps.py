"""User-reported traps of the Monitor: a classifier that does not fit a scorer's defaults, validation
passes in the training windows, observe() streams without labels or with large evaluation batches,
the last steps of a run never published."""

from __future__ import annotations

import logging
import threading

import pytest
import torch
from torch import nn

from monitor import Monitor
from monitor.scorers.neural_collapse import NeuralCollapseScorer


def _labelled_batches(n: int, b: int = 64, d_in: int = 16, classes: int = 10,
                      seed: int = 0) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(b, d_in, generator=g), torch.randint(0, classes, (b,), generator=g))
            for _ in range(n)]


# ---------------------------------------------------------------- 1: watch_classifier


def test_a_ten_class_classifier_keeps_the_encoder_stream_and_gives_nc3_nc4() -> None:
    """fc = nn.Linear(128, 10) with the default max_classes: the encoder stream used to be
    switched off (weight (1000, 128) expected); now NC3/NC4 come from the 10-class head."""
    torch.manual_seed(0)
    encoder = nn.Sequential(nn.Linear(16, 128), nn.ReLU())
    fc = nn.Linear(128, 10)
    mon = Monitor(port=None, every=2, max_rows=64, window=512)
    mon.watch(encoder, name="encoder")
    mon.watch_classifier(fc)
    snaps = []
    for x, y in _labelled_batches(6):
        fc(encoder(x))
        snap = mon.step(labels=y)
        if snap is not None:
            snaps.append(snap)
    assert len(snaps) == 3
    for snap in snaps:                         # every publish still has the stream
        assert "encoder" in snap.streams, snap.errors
        values = snap.streams["encoder"]
        assert values["effective_rank"] > 1.0
        assert 0.0 <= values["neural_collapse_nc3"] <= 4.0
        assert 0.0 <= values["neural_collapse_nc4"] <= 1.0
        assert snap.errors == {}
    mon.close()


def test_max_classes_follows_the_classifier() -> None:
    """Labels the classifier does not have (≥ out_features) are counted out of range."""
    torch.manual_seed(0)
    encoder = nn.Linear(16, 32)
    fc = nn.Linear(32, 10)
    mon = Monitor(port=None, every=1, max_rows=64, window=256)
    mon.watch(encoder, name="encoder")
    mon.watch_classifier(fc)
    x = torch.randn(64, 16)
    y = torch.randint(0, 10, (64,))
    y[:5] = 12                                 # not a class of fc
    encoder(x)
    snap = mon.step(labels=y)
    assert snap is not None
    assert snap.get("labels_out_of_range", stream="encoder") == 5.0
    assert snap.get("neural_collapse_classes", stream="encoder") <= 10.0
    mon.close()


def test_an_explicit_max_classes_still_takes_a_smaller_classifier() -> None:
    torch.manual_seed(0)
    encoder = nn.Linear(16, 32)
    fc = nn.Linear(32, 10)
    mon = Monitor(port=None, every=1, max_rows=64, window=256, max_classes=100)
    mon.watch(encoder, name="encoder")
    mon.watch_classifier(fc)
    x, y = _labelled_batches(1)[0]
    encoder(x)
    snap = mon.step(labels=y)
    assert snap is not None and snap.errors == {}
    assert 0.0 <= snap.get("neural_collapse_nc3", stream="encoder") <= 4.0
    mon.close()


def test_a_classifier_watched_after_labels_arrived_resizes_the_scorer() -> None:
    torch.manual_seed(0)
    encoder = nn.Linear(16, 32)
    fc = nn.Linear(32, 10)
    mon = Monitor(port=None, every=1, max_rows=64, window=256)
    mon.watch(encoder, name="encoder")
    x, y = _labelled_batches(1)[0]
    y = y.clone()
    y[:3] = 500                              # in range of 1000, not of the 10-class head
    encoder(x)
    mon.step(labels=y)
    mon.watch_classifier(fc)
    encoder(x)
    snap = mon.step(labels=torch.randint(0, 10, (64,)))
    assert snap is not None and snap.errors == {}
    assert "neural_collapse_nc4" in snap.streams["encoder"]
    assert snap.get("labels_out_of_range", stream="encoder") == 3.0   # the ring's 3, once
    mon.close()


def test_a_classifier_that_does_not_fit_fails_alone() -> None:
    """A head of the wrong input dimension: NC3/NC4 fail (counted once), every other signal of
    the stream stays, publish after publish."""
    torch.manual_seed(0)
    encoder = nn.Linear(16, 32)
    mon = Monitor(port=None, every=1, max_rows=64, window=256)
    mon.watch(encoder, name="encoder")
    mon.watch_classifier(nn.Linear(64, 10), stream="encoder")
    for x, y in _labelled_batches(3):
        encoder(x)
        snap = mon.step(labels=y)
        assert snap is not None and "encoder" in snap.streams
        values = snap.streams["encoder"]
        assert values["effective_rank"] > 1.0 and "qscore_p50" in values
        assert "neural_collapse_nc1" in values and "neural_collapse_nc3" not in values
    assert mon.latest is not None and mon.latest.errors == {"neural_collapse": 1}
    mon.close()


def test_nc_scorer_takes_classifiers_of_any_class_count() -> None:
    """classifier_signals: NC3/NC4 with a classifier of C' ≠ max_classes rows equal those of a
    scorer sized C' (fewer rows: the first C' classes; more rows: absent classes)."""
    g = torch.Generator().manual_seed(1)
    rows = torch.randn(200, 6, generator=g)
    labels = torch.randint(0, 4, (200,), generator=g)
    w, bias = torch.randn(4, 6, generator=g), torch.randn(4, generator=g)
    ref = NeuralCollapseScorer(6, max_classes=4, window=256)
    ref.update(rows, labels)
    want = ref.compute(w, bias)
    big = NeuralCollapseScorer(6, max_classes=50, window=256)
    big.update(rows, labels)
    with pytest.raises(ValueError, match=r"classifier weight of shape \(50, 6\)"):
        big.compute(w, bias)                     # compute() keeps its (max_classes, d) contract
    got = {**big.window_signals(), **big.classifier_signals(w, bias)}
    for key in ("neural_collapse_nc3", "neural_collapse_nc4", "neural_collapse_nc1"):
        assert float(got[key]) == pytest.approx(float(want[key]), rel=1e-12), key
    small = NeuralCollapseScorer(6, max_classes=4, window=256)
    small.update(rows, labels)
    w8 = torch.cat([w, torch.randn(4, 6, generator=g)])
    b8 = torch.cat([bias, torch.full((4,), -1e9)])          # the extra classes never win
    got8 = small.classifier_signals(w8, b8)
    assert float(got8["neural_collapse_nc4"]) == pytest.approx(
        float(want["neural_collapse_nc4"]), rel=1e-12)
    big.update(rows[:5], torch.full((5,), 7))                # a class the 4-row head lacks
    nan = big.classifier_signals(w, bias)
    assert torch.isnan(nan["neural_collapse_nc3"]) and torch.isnan(nan["neural_collapse_nc4"])


# ---------------------------------------------------------------- 2: validation passes


def _net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Dropout(0.1), nn.Linear(32, 10))


def test_validation_passes_stay_out_of_the_training_windows() -> None:
    """model.eval() + no_grad forward between training steps: its rows used to join the
    window and make step(labels=) fail on mismatched shapes."""
    model = _net()
    mon = Monitor(port=None, every=2, max_rows=64, window=1024)
    mon.watch(model[1], name="hidden")
    mon.watch_activations(model)
    for x, y in _labelled_batches(4):
        model(x)
        model.eval()
        with torch.no_grad():
            model(torch.randn(30, 16))         # validation batch: another size
        model.train()
        snap = mon.step(labels=y)
    assert snap is not None
    assert snap.errors == {}
    assert snap.get("window_samples", stream="hidden") == 4 * 64
    assert snap.get("neural_collapse_window_samples", stream="hidden") == 4 * 64
    assert snap.layers["1"]["window_samples"] == 4 * 64
    mon.close()


@pytest.mark.parametrize(("mode", "train_rows", "eval_rows"),
                         [("train", 64, 0), ("always", 64, 30), ("eval", 0, 30)])
def test_capture_modes(mode: str, train_rows: int, eval_rows: int) -> None:
    model = _net()
    mon = Monitor(port=None, every=1000, max_rows=64, window=1024, capture=mode)
    mon.watch(model[1], name="hidden")
    model(torch.randn(64, 16))
    model.eval()
    model(torch.randn(30, 16))
    snap = mon.publish()
    got = snap.streams["hidden"]["window_samples"] if "hidden" in snap.streams else 0
    assert got == train_rows + eval_rows
    mon.close()


def test_watch_takes_its_own_capture_mode() -> None:
    model = _net().eval()
    mon = Monitor(port=None, every=1000, max_rows=64, window=1024)
    mon.watch(model[1], name="hidden")
    mon.watch(model[3], name="eval_logits", capture="eval")
    model(torch.randn(30, 16))
    snap = mon.publish()
    assert "hidden" not in snap.streams
    assert snap.get("window_samples", stream="eval_logits") == 30
    mon.close()


def test_bad_capture_modes_are_refused() -> None:
    with pytest.raises(ValueError, match="capture must be one of"):
        Monitor(port=None, capture="sometimes")
    mon = Monitor(port=None)
    with pytest.raises(ValueError, match="capture must be one of"):
        mon.watch(nn.Linear(2, 2), capture="never")  # type: ignore[arg-type]
    mon.close()


def test_paused_stops_capture_nested_and_on_errors() -> None:
    model = _net()
    mon = Monitor(port=None, every=1000, max_rows=64, window=1024)
    mon.watch(model[1], name="hidden")
    with mon.paused():
        model(torch.randn(10, 16))
        with mon.paused():
            model(torch.randn(10, 16))
            mon.observe("z", torch.randn(10, 4))
        model(torch.randn(10, 16))             # still inside the outer block
    with pytest.raises(RuntimeError, match="validation failed"), mon.paused():
        raise RuntimeError("validation failed")
    model(torch.randn(7, 16))                   # captured again
    mon.observe("z", torch.randn(5, 4))
    snap = mon.publish()
    assert snap.get("window_samples", stream="hidden") == 7
    assert snap.get("window_samples", stream="z") == 5
    mon.close()


def test_paused_from_another_thread_pauses_the_monitor() -> None:
    model = _net()
    mon = Monitor(port=None, every=1000, max_rows=64, window=1024)
    mon.watch(model[1], name="hidden")
    entered, release = threading.Event(), threading.Event()

    def validate() -> None:
        with mon.paused():
            entered.set()
            release.wait(10)

    t = threading.Thread(target=validate)
    t.start()
    assert entered.wait(10)
    model(torch.randn(10, 16))                  # paused monitor-wide
    release.set()
    t.join(10)
    model(torch.randn(6, 16))
    assert mon.publish().get("window_samples", stream="hidden") == 6
    mon.close()


# ---------------------------------------------------------------- 3: observe()


def test_an_evaluation_stream_scores_all_its_rows() -> None:
    g = torch.Generator().manual_seed(2)
    mon = Monitor(port=None, every=1000, max_rows=256, window=4096)
    z = torch.relu(torch.randn(597, 32, generator=g))
    y = torch.randint(0, 5, (597,), generator=g)
    p = torch.where(torch.rand(597, generator=g) < 0.3, torch.randint(0, 5, (597,), generator=g), y)
    mon.observe("eval", z, labels=y, predictions=p)
    snap = mon.publish()
    assert snap.get("window_samples", stream="eval") == 597
    assert snap.histograms["qscore"]["eval"].count == 597
    assert mon.subsampled_rows == {}
    mon.close()


def test_observe_max_rows_option_and_subsampled_counter() -> None:
    g = torch.Generator().manual_seed(3)
    mon = Monitor(port=None, every=1000, max_rows=256, window=4096)
    mon.observe("train_like", torch.randn(600, 8, generator=g))               # default cap
    mon.observe("all", torch.randn(600, 8, generator=g), max_rows=None)       # every row
    y = torch.randint(0, 3, (600,), generator=g)
    mon.observe("eval", torch.randn(600, 8, generator=g), labels=y, predictions=y, max_rows=100)
    snap = mon.publish()
    assert snap.get("window_samples", stream="train_like") == 256
    assert snap.get("window_samples", stream="all") == 600
    assert snap.get("window_samples", stream="eval") == 100
    assert mon.subsampled_rows == {"train_like": 344, "eval": 500}
    with pytest.raises(ValueError, match="max_rows"):
        mon.observe("all", torch.randn(4, 8), max_rows=0)
    mon.close()


def test_an_evaluation_batch_over_the_window_says_so(caplog: pytest.LogCaptureFixture) -> None:
    g = torch.Generator().manual_seed(5)
    mon = Monitor(port=None, every=1000, max_rows=64, window=512)
    y = torch.randint(0, 3, (700,), generator=g)
    with caplog.at_level(logging.WARNING, logger="repwatch"):
        for _ in range(2):
            mon.observe("eval", torch.randn(700, 8, generator=g), labels=y, predictions=y)
    warnings = [r for r in caplog.records if "eval" in r.getMessage() and "512" in r.getMessage()]
    assert len(warnings) == 1                                   # logged once
    assert mon.subsampled_rows == {"eval": 2 * 188}
    assert mon.publish().get("window_samples", stream="eval") == 512
    mon.close()


def test_step_labels_name_the_observe_streams_they_do_not_label(
        caplog: pytest.LogCaptureFixture) -> None:
    g = torch.Generator().manual_seed(6)
    mon = Monitor(port=None, every=1000, max_rows=64, window=512)
    with caplog.at_level(logging.WARNING, logger="repwatch"):
        for _ in range(3):
            y = torch.randint(0, 4, (32,), generator=g)
            mon.observe("projector", torch.randn(32, 8, generator=g))
            mon.observe("labelled", torch.randn(32, 8, generator=g), labels=y)
            mon.step(labels=y)
    said = [r.getMessage() for r in caplog.records if "observe" in r.getMessage()]
    assert len(said) == 1 and "'projector'" in said[0] and "labels=" in said[0]
    snap = mon.publish()
    assert "neural_collapse_nc1" not in snap.streams["projector"]
    assert "neural_collapse_nc1" in snap.streams["labelled"]
    mon.close()


# ---------------------------------------------------------------- 4: close() publishes


def test_close_publishes_the_last_steps() -> None:
    model = _net()
    mon = Monitor(port=None, every=10, max_rows=64, window=1024)
    mon.watch(model[1], name="hidden")
    for _ in range(87):
        model(torch.randn(8, 16))
        mon.step()
    assert mon.latest is not None and mon.latest.step == 80
    mon.close()
    assert mon.latest is not None and mon.latest.step == 87 == mon.step_count
    assert mon.latest.get("window_samples", stream="hidden") == 87 * 8
    published = len(mon.history)
    mon.close()                                                  # idempotent: no more publishes
    assert len(mon.history) == published


def test_close_does_not_publish_twice_or_before_any_step() -> None:
    mon = Monitor(port=None, every=10)
    mon.close()
    assert mon.latest is None                                    # nothing counted
    mon = Monitor(port=None, every=10, max_rows=8, window=64)
    for _ in range(20):
        mon.observe("z", torch.randn(8, 4))
        mon.step()
    n = len(mon.history)
    mon.close()
    assert len(mon.history) == n and mon.latest is not None and mon.latest.step == 20


def test_the_context_manager_publishes_the_last_steps() -> None:
    with Monitor(port=None, every=10, max_rows=8, window=64) as mon:
        for _ in range(13):
            mon.observe("z", torch.randn(8, 4))
            mon.step()
    assert mon.latest is not None and mon.latest.step == 13
