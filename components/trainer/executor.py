"""Trainer executor: checks its inputs, runs training in child processes, records the facts in MLMD."""
from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import tempfile
import threading
from collections import deque
from pathlib import Path
from typing import Any

from tfx.dsl.components.base import base_executor
from tfx.types import artifact_utils
from tfx.utils import io_utils, path_utils

from conveyor_ml.base.errors import ConveyorError
from conveyor_ml.base.names import DRIFT_BLOCKED, IMAGE_KEY, LABEL_KEY
from conveyor_ml.base.native_output import is_native_noise
from conveyor_ml.base.ports import free_port
from conveyor_ml.base.process_lifetime import child_environment, owned_scratch_prefix, remove_orphaned_scratch
from conveyor_ml.base.spec import STRATEGIES, TrainerSettings
from conveyor_ml.components import split_reader
from conveyor_ml.components.artifacts import recorded_value, set_custom_properties, span_of
from conveyor_ml.components.parameters import list_parameter, settings_from
from conveyor_ml.components.trainer.parameters import PARAMETER_NAMES
from conveyor_ml.components.trainer.training import ERROR_PREFIX, TrainingJob, parse_tf_config

log = logging.getLogger(__name__)
SCRATCH_PREFIX = "conveyor-train-"  # the trainers' job files and facts, in the temporary directory


class Executor(base_executor.BaseExecutor):
    def Do(self, input_dict: dict[str, list], output_dict: dict[str, list], exec_properties: dict[str, Any]) -> None:
        examples = sorted(input_dict["examples"], key=lambda a: (span_of(a), a.id or 0))
        refuse_anomalous_data(input_dict.get("example_anomalies") or [], span_of(examples[-1]))
        refuse_blocked_drift(input_dict.get("drift_report") or [])
        settings = settings_from(TrainerSettings, exec_properties, PARAMETER_NAMES)
        check_parameters(settings)
        check_schema(input_dict["schema"])
        model = artifact_utils.get_single_instance(output_dict["model"])
        model_run = artifact_utils.get_single_instance(output_dict["model_run"])
        base_model = input_dict.get("base_model") or []
        warm_start_from = None
        if settings.warm_start and base_model:
            warm_start_from = path_utils.serving_model_path(base_model[-1].uri)

        job = TrainingJob(
            # Train on every span in the window; evaluate on the newest span's eval split.
            train_files=[f for artifact in examples for f in split_files(artifact, "train")],
            eval_files=split_files(examples[-1], "eval"),
            image_shape=tuple(list_parameter(exec_properties, "image_shape")),
            serving_model_dir=path_utils.serving_model_dir(model.uri),
            log_dir=model_run.uri,
            facts_path="",
            settings=settings,
            warm_start_from=warm_start_from,
            train_examples=_total([recorded_value(a, "examples_train") for a in examples]),
            eval_examples=recorded_value(examples[-1], "examples_eval"),
        )
        worker_facts = run_training(job)
        chief = next(f for f in worker_facts if f["is_chief"])
        set_custom_properties(model, {**chief, "worker_steps": ",".join(str(f["steps"]) for f in worker_facts),
                                      "spans": ",".join(str(span_of(a)) for a in examples)})
        set_custom_properties(model_run, {"tensorboard_logdir": model_run.uri, "steps": chief["steps"],
                                          "wall_time_s": chief["wall_time_s"]})


def _total(counts: list) -> int | None:
    """The sum of known counts; None when any is unknown (Examples imported before spans recorded them)."""
    return None if any(c is None for c in counts) else int(sum(counts))


def refuse_anomalous_data(anomalies: list, span: int) -> None:
    """ExampleValidator marks each split blessed (1) or not (0); training on flagged data is refused."""
    for artifact in anomalies:
        verdicts = dict(artifact.get_json_value_custom_property("blessed") or {})
        flagged = sorted(split for split, blessed in verdicts.items() if not blessed)
        if flagged:
            found = anomaly_descriptions(artifact, flagged[0])
            raise ConveyorError(
                f"data anomalies in span {span} (split {', '.join(flagged)}): {'; '.join(found)}. "
                f"The run stops before training; details in {artifact.uri}")


def refuse_blocked_drift(reports: list) -> None:
    """The drift gate's `block` policy: the run stops here, before any training."""
    for report in reports:
        if recorded_value(report, "verdict") == DRIFT_BLOCKED:
            raise ConveyorError(f"data drift in span {recorded_value(report, 'span')} ({recorded_value(report, 'reason')}): "
                                f"data.drift.policy is block, so the run stops before training; "
                                f"details in {report.uri}")


def anomaly_descriptions(anomalies_artifact, split: str) -> list[str]:
    """'feature: description' for each anomaly ExampleValidator wrote for one split."""
    from tensorflow_metadata.proto.v0 import anomalies_pb2

    path = Path(artifact_utils.get_split_uri([anomalies_artifact], split)) / "SchemaDiff.pb"
    found = anomalies_pb2.Anomalies.FromString(path.read_bytes())
    return [f"{name}: {info.description or info.short_description}"
            for name, info in sorted(found.anomaly_info.items())] or ["dataset-level anomaly"]


def check_parameters(settings: TrainerSettings) -> None:
    """The executor may run without a validated spec (called directly, or on Kubeflow): check what it relies on."""
    if settings.strategy not in STRATEGIES:
        raise ConveyorError(f"trainer.strategy: unknown strategy {settings.strategy!r} (use {', '.join(STRATEGIES)})")
    if settings.cpu_replicas < 1:
        raise ConveyorError("trainer.cpu_replicas: must be >= 1")
    if settings.strategy == "multi_worker" and "TF_CONFIG" in os.environ:
        parse_tf_config(os.environ["TF_CONFIG"])


