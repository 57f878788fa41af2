"""`conveyor compile`: the spec's DAG as a Kubeflow Pipelines v2 / Vertex AI Pipelines job."""
from __future__ import annotations

import json

from tests.conftest import run_conveyor, write_spec


def test_compile_keeps_every_component_its_dependencies_and_parameters(tmp_path):
    gcp = {"project": "my-project", "region": "europe-west4", "bucket": "my-models", "dry_run": True}
    spec = write_spec(tmp_path, **{"components.gcp_pusher": gcp,
        "kubeflow": {"image": "europe-docker.pkg.dev/p/conveyor/conveyor:1", "pipeline_root": "gs://b/root"},
        "schedule": {"cron": "0 3 * * *"}, "components.trainer.train_steps": 321})
    output = tmp_path / "out" / "pipeline.json"
    result = run_conveyor("compile", spec, "--target", "vertex", "-o", output)
    assert result.returncode == 0, result.stderr
    assert "create_schedule(cron='0 3 * * *'" in result.stdout
    job = json.loads(output.read_text())
    tasks = job["pipelineSpec"]["root"]["dag"]["tasks"]
    assert {"ImportExampleGen", "ImportSchemaGen", "StatisticsGen", "ExampleValidator", "DriftGate", "Trainer",
            "Evaluator", "Quantizer", "GcpPusher"} <= set(tasks)
    assert "ServingPusher" not in tasks and "InfraValidator" not in tasks  # they need a local serving directory
    assert set(tasks["Trainer"]["dependentTasks"]) == {"ImportExampleGen", "ImportSchemaGen", "ExampleValidator",
                                                        "DriftGate"}
    assert set(tasks["GcpPusher"]["dependentTasks"]) == {"Trainer", "Evaluator", "Quantizer"}
    assert tasks["Trainer"]["inputs"]["parameters"]["train_steps"]["runtimeValue"]["constantValue"]["intValue"] == "321"
    executors = job["pipelineSpec"]["deploymentSpec"]["executors"]
    assert executors["Trainer_executor"]["container"]["image"] == "europe-docker.pkg.dev/p/conveyor/conveyor:1"
    assert job["runtimeConfig"]["gcsOutputDirectory"] == "gs://b/root"
    example_gen = tasks["ImportExampleGen"]["inputs"]["parameters"]["input_base"]["runtimeValue"]["constantValue"]
    assert example_gen["stringValue"] == "gs://b/root/data"


def test_compile_refuses_a_non_json_output(tmp_path):
    result = run_conveyor("compile", write_spec(tmp_path), "-o", tmp_path / "pipeline.yaml")
    assert result.returncode == 2 and "name a .json file" in result.stderr


def test_dataflow_workers_must_run_the_pipelines_image(tmp_path):
    from tests.conftest import ROOT

    spec = write_spec(tmp_path, base=ROOT / "pipelines" / "mnist-dataflow.yaml",
                      extends=str(ROOT / "pipelines" / "mnist.yaml"))
    output = tmp_path / "pipeline.json"
    result = run_conveyor("compile", spec, "--target", "vertex", "-o", output)
    assert result.returncode == 0, result.stderr
    job = json.loads(output.read_text())
    images = {e["container"]["image"] for e in job["pipelineSpec"]["deploymentSpec"]["executors"].values()
              if "container" in e}
    assert images == {"europe-docker.pkg.dev/my-project/conveyor/conveyor:0.1.0"}
    assert "--sdk_container_image=europe-docker.pkg.dev/my-project/conveyor/conveyor:0.1.0" in output.read_text()

    mismatch = write_spec(tmp_path, base=spec, name="other.yaml", **{"kubeflow.image": "gcr.io/p/other:2"})
    refused = run_conveyor("compile", mismatch, "--target", "vertex", "-o", output)
    assert refused.returncode == 2
    assert "differs from kubeflow.image gcr.io/p/other:2" in refused.stderr
