"""`conveyor doctor`: the serving guide's troubleshooting table and optimisation checklist as automated checks
against a model, a serving directory and a running server. Each check says OK, WARN, FAIL or SKIP (not
applicable here), why, and what to do about it; any FAIL makes the command exit non-zero.

The checks measure rather than assume: classes are compared by running the same images through every signature
and TFLite variant, latencies and sizes are measured on this machine, the server is asked over HTTP.

The faults the checks exist to find (a saved_model.pb that does not parse, missing weights, a damaged TFLite
variant or manifest) are FAIL findings of the check that meets them, never a traceback: a check raises
`CheckFault` with the reason and the fix, and `diagnose` turns any other exception of one check into a FAIL
naming that check, so the other checks still run.
"""
from __future__ import annotations

import http.client
import io
import json
import re
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from conveyor_ml.base.cli_values import url_problem
from conveyor_ml.base.errors import ConveyorError
from conveyor_ml.base.names import PROMETHEUS_PATH, STATISTICS_GEN
from conveyor_ml.formats import serving_config
from conveyor_ml.formats.release_state import ModelRelease, known_models, read_release, versions_on_disk
from conveyor_ml.operations.quantized_canary import DamagedManifest, read_manifest
from conveyor_ml.operations.records import JsonRecord

OK, WARN, FAIL, SKIP = "OK", "WARN", "FAIL", "SKIP"
TF_SERVING_IMAGE = re.compile(r"tensorflow/serving:(?P<tag>\d+\.\d+(?:\.\d+)?)")
SAMPLE_IMAGES = 32
# TFLite variants may legitimately change a few answers (the Quantizer gates them on accuracy); below this
# agreement with the SavedModel they compute something else.
TFLITE_MIN_AGREEMENT = 0.9
# A batch that waits longer than a full batch takes to run buys no throughput: the workers would have run a
# whole batch in the meantime. Twice that is the most the timeout should be.
BATCH_TIMEOUT_FULL_BATCH_RATIO = 2
JSON_OVER_PROTO_RATIO = 3.0
INPUT_HEADROOM = 1.5  # the input pipeline should deliver this many times what training consumes
MODEL_FIX = "export the model again, or push it again (`conveyor run`): this version directory is damaged"
VARIANT_FIX = ("push the model again (`conveyor run`: the Quantizer converts the variants and the "
               "ServingPusher copies the blessed ones with tflite/manifest.json)")


@dataclass
class Finding(JsonRecord):
    check: str
    status: str  # OK | WARN | FAIL | SKIP
    reason: str
    fix: str | None = None


@dataclass
class DoctorReport(JsonRecord):
    model_dir: str | None
    serving_base: str | None
    url: str
    findings: list[Finding] = field(default_factory=list)

    @property
    def failed(self) -> bool:
        return any(f.status == FAIL for f in self.findings)


@dataclass
class Target:
    """What the checks look at; any part may be missing, and the checks that need it say SKIP."""

    model_dir: Path | None
    serving_base: Path | None
    model_name: str | None
    url: str
    spec: object | None = None  # the PipelineSpec, for data samples and ML Metadata


class CheckFault(Exception):
    """A fault a check met in what it reads (a file that does not parse, a model that does not load): the
    check FAILs with this reason and fix instead of finishing."""

    def __init__(self, reason: str, fix: str):
        super().__init__(reason)
        self.reason, self.fix = reason, fix


