"""The summary printed after `conveyor run`: what was trained, evaluated, pushed, and where to look."""
from __future__ import annotations

from pathlib import Path

from pipelines import metadata
from pipelines.runner import RunResult
from pipelines.spec import PipelineSpec
from pipelines.workspace import workspace_paths


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


def run_artifacts(store, run_id: str) -> dict[str, list]:
    """Artifacts a run produced or reused (cached), keyed by type name."""
    context = store.get_context_by_type_and_name("pipeline_run", run_id)
    if context is None:
        return {}
    by_type: dict[str, list] = {}
    types = {t.id: t.name for t in store.get_artifact_types()}
    for artifact in store.get_artifacts_by_context(context.id):
        by_type.setdefault(types.get(artifact.type_id, "?"), []).append(artifact)
    return by_type


def _custom(artifact, key: str, default=None):
    if key not in artifact.custom_properties:
        return default
    value = artifact.custom_properties[key]
    return getattr(value, value.WhichOneof("value")) if value.WhichOneof("value") else default


def summary_lines(spec: PipelineSpec, result: RunResult) -> list[str]:
    counts: dict[str, int] = {}
    for outcome in result.outcomes:
        counts[outcome.state] = counts.get(outcome.state, 0) + 1
    states = ", ".join(f"{n} {state}" for state, n in sorted(counts.items()))
    lines = [f"conveyor: run {result.run_id} finished in {result.seconds:.1f}s ({states})"]
    store = metadata.open_store(spec.metadata)
    artifacts = run_artifacts(store, result.run_id)

    for report in artifacts.get("conveyor.DataDriftReport", [])[-1:]:
        lines.append(f"  drift:     {_custom(report, 'verdict')} ({_custom(report, 'reason')})")
    for model in artifacts.get("Model", [])[-1:]:
        facts = {k: _custom(model, k) for k in ("strategy", "replicas", "steps", "examples_per_second")}
        if facts["steps"]:
            lines.append(f"  trained:   {facts['steps']} steps, strategy {facts['strategy']} x{facts['replicas']} "
                         f"replicas, {facts['examples_per_second']} examples/s")
    evaluator = spec.components.evaluator
    for evaluation in artifacts.get("ModelEvaluation", [])[-1:]:
        # The runner copied the headline metric onto the artifact (record_headline_metrics); parse TFMA only
        # for an evaluation that missed that.
        accuracy = _custom(evaluation, "accuracy")
        if accuracy is None:
            accuracy = evaluation_accuracy(evaluation.uri)
        blessings = artifacts.get("ModelBlessing", [])
        blessed = bool(blessings and _custom(blessings[-1], "blessed"))
        if accuracy is not None and evaluator:
            lines.append(f"  evaluated: accuracy {accuracy:.4f} (threshold {evaluator.min_accuracy}) -> "
                         f"{'blessed' if blessed else 'NOT blessed'}")
    for quantization in artifacts.get("conveyor.QuantizationReport", [])[-1:]:
        table = Path(quantization.uri) / "report.md"
        if table.is_file():
            lines.append("  quantized:")
            lines += ["    " + line for line in table.read_text().splitlines() if line.startswith("|")]
    pushes = artifacts.get("PushedModel", [])
    if pushes:
        push = pushes[-1]
        if _custom(push, "pushed"):
            lines.append(f"  pushed:    version {_custom(push, 'pushed_version')} -> "
                         f"{_custom(push, 'pushed_destination')}")
        else:
            lines.append("  pushed:    nothing (the model was not blessed, or this run reused a cached push)")
    for model_run in artifacts.get("ModelRun", [])[-1:]:
        lines.append(f"  training curves: tensorboard --logdir {model_run.uri}")
    for name, path in workspace_paths(spec).items():
        lines.append(f"  {name + ':':15s}{path}")
    return lines


def print_summary(spec: PipelineSpec, result: RunResult) -> None:
    for line in summary_lines(spec, result):
        print(line, flush=True)
