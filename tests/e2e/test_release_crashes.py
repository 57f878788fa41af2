"""Crash consistency of releases: push (with retention), promote and rollback, each SIGKILLed at seeded
random moments of its run (30 each in the suite; CONVEYOR_RELEASE_KILLS sets the number, and
benchmarks/release_reliability.py runs 100 each), against one serving base path that one `conveyor serve`
serves throughout.

Each operation is a real process (a fork of tests/release_crash_lab.py running the ServingPusher between
TFX's own register and publish calls, or `conveyor promote|rollback`), killed at an offset drawn uniformly
over the time the operation takes (re-measured from every run that finishes). After every kill:

- before anything repairs it: release_state.json parses and holds exactly the state before or the state
  the operation makes (computed here from the release rules, not by the release code); models.config and
  traffic.json parse, never weigh a label models.config lacks, and label only whole versions; no numbered
  directory is partial;
- then the next command (`conveyor status`) repairs what is left, saying so in one line per repair: the
  served files equal the state, no temporary file is left, and ML Metadata holds every committed change
  exactly once, its newest record equal to the labels and weights on disk;
- and a server reading that base path answers every request (REST and gRPC) with 0 failures.

Set CONVEYOR_RELIABILITY_REPORT to a file to get the figures as JSON (benchmarks/reliability.py does).
"""
from __future__ import annotations

import json
import os
import random
import subprocess
import sys
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import pytest
import requests
from tensorflow_serving.apis import predict_pb2, prediction_service_pb2_grpc

from conveyor_ml.base.server_process import ServerProcess
from conveyor_ml.formats import release_state as releases
from conveyor_ml.formats import serving_config
from conveyor_ml.metadata import store as metadata
from conveyor_ml.metadata.index import deployment_snapshots
from conveyor_ml.metadata.values import props
from tests.conftest import ROOT, write_spec
from tests.tiny_models import write_tiny_model

pytestmark = pytest.mark.slow
MODEL = "tiny"
KILLS = int(os.environ.get("CONVEYOR_RELEASE_KILLS", "30"))  # per operation
CANARY_WEIGHT = 20
KEEP_VERSIONS = 2
PAUSE = 0.01  # between a client's requests: steady traffic that leaves the 2 cores to the releases
SEEDS = {"push": 1601, "promote": 1602, "rollback": 1603}
REPORT: dict = {}


# -- the lab, the server and the load ---------------------------------------------------------------------
class CrashLab:
    def __init__(self, spec: Path, export: Path):
        self.process = subprocess.Popen([sys.executable, "-m", "tests.release_crash_lab", str(spec), str(export)],
                                        cwd=ROOT, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
                                        env={**os.environ, "PYTHONWARNINGS": "ignore"})
        assert json.loads(self.process.stdout.readline()) == {"ready": True}

    def run(self, **request) -> dict:
        self.process.stdin.write(json.dumps(request) + "\n")
        self.process.stdin.flush()
        return json.loads(self.process.stdout.readline())

    def close(self) -> None:
        self.process.stdin.close()
        self.process.wait(timeout=30)


@dataclass
class Load:
    """Unversioned predictions over REST and gRPC, as fast as the server answers, counted."""

    rest_url: str
    grpc_target: str
    answered: Counter = field(default_factory=Counter)
    failures: list = field(default_factory=list)
    stop: threading.Event = field(default_factory=threading.Event)

    def rest(self) -> None:
        session = requests.Session()
        while not self.stop.is_set():
            try:
                response = session.post(f"{self.rest_url}/v1/models/{MODEL}:predict",
                                        json={"instances": [[1.0, 2.0, 3.0]]}, timeout=30)
                if response.status_code == 200:
                    self.answered["rest"] += 1
                    self.stop.wait(PAUSE)
                else:
                    self.failures.append(("rest", response.status_code, response.text[:200]))
            except requests.RequestException as exc:
                self.failures.append(("rest", repr(exc)))

    def grpc(self) -> None:
        stub = prediction_service_pb2_grpc.PredictionServiceStub(grpc.insecure_channel(self.grpc_target))
        request = predict_pb2.PredictRequest()
        request.model_spec.name = MODEL
        request.inputs["x"].CopyFrom(_tensor([[1.0, 2.0, 3.0]]))
        while not self.stop.is_set():
            try:
                stub.Predict(request, timeout=30)
                self.answered["grpc"] += 1
                self.stop.wait(PAUSE)
            except grpc.RpcError as exc:
                self.failures.append(("grpc", exc.code().name, exc.details()))


