"""Evaluator executor: TFX's (TFMA's metrics, min_accuracy as its value threshold, the blessing files), then
candidate and baseline scored on the same eval examples and the blessing decided by a paired test
(comparison.py), with the evidence recorded on the ModelEvaluation and the ModelBlessing."""
from __future__ import annotations

import logging
import os
from typing import Any

import numpy as np
from tfx.components.evaluator import constants
from tfx.components.evaluator import executor as tfx_evaluator
from tfx.dsl.io import fileio
from tfx.types import artifact_utils
from tfx.utils import io_utils, path_utils

from conveyor_ml.base.errors import ConveyorError
from conveyor_ml.base.names import LABEL_KEY
from conveyor_ml.base.spec import EvaluatorSettings
from conveyor_ml.components.artifacts import set_custom_properties, span_of
from conveyor_ml.components.evaluator.comparison import (
    PairedTable,
    accuracy_interval,
    compare,
    decide,
    required_eval_examples,
)
from conveyor_ml.components.keras_tracing import keep_autograph_out_of_keras
from conveyor_ml.components.parameters import settings_from

log = logging.getLogger(__name__)

EXAMPLES_SIGNATURE = "serving_examples"  # serialized tf.Examples in, the model's own parsing
SCORING_BATCH = 256


def eval_files(examples: list) -> list[str]:
    """The eval split's files of every Examples artifact, oldest span first."""
    files = []
    for artifact in sorted(examples, key=lambda a: (span_of(a), a.id or 0)):
        split_dir = artifact_utils.get_split_uri([artifact], "eval")
        found = sorted(f for f in fileio.glob(os.path.join(split_dir, "*")) if not fileio.isdir(f))
        if not found:
            raise ConveyorError(f"examples: the eval split of span {span_of(artifact)} is empty ({split_dir})")
        files += found
    return files


def score_pair(candidate_dir: str, baseline_dir: str | None, files: list[str]) -> PairedTable:
    """Streams the examples in batches through both models' `serving_examples` signature and counts the 2x2
    table of right and wrong answers (memory: one batch). Without a baseline, it counts as always wrong."""
    import tensorflow as tf

    def classifier(model_dir: str):
        signature = tf.saved_model.load(model_dir).signatures[EXAMPLES_SIGNATURE]
        return lambda serialized: signature(examples=serialized)["class_ids"].numpy()

    candidate = classifier(candidate_dir)
    baseline = classifier(baseline_dir) if baseline_dir else None
    label_spec = {LABEL_KEY: tf.io.FixedLenFeature([1], tf.int64)}
    counts = np.zeros((2, 2), dtype=np.int64)  # [candidate right?][baseline right?]
    for serialized in tf.data.TFRecordDataset(files, compression_type="GZIP").batch(SCORING_BATCH):
        labels = tf.io.parse_example(serialized, label_spec)[LABEL_KEY].numpy()[:, 0]
        candidate_right = candidate(serialized) == labels
        baseline_right = baseline(serialized) == labels if baseline else np.zeros_like(candidate_right)
        np.add.at(counts, (candidate_right.astype(int), baseline_right.astype(int)), 1)
    return PairedTable(both=int(counts[1, 1]), candidate_only=int(counts[1, 0]), baseline_only=int(counts[0, 1]),
                       neither=int(counts[0, 0]))


