"""The MySQL metadata store under the faults production meets, against a real MariaDB: a server that is down
or never answers, killed in the middle of a run, closing idle connections (wait_timeout), a database that
does not exist and users without rights. Each is one line naming host:port or the database, and the fix."""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conveyor_ml.base.ports import free_port
from tests.conftest import ROOT
from tests.fakes.mariadb import PASSWORD_ENV, MariaDB, mysql_spec

pytestmark = pytest.mark.slow

NO_RUNS = "conveyor: no runs yet — run `make pipeline`"


def conveyor(*args, password: str | None = "s3cret", timeout: float = 300) -> subprocess.CompletedProcess:
    """The CLI in a child process with the MySQL password in its variable (None: the variable unset)."""
    env = {k: v for k, v in os.environ.items() if k != PASSWORD_ENV}
    env.update({"PYTHONWARNINGS": "ignore", **({PASSWORD_ENV: password} if password is not None else {})})
    return subprocess.run([sys.executable, "-m", "conveyor_ml.cli", *map(str, args)], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=timeout)


def one_error_line(result: subprocess.CompletedProcess) -> str:
    """The command failed (exit 2) with exactly one line on stderr, and no traceback: that line."""
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 2 and len(lines) == 1, (result.returncode, result.stdout[-2000:],
                                                         result.stderr[-3000:])
    assert lines[0].startswith("conveyor: error: ")
    return lines[0]


def released_workspace(directory: Path, port: int) -> tuple[Path, Path]:
    """The default spec on MySQL with two versions of mnist on disk, 1 stable and 2 canary at 10 %: what
    promote, rollback and status act on (no pipeline run needed to reach the store)."""
    from conveyor_ml.formats import release_state as releases

    spec = mysql_spec(directory, port, base=ROOT / "pipelines" / "mnist.yaml")
    base = directory / "workspace" / "serving"
    for version in (1, 2):
        (base / "mnist" / str(version)).mkdir(parents=True)
        (base / "mnist" / str(version) / "saved_model.pb").write_bytes(b"")
    state = releases.read_state(base)
    release = state.release("mnist")
    releases.release_new_version(release, 1, "direct", 0)
    releases.release_new_version(release, 2, "canary", 10)
    state.models["mnist"] = release
    releases.commit(state)
    releases.sync_served_files(state)
    return spec, base


def file_identities(directory: Path) -> dict[str, tuple[int, int]]:
    """(inode, mtime) of each file: an atomic rewrite, even one put back, changes them."""
    return {str(p.relative_to(directory)): (p.stat().st_ino, p.stat().st_mtime_ns)
            for p in sorted(directory.rglob("*")) if p.is_file() and p.name != ".conveyor.lock"}


def test_a_stopped_mysql_server_is_one_line_for_each_command_and_nothing_is_written(tmp_path):
    port = free_port()  # nothing listens there
    spec = mysql_spec(tmp_path / "pipeline", port)
    run = conveyor("run", spec)
    line = one_error_line(run)
    assert f"cannot connect to the MySQL metadata store at 127.0.0.1:{port}" in line
    assert "no server answers there" in line and "start it or fix metadata.mysql.host/port" in line
    assert not (tmp_path / "pipeline" / "workspace").exists()  # no span, no Beam package, no run lock
    for command in ("runs", "lineage", "models"):
        assert one_error_line(conveyor(command, "--spec", spec)) == line, command

    release_spec, serving = released_workspace(tmp_path / "release", port)
    before = file_identities(serving)
    for command in (("promote", "mnist"), ("rollback", "mnist"), ("status",)):
        line = one_error_line(conveyor(*command, "--spec", release_spec))
        assert f"at 127.0.0.1:{port}" in line and "no server answers there" in line, command
        # The served files were not changed and put back: a server reading them never saw the change.
        assert file_identities(serving) == before, command


def test_a_port_that_accepts_but_never_greets_is_reported_within_seconds(tmp_path):
    """A stopped (SIGSTOP) or overloaded server, or another service on the port, accepts the connection and
    says nothing: MLMD's client, which sets no timeout, would wait forever."""
    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen(8)
        spec = mysql_spec(tmp_path, silent.getsockname()[1])
        started = time.monotonic()
        line = one_error_line(conveyor("runs", "--spec", spec, timeout=60))
    assert time.monotonic() - started < 40
    assert "sends no MySQL greeting within 10 s" in line and "metadata.mysql.port" in line


