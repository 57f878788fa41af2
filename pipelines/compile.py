"""`conveyor compile`: the same DAG as a Kubeflow Pipelines v2 / Vertex AI Pipelines job spec."""
from __future__ import annotations

import json
from pathlib import Path

from conveyor_ml.base.errors import ConveyorError
from conveyor_ml.base.spec import PipelineSpec
from conveyor_ml.pipelines.beam_dependencies import beam_option


def compile_pipeline(spec: PipelineSpec, output: Path) -> dict:
    from tfx import v1 as tfx
    from tfx.orchestration.kubeflow.v2 import kubeflow_v2_dag_runner

    from conveyor_ml.pipelines.builder import build_components

    if output.suffix != ".json":
        raise ConveyorError(f"-o {output}: the compiled pipeline is JSON; name a .json file")
    check_worker_image(spec)
    pipeline = tfx.dsl.Pipeline(pipeline_name=spec.name, pipeline_root=spec.kubeflow.pipeline_root,
                                components=build_components(spec, portable=True),
                                beam_pipeline_args=list(spec.beam.args), enable_cache=True)
    config = kubeflow_v2_dag_runner.KubeflowV2DagRunnerConfig(display_name=spec.name,
                                                                default_image=spec.kubeflow.image)
    output.parent.mkdir(parents=True, exist_ok=True)
    runner = kubeflow_v2_dag_runner.KubeflowV2DagRunner(config=config, output_dir=str(output.parent),
                                                        output_filename=output.name)
    runner.run(pipeline, write_out=True)
    return json.loads(output.read_text())


def check_worker_image(spec: PipelineSpec) -> None:
    """Dataflow workers run the data steps' code in `--sdk_container_image`, the pipeline's steps run in
    `kubeflow.image`: both must be the image `make image` built, or the two halves run different code."""
    args = tuple(spec.beam.args)
    if beam_option(args, "runner") not in ("DataflowRunner", "dataflow"):
        return
    image = beam_option(args, "sdk_container_image")
    if image is None and beam_option(args, "setup_file") is None:
        raise ConveyorError("beam.args: the DataflowRunner's workers need Conveyor installed: add "
                            f"--sdk_container_image={spec.kubeflow.image} (the image `make image` builds)")
    if image is not None and image != spec.kubeflow.image:
        raise ConveyorError(f"beam.args: --sdk_container_image={image} differs from kubeflow.image "
                            f"{spec.kubeflow.image}; Dataflow workers and pipeline steps must run the same image")


def schedule_hint(spec: PipelineSpec, output: Path, target: str) -> str | None:
    if not spec.schedule.cron:
        return None
    if target == "vertex":
        return ("schedule it on Vertex AI Pipelines:\n  python -c \"from google.cloud import aiplatform; "
                f"aiplatform.init(project='PROJECT', location='REGION'); aiplatform.PipelineJob("
                f"display_name='{spec.name}', template_path='{output}', pipeline_root='{spec.kubeflow.pipeline_root}')"
                f".create_schedule(cron='{spec.schedule.cron}', display_name='{spec.name}-schedule')\"")
    return (f"schedule it on Kubeflow Pipelines: kfp recurring-run create --experiment-name {spec.name} "
            f"--job-name {spec.name} --cron-expression '0 {spec.schedule.cron}' --pipeline-package-path {output}")
