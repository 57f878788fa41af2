"""DriftGate: the newest span's statistics against the previous span's, with TFDV's drift comparators."""
from __future__ import annotations

from tfx import types
from tfx.dsl.components.base import base_component, executor_spec
from tfx.types import standard_artifacts
from tfx.types.component_spec import ChannelParameter, ComponentSpec

from conveyor_ml.base.spec import DriftSettings
from conveyor_ml.components.artifacts import DataDriftReport
from conveyor_ml.components.drift_gate import executor
from conveyor_ml.components.parameters import execution_parameters, parameter_values


class DriftGateSpec(ComponentSpec):
    PARAMETERS = execution_parameters(DriftSettings)
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
                 settings: DriftSettings, baseline_statistics: types.BaseChannel | None = None):
        super().__init__(spec=DriftGateSpec(
            examples=examples, statistics=statistics, baseline_statistics=baseline_statistics, schema=schema,
            **parameter_values(settings), drift_report=types.Channel(type=DataDriftReport)))
