"""The workspace a spec names: checked before anything is written, its data initialised on first use, and
what a stopped run left in it settled by the next run ("What a stopped run leaves", below).

Light on imports on purpose: the CLI runs these checks before loading TFX, so a bad path fails in a moment.
"""
from __future__ import annotations

import os
import re
import shutil
from collections.abc import Callable
from pathlib import Path

from conveyor_ml.base.errors import ConveyorError
from conveyor_ml.base.names import NODE_CONTEXT, PIPELINE_CONTEXT, PIPELINE_RUN_CONTEXT
from conveyor_ml.base.process_lifetime import private_temporary_directory
from conveyor_ml.base.spec import PipelineSpec
from conveyor_ml.data import datasets

STATE_DIRECTORY = ".conveyor"  # under the workspace: the run lock, the scheduler's logs


def check_workspace(spec: PipelineSpec) -> None:
    """Fails early, before MLMD or the serving path is touched, if the workspace cannot be written or an input
    the run reads first cannot be read (the schema, the Beam runner)."""
    check_schema_file(spec.data.schema)
    check_beam_runner(tuple(spec.beam.args))
    workspace = spec.workspace
    if workspace.exists() and not workspace.is_dir():
        raise ConveyorError(f"workspace {workspace} is a file; set `workspace:` in the spec to a directory")
    try:
        workspace.mkdir(parents=True, exist_ok=True)
        probe = workspace / f".write-test-{os.getpid()}"
        probe.write_text("")
        probe.unlink()
    except OSError as exc:
        raise ConveyorError(f"workspace {workspace} is not writable ({exc.strerror}); "
                            "set `workspace:` in the spec to a directory you can write") from None
    state = workspace / STATE_DIRECTORY
    if state.exists() and not state.is_dir():
        raise ConveyorError(f"{state} is not a directory: Conveyor keeps the run lock and the scheduler's log "
                            "there; move it away")


def check_schema_file(path: Path) -> None:
    """data.schema must be a TensorFlow Metadata Schema in text format (ImportSchemaGen reads it mid-run, where a
    binary or malformed file was a 100-line traceback)."""
    from google.protobuf import text_format
    from tensorflow_metadata.proto.v0 import schema_pb2

    if not path.is_file():
        raise ConveyorError(f"data.schema: no such file: {path}")
    fix = "give a tensorflow_metadata Schema in text format (e.g. schemas/mnist/schema.pbtxt)"
    try:
        text_format.Parse(path.read_text(encoding="utf-8"), schema_pb2.Schema())
    except UnicodeDecodeError:
        raise ConveyorError(f"data.schema {path}: not a text file; {fix}") from None
    except text_format.ParseError as exc:
        raise ConveyorError(f"data.schema {path}: not a Schema: {' '.join(str(exc).split())[:300]}; {fix}") from None


def check_beam_runner(args: tuple[str, ...]) -> None:
    """A `--runner` in beam.args must be one Beam has (an unknown one failed after the run had started)."""
    runners = [arg.split("=", 1)[1] for arg in args if arg.startswith("--runner=")]
    runners += [args[i + 1] for i, arg in enumerate(args[:-1]) if arg == "--runner"]
    if not runners:
        return
    from apache_beam.runners.runner import create_runner

    for runner in runners:
        try:
            create_runner(runner)
        except (ValueError, ImportError) as exc:
            raise ConveyorError(f"beam.args: --runner {runner}: {' '.join(str(exc).split())[:600]}") from None


def prepare_data(spec: PipelineSpec) -> int:
    """Writes span-1 on first use; returns the latest span."""
    latest, written = datasets.init_data(spec.data.source, spec.data.path, spec.data.image_shape,
                                         spec.data_root, spec.data.eval_fraction, tuple(spec.beam.args))
    if written:
        manifest = datasets.read_manifest(spec.data_root, 1)
        print(f"conveyor: wrote span-1 from {spec.data.source} to {datasets.span_dir(spec.data_root, 1)} "
              f"({manifest['examples']['train']} train, {manifest['examples']['eval']} eval examples in "
              f"{manifest['ingestion_seconds']:.1f}s)", flush=True)
    return latest


def workspace_paths(spec: PipelineSpec) -> dict[str, Path]:
    return {
        "data": spec.data_root,
        "pipeline root": spec.pipeline_root,
        "metadata": Path(spec.metadata.sqlite) if spec.metadata.sqlite else Path("(mysql)"),
        "serving": spec.serving_base or Path("(no serving_pusher)"),
    }


# -- What a stopped run leaves ----------------------------------------------------------------------------
# TFX's launcher registers a step's execution as RUNNING in ML Metadata, makes its directories under the
# pipeline root (`<node>/.system/executor_execution/<id>/.temp`, `<node>/.system/stateful_working_dir/<uuid>`
# and one per output, `<node>/<output>/<id>`), runs the executor, then removes the first two and publishes
# the outputs. A run killed during a step (SIGKILL, the OOM killer) never gets there, nor does one interrupted
# (Ctrl-C and SIGTERM unwind past the launcher's handling of failures, which is for exceptions; a failed step
# keeps its stateful directory too): the execution stays RUNNING in the store for good, and the directories
# stay on disk. Nothing reads them: the next run makes executions of its own, and no Beam run resumes a step.
# So the next run settles them first, with the run lock held (no step of the workspace runs then): each
# such execution of the pipeline's steps is marked CANCELED (`conveyor runs` then says its run stopped during
# that step, where a RUNNING step read as a failure), its unpublished outputs are removed, and so is every
# working directory left under the pipeline root. Executions that are no step of a run (a release command's
# intent, which that command completes) are left alone.
#
# Beam and TFX name their temporary files without an owner (Beam's `beam-pipeline-temp…` directory of each
# pipeline, removed only when the pipeline returns; TensorFlow's AutoGraph modules, removed at exit), so a
# run's temporary directory is one of its own (`run_temporary_directory`), which the next run removes if its
# run was killed.
RUN_SCRATCH_PREFIX = "conveyor-run-"  # <tmp>/conveyor-run-<pid>-…
SETTLED_PROPERTY = "conveyor_settled"  # on a canceled step's execution: why it was canceled
SYSTEM_DIR = ".system"
_NODE_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,127}")  # a node id that can name a directory


