"""Conveyor's Evaluator: TFX's Evaluator (TFMA computes the metrics and checks min_accuracy), extended with a
paired test of the candidate against its baseline on the same eval examples, which decides the blessing."""
from __future__ import annotations

import tensorflow_model_analysis as tfma
from tfx import types
from tfx.dsl.components.base import base_beam_component, executor_spec
from tfx.types import standard_artifacts, standard_component_specs
from tfx.types.component_spec import ComponentSpec
from tfx.utils import json_utils

from conveyor_ml.base.spec import EvaluatorSettings
from conveyor_ml.components.evaluator import executor
from conveyor_ml.components.parameters import execution_parameters, parameter_values

_TFX_SPEC = standard_component_specs.EvaluatorSpec


class EvaluatorSpec(ComponentSpec):
    """TFX's EvaluatorSpec (same inputs and outputs, so lineage and pushers read it alike) plus our options."""

    PARAMETERS = {**_TFX_SPEC.PARAMETERS, **execution_parameters(EvaluatorSettings)}
    INPUTS = _TFX_SPEC.INPUTS
    OUTPUTS = _TFX_SPEC.OUTPUTS
    TYPE_ANNOTATION = _TFX_SPEC.TYPE_ANNOTATION


class Evaluator(base_beam_component.BaseBeamComponent):
    """Evaluates the candidate on the eval splits of `examples` (one artifact per span) with TFMA, then scores
    candidate and baseline example by example and blesses by the settings' paired test and thresholds."""

    SPEC_CLASS = EvaluatorSpec
    EXECUTOR_SPEC = executor_spec.BeamExecutorSpec(executor.Executor)

    def __init__(self, examples: types.BaseChannel, model: types.BaseChannel, *, eval_config: tfma.EvalConfig,
                 settings: EvaluatorSettings, baseline_model: types.BaseChannel | None = None):
        super().__init__(spec=EvaluatorSpec(
            examples=examples, model=model, baseline_model=baseline_model, eval_config=eval_config,
            example_splits=json_utils.dumps(["eval"]), **parameter_values(settings),
            evaluation=types.Channel(type=standard_artifacts.ModelEvaluation),
            blessing=types.Channel(type=standard_artifacts.ModelBlessing)))