def _one_line(exc: BaseException, limit: int = 300) -> str:
    """An exception's message on one line: its first non-empty line (TensorFlow's go on with advice), cut to
    `limit` characters."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    text = lines[0] if lines else type(exc).__name__
    return text if len(text) <= limit else text[:limit - 3] + "..."


def _tf_version_tuple(text: str) -> tuple[int, int] | None:
    """(major, minor) of a TensorFlow version string; None when it is not one (a damaged or hand-made
    model)."""
    match = re.match(r"(\d+)\.(\d+)", text)
    return (int(match.group(1)), int(match.group(2))) if match else None


def _version_number(model_dir: Path | None) -> int | None:
    """The version a version directory is named for (1 for .../mnist/1), None for any other name."""
    return int(model_dir.name) if model_dir is not None and re.fullmatch(r"[0-9]+", model_dir.name) else None


def _saved_model_proto(model_dir: Path):
    """saved_model.pb parsed; a file that cannot be read or parsed, or holds no MetaGraph, is a CheckFault."""
    from google.protobuf.message import DecodeError
    from tensorflow.core.protobuf import saved_model_pb2

    path = model_dir / "saved_model.pb"
    try:
        saved_model = saved_model_pb2.SavedModel.FromString(path.read_bytes())
    except OSError as exc:
        raise CheckFault(f"{path} cannot be read: {exc.strerror or _one_line(exc)}", MODEL_FIX) from None
    except DecodeError as exc:
        raise CheckFault(f"saved_model.pb cannot be parsed: {_one_line(exc)} (truncated or not a SavedModel)",
                         MODEL_FIX) from None
    if not saved_model.meta_graphs:
        raise CheckFault("saved_model.pb holds no MetaGraph (empty or not a SavedModel)", MODEL_FIX)
    return saved_model


def _serving_default(model_dir: Path):
    """The serving_default SignatureDef of the MetaGraph tagged serve (None without one), read without loading
    the model; a saved_model.pb that cannot be read is a CheckFault."""
    from conveyor_ml.serving.servable import IncompleteModelError, read_signature_defs

    _saved_model_proto(model_dir)  # the specific reason when saved_model.pb is damaged
    try:
        return read_signature_defs(model_dir).get("serving_default")
    except IncompleteModelError as exc:
        raise CheckFault(f"the SavedModel cannot be served: {_one_line(exc)}", MODEL_FIX) from None


def _image_size(signature) -> tuple[int, int] | None:
    """(height, width) of a signature's `images` input when it is [batch, height, width] of fixed size."""
    if signature is None or "images" not in signature.inputs:
        return None
    dims = [d.size for d in signature.inputs["images"].tensor_shape.dim]
    return (dims[1], dims[2]) if len(dims) == 3 and dims[1] > 0 and dims[2] > 0 else None


def _load_saved_model(model_dir: Path):
    """tf.saved_model.load; a model that does not load (missing or damaged weights, a broken graph) is a
    CheckFault. TensorFlow reports these with many exception types (FileNotFoundError, ValueError, its own
    OpError subclasses), hence the broad except."""
    import tensorflow as tf

    try:
        return tf.saved_model.load(str(model_dir))
    except Exception as exc:
        index = model_dir / "variables" / "variables.index"
        why = _one_line(exc) if index.is_file() else f"{index} is missing (the model's weights are not there)"
        raise CheckFault(f"the SavedModel cannot be loaded: {why}", MODEL_FIX) from None


# -- the checks ----------------------------------------------------------------------------------------------
def check_runtime(target: Target) -> Finding:
    """The SavedModel's TensorFlow version and ops against this runtime and the TF Serving image of the
    rendered manifests (an older runtime may lack an op the model uses, and then cannot load it)."""
    import tensorflow as tf
    from tensorflow.python.framework import op_def_registry

    if target.model_dir is None:
        return Finding("runtime", SKIP, "no model to check (nothing pushed yet, and no --model-dir)")
    meta_graph = _saved_model_proto(target.model_dir).meta_graphs[0]
    saved_by = meta_graph.meta_info_def.tensorflow_version or "unknown"
    saved_version = _tf_version_tuple(saved_by)
    ops = {node.op for node in meta_graph.graph_def.node}
    for function in meta_graph.graph_def.library.function:
        ops |= {node.op for node in function.node_def}
    unknown = sorted(op for op in ops if op_def_registry.get(op) is None)
    if unknown:
        return Finding("runtime", FAIL, f"the model uses ops this TensorFlow {tf.__version__} does not have: "
                       f"{', '.join(unknown[:5])}", "serve it with the TensorFlow release that saved it "
                       f"({saved_by}) or later")
    problems = []
    if saved_version is not None and saved_version > _tf_version_tuple(tf.__version__):
        problems.append(f"saved by TensorFlow {saved_by}, newer than this runtime's {tf.__version__}")
    for manifest, tag in _rendered_serving_images(target):
        if saved_version is not None and _tf_version_tuple(tag) < saved_version:
            problems.append(f"{manifest} runs tensorflow/serving:{tag}, older than the model's TensorFlow "
                            f"{saved_by}")
    if problems:
        return Finding("runtime", FAIL, "; ".join(problems),
                       f"render the manifests again (`conveyor deploy render`) or pin tensorflow/serving to "
                       f"{'.'.join(saved_by.split('.')[:2])} or later")
    return Finding("runtime", OK, f"saved by TensorFlow {saved_by}; this runtime {tf.__version__} has all "
                   f"{len(ops)} ops it uses; rendered TF Serving images match")


