"""Input resolution strategies for the DAG.

Every strategy that picks from "all artifacts of a type" also takes a channel produced in this run (`newest`,
`candidate`), which orders it after that node and anchors "before" and "newest" to this run, so a re-run with
no new data resolves the same inputs as the run before it and is answered from the cache.
"""
from __future__ import annotations

from collections import defaultdict

from tfx.dsl.components.common import resolver

from conveyor_ml.base.errors import ConveyorError
from conveyor_ml.base.names import DRIFT_BLOCKED
from conveyor_ml.metadata.index import MetadataIndex

BLESSED, CURRENT_MODEL_ID = "blessed", "current_model_id"  # the Evaluator's ModelBlessing properties


def _span(artifact) -> int:
    return artifact.get_int_custom_property("span")


def blocked_spans(drift_reports) -> set[int]:
    """Spans the drift gate blocked: the newest DataDriftReport about each span decides."""
    latest = {}
    for report in drift_reports or []:
        span = _span(report)
        if span not in latest or report.id > latest[span].id:
            latest[span] = report
    return {span for span, report in latest.items() if report.get_string_custom_property("verdict") == DRIFT_BLOCKED}


def _newest_import_per_span(artifacts) -> dict[int, object]:
    """span -> its newest Examples artifact (a span imported twice is the same immutable data)."""
    by_span = {}
    for artifact in artifacts:
        span = _span(artifact)
        if span not in by_span or artifact.id > by_span[span].id:
            by_span[span] = artifact
    return by_span


class PreviousBlessedModelStrategy(resolver.ResolverStrategy):
    """The baseline for a candidate: the newest blessed Model older than the candidate.

    Inputs: `candidate` (the Trainer's output in this run, which also orders the resolver after the
    Trainer), `model` and `model_blessing` (every Model and ModelBlessing the pipeline ever recorded).
    Ordering by the candidate rather than "latest" means a candidate is never its own baseline, and a
    re-run whose Trainer was cached resolves the same baseline as before, so the Evaluator (and all
    after it) is cached too.
    """

    def resolve_artifacts(self, store, input_dict):
        candidates = input_dict.get("candidate") or []
        result = {"candidate": list(candidates), "model": [], "model_blessing": []}
        if not candidates:
            return result
        newest_candidate = max(c.id for c in candidates)
        blessings = {b.get_int_custom_property(CURRENT_MODEL_ID): b for b in input_dict.get("model_blessing") or []
                     if b.get_int_custom_property(BLESSED) == 1}
        earlier = [m for m in input_dict.get("model") or [] if m.id < newest_candidate and m.id in blessings]
        if earlier:
            baseline = max(earlier, key=lambda m: m.id)
            result["model"], result["model_blessing"] = [baseline], [blessings[baseline.id]]
        return result


class SpanWindowStrategy(resolver.ResolverStrategy):
    """The spans the Trainer learns from and the Evaluator scores on: the newest span and every earlier one
    (`window` 0), or the latest `window` spans, one Examples artifact per span, leaving out earlier spans the
    drift gate blocked (their data never trains a model; the newest span's own verdict is the Trainer's to act on).

    Inputs: `newest` (ExampleGen's output in this run), `examples` (every Examples artifact the pipeline
    recorded) and `drift_reports` (every DataDriftReport)."""

    def __init__(self, window: int = 0):
        self.window = window

    def resolve_artifacts(self, store, input_dict):
        newest = list(input_dict.get("newest") or [])
        result = {"newest": newest, "examples": [], "drift_reports": []}
        if not newest:
            return result
        last = max(_span(a) for a in newest)
        blocked = blocked_spans(input_dict.get("drift_reports")) - {last}
        first = last - self.window + 1 if self.window else 1
        by_span = _newest_import_per_span(list(input_dict.get("examples") or []) + newest)
        result["examples"] = [by_span[s] for s in sorted(by_span) if first <= s <= last and s not in blocked]
        return result


