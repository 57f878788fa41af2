"""Spec loading and validation: every class of mistake is reported with its YAML path, all at once."""
from pathlib import Path

import pytest
import yaml

from conveyor_ml.base.errors import ConveyorError
from conveyor_ml.base.spec import load_spec, parse_spec, validation_problems
from tests.conftest import DEFAULT_SPEC, ROOT, run_conveyor


def default_document() -> dict:
    return yaml.safe_load(DEFAULT_SPEC.read_text())


def problems_after(change) -> list[str]:
    document = default_document()
    change(document)
    return validation_problems(document)


def test_default_spec_is_valid_and_typed():
    spec = load_spec(DEFAULT_SPEC)
    assert spec.name == "mnist"
    assert spec.data.source == "sklearn-digits"
    assert spec.data.image_shape == (8, 8)
    assert spec.components.trainer.strategy == "mirrored"
    assert spec.components.serving_pusher.model_name == "mnist"
    assert spec.components.serving_pusher.base_path == Path("workspace/serving")
    assert spec.metadata.sqlite == Path("workspace/metadata.sqlite")
    assert spec.beam.args[0].startswith("--direct")


def test_defaults_fill_what_the_spec_leaves_out():
    document = default_document()
    document["components"]["trainer"].pop("learning_rate", None)
    document.pop("metadata", None)
    spec = parse_spec(document, Path("x.yaml"))
    assert spec.components.trainer.learning_rate == pytest.approx(0.003)
    assert spec.metadata.sqlite == Path("workspace/metadata.sqlite")


@pytest.mark.parametrize("change, expected", [
    (lambda d: d["components"]["trainer"].update(train_steps=0), "components.trainer.train_steps: must be >= 1"),
    (lambda d: d["components"]["trainer"].update(batch_size="big"),
     "components.trainer.batch_size: must be an integer, not a string"),
    (lambda d: d["components"]["trainer"].update(strategy="tpu"),
     "components.trainer.strategy: must be one of mirrored, multi_worker, one_device (got 'tpu')"),
    (lambda d: d["components"]["trainer"].update(epochs=3), "components.trainer.epochs: unknown key"),
    (lambda d: d.pop("name"), "name: required key is missing"),
    (lambda d: d["data"].update(source="parquet"), "data.source: must be one of"),
    (lambda d: d["data"].update(image_shape=[8]), "data.image_shape: must have at least 2 items"),
    (lambda d: d["data"].update(source="csv"), "data.path: required key is missing"),
    (lambda d: d["components"]["evaluator"].update(min_accuracy=1.5),
     "components.evaluator.min_accuracy: must be <= 1"),
    (lambda d: d.update(metadata={"sqlite": "a", "mysql": {"host": "h", "database": "d", "user": "u"}}),
     "metadata: must set at most 1 key"),
    (lambda d: d["components"].pop("trainer"), "components.evaluator: needs components.trainer"),
    (lambda d: d["components"].update(quantizer={"variants": ["int8"], "required_variants": ["float16"]}),
     "components.quantizer.required_variants: float16 is not among"),
    (lambda d: d["components"].update(gcp_pusher={"project": "p", "region": "europe-west4", "bucket": "b1"}),
     "components.gcp_pusher.project: 'p' is not a valid value (must match"),
    (lambda d: d["components"].update(gcp_pusher={"project": "my-project", "region": "europe-west4",
                                                  "bucket": "models", "min_replicas": 3, "max_replicas": 2}),
     "components.gcp_pusher.min_replicas: must be <= max_replicas (2)"),
    (lambda d: d["components"].update(gcp_pusher={"project": "my-project", "region": "europe-west4"}),
     "components.gcp_pusher.bucket: required key is missing"),
])
def test_each_class_of_mistake_names_its_yaml_path(change, expected):
    problems = problems_after(change)
    assert any(p.startswith(expected) for p in problems), problems


def test_every_problem_is_reported_at_once():
    def several(d):
        d["components"]["trainer"]["train_steps"] = -1
        d["components"]["trainer"]["colour"] = "red"
        d["data"]["eval_fraction"] = 2
    problems = problems_after(several)
    assert len(problems) == 3
    assert any(p.startswith("components.trainer.train_steps: must be >= 1") for p in problems)
    assert any(p.startswith("components.trainer.colour: unknown key") for p in problems)
    assert any(p.startswith("data.eval_fraction: must be < 1") for p in problems)


def test_non_mapping_document_is_rejected():
    assert validation_problems(["a", "b"]) == [
        "(top level): must be a mapping of keys such as name, data, components"]


def test_missing_file_and_yaml_syntax_errors_are_one_line(tmp_path):
    with pytest.raises(ConveyorError, match="spec file not found"):
        load_spec(tmp_path / "nope.yaml")
    broken = tmp_path / "broken.yaml"
    broken.write_text("name: x\ndata: [unclosed\n")
    with pytest.raises(ConveyorError, match=r"broken.yaml:\d+:\d+: YAML syntax error"):
        load_spec(broken)


