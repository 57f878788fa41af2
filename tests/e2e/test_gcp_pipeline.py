"""The GcpPusher inside a pipeline run and `promote|rollback --target gcp`, through the CLI, against a
Cloud Storage emulator and a Vertex AI fake on 127.0.0.1: what lands in MLMD, and what a failure leaves."""
from __future__ import annotations

import os

import pytest
from google.auth.credentials import AnonymousCredentials
from google.cloud import storage

from conveyor_ml.base.spec import load_spec
from conveyor_ml.metadata import store as metadata
from conveyor_ml.metadata.index import deployment_snapshots
from conveyor_ml.metadata.values import props
from tests.conftest import ROOT, run_conveyor, write_spec
from tests.fakes.gcs_emulator import StorageEmulator
from tests.fakes.vertex_ai import FakeVertexAI

pytestmark = pytest.mark.slow
NO_CREDENTIALS = {"GOOGLE_APPLICATION_CREDENTIALS": "", "CLOUDSDK_CONFIG": "/nonexistent"}


@pytest.fixture(scope="module")
def emulator():
    with StorageEmulator() as running:
        storage.Client(project="test-project", credentials=AnonymousCredentials(),
                       client_options={"api_endpoint": running.url}).create_bucket("conveyor-models")
        yield running


def gcp_spec(directory, emulator, vertex, **extra):
    section = {"project": "test-project", "region": "europe-west4", "bucket": "conveyor-models",
               "model_display_name": "digits", "canary_weight": 25, "retry_seconds": 2,
               "storage_endpoint": emulator.url, "vertex_endpoint": vertex.url, **extra}
    return write_spec(directory, base=ROOT / "tests" / "specs" / "csv_6x6.yaml",
                      **{"data.path": str(ROOT / "tests" / "fixtures" / "digits_6x6.csv"),
                         "components.gcp_pusher": section})


def vertex_snapshots(spec_path):
    spec = load_spec(spec_path)
    return deployment_snapshots(metadata.open_store(spec.metadata), "digits", target="vertex")


def test_pipeline_pushes_to_vertex_and_release_commands_move_traffic(tmp_path, emulator):
    env = {**os.environ, **NO_CREDENTIALS}
    with FakeVertexAI() as vertex:
        dry = run_conveyor("run", gcp_spec(tmp_path, emulator, vertex), "--gcp-dry-run", env=env)
        assert dry.returncode == 0, dry.stderr
        assert "would call ModelService.UploadModel" in dry.stdout and "gs://conveyor-models/conveyor/digits/" in dry.stdout
        assert vertex.calls() == [] and vertex_snapshots(tmp_path / "spec.yaml") == []

        spec_path = gcp_spec(tmp_path, emulator, vertex)
        run = run_conveyor("run", spec_path, env=env)
        assert run.returncode == 0, run.stdout + run.stderr
        assert "✓ GcpPusher  complete" in run.stdout
        [snapshot] = vertex_snapshots(spec_path)
        assert snapshot.run_id is not None  # recorded by the pipeline run, in its context
        [row] = [props(a) for a in snapshot.deployments]
        assert row["target"] == "vertex" and row["traffic_percent"] == 100 and row["label"] == "stable"
        assert row["endpoint"] == vertex.endpoint("digits-endpoint")["name"]
        assert row["base_path"].startswith("gs://conveyor-models/conveyor/digits/")

        # A failing push: the run fails with one line and MLMD gains no Deployment.
        vertex.fail("models:upload", 403, times=1)
        failing = run_conveyor("run", gcp_spec(tmp_path, emulator, vertex, prefix="second"), env=env)
        assert failing.returncode == 2
        [line] = [x for x in failing.stderr.splitlines() if x.startswith("conveyor: error")]
        assert "403" in line and "UploadModel" in line
        assert len(vertex_snapshots(spec_path)) == 1

        # The same push again (the failure was one-off) lands as a 25 % canary beside stable.
        canary = run_conveyor("run", gcp_spec(tmp_path, emulator, vertex, prefix="second"), env=env)
        assert canary.returncode == 0, canary.stdout + canary.stderr
        assert sorted(vertex.endpoint("digits-endpoint")["trafficSplit"].values()) == [25, 75]

        dry_promote = run_conveyor("promote", "digits", "--target", "gcp", "--dry-run", "--spec", spec_path, env=env)
        assert dry_promote.returncode == 0, dry_promote.stderr
        assert "would call EndpointService.UpdateEndpoint" in dry_promote.stdout
        assert sorted(vertex.endpoint("digits-endpoint")["trafficSplit"].values()) == [25, 75]

        promote = run_conveyor("promote", "digits", "--target", "gcp", "--spec", spec_path, "--reason", "canary ok",
                               env=env)
        assert promote.returncode == 0, promote.stderr
        endpoint = vertex.endpoint("digits-endpoint")
        assert list(endpoint["trafficSplit"].values()) == [100] and len(endpoint["deployedModels"]) == 1
        assert endpoint["deployedModels"][0]["modelVersionId"] == "2"
        first, second = vertex.model("digits")["versions"]
        assert "stable" in second["versionAliases"] and "stable" not in first["versionAliases"]
        latest = vertex_snapshots(spec_path)[-1]
        assert latest.kind == "conveyor.Promote"
        assert {(props(a)["version"], props(a)["release_state"]) for a in latest.deployments} == \
            {("1", "retired"), ("2", "live")}

        nothing = run_conveyor("rollback", "digits", "--target", "gcp", "--spec", spec_path, env=env)
        assert nothing.returncode == 2 and "no canary to roll back" in nothing.stderr
