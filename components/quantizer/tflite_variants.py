"""TFLite variants of a SavedModel's serving_default signature, and how each is measured.

Measured with LiteRT (`ai-edge-litert`, the maintained TFLite runtime edge users deploy, XNNPACK on):
on this kind of CPU it runs dynamic-range models ~3.5x faster than TF 2.16's tf.lite.Interpreter and
gives int8 its speed-up, so the numbers are what a device would see, not what TF's bundled runtime does.
"""
from __future__ import annotations

import time
from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np
import tensorflow as tf
from ai_edge_litert.interpreter import Interpreter

from conveyor_ml.base.native_output import native_stderr_discarded

VARIANTS = ("float32", "float16", "dynamic_range", "int8")
SIGNATURE = "serving_default"
INPUT = "images"


def convert(saved_model_dir: str, variant: str, representative: np.ndarray | None = None) -> bytes:
    """One variant's .tflite bytes; raises the converter's own error when the model's ops do not allow it."""
    converter = tf.lite.TFLiteConverter.from_saved_model(saved_model_dir, signature_keys=[SIGNATURE])
    if variant != "float32":
        converter.optimizations = [tf.lite.Optimize.DEFAULT]
    if variant == "float16":
        converter.target_spec.supported_types = [tf.float16]
    elif variant == "int8":
        if representative is None or len(representative) == 0:
            raise ValueError("int8 needs a non-empty representative dataset")

        def samples() -> Iterable[dict]:
            for image in representative:
                yield {INPUT: image[None].astype(np.float32)}

        converter.representative_dataset = samples
        converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS_INT8]
        converter.inference_input_type = tf.int8
        converter.inference_output_type = tf.int8
    with native_stderr_discarded():
        return converter.convert()


def converter_message(error: Exception) -> str:
    """The converter's reason in one readable line (its raw text is MLIR locations over many lines)."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    unsupported = next((line for line in lines if line.startswith("Some ops are not supported")), None)
    if unsupported:
        listed = [line for line in lines if line.startswith(("TF Select ops:", "Flex ops:"))]
        return " ".join([unsupported.split(", you can enable")[0]] + listed)
    errors = [line.split("error:")[-1].strip() for line in lines if "error:" in line]
    return (errors[-1] if errors else lines[0] if lines else type(error).__name__)[:500]


@dataclass
class Measurement:
    accuracy: float
    latency_p50_ms: float
    latency_p95_ms: float
    throughput_per_s: float
    input_dtype: str
    input_scale: float
    input_zero_point: int
    output_quantization: dict


class TfliteModel:
    """A converted variant, run through LiteRT's signature runner; quantizes raw pixels for int8 inputs."""

    def __init__(self, content: bytes, threads: int):
        with native_stderr_discarded():  # LiteRT announces its XNNPACK delegate on the first invocation
            self.interpreter = Interpreter(model_content=content, num_threads=threads)
            self.runner = self.interpreter.get_signature_runner(SIGNATURE)
            details = self.runner.get_input_details()[INPUT]
            self.runner(**{INPUT: np.zeros([1, *details["shape"][1:]], dtype=details["dtype"])})
        self.input_dtype = np.dtype(details["dtype"])
        self.input_scale, self.input_zero_point = details["quantization"]
        self.output_details = self.runner.get_output_details()

    def quantize(self, images: np.ndarray) -> np.ndarray:
        if self.input_dtype == np.float32:
            return images.astype(np.float32)
        info = np.iinfo(self.input_dtype)
        scaled = np.round(images / self.input_scale + self.input_zero_point)
        return np.clip(scaled, info.min, info.max).astype(self.input_dtype)

    def run(self, images: np.ndarray) -> dict[str, np.ndarray]:
        return self.runner(**{INPUT: self.quantize(images)})

    def dequantized(self, outputs: dict[str, np.ndarray], name: str) -> np.ndarray:
        scale, zero_point = self.output_details[name]["quantization"]
        values = outputs[name]
        return (values.astype(np.float32) - zero_point) * scale if scale else values.astype(np.float32)

    def classes(self, images: np.ndarray, batch: int = 256) -> np.ndarray:
        return np.concatenate([self.run(images[i:i + batch])["class_ids"] for i in range(0, len(images), batch)])


def speed(model: TfliteModel, sample: np.ndarray, *, latency_runs: int, throughput_batch: int) -> dict:
    """Single-image latency percentiles and batched throughput, measured on a small sample of images."""
    single = sample[:1]
    for _ in range(10):
        model.run(single)
    timings = []
    for _ in range(latency_runs):
        started = time.perf_counter()
        model.run(single)
        timings.append(time.perf_counter() - started)
    batch = np.resize(sample, (throughput_batch, *sample.shape[1:]))
    model.run(batch)
    rounds, started = 0, time.perf_counter()
    while rounds < 5 or time.perf_counter() - started < 0.3:
        model.run(batch)
        rounds += 1
    return {"latency_p50_ms": float(np.percentile(timings, 50) * 1000),
            "latency_p95_ms": float(np.percentile(timings, 95) * 1000),
            "throughput_per_s": float(rounds * throughput_batch / (time.perf_counter() - started))}


def measurement(model: TfliteModel, accuracy: float, speeds: dict) -> Measurement:
    return Measurement(
        accuracy=accuracy, **speeds,
        input_dtype=model.input_dtype.name,
        input_scale=float(model.input_scale),
        input_zero_point=int(model.input_zero_point),
        output_quantization={name: {"dtype": np.dtype(d["dtype"]).name, "scale": float(d["quantization"][0]),
                                    "zero_point": int(d["quantization"][1])}
                             for name, d in model.output_details.items()},
    )


def measure(content: bytes, images: np.ndarray, labels: np.ndarray, *, threads: int, latency_runs: int,
            throughput_batch: int) -> Measurement:
    """One variant on images in memory: accuracy on all of them, speed on the first."""
    model = TfliteModel(content, threads)
    accuracy = float(np.mean(model.classes(images) == labels))
    return measurement(model, accuracy, speed(model, images[:throughput_batch], latency_runs=latency_runs,
                                              throughput_batch=throughput_batch))


class SavedModelClassifier:
    """The float SavedModel's serving_default signature, batch by batch."""

    def __init__(self, saved_model_dir: str):
        self.predict = tf.saved_model.load(saved_model_dir).signatures[SIGNATURE]

    def classes(self, images: np.ndarray, batch: int = 256) -> np.ndarray:
        return np.concatenate([self.predict(**{INPUT: tf.constant(images[i:i + batch], tf.float32)})["class_ids"].numpy()
                               for i in range(0, len(images), batch)])


def saved_model_accuracy(saved_model_dir: str, images: np.ndarray, labels: np.ndarray) -> float:
    return float(np.mean(SavedModelClassifier(saved_model_dir).classes(images) == labels))
