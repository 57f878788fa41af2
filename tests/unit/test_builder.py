"""The builder derives the DAG from the spec: the component set and the wiring, for two different specs."""
import json
from pathlib import Path

from conveyor_ml.base.spec import load_spec
from conveyor_ml.pipelines import builder
from tests.conftest import DEFAULT_SPEC, ROOT, write_spec


def upstream_ids(component) -> set[str]:
    return {node.id for node in component.upstream_nodes}


def by_id(spec) -> dict:
    """Components of the built pipeline (the Pipeline derives the upstream links from the channels)."""
    return {component.id: component for component in builder.build_pipeline(spec).components}


def test_default_spec_builds_the_full_dag():
    nodes = by_id(load_spec(DEFAULT_SPEC))
    assert set(nodes) >= {builder.STATISTICS_GEN, builder.EXAMPLE_VALIDATOR, builder.TRAINER,
                          builder.BASELINE_RESOLVER, builder.EVALUATOR}
    assert upstream_ids(nodes[builder.STATISTICS_GEN]) == {builder.EXAMPLE_GEN, builder.SCHEMA_GEN}
    assert upstream_ids(nodes[builder.EXAMPLE_VALIDATOR]) == {builder.STATISTICS_GEN, builder.SCHEMA_GEN}
    # The previous span's statistics are resolved after this span's, then the drift gate compares them.
    assert upstream_ids(nodes[builder.PREVIOUS_STATISTICS]) == {builder.STATISTICS_GEN}
    assert upstream_ids(nodes[builder.DRIFT_GATE]) == {builder.EXAMPLE_GEN, builder.STATISTICS_GEN,
                                                       builder.SCHEMA_GEN, builder.PREVIOUS_STATISTICS}
    assert nodes[builder.DRIFT_GATE].exec_properties["policy"] == "retrain"
    # The trainer refuses anomalous data and blocked drift, so it waits for the validator and the gate; it
    # trains on the window of spans, which by default is every span.
    assert upstream_ids(nodes[builder.TRAINER]) == {builder.SPAN_WINDOW, builder.SCHEMA_GEN,
                                                    builder.EXAMPLE_VALIDATOR, builder.DRIFT_GATE}
    assert upstream_ids(nodes[builder.SPAN_WINDOW]) == {builder.EXAMPLE_GEN}
    assert nodes[builder.SPAN_WINDOW].exec_properties["source_uri"]["window"] == 0
    assert upstream_ids(nodes[builder.BASELINE_RESOLVER]) == {builder.TRAINER}
    # Scored on the eval splits of the same window, against the baseline, by the paired test.
    assert upstream_ids(nodes[builder.EVALUATOR]) == {builder.SPAN_WINDOW, builder.TRAINER,
                                                      builder.BASELINE_RESOLVER}
    evaluator = nodes[builder.EVALUATOR].exec_properties
    assert (evaluator["test"], evaluator["alpha"], evaluator["max_accuracy_drop"]) == ("mcnemar", 0.05, 0.01)
    assert "golden_span" not in evaluator
    trainer = nodes[builder.TRAINER]
    assert trainer.exec_properties["image_shape"] == [8, 8]
    assert trainer.exec_properties["strategy"] == "mirrored"


def test_a_rolling_window_and_a_golden_span_change_what_is_trained_and_scored_on(tmp_path):
    spec = load_spec(write_spec(tmp_path, **{"data.window_spans": 3, "components.evaluator.golden_span": 1,
                                             "components.evaluator.test": "bootstrap"}))
    nodes = by_id(spec)
    assert nodes[builder.SPAN_WINDOW].exec_properties["source_uri"]["window"] == 3
    assert builder.SPAN_WINDOW in upstream_ids(nodes[builder.TRAINER])
    assert upstream_ids(nodes[builder.GOLDEN_SPAN]) == {builder.EXAMPLE_GEN}
    assert nodes[builder.GOLDEN_SPAN].exec_properties["source_uri"]["span"] == 1
    assert upstream_ids(nodes[builder.EVALUATOR]) == {builder.GOLDEN_SPAN, builder.TRAINER, builder.BASELINE_RESOLVER}
    assert nodes[builder.EVALUATOR].exec_properties["test"] == "bootstrap"


def test_warm_start_resolves_the_production_model_of_the_serving_pusher(tmp_path):
    nodes = by_id(load_spec(write_spec(tmp_path, **{"components.trainer.warm_start": True})))
    assert upstream_ids(nodes[builder.WARM_START_RESOLVER]) == {builder.EXAMPLE_GEN}
    assert nodes[builder.WARM_START_RESOLVER].exec_properties["source_uri"]["model_name"] == "mnist"
    assert builder.WARM_START_RESOLVER in upstream_ids(nodes[builder.TRAINER])


def test_data_only_pipeline_imports_one_pinned_span_and_checks_it(tmp_path):
    spec = load_spec(write_spec(tmp_path))
    nodes = {c.id: c for c in builder.build_components(spec, span=4, data_only=True)}
    assert set(nodes) == {builder.EXAMPLE_GEN, builder.SCHEMA_GEN, builder.STATISTICS_GEN,
                          builder.PREVIOUS_STATISTICS, builder.DRIFT_GATE, builder.EXAMPLE_VALIDATOR}
    range_config = json.loads(nodes[builder.EXAMPLE_GEN].exec_properties["range_config"])
    assert range_config == {"static_range": {"start_span_number": 4, "end_span_number": 4}}


def test_csv_spec_builds_a_smaller_dag_with_its_own_parameters(monkeypatch):
    monkeypatch.chdir(ROOT)
    spec = load_spec(Path("tests/specs/csv_6x6.yaml"))
    nodes = by_id(spec)
    assert builder.STATISTICS_GEN not in nodes and builder.EXAMPLE_VALIDATOR not in nodes
    assert upstream_ids(nodes[builder.TRAINER]) == {builder.SPAN_WINDOW, builder.SCHEMA_GEN}
    assert nodes[builder.TRAINER].exec_properties["image_shape"] == [6, 6]
    assert nodes[builder.TRAINER].exec_properties["strategy"] == "one_device"
    assert nodes[builder.TRAINER].exec_properties["architecture_conv_filters"] == [8]
    assert nodes[builder.SCHEMA_GEN].exec_properties["schema_file"].endswith("tests/fixtures/schema_6x6.pbtxt")
    assert nodes[builder.EXAMPLE_GEN].exec_properties["input_base"].endswith("workspace-csv/data")


def test_pipeline_carries_metadata_and_beam_args():
    pipeline = builder.build_pipeline(load_spec(DEFAULT_SPEC))
    assert pipeline.pipeline_info.pipeline_name == "mnist"
    assert pipeline.enable_cache
    assert pipeline.metadata_connection_config.sqlite.filename_uri.endswith("workspace/metadata.sqlite")
    assert "--direct_running_mode=in_memory" in pipeline.beam_pipeline_args


def test_eval_config_checks_min_accuracy_and_leaves_the_comparison_to_the_paired_test():
    config = builder.eval_config(0.93)
    [accuracy] = [m for m in config.metrics_specs[0].metrics if m.class_name == "SparseCategoricalAccuracy"]
    assert accuracy.threshold.value_threshold.lower_bound.value == 0.93
    assert not accuracy.threshold.HasField("change_threshold")
    assert config.model_specs[0].signature_name == "serving_examples"
