"""InfraValidator: serves the candidate model with `conveyor serve` and checks real requests before a push."""
from __future__ import annotations

from tfx import types
from tfx.dsl.components.base import base_component, executor_spec
from tfx.types import standard_artifacts
from tfx.types.component_spec import ChannelParameter, ComponentSpec, ExecutionParameter

from conveyor_ml.base.spec import InfraValidatorSettings
from conveyor_ml.components.infra_validator import executor
from conveyor_ml.components.parameters import execution_parameters, parameter_values


class InfraValidatorSpec(ComponentSpec):
    PARAMETERS = {
        "image_shape": ExecutionParameter(type=list[int]),  # [H, W]
        **execution_parameters(InfraValidatorSettings),
    }
    INPUTS = {
        "model": ChannelParameter(type=standard_artifacts.Model),
        "examples": ChannelParameter(type=standard_artifacts.Examples),
    }
    OUTPUTS = {
        "blessing": ChannelParameter(type=standard_artifacts.InfraBlessing),
    }


class InfraValidator(base_component.BaseComponent):
    """Blesses a model only if a real server loads it and answers REST and gRPC requests correctly."""

    SPEC_CLASS = InfraValidatorSpec
    EXECUTOR_SPEC = executor_spec.ExecutorClassSpec(executor.Executor)

    def __init__(self, model: types.BaseChannel, examples: types.BaseChannel, *, image_shape: tuple[int, int],
                 settings: InfraValidatorSettings):
        super().__init__(spec=InfraValidatorSpec(
            model=model, examples=examples, image_shape=list(image_shape), **parameter_values(settings),
            blessing=types.Channel(type=standard_artifacts.InfraBlessing)))
