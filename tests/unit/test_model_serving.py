"""Servables, version management, batching and admission, on small real SavedModels, in process (no server)."""
import shutil
import threading
from concurrent.futures import ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout

import grpc
import numpy as np
import pytest
from tensorflow_serving.config import model_server_config_pb2

from conveyor_ml.formats.release_state import versions_on_disk
from conveyor_ml.formats.serving_config import BatchingOptions
from conveyor_ml.serving.batcher import Batcher
from conveyor_ml.serving.errors import ServingError
from conveyor_ml.serving.loader import load_servable
from conveyor_ml.serving.model_server import Admission, Call
from conveyor_ml.serving.servable import LoadOptions, SavedModelServable
from conveyor_ml.serving.version_manager import AVAILABLE, END, LoadRetries, ModelVersions
from tests.tiny_models import write_first_row_model, write_tiny_model


@pytest.fixture(scope="module")
def tiny_export(tmp_path_factory):
    return write_tiny_model(tmp_path_factory.mktemp("tiny") / "export")


@pytest.fixture(scope="module")
def servable(tiny_export):
    return SavedModelServable("tiny", 1, tiny_export)


def model_config(base, **labels):
    config = model_server_config_pb2.ModelConfig(name="tiny", base_path=str(base))
    for label, version in labels.items():
        config.version_labels[label] = version
    return config


def test_servable_runs_signatures_and_checks_input_names(servable):
    out = servable.predict("", {"x": np.ones((2, 3), np.float32)})
    np.testing.assert_array_equal(out["y"], np.full((2, 3), 2.0))
    out = servable.predict("add", {"a": np.array([1.0], np.float32), "b": np.array([2.0], np.float32)}, output_filter=("sum",))
    assert list(out) == ["sum"] and out["sum"].tolist() == [3.0]
    with pytest.raises(ServingError, match='Serving signature name: "nope" not found'):
        servable.predict("nope", {"x": np.ones((1, 3))})
    with pytest.raises(ServingError, match=r"Missing but required: \{b\}"):
        servable.predict("add", {"a": np.array([1.0], np.float32)})
    # As in TF Serving, shapes are the graph's business, not the signature's: x * 2 takes any shape...
    np.testing.assert_array_equal(servable.predict("", {"x": np.ones((2, 4), np.float32)})["y"], np.full((2, 4), 2.0))
    # ...and what the graph cannot take is refused with TensorFlow's reason.
    with pytest.raises(ServingError, match=r"Incompatible shapes: \[2\] vs. \[3\]") as refused:
        servable.predict("add", {"a": np.ones(2, np.float32), "b": np.ones(3, np.float32)})
    assert refused.value.http_status == 400
    assert refused.value.for_request({"a": np.ones(2), "b": np.ones(3)}).message.endswith(
        "(the model refused the inputs: a [2], b [3])")
    with pytest.raises(ServingError, match=r"input 'x' is DT_DOUBLE but the model's tensor serving_default_x:0 takes "
                                           r"DT_FLOAT"):
        servable.predict("", {"x": np.ones((1, 3), np.float64)})
    with pytest.raises(ServingError, match="output tensor alias not found"):
        servable.predict("add", {"a": np.array([1.0], np.float32), "b": np.array([2.0], np.float32)}, output_filter=("product",))
    # TF Serving's default: no method-name check, but Classify needs a signature shaped like a classifier.
    with pytest.raises(ServingError, match="No classification inputs found in SignatureDef"):
        servable.classify("", [b""])


def test_signature_method_name_check_when_enabled(tiny_export):
    checked = SavedModelServable("tiny", 1, tiny_export, LoadOptions(signature_method_name_check=True))
    with pytest.raises(ServingError, match="Expected classification signature method_name to be "
                                           "tensorflow/serving/classify. Was: tensorflow/serving/predict"):
        checked.classify("", [b""])
    with pytest.raises(ServingError, match="Expected regression signature method_name"):
        checked.regress("", [b""])


