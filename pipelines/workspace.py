"""The workspace a spec names: checked before anything is written, and its data initialised on first use.

Light on imports on purpose: the CLI runs these checks before loading TFX, so a bad path fails in a moment.
"""
from __future__ import annotations

import os
from pathlib import Path

from conveyor_ml.base.errors import ConveyorError
from conveyor_ml.base.spec import PipelineSpec
from conveyor_ml.data import datasets


def check_workspace(spec: PipelineSpec) -> None:
    """Fails early, before MLMD or the serving path is touched, if the workspace cannot be written."""
    workspace = spec.workspace
    try:
        workspace.mkdir(parents=True, exist_ok=True)
        probe = workspace / f".write-test-{os.getpid()}"
        probe.write_text("")
        probe.unlink()
    except OSError as exc:
        raise ConveyorError(f"workspace {workspace} is not writable ({exc.strerror}); "
                            "set `workspace:` in the spec to a directory you can write") from None
    if not spec.data.schema.is_file():
        raise ConveyorError(f"data.schema: no such file: {spec.data.schema}")


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