def _rendered_serving_images(target: Target) -> list[tuple[str, str]]:
    """(manifest file, tensorflow/serving tag) in the rendered deployment manifests, if any were rendered."""
    workspace = getattr(target.spec, "workspace", None)
    found = []
    if workspace is not None:
        for path in sorted(p for p in (Path(workspace) / "deploy").rglob("*.y*ml") if p.is_file()):
            for match in TF_SERVING_IMAGE.finditer(path.read_text(errors="replace")):
                found.append((str(path), match.group("tag")))
    return found


def sample_images(target: Target, shape: tuple[int, int]) -> np.ndarray:
    """Real images from the spec's newest span when there is one, else a fixed random sample of pixels."""
    if target.spec is not None:
        from conveyor_ml.formats.examples import read_tfrecords
        from conveyor_ml.formats.spans import span_dir, span_numbers

        spans = span_numbers(target.spec.data_root)
        if spans:
            files = sorted(str(p) for p in (span_dir(target.spec.data_root, spans[-1]) / "eval").iterdir())
            images = read_tfrecords(files[:1], shape).images[:SAMPLE_IMAGES]
            if len(images):
                return images.astype(np.float32)
    return np.random.default_rng(0).uniform(0, 255, (SAMPLE_IMAGES, *shape)).astype(np.float32)


def _png(image: np.ndarray) -> bytes:
    import tensorflow as tf

    return tf.io.encode_png(np.clip(np.round(image), 0, 255).astype(np.uint8)[..., None]).numpy()


def signature_classes(model_dir: Path, images: np.ndarray) -> dict[str, np.ndarray]:
    """The classes each of the model's image signatures predicts for the same images (raw pixels, PNG bytes,
    serialized tf.Examples, TF Serving's classify), where the model has that signature."""
    import tensorflow as tf

    from conveyor_ml.formats.examples import serialize_example

    signatures = _load_saved_model(model_dir).signatures
    examples = tf.constant([serialize_example(image, 0) for image in images])

    def png_bytes():
        return tf.constant([_png(image) for image in images])

    calls = {
        "serving_default": lambda f: f(images=tf.constant(images))["class_ids"].numpy(),
        "bytes_predictor": lambda f: f(image_bytes=png_bytes())["class_ids"].numpy(),
        "serving_examples": lambda f: f(examples=examples)["class_ids"].numpy(),
        "classification": lambda f: f(inputs=examples)["scores"].numpy().argmax(axis=1),
    }
    results = {}
    for name, call in calls.items():
        if name in signatures:
            try:
                results[name] = call(signatures[name])
            except Exception as exc:  # a signature of other inputs or outputs fails in TensorFlow's own ways
                raise CheckFault(f"the {name} signature fails on {len(images)} sample images: "
                                 f"{type(exc).__name__}: {_one_line(exc)}",
                                 f"export {name} with the inputs and outputs TF Serving clients send and "
                                 "read (the Trainer's serving_signatures)") from None
    return results


