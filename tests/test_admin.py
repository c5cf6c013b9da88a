"""The admin console (virtual database hyperpool / pgbouncer) against a live pool."""

from __future__ import annotations

import subprocess
import threading
import time
from pathlib import Path
from typing import Any

import psycopg
import pytest
import yaml

from hyperpool.cache import QueryCache
from hyperpool.embedded import EmbeddedPostgres, find_pg_bindir
from tests.support import (
    APP_PASSWORD,
    APPDB,
    ProxyRunner,
    base_config,
    hold_the_server,
    let_go,
    message,
    query_msg,
    raw_login,
    read_messages,
    start_proxy,
)

ADMIN, ADMIN_PASSWORD = "ops", "opspass"


def admin_config(pg: EmbeddedPostgres, **overrides: Any) -> dict[str, Any]:
    cfg = base_config(pg.port, **overrides)
    cfg["users"] = {**cfg["users"], ADMIN: {"password": ADMIN_PASSWORD}}
    cfg["admin"] = {"users": [ADMIN]}
    return cfg


@pytest.fixture
def admin_proxy(pg: EmbeddedPostgres) -> Any:
    runner = start_proxy(admin_config(pg))
    yield runner
    runner.stop()


def console(proxy: ProxyRunner, dbname: str = "hyperpool") -> psycopg.Connection[Any]:
    return psycopg.connect(proxy.dsn(user=ADMIN, password=ADMIN_PASSWORD, dbname=dbname), autocommit=True,
                           prepare_threshold=None)


def simple(conn: psycopg.Connection[Any], sql: str) -> list[tuple[Any, ...]]:
    """The admin console speaks the simple protocol only: psycopg uses it for queries without parameters
    when asked through ClientCursor."""
    cur = psycopg.ClientCursor(conn)
    cur.execute(sql)
    return cur.fetchall() if cur.description is not None else []


def columns(conn: psycopg.Connection[Any], sql: str) -> tuple[list[str], list[tuple[Any, ...]]]:
    cur = psycopg.ClientCursor(conn)
    cur.execute(sql)
    assert cur.description is not None
    return [d.name for d in cur.description], cur.fetchall()


def test_show_commands_have_pgbouncer_columns(admin_proxy: ProxyRunner) -> None:
    with psycopg.connect(admin_proxy.dsn(), autocommit=True) as app, console(admin_proxy) as adm:
        app.execute("select 1")
        for _ in range(100):  # (the catalog read after the first login may hold a server for a moment)
            names, rows = columns(adm, "SHOW POOLS")
            if rows and rows[0][9] >= 1:
                break
            time.sleep(0.05)
        assert names == ["database", "user", "cl_active", "cl_waiting", "cl_active_cancel_req",
                         "cl_waiting_cancel_req", "sv_active", "sv_active_cancel", "sv_being_canceled", "sv_idle",
                         "sv_used", "sv_tested", "sv_login", "maxwait", "maxwait_us", "pool_mode"]
        assert [r[0] for r in rows] == [APPDB] and rows[0][9] >= 1  # a warm idle server
        names, rows = columns(adm, "SHOW STATS")
        assert names[:8] == ["database", "total_xact_count", "total_query_count", "total_received", "total_sent",
                             "total_xact_time", "total_query_time", "total_wait_time"]
        assert rows[0][1] >= 1 and rows[0][2] >= 1 and rows[0][3] > 0 and rows[0][4] > 0
        names, rows = columns(adm, "SHOW CLIENTS")
        assert names[:6] == ["type", "user", "database", "state", "addr", "port"]
        assert [(r[0], r[1], r[2], r[4]) for r in rows] == [("C", "app", APPDB, "127.0.0.1")]
        names, rows = columns(adm, "SHOW SERVERS")
        assert names[0] == "type" and rows and all(r[0] == "S" and r[2] == APPDB for r in rows)
        names, rows = columns(adm, "SHOW DATABASES")
        assert names == ["name", "host", "port", "database", "force_user", "pool_size", "min_pool_size",
                         "reserve_pool", "pool_mode", "max_connections", "current_connections", "paused", "disabled"]
        assert rows[0][0] == APPDB and rows[0][5] == 5
        names, rows = columns(adm, "SHOW CONFIG")
        assert names == ["key", "value", "default", "changeable"]
        assert ("pool_size", "20", "20", "yes") in rows
        assert columns(adm, "SHOW VERSION")[1][0][0].startswith("hyperpool ")
        assert dict(columns(adm, "SHOW LISTS")[1])["used_clients"] == 1


