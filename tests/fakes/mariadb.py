"""A throwaway MariaDB server on 127.0.0.1 for the MySQL metadata backend: a datadir in a temp folder,
started as a child process, stopped by its PID. `kill()` and `start()` take it down (SIGKILL) and bring the
same datadir back on the same port; `sql()` runs statements as root (users, grants, server variables)."""
from __future__ import annotations

import os
import signal
import socket
import subprocess
import time
from pathlib import Path

import yaml

from conveyor_ml.base.ports import free_port
from tests.conftest import ROOT, write_spec
from tests.system_packages import ensure_debian_packages

PASSWORD_ENV = "CONVEYOR_MYSQL_PASSWORD"  # the variable the specs below name for the password


class MariaDB:
    def __init__(self, directory: Path, database: str = "conveyor_mlmd", password: str = "s3cret",
                 options: tuple[str, ...] = ()):
        self.directory = directory
        self.port = free_port()
        self.database = database
        self.user = "conveyor"
        self.password = password
        self.options = tuple(options)  # extra mariadbd options, e.g. ("--wait-timeout=2",)
        self.process: subprocess.Popen | None = None

    @property
    def socket_path(self) -> Path:
        return self.directory / "mariadb.sock"

    def __enter__(self) -> MariaDB:
        ensure_debian_packages({"mariadbd": "mariadb-server", "mariadb-install-db": "mariadb-server",
                                "mariadb": "mariadb-client"})
        subprocess.run(["mariadb-install-db", f"--datadir={self.directory / 'data'}", "--user=root",
                        "--auth-root-authentication-method=normal", "--skip-test-db"],
                       check=True, capture_output=True)
        self.start()
        self.sql(f"CREATE DATABASE {self.database}; "
                 f"CREATE USER '{self.user}'@'localhost' IDENTIFIED BY '{self.password}'; "
                 f"CREATE USER '{self.user}'@'127.0.0.1' IDENTIFIED BY '{self.password}'; "
                 f"GRANT ALL ON {self.database}.* TO '{self.user}'@'localhost'; "
                 f"GRANT ALL ON {self.database}.* TO '{self.user}'@'127.0.0.1';")
        return self

    def start(self) -> None:
        """Starts the server on its datadir and port (again, after `kill`); returns once it accepts
        connections."""
        log = open(self.directory / "mariadb.log", "ab")
        self.process = subprocess.Popen(
            ["mariadbd", "--no-defaults", f"--datadir={self.directory / 'data'}", "--user=root",
             "--bind-address=127.0.0.1", f"--port={self.port}", f"--socket={self.socket_path}",
             f"--pid-file={self.directory / 'mariadb.pid'}", "--skip-log-bin", "--skip-name-resolve",
             *self.options],
            stdout=subprocess.DEVNULL, stderr=log)
        log.close()
        deadline = time.monotonic() + 60
        while True:
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=1).close()
                return
            except OSError:
                if self.process.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError("MariaDB did not start: "
                                       + (self.directory / "mariadb.log").read_text()[-1000:]) from None
                time.sleep(0.2)

    def kill(self) -> None:
        """SIGKILL, as the OOM killer or a crash would: no clean shutdown, connections cut."""
        os.kill(self.process.pid, signal.SIGKILL)
        self.process.wait(timeout=30)

    def sql(self, statements: str) -> str:
        """Runs `statements` as root over the server's socket; returns what the client printed."""
        return subprocess.run(["mariadb", f"--socket={self.socket_path}", "-uroot", "-N", "-e", statements],
                              check=True, capture_output=True, text=True).stdout

    def __exit__(self, *exc) -> None:
        if self.process and self.process.poll() is None:
            os.kill(self.process.pid, signal.SIGTERM)
            try:
                self.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.kill(self.process.pid, signal.SIGKILL)
                self.process.wait()


def mysql_spec(directory: Path, port: int, *, database: str = "conveyor_mlmd", user: str = "conveyor",
               base: Path = ROOT / "tests" / "specs" / "csv_6x6.yaml") -> Path:
    """The tiny CSV pipeline (or `base`) with its metadata in MySQL at 127.0.0.1:`port`."""
    directory.mkdir(parents=True, exist_ok=True)
    csv = base.name == "csv_6x6.yaml"
    changes = {"data.path": str(ROOT / "tests" / "fixtures" / "digits_6x6.csv")} if csv else {}
    spec = write_spec(directory, base=base, **changes)
    document = yaml.safe_load(spec.read_text())
    document["metadata"] = {"mysql": {"host": "127.0.0.1", "port": port, "database": database, "user": user,
                                      "password_env": PASSWORD_ENV}}
    spec.write_text(yaml.safe_dump(document, sort_keys=False))
    return spec