def check_preprocessing(target: Target) -> Finding:
    """The same images through every serving signature and TFLite variant give the same classes: a signature
    that preprocesses differently (another scale, another resize) answers differently on the same input."""
    if target.model_dir is None:
        return Finding("preprocessing", SKIP, "no model to check")
    size = _image_size(_serving_default(target.model_dir))
    if size is None:
        return Finding("preprocessing", SKIP,
                       "the model has no image serving_default signature to compare with")
    images = sample_images(target, size)
    classes = signature_classes(target.model_dir, images)
    reference = classes.pop("serving_default")
    differing = {name: float(np.mean(found != reference)) for name, found in classes.items()
                 if not np.array_equal(found, reference)}
    if differing:
        worst = ", ".join(f"{name} on {share:.0%} of the images" for name, share in sorted(differing.items()))
        return Finding("preprocessing", FAIL, f"signatures disagree with serving_default: {worst}",
                       "export every signature from the same preprocessing function (the model's layers)")
    variants, weak, broken = _tflite_agreement(target.model_dir, images, reference)
    if broken:
        others = f"; {', '.join(variants)} agree on the images" if variants else ""
        return Finding("preprocessing", FAIL, f"TFLite variant(s) cannot be run: {'; '.join(broken)}{others}",
                       VARIANT_FIX)
    if weak:
        return Finding("preprocessing", WARN, "TFLite variants agree with the SavedModel on fewer images "
                       f"than {TFLITE_MIN_AGREEMENT:.0%}: " + ", ".join(f"{v} {a:.0%}" for v, a in weak),
                       "check the variant's conversion (representative data, input scale)")
    checked = ", ".join(sorted(classes)) + (f"; TFLite {', '.join(variants)}" if variants else "")
    return Finding("preprocessing", OK,
                   f"{len(images)} images give the same classes through serving_default, {checked}")


def _tflite_agreement(model_dir: Path, images: np.ndarray,
                      reference: np.ndarray) -> tuple[list[str], list, list[str]]:
    """The variants run, those of them agreeing on too few images (name, share), and the variant files that
    cannot be run ("file (why)"): each variant is tried, a damaged one does not hide the others."""
    from conveyor_ml.components.quantizer.tflite_variants import TfliteModel

    variants, weak, broken = [], [], []
    for path in sorted((model_dir / "tflite").glob("*.tflite")):
        try:
            classes = TfliteModel(path.read_bytes(), threads=1).classes(images)
            agreement = float(np.mean(np.asarray(classes).reshape(-1) == reference)) \
                if np.size(classes) == np.size(reference) else 0.0
        except Exception as exc:  # LiteRT refuses a damaged file with ValueError, RuntimeError, KeyError...
            broken.append(f"{path.name} ({_one_line(exc, 160)})")
            continue
        variants.append(path.stem)
        if agreement < TFLITE_MIN_AGREEMENT:
            weak.append((path.stem, agreement))
    return variants, weak, broken


def check_batching(target: Target) -> Finding:
    """Batching on, and its timeout sane for the model's measured latency: waiting longer for a batch to fill
    than a full batch takes to run adds latency and buys no throughput."""
    if target.serving_base is None:
        return Finding("batching", SKIP, "no serving directory")
    path = target.serving_base / serving_config.BATCHING_CONFIG
    if not path.exists():
        return Finding("batching", WARN, f"batching is off: no {path}",
                       "write one (the ServingPusher does from serving_pusher.batching) and serve with "
                       "--enable_batching --batching_parameters_file")
    try:
        options = serving_config.read_batching_options(path)
    except ConveyorError as exc:
        raise CheckFault(_one_line(exc, 400), "write it again as BatchingParameters text (the "
                         "ServingPusher does from serving_pusher.batching), or remove it to serve without "
                         "batching") from None
    if options.max_batch_size <= 1:
        return Finding("batching", WARN,
                       f"max_batch_size {options.max_batch_size} in {path}: nothing is batched",
                       "raise serving_pusher.batching.max_batch_size (e.g. 32 to 128)")
    try:
        full_batch_us = _latency_us(target.model_dir, options.max_batch_size) if target.model_dir else None
    except CheckFault:  # the model checks say why; the batching settings are still worth reading
        full_batch_us = None
    if full_batch_us and options.batch_timeout_micros > BATCH_TIMEOUT_FULL_BATCH_RATIO * full_batch_us:
        return Finding("batching", WARN, f"batch_timeout_micros {options.batch_timeout_micros} is "
                       f"{options.batch_timeout_micros / full_batch_us:.1f}x the {full_batch_us:.0f} µs a "
                       f"full batch of {options.max_batch_size} takes",
                       "lower serving_pusher.batching.batch_timeout_micros to at most "
                       f"{int(BATCH_TIMEOUT_FULL_BATCH_RATIO * full_batch_us)}")
    measured = f"; a full batch takes {full_batch_us:.0f} µs here" if full_batch_us else ""
    return Finding("batching", OK, f"max_batch_size {options.max_batch_size}, batch_timeout_micros "
                   f"{options.batch_timeout_micros}, {options.num_batch_threads} threads{measured}")