def _tensor(values):
    import tensorflow as tf

    return tf.make_tensor_proto(values, dtype=tf.float32)


@dataclass
class Bench:
    lab: CrashLab
    spec: Path
    base: Path
    export: Path
    server: ServerProcess
    load: Load
    metadata_spec: object
    committed: int = 0  # release changes of the model that took effect, so far
    pushes: int = 1  # of those, pushes (the fixture's first one included)
    repaired_records: int = 0  # of those, recorded in MLMD by a repair


@pytest.fixture(scope="module")
def bench(tmp_path_factory):
    directory = tmp_path_factory.mktemp("crashes")
    export = write_tiny_model(directory / "export")
    spec = write_spec(directory, **{"components.serving_pusher.model_name": MODEL,
                                    "components.serving_pusher.canary_weight": CANARY_WEIGHT})
    from conveyor_ml.base.spec import load_spec

    loaded = load_spec(spec)
    lab = CrashLab(spec, export)
    first = lab.run(op="push", mode="direct", keep=KEEP_VERSIONS)
    assert first["code"] == 0, first
    base = loaded.serving_base
    server = ServerProcess("--model_config_file", str(base / serving_config.MODELS_CONFIG),
                           "--model_config_file_poll_wait_seconds", "0.2", "--file_system_poll_wait_seconds", "0.2")
    load = Load(server.rest_url, server.grpc_target)
    state = Bench(lab, spec, base, export, server, load, loaded.metadata, committed=1)
    threads = []
    try:
        server.wait_available(MODEL, version=1)
        REPORT["server_rss_mib_start"] = _rss_mib(server.pid)
        threads = [threading.Thread(target=load.rest), threading.Thread(target=load.grpc)]
        for thread in threads:
            thread.start()
        yield state
    finally:
        load.stop.set()
        for thread in threads:
            thread.join(timeout=60)
        REPORT["server_rss_mib_end"] = _rss_mib(server.pid)
        REPORT["versions_pushed"] = state.pushes
        server.stop()
        lab.close()
        REPORT["requests"] = dict(load.answered)
        REPORT["failed_requests"] = len(load.failures)
        if os.environ.get("CONVEYOR_RELIABILITY_REPORT"):
            Path(os.environ["CONVEYOR_RELIABILITY_REPORT"]).write_text(json.dumps(REPORT, indent=2))


def _rss_mib(pid: int) -> float | None:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except OSError:
        return None
    return None


# -- what the disk holds ----------------------------------------------------------------------------------
@dataclass(frozen=True)
class Release:
    labels: dict
    weights: dict
    history: tuple

    @classmethod
    def of(cls, model: releases.ModelRelease) -> Release:
        return cls(dict(model.labels), dict(model.weights), tuple(model.history))


def _files(directory: Path) -> dict[str, int]:
    return {str(p.relative_to(directory)): p.stat().st_size for p in directory.rglob("*") if p.is_file()}


def _check_versions_whole(bench: Bench) -> list[int]:
    """Every numbered directory is a whole copy of the model (never partial); returns the versions."""
    whole = _files(bench.export)
    on_disk = releases.versions_on_disk(bench.base / MODEL)
    for version, path in on_disk.items():
        assert _files(path) == whole, f"version {version} is partial: {sorted(_files(path))}"
    return sorted(on_disk)


def _served(bench: Bench) -> tuple[dict, dict]:
    config = serving_config.read_model_server_config(bench.base / serving_config.MODELS_CONFIG)
    [entry] = [m for m in config.model_config_list.config if m.name == MODEL]
    labels = dict(entry.version_labels)
    assert sorted(entry.model_version_policy.specific.versions) == sorted(set(labels.values()))
    return labels, serving_config.read_traffic(bench.base / serving_config.TRAFFIC_FILE).for_model(MODEL)


def _hidden(bench: Bench) -> list[str]:
    found = [p.name for p in bench.base.iterdir() if p.name.startswith(".") and p.name != releases.LOCK_FILE]
    return found + [p.name for p in (bench.base / MODEL).iterdir() if p.name.startswith(".")]


