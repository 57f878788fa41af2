"""ServingPusher executor: checks blessings, writes the next version atomically, then commits the new labels
and traffic as one release change (formats/release_state.py) and retires old versions after it."""
from __future__ import annotations

import getpass
import json
import socket
import tempfile
from pathlib import Path
from typing import Any

from conveyor_ml.components.artifacts import deployment, recorded_value, set_custom_properties
from conveyor_ml.components.pushing import blessed_variants, pusher_output, release_sources, skip_reason
from tfx.dsl.components.base import base_executor
from tfx.proto.orchestration import execution_result_pb2
from tfx.types import artifact_utils

from conveyor_ml.base.names import PUSH_EXECUTION
from conveyor_ml.formats import release_state as releases


class Executor(base_executor.BaseExecutor):
    def Do(self, input_dict: dict[str, list], output_dict: dict[str, list],
           exec_properties: dict[str, Any]) -> execution_result_pb2.ExecutorOutput:
        model = artifact_utils.get_single_instance(input_dict["model"])
        pushed_model = artifact_utils.get_single_instance(output_dict["pushed_model"])
        model_name = exec_properties["model_name"]

        reason = skip_reason(input_dict)
        if reason:
            set_custom_properties(pushed_model, {"pushed": 0, "skip_reason": reason})
            print(f"    not pushed: {reason}", flush=True)
            return pusher_output(pushed_model, [])

        base = Path(exec_properties["base_path"])
        variants = blessed_variants(input_dict.get("quantized_models") or [])
        batching = json.loads(exec_properties.get("batching") or "{}")
        with releases.locked(base):
            state = releases.read_state(base)
            # What an interrupted push left on disk is put right here; its ML Metadata record, if missing,
            # is written by the next command that has the store (the runner reconciles before and after).
            for line in releases.repair_files(state):
                print(f"    repaired: {line}", flush=True)
            release = state.release(model_name)
            before = release.copy()
            version = releases.next_version(release)
            with tempfile.TemporaryDirectory() as scratch:
                sources = release_sources(model, variants, scratch)
                version_dir = releases.write_version_atomically(release.model_dir, version, sources)
            releases.release_new_version(release, version, exec_properties.get("release") or "direct",
                                         int(exec_properties.get("canary_weight") or 10))
            rows = releases.snapshot(before.labels, release)
            change = releases.ReleaseChange.new(
                PUSH_EXECUTION, model_name, rows,
                releases.change_details(before, release, version=str(version), user=getpass.getuser(),
                                        host=socket.gethostname()),
                retire=releases.retention(release, int(exec_properties.get("keep_versions") or 5)))
            # The labels move first (one commit), the retired versions go after (renamed, then deleted).
            removed = releases.apply_change(state, release, change)
            if batching:
                releases.write_batching_config(base, **batching)
        label = next((name for name, v in release.labels.items() if v == version), "")
        traffic = release.weights.get(label, 0)
        set_custom_properties(pushed_model, {"pushed": 1, "pushed_version": str(version),
                                             "pushed_destination": str(version_dir),
                                             "tflite_variants": ",".join(recorded_value(q, "variant") for q in variants)})
        # The whole release state after this push, so MLMD can answer "what was live at time T".
        # TFX wants several artifacts of one output under the output's own directory.
        record_dir = Path(artifact_utils.get_single_uri(output_dict["deployment"]))
        deployments = [
            deployment(row, model_name=model_name, base_path=str(base.resolve()),
                       uri=str(record_dir / f"version-{row['version']}"), change_id=change.id)
            for row in rows]
        print(f"    pushed version {version} of {model_name} as {label} ({traffic}% of unversioned traffic)"
              + (f"; retired versions {removed}" if removed else ""), flush=True)
        return pusher_output(pushed_model, deployments)
