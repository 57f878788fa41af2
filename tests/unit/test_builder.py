"""The builder derives the DAG from the spec: the component set and the wiring, for two different specs."""
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
    # The trainer refuses anomalous data and blocked drift, so it waits for the validator and the gate.
    assert upstream_ids(nodes[builder.TRAINER]) == {builder.EXAMPLE_GEN, builder.SCHEMA_GEN,
                                                    builder.EXAMPLE_VALIDATOR, builder.DRIFT_GATE}
    assert upstream_ids(nodes[builder.BASELINE_RESOLVER]) == {builder.TRAINER}
    assert upstream_ids(nodes[builder.EVALUATOR]) == {builder.EXAMPLE_GEN, builder.TRAINER,
                                                      builder.BASELINE_RESOLVER}
    trainer = nodes[builder.TRAINER]
    assert trainer.exec_properties["image_shape"] == [8, 8]
    assert trainer.exec_properties["strategy"] == "mirrored"


def test_window_of_spans_feeds_the_trainer_through_a_resolver(tmp_path):
    spec = load_spec(write_spec(tmp_path, **{"data.window_spans": 3}))
    nodes = by_id(spec)
    assert upstream_ids(nodes[builder.SPAN_WINDOW]) == {builder.EXAMPLE_GEN}
    assert builder.SPAN_WINDOW in upstream_ids(nodes[builder.TRAINER])
    assert builder.EXAMPLE_GEN in upstream_ids(nodes[builder.EVALUATOR])  # evaluated on the newest span only


def test_csv_spec_builds_a_smaller_dag_with_its_own_parameters(monkeypatch):
    monkeypatch.chdir(ROOT)
    spec = load_spec(Path("tests/specs/csv_6x6.yaml"))
    nodes = by_id(spec)
    assert builder.STATISTICS_GEN not in nodes and builder.EXAMPLE_VALIDATOR not in nodes
    assert upstream_ids(nodes[builder.TRAINER]) == {builder.EXAMPLE_GEN, builder.SCHEMA_GEN}
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


def test_eval_config_thresholds_come_from_the_spec():
    config = builder.eval_config(0.93, 0.02)
    [accuracy] = [m for m in config.metrics_specs[0].metrics if m.class_name == "SparseCategoricalAccuracy"]
    assert accuracy.threshold.value_threshold.lower_bound.value == 0.93
    assert accuracy.threshold.change_threshold.absolute.value == -0.02
    assert config.model_specs[0].signature_name == "serving_examples"
