"""`conveyor serve`: a TF-Serving-compatible model server (REST :8501, gRPC :8500), in one process or several.

It takes every flag of tensorflow_model_server (TF Serving 2.16's main.cc, with its help text) so a launcher
written for TF Serving works unchanged. Each flag is either honoured, accepted where both of its values
behave the same here (the help says why, and setting one is logged), or refused with one line naming it
when Conveyor cannot do what it asks. Every value is checked before anything starts: a mistake is one
line, `conveyor: error: ...`, exit status 2.
"""
from __future__ import annotations

import argparse
import asyncio
import dataclasses
import logging
import math
import os
import signal
import sys
import threading
from pathlib import Path

from conveyor_ml.base.errors import ConveyorError
from conveyor_ml.base.names import PROMETHEUS_PATH
from conveyor_ml.base.ports import check_port_free
from conveyor_ml.base.process_lifetime import die_with_parent

log = logging.getLogger("conveyor.serving")
UNIX_SOCKET_PATH_MAX = 107  # sun_path holds 108 bytes, the terminating NUL included
TF_SERVING = "TensorFlow Serving flags (tensorflow_model_server's, with its help text)"
CONVEYOR = "Conveyor's own flags"
SHUTDOWN_GRACE_SECONDS = 2.0  # how long requests in flight may finish after SIGTERM