def test_stats_move_with_the_workload(admin_proxy: ProxyRunner) -> None:
    with console(admin_proxy, "pgbouncer") as adm:  # the alias
        before = columns(adm, "SHOW STATS")[1][0]
        with psycopg.connect(admin_proxy.dsn(), autocommit=True) as app:
            for _ in range(10):
                app.execute("/* hyperpool: nocache */ select 1")  # each one to the database
        after = columns(adm, "SHOW STATS")[1][0]
    assert after[1] - before[1] >= 10 and after[2] - before[2] >= 10


def test_waiting_clients_show_in_pools(pg: EmbeddedPostgres) -> None:
    proxy = start_proxy(admin_config(pg, db={"pool_size": 1, "min_pool_size": 1}))
    try:
        holder = hold_the_server(proxy.port)
        waiters = [raw_login(proxy.port) for _ in range(3)]
        for i, w in enumerate(waiters):  # distinct texts: identical misses would share one query cache fill
            w.sendall(query_msg(f"select {i}"))
        with console(proxy) as adm:
            for _ in range(50):
                row = columns(adm, "SHOW POOLS")[1][0]
                if row[3] == 3:
                    break
                time.sleep(0.05)
            assert (row[2], row[3], row[6]) == (1, 3, 1)  # cl_active, cl_waiting, sv_active
        let_go(holder)
        for w in waiters:
            assert read_messages(w)[-1][0] == b"Z"
            w.close()
    finally:
        proxy.stop()


def test_pause_resume_reconnect_kill(admin_proxy: ProxyRunner) -> None:
    app = psycopg.connect(admin_proxy.dsn(), autocommit=True)  # logging in needs the pool, so before PAUSE
    with console(admin_proxy) as adm:
        simple(adm, "PAUSE appdb")
        assert columns(adm, "SHOW DATABASES")[1][0][11] == 1
        result: list[Any] = []
        thread = threading.Thread(target=lambda: result.append(app.execute("select 7").fetchone()))
        thread.start()
        time.sleep(0.3)
        assert result == []  # paused: the query waits
        simple(adm, "RESUME")
        thread.join(10)
        assert result == [(7,)]
        pid = app.execute("select pg_backend_pid()").fetchone()
        simple(adm, "RECONNECT appdb")
        assert app.execute("select pg_backend_pid()").fetchone() != pid  # fresh server connections
        simple(adm, "KILL appdb")
        with pytest.raises(psycopg.OperationalError):
            app.execute("select 1")
        app.close()
        assert columns(adm, "SHOW VERSION")[1]  # the console itself is unaffected


def test_unknown_commands_and_bad_arguments(admin_proxy: ProxyRunner) -> None:
    with console(admin_proxy) as adm:
        for sql, code in [("SHOW NOTHING", "42601"), ("FROBNICATE", "42601"), ("PAUSE nosuchdb", "3D000"),
                          ("KILL", "42601"), ("RELOAD now", "42601"), ("CACHE", "42601"), ("CACHE FLUSH", "42601"),
                          ("CACHE PURGE appdb appdb", "42601"), ("CACHE PURGE nosuchdb", "3D000")]:
            with pytest.raises(psycopg.Error) as info:
                simple(adm, sql)
            assert info.value.sqlstate == code, sql
        assert columns(adm, "SHOW VERSION")[1]  # still usable
    sock = raw_login(admin_proxy.port, user=ADMIN, password=ADMIN_PASSWORD, dbname="hyperpool")
    sock.sendall(message(b"P", b"\0SHOW POOLS\0\0\0") + message(b"S"))  # extended protocol: refused
    msgs = read_messages(sock)
    assert [k for k, _ in msgs] == [b"E", b"E", b"Z"] and b"C08P01" in msgs[0][1]
    sock.sendall(query_msg("SHOW VERSION"))  # the console stays up
    assert [k for k, _ in read_messages(sock)] == [b"T", b"D", b"C", b"Z"]
    sock.close()


def test_non_admin_is_refused(admin_proxy: ProxyRunner) -> None:
    with pytest.raises(psycopg.OperationalError, match="not allowed to use the admin console"):
        psycopg.connect(admin_proxy.dsn(dbname="hyperpool"))
    with pytest.raises(psycopg.OperationalError, match="password authentication failed"):  # checked first
        psycopg.connect(admin_proxy.dsn(user=ADMIN, password="wrong", dbname="hyperpool"))


