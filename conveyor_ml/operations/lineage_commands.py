"""`conveyor models | lineage | runs`: read-only questions to the spec's metadata store."""
from __future__ import annotations

import io
import json
import sys
from pathlib import Path

from conveyor_ml.base.errors import ConveyorError
from conveyor_ml.base.spec import PipelineSpec
from conveyor_ml.metadata.index import MetadataIndex
from conveyor_ml.operations import lineage_render as render
from conveyor_ml.operations.lineage import Lineage
from conveyor_ml.operations.records import ModelVersions, PipelineRuns

NO_RUNS = "conveyor: no runs yet — run `make pipeline`"


def default_model_name(spec: PipelineSpec) -> str:
    return spec.components.serving_pusher.model_name if spec.components.serving_pusher else spec.gcp_model_name


def load(spec: PipelineSpec, model: str | None) -> Lineage | None:
    """The store's lineage for a model, or None when there is nothing recorded yet."""
    from conveyor_ml.metadata import store as metadata

    if not metadata.store_exists(spec.metadata):
        return None
    index = MetadataIndex(metadata.open_store(spec.metadata, read_only=True))
    if not index.run_contexts:
        return None
    name = model or default_model_name(spec)
    known = {default_model_name(spec)} | {str(v) for v in _deployed_model_names(index)}
    if name not in known:
        raise ConveyorError(f"unknown model {name!r} in {metadata.describe(spec.metadata)} "
                            f"(known: {', '.join(sorted(known))})")
    return Lineage(index, name)


def _deployed_model_names(index: MetadataIndex) -> set:
    from conveyor_ml.base.names import DEPLOYMENT_TYPE
    from conveyor_ml.metadata.values import props

    return {props(a).get("model_name") for a in index.artifacts.values()
            if index.artifact_types.get(a.type_id) == DEPLOYMENT_TYPE} - {None}


def emit(text: str, output: str | None) -> None:
    if output is None:
        sys.stdout.write(text)
        return
    from conveyor_ml.base.files import write_atomically

    path = Path(output)
    path.parent.mkdir(parents=True, exist_ok=True)
    write_atomically(path, text)
    print(f"conveyor: wrote {path}")


def _print_rich(renderable, output: str | None = None) -> None:
    """A rich table on the terminal, or as plain text into `output` (-o)."""
    from rich.console import Console

    if output is None:
        Console(width=max(160, Console().width)).print(renderable)
        return
    console = Console(width=160, record=True, file=io.StringIO(), color_system=None)
    console.print(renderable)
    emit(console.export_text(), output)


def models(spec: PipelineSpec, model: str | None, fmt: str, output: str | None) -> int:
    found = load(spec, model)
    if found is None:
        print(NO_RUNS)
        return 0
    rows = found.models()
    if fmt == "json":
        emit(json.dumps(ModelVersions(found.model_name, rows).to_json(), indent=2, default=str) + "\n", output)
    elif fmt == "dot":
        emit(render.to_dot(render.models_graph(rows, found.model_name), f"{found.model_name} versions"), output)
    elif fmt == "html":
        emit(render.to_html(render.models_graph(rows, found.model_name), f"{found.model_name}: model versions",
                            ModelVersions(found.model_name, rows).to_json()), output)
    else:
        _print_rich(render.models_table(rows, found.model_name), output)
    return 0


def lineage(spec: PipelineSpec, model: str | None, *, version: str | None, label: str | None, run_id: str | None,
            fmt: str, output: str | None) -> int:
    if sum(x is not None for x in (version, label, run_id)) > 1:
        raise ConveyorError("lineage: pick one of --version, --label, --run")
    found = load(spec, model)
    if found is None:
        print(NO_RUNS)
        return 0
    chain = found.lineage(found.resolve(version=version, label=label, run_id=run_id))
    title = f"{found.model_name} model #{chain.model_id} lineage"
    if fmt == "json":
        emit(json.dumps(chain.to_json(), indent=2, default=str) + "\n", output)
    elif fmt == "dot":
        emit(render.to_dot(render.lineage_graph(chain), title), output)
    elif fmt == "html":
        emit(render.to_html(render.lineage_graph(chain), title, chain.to_json()), output)
    else:
        emit("\n".join(render.lineage_text(chain)) + "\n", output)
    return 0


def runs(spec: PipelineSpec, fmt: str, limit: int | None) -> int:
    found = load(spec, None)
    if found is None:
        print(NO_RUNS)
        return 0
    rows = found.runs(limit)
    if fmt == "json":
        print(json.dumps(PipelineRuns(rows).to_json(), indent=2, default=str))
    else:
        _print_rich(render.runs_table(rows))
    return 0
