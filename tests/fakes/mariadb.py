"""A throwaway MariaDB server on 127.0.0.1 for the MySQL metadata backend: a datadir in a temp folder,
started as a child process, stopped by its PID."""
from __future__ import annotations

import os
import signal
import socket
import subprocess
import time
from pathlib import Path

from conveyor_ml.base.ports import free_port
from tests.system_packages import ensure_debian_packages


class MariaDB:
    def __init__(self, directory: Path, database: str = "conveyor_mlmd", password: str = "s3cret"):
        self.directory = directory
        self.port = free_port()
        self.database = database
        self.user = "conveyor"
        self.password = password
        self.process: subprocess.Popen | None = None

    def __enter__(self) -> MariaDB:
        ensure_debian_packages({"mariadbd": "mariadb-server", "mariadb-install-db": "mariadb-server",
                                "mariadb": "mariadb-client"})
        data = self.directory / "data"
        subprocess.run(["mariadb-install-db", f"--datadir={data}", "--user=root", "--auth-root-authentication-method=normal",
                        "--skip-test-db"], check=True, capture_output=True)
        socket_path = self.directory / "mariadb.sock"
        self.process = subprocess.Popen(
            ["mariadbd", "--no-defaults", f"--datadir={data}", "--user=root", "--bind-address=127.0.0.1",
             f"--port={self.port}", f"--socket={socket_path}", f"--pid-file={self.directory / 'mariadb.pid'}",
             "--skip-log-bin", "--skip-name-resolve"],
            stdout=subprocess.DEVNULL, stderr=open(self.directory / "mariadb.log", "wb"))
        deadline = time.monotonic() + 60
        while True:
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=1).close()
                break
            except OSError:
                if self.process.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError("MariaDB did not start: "
                                       + (self.directory / "mariadb.log").read_text()[-1000:]) from None
                time.sleep(0.2)
        statements = (f"CREATE DATABASE {self.database}; "
                      f"CREATE USER '{self.user}'@'localhost' IDENTIFIED BY '{self.password}'; "
                      f"CREATE USER '{self.user}'@'127.0.0.1' IDENTIFIED BY '{self.password}'; "
                      f"GRANT ALL ON {self.database}.* TO '{self.user}'@'localhost'; "
                      f"GRANT ALL ON {self.database}.* TO '{self.user}'@'127.0.0.1';")
        subprocess.run(["mariadb", f"--socket={socket_path}", "-uroot", "-e", statements], check=True, capture_output=True)
        return self

    def metadata_section(self, password_env: str = "CONVEYOR_MYSQL_PASSWORD") -> dict:
        return {"mysql": {"host": "127.0.0.1", "port": self.port, "database": self.database, "user": self.user,
                          "password_env": password_env}}

    def __exit__(self, *exc) -> None:
        if self.process and self.process.poll() is None:
            os.kill(self.process.pid, signal.SIGTERM)
            try:
                self.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.kill(self.process.pid, signal.SIGKILL)