def test_reload_through_the_console(pg: EmbeddedPostgres, tmp_path: Path) -> None:
    from hyperpool.config import load_config

    path = tmp_path / "hyperpool.yaml"
    cfg = admin_config(pg)
    path.write_text(yaml.safe_dump(cfg))
    runner = ProxyRunner(load_config(path), str(path)).start()
    try:
        with console(runner) as adm:
            cfg["databases"][APPDB]["pool_size"] = 7
            path.write_text(yaml.safe_dump(cfg))
            simple(adm, "RELOAD")
            assert columns(adm, "SHOW DATABASES")[1][0][5] == 7
            path.write_text("databases: [not, a, mapping]")
            with pytest.raises(psycopg.Error) as info:
                simple(adm, "RELOAD")
            assert info.value.sqlstate == "F0000"
            assert columns(adm, "SHOW DATABASES")[1][0][5] == 7  # the old config is kept
    finally:
        runner.stop()


def test_psql_and_shutdown(admin_proxy: ProxyRunner) -> None:
    env = {"PGPASSWORD": ADMIN_PASSWORD, "PATH": "/usr/bin:/bin"}
    out_port = admin_proxy.port
    psql = str(find_pg_bindir() / "psql")
    out = subprocess.run([psql, "-h", "127.0.0.1", "-p", str(admin_proxy.port), "-U", ADMIN, "-d", "pgbouncer",
                          "-At", "-c", "SHOW POOLS", "-c", "SHOW HELP"], capture_output=True, text=True, env=env,
                         timeout=30)
    assert out.returncode == 0, out.stderr
    assert out.stdout.splitlines()[0].startswith(f"{APPDB}|app_owner|")
    with console(admin_proxy) as adm:
        simple(adm, "SHUTDOWN")
    for _ in range(100):
        if admin_proxy.state.shutting_down:
            break
        time.sleep(0.05)
    assert admin_proxy.state.shutting_down
    port = out_port
    with pytest.raises(psycopg.OperationalError):  # no longer listening
        psycopg.connect(f"host=127.0.0.1 port={port} user=app password={APP_PASSWORD} dbname={APPDB}",
                        connect_timeout=3)


# --- the query cache -------------------------------------------------------------------------------------

CACHE_SETTINGS = {"max_age": 30, "stale_while_revalidate": 5.5, "max_bytes": 120, "max_entry_bytes": 100}
CACHE_COLUMNS = ["database", "enabled", "entries", "bytes", "max_bytes", "max_entry_bytes", "max_age",
                 "stale_while_revalidate", "hits", "stale", "misses", "stored", "too_big", "evictions",
                 "invalidations", "discarded_fills", "hit_ratio", "not_cacheable"]


def cache_config(pg: EmbeddedPostgres, **overrides: Any) -> dict[str, Any]:
    """appdb with a small cache (CACHE_SETTINGS), nocache with the cache disabled, sessiondb in session mode."""
    cfg = admin_config(pg, db={"cache": CACHE_SETTINGS}, **overrides)
    appdb = cfg["databases"][APPDB]
    cfg["databases"]["nocache"] = {**appdb, "cache": {"enabled": False}}
    cfg["databases"]["sessiondb"] = {**appdb, "pool_mode": "session"}
    return cfg


def populate_cache(cache: QueryCache) -> None:
    """Through QueryCache's own API, with CACHE_SETTINGS: ends with 2 entries of 110 bytes, 2 hits, 1 stale,
    1 miss, 3 stored, 1 too big, 1 eviction, and not cacheable: write 3, transaction 5."""
    cache.lookup(("q1",), 0.0)  # miss
    cache.begin_fill(("q1",), ["public.t"]).store(b"a" * 40, 0.0)
    cache.lookup(("q1",), 10.0)  # hit
    cache.lookup(("q1",), 30.0)  # hit (max_age 30)
    cache.lookup(("q1",), 33.0)  # stale (up to 30 + 5.5)
    cache.begin_fill(("q2",), ["public.u"]).store(b"b" * 60, 0.0)
    cache.begin_fill(("q3",), ["public.u"]).store(b"c" * 101, 0.0)  # over max_entry_bytes
    cache.begin_fill(("q4",), ["public.v"]).store(b"d" * 50, 0.0)  # 150 > max_bytes 120: q1 (oldest) goes
    for reason, count in (("write", 3), ("transaction", 5)):
        for _ in range(count):
            cache.count_not_cacheable(reason)


