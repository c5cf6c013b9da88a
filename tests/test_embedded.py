"""Integration tests for hyperpool.embedded against the machine's real PostgreSQL binaries."""

from __future__ import annotations

import socket
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest
from psycopg.conninfo import conninfo_to_dict

from hyperpool import embedded
from hyperpool.embedded import EmbeddedPostgres, EmbeddedPostgresError, find_pg_bindir


@pytest.fixture(scope="module")
def pg() -> Iterator[EmbeddedPostgres]:
    """One cluster for the module; its teardown also checks that cleanup removes everything."""
    cluster = EmbeddedPostgres(superuser="boss", password="boss pw", settings={"work_mem": "7MB"})
    with cluster:
        base_dir = cluster.base_dir
        yield cluster
    assert not cluster.running
    assert not base_dir.exists()
    cluster.cleanup()  # idempotent
    cluster.stop()  # harmless after cleanup


def test_execute_runs_sql_over_the_unix_socket(pg: EmbeddedPostgres) -> None:
    assert pg.running
    assert pg.execute("select 1") == "1"
    assert pg.execute("select current_user") == "boss"
    assert pg.execute("select 1; select 'two'") == "1\ntwo"
    assert pg.execute("show work_mem") == "7MB"  # self.settings reach postgresql.conf
    assert pg.execute("show port") == str(pg.port)


def test_execute_raises_with_psql_stderr(pg: EmbeddedPostgres) -> None:
    with pytest.raises(EmbeddedPostgresError, match="no_such_table"):
        pg.execute("select * from no_such_table")


def test_user_and_database_reachable_over_tcp(pg: EmbeddedPostgres) -> None:
    pg.create_user("app user", "s3cret'/@:")
    pg.create_database("app-db", owner="app user")
    with psycopg.connect(pg.dsn("app-db", "app user", "s3cret'/@:"), connect_timeout=10) as conn:
        row = conn.execute("select current_user, current_database(), inet_server_port()").fetchone()
    assert row == ("app user", "app-db", pg.port)
    with psycopg.connect(pg.dsn(), connect_timeout=10) as conn:  # superuser with its password
        assert conn.execute("select rolsuper from pg_roles where rolname = current_user").fetchone() == (True,)


def test_tcp_requires_scram_and_rejects_a_wrong_password(pg: EmbeddedPostgres) -> None:
    pg.create_user("scram_user", "right")
    with pytest.raises(psycopg.OperationalError, match="password authentication failed"):
        psycopg.connect(pg.dsn("postgres", "scram_user", "wrong"), connect_timeout=10)
    assert pg.execute("select rolpassword like 'SCRAM-SHA-256$%' from pg_authid where rolname = 'scram_user'") == "t"
    host_methods = pg.execute("select distinct auth_method from pg_hba_file_rules where type = 'host'")
    assert host_methods == "scram-sha-256"


def test_dsn_encodes_credentials() -> None:
    parts = conninfo_to_dict(EmbeddedPostgres(port=6543).dsn("d b", "u@x", "p/w:d%"))
    assert parts == {
        "host": "127.0.0.1",
        "port": "6543",
        "dbname": "d b",
        "user": "u@x",
        "password": "p/w:d%",
    }
    assert "[::1]:5432" in EmbeddedPostgres(host="::1", port=5432).dsn()


def test_stop_then_start_server_on_the_same_port(pg: EmbeddedPostgres) -> None:
    pg.execute("create table survives (x int); insert into survives values (42)")
    port = pg.port
    pg.stop()
    assert not pg.running
    pg.stop()  # stopping a stopped server is fine
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection((pg.host, port), timeout=5).close()
    pg.start_server()
    assert pg.running
    assert pg.port == port
    with psycopg.connect(pg.dsn(), connect_timeout=10) as conn:
        assert conn.execute("select x from survives").fetchone() == (42,)


def test_start_after_stop_with_port_0_retries_a_taken_port(
    pg: EmbeddedPostgres, monkeypatch: pytest.MonkeyPatch
) -> None:
    pg.stop()
    with socket.socket() as squatter:
        squatter.bind(("127.0.0.1", 0))
        squatter.listen()
        taken, free = squatter.getsockname()[1], embedded._free_port("127.0.0.1")
        ports = [taken, free]
        monkeypatch.setattr(embedded, "_free_port", lambda host: ports.pop(0))
        pg.port = 0
        assert pg.start() is pg
    assert pg.port == free
    assert not ports  # the taken port was tried first, then given up
    assert pg.execute("select current_user, current_setting('port')") == f"boss|{free}"


def test_failed_start_reports_the_log_tail(pg: EmbeddedPostgres) -> None:
    pg.stop()
    pg.settings["shared_buffers"] = "not-a-size"
    try:
        with pytest.raises(EmbeddedPostgresError, match="shared_buffers") as excinfo:
            pg.start_server()
        assert "tail of" in str(excinfo.value)
        assert not pg.running
    finally:
        del pg.settings["shared_buffers"]
        pg.start_server()
    assert pg.execute("select 1") == "1"


def test_find_pg_bindir_honours_the_environment(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    real = find_pg_bindir()
    assert (real / "initdb").is_file()
    monkeypatch.setenv("HYPERPOOL_PG_BINDIR", str(real))
    assert find_pg_bindir() == real
    monkeypatch.setenv("HYPERPOOL_PG_BINDIR", str(tmp_path))
    with pytest.raises(EmbeddedPostgresError, match="apt-get install postgresql"):
        find_pg_bindir()
