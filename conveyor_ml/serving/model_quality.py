"""What the server watches about the model itself, beyond latency: inputs that break the data schema,
the classes it predicts (a rolling window per version, for prediction drift), and live accuracy from
ground-truth labels clients send back for logged predictions (`POST /v1/models/{name}/feedback`, our
extension to TF Serving's API)."""
from __future__ import annotations

import logging
import threading
import uuid
from collections import OrderedDict, deque
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from conveyor_ml.serving.errors import ServingError, invalid_argument

log = logging.getLogger("conveyor.serving")
NUM_CLASSES = 10


@dataclass(frozen=True)
class FeatureRule:
    feature: str
    minimum: float | None
    maximum: float | None
    size: int | None  # values per example, from the schema's shape


def rules_from_schema(schema_file: Path) -> list[FeatureRule]:
    """Float/int domains and shapes of the features a TFDV schema declares."""
    from google.protobuf import text_format
    from tensorflow_metadata.proto.v0 import schema_pb2

    schema = text_format.Parse(schema_file.read_text(), schema_pb2.Schema())
    rules = []
    for feature in schema.feature:
        domain = feature.float_domain if feature.HasField("float_domain") else (
            feature.int_domain if feature.HasField("int_domain") else None)
        size = int(np.prod([d.size for d in feature.shape.dim])) if feature.HasField("shape") else None
        rules.append(FeatureRule(feature.name,
                                 domain.min if domain is not None and domain.HasField("min") else None,
                                 domain.max if domain is not None and domain.HasField("max") else None, size))
    return rules


@dataclass
class VersionWatch:
    predictions: deque = field(default_factory=lambda: deque(maxlen=1000))
    feedback: int = 0
    correct: int = 0


