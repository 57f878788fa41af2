"""Builds the TFX pipeline a spec declares. The spec names components; the wiring is derived here."""
from __future__ import annotations

from dataclasses import replace

import tensorflow_model_analysis as tfma
from tfx.components.example_validator.component import ExampleValidator
from tfx.components.schema_gen.import_schema_gen.component import ImportSchemaGen
from tfx.dsl.components.common.resolver import Resolver
from tfx.dsl.input_resolution.strategies.latest_artifact_strategy import LatestArtifactStrategy
from tfx.dsl.input_resolution.strategies.latest_blessed_model_strategy import LatestBlessedModelStrategy
from tfx.orchestration.pipeline import Pipeline
from tfx.proto import example_gen_pb2, range_config_pb2
from tfx.types import standard_artifacts
from tfx.types.channel import Channel

# The classes are imported from their modules, not through `tfx.v1`: that public facade also imports its
# Google Cloud extensions (the Vertex AI SDK), seconds of every `conveyor run` that builds nothing for them.
from conveyor_ml.base.names import (
    BASELINE_RESOLVER,
    DRIFT_GATE,
    EVALUATOR,
    EXAMPLE_GEN,
    EXAMPLE_VALIDATOR,
    GCP_PUSHER,
    GOLDEN_SPAN,
    INFRA_VALIDATOR,
    LABEL_KEY,
    PREVIOUS_STATISTICS,
    QUANTIZER,
    SCHEMA_GEN,
    SERVING_PUSHER,
    SPAN_WINDOW,
    STATISTICS_GEN,
    TRAINER,
    WARM_START_RESOLVER,
)
from conveyor_ml.base.spec import PipelineSpec
from conveyor_ml.components.artifacts import DataDriftReport
from conveyor_ml.metadata.store import connection_config
from conveyor_ml.pipelines.resolvers import (
    GoldenSpanStrategy,
    PreviousBlessedModelStrategy,
    PreviousSpanStatisticsStrategy,
    SpanWindowStrategy,
    WarmStartModelStrategy,
)


def example_gen_input_config() -> example_gen_pb2.Input:
    return example_gen_pb2.Input(splits=[
        example_gen_pb2.Input.Split(name="train", pattern="span-{SPAN}/train/*"),
        example_gen_pb2.Input.Split(name="eval", pattern="span-{SPAN}/eval/*"),
    ])


def single_span(span: int) -> range_config_pb2.RangeConfig:
    """ExampleGen pinned to one span (it otherwise takes the newest)."""
    return range_config_pb2.RangeConfig(static_range=range_config_pb2.StaticRange(
        start_span_number=span, end_span_number=span))


def eval_config(min_accuracy: float) -> tfma.EvalConfig:
    """TFMA computes accuracy (and its difference from the baseline) and checks min_accuracy; the comparison
    with the baseline is our Evaluator's paired test, not a TFMA change threshold, which would judge a
    difference of one image on a small eval set as a regression."""
    accuracy = tfma.MetricConfig(
        class_name="SparseCategoricalAccuracy",
        threshold=tfma.MetricThreshold(
            value_threshold=tfma.GenericValueThreshold(lower_bound={"value": min_accuracy})),
    )
    return tfma.EvalConfig(
        # A generic SavedModel, not Keras: TFMA otherwise loads the model as Keras just to find that out, then
        # again for its metrics (twice the Evaluator's time on the default pipeline); it calls the signature.
        model_specs=[tfma.ModelSpec(signature_name="serving_examples", label_key=LABEL_KEY,
                                    prediction_key="probabilities", model_type=tfma.TF_GENERIC)],
        slicing_specs=[tfma.SlicingSpec()],
        metrics_specs=[tfma.MetricsSpec(metrics=[accuracy, tfma.MetricConfig(class_name="ExampleCount")])],
    )


