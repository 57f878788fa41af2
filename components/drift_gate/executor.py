"""DriftGate executor: TFDV's L-infinity (label distribution) and Jensen-Shannon (pixel values) comparators
between two spans' training statistics, and the policy's verdict, recorded as a DataDriftReport."""
from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

from tfx.dsl.components.base import base_executor
from tfx.types import artifact_utils

from conveyor_ml.base.errors import ConveyorError
from conveyor_ml.base.names import DRIFT_BLOCKED, IMAGE_KEY, LABEL_KEY
from conveyor_ml.base.spec import DRIFT_POLICIES, DriftSettings
from conveyor_ml.components.artifacts import set_custom_properties, span_of
from conveyor_ml.components.parameters import settings_from

STATISTICS_FILE = "Split-train/FeatureStats.pb"

log = logging.getLogger(__name__)


def verdict(policy: str, drifted: bool) -> str:
    """What the pipeline does: `blocked` stops it before training; the others let it train."""
    if not drifted:
        return "no drift"
    return {"retrain": "drift: retrain", "block": DRIFT_BLOCKED, "ignore": "drift ignored"}[policy]


def drift_figures(current_stats_dir: str, baseline_stats_dir: str, schema_file: str, label_linf: float,
                  pixel_js: float) -> dict[str, float]:
    """{'label_linf': …, 'pixel_js': …} measured by tfdv.validate_statistics with previous statistics."""
    import tensorflow_data_validation as tfdv
    from tensorflow_metadata.proto.v0 import anomalies_pb2

    schema = tfdv.load_schema_text(schema_file)
    tfdv.get_feature(schema, LABEL_KEY).drift_comparator.infinity_norm.threshold = label_linf
    tfdv.get_feature(schema, IMAGE_KEY).drift_comparator.jensen_shannon_divergence.threshold = pixel_js
    current = tfdv.load_stats_binary(str(Path(current_stats_dir) / STATISTICS_FILE))
    baseline = tfdv.load_stats_binary(str(Path(baseline_stats_dir) / STATISTICS_FILE))
    anomalies = tfdv.validate_statistics(current, schema, previous_statistics=baseline)
    figures = {}
    names = {anomalies_pb2.DriftSkewInfo.Measurement.L_INFTY: "label_linf",
             anomalies_pb2.DriftSkewInfo.Measurement.JENSEN_SHANNON_DIVERGENCE: "pixel_js"}
    for info in anomalies.drift_skew_info:
        for measurement in info.drift_measurements:
            if measurement.type in names:
                figures[names[measurement.type]] = measurement.value
    return figures


class Executor(base_executor.BaseExecutor):
    def Do(self, input_dict: dict[str, list], output_dict: dict[str, list], exec_properties: dict[str, Any]) -> None:
        settings = settings_from(DriftSettings, exec_properties)
        policy = settings.policy
        if policy not in DRIFT_POLICIES:
            raise ConveyorError(f"data.drift.policy: {policy!r} is not one of {', '.join(DRIFT_POLICIES)}")
        thresholds = {"label_linf": settings.label_linf_threshold, "pixel_js": settings.pixel_js_threshold}
        report = artifact_utils.get_single_instance(output_dict["drift_report"])
        examples = artifact_utils.get_single_instance(input_dict["examples"])
        statistics = artifact_utils.get_single_instance(input_dict["statistics"])
        baselines = input_dict.get("baseline_statistics") or []
        span = span_of(examples)
        values: dict[str, Any] = {"span": span, "policy": policy, "label_linf_threshold": thresholds["label_linf"],
                                  "pixel_js_threshold": thresholds["pixel_js"]}
        if not baselines:
            values.update(drift_detected=0, verdict="no baseline", reason="the first span: nothing to compare with")
        else:
            schema_dir = Path(artifact_utils.get_single_uri(input_dict["schema"]))
            figures = drift_figures(statistics.uri, baselines[0].uri, str(schema_dir / "schema.pbtxt"),
                                    thresholds["label_linf"], thresholds["pixel_js"])
            over = [f"{name} {figures[name]:.4f} > {limit}" for name, limit in thresholds.items()
                    if figures.get(name, 0.0) > limit]
            values.update(figures, drift_detected=int(bool(over)), verdict=verdict(policy, bool(over)), baseline_statistics_id=baselines[0].id,
                          reason="; ".join(over) or "within thresholds")
        set_custom_properties(report, values)
        Path(report.uri).mkdir(parents=True, exist_ok=True)
        (Path(report.uri) / "drift.json").write_text(json.dumps(
            values, indent=2, default=float) + "\n")
        log.info("drift vs the previous span: %s (%s)", values["verdict"], values["reason"])