class ModelQuality:
    def __init__(self, metrics, *, schema_file: str | None = None, reject_anomalous: bool = False,
                 window: int = 1000, remembered_predictions: int = 100_000):
        self.metrics = metrics
        self.rules = rules_from_schema(Path(schema_file)) if schema_file else []
        self.reject_anomalous = reject_anomalous
        self.window = window
        self.remembered = remembered_predictions
        self._lock = threading.Lock()
        self._versions: dict[tuple[str, int], VersionWatch] = {}
        self._predictions: OrderedDict[str, tuple[str, int, list[int]]] = OrderedDict()
        self._logged_samples = 0

    # -- inputs ------------------------------------------------------------------------------------------
    def check_inputs(self, model: str, inputs: dict[str, np.ndarray]) -> None:
        """Counts values outside the schema's domains (per feature); raises when rejecting is on."""
        if not self.rules:
            return
        image_rule = next((r for r in self.rules if r.feature == "image"), None)
        problems = []
        for name, values in inputs.items():
            if image_rule is None or values.dtype.kind not in "fiu":
                continue
            flat = values.reshape(len(values), -1) if values.ndim > 1 else values.reshape(-1, 1)
            kinds = []
            if values.dtype.kind == "f" and np.isnan(flat).any():
                kinds.append("nan")
            if image_rule.minimum is not None and (flat < image_rule.minimum).any():
                kinds.append("below_min")
            if image_rule.maximum is not None and (flat > image_rule.maximum).any():
                kinds.append("above_max")
            if image_rule.size is not None and flat.shape[1] != image_rule.size:
                kinds.append("shape")
            for kind in kinds:
                self.metrics.input_anomalies.labels(model, image_rule.feature, kind).inc()
                problems.append(f"{name}: {kind.replace('_', ' ')} (schema: {image_rule.feature} in "
                                f"[{image_rule.minimum:g}, {image_rule.maximum:g}], {image_rule.size} values)")
        if problems:
            self._log_sample(model, problems, inputs)
            if self.reject_anomalous:
                raise invalid_argument("input anomaly: " + "; ".join(problems))

    def _log_sample(self, model: str, problems: list[str], inputs: dict) -> None:
        # The first anomaly and then one in a hundred, so a flood cannot flood the log.
        self._logged_samples += 1
        if self._logged_samples == 1 or self._logged_samples % 100 == 0:
            sample = {k: np.asarray(v).reshape(-1)[:8].tolist() for k, v in inputs.items()}
            log.warning("anomalous input for %s (#%d): %s; first values %s", model, self._logged_samples,
                        "; ".join(problems), sample)

    # -- predictions and feedback ------------------------------------------------------------------------
    def record_predictions(self, model: str, version: int, outputs: dict[str, np.ndarray]) -> str | None:
        """Logs the predicted classes under a new id (returned to the client); None if no classes."""
        classes = outputs.get("class_ids")
        if classes is None and "probabilities" in outputs:
            classes = np.argmax(outputs["probabilities"], axis=-1)
        if classes is None:
            return None
        classes = [int(c) for c in np.asarray(classes).reshape(-1)]
        prediction_id = uuid.uuid4().hex
        with self._lock:
            watch = self._versions.setdefault((model, version), VersionWatch(deque(maxlen=self.window)))
            watch.predictions.extend(classes)
            self._predictions[prediction_id] = (model, version, classes)
            while len(self._predictions) > self.remembered:
                self._predictions.popitem(last=False)
        for value, count in zip(*np.unique(classes, return_counts=True)):
            self.metrics.predicted_class.labels(model, str(version), str(value)).inc(int(count))
        return prediction_id

    def feedback(self, model: str, entries: list[dict]) -> dict:
        """Ground truth for logged predictions: [{"prediction_id": …, "labels": [3, …]}] (one label per
        instance of that request). Unknown ids are reported, not fatal."""
        accepted, unknown = 0, []
        touched = set()
        for entry in entries:
            if not isinstance(entry, dict) or "prediction_id" not in entry:
                raise invalid_argument('each feedback entry needs "prediction_id" and "labels"')
            labels = entry.get("labels", [entry["label"]] if "label" in entry else None)
            if not isinstance(labels, list) or not all(isinstance(v, int) for v in labels):
                raise invalid_argument(f'feedback for {entry["prediction_id"]}: "labels" must be a list of integers')
            with self._lock:
                logged = self._predictions.get(str(entry["prediction_id"]))
            if logged is None or logged[0] != model:
                unknown.append(str(entry["prediction_id"]))
                continue
            _, version, predicted = logged
            if len(labels) != len(predicted):
                raise invalid_argument(f'feedback for {entry["prediction_id"]}: {len(labels)} labels for '
                                       f"{len(predicted)} predicted instances")
            with self._lock:
                watch = self._versions[(model, version)]
                for label, guess in zip(labels, predicted):
                    watch.feedback += 1
                    watch.correct += int(label == guess)
                    self.metrics.feedback.labels(model, str(version), "correct" if label == guess else "wrong").inc()
                self.metrics.live_accuracy.labels(model, str(version)).set(watch.correct / watch.feedback)
            accepted += len(labels)
            touched.add(version)
        return {"accepted": accepted, "unknown_prediction_ids": unknown,
                "live_accuracy": {str(v): self.accuracy(model, v) for v in sorted(touched)}}

    def accuracy(self, model: str, version: int) -> float | None:
        watch = self._versions.get((model, version))
        return watch.correct / watch.feedback if watch and watch.feedback else None

    @staticmethod
    def empty_version() -> dict:
        return {"predictions": 0, "class_histogram": [0] * NUM_CLASSES,
                "feedback": {"count": 0, "correct": 0, "accuracy": None}}

    def snapshot(self, model: str) -> dict:
        """Per version: the rolling predicted-class histogram and the feedback so far."""
        with self._lock:
            versions = {version: watch for (name, version), watch in self._versions.items() if name == model}
            return {str(version): {
                "predictions": len(watch.predictions),
                "class_histogram": np.bincount(np.asarray(watch.predictions, dtype=np.int64),
                                               minlength=NUM_CLASSES).tolist() if watch.predictions else [0] * NUM_CLASSES,
                "feedback": {"count": watch.feedback, "correct": watch.correct,
                             "accuracy": watch.correct / watch.feedback if watch.feedback else None},
            } for version, watch in sorted(versions.items())}


def parse_feedback(document) -> list[dict]:
    if isinstance(document, dict) and isinstance(document.get("feedback"), list):
        return document["feedback"]
    if isinstance(document, dict) and "prediction_id" in document:
        return [document]
    raise invalid_argument('feedback body: {"feedback": [{"prediction_id": "…", "labels": [3]}]}')


__all__ = ["ModelQuality", "ServingError", "parse_feedback"]