def build_components(spec: PipelineSpec, portable: bool = False, *, span: int | None = None,
                     data_only: bool = False) -> list:
    """The TFX components for a spec, in topological order.

    `portable` builds the DAG Kubeflow Pipelines v2 / Vertex AI Pipelines can run: their compiler accepts
    only TFX's two stock resolver strategies, so the baseline model and the drift baseline are "the latest
    blessed model" and "the latest statistics" before this run, the span window is the newest span, and
    the nodes that need a local serving directory (InfraValidator, ServingPusher) are left to GcpPusher.

    `span` pins the import to one span instead of the newest; `data_only` stops after the data checks
    (import, statistics, drift gate, validation): the runner imports spans that arrived together with a
    newer one this way, so the newer one's run trains on them."""
    components = spec.components
    from conveyor_ml.components.example_gen.component import SpanExampleGen

    data_root = spec.kubeflow.data_root_uri if portable else str(spec.data_root.resolve())
    example_gen = SpanExampleGen(input_base=data_root, input_config=example_gen_input_config(),
                                 range_config=single_span(span) if span is not None else None)
    example_gen = example_gen.with_id(EXAMPLE_GEN)
    schema_gen = ImportSchemaGen(schema_file=str(spec.data.schema.resolve())).with_id(SCHEMA_GEN)
    nodes = [example_gen, schema_gen]
    examples, schema = example_gen.outputs["examples"], schema_gen.outputs["schema"]

    anomalies = drift_report = None
    if components.statistics_gen:
        from conveyor_ml.components.statistics_gen.component import StatisticsGen

        # With the schema, the label is summarised as categorical, which the drift gate's L-infinity needs.
        statistics_gen = StatisticsGen(examples=examples, schema=schema).with_id(STATISTICS_GEN)
        nodes.append(statistics_gen)
        drift_report = _drift_gate(spec, nodes, examples, statistics_gen.outputs["statistics"], schema, portable)
        if components.example_validator:
            validator = ExampleValidator(
                statistics=statistics_gen.outputs["statistics"], schema=schema).with_id(EXAMPLE_VALIDATOR)
            nodes.append(validator)
            anomalies = validator.outputs["anomalies"]

    if not components.trainer or data_only:
        return nodes
    if portable:
        training_examples = examples
    else:
        # The rolling window of TFX's guide; by default it covers every span, so the training set only grows.
        window = Resolver(
            strategy_class=SpanWindowStrategy, config={"window": spec.data.window_spans or 0},
            newest=examples, examples=Channel(type=standard_artifacts.Examples),
            drift_reports=Channel(type=DataDriftReport),
        ).with_id(SPAN_WINDOW)
        nodes.append(window)
        training_examples = window.outputs["examples"]
    from conveyor_ml.components.trainer.component import Trainer

    trainer_settings = components.trainer
    warm_start_model = None
    if trainer_settings.warm_start:
        all_models = Channel(type=standard_artifacts.Model)
        all_blessings = Channel(type=standard_artifacts.ModelBlessing)
        if portable:
            warm_start = Resolver(strategy_class=LatestBlessedModelStrategy,
                                          model=all_models, model_blessing=all_blessings)
        else:
            serving = components.serving_pusher
            warm_start = Resolver(
                strategy_class=WarmStartModelStrategy, config={"model_name": serving.model_name if serving else ""},
                newest=examples, model=all_models, model_blessing=all_blessings)
        warm_start = warm_start.with_id(WARM_START_RESOLVER)
        nodes.append(warm_start)
        warm_start_model = warm_start.outputs["model"]
    trainer = Trainer(
        examples=training_examples, schema=schema, example_anomalies=anomalies, drift_report=drift_report,
        base_model=warm_start_model, image_shape=spec.data.image_shape, settings=trainer_settings,
    ).with_id(TRAINER)
    model = trainer.outputs["model"]
    all_models = Channel(type=standard_artifacts.Model)
    all_blessings = Channel(type=standard_artifacts.ModelBlessing)
    if portable:
        baseline = Resolver(strategy_class=LatestBlessedModelStrategy,
                                    model=all_models, model_blessing=all_blessings).with_id(BASELINE_RESOLVER)
    else:
        baseline = Resolver(strategy_class=PreviousBlessedModelStrategy, candidate=model, model=all_models,
                                    model_blessing=all_blessings).with_id(BASELINE_RESOLVER)
    nodes += [trainer, baseline]

    blessing = None
    if components.evaluator:
        from conveyor_ml.components.evaluator.component import Evaluator

        evaluation_settings = components.evaluator
        eval_examples = examples if portable else training_examples
        if evaluation_settings.golden_span is not None and not portable:
            golden = Resolver(
                strategy_class=GoldenSpanStrategy, config={"span": evaluation_settings.golden_span},
                newest=examples, examples=Channel(type=standard_artifacts.Examples),
            ).with_id(GOLDEN_SPAN)
            nodes.append(golden)
            eval_examples = golden.outputs["examples"]
        evaluator = Evaluator(
            examples=eval_examples, model=model, baseline_model=baseline.outputs["model"],
            eval_config=eval_config(evaluation_settings.min_accuracy), settings=evaluation_settings,
        ).with_id(EVALUATOR)
        nodes.append(evaluator)
        blessing = evaluator.outputs["blessing"]

    infra_blessing = None
    if components.infra_validator and not portable:
        from conveyor_ml.components.infra_validator.component import InfraValidator

        infra_validator = InfraValidator(
            model=model, examples=examples, image_shape=spec.data.image_shape, settings=components.infra_validator,
        ).with_id(INFRA_VALIDATOR)
        nodes.append(infra_validator)
        infra_blessing = infra_validator.outputs["blessing"]

    quantized = None
    if components.quantizer:
        from conveyor_ml.components.quantizer.component import Quantizer

        quantizer = Quantizer(
            model=model, examples=examples, model_blessing=blessing, image_shape=spec.data.image_shape,
            settings=components.quantizer,
        ).with_id(QUANTIZER)
        nodes.append(quantizer)
        quantized = quantizer.outputs["quantized_models"]

    if components.serving_pusher and not portable:
        from conveyor_ml.components.serving_pusher.component import ServingPusher

        settings = components.serving_pusher
        pusher = ServingPusher(
            model=model, model_blessing=blessing, infra_blessing=infra_blessing, quantized_models=quantized,
            settings=replace(settings, base_path=settings.base_path.resolve()),
        ).with_id(SERVING_PUSHER)
        nodes.append(pusher)

    if components.gcp_pusher:
        from conveyor_ml.components.gcp_pusher.component import GcpPusher

        nodes.append(GcpPusher(
            model=model, model_blessing=blessing, infra_blessing=infra_blessing, quantized_models=quantized,
            model_name=spec.gcp_model_name, pipeline_name=spec.name, settings=components.gcp_pusher,
        ).with_id(GCP_PUSHER))
    return nodes


