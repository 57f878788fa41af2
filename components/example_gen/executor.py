"""The pipeline's ExampleGen: imports the newest span (its TFX driver resolves `span-{SPAN}` and fingerprints
it for the cache) into the Examples artifact without re-encoding a record.

A span is already what an Examples artifact holds, sharded gzipped TFRecords of tf.Examples per split,
written once by the ingestion pipeline (`conveyor data add-span`). So the import links each shard into the
artifact's split directory: a hard link on a local disk (a span is immutable, so sharing its files is
safe), a copy on object stores. Constant time and memory whatever the span's size, where TFX's
ImportExampleGen would read, reshuffle (in memory, on the DirectRunner) and rewrite every example.
"""
from __future__ import annotations

import json
import logging
import os
import shutil
from typing import Any

import apache_beam as beam
from apache_beam.io.filesystems import FileSystems
from tfx.components.example_gen import utils
from tfx.components.example_gen.base_example_gen_executor import BaseExampleGenExecutor
from tfx.components.util import examples_utils
from tfx.proto import example_gen_pb2
from tfx.types import artifact_utils, standard_component_specs
from tfx.utils import proto_utils

from conveyor_ml.base.errors import ConveyorError
from conveyor_ml.components.artifacts import set_custom_properties
from conveyor_ml.formats.spans import MANIFEST, parse_manifest

log = logging.getLogger(__name__)


@beam.ptransform_fn
@beam.typehints.with_input_types(beam.Pipeline)
@beam.typehints.with_output_types(bytes)
def _SerializedRecords(pipeline: beam.Pipeline, exec_properties: dict[str, Any], split_pattern: str):
    """The records of one split, for TFX's generic Beam path (GenerateExamplesByBeam); `Do` links instead."""
    pattern = os.path.join(exec_properties[standard_component_specs.INPUT_BASE_KEY], split_pattern)
    return pipeline | "ReadFromTFRecord" >> beam.io.ReadFromTFRecord(file_pattern=pattern)


def _link_or_copy(source: str, destination: str) -> str:
    """'link' when the destination shares the source's inode, else 'copy'."""
    if "://" not in source and "://" not in destination:
        os.makedirs(os.path.dirname(destination), exist_ok=True)
        try:
            os.link(source, destination)
            return "link"
        except OSError:  # another file system, or one without hard links
            shutil.copyfile(source, destination)
            return "copy"
    FileSystems.copy([source], [destination])
    return "copy"


def _span_directory(input_base: str, pattern: str) -> str:
    """`<input_base>/span-N` from a resolved split pattern `span-N/<split>/*`."""
    return os.path.join(input_base, pattern.split("/", 1)[0])


class Executor(BaseExampleGenExecutor):
    def GetInputSourceToExamplePTransform(self) -> beam.PTransform:
        return _SerializedRecords

    def Do(self, input_dict: dict[str, list], output_dict: dict[str, list], exec_properties: dict[str, Any]) -> None:
        input_base = exec_properties[standard_component_specs.INPUT_BASE_KEY]
        input_config = example_gen_pb2.Input()
        proto_utils.json_to_proto(exec_properties[standard_component_specs.INPUT_CONFIG_KEY], input_config)
        output_config = example_gen_pb2.Output()
        proto_utils.json_to_proto(exec_properties[standard_component_specs.OUTPUT_CONFIG_KEY], output_config)
        if output_config.split_config.splits:
            raise ConveyorError("ExampleGen: a span keeps its own train/eval split; output_config must not split")
        examples = artifact_utils.get_single_instance(output_dict[standard_component_specs.EXAMPLES_KEY])
        split_names = utils.generate_output_split_names(input_config, output_config)
        examples.split_names = artifact_utils.encode_split_names(split_names)

        span_directory = _span_directory(input_base, input_config.splits[0].pattern)
        manifest_path = os.path.join(span_directory, MANIFEST)
        if not FileSystems.exists(manifest_path):
            raise ConveyorError(f"{span_directory} has no {MANIFEST}: it is still being written, or was not written "
                                "by `conveyor data`; spans are published whole, with their manifest last")
        with FileSystems.open(manifest_path) as handle:
            manifest = parse_manifest(handle.read(), manifest_path)

        methods = set()
        for split in input_config.splits:
            [matched] = FileSystems.match([os.path.join(input_base, split.pattern)])
            files = sorted(m.path for m in matched.metadata_list)
            if not files:
                raise ConveyorError(f"span {manifest.get('span')}: no files match {split.pattern} under {input_base}")
            destination = artifact_utils.get_split_uri([examples], split.name)
            for path in files:
                methods.add(_link_or_copy(path, os.path.join(destination, os.path.basename(path))))
            log.info("%s: %d examples in %d shards", split.name, manifest.get("examples", {}).get(split.name, -1),
                     len(files))

        examples_utils.set_payload_format(examples, example_gen_pb2.FORMAT_TF_EXAMPLE)
        examples_utils.set_file_format(examples, "tfrecords_gzip")
        counts = manifest.get("examples", {})
        set_custom_properties(examples, {
            "examples_train": counts.get("train"), "examples_eval": counts.get("eval"),
            "source": manifest.get("source"), "image_encoding": json.dumps(manifest.get("encoding", "image float list")),
            "span_created": manifest.get("created")})
        how = {"link": "hard links", "copy": "copies"}
        log.info("imported %s as %s", span_directory, " and ".join(how[m] for m in sorted(methods)))