def evidence(table: PairedTable, settings: EvaluatorSettings, has_baseline: bool, baseline_id: int | None,
             spans: list[int]) -> dict[str, Any]:
    """What the decision rests on, as custom properties: eval set, accuracies, test, p-value, intervals."""
    alpha = settings.alpha
    low, high = accuracy_interval(table.both + table.candidate_only, table.examples, alpha)
    values: dict[str, Any] = {
        "eval_examples": table.examples, "eval_spans": ",".join(map(str, spans)),
        "candidate_accuracy": table.candidate_accuracy, "accuracy_interval_low": low, "accuracy_interval_high": high,
        "interval_level": 1 - 2 * alpha, "alpha": alpha, "min_accuracy": settings.min_accuracy,
        "max_accuracy_drop": settings.max_accuracy_drop,
    }
    comparison = compare(table, settings.test, alpha) if has_baseline else None
    if comparison is not None:
        values.update({
            "comparison_test": comparison.test, "p_value": comparison.p_value,
            "baseline_model_id": baseline_id, "baseline_accuracy": table.baseline_accuracy,
            "accuracy_difference": table.difference, "difference_interval_low": comparison.interval[0],
            "difference_interval_high": comparison.interval[1], "candidate_only_correct": table.candidate_only,
            "baseline_only_correct": table.baseline_only})
    required = required_eval_examples(settings.max_accuracy_drop, settings.min_eval_examples)
    if has_baseline:
        values["min_eval_examples"] = required
    decision = decide(table, comparison, min_accuracy=settings.min_accuracy,
                      max_accuracy_drop=settings.max_accuracy_drop, alpha=alpha,
                      baseline=f"baseline model #{baseline_id}", min_eval_examples=required)
    values.update({"decision": "blessed" if decision.blessed else "rejected", "reason": decision.reason})
    return values


class Executor(tfx_evaluator.Executor):
    def Do(self, input_dict: dict[str, list], output_dict: dict[str, list], exec_properties: dict[str, Any]) -> None:
        settings = settings_from(EvaluatorSettings, exec_properties)
        keep_autograph_out_of_keras()  # TFMA traces its Keras metrics
        baselines = input_dict.get("baseline_model") or []
        baseline = baselines[0] if baselines else None
        # TFMA measures the candidate and checks min_accuracy; the baseline is compared below, example by
        # example, so TFMA is spared a second model's pass over the data.
        super().Do({k: v for k, v in input_dict.items() if k != "baseline_model"}, output_dict, exec_properties)
        candidate = artifact_utils.get_single_instance(input_dict["model"])
        examples = input_dict["examples"]
        spans = sorted({span_of(a) for a in examples})
        table = score_pair(path_utils.serving_model_path(candidate.uri),
                           path_utils.serving_model_path(baseline.uri) if baseline else None, eval_files(examples))
        values = evidence(table, settings, baseline is not None, baseline.id if baseline else None, spans)
        blessing = artifact_utils.get_single_instance(output_dict["blessing"])
        tfma_blessed = blessing.get_int_custom_property(constants.ARTIFACT_PROPERTY_BLESSED_KEY) == 1
        if not tfma_blessed and values["decision"] == "blessed":
            # TFMA's own min_accuracy check is the authority on its threshold (it measured the same examples).
            values.update(decision="rejected", reason=f"TFMA's validation failed (min_accuracy "
                                                      f"{settings.min_accuracy:g}); {values['reason']}")
        blessed = values["decision"] == "blessed"
        _write_blessing(blessing, blessed)
        if baseline is not None:  # what TFX's executor records when it compares with a baseline itself
            blessing.set_string_custom_property(constants.ARTIFACT_PROPERTY_BASELINE_MODEL_URI_KEY, baseline.uri)
        for artifact in (blessing, artifact_utils.get_single_instance(output_dict["evaluation"])):
            set_custom_properties(artifact, values)
        log.info("%s: %s", "blessed" if blessed else "NOT blessed", values["reason"])


def _write_blessing(blessing, blessed: bool) -> None:
    """The BLESSED / NOT_BLESSED file and the `blessed` property TFX's consumers (pushers, resolvers) read."""
    for name in (constants.BLESSED_FILE_NAME, constants.NOT_BLESSED_FILE_NAME):
        path = os.path.join(blessing.uri, name)
        if fileio.exists(path):
            fileio.remove(path)
    name = constants.BLESSED_FILE_NAME if blessed else constants.NOT_BLESSED_FILE_NAME
    io_utils.write_string_file(os.path.join(blessing.uri, name), "")
    blessing.set_int_custom_property(constants.ARTIFACT_PROPERTY_BLESSED_KEY,
                                     constants.BLESSED_VALUE if blessed else constants.NOT_BLESSED_VALUE)
