"""Input resolution strategies for the DAG."""
from __future__ import annotations

from tfx.dsl.input_resolution.strategies.latest_blessed_model_strategy import LatestBlessedModelStrategy


class PreviousBlessedModelStrategy(LatestBlessedModelStrategy):
    """The latest blessed Model other than the candidate, the newest Model the Trainer produced.

    Wired after the Trainer: the candidate is never its own baseline, and when the Trainer was cached the
    baseline stays what it was, so the Evaluator (and everything after it) is cached too.
    """

    def _resolve(self, input_dict, model_channel_key, model_blessing_channel_key):
        models = sorted(input_dict[model_channel_key], key=lambda artifact: artifact.id)
        earlier = {**input_dict, model_channel_key: models[:-1]}
        return super()._resolve(earlier, model_channel_key, model_blessing_channel_key)
