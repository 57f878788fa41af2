"""Builds TFX artifacts on disk, so executors can be called directly, without a pipeline."""
from __future__ import annotations

import shutil
from pathlib import Path

from tfx.types import artifact_utils, standard_artifacts

from conveyor_ml.formats.spans import span_dir

_next_id = iter(range(1000, 10**6))


def _with_uri(artifact, uri: Path):
    artifact.uri = str(uri)
    artifact.id = next(_next_id)
    uri.mkdir(parents=True, exist_ok=True)
    return artifact


def examples_from_span(data_root: Path, span: int, dest: Path) -> standard_artifacts.Examples:
    """An Examples artifact laid out like ImportExampleGen's (Split-train/, Split-eval/) for a span."""
    examples = _with_uri(standard_artifacts.Examples(), dest)
    examples.split_names = artifact_utils.encode_split_names(["train", "eval"])
    examples.set_int_custom_property("span", span)
    for split in ("train", "eval"):
        shutil.copytree(span_dir(data_root, span) / split, dest / f"Split-{split}")
    return examples


def schema_from_file(schema_file: Path, dest: Path) -> standard_artifacts.Schema:
    schema = _with_uri(standard_artifacts.Schema(), dest)
    shutil.copy(schema_file, dest / "schema.pbtxt")
    return schema


def output(artifact_type, dest: Path):
    return _with_uri(artifact_type(), dest)
