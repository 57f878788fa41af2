"""Which spans are consumed, blocked or pending, read from an ML Metadata store written here with the raw MLMD
API the way TFX records runs (node and run contexts, executions with their states, input/output events)."""
from __future__ import annotations

import json
import os

import pytest
from ml_metadata.metadata_store import metadata_store
from ml_metadata.proto import metadata_store_pb2 as pb

from conveyor_ml.base.spec import load_spec
from conveyor_ml.metadata.index import MetadataIndex
from conveyor_ml.operations.lineage import Lineage
from conveyor_ml.pipelines.run_lock import RunLock, RunLockHeld
from conveyor_ml.pipelines.runner import spans_to_import
from conveyor_ml.pipelines.scheduler import Scheduler
from tests.conftest import write_spec

COMPLETE, FAILED, RUNNING = pb.Execution.COMPLETE, pb.Execution.FAILED, pb.Execution.RUNNING


class Store:
    """A tiny recorder of pipeline runs into a real MLMD SQLite store."""

    def __init__(self, path):
        config = pb.ConnectionConfig()
        config.sqlite.filename_uri = str(path)
        config.sqlite.connection_mode = pb.SqliteMetadataSourceConfig.READWRITE_OPENCREATE
        self.store = metadata_store.MetadataStore(config)
        self.types = {}

    def _type(self, kind: str, name: str) -> int:
        if (kind, name) not in self.types:
            put = {"artifact": (self.store.put_artifact_type, pb.ArtifactType),
                   "execution": (self.store.put_execution_type, pb.ExecutionType),
                   "context": (self.store.put_context_type, pb.ContextType)}[kind]
            self.types[(kind, name)] = put[0](put[1](name=name))
        return self.types[(kind, name)]

    def artifact(self, type_name: str, **values) -> int:
        artifact = pb.Artifact(type_id=self._type("artifact", type_name), uri="/nowhere")
        for key, value in values.items():
            if isinstance(value, int):
                artifact.custom_properties[key].int_value = value
            elif isinstance(value, float):
                artifact.custom_properties[key].double_value = value
            else:
                artifact.custom_properties[key].string_value = value
        [artifact_id] = self.store.put_artifacts([artifact])
        return artifact_id

    def _context(self, kind: str, name: str) -> int:
        """One context per (kind, name), shared by every run: TFX's pipeline ("mnist") and node ("mnist.<node
        id>") contexts."""
        type_id = self._type("context", kind)
        existing = self.store.get_context_by_type_and_name(kind, name)
        if existing is not None:
            return existing.id
        [context_id] = self.store.put_contexts([pb.Context(type_id=type_id, name=name)])
        return context_id

    def run(self, run_id: str, *steps, finished: bool | None = None, pipeline: str = "mnist") -> None:
        """steps: (node, state, {input key: [artifact ids]}, {output key: [artifact ids]}); `finished` is the
        runner's mark on the run's context (conveyor_run_finished), None for a run recorded before it."""
        context = pb.Context(type_id=self._type("context", "pipeline_run"), name=run_id)
        if finished is not None:
            context.custom_properties["conveyor_run_finished"].int_value = int(finished)
        [run] = self.store.put_contexts([context])
        for node, state, inputs, outputs in steps:
            contexts = (run, self._context("node", f"{pipeline}.{node}"), self._context("pipeline", pipeline))
            execution = pb.Execution(type_id=self._type("execution", node), last_known_state=state)
            events = []
            for kind, keyed in ((pb.Event.INPUT, inputs), (pb.Event.OUTPUT, outputs)):
                for key, ids in keyed.items():
                    for artifact_id in ids:
                        event = pb.Event(type=kind, artifact_id=artifact_id)
                        event.path.steps.add().key = key
                        events.append(event)
            [execution_id] = self.store.put_executions([execution])
            for event in events:
                event.execution_id = execution_id
            self.store.put_events(events)
            self.store.put_attributions_and_associations(
                [pb.Attribution(context_id=c, artifact_id=e.artifact_id) for c in contexts for e in events],
                [pb.Association(context_id=c, execution_id=execution_id) for c in contexts])