def test_mysql_server_killed_during_a_run_fails_it_in_one_line_and_the_next_run_completes(tmp_path):
    with MariaDB(tmp_path / "mariadb") as server:
        spec = mysql_spec(tmp_path, server.port)
        run = subprocess.Popen([sys.executable, "-m", "conveyor_ml.cli", "run", str(spec)], cwd=ROOT,
                               text=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                               env={**os.environ, "PYTHONWARNINGS": "ignore", "PYTHONUNBUFFERED": "1",
                                    PASSWORD_ENV: server.password})
        try:
            seen = []
            for line in run.stdout:
                seen.append(line)
                if "[trainer] step" in line:  # mid-training: TFX has registered the Trainer's execution
                    break
            else:
                raise AssertionError("the run never reached training:\n" + "".join(seen) + run.stderr.read())
            server.kill()
            killed = time.monotonic()
            stdout, stderr = run.communicate(timeout=120)
        finally:
            if run.poll() is None:
                run.kill()
                run.wait()
        assert time.monotonic() - killed < 60  # TFX retries the connection ten times, MLMD not at all
        [run_line] = [line for line in seen if line.startswith("conveyor: running pipeline")]
        run_id = run_line.split("(run ")[1].rstrip(")\n")
        line = one_error_line(subprocess.CompletedProcess(run.args, run.returncode, stdout, stderr))
        assert line.startswith(f"conveyor: error: run {run_id} failed at Trainer: lost the MySQL metadata "
                               f"store at 127.0.0.1:{server.port}: no server answers there"), line
        assert "this run stays unfinished" in line

        server.start()
        again = conveyor("run", spec)
        assert again.returncode == 0, again.stdout[-2000:] + again.stderr[-2000:]
        runs = {row["run_id"]: row for row in json.loads(conveyor("runs", "--spec", spec, "--format", "json")
                                                         .stdout)["runs"]}
        assert runs[run_id]["status"] != "complete", runs[run_id]
        assert [row["status"] for row in runs.values()].count("complete") == 1


def test_scheduler_outlives_idle_timeouts_and_a_mysql_restart(tmp_path):
    """The scheduler is the long-lived process: with wait_timeout at 2 s the server closes every connection
    idle that long (as MariaDB's default 8 h does overnight), and the server is down when a span lands."""
    with MariaDB(tmp_path / "mariadb", options=("--wait-timeout=2",)) as server:
        spec = mysql_spec(tmp_path, server.port)
        env = {**os.environ, "PYTHONWARNINGS": "ignore", "PYTHONUNBUFFERED": "1",
               PASSWORD_ENV: server.password}
        scheduler = subprocess.Popen(
            [sys.executable, "-m", "conveyor_ml.cli", "schedule", str(spec), "--on-new-data", "--poll", "1s",
             "--max-runs", "1"], cwd=ROOT, text=True, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
            env=env)
        log = tmp_path / "workspace" / ".conveyor" / "schedule.log"
        try:
            deadline = time.monotonic() + 60
            while not (log.is_file() and "watching" in log.read_text()):
                assert scheduler.poll() is None and time.monotonic() < deadline, scheduler.stdout.read()
                time.sleep(0.2)
            time.sleep(3)  # idle past wait_timeout
            server.kill()
            init = conveyor("data", "init", "--spec", spec, password=server.password)
            assert init.returncode == 0, init.stderr
            deadline = time.monotonic() + 60
            while "cannot connect" not in log.read_text():
                assert scheduler.poll() is None and time.monotonic() < deadline, scheduler.stdout.read()
                time.sleep(0.2)
            time.sleep(2)
            server.start()
            output, _ = scheduler.communicate(timeout=240)
        finally:
            if scheduler.poll() is None:
                scheduler.kill()
                scheduler.wait()
        assert scheduler.returncode == 0, output[-3000:]
        lines = [line.split(" conveyor schedule: ", 1)[1] for line in log.read_text().splitlines()]
        down = [line for line in lines if "cannot connect" in line]
        assert len(down) == 1 and f"127.0.0.1:{server.port}" in down[0], lines  # logged once, not every poll
        assert "metadata store reachable again" in lines
        assert any(line.startswith("run succeeded") for line in lines), lines


