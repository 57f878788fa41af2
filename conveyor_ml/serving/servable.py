"""One loaded model version (a "servable" in TF Serving's words): its SignatureDefs and how to run them.

A SavedModel is loaded as TF Serving loads it: the `serve` MetaGraph into a TensorFlow session, whose
graph is then run by tensor name. Requests are fed to the graph as they come — TF Serving checks input
names against the signature, not shapes, so a TF1 model whose placeholder is looser than its signature's
TensorInfo (or an Identity, like TF Serving's half_plus_two test model) predicts as it does there; inputs
the graph itself cannot take fail with TensorFlow's own message as INVALID_ARGUMENT. Classify, Regress and
MultiInference follow TF Serving's signature rules, including `--enable_signature_method_name_check`.
TFLite models (`model.tflite`, with --prefer_tflite_model) live in tflite_servable.py.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import numpy as np
import tensorflow as tf
from google.protobuf import text_format
from tensorflow.core.framework import types_pb2
from tensorflow.core.protobuf import config_pb2, meta_graph_pb2, saved_model_pb2

from conveyor_ml.serving.errors import ModelRunError, ServingError, invalid_argument

PREDICT_METHOD = "tensorflow/serving/predict"
CLASSIFY_METHOD = "tensorflow/serving/classify"
REGRESS_METHOD = "tensorflow/serving/regress"
DEFAULT_SIGNATURE = "serving_default"
CLASSIFY_INPUTS, CLASSIFY_CLASSES, CLASSIFY_SCORES = "inputs", "classes", "scores"
REGRESS_INPUTS, REGRESS_OUTPUTS = "inputs", "outputs"
WARMUP_FILE = Path("assets.extra") / "tf_serving_warmup_requests"
MAX_WARMUP_RECORDS = 1000  # TF Serving's limit
TFLITE_MODEL_FILE = "model.tflite"
# A run with a deadline executes on the calling thread only when the model's cost is under this share of the
# time left: TensorFlow cannot stop a run on the caller's thread midway, a pooled run it can.
CALLER_THREAD_DEADLINE_SHARE = 0.1
RECENT_RUNS = 8  # timed calls the estimate of a model's cost is taken from (Servable.estimated_run_seconds)
WAITING_RUN_SECONDS = 0.003  # a timed call at least this long counts its wall-clock time (Servable.timed_predict)


class IncompleteModelError(Exception):
    """A version directory that is not (yet) a complete SavedModel."""


@dataclass(frozen=True)
class LoadOptions:
    """How versions are loaded and run: tensorflow_model_server's per-model flags."""

    saved_model_tags: tuple[str, ...] = ("serve",)
    session_config: config_pb2.ConfigProto = field(default_factory=config_pb2.ConfigProto)
    prefer_tflite_model: bool = False
    tflite_interpreters: int = 1  # --num_tflite_pools x --num_tflite_interpreters_per_pool
    tflite_float_io: bool = False  # our extension: quantized TFLite tensors take and give floats
    signature_method_name_check: bool = False
    enable_model_warmup: bool = True
    warmup_iterations: int = 1


@dataclass
class Classification:
    classes: np.ndarray | None  # [examples, classes] bytes
    scores: np.ndarray | None  # [examples, classes] float32


def read_signature_defs(export_dir: Path, tags: tuple[str, ...] = ("serve",)) -> dict[str, meta_graph_pb2.SignatureDef]:
    """The SignatureDefs of the MetaGraph with `tags`, read from saved_model.pb(txt) without loading the model."""
    export_dir = Path(export_dir)
    binary, text = export_dir / "saved_model.pb", export_dir / "saved_model.pbtxt"
    if binary.is_file():
        content = binary.read_bytes()
        if not content:
            raise IncompleteModelError(f"{binary} is empty (not a complete SavedModel)")
        saved_model = saved_model_pb2.SavedModel.FromString(content)
    elif text.is_file():
        saved_model = text_format.Parse(text.read_text(), saved_model_pb2.SavedModel())
    else:
        raise IncompleteModelError(f"{export_dir} has no saved_model.pb (not a complete SavedModel)")
    for meta_graph in saved_model.meta_graphs:
        if set(tags) == set(meta_graph.meta_info_def.tags):
            return dict(meta_graph.signature_def)
    raise IncompleteModelError(f"{export_dir} has no MetaGraph tagged {','.join(tags)!r}")


