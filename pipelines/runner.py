"""Runs a spec's pipeline on Apache Beam (BeamDagRunner), printing one line per component as it goes."""
from __future__ import annotations

import contextlib
import datetime
import logging
import sys
import time
from collections.abc import Callable, Iterator

from tfx.dsl.compiler import constants
from tfx.orchestration import metadata as tfx_metadata
from tfx.orchestration.beam.beam_dag_runner import BeamDagRunner, PipelineNodeAsDoFn
from tfx.orchestration.portable import launcher, runtime_parameter_utils

from conveyor_ml.base.errors import ConveyorError
from conveyor_ml.base.names import PIPELINE_CONTEXT, PIPELINE_RUN_CONTEXT, RUN_FINISHED_PROPERTY
from conveyor_ml.base.spec import PipelineSpec
from conveyor_ml.formats.spans import span_numbers
from conveyor_ml.metadata import store as metadata
from conveyor_ml.metadata.store import connection_config
from conveyor_ml.metadata.values import props
from conveyor_ml.pipelines.beam_dependencies import with_tfx_package
from conveyor_ml.pipelines.builder import build_pipeline
from conveyor_ml.pipelines.headline_metrics import record_headline_metrics
from conveyor_ml.pipelines.run_result import NodeOutcome, RunResult
from conveyor_ml.pipelines.workspace import check_workspace, prepare_data, settle_interrupted_steps

# The in-memory DirectRunner runs every DoFn in this process; progress reaches the active run through
# this module-level slot (a DoFn is pickled, so it cannot hold a reference to the runner itself).
_active_outcomes: list[NodeOutcome] | None = None


# Components log what they do (logging.getLogger(__name__) under conveyor_ml.components); the runner shows
# those records as progress lines under the component's own line.
COMPONENT_LOGGER = "conveyor_ml.components"
# Under the workspace: what runs build once and reuse (the TFX package Beam workers need).
BEAM_CACHE = ".cache"


def _say(line: str) -> None:
    print(line, flush=True)


def show_component_progress() -> None:
    """Prints components' INFO records indented under their node's line. Idempotent; called in every process
    that runs nodes (Beam's multi-processing workers run the DoFn in their own processes)."""
    logger = logging.getLogger(COMPONENT_LOGGER)
    if any(getattr(h, "conveyor_progress", False) for h in logger.handlers):
        return
    handler = logging.StreamHandler(sys.stdout)
    handler.setFormatter(logging.Formatter("    %(message)s"))
    handler.conveyor_progress = True
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    logger.propagate = False


class _ReportingNodeDoFn(PipelineNodeAsDoFn):
    """TFX's node DoFn, plus a line per node with its outcome and time, and the component's progress under it."""

    def process(self, element, *signals):
        show_component_progress()
        for signal in signals:
            assert not list(signal), "Signal PCollection should be empty."
        started = time.perf_counter()
        _say(f"  ▶ {self._node_id}")
        try:
            execution_info = self._launch()
        except Exception as exc:
            seconds = time.perf_counter() - started
            message = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            _record(NodeOutcome(self._node_id, "failed", seconds, message))
            _say(f"  ✗ {self._node_id}  failed after {seconds:.1f}s: {message}")
            raise
        seconds = time.perf_counter() - started
        state = self._state_of(execution_info)
        _record(NodeOutcome(self._node_id, state, seconds))
        mark = {"complete": "✓", "cached": "↺", "skipped": "–"}.get(state, "✓")
        _say(f"  {mark} {self._node_id}  {state} in {seconds:.1f}s")

    def _launch(self):
        platform_config = self._extract_platform_config(self._deployment_config, self._node_id)
        return launcher.Launcher(
            pipeline_node=self._pipeline_node,
            mlmd_connection=tfx_metadata.Metadata(self._mlmd_connection_config),
            pipeline_info=self._pipeline_info,
            pipeline_runtime_spec=self._pipeline_runtime_spec,
            executor_spec=self._executor_spec,
            platform_config=platform_config,
            custom_driver_spec=self._custom_driver_spec).launch()

    def _state_of(self, execution_info) -> str:
        if execution_info is None or not execution_info.execution_id:
            return "complete" if execution_info is not None else "skipped"
        with tfx_metadata.Metadata(self._mlmd_connection_config) as m:
            [execution] = m.store.get_executions_by_id([execution_info.execution_id])
        return {execution.CACHED: "cached", execution.COMPLETE: "complete"}.get(
            execution.last_known_state, "skipped")