def check_schema(schema_artifacts: list) -> None:
    schema_dir = artifact_utils.get_single_uri(schema_artifacts)
    schema = io_utils.SchemaReader().read(io_utils.get_only_uri_in_dir(schema_dir))
    names = {feature.name for feature in schema.feature}
    for needed in (LABEL_KEY, IMAGE_KEY):
        if needed not in names:
            raise ConveyorError(f"schema: no '{needed}' feature (the trainer needs '{IMAGE_KEY}' and '{LABEL_KEY}')")


def split_files(examples, split: str) -> list[str]:
    files = split_reader.split_files(examples, split)
    if not files:
        raise ConveyorError(f"examples: split '{split}' of span {span_of(examples)} is empty "
                            f"({artifact_utils.get_split_uri([examples], split)})")
    return files


def run_training(job: TrainingJob) -> list[dict]:
    """Runs training in child processes and returns each worker's facts, the chief's first.

    multi_worker with TF_CONFIG set: this process is one task of an external cluster, one child.
    multi_worker without it: `settings.num_workers` local processes form a cluster on 127.0.0.1.
    """
    # The job files and facts are only for these children: the directory goes with them, whatever happens
    # short of a kill; the next training removes what a killed one left.
    remove_orphaned_scratch(SCRATCH_PREFIX)
    with tempfile.TemporaryDirectory(prefix=owned_scratch_prefix(SCRATCH_PREFIX)) as scratch:
        workdir = Path(scratch)
        if job.settings.strategy == "multi_worker" and "TF_CONFIG" not in os.environ:
            workers = job.settings.num_workers
            cluster = {"worker": [f"127.0.0.1:{free_port()}" for _ in range(workers)]}
            tf_configs = [json.dumps({"cluster": cluster, "task": {"type": "worker", "index": i}})
                          for i in range(workers)]
        else:
            tf_configs = [os.environ.get("TF_CONFIG")]
        processes = []
        for index, tf_config in enumerate(tf_configs):
            job.facts_path = str(workdir / f"facts-{index}.json")
            job_file = workdir / f"job-{index}.json"
            job.save(job_file)
            env = {**os.environ, "TF_USE_LEGACY_KERAS": "1", "PYTHONWARNINGS": "ignore", "TF_CPP_MIN_LOG_LEVEL": "2",
                   **child_environment()}
            if tf_config:
                env["TF_CONFIG"] = tf_config
            name = f"worker-{index}" if len(tf_configs) > 1 else "trainer"
            processes.append(_ChildProcess(name, [sys.executable, "-c", _RUN_IGNORING_CTRL_C,
                                                  "conveyor_ml.components.trainer.training", str(job_file)], env))
        failed = _wait_all(processes)
        if failed:
            errors = [line[len(ERROR_PREFIX):] for line in failed.tail if line.startswith(ERROR_PREFIX)]
            if errors:
                raise ConveyorError(errors[-1])
            raise RuntimeError(f"training process {failed.name} exited with {failed.returncode}:\n" + "\n".join(failed.tail))
        facts = [json.loads((workdir / f"facts-{i}.json").read_text()) for i in range(len(tf_configs))]
        return sorted(facts, key=lambda f: not f["is_chief"])


# `python -m MODULE ARGS...` with Ctrl-C ignored from the first instruction: a terminal's Ctrl-C reaches the
# whole process group, and each trainer printed a KeyboardInterrupt traceback from wherever its imports were;
# the executor, interrupted too (or terminated), kills its children (_wait_all). An ignored SIGINT stays
# ignored in Python. A killed executor cannot: the kernel then kills them (die_with_parent).
_RUN_IGNORING_CTRL_C = ("import runpy, signal, sys; signal.signal(signal.SIGINT, signal.SIG_IGN); "
                        "from conveyor_ml.base.process_lifetime import die_with_parent; "
                        "die_with_parent(signal.SIGKILL); "
                        "sys.argv = sys.argv[1:]; runpy.run_module(sys.argv[0], run_name='__main__', alter_sys=True)")


class _ChildProcess:
    """A child whose output is forwarded line by line with a prefix; the last lines are kept for errors."""

    def __init__(self, name: str, argv: list[str], env: dict):
        self.name = name
        self.tail: deque[str] = deque(maxlen=40)
        self.process = subprocess.Popen(argv, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        self.reader = threading.Thread(target=self._forward, daemon=True)
        self.reader.start()

    def _forward(self) -> None:
        for line in self.process.stdout:
            line = line.rstrip()
            self.tail.append(line)
            if not line.startswith(ERROR_PREFIX) and not is_native_noise(line):
                log.info("[%s] %s", self.name, line)

    @property
    def returncode(self) -> int | None:
        return self.process.returncode


def _wait_all(children: list[_ChildProcess]) -> _ChildProcess | None:
    """Waits for every child; the first failure stops the others (a cluster cannot finish without it)."""
    pending = list(children)
    try:
        while pending:
            for child in list(pending):
                try:
                    child.process.wait(timeout=0.2)
                except subprocess.TimeoutExpired:
                    continue
                child.reader.join()
                pending.remove(child)
                if child.returncode != 0:
                    return child
        return None
    finally:
        for child in pending:
            child.process.kill()
            child.process.wait()