def _latency_us(model_dir: Path, batch: int) -> float | None:
    """Median time of serving_default on `batch` images, in µs (None without an image signature)."""
    import tensorflow as tf

    function = _load_saved_model(model_dir).signatures.get("serving_default")
    if function is None or "images" not in function.structured_input_signature[1]:
        return None
    spec = function.structured_input_signature[1]["images"]
    if not spec.shape[1:].is_fully_defined():
        return None
    images = tf.zeros([batch, *spec.shape[1:]], spec.dtype)
    for _ in range(5):
        function(images=images)
    timings = []
    for _ in range(20):
        started = time.perf_counter()
        function(images=images)
        timings.append(time.perf_counter() - started)
    return float(np.median(timings) * 1e6)


def check_serialization(target: Target) -> Finding:
    """Bytes on the wire for one image: REST's JSON against gRPC's TensorProto."""
    if target.model_dir is None:
        return Finding("request_serialization", SKIP, "no model to check")
    import tensorflow as tf
    from tensorflow_serving.apis import predict_pb2

    size = _image_size(_serving_default(target.model_dir))
    if size is None:
        return Finding("request_serialization", SKIP, "the model has no image serving_default signature")
    image = sample_images(target, size)[:1]
    rest = len(json.dumps({"instances": image.tolist()}).encode())
    request = predict_pb2.PredictRequest()
    request.model_spec.name = target.model_name or "model"
    request.inputs["images"].CopyFrom(tf.make_tensor_proto(image))
    grpc_bytes = request.ByteSize()
    ratio = rest / grpc_bytes
    reason = (f"one image is {rest:,} bytes as REST JSON, {grpc_bytes:,} bytes as a gRPC request "
              f"({ratio:.1f}x)")
    if ratio > JSON_OVER_PROTO_RATIO:
        return Finding("request_serialization", WARN, reason, "send high-volume traffic over gRPC (:8500)")
    return Finding("request_serialization", OK, reason)


def check_graph_optimization(target: Target) -> Finding:
    """Grappler's meta-optimizer (constant folding, arithmetic and layout optimisation, op fusion) is on."""
    import tensorflow as tf

    options = tf.config.optimizer.get_experimental_options()
    if options.get("disable_meta_optimizer"):
        return Finding("graph_optimization", FAIL, "Grappler's meta-optimizer is disabled in this runtime",
                       "remove tf.config.optimizer.set_experimental_options(disable_meta_optimizer=True)")
    jit = tf.config.optimizer.get_jit() or "off"
    return Finding("graph_optimization", OK, f"Grappler's meta-optimizer is on; XLA JIT {jit}")