def _names(keys) -> str:
    return ",".join(sorted(keys))


def _one_line(signature: meta_graph_pb2.SignatureDef) -> str:
    return text_format.MessageToString(signature, as_one_line=True)


MAX_ERROR_MESSAGE_CHARS = 2000


def model_error_message(text: str) -> str:
    """TensorFlow's whole message on one line, bounded: its first line alone is often only a header such as
    "Graph execution error:", with the cause and the node on the lines after."""
    lines = [line.strip() for line in text.strip().splitlines() if line.strip()]
    if len(lines) > 1 and lines[0].rstrip(":") in ("Graph execution error", "Detected at node"):
        lines = lines[1:]
    message = " ".join(" ".join(lines).split())
    return message if len(message) <= MAX_ERROR_MESSAGE_CHARS else message[:MAX_ERROR_MESSAGE_CHARS] + "..."


def input_size(inputs: dict[str, np.ndarray]) -> int:
    """How many values a request's inputs hold, all inputs together: what a model's cost grows with (rows
    of images, the length of sequences)."""
    return sum(np.size(value) for value in inputs.values())


def empty_batch_outputs(signature: meta_graph_pb2.SignatureDef, aliases: list[str],
                        inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray] | None:
    """The answer to a request of zero rows told from the signature alone: every output with a batch of 0,
    where each is batch-major ([-1, known sizes...]); None where the signature does not say so. For models
    whose kernels cannot run zero rows (TensorFlow's oneDNN Conv2D on CPUs with AVX-512 VNNI refuses them,
    LiteRT's XNNPACK delegate cannot be resized to them), where a request of none is no fault of the client's.
    Only for inputs of the signature's shapes: a [0, 5] where the model takes [-1, 3] keeps the model's refusal."""
    if not inputs or any(np.ndim(value) == 0 or np.shape(value)[0] != 0 for value in inputs.values()):
        return None
    for alias, value in inputs.items():
        shape = signature.inputs[alias].tensor_shape
        dims = [dim.size for dim in shape.dim]
        if not shape.unknown_rank and (len(dims) != np.ndim(value) or any(
                want not in (-1, got) for want, got in zip(dims[1:], np.shape(value)[1:]))):
            return None
    outputs = {}
    for alias in aliases:
        info = signature.outputs[alias]
        dims = [dim.size for dim in info.tensor_shape.dim]
        if info.tensor_shape.unknown_rank or not dims or dims[0] != -1 or -1 in dims[1:]:
            return None
        outputs[alias] = np.zeros([0, *dims[1:]], tf.as_dtype(info.dtype).as_numpy_dtype)
    return outputs


def grpc_code(exc: tf.errors.OpError) -> grpc.StatusCode:
    for code in grpc.StatusCode:
        if code.value[0] == exc.error_code:
            return code
    return grpc.StatusCode.INTERNAL


