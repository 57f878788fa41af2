"""InfraValidator: serves the candidate model with `conveyor serve` and checks real requests before a push."""
from __future__ import annotations

import json

from conveyor_ml.components.infra_validator import executor
from tfx import types
from tfx.dsl.components.base import base_component, executor_spec
from tfx.types import standard_artifacts
from tfx.types.component_spec import ChannelParameter, ComponentSpec, ExecutionParameter


class InfraValidatorSpec(ComponentSpec):
    PARAMETERS = {
        "image_shape": ExecutionParameter(type=str),  # JSON [H, W]
        "num_examples": ExecutionParameter(type=int),
        "timeout_seconds": ExecutionParameter(type=float),
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
                 num_examples: int = 10, timeout_seconds: float = 120.0):
        super().__init__(spec=InfraValidatorSpec(
            model=model, examples=examples, image_shape=json.dumps(list(image_shape)),
            num_examples=num_examples, timeout_seconds=timeout_seconds,
            blessing=types.Channel(type=standard_artifacts.InfraBlessing)))
