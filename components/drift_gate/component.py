"""DriftGate: the newest span's statistics against the previous span's, with TFDV's drift comparators."""
from __future__ import annotations

from conveyor_ml.components.artifacts import DataDriftReport
from conveyor_ml.components.drift_gate import executor
from tfx import types
from tfx.dsl.components.base import base_component, executor_spec
from tfx.types import standard_artifacts
from tfx.types.component_spec import ChannelParameter, ComponentSpec, ExecutionParameter


class DriftGateSpec(ComponentSpec):
    PARAMETERS = {
        "policy": ExecutionParameter(type=str),  # retrain | block | ignore
        "label_linf_threshold": ExecutionParameter(type=float),
        "pixel_js_threshold": ExecutionParameter(type=float),
    }
    INPUTS = {
        "examples": ChannelParameter(type=standard_artifacts.Examples),
        "statistics": ChannelParameter(type=standard_artifacts.ExampleStatistics),
        "baseline_statistics": ChannelParameter(type=standard_artifacts.ExampleStatistics, optional=True),
        "schema": ChannelParameter(type=standard_artifacts.Schema),
    }
    OUTPUTS = {"drift_report": ChannelParameter(type=DataDriftReport)}


class DriftGate(base_component.BaseComponent):
    SPEC_CLASS = DriftGateSpec
    EXECUTOR_SPEC = executor_spec.ExecutorClassSpec(executor.Executor)

    def __init__(self, examples: types.BaseChannel, statistics: types.BaseChannel, schema: types.BaseChannel, *,
                 baseline_statistics: types.BaseChannel | None = None, policy: str = "retrain",
                 label_linf_threshold: float = 0.1, pixel_js_threshold: float = 0.1):
        super().__init__(spec=DriftGateSpec(
            examples=examples, statistics=statistics, baseline_statistics=baseline_statistics, schema=schema,
            policy=policy, label_linf_threshold=label_linf_threshold, pixel_js_threshold=pixel_js_threshold,
            drift_report=types.Channel(type=DataDriftReport)))