class Servable:
    """A loaded version: signature lookup and TF Serving's request rules; subclasses run the model."""

    platform = ""

    def __init__(self, model_name: str, version: int, export_dir: Path, options: LoadOptions):
        self.model_name = model_name
        self.version = version
        self.export_dir = Path(export_dir)
        self.options = options
        self.signature_defs: dict[str, meta_graph_pb2.SignatureDef] = {}
        self.load_seconds = 0.0
        self._validated: dict[tuple, str] = {}  # validate_inputs' passes: (signature, (alias, dtype)...) -> name
        self._input_dtypes: dict[str, dict[str, tf.DType]] = {}  # per known signature name
        # The last RECENT_RUNS timed calls' (cost, input size), a ring of fixed length: pool threads note calls
        # at once, and a list that grew by append could pass its length and keep a stale entry for good.
        self._recent_runs: list[tuple[float, int] | None] = [None] * RECENT_RUNS
        self._runs_noted = 0

    def estimated_run_seconds(self, size: int = 1) -> float | None:
        """What a call whose inputs hold `size` values (input_size) should cost with the server to itself (None
        before a timed call): the least of the last RECENT_RUNS timed calls' costs (see timed_predict), each
        grown in proportion where the call's inputs were smaller (a one-image request measured cheap says
        nothing good about a thousand-image one: run on the event loop, it would stall every other request;
        in proportion overstates it, which only sends it to a pool thread)."""
        least = None
        for run in self._recent_runs:  # a plain loop: asked on the event loop per request
            if run is None:
                continue
            seconds, measured_size = run
            cost = seconds if size <= measured_size else seconds * size / measured_size
            if least is None or cost < least:
                least = cost
        return least

    def note_run_seconds(self, seconds: float, size: int = 1) -> None:
        """Adds one call's cost and its input size (pool threads may call this at once: at worst one is lost)."""
        self._recent_runs[self._runs_noted % RECENT_RUNS] = (seconds, max(1, size))
        self._runs_noted += 1

    def timed_predict(self, signature_name: str, inputs: dict[str, np.ndarray], *args, **kwargs) -> dict[str, np.ndarray]:
        """predict(), its cost noted: the CPU time of the thread that ran it, not the wall-clock time a busy
        server adds to (waits for the GIL and a CPU: the digit model's pooled calls measured 200-700 us wall
        at concurrency 1 on this VM and 300 us to 5 ms at 32, its CPU time 160-240 us throughout). A call
        longer than WAITING_RUN_SECONDS counts its wall-clock time: a model that waits (on I/O, on the
        inter-op pool) would hold the event loop that long."""
        started, started_cpu = time.perf_counter(), time.thread_time()
        outputs = self.predict(signature_name, inputs, *args, **kwargs)
        wall, cpu = time.perf_counter() - started, time.thread_time() - started_cpu
        self.note_run_seconds(cpu if wall < WAITING_RUN_SECONDS else wall, input_size(inputs))
        return outputs

    # -- signatures ---------------------------------------------------------------------------------------
    def signature(self, name: str) -> tuple[str, meta_graph_pb2.SignatureDef]:
        """(resolved name, SignatureDef); an unknown name is REST predict's INVALID_ARGUMENT."""
        name = name or DEFAULT_SIGNATURE
        if name not in self.signature_defs:
            raise invalid_argument(f'Serving signature name: "{name}" not found in signature def')
        return name, self.signature_defs[name]

    def input_dtypes(self, signature_name: str) -> dict[str, tf.DType]:
        dtypes = self._input_dtypes.get(signature_name)
        if dtypes is None:
            _, signature = self.signature(signature_name)
            dtypes = {key: tf.dtypes.as_dtype(info.dtype) for key, info in signature.inputs.items()}
            self._input_dtypes[signature_name] = dtypes
        return dtypes

    def _verify_predict_method(self, signature: meta_graph_pb2.SignatureDef) -> None:
        if (self.options.signature_method_name_check
                and signature.method_name not in (PREDICT_METHOD, CLASSIFY_METHOD, REGRESS_METHOD)):
            raise ServingError(grpc.StatusCode.INTERNAL,
                               f"Expected prediction signature method_name to be one of {{{PREDICT_METHOD}, "
                               f"{CLASSIFY_METHOD}, {REGRESS_METHOD}}}. Was: {signature.method_name}")

    def validate_inputs(self, signature_name: str, inputs: dict[str, np.ndarray]) -> str:
        """TF Serving's checks of a Predict request's input names (not shapes); returns the signature name.
        They depend on the names and dtypes only, so what passed once is remembered (failures are not: their
        keys are whatever clients send)."""
        key = (signature_name, *((alias, value.dtype.str) for alias, value in inputs.items()))
        name = self._validated.get(key)
        if name is None:
            name, signature = self.signature(signature_name)
            self._verify_predict_method(signature)
            self._check_input_names(signature, inputs)
            self._check_dtypes(signature, inputs)
            self._validated[key] = name
        return name

    def _check_dtypes(self, signature: meta_graph_pb2.SignatureDef, inputs: dict[str, np.ndarray]) -> None:
        """Refuses inputs of a type the model cannot take (subclasses know what their model takes)."""

    @staticmethod
    def _check_input_names(signature: meta_graph_pb2.SignatureDef, inputs: dict[str, np.ndarray]) -> None:
        sent, expected = set(inputs), set(signature.inputs)
        if len(sent) > len(expected) or (len(sent) < len(expected) and not signature.defaults):
            raise invalid_argument(
                f"input size does not match signature: {len(sent)}!={len(expected)} len({{{_names(sent)}}}) != "
                f"len({{{_names(expected)}}}). Sent extra: {{{_names(sent - expected)}}}. "
                f"Missing but required: {{{_names(expected - sent)}}}.")
        for alias in sorted(sent - expected):
            raise invalid_argument(f"input tensor alias not found in signature: {alias}. Inputs expected to be in "
                                   f"the set {{{_names(expected)}}}.")
        missing = sorted(expected - sent - set(signature.defaults))
        if missing:
            raise invalid_argument(f"Missing input tensor alias(es): {', '.join(missing)}: the signature has no "
                                   "default for them")

    @staticmethod
    def _output_aliases(signature: meta_graph_pb2.SignatureDef, output_filter: tuple[str, ...]) -> list[str]:
        seen: set[str] = set()
        for alias in output_filter:
            if alias not in signature.outputs:
                raise invalid_argument(f"output tensor alias not found in signature: {alias} Outputs expected to be "
                                       f"in the set {{{_names(signature.outputs)}}}.")
            if alias in seen:
                raise invalid_argument(f"duplicate output tensor alias: {alias}")
            seen.add(alias)
        return list(output_filter) or list(signature.outputs)

    def _checked_signature(self, signature_name: str, check) -> tuple[str, meta_graph_pb2.SignatureDef]:
        """The named (or default) signature, after `check` (TF Serving's classify or regress rules)."""
        name = signature_name or DEFAULT_SIGNATURE
        if name not in self.signature_defs:
            raise invalid_argument(f"No signature was found with the name: {name}")
        signature = self.signature_defs[name]
        check(signature, self.options.signature_method_name_check)
        return name, signature

    # -- running ------------------------------------------------------------------------------------------
    def predict(self, signature_name: str, inputs: dict[str, np.ndarray], output_filter: tuple[str, ...] = (),
                timeout_ms: int | None = None) -> dict[str, np.ndarray]:
        raise NotImplementedError

    def classify(self, signature_name: str, examples: list[bytes], timeout_ms: int | None = None) -> Classification:
        name, signature = self._checked_signature(signature_name, check_classification_signature)
        [result] = self._infer([(name, CLASSIFY_METHOD, signature)], examples, timeout_ms)
        return result

    def regress(self, signature_name: str, examples: list[bytes], timeout_ms: int | None = None) -> np.ndarray:
        name, signature = self._checked_signature(signature_name, check_regression_signature)
        [result] = self._infer([(name, REGRESS_METHOD, signature)], examples, timeout_ms)
        return result

    def multi_inference(self, tasks: list[tuple[str, str]], examples: list[bytes],
                        timeout_ms: int | None = None) -> list[Classification | np.ndarray]:
        """[(signature name, method name)] over the same examples in one model run, TF Serving's rules."""
        checked, seen = [], set()
        for signature_name, method in tasks:
            name = signature_name or DEFAULT_SIGNATURE
            if name in seen:
                raise invalid_argument(f"Duplicate evaluation of signature: {name}")
            seen.add(name)
            if name not in self.signature_defs:
                raise invalid_argument(f"Requested signature not found in model graph: {name}")
            signature = self.signature_defs[name]
            if method == CLASSIFY_METHOD:
                check_classification_signature(signature, self.options.signature_method_name_check)
            elif method == REGRESS_METHOD:
                check_regression_signature(signature, self.options.signature_method_name_check)
            else:
                raise ServingError(grpc.StatusCode.UNIMPLEMENTED, f"Unsupported signature method_name: {method}")
            checked.append((name, method, signature))
        return self._infer(checked, examples, timeout_ms)

    def _infer(self, tasks: list[tuple[str, str, meta_graph_pb2.SignatureDef]], examples: list[bytes],
               timeout_ms: int | None) -> list[Classification | np.ndarray]:
        """Feeds the serialized examples to every task's input tensor, fetches every output once."""
        if not examples:
            raise invalid_argument("Input is empty.")
        serialized = np.array(examples, dtype=object)
        feeds = {signature.inputs[CLASSIFY_INPUTS].name: serialized for _, _, signature in tasks}
        fetches = sorted({info.name for _, method, signature in tasks
                          for key, info in signature.outputs.items()
                          if key in ((CLASSIFY_CLASSES, CLASSIFY_SCORES) if method == CLASSIFY_METHOD
                                     else (REGRESS_OUTPUTS,))})
        values = dict(zip(fetches, self._run_tensors(feeds, fetches, timeout_ms)))
        results: list[Classification | np.ndarray] = []
        for _, method, signature in tasks:
            if method == CLASSIFY_METHOD:
                results.append(_classification_result(signature, values, len(examples)))
            else:
                results.append(_regression_result(signature, values, len(examples)))
        return results

    def _run_tensors(self, feeds: dict[str, np.ndarray], fetches: list[str],
                     timeout_ms: int | None) -> list[np.ndarray]:
        raise ServingError(grpc.StatusCode.UNIMPLEMENTED,
                           f"Classify, Regress and MultiInference are not supported on {self.platform} models; "
                           "use Predict")

    # -- warmup -------------------------------------------------------------------------------------------
    def warm_up(self) -> int:
        """Replays assets.extra/tf_serving_warmup_requests (TF Serving's PredictionLog records); returns the
        number of records replayed."""
        path = self.export_dir / WARMUP_FILE
        if not self.options.enable_model_warmup or not path.is_file():
            return 0
        from tensorflow_serving.apis import prediction_log_pb2

        records = list(tf.data.TFRecordDataset(str(path)).as_numpy_iterator())
        if len(records) > MAX_WARMUP_RECORDS:
            raise ValueError(f"Number of warmup records exceeds the maximum ({MAX_WARMUP_RECORDS}) at {path}")
        for _ in range(self.options.warmup_iterations):
            for record in records:
                log = prediction_log_pb2.PredictionLog.FromString(record)
                kind = log.WhichOneof("log_type")
                if kind == "predict_log":
                    request = log.predict_log.request
                    inputs = {key: tf.make_ndarray(proto) for key, proto in request.inputs.items()}
                    self.predict(request.model_spec.signature_name, inputs, tuple(request.output_filter))
                elif kind == "classify_log":
                    request = log.classify_log.request
                    self.classify(request.model_spec.signature_name, serialized_examples(request.input))
                elif kind == "regress_log":
                    request = log.regress_log.request
                    self.regress(request.model_spec.signature_name, serialized_examples(request.input))
                elif kind == "multi_inference_log":
                    request = log.multi_inference_log.request
                    self.multi_inference([(t.model_spec.signature_name, t.method_name) for t in request.tasks],
                                         serialized_examples(request.input))
        return len(records)


