"""What the server watches about the model itself, beyond latency: inputs that break the data schema,
the classes it predicts (a rolling window per version, for prediction drift), and live accuracy from
ground-truth labels clients send back for logged predictions (`POST /v1/models/{name}/feedback`, our
extension to TF Serving's API)."""
from __future__ import annotations

import logging
import os
import threading
from collections import Counter, OrderedDict, deque
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from conveyor_ml.serving.errors import ServingError, invalid_argument

log = logging.getLogger("conveyor.serving")


ID_BYTES = 16  # a prediction id's random bits / 8
RANDOM_BATCH_BYTES = 4096
SERVING_ENVIRONMENT = "SERVING"  # TFDV's name for the features a serving request carries


@dataclass(frozen=True)
class FeatureRule:
    feature: str
    minimum: float | None
    maximum: float | None
    size: int | None  # values per example, from the schema's shape


@dataclass(frozen=True)
class SchemaRules:
    """What a TFDV schema says about serving requests: the rules of the features in its SERVING environment
    (all features when it declares no environments), and how many classes the label can take (from the int
    domain of a feature left out of SERVING, e.g. `not_in_environment: "SERVING"` on the label)."""

    features: tuple[FeatureRule, ...] = ()
    num_classes: int | None = None

    def rule_for(self, input_name: str, inputs: int) -> FeatureRule | None:
        """The feature an input is checked against: the one of the same name, else the only serving feature
        when the request has only one input (a model's input tensor is often named unlike the feature)."""
        named = next((rule for rule in self.features if rule.feature == input_name), None)
        if named is not None or inputs != 1 or len(self.features) != 1:
            return named
        return self.features[0]


def rules_from_schema(schema_file: Path) -> SchemaRules:
    """The serving features' float/int domains and shapes, and the label's class count, of a TFDV schema."""
    from google.protobuf import text_format
    from tensorflow_metadata.proto.v0 import schema_pb2

    schema = text_format.Parse(schema_file.read_text(), schema_pb2.Schema())
    features, num_classes = [], None
    for feature in schema.feature:
        domain = feature.float_domain if feature.HasField("float_domain") else (
            feature.int_domain if feature.HasField("int_domain") else None)
        if SERVING_ENVIRONMENT in feature.not_in_environment:
            if feature.HasField("int_domain") and feature.int_domain.HasField("max"):
                num_classes = int(feature.int_domain.max) + 1
            continue
        size = int(np.prod([d.size for d in feature.shape.dim])) if feature.HasField("shape") else None
        features.append(FeatureRule(feature.name,
                                    domain.min if domain is not None and domain.HasField("min") else None,
                                    domain.max if domain is not None and domain.HasField("max") else None, size))
    return SchemaRules(tuple(features), num_classes)


@dataclass
class VersionWatch:
    predictions: deque = field(default_factory=lambda: deque(maxlen=1000))
    feedback: int = 0
    correct: int = 0