def test_versions_on_disk_ignore_temporary_and_files(tmp_path):
    (tmp_path / "1").mkdir()
    (tmp_path / "0002").mkdir()
    (tmp_path / ".3.tmp-99").mkdir()
    (tmp_path / "4").write_text("a file")
    assert sorted(versions_on_disk(tmp_path)) == [1, 2]


def test_new_version_replaces_old_only_when_loaded(tmp_path, tiny_export):
    base = tmp_path / "tiny"
    shutil.copytree(tiny_export, base / "1")
    model = ModelVersions(model_config(base))
    model.poll()
    assert model.available_versions() == [1]
    (base / "2").mkdir()  # an incomplete copy: no saved_model.pb yet
    model.poll()
    assert model.available_versions() == [1]
    assert model.statuses(2)[0].state == END and "not a complete SavedModel" in model.statuses(2)[0].error
    shutil.rmtree(base / "2")
    shutil.copytree(tiny_export, base / "2")
    model.poll()
    assert model.available_versions() == [2]
    assert model.statuses(1)[0].state == END
    assert model.resolve().version == 2


def test_corrupt_version_never_replaces_a_healthy_one(tmp_path, tiny_export):
    base = tmp_path / "tiny"
    shutil.copytree(tiny_export, base / "1")
    shutil.copytree(tiny_export, base / "2")
    (base / "2" / "saved_model.pb").write_bytes(b"garbage")
    model = ModelVersions(model_config(base))
    model.poll()
    model.poll()
    assert model.available_versions() == [1]
    status = model.statuses(2)[0]
    assert status.state == END and "failed" in status.error
    assert model.statuses(1)[0].state == AVAILABLE


@pytest.mark.parametrize("breakage", ["missing saved_model.pb", "empty saved_model.pb"])
def test_restart_with_a_broken_newest_version_serves_the_newest_healthy_one(tmp_path, tiny_export, breakage):
    """A fresh ModelVersions is a restarted server: it never loaded version 1, yet serves it, not 503."""
    base = tmp_path / "tiny"
    for version in (1, 2):
        shutil.copytree(tiny_export, base / str(version))
    if breakage == "missing saved_model.pb":
        (base / "2" / "saved_model.pb").unlink()
    else:
        (base / "2" / "saved_model.pb").write_bytes(b"")
    model = ModelVersions(model_config(base))
    model.poll()
    assert model.available_versions() == [1]
    assert model.resolve().version == 1
    status = model.statuses(2)[0]
    assert status.state == END and "not a complete SavedModel" in status.error
    shutil.copy(tiny_export / "saved_model.pb", base / "2" / "saved_model.pb")  # the copy completes
    model.poll()
    assert model.available_versions() == [2]


def test_labels_and_weighted_split(tmp_path, tiny_export):
    base = tmp_path / "tiny"
    for version in (1, 2):
        shutil.copytree(tiny_export, base / str(version))
    config = model_config(base, stable=1, canary=2)
    config.model_version_policy.all.SetInParent()
    model = ModelVersions(config)
    model.poll()
    assert model.resolve(label="canary").version == 2
    with pytest.raises(ServingError) as error:
        model.resolve(label="beta")
    assert error.value.http_status == 400 and "Unrecognized servable version label: beta" in error.value.message
    with pytest.raises(ServingError) as error:
        model.resolve(version=9)
    assert error.value.http_status == 404
    picks = [model.resolve(weights={"stable": 75, "canary": 25}).version for _ in range(2000)]
    assert 0.21 < picks.count(2) / len(picks) < 0.29
    assert {model.resolve().version for _ in range(20)} == {2}  # no weights: the latest, like TF Serving


def test_no_version_yet_is_unavailable(tmp_path):
    model = ModelVersions(model_config(tmp_path / "empty"))
    model.poll()
    with pytest.raises(ServingError) as error:
        model.resolve()
    assert error.value.http_status == 503