def serialized_examples(model_input) -> list[bytes]:
    """The serialized tf.Examples of a classify/regress/multi-inference `Input`; with a context, each
    example carries the context's features too (the example's own win on a name clash)."""
    kind = model_input.WhichOneof("kind")
    if kind == "example_list":
        return [example.SerializeToString() for example in model_input.example_list.examples]
    if kind == "example_list_with_context":
        context = model_input.example_list_with_context.context.SerializeToString()
        return [context + example.SerializeToString()  # concatenated protos merge, later fields winning
                for example in model_input.example_list_with_context.examples]
    raise invalid_argument("Input is empty.")


def check_classification_signature(signature: meta_graph_pb2.SignatureDef, method_name_check: bool) -> None:
    """TF Serving's PreProcessClassification: with the method-name check off (its default), any signature
    shaped like a classifier works, as TF2 models' signatures all carry the predict method name."""
    if method_name_check and signature.method_name != CLASSIFY_METHOD:
        raise invalid_argument(f"Expected classification signature method_name to be {CLASSIFY_METHOD}. "
                               f"Was: {signature.method_name}")
    if len(signature.inputs) != 1:
        raise invalid_argument("Expected one input Tensor.")
    if len(signature.outputs) not in (1, 2):
        raise invalid_argument(f"Expected one or two output Tensors, found {len(signature.outputs)}")
    if CLASSIFY_INPUTS not in signature.inputs:
        raise invalid_argument(f"No classification inputs found in SignatureDef: {_one_line(signature)}")
    if CLASSIFY_CLASSES not in signature.outputs and CLASSIFY_SCORES not in signature.outputs:
        raise invalid_argument('Expected classification signature outputs to contain at least one of "classes" '
                               f'or "scores". Signature was: {_one_line(signature)}')