def check_quantized_variants(target: Target) -> Finding:
    if target.model_dir is None:
        return Finding("quantized_variants", SKIP, "no model to check")
    manifest = target.model_dir / "tflite" / "manifest.json"
    if not manifest.exists():
        return Finding("quantized_variants", WARN, f"no TFLite variants beside {target.model_dir}",
                       "add components.quantizer to the spec (its blessed variants are pushed with the "
                       "model)")
    variants = _manifest_variants(manifest)
    missing = [file for _, file in variants if file is not None and not (manifest.parent / file).is_file()]
    if missing:
        return Finding("quantized_variants", FAIL, f"{manifest} lists variant files that are not there: "
                       f"{', '.join(missing)}", VARIANT_FIX)
    names = ", ".join(name for name, _ in variants)
    return Finding("quantized_variants", OK if variants else WARN,
                   f"blessed variants pushed: {names}" if variants else "no variant was blessed",
                   None if variants else "look at the Quantizer's report (conveyor lineage)")


def _manifest_variants(manifest: Path) -> list[tuple[str, str | None]]:
    """(variant, file or None) of each entry of tflite/manifest.json; a damaged manifest is a CheckFault."""
    try:
        return read_manifest(manifest)
    except DamagedManifest as exc:
        raise CheckFault(str(exc), VARIANT_FIX) from None


def check_gpu_memory_growth(target: Target) -> Finding:
    import os

    import tensorflow as tf

    gpus = tf.config.list_physical_devices("GPU")
    if not gpus:
        return Finding("gpu_memory_growth", SKIP, "no GPU on this machine")
    growth = os.environ.get("TF_FORCE_GPU_ALLOW_GROWTH") == "true" or all(
        tf.config.experimental.get_memory_growth(gpu) for gpu in gpus)
    if not growth:
        return Finding("gpu_memory_growth", WARN, f"{len(gpus)} GPU(s) and memory growth off: one process "
                       "takes all GPU memory", "set TF_FORCE_GPU_ALLOW_GROWTH=true for the server")
    return Finding("gpu_memory_growth", OK, f"memory growth on for {len(gpus)} GPU(s)")


def check_input_pipeline(target: Target) -> Finding:
    """Training throughput (recorded on the Model in MLMD) against how fast the same input pipeline alone
    delivers examples: a pipeline that barely keeps up leaves the model waiting for data."""
    trained = _serving_model_facts(target)
    if trained is None:
        return Finding("input_pipeline", SKIP, "no training record of the serving model in ML Metadata")
    facts, train_files = trained
    consumed = float(facts.get("examples_per_second") or 0)
    if not consumed or not train_files:
        return Finding("input_pipeline", SKIP, "the training record has no throughput or data files")
    delivered = _input_throughput(train_files, target.spec.data.image_shape,
                                  int(facts.get("global_batch_size") or 32))
    reason = f"the input pipeline delivers {delivered:,.0f} examples/s; training consumed {consumed:,.0f}/s"
    if delivered < INPUT_HEADROOM * consumed:
        return Finding("input_pipeline", WARN, reason + ": training waits for data",
                       "interleave more shards, prefetch, or store images compactly")
    return Finding("input_pipeline", OK, reason)


def _serving_model_facts(target: Target) -> tuple[dict, list[str]] | None:
    """The Model artifact's recorded facts for the version being checked, and its training files."""
    spec = target.spec
    if spec is None or target.model_dir is None or target.model_name is None:
        return None
    from conveyor_ml.metadata import store as metadata
    from conveyor_ml.metadata.index import MetadataIndex
    from conveyor_ml.metadata.values import props
    from conveyor_ml.operations.lineage import Lineage

    if not metadata.store_exists(spec.metadata):
        return None
    lineage = Lineage(MetadataIndex(metadata.open_store(spec.metadata, read_only=True)), target.model_name)
    version = _version_number(target.model_dir)
    owner = lineage.version_owner.get(("local", str(version))) if version is not None else None
    if owner is None:
        return None
    trainer = lineage.index.producer(owner)
    files = []
    for examples in lineage.index.inputs(trainer, "examples") if trainer else []:
        files += sorted(str(p) for p in Path(examples.uri, "Split-train").glob("*") if p.is_file())
    return props(lineage.index.artifacts[owner]), files