def test_batcher_merges_concurrent_requests_and_splits_results(servable):
    sizes = []
    # Others are on their way (arriving > 0): a batch waits for them up to batch_timeout_micros.
    batcher = Batcher(BatchingOptions(max_batch_size=64, batch_timeout_micros=20000, max_enqueued_batches=10,
                                      num_batch_threads=1), on_batch=lambda model, size, depth: sizes.append(size),
                      arriving=lambda: 1)
    try:
        inputs = [np.full((2, 3), i, np.float32) for i in range(10)]
        with ThreadPoolExecutor(10) as pool:
            futures = list(pool.map(lambda x: batcher.submit(servable, "serving_default", {"x": x}), inputs))
        for i, future in enumerate(futures):
            np.testing.assert_array_equal(future.result(timeout=10)["y"], np.full((2, 3), 2.0 * i))
        assert max(sizes) > 2, sizes  # requests were merged
        assert sum(sizes) == 20
    finally:
        batcher.stop()


def test_batcher_does_not_wait_for_company_when_nothing_else_is_arriving(servable):
    """With nothing else on its way, a batch runs at once: a 60 s batch_timeout_micros is not waited out."""
    arriving = [1]
    batcher = Batcher(BatchingOptions(max_batch_size=64, batch_timeout_micros=60_000_000, max_enqueued_batches=10,
                                      num_batch_threads=1), arriving=lambda: arriving[0])
    try:
        waiting = batcher.submit(servable, "serving_default", {"x": np.ones((1, 3), np.float32)})
        with pytest.raises(FutureTimeout):  # another request is announced: the batch waits for it
            waiting.result(timeout=0.5)
        arriving[0] = 0
        np.testing.assert_array_equal(batcher.submit(servable, "serving_default", {"x": np.ones((1, 3), np.float32)})
                                      .result(timeout=10)["y"], np.full((1, 3), 2.0))
        np.testing.assert_array_equal(waiting.result(timeout=10)["y"], np.full((1, 3), 2.0))
    finally:
        batcher.stop()


def test_batcher_survives_clients_that_went_away(servable):
    """A cancelled request (its client disconnected) is skipped; the worker keeps serving the others."""
    batcher = Batcher(BatchingOptions(max_batch_size=64, batch_timeout_micros=50000, max_enqueued_batches=10,
                                      num_batch_threads=1))
    try:
        gone = batcher.submit(servable, "serving_default", {"x": np.ones((1, 3), np.float32)})
        kept = batcher.submit(servable, "serving_default", {"x": np.full((1, 3), 2.0, np.float32)})
        assert gone.cancel()
        np.testing.assert_array_equal(kept.result(timeout=10)["y"], np.full((1, 3), 4.0))
        for _ in range(3):  # later batches are still served
            later = batcher.submit(servable, "serving_default", {"x": np.ones((1, 3), np.float32)})
            np.testing.assert_array_equal(later.result(timeout=10)["y"], np.full((1, 3), 2.0))
    finally:
        batcher.stop()


def test_batcher_pads_to_allowed_sizes(servable):
    sizes = []
    batcher = Batcher(BatchingOptions(max_batch_size=8, batch_timeout_micros=0, max_enqueued_batches=4,
                                      num_batch_threads=1, allowed_batch_sizes=(4, 8)),
                      on_batch=lambda model, size, depth: sizes.append(size))
    try:
        x = np.arange(9, dtype=np.float32).reshape(3, 3)
        result = batcher.submit(servable, "serving_default", {"x": x}).result(timeout=10)
        np.testing.assert_array_equal(result["y"], 2 * x)  # the padded row is not returned
        with pytest.raises(ServingError, match="larger than maximum input batch size 8"):
            batcher.submit(servable, "serving_default", {"x": np.ones((9, 3), np.float32)})
    finally:
        batcher.stop()


def test_batcher_refuses_work_past_max_enqueued_batches(servable):
    batcher = Batcher(BatchingOptions(max_batch_size=1, batch_timeout_micros=0, max_enqueued_batches=2,
                                      num_batch_threads=1))
    outcomes = []
    lock = threading.Lock()

    def call(_):
        try:
            batcher.submit(servable, "slow", {"x": np.ones((1, 3), np.float32)}).result(timeout=60)
            result = "ok"
        except ServingError as exc:
            result = exc.code.name
        with lock:
            outcomes.append(result)

    try:
        with ThreadPoolExecutor(16) as pool:
            list(pool.map(call, range(16)))
        assert "UNAVAILABLE" in outcomes and "ok" in outcomes
        assert set(outcomes) <= {"ok", "UNAVAILABLE"}
    finally:
        batcher.stop()