def check_regression_signature(signature: meta_graph_pb2.SignatureDef, method_name_check: bool) -> None:
    """TF Serving's PreProcessRegression (see check_classification_signature)."""
    if method_name_check and signature.method_name != REGRESS_METHOD:
        raise invalid_argument(f"Expected regression signature method_name to be {REGRESS_METHOD}. "
                               f"Was: {signature.method_name}")
    if len(signature.inputs) != 1:
        raise invalid_argument("Expected one input Tensor.")
    if len(signature.outputs) != 1:
        raise invalid_argument("Expected one output Tensor.")
    if REGRESS_INPUTS not in signature.inputs:
        raise invalid_argument(f"No regression inputs found in SignatureDef: {_one_line(signature)}")
    if REGRESS_OUTPUTS not in signature.outputs:
        raise invalid_argument(f"No regression outputs found in SignatureDef: {_one_line(signature)}")


def _dtype_of(array: np.ndarray) -> tf.DType:
    return tf.string if array.dtype == object or array.dtype.kind in "SU" else tf.dtypes.as_dtype(array.dtype)


def _dtype_name(dtype: tf.DType) -> str:
    """TF Serving's spelling: DT_FLOAT, DT_STRING..."""
    return types_pb2.DataType.Name(dtype.as_datatype_enum)


