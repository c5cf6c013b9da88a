"""The hyperpool process: SIGHUP reload, SIGTERM graceful shutdown, the CLI entry points."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest
import yaml

from hyperpool.embedded import EmbeddedPostgres
from tests.support import APPDB, base_config, free_port

REPO = Path(__file__).resolve().parents[1]


class ProxyProcess:
    def __init__(self, path: Path, cfg: dict[str, Any]) -> None:
        self.path = path
        self.port = cfg["listen"]["port"]
        self.write(cfg)
        self.proc = subprocess.Popen([sys.executable, "-m", "hyperpool", "--config", str(path)], cwd=REPO,
                                     stderr=subprocess.PIPE, text=True)
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=1).close()
                return
            except OSError:
                assert self.proc.poll() is None, self.proc.stderr.read() if self.proc.stderr else ""
                time.sleep(0.1)
        raise AssertionError("hyperpool did not start listening")

    def write(self, cfg: dict[str, Any]) -> None:
        self.path.write_text(yaml.safe_dump(cfg))

    def dsn(self, user: str = "app", password: str = "apppass") -> str:
        return f"host=127.0.0.1 port={self.port} user={user} password={password} dbname={APPDB}"

    def stop(self) -> str:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            _, err = self.proc.communicate(timeout=30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            _, err = self.proc.communicate()
        return err


@pytest.fixture
def process(pg: EmbeddedPostgres, tmp_path: Path) -> Iterator[ProxyProcess]:
    cfg = base_config(pg.port, listen={"host": "127.0.0.1", "port": free_port()}, log_level="info")
    proc = ProxyProcess(tmp_path / "hyperpool.yaml", cfg)
    yield proc
    proc.stop()


def _wait_for(check: Any, seconds: float = 10) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if check():
            return
        time.sleep(0.1)
    raise AssertionError("condition not reached")


def _can_login(proc: ProxyProcess, user: str, password: str) -> bool:
    try:
        with psycopg.connect(proc.dsn(user, password), connect_timeout=5) as conn:
            return conn.execute("select 1").fetchone() == (1,)
    except psycopg.OperationalError:
        return False


def test_sighup_reloads_users_without_dropping_clients(process: ProxyProcess, pg: EmbeddedPostgres) -> None:
    cfg = yaml.safe_load(process.path.read_text())
    with psycopg.connect(process.dsn(), autocommit=True) as held:
        assert held.execute("select 1").fetchone() == (1,)
        assert not _can_login(process, "second", "secondpass")
        cfg["users"]["second"] = {"password": "secondpass"}
        cfg["databases"][APPDB]["pool_size"] = 3
        process.write(cfg)
        process.proc.send_signal(signal.SIGHUP)
        _wait_for(lambda: _can_login(process, "second", "secondpass"))
        assert held.execute("select 2").fetchone() == (2,)  # the connected client was not dropped
        # an invalid config is rejected and the old one kept
        process.path.write_text("listen: {port: not-a-port}\n")
        process.proc.send_signal(signal.SIGHUP)
        time.sleep(0.5)
        assert _can_login(process, "second", "secondpass")
        assert held.execute("select 3").fetchone() == (3,)
    err = process.stop()
    assert "configuration reloaded" in err
    assert "reload failed, keeping the old configuration: listen.port" in err


def test_sigterm_lets_running_transaction_finish(process: ProxyProcess, pg: EmbeddedPostgres) -> None:
    pg.execute("create table if not exists shutdown_t (x int)", dbname=APPDB)
    pg.execute(f"alter table shutdown_t owner to {base_config(0)['databases'][APPDB]['user']}", dbname=APPDB)
    conn = psycopg.connect(process.dsn())
    conn.execute("insert into shutdown_t values (1)")  # inside a transaction
    process.proc.send_signal(signal.SIGTERM)
    time.sleep(0.5)
    assert process.proc.poll() is None  # still waiting for our transaction
    with pytest.raises(psycopg.OperationalError):
        psycopg.connect(process.dsn(), connect_timeout=3)  # no longer accepting
    conn.commit()
    with pytest.raises(psycopg.OperationalError):
        conn.execute("select 1")
    conn.close()
    assert process.proc.wait(timeout=20) == 0
    assert pg.execute("select count(*) from shutdown_t where x = 1", dbname=APPDB) != "0"


def test_sigterm_does_not_wait_past_shutdown_timeout(pg: EmbeddedPostgres, tmp_path: Path) -> None:
    cfg = base_config(pg.port, listen={"host": "127.0.0.1", "port": free_port()}, shutdown_timeout=1)
    proc = ProxyProcess(tmp_path / "h.yaml", cfg)
    conn = psycopg.connect(proc.dsn())
    conn.execute("select 1")  # idle in transaction, never finishes
    started = time.monotonic()
    proc.proc.send_signal(signal.SIGTERM)
    assert proc.proc.wait(timeout=20) == 0
    assert time.monotonic() - started < 10
    with pytest.raises(psycopg.OperationalError):
        conn.execute("select 1")
    conn.close()


def test_check_config_and_passwd_commands(tmp_path: Path) -> None:
    env = dict(os.environ, APP_DB_PASSWORD="x")
    ok = subprocess.run([sys.executable, "-m", "hyperpool", "check-config", "config/hyperpool.yaml"], cwd=REPO,
                        env=env, capture_output=True, text=True, timeout=30)
    assert ok.returncode == 0, ok.stderr
    bad = tmp_path / "bad.yaml"
    bad.write_text("databases: {x: {host: h}}\n")
    out = subprocess.run([sys.executable, "-m", "hyperpool", "check-config", str(bad)], capture_output=True,
                         text=True, timeout=30)
    assert out.returncode == 2 and "databases.x.user" in out.stderr
    pw = subprocess.run([sys.executable, "-m", "hyperpool", "passwd", "bob"], input="s3cret\n",
                        capture_output=True, text=True, timeout=30)
    assert pw.returncode == 0 and pw.stdout.startswith('"bob": {password: "SCRAM-SHA-256$4096:')
    assert "s3cret" not in pw.stdout


def test_demo_runs_and_cleans_up() -> None:
    before = set(Path(tempfile.gettempdir()).glob("hyperpool-pg-*"))
    proc = subprocess.Popen([sys.executable, "-m", "hyperpool", "demo", "--port", "0"], cwd=REPO,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        url = ""
        assert proc.stdout is not None
        deadline = time.monotonic() + 60
        while not url and time.monotonic() < deadline:
            line = proc.stdout.readline()
            assert line or proc.poll() is None, "demo exited early"
            if "postgresql://" in line:
                url = line.strip().split('"')[1]
        out = subprocess.run(["psql", "-X", "-A", "-t", "-c", "select current_database()", url],
                             capture_output=True, text=True, timeout=30)
        assert out.stdout.strip() == "appdb", out.stderr
    finally:
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err
    assert set(Path(tempfile.gettempdir()).glob("hyperpool-pg-*")) - before == set()  # its cluster is gone


def test_reload_applies_pool_sizes_and_database_changes(pg: EmbeddedPostgres, tmp_path: Path) -> None:
    """Reload in-process, to look at the pools it leaves behind."""
    from hyperpool.config import load_config
    from tests.support import ProxyRunner

    path = tmp_path / "hyperpool.yaml"
    cfg = base_config(pg.port)
    path.write_text(yaml.safe_dump(cfg))
    proxy = ProxyRunner(load_config(path), str(path)).start()
    try:
        with psycopg.connect(proxy.dsn(), autocommit=True) as held:
            assert held.execute("select 1").fetchone() == (1,)
            old_pool = proxy.state.databases[APPDB].pool
            cfg["databases"][APPDB]["pool_size"] = 2
            cfg["databases"]["otherdb"] = dict(cfg["databases"][APPDB], pool_size=1)
            path.write_text(yaml.safe_dump(cfg))
            assert proxy.run(proxy.server.reload) is True
            assert proxy.state.databases[APPDB].pool is old_pool  # same pool, connections kept
            assert old_pool.settings.pool_size == 2
            with psycopg.connect(proxy.dsn(dbname="otherdb")) as other:
                assert other.execute("select current_database()").fetchone() == (APPDB,)
            assert held.execute("select 2").fetchone() == (2,)  # the connected client keeps working
            del cfg["databases"]["otherdb"]
            cfg["databases"][APPDB]["port"] = 1  # an origin change: old connections must not be reused
            path.write_text(yaml.safe_dump(cfg))
            assert proxy.run(proxy.server.reload) is True
            assert "otherdb" not in proxy.state.databases
            assert old_pool.generation == 1 and not old_pool.idle
            with pytest.raises(psycopg.OperationalError):
                psycopg.connect(proxy.dsn(dbname="otherdb"))
            # its next transaction goes to the new origin (which is down), not to a stale connection
            with pytest.raises(psycopg.OperationalError, match=r"127\.0\.0\.1:1\b"):
                held.execute("select 3")
    finally:
        proxy.stop()