def _cache(runner: ProxyRunner, name: str = APPDB) -> QueryCache:
    cache = runner.state.databases[name].cache
    assert isinstance(cache, QueryCache)
    return cache


def _cache_rows(adm: psycopg.Connection[Any]) -> dict[str, dict[str, Any]]:
    names, rows = columns(adm, "SHOW CACHE")
    assert names == CACHE_COLUMNS
    return {row[0]: dict(zip(names, row, strict=True)) for row in rows}


@pytest.fixture
def cache_proxy(pg: EmbeddedPostgres) -> Any:
    runner = start_proxy(cache_config(pg))
    yield runner
    runner.stop()


def test_show_cache(cache_proxy: ProxyRunner) -> None:
    with console(cache_proxy) as adm:
        rows = _cache_rows(adm)
        assert list(rows) == [APPDB, "nocache", "sessiondb"]
        assert rows[APPDB] == {**dict.fromkeys(CACHE_COLUMNS, 0), "database": APPDB, "enabled": "yes",
                               "max_bytes": 120, "max_entry_bytes": 100, "max_age": 30.0,
                               "stale_while_revalidate": 5.5, "hit_ratio": "", "not_cacheable": ""}
        cache_proxy.run(populate_cache, _cache(cache_proxy))
        rows = _cache_rows(adm)
        assert rows[APPDB] == {
            "database": APPDB, "enabled": "yes", "entries": 2, "bytes": 110, "max_bytes": 120,
            "max_entry_bytes": 100, "max_age": 30.0, "stale_while_revalidate": 5.5, "hits": 2, "stale": 1,
            "misses": 1, "stored": 3, "too_big": 1, "evictions": 1, "invalidations": 0, "discarded_fills": 0,
            "hit_ratio": "0.75", "not_cacheable": "transaction=5 write=3"}
        # no cache object (disabled; session pooling): enabled no and zeros
        for name in ("nocache", "sessiondb"):
            assert cache_proxy.state.databases[name].cache is None
            assert rows[name] == {**dict.fromkeys(CACHE_COLUMNS, 0), "database": name, "enabled": "no",
                                  "hit_ratio": "", "not_cacheable": ""}
        help_lines = [r[0] for r in simple(adm, "SHOW HELP")]
        assert "CACHE PURGE [db]" in help_lines and "| CACHE |" in help_lines[0]


def test_cache_purge(cache_proxy: ProxyRunner) -> None:
    cache = _cache(cache_proxy)
    cache_proxy.run(populate_cache, cache)
    with console(cache_proxy) as adm:
        cur = psycopg.ClientCursor(adm)
        cur.execute("CACHE PURGE nocache")  # a database without a cache: nothing to do
        assert cur.statusmessage == "CACHE PURGE"
        assert (_cache_rows(adm)[APPDB]["entries"], _cache_rows(adm)[APPDB]["bytes"]) == (2, 110)
        cur.execute("cache purge appdb;")
        assert cur.statusmessage == "CACHE PURGE"
        row = _cache_rows(adm)[APPDB]
        assert (row["entries"], row["bytes"], row["invalidations"]) == (0, 0, 2)
        assert (row["hits"], row["stored"]) == (2, 3)  # the counters stay
        assert cache_proxy.run(cache.lookup, ("q2",), 1.0)[0] == "miss"  # really gone

        cache_proxy.run(lambda: cache.begin_fill(("q5",), ["public.t"]).store(b"e" * 10, 2.0))
        assert _cache_rows(adm)[APPDB]["entries"] == 1
        cur.execute("CACHE PURGE")  # every database
        assert cur.statusmessage == "CACHE PURGE"
        row = _cache_rows(adm)[APPDB]
        assert (row["entries"], row["bytes"], row["invalidations"]) == (0, 0, 3)

        with pytest.raises(psycopg.Error) as info:
            simple(adm, "CACHE PURGE nosuchdb")
        assert info.value.sqlstate == "3D000" and "nosuchdb" in str(info.value)
        assert list(_cache_rows(adm)) == [APPDB, "nocache", "sessiondb"]  # the console still answers
