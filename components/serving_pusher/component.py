"""ServingPusher: blessed models into a TF Serving base path as atomic integer versions, with release labels."""
from __future__ import annotations

from tfx import types
from tfx.dsl.components.base import base_component, executor_spec
from tfx.types import standard_artifacts
from tfx.types.component_spec import ComponentSpec

from conveyor_ml.base.spec import ServingPusherSettings
from conveyor_ml.components.artifacts import Deployment
from conveyor_ml.components.parameters import execution_parameters, parameter_values
from conveyor_ml.components.pushing import PUSHER_INPUTS, PUSHER_OUTPUTS
from conveyor_ml.components.serving_pusher import executor


class ServingPusherSpec(ComponentSpec):
    PARAMETERS = execution_parameters(ServingPusherSettings)
    INPUTS = PUSHER_INPUTS
    OUTPUTS = PUSHER_OUTPUTS


class ServingPusher(base_component.BaseComponent):
    """Pushes only what the Evaluator (and the InfraValidator, when wired) blessed; records why it skipped."""

    SPEC_CLASS = ServingPusherSpec
    EXECUTOR_SPEC = executor_spec.ExecutorClassSpec(executor.Executor)

    def __init__(self, model: types.BaseChannel, model_blessing: types.BaseChannel, *,
                 settings: ServingPusherSettings, infra_blessing: types.BaseChannel | None = None,
                 quantized_models: types.BaseChannel | None = None):
        """`settings.base_path` must be set (the builder resolves the workspace default to an absolute path)."""
        super().__init__(spec=ServingPusherSpec(
            model=model, model_blessing=model_blessing, infra_blessing=infra_blessing,
            quantized_models=quantized_models, **parameter_values(settings),
            pushed_model=types.Channel(type=standard_artifacts.PushedModel),
            deployment=types.Channel(type=Deployment)))
