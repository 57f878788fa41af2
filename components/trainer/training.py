"""One training process: devices, distribution strategy, data, fit, export, facts.

The Trainer executor runs this as a child process (`python -m conveyor_ml.components.trainer.training JOB.json`) so
each training starts with a fresh TensorFlow runtime: logical CPU devices and GPU memory growth can only be
configured before TensorFlow initialises, and a multi-worker job is simply several such processes.
"""
from __future__ import annotations

import json
import logging
import math
import os
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass, fields
from pathlib import Path

os.environ.setdefault("TF_USE_LEGACY_KERAS", "1")

from conveyor_ml.base.dataclass_schema import from_document, to_document
from conveyor_ml.base.errors import ConveyorError
from conveyor_ml.base.spec import STRATEGIES, TrainerSettings
from conveyor_ml.components.keras_tracing import keep_autograph_out_of_keras

ERROR_PREFIX = "conveyor-error: "
log = logging.getLogger(__name__)


@dataclass
class TrainingJob:
    """What one training process does: the trainer's settings applied to these files and directories."""

    train_files: list[str]
    eval_files: list[str]
    image_shape: tuple[int, int]
    serving_model_dir: str
    log_dir: str
    facts_path: str
    settings: TrainerSettings
    warm_start_from: str | None = None
    seed: int = 42
    train_examples: int | None = None  # from the span manifests, when known
    eval_examples: int | None = None

    def save(self, path: str | os.PathLike) -> None:
        document = {**{f.name: getattr(self, f.name) for f in fields(self)}, "settings": to_document(self.settings)}
        Path(path).write_text(json.dumps(document, indent=2))

    @classmethod
    def load(cls, path: str | os.PathLike) -> TrainingJob:
        document = json.loads(Path(path).read_text())
        document["settings"] = from_document(TrainerSettings, document["settings"])
        document["image_shape"] = tuple(document["image_shape"])
        return cls(**document)


def parse_tf_config(raw: str | None) -> dict:
    """Validates TF_CONFIG for MultiWorkerMirroredStrategy; returns it parsed."""
    if not raw:
        raise ConveyorError("strategy multi_worker: TF_CONFIG is not set (it names the cluster and this task)")
    try:
        config = json.loads(raw)
    except json.JSONDecodeError as exc:
        raise ConveyorError(f"TF_CONFIG is not valid JSON: {exc.msg} at character {exc.pos}") from None
    cluster, task = config.get("cluster"), config.get("task")
    if not isinstance(cluster, dict) or not cluster.get("worker") and not cluster.get("chief"):
        raise ConveyorError('TF_CONFIG: "cluster" must list "worker" (and optionally "chief") addresses')
    if not isinstance(task, dict) or task.get("type") not in cluster:
        raise ConveyorError('TF_CONFIG: "task.type" must name a job of "cluster" (worker or chief)')
    index = task.get("index")
    if not isinstance(index, int) or not 0 <= index < len(cluster[task["type"]]):
        raise ConveyorError(f'TF_CONFIG: "task.index" must be 0..{len(cluster[task["type"]]) - 1}')
    for address in sum((list(v) for v in cluster.values()), []):
        host, _, port = str(address).rpartition(":")
        if not host or not port.isdigit():
            raise ConveyorError(f"TF_CONFIG: cluster address {address!r} is not host:port")
    return config


def is_chief(tf_config: dict | None) -> bool:
    if not tf_config:
        return True
    task = tf_config["task"]
    if task["type"] == "chief":
        return True
    return task["type"] == "worker" and task["index"] == 0 and "chief" not in tf_config["cluster"]


def configure_devices(tf, cpu_replicas: int) -> list:
    """GPU memory growth for every GPU, and N logical CPUs when asked; must run before any op."""
    gpus = tf.config.list_physical_devices("GPU")
    for gpu in gpus:
        try:
            tf.config.experimental.set_memory_growth(gpu, True)
        except (ValueError, RuntimeError) as exc:
            log.warning("could not enable memory growth on %s: %s", gpu.name, exc)
    if cpu_replicas > 1:
        if gpus:
            log.info("cpu_replicas=%d ignored: %d GPU(s) present, training on GPUs", cpu_replicas, len(gpus))
        else:
            cpu = tf.config.list_physical_devices("CPU")[0]
            tf.config.set_logical_device_configuration(
                cpu, [tf.config.LogicalDeviceConfiguration() for _ in range(cpu_replicas)])
    return gpus


