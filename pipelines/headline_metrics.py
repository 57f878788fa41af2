"""The Evaluator's headline accuracy, read once from TFMA's output and kept on the ModelEvaluation artifact, so
lineage, summaries and monitors answer from MLMD alone."""
from __future__ import annotations

from ml_metadata import errors as mlmd_errors

from conveyor_ml.base.names import PIPELINE_RUN_CONTEXT
from conveyor_ml.base.spec import PipelineSpec
from conveyor_ml.metadata import store as metadata


def evaluation_accuracy(evaluation_uri: str) -> float | None:
    """Overall sparse categorical accuracy from a TFMA ModelEvaluation directory."""
    import tensorflow_model_analysis as tfma

    try:
        for metrics_for_slice in tfma.load_metrics(evaluation_uri):
            if metrics_for_slice.slice_key.single_slice_keys:
                continue
            for key_and_value in metrics_for_slice.metric_keys_and_values:
                if key_and_value.key.name == "sparse_categorical_accuracy" and not key_and_value.key.is_diff:
                    return key_and_value.value.double_value.value
    except (OSError, ValueError):
        return None
    return None


def record_headline_metrics(spec: PipelineSpec, run_id: str) -> None:
    """Copies the Evaluator's overall accuracy onto its ModelEvaluation artifact as a custom property, so
    lineage queries answer from MLMD alone instead of loading TFMA to parse metrics files."""
    if not metadata.store_exists(spec.metadata):
        return
    store = metadata.open_store(spec.metadata)
    context = store.get_context_by_type_and_name(PIPELINE_RUN_CONTEXT, run_id)
    try:
        evaluation_type = store.get_artifact_type("ModelEvaluation")
    except mlmd_errors.NotFoundError:  # no Evaluator in this pipeline
        return
    if context is None:
        return
    updated = []
    for artifact in store.get_artifacts_by_context(context.id):
        if artifact.type_id == evaluation_type.id and "accuracy" not in artifact.custom_properties:
            accuracy = evaluation_accuracy(artifact.uri)
            if accuracy is not None:
                artifact.custom_properties["accuracy"].double_value = accuracy
                updated.append(artifact)
    if updated:
        store.put_artifacts(updated)
