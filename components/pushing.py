"""What both pushers share: TFX's Pusher executor, the files that make up a release, and what they publish."""
from __future__ import annotations

import json
from pathlib import Path

from tfx.components.pusher import executor as tfx_pusher
from tfx.proto.orchestration import execution_result_pb2
from tfx.types import standard_artifacts
from tfx.types.component_spec import ChannelParameter

from conveyor_ml.components.artifacts import Deployment, QuantizedModel, recorded_value, set_custom_properties

TFLITE_DIR = "tflite"

# Both pushers take the same inputs and publish the same outputs, so lineage reads them alike.
PUSHER_INPUTS = {
    "model": ChannelParameter(type=standard_artifacts.Model),
    "model_blessing": ChannelParameter(type=standard_artifacts.ModelBlessing),
    "infra_blessing": ChannelParameter(type=standard_artifacts.InfraBlessing, optional=True),
    "quantized_models": ChannelParameter(type=QuantizedModel, optional=True),
}
PUSHER_OUTPUTS = {
    "pushed_model": ChannelParameter(type=standard_artifacts.PushedModel),
    "deployment": ChannelParameter(type=Deployment),
}


class BlessedModelPusher(tfx_pusher.Executor):
    """TFX's Pusher executor, which both our pushers extend as tfx-addons' pushers do: its blessing check
    (`CheckBlessing`), model path (`GetModelPath`) and pushed / not-pushed marks; our destinations on top."""

    def skip_reason(self, input_dict: dict[str, list]) -> str | None:
        """Why this model must not be pushed (TFX's blessing check, with the validator's own reason), or None."""
        if self.CheckBlessing(input_dict):
            return None
        for key, what in (("model_blessing", "the Evaluator"), ("infra_blessing", "the InfraValidator")):
            for blessing in input_dict.get(key) or []:
                if blessing.get_int_custom_property("blessed") != 1:
                    detail = (blessing.get_string_custom_property("reason")
                              if blessing.has_custom_property("reason") else "")
                    return f"not blessed by {what}" + (f": {detail}" if detail else "")
        return "not blessed"

    def mark_not_pushed(self, pushed_model, reason: str) -> None:
        self._MarkNotPushed(pushed_model)
        pushed_model.set_string_custom_property("skip_reason", reason)

    def mark_pushed(self, pushed_model, destination: str, version: str, **details) -> None:
        self._MarkPushed(pushed_model, pushed_destination=destination, pushed_version=version)
        set_custom_properties(pushed_model, details)

    def release_sources(self, input_dict: dict[str, list], variants: list, scratch: str) -> dict[str, Path]:
        """{relative destination: local source} for one release: the SavedModel at the root ("") and the
        blessed TFLite variants under tflite/ with a manifest clients can read."""
        sources = {"": Path(self.GetModelPath(input_dict))}
        if not variants:
            return sources
        manifest = {"variants": []}
        for variant in variants:
            name = recorded_value(variant, "variant")
            sources[f"{TFLITE_DIR}/{name}.tflite"] = Path(variant.uri) / "model.tflite"
            entry = {"variant": name, "file": f"{name}.tflite"}
            for key in ("size_bytes", "accuracy", "accuracy_delta", "latency_p50_ms", "input_scale",
                        "input_zero_point"):
                if recorded_value(variant, key) is not None:
                    entry[key] = recorded_value(variant, key)
            manifest["variants"].append(entry)
        manifest_path = Path(scratch) / "manifest.json"
        manifest_path.write_text(json.dumps(manifest, indent=2, default=str) + "\n")
        sources[f"{TFLITE_DIR}/manifest.json"] = manifest_path
        return sources


def blessed_variants(quantized_models: list) -> list:
    return [q for q in quantized_models if recorded_value(q, "blessed") == 1]


def files_of(sources: dict[str, Path]) -> list[tuple[Path, str]]:
    """Every (local file, relative name) of a release, directories expanded, in a stable order."""
    files = []
    for destination, source in sources.items():
        if source.is_dir():
            for path in sorted(p for p in source.rglob("*") if p.is_file()):
                files.append((path, "/".join(filter(None, [destination, path.relative_to(source).as_posix()]))))
        else:
            files.append((source, destination))
    return files


def pusher_output(pushed_model, deployments: list) -> execution_result_pb2.ExecutorOutput:
    """Publishes the PushedModel always, Deployments only when a version was actually pushed."""
    output = execution_result_pb2.ExecutorOutput()
    output.output_artifacts["pushed_model"].artifacts.append(pushed_model.mlmd_artifact)
    output.output_artifacts["deployment"].artifacts.extend(d.mlmd_artifact for d in deployments)
    return output