def tf_bool(text: str) -> bool:
    """TF Serving's boolean flag values: --flag, --flag=true|false (also 1/0, yes/no)."""
    value = str(text).strip().lower()
    if value in ("true", "1", "yes", "t", "y"):
        return True
    if value in ("false", "0", "no", "f", "n"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {text!r}")


def _flag_int(text: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None


def _flag_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not math.isfinite(value):  # nan passed every bound check; inf overflowed the poller's wait
        raise argparse.ArgumentTypeError(f"expected a finite number, got {text!r}")
    return value


def _one_line_error(message: str) -> None:
    """argparse's own complaints (a bad value, an unknown flag) as the CLI's one-line error."""
    print(f"conveyor: error: serve: {message}", file=sys.stderr)
    sys.exit(2)


# Flags accepted with no effect here, and why: both of their values behave the same in conveyor serve.
NO_EFFECT = {
    "flush_filesystem_caches": "conveyor serve keeps no file-system caches to flush",
    "remove_unused_fields_from_bundle_metagraph": "only the SignatureDefs are kept beside the loaded graph",
    "skip_initialize_tpu": "conveyor serve runs on CPU and initializes no TPU",
    "num_unload_threads": "unloading drops a reference; there is no unload work to spread over threads",
}
# Flags refused when they ask for what conveyor serve cannot do: {flag: (value allowed, why)}.
REFUSED = {
    "use_alts_credentials": (False, "Google ALTS credentials are not available; put conveyor serve behind an "
                                    "authenticating proxy"),
    "ssl_config_file": ("", "gRPC over TLS is not implemented; terminate TLS in front of the server"),
    "platform_config_file": ("", "only the TensorFlow platform (and TFLite via --prefer_tflite_model) is served"),
    "enable_per_model_batching_parameters": (False, "per-model batching_params.pbtxt is not read; use "
                                                    "--batching_parameters_file"),
    "xla_cpu_compilation_enabled": (False, "XLA JIT compilation is not enabled in conveyor serve"),
    "xla_gpu_compilation_enabled": (False, "XLA JIT compilation is not enabled in conveyor serve"),
    "enable_profiler": (False, "the TensorFlow profiler gRPC service is not served"),
    "thread_pool_factory_config_file": ("", "custom thread pool factories are not supported"),
    "mixed_precision": ("", "mixed-precision (bfloat16) rewriting is not supported"),
}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """tensorflow_model_server's flags (its names, defaults and wording), then Conveyor's own."""
    parser.usage = "conveyor serve [--model_base_path PATH [--model_name NAME] | --model_config_file FILE | --spec SPEC] [flags]"
    parser.error = _one_line_error  # type: ignore[method-assign]
    parse_known = parser.parse_known_args

    def parse_known_args(args=None, namespace=None):
        namespace, extras = parse_known(args, namespace)
        if extras:
            _one_line_error(f"unrecognized arguments: {' '.join(extras)} (see conveyor serve --help)")
        return namespace, extras

    parser.parse_known_args = parse_known_args  # type: ignore[method-assign]
    tf_flags = parser.add_argument_group(TF_SERVING)

    def flag(name: str, kind, default, text: str) -> None:
        if kind is bool:
            tf_flags.add_argument(f"--{name}", type=tf_bool, nargs="?", const=True, default=default,
                                  metavar="true|false", help=text)
        else:
            tf_flags.add_argument(f"--{name}", type=kind, default=default, metavar="VALUE", help=text)

    flag("port", _flag_int, 8500, "TCP port to listen on for gRPC/HTTP API. Disabled if port set to zero.")
    flag("grpc_socket_path", str, "", "If non-empty, listen to a UNIX socket for gRPC API on the given path. Can "
         "be either relative or absolute path.")
    flag("rest_api_port", _flag_int, 8501, "Port to listen on for HTTP/REST API. If set to zero HTTP/REST API will "
         "not be exported. This port must be different than the one specified in --port. [conveyor: default 8501, "
         "where TF Serving's is 0]")
    flag("rest_api_num_threads", _flag_int, None, "Number of threads for HTTP/REST API processing. If not set, will "
         "be auto set based on number of CPUs. [conveyor: the threads that run REST requests' model work]")
    flag("rest_api_timeout_in_ms", _flag_int, 30000, "Timeout for HTTP/REST API calls.")
    flag("rest_api_enable_cors_support", bool, False, "Enable CORS headers in response")
    flag("enable_batching", bool, False, "enable batching")
    flag("allow_version_labels_for_unavailable_models", bool, True, "If true, allows assigning unused version "
         "labels to models that are not available yet. [conveyor: default true; false: a "
         "ReloadConfig may label only versions available for inference, as TF Serving's default]")
    flag("batching_parameters_file", str, "", "If non-empty, read an ascii BatchingParameters protobuf from the "
         "supplied file name and use the contained values instead of the defaults.")
    flag("enable_per_model_batching_parameters", bool, False, "Enables model specific batching params like batch "
         "sizes, timeouts, batching feature flags to be read from `batching_params.pbtxt` file present in "
         "SavedModel dir of the model. [conveyor: not supported; true is refused]")
    flag("model_config_file", str, "", "If non-empty, read an ascii ModelServerConfig protobuf from the supplied "
         "file name, and serve the models in that file. This config file can be used to specify multiple models "
         "to serve and other advanced parameters including non-default version policy. (If used, --model_name, "
         "--model_base_path are ignored.)")
    flag("model_config_file_poll_wait_seconds", _flag_float, 0.0, "Interval in seconds between each poll of the "
         "filesystemfor model_config_file. If unset or set to zero, poll will be done exactly once and not "
         "periodically. Setting this to negative is reserved for testing purposes only.")
    flag("model_name", str, None, "name of model (ignored if --model_config_file flag is set) [default: default]")
    flag("model_base_path", str, "", "path to export (ignored if --model_config_file flag is set, otherwise "
         "required)")
    flag("num_load_threads", _flag_int, 0, "The number of threads in the thread-pool used to load servables. If "
         "set as 0, we don't use a thread-pool, and servable loads are performed serially in the manager's main "
         "work loop, may casue the Serving request to be delayed. Default: 0")
    flag("num_unload_threads", _flag_int, 0, "The number of threads in the thread-pool used to unload servables. "
         f"[conveyor: accepted, no effect: {NO_EFFECT['num_unload_threads']}]")
    flag("max_num_load_retries", _flag_int, 0, "maximum number of times it retries loading a model after the first "
         "failure, before giving up. If set to 0, a load is attempted only once. [conveyor: default 0, where TF "
         "Serving's is 5: a broken version is reported at once]")
    flag("load_retry_interval_micros", _flag_int, 60_000_000, "The interval, in microseconds, between each servable "
         "load retry. If set negative, it doesn't wait. Default: 1 minute")
    flag("file_system_poll_wait_seconds", _flag_float, 1.0, "Interval in seconds between each poll of the "
         "filesystem for new model version. If set to zero poll will be exactly done once and not periodically. "
         "[conveyor: negative values are refused]")
    flag("flush_filesystem_caches", bool, True, "If true (the default), filesystem caches will be flushed after the "
         f"initial load of all servables. [conveyor: accepted, no effect: {NO_EFFECT['flush_filesystem_caches']}]")
    flag("tensorflow_session_parallelism", _flag_int, 0, "Number of threads to use for running a Tensorflow "
         "session. Auto-configured by default.")
    flag("tensorflow_session_config_file", str, "", "If non-empty, read an ascii TensorFlow Session ConfigProto "
         "protobuf from the supplied file name. Note, parts of the session config (threads, parallelism etc.) can "
         "be overridden if needed, via corresponding command line flags.")
    flag("tensorflow_intra_op_parallelism", _flag_int, 0, "Number of threads to use to parallelize the executionof "
         "an individual op. Auto-configured by default.")
    flag("tensorflow_inter_op_parallelism", _flag_int, 0, "Controls the number of operators that can be executed "
         "simultaneously. Auto-configured by default.")
    flag("use_alts_credentials", bool, False, "Use Google ALTS credentials [conveyor: true is refused]")
    flag("ssl_config_file", str, "", "If non-empty, read an ascii SSLConfig protobuf from the supplied file name "
         "and set up a secure gRPC channel [conveyor: refused]")
    flag("platform_config_file", str, "", "If non-empty, read an ascii PlatformConfigMap protobuf from the supplied "
         "file name, and use that platform config instead of the Tensorflow platform. [conveyor: refused]")
    flag("per_process_gpu_memory_fraction", _flag_float, 0.0, "Fraction that each process occupies of the GPU "
         "memory space the value is between 0.0 and 1.0 (with 0.0 as the default) If 1.0, the server will allocate "
         "all the memory when the server starts, If 0.0, Tensorflow will automatically select a value.")
    flag("saved_model_tags", str, "serve", "Comma-separated set of tags corresponding to the meta graph def to load "
         "from SavedModel.")
    flag("grpc_channel_arguments", str, "", "A comma separated list of arguments to be passed to the grpc server. "
         "(e.g. grpc.max_connection_age_ms=2000)")
    flag("grpc_max_threads", _flag_int, None, "Max grpc server threads to handle grpc messages. [conveyor: the "
         "threads that run gRPC requests' model work]")
    flag("enable_model_warmup", bool, True, "Enables model warmup, which triggers lazy initializations (such as TF "
         "optimizations) at load time, to reduce first request latency.")
    flag("num_request_iterations_for_warmup", _flag_int, 0, "Number of times a request is iterated during warmup "
         "replay. This value is used only if > 0.")
    tf_flags.add_argument("--version", type=tf_bool, nargs="?", const=True, default=False, metavar="true|false",
                          help="Display version")
    flag("monitoring_config_file", str, "", "If non-empty, read an ascii MonitoringConfig protobuf from the "
         "supplied file name")
    flag("remove_unused_fields_from_bundle_metagraph", bool, True, "Removes unused fields from MetaGraphDef proto "
         "message to save memory. [conveyor: accepted, no effect: "
         f"{NO_EFFECT['remove_unused_fields_from_bundle_metagraph']}]")
    flag("prefer_tflite_model", bool, False, "EXPERIMENTAL; CAN BE REMOVED ANYTIME! Prefer TensorFlow Lite model "
         "from `model.tflite` file in SavedModel directory, instead of the TensorFlow model from `saved_model.pb` "
         "file. If no TensorFlow Lite model found, fallback to TensorFlow model.")
    flag("num_tflite_pools", _flag_int, None, "EXPERIMENTAL; CAN BE REMOVED ANYTIME! Number of TFLite interpreters "
         "in an interpreter pool of TfLiteSession. Typically there is one TfLiteSession for each TF Lite model that "
         "is loaded. If not set, will be auto set based on number of CPUs.")
    flag("num_tflite_interpreters_per_pool", _flag_int, 1, "EXPERIMENTAL; CAN BE REMOVED ANYTIME! Number of TFLite "
         "interpreters in an interpreter pool of TfLiteSession. Typically there is one TfLiteSession for each TF "
         "Lite model that is loaded. If not set, will be 1.")
    flag("enable_signature_method_name_check", bool, False, "Enable method_name check for SignatureDef. Disable this "
         "if serving native TF2 regression/classification models.")
    flag("xla_cpu_compilation_enabled", bool, False, "EXPERIMENTAL; CAN BE REMOVED ANYTIME! Enable XLA:CPU JIT "
         "(default is disabled). [conveyor: true is refused]")
    flag("xla_gpu_compilation_enabled", bool, False, "EXPERIMENTAL; CAN BE REMOVED ANYTIME! Enable both XLA:CPU JIT "
         "and XLA:GPU JIT (default is disabled). [conveyor: true is refused]")
    flag("enable_profiler", bool, False, "Enable profiler service. [conveyor: default false, where TF Serving's is "
         "true; true is refused]")
    flag("thread_pool_factory_config_file", str, "", "If non-empty, read an ascii ThreadPoolConfig protobuf from "
         "the supplied file name. [conveyor: refused]")
    flag("mixed_precision", str, "", "specify mixed_precision mode [conveyor: refused]")
    flag("skip_initialize_tpu", bool, False, "Whether to skip auto initializing TPU. [conveyor: accepted, no "
         f"effect: {NO_EFFECT['skip_initialize_tpu']}]")
    flag("enable_grpc_healthcheck_service", bool, False, "Enable the standard gRPC healthcheck service.")
    flag("enable_serialization_as_tensor_content", bool, False, "Enable serialization of predict response as "
         "tensor content.")

    own = parser.add_argument_group(CONVEYOR)
    own.add_argument("--spec", help="serve what this pipeline spec's serving_pusher pushed (with batching, "
                     "Prometheus, config and traffic polling, --prefer_tflite_model and --tflite_float_io on)")
    own.add_argument("--grpc_host", default="127.0.0.1", help="gRPC bind address (default 127.0.0.1; TF Serving "
                     "binds 0.0.0.0)")
    own.add_argument("--rest_api_host", default="127.0.0.1", help="REST bind address (default 127.0.0.1)")
    own.add_argument("--enable_prometheus", type=tf_bool, nargs="?", const=True, default=False, metavar="true|false",
                     help=f"expose Prometheus metrics at {PROMETHEUS_PATH}")
    own.add_argument("--tflite_float_io", type=tf_bool, nargs="?", const=True, default=False, metavar="true|false",
                     help="quantized (int8/uint8/int16) TFLite inputs take float values (quantized with the "
                     "tensor's scale and zero point) and quantized outputs come back as floats, so a quantized "
                     "variant answers the float model's requests (quantized canary)")
    own.add_argument("--max_request_body_bytes", type=_flag_int, default=16 * 1024 * 1024,
                     help="the largest request: a REST body over it gets 413, a gRPC message RESOURCE_EXHAUSTED "
                     "(default 16 MiB); a request's tensors may decode to at most 4 times as many bytes")
    own.add_argument("--max_inflight_bytes", type=_flag_int, default=None,
                     help="request bytes admitted at once, REST and gRPC together; past it a request gets "
                     "503/UNAVAILABLE at once (default 4 x --max_request_body_bytes)")
    own.add_argument("--max_inflight_requests", type=_flag_int, default=1000,
                     help="requests admitted at once; past it a request gets 503/UNAVAILABLE (default 1000)")
    own.add_argument("--max_connections", type=_flag_int, default=None,
                     help="connections each listener (REST, the gRPC port, a gRPC Unix socket) may hold; past "
                     "it a REST connection takes the place of the one idle the longest (503 when all are busy) "
                     "and grpc refuses new ones "
                     "(default: an equal share, per listener, of the open-file limit, raised to its hard limit, "
                     "with 512 descriptors kept back)")
    own.add_argument("--idle_connection_timeout_in_ms", type=_flag_int, default=75_000,
                     help="a connection with nothing in flight this long is closed: a REST connection between "
                     "requests or before its request's headers are complete, a gRPC one before its HTTP/2 "
                     "preface or between calls (clients reconnect on their next call) (default 75000)")
    own.add_argument("--input_schema", help="TFDV schema (pbtxt): count request values outside its domains "
                     "(--spec uses the spec's data.schema)")
    own.add_argument("--reject_anomalous_inputs", type=tf_bool, nargs="?", const=True, default=False,
                     metavar="true|false", help="answer 400 to requests whose inputs break the schema, instead of "
                     "only counting them")
    own.add_argument("--server_processes", type=_flag_int, default=1,
                     help="server processes on the same ports (default 1): more use more cores (each loads "
                     "every model; connections are spread by the kernel). Metrics, monitoring, feedback and "
                     "ReloadConfig span all of them; the in-flight limits are shared out between them")
    own.add_argument("--traffic_file", help="weights per label for unversioned requests (default: traffic.json "
                     "beside --model_config_file)")


def _check_port(name: str, value: int) -> None:
    if not 0 <= value <= 65535:
        raise ConveyorError(f"--{name} {value}: a port is 1..65535 (0 turns the listener off)")


MAX_POLL_WAIT_SECONDS = 2**31 - 1


def _check_at_least(name: str, value, minimum) -> None:
    if value is not None and value < minimum:
        raise ConveyorError(f"--{name} {value}: must be at least {minimum}")


def _existing_file(name: str, value: str | None) -> None:
    if value and not Path(value).is_file():
        raise ConveyorError(f"--{name}: no such file: {value}")


def parse_channel_arguments(text: str) -> tuple[tuple[str, int | str], ...]:
    """--grpc_channel_arguments as TF Serving reads it: `key=value` items split on commas, a value that is
    an int32 passed as an int, anything else as a string; a later repeat of a key wins."""
    arguments: dict[str, int | str] = {}
    for item in filter(None, text.split(",")):
        if "=" not in item:
            raise ConveyorError(f"--grpc_channel_arguments: {item!r} is not key=value")
        key, value = item.split("=")[:2]
        if not key:
            raise ConveyorError(f"--grpc_channel_arguments: {item!r} has no key")
        try:
            number = int(value)
            arguments[key] = number if -2**31 <= number < 2**31 else value
        except ValueError:
            arguments[key] = value
    return tuple(arguments.items())


def _refuse_unsupported(args: argparse.Namespace) -> None:
    for name, (allowed, why) in REFUSED.items():
        value = getattr(args, name)
        if value != allowed:
            shown = str(value).lower() if isinstance(value, bool) else value
            raise ConveyorError(f"--{name}={shown} is not supported by conveyor serve: {why}")


def _note_no_effect(args: argparse.Namespace, defaults: dict) -> None:
    for name, why in NO_EFFECT.items():
        if getattr(args, name) != defaults[name]:
            log.info("--%s=%s has no effect in conveyor serve: %s", name, getattr(args, name), why)


def _session_config(args: argparse.Namespace):
    """The ConfigProto every SavedModel session gets, built as TF Serving builds it from the flags."""
    from google.protobuf import text_format
    from tensorflow.core.protobuf import config_pb2

    config = config_pb2.ConfigProto()
    if args.tensorflow_session_config_file:
        try:
            text_format.Parse(Path(args.tensorflow_session_config_file).read_text(), config)
        except text_format.ParseError as exc:
            raise ConveyorError(f"{args.tensorflow_session_config_file}: Error parsing text-format "
                                f"tensorflow.ConfigProto: {exc}") from None
    if args.tensorflow_intra_op_parallelism > 0 or args.tensorflow_inter_op_parallelism > 0:
        config.intra_op_parallelism_threads = args.tensorflow_intra_op_parallelism
        config.inter_op_parallelism_threads = args.tensorflow_inter_op_parallelism
    elif args.tensorflow_session_parallelism > 0:
        config.intra_op_parallelism_threads = args.tensorflow_session_parallelism
        config.inter_op_parallelism_threads = args.tensorflow_session_parallelism
    if args.per_process_gpu_memory_fraction > 0:
        config.gpu_options.per_process_gpu_memory_fraction = args.per_process_gpu_memory_fraction
    return config


def _check_session_flags(args: argparse.Namespace) -> None:
    parallelism = (args.tensorflow_session_parallelism, args.tensorflow_intra_op_parallelism,
                   args.tensorflow_inter_op_parallelism)
    for name, value in zip(("tensorflow_session_parallelism", "tensorflow_intra_op_parallelism",
                            "tensorflow_inter_op_parallelism"), parallelism):
        _check_at_least(name, value, 0)
    if all(value > 0 for value in parallelism):
        raise ConveyorError("Either configure --tensorflow_session_parallelism or (--tensorflow_intra_op_parallelism, "
                            "--tensorflow_inter_op_parallelism) separately. You cannot configure all.")
    if not 0.0 <= args.per_process_gpu_memory_fraction <= 1.0:
        raise ConveyorError(f"--per_process_gpu_memory_fraction {args.per_process_gpu_memory_fraction}: must be "
                            "between 0.0 and 1.0")
    _existing_file("tensorflow_session_config_file", args.tensorflow_session_config_file)
    if args.tensorflow_session_config_file:
        try:  # checked here, before the ConfigProto's parse imports TensorFlow (seconds, ~600 MB)
            Path(args.tensorflow_session_config_file).read_text(encoding="utf-8")
        except UnicodeDecodeError:
            raise ConveyorError(f"--tensorflow_session_config_file {args.tensorflow_session_config_file}: not a "
                                "text file; it takes a tensorflow.ConfigProto in text format") from None


def options_from_args(args: argparse.Namespace):
    """ServerOptions from the flags. Every value is checked first, before TensorFlow loads (a mistake is a
    one-line ConveyorError within a second); a bad session config file is the one found after."""
    from conveyor_ml.formats import serving_config

    _refuse_unsupported(args)
    model_config_file = args.model_config_file or None
    model_name, base_path = args.model_name, args.model_base_path or None
    enable_batching, batching_file = args.enable_batching, args.batching_parameters_file or None
    config_poll = args.model_config_file_poll_wait_seconds
    prometheus_path = PROMETHEUS_PATH if args.enable_prometheus else None
    input_schema = args.input_schema
    prefer_tflite, tflite_float_io = args.prefer_tflite_model, args.tflite_float_io
    if args.spec:
        given = [f"--{name}" for name in ("model_config_file", "model_name", "model_base_path") if getattr(args, name)]
        if given:  # the spec names its own models; one of the two would be silently ignored
            raise ConveyorError(f"serve --spec serves the spec's pushed models; drop {' and '.join(given)}, or "
                                "drop --spec to serve those instead")
        model_config_file, model_name, base_path, spec_batching = _from_spec(args.spec)
        from conveyor_ml.base.spec import load_spec

        input_schema = input_schema or str(load_spec(args.spec).data.schema)
        batching_file = batching_file or spec_batching
        enable_batching = enable_batching or batching_file is not None
        config_poll = config_poll or 1.0
        prometheus_path = PROMETHEUS_PATH
        prefer_tflite = tflite_float_io = True  # quantized variants pushed as versions serve with the float API
    for name in ("port", "rest_api_port"):
        _check_port(name, getattr(args, name))
    for name in ("rest_api_host", "grpc_host"):
        if not getattr(args, name).strip():  # an empty address binds every interface
            raise ConveyorError(f"--{name} is empty: give an address, e.g. 127.0.0.1 (this machine only) or "
                                "0.0.0.0 (every interface)")
    if args.port and args.port == args.rest_api_port:
        raise ConveyorError(f"--rest_api_port {args.rest_api_port} must be different than --port {args.port}")
    socket_path = args.grpc_socket_path or None
    if not args.port and not socket_path:
        raise ConveyorError("At least one of --port or --grpc_socket_path must be set.")
    if socket_path:
        socket_path = str(Path(socket_path).absolute())
        if not Path(socket_path).parent.is_dir():
            raise ConveyorError(f"--grpc_socket_path: no such directory: {Path(socket_path).parent}")
        if len(socket_path.encode()) > UNIX_SOCKET_PATH_MAX:
            raise ConveyorError(f"--grpc_socket_path: {socket_path} is longer than the {UNIX_SOCKET_PATH_MAX} bytes "
                                "a Unix socket path may have")
        if Path(socket_path).exists() and not Path(socket_path).is_socket():
            raise ConveyorError(f"--grpc_socket_path: {socket_path} exists and is not a socket")
    for name, minimum in (("rest_api_num_threads", 1), ("grpc_max_threads", 1), ("rest_api_timeout_in_ms", 0),
                          ("max_request_body_bytes", 1), ("max_inflight_requests", 1), ("server_processes", 1),
                          ("max_connections", 1), ("idle_connection_timeout_in_ms", 1),
                          ("num_load_threads", 0), ("num_unload_threads", 0),
                          ("max_num_load_retries", 0), ("num_request_iterations_for_warmup", 0),
                          ("num_tflite_pools", 1), ("num_tflite_interpreters_per_pool", 1),
                          ("file_system_poll_wait_seconds", 0), ("model_config_file_poll_wait_seconds", 0)):
        _check_at_least(name, getattr(args, name), minimum)
    for name in ("file_system_poll_wait_seconds", "model_config_file_poll_wait_seconds"):
        if getattr(args, name) > MAX_POLL_WAIT_SECONDS:  # TF Serving's are int32 seconds
            raise ConveyorError(f"--{name} {getattr(args, name):g}: must be at most {MAX_POLL_WAIT_SECONDS} "
                                "(0 polls never again)")
    tags = tuple(tag.strip() for tag in args.saved_model_tags.split(",") if tag.strip())
    if not tags:
        raise ConveyorError("--saved_model_tags: name at least one tag (TF Serving's default: serve)")
    if args.monitoring_config_file:
        _existing_file("monitoring_config_file", args.monitoring_config_file)
        prometheus_path = serving_config.read_prometheus_path(Path(args.monitoring_config_file))
    if model_config_file and (args.model_name or args.model_base_path) and not args.spec:
        # TF Serving's docker entrypoint always passes both; the config file wins, as there.
        log.warning("--model_name and --model_base_path are ignored: --model_config_file is set")
        model_name = base_path = None
    if not model_config_file and not base_path:
        raise ConveyorError("nothing to serve: pass --model_base_path (with --model_name), --model_config_file, "
                            "or --spec pipelines/mnist.yaml after `make pipeline`")
    if model_config_file:
        _existing_file("model_config_file", model_config_file)
        serving_config.read_model_server_config(Path(model_config_file))  # a config that does not parse stops here
    elif not Path(base_path).is_dir():
        raise ConveyorError(f"--model_base_path: no such directory: {base_path} (TF Serving would wait for it "
                            "forever)")
    if batching_file and not enable_batching:
        raise ConveyorError("--batching_parameters_file is set without setting --enable_batching to true.")
    _existing_file("batching_parameters_file", batching_file)
    if batching_file:
        serving_config.read_batching_options(Path(batching_file))
    _existing_file("input_schema", input_schema)
    channel_arguments = parse_channel_arguments(args.grpc_channel_arguments)
    _check_session_flags(args)
    if args.max_inflight_bytes is not None and args.max_inflight_bytes < args.max_request_body_bytes:
        raise ConveyorError(f"--max_inflight_bytes {args.max_inflight_bytes}: must be at least "
                            f"--max_request_body_bytes ({args.max_request_body_bytes}), or no large request "
                            "could ever be admitted")

    from conveyor_ml.serving.model_server import ServerOptions, default_threads
    from conveyor_ml.serving.peers import WorkerSlot
    from conveyor_ml.serving.servable import LoadOptions
    from conveyor_ml.serving.version_manager import LoadRetries

    load_options = LoadOptions(
        saved_model_tags=tags, session_config=_session_config(args), prefer_tflite_model=prefer_tflite,
        tflite_interpreters=(args.num_tflite_pools or 1) * args.num_tflite_interpreters_per_pool,
        tflite_float_io=tflite_float_io, signature_method_name_check=args.enable_signature_method_name_check,
        enable_model_warmup=args.enable_model_warmup,
        warmup_iterations=args.num_request_iterations_for_warmup or 1)
    return ServerOptions(
        port=args.port, rest_api_port=args.rest_api_port, grpc_host=args.grpc_host,
        rest_api_host=args.rest_api_host, grpc_socket_path=socket_path, grpc_channel_arguments=channel_arguments,
        grpc_max_threads=args.grpc_max_threads or default_threads(),
        enable_grpc_healthcheck_service=args.enable_grpc_healthcheck_service,
        enable_serialization_as_tensor_content=args.enable_serialization_as_tensor_content,
        rest_api_num_threads=args.rest_api_num_threads or default_threads(),
        rest_api_timeout_in_ms=args.rest_api_timeout_in_ms,
        rest_api_enable_cors_support=args.rest_api_enable_cors_support,
        allow_version_labels_for_unavailable_models=args.allow_version_labels_for_unavailable_models,
        model_name=model_name or "default",
        model_base_path=str(Path(base_path).resolve()) if base_path and not model_config_file else base_path,
        model_config_file=model_config_file, model_config_file_poll_wait_seconds=config_poll,
        file_system_poll_wait_seconds=args.file_system_poll_wait_seconds, enable_batching=enable_batching,
        batching_parameters_file=batching_file, prometheus_path=prometheus_path, load=load_options,
        load_retries=LoadRetries(args.max_num_load_retries, max(0.0, args.load_retry_interval_micros / 1e6)),
        num_load_threads=args.num_load_threads, max_request_body_bytes=args.max_request_body_bytes,
        max_inflight_bytes=args.max_inflight_bytes, max_inflight_requests=args.max_inflight_requests,
        max_connections=args.max_connections, idle_connection_timeout_in_ms=args.idle_connection_timeout_in_ms,
        traffic_file=args.traffic_file, input_schema=input_schema,
        reject_anomalous_inputs=args.reject_anomalous_inputs, server_processes=args.server_processes,
        worker=WorkerSlot.from_environment() if args.server_processes > 1 else None)


def _from_spec(spec_path: str):
    """(models.config, model name, base path, batching.config) for the spec's serving base path."""
    from conveyor_ml.base.spec import load_spec
    from conveyor_ml.formats import serving_config

    spec = load_spec(spec_path)
    pusher = spec.components.serving_pusher
    if pusher is None:
        raise ConveyorError(f"{spec_path}: no components.serving_pusher, so nothing was pushed to serve")
    base = pusher.base_path
    config_file = base / serving_config.MODELS_CONFIG
    batching_file = base / serving_config.BATCHING_CONFIG
    model_dir = base / pusher.model_name
    if not config_file.is_file() and not model_dir.is_dir():
        raise ConveyorError(f"nothing pushed yet under {base}: run `make pipeline` first")
    return (str(config_file) if config_file.is_file() else None, pusher.model_name, str(model_dir),
            str(batching_file) if batching_file.is_file() else None)


def version_text() -> str:
    """What --version prints, in TF Serving's two lines."""
    from importlib.metadata import PackageNotFoundError, version

    def installed(name: str) -> str:
        try:
            return version(name)
        except PackageNotFoundError:
            return "unknown"

    return (f"TensorFlow ModelServer: conveyor-{installed('conveyor-ml')} (TF Serving API "
            f"{installed('tensorflow-serving-api')})\nTensorFlow Library: {installed('tensorflow')}")


async def _serve(server, stop: asyncio.Event) -> None:
    from aiohttp import web

    from conveyor_ml.serving.connections import BoundedServer
    from conveyor_ml.serving.grpc_service import build_grpc_server
    from conveyor_ml.serving.rest import MalformedHttpLog, RestApi

    options = server.options
    try:
        grpc_server, health = build_grpc_server(server)
    except OSError as exc:
        raise ConveyorError(str(exc)) from None
    control = None
    if options.worker is not None:  # before the public ports: see Peers.ask_others
        from conveyor_ml.serving.peers import start_control_server

        # A forwarded feedback group is at most a client's body, re-encoded.
        control = await start_control_server(options.worker, server.control_handlers(),
                                             max_body_bytes=2 * options.max_request_body_bytes)
    runner = None
    if options.rest_api_port:
        # On SIGTERM, requests still running get SHUTDOWN_GRACE_SECONDS (aiohttp's default is 60 s).
        rest = RestApi(server)
        logging.getLogger("aiohttp.server").addFilter(MalformedHttpLog())
        connections = BoundedServer(rest.handle, max_connections=options.max_connections,
                                    keepalive_timeout=options.idle_connection_timeout_in_ms / 1000,
                                    request_factory=rest.make_request, access_log=None)
        runner = web.ServerRunner(connections, shutdown_timeout=SHUTDOWN_GRACE_SECONDS)
        await runner.setup()
        # Several server processes share the port (--server_processes: the kernel spreads connections).
        site = web.TCPSite(runner, options.rest_api_host, options.rest_api_port, reuse_address=True,
                           reuse_port=options.worker is not None, backlog=1024)
        try:
            await site.start()
        except OSError as exc:
            await runner.cleanup()
            raise ConveyorError(f"cannot listen on {options.rest_api_host}:{options.rest_api_port} (REST): "
                                f"{exc.strerror}") from None
    await grpc_server.start()
    models = ", ".join(f"{m.name} {m.available_versions() or '(no version yet)'}" for m in server.registry.models())
    listeners = []
    if runner:
        listeners.append(f"REST http://{options.rest_api_host}:{options.rest_api_port}")
    if options.port:
        listeners.append(f"gRPC {options.grpc_host}:{options.port}")
    if options.grpc_socket_path:
        listeners.append(f"gRPC unix:{options.grpc_socket_path}")
    started = f"conveyor serve: {'  '.join(listeners)}  models: {models}"
    if options.worker is None:
        print(started, flush=True)
    else:  # the supervisor prints it once every server process listens
        ready = Path(options.worker.ready_path(options.worker.index))
        ready.with_suffix(".tmp").write_text(started)
        ready.with_suffix(".tmp").replace(ready)  # whole or absent: the supervisor prints what it reads
    await stop.wait()
    if health is not None:
        health.stopping = True
    await grpc_server.stop(grace=SHUTDOWN_GRACE_SECONDS)
    if runner:
        await runner.cleanup()
    if control:
        await control.cleanup()
    if server.peers:
        await server.peers.close()


def _event_loop_policy() -> None:
    """uvloop (libuv) runs REST, gRPC and the hand-offs between them and the model threads with less Python
    per call than asyncio's own loop; asyncio's is kept where uvloop is not installed."""
    try:
        import uvloop
    except ImportError:
        log.info("uvloop is not installed: serving on asyncio's own event loop")
        return
    asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())


def _check_ports_free(options) -> None:
    """Raises ConveyorError in one line when the REST or the gRPC port cannot be listened on now."""
    if options.rest_api_port:
        check_port_free(options.rest_api_host, options.rest_api_port, "REST")
    if options.port:
        check_port_free(options.grpc_host, options.port, "gRPC")


def run(args: argparse.Namespace) -> int:
    """Serves until SIGTERM or SIGINT, then shuts down in order and ends the process with status 0
    (--version prints and returns; a mistake raises ConveyorError before anything starts)."""
    if args.version:
        print(version_text())
        return 0
    from conveyor_ml.serving.peers import WorkerSlot

    # Until its event loop handles SIGTERM (an orderly stop), the server has nothing to clean up: SIGTERM ends
    # it at once, as the kernel's does when the process that started it (a supervisor, an InfraValidator)
    # dies, even by SIGKILL, so that no orphan holds the ports.
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
    die_with_parent(signal.SIGTERM)
    slot = WorkerSlot.from_environment()
    process = f" [process {slot.index}]" if slot else ""
    logging.basicConfig(level=logging.INFO, format=f"%(asctime)s %(levelname)s{process} %(message)s",
                        stream=sys.stderr)
    options = options_from_args(args)
    if options.worker is None:
        # A port taken (or a host no name resolves) is said before any model loads, not after; server
        # processes share theirs with each other only, so the supervisor's are checked here too.
        _check_ports_free(options)
    if options.server_processes > 1 and options.worker is None:
        from conveyor_ml.serving.supervisor import supervise

        _exit(supervise(options, getattr(args, "argv", sys.argv[1:])))
    if options.worker is not None and options.worker.index:  # a Unix socket path has one listener: the first's
        options = dataclasses.replace(options, grpc_socket_path=None)
    from conveyor_ml.serving.connections import default_max_connections, raise_open_file_limit

    open_files = raise_open_file_limit()  # before anything opens files: TensorFlow, the models, the listeners
    if options.max_connections is None:
        listeners = sum(map(bool, (options.rest_api_port, options.port, options.grpc_socket_path)))
        options = dataclasses.replace(options, max_connections=default_max_connections(open_files, listeners))
    log.info("connections: at most %d per listener, closed after %d ms with nothing in flight (open-file limit %d)",
             options.max_connections, options.idle_connection_timeout_in_ms, open_files)
    _note_no_effect(args, {"flush_filesystem_caches": True, "remove_unused_fields_from_bundle_metagraph": True,
                           "skip_initialize_tpu": False, "num_unload_threads": 0})
    for host in {options.rest_api_host, options.grpc_host}:
        if host not in ("127.0.0.1", "localhost", "::1"):
            log.warning("listening on %s: reachable from other machines", host)
    import tensorflow as tf

    session = options.load.session_config
    # The process-wide pools (eager work such as reading warmup files) get the sessions' sizes too.
    tf.config.threading.set_intra_op_parallelism_threads(session.intra_op_parallelism_threads)
    tf.config.threading.set_inter_op_parallelism_threads(session.inter_op_parallelism_threads)
    from conveyor_ml.serving import heap
    from conveyor_ml.serving.model_server import ModelServer

    heap.tune_collector()
    server = ModelServer(options, on_servables_changed=heap.freeze_long_lived)
    server.start_polling()

    async def main() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(signum, stop.set)
        await _serve(server, stop)

    try:
        _event_loop_policy()
        asyncio.run(main())
    finally:
        server.stop()
        if options.grpc_socket_path:
            Path(options.grpc_socket_path).unlink(missing_ok=True)
    _exit(0)


def _exit(status: int) -> None:
    """Ends the process now. Everything is closed; TensorFlow's own teardown at interpreter exit takes
    seconds (3-5 s measured here) and does nothing a stopped server needs; a pod being replaced or a test
    waits for it otherwise."""
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(status)
