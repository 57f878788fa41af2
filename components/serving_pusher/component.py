"""ServingPusher: blessed models into a TF Serving base path as atomic integer versions, with release labels."""
from __future__ import annotations

import json

from conveyor_ml.components.artifacts import Deployment
from conveyor_ml.components.pushing import PUSHER_INPUTS, PUSHER_OUTPUTS
from conveyor_ml.components.serving_pusher import executor
from tfx import types
from tfx.dsl.components.base import base_component, executor_spec
from tfx.types import standard_artifacts
from tfx.types.component_spec import ComponentSpec, ExecutionParameter


class ServingPusherSpec(ComponentSpec):
    PARAMETERS = {
        "model_name": ExecutionParameter(type=str),
        "base_path": ExecutionParameter(type=str),
        "release": ExecutionParameter(type=str),  # direct | canary
        "canary_weight": ExecutionParameter(type=int),
        "keep_versions": ExecutionParameter(type=int),
        "batching": ExecutionParameter(type=str),  # JSON of pipelines.spec.BatchingSettings
    }
    INPUTS = PUSHER_INPUTS
    OUTPUTS = PUSHER_OUTPUTS


class ServingPusher(base_component.BaseComponent):
    """Pushes only what the Evaluator (and the InfraValidator, when wired) blessed; records why it skipped."""

    SPEC_CLASS = ServingPusherSpec
    EXECUTOR_SPEC = executor_spec.ExecutorClassSpec(executor.Executor)

    def __init__(self, model: types.BaseChannel, model_blessing: types.BaseChannel, *, model_name: str,
                 base_path: str, release: str = "direct", canary_weight: int = 10, keep_versions: int = 5,
                 batching: dict | None = None, infra_blessing: types.BaseChannel | None = None,
                 quantized_models: types.BaseChannel | None = None):
        super().__init__(spec=ServingPusherSpec(
            model=model, model_blessing=model_blessing, infra_blessing=infra_blessing,
            quantized_models=quantized_models, model_name=model_name, base_path=str(base_path),
            release=release, canary_weight=canary_weight, keep_versions=keep_versions,
            batching=json.dumps(batching or {}, sort_keys=True),
            pushed_model=types.Channel(type=standard_artifacts.PushedModel),
            deployment=types.Channel(type=Deployment)))
