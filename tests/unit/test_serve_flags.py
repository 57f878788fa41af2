"""`conveyor serve`'s flags: every tensorflow_model_server flag is accepted, each value checked, what cannot
be honoured refused in one line, and the accepted values reach the server's options."""
from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
import tensorflow as tf

from conveyor_ml.base.errors import ConveyorError
from conveyor_ml.cli import build_parser
from conveyor_ml.serving import server
from conveyor_ml.serving.connections import default_max_connections
from conveyor_ml.serving.tensors import tensor_proto
from tests.conftest import run_conveyor

# tensorflow_model_server's flags (TF Serving 2.16, model_servers/main.cc), with a value each would take.
TF_SERVING_FLAGS = {
    "port": "8500", "grpc_socket_path": "", "rest_api_port": "8501", "rest_api_num_threads": "4",
    "rest_api_timeout_in_ms": "30000", "rest_api_enable_cors_support": "false", "enable_batching": "false",
    "allow_version_labels_for_unavailable_models": "true", "batching_parameters_file": "",
    "enable_per_model_batching_parameters": "false", "model_config_file": "",
    "model_config_file_poll_wait_seconds": "0", "model_name": "default", "model_base_path": "",
    "num_load_threads": "0", "num_unload_threads": "0", "max_num_load_retries": "5",
    "load_retry_interval_micros": "60000000", "file_system_poll_wait_seconds": "1", "flush_filesystem_caches": "true",
    "tensorflow_session_parallelism": "0", "tensorflow_session_config_file": "",
    "tensorflow_intra_op_parallelism": "0", "tensorflow_inter_op_parallelism": "0", "use_alts_credentials": "false",
    "ssl_config_file": "", "platform_config_file": "", "per_process_gpu_memory_fraction": "0",
    "saved_model_tags": "serve", "grpc_channel_arguments": "", "grpc_max_threads": "8", "enable_model_warmup": "true",
    "num_request_iterations_for_warmup": "0", "version": "false", "monitoring_config_file": "",
    "remove_unused_fields_from_bundle_metagraph": "true", "prefer_tflite_model": "false", "num_tflite_pools": "2",
    "num_tflite_interpreters_per_pool": "1", "enable_signature_method_name_check": "false",
    "xla_cpu_compilation_enabled": "false", "xla_gpu_compilation_enabled": "false", "enable_profiler": "false",
    "thread_pool_factory_config_file": "", "mixed_precision": "", "skip_initialize_tpu": "false",
    "enable_grpc_healthcheck_service": "false", "enable_serialization_as_tensor_content": "false",
}


def parse(*flags: str):
    return build_parser().parse_args(["serve", *flags])


def options(tmp_path, *flags: str):
    (tmp_path / "model").mkdir(exist_ok=True)
    return server.options_from_args(parse("--model_base_path", str(tmp_path / "model"), *flags))


def test_every_tf_serving_flag_is_accepted_with_its_default(tmp_path):
    assert len(TF_SERVING_FLAGS) == 48
    flags = [f"--{name}={value}" for name, value in TF_SERVING_FLAGS.items()
             if name not in ("model_base_path", "version")]
    built = options(tmp_path, *flags)
    assert built.model_name == "default" and built.port == 8500 and built.rest_api_port == 8501


def test_help_lists_every_flag_in_tf_servings_words(capsys):
    with pytest.raises(SystemExit):
        parse("--help")
    text = " ".join(capsys.readouterr().out.split())
    for name in TF_SERVING_FLAGS:
        assert f"--{name}" in text
    assert ("Enable method_name check for SignatureDef. Disable this if serving native TF2 regression/classification "
            "models.") in text
    assert ("If non-empty, listen to a UNIX socket for gRPC API on the given path. Can be either relative or absolute "
            "path.") in text
    assert "A comma separated list of arguments to be passed to the grpc server. (e.g. grpc.max_connection_age_ms=2000)" in text