def _record(outcome: NodeOutcome) -> None:
    if _active_outcomes is not None:
        _active_outcomes.append(outcome)


class ReportingBeamDagRunner(BeamDagRunner):
    """BeamDagRunner with a run id chosen up front (so the caller can find the run in MLMD)."""

    _PIPELINE_NODE_DO_FN_CLS = _ReportingNodeDoFn
    # Set after construction: BeamDagRunner.__new__ reads positional arguments as legacy options.
    run_id: str = ""

    def run_with_ir(self, pipeline, run_options=None):
        runtime_parameter_utils.substitute_runtime_parameter(
            pipeline, {constants.PIPELINE_RUN_ID_PARAMETER_NAME: self.run_id})
        return super().run_with_ir(pipeline, run_options=run_options)


def new_run_id() -> str:
    return datetime.datetime.now().strftime("%Y%m%d-%H%M%S.%f")


def run_pipeline(spec: PipelineSpec, run_id: str | None = None) -> RunResult:
    """Runs the whole DAG once; raises ConveyorError naming the component that failed on a user problem."""
    from conveyor_ml.components.release_record import reconcile
    from conveyor_ml.pipelines.run_lock import RunLock

    check_workspace(spec)
    with RunLock(spec.workspace):
        # A push killed before its record (an earlier run's) is recorded first; this run's own push is
        # confirmed after the run, once TFX has published it (or recorded then, if the publish failed).
        reconcile(spec, _say)
        # Steps an earlier run was stopped during: canceled in MLMD, their directories removed.
        settle_interrupted_steps(spec, _say)
        with _after_run(lambda: reconcile(spec, _say)):
            return _run_locked(spec, run_id)


def _run_locked(spec: PipelineSpec, run_id: str | None) -> RunResult:
    latest_span = prepare_data(spec)
    run_id = run_id or new_run_id()
    beam_args = with_tfx_package(list(spec.beam.args), spec.workspace / BEAM_CACHE)
    for span in spans_to_import(spec, latest_span):
        # A span that arrived together with a newer one (or while nothing ran) gets its data checks and its
        # import now, so this run's window trains on it; each is a pipeline run of its own in MLMD.
        _say(f"conveyor: importing span {span} first: no run has imported it, and span {latest_span} is the newest "
             f"(run {run_id}-span-{span})")
        _execute(spec, build_pipeline(spec, span=span, data_only=True, beam_args=beam_args),
                 RunResult(f"{run_id}-span-{span}", 0.0))
    _say(f"conveyor: running pipeline '{spec.name}' on span {latest_span} (run {run_id})")
    result = RunResult(run_id=run_id, seconds=0.0)
    with _after_run(lambda: record_headline_metrics(spec, run_id)):
        # Pinned to the span chosen above: a span that lands meanwhile is the next run's, not taken in its
        # place (ExampleGen would otherwise import the newest, and the one chosen would never be trained on).
        _execute(spec, build_pipeline(spec, span=latest_span, beam_args=beam_args), result)
    return result


@contextlib.contextmanager
def _after_run(finish: Callable[[], None]) -> Iterator[None]:
    """Runs `finish` after the block, as `finally` would; when the block failed, a failure of `finish` too
    (the metadata store gone with the run) does not replace the block's own error."""
    try:
        yield
    except BaseException:
        with contextlib.suppress(Exception):
            finish()
        raise
    finish()


