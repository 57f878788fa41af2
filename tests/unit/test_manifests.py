"""Rendered production manifests: Kubernetes objects valid against the Kubernetes schemas (shipped offline by
kubernetes-validate), Istio objects checked on the fields that route traffic, compose wired to TF Serving."""
import stat
from pathlib import Path

import kubernetes_validate
import pytest
import yaml
from google.protobuf import text_format
from tensorflow_serving.config import model_server_config_pb2

from conveyor_ml.base.spec import AutoscalingSettings, BatchingSettings
from conveyor_ml.formats import serving_config as config
from conveyor_ml.formats.release_state import ModelRelease
from conveyor_ml.operations import manifests

KUBERNETES_VERSION = "1.30"


@pytest.fixture
def canary_release(tmp_path):
    return ModelRelease("mnist", tmp_path / "serving", labels={"stable": 1, "canary": 2},
                        weights={"stable": 90, "canary": 10})


def test_k8s_objects_are_valid_and_route_by_the_traffic_file(canary_release, tmp_path):
    [path] = manifests.render_k8s([canary_release], BatchingSettings(), AutoscalingSettings(2, 6, 60), tmp_path / "k8s")
    objects = list(yaml.safe_load_all(path.read_text()))
    kinds = [o["kind"] for o in objects]
    assert kinds.count("Deployment") == 2 and kinds.count("HorizontalPodAutoscaler") == 2
    for obj in objects:
        if obj["apiVersion"].startswith("networking.istio.io"):
            continue
        kubernetes_validate.validate(obj, KUBERNETES_VERSION, strict=True)

    deployments = {o["metadata"]["labels"]["track"]: o for o in objects if o["kind"] == "Deployment"}
    stable = deployments["stable"]["spec"]["template"]["spec"]
    zones = [c for c in stable["topologySpreadConstraints"] if c["topologyKey"] == "topology.kubernetes.io/zone"]
    assert zones and zones[0]["maxSkew"] == 1
    container = stable["containers"][0]
    for probe in ("startupProbe", "readinessProbe"):
        assert container[probe]["httpGet"] == {"path": "/v1/models/mnist/versions/1", "port": 8501}
    assert container["livenessProbe"]["grpc"] == {"port": 8500}
    assert "--enable_batching" in container["args"]
    assert "--enable_grpc_healthcheck_service=true" in container["args"]  # what the gRPC liveness probe calls

    config_maps = {o["metadata"]["name"]: o for o in objects if o["kind"] == "ConfigMap"}
    canary_config = text_format.Parse(config_maps["mnist-canary-config"]["data"]["models.config"],
                                      model_server_config_pb2.ModelServerConfig())
    assert list(canary_config.model_config_list.config[0].model_version_policy.specific.versions) == [2]

    hpa = next(o for o in objects if o["kind"] == "HorizontalPodAutoscaler")
    assert (hpa["spec"]["minReplicas"], hpa["spec"]["maxReplicas"]) == (2, 6)

    service = next(o for o in objects if o["kind"] == "Service")
    rule = next(o for o in objects if o["kind"] == "DestinationRule")
    virtual = next(o for o in objects if o["kind"] == "VirtualService")
    assert rule["spec"]["host"] == service["metadata"]["name"]
    subsets = {s["name"]: s["labels"] for s in rule["spec"]["subsets"]}
    assert subsets == {"stable": {"track": "stable"}, "canary": {"track": "canary"}}
    routes = {r["destination"]["subset"]: r["weight"] for r in virtual["spec"]["http"][0]["route"]}
    assert routes == {"stable": 90, "canary": 10}
    for track, labels in subsets.items():
        pod_labels = deployments[track]["spec"]["template"]["metadata"]["labels"]
        assert labels.items() <= pod_labels.items()  # each subset selects its track's pods


def test_compose_runs_tf_serving_on_the_same_files(canary_release, tmp_path):
    written = manifests.render_compose([canary_release], canary_release.base_path, BatchingSettings(),
                                       tmp_path / "compose")
    compose = yaml.safe_load((tmp_path / "compose" / "docker-compose.yml").read_text())
    service = compose["services"]["tensorflow-serving"]
    assert service["image"].startswith("tensorflow/serving:2.16")
    assert {"8500:8500", "8501:8501"} <= set(service["ports"])
    assert "--model_config_file=/config/models.config" in service["command"]
    assert service["volumes"][0] == "../serving:/models:ro"
    assert config.read_batching_options(tmp_path / "compose" / "batching.config").max_batch_size == 128
    assert config.read_prometheus_path(tmp_path / "compose" / "monitoring.config")
    server_config = config.read_model_server_config(tmp_path / "compose" / "models.config")
    assert server_config.model_config_list.config[0].base_path == "/models/mnist"
    assert len(written) == 4
    # TF Serving in the container runs as another user: every config file must be readable by all.
    assert {oct(stat.S_IMODE(Path(path).stat().st_mode)) for path in written} == {"0o644"}


def test_committed_examples_are_current():
    """deploy/ holds rendered examples; they must parse and validate like fresh renders."""
    root = Path(__file__).resolve().parents[2] / "deploy"
    for obj in yaml.safe_load_all((root / "k8s" / "mnist.yaml").read_text()):
        if not obj["apiVersion"].startswith("networking.istio.io"):
            kubernetes_validate.validate(obj, KUBERNETES_VERSION, strict=True)
    assert yaml.safe_load((root / "compose" / "docker-compose.yml").read_text())["services"]
