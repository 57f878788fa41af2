"""`conveyor doctor` on the faults it exists to find: a damaged saved_model.pb, missing weights, a damaged
TFLite variant or manifest, a damaged batching config, a URL that is not a server's address, something other
than an HTTP server at the URL, a --serving-dir that is not there. Each is a FAIL of the check concerned (or,
for the arguments, a one-line error before any check), the other checks still run, and nothing raises.

The model is a small real SavedModel with an image serving_default (8x8 pixels to class_ids), written once.
"""
from __future__ import annotations

import shutil
import socket
import threading
from pathlib import Path

import pytest
import tensorflow as tf

from conveyor_ml.base.errors import ConveyorError
from conveyor_ml.base.spec import load_spec
from conveyor_ml.operations.doctor import FAIL, OK, SKIP, Target, diagnose, render, resolve_target
from tests.conftest import run_conveyor, write_spec

NO_SERVER = "http://127.0.0.1:9"  # the discard port: nothing answers there
ALL_CHECKS = {"runtime", "preprocessing", "batching", "request_serialization", "graph_optimization",
              "quantized_variants", "gpu_memory_growth", "input_pipeline", "monitoring", "drift_baseline"}


class _Digits(tf.Module):
    def __init__(self):
        super().__init__()
        self.kernel = tf.Variable(tf.random.stateless_normal((64, 10), seed=(3, 4)))

    @tf.function(input_signature=[tf.TensorSpec([None, 8, 8], tf.float32, name="images")])
    def classify(self, images):
        logits = tf.matmul(tf.reshape(images, [-1, 64]), self.kernel)
        return {"class_ids": tf.argmax(logits, axis=1), "logits": logits}


@pytest.fixture(scope="module")
def image_model(tmp_path_factory) -> Path:
    export = tmp_path_factory.mktemp("image_model") / "1"
    module = _Digits()
    tf.saved_model.save(module, str(export),
                        signatures={"serving_default": module.classify.get_concrete_function()})
    return export


@pytest.fixture
def model(image_model, tmp_path) -> Path:
    """A copy of the model to damage: tmp/mnist/1."""
    copy = tmp_path / "mnist" / "1"
    shutil.copytree(image_model, copy)
    return copy


def findings(model_dir: Path, serving_dir: Path | None = None, url: str = NO_SERVER) -> dict:
    report = diagnose(resolve_target(None, str(model_dir), str(serving_dir) if serving_dir else None, url))
    found = {finding.check: finding for finding in report.findings}
    assert set(found) == ALL_CHECKS  # every check ran and reported
    assert report.failed == any(f.status == FAIL for f in found.values())
    render(report)
    return found


def assert_fails(finding, *phrases: str) -> None:
    assert finding.status == FAIL, finding
    assert "could not finish" not in finding.reason, finding  # a known fault has its own message
    for phrase in phrases:
        assert phrase in finding.reason, finding
    assert finding.fix, finding
    assert "\n" not in finding.reason, finding


def test_the_undamaged_model_passes(model):
    found = findings(model)
    assert not [f for f in found.values() if f.status == FAIL], found
    assert found["runtime"].status == OK and found["preprocessing"].status == OK
    assert found["monitoring"].status == SKIP


