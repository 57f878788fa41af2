"""`conveyor run` killed at seeded moments: does the next run, `conveyor runs`, `conveyor lineage`/`models`
and `conveyor serve` handle whatever the kill left?

Two scenarios, each with its clean run's duration measured first: the first run of an empty workspace (data
written, the TFX package for Beam built, MLMD created, version 1 pushed), and a second run on a new span over
a served version 1 (version 2 pushed). For each of N seeded moments, spread evenly over the scenario's run
(a seeded offset in each of N equal slices), `conveyor run` starts in its own process group and is stopped at
that moment: SIGKILL to the group, SIGKILL to the run alone, SIGTERM to the run, or SIGINT to the group (a
terminal's Ctrl-C). Then, as the kill left it: no process the run started survives, every version
directory under the serving base path is whole, release_state.json parses and names only versions on disk,
and `conveyor serve --spec` serves every labelled version. Then `conveyor run` again, and after it: it exited
0; `conveyor runs` lists the killed run as not complete (unless every step of it had run) and the rerun as
complete; the base path holds only whole numbered versions and nothing temporary; release_state.json parses,
carries no unrecorded change and agrees with models.config, traffic.json and ML Metadata (the newest release
change's Deployments, a Model for every version); `conveyor lineage --format json` and `conveyor models
[--format json]` exit 0 without a traceback; nothing the killed run left in the temporary directory or the
workspace's scratch places (TFX's per-execution `.temp` and stateful working directories, staging
directories, atomic-write temporaries) remains.

Run: .venv/bin/python -m benchmarks.pipeline_kills [--moments 12] [--seed 7] [--root /tmp/kill-pipeline-probe]
Results: benchmarks/results/pipeline_kills.md and .json.
"""
from __future__ import annotations

import argparse
import json
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections import defaultdict
from pathlib import Path

from benchmarks.common import machine, write_results

ROOT = Path(__file__).resolve().parent.parent
NAME = "pipeline_kills"
TRAIN_STEPS = 150  # the continuous-training e2e tests' setting: the model still passes min_accuracy 0.9
MODEL = "mnist"
# (signal, whom): the group is the run and every process it started in it (its trainers; the
# InfraValidator's server has a session of its own and must go with its parent).
STOPS = [("SIGKILL", "group"), ("SIGKILL", "run"), ("SIGTERM", "run"), ("SIGKILL", "group"),
         ("SIGINT", "group"), ("SIGKILL", "group")]
SCENARIOS = {"first": "first run of an empty workspace", "second": "run on span 2 over a served version 1"}
RUN_LINE = re.compile(r"\(run (\d{8}-\d{6}\.\d+)\)")
NODE_START, NODE_END = re.compile(r"^  ▶ (\S+)"), re.compile(r"^  [✓↺–✗] (\S+)")
# Scratch a run makes in the workspace, by name: TFX's per-execution temporary and stateful working
# directories, span staging, atomic-write temporaries, hidden version directories, the workspace probe.
SCRATCH = [re.compile(p) for p in (r".*/\.system/executor_execution/\d+/\.temp(/.*)?",
                                   r".*/\.system/stateful_working_dir/[^/]+(/.*)?",
                                   r".*/data/\.span-[^/]*", r".*/\.cache/\.tfx_ephemeral[^/]*",
                                   r".*/serving/(?:[^/]+/)?\.\d+\.(?:tmp|retiring)-\d+",
                                   r".*/serving/\.(?:release_state\.json|models\.config|traffic\.json|"
                                   r"batching\.config)\.[^/]+",
                                   r".*/\.write-test-\d+")]


CODE: list[str] = []  # --code: another tree's conveyor_ml to run (PYTHONPATH), e.g. one with a change applied


def environment(tmp: Path) -> dict:
    return {**os.environ, "TF_USE_LEGACY_KERAS": "1", "TF_CPP_MIN_LOG_LEVEL": "3", "PYTHONWARNINGS": "ignore",
            "PYTHONUNBUFFERED": "1", "TMPDIR": str(tmp), **({"PYTHONPATH": CODE[0]} if CODE else {})}


def conveyor(*args, cwd: Path, tmp: Path, timeout: float = 600) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "conveyor_ml.cli", *map(str, args)], cwd=cwd, text=True,
                          capture_output=True, env=environment(tmp), timeout=timeout)


