"""StatisticsGen executor: TFDV statistics of every split, with pixel statistics computed from the raw image
bytes (pixel_statistics.py) added to TFDV's own generators. TFX's executor builds its options from JSON, which
cannot carry a generator, so this executor runs the same Beam pipeline itself."""
from __future__ import annotations

import logging
import os
from typing import Any

import tensorflow_data_validation as tfdv
from tfx.components.statistics_gen.executor import DEFAULT_FILE_NAME
from tfx.components.util import tfxio_utils
from tfx.dsl.components.base import base_beam_executor
from tfx.types import artifact_utils, standard_component_specs
from tfx.utils import io_utils, json_utils

from conveyor_ml.components.statistics_gen.pixel_statistics import PixelStatistics

log = logging.getLogger(__name__)


class Executor(base_beam_executor.BaseBeamExecutor):
    def Do(self, input_dict: dict[str, list], output_dict: dict[str, list], exec_properties: dict[str, Any]) -> None:
        examples = artifact_utils.get_single_instance(input_dict[standard_component_specs.EXAMPLES_KEY])
        statistics = artifact_utils.get_single_instance(output_dict[standard_component_specs.STATISTICS_KEY])
        excluded = json_utils.loads(exec_properties.get(standard_component_specs.EXCLUDE_SPLITS_KEY) or "[]") or []
        splits = [s for s in artifact_utils.decode_split_names(examples.split_names) if s not in excluded]
        statistics.split_names = artifact_utils.encode_split_names(splits)

        options_json = exec_properties.get(standard_component_specs.STATS_OPTIONS_JSON_KEY)
        options = tfdv.StatsOptions.from_json(options_json) if options_json else tfdv.StatsOptions()
        if input_dict.get(standard_component_specs.SCHEMA_KEY):
            schema_dir = artifact_utils.get_single_uri(input_dict[standard_component_specs.SCHEMA_KEY])
            options.schema = io_utils.SchemaReader().read(io_utils.get_only_uri_in_dir(schema_dir))
        options.generators = [*(options.generators or []), PixelStatistics()]

        with self._make_beam_pipeline() as pipeline:
            for split in splits:
                tfxio = tfxio_utils.get_split_tfxio(examples=[examples], split=split,
                                                    telemetry_descriptors=["Conveyor", "StatisticsGen"])
                output = os.path.join(artifact_utils.get_split_uri([statistics], split), DEFAULT_FILE_NAME)
                _ = (pipeline
                     | f"Read[{split}]" >> tfxio.BeamSource()
                     | f"GenerateStatistics[{split}]" >> tfdv.GenerateStatistics(options)
                     | f"Write[{split}]" >> tfdv.WriteStatisticsToBinaryFile(output))
        log.info("statistics of %s (pixels from the raw image bytes)", ", ".join(splits))
