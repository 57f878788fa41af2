"""Quantizer: TFLite float32 / float16 / dynamic-range / int8 variants, each measured and blessed or not."""
from __future__ import annotations

from tfx import types
from tfx.dsl.components.base import base_component, executor_spec
from tfx.types import standard_artifacts
from tfx.types.component_spec import ChannelParameter, ComponentSpec, ExecutionParameter

from conveyor_ml.base.spec import QuantizerSettings
from conveyor_ml.components.artifacts import QuantizationReport, QuantizedModel
from conveyor_ml.components.parameters import execution_parameters, parameter_values
from conveyor_ml.components.quantizer import executor


class QuantizerSpec(ComponentSpec):
    PARAMETERS = {
        "image_shape": ExecutionParameter(type=list[int]),  # [H, W]
        **execution_parameters(QuantizerSettings),
    }
    INPUTS = {
        "model": ChannelParameter(type=standard_artifacts.Model),
        "examples": ChannelParameter(type=standard_artifacts.Examples),
        "model_blessing": ChannelParameter(type=standard_artifacts.ModelBlessing),
    }
    OUTPUTS = {
        "quantized_models": ChannelParameter(type=QuantizedModel),
        "report": ChannelParameter(type=QuantizationReport),
    }


class Quantizer(base_component.BaseComponent):
    SPEC_CLASS = QuantizerSpec
    EXECUTOR_SPEC = executor_spec.ExecutorClassSpec(executor.Executor)

    def __init__(self, model: types.BaseChannel, examples: types.BaseChannel, model_blessing: types.BaseChannel, *,
                 image_shape: tuple[int, int], settings: QuantizerSettings):
        super().__init__(spec=QuantizerSpec(
            model=model, examples=examples, model_blessing=model_blessing, image_shape=list(image_shape),
            **parameter_values(settings),
            quantized_models=types.Channel(type=QuantizedModel),
            report=types.Channel(type=QuantizationReport)))