def make_strategy(tf, name: str, cpu_replicas: int, gpus: list):
    if name == "one_device":
        return tf.distribute.OneDeviceStrategy("/gpu:0" if gpus else "/cpu:0")
    if name == "multi_worker":
        return tf.distribute.MultiWorkerMirroredStrategy()
    if gpus:
        return tf.distribute.MirroredStrategy()
    devices = [f"/cpu:{i}" for i in range(cpu_replicas)]
    strategy = tf.distribute.MirroredStrategy(devices=devices, cross_device_ops=tf.distribute.ReductionToOneDevice())
    if strategy.num_replicas_in_sync != cpu_replicas:
        raise RuntimeError(f"expected {cpu_replicas} replicas, got {strategy.num_replicas_in_sync}")
    return strategy


# Bytes a cached example takes besides its pixels (the serialized record's framing and label).
EXAMPLE_OVERHEAD_BYTES = 40
SHUFFLE_BUFFER = 4096
# Evaluation batches are larger: they need no gradients, and the result does not depend on their size.
EVAL_BATCH = 256


def cache_plan(train_examples: int | None, eval_examples: int | None, image_shape: tuple[int, int],
               budget_mb: int) -> tuple[bool, bool]:
    """(cache train?, cache eval?): a split is cached when its serialized examples fit what is left of the
    memory budget, train first (it is read many times); a split of unknown size is streamed."""
    left = budget_mb * 2**20
    plan = []
    for examples in (train_examples, eval_examples):
        size = None if examples is None else examples * (image_shape[0] * image_shape[1] + EXAMPLE_OVERHEAD_BYTES)
        fits = size is not None and size <= left
        left -= size if fits else 0
        plan.append(fits)
    return plan[0], plan[1]


def _dataset(tf, files, image_shape, batch, *, cache: bool, shuffle_seed=None, repeat=True):
    """Records of every shard, interleaved (shards read in parallel, in a shuffled order for training),
    cached in memory only when the split fits the budget, shuffled through a bounded buffer, batched,
    parsed (raw bytes decoded to float pixels inside the graph) and prefetched."""
    from conveyor_ml.components.trainer.model import parse_examples

    shards = tf.data.Dataset.from_tensor_slices(sorted(files))
    if shuffle_seed is not None:
        shards = shards.shuffle(len(files), seed=shuffle_seed, reshuffle_each_iteration=True)
    dataset = shards.interleave(lambda path: tf.data.TFRecordDataset(path, compression_type="GZIP"),
                                cycle_length=min(len(files), 8), block_length=1, num_parallel_calls=tf.data.AUTOTUNE,
                                deterministic=True)
    if cache:
        dataset = dataset.cache()
    if shuffle_seed is not None:
        dataset = dataset.shuffle(SHUFFLE_BUFFER, seed=shuffle_seed, reshuffle_each_iteration=True)
    if repeat:
        dataset = dataset.repeat()
    dataset = dataset.batch(batch, drop_remainder=repeat)
    dataset = dataset.map(lambda s: parse_examples(s, image_shape, with_labels=True),
                          num_parallel_calls=tf.data.AUTOTUNE)
    options = tf.data.Options()
    # Shard by element, not by file, across workers: every worker sees every shard's share.
    options.experimental_distribute.auto_shard_policy = tf.data.experimental.AutoShardPolicy.DATA
    return dataset.with_options(options).prefetch(tf.data.AUTOTUNE)


def _count_records(tf, files) -> int:
    return int(tf.data.TFRecordDataset(files, compression_type="GZIP").reduce(0, lambda count, _: count + 1))


