"""Input resolution strategies for the DAG."""
from __future__ import annotations

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
