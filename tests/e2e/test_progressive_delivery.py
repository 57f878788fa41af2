"""Progressive delivery against one real `conveyor serve` on 127.0.0.1, in a copy of the canary pipeline's
workspace (version 1 stable, version 2 trained with more steps):

1. version 2 shadows live traffic, then an analysed canary of it (sticky by X-User-Id) walks every step to
   promotion; MLMD holds the timeline and `conveyor lineage` shows it;
2. a candidate that disagrees on purpose (classes shifted by one) and is slow (100 ms in the graph) shadows
   at 100 %: measured as disagreeing, its queue saturates and drops copies, live requests stay fast and
   all succeed;
3. a canary whose graph fails on bright images is rolled back at the first breach, with no failed request
   on the stable version.
"""
from __future__ import annotations

import subprocess
import sys
import threading
import time
from collections import defaultdict

import numpy as np
import pytest
import requests

from conveyor_ml.base.server_process import ServerProcess
from conveyor_ml.base.spec import CanaryAnalysisSettings, load_spec
from conveyor_ml.formats import release_state as releases
from conveyor_ml.operations.monitor import scrape
from tests.conftest import ROOT, run_conveyor, write_spec

pytestmark = pytest.mark.slow
USERS = [f"user-{i}" for i in range(40)]


@pytest.fixture(scope="module")
def spec(canary_pipeline, tmp_path_factory):
    """A copy of the canary pipeline's workspace with version 1 stable at 100 % and version 2 unlabelled."""
    import shutil

    directory = tmp_path_factory.mktemp("progressive")
    shutil.copytree(canary_pipeline.workspace, directory / "workspace")
    path = write_spec(directory)
    serving = directory / "workspace" / "serving"
    with releases.locked(serving):
        state = releases.read_state(serving)
        state.models["mnist"] = releases.ModelRelease("mnist", serving, {"stable": 1}, {"stable": 100}, [1])
        releases.commit(state)
        releases.sync_served_files(state)
    return path


@pytest.fixture(scope="module")
def images(digits_eval):
    return digits_eval.images


