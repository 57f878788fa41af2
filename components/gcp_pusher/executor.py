"""GcpPusher executor: upload to Cloud Storage, register a Vertex AI model version, deploy with a canary split."""
from __future__ import annotations

import logging
import tempfile
from pathlib import Path
from typing import Any

from tfx.proto.orchestration import execution_result_pb2
from tfx.types import artifact_utils

from conveyor_ml.base.errors import ConveyorError
from conveyor_ml.base.spec import GcpPusherSettings
from conveyor_ml.components.artifacts import deployment, set_custom_properties
from conveyor_ml.components.gcp_pusher import gcs_upload, traffic
from conveyor_ml.components.gcp_pusher import settings as gcp
from conveyor_ml.components.gcp_pusher.vertex import VertexApi, VertexError
from conveyor_ml.components.parameters import settings_from
from conveyor_ml.components.pushing import BlessedModelPusher, blessed_variants, files_of, pusher_output

log = logging.getLogger(__name__)


def say(line: str) -> None:
    """Progress of the push, one line per call or upload (the runner prints it under the component)."""
    log.info("%s", line)


class Executor(BlessedModelPusher):
    def Do(self, input_dict: dict[str, list], output_dict: dict[str, list],
           exec_properties: dict[str, Any]) -> execution_result_pb2.ExecutorOutput:
        settings = settings_from(GcpPusherSettings, exec_properties)
        model_name = exec_properties["model_name"]
        model = artifact_utils.get_single_instance(input_dict["model"])
        pushed_model = artifact_utils.get_single_instance(output_dict["pushed_model"])

        reason = self.skip_reason(input_dict)
        if reason:
            self.mark_not_pushed(pushed_model, reason)
            say(f"not pushed to Google Cloud: {reason}")
            return pusher_output(pushed_model, [])

        # The MLMD id names the version directory: known before any call (so a dry run shows the exact
        # URI) and the same on a re-run of the same model (so a re-push uploads nothing).
        version_dir = f"{settings.prefix.strip('/')}/{model_name}/{model.id}".lstrip("/")
        artifact_uri = f"gs://{settings.bucket}/{version_dir}"
        run_id = (self._context.pipeline_run_id if self._context else None) or ""
        labels = {"conveyor_pipeline": gcp.label_value(exec_properties.get("pipeline_name") or ""),
                  "conveyor_run": gcp.label_value(run_id),
                  "mlmd_model_id": str(model.id)}
        try:
            with tempfile.TemporaryDirectory() as scratch:
                variants = blessed_variants(input_dict.get("quantized_models") or [])
                files = gcs_upload.plan(files_of(self.release_sources(input_dict, variants, scratch)), version_dir)
                if settings.dry_run:
                    return self._dry_run(settings, model_name, files, artifact_uri, labels, pushed_model)
                uploader = gcs_upload.GcsUploader(gcp.storage_client(settings), settings.bucket,
                                                  retry_seconds=settings.retry_seconds,
                                                  workers=settings.upload_workers, say=say,
                                                  timeout=gcp.call_seconds(settings))
                uploader.upload(files, version_dir, {"model_name": model_name, "mlmd_model_id": model.id,
                                                     "pipeline_run": run_id})
            vertex = VertexApi(settings, model_name, say=say, dry_run=False)
            rows, endpoint, model_resource, incomplete = _release(vertex, settings, artifact_uri, labels)
        except (gcs_upload.GcsError, VertexError) as exc:
            raise ConveyorError(f"gcp_pusher: {exc}") from None

        record_dir = Path(artifact_utils.get_single_uri(output_dict["deployment"]))
        deployments = []
        for row in rows:
            artifact = deployment(row, model_name=model_name, base_path=artifact_uri, endpoint=endpoint,
                                  target="vertex", uri=str(record_dir / f"version-{row['version']}"))
            set_custom_properties(artifact, {"model_resource": row["model_resource"],
                                             "deployed_model_id": row["deployed_model_id"]})
            deployments.append(artifact)
        new_row = rows[-1]
        self.mark_pushed(pushed_model, artifact_uri, str(new_row["version"]), model_resource=model_resource,
                         endpoint=endpoint, incomplete=incomplete)
        say(f"Vertex AI: {model_resource} version {new_row['version']} on {endpoint} at "
            f"{new_row['traffic_percent']}% ({new_row['label'] or new_row['release_state']})")
        if incomplete:
            say(f"WARNING: deployed, but the clean-up after it failed: {incomplete}; recorded the endpoint as it "
                "is now (the next push undeploys what is left)")
        return pusher_output(pushed_model, deployments)

    def _dry_run(self, settings, model_name: str, files: list, artifact_uri: str, labels: dict,
                 pushed_model) -> execution_result_pb2.ExecutorOutput:
        say(f"dry run: nothing is sent to Google Cloud (project {settings.project}, region {settings.region})")
        for item in files:
            say(f"would upload {item.local} -> gs://{settings.bucket}/{item.object_name} "
                f"({item.size} bytes, md5 {item.md5})")
        say(f"would upload gs://{settings.bucket}/{artifact_uri.split('/', 3)[3]}/{gcs_upload.MARKER} last")
        _release(VertexApi(settings, model_name, say=say, dry_run=True), settings, artifact_uri, labels)
        self.mark_not_pushed(pushed_model, "gcp_pusher.dry_run")
        pushed_model.set_string_custom_property("pushed_destination", artifact_uri)
        return pusher_output(pushed_model, [])


def _release(vertex: VertexApi, settings, artifact_uri: str,
             labels: dict) -> tuple[list[dict], str, str, str | None]:
    """Registers the version, deploys it with the spec's share; (Deployment rows, endpoint, model resource,
    what failed after the deploy or None). Once DeployModel succeeded the endpoint has changed: a failed
    alias move or undeploy after it is returned, not raised, with the endpoint read back as it now is, so
    the record says what really happened (the next push undeploys what this one left)."""
    parent = vertex.find_model()
    canary = 0 < settings.canary_weight < 100
    endpoint = vertex.find_or_create_endpoint(labels)
    deployed = vertex.deployed(endpoint)
    change = traffic.for_push(deployed, settings.canary_weight)
    first = change.stable == traffic.NEW
    model_resource, version = vertex.upload_version(artifact_uri, parent_model=parent, labels=labels)
    new_id = vertex.deploy(endpoint, model_resource, version, change.split)
    try:
        if first or canary:
            vertex.move_alias(model_resource, version, "stable" if first else "canary")
        for deployed_model_id in change.undeploy:
            vertex.undeploy(endpoint, deployed_model_id)
    except VertexError as exc:
        rows = traffic.rows_observed(vertex.deployed(endpoint), deployed)
        rows.sort(key=lambda row: row["deployed_model_id"] == new_id)  # the new version last
        return rows, endpoint, model_resource, str(exc)
    new = traffic.Deployed(id=new_id, model=model_resource, version=version, created=float("inf"), traffic=0)
    rows = traffic.rows_after(deployed, change, new)
    rows.sort(key=lambda row: row["deployed_model_id"] == new_id)  # the new version last
    return rows, endpoint, model_resource, None
