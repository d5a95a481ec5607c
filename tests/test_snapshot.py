"""Signal keys (monitor/snapshot.py): typed name + labels, the plain string form everywhere else."""

from __future__ import annotations

import copy
import json
import math
import pickle

import pytest

from monitor.alerts import AlertEngine, AlertRule, Condition
from monitor.snapshot import SignalKey, Snapshot


def test_of_and_parse_round_trip() -> None:
    key = SignalKey.of("dormant_units_ratio", tau=0.1)
    assert key == "dormant_units_ratio{tau=0.1}"
    assert (key.signal, key.labels) == ("dormant_units_ratio", (("tau", "0.1"),))
    back = SignalKey.parse(str(key))
    assert type(back) is SignalKey and back == key
    assert (back.signal, back.labels) == (key.signal, key.labels)
    assert SignalKey.parse(key) is key
    plain = SignalKey.parse("effective_rank")
    assert (plain, plain.signal, plain.labels) == ("effective_rank", "effective_rank", ())
    assert SignalKey.of("effective_rank") == "effective_rank"
    assert [SignalKey.of("d", tau=t) for t in (0.0, 0.025, 1e-5, 2)] == [
        "d{tau=0}", "d{tau=0.025}", "d{tau=1e-05}", "d{tau=2}"]


def test_equal_and_hashed_like_the_plain_string() -> None:
    key = SignalKey.of("earlybird_mask_distance", sparsity=0.5)
    text = "earlybird_mask_distance{sparsity=0.5}"
    assert key == text and text == key and hash(key) == hash(text)
    assert {text: 1.0}[key] == 1.0 and {key: 2.0}[text] == 2.0
    assert key in {text} and text in {key}
    assert repr(key) == repr(text) and f"{key}" == text and type(str(key)) is str
    assert sorted([key, "a", "z"]) == ["a", text, "z"]


def test_labels_are_sorted_by_name() -> None:
    key = SignalKey.of("x", b=1, a=0.5)
    assert key == "x{a=0.5,b=1}" and key.labels == (("a", "0.5"), ("b", "1"))
    assert key.label_dict == {"a": "0.5", "b": "1"}
    assert SignalKey.parse("x{b=1,a=0.5}") == key
    assert SignalKey.parse("x{a=0.5}").with_labels(b=1) == key
    assert key.renamed("y") == "y{a=0.5,b=1}"
    with pytest.raises(ValueError, match="twice"):
        SignalKey.parse("x{a=1,a=2}")
    with pytest.raises(ValueError, match="not a signal key"):
        SignalKey.parse("x{tau}")


def test_json_pickle_and_copies_keep_the_string_form() -> None:
    key = SignalKey.of("dormant_units_ratio", tau=0.1)
    assert json.dumps({key: 0.5, "k": [key]}) == \
        '{"dormant_units_ratio{tau=0.1}": 0.5, "k": ["dormant_units_ratio{tau=0.1}"]}'
    for other in (pickle.loads(pickle.dumps(key)), copy.deepcopy(key), copy.copy(key)):
        assert type(other) is SignalKey and other == key and other.labels == key.labels
    typed = Snapshot(run="r", step=1, time=0.0, layers={"fc1": {key: 0.5, "effective_rank": math.nan}})
    plain = Snapshot(run="r", step=1, time=0.0, layers={"fc1": {str(key): 0.5, "effective_rank": math.nan}})
    assert json.dumps(typed.to_dict()) == json.dumps(plain.to_dict())
    assert plain.get("dormant_units_ratio", layer="fc1", tau=0.1) == 0.5
    assert typed.get("dormant_units_ratio{tau=0.1}", layer="fc1") == 0.5


def test_rule_specs_are_parsed_and_alerts_keep_plain_strings() -> None:
    cond = Condition("dormant_units_ratio{tau=0.1}", ">", 0.3, clear=0.2)
    assert cond.signal.signal == "dormant_units_ratio" and cond.signal.label_dict == {"tau": "0.1"}
    rule = AlertRule("RepwatchX", "warning", "s", "{signal}", (cond,), hold=1,
                     min_window_samples=0, scope="layer")
    engine = AlertEngine([rule], run="r")
    firing, _, _ = engine.evaluate({"layer": {"fc1": {"dormant_units_ratio{tau=0.1}": 0.5}}}, 0)
    assert [a.signal for a in firing] == ["dormant_units_ratio{tau=0.1}"]
    assert type(firing[0].signal) is str      # checkpoints hold plain data (weights_only loads)