def spans_to_import(spec: PipelineSpec, latest_span: int) -> list[int]:
    """Spans on disk older than the newest that this pipeline has never imported and that its window (or its
    golden span) needs: a run imports only the newest span itself."""
    window = spec.data.window_spans
    wanted = {s for s in span_numbers(spec.data_root) if s < latest_span and (not window or s > latest_span - window)}
    evaluator = spec.components.evaluator
    if evaluator and evaluator.golden_span is not None and evaluator.golden_span < latest_span:
        wanted.add(evaluator.golden_span)
    if not wanted or not spec.components.trainer:
        return []
    imported: set[int] = set()
    if metadata.store_exists(spec.metadata):
        store = metadata.open_store(spec.metadata)
        context = store.get_context_by_type_and_name(PIPELINE_CONTEXT, spec.name)
        if context is not None:
            examples_type = {t.id for t in store.get_artifact_types() if t.name == "Examples"}
            imported = {props(a).get("span") for a in store.get_artifacts_by_context(context.id)
                        if a.type_id in examples_type}
    return sorted(wanted - imported)


def _mark_run(spec: PipelineSpec, run_id: str, finished: bool) -> None:
    """Records on the run's context whether its whole DAG ran (RUN_FINISHED_PROPERTY). Before the first step,
    the context is made as TFX makes it (under the pipeline's), which TFX's nodes then find and use."""
    from tfx.orchestration.portable.mlmd import context_lib

    with tfx_metadata.Metadata(connection_config(spec.metadata)) as handle:
        pipeline = context_lib.register_context_if_not_exists(handle, PIPELINE_CONTEXT, spec.name)
        run = context_lib.register_context_if_not_exists(handle, PIPELINE_RUN_CONTEXT, run_id,
                                                         parent_contexts=[pipeline])
        run.custom_properties[RUN_FINISHED_PROPERTY].int_value = int(finished)
        handle.store.put_contexts([run])


def _execute(spec: PipelineSpec, pipeline, result: RunResult) -> None:
    """Runs one DAG under the result's run id, recording each node's outcome in it, and in MLMD whether it
    ran through: a run stopped between two steps leaves no failed execution (conveyor schedule would take its
    span for consumed)."""
    global _active_outcomes
    _active_outcomes = result.outcomes
    started = time.perf_counter()
    try:
        _mark_run(spec, result.run_id, finished=False)
        runner = ReportingBeamDagRunner()
        runner.run_id = result.run_id
        runner.run(pipeline)
        _mark_run(spec, result.run_id, finished=True)
    except Exception as exc:
        failed = result.failed()
        lost = metadata.connection_lost(spec.metadata, failed.error if failed else exc)
        if lost:  # the MySQL server went away: the run stays unfinished in MLMD (RUN_FINISHED_PROPERTY)
            where = f" at {failed.node_id}" if failed else ""
            raise ConveyorError(f"run {result.run_id} failed{where}: {lost}, then run again (this run stays "
                                "unfinished)") from None
        user_error = _find_conveyor_error(exc)
        if failed and user_error:
            raise ConveyorError(f"run {result.run_id} failed at {failed.node_id}: {user_error}") from None
        if failed:
            print(f"conveyor: run {result.run_id} failed at {failed.node_id}: {failed.error}", file=sys.stderr)
        raise
    finally:
        _active_outcomes = None
        result.seconds = time.perf_counter() - started


def _find_conveyor_error(exc: BaseException) -> str | None:
    """Beam re-raises a DoFn's exception wrapped or re-typed; find our user error in the chain or text."""
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if isinstance(exc, ConveyorError):
            # Beam appends "[while running 'Run[Node]']" to re-raised messages.
            return str(exc).split(" [while running ")[0]
        exc = exc.__cause__ or exc.__context__
    return None