def history(directory) -> Store:
    """Span 1 consumed; span 2's run trained and pushed; span 3's run failed at the Trainer (a crash, not drift);
    span 4 was blocked by the drift gate; span 5's run was killed while training (left RUNNING)."""
    directory.mkdir(parents=True, exist_ok=True)
    store = Store(directory / "metadata.sqlite")
    spans = {n: store.artifact("Examples", span=n) for n in range(1, 6)}
    model_1, model_2 = store.artifact("Model", spans="1"), store.artifact("Model", spans="1,2")
    store.run("r1", ("ImportExampleGen", COMPLETE, {}, {"examples": [spans[1]]}),
              ("Trainer", COMPLETE, {"examples": [spans[1]]}, {"model": [model_1]}))
    store.run("r2", ("ImportExampleGen", COMPLETE, {}, {"examples": [spans[2]]}),
              ("Trainer", COMPLETE, {"examples": [spans[1], spans[2]]}, {"model": [model_2]}))
    store.run("r3", ("ImportExampleGen", COMPLETE, {}, {"examples": [spans[3]]}),
              ("Trainer", FAILED, {"examples": [spans[1], spans[2], spans[3]]}, {}))
    blocked = store.artifact("conveyor.DataDriftReport", span=4, verdict="blocked")
    store.run("r4", ("ImportExampleGen", COMPLETE, {}, {"examples": [spans[4]]}),
              ("DriftGate", COMPLETE, {"examples": [spans[4]]}, {"drift_report": [blocked]}),
              ("Trainer", FAILED, {"examples": [spans[1], spans[2], spans[3], spans[4]]}, {}))
    store.run("r5", ("ImportExampleGen", COMPLETE, {}, {"examples": [spans[5]]}),
              ("Trainer", RUNNING, {"examples": [spans[1], spans[2], spans[3], spans[5]]}, {}))
    return store


def test_a_span_is_consumed_only_by_a_run_that_finished_without_failure(tmp_path):
    index = MetadataIndex(history(tmp_path).store)
    assert index.successful_runs() == {"r1", "r2"}
    assert index.consumed_through() == 2
    assert index.blocked_spans() == {4}


def test_a_run_stopped_between_two_steps_consumed_nothing(tmp_path):
    """Killed after ImportExampleGen, before the Trainer started: no execution failed or was left running, and
    the scheduler took span 2 for consumed, so no model was ever trained or pushed on it."""
    store = Store(tmp_path / "metadata.sqlite")
    span_1, span_2, span_3 = (store.artifact("Examples", span=n) for n in (1, 2, 3))
    model = store.artifact("Model", spans="1")
    store.run("before-the-mark", ("ImportExampleGen", COMPLETE, {}, {"examples": [span_1]}),
              ("Trainer", COMPLETE, {"examples": [span_1]}, {"model": [model]}))
    store.run("stopped", ("ImportExampleGen", COMPLETE, {}, {"examples": [span_2]}), finished=False)
    index = MetadataIndex(store.store)
    assert index.successful_runs() == {"before-the-mark"}  # a run recorded before the mark still counts
    assert index.consumed_through() == 1
    assert (index.run_finished("stopped"), index.run_finished("before-the-mark")) == (False, None)
    statuses = {run.run_id: run.status for run in Lineage(index, "mnist").runs()}
    assert statuses == {"before-the-mark": "complete", "stopped": "stopped after ImportExampleGen"}  # conveyor runs
    store.run("through", ("ImportExampleGen", COMPLETE, {}, {"examples": [span_3]}), finished=True)
    assert MetadataIndex(store.store).consumed_through() == 3


def test_another_pipelines_runs_neither_consume_nor_block_this_ones_spans(tmp_path):
    """Two pipelines may share a store (a MySQL server): each scheduler reads its own pipeline's runs."""
    store = Store(tmp_path / "metadata.sqlite")
    mine, theirs = store.artifact("Examples", span=1), store.artifact("Examples", span=3)
    store.run("mine", ("ImportExampleGen", COMPLETE, {}, {"examples": [mine]}), finished=True)
    block = store.artifact("conveyor.DataDriftReport", span=2, verdict="blocked")
    store.run("theirs", ("ImportExampleGen", COMPLETE, {}, {"examples": [theirs]}),
              ("DriftGate", COMPLETE, {}, {"drift_report": [block]}), finished=True, pipeline="other")
    index = MetadataIndex(store.store)
    assert (index.consumed_through("mnist"), index.blocked_spans("mnist")) == (1, set())
    assert (index.consumed_through("other"), index.blocked_spans("other")) == (3, {2})
    assert index.consumed_through() == 3  # unnamed: every pipeline's