def test_a_failed_load_is_retried_as_configured(tmp_path, tiny_export):
    base = tmp_path / "tiny"
    shutil.copytree(tiny_export, base / "1")
    shutil.rmtree(base / "1" / "variables")  # fails on every attempt
    attempts = []

    def counting_loader(name, version, path):
        attempts.append(version)
        return load_servable(name, version, path)

    model = ModelVersions(model_config(base), loader=counting_loader, retries=LoadRetries(2, 0.0))
    model.poll()
    assert attempts == [1, 1, 1]  # the first attempt and two retries
    assert model.statuses(1)[0].state == END and "failed" in model.statuses(1)[0].error


def test_a_model_with_nothing_to_load_says_why(tmp_path):
    missing = ModelVersions(model_config(tmp_path / "absent"))
    missing.poll()
    assert missing.waiting_reason == f"Could not find base path {tmp_path / 'absent'} for servable tiny"
    (tmp_path / "absent").mkdir()
    missing.poll()
    assert missing.waiting_reason.startswith("No versions of servable tiny found under base path")


def test_model_errors_keep_their_cause_on_one_line():
    from conveyor_ml.serving.servable import model_error_message

    text = ("Graph execution error:\n\nDetected at node 'reshape' defined at (most recent call last):\n"
            "Input to reshape is a tensor with 64 values, but the requested shape has 512\n"
            "\t [[{{node reshape}}]]")
    assert model_error_message(text) == ("Detected at node 'reshape' defined at (most recent call last): Input to "
                                         "reshape is a tensor with 64 values, but the requested shape has 512 "
                                         "[[{{node reshape}}]]")
    assert len(model_error_message("x" * 10_000)) == 2003


@pytest.mark.parametrize("config, message", [
    ("", "Only ModelConfigList is currently supported"),
    ('model_config_list { config { name: "a" base_path: "relative/a" } }',
     "Expected model a to have an absolute path or URI; got base_path\\(\\)=relative/a"),
    ('model_config_list { config { name: "a" base_path: "/no/such/dir" } }', "Could not find base path /no/such/dir"),
    ('model_config_list { config { name: "a" base_path: "/' + "a" * 5000 + '" } }',  # the OS refuses to look
     "Could not look up the base path of servable a \\(File name too long\\): /aaa"),
    ('model_config_list { config { name: "a" base_path: "{tmp}" } config { name: "a" base_path: "{tmp}" } }',
     "Illegal to list model a multiple times"),
    ('model_config_list { config { name: "a" base_path: "{tmp}" model_platform: "pytorch" } }',
     "Model a requests unsupported platform pytorch"),
])
def test_reload_configs_are_checked_before_anything_changes(tmp_path, config, message):
    from google.protobuf import text_format

    from conveyor_ml.serving.model_server import check_reload_config

    parsed = text_format.Parse(config.replace("{tmp}", str(tmp_path)), model_server_config_pb2.ModelServerConfig())
    with pytest.raises(ServingError, match=message) as refused:
        check_reload_config(parsed)
    assert refused.value.code.name == "INVALID_ARGUMENT"
    fine = f'model_config_list {{ config {{ name: "a" base_path: "{tmp_path}" model_platform: "tensorflow" }} }}'
    check_reload_config(text_format.Parse(fine, model_server_config_pb2.ModelServerConfig()))


def test_admission_charges_a_declared_body_as_it_arrives():
    admission = Admission(max_requests=10, max_bytes=100)
    calls = [Call("tiny", "predict", "rest", 0) for _ in range(3)]
    admission.admit(calls[0], declared=100)
    admission.admit(calls[1], declared=100)  # nothing has arrived: the budget holds nothing yet
    assert admission.bytes == 0
    admission.grow(calls[0], 60)
    with pytest.raises(ServingError) as refused:
        admission.admit(calls[2], declared=50)  # 60 held + 50 declared > 100
    assert refused.value.code == grpc.StatusCode.UNAVAILABLE
    with pytest.raises(ServingError):
        admission.grow(calls[1], 41)
    admission.grow(calls[1], 40)
    assert (admission.bytes, calls[1].nbytes) == (100, 40)
    admission.release(calls[0])
    assert (admission.requests, admission.bytes) == (1, 40)


