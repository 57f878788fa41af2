"""ML Metadata connections: SQLite (default, a file in the workspace) or MySQL/MariaDB from the spec."""
from __future__ import annotations

import contextlib
import re
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
    else:
        path = Path(spec.sqlite).resolve()
        config.sqlite.filename_uri = str(path)
        config.sqlite.connection_mode = (metadata_store_pb2.SqliteMetadataSourceConfig.READONLY if read_only else
                                         metadata_store_pb2.SqliteMetadataSourceConfig.READWRITE_OPENCREATE)
    return config


def _mysql_reason(spec: MetadataSettings, message: str) -> str:
    """MLMD reports every MySQL failure as an empty `mysql_real_connect failed`; tell the two apart."""
    import socket

    if "mysql_real_connect" not in message:
        return message.splitlines()[0][:200]
    try:
        socket.create_connection((spec.mysql.host, spec.mysql.port), timeout=3).close()
    except OSError as exc:
        return f"no server answers there ({exc.strerror or exc}); start it or fix metadata.mysql.host/port"
    where = f"${spec.mysql.password_env}" if spec.mysql.password_env else "metadata.mysql.password_env"
    return f"the server refused the login or the database; check the user, the password in {where} and the grants"


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
    config = connection_config(spec, read_only)
    for attempt in range(retries):
        try:
            with native_stderr_discarded():  # MLMD's C++ logs its own copy of every connection error
                return metadata_store.MetadataStore(config)
        except Exception as exc:  # MLMD raises plain errors with the backend's message
            message = str(exc)
            if "locked" in message.lower() and attempt < retries - 1:
                time.sleep(0.25)
                continue
            if spec.mysql:
                raise ConveyorError(
                    f"cannot connect to the MySQL metadata store at {spec.mysql.host}:{spec.mysql.port} "
                    f"as user {spec.mysql.user!r}: {_mysql_reason(spec, message)}") from None
            # MLMD appends the SQL it ran ("... query: CREATE TABLE ..."), which says nothing to a user.
            first = message.splitlines()[0] if message.strip() else type(exc).__name__
            sql_error = re.match(r"Error when executing query: (.*?) query: ", first)
            reason = sql_error.group(1) if sql_error else first[:300]
            raise ConveyorError(f"cannot open the metadata store {describe(spec)}: {reason}; it is not an ML "
                                "Metadata database or is damaged: point metadata.sqlite at another file, or move "
                                "this one away to start a new store (its lineage stays in it)") from None
    raise AssertionError("unreachable")