# -- the release rules, written out independently of the release code -------------------------------------
def expected_after(before: Release, on_disk: list[int], op: dict) -> Release:
    labels, weights, history = dict(before.labels), dict(before.weights), list(before.history)
    if op["op"] == "push":
        new = max([0, *on_disk, *labels.values(), *history]) + 1
        if op["mode"] == "direct" or "stable" not in labels:
            labels, weights = {"stable": new}, {"stable": 100}
            history.append(new)
        else:
            labels["canary"] = new
            weights = {"stable": 100 - CANARY_WEIGHT, "canary": CANARY_WEIGHT}
        return Release(labels, weights, tuple(history))
    argv = op["argv"]
    if argv[0] == "promote":
        if "--weight" in argv:
            weight = int(argv[argv.index("--weight") + 1])
            return Release(labels, {"stable": 100 - weight, "canary": weight}, tuple(history))
        stable = labels["canary"]
        return Release({"stable": stable}, {"stable": 100},
                       tuple(history if history and history[-1] == stable else [*history, stable]))
    if "--to" in argv:
        target = int(argv[argv.index("--to") + 1])
    else:
        earlier = [v for v in history if v in on_disk]
        while earlier and earlier[-1] == labels["stable"]:
            earlier.pop()
        target = earlier[-1]
    if target in history:
        history = history[:len(history) - history[::-1].index(target)]
    else:
        history.append(target)
    return Release({"stable": target}, {"stable": 100}, tuple(history))


def retired_by(after: Release, on_disk: list[int], new: int, keep: int) -> set[int]:
    versions = sorted({*on_disk, new})
    return set(versions) - set(after.labels.values()) - set(versions[-keep:])


# -- one kill and its checks ------------------------------------------------------------------------------
def run_and_check(bench: Bench, op: dict, kill_after: float | None, outcomes: Counter) -> dict:
    state_before = releases.read_state(bench.base)
    before = Release.of(state_before.release(MODEL))
    disk_before = _check_versions_whole(bench)
    expected = expected_after(before, disk_before, op)
    assert expected != before, f"{op} would change nothing: not a useful kill"

    result = bench.lab.run(**op, kill_after=kill_after)
    if kill_after is None or not result["killed"]:
        assert not result["killed"] and result["code"] == 0, result

    # Straight after the kill, before anything repairs it.
    state = releases.read_state(bench.base)
    now = Release.of(state.release(MODEL))
    assert now in (before, expected), (op, before, expected, now)
    served_labels, served_weights = _served(bench)
    assert set(served_weights) <= set(served_labels), ("traffic.json weighs a label models.config lacks",
                                                       served_labels, served_weights)
    assert served_labels in (before.labels, now.labels)
    on_disk = _check_versions_whole(bench)
    assert set(served_labels.values()) | set(now.labels.values()) <= set(on_disk)
    stale = (served_labels, served_weights) != (now.labels, now.weights)
    leftovers = _hidden(bench)
    committed = now == expected
    bench.committed += committed
    bench.pushes += committed and op["op"] == "push"

    # The next command repairs it and says so.
    # (--url: no server there, so status answers at once; the server's own view is the load's business)
    repair = bench.lab.run(op="command", argv=["status", "--format", "json", "--url", "http://127.0.0.1:9"])
    assert repair["code"] == 0 and not repair["killed"], repair
    lines = repair["stderr"].splitlines()
    assert all(line.startswith("conveyor: repaired: ") for line in lines), lines
    if stale:
        assert any("rewrote models.config and traffic.json" in line for line in lines), lines
    if leftovers:  # temporaries of the killed process (the lab's children leave nothing else)
        assert any("removed" in line for line in lines), (leftovers, lines)
    recorded_now = sum("recorded it now" in line for line in lines)
    bench.repaired_records += recorded_now

    state = releases.read_state(bench.base)
    assert state.unrecorded == [] and Release.of(state.release(MODEL)) == now
    assert _served(bench) == (now.labels, now.weights)
    assert _hidden(bench) == []
    on_disk = _check_versions_whole(bench)
    if op["op"] == "push" and committed:
        new = max(expected.labels.values())
        assert not (retired_by(expected, disk_before, new, op["keep"]) & set(on_disk)), "retention left a retired version"
    store = metadata.open_store(bench.metadata_spec, read_only=True)
    snapshots = deployment_snapshots(store, MODEL, target="local")
    assert len(snapshots) == bench.committed, "every change that took effect is recorded exactly once"
    latest = [props(a) for a in snapshots[-1].deployments]
    assert {(int(p["version"]), p["label"], p["traffic_percent"]) for p in latest if p["label"]} == \
        {(version, label, now.weights.get(label, 0)) for label, version in now.labels.items()}
    assert sum("repaired" in props(s.execution) for s in snapshots) == bench.repaired_records
    del store

    if not result["killed"]:
        outcomes["finished before the kill" if kill_after is not None else "not killed (setup)"] += 1
    elif not committed:
        outcomes["killed before the commit"] += 1
    elif recorded_now:
        outcomes["killed after the commit, before the MLMD record: repaired"] += 1
    else:
        outcomes["killed after the MLMD record"] += 1
    return result


