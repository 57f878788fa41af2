"""The summary printed after `conveyor run`: what was trained, evaluated, pushed, and where to look."""
from __future__ import annotations

from pathlib import Path

from conveyor_ml.base.names import DATA_DRIFT_REPORT_TYPE, PIPELINE_RUN_CONTEXT, QUANTIZATION_REPORT_TYPE
from conveyor_ml.base.spec import PipelineSpec
from conveyor_ml.metadata import store as metadata
from conveyor_ml.metadata.values import props
from conveyor_ml.pipelines.headline_metrics import evaluation_accuracy
from conveyor_ml.pipelines.run_result import RunResult
from conveyor_ml.pipelines.workspace import workspace_paths


def run_artifacts(store, run_id: str) -> dict[str, list]:
    """Artifacts a run produced or reused (cached), keyed by type name."""
    context = store.get_context_by_type_and_name(PIPELINE_RUN_CONTEXT, run_id)
    if context is None:
        return {}
    by_type: dict[str, list] = {}
    types = {t.id: t.name for t in store.get_artifact_types()}
    for artifact in store.get_artifacts_by_context(context.id):
        by_type.setdefault(types.get(artifact.type_id, "?"), []).append(artifact)
    return by_type


def summary_lines(spec: PipelineSpec, result: RunResult) -> list[str]:
    counts: dict[str, int] = {}
    for outcome in result.outcomes:
        counts[outcome.state] = counts.get(outcome.state, 0) + 1
    states = ", ".join(f"{n} {state}" for state, n in sorted(counts.items()))
    lines = [f"conveyor: run {result.run_id} finished in {result.seconds:.1f}s ({states})"]
    store = metadata.open_store(spec.metadata)
    artifacts = run_artifacts(store, result.run_id)

    for report in artifacts.get(DATA_DRIFT_REPORT_TYPE, [])[-1:]:
        lines.append(f"  drift:     {props(report).get('verdict')} ({props(report).get('reason')})")
    for model in artifacts.get("Model", [])[-1:]:
        facts = {k: props(model).get(k) for k in ("strategy", "replicas", "steps", "examples_per_second")}
        if facts["steps"]:
            lines.append(f"  trained:   {facts['steps']} steps, strategy {facts['strategy']} x{facts['replicas']} "
                         f"replicas, {facts['examples_per_second']} examples/s")
    evaluator = spec.components.evaluator
    for evaluation in artifacts.get("ModelEvaluation", [])[-1:]:
        # The runner copied the headline metric onto the artifact (record_headline_metrics); parse TFMA only
        # for an evaluation that missed that.
        accuracy = props(evaluation).get("accuracy")
        if accuracy is None:
            accuracy = evaluation_accuracy(evaluation.uri)
        blessings = artifacts.get("ModelBlessing", [])
        blessed = bool(blessings and props(blessings[-1]).get("blessed"))
        verdict = "blessed" if blessed else "NOT blessed"
        reason = props(evaluation).get("reason")
        if reason:  # the Evaluator's decision, with the eval set, the test and its p-value
            lines.append(f"  evaluated: {verdict} — {reason}")
        elif accuracy is not None and evaluator:
            lines.append(f"  evaluated: accuracy {accuracy:.4f} (threshold {evaluator.min_accuracy}) -> {verdict}")
    for quantization in artifacts.get(QUANTIZATION_REPORT_TYPE, [])[-1:]:
        table = Path(quantization.uri) / "report.md"
        if table.is_file():
            lines.append("  quantized:")
            lines += ["    " + line for line in table.read_text().splitlines() if line.startswith("|")]
    pushes = artifacts.get("PushedModel", [])
    if pushes:
        push = pushes[-1]
        if props(push).get("pushed"):
            lines.append(f"  pushed:    version {props(push).get('pushed_version')} -> "
                         f"{props(push).get('pushed_destination')}")
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
