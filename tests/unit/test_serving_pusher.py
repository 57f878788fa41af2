"""The ServingPusher executor, called directly: skip when unblessed, crash safety, retention, TFLite files."""
from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

from tensorflow_serving.config import model_server_config_pb2
from tfx.types import standard_artifacts

from conveyor_ml.components.artifacts import Deployment, QuantizedModel, set_custom_properties
from conveyor_ml.components.serving_pusher import executor
from conveyor_ml.formats import release_state as releases
from conveyor_ml.formats.release_state import versions_on_disk
from conveyor_ml.serving.version_manager import ModelVersions
from tests.artifacts import output
from tests.tiny_models import write_tiny_model


def blessing(kind, blessed: int, tmp: Path, reason: str = ""):
    artifact = output(kind, tmp / f"{kind.TYPE_NAME}-{blessed}")
    artifact.set_int_custom_property("blessed", blessed)
    if reason:
        artifact.set_string_custom_property("reason", reason)
    return artifact


def push(model, base: Path, tmp: Path, *, blessed=1, infra=1, release="direct", keep=5, quantized=(), **more):
    inputs = {"model": [model], "model_blessing": [blessing(standard_artifacts.ModelBlessing, blessed, tmp)],
              "infra_blessing": [blessing(standard_artifacts.InfraBlessing, infra, tmp, "server did not start")],
              "quantized_models": list(quantized)}
    outputs = {"pushed_model": [output(standard_artifacts.PushedModel, tmp / "pushed")],
               "deployment": [output(Deployment, tmp / "deployment")]}
    result = executor.Executor().Do(inputs, outputs, {
        "model_name": "tiny", "base_path": str(base), "release": release, "canary_weight": 20,
        "keep_versions": keep, "batching": json.dumps({"max_batch_size": 32, "batch_timeout_micros": 1000,
                                                       "max_enqueued_batches": 4, "num_batch_threads": 1}),
        **more})
    return outputs["pushed_model"][0], result


def test_unblessed_models_are_never_pushed(tiny_model_artifact, tmp_path):
    pushed, result = push(tiny_model_artifact, tmp_path / "serving", tmp_path, infra=0)
    assert pushed.get_int_custom_property("pushed") == 0
    assert pushed.get_string_custom_property("skip_reason") == \
        "not blessed by the InfraValidator: server did not start"
    assert not result.output_artifacts["deployment"].artifacts  # no Deployment for a push that did not happen
    assert not (tmp_path / "serving" / "tiny").exists()
    pushed, _ = push(tiny_model_artifact, tmp_path / "serving", tmp_path, blessed=0)
    assert pushed.get_string_custom_property("skip_reason") == "not blessed by the Evaluator"


def test_pushes_count_up_write_labels_batching_and_deployments(tiny_model_artifact, tmp_path):
    base = tmp_path / "serving"
    push(tiny_model_artifact, base, tmp_path)
    pushed, result = push(tiny_model_artifact, base, tmp_path, release="canary")
    assert pushed.get_string_custom_property("pushed_version") == "2"
    state = releases.read_release(base, "tiny")
    assert state.labels == {"stable": 1, "canary": 2} and state.weights == {"stable": 80, "canary": 20}
    assert "max_batch_size" in (base / "batching.config").read_text()
    rows = {a.custom_properties["version"].string_value: a.custom_properties for a in result.output_artifacts["deployment"].artifacts}
    assert rows["1"]["label"].string_value == "stable" and rows["1"]["traffic_percent"].int_value == 80
    assert rows["2"]["release_state"].string_value == "canary"


def test_retention_keeps_the_newest_and_labelled_versions(tiny_model_artifact, tmp_path):
    base = tmp_path / "serving"
    push(tiny_model_artifact, base, tmp_path, keep=2)
    for _ in range(3):
        push(tiny_model_artifact, base, tmp_path, release="canary", keep=2)
    assert sorted(versions_on_disk(base / "tiny")) == [1, 3, 4]  # 1 is stable, 3 and 4 the newest


def test_blessed_tflite_variants_are_published_beside_the_model(tiny_model_artifact, tmp_path):
    variants = []
    for name, blessed in (("float16", 1), ("int8", 0)):
        variant = output(QuantizedModel, tmp_path / name)
        (Path(variant.uri) / "model.tflite").write_bytes(b"TFL3" + name.encode())
        set_custom_properties(variant, {"variant": name, "blessed": blessed, "size_bytes": 10, "accuracy": 0.97,
                                        "accuracy_delta": -0.001, "latency_p50_ms": 0.05})
        variants.append(variant)
    push(tiny_model_artifact, tmp_path / "serving", tmp_path, quantized=variants)
    tflite = tmp_path / "serving" / "tiny" / "1" / "tflite"
    assert sorted(p.name for p in tflite.iterdir()) == ["float16.tflite", "manifest.json"]
    manifest = json.loads((tflite / "manifest.json").read_text())
    assert [v["variant"] for v in manifest["variants"]] == ["float16"]


