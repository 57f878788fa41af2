"""StatisticsGen: TFX's component (same inputs, outputs and node), whose executor adds pixel statistics
computed from the compact `image_raw` bytes."""
from __future__ import annotations

from tfx.components.statistics_gen.component import StatisticsGen as TfxStatisticsGen
from tfx.dsl.components.base import executor_spec

from conveyor_ml.components.statistics_gen import executor


class StatisticsGen(TfxStatisticsGen):
    EXECUTOR_SPEC = executor_spec.BeamExecutorSpec(executor.Executor)