def test_validate_command_exit_codes(tmp_path):
    ok = run_conveyor("validate", DEFAULT_SPEC)
    assert ok.returncode == 0, ok.stderr
    assert "valid pipeline 'mnist'" in ok.stdout

    bad = tmp_path / "bad.yaml"
    document = default_document()
    document["components"]["trainer"]["train_steps"] = 0
    document["components"]["trainer"]["cpu_replicas"] = 0
    bad.write_text(yaml.safe_dump(document))
    result = run_conveyor("validate", bad)
    assert result.returncode == 2
    assert "components.trainer.train_steps: must be >= 1" in result.stderr
    assert "components.trainer.cpu_replicas: must be >= 1" in result.stderr
    assert "Traceback" not in result.stderr


def test_schema_file_is_valid_json_schema():
    import json

    import jsonschema

    schema = json.loads((ROOT / "schemas" / "pipeline.schema.json").read_text())
    jsonschema.Draft202012Validator.check_schema(schema)


def test_extends_merges_mappings_replaces_values_and_removes_nulls(tmp_path):
    base = tmp_path / "base.yaml"
    base.write_text(DEFAULT_SPEC.read_text().replace("schemas/mnist/schema.pbtxt",
                                                     str(DEFAULT_SPEC.parent.parent / "schemas/mnist/schema.pbtxt")))
    child = tmp_path / "child.yaml"
    child.write_text("extends: base.yaml\nname: child\ncomponents:\n  trainer: {train_steps: 7}\n"
                     "  quantizer: null\n")
    spec = load_spec(child)
    assert spec.name == "child" and spec.components.trainer.train_steps == 7
    assert spec.components.trainer.learning_rate == 0.003  # merged, not replaced
    assert spec.components.quantizer is None
    (tmp_path / "loop.yaml").write_text("extends: loop.yaml\n")
    with pytest.raises(ConveyorError, match="a cycle"):
        load_spec(tmp_path / "loop.yaml")
    (tmp_path / "orphan.yaml").write_text("extends: nowhere.yaml\n")
    with pytest.raises(ConveyorError, match=r"spec file not found: .*nowhere.yaml \(extended by"):
        load_spec(tmp_path / "orphan.yaml")


def test_unknown_keys_of_mixed_types_are_each_named():
    problems = problems_after(lambda d: d.update({1: "a", "colour": "b"}))
    assert problems == ["1: unknown key (allowed: " + ", ".join(sorted(default_document_keys())) + ")",
                        "colour: unknown key (allowed: " + ", ".join(sorted(default_document_keys())) + ")"]


def default_document_keys() -> list[str]:
    from conveyor_ml.base.spec import pipeline_schema

    return list(pipeline_schema()["properties"])


@pytest.mark.parametrize("value", [float("nan"), float("inf"), float("-inf")])
def test_a_number_that_is_not_finite_is_refused_by_path(value):
    problems = problems_after(lambda d: d["components"]["evaluator"].update(min_accuracy=value))
    assert problems == [f"components.evaluator.min_accuracy: must be a finite number, not {value}"]


def test_a_whole_float_where_an_integer_is_expected_becomes_an_int(tmp_path):
    document = default_document()
    document["components"]["serving_pusher"]["analysis"] = {"steps": [10.0, 100.0]}
    document["components"]["serving_pusher"]["batching"] = {"max_batch_size": 128.0}
    spec = parse_spec(document, tmp_path / "spec.yaml")
    steps = spec.components.serving_pusher.analysis.steps
    batch = spec.components.serving_pusher.batching.max_batch_size
    assert steps == (10, 100) and all(type(s) is int for s in steps)
    assert batch == 128 and type(batch) is int
    document["components"]["serving_pusher"]["batching"] = {"max_batch_size": 128.5}
    assert validation_problems(document) == ["components.serving_pusher.batching.max_batch_size: "
                                             "must be an integer, not a number"]


def test_extends_that_cannot_be_followed_is_a_one_line_error(tmp_path):
    (tmp_path / "loop.yaml").symlink_to(tmp_path / "loop.yaml")
    (tmp_path / "via_loop.yaml").write_text("extends: loop.yaml\nname: x\n")
    with pytest.raises(ConveyorError, match=r"via_loop.yaml: extends 'loop.yaml', which cannot be opened"):
        load_spec(tmp_path / "via_loop.yaml")
    (tmp_path / "nul.yaml").write_text('extends: "a\\0b"\nname: x\n')
    with pytest.raises(ConveyorError, match=r"nul.yaml: extends 'a\\x00b', which cannot be opened"):
        load_spec(tmp_path / "nul.yaml")
    for index in range(40):  # a chain: spec-0 extends spec-1 ... extends spec-40
        (tmp_path / f"spec-{index}.yaml").write_text(f"extends: spec-{index + 1}.yaml\n")
    (tmp_path / "spec-40.yaml").write_text(DEFAULT_SPEC.read_text())
    with pytest.raises(ConveyorError, match="more than 16 specs extend one another"):
        load_spec(tmp_path / "spec-0.yaml")
    assert load_spec(tmp_path / "spec-30.yaml").name == "mnist"  # ten links are fine
