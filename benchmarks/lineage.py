"""`conveyor lineage | models | runs` on a store holding 200 pipeline runs, each of which trained, evaluated,
quantized and pushed a model: the whole CLI process timed, as a user waits for it.

The store is generated with the MLMD API in the shape TFX and Conveyor record (contexts per pipeline, run
and node; typed artifacts and executions; events with their input/output keys), because 200 real runs
would take hours. Run: make bench (or .venv/bin/python -m benchmarks.lineage).
"""
from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from benchmarks.common import spread, write_results

NODES = ["ImportExampleGen", "StatisticsGen", "ExampleValidator", "Trainer", "Evaluator", "InfraValidator",
         "Quantizer", "ServingPusher"]


def generate_store(path: Path, pipeline: str, runs: int) -> None:
    from ml_metadata.metadata_store import metadata_store
    from ml_metadata.proto import metadata_store_pb2 as pb

    from conveyor_ml.components.artifacts import Deployment, QuantizedModel

    config = pb.ConnectionConfig()
    config.sqlite.filename_uri = str(path)
    store = metadata_store.MetadataStore(config)
    artifact_types = {name: store.put_artifact_type(pb.ArtifactType(name=name)) for name in (
        "Examples", "ExampleStatistics", "ExampleAnomalies", "Schema", "Model", "ModelRun", "ModelEvaluation",
        "ModelBlessing", "InfraBlessing", "PushedModel")}
    for artifact_class in (Deployment, QuantizedModel):
        artifact_types[artifact_class.TYPE_NAME] = store.put_artifact_type(artifact_class().artifact_type)
    execution_types = {node: store.put_execution_type(pb.ExecutionType(name=f"bench.{node}")) for node in NODES}
    context_types = {name: store.put_context_type(pb.ContextType(name=name)) for name in ("pipeline", "pipeline_run", "node")}
    [pipeline_context] = store.get_contexts_by_id(
        store.put_contexts([pb.Context(type_id=context_types["pipeline"], name=pipeline)]))
    node_contexts = dict(zip(NODES, store.get_contexts_by_id(store.put_contexts(
        [pb.Context(type_id=context_types["node"], name=f"{pipeline}.{n}") for n in NODES]))))
    writer = _RunWriter(store, artifact_types, execution_types, [pipeline_context], node_contexts)
    previous_deployment = None
    for run in range(1, runs + 1):
        [run_context] = store.get_contexts_by_id(store.put_contexts(
            [pb.Context(type_id=context_types["pipeline_run"], name=f"bench-run-{run:04d}")]))
        writer.start_run(run, run_context)
        artifact, execute = writer.artifact, writer.execute
        made: dict[str, list[int]] = {}
        made.update(execute("ImportExampleGen", {}, {"examples": [artifact("Examples", span=run)]}))
        made.update(execute("StatisticsGen", {"examples": made["examples"]},
                            {"statistics": [artifact("ExampleStatistics")]}))
        made.update(execute("ExampleValidator", {"statistics": made["statistics"]},
                            {"anomalies": [artifact("ExampleAnomalies")]}))
        made.update(execute("Trainer", {"examples": made["examples"]},
                            {"model": [artifact("Model", steps=600, strategy="mirrored", replicas=1,
                                                eval_accuracy=0.97)], "model_run": [artifact("ModelRun")]}))
        [model] = made["model"]
        made.update(execute("Evaluator", {"model": made["model"], "examples": made["examples"]},
                            {"evaluation": [artifact("ModelEvaluation", accuracy=0.97)],
                             "blessing": [artifact("ModelBlessing", blessed=1, current_model_id=model)]}))
        made.update(execute("InfraValidator", {"model": made["model"]},
                            {"blessing": [artifact("InfraBlessing", blessed=1)]}))
        made.update(execute("Quantizer", {"model": made["model"]}, {"quantized_models": [
            artifact(QuantizedModel.TYPE_NAME, variant=v, size_bytes=20000, accuracy=0.97, blessed=1)
            for v in ("float32", "float16", "dynamic_range", "int8")]}))
        deployments = [artifact(Deployment.TYPE_NAME, model_name="mnist", version=str(run), label="stable",
                                traffic_percent=100, release_state="live", target="local")]
        if previous_deployment:
            deployments.append(artifact(Deployment.TYPE_NAME, model_name="mnist", version=str(run - 1), label="",
                                        traffic_percent=0, release_state="retired", target="local"))
        made.update(execute("ServingPusher", {"model": made["model"]}, {
            "pushed_model": [artifact("PushedModel", pushed=1, pushed_version=str(run))], "deployment": deployments}))
        previous_deployment = made["deployment"]


