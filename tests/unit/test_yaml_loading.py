"""YAML within bounds: what a spec needs still loads (anchors, aliases, merge keys); what only an accident or
an attacker writes is refused by name, in a moment (the CLI cases: tests/unit/test_cli_mistakes.py)."""
from __future__ import annotations

import pytest

from conveyor_ml.base import yaml_loading
from conveyor_ml.base.errors import ConveyorError
from conveyor_ml.base.spec import load_spec
from tests.conftest import write_spec


def test_anchors_aliases_and_merge_keys_still_load(tmp_path):
    text = ("defaults: &defaults {batch_size: 32, learning_rate: 0.01}\n"
            "trainer: {<<: *defaults, train_steps: 50}\n"
            "list: [*defaults, *defaults]\n")
    document = yaml_loading.load_yaml_text(text, "inline")
    assert document["trainer"] == {"batch_size": 32, "learning_rate": 0.01, "train_steps": 50}
    assert document["list"] == [{"batch_size": 32, "learning_rate": 0.01}] * 2


def test_the_project_specs_load_unchanged(tmp_path):
    spec = load_spec(write_spec(tmp_path))
    assert spec.name and spec.components.trainer is not None


def test_nesting_at_the_limit_loads_and_one_more_level_is_refused():
    at_limit = "[" * (yaml_loading.MAX_DEPTH - 1) + "]" * (yaml_loading.MAX_DEPTH - 1)
    assert yaml_loading.load_yaml_text(f"a: {at_limit}", "ok") is not None
    beyond = "[" * yaml_loading.MAX_DEPTH + "]" * yaml_loading.MAX_DEPTH
    with pytest.raises(ConveyorError, match=r"^deep:1:\d+: YAML nested deeper than 64 levels"):
        yaml_loading.load_yaml_text(f"a: {beyond}", "deep")


def test_a_chain_of_aliases_is_measured_expanded():
    # Each level is shallow and small; expanded, the last one is 70 levels deep.
    lines = ["l0: &l0 [x]"] + [f"l{i}: &l{i} [[[[[[[[[[*l{i - 1}]]]]]]]]]]" for i in range(1, 8)]
    with pytest.raises(ConveyorError, match="expanded, nests deeper than 64 levels"):
        yaml_loading.load_yaml_text("\n".join(lines), "chain")


def test_a_wide_alias_fan_out_is_refused_before_it_is_built():
    lines = ['a0: &a0 [x, x, x, x, x, x, x, x, x, x]']
    lines += [f"a{i}: &a{i} [" + ", ".join([f"*a{i - 1}"] * 10) + "]" for i in range(1, 6)]
    with pytest.raises(ConveyorError, match=r"^fan:5:\d+: this YAML, with its aliases .* has more than 100000 nodes"):
        yaml_loading.load_yaml_text("\n".join(lines), "fan")
    assert yaml_loading.load_yaml_text("\n".join(lines[:4]), "fan")["a3"][0][0][0] == ["x"] * 10  # 10^4: fine


def test_files_larger_than_the_limit_are_refused_without_reading_them_whole(tmp_path):
    path = tmp_path / "big.yaml"
    path.write_text("name: x\n" + "#" * yaml_loading.MAX_FILE_BYTES)
    with pytest.raises(ConveyorError, match="big.yaml: larger than 1024 KiB"):
        yaml_loading.load_yaml_file(path)
    with pytest.raises(ConveyorError, match="is a directory"):
        yaml_loading.load_yaml_file(tmp_path)


def test_a_key_given_twice_is_refused_but_a_merge_key_may_be_overridden():
    with pytest.raises(ConveyorError, match=r"inline:3:3: key 'train_steps' appears twice .*first on line 2"):
        yaml_loading.load_yaml_text("trainer:\n  train_steps: 50\n  train_steps: 500\n", "inline")
    merged = yaml_loading.load_yaml_text("base: &b {x: 1, y: 2}\nover: {<<: *b, x: 5}\n", "inline")
    assert merged["over"] == {"x": 5, "y": 2}
    # Equal text with different tags are different keys (1 and "1"), as YAML reads them.
    assert yaml_loading.load_yaml_text('m: {1: a, "1": b}\n', "inline")["m"] == {1: "a", "1": "b"}


def test_an_integer_past_pythons_digit_limit_is_a_one_line_error():
    with pytest.raises(ConveyorError, match="inline: a value cannot be read: an integer of more than 4,300 digits"):
        yaml_loading.load_yaml_text("steps: " + "9" * 5000 + "\n", "inline")
