"""Conveyor's Trainer: the standard Trainer's inputs and outputs, with distribution and export built in."""
from __future__ import annotations

import json

from conveyor_ml.components.artifacts import DataDriftReport
from conveyor_ml.components.trainer import executor
from tfx import types
from tfx.dsl.components.base import base_component, executor_spec
from tfx.types import standard_artifacts
from tfx.types.component_spec import ChannelParameter, ComponentSpec, ExecutionParameter


class TrainerSpec(ComponentSpec):
    PARAMETERS = {
        "image_shape": ExecutionParameter(type=str),  # JSON [H, W]
        "strategy": ExecutionParameter(type=str),
        "cpu_replicas": ExecutionParameter(type=int),
        "num_workers": ExecutionParameter(type=int),
        "train_steps": ExecutionParameter(type=int),
        "batch_size": ExecutionParameter(type=int),
        "learning_rate": ExecutionParameter(type=float),
        "scale_learning_rate": ExecutionParameter(type=int),
        "architecture": ExecutionParameter(type=str),  # JSON of pipelines.spec.ModelArchitecture
        "warm_start": ExecutionParameter(type=int),
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

    def __init__(self, examples: types.BaseChannel, schema: types.BaseChannel, *,
                 image_shape: tuple[int, int], strategy: str = "mirrored", cpu_replicas: int = 1,
                 num_workers: int = 2, train_steps: int = 600, batch_size: int = 32,
                 learning_rate: float = 0.003, scale_learning_rate: bool = False,
                 architecture: dict | None = None, warm_start: bool = False,
                 base_model: types.BaseChannel | None = None,
                 example_anomalies: types.BaseChannel | None = None,
                 drift_report: types.BaseChannel | None = None):
        spec = TrainerSpec(
            examples=examples, schema=schema, base_model=base_model, example_anomalies=example_anomalies,
            drift_report=drift_report,
            image_shape=json.dumps(list(image_shape)), strategy=strategy, cpu_replicas=cpu_replicas,
            num_workers=num_workers, train_steps=train_steps, batch_size=batch_size,
            learning_rate=learning_rate, scale_learning_rate=int(scale_learning_rate),
            architecture=json.dumps(architecture or {}, sort_keys=True), warm_start=int(warm_start),
            model=types.Channel(type=standard_artifacts.Model),
            model_run=types.Channel(type=standard_artifacts.ModelRun),
        )
        super().__init__(spec=spec)
