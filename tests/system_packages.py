"""Debian packages a test needs (Chromium, MariaDB), installed by the test itself when absent, so a fresh
machine and CI need nothing done by hand. Installation failing is a test failure, never a skip."""
from __future__ import annotations

import os
import shutil
import subprocess

import pytest


def ensure_debian_packages(executables: dict[str, str]) -> None:
    """{executable: Debian package}; installs the packages of missing executables with apt-get."""
    missing = sorted({package for executable, package in executables.items() if shutil.which(executable) is None})
    if not missing:
        return
    if os.geteuid() != 0 or shutil.which("apt-get") is None:
        pytest.fail(f"this test needs the Debian packages {', '.join(missing)}: "
                    f"apt-get install {' '.join(missing)}")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    install = ["apt-get", "install", "-y", "-q", "--no-install-recommends", *missing]
    if subprocess.run(install, env=env, capture_output=True).returncode != 0:
        subprocess.run(["apt-get", "update", "-q"], env=env, capture_output=True, check=False)
        result = subprocess.run(install, env=env, capture_output=True, text=True)
        if result.returncode != 0:
            pytest.fail(f"apt-get install {' '.join(missing)} failed: {result.stderr[-500:]}")