def series(bench: Bench, name: str, next_op, setup) -> None:
    """KILLS kills of operations `next_op(state)` chooses, at uniform offsets over the measured duration."""
    rng = random.Random(SEEDS[name])
    outcomes: Counter = Counter()
    failures_before, answered_before = len(bench.load.failures), sum(bench.load.answered.values())
    started = time.monotonic()
    duration = None
    kills = attempts = 0
    while kills < KILLS:
        attempts += 1
        assert attempts < 3 * KILLS, f"only {kills} kills in {attempts} attempts"
        for op in setup(releases.read_state(bench.base).release(MODEL)):
            run_and_check(bench, op, None, outcomes)
        op = next_op(releases.read_state(bench.base).release(MODEL), rng)
        if duration is None:  # measured once, then from every run that finishes before its kill
            duration = run_and_check(bench, op, None, outcomes)["seconds"]
            continue
        result = run_and_check(bench, op, rng.uniform(0, duration), outcomes)
        if result["killed"]:
            kills += 1
        else:
            duration = result["seconds"]
    seconds = time.monotonic() - started
    failed = bench.load.failures[failures_before:]
    assert failed == [], failed[:5]
    assert sum(bench.load.answered.values()) - answered_before > 100
    REPORT[name] = {"kills": kills, "attempts": attempts, "violations": 0, "seconds": round(seconds, 1),
                    "operation_ms": round(duration * 1000, 1), "outcomes": dict(outcomes),
                    "requests_during": sum(bench.load.answered.values()) - answered_before, "failed_requests": 0}
    # Every region of the operation was hit: kills before the commit, and after it, with and without a record.
    assert outcomes["killed before the commit"] > 0, outcomes
    assert outcomes["killed after the commit, before the MLMD record: repaired"] > 0, outcomes


def test_push_with_retention_survives_sigkill_anywhere(bench):
    def next_op(release, rng):
        return {"op": "push", "mode": "direct" if rng.random() < 0.25 else "canary", "keep": KEEP_VERSIONS}

    series(bench, "push", next_op, lambda release: [])


def test_promote_survives_sigkill_anywhere(bench):
    def setup(release):
        return [] if "canary" in release.labels else [{"op": "push", "mode": "canary", "keep": 4}]

    def next_op(release, rng):
        weights = [w for w in (30, 50, 70, 90) if release.weights.get("canary") != w]
        argv = ["promote", MODEL] + ([] if rng.random() < 0.4 else ["--weight", str(rng.choice(weights))])
        return {"op": "command", "argv": argv}

    series(bench, "promote", next_op, setup)


def test_rollback_survives_sigkill_anywhere_and_never_re_promotes(bench):
    def setup(release):
        return [{"op": "push", "mode": "direct", "keep": 4}] * max(0, 3 - len(release.versions()))

    def next_op(release, rng):
        on_disk = release.versions()
        earlier = [v for v in release.history if v in on_disk and v != release.labels["stable"]]
        if earlier and rng.random() < 0.6:
            return {"op": "command", "argv": ["rollback", MODEL]}
        target = rng.choice([v for v in on_disk if v != release.labels["stable"]])
        return {"op": "command", "argv": ["rollback", MODEL, "--to", str(target)]}

    series(bench, "rollback", next_op, setup)
    # After all those torn rollbacks, a plain rollback still steps back, never to the version it left.
    state = releases.read_state(bench.base).release(MODEL)
    if [v for v in state.history if v in state.versions() and v != state.labels["stable"]]:
        left = state.labels["stable"]
        run_and_check(bench, {"op": "command", "argv": ["rollback", MODEL]}, None, Counter())
        assert releases.read_state(bench.base).release(MODEL).labels["stable"] != left
