"""The TFX package Beam workers need, built once per workspace instead of once per component.

Without a dependency flag in its Beam arguments, each of TFX's Beam executors (StatisticsGen, ExampleValidator,
Evaluator...) repackages the installed TFX as an sdist for remote workers when it starts: ~2 s each on this
2-core machine, three times a run, and every copy (~50 MB) left in the temporary directory. The package
depends only on the installed TFX, so one build per TFX version is kept under the workspace and passed as
`--extra_package`, which is what TFX would pass. A spec that names its own dependencies (`--setup_file`,
`--extra_package(s)`, `--requirements_file`, a container image) is left as it is.
"""
from __future__ import annotations

import logging
import os
import shutil
import tempfile
from pathlib import Path

log = logging.getLogger(__name__)

# The Beam options with which TFX's executors take the workers' dependencies as given
# (tfx.utils.dependency_utils.make_beam_dependency_flags).
DEPENDENCY_OPTIONS = ("extra_package", "extra_packages", "setup_file", "requirements_file",
                      "worker_harness_container_image", "sdk_container_image")


def beam_option(args: tuple[str, ...] | list[str], name: str) -> str | None:
    """The value of `--name=value` (or `--name value`) in Beam arguments, the last one winning."""
    value = None
    for index, arg in enumerate(args):
        if arg.startswith(f"--{name}="):
            value = arg.split("=", 1)[1]
        elif arg == f"--{name}" and index + 1 < len(args):
            value = args[index + 1]
    return value


def names_dependencies(beam_args: list[str]) -> bool:
    """Whether the arguments already say how workers get their dependencies (a non-empty value, as TFX checks)."""
    return any(beam_option(beam_args, name) for name in DEPENDENCY_OPTIONS)


def with_tfx_package(beam_args: list[str], cache_dir: Path) -> list[str]:
    """The arguments, plus `--extra_package=` the cached TFX sdist unless they name their dependencies."""
    if names_dependencies(beam_args):
        return list(beam_args)
    return [*beam_args, f"--extra_package={tfx_package(cache_dir)}"]


def tfx_package(cache_dir: Path) -> Path:
    """The TFX sdist for the installed TFX version, built on first use (atomically: concurrent runs each
    publish a complete file) and its build directory removed."""
    from tfx import version
    from tfx.utils import dependency_utils

    target = cache_dir.resolve() / f"tfx_ephemeral-{version.__version__}.tar.gz"
    if target.is_file():
        return target
    log.info("building the TFX package for Beam workers (once per workspace) in %s", cache_dir)
    built = Path(dependency_utils.build_ephemeral_package())
    build_root = built.parents[3]  # <mkdtemp>/build/tfx/dist/<sdist>
    try:
        cache_dir.mkdir(parents=True, exist_ok=True)
        fd, partial = tempfile.mkstemp(dir=cache_dir, prefix=f".{target.name}.")
        os.close(fd)
        try:
            shutil.copyfile(built, partial)
            os.replace(partial, target)
        finally:
            Path(partial).unlink(missing_ok=True)
    finally:
        if build_root.parent == Path(tempfile.gettempdir()):
            shutil.rmtree(build_root, ignore_errors=True)
    return target