@pytest.mark.parametrize("flags, message", [
    (["--rest_api_port", "70000"], "--rest_api_port 70000: a port is 1..65535"),
    (["--port=-1"], "--port -1: a port is 1..65535"),
    (["--port=8600", "--rest_api_port=8600"], "--rest_api_port 8600 must be different than --port 8600"),
    (["--port=0"], "At least one of --port or --grpc_socket_path must be set."),
    (["--max_request_body_bytes", "-5"], "--max_request_body_bytes -5: must be at least 1"),
    (["--rest_api_timeout_in_ms=-1"], "--rest_api_timeout_in_ms -1: must be at least 0"),
    (["--rest_api_num_threads=0"], "--rest_api_num_threads 0: must be at least 1"),
    (["--file_system_poll_wait_seconds=-1"], "--file_system_poll_wait_seconds -1.0: must be at least 0"),
    (["--num_tflite_pools=0"], "--num_tflite_pools 0: must be at least 1"),
    (["--max_connections=0"], "--max_connections 0: must be at least 1"),
    (["--idle_connection_timeout_in_ms=0"], "--idle_connection_timeout_in_ms 0: must be at least 1"),
    (["--grpc_socket_path=/nonexistent/dir/grpc.sock"], "--grpc_socket_path: no such directory: /nonexistent/dir"),
    (["--grpc_socket_path=/tmp/" + "s" * 120], "longer than the 107 bytes a Unix socket path may have"),
    (["--grpc_channel_arguments=grpc.so_reuseaddr"], "'grpc.so_reuseaddr' is not key=value"),
    (["--batching_parameters_file=/etc/hostname"], "--batching_parameters_file is set without setting "
                                                   "--enable_batching to true."),
    (["--monitoring_config_file=/nonexistent"], "--monitoring_config_file: no such file: /nonexistent"),
    (["--tensorflow_session_parallelism=2", "--tensorflow_intra_op_parallelism=2",
      "--tensorflow_inter_op_parallelism=2"], "You cannot configure all."),
    (["--per_process_gpu_memory_fraction=1.5"], "must be between 0.0 and 1.0"),
    (["--saved_model_tags=,"], "--saved_model_tags: name at least one tag"),
    (["--use_alts_credentials"], "--use_alts_credentials=true is not supported by conveyor serve"),
    (["--ssl_config_file=/etc/hostname"], "--ssl_config_file=/etc/hostname is not supported"),
    (["--enable_profiler=true"], "--enable_profiler=true is not supported"),
    (["--xla_cpu_compilation_enabled=1"], "--xla_cpu_compilation_enabled=true is not supported"),
    (["--mixed_precision=bfloat16"], "--mixed_precision=bfloat16 is not supported"),
])
def test_bad_values_and_unsupported_flags_are_one_line_errors(tmp_path, flags, message):
    with pytest.raises(ConveyorError) as error:
        options(tmp_path, *flags)
    assert message in str(error.value) and "\n" not in str(error.value)


def test_a_missing_base_path_is_an_error_not_an_endless_wait():
    with pytest.raises(ConveyorError, match="--model_base_path: no such directory: /nonexistent"):
        server.options_from_args(parse("--model_base_path", "/nonexistent"))


def test_the_cli_prints_one_line_and_exits_2():
    for flags, message in ((["--rest_api_port", "70000", "--model_base_path", "/tmp"], "--rest_api_port 70000"),
                           (["--bogus_flag=1"], "unrecognized arguments: --bogus_flag=1"),
                           (["--port", "eighty"], "argument --port: expected an integer, got 'eighty'")):
        result = run_conveyor("serve", *flags, timeout=120)
        assert result.returncode == 2 and result.stderr.count("\n") == 1, result.stderr
        assert result.stderr.startswith("conveyor: error:") and message in result.stderr


def test_tf_serving_booleans_and_values_reach_the_options(tmp_path):
    built = options(tmp_path, "--enable_signature_method_name_check=true", "--prefer_tflite_model",
                    "--num_tflite_pools=2", "--num_tflite_interpreters_per_pool=3", "--enable_model_warmup=false",
                    "--num_request_iterations_for_warmup=4", "--saved_model_tags=serve,gpu",
                    "--rest_api_timeout_in_ms=5000", "--grpc_socket_path=/tmp/conveyor-test.sock",
                    "--grpc_channel_arguments=grpc.max_connection_age_ms=2000,grpc.lb_policy_name=grpclb,"
                    "grpc.so_reuseaddr=0,grpc.so_reuseaddr=1", "--max_num_load_retries=2",
                    "--load_retry_interval_micros=500000", "--rest_api_num_threads=3", "--grpc_max_threads=5")
    load = built.load
    assert load.signature_method_name_check and load.prefer_tflite_model and not load.enable_model_warmup
    assert load.tflite_interpreters == 6 and load.warmup_iterations == 4 and load.saved_model_tags == ("serve", "gpu")
    assert built.rest_api_timeout_in_ms == 5000 and built.grpc_socket_path == "/tmp/conveyor-test.sock"
    # TF Serving's parsing: int32 values as ints, others as strings, a repeated key's last value wins.
    assert dict(built.grpc_channel_arguments) == {"grpc.max_connection_age_ms": 2000,
                                                  "grpc.lb_policy_name": "grpclb", "grpc.so_reuseaddr": 1}
    assert (built.load_retries.retries, built.load_retries.interval_seconds) == (2, 0.5)
    assert (built.rest_api_num_threads, built.grpc_max_threads) == (3, 5)


