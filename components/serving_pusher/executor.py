"""ServingPusher executor: checks blessings, writes the next version atomically, updates labels and traffic."""
from __future__ import annotations

import json
import tempfile
from pathlib import Path
from typing import Any

from tfx.dsl.components.base import base_executor
from tfx.proto.orchestration import execution_result_pb2
from tfx.types import artifact_utils
from tfx.utils import path_utils

from components.artifacts import deployment, set_custom_properties
from serving import release as releases

TFLITE_DIR = "tflite"


def skip_reason(input_dict: dict[str, list]) -> str | None:
    """Why this model must not be pushed, or None when every blessing wired in says yes."""
    for key, what in (("model_blessing", "the Evaluator"), ("infra_blessing", "the InfraValidator")):
        for blessing in input_dict.get(key) or []:
            if blessing.get_int_custom_property("blessed") != 1:
                detail = (blessing.get_string_custom_property("reason")
                          if blessing.has_custom_property("reason") else "")
                return f"not blessed by {what}" + (f": {detail}" if detail else "")
    return None


def blessed_variants(quantized_models: list) -> list:
    return [q for q in quantized_models if q.blessed == 1]


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
            return _executor_output(pushed_model, [])

        base = Path(exec_properties["base_path"])
        variants = blessed_variants(input_dict.get("quantized_models") or [])
        batching = json.loads(exec_properties.get("batching") or "{}")
        with releases.locked(base):
            release = releases.read_release(base, model_name)
            labels_before = dict(release.labels)
            for leftover in releases.clean_leftovers(release.model_dir):
                print(f"    removed an interrupted push: {leftover}", flush=True)
            version = releases.next_version(release)
            with tempfile.TemporaryDirectory() as scratch:
                sources = {"": Path(path_utils.serving_model_path(model.uri)), **_tflite_sources(variants, scratch)}
                version_dir = releases.write_version_atomically(release.model_dir, version, sources)
            releases.release_new_version(release, version, exec_properties.get("release") or "direct",
                                         int(exec_properties.get("canary_weight") or 10))
            removed = releases.apply_retention(release, int(exec_properties.get("keep_versions") or 5))
            releases.write_release(release)
            if batching:
                releases.write_batching_config(base, **batching)
        label = next((name for name, v in release.labels.items() if v == version), "")
        traffic = release.weights.get(label, 0)
        set_custom_properties(pushed_model, {"pushed": 1, "pushed_version": str(version),
                                             "pushed_destination": str(version_dir),
                                             "tflite_variants": ",".join(q.variant for q in variants)})
        # The whole release state after this push, so MLMD can answer "what was live at time T".
        # TFX wants several artifacts of one output under the output's own directory.
        record_dir = Path(artifact_utils.get_single_uri(output_dict["deployment"]))
        deployments = [
            deployment(row, model_name=model_name, base_path=str(base.resolve()),
                       uri=str(record_dir / f"version-{row['version']}"))
            for row in releases.snapshot(labels_before, release)]
        print(f"    pushed version {version} of {model_name} as {label} ({traffic}% of unversioned traffic)"
              + (f"; retired versions {removed}" if removed else ""), flush=True)
        return _executor_output(pushed_model, deployments)


def _tflite_sources(variants: list, scratch: str) -> dict[str, Path]:
    """Blessed TFLite variants beside the SavedModel, with a manifest clients can read."""
    if not variants:
        return {}
    sources, manifest = {}, {"variants": []}
    for variant in variants:
        name = variant.variant
        sources[f"{TFLITE_DIR}/{name}.tflite"] = Path(variant.uri) / "model.tflite"
        entry = {"variant": name, "file": f"{name}.tflite", "size_bytes": variant.size_bytes,
                 "accuracy": variant.accuracy, "accuracy_delta": variant.accuracy_delta,
                 "latency_p50_ms": variant.latency_p50_ms}
        for key in ("input_scale", "input_zero_point"):
            if variant.has_custom_property(key):
                entry[key] = variant.get_custom_property(key)
        manifest["variants"].append(entry)
    manifest_path = Path(scratch) / "manifest.json"
    manifest_path.write_text(json.dumps(manifest, indent=2, default=str) + "\n")
    sources[f"{TFLITE_DIR}/manifest.json"] = manifest_path
    return sources


def _executor_output(pushed_model, deployments: list) -> execution_result_pb2.ExecutorOutput:
    """Publishes the PushedModel always, Deployments only when a version was actually pushed."""
    output = execution_result_pb2.ExecutorOutput()
    output.output_artifacts["pushed_model"].artifacts.append(pushed_model.mlmd_artifact)
    output.output_artifacts["deployment"].artifacts.extend(d.mlmd_artifact for d in deployments)
    return output