def _drift_gate(spec: PipelineSpec, nodes: list, examples, statistics, schema, portable: bool):
    """The newest span's statistics against the previous span's (resolved from MLMD), with the spec's policy."""
    from conveyor_ml.components.drift_gate.component import DriftGate

    all_statistics = Channel(type=standard_artifacts.ExampleStatistics)
    if portable:
        previous = Resolver(strategy_class=LatestArtifactStrategy,
                                    statistics=all_statistics).with_id(PREVIOUS_STATISTICS)
    else:
        previous = Resolver(strategy_class=PreviousSpanStatisticsStrategy, newest=statistics,
                                    statistics=all_statistics, drift_reports=Channel(type=DataDriftReport),
                                    ).with_id(PREVIOUS_STATISTICS)
    gate = DriftGate(examples=examples, statistics=statistics, schema=schema,
                     baseline_statistics=previous.outputs["statistics"], settings=spec.data.drift).with_id(DRIFT_GATE)
    nodes += [previous, gate]
    return gate.outputs["drift_report"]


def build_pipeline(spec: PipelineSpec, *, span: int | None = None, data_only: bool = False,
                   beam_args: list[str] | None = None) -> Pipeline:
    """The local pipeline; `beam_args` replace the spec's (the runner adds the workers' TFX package)."""
    return Pipeline(
        pipeline_name=spec.name,
        pipeline_root=str(spec.pipeline_root.resolve()),
        components=build_components(spec, span=span, data_only=data_only),
        enable_cache=True,
        metadata_connection_config=connection_config(spec.metadata),
        beam_pipeline_args=list(spec.beam.args) if beam_args is None else beam_args,
    )