def _input_throughput(files: list[str], image_shape, batch: int) -> float:
    import tensorflow as tf

    from conveyor_ml.components.trainer.model import parse_examples

    dataset = (tf.data.TFRecordDataset(files, compression_type="GZIP").repeat().batch(batch)
               .map(lambda s: parse_examples(s, tuple(image_shape), with_labels=True))
               .prefetch(tf.data.AUTOTUNE))
    iterator = iter(dataset)
    next(iterator)
    count, started = 0, time.perf_counter()
    while time.perf_counter() - started < 1.0:
        next(iterator)
        count += batch
    return count / (time.perf_counter() - started)


def check_monitoring(target: Target) -> Finding:
    """A running server exposes Prometheus metrics (what `conveyor monitor` and Grafana read)."""
    problem = url_problem(target.url)
    if problem:
        return Finding("monitoring", FAIL, f"{target.url!r} is not a server's address: {problem}",
                       "give --url as http://HOST:PORT, e.g. http://127.0.0.1:8501")
    status = _http_status(f"{target.url.rstrip('/')}/v1/models/{target.model_name or 'model'}")
    if status is None:
        return Finding("monitoring", SKIP, f"no server answers at {target.url}")
    if _http_status(target.url.rstrip("/") + PROMETHEUS_PATH) != 200:
        return Finding("monitoring", FAIL, f"the server at {target.url} has no Prometheus endpoint "
                       f"({PROMETHEUS_PATH})", "serve with --enable_prometheus or --monitoring_config_file "
                       "(`make serve` does)")
    return Finding("monitoring", OK, f"Prometheus metrics at {target.url}{PROMETHEUS_PATH}")


def _http_status(url: str) -> int | None:
    """The HTTP status `url` answers with; None when nothing answers there. Something that answers but not
    with HTTP (another protocol's server on that port) is a CheckFault."""
    try:
        with urllib.request.urlopen(url, timeout=3) as response:
            return response.status
    except urllib.error.HTTPError as exc:
        return exc.code
    except (urllib.error.URLError, OSError):
        return None
    except (http.client.HTTPException, ValueError) as exc:
        raise CheckFault(f"{url} does not answer as an HTTP server "
                         f"({type(exc).__name__}: {_one_line(exc, 120)})",
                         "point --url at the model server's REST port (8501 by default)") from None


def check_drift_baseline(target: Target) -> Finding:
    """The statistics of the data the serving model was trained on are in MLMD: the baseline that data drift
    and prediction drift are measured against."""
    spec = target.spec
    if spec is None or target.model_name is None:
        return Finding("drift_baseline", SKIP, "no spec, so no metadata store to look in")
    from conveyor_ml.metadata import store as metadata
    from conveyor_ml.metadata.index import MetadataIndex
    from conveyor_ml.operations.lineage import Lineage

    if not metadata.store_exists(spec.metadata):
        return Finding("drift_baseline", SKIP, "no runs recorded yet")
    lineage = Lineage(MetadataIndex(metadata.open_store(spec.metadata, read_only=True)), target.model_name)
    version = _version_number(target.model_dir)
    owner = lineage.version_owner.get(("local", str(version))) if version is not None else None
    trainer = lineage.index.producer(owner) if owner else None
    statistics = [s for examples_id in (trainer.inputs.get("examples", []) if trainer else [])
                  for v in lineage.index.consumers_of(examples_id, STATISTICS_GEN)
                  for s in lineage.index.outputs(v, "statistics")]
    if not statistics:
        return Finding("drift_baseline", WARN, "no statistics of the serving model's training data in MLMD",
                       "add components.statistics_gen to the spec")
    return Finding("drift_baseline", OK,
                   f"{len(statistics)} statistics artifact(s) of its training data in MLMD")


CHECKS: list[Callable[[Target], Finding]] = [
    check_runtime, check_preprocessing, check_batching, check_serialization, check_graph_optimization,
    check_quantized_variants, check_gpu_memory_growth, check_input_pipeline, check_monitoring,
    check_drift_baseline,
]


# The name each check's findings carry, where it is not the function's name without `check_`.
CHECK_NAMES = {check_serialization: "request_serialization"}


