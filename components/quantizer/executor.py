"""Quantizer executor: convert each variant, measure it on the eval split, bless it or not, write the report."""
from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import numpy as np
from tfx.dsl.components.base import base_executor
from tfx.proto.orchestration import execution_result_pb2
from tfx.types import artifact_utils
from tfx.utils import path_utils

from conveyor_ml.base.errors import ConveyorError
from conveyor_ml.base.spec import QuantizerSettings
from conveyor_ml.components.artifacts import QuantizedModel, set_custom_properties
from conveyor_ml.components.parameters import list_parameter, settings_from
from conveyor_ml.components.quantizer import report
from conveyor_ml.components.quantizer.tflite_variants import (
    VARIANTS,
    SavedModelClassifier,
    TfliteModel,
    convert,
    converter_message,
    measurement,
    speed,
)
from conveyor_ml.components.split_reader import sample, split_batches, split_files

MODEL_FILE = "model.tflite"
SAVED_MODEL = "saved_model"  # the float SavedModel, measured beside the variants

log = logging.getLogger(__name__)


def check_parameters(variants: list[str], required: list[str], representative_examples: int) -> None:
    unknown = [v for v in variants + required if v not in VARIANTS]
    if unknown:
        raise ConveyorError(f"quantizer.variants: unknown variant {unknown[0]!r} (use {', '.join(VARIANTS)})")
    if representative_examples < 1 and "int8" in variants:
        raise ConveyorError("quantizer.representative_examples: int8 needs at least 1 example")


def is_blessed(accuracy_delta_points: float, max_drop_points: float) -> bool:
    """A variant is blessed when it loses at most `max_drop_points` accuracy points against the SavedModel."""
    return -accuracy_delta_points <= max_drop_points + 1e-9


def streamed_accuracies(files: list[str], image_shape: tuple[int, int], classifiers: dict,
                        sample_size: int) -> tuple[dict[str, float], int, np.ndarray]:
    """One pass over the split, batch by batch through every classifier (`classes(images)`): returns the
    accuracy of each, the number of examples, and the first `sample_size` images (for the speed runs)."""
    correct = dict.fromkeys(classifiers, 0)
    count, kept = 0, []
    for images, labels in split_batches(files, image_shape):
        for name, classifier in classifiers.items():
            correct[name] += int(np.sum(classifier.classes(images) == labels))
        count += len(labels)
        if sum(len(k) for k in kept) < sample_size:
            kept.append(images)
    if not count:
        return {}, 0, np.empty((0, *image_shape), np.float32)
    return {name: hits / count for name, hits in correct.items()}, count, np.concatenate(kept)[:sample_size]