def _progress_callback(tf, total_steps: int, workers: int, timings: dict):
    every = max(1, total_steps // 10)

    class Progress(tf.keras.callbacks.Callback):
        def __init__(self):
            super().__init__()
            # Keep logs as tensors: converting them every batch would sync and slow training down.
            self._supports_tf_logs = True

        def on_train_begin(self, logs=None):
            timings["start"] = time.perf_counter()

        def on_train_batch_end(self, batch, logs=None):
            now = time.perf_counter()
            step = batch + 1
            if step == 1:
                timings["first_step_end"] = now
            if step % every == 0 or step == total_steps:
                # Under MultiWorkerMirroredStrategy the raw per-batch logs are summed over workers
                # (tf-keras 2.16); History's epoch values are not, so only the progress line divides.
                logs = {k: float(v) / workers for k, v in (logs or {}).items()}
                log.info("step %d/%d  loss %.4f  accuracy %.4f", step, total_steps, logs.get("loss", float("nan")),
                         logs.get("accuracy", float("nan")))
            timings["end"] = now

    return Progress()


def train(job: TrainingJob) -> dict:
    """Trains, exports the SavedModel (chief) and returns the training facts."""
    import tensorflow as tf

    tf.get_logger().setLevel("ERROR")
    keep_autograph_out_of_keras()
    if job.settings.strategy not in STRATEGIES:
        raise ConveyorError(f"trainer.strategy: unknown strategy {job.settings.strategy!r} (use {', '.join(STRATEGIES)})")
    if job.settings.cpu_replicas < 1:
        raise ConveyorError("trainer.cpu_replicas: must be >= 1")
    tf_config = parse_tf_config(os.environ.get("TF_CONFIG")) if job.settings.strategy == "multi_worker" else None
    gpus = configure_devices(tf, job.settings.cpu_replicas)
    strategy = make_strategy(tf, job.settings.strategy, job.settings.cpu_replicas, gpus)
    tf.keras.utils.set_random_seed(job.seed)

    from conveyor_ml.components.trainer.model import build_model, finish_export, serving_signatures


    replicas = strategy.num_replicas_in_sync
    global_batch = job.settings.batch_size * replicas
    learning_rate = job.settings.learning_rate * (replicas if job.settings.scale_learning_rate else 1)
    with strategy.scope():
        model = build_model(job.image_shape, job.settings.model)
        if job.warm_start_from:
            _warm_start(tf, model, job.warm_start_from)
        model.compile(
            optimizer=tf.keras.optimizers.Adam(learning_rate),
            loss=tf.keras.losses.SparseCategoricalCrossentropy(from_logits=True),
            metrics=[tf.keras.metrics.SparseCategoricalAccuracy(name="accuracy")],
        )

    train_cached, eval_cached = cache_plan(job.train_examples, job.eval_examples, job.image_shape,
                                           job.settings.cache_budget_mb)
    train_data = _dataset(tf, job.train_files, job.image_shape, global_batch, cache=train_cached,
                          shuffle_seed=job.seed)
    eval_batch = max(global_batch, EVAL_BATCH * replicas)
    if tf_config:
        # Workers must run the same number of collective steps: evaluate on a repeated stream.
        eval_data = _dataset(tf, job.eval_files, job.image_shape, eval_batch, cache=eval_cached)
        eval_count = job.eval_examples if job.eval_examples is not None else _count_records(tf, job.eval_files)
        eval_steps = max(1, math.ceil(eval_count / eval_batch))
    else:
        eval_data = _dataset(tf, job.eval_files, job.image_shape, eval_batch, cache=eval_cached, repeat=False)
        eval_steps = None
    log.info("data: %s train examples (%s), %s eval examples (%s) in %d and %d shards",
             job.train_examples if job.train_examples is not None else "?",
             "cached" if train_cached else "streamed", job.eval_examples if job.eval_examples is not None else "?",
             "cached" if eval_cached else "streamed", len(job.train_files), len(job.eval_files))
    timings: dict = {}
    workers = sum(len(v) for v in tf_config["cluster"].values()) if tf_config else 1
    callbacks = [_progress_callback(tf, job.settings.train_steps, workers, timings)]
    chief = is_chief(tf_config)
    if chief:
        callbacks.append(tf.keras.callbacks.TensorBoard(log_dir=job.log_dir, update_freq=max(1, job.settings.train_steps // 20)))
    log.info("training: strategy=%s replicas=%d global_batch=%d steps=%d lr=%g", job.settings.strategy, replicas,
             global_batch, job.settings.train_steps, learning_rate)
    history = model.fit(train_data, epochs=1, steps_per_epoch=job.settings.train_steps, callbacks=callbacks, verbose=0)
    eval_loss, eval_accuracy = model.evaluate(eval_data, steps=eval_steps, verbose=0)

    export_dir = job.serving_model_dir if chief else tempfile.mkdtemp(prefix="conveyor-worker-export-")
    # Every worker must save (saving runs collective ops); only the chief's copy is kept.
    # Without per-layer traces: Keras rebuilds the model from its config (only built-in layers), TF Serving
    # and TFLite read the signatures; the save takes ~1 s less.
    model.save(export_dir, save_format="tf", signatures=serving_signatures(model, job.image_shape), save_traces=False)
    if chief:
        warmup_images = next(iter(eval_data.take(1)))[0].numpy()[:8]
        finish_export(export_dir, warmup_images)
    else:
        shutil.rmtree(export_dir, ignore_errors=True)

    steady_seconds = timings["end"] - timings.get("first_step_end", timings["start"])
    steady_steps = max(1, job.settings.train_steps - 1)
    device_kinds = sorted({_device_kind(name) for name in strategy.extended.worker_devices})
    facts = {
        "strategy": job.settings.strategy,
        "replicas": replicas,
        "workers": workers,
        "is_chief": chief,
        "device_kinds": ",".join(device_kinds),
        "gpu_names": ",".join(tf.config.experimental.get_device_details(g).get("device_name", g.name) for g in gpus),
        "global_batch_size": global_batch,
        "learning_rate": learning_rate,
        "steps": int(model.optimizer.iterations.numpy()),
        "wall_time_s": round(timings["end"] - timings["start"], 3),
        "first_step_s": round(timings.get("first_step_end", timings["end"]) - timings["start"], 3),
        "examples_per_second": round(steady_steps * global_batch / steady_seconds, 1) if steady_seconds > 0 else 0.0,
        "train_loss": float(history.history["loss"][-1]),
        "train_accuracy": float(history.history["accuracy"][-1]),
        "eval_loss": float(eval_loss),
        "eval_accuracy": float(eval_accuracy),
    }
    Path(job.facts_path).write_text(json.dumps(facts, indent=2))
    log.info("trained %d steps in %ss (%s examples/s); eval accuracy %.4f", facts["steps"], facts["wall_time_s"],
             facts["examples_per_second"], eval_accuracy)
    return facts


def _device_kind(device_name: str) -> str:
    """'/job:worker/replica:0/task:1/device:CPU:0' -> 'CPU'."""
    return device_name.rsplit("device:", 1)[-1].split(":")[0].upper()


def _warm_start(tf, model, base_model_dir: str) -> None:
    try:
        base = tf.keras.models.load_model(base_model_dir, compile=False)
        model.set_weights(base.get_weights())
        log.info("warm start from %s", base_model_dir)
    except (ValueError, OSError) as exc:
        log.info("warm start skipped (%s does not fit this architecture: %s)", base_model_dir, exc)


def main(argv: list[str]) -> int:
    """The child process: progress lines on stdout (the Trainer executor forwards them), a failure the user can
    fix as one ERROR_PREFIX line on stderr."""
    handler = logging.StreamHandler(sys.stdout)
    handler.setFormatter(logging.Formatter("%(message)s"))
    log.addHandler(handler)
    log.setLevel(logging.INFO)
    log.propagate = False  # TensorFlow's own loggers stay as quiet as they are configured
    if len(argv) != 2:
        print("usage: python -m conveyor_ml.components.trainer.training JOB.json", file=sys.stderr)
        return 2
    try:
        train(TrainingJob.load(argv[1]))
    except ConveyorError as exc:
        print(f"{ERROR_PREFIX}{exc}", file=sys.stderr, flush=True)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
