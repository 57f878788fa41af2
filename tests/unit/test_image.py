"""The container image (Dockerfile): linted with hadolint, and consistent with the lock, setup.py and the
specs that name it. No Docker engine runs here, so the image itself is not built in the tests."""
from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import yaml

from conveyor_ml.pipelines.beam_dependencies import beam_option
from tests.conftest import ROOT

HADOLINT = Path(sys.executable).with_name("hadolint")
DOCKERFILE = ROOT / "Dockerfile"


def lint(path: Path) -> subprocess.CompletedProcess:
    return subprocess.run([str(HADOLINT), "--no-color", str(path)], capture_output=True, text=True, timeout=60)


def test_hadolint_passes_the_dockerfile_and_catches_a_bad_one(tmp_path):
    result = lint(DOCKERFILE)
    assert result.returncode == 0, result.stdout + result.stderr
    bad = tmp_path / "Dockerfile"
    bad.write_text("FROM python:latest\nRUN pip install flask\n")
    findings = lint(bad).stdout
    assert "DL3007" in findings and "DL3013" in findings  # the linter really ran


def locked(package: str) -> str:
    [line] = [line for line in (ROOT / "requirements.txt").read_text().splitlines()
              if line.lower().startswith(f"{package}==")]
    return line.split("==")[1]


def test_the_base_image_has_the_locks_beam_and_python():
    [base] = re.findall(r"^FROM (\S+)", DOCKERFILE.read_text(), flags=re.MULTILINE)
    python = re.search(r'python_requires=">=(\d+\.\d+)', (ROOT / "setup.py").read_text()).group(1)
    assert base == f"apache/beam_python{python}_sdk:{locked('apache-beam')}"
    # Dataflow starts workers through the Beam SDK image's boot program.
    assert 'ENTRYPOINT ["/opt/apache/beam/boot"]' in DOCKERFILE.read_text()


def test_the_image_installs_the_lock_and_every_package_setup_py_maps():
    text = DOCKERFILE.read_text()
    assert "COPY requirements.txt ." in text and "pip install --no-cache-dir -r requirements.txt" in text
    assert "pip install --no-cache-dir --no-deps ." in text
    package_dirs = set(re.findall(r'"conveyor_ml[.\w]*": "(\w+)"', (ROOT / "setup.py").read_text()))
    assert package_dirs == {"conveyor_ml", "components", "pipelines"}
    for folder in package_dirs:
        assert f"COPY {folder} {folder}" in text
    allowed = (ROOT / ".dockerignore").read_text().splitlines()
    for needed in ("requirements.txt", "setup.py", *(f"{folder}/" for folder in package_dirs)):
        assert f"!{needed}" in allowed, f".dockerignore leaves {needed} out of the build context"


def test_the_dataflow_spec_runs_workers_and_steps_in_one_image():
    document = yaml.safe_load((ROOT / "pipelines" / "mnist-dataflow.yaml").read_text())
    args = tuple(document["beam"]["args"])
    assert beam_option(args, "runner") == "DataflowRunner"
    assert beam_option(args, "sdk_container_image") == document["kubeflow"]["image"]
