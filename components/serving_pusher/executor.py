"""ServingPusher executor: checks blessings, writes the next version atomically, updates labels and traffic."""
from __future__ import annotations

import logging
import tempfile
from dataclasses import asdict
from pathlib import Path
from typing import Any

from tfx.proto.orchestration import execution_result_pb2
from tfx.types import artifact_utils

from conveyor_ml.base.spec import ServingPusherSettings
from conveyor_ml.components.artifacts import deployment, recorded_value
from conveyor_ml.components.parameters import settings_from
from conveyor_ml.components.pushing import BlessedModelPusher, blessed_variants, pusher_output
from conveyor_ml.formats import release_state as releases

log = logging.getLogger(__name__)


class Executor(BlessedModelPusher):
    def Do(self, input_dict: dict[str, list], output_dict: dict[str, list],
           exec_properties: dict[str, Any]) -> execution_result_pb2.ExecutorOutput:
        settings = settings_from(ServingPusherSettings, exec_properties)
        pushed_model = artifact_utils.get_single_instance(output_dict["pushed_model"])
        model_name = settings.model_name

        reason = self.skip_reason(input_dict)
        if reason:
            self.mark_not_pushed(pushed_model, reason)
            log.info("not pushed: %s", reason)
            return pusher_output(pushed_model, [])

        base = Path(settings.base_path)
        variants = blessed_variants(input_dict.get("quantized_models") or [])
        with releases.locked(base):
            release = releases.read_release(base, model_name)
            labels_before = dict(release.labels)
            for leftover in releases.clean_leftovers(release.model_dir):
                log.info("removed an interrupted push: %s", leftover)
            version = releases.next_version(release)
            with tempfile.TemporaryDirectory() as scratch:
                sources = self.release_sources(input_dict, variants, scratch)
                version_dir = releases.write_version_atomically(release.model_dir, version, sources)
            releases.release_new_version(release, version, settings.release, settings.canary_weight)
            removed = releases.apply_retention(release, settings.keep_versions)
            releases.write_release(release)
            releases.write_batching_config(base, **asdict(settings.batching))
        label = next((name for name, v in release.labels.items() if v == version), "")
        traffic = release.weights.get(label, 0)
        self.mark_pushed(pushed_model, str(version_dir), str(version),
                         tflite_variants=",".join(recorded_value(q, "variant") for q in variants))
        # The whole release state after this push, so MLMD can answer "what was live at time T".
        # TFX wants several artifacts of one output under the output's own directory.
        record_dir = Path(artifact_utils.get_single_uri(output_dict["deployment"]))
        deployments = [
            deployment(row, model_name=model_name, base_path=str(base.resolve()),
                       uri=str(record_dir / f"version-{row['version']}"))
            for row in releases.snapshot(labels_before, release)]
        log.info("pushed version %d of %s as %s (%d%% of unversioned traffic)%s", version, model_name, label, traffic,
                 f"; retired versions {removed}" if removed else "")
        return pusher_output(pushed_model, deployments)
