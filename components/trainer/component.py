"""Conveyor's Trainer: the standard Trainer's inputs and outputs, with distribution and export built in."""
from __future__ import annotations

from tfx import types
from tfx.dsl.components.base import base_component, executor_spec
from tfx.types import standard_artifacts
from tfx.types.component_spec import ChannelParameter, ComponentSpec, ExecutionParameter

from conveyor_ml.base.spec import TrainerSettings
from conveyor_ml.components.artifacts import DataDriftReport
from conveyor_ml.components.parameters import execution_parameters, parameter_values
from conveyor_ml.components.trainer import executor
from conveyor_ml.components.trainer.parameters import PARAMETER_NAMES


class TrainerSpec(ComponentSpec):
    PARAMETERS = {
        "image_shape": ExecutionParameter(type=list[int]),  # [H, W]
        **execution_parameters(TrainerSettings, PARAMETER_NAMES),
    }
    INPUTS = {
        "examples": ChannelParameter(type=standard_artifacts.Examples),
        "schema": ChannelParameter(type=standard_artifacts.Schema),
        "base_model": ChannelParameter(type=standard_artifacts.Model, optional=True),
        "example_anomalies": ChannelParameter(type=standard_artifacts.ExampleAnomalies, optional=True),
        "drift_report": ChannelParameter(type=DataDriftReport, optional=True),
    }
    OUTPUTS = {
        "model": ChannelParameter(type=standard_artifacts.Model),
        "model_run": ChannelParameter(type=standard_artifacts.ModelRun),
    }


class Trainer(base_component.BaseComponent):
    """Trains the digit CNN under a tf.distribute strategy and exports a SavedModel with three signatures.

    Refuses to train on data ExampleValidator flagged (when `example_anomalies` is wired).
    """

    SPEC_CLASS = TrainerSpec
    EXECUTOR_SPEC = executor_spec.ExecutorClassSpec(executor.Executor)

    def __init__(self, examples: types.BaseChannel, schema: types.BaseChannel, *, image_shape: tuple[int, int],
                 settings: TrainerSettings, base_model: types.BaseChannel | None = None,
                 example_anomalies: types.BaseChannel | None = None,
                 drift_report: types.BaseChannel | None = None):
        super().__init__(spec=TrainerSpec(
            examples=examples, schema=schema, base_model=base_model, example_anomalies=example_anomalies,
            drift_report=drift_report, image_shape=list(image_shape), **parameter_values(settings, PARAMETER_NAMES),
            model=types.Channel(type=standard_artifacts.Model),
            model_run=types.Channel(type=standard_artifacts.ModelRun)))
