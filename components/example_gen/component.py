"""The pipeline's ExampleGen: TFX's FileBasedExampleGen (its driver resolves the newest `span-{SPAN}` and
fingerprints it, so an unchanged span is cached) with an executor that imports the span's shards as they are."""
from __future__ import annotations

from tfx.components.example_gen.component import FileBasedExampleGen
from tfx.dsl.components.base import executor_spec

from conveyor_ml.components.example_gen import executor


class SpanExampleGen(FileBasedExampleGen):
    """Examples of the newest span under `input_base`; `input_config` names each split's `span-{SPAN}/…` files."""

    EXECUTOR_SPEC = executor_spec.BeamExecutorSpec(executor.Executor)
