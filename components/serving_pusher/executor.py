"""ServingPusher executor: checks blessings, writes the next version atomically, then commits the new labels
and traffic as one release change (formats/release_state.py) and retires old versions after it."""
from __future__ import annotations

import getpass
import logging
import socket
import tempfile
from dataclasses import asdict
from pathlib import Path
from typing import Any

from tfx.proto.orchestration import execution_result_pb2
from tfx.types import artifact_utils

from conveyor_ml.base.names import PUSH_EXECUTION
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
            state = releases.read_state(base)
            # What an interrupted push left on disk is put right here; its ML Metadata record, if missing,
            # is written by the next command that has the store (the runner reconciles before and after).
            for line in releases.repair_files(state):
                log.info("repaired: %s", line)
            release = state.release(model_name)
            if release.analysis_running():
                # A canary analysis owns the release: a push now would replace the canary it is judging.
                reason = (f"a canary analysis of version {release.analysis['version']} is in progress (process "
                          f"{release.analysis['pid']}); the next run pushes once it has a verdict")
                self.mark_not_pushed(pushed_model, reason)
                log.info("not pushed: %s", reason)
                return pusher_output(pushed_model, [])
            before = release.copy()
            version = releases.next_version(release)
            with tempfile.TemporaryDirectory() as scratch:
                sources = self.release_sources(input_dict, variants, scratch)
                version_dir = releases.write_version_atomically(release.model_dir, version, sources)
            canary_weight = settings.analysis.steps[0] if settings.analysis else settings.canary_weight
            releases.release_new_version(release, version, settings.release, min(canary_weight, 99),
                                         settings.shadow_percent)
            if settings.release == "canary" and settings.analysis and release.labels.get(releases.CANARY) == version:
                # Left for `conveyor release canary` (which `conveyor schedule` starts after the run).
                release.analysis = {"version": version, "pending": True}
            rows = releases.snapshot(before.labels, release)
            change = releases.ReleaseChange.new(
                PUSH_EXECUTION, model_name, rows,
                releases.change_details(before, release, version=str(version), user=getpass.getuser(),
                                        host=socket.gethostname()),
                retire=releases.retention(release, settings.keep_versions))
            # The labels move first (one commit), the retired versions go after (renamed, then deleted).
            removed = releases.apply_change(state, release, change)
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
                       uri=str(record_dir / f"version-{row['version']}"), change_id=change.id)
            for row in rows]
        log.info("pushed version %d of %s as %s (%d%% of unversioned traffic)%s", version, model_name, label, traffic,
                 f"; retired versions {removed}" if removed else "")
        if release.pending_analysis() == version:
            log.info("canary analysis of version %d pending: `conveyor release canary %s --version %d` runs it "
                     "(`conveyor schedule` starts it after the run)", version, model_name, version)
        return pusher_output(pushed_model, deployments)