class ModelQuality:
    def __init__(self, metrics, *, schema_file: str | None = None, reject_anomalous: bool = False,
                 window: int = 1000, remembered_predictions: int = 100_000, remembered_rows: int = 1_000_000,
                 id_prefix: str = ""):
        """`id_prefix` starts every prediction id this process issues (`--server_processes`: the worker's
        index, so feedback for an id is handed to the process that logged it: owner())."""
        self.metrics = metrics
        self.id_prefix = id_prefix
        self.rules = rules_from_schema(Path(schema_file)) if schema_file else SchemaRules()
        self.reject_anomalous = reject_anomalous
        self.window = window
        self.remembered = remembered_predictions
        # The log is bounded in rows too: 100,000 requests of 1,000 rows each held ~0.9 GB of class ids.
        self.remembered_rows = remembered_rows
        self._logged_rows = 0
        self._lock = threading.Lock()
        self._versions: dict[tuple[str, int], VersionWatch] = {}
        self._predictions: OrderedDict[str, tuple[str, int, list[int]]] = OrderedDict()
        self._class_counters: dict[tuple[str, int, int], object] = {}
        self._random, self._random_offset = b"", 0  # random bytes for prediction ids, used once each
        self._logged_samples = 0

    # -- inputs ------------------------------------------------------------------------------------------
    def check_inputs(self, model: str, inputs: dict[str, np.ndarray]) -> None:
        """Counts values outside the schema's domains (per feature); raises when rejecting is on."""
        if not self.rules.features:
            return
        problems = []
        for name, values in inputs.items():
            rule = self.rules.rule_for(name, len(inputs))
            if rule is None or values.dtype.kind not in "fiu" or values.size == 0:
                continue
            flat = values.reshape(values.shape[0], -1) if values.ndim > 1 else values.reshape(-1, 1)
            kinds = []
            if values.dtype.kind == "f" and np.isnan(flat).any():
                kinds.append("nan")
            if rule.minimum is not None and (flat < rule.minimum).any():
                kinds.append("below_min")
            if rule.maximum is not None and (flat > rule.maximum).any():
                kinds.append("above_max")
            if rule.size is not None and flat.shape[1] != rule.size:
                kinds.append("shape")
            for kind in kinds:
                self.metrics.input_anomalies.labels(model, rule.feature, kind).inc()
                domain = f"in [{rule.minimum:g}, {rule.maximum:g}], " if None not in (rule.minimum, rule.maximum) else ""
                problems.append(f"{name}: {kind.replace('_', ' ')} (schema: {rule.feature} {domain}"
                                f"{rule.size} values)")
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
        classes = np.asarray(classes).reshape(-1).astype(np.int64, copy=False).tolist()
        # One class (a one-row request, the common case) needs no Counter: it costs more than the rest here.
        counts = ((classes[0], 1),) if len(classes) == 1 else Counter(classes).items()
        with self._lock:
            prediction_id = self._new_id()
            watch = self._versions.get((model, version))
            if watch is None:
                watch = self._versions[(model, version)] = VersionWatch(deque(maxlen=self.window))
            watch.predictions.extend(classes)
            self._predictions[prediction_id] = (model, version, classes)
            self._logged_rows += len(classes)
            while len(self._predictions) > self.remembered or self._logged_rows > self.remembered_rows:
                self._logged_rows -= len(self._predictions.popitem(last=False)[1][2])  # the oldest goes
            for value, count in counts:  # one increment per class, not per row
                counter = self._class_counters.get((model, version, value))
                if counter is None:  # a labels() lookup once per class, not per request
                    counter = self.metrics.predicted_class.labels(model, str(version), str(value))
                    self._class_counters[(model, version, value)] = counter
                counter.inc(count)
        return prediction_id

    def _new_id(self) -> str:
        """128 random bits (unguessable: feedback for an id cannot be forged by others), as hex; drawn from
        the OS's random source 4 KiB at a time rather than with a call per request. Under the lock."""
        if self._random_offset + ID_BYTES > len(self._random):
            self._random, self._random_offset = os.urandom(RANDOM_BATCH_BYTES), 0
        start = self._random_offset
        self._random_offset += ID_BYTES
        return self.id_prefix + self._random[start:start + ID_BYTES].hex()

    def feedback(self, model: str, entries: list[dict]) -> dict:
        """Ground truth for logged predictions: [{"prediction_id": …, "labels": [3, …]}] (one label per
        instance of that request). Each id counts once: an id already used (earlier in the same request
        too), like one never issued (or forgotten), is reported among the unknown ids, not fatal. Every entry
        is checked before any is applied: a malformed one is refused and changes nothing."""
        parsed = [feedback_entry(entry) for entry in entries]
        accepted, unknown, touched = 0, [], set()
        with self._lock:
            applying, seen = [], set()
            for prediction_id, labels in parsed:
                logged = self._predictions.get(prediction_id)
                if logged is None or logged[0] != model or prediction_id in seen:
                    unknown.append(prediction_id)
                    continue
                seen.add(prediction_id)
                _, version, predicted = logged
                if len(labels) != len(predicted):
                    raise invalid_argument(f"feedback for {prediction_id}: {len(labels)} labels for "
                                           f"{len(predicted)} predicted instances")
                applying.append((prediction_id, version, predicted, labels))
            for prediction_id, version, predicted, labels in applying:
                del self._predictions[prediction_id]  # usable once: a replay cannot skew live accuracy
                self._logged_rows -= len(predicted)
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

    def _histogram(self, classes) -> list[int]:
        """Predicted classes counted per class: as many bins as the schema's label has classes (or as the
        highest class seen needs, without a schema)."""
        observed = np.asarray(classes, dtype=np.int64)
        bins = max(self.rules.num_classes or 0, int(observed.max()) + 1 if observed.size else 0)
        return np.bincount(observed, minlength=bins).tolist()

    def empty_version(self) -> dict:
        return {"predictions": 0, "class_histogram": self._histogram([]),
                "feedback": {"count": 0, "correct": 0, "accuracy": None}}

    def state(self, model: str) -> dict:
        """Per version, what snapshots are made of (JSON-ready, so another server process can add it to its
        own): the predicted classes in the window, the feedback count and how much of it was correct."""
        with self._lock:
            return {str(version): {"predictions": list(watch.predictions), "feedback": watch.feedback,
                                   "correct": watch.correct}
                    for (name, version), watch in self._versions.items() if name == model}

    def summarize(self, states: list[dict]) -> dict:
        """Per version: the predicted-class histogram of the windows and the feedback of every state."""
        merged: dict[str, dict] = {}
        for state in states:
            for version, figures in state.items():
                total = merged.setdefault(version, {"predictions": [], "feedback": 0, "correct": 0})
                total["predictions"] += figures["predictions"]
                total["feedback"] += figures["feedback"]
                total["correct"] += figures["correct"]
        return {version: {
            "predictions": len(total["predictions"]),
            "class_histogram": self._histogram(total["predictions"]),
            "feedback": {"count": total["feedback"], "correct": total["correct"],
                         "accuracy": total["correct"] / total["feedback"] if total["feedback"] else None},
        } for version, total in sorted(merged.items(), key=lambda item: int(item[0]))}

    def snapshot(self, model: str) -> dict:
        """Per version: the rolling predicted-class histogram and the feedback so far."""
        return self.summarize([self.state(model)])


