"""The workspace a spec names: checked before anything is written, and its data initialised on first use.

Light on imports on purpose: the CLI runs these checks before loading TFX, so a bad path fails in a moment.
"""
from __future__ import annotations

import os
from pathlib import Path

from conveyor_ml.base.errors import ConveyorError
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
