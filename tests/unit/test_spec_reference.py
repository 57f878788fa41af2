"""One source for every option and its default: the spec model. The JSON Schema and the README's table are
derived from it and must be current; the shipped specs restate no default."""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import jsonschema
import pytest
import yaml

from conveyor_ml.base import spec_reference
from conveyor_ml.base.dataclass_schema import document_schema, from_document, option, reference_rows
from conveyor_ml.base.spec import PipelineSpec, ServingPusherSettings, TrainerSettings, pipeline_schema
from tests.conftest import ROOT


def test_committed_schema_is_the_one_the_model_generates():
    committed = json.loads((ROOT / "schemas" / "pipeline.schema.json").read_text())
    assert committed == pipeline_schema(), "run `make reference`"


def test_readme_table_is_the_one_the_model_generates():
    readme = (ROOT / "README.md").read_text()
    assert spec_reference.readme_with_table(readme) == readme, "run `make reference`"


def test_readme_table_shows_each_default_of_the_model():
    """Read back from the README, not from the generator: the rows a user sees carry the model's defaults."""
    readme = (ROOT / "README.md").read_text()
    table = readme.split(spec_reference.TABLE_START)[1].split(spec_reference.TABLE_END)[0]
    shown = {}
    for line in table.strip().splitlines()[2:]:
        cells = [c.strip() for c in line.strip("|").split(" | ")]
        shown[cells[0].strip("`")] = cells[2]
    assert shown["components.trainer.train_steps"] == "`600`"
    assert shown["components.trainer.learning_rate"] == "`0.003`"
    assert shown["components.serving_pusher.canary_weight"] == "`10`"
    assert shown["components.serving_pusher.base_path"] == "`<workspace>/serving`"
    assert shown["components.trainer.train_steps"] == f"`{TrainerSettings().train_steps}`"
    assert shown["components.serving_pusher.keep_versions"] == \
        f"`{ServingPusherSettings(model_name='m').keep_versions}`"


@dataclasses.dataclass(frozen=True)
class _Inner:
    depth: int = option(3, doc="How deep.", minimum=1)


@dataclasses.dataclass(frozen=True)
class _Outer:
    name: str = option(doc="A name.", minLength=1)
    size: int = option(7, doc="A size.", minimum=0, maximum=9)
    inner: _Inner = option(default_factory=_Inner, doc="Nested.")


def test_a_default_written_once_reaches_the_schema_the_object_and_the_table():
    schema = document_schema(_Outer, "t", "urn:t")
    jsonschema.Draft202012Validator.check_schema(schema)
    assert schema["properties"]["size"] == {"type": "integer", "minimum": 0, "maximum": 9, "default": 7,
                                            "description": "A size."}
    assert schema["required"] == ["name"]
    assert schema["$defs"]["_Inner"]["properties"]["depth"]["default"] == 3
    built = from_document(_Outer, {"name": "x", "inner": {}})
    assert (built.size, built.inner.depth) == (7, 3)
    rows = {r.path: r for r in reference_rows(_Outer)}
    assert rows["size"].default == "`7`" and rows["size"].takes == "integer (>= 0, <= 9)"
    assert rows["inner.depth"].default == "`3`" and rows["name"].default == "required"
    validator = jsonschema.Draft202012Validator(schema)
    assert [e.message for e in validator.iter_errors({"name": "x", "size": 10})] == ["10 is greater than the maximum of 9"]
    assert list(validator.iter_errors({"name": "x", "colour": 1}))  # nothing else is allowed


def _leaves(document, prefix=""):
    if isinstance(document, dict) and document:
        for key, value in document.items():
            yield from _leaves(value, f"{prefix}{key}.")
    else:
        yield prefix.rstrip("."), document


@pytest.mark.parametrize("spec_file", ["pipelines/mnist.yaml", "pipelines/mnist-gcp.yaml"])
def test_shipped_specs_restate_no_default(spec_file):
    defaults = {}
    for row in reference_rows(PipelineSpec):
        defaults[row.path] = row.default
    document = yaml.safe_load((ROOT / spec_file).read_text())
    document.pop("extends", None)
    restated = [path for path, value in _leaves(document)
                if path in defaults and defaults[path] == f"`{value}`" and not isinstance(value, (dict, list))]
    assert restated == []


def test_spec_file_paths_resolve_from_the_project_root():
    assert Path(spec_reference.SCHEMA_FILE).is_file() and spec_reference.README.is_file()