def test_a_later_verdict_on_a_span_replaces_an_earlier_block(tmp_path):
    store = history(tmp_path)
    retrain = store.artifact("conveyor.DataDriftReport", span=4, verdict="drift: retrain")
    store.run("r6", ("DriftGate", COMPLETE, {}, {"drift_report": [retrain]}))
    assert MetadataIndex(store.store).blocked_spans() == set()


def test_the_scheduler_finds_every_span_no_successful_run_consumed(tmp_path):
    spec = load_spec(write_spec(tmp_path))
    history(spec.workspace)
    for span in range(1, 7):  # span 6 landed while nothing ran
        (spec.data_root / f"span-{span}").mkdir(parents=True)
        (spec.data_root / f"span-{span}" / "span.json").write_text(json.dumps({"span": span}))
    scheduler = Scheduler(spec, tmp_path / "spec.yaml", every=None, on_new_data=True, max_runs=1, retries=0,
                          backoff=1, poll=1)
    # 3 (its run failed), 5 (its run was killed) and 6 (never run) are pending; 4 was settled by the drift gate.
    assert scheduler.pending_spans() == [3, 5, 6]
    assert scheduler.blocked(4) and not scheduler.blocked(5)


def test_a_run_first_imports_the_older_spans_its_window_needs_that_no_run_imported(tmp_path):
    history(tmp_path / "workspace")  # spans 1-5 imported
    for span in range(1, 10):  # 6, 7 and 8 landed together with 9
        (tmp_path / "workspace" / "data" / f"span-{span}").mkdir(parents=True)
        (tmp_path / "workspace" / "data" / f"span-{span}" / "span.json").write_text(json.dumps({"span": span}))
    assert spans_to_import(load_spec(write_spec(tmp_path)), 9) == [6, 7, 8]
    assert spans_to_import(load_spec(write_spec(tmp_path, **{"data.window_spans": 2})), 9) == [8]
    assert spans_to_import(load_spec(write_spec(tmp_path, **{"data.window_spans": 1})), 9) == []
    assert spans_to_import(load_spec(write_spec(tmp_path, **{"data.window_spans": 1,
                                                              "components.evaluator.golden_span": 7})), 9) == [7]
    assert spans_to_import(load_spec(write_spec(tmp_path, **{"components.trainer": None, "components.evaluator": None,
                                                              "components.quantizer": None,
                                                              "components.infra_validator": None,
                                                              "components.serving_pusher": None})), 9) == []


HOLD_LOCK = """
import sys, time
from pathlib import Path
from conveyor_ml.pipelines.run_lock import RunLock
RunLock(Path(sys.argv[1])).acquire()
print("holding", flush=True)
time.sleep(600)
"""