class GoldenSpanStrategy(resolver.ResolverStrategy):
    """The fixed held-out set every candidate and its baseline are scored on: span `span`'s Examples.

    Inputs: `newest` (orders the resolver after this run's import) and `examples` (every Examples artifact)."""

    def __init__(self, span: int = 1):
        self.span = span

    def resolve_artifacts(self, store, input_dict):
        newest = list(input_dict.get("newest") or [])
        by_span = _newest_import_per_span(list(input_dict.get("examples") or []) + newest)
        if self.span not in by_span:
            imported = ", ".join(map(str, sorted(by_span))) or "none"
            raise ConveyorError(f"evaluator.golden_span: span {self.span} has not been imported (imported spans: "
                                f"{imported})")
        return {"newest": newest, "examples": [by_span[self.span]]}


class WarmStartModelStrategy(resolver.ResolverStrategy):
    """The model a new one starts from: among models trained before the newest span arrived, the one serving
    `model_name` as stable now, else the newest blessed one.

    "Trained before the newest span" (a Model's `spans` property) keeps a re-run with no new data on the same
    starting point, so it is cached, instead of starting from the model the previous run just pushed.

    Inputs: `newest` (this run's Examples), `model` and `model_blessing` (all of them)."""

    def __init__(self, model_name: str | None = None):
        self.model_name = model_name

    def resolve_artifacts(self, store, input_dict):
        newest = list(input_dict.get("newest") or [])
        result = {"newest": newest, "model": [], "model_blessing": []}
        if not newest:
            return result
        last = max(_span(a) for a in newest)
        blessed = {b.get_int_custom_property(CURRENT_MODEL_ID) for b in input_dict.get("model_blessing") or []
                   if b.get_int_custom_property(BLESSED) == 1}

        def trained_before(model) -> bool:
            spans = [int(s) for s in model.get_string_custom_property("spans").split(",") if s.strip()]
            return bool(spans) and max(spans) < last

        earlier = [m for m in input_dict.get("model") or [] if m.id in blessed and trained_before(m)]
        if not earlier:
            return result
        stable = None
        if self.model_name:
            stable = MetadataIndex(store).model_with_label(self.model_name, "stable")
        chosen = next((m for m in earlier if m.id == stable), None) or max(earlier, key=lambda m: m.id)
        result["model"] = [chosen]
        return result


class PreviousSpanStatisticsStrategy(resolver.ResolverStrategy):
    """The statistics of the newest span older than this run's that the drift gate did not block: the drift
    gate's baseline (a blocked span is compared with nothing and trains nothing, so it is no reference).

    Statistics carry no span themselves; it is read from the Examples their StatisticsGen execution consumed."""

    def resolve_artifacts(self, store, input_dict):
        from ml_metadata.proto import metadata_store_pb2 as pb

        newest = input_dict.get("newest") or []
        result = {"newest": list(newest), "statistics": [], "drift_reports": []}
        candidates = [s for s in input_dict.get("statistics") or [] if s.id not in {n.id for n in newest}]
        if not newest or not candidates:
            return result
        ids = [s.id for s in candidates] + [n.id for n in newest]
        producers = {e.artifact_id: e.execution_id for e in store.get_events_by_artifact_ids(ids)
                     if e.type == pb.Event.OUTPUT}
        inputs = defaultdict(list)
        for event in store.get_events_by_execution_ids(list(set(producers.values()))):
            if event.type == pb.Event.INPUT:
                inputs[event.execution_id].append(event.artifact_id)
        examples = {a.id: a for a in store.get_artifacts_by_id([i for v in inputs.values() for i in v])}

        def span_of_statistics(statistics_id: int) -> int:
            spans = [examples[i].custom_properties["span"].int_value for i in inputs.get(producers.get(statistics_id), [])
                     if i in examples and "span" in examples[i].custom_properties]
            return max(spans, default=-1)

        current = max(span_of_statistics(n.id) for n in newest)
        blocked = blocked_spans(input_dict.get("drift_reports"))
        older = [(span_of_statistics(s.id), s.id, s) for s in candidates]
        older = [item for item in older if 0 <= item[0] < current and item[0] not in blocked]
        if older:
            result["statistics"] = [max(older, key=lambda item: (item[0], item[1]))[2]]
        return result
