"""ML Metadata connections: SQLite (default, a file in the workspace) or MySQL/MariaDB from the spec."""
from __future__ import annotations

import contextlib
import os
import re
import socket
import time
from pathlib import Path

from ml_metadata.metadata_store import metadata_store
from ml_metadata.proto import metadata_store_pb2

from conveyor_ml.base.errors import ConveyorError
from conveyor_ml.base.native_output import native_stderr_discarded
from conveyor_ml.base.spec import MetadataSettings


def connection_config(spec: MetadataSettings, read_only: bool = False) -> metadata_store_pb2.ConnectionConfig:
    config = metadata_store_pb2.ConnectionConfig()
    if spec.mysql:
        mysql = spec.mysql
        config.mysql.host = mysql.host
        config.mysql.port = mysql.port
        config.mysql.database = mysql.database
        config.mysql.user = mysql.user
        config.mysql.password = mysql.password()
        # A query creates nothing (as with SQLite): without this MLMD runs CREATE DATABASE IF NOT EXISTS,
        # which makes a database of a mistyped name and refuses a user who may only SELECT.
        config.mysql.skip_db_creation = read_only
    else:
        path = Path(spec.sqlite).resolve()
        config.sqlite.filename_uri = str(path)
        config.sqlite.connection_mode = (metadata_store_pb2.SqliteMetadataSourceConfig.READONLY if read_only else
                                         metadata_store_pb2.SqliteMetadataSourceConfig.READWRITE_OPENCREATE)
    return config


# How long a MySQL server may take to accept a connection and greet: MLMD's client sets no timeout, so a
# firewall that drops packets, a stopped (SIGSTOP) server or another service on the port would hang it.
GREETING_TIMEOUT_S = 10.0
_greeted: set[tuple[str, int]] = set()  # servers that greeted this process once: not probed again

# What MLMD's messages say when the server went away under a connection (killed, restarted, network lost).
_CONNECTION_LOST = ("mysql_real_connect failed", "Failed to establish connection to Metadata storage",
                    "Lost connection to MySQL server", "MySQL server has gone away", "Can't connect to",
                    "MySQL database was not initialized")


def _probe_mysql(host: str, port: int) -> str | None:
    """Why the server at host:port cannot be used (one line with the fix), None when it greets as MySQL
    does. Bounded by GREETING_TIMEOUT_S, where MLMD's own connect may wait forever."""
    try:
        connection = socket.create_connection((host, port), timeout=GREETING_TIMEOUT_S)
    except TimeoutError:
        return (f"no answer within {GREETING_TIMEOUT_S:g} s (a firewall dropping packets, or a wrong "
                "address); check metadata.mysql.host/port and the network")
    except OSError as exc:
        return f"no server answers there ({exc.strerror or exc}); start it or fix metadata.mysql.host/port"
    with contextlib.closing(connection):
        try:
            greeting = connection.recv(512)
        except TimeoutError:
            return (f"something accepts connections there but sends no MySQL greeting within "
                    f"{GREETING_TIMEOUT_S:g} s (a stopped or overloaded server, or another service on that "
                    "port); check the server, or fix metadata.mysql.port")
        except OSError as exc:
            greeting, error = b"", exc
        else:
            error = None
    if len(greeting) > 4 and greeting[4] == 0xFF:  # an error packet: [0xff][code:2][#sqlstate:6]?[message]
        code = int.from_bytes(greeting[5:7], "little")
        message = greeting[7:].decode("utf-8", "replace")
        message = message[6:] if message.startswith("#") else message
        return f"the server turned the connection away: {message.strip()} (error {code})"
    if not greeting:
        why = f" ({error.strerror or error})" if error else ""
        return (f"the connection was closed without a MySQL greeting{why} (a proxy whose server is down, or "
                "not a MySQL server); check the server, or fix metadata.mysql.port")
    if len(greeting) <= 4 or greeting[4] != 0x0A:  # protocol 10: every MySQL and MariaDB since 3.21
        return "what answers there is not a MySQL server; fix metadata.mysql.port"
    return None


def _mysql_reason(spec: MetadataSettings, message: str) -> str:
    """One line, with the fix, for an error MLMD raised on a MySQL store. MLMD reports a refused login as an
    empty `mysql_real_connect failed`; a server that is down is told apart by connecting to it."""
    mysql = spec.mysql
    database, user = mysql.database, mysql.user
    if "Unknown database" in message:
        return (f"database {database!r} does not exist; fix metadata.mysql.database, or create it (`conveyor "
                f"run` does, when user {user!r} may)")
    denied = re.search(r"(?:Access denied for|(\w+) command denied to) user '[^']*'@'([^']*)'", message)
    if denied:
        what = f"{denied.group(1)} in" if denied.group(1) else "use"
        return (f"user {user!r} may not {what} database {database!r} (a run needs all rights on it, a query "
                f"SELECT): GRANT ALL ON {database}.* TO '{user}'@'{denied.group(2)}', or fix "
                "metadata.mysql.database/user")
    lost = any(marker in message for marker in _CONNECTION_LOST)
    if lost:
        down = _probe_mysql(mysql.host, mysql.port)
        if down:
            return down
    if "mysql_real_connect" in message:
        if mysql.password_env and mysql.password_env not in os.environ:
            return f"${mysql.password_env} is not set: export the password there"
        where = f"${mysql.password_env}" if mysql.password_env else "metadata.mysql.password_env"
        return (f"the server refused the login; check the user, the password in {where} and that the user "
                "may connect from this host")
    if lost:
        return "the connection to the server was lost; check the server and its log"
    return message.splitlines()[0][:200] if message.strip() else "unknown error"


