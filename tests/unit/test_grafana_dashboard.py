"""The Grafana dashboard only charts series the server really exports."""
from __future__ import annotations

import json
import re

import numpy as np

from conveyor_ml.serving.metrics import ServingMetrics
from conveyor_ml.serving.model_quality import ModelQuality
from tests.conftest import ROOT

DASHBOARD = ROOT / "deploy" / "grafana" / "conveyor-dashboard.json"
PROMQL_WORDS = {"sum", "rate", "by", "histogram_quantile", "le", "version", "protocol", "model", "status", "API",
                "feature", "kind", "class", "ignoring", "group_left"}


def exported_series() -> set[str]:
    metrics = ServingMetrics(versions_loaded=lambda: {"m": 1})
    metrics.observe_request("m", 1, "predict", "rest", "OK", 0.01)
    metrics.observe_batch("m", 4, 0)
    metrics.observe_load("m", 1, 0.5)
    quality = ModelQuality(metrics)
    prediction = quality.record_predictions("m", 1, {"class_ids": np.array([3])})
    quality.feedback("m", [{"prediction_id": prediction, "labels": [3]}])
    metrics.input_anomalies.labels("m", "image", "above_max").inc()
    text = metrics.exposition().decode()
    return {line.split("{")[0].split(" ")[0] for line in text.splitlines() if line and not line.startswith("#")}


def test_every_panel_queries_exported_series():
    dashboard = json.loads(DASHBOARD.read_text())
    series = exported_series()
    assert dashboard["panels"]
    for panel in dashboard["panels"]:
        for target in panel["targets"]:
            names = set(re.findall(r"[:a-zA-Z_][:a-zA-Z0-9_]*(?=[{\[\s)]|$)", target["expr"])) - PROMQL_WORDS
            names = {n for n in names if n.startswith(("conveyor_", ":tensorflow"))}
            assert names, target["expr"]
            assert names <= series, f"{panel['title']}: {names - series} not exported"
