"""The resolvers that decide what a run trains on, scores on and starts from, on artifacts built here."""
from __future__ import annotations

import pytest
from tfx.types import standard_artifacts

from conveyor_ml.base.errors import ConveyorError
from conveyor_ml.components.artifacts import DataDriftReport
from conveyor_ml.pipelines.resolvers import (
    GoldenSpanStrategy,
    SpanWindowStrategy,
    WarmStartModelStrategy,
    blocked_spans,
)


def examples(artifact_id: int, span: int):
    artifact = standard_artifacts.Examples()
    artifact.id = artifact_id
    artifact.set_int_custom_property("span", span)
    return artifact


def drift(artifact_id: int, span: int, verdict: str):
    report = DataDriftReport()
    report.id = artifact_id
    report.set_int_custom_property("span", span)
    report.set_string_custom_property("verdict", verdict)
    return report


def model(artifact_id: int, spans: str):
    artifact = standard_artifacts.Model()
    artifact.id = artifact_id
    artifact.set_string_custom_property("spans", spans)
    return artifact


def blessing(artifact_id: int, model_id: int, blessed: bool):
    artifact = standard_artifacts.ModelBlessing()
    artifact.id = artifact_id
    artifact.set_int_custom_property("current_model_id", model_id)
    artifact.set_int_custom_property("blessed", int(blessed))
    return artifact


def spans_of(artifacts) -> list[int]:
    return [a.get_int_custom_property("span") for a in artifacts]


# Spans 1-5 imported once each, span 2 imported twice (a re-import of the same immutable span).
HISTORY = [examples(1, 1), examples(5, 2), examples(9, 2), examples(12, 3), examples(15, 4)]


def test_the_default_window_is_every_span_with_the_newest_import_of_each():
    result = SpanWindowStrategy(window=0).resolve_artifacts(None, {"newest": [examples(20, 5)], "examples": HISTORY})
    assert spans_of(result["examples"]) == [1, 2, 3, 4, 5]
    assert [a.id for a in result["examples"]] == [1, 9, 12, 15, 20]


def test_a_rolling_window_keeps_the_latest_k_spans():
    result = SpanWindowStrategy(window=2).resolve_artifacts(None, {"newest": [examples(20, 5)], "examples": HISTORY})
    assert spans_of(result["examples"]) == [4, 5]


def test_spans_the_drift_gate_blocked_stay_out_unless_a_later_verdict_lets_them_in():
    reports = [drift(30, 3, "blocked"), drift(31, 4, "blocked"), drift(32, 4, "drift: retrain"),
               drift(33, 5, "blocked")]
    assert blocked_spans(reports) == {3, 5}
    result = SpanWindowStrategy().resolve_artifacts(
        None, {"newest": [examples(20, 5)], "examples": HISTORY, "drift_reports": reports})
    # Span 3 is out; the newest span stays in, its own verdict is the Trainer's to act on.
    assert spans_of(result["examples"]) == [1, 2, 4, 5]


def test_the_golden_span_is_the_same_artifact_whatever_the_newest_span():
    for newest in (examples(20, 5), examples(25, 6)):
        result = GoldenSpanStrategy(span=2).resolve_artifacts(None, {"newest": [newest], "examples": HISTORY})
        assert [a.id for a in result["examples"]] == [9]
    with pytest.raises(ConveyorError, match=r"golden_span: span 7 has not been imported \(imported spans: 1, 2, 3, 4, 5\)"):
        GoldenSpanStrategy(span=7).resolve_artifacts(None, {"newest": [examples(20, 5)], "examples": HISTORY})


def test_warm_start_takes_the_newest_blessed_model_trained_before_the_newest_span():
    models = [model(40, "1"), model(41, "1,2"), model(42, "1,2,3"), model(43, "1,2,3,4")]
    blessings = [blessing(50, 40, True), blessing(51, 41, True), blessing(52, 42, False), blessing(53, 43, True)]
    strategy = WarmStartModelStrategy(model_name="")
    inputs = {"model": models, "model_blessing": blessings}
    # Span 4 is new: #43 (trained on span 4 already) is what a re-run would have pushed; #42 was rejected.
    assert [m.id for m in strategy.resolve_artifacts(None, {**inputs, "newest": [examples(15, 4)]})["model"]] == [41]
    assert [m.id for m in strategy.resolve_artifacts(None, {**inputs, "newest": [examples(20, 5)]})["model"]] == [43]
    assert strategy.resolve_artifacts(None, {**inputs, "newest": [examples(1, 1)]})["model"] == []