def _shape_text(array: np.ndarray) -> str:
    return "[" + ",".join(str(d) for d in array.shape) + "]"


def _classification_result(signature, values: dict[str, np.ndarray], count: int) -> Classification:
    classes = values.get(signature.outputs[CLASSIFY_CLASSES].name) if CLASSIFY_CLASSES in signature.outputs else None
    scores = values.get(signature.outputs[CLASSIFY_SCORES].name) if CLASSIFY_SCORES in signature.outputs else None
    for what, array, want in (("classes", classes, tf.string), ("scores", scores, tf.float32)):
        if array is None:
            continue
        if array.ndim != 2:
            raise invalid_argument(f"Expected Tensor shape: [batch_size num_classes] but got {_shape_text(array)}")
        actual = _dtype_of(array)
        if actual != want:
            raise invalid_argument(f"Expected {what} Tensor of {_dtype_name(want)}. Got: {_dtype_name(actual)}")
        if array.shape[0] != count:
            raise invalid_argument(f"Expected {what} output batch size of {count}. Got: {array.shape[0]}")
    if classes is not None and scores is not None and classes.shape[1] != scores.shape[1]:
        raise invalid_argument(f"Tensors class and score should match in dim_size(1). Got {classes.shape[1]} vs. "
                               f"{scores.shape[1]}")
    return Classification(classes, scores)


def _regression_result(signature, values: dict[str, np.ndarray], count: int) -> np.ndarray:
    output = values[signature.outputs[REGRESS_OUTPUTS].name]
    if not (output.ndim == 1 or (output.ndim == 2 and output.shape[1] == 1)):
        raise invalid_argument("Expected output Tensor shape to be either [batch_size] or [batch_size, 1] but got "
                               f"{_shape_text(output)}")
    if output.shape[0] != count:
        raise invalid_argument(f"Input batch size did not match output batch size: {count} vs. {output.shape[0]}")
    if output.dtype != np.float32:
        raise invalid_argument(f"Expected output Tensor of DT_FLOAT.  Got: {_dtype_name(_dtype_of(output))}")
    return output.reshape(count)