def run_temporary_directory():
    """The temporary directory of a `conveyor run` and of every process it starts (trainers, the
    InfraValidator's server), for the run: `process_lifetime.private_temporary_directory`."""
    return private_temporary_directory(RUN_SCRATCH_PREFIX)


def settle_interrupted_steps(spec: PipelineSpec, say: Callable[[str], None]) -> list[int]:
    """Marks CANCELED every step of the pipeline's runs that ML Metadata holds as NEW or RUNNING, removing
    the output directories TFX made for it, then removes every step's temporary and stateful working
    directory left under the pipeline root; returns the executions canceled. Call it holding the run lock,
    before the run's own steps start: no step of this workspace runs then."""
    from ml_metadata.proto import metadata_store_pb2

    from conveyor_ml.metadata import store as metadata

    settled = []
    store = metadata.open_store(spec.metadata) if metadata.store_exists(spec.metadata) else None
    for node, run, execution in _unfinished_steps(store, spec.name) if store is not None else []:
        removed = remove_step_outputs(spec.pipeline_root / node, execution.id)
        execution.last_known_state = metadata_store_pb2.Execution.CANCELED
        execution.custom_properties[SETTLED_PROPERTY].string_value = (
            "canceled by the next run: its run was stopped during this step")
        store.put_executions([execution])
        settled.append(execution.id)
        outputs = ", ".join(path.parent.name for path in removed)
        say(f"conveyor: settled: run {run} was stopped during {node}; marked its execution {execution.id} "
            "canceled" + (f" and removed its unpublished output(s) {outputs}" if removed else ""))
    scratch = remove_step_scratch(spec.pipeline_root)
    if scratch:
        kind = "directory" if len(scratch) == 1 else "directories"
        say(f"conveyor: settled: removed {len(scratch)} working {kind} of steps that did not finish: "
            + ", ".join(str(p.relative_to(spec.pipeline_root)) for p in scratch[:3])
            + (" ..." if len(scratch) > 3 else ""))
    return settled


def _unfinished_steps(store, pipeline_name: str) -> list[tuple[str, str, object]]:
    """(node id, run id, execution) of each step of the pipeline's runs in state NEW or RUNNING."""
    from ml_metadata.proto import metadata_store_pb2

    unfinished = (metadata_store_pb2.Execution.NEW, metadata_store_pb2.Execution.RUNNING)
    pipeline = store.get_context_by_type_and_name(PIPELINE_CONTEXT, pipeline_name)
    if pipeline is None:
        return []
    context_types = {t.id: t.name for t in store.get_context_types()}
    found = []
    for execution in store.get_executions_by_context(pipeline.id):
        if execution.last_known_state not in unfinished:
            continue
        contexts = {context_types.get(c.type_id): c for c in store.get_contexts_by_execution(execution.id)}
        node, run = contexts.get(NODE_CONTEXT), contexts.get(PIPELINE_RUN_CONTEXT)
        prefix = f"{pipeline_name}."
        node_id = node.name[len(prefix):] if node is not None and node.name.startswith(prefix) else ""
        if _NODE_ID.fullmatch(node_id) and run is not None:  # else not a step: a release command's intent
            found.append((node_id, run.name, execution))
    return found


def remove_step_outputs(node_dir: Path, execution_id: int) -> list[Path]:
    """The output directories TFX made for an execution under `node_dir` (`<output>/<execution id>`), and its
    `.system/executor_execution/<execution id>`; returns the outputs removed."""
    if not node_dir.is_dir():
        return []
    removed = []
    for output in sorted(node_dir.iterdir()):
        path = output / str(execution_id)
        if output.name != SYSTEM_DIR and path.is_dir() and not path.is_symlink():
            shutil.rmtree(path, ignore_errors=True)
            removed.append(path)
    shutil.rmtree(node_dir / SYSTEM_DIR / "executor_execution" / str(execution_id), ignore_errors=True)
    return removed


def remove_step_scratch(pipeline_root: Path) -> list[Path]:
    """Every step's working directories left under the pipeline root: `<node>/.system/stateful_working_dir/*`
    (TFX removes a step's only once it succeeded; no Beam run resumes a step) and
    `<node>/.system/executor_execution/<id>/.temp` (removed unless the process died). Returns them."""
    if not pipeline_root.is_dir():
        return []
    found = []
    for node_dir in sorted(p for p in pipeline_root.iterdir() if p.is_dir() and not p.is_symlink()):
        system = node_dir / SYSTEM_DIR
        found += sorted((system / "stateful_working_dir").glob("*"))
        found += sorted((system / "executor_execution").glob("*/.temp"))
    removed = []
    for path in found:
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path, ignore_errors=True)
            removed.append(path)
    return removed