def check_name(check: Callable[[Target], Finding]) -> str:
    return CHECK_NAMES.get(check) or check.__name__.removeprefix("check_")


def resolve_target(spec, model_dir: str | None, serving_base: str | None, url: str) -> Target:
    """The model to check: --model-dir, else the stable version (or the newest) under the serving base. A URL
    that is not a server's address, or a --serving-dir that is not a directory, is a ConveyorError (before
    any check runs)."""
    problem = url_problem(url)
    if problem:
        raise ConveyorError(f"--url {url!r} is not a server's address ({problem}); give http://HOST:PORT, "
                            "e.g. http://127.0.0.1:8501")
    if serving_base is not None and not (serving_base and Path(serving_base).is_dir()):
        what = "no such directory" if serving_base and not Path(serving_base).exists() else "not a directory"
        raise ConveyorError(f"--serving-dir {serving_base!r}: {what} (give a serving base path, e.g. "
                            "workspace/serving)")
    base = Path(serving_base) if serving_base is not None else \
        (spec.serving_base if spec is not None else None)
    model_name = spec.components.serving_pusher.model_name \
        if spec is not None and spec.components.serving_pusher else None
    if model_dir is not None:
        path = Path(model_dir)
        if not (path / "saved_model.pb").is_file():
            raise ConveyorError(f"--model-dir {model_dir}: no saved_model.pb there (give a SavedModel "
                                "version directory, e.g. workspace/serving/mnist/1)")
        return Target(path, base, model_name or path.parent.name, url, spec)
    if base is not None and base.is_dir():
        names = [model_name] if model_name else known_models(base)
        for name in names:
            release: ModelRelease = read_release(base, name)
            on_disk = versions_on_disk(release.model_dir)
            version = release.labels.get("stable") or (max(on_disk) if on_disk else None)
            if version in on_disk:
                return Target(on_disk[version], base, name, url, spec)
    return Target(None, base if base is not None and base.is_dir() else None, model_name, url, spec)


def diagnose(target: Target, say: Callable[[Finding], None] | None = None) -> DoctorReport:
    report = DoctorReport(model_dir=str(target.model_dir) if target.model_dir else None,
                          serving_base=str(target.serving_base) if target.serving_base else None,
                          url=target.url)
    for check in CHECKS:
        finding = run_check(check, target)
        report.findings.append(finding)
        if say:
            say(finding)
    return report


def run_check(check: Callable[[Target], Finding], target: Target) -> Finding:
    """One check's finding; a fault it met is its FAIL, and so is any other exception (named in one line), so
    that one check that cannot finish never hides the findings of the others."""
    name = check_name(check)
    try:
        return check(target)
    except CheckFault as fault:
        return Finding(name, FAIL, fault.reason, fault.fix)
    except ConveyorError as exc:  # a file it read (a data split, the metadata store) names itself
        return Finding(name, FAIL, f"the {name} check could not finish: {_one_line(exc, 400)}",
                       "fix or restore the file the message names")
    except Exception as exc:  # a check's own bug or an unforeseen input: a FAIL line, never a traceback
        return Finding(name, FAIL,
                       f"the {name} check could not finish: {type(exc).__name__}: {_one_line(exc)}",
                       "fix what the error names; if it names nothing of yours, report it as a doctor bug")


def render(report: DoctorReport) -> str:
    out = io.StringIO()
    out.write(f"model {report.model_dir or '-'}  serving {report.serving_base or '-'}  server {report.url}\n")
    for finding in report.findings:
        out.write(f"{finding.status:4}  {finding.check:22} {finding.reason}\n")
        if finding.fix and finding.status in (WARN, FAIL):
            out.write(f"{'':28}fix: {finding.fix}\n")
    failed = sum(f.status == FAIL for f in report.findings)
    warned = sum(f.status == WARN for f in report.findings)
    out.write(f"{failed} failed, {warned} warnings, {len(report.findings) - failed - warned} ok or skipped\n")
    return out.getvalue()