class Executor(base_executor.BaseExecutor):
    def Do(self, input_dict: dict[str, list], output_dict: dict[str, list],
           exec_properties: dict[str, Any]) -> execution_result_pb2.ExecutorOutput:
        settings = settings_from(QuantizerSettings, exec_properties)
        variants, required = list(settings.variants), list(settings.required_variants)
        representative_count = settings.representative_examples
        check_parameters(variants, required, representative_count)
        image_shape = tuple(list_parameter(exec_properties, "image_shape"))
        tolerance = settings.max_accuracy_drop_points
        report_artifact = artifact_utils.get_single_instance(output_dict["report"])
        variants_dir = Path(artifact_utils.get_single_uri(output_dict["quantized_models"]))

        blessing = artifact_utils.get_single_instance(input_dict["model_blessing"])
        if blessing.get_int_custom_property("blessed") != 1:
            self._write_report(report_artifact, [], "the model was not blessed by the Evaluator: nothing quantized")
            return _executor_output([], report_artifact)

        examples = artifact_utils.get_single_instance(input_dict["examples"])
        eval_files = split_files(examples, "eval")
        representative = None
        if "int8" in variants:
            representative = sample(split_files(examples, "train"), image_shape, representative_count)[0]
            if len(representative) == 0:
                raise ConveyorError("quantizer: the representative dataset is empty (no training examples for int8)")

        saved_model_dir = path_utils.serving_model_path(artifact_utils.get_single_instance(input_dict["model"]).uri)
        rows, converted = [], {}
        for variant in variants:
            row = {"variant": variant, "status": "ok", "error": ""}
            rows.append(row)
            try:
                converted[variant] = convert(saved_model_dir, variant, representative)
            except Exception as exc:  # the converter's own message goes to the report
                row.update(status="failed", error=converter_message(exc))
                log.info("%s: conversion failed: %s", variant, row["error"])
        models = {variant: TfliteModel(content, settings.threads) for variant, content in converted.items()}
        # Accuracy: every variant and the SavedModel on the whole eval split, in one streamed pass of batched
        # calls; speed: on a sample.
        accuracies, count, speed_sample = streamed_accuracies(
            eval_files, image_shape, {SAVED_MODEL: SavedModelClassifier(saved_model_dir), **models},
            settings.throughput_batch_size)
        if not count:
            raise ConveyorError("quantizer: the eval split is empty; nothing to measure accuracy on")
        float_accuracy = accuracies[SAVED_MODEL]
        log.info("accuracy measured on %d eval examples, speed on %d", count, len(speed_sample))
        artifacts = []
        for row in rows:
            if row["status"] != "ok":
                continue
            variant, model = row["variant"], models[row["variant"]]
            result = measurement(model, accuracies[variant], speed(
                model, speed_sample, latency_runs=settings.latency_runs,
                throughput_batch=settings.throughput_batch_size))
            content = converted[variant]
            delta_points = (result.accuracy - float_accuracy) * 100
            row.update(size_bytes=len(content), accuracy=result.accuracy, accuracy_delta_points=delta_points,
                       latency_p50_ms=result.latency_p50_ms, latency_p95_ms=result.latency_p95_ms,
                       throughput_per_s=result.throughput_per_s, blessed=is_blessed(delta_points, tolerance),
                       input_dtype=result.input_dtype, input_scale=result.input_scale,
                       input_zero_point=result.input_zero_point, output_quantization=result.output_quantization,
                       eval_examples=count)
            artifacts.append(self._variant_artifact(variants_dir / variant, content, row))
        report.complete_rows(rows)
        for artifact, row in zip(artifacts, [r for r in rows if r["status"] == "ok"]):
            set_custom_properties(artifact, {"size_vs_f32": row.get("size_vs_f32"),
                                             "speed_vs_f32": row.get("speed_vs_f32")})
        self._write_report(report_artifact, rows, "", float_accuracy=float_accuracy, tolerance=tolerance)
        failed_required = [r["variant"] for r in rows if r["status"] != "ok" and r["variant"] in required]
        if failed_required:
            raise ConveyorError(f"quantizer: required variant {failed_required[0]} failed: "
                                f"{next(r['error'] for r in rows if r['variant'] == failed_required[0])}")
        return _executor_output(artifacts, report_artifact)

    @staticmethod
    def _variant_artifact(directory: Path, content: bytes, row: dict) -> QuantizedModel:
        directory.mkdir(parents=True, exist_ok=True)
        (directory / MODEL_FILE).write_bytes(content)
        artifact = QuantizedModel()
        artifact.uri = str(directory)
        set_custom_properties(artifact, {
            "variant": row["variant"], "size_bytes": row["size_bytes"], "accuracy": row["accuracy"],
            "accuracy_delta": row["accuracy_delta_points"], "latency_p50_ms": row["latency_p50_ms"],
            "latency_p95_ms": row["latency_p95_ms"], "throughput_per_s": row["throughput_per_s"],
            "blessed": int(row["blessed"])})
        set_custom_properties(artifact, {"input_dtype": row["input_dtype"], "input_scale": row["input_scale"],
                                         "input_zero_point": row["input_zero_point"],
                                         "output_quantization": json.dumps(row["output_quantization"])})
        return artifact

    @staticmethod
    def _write_report(artifact, rows: list[dict], note: str, **extra) -> None:
        directory = Path(artifact.uri)
        directory.mkdir(parents=True, exist_ok=True)
        document = {"note": note, **extra, "variants": rows}
        (directory / "report.json").write_text(json.dumps(document, indent=2, default=float) + "\n")
        table = report.markdown(rows, "TFLite variants (eval split, LiteRT)") if rows else f"{note}\n"
        (directory / "report.md").write_text(table)
        for row in rows:
            if row["status"] == "ok":
                log.info("%s: %.1f KiB, accuracy %.4f (%+.2f pts), p50 %.0f µs, %s", row["variant"],
                         row["size_bytes"] / 1024, row["accuracy"], row["accuracy_delta_points"],
                         row["latency_p50_ms"] * 1000, "blessed" if row["blessed"] else "NOT blessed")
        if note:
            log.info("%s", note)
        set_custom_properties(artifact, {"variants": len(rows),
                                         "blessed": sum(1 for r in rows if r.get("blessed")),
                                         "float_accuracy": extra.get("float_accuracy"), "note": note})


def _executor_output(variants: list, report_artifact) -> execution_result_pb2.ExecutorOutput:
    output = execution_result_pb2.ExecutorOutput()
    output.output_artifacts["quantized_models"].artifacts.extend(v.mlmd_artifact for v in variants)
    output.output_artifacts["report"].artifacts.append(report_artifact.mlmd_artifact)
    return output