def test_an_empty_batch_the_kernels_cannot_run_is_answered_from_the_signature(tmp_path):
    servable = SavedModelServable("first_row", 1, write_first_row_model(tmp_path / "export"))
    rows = np.array([[1.0, 2.0, 3.0], [2.0, 4.0, 6.0]], np.float32)
    np.testing.assert_array_equal(servable.predict("", {"x": rows})["centered"], [[0, 0, 0], [1, 2, 3]])
    empty = servable.predict("", {"x": np.zeros((0, 3), np.float32)})
    assert {name: (value.shape, value.dtype) for name, value in empty.items()} == {
        "centered": ((0, 3), np.float32), "row_sums": ((0,), np.float32)}
    # An output that is not one row per input row cannot be told without the model: its refusal stands;
    # so does it for rows of the wrong shape, which the model would refuse with rows in them too.
    with pytest.raises(ServingError, match="out of bounds"):
        servable.predict("first", {"x": np.zeros((0, 3), np.float32)})
    with pytest.raises(ServingError, match="out of bounds"):
        servable.predict("", {"x": np.zeros((0, 5), np.float32)})


# server_core.cc (2.16.1), ServerCore::UpdateModelVersionLabelMap:
#   "Request to assign label to version ", version, " of model ", name, ", which is not currently available
#   for inference" (FAILED_PRECONDITION), unless the flag allows it and the label is new (or keeps its
#   version).
UNAVAILABLE_LABEL = ("Request to assign label to version 999 of model tiny, which is not currently available "
                     "for inference")


@pytest.mark.parametrize("allow_unavailable", [True, False])
def test_reload_refuses_moving_a_label_to_an_unavailable_version(tmp_path, tiny_export, allow_unavailable):
    from conveyor_ml.serving.model_server import ModelServer, ServerOptions

    base = tmp_path / "tiny"
    shutil.copytree(tiny_export, base / "1")
    server = ModelServer(ServerOptions(model_name="tiny", model_base_path=str(base),
                                       file_system_poll_wait_seconds=0,
                                       allow_version_labels_for_unavailable_models=allow_unavailable))
    server.start_polling()
    try:
        config = model_server_config_pb2.ModelServerConfig()
        config.model_config_list.config.append(model_config(base, stable=1))
        server.apply_config(config)
        assert server.model("tiny").labels() == {"stable": 1}
        moved = model_server_config_pb2.ModelServerConfig()
        moved.model_config_list.config.append(model_config(base, stable=999))
        with pytest.raises(ServingError) as refused:
            server.apply_config(moved)
        assert refused.value.code == grpc.StatusCode.FAILED_PRECONDITION
        assert refused.value.message == UNAVAILABLE_LABEL
        assert server.model("tiny").labels() == {"stable": 1}  # refused before anything changed
        new_label = model_server_config_pb2.ModelServerConfig()
        new_label.model_config_list.config.append(model_config(base, stable=1, canary=999))
        if allow_unavailable:  # a new label may name a version not loaded yet
            server.apply_config(new_label)
            assert server.model("tiny").labels() == {"stable": 1, "canary": 999}
        else:
            with pytest.raises(ServingError, match=UNAVAILABLE_LABEL):
                server.apply_config(new_label)
    finally:
        server.stop()


def write_config_file(path, base, **labels):
    from google.protobuf import text_format

    config = model_server_config_pb2.ModelServerConfig()
    config.model_config_list.config.append(model_config(base, **labels))
    path.write_text(text_format.MessageToString(config))
    return path