def test_the_scheduler_waits_for_a_run_in_progress_instead_of_starting_another(tmp_path):
    """A run a killed scheduler started goes on; the restarted scheduler waits for it (once logged), starts
    nothing meanwhile, and never takes the lock itself to find out."""
    import subprocess
    import sys
    import threading

    spec = load_spec(write_spec(tmp_path))
    history(spec.workspace)
    (spec.data_root / "span-6").mkdir(parents=True)
    (spec.data_root / "span-6" / "span.json").write_text(json.dumps({"span": 6}))
    scheduler = Scheduler(spec, tmp_path / "spec.yaml", every=None, on_new_data=True, max_runs=1, retries=0,
                          backoff=1, poll=0.2)
    assert scheduler.run_in_progress() is None
    holder = subprocess.Popen([sys.executable, "-c", HOLD_LOCK, str(spec.workspace)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "holding"
        assert scheduler.run_in_progress()["pid"] == holder.pid
        stop = threading.Timer(2.0, lambda: setattr(scheduler, "stopping", True))
        stop.start()
        scheduler.loop()
        stop.join()
        assert holder.poll() is None  # the holder was left alone
    finally:
        holder.kill()
        holder.wait()
    log = (spec.workspace / ".conveyor" / "schedule.log").read_text().splitlines()
    assert scheduler.runs_started == 0 and not any("trigger" in line for line in log)
    waiting = [line for line in log if "a run of this pipeline is in progress" in line]
    assert len(waiting) == 1 and f"(pid {holder.pid}, started " in waiting[0]
    assert waiting[0].endswith("waiting for it before acting on: new span 6")
    assert scheduler.run_in_progress() is None  # its holder died: the lock is free


@pytest.mark.parametrize("written", ['{"pid": 1}', '{"pid": -1}', '{"pid": 1.5}', '[1, 2]', '"x"', "null",
                                     '{"pid": "abc"}', '{"pid": 99999999999}', '{"pid": true}', "{"])
def test_what_the_lock_file_says_is_never_waited_on_while_the_lock_is_free(tmp_path, written):
    """The file is a note for messages: a pid written into it by hand (1, init, lives for ever) or left by a
    killed run and since reused made the scheduler wait for ever; garbage in it was a traceback."""
    lock = RunLock(tmp_path)
    lock.path.parent.mkdir(parents=True)
    lock.path.write_text(written)
    assert lock.live_holder() is None
    lock.acquire()  # taken, whatever the note said
    assert json.loads(lock.path.read_text())["pid"] == os.getpid()
    lock.release()


def test_the_lock_holder_is_the_process_the_kernel_says_holds_it(tmp_path):
    import subprocess
    import sys

    holder = subprocess.Popen([sys.executable, "-c", HOLD_LOCK, str(tmp_path)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "holding"
        lock = RunLock(tmp_path)
        lock.path.write_text('{"pid": 1, "started": "never"}')  # the note overwritten: the kernel knows better
        assert lock.live_holder() == {"pid": holder.pid}
        with pytest.raises(RunLockHeld, match=r"in progress \(pid 1, started never\)"):
            lock.acquire()  # its message quotes the note, whatever it says
    finally:
        holder.kill()
        holder.wait()
    assert RunLock(tmp_path).live_holder() is None


@pytest.mark.parametrize("damage", ["state directory is a file", "log is a directory"])
def test_a_scheduler_that_cannot_write_its_log_says_so_in_one_line(tmp_path, damage):
    from conveyor_ml.base.errors import ConveyorError

    spec = load_spec(write_spec(tmp_path))
    state = spec.workspace / ".conveyor"
    if damage == "state directory is a file":
        spec.workspace.mkdir(parents=True)
        state.write_text("")
        expected = f"{state} is not a directory: Conveyor keeps the run lock"
    else:
        (state / "schedule.log").mkdir(parents=True)
        expected = f"cannot write the scheduler's log {state / 'schedule.log'} (Is a directory)"
    with pytest.raises(ConveyorError) as refused:
        Scheduler(spec, tmp_path / "spec.yaml", every=60.0, on_new_data=False, max_runs=1, retries=0, backoff=1,
                  poll=1)
    assert str(refused.value).startswith(expected)


def test_a_trigger_whose_run_finds_the_lock_taken_waits_instead_of_failing(tmp_path):
    """A manual `conveyor run` that took the lock just before the scheduler's run did: that run exits 2 at
    once. It was a failed run, retried with backoff and counted against --max-runs; now the trigger is not
    counted and the loop waits for the holder, as it does for a run it sees first."""
    import subprocess
    import sys

    spec = load_spec(write_spec(tmp_path))
    scheduler = Scheduler(spec, tmp_path / "spec.yaml", every=60.0, on_new_data=False, max_runs=1, retries=2,
                          backoff=30, poll=0.2)
    holder = subprocess.Popen([sys.executable, "-c", HOLD_LOCK, str(spec.workspace)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "holding"
        assert scheduler.trigger("interval") is False
    finally:
        holder.kill()
        holder.wait()
    log = (spec.workspace / ".conveyor" / "schedule.log").read_text()
    assert scheduler.runs_started == 0 and "retry" not in log and "run failed" not in log
    assert f"another run of this pipeline is in progress (pid {holder.pid}, started " in log
    assert log.rstrip().endswith("this trigger waits for it")


def test_ctrl_c_to_the_scheduler_is_in_its_log(tmp_path):
    import signal
    import threading

    spec = load_spec(write_spec(tmp_path))
    scheduler = Scheduler(spec, tmp_path / "spec.yaml", every=3600.0, on_new_data=False, max_runs=None,
                          retries=0, backoff=1, poll=0.1)
    threading.Timer(0.5, lambda: os.kill(os.getpid(), signal.SIGINT)).start()
    with pytest.raises(KeyboardInterrupt):
        scheduler.loop()
    log = (spec.workspace / ".conveyor" / "schedule.log").read_text().splitlines()
    assert log[-1].endswith("conveyor schedule: interrupted after 0 runs")
