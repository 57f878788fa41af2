"""`conveyor deploy render`: production manifests for real TensorFlow Serving, from the release state.

- compose: one `tensorflow/serving` container reading the same models.config, batching.config and
  monitoring config as `conveyor serve` (the base path mounted at /models).
- k8s: a high-availability layout per release track (stable, canary): Deployment spread over zones,
  probes on what TF Serving itself offers (see `probes`), HorizontalPodAutoscaler, PodDisruptionBudget; one Service;
  an Istio DestinationRule (a subset per track) and VirtualService whose weights are the traffic file's.
Manifests are built as data and written with yaml.safe_dump; TF Serving's files with its protos.
"""
from __future__ import annotations

import os
from pathlib import Path

import yaml
from google.protobuf import text_format

from conveyor_ml.base.errors import ConveyorError
from conveyor_ml.base.files import write_atomically
from conveyor_ml.base.names import PROMETHEUS_PATH
from conveyor_ml.base.spec import AutoscalingSettings, BatchingSettings
from conveyor_ml.formats import serving_config
from conveyor_ml.formats.release_state import ModelRelease


class _Dumper(yaml.SafeDumper):
    """Plain YAML for humans: no anchors for repeated label maps, config files as literal blocks."""

    def ignore_aliases(self, data) -> bool:
        return True


def _text(dumper: yaml.SafeDumper, value: str):
    return dumper.represent_scalar("tag:yaml.org,2002:str", value, style="|" if "\n" in value else None)


_Dumper.add_representer(str, _text)


def dump(objects: list[dict]) -> str:
    return yaml.dump_all(objects, Dumper=_Dumper, sort_keys=False)


TF_SERVING_IMAGE = "tensorflow/serving:2.16.1"  # the TF Serving release matching TensorFlow 2.16
CONTAINER_MODELS = "/models"
CONTAINER_CONFIG = "/config"


def container_models_config(releases: list[ModelRelease], pinned_label: str | None = None) -> str:
    """models.config with base paths inside the container; pinned_label serves only that track's version."""
    config = serving_config.model_server_config_pb2.ModelServerConfig()
    for release in releases:
        entry = config.model_config_list.config.add(
            name=release.name, base_path=f"{CONTAINER_MODELS}/{release.name}", model_platform="tensorflow")
        labels = ({pinned_label: release.labels[pinned_label]} if pinned_label else dict(release.labels))
        if labels:
            entry.model_version_policy.specific.versions.extend(sorted(set(labels.values())))
            for label, version in sorted(labels.items()):
                entry.version_labels[label] = version
    return text_format.MessageToString(config)


def _server_args(config_dir: str) -> list[str]:
    return ["--port=8500", "--rest_api_port=8501",
            f"--model_config_file={config_dir}/models.config", "--model_config_file_poll_wait_seconds=60",
            "--enable_batching", f"--batching_parameters_file={config_dir}/batching.config",
            f"--monitoring_config_file={config_dir}/monitoring.config",
            "--enable_grpc_healthcheck_service=true",
            # The config names its versions by label, and no version is loaded when TF Serving reads it at
            # start-up: without this (its default is false) ServerCore refuses every label and the server
            # does not start ("Request to assign label to version N ... not currently available").
            "--allow_version_labels_for_unavailable_models=true"]


def probes(model: str, version: int) -> dict:
    """Kubernetes probes for a pod serving `version` of `model`, on what TF Serving offers (it has no health
    URL; conveyor serve answers the same ones, and /healthz, /readyz besides):
    - startup and readiness: the version's status URL. TF Serving opens its ports only once the models it
      starts with are loaded, and this pod's models.config pins the one version, so a 200 means it serves;
      a version that is gone answers 404. The startup probe allows 10 minutes for a large model to load.
    - liveness: the standard gRPC health service (--enable_grpc_healthcheck_service, TF Serving >= 2.15),
      SERVING while the server runs, through Kubernetes' own gRPC probe (GA in 1.27).
    """
    status = {"httpGet": {"path": f"/v1/models/{model}/versions/{version}", "port": 8501}}
    return {
        "startupProbe": {**status, "periodSeconds": 5, "failureThreshold": 120},
        "readinessProbe": {**status, "periodSeconds": 5, "failureThreshold": 3},
        "livenessProbe": {"grpc": {"port": 8500}, "periodSeconds": 10, "failureThreshold": 3},
    }


def _batching_text(batching: BatchingSettings) -> str:
    return serving_config.batching_parameters_text(batching.max_batch_size, batching.batch_timeout_micros,
                                                   batching.max_enqueued_batches, batching.num_batch_threads)


def render_compose(releases: list[ModelRelease], base_path: Path, batching: BatchingSettings, out_dir: Path) -> list[Path]:
    out_dir.mkdir(parents=True, exist_ok=True)
    files = {
        "models.config": container_models_config(releases),
        "batching.config": _batching_text(batching),
        "monitoring.config": serving_config.monitoring_config_text(),
    }
    compose = {"services": {"tensorflow-serving": {
        "image": TF_SERVING_IMAGE,
        "restart": "unless-stopped",
        "ports": ["8500:8500", "8501:8501"],
        # Relative to this file, as compose resolves it: the rendered directory can move with the workspace.
        "volumes": [f"{os.path.relpath(Path(base_path).resolve(), out_dir.resolve())}:{CONTAINER_MODELS}:ro",
                    f"./:{CONTAINER_CONFIG}:ro"],
        "command": _server_args(CONTAINER_CONFIG),
    }}}
    files["docker-compose.yml"] = dump([compose])
    return _write(out_dir, files)


def _labels(model: str, track: str | None = None) -> dict:
    labels = {"app.kubernetes.io/name": f"{model}-serving", "app.kubernetes.io/part-of": "conveyor"}
    if track:
        labels["track"] = track
    return labels