def test_session_parallelism_flags_build_the_session_config(tmp_path):
    separate = options(tmp_path, "--tensorflow_intra_op_parallelism=3", "--tensorflow_inter_op_parallelism=2")
    config = separate.load.session_config
    assert (config.intra_op_parallelism_threads, config.inter_op_parallelism_threads) == (3, 2)
    both = options(tmp_path, "--tensorflow_session_parallelism=4").load.session_config
    assert (both.intra_op_parallelism_threads, both.inter_op_parallelism_threads) == (4, 4)
    session_file = tmp_path / "session.config"
    session_file.write_text("allow_soft_placement: true\nintra_op_parallelism_threads: 7\n")
    from_file = options(tmp_path, f"--tensorflow_session_config_file={session_file}").load.session_config
    assert from_file.allow_soft_placement and from_file.intra_op_parallelism_threads == 7
    session_file.write_text("not a config")
    with pytest.raises(ConveyorError, match="Error parsing text-format tensorflow.ConfigProto"):
        options(tmp_path, f"--tensorflow_session_config_file={session_file}")


def test_the_config_file_wins_over_model_name_and_base_path(tmp_path):
    """TF Serving's docker entrypoint always passes --model_name/--model_base_path; a config file overrides them."""
    config = tmp_path / "models.config"
    config.write_text('model_config_list { config { name: "a" base_path: "/models/a" model_platform: "tensorflow" } }')
    built = options(tmp_path, f"--model_config_file={config}")
    assert built.model_config_file == str(config) and built.model_base_path is None


@pytest.mark.parametrize("value, field", [
    (np.array([[1.5, 2.5]], np.float32), "float_val"), (np.array([1, 2], np.int64), "int64_val"),
    (np.array([3], np.int8), "int_val"), (np.array([True]), "bool_val"),
    (np.array([b"a", b"bc"], dtype=object), "string_val"), (np.array(4.0, np.float64), "double_val"),
])
def test_outputs_use_tensorflows_typed_fields(value, field):
    proto = tensor_proto(value)
    assert len(getattr(proto, field)) == value.size and not proto.tensor_content
    np.testing.assert_array_equal(tf.make_ndarray(proto), value)
    packed = tensor_proto(value, as_tensor_content=True)
    np.testing.assert_array_equal(tf.make_ndarray(packed), value)
    if field != "string_val":
        assert packed.tensor_content and not getattr(packed, field)


def test_connection_bounds_reach_the_options_and_default_to_the_open_file_limit(tmp_path):
    built = options(tmp_path, "--max_connections=300", "--idle_connection_timeout_in_ms=5000")
    assert (built.max_connections, built.idle_connection_timeout_in_ms) == (300, 5000)
    assert options(tmp_path).max_connections is None  # resolved when serving: after the limit is raised
    # The listeners share what is left after 512 descriptors are kept back; never fewer than 64 each.
    assert [default_max_connections(files, 2) for files in (1024, 20000, 300)] == [256, 9744, 64]
    assert default_max_connections(4096, 3) == 1194  # REST, the gRPC port and a gRPC Unix socket


def test_serving_raises_the_open_file_limit_to_the_hard_limit():
    script = ("import resource; from conveyor_ml.serving.connections import raise_open_file_limit; "
              "hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]; "
              "resource.setrlimit(resource.RLIMIT_NOFILE, (256, hard)); "
              "print(raise_open_file_limit() == resource.getrlimit(resource.RLIMIT_NOFILE)[0] == hard)")
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert result.stdout.strip() == "True", result.stderr


def test_allow_version_labels_for_unavailable_models_false_is_accepted(tmp_path):
    """TF Serving's default (model_servers/server.h: allow_version_labels_for_unavailable_models = false) is a
    legal value, not a refusal."""
    assert options(tmp_path, "--allow_version_labels_for_unavailable_models=false"
                   ).allow_version_labels_for_unavailable_models is False
    assert options(tmp_path).allow_version_labels_for_unavailable_models is True