# -- processes -------------------------------------------------------------------------------------------
def _stat(pid: int) -> tuple[str, int, int, int] | None:
    """(state, ppid, pgrp, start time) of a process, None if it is gone."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None
    return fields[0], int(fields[1]), int(fields[2]), int(fields[19])


def process_tree(root: int) -> dict[int, int]:
    """{pid: start time} of `root`, its descendants and its process group's members."""
    table = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit() and (found := _stat(int(entry.name))):
            table[int(entry.name)] = found
    members, frontier = set(), {root}
    while frontier:
        members |= frontier
        frontier = {pid for pid, (_, ppid, _, _) in table.items() if ppid in frontier} - members
    members |= {pid for pid, (_, _, pgrp, _) in table.items() if pgrp == root}
    return {pid: table[pid][3] for pid in members if pid in table}


def alive(tree: dict[int, int]) -> list[int]:
    """The processes of a tree still running (the same processes: a reused pid does not count)."""
    found = []
    for pid, started in tree.items():
        state = _stat(pid)
        if state and state[3] == started and state[0] not in ("Z", "X"):
            found.append(pid)
    return found


class Run:
    """`conveyor run` in its own process group, its output read line by line with the time it came."""

    def __init__(self, spec: Path, tmp: Path):
        self.started = time.monotonic()
        self.process = subprocess.Popen([sys.executable, "-m", "conveyor_ml.cli", "run", str(spec)],
                                        cwd=spec.parent, env=environment(tmp), start_new_session=True,
                                        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        self.lines: list[tuple[float, str]] = []
        self.reader = threading.Thread(target=self._read, daemon=True)
        self.reader.start()

    def _read(self) -> None:
        for line in self.process.stdout:
            self.lines.append((time.monotonic() - self.started, line.rstrip("\n")))

    def text(self) -> str:
        return "\n".join(line for _, line in self.lines)

    def run_id(self) -> str | None:
        return next((m.group(1) for _, line in self.lines if (m := RUN_LINE.search(line))
                     and "running pipeline" in line), None)

    def phase(self) -> str:
        """Where the run was, from its own progress lines: the step running, or the last one done."""
        text = [line for _, line in list(self.lines)]
        if any(line.startswith("conveyor: run ") and " finished in " in line for line in text):
            return "finished"
        for line in reversed(text):
            if (m := NODE_START.match(line)):
                return m.group(1)
            if (m := NODE_END.match(line)):
                return f"after {m.group(1)}"
        if any("running pipeline" in line for line in text):
            return "DAG starting"
        return "start-up"  # imports, the run lock, data, the TFX package


def stop_at(run: Run, moment: float, stop: tuple[str, str]) -> dict:
    """Sends the stop at `moment` seconds after the run started (or when it exits first); returns what
    happened: the phase, the exit status, and the processes of its tree that outlived it."""
    while time.monotonic() - run.started < moment and run.process.poll() is None:
        time.sleep(0.02)
    tree = process_tree(run.process.pid)
    phase = run.phase()
    name, whom = stop
    exited_first = run.process.poll() is not None
    if not exited_first:
        if whom == "group":
            os.killpg(run.process.pid, getattr(signal, name))
        else:
            run.process.send_signal(getattr(signal, name))
    try:
        status = run.process.wait(timeout=120)
    except subprocess.TimeoutExpired:
        status = None
        os.killpg(run.process.pid, signal.SIGKILL)
        run.process.wait()
    run.reader.join(timeout=10)
    deadline = time.monotonic() + 15
    while alive(tree) and time.monotonic() < deadline:
        time.sleep(0.1)
    survivors = alive(tree)
    for pid in survivors:  # the run's own processes: stopped here so the next moment starts clean
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    return {"phase": phase, "status": status, "exited_first": exited_first, "processes": len(tree),
            "survivors": survivors, "at_s": round(time.monotonic() - run.started, 2)}


# -- checks ----------------------------------------------------------------------------------------------
def version_problems(serving: Path) -> list[str]:
    """Every numbered version directory must be whole: a non-empty saved_model.pb and its variables."""
    problems = []
    for model_dir in sorted(p for p in serving.iterdir() if p.is_dir() and not p.name.startswith(".")) \
            if serving.is_dir() else []:
        for version in sorted(p for p in model_dir.iterdir() if p.name.isdigit()):
            pb = version / "saved_model.pb"
            variables = version / "variables" / "variables.index"
            if not pb.is_file() or pb.stat().st_size == 0 or not variables.is_file():
                problems.append(f"version {model_dir.name}/{version.name} is not a whole SavedModel")
    return problems


def state_problems(serving: Path, after_rerun: bool) -> tuple[list[str], dict]:
    """release_state.json parses, its labels name versions on disk; after the rerun, nothing is left
    unrecorded and models.config and traffic.json say what it says."""
    from conveyor_ml.formats import release_state as releases
    from conveyor_ml.formats import serving_config

    if not (serving / releases.STATE_FILE).is_file():
        return [], {}
    try:
        state = releases.read_state(serving)
    except Exception as exc:  # any failure to read it is the finding
        return [f"release_state.json does not parse: {exc}"], {}
    problems, labels = [], {}
    for name, release in state.models.items():
        labels[name] = dict(release.labels)
        on_disk = release.versions()
        for label, version in release.labels.items():
            if version not in on_disk:
                problems.append(f"release_state.json labels version {version} {label}, which is not on disk")
    if after_rerun:
        if state.unrecorded:
            problems.append(f"release_state.json still carries {len(state.unrecorded)} unrecorded change(s)")
        config = serving_config.read_model_server_config(serving / serving_config.MODELS_CONFIG)
        served = {m.name: dict(m.version_labels) for m in config.model_config_list.config}
        if served != labels:
            problems.append(f"models.config labels {served} differ from release_state.json {labels}")
        traffic = serving_config.read_traffic(serving / serving_config.TRAFFIC_FILE)
        for name, release in state.models.items():
            if traffic.for_model(name) != release.weights:
                problems.append(f"traffic.json weights {traffic.for_model(name)} differ from "
                                f"{release.weights}")
    return problems, labels


def mlmd_problems(workspace: Path, serving: Path, labels: dict) -> list[str]:
    """ML Metadata agrees with the base path: the newest release change left the labels release_state.json
    holds, every change is recorded once, and every version on disk has the Model it was pushed from."""
    import ml_metadata as mlmd
    from ml_metadata.proto import metadata_store_pb2 as pb

    from conveyor_ml.base.names import RELEASE_CHANGE_PROPERTY
    from conveyor_ml.formats import release_state as releases
    from conveyor_ml.metadata.index import MetadataIndex, latest_deployments
    from conveyor_ml.metadata.values import props

    config = pb.ConnectionConfig()
    config.sqlite.filename_uri = str(workspace / "metadata.sqlite")
    config.sqlite.connection_mode = pb.SqliteMetadataSourceConfig.READONLY
    store = mlmd.MetadataStore(config)
    problems = []
    for name, wanted in labels.items():
        rows = latest_deployments(store, name, "local")
        recorded = {props(a)["label"]: int(props(a)["version"]) for a in rows if props(a).get("label")}
        if recorded != wanted:
            problems.append(f"ML Metadata's newest release of {name} is {recorded}, "
                            f"release_state.json {wanted}")
    index = MetadataIndex(store)
    recorders: dict[str, set[int]] = defaultdict(set)
    for artifact in index.artifacts.values():
        change = props(artifact).get(RELEASE_CHANGE_PROPERTY)
        if change:
            recorders[change] |= {i for i in index.producers.get(artifact.id, [])
                                  if index.executions[i].did_work}
    problems += [f"release change {change[:8]} recorded by {len(ids)} executions"
                 for change, ids in recorders.items() if len(ids) > 1]
    owners = index.pushed_versions("local")
    for name in labels:
        for version in releases.versions_on_disk(serving / name):
            if str(version) not in owners:
                problems.append(f"version {name}/{version} is on disk but no ServingPusher execution in ML "
                                "Metadata pushed it (lineage cannot name its model)")
    return problems


def scratch_left(workspace: Path, tmp: Path) -> list[str]:
    """What runs leave only when killed: anything in the temporary directory, and scratch in the workspace."""
    found = [f"$TMPDIR/{p.name}" for p in sorted(tmp.iterdir())]
    for path in sorted(workspace.rglob("*")):
        text = str(path)
        inside = any(p.fullmatch(str(path.parent)) for p in SCRATCH)  # listed with its directory
        if any(p.fullmatch(text) for p in SCRATCH) and not inside:
            found.append(str(path.relative_to(workspace)))
    return found


def abandoned_executions(workspace: Path) -> list[str]:
    """Executions ML Metadata still holds as running (nothing runs after the rerun), and the output
    directories TFX made for them under the pipeline root, which nothing publishes or reads."""
    import ml_metadata as mlmd
    from ml_metadata.proto import metadata_store_pb2 as pb

    from conveyor_ml.metadata.index import MetadataIndex

    config = pb.ConnectionConfig()
    config.sqlite.filename_uri = str(workspace / "metadata.sqlite")
    config.sqlite.connection_mode = pb.SqliteMetadataSourceConfig.READONLY
    index = MetadataIndex(mlmd.MetadataStore(config))
    found = []
    for view in index.executions.values():
        if view.state not in ("running", "new"):
            continue
        found.append(f"ML Metadata holds execution {view.id} ({view.node}) as {view.state}")
        node_dir = workspace / "pipeline_root" / view.node
        for output in sorted(node_dir.glob(f"*/{view.id}")) if node_dir.is_dir() else []:
            if output.parent.name != ".system":
                found.append(f"output directory {output.relative_to(workspace)} of that execution")
    return found


def serve_problems(spec: Path, labels: dict) -> list[str]:
    """`conveyor serve --spec` loads every labelled version of the base path as the kill left it."""
    from conveyor_ml.base.server_process import ServerProcess, ServerStartError

    if not labels:
        return []
    code = {"PYTHONPATH": CODE[0]} if CODE else {}
    with ServerProcess("--spec", str(spec), env={"TF_USE_LEGACY_KERAS": "1", **code}) as server:
        for name, versions in labels.items():
            for label, version in versions.items():
                try:
                    server.wait_available(name, timeout=90, version=version)
                except ServerStartError as exc:
                    return [f"conveyor serve did not serve {name} version {version} ({label}): "
                            f"{str(exc).splitlines()[0]}"]
    return []


def runs_problems(spec: Path, tmp: Path, killed_ids: set[str], rerun_id: str | None,
                  killed_finished: bool) -> tuple[list[str], dict]:
    result = conveyor("runs", "--spec", spec, "--format", "json", cwd=spec.parent, tmp=tmp)
    if result.returncode != 0 or "Traceback" in result.stderr:
        return [f"conveyor runs exited {result.returncode}: {result.stderr.strip()[-300:]}"], {}
    rows = {row["run_id"]: row for row in json.loads(result.stdout)["runs"]}
    problems = []
    statuses = {run_id: rows[run_id]["status"] for run_id in killed_ids if run_id in rows}
    for run_id, status in statuses.items():
        if status == "complete" and not killed_finished:
            problems.append(f"conveyor runs lists the killed run {run_id} as complete")
    if rerun_id is None or rows.get(rerun_id, {}).get("status") != "complete":
        problems.append(f"conveyor runs lists the rerun {rerun_id} as "
                        f"{rows.get(rerun_id, {}).get('status', 'missing')}")
    return problems, statuses


def reader_problems(spec: Path, tmp: Path) -> list[str]:
    problems = []
    for args in (("lineage", "--format", "json"), ("models",), ("models", "--format", "json")):
        result = conveyor(*args, "--spec", spec, cwd=spec.parent, tmp=tmp)
        if result.returncode != 0 or "Traceback" in result.stderr:
            problems.append(f"conveyor {' '.join(args)} exited {result.returncode}: "
                            f"{result.stderr.strip().splitlines()[-1:] or ''}")
    return problems


def all_ran(workspace: Path, run_id: str) -> bool:
    """Whether every step of the run completed (or was cached): a run killed after its last step is done."""
    import ml_metadata as mlmd
    from ml_metadata.proto import metadata_store_pb2 as pb

    from conveyor_ml.metadata.index import MetadataIndex

    config = pb.ConnectionConfig()
    config.sqlite.filename_uri = str(workspace / "metadata.sqlite")
    config.sqlite.connection_mode = pb.SqliteMetadataSourceConfig.READONLY
    index = MetadataIndex(mlmd.MetadataStore(config))
    mine = [v for v in index.executions.values() if v.run_id == run_id]
    return bool(mine) and all(v.state in ("complete", "cached") for v in mine) and \
        any(v.node == "ServingPusher" for v in mine)


def run_ids(workspace: Path) -> set[str]:
    import ml_metadata as mlmd
    from ml_metadata.proto import metadata_store_pb2 as pb

    if not (workspace / "metadata.sqlite").is_file():
        return set()
    config = pb.ConnectionConfig()
    config.sqlite.filename_uri = str(workspace / "metadata.sqlite")
    config.sqlite.connection_mode = pb.SqliteMetadataSourceConfig.READONLY
    return {c.name for c in mlmd.MetadataStore(config).get_contexts_by_type("pipeline_run")}


# -- the probe -------------------------------------------------------------------------------------------
class Probe:
    def __init__(self, root: Path):
        self.root = root
        self.directory = root / "run"  # the workspace's path never changes: MLMD and models.config name it
        self.spec = self.directory / "spec.yaml"
        self.workspace = self.directory / "workspace"
        self.serving = self.workspace / "serving"
        self.tmp = root / "tmp"
        self.snapshots = root / "snapshots"

    def write_spec(self) -> None:
        self.directory.mkdir(parents=True, exist_ok=True)
        self.spec.write_text(f"extends: {ROOT / 'pipelines' / 'mnist.yaml'}\nworkspace: {self.workspace}\n"
                             f"data:\n  schema: {ROOT / 'schemas' / 'mnist' / 'schema.pbtxt'}\n"
                             f"metadata:\n  sqlite: {self.workspace / 'metadata.sqlite'}\n"
                             f"components:\n  trainer: {{train_steps: {TRAIN_STEPS}}}\n")

    def restore(self, scenario: str) -> None:
        shutil.rmtree(self.workspace, ignore_errors=True)
        shutil.rmtree(self.tmp, ignore_errors=True)
        self.tmp.mkdir(parents=True)
        if scenario == "second":
            shutil.copytree(self.snapshots / "second", self.workspace, symlinks=True)

    def clean_run(self) -> float:
        started = time.monotonic()
        result = conveyor("run", self.spec, cwd=self.directory, tmp=self.tmp)
        if result.returncode != 0:
            raise RuntimeError(f"a clean run failed:\n{result.stdout[-2000:]}\n{result.stderr[-2000:]}")
        return time.monotonic() - started

    def prepare(self) -> dict[str, float]:
        """Each scenario's clean-run duration, and the snapshot the second starts from."""
        shutil.rmtree(self.root, ignore_errors=True)
        self.write_spec()
        self.restore("first")
        first = self.clean_run()
        result = conveyor("data", "add-span", "--spec", self.spec, cwd=self.directory, tmp=self.tmp)
        if result.returncode != 0:
            raise RuntimeError(result.stderr)
        self.snapshots.mkdir(parents=True)
        shutil.copytree(self.workspace, self.snapshots / "second", symlinks=True)
        self.restore("second")
        second = self.clean_run()
        left = scratch_left(self.workspace, self.tmp)
        if left:
            raise RuntimeError(f"a clean run left scratch behind (the check would misfire): {left}")
        return {"first": first, "second": second}

    def moment(self, scenario: str, at: float, stop: tuple[str, str]) -> dict:
        self.restore(scenario)
        before = run_ids(self.workspace)
        run = Run(self.spec, self.tmp)
        outcome = stop_at(run, at, stop)
        violations = [f"a process of the killed run outlived it: {pid}" for pid in outcome["survivors"]]
        if stop[0] != "SIGKILL" and not outcome["exited_first"] and outcome["status"] not in (130, 143):
            violations.append(f"{stop[0]} ended the run with status {outcome['status']}, not 130/143")
        if stop[0] != "SIGKILL" and "Traceback" in run.text():
            violations.append(f"{stop[0]} printed a traceback")
        # The base path as the kill left it, as a server polling it sees it.
        violations += version_problems(self.serving)
        problems, labels = state_problems(self.serving, after_rerun=False)
        violations += problems
        if not problems:
            violations += serve_problems(self.spec, labels)
        served = labels.get(MODEL, {}) if not problems else {}
        killed_ids = run_ids(self.workspace) - before
        # The next run, and what every reader makes of the store and the base path after it.
        rerun_started = time.monotonic()
        rerun = conveyor("run", self.spec, cwd=self.directory, tmp=self.tmp)
        rerun_s = time.monotonic() - rerun_started
        if rerun.returncode != 0:
            violations.append(f"the rerun exited {rerun.returncode}: "
                              f"{(rerun.stderr.strip().splitlines() or [''])[-1][:300]}")
        rerun_id = next((m.group(1) for line in rerun.stdout.splitlines()
                         if "running pipeline" in line and (m := RUN_LINE.search(line))), None)
        killed_ids -= {rerun_id}
        main_id = run.run_id()
        finished = bool(main_id) and self._all_ran(main_id)
        problems, statuses = runs_problems(self.spec, self.tmp, killed_ids, rerun_id, finished)
        violations += problems
        violations += version_problems(self.serving)
        problems, labels = state_problems(self.serving, after_rerun=True)
        violations += problems
        if not problems and labels:
            violations += mlmd_problems(self.workspace, self.serving, labels)
        violations += reader_problems(self.spec, self.tmp)
        left = scratch_left(self.workspace, self.tmp)
        violations += [f"left after the rerun: {path}" for path in left]
        violations += [f"after the rerun: {what}" for what in abandoned_executions(self.workspace)]
        repaired = [line for line in rerun.stdout.splitlines() if line.startswith("conveyor: repaired")]
        return {"scenario": scenario, "moment_s": round(at, 2), "signal": stop[0], "to": stop[1], **outcome,
                "killed_runs": statuses, "run_finished_before_kill": finished, "rerun_s": round(rerun_s, 1),
                "rerun_status": rerun.returncode, "repairs": repaired, "versions": sorted(
                    p.name for p in (self.serving / MODEL).iterdir() if p.name.isdigit())
                if (self.serving / MODEL).is_dir() else [], "labels": labels.get(MODEL, {}),
                "served": served, "violations": violations,
                "killed_output_tail": run.text().splitlines()[-8:]}

    def _all_ran(self, run_id: str) -> bool:
        try:
            return all_ran(self.workspace, run_id)
        except Exception:  # a store the kill left unreadable: the readers report it
            return False


def schedule(moments: int, durations: dict[str, float],
             seed: int) -> list[tuple[str, float, tuple[str, str]]]:
    """Half the moments per scenario, one in each equal slice of its clean run (a seeded offset within it),
    the stops taken in turn."""
    rng = random.Random(seed)
    plan = []
    for index, scenario in enumerate(durations):
        count = moments // len(durations) + (1 if index < moments % len(durations) else 0)
        for k in range(count):
            plan.append((scenario, durations[scenario] * (k + rng.random()) / count))
    rng.shuffle(plan)
    return [(scenario, at, STOPS[i % len(STOPS)]) for i, (scenario, at) in enumerate(plan)]


def kind(violation: str) -> str:
    """A violation with what differs from kill to kill (ids, random names, numbers) replaced by `*`."""
    text = re.sub(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}", "*", violation)
    text = re.sub(r"(beam-pipeline-temp|__autograph_generated_file)[\w]+", r"\1*", text)
    text = re.sub(r"\b(Trainer|StatisticsGen|ExampleValidator|InfraValidator|Evaluator|Quantizer|"
                  r"ServingPusher|ImportExampleGen|DriftGate)\b", "<step>", text)
    text = re.sub(r"\d+", "*", text)
    return re.sub(r"pipeline_root/<step>/(?!\.system)[^/ ]+/\*", "pipeline_root/<step>/<output>/*", text)


def markdown(document: dict) -> str:
    info, figures = document.get("machine") or machine(), document
    results = figures["results"]
    command = f"python -m benchmarks.pipeline_kills --moments {figures['moments']} --seed {figures['seed']}"
    label = f" ({figures['code_label']})" if figures.get("code_label") else ""
    lines = ["# `conveyor run` killed at seeded moments", "",
             f"{info['date']}, {info['cores']} cores ({info['cpu']}), shared with other work. "
             f"Source: `{command}`{label}, {figures['seconds']:.0f} s in all.", "",
             f"Clean runs (`train_steps: {TRAIN_STEPS}`, every other setting the default pipeline's): "
             + ", ".join(f"{SCENARIOS[s]} {d:.1f} s" for s, d in figures["durations"].items()) + ". "
             "Each moment is a seeded offset in one of equal slices of its scenario's clean run; the phase "
             "is the step the run had printed it was in (or had just finished) when the signal was sent.", "",
             "Checked after each kill: no process the run started outlives it; every version directory is a "
             "whole SavedModel; release_state.json parses and names only versions on disk; `conveyor serve "
             "--spec` serves every labelled version. After the rerun: it exits 0; `conveyor runs` shows the "
             "killed run not complete (unless all its steps had run) and the rerun complete; versions whole, "
             "nothing temporary in the base path; release_state.json has no unrecorded change and agrees "
             "with models.config, traffic.json and ML Metadata (labels of the newest release change, each "
             "change recorded once, a pushing ServingPusher for every version on disk); `conveyor lineage "
             "--format json`, `conveyor models` (table and JSON) exit 0 without a traceback; nothing left in "
             "$TMPDIR, in TFX's per-execution `.temp`/stateful directories or other scratch places, no step "
             "left RUNNING in ML Metadata and no output directory of one.", "",
             "| # | scenario | moment (s) | signal | phase reached | exit | served after the kill | "
             "killed run in `conveyor runs` | rerun | versions / labels after | violations |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for i, row in enumerate(results, 1):
        listed = ", ".join(sorted(set(row["killed_runs"].values()))) or "not recorded"
        served = ", ".join(f"v{v} {label}" for label, v in sorted(row.get("served", {}).items())) or "-"
        violations = "; ".join(v.replace("|", "\\|") for v in row["violations"]) or "none"
        phase = row["phase"] + (" (exited first)" if row["exited_first"] else "")
        lines.append(f"| {i} | {row['scenario']} | {row['moment_s']:.1f} | {row['signal']} to the "
                     f"{row['to']} | {phase} | {row['status']} | "
                     f"{served} | {listed} | exit {row['rerun_status']}, {row['rerun_s']:.0f} s | "
                     f"{','.join(row['versions']) or '-'} / {json.dumps(row['labels'])} | {violations} |")
    total = sum(len(row["violations"]) for row in results)
    lines += ["", f"**{len(results)} kills, {total} violations** "
                  f"({sum(1 for row in results if row['violations'])} kills with any)."]
    kinds = defaultdict(set)
    for i, row in enumerate(results, 1):
        for violation in row["violations"]:
            kinds[kind(violation)].add(i)
    if kinds:
        lines += ["", "| violation (ids and names as `*`) | kills |", "| --- | --- |"]
        for text, rows in sorted(kinds.items(), key=lambda item: (-len(item[1]), item[0])):
            shown = text.replace("|", "\\|")
            lines.append(f"| {shown} | {len(rows)} (#{', #'.join(map(str, sorted(rows)))}) |")
    if figures.get("skipped"):
        lines.append(f"{figures['skipped']} moment(s) not run: the probe's time bound was reached.")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--moments", type=int, default=12)
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--root", type=Path, default=Path("/tmp/kill-pipeline-probe"))
    parser.add_argument("--budget-s", type=float, default=25 * 60, help="start no moment after this long")
    parser.add_argument("--keep", action="store_true", help="keep the root directory afterwards")
    parser.add_argument("--code", type=Path, help="run the conveyor_ml of this tree (its conveyor_ml/ must "
                        "hold pipelines/ and components/, e.g. as links), not the installed one")
    parser.add_argument("--name", default=NAME, help="results/<name>.md and .json")
    parser.add_argument("--code-label", default="", help="what --code holds, for the results")
    args = parser.parse_args(argv)
    if args.code:
        CODE[:] = [str(args.code.resolve())]
    started = time.monotonic()
    probe = Probe(args.root)
    durations = probe.prepare()
    print(f"clean runs: {', '.join(f'{s} {d:.1f}s' for s, d in durations.items())}", flush=True)
    results, skipped = [], 0
    for scenario, at, stop in schedule(args.moments, durations, args.seed):
        if time.monotonic() - started > args.budget_s:
            skipped += 1
            continue
        row = probe.moment(scenario, at, stop)
        results.append(row)
        print(f"{scenario} {at:5.1f}s {stop[0]}→{stop[1]}: {row['phase']}, exit {row['status']}; "
              f"{len(row['violations'])} violation(s) {row['violations']}", flush=True)
    document = {"moments": args.moments, "seed": args.seed, "train_steps": TRAIN_STEPS,
                "durations": durations,
                "seconds": time.monotonic() - started, "skipped": skipped, "code": str(args.code or ROOT),
                "code_label": args.code_label,
                "results": results}
    write_results(args.name, document, markdown(document))
    if not args.keep:
        shutil.rmtree(args.root, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