def k8s_objects(release: ModelRelease, batching: BatchingSettings, autoscaling: AutoscalingSettings,
                models_claim: str | None = None) -> list[dict]:
    """Every Kubernetes and Istio object for one model's release tracks, in apply order."""
    model = release.name
    if not release.labels:
        raise ConveyorError(f"model {model} has no released version yet: run `make pipeline` first")
    service = f"{model}-serving"
    claim = models_claim or f"{model}-models"
    objects: list[dict] = []
    tracks = sorted(release.labels, key=lambda label: label != "stable")
    for track in tracks:
        version = release.labels[track]
        name = f"{model}-{track}"
        objects.append({
            "apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": f"{name}-config", "labels": _labels(model, track)},
            "data": {"models.config": container_models_config([release], pinned_label=track),
                     "batching.config": _batching_text(batching),
                     "monitoring.config": serving_config.monitoring_config_text()}})
        pod_labels = {**_labels(model, track), "version": str(version)}
        objects.append({
            "apiVersion": "apps/v1", "kind": "Deployment",
            "metadata": {"name": name, "labels": pod_labels},
            "spec": {
                "replicas": autoscaling.min_replicas,
                "selector": {"matchLabels": _labels(model, track)},
                "strategy": {"type": "RollingUpdate", "rollingUpdate": {"maxUnavailable": 0, "maxSurge": 1}},
                "template": {
                    "metadata": {"labels": pod_labels, "annotations": {
                        "prometheus.io/scrape": "true", "prometheus.io/port": "8501",
                        "prometheus.io/path": PROMETHEUS_PATH}},
                    "spec": {
                        "topologySpreadConstraints": [
                            {"maxSkew": 1, "topologyKey": "topology.kubernetes.io/zone",
                             "whenUnsatisfiable": "DoNotSchedule", "labelSelector": {"matchLabels": _labels(model, track)}},
                            {"maxSkew": 1, "topologyKey": "kubernetes.io/hostname",
                             "whenUnsatisfiable": "ScheduleAnyway", "labelSelector": {"matchLabels": _labels(model, track)}},
                        ],
                        "containers": [{
                            "name": "tensorflow-serving",
                            "image": TF_SERVING_IMAGE,
                            "args": _server_args(CONTAINER_CONFIG),
                            "ports": [{"name": "grpc", "containerPort": 8500}, {"name": "http", "containerPort": 8501}],
                            **probes(model, version),
                            "resources": {"requests": {"cpu": "500m", "memory": "512Mi"},
                                          "limits": {"cpu": "2", "memory": "2Gi"}},
                            "volumeMounts": [{"name": "models", "mountPath": CONTAINER_MODELS, "readOnly": True},
                                             {"name": "config", "mountPath": CONTAINER_CONFIG, "readOnly": True}],
                        }],
                        "volumes": [{"name": "models", "persistentVolumeClaim": {"claimName": claim,
                                                                                 "readOnly": True}},
                                    {"name": "config", "configMap": {"name": f"{name}-config"}}],
                    },
                },
            },
        })
        objects.append({
            "apiVersion": "policy/v1", "kind": "PodDisruptionBudget",
            "metadata": {"name": name, "labels": _labels(model, track)},
            "spec": {"minAvailable": 1, "selector": {"matchLabels": _labels(model, track)}}})
        objects.append({
            "apiVersion": "autoscaling/v2", "kind": "HorizontalPodAutoscaler",
            "metadata": {"name": name, "labels": _labels(model, track)},
            "spec": {"scaleTargetRef": {"apiVersion": "apps/v1", "kind": "Deployment", "name": name},
                     "minReplicas": autoscaling.min_replicas, "maxReplicas": autoscaling.max_replicas,
                     "metrics": [{"type": "Resource", "resource": {"name": "cpu", "target": {
                         "type": "Utilization", "averageUtilization": autoscaling.target_cpu_utilization}}}]}})
    objects.append({
        "apiVersion": "v1", "kind": "Service", "metadata": {"name": service, "labels": _labels(model)},
        "spec": {"selector": _labels(model),
                 "ports": [{"name": "grpc", "port": 8500, "targetPort": 8500, "appProtocol": "grpc"},
                           {"name": "http", "port": 8501, "targetPort": 8501, "appProtocol": "http"}]}})
    objects.append({
        "apiVersion": "networking.istio.io/v1beta1", "kind": "DestinationRule",
        "metadata": {"name": service, "labels": _labels(model)},
        "spec": {"host": service, "subsets": [{"name": track, "labels": {"track": track}} for track in tracks]}})
    weights = {track: release.weights.get(track, 0) for track in tracks}
    if sum(weights.values()) != 100:
        weights = {track: (100 if track == "stable" else 0) for track in tracks}
    objects.append({
        "apiVersion": "networking.istio.io/v1beta1", "kind": "VirtualService",
        "metadata": {"name": service, "labels": _labels(model)},
        "spec": {"hosts": [service], "http": [{"route": [
            {"destination": {"host": service, "subset": track}, "weight": weights[track]} for track in tracks]}]}})
    return objects


def render_k8s(releases: list[ModelRelease], batching: BatchingSettings, autoscaling: AutoscalingSettings,
               out_dir: Path) -> list[Path]:
    files = {}
    for release in releases:
        objects = k8s_objects(release, batching, autoscaling)
        files[f"{release.name}.yaml"] = dump(objects)
    return _write(out_dir, files)


def _write(out_dir: Path, files: dict[str, str]) -> list[Path]:
    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    for name, text in files.items():
        write_atomically(out_dir / name, text)
        written.append(out_dir / name)
    return written