def test_a_store_connection_idle_past_wait_timeout_reconnects(tmp_path):
    """MLMD's MySQL client reconnects by itself when the server closed an idle connection (`MySQL server has
    gone away`), reads and writes alike; conveyor's long-lived processes also open the store per use."""
    from ml_metadata.proto import metadata_store_pb2 as pb

    from conveyor_ml.base.spec import load_spec
    from conveyor_ml.metadata import store as metadata

    with MariaDB(tmp_path / "mariadb", options=("--wait-timeout=2",)) as server:
        os.environ[PASSWORD_ENV] = server.password
        try:
            store = metadata.open_store(load_spec(mysql_spec(tmp_path, server.port)).metadata)
            type_id = store.put_context_type(pb.ContextType(name="idle_probe"))
            time.sleep(3.5)
            # The server closed the idle connection.
            assert server.sql("SHOW GLOBAL STATUS LIKE 'Aborted_clients'").split()[1] == "1"
            store.put_contexts([pb.Context(type_id=type_id, name="after idle")])
            assert [c.name for c in store.get_contexts_by_type("idle_probe")] == ["after idle"]
        finally:
            os.environ.pop(PASSWORD_ENV, None)


def test_missing_database_and_missing_rights_are_one_line_each(tmp_path):
    with MariaDB(tmp_path / "mariadb") as server:
        server.sql("CREATE USER 'reader'@'127.0.0.1' IDENTIFIED BY 's3cret'; "
                   f"GRANT SELECT ON {server.database}.* TO 'reader'@'127.0.0.1'; "
                   "CREATE USER 'stranger'@'127.0.0.1' IDENTIFIED BY 's3cret'; "
                   "CREATE USER 'admin'@'127.0.0.1' IDENTIFIED BY 's3cret'; "
                   "GRANT ALL ON *.* TO 'admin'@'127.0.0.1';")
        owner = mysql_spec(tmp_path / "owner", server.port)
        assert conveyor("runs", "--spec", owner).stdout.strip() == NO_RUNS

        # A mistyped database name, for a user with rights on the real one only: MySQL says "access denied".
        line = one_error_line(conveyor("runs", "--spec", mysql_spec(tmp_path / "typo", server.port,
                                                                    database="conveyor_mlmdx")))
        assert line.endswith("user 'conveyor' may not use database 'conveyor_mlmdx' (a run needs all rights "
                             "on it, a query SELECT): GRANT ALL ON conveyor_mlmdx.* TO "
                             "'conveyor'@'127.0.0.1', or fix metadata.mysql.database/user"), line

        # A database that does not exist, for a user who could create it: a query creates nothing.
        line = one_error_line(conveyor("lineage", "--spec", mysql_spec(tmp_path / "missing", server.port,
                                                                       database="not_there", user="admin")))
        assert "database 'not_there' does not exist; fix metadata.mysql.database" in line, line
        assert server.sql("SHOW DATABASES LIKE 'not_there'").strip() == ""

        # A user who may only read: queries answer, a run is refused before it writes anything.
        reader = mysql_spec(tmp_path / "reader", server.port, user="reader")
        assert conveyor("runs", "--spec", reader).stdout.strip() == NO_RUNS
        line = one_error_line(conveyor("run", reader))
        assert f"user 'reader' may not use database '{server.database}'" in line
        assert f"GRANT ALL ON {server.database}.* TO 'reader'@'127.0.0.1'" in line
        assert not (tmp_path / "reader" / "workspace").exists()

        # A user with no rights at all, and a password variable that is not set.
        stranger = mysql_spec(tmp_path / "stranger", server.port, user="stranger")
        line = one_error_line(conveyor("models", "--spec", stranger))
        assert "user 'stranger' may not use database" in line, line
        line = one_error_line(conveyor("runs", "--spec", owner, password=None))
        assert line.endswith(f"${PASSWORD_ENV} is not set: export the password there"), line
