"""GcpPusher: blessed models to Cloud Storage and a Vertex AI model version, endpoint and canary split."""
from __future__ import annotations

from tfx import types
from tfx.dsl.components.base import base_component, executor_spec
from tfx.types import standard_artifacts
from tfx.types.component_spec import ComponentSpec, ExecutionParameter

from conveyor_ml.base.spec import GcpPusherSettings
from conveyor_ml.components.artifacts import Deployment
from conveyor_ml.components.gcp_pusher import executor
from conveyor_ml.components.parameters import execution_parameters, parameter_values
from conveyor_ml.components.pushing import PUSHER_INPUTS, PUSHER_OUTPUTS


class GcpPusherSpec(ComponentSpec):
    PARAMETERS = {
        "model_name": ExecutionParameter(type=str),
        "pipeline_name": ExecutionParameter(type=str),  # a label on the Vertex AI model version
        # The gcp_pusher section; `credentials` is a key file's path, never its content.
        **execution_parameters(GcpPusherSettings),
    }
    INPUTS = PUSHER_INPUTS
    OUTPUTS = PUSHER_OUTPUTS


class GcpPusher(base_component.BaseComponent):
    SPEC_CLASS = GcpPusherSpec
    EXECUTOR_SPEC = executor_spec.ExecutorClassSpec(executor.Executor)

    def __init__(self, model: types.BaseChannel, model_blessing: types.BaseChannel, *, model_name: str,
                 pipeline_name: str, settings: GcpPusherSettings, infra_blessing: types.BaseChannel | None = None,
                 quantized_models: types.BaseChannel | None = None):
        super().__init__(spec=GcpPusherSpec(
            model=model, model_blessing=model_blessing, infra_blessing=infra_blessing,
            quantized_models=quantized_models, model_name=model_name, pipeline_name=pipeline_name,
            **parameter_values(settings),
            pushed_model=types.Channel(type=standard_artifacts.PushedModel),
            deployment=types.Channel(type=Deployment)))