# server_core.cc (2.16.1) checks labels whenever it applies a config, in ServerCore::ReloadConfig (469:
# UpdateModelVersionLabelMap, before AddModelsViaModelConfigList loads anything): ServerCore::Create calls it
# at start-up (253), Server::PollFilesystemAndReloadConfig at each poll of --model_config_file
# (server.cc:162-177).
def test_start_up_checks_the_config_files_labels(tmp_path, tiny_export):
    """At start-up no version is available yet: without --allow_version_labels_for_unavailable_models every
    label fails the ReloadConfig, so BuildAndStart does, and main.cc prints "Failed to start server. Error: "
    and the status (absl::Status: "FAILED_PRECONDITION: <message>") and exits."""
    from conveyor_ml.base.errors import ConveyorError
    from conveyor_ml.serving.model_server import ModelServer, ServerOptions

    base = tmp_path / "tiny"
    shutil.copytree(tiny_export, base / "1")
    config_file = write_config_file(tmp_path / "models.config", base, stable=1)
    with pytest.raises(ConveyorError) as refused:
        ModelServer(ServerOptions(model_config_file=str(config_file), file_system_poll_wait_seconds=0,
                                  allow_version_labels_for_unavailable_models=False))
    assert str(refused.value) == (
        "Failed to start server. Error: FAILED_PRECONDITION: Request to assign label to version 1 of model "
        "tiny, which is not currently available for inference")
    # With the flag (our default) a label new to the server may name a version not loaded yet.
    server = ModelServer(ServerOptions(model_config_file=str(config_file),
                                       file_system_poll_wait_seconds=0))
    server.start_polling()
    try:
        assert server.model("tiny").labels() == {"stable": 1}
    finally:
        server.stop()


def test_a_polled_config_file_is_refused_as_tf_serving_refuses_it(tmp_path, tiny_export, caplog):
    """PollFilesystemAndReloadConfig: a ReloadConfig that fails is logged ("PollFilesystemAndReloadConfig
    failed to ReloadConfig: " and the message) and nothing served changes; the file is applied again at every
    poll, so it takes effect once the version is available. (Without the flag, as TF Serving's default.)"""
    from conveyor_ml.serving.model_server import ModelServer, ServerOptions

    base = tmp_path / "tiny"
    shutil.copytree(tiny_export, base / "1")
    config_file = write_config_file(tmp_path / "models.config", base)
    server = ModelServer(ServerOptions(model_config_file=str(config_file), file_system_poll_wait_seconds=0,
                                       allow_version_labels_for_unavailable_models=False))
    server.start_polling()
    try:
        write_config_file(config_file, base, stable=2)
        with caplog.at_level("ERROR", logger="conveyor.serving"):
            server._load_config()  # what each --model_config_file_poll_wait_seconds poll does
        assert [record.getMessage() for record in caplog.records if record.name == "conveyor.serving"] == [
            "PollFilesystemAndReloadConfig failed to ReloadConfig: Request to assign label to version 2 of "
            "model tiny, which is not currently available for inference"]
        assert server.model("tiny").labels() == {}
        shutil.copytree(tiny_export, base / "2")
        server.poll_once()  # version 2 loads (the served config's policy: latest)
        server._load_config()  # the same file, read again
        assert server.model("tiny").labels() == {"stable": 2}
    finally:
        server.stop()


def test_a_polled_config_file_may_move_a_label_to_a_version_still_to_load(tmp_path, tiny_export):
    """With --allow_version_labels_for_unavailable_models (our default) TF Serving would still refuse this
    one (server_core_test.cc AssignExistingLabelToUnavailableVersionDisallowed): a deliberate difference, as
    Conveyor's direct push and rollback write it, and the version the new config asks for could never load."""
    from conveyor_ml.serving.model_server import ModelServer, ServerOptions

    base = tmp_path / "tiny"
    shutil.copytree(tiny_export, base / "1")
    config_file = write_config_file(tmp_path / "models.config", base, stable=1)
    server = ModelServer(ServerOptions(model_config_file=str(config_file), file_system_poll_wait_seconds=0))
    server.start_polling()
    try:
        shutil.copytree(tiny_export, base / "2")
        write_config_file(config_file, base, stable=2)
        server._load_config()
        server.poll_once()
        assert server.model("tiny").labels() == {"stable": 2}
        assert server.model("tiny").available_versions() == [2]
    finally:
        server.stop()
