"""The arithmetic behind `conveyor monitor` and the server's feedback accounting, on known inputs."""
from __future__ import annotations

import numpy as np
import pytest

from conveyor_ml.operations.monitor import _quantile, prediction_drift, traffic_figures
from conveyor_ml.serving.errors import ServingError
from conveyor_ml.serving.metrics import ServingMetrics
from conveyor_ml.serving.model_quality import ModelQuality
from tests.conftest import ROOT


def test_histogram_quantiles_interpolate_like_prometheus():
    buckets = [(0.001, 10.0), (0.002, 60.0), (0.005, 100.0), (float("inf"), 100.0)]
    assert _quantile(buckets, 0.5) == pytest.approx(0.001 + 0.001 * (40 / 50))
    assert _quantile(buckets, 0.99) == pytest.approx(0.002 + 0.003 * (39 / 40))
    assert _quantile([], 0.5) is None


def test_traffic_figures_from_two_scrapes():
    labels = (("api", "predict"), ("model", "m"), ("protocol", "rest"), ("version", "2"))
    before = {("conveyor_requests_total", labels + (("status", "OK"),)): 10.0}
    after = {("conveyor_requests_total", labels + (("status", "OK"),)): 40.0,
             ("conveyor_requests_total", labels + (("status", "INVALID_ARGUMENT"),)): 10.0}
    figures = traffic_figures(before, after, 2.0, "m")
    [row] = figures["versions"]
    assert row.qps == 20.0 and row.error_rate == 0.25


def test_prediction_drift_flags_a_skewed_stream_only():
    uniform = [0.1] * 10
    assert prediction_drift([10] * 10, uniform, 0.15)["status"] == "ok"
    skewed = prediction_drift([90] + [1] * 9, uniform, 0.15)
    assert skewed["status"] == "DRIFT" and skewed["linf"] == pytest.approx(90 / 99 - 0.1, abs=1e-3)
    assert prediction_drift([0] * 10, uniform, 0.15)["status"] == "no predictions yet"
    assert prediction_drift([9] + [0] * 9, uniform, 0.15)["status"] == "too few predictions (9 < 50)"


def test_feedback_accuracy_on_a_known_sequence():
    quality = ModelQuality(ServingMetrics())
    ids = [quality.record_predictions("m", 3, {"class_ids": np.array([c])}) for c in (1, 2, 3, 4)]
    result = quality.feedback("m", [{"prediction_id": i, "labels": [label]} for i, label in zip(ids, (1, 2, 0, 0))])
    assert result == {"accepted": 4, "unknown_prediction_ids": [], "live_accuracy": {"3": 0.5}}
    assert quality.snapshot("m")["3"]["class_histogram"][1:5] == [1, 1, 1, 1]
    with pytest.raises(ServingError):
        quality.feedback("m", [{"prediction_id": ids[0], "labels": "one"}])


def test_a_prediction_id_is_usable_once():
    """Replaying feedback cannot skew live accuracy: a used id is unknown the second time."""
    quality = ModelQuality(ServingMetrics())
    right, wrong = (quality.record_predictions("m", 1, {"class_ids": np.array([c])}) for c in (4, 5))
    assert quality.feedback("m", [{"prediction_id": right, "labels": [4]},
                                  {"prediction_id": wrong, "labels": [4]}])["live_accuracy"] == {"1": 0.5}
    replay = quality.feedback("m", [{"prediction_id": right, "labels": [4]}] * 3)
    assert replay == {"accepted": 0, "unknown_prediction_ids": [right] * 3, "live_accuracy": {}}
    assert quality.accuracy("m", 1) == 0.5
    # A refused entry (wrong label count) does not use its id up.
    third = quality.record_predictions("m", 1, {"class_ids": np.array([7])})
    with pytest.raises(ServingError, match="2 labels for 1 predicted"):
        quality.feedback("m", [{"prediction_id": third, "labels": [7, 7]}])
    assert quality.feedback("m", [{"prediction_id": third, "labels": [7]}])["accepted"] == 1


def test_schema_rules_use_the_serving_environment(tmp_path):
    from conveyor_ml.serving.model_quality import rules_from_schema

    rules = rules_from_schema(ROOT / "schemas" / "mnist" / "schema.pbtxt")
    assert [r.feature for r in rules.features] == ["image"]  # the label is not in SERVING
    assert rules.num_classes == 10  # from the label's int domain 0..9
    assert rules.rule_for("images", inputs=1).feature == "image"  # the one serving feature, by elimination
    assert rules.rule_for("images", inputs=2) is None and rules.rule_for("image", inputs=2).feature == "image"