PUSH_SCRIPT = """
import json, sys
from tests.unit.test_serving_pusher import push
from tests.artifacts import output
from tensorflow_serving.config import model_server_config_pb2
from tfx.types import standard_artifacts
from pathlib import Path
model = output(standard_artifacts.Model, Path(sys.argv[1]))
push(model, Path(sys.argv[2]), Path(sys.argv[3]))
"""


def test_a_push_killed_mid_copy_leaves_no_partial_version(tiny_model_artifact, tmp_path):
    big = tmp_path / "big-model"
    export = big / "Format-Serving"
    write_tiny_model(export)
    padding = export / "assets"
    padding.mkdir(exist_ok=True)
    for index in range(400):  # ~100 MB so the copy is still running when the kill comes
        (padding / f"blob-{index:03d}").write_bytes(bytes(256 * 1024))
    base = tmp_path / "serving"
    child = subprocess.Popen([sys.executable, "-c", PUSH_SCRIPT, str(big), str(base), str(tmp_path / "child")])
    model_dir = base / "tiny"
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        staging = list(model_dir.glob(".1.tmp-*")) if model_dir.exists() else []
        if staging and (staging[0] / "assets").exists() and len(list((staging[0] / "assets").iterdir())) > 20:
            break
        time.sleep(0.01)
    child.send_signal(signal.SIGKILL)
    child.wait()
    assert staging, "the push never started copying"
    assert sorted(versions_on_disk(model_dir)) == []  # no version 1, only the hidden staging directory
    watcher = ModelVersions(model_server_config_pb2.ModelConfig(name="tiny", base_path=str(model_dir)))
    watcher.poll()
    assert watcher.available_versions() == [] and watcher.statuses() == []

    push(tiny_model_artifact, base, tmp_path)  # the next run cleans the leftover and pushes a whole version
    assert not list(model_dir.glob(".*.tmp-*"))
    assert sorted(versions_on_disk(model_dir)) == [1]
    watcher.poll()
    assert watcher.available_versions() == [1]


def test_a_shadow_push_is_mirrored_and_takes_no_live_weight(tiny_model_artifact, tmp_path):
    base = tmp_path / "serving"
    push(tiny_model_artifact, base, tmp_path)
    push(tiny_model_artifact, base, tmp_path, release="shadow", shadow_percent=25)
    state = releases.read_release(base, "tiny")
    assert state.labels == {"stable": 1, "shadow": 2} and state.weights == {"stable": 100}
    traffic = json.loads((base / "traffic.json").read_text())
    assert traffic["shadow"] == {"tiny": {"label": "shadow", "percent": 25}}


def test_an_analysed_canary_push_waits_for_its_analysis_and_no_push_replaces_a_running_one(tiny_model_artifact,
                                                                                           tmp_path):
    import socket

    base = tmp_path / "serving"
    push(tiny_model_artifact, base, tmp_path)
    push(tiny_model_artifact, base, tmp_path, release="canary", analysis_steps=[5, 50, 100])
    state = releases.read_release(base, "tiny")
    assert state.labels == {"stable": 1, "canary": 2} and state.weights == {"stable": 95, "canary": 5}
    assert state.pending_analysis() == 2  # for `conveyor release canary` (the scheduler starts it)
    owner = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        with releases.locked(base):  # an analysis process claims the canary, as progressive_delivery does
            current = releases.read_state(base)
            current.models["tiny"].analysis = {"version": 2, "pid": owner.pid, "host": socket.gethostname(),
                                               "started": releases.process_start(owner.pid)}
            releases.commit(current)
        pushed, result = push(tiny_model_artifact, base, tmp_path, release="canary", analysis_steps=[5, 50, 100])
        assert pushed.get_int_custom_property("pushed") == 0
        assert "a canary analysis of version 2 is in progress" in pushed.get_string_custom_property("skip_reason")
        assert sorted(versions_on_disk(base / "tiny")) == [1, 2]
    finally:
        owner.kill()
        owner.wait()
    pushed, _ = push(tiny_model_artifact, base, tmp_path, release="canary", analysis_steps=[5, 50, 100])
    assert pushed.get_string_custom_property("pushed_version") == "3"  # its owner is gone: the claim lapsed