def feedback_entry(entry) -> tuple[str, list[int]]:
    """(prediction id, labels) of one feedback entry; INVALID_ARGUMENT when it has not that shape."""
    if not isinstance(entry, dict) or "prediction_id" not in entry:
        raise invalid_argument('each feedback entry needs "prediction_id" and "labels"')
    labels = entry.get("labels", [entry["label"]] if "label" in entry else None)
    if not isinstance(labels, list) or not all(isinstance(v, int) and not isinstance(v, bool) for v in labels):
        raise invalid_argument(f'feedback for {entry["prediction_id"]}: "labels" must be a list of integers')
    # Ids this server issues are ASCII; one that UTF-8 cannot encode (a lone surrogate escape) is kept as its
    # escapes, so the answer that reports it unknown can be written.
    return str(entry["prediction_id"]).encode("utf-8", "backslashreplace").decode("utf-8"), labels


def owner(prediction_id: str, processes: int) -> int | None:
    """The server process that issued `prediction_id` ("<index>-<hex>" under --server_processes), or None
    when the id names none (such an id is reported unknown wherever it lands)."""
    index, dash, _ = prediction_id.partition("-")
    if not dash or not index.isdigit() or int(index) >= processes:
        return None
    return int(index)


def parse_feedback(document) -> list[dict]:
    if isinstance(document, dict) and isinstance(document.get("feedback"), list):
        return document["feedback"]
    if isinstance(document, dict) and "prediction_id" in document:
        return [document]
    raise invalid_argument('feedback body: {"feedback": [{"prediction_id": "…", "labels": [3]}]}')


__all__ = ["ModelQuality", "ServingError", "parse_feedback"]