class SavedModelServable(Servable):
    """A SavedModel's MetaGraph in its own TensorFlow session; thread-safe (Session::Run is)."""

    platform = "tensorflow"

    def __init__(self, model_name: str, version: int, export_dir: Path, options: LoadOptions | None = None):
        super().__init__(model_name, version, export_dir, options or LoadOptions())
        tags = self.options.saved_model_tags
        self.signature_defs = read_signature_defs(self.export_dir, tags)
        started = time.perf_counter()
        self._graph = tf.Graph()
        self._session = tf.compat.v1.Session(graph=self._graph, config=self.options.session_config)
        try:
            with self._graph.as_default():
                tf.compat.v1.saved_model.loader.load(self._session, list(tags), str(self.export_dir))
        except Exception:
            self._session.close()
            raise
        self._graph.finalize()  # nothing may add ops from now on: runs need no graph lock
        self._tensors: dict[str, tf.Tensor] = {}
        # Runs execute their ops on the thread that calls them (RunOptions.inter_op_thread_pool = -1, meant by
        # TensorFlow for graphs whose ops cost about as much as a thread hand-off): the digit model's Session
        # run took 150-190 us so on this 2-core VM, 370-390 us through the inter-op pool, whose wake-ups cost more
        # than its ops. Heavy ops still spread over the intra-op pool. A user who sizes the inter-op pool
        # (--tensorflow_inter_op_parallelism, a session config's pools) gets every run on the pool.
        config = self.options.session_config
        self._caller_thread_runs = (config.inter_op_parallelism_threads == 0
                                    and not config.session_inter_op_thread_pool)
        self.load_seconds = time.perf_counter() - started

    def close(self) -> None:
        self._session.close()

    def _tensor(self, name: str) -> tf.Tensor:
        tensor = self._tensors.get(name)
        if tensor is None:
            try:
                tensor = self._graph.get_tensor_by_name(name)
            except (KeyError, ValueError):
                raise invalid_argument(f"Tensor {name}, named by the signature, is not in the model's graph") from None
            self._tensors[name] = tensor
        return tensor

    def predict(self, signature_name: str, inputs: dict[str, np.ndarray], output_filter: tuple[str, ...] = (),
                timeout_ms: int | None = None) -> dict[str, np.ndarray]:
        name = self.validate_inputs(signature_name, inputs)
        signature = self.signature_defs[name]
        feeds = {info.name: inputs[alias] if alias in inputs else tf.make_ndarray(signature.defaults[alias])
                 for alias, info in signature.inputs.items()}
        aliases = self._output_aliases(signature, tuple(output_filter))
        try:
            values = self._run_tensors(feeds, [signature.outputs[alias].name for alias in aliases], timeout_ms)
        except ModelRunError:
            empty = empty_batch_outputs(signature, aliases, inputs)
            if empty is None:
                raise
            return empty
        return dict(zip(aliases, values))

    def _check_dtypes(self, signature: meta_graph_pb2.SignatureDef, inputs: dict[str, np.ndarray]) -> None:
        """The graph takes only its tensors' exact dtypes (whatever the TensorInfo says): name the wrong
        input rather than answer TF's `Expects arg[0] to be float but double is provided`."""
        for alias, value in inputs.items():
            tensor_name = signature.inputs[alias].name
            want, got = self._tensor(tensor_name).dtype, _dtype_of(np.asarray(value))
            if got != want:
                raise invalid_argument(f"input '{alias}' is {_dtype_name(got)} but the model's tensor {tensor_name} "
                                       f"takes {_dtype_name(want)}")

    def _run_tensors(self, feeds: dict[str, np.ndarray], fetches: list[str],
                     timeout_ms: int | None) -> list[np.ndarray]:
        from tensorflow.python.client import pywrap_tf_session

        feed_dict = {self._tensor(name)._as_tf_output(): value for name, value in feeds.items()}
        fetch_list = [self._tensor(name)._as_tf_output() for name in fetches]
        run_options = config_pb2.RunOptions(timeout_in_ms=int(timeout_ms or 0))
        if self._caller_thread_runs and (not timeout_ms or self._finishes_well_within(timeout_ms, input_size(feeds))):
            run_options.inter_op_thread_pool = -1
        options = pywrap_tf_session.TF_NewBufferFromString(run_options.SerializeToString())
        try:
            # The session's own run() first checks each value against the tensor's static shape; TF Serving
            # (C++ Session::Run) does not, so the lower-level call is used to feed what the graph accepts.
            return self._session._call_tf_sessionrun(options, feed_dict, fetch_list, [], None)
        except tf.errors.OpError as exc:
            message = model_error_message(exc.message) or type(exc).__name__
            if isinstance(exc, tf.errors.DeadlineExceededError):
                message = f"Deadline exceeded: the model ran longer than the request's {timeout_ms} ms ({message})"
            raise ModelRunError(grpc_code(exc), message) from None
        finally:
            pywrap_tf_session.TF_DeleteBuffer(options)

    def _finishes_well_within(self, timeout_ms: int, size: int) -> bool:
        cost = self.estimated_run_seconds(size)
        return cost is not None and cost * 1000 < CALLER_THREAD_DEADLINE_SHARE * timeout_ms