def test_input_checks_count_per_feature_and_skip_empty_batches():
    metrics = ServingMetrics()
    quality = ModelQuality(metrics, schema_file=str(ROOT / "schemas" / "mnist" / "schema.pbtxt"))
    quality.check_inputs("m", {"images": np.zeros((0, 8, 8), np.float32)})  # nothing to check, no error
    quality.check_inputs("m", {"images": np.full((2, 8, 8), 300.0, np.float32)})
    quality.check_inputs("m", {"images": np.zeros((1, 6, 6), np.float32)})
    exposition = metrics.exposition().decode()
    assert 'conveyor_input_anomalies_total{feature="image",kind="above_max",model="m"} 1.0' in exposition
    assert 'conveyor_input_anomalies_total{feature="image",kind="shape",model="m"} 1.0' in exposition
    assert quality.empty_version()["class_histogram"] == [0] * 10


def test_prediction_ids_are_128_random_bits_and_never_repeat():
    quality = ModelQuality(ServingMetrics())
    # 1,000 ids span several refills of the random bytes they are cut from (256 ids per refill).
    ids = [quality.record_predictions("m", 1, {"class_ids": np.array([i % 10])}) for i in range(1000)]
    assert len(set(ids)) == 1000
    assert all(len(i) == 32 and int(i, 16) >= 0 for i in ids)
    # Two servers (or a restarted one) draw different ids: they come from the OS's random source.
    other = ModelQuality(ServingMetrics())
    assert other.record_predictions("m", 1, {"class_ids": np.array([1])}) not in ids


def test_class_counts_of_one_row_and_of_many_rows():
    metrics = ServingMetrics()
    quality = ModelQuality(metrics)
    quality.record_predictions("m", 1, {"class_ids": np.array([3])})
    quality.record_predictions("m", 1, {"class_ids": np.array([3, 3, 5])})
    text = metrics.exposition().decode()
    assert 'conveyor_predicted_class_total{class="3",model="m",version="1"} 3.0' in text
    assert 'conveyor_predicted_class_total{class="5",model="m",version="1"} 1.0' in text


def test_a_refused_feedback_request_uses_no_id_up():
    """Checked whole before anything is applied: an entry after a good one that has too many labels refuses
    the request, and the good one is still there for the corrected retry."""
    quality = ModelQuality(ServingMetrics())
    good, bad = (quality.record_predictions("m", 1, {"class_ids": np.array([c])}) for c in (1, 2))
    with pytest.raises(ServingError, match="2 labels for 1 predicted instances"):
        quality.feedback("m", [{"prediction_id": good, "labels": [1]}, {"prediction_id": bad, "labels": [1, 2]}])
    assert quality.accuracy("m", 1) is None
    retry = quality.feedback("m", [{"prediction_id": good, "labels": [1]}, {"prediction_id": bad, "labels": [1]}])
    assert retry == {"accepted": 2, "unknown_prediction_ids": [], "live_accuracy": {"1": 0.5}}
    twice = quality.record_predictions("m", 1, {"class_ids": np.array([3])})
    assert quality.feedback("m", [{"prediction_id": twice, "labels": [3]}] * 2)["unknown_prediction_ids"] == [twice]
    with pytest.raises(ServingError, match="must be a list of integers"):
        quality.feedback("m", [{"prediction_id": twice, "labels": [True]}])


def test_the_prediction_log_is_bounded_in_rows_as_well_as_requests():
    quality = ModelQuality(ServingMetrics(), remembered_predictions=100, remembered_rows=2500)
    ids = [quality.record_predictions("m", 1, {"class_ids": np.zeros(1000, np.int64)}) for _ in range(4)]
    forgotten = quality.feedback("m", [{"prediction_id": ids[0], "labels": [0] * 1000}])
    assert forgotten["unknown_prediction_ids"] == [ids[0]]  # 4,000 rows logged: the oldest two went
    kept = quality.feedback("m", [{"prediction_id": i, "labels": [0] * 1000} for i in ids[2:]])
    assert kept["accepted"] == 2000 and kept["unknown_prediction_ids"] == []