def test_a_truncated_saved_model_pb_fails_each_check_that_reads_it(model):
    pb = model / "saved_model.pb"
    pb.write_bytes(pb.read_bytes()[: pb.stat().st_size // 2])
    found = findings(model)
    for check in ("runtime", "preprocessing", "request_serialization"):
        assert_fails(found[check], "saved_model.pb cannot be parsed")
        assert "export the model again" in found[check].fix
    assert found["graph_optimization"].status == OK  # the others still ran


def test_an_empty_saved_model_pb_fails(model):
    (model / "saved_model.pb").write_bytes(b"")
    found = findings(model)
    assert_fails(found["runtime"], "saved_model.pb holds no MetaGraph")
    assert_fails(found["preprocessing"], "saved_model.pb")


def test_an_empty_variables_directory_fails_preprocessing(model):
    for path in (model / "variables").iterdir():
        path.unlink()
    found = findings(model)
    assert_fails(found["preprocessing"], "cannot be loaded", "variables.index is missing")
    assert found["runtime"].status == OK  # the graph itself is readable


def test_an_empty_variables_directory_with_batching_reports_the_batching_settings(model, tmp_path):
    for path in (model / "variables").iterdir():
        path.unlink()
    serving = tmp_path / "serving"
    serving.mkdir()
    (serving / "batching.config").write_text("max_batch_size { value: 32 }\n"
                                             "batch_timeout_micros { value: 500 }\n")
    found = findings(model, serving)
    assert found["batching"].status == OK and "max_batch_size 32" in found["batching"].reason
    assert_fails(found["preprocessing"], "variables.index is missing")


def test_a_damaged_tflite_variant_fails_preprocessing_by_name(model):
    (model / "tflite").mkdir()
    (model / "tflite" / "int8.tflite").write_bytes(b"not a flatbuffer at all")
    found = findings(model)
    assert_fails(found["preprocessing"], "int8.tflite", "not a valid Flatbuffer")
    assert "push the model again" in found["preprocessing"].fix


@pytest.mark.parametrize("content, phrase", [
    (b'{"variants": 5}', '"variants" is int'),
    (b'{"variants": null}', '"variants" is NoneType'),
    (b"[1, 2]", "the document is list"),
    (b'{"variants": [5]}', "entry 0 is not"),
    (b'{"variants": [{"file": "int8.tflite"}]}', "entry 0 is not"),
    (b'{"variants": [{"variant": ["int8"]}]}', "entry 0 is not"),
    (b'\xff\xfe{"variants": []}', "not UTF-8"),
    (b'{"variants": [', "not valid JSON"),
    (b"[" * 100_000 + b"]" * 100_000, "nests too deeply"),
    (b'{"variants": [{"variant": "int8", "file": "int8.tflite"}]}', "not there: int8.tflite"),
    (None, "is a directory"),
], ids=["number", "null", "list", "entry-number", "entry-unnamed", "entry-name-list", "not-utf8", "truncated",
        "deep", "file-missing", "directory"])
def test_a_damaged_variant_manifest_fails_quantized_variants(model, content, phrase):
    manifest = model / "tflite" / "manifest.json"
    manifest.parent.mkdir()
    if content is None:
        manifest.mkdir()
    else:
        manifest.write_bytes(content)
    found = findings(model)
    assert_fails(found["quantized_variants"], "manifest.json", phrase)


def test_a_good_variant_manifest_passes(model):
    (model / "tflite").mkdir()
    (model / "tflite" / "manifest.json").write_text('{"variants": [{"variant": "float32"}]}')
    found = findings(model)
    assert found["quantized_variants"].status == OK and "float32" in found["quantized_variants"].reason


def test_a_damaged_batching_config_fails_batching(model, tmp_path):
    serving = tmp_path / "serving"
    serving.mkdir()
    (serving / "batching.config").write_text("max_batch_size { value: ")
    found = findings(model, serving)
    assert_fails(found["batching"], "batching.config", "BatchingParameters")
    (serving / "batching.config").unlink()
    (serving / "batching.config").mkdir()
    assert_fails(findings(model, serving)["batching"], "batching.config")


def test_a_model_saved_by_an_unreadable_tensorflow_version_is_still_checked(model):
    from tensorflow.core.protobuf import saved_model_pb2

    saved_model = saved_model_pb2.SavedModel.FromString((model / "saved_model.pb").read_bytes())
    saved_model.meta_graphs[0].meta_info_def.tensorflow_version = "nightly"
    (model / "saved_model.pb").write_bytes(saved_model.SerializeToString())
    found = findings(model)
    assert found["runtime"].status == OK and "nightly" in found["runtime"].reason


@pytest.mark.parametrize("url", ["", "notaurl", "ftp://x", "http://127.0.0.1:99999", "http://127.0.0.1:0",
                                 "http://:8501", "http://host:port", "http://[::1", "http://a host:8501",
                                 "127.0.0.1:8501"])
def test_a_url_that_is_no_server_address_is_refused_before_any_check(model, url):
    with pytest.raises(ConveyorError, match="--url .* is not a server's address"):
        resolve_target(None, str(model), None, url)


@pytest.mark.parametrize("url", ["http://127.0.0.1:8501", "https://serving.example.com", "http://[::1]:8501/",
                                 "http://localhost"])
def test_a_server_address_is_accepted(model, url):
    assert resolve_target(None, str(model), None, url).url == url


def test_a_target_with_a_bad_url_fails_monitoring(model):
    report = diagnose(Target(model, None, "mnist", "notaurl"))
    monitoring = {f.check: f for f in report.findings}["monitoring"]
    assert monitoring.status == FAIL and "not a server's address" in monitoring.reason


@pytest.fixture
def not_http_server():
    """A TCP server that answers every connection with an SSH banner: not HTTP."""
    listener = socket.create_server(("127.0.0.1", 0))

    def serve():
        while True:
            try:
                connection, _ = listener.accept()
            except OSError:
                return
            with connection:
                connection.sendall(b"SSH-2.0-OpenSSH_9.2\r\n")

    threading.Thread(target=serve, daemon=True).start()
    yield f"http://127.0.0.1:{listener.getsockname()[1]}"
    listener.close()


def test_something_that_does_not_answer_http_fails_monitoring(model, not_http_server):
    found = findings(model, url=not_http_server)
    assert_fails(found["monitoring"], "does not answer as an HTTP server")


@pytest.mark.parametrize("kind", ["missing", "file", "empty"])
def test_a_serving_dir_that_is_not_a_directory_is_refused(model, tmp_path, kind):
    path = {"missing": str(tmp_path / "nonexistent"), "file": str(model / "saved_model.pb"),
            "empty": ""}[kind]
    with pytest.raises(ConveyorError, match="--serving-dir"):
        resolve_target(None, str(model), path, NO_SERVER)


def test_an_unexpected_error_in_one_check_is_that_check_s_fail(model, tmp_path):
    """A span without its eval split (the sample images' source): not a fault a check names, so the guard
    around each check reports it as a FAIL of that check in one line, and the other checks still run."""
    spec = load_spec(write_spec(tmp_path))
    span = spec.data_root / "span-1"
    span.mkdir(parents=True)
    (span / "span.json").write_text("{}")
    report = diagnose(resolve_target(spec, str(model), None, NO_SERVER))
    found = {f.check: f for f in report.findings}
    assert set(found) == ALL_CHECKS
    for check in ("preprocessing", "request_serialization"):
        assert found[check].status == FAIL, found[check]
        assert found[check].reason.startswith(f"the {check} check could not finish: FileNotFoundError: ")
        assert "eval" in found[check].reason and found[check].fix
    assert found["runtime"].status == OK


def test_the_cli_reports_a_damaged_model_as_fail_lines_without_a_traceback(model, tmp_path):
    pb = model / "saved_model.pb"
    pb.write_bytes(pb.read_bytes()[:100])
    (model / "tflite").mkdir()
    (model / "tflite" / "manifest.json").write_text('{"variants": 5}')
    result = run_conveyor("doctor", "--model-dir", model, "--url", NO_SERVER, cwd=tmp_path)
    assert result.returncode == 1, result.stdout + result.stderr
    assert "Traceback" not in result.stderr + result.stdout
    lines = result.stdout.splitlines()
    assert any(line.startswith("FAIL  runtime") and "saved_model.pb cannot be parsed" in line
               for line in lines)
    assert any(line.startswith("FAIL  quantized_variants") for line in lines)
    assert lines[-1].startswith("4 failed")


def test_the_cli_refuses_a_missing_serving_dir_in_one_line(model, tmp_path):
    result = run_conveyor("doctor", "--model-dir", model, "--serving-dir", tmp_path / "nonexistent",
                          "--url", NO_SERVER, cwd=tmp_path)
    assert result.returncode == 2, result.stdout + result.stderr
    assert "Traceback" not in result.stderr
    assert result.stderr.strip().count("\n") == 0 and "--serving-dir" in result.stderr