def connection_lost(spec: MetadataSettings, error: BaseException | str) -> str | None:
    """For a MySQL store, the one-line reason when `error` (or one in its chain, as Beam and TFX wrap them)
    says the server went away, else None."""
    if not spec.mysql:
        return None
    seen: set[int] = set()
    while isinstance(error, BaseException) and id(error) not in seen:
        seen.add(id(error))
        if any(marker in str(error) for marker in _CONNECTION_LOST):
            break
        error = error.__cause__ or error.__context__
    message = str(error) if error is not None else ""
    if not any(marker in message for marker in _CONNECTION_LOST):
        return None
    reason = _probe_mysql(spec.mysql.host, spec.mysql.port)
    if reason is None:  # it answers again: this process connected before, so not a wrong address
        reason = ("the server would not take a new connection for a moment (a restart, a network drop, or a "
                  "changed password)" if "mysql_real_connect" in message else
                  "the connection to the server was lost (a restart or a network drop)")
    return f"lost the MySQL metadata store at {spec.mysql.host}:{spec.mysql.port}: {reason}"


def describe(spec: MetadataSettings) -> str:
    if spec.mysql:
        return f"mysql://{spec.mysql.user}@{spec.mysql.host}:{spec.mysql.port}/{spec.mysql.database}"
    return str(spec.sqlite)


def store_exists(spec: MetadataSettings) -> bool:
    return bool(spec.mysql) or Path(spec.sqlite).is_file()


def _refuse_foreign_sqlite(path: Path) -> None:
    """A SQLite database with tables but none of ML Metadata's is someone else's: MLMD would add its tables
    to it (even `conveyor status` did). An empty or new file is a new store; damage is MLMD's to report."""
    import sqlite3

    try:
        if not path.is_file() or path.stat().st_size == 0:
            return
        with contextlib.closing(sqlite3.connect(f"{path.resolve().as_uri()}?mode=ro", uri=True, timeout=5)) as db:
            tables = {name for (name,) in db.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
    except (OSError, sqlite3.Error):
        return
    if tables and "MLMDEnv" not in tables:
        shown = ", ".join(sorted(tables)[:5])
        raise ConveyorError(f"{path} is a SQLite database of another program (tables {shown}), not an ML Metadata "
                            "store: point metadata.sqlite at another file")


def open_store(spec: MetadataSettings, *, retries: int = 20, read_only: bool = False) -> metadata_store.MetadataStore:
    """Connects, retrying while another process (a pipeline run) holds the SQLite write lock. Read-only
    connections (lineage queries) never take that lock."""
    if not spec.mysql:
        _refuse_foreign_sqlite(Path(spec.sqlite))
    elif (spec.mysql.host, spec.mysql.port) not in _greeted:
        down = _probe_mysql(spec.mysql.host, spec.mysql.port)
        if down:
            raise ConveyorError(_cannot_connect(spec, down))
        _greeted.add((spec.mysql.host, spec.mysql.port))
    config = connection_config(spec, read_only)
    for attempt in range(retries):
        try:
            with native_stderr_discarded():  # MLMD's C++ logs its own copy of every connection error
                return metadata_store.MetadataStore(config)
        except Exception as exc:  # MLMD raises plain errors with the backend's message
            message = str(exc)
            if spec.mysql:
                _greeted.discard((spec.mysql.host, spec.mysql.port))  # probed again next time
            if "locked" in message.lower() and attempt < retries - 1:
                time.sleep(0.25)
                continue
            if spec.mysql:
                raise ConveyorError(_cannot_connect(spec, _mysql_reason(spec, message))) from None
            # MLMD appends the SQL it ran ("... query: CREATE TABLE ..."), which says nothing to a user.
            first = message.splitlines()[0] if message.strip() else type(exc).__name__
            sql_error = re.match(r"Error when executing query: (.*?) query: ", first)
            reason = sql_error.group(1) if sql_error else first[:300]
            raise ConveyorError(f"cannot open the metadata store {describe(spec)}: {reason}; it is not an ML "
                                "Metadata database or is damaged: point metadata.sqlite at another file, or move "
                                "this one away to start a new store (its lineage stays in it)") from None
    raise AssertionError("unreachable")


def _cannot_connect(spec: MetadataSettings, reason: str) -> str:
    return (f"cannot connect to the MySQL metadata store at {spec.mysql.host}:{spec.mysql.port} as user "
            f"{spec.mysql.user!r}: {reason}")


def check_store(spec: MetadataSettings) -> None:
    """Raises ConveyorError (one line) unless the store can be opened for writing: a command that writes
    runs it before it changes anything, so an unreachable MySQL server leaves nothing half done. A SQLite
    store is a file the command creates; nothing to check."""
    if spec.mysql:
        open_store(spec)
