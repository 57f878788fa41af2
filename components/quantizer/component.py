"""Quantizer: TFLite float32 / float16 / dynamic-range / int8 variants, each measured and blessed or not."""
from __future__ import annotations

import json

from conveyor_ml.components.artifacts import QuantizationReport, QuantizedModel
from conveyor_ml.components.quantizer import executor
from tfx import types
from tfx.dsl.components.base import base_component, executor_spec
from tfx.types import standard_artifacts
from tfx.types.component_spec import ChannelParameter, ComponentSpec, ExecutionParameter


class QuantizerSpec(ComponentSpec):
    PARAMETERS = {
        "image_shape": ExecutionParameter(type=str),  # JSON [H, W]
        "variants": ExecutionParameter(type=str),  # JSON list
        "required_variants": ExecutionParameter(type=str),  # JSON list
        "representative_examples": ExecutionParameter(type=int),
        "max_accuracy_drop_points": ExecutionParameter(type=float),
        "threads": ExecutionParameter(type=int),
        "latency_runs": ExecutionParameter(type=int),
        "throughput_batch_size": ExecutionParameter(type=int),
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
                 image_shape: tuple[int, int], variants: tuple[str, ...], required_variants: tuple[str, ...] = (),
                 representative_examples: int = 200, max_accuracy_drop_points: float = 1.0, threads: int = 2,
                 latency_runs: int = 200, throughput_batch_size: int = 64):
        super().__init__(spec=QuantizerSpec(
            model=model, examples=examples, model_blessing=model_blessing,
            image_shape=json.dumps(list(image_shape)), variants=json.dumps(list(variants)),
            required_variants=json.dumps(list(required_variants)),
            representative_examples=representative_examples, max_accuracy_drop_points=max_accuracy_drop_points,
            threads=threads, latency_runs=latency_runs, throughput_batch_size=throughput_batch_size,
            quantized_models=types.Channel(type=QuantizedModel),
            report=types.Channel(type=QuantizationReport)))
