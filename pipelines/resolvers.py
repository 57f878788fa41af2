"""Input resolution strategies for the DAG."""
from __future__ import annotations

from collections import defaultdict

from tfx.dsl.components.common import resolver

BLESSED, CURRENT_MODEL_ID = "blessed", "current_model_id"  # the Evaluator's ModelBlessing properties


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


def _span(artifact) -> int:
    return artifact.get_int_custom_property("span")


class SpanWindowStrategy(resolver.ResolverStrategy):
    """The latest `window` spans up to the newest one: one Examples artifact per span (the newest import).

    Inputs: `newest` (ImportExampleGen's output in this run, which also orders the resolver after it) and
    `examples` (every Examples artifact the pipeline recorded)."""

    def __init__(self, window: int = 1):
        self.window = window

    def resolve_artifacts(self, store, input_dict):
        newest = input_dict.get("newest") or []
        if not newest:
            return {"newest": [], "examples": []}
        last = max(_span(a) for a in newest)
        by_span = {}
        for artifact in list(input_dict.get("examples") or []) + list(newest):
            span = _span(artifact)
            if last - self.window < span <= last and (span not in by_span or artifact.id > by_span[span].id):
                by_span[span] = artifact
        return {"newest": list(newest), "examples": [by_span[s] for s in sorted(by_span)]}


class PreviousSpanStatisticsStrategy(resolver.ResolverStrategy):
    """The statistics of the newest span older than this run's: the drift gate's baseline.

    Statistics carry no span themselves; it is read from the Examples their StatisticsGen execution consumed."""

    def resolve_artifacts(self, store, input_dict):
        from ml_metadata.proto import metadata_store_pb2 as pb

        newest = input_dict.get("newest") or []
        result = {"newest": list(newest), "statistics": []}
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
        older = [(span_of_statistics(s.id), s.id, s) for s in candidates]
        older = [item for item in older if 0 <= item[0] < current]
        if older:
            result["statistics"] = [max(older, key=lambda item: (item[0], item[1]))[2]]
        return result