@pytest.fixture(scope="module")
def misbehaving(spec, images, tmp_path_factory):
    """The disagreeing-and-slow and the failing models, built from version 1's export in a child process;
    the failing one refuses images brighter than the median of the test images (about half of them)."""
    out = tmp_path_factory.mktemp("misbehaving")
    export = load_spec(spec).serving_base / "mnist" / "1"
    threshold = float(np.median(images.reshape(len(images), -1).mean(axis=1)))
    result = subprocess.run([sys.executable, "-m", "tests.progressive_models", str(export), str(out),
                             "--delay-ms", "100", "--fail-above", str(threshold)], cwd=ROOT, capture_output=True,
                            text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    return {"disagreeing": out / "disagreeing", "failing": out / "failing", "threshold": threshold}


@pytest.fixture(scope="module")
def server(spec):
    with ServerProcess("--spec", str(spec)) as process:
        process.wait_available("mnist", version=1)
        yield process


def predict(server, image, headers=None, session=requests):
    return session.post(f"{server.rest_url}/v1/models/mnist:predict", json={"instances": [image.tolist()]},
                        headers=headers or {}, timeout=30)


class Traffic(threading.Thread):
    """Requests in a loop until stopped, every `unkeyed_every`-th one without the user header (7: coprime
    with the 40 users, so each user sends keyed requests); records per user the versions that answered, in
    order, and every failure."""

    def __init__(self, server, images, users=USERS, unkeyed_every=7):
        super().__init__(daemon=True)
        self.server, self.images, self.users, self.unkeyed_every = server, images, users, unkeyed_every
        self.by_user: dict[str, list[int]] = defaultdict(list)
        self.unkeyed: list[int] = []
        self.failures: list[tuple[int, str]] = []
        self.stop = threading.Event()

    def run(self):
        session = requests.Session()
        sent = 0
        while not self.stop.is_set():
            user = self.users[sent % len(self.users)]
            keyed = sent % self.unkeyed_every != 0
            response = predict(self.server, self.images[sent % len(self.images)],
                               {"X-User-Id": user} if keyed else {}, session)
            sent += 1
            if response.status_code != 200:
                self.failures.append((response.status_code, response.text[:200]))
                continue
            version = int(response.headers["X-Model-Version"])
            (self.by_user[user] if keyed else self.unkeyed).append(version)


def _mlmd(spec):
    from conveyor_ml.metadata import store as metadata

    return metadata.open_store(load_spec(spec).metadata)


def test_a_shadowed_then_analysed_canary_walks_every_step_to_promotion(spec, server, images):
    from conveyor_ml.metadata.values import props
    from conveyor_ml.operations.progressive_delivery import start_shadow

    start_shadow(load_spec(spec), "mnist", 2, 100)
    traffic = Traffic(server, images)
    traffic.start()
    try:
        deadline = time.monotonic() + 30  # until the server mirrors to version 2
        while time.monotonic() < deadline:
            shadow = requests.get(f"{server.rest_url}/v1/models/mnist/monitoring", timeout=5).json()["shadow"]
            if shadow["versions"].get("2", {}).get("requests", 0) >= 20:
                break
            time.sleep(0.3)
        analysis = subprocess.run(
            [sys.executable, "-m", "conveyor_ml.cli", "release", "canary", "mnist", "--version", "2", "--steps",
             "20,50,100", "--interval", "3s", "--min-requests", "10", "--max-p99-ratio", "5",
             "--min-agreement", "80%", "--route-key", "X-User-Id", "--url", server.rest_url, "--spec", str(spec)],
            cwd=ROOT, capture_output=True, text=True, timeout=180)
    finally:
        traffic.stop.set()
        traffic.join(timeout=30)
    assert analysis.returncode == 0, analysis.stdout[-3000:] + analysis.stderr[-3000:]
    output = analysis.stdout
    print(output)
    assert "shadow phase of version 2 ended: shadowed on" in output
    assert [line.split(": ")[2] for line in output.splitlines() if line.startswith("conveyor: step ")] == [
        "canary 2 at 20% for 3s", "canary 2 at 50% for 3s", "canary 2 at 100% for 3s"]
    assert output.count("-> pass") == 3 and "promoted: version 2 is stable (100%)" in output
    assert traffic.failures == []
    release = releases.read_release(load_spec(spec).serving_base, "mnist")
    assert release.labels == {"stable": 2} and release.weights == {"stable": 100} and release.analysis is None

    # Sticky: a user moves from stable to the canary at most once, never back, while the canary rises.
    moved = 0
    for user, versions in traffic.by_user.items():
        switches = [i for i in range(1, len(versions)) if versions[i] != versions[i - 1]]
        assert len(switches) <= 1 and (not switches or versions[switches[0]] == 2), (user, versions)
        moved += bool(switches)
    assert moved >= 5 and len(traffic.by_user) == len(USERS)
    assert {1, 2} <= set(traffic.unkeyed)  # without the header: split by weight, both versions seen

    # The timeline in ML Metadata: one context, every step, measurement and the verdict, in order.
    store = _mlmd(spec)
    [context] = [c for c in store.get_contexts_by_type("conveyor.Release") if props(c).get("kind") == "canary"]
    timeline = [store.get_execution_types_by_id([e.type_id])[0].name.split(".")[-1]
                for e in sorted(store.get_executions_by_context(context.id), key=lambda e: e.id)]
    assert timeline == ["CanaryStep", "CanaryMeasurement", "CanaryStep", "CanaryMeasurement", "CanaryStep",
                        "CanaryMeasurement", "Promote", "CanaryVerdict"]
    [report] = store.get_executions_by_type("conveyor.ShadowReport")
    assert props(report)["version"] == "2" and int(props(report)["requests"]) >= 20
    lineage = run_conveyor("lineage", "--version", "2", "--spec", spec)
    assert lineage.returncode == 0, lineage.stderr
    text = lineage.stdout
    for expected in ("shadowreport at", "shadowed on", "canarystep at", "canarymeasurement at", "step 3 (100%)",
                     "canaryverdict at", "promoted: all 3 steps inside the thresholds"):
        assert expected in text, text
    assert text.index("shadowed on") < text.index("canarymeasurement at") < text.index("canaryverdict at")


def _latencies(server, images, threads=4, per_thread=50) -> tuple[list[float], list[int]]:
    latencies, failures, lock = [], [], threading.Lock()

    def client(offset):
        session = requests.Session()
        for i in range(per_thread):
            started = time.perf_counter()
            response = predict(server, images[(offset + i) % len(images)], session=session)
            with lock:
                latencies.append(time.perf_counter() - started)
                if response.status_code != 200:
                    failures.append(response.status_code)

    workers = [threading.Thread(target=client, args=(n * 7,)) for n in range(threads)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join(timeout=120)
    return latencies, failures


def test_a_disagreeing_slow_shadow_is_measured_and_never_slows_live_requests(spec, server, images, misbehaving):
    from conveyor_ml.metadata.values import props
    from conveyor_ml.operations.progressive_delivery import end_shadow, start_shadow

    loaded = load_spec(spec)
    model_dir = loaded.serving_base / "mnist"
    releases.write_version_atomically(model_dir, 3, {"": misbehaving["disagreeing"]})
    baseline, failed = _latencies(server, images)
    assert failed == []
    start_shadow(loaded, "mnist", 3, 100)
    server.wait_available("mnist", version=3)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:  # until the server has the shadow split
        predict(server, images[0])
        if "3" in requests.get(f"{server.rest_url}/v1/models/mnist/monitoring", timeout=5).json()["shadow"]["versions"]:
            break
        time.sleep(0.2)
    shadowed, failed = _latencies(server, images)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:  # the live requests are done; the shadow works off its queue
        figures = requests.get(f"{server.rest_url}/v1/models/mnist/monitoring", timeout=5).json()["shadow"]
        if figures["queue"]["depth"] == 0:
            break
        time.sleep(0.5)
    three = figures["versions"]["3"]
    assert failed == []  # no live request failed
    assert three["dropped"] > 0  # 200 requests in a few seconds, a shadow taking 100 ms each: the queue filled
    assert three["requests"] >= 5 and three["agreement"] < 0.2 and three["mean_probability_difference"] > 0.3, three
    assert three["shadow_latency_ms"]["p50"] >= 100
    live_p50, base_p50 = np.percentile(shadowed, 50), np.percentile(baseline, 50)
    # Answered in line, every request would wait 100 ms for the shadow; the live median stays near its own.
    assert live_p50 < 0.05 and live_p50 < 2 * base_p50 + 0.01, (live_p50, base_p50)
    metrics = scrape(server.rest_url)
    dropped = sum(v for (name, labels), v in metrics.items() if name == "conveyor_shadow_requests_total"
                  and dict(labels).get("outcome") == "dropped" and dict(labels).get("version") == "3")
    disagreeing = sum(v for (name, labels), v in metrics.items() if name == "conveyor_shadow_instances_total"
                      and dict(labels) == {"model": "mnist", "version": "3", "agreement": "disagree"})
    assert dropped == three["dropped"] and disagreeing >= three["instances"] * 0.8

    version, recorded = end_shadow(loaded, "mnist", server.rest_url)
    assert version == 3 and recorded["agreement"] < 0.2
    reports = [props(e) for e in _mlmd(spec).get_executions_by_type("conveyor.ShadowReport")]
    mine = [r for r in reports if r["version"] == "3"]
    assert len(mine) == 1 and float(mine[0]["agreement"]) < 0.2 and "% agreement" in mine[0]["summary"]
    assert "shadow" not in releases.read_release(loaded.serving_base, "mnist").labels


def test_a_failing_canary_is_rolled_back_at_the_first_breach(spec, server, images, misbehaving):
    from conveyor_ml.operations.progressive_delivery import CanaryAnalysis
    from conveyor_ml.operations.release_commands import CanarySource

    loaded = load_spec(spec)
    stable = releases.read_release(loaded.serving_base, "mnist").labels["stable"]
    releases.write_version_atomically(loaded.serving_base / "mnist", 4, {"": misbehaving["failing"]})
    before = scrape(server.rest_url)
    settings = CanaryAnalysisSettings(steps=(20, 50, 100), interval_seconds=20, min_requests=10,
                                      server_url=server.rest_url)
    traffic = Traffic(server, images, unkeyed_every=1)
    lines: list[str] = []
    traffic.start()
    started = time.monotonic()
    try:
        verdict = CanaryAnalysis(loaded, "mnist", CanarySource(version=4), settings, say=lines.append).run()
    finally:
        traffic.stop.set()
        traffic.join(timeout=30)
    seconds = time.monotonic() - started
    assert verdict.verdict == "rolled_back" and verdict.steps_passed == 0, lines
    [measurement] = verdict.measurements
    assert measurement.step == 1 and [c.name for c in measurement.breaches] == ["error_rate"]
    assert seconds < settings.interval_seconds  # at the breach, not at the end of the step's window
    release = releases.read_release(loaded.serving_base, "mnist")
    assert release.labels == {"stable": stable} and release.weights == {"stable": 100}
    assert traffic.failures  # the canary did fail requests...
    after = scrape(server.rest_url)
    failed_by_version = defaultdict(float)
    for (name, labels), value in after.items():
        labels = dict(labels)
        if name == "conveyor_requests_total" and labels.get("api") == "predict" and labels.get("status") != "OK":
            failed_by_version[labels["version"]] += value - before.get((name, tuple(sorted(labels.items()))), 0)
    assert failed_by_version[str(stable)] == 0 and failed_by_version["4"] > 0  # ...and stable none
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:  # the server applies the rollback within its poll interval
        if requests.get(f"{server.rest_url}/v1/models/mnist/monitoring", timeout=5).json()["traffic"] == {
                "stable": 100}:
            break
        time.sleep(0.2)
    _, failed = _latencies(server, images, threads=1, per_thread=20)
    assert failed == []


def test_sticky_routing_over_grpc_keeps_each_user_on_one_version(spec, server, images):
    import grpc
    import tensorflow as tf
    from tensorflow_serving.apis import predict_pb2, prediction_service_pb2_grpc

    from conveyor_ml.operations.release_commands import CanarySource, start_canary

    loaded = load_spec(spec)
    stable = releases.read_release(loaded.serving_base, "mnist").labels["stable"]
    start_canary(loaded, "mnist", CanarySource(version=3), 50, route_key="X-User-Id")
    server.wait_available("mnist", version=3)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:  # until the server serves the 50/50 split
        if requests.get(f"{server.rest_url}/v1/models/mnist/monitoring", timeout=5).json()["traffic"] == {
                "stable": 50, "canary": 50}:
            break
        time.sleep(0.2)
    stub = prediction_service_pb2_grpc.PredictionServiceStub(grpc.insecure_channel(server.grpc_target))
    request = predict_pb2.PredictRequest()
    request.model_spec.name = "mnist"
    request.inputs["images"].CopyFrom(tf.make_tensor_proto(images[:1]))
    seen: dict[str, set[int]] = defaultdict(set)
    for _ in range(3):
        for user in USERS[:16]:
            response = stub.Predict(request, timeout=30, metadata=(("x-user-id", user),))
            seen[user].add(response.model_spec.version.value)
    assert all(len(versions) == 1 for versions in seen.values()), seen
    assert set().union(*seen.values()) == {stable, 3}  # 16 users at 50/50: both versions have some
