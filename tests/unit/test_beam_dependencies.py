"""The TFX package Beam workers need: built once per workspace, passed as TFX itself would pass it, and no
build directory left behind; a spec that names its own dependencies is left alone."""
from __future__ import annotations

import tarfile
import tempfile

import pytest
from tfx import version

from conveyor_ml.pipelines.beam_dependencies import names_dependencies, tfx_package, with_tfx_package


@pytest.mark.parametrize("args, named", [
    ([], False),
    (["--direct_running_mode=in_memory", "--direct_num_workers=1"], False),
    (["--setup_file=./setup.py"], True),
    (["--runner=DataflowRunner", "--sdk_container_image=europe-docker.pkg.dev/p/r/conveyor:0.1.0"], True),
    (["--extra_package", "dist/x.tar.gz"], True),
    (["--requirements_file=requirements.txt"], True),
    (["--temp_location=gs://bucket/setup_file"], False),
    (["--setup_file="], False),  # empty: TFX counts only a non-empty value
], ids=["none", "direct-runner", "setup-file", "container-image", "extra-package", "requirements", "value-only",
        "empty-value"])
def test_dependency_flags_are_recognised(args, named):
    assert names_dependencies(args) is named


def test_the_tfx_package_is_built_once_per_workspace_and_its_build_directory_removed(tmp_path, monkeypatch):
    scratch = tmp_path / "tmp"
    scratch.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(scratch))  # where TFX builds it (mkdtemp)
    cache = tmp_path / "workspace" / ".cache"

    args = with_tfx_package(["--direct_running_mode=in_memory"], cache)

    package = cache / f"tfx_ephemeral-{version.__version__}.tar.gz"
    assert args == ["--direct_running_mode=in_memory", f"--extra_package={package.resolve()}"]
    with tarfile.open(package) as sdist:
        names = sdist.getnames()
    assert f"tfx_ephemeral-{version.__version__}/setup.py" in names
    assert any(name.endswith("/tfx/orchestration/portable/launcher.py") for name in names)
    assert list(scratch.iterdir()) == []  # TFX leaves its ~50 MB build directory; we remove it
    assert [p.name for p in cache.iterdir()] == [package.name]  # no partial file

    built_at = package.stat().st_mtime_ns
    assert tfx_package(cache) == package.resolve()
    assert package.stat().st_mtime_ns == built_at  # reused, not rebuilt


def test_a_spec_that_names_its_dependencies_is_left_alone(tmp_path):
    args = ["--runner=DataflowRunner", "--setup_file=./setup.py"]
    assert with_tfx_package(args, tmp_path / ".cache") == args
    assert not (tmp_path / ".cache").exists()