class _RunWriter:
    """Writes artifacts and executions of one run the way TFX links them."""

    def __init__(self, store, artifact_types: dict, execution_types: dict, contexts: list, node_contexts: dict):
        self.store, self.artifact_types, self.execution_types = store, artifact_types, execution_types
        self.contexts, self.node_contexts = contexts, node_contexts
        self.run, self.run_context = 0, None

    def start_run(self, run: int, run_context) -> None:
        self.run, self.run_context = run, run_context

    def artifact(self, type_name: str, **values):
        from ml_metadata.proto import metadata_store_pb2 as pb

        item = pb.Artifact(type_id=self.artifact_types[type_name], uri=f"/bench/{type_name}/{self.run}",
                           state=pb.Artifact.LIVE)
        for key, value in values.items():
            target = item.custom_properties[key]
            if isinstance(value, str):
                target.string_value = value
            elif isinstance(value, float):
                target.double_value = value
            else:
                target.int_value = value
        return item

    def execute(self, node: str, inputs: dict[str, list[int]], outputs: dict[str, list]) -> dict[str, list[int]]:
        from ml_metadata.proto import metadata_store_pb2 as pb

        execution = pb.Execution(type_id=self.execution_types[node], last_known_state=pb.Execution.COMPLETE)
        pairs = []
        for key, ids in inputs.items():
            for existing in self.store.get_artifacts_by_id(ids):
                event = pb.Event(type=pb.Event.INPUT)
                event.path.steps.add().key = key
                pairs.append((existing, event))
        for key, items in outputs.items():
            for item in items:
                event = pb.Event(type=pb.Event.OUTPUT)
                event.path.steps.add().key = key
                pairs.append((item, event))
        _, artifact_ids, _ = self.store.put_execution(
            execution, pairs, [*self.contexts, self.run_context, self.node_contexts[node]])
        ids = artifact_ids[sum(len(v) for v in inputs.values()):]
        result, position = {}, 0
        for key, items in outputs.items():
            result[key] = ids[position:position + len(items)]
            position += len(items)
        return result


def timed(argv: list[str], repeats: int) -> dict:
    seconds = []
    for _ in range(repeats):
        started = time.perf_counter()
        result = subprocess.run(argv, capture_output=True, text=True)
        seconds.append(time.perf_counter() - started)
        if result.returncode != 0:
            raise RuntimeError(f"{' '.join(argv)} failed: {result.stderr}")
    return spread(seconds)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--runs", type=int, default=200)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as scratch:
        store_path = Path(scratch) / "metadata.sqlite"
        started = time.perf_counter()
        generate_store(store_path, "mnist", args.runs)
        generated = time.perf_counter() - started
        spec = Path(scratch) / "spec.yaml"
        root = Path(__file__).resolve().parent.parent
        spec.write_text(f"extends: {root / 'pipelines' / 'mnist.yaml'}\nworkspace: {scratch}\n"
                        f"data:\n  schema: {root / 'schemas' / 'mnist' / 'schema.pbtxt'}\n"
                        f"metadata:\n  sqlite: {store_path}\n")
        cli = [sys.executable, "-m", "conveyor_ml.cli"]
        figures = {
            "conveyor lineage mnist (newest version)": timed([*cli, "lineage", "mnist", "--spec", str(spec)], args.repeats),
            "conveyor lineage mnist --version 100 --format json": timed(
                [*cli, "lineage", "mnist", "--version", "100", "--format", "json", "--spec", str(spec)], args.repeats),
            "conveyor lineage mnist --format html": timed(
                [*cli, "lineage", "mnist", "--format", "html", "-o", str(Path(scratch) / "l.html"), "--spec", str(spec)],
                args.repeats),
            "conveyor models mnist --format json": timed([*cli, "models", "mnist", "--format", "json", "--spec", str(spec)],
                                                         args.repeats),
            "conveyor runs --format json": timed([*cli, "runs", "--format", "json", "--spec", str(spec)], args.repeats),
        }
    rows = "\n".join(f"| `{command}` | {f['median']:.2f} s | {f['min']:.2f}–{f['max']:.2f} s |"
                     for command, f in figures.items())
    markdown = (f"# Lineage query benchmark\n\nA generated store of {args.runs} pipeline runs (each: a new span, "
                f"model, evaluation, 4 TFLite variants, a push; generated in {generated:.1f} s). Whole CLI process "
                f"wall time, Python start-up included; {args.repeats} runs each.\n\n"
                "| command | median | min–max |\n|---|---|---|\n" + rows + "\n\nTarget: `conveyor lineage` under 2 s.\n")
    write_results("lineage", {"runs": args.runs, "figures": figures}, markdown)
    print(markdown)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
