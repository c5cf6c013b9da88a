"""Common drivers, unchanged and with their default settings, through transaction pooling (issue #3).

Every test checks results: each client must get its own rows, its own settings and its own prepared
statements, whichever server connection runs its next transaction. Most tests run twice: through hyperpool
and, as a control, against PostgreSQL directly (``[postgres]``), which shows that what a test expects is
PostgreSQL's own behaviour. Background "churn" clients keep the few server connections rotating, so a
client's consecutive transactions really land on different server connections, and they check that they
never see another client's settings.
"""

from __future__ import annotations

import asyncio
import os
import re
import socket
import struct
import subprocess
import threading
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager, nullcontext, suppress
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import asyncpg
import psycopg
import pytest
import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker, create_async_engine
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column

from hyperpool.embedded import EmbeddedPostgres, find_pg_bindir
from tests.support import (
    APP_PASSWORD,
    APP_USER,
    APPDB,
    OWNER,
    OWNER_PASSWORD,
    ProxyRunner,
    error_code,
    message,
    query_msg,
    raw_login,
    read_messages,
)

DEFAULT_SEARCH_PATH = '"$user", public'
DRIVERS_ROLE = "hp_drivers_role"


def _uid() -> str:
    return uuid.uuid4().hex[:10]


# ---------------------------------------------------------------------------------------------
# Where the clients connect: hyperpool, or PostgreSQL directly as the control


@dataclass(frozen=True)
class Target:
    name: str
    port: int
    user: str
    password: str
    proxy: ProxyRunner | None = None

    @property
    def pooled(self) -> bool:
        return self.proxy is not None

    def dsn(self, **params: str) -> str:
        extra = "".join(" {}='{}'".format(k, v.replace("\\", "\\\\").replace("'", "\\'")) for k, v in params.items())
        return f"host=127.0.0.1 port={self.port} user={self.user} password={self.password} dbname={APPDB}{extra}"

    def asyncpg_args(self, **extra: Any) -> dict[str, Any]:
        return {"host": "127.0.0.1", "port": self.port, "user": self.user, "password": self.password,
                "database": APPDB, **extra}

    def url(self, driver: str) -> str:
        return f"postgresql+{driver}://{self.user}:{self.password}@127.0.0.1:{self.port}/{APPDB}"

    def env(self, **extra: str) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith("PG")}
        env.update(PGHOST="127.0.0.1", PGPORT=str(self.port), PGUSER=self.user, PGPASSWORD=self.password,
                   PGDATABASE=APPDB, PGCONNECT_TIMEOUT="10", **extra)
        return env

    def raw(self) -> socket.socket:
        return raw_login(self.port, user=self.user, password=self.password, dbname=APPDB)


def _proxy_target(proxy: ProxyRunner) -> Target:
    return Target("hyperpool", proxy.port, APP_USER, APP_PASSWORD, proxy)


def _direct_target(pg: EmbeddedPostgres) -> Target:
    return Target("postgres", pg.port, OWNER, OWNER_PASSWORD)


@pytest.fixture(params=["hyperpool", "postgres"])
def make_target(request: pytest.FixtureRequest, make_proxy: Callable[..., ProxyRunner],
                pg: EmbeddedPostgres) -> Callable[..., Target]:
    """make_target(pool_size, cache): a hyperpool in transaction mode, or (the control) PostgreSQL itself.

    ``cache=False`` for tests that change tables behind hyperpool's back (the query cache sees only the
    writes it forwards; others show after max_age)."""

    def make(pool_size: int = 3, cache: bool = True) -> Target:
        if request.param == "postgres":
            return _direct_target(pg)
        db: dict[str, Any] = {"pool_size": pool_size, "min_pool_size": 0}
        if not cache:
            db["cache"] = {"enabled": False}
        return _proxy_target(make_proxy(db=db))

    return make


def _admin(pg: EmbeddedPostgres) -> psycopg.Connection[Any]:
    """A direct connection to PostgreSQL as the owner hyperpool logs in as (so tables belong to it)."""
    return psycopg.connect(_direct_target(pg).dsn(), autocommit=True)


@pytest.fixture
def new_table(pg: EmbeddedPostgres) -> Iterator[Callable[..., str]]:
    """new_table(columns='client int, n int, note text'): a fresh table in appdb, dropped at teardown."""
    made: list[str] = []

    def make(columns: str = "client int, n int, note text") -> str:
        name = f"drv_{_uid()}"
        with _admin(pg) as conn:
            conn.execute(f"create table {name} ({columns})")
        made.append(name)
        return name

    yield make
    with _admin(pg) as conn:
        for name in made:
            conn.execute(f"drop table if exists {name} cascade")


# ---------------------------------------------------------------------------------------------
# Raw protocol helpers (for churn clients and for exact protocol-level checks)


def _cstr(text: str) -> bytes:
    return text.encode() + b"\0"


def _parse(name: str, sql: str) -> bytes:
    return message(b"P", _cstr(name) + _cstr(sql) + struct.pack("!h", 0))


def _bind_execute(name: str, params: Sequence[str] = ()) -> bytes:
    values = b"".join(struct.pack("!i", len(p.encode())) + p.encode() for p in params)
    bind = (_cstr("") + _cstr(name) + struct.pack("!h", 0) + struct.pack("!h", len(params)) + values
            + struct.pack("!h", 0))
    return message(b"B", bind) + message(b"E", _cstr("") + struct.pack("!i", 0))


SYNC = message(b"S")


def _exchange(sock: socket.socket, data: bytes) -> list[tuple[bytes, bytes]]:
    """Send one batch ending in a single Query or Sync; return everything up to its ReadyForQuery."""
    sock.sendall(data)
    msgs = read_messages(sock, until=b"Z")
    assert msgs and msgs[-1][0] == b"Z", f"no ReadyForQuery: {msgs}"
    return msgs


def _rows(msgs: list[tuple[bytes, bytes]]) -> list[tuple[str | None, ...]]:
    out: list[tuple[str | None, ...]] = []
    for kind, payload in msgs:
        if kind != b"D":
            continue
        count = struct.unpack("!h", payload[:2])[0]
        pos, row = 2, list[str | None]()
        for _ in range(count):
            size = struct.unpack("!i", payload[pos:pos + 4])[0]
            pos += 4
            if size < 0:
                row.append(None)
            else:
                row.append(payload[pos:pos + size].decode())
                pos += size
        out.append(tuple(row))
    return out


def _errors(msgs: list[tuple[bytes, bytes]]) -> list[str]:
    return [error_code(p) for k, p in msgs if k == b"E"]


def _ok_rows(msgs: list[tuple[bytes, bytes]]) -> list[tuple[str | None, ...]]:
    """The DataRows of an exchange that must have succeeded."""
    errors = [p.decode(errors="replace") for k, p in msgs if k == b"E"]
    assert errors == [], errors
    return _rows(msgs)


class Churn:
    """Other clients running short transactions in a loop so the server connections keep rotating.

    Each checks it always sees the login defaults (statement_timeout, search_path, current_user): a client's
    session state must never reach them.
    """

    SQL = ("select current_setting('statement_timeout'), current_setting('search_path'), current_user::text"
           " from pg_sleep(0.002)")

    def __init__(self, target: Target, clients: int = 4) -> None:
        self.target = target
        self.clients = clients
        self.problems: list[str] = []
        self.rounds = 0
        self._stop = threading.Event()
        self._went_round = threading.Event()
        self._thread = threading.Thread(target=self._run, name="churn", daemon=True)

    def __enter__(self) -> Churn:
        self._socks = [self.target.raw() for _ in range(self.clients)]
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._went_round.wait(10)  # at least once around, however short the test
        self._stop.set()
        self._thread.join(15)
        for sock in self._socks:
            sock.close()

    def _run(self) -> None:
        expected = ("0", DEFAULT_SEARCH_PATH, OWNER)
        try:
            while not self._stop.is_set():
                for sock in self._socks:
                    sock.sendall(query_msg(self.SQL))
                for sock in self._socks:
                    msgs = read_messages(sock, until=b"Z")
                    rows, errors = _rows(msgs), _errors(msgs)
                    if errors or rows != [expected]:
                        self.problems.append(f"churn client saw {rows} errors {errors}")
                self.rounds += 1
                self._went_round.set()
                time.sleep(0.001)
        except Exception as exc:  # reported by the test through .problems
            self.problems.append(f"churn client failed: {exc!r}")
            self._went_round.set()

    def check(self) -> None:
        assert self.problems == []
        assert self.rounds > 0


class Holder:
    """Another client that, on request, holds a server connection in an open transaction.

    Idle server connections are reused last-in first-out, so the one it takes is most likely the one the
    client under test just released: that client's next transaction then runs on a different one.
    """

    def __init__(self, target: Target) -> None:
        self.sock = target.raw()

    def __enter__(self) -> Holder:
        return self

    def __exit__(self, *exc: object) -> None:
        self.sock.close()

    @contextmanager
    def taken(self) -> Iterator[None]:
        assert _errors(_exchange(self.sock, query_msg("begin; select 1"))) == []
        try:
            yield
        finally:
            assert _errors(_exchange(self.sock, query_msg("commit"))) == []


def _assert_servers_kept(target: Target, pool_size: int) -> None:
    """Ordinary driver traffic never costs hyperpool a server connection (none closed and replaced)."""
    if target.proxy is not None:
        stats = target.proxy.state.databases[APPDB].pool.stats
        assert stats.opened <= pool_size, stats


class _Rollback(Exception):
    pass


def _run_threads(fns: Sequence[Callable[[], Any]]) -> list[Any]:
    """Run each function in its own thread; re-raise the first failure."""
    with ThreadPoolExecutor(max_workers=len(fns)) as pool:
        futures = [pool.submit(fn) for fn in fns]
        return [f.result(timeout=90) for f in futures]


# ---------------------------------------------------------------------------------------------
# 1. psycopg 3, sync: server-side prepared statements (default threshold, threshold 0, prepare=True)


def _psycopg_prepared_client(target: Target, table: str, i: int, rounds: int, threshold: int | None) -> set[int]:
    kwargs: dict[str, Any] = {} if threshold is None else {"prepare_threshold": threshold}
    autocommit = i % 2 == 0
    pids: set[int] = set()
    # Every client runs its own query texts in its own order, so the same psycopg statement
    # name (_pg3_0, _pg3_1, ...) means a different query, with a different result shape, per client.
    queries: list[tuple[str, Callable[[int], tuple[Any, ...]], Callable[[int], Any]]] = [
        ("select %s::int * 2 as doubled, %s::text as tag",
         lambda n: (n, f"c{i}"), lambda n: [(n * 2, f"c{i}")]),
        ("select %s::text || ':' || %s::int as label, true as ok",
         lambda n: (f"c{i}", n), lambda n: [(f"c{i}:{n}", True)]),
        (f"insert into {table} (client, n) values (%s, %s)",
         lambda n: (i, n), lambda n: None),
    ]
    order = queries[i % 3:] + queries[:i % 3]
    count_sql = f"select count(*), min(n), max(n) from {table} where client = %s and n >= 0"
    with psycopg.connect(target.dsn(application_name=f"psy{i}"), autocommit=autocommit, **kwargs) as conn:
        for n in range(rounds):
            for sql, params, expected in order:
                cur = conn.execute(sql, params(n))
                if expected(n) is not None:
                    assert cur.fetchall() == expected(n), (i, n, sql)
            assert conn.execute(count_sql, (i,)).fetchall() == [(n + 1, 0, n)], (i, n)
            # executemany (psycopg pipelines it) of a statement it prepares too
            conn.cursor().executemany(f"insert into {table} (client, n) values (%s, %s)",
                                      [(i, -(n * 10 + j + 1)) for j in range(3)])
            assert conn.execute(f"select count(*) from {table} where client = %s and n < 0", (i,)).fetchone() \
                == (3 * (n + 1),), (i, n)
            if not autocommit:  # a server-side cursor, within the transaction
                with conn.cursor(name=f"drv_cur{i}") as named:
                    named.execute("select g * %s from generate_series(1, %s) g", (i, n + 1))
                    assert [r[0] for r in named.fetchmany(100)] == [g * i for g in range(1, n + 2)], (i, n)
            # prepared right away; the text differs per client (and the result type by parity)
            cast = "int" if i % 2 else "text"
            cur = conn.execute(f"select %s::{cast} as v, 'p{i}' as who, pg_backend_pid()", (str(n * 10 + i),),
                               prepare=True)
            row = cur.fetchone()
            assert row is not None and row[:2] == ((n * 10 + i) if i % 2 else str(n * 10 + i), f"p{i}"), (i, n)
            pids.add(row[2])
            if not autocommit:
                conn.commit()
    return pids


@pytest.mark.parametrize("threshold", [None, 0], ids=["default_threshold", "threshold_0"])
def test_psycopg_server_side_prepared_statements(make_target: Callable[..., Target], new_table: Callable[..., str],
                                                 threshold: int | None) -> None:
    target = make_target(pool_size=3)
    table = new_table("client int, n int")
    rounds = 12  # > 2x the default prepare_threshold (5)
    pids = _run_threads([partial(_psycopg_prepared_client, target, table, i, rounds, threshold)
                         for i in range(8)])
    with psycopg.connect(target.dsn(), autocommit=True) as check:
        assert check.execute(f"select client, count(*) from {table} where n >= 0 group by 1 order by 1").fetchall() \
            == [(i, rounds) for i in range(8)]
    if target.pooled:
        assert any(len(p) > 1 for p in pids)  # clients really moved between server connections
    _assert_servers_kept(target, 3)


def test_psycopg_executemany_releases_the_server(make_proxy: Callable[..., ProxyRunner], pg: EmbeddedPostgres,
                                                new_table: Callable[..., str]) -> None:
    """psycopg's executemany ends its pipeline with Sync then Flush: the transaction is over all the same."""
    table = new_table("client int, n int")
    proxy = make_proxy(query_wait_timeout=3, db={"pool_size": 1, "min_pool_size": 0})
    for target in (_proxy_target(proxy), _direct_target(pg)):  # PostgreSQL itself: the control
        with psycopg.connect(target.dsn(), autocommit=True) as a, psycopg.connect(target.dsn(), autocommit=True) as b:
            for k in range(3):
                a.cursor().executemany(f"insert into {table} values (%s, %s)", [(k, j) for j in range(3)])
                assert b.execute(f"select count(*) from {table} where client = %s", (k,)).fetchone() == (3,), \
                    target.name
        with _admin(pg) as admin:
            admin.execute(f"truncate {table}")


def test_many_distinct_prepared_statements(make_target: Callable[..., Target]) -> None:
    """More distinct statements than a server connection keeps (and than psycopg keeps: it deallocates the oldest)."""
    target = make_target(pool_size=2)

    def client(i: int) -> None:
        with psycopg.connect(target.dsn(), autocommit=True, prepare_threshold=0) as conn:
            for sweep in range(2):
                for j in range(120):
                    row = conn.execute(f"select %s::int + {j}, 'c{i}q{j}'", (sweep,)).fetchone()
                    assert row == (sweep + j, f"c{i}q{j}"), (i, sweep, j)

    with Churn(target, clients=2) as churn:
        _run_threads([partial(client, i) for i in range(3)])
    churn.check()
    _assert_servers_kept(target, 2)


# ---------------------------------------------------------------------------------------------
# 2. psycopg async: 50 clients over 5 server connections


async def _psycopg_async_client(target: Target, table: str, i: int, rounds: int) -> None:
    async with await psycopg.AsyncConnection.connect(target.dsn(application_name=f"pa{i}")) as conn:
        await conn.execute(f"set statement_timeout = '{1001 + i}ms'")
        await conn.commit()
        notes: list[str] = []
        for n in range(rounds):
            async with conn.transaction():
                await conn.execute(f"insert into {table} (client, n, note) values (%s, %s, %s)", (i, n, f"c{i}n{n}"))
                notes.append(f"c{i}n{n}")
                cur = await conn.execute(
                    f"select count(*), sum(n), string_agg(note, ',' order by n) from {table} where client = %s", (i,))
                assert await cur.fetchone() == (n + 1, n * (n + 1) // 2, ",".join(notes)), (i, n)
                cur = await conn.execute("select current_setting('application_name'),"
                                         " current_setting('statement_timeout'), %s::int * 3", (i,))
                assert await cur.fetchone() == (f"pa{i}", f"{1001 + i}ms", i * 3), (i, n)


def test_psycopg_async_50_clients_over_5_servers(make_proxy: Callable[..., ProxyRunner], pg: EmbeddedPostgres,
                                                 new_table: Callable[..., str]) -> None:
    table = new_table()
    proxy = make_proxy(db={"pool_size": 5, "min_pool_size": 0})
    target = _proxy_target(proxy)
    rounds = 8
    peak = 0
    stop = threading.Event()
    with psycopg.connect(pg.dsn(APPDB), autocommit=True) as su:  # superuser: not counted below
        since = su.execute("select clock_timestamp()").fetchone()[0]  # type: ignore[index]

        def watch() -> None:
            nonlocal peak
            while not stop.is_set():
                count = su.execute("select count(*) from pg_stat_activity where usename = %s and datname = %s"
                                   " and backend_type = 'client backend' and backend_start >= %s",
                                   (OWNER, APPDB, since)).fetchone()[0]  # type: ignore[index]
                peak = max(peak, count)
                time.sleep(0.02)

        watcher = threading.Thread(target=watch)
        watcher.start()

        async def main() -> None:
            await asyncio.gather(*(_psycopg_async_client(target, table, i, rounds) for i in range(50)))

        try:
            asyncio.run(main())
        finally:
            stop.set()
            watcher.join()
    with _admin(pg) as conn:
        assert conn.execute(f"select count(*), count(distinct client) from {table}").fetchone() == (50 * rounds, 50)
    assert proxy.state.databases[APPDB].pool.stats.opened <= 5
    assert 1 <= peak <= 5


# ---------------------------------------------------------------------------------------------
# 3. psycopg pipeline mode with prepared statements


def _pipeline_client(target: Target, i: int, rounds: int) -> None:
    autocommit = i % 2 == 0
    with psycopg.connect(target.dsn(), autocommit=autocommit) as conn:
        for r in range(rounds):
            checks: list[tuple[psycopg.Cursor[Any], list[tuple[Any, ...]]]] = []
            with conn.pipeline() as pipe:
                for k in range(25):  # from the 6th on, this query runs as a prepared statement
                    cur = conn.execute("select %s::int as k, %s::text as tag", (k, f"c{i}r{r}"))
                    checks.append((cur, [(k, f"c{i}r{r}")]))
                cur = conn.execute(f"select %s::int * %s::int, 'client{i}'", (i, r), prepare=True)
                checks.append((cur, [(i * r, f"client{i}")]))
                if autocommit:
                    pipe.sync()  # a transaction boundary in the middle of the pipeline
                for k in range(10):
                    cur = conn.execute("select %s::text || %s::text", (f"c{i}", str(k)))
                    checks.append((cur, [(f"c{i}{k}",)]))
                cur = conn.execute("select g from generate_series(1, %s) g", (r + 1,))
                checks.append((cur, [(g,) for g in range(1, r + 2)]))
            for cur, expected in checks:
                assert cur.fetchall() == expected, (i, r)
            if not autocommit:
                conn.commit()


def test_psycopg_pipeline_mode(make_target: Callable[..., Target]) -> None:
    target = make_target(pool_size=2)
    with Churn(target, clients=2) as churn:
        _run_threads([partial(_pipeline_client, target, i, 4) for i in range(6)])
    churn.check()
    _assert_servers_kept(target, 2)


# ---------------------------------------------------------------------------------------------
# 4. asyncpg, default statement cache


class _PerProcessNames(asyncpg.Connection):  # type: ignore[misc]
    """asyncpg's statement-name counter is per process: this gives each connection its own, as if each
    connection were a separate application process, so their names (__asyncpg_stmt_1__, ...) collide."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._hp_next_id = 0

    def _get_unique_id(self, prefix: str) -> str:
        self._hp_next_id += 1
        return f"__asyncpg_{prefix}_{self._hp_next_id:x}__"


async def _asyncpg_api(target: Target, table: str) -> None:
    conn = await asyncpg.connect(**target.asyncpg_args())
    try:
        for k in range(8):  # the same texts again and again: asyncpg's cached named statements
            rows = await conn.fetch("select g, $1::text || g from generate_series(1, $2::int) g", "r", k + 2)
            assert [tuple(r) for r in rows] == [(g, f"r{g}") for g in range(1, k + 3)]
            row = await conn.fetchrow("select $1::int as a, $2::text as b, $3::float8 as c", k, f"k{k}", k / 2)
            assert row is not None and dict(row) == {"a": k, "b": f"k{k}", "c": k / 2}
            assert await conn.fetchval("select $1::int * $1::int", k) == k * k

        await conn.executemany(f"insert into {table} (client, n, note) values ($1, $2, $3)",
                               [(1, n, f"m{n}") for n in range(50)])
        assert await conn.fetchval(f"select count(*) from {table} where client = $1", 1) == 50
        assert await conn.fetchval(f"select string_agg(note, ',' order by n) from {table} where client = $1", 1) \
            == ",".join(f"m{n}" for n in range(50))

        status = await conn.copy_records_to_table(table, records=[(2, n, f"c{n}") for n in range(500)],
                                                  columns=["client", "n", "note"])
        assert status == "COPY 500"
        assert await conn.fetchval(f"select count(*) from {table} where client = $1", 2) == 500
        assert await conn.fetchval(f"select sum(n) from {table} where client = $1", 2) == sum(range(500))

        async def notes(client: int) -> list[str]:
            return [r[0] for r in await conn.fetch(f"select note from {table} where client = $1 order by n", client)]

        async with conn.transaction():
            await conn.execute(f"insert into {table} values ($1, $2, $3)", 3, 1, "kept")
        with pytest.raises(_Rollback):
            async with conn.transaction():
                await conn.execute(f"insert into {table} values ($1, $2, $3)", 3, 2, "rolled back")
                assert await notes(3) == ["kept", "rolled back"]
                raise _Rollback
        assert await notes(3) == ["kept"]
        async with conn.transaction():
            await conn.execute(f"insert into {table} values ($1, $2, $3)", 3, 3, "outer")
            with suppress(_Rollback):
                async with conn.transaction():  # a savepoint
                    await conn.execute(f"insert into {table} values ($1, $2, $3)", 3, 4, "inner")
                    raise _Rollback
        assert await notes(3) == ["kept", "outer"]

        stmt = await conn.prepare(f"select n, note from {table} where client = $1 and n < $2 order by n")
        add = await conn.prepare("select $1::int + $2::int")
        for k in range(10):  # each call its own transaction: the statement must follow the client
            assert [tuple(r) for r in await stmt.fetch(2, k)] == [(n, f"c{n}") for n in range(k)]
            assert await add.fetchval(k, 100) == k + 100
            async with conn.transaction():
                assert await add.fetchval(k, 1) == k + 1
                assert await stmt.fetchrow(2, 3) == (0, "c0")

        async with conn.transaction():
            values = [r["n"] async for r in conn.cursor(f"select n from {table} where client = 2 order by n",
                                                        prefetch=50)]
        assert values == list(range(500))
    finally:
        await conn.close()


def test_asyncpg_api(make_target: Callable[..., Target], new_table: Callable[..., str]) -> None:
    target = make_target(pool_size=2)
    table = new_table()
    with Churn(target, clients=3) as churn:
        asyncio.run(asyncio.wait_for(_asyncpg_api(target, table), 60))
    churn.check()
    _assert_servers_kept(target, 2)


async def _asyncpg_client(target: Target, table: str, i: int, rounds: int) -> None:
    conn = await asyncpg.connect(**target.asyncpg_args(server_settings={"application_name": f"apg{i}"}),
                                 connection_class=_PerProcessNames)
    try:
        # a different first statement per client, so __asyncpg_stmt_1__ is a different query on each
        first = [("select $1::int * 2", i, i * 2), ("select $1::text || '!'", f"c{i}", f"c{i}!"),
                 ("select array[$1::int, 7]", i, [i, 7])][i % 3]
        for n in range(rounds):
            assert await conn.fetchval(first[0], first[1]) == first[2], (i, n)
            async with conn.transaction():
                await conn.execute(f"insert into {table} (client, n, note) values ($1, $2, $3)", i, n, f"a{i}")
                row = await conn.fetchrow(f"select count(*), sum(n), min(note), max(note) from {table}"
                                          " where client = $1", i)
                assert tuple(row) == (n + 1, n * (n + 1) // 2, f"a{i}", f"a{i}"), (i, n)  # type: ignore[arg-type]
            rows = await conn.fetch("select g * $1::int from generate_series(1, 3) g", i)
            assert [r[0] for r in rows] == [i, 2 * i, 3 * i], (i, n)
            assert await conn.fetchval("select current_setting('application_name')") == f"apg{i}"
    finally:
        await conn.close()


def test_asyncpg_50_clients_over_5_servers(make_proxy: Callable[..., ProxyRunner],
                                           new_table: Callable[..., str]) -> None:
    proxy = make_proxy(db={"pool_size": 5, "min_pool_size": 0})
    target = _proxy_target(proxy)
    table = new_table()
    rounds = 6

    async def main() -> None:
        await asyncio.gather(*(_asyncpg_client(target, table, i, rounds) for i in range(50)))

    asyncio.run(asyncio.wait_for(main(), 60))
    with psycopg.connect(target.dsn(), autocommit=True) as conn:
        assert conn.execute(f"select count(*), count(distinct client) from {table}").fetchone() == (50 * rounds, 50)
    assert proxy.state.databases[APPDB].pool.stats.opened <= 5


def test_asyncpg_listen_notify(make_target: Callable[..., Target], pg: EmbeddedPostgres) -> None:
    """LISTEN pins the listener to its server connection: notifications reach it and nobody else."""
    target = make_target(pool_size=2)
    channel = f"chan_{_uid()}"

    async def main() -> None:
        listener = await asyncpg.connect(**target.asyncpg_args())
        notifier = await asyncpg.connect(**target.asyncpg_args())
        direct = await asyncpg.connect(**_direct_target(pg).asyncpg_args())
        bystander = await psycopg.AsyncConnection.connect(target.dsn(), autocommit=True)
        got: asyncio.Queue[str] = asyncio.Queue()
        bystander_got: list[str] = []
        bystander.add_notify_handler(lambda n: bystander_got.append(n.payload))
        try:
            await listener.add_listener(channel, lambda _c, _pid, _ch, payload: got.put_nowait(payload))
            for k in range(3):
                await notifier.execute("select pg_notify($1, $2)", channel, f"via-{target.name}-{k}")
                assert await asyncio.wait_for(got.get(), 5) == f"via-{target.name}-{k}"
                await direct.execute(f"notify {channel}, 'direct-{k}'")
                assert await asyncio.wait_for(got.get(), 5) == f"direct-{k}"
                for j in range(5):  # the listener goes on using its connection, in transactions too
                    assert await listener.fetchval("select $1::int + 1", j) == j + 1
                    async with listener.transaction():
                        assert await listener.fetchval("select $1::text", f"t{j}") == f"t{j}"
                    await bystander.execute("select 1")
                    assert await notifier.fetchval("select $1::int * 2", j) == j * 2
            await asyncio.sleep(0.1)
            await bystander.execute("select 1")
            assert got.empty()
            assert bystander_got == []
        finally:
            await listener.close()
            await notifier.close()
            await direct.close()
            await bystander.close()

    asyncio.run(asyncio.wait_for(main(), 60))


def test_asyncpg_pool(make_target: Callable[..., Target]) -> None:
    """asyncpg's own pool: on release it resets the connection (RESET ALL, UNLISTEN *, advisory unlock, CLOSE ALL)."""
    target = make_target(pool_size=2)

    async def main() -> None:
        async with asyncpg.create_pool(**target.asyncpg_args(), min_size=2, max_size=4) as pool:

            async def user(i: int) -> None:
                for n in range(8):
                    async with pool.acquire() as conn:
                        assert await conn.fetchval("show statement_timeout") == "0", (i, n)  # reset on release
                        await conn.execute(f"set statement_timeout = '{1001 + i * 10 + n}ms'")
                        assert await conn.fetchval("select $1::int * $2::int", i, n) == i * n
                        async with conn.transaction():
                            assert await conn.fetchval("select $1::text || current_setting('statement_timeout')",
                                                       f"u{i}:") == f"u{i}:{1001 + i * 10 + n}ms"
                        rows = await conn.fetch("select g from generate_series(1, $1::int) g", n + 1)
                        assert [r[0] for r in rows] == list(range(1, n + 2))

            await asyncio.gather(*(user(i) for i in range(6)))

    with Churn(target, clients=2) as churn:
        asyncio.run(asyncio.wait_for(main(), 60))
    churn.check()
    _assert_servers_kept(target, 2)


@pytest.mark.parametrize("state", ["set_config", "advisory_lock"])
def test_asyncpg_session_state_through_prepared_statements(make_target: Callable[..., Target],
                                                           pg: EmbeddedPostgres, state: str) -> None:
    """asyncpg runs queries with arguments as named prepared statements, cached: RLS-style set_config and
    advisory locks change session state with a Bind of a statement prepared earlier, and that state must follow
    (or pin) the client all the same."""
    target = make_target(pool_size=2)
    key = int(uuid.uuid4().int % 2**30)

    async def main() -> None:
        conn = await asyncpg.connect(**target.asyncpg_args())
        direct = await asyncpg.connect(**_direct_target(pg).asyncpg_args())
        try:
            for k in range(3):  # the first time prepares, the next ones reuse the cached statement
                if state == "set_config":
                    value = f"{1001 + k}ms"
                    assert await conn.fetchval("select set_config('statement_timeout', $1, false)", value) == value
                    for j in range(3):
                        with holder.taken() if j % 2 else nullcontext():
                            assert await conn.fetchval("show statement_timeout") == value, (k, j)
                else:
                    await conn.execute("select pg_advisory_lock($1)", key + k)
                    for j in range(3):
                        with holder.taken() if j % 2 else nullcontext():
                            assert await conn.fetchval("select count(*) from pg_locks where locktype = 'advisory'"
                                                       " and pid = pg_backend_pid()") == 1, (k, j)
                        assert await direct.fetchval("select pg_try_advisory_lock($1)", key + k) is False, (k, j)
                    assert await conn.fetchval("select pg_advisory_unlock($1)", key + k) is True, k
                    assert await direct.fetchval("select pg_try_advisory_lock($1)", key + k) is True, k
                    assert await direct.fetchval("select pg_advisory_unlock($1)", key + k) is True, k
        finally:
            await conn.close()
            await direct.close()

    with Churn(target, clients=3) as churn, Holder(target) as holder:
        asyncio.run(asyncio.wait_for(main(), 60))
    churn.check()


# ---------------------------------------------------------------------------------------------
# 5. psql


def _psql(target: Target, *args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    cmd = [str(find_pg_bindir() / "psql"), "-X", "-q", "-A", "-t", "-v", "ON_ERROR_STOP=1", *args]
    return subprocess.run(cmd, env=target.env(), capture_output=True, text=True, timeout=timeout, check=False)


def test_psql_script_with_copy(make_target: Callable[..., Target], pg: EmbeddedPostgres, tmp_path: Path) -> None:
    target = make_target()
    table = f"drv_psql_{_uid()}"
    script = tmp_path / "script.sql"
    script.write_text(f"""\
create table {table} (id int primary key, name text);
\\copy {table} from stdin
1\tone
2\ttwo
3\tthree
\\.
insert into {table} values (4, 'four'), (5, 'five');
begin;
update {table} set name = upper(name) where id <= 2;
select count(*) from {table} where name = upper(name);
commit;
begin;
delete from {table};
rollback;
select string_agg(name, ',' order by id) from {table};
select 'a' as x; select 'b' as y
;
\\copy (select id, name from {table} where id > 3 order by id) to stdout
select count(*) from {table};
""")
    try:
        out = _psql(target, "-f", str(script))
        assert out.returncode == 0, out.stderr
        assert out.stdout.splitlines() == ["2", "ONE,TWO,three,four,five", "a", "b", "4\tfour", "5\tfive", "5"]
        multi = _psql(target, "-c", f"select count(*) from {table}; select max(id) from {table}")
        assert multi.returncode == 0, multi.stderr
        assert multi.stdout.splitlines() == ["5", "5"]
    finally:
        with _admin(pg) as conn:
            conn.execute(f"drop table if exists {table}")


def test_psql_set_and_prepare_across_statements(make_target: Callable[..., Target], tmp_path: Path) -> None:
    """psql runs each statement as its own transaction: SET and PREPARE must outlive them."""
    target = make_target(pool_size=2)
    script = tmp_path / "script.sql"
    lines = ["set statement_timeout = '4321ms';", "prepare drv_p(int) as select $1 * 10;"]
    for k in range(6):
        lines += ["show statement_timeout;", f"execute drv_p({k});", "select pg_sleep(0.005);"]
    lines += ["deallocate drv_p;", "reset statement_timeout;", "show statement_timeout;"]
    script.write_text("\n".join(lines) + "\n")
    with Churn(target, clients=3) as churn:
        out = _psql(target, "-f", str(script))
    assert out.returncode == 0, out.stderr
    expected: list[str] = []
    for k in range(6):
        expected += ["4321ms", str(k * 10), ""]
    assert out.stdout.splitlines() == [*expected, "0"]
    churn.check()


# ---------------------------------------------------------------------------------------------
# 6. pgbench


@pytest.fixture(scope="module")
def pgbench_schema(pg: EmbeddedPostgres) -> Iterator[str]:
    """pgbench tables (scale 1) in their own schema of appdb, made directly on PostgreSQL by the owner."""
    schema = f"drv_pgbench_{_uid()}"
    pg.execute(f"create schema {schema} authorization {OWNER}", dbname=APPDB)
    try:
        direct = _direct_target(pg)
        out = subprocess.run([str(find_pg_bindir() / "pgbench"), "-i", "-q", "-s", "1"],
                             env=direct.env(PGOPTIONS=f"-c search_path={schema}"), capture_output=True, text=True,
                             timeout=120, check=False)
        assert out.returncode == 0, out.stderr
        yield schema
    finally:
        pg.execute(f"drop schema {schema} cascade", dbname=APPDB)


def _pgbench_totals(pg: EmbeddedPostgres, schema: str) -> tuple[int, int, int, int, int]:
    with _admin(pg) as conn:
        row = conn.execute(f"select (select count(*) from {schema}.pgbench_history),"
                           f" (select coalesce(sum(delta), 0) from {schema}.pgbench_history),"
                           f" (select sum(abalance) from {schema}.pgbench_accounts),"
                           f" (select sum(bbalance) from {schema}.pgbench_branches),"
                           f" (select sum(tbalance) from {schema}.pgbench_tellers)").fetchone()
    assert row is not None
    return tuple(int(v) for v in row)  # type: ignore[return-value]


@pytest.mark.parametrize("mode", ["simple", "extended", "prepared"])
def test_pgbench(make_proxy: Callable[..., ProxyRunner], pg: EmbeddedPostgres, pgbench_schema: str,
                 mode: str) -> None:
    proxy = make_proxy(db={"pool_size": 4, "min_pool_size": 0})
    clients, per_client = 8, 150
    before = _pgbench_totals(pg, pgbench_schema)
    out = subprocess.run([str(find_pg_bindir() / "pgbench"), "-n", "-M", mode, "-c", str(clients), "-j", "2",
                          "-t", str(per_client)],
                         env=_proxy_target(proxy).env(PGOPTIONS=f"-c search_path={pgbench_schema}"),
                         capture_output=True, text=True, timeout=100, check=False)
    text = out.stdout + out.stderr
    assert out.returncode == 0, text
    total = clients * per_client
    assert f"query mode: {mode}" in text
    assert f"number of transactions actually processed: {total}/{total}" in text, text
    assert re.search(r"number of failed transactions: 0 \(", text), text
    count, deltas, accounts, branches, tellers = _pgbench_totals(pg, pgbench_schema)
    assert count == before[0] + total  # every transaction left its history row
    assert deltas == accounts == branches == tellers  # and its three updates, each exactly once
    assert proxy.state.databases[APPDB].pool.stats.opened <= 4


# ---------------------------------------------------------------------------------------------
# 7. SQLAlchemy 2 (psycopg and asyncpg dialects, default pooling)


def _orm_model(table: str) -> tuple[type[DeclarativeBase], Any]:
    class Base(DeclarativeBase):
        pass

    class Item(Base):
        __tablename__ = table
        id: Mapped[int] = mapped_column(primary_key=True)
        client: Mapped[int]
        n: Mapped[int]
        label: Mapped[str]

    return Base, Item


def test_sqlalchemy_psycopg_orm(make_target: Callable[..., Target]) -> None:
    target = make_target(pool_size=3)
    base, item = _orm_model(f"drv_sa_{_uid()}")
    engine = sa.create_engine(target.url("psycopg"))
    try:
        base.metadata.create_all(engine)

        def worker(i: int) -> None:
            for k in range(10):
                with Session(engine) as session, session.begin():
                    session.add(item(client=i, n=k, label=f"c{i}-{k}"))
                with Session(engine) as session:
                    got = session.execute(sa.select(item.n, item.label).where(item.client == i).order_by(item.n)).all()
                    earlier = [(n, f"changed-{i}-{n}") for n in range(k)]
                    assert [tuple(r) for r in got] == [*earlier, (k, f"c{i}-{k}")], (i, k)
                    assert session.scalar(sa.select(sa.func.count()).select_from(item)
                                          .where(item.client == i, item.n >= k)) == 1
                    assert session.scalar(sa.text("select cast(:a as int) * 2"), {"a": i * 100 + k}) == \
                        (i * 100 + k) * 2
                    obj = session.scalars(sa.select(item).where(item.client == i, item.n == k)).one()
                    assert (obj.client, obj.n, obj.label) == (i, k, f"c{i}-{k}")
                    obj.label = f"changed-{i}-{k}"
                    session.commit()
                with engine.connect() as conn:
                    assert conn.execute(sa.select(item.label).where(item.client == i, item.n == k)).scalar() == \
                        f"changed-{i}-{k}"

        _run_threads([partial(worker, i) for i in range(6)])
        with Session(engine) as session:
            assert session.scalar(sa.select(sa.func.count()).select_from(item)) == 60
        _assert_servers_kept(target, 3)
    finally:
        base.metadata.drop_all(engine)
        engine.dispose()


def test_sqlalchemy_asyncpg_core(make_target: Callable[..., Target]) -> None:
    target = make_target(pool_size=3)
    metadata = sa.MetaData()
    table = sa.Table(f"drv_sa_{_uid()}", metadata, sa.Column("id", sa.Integer, primary_key=True),
                     sa.Column("client", sa.Integer, nullable=False), sa.Column("n", sa.Integer, nullable=False),
                     sa.Column("label", sa.Text, nullable=False))

    async def main() -> None:
        engine = create_async_engine(target.url("asyncpg"))
        try:
            async with engine.begin() as conn:
                await conn.run_sync(metadata.create_all)
            sessions = async_sessionmaker(engine, class_=AsyncSession)

            async def worker(i: int) -> None:
                for k in range(10):
                    async with sessions() as session, session.begin():
                        await session.execute(sa.insert(table).values(client=i, n=k, label=f"a{i}-{k}"))
                    async with sessions() as session:
                        rows = (await session.execute(sa.select(table.c.n, table.c.label)
                                                      .where(table.c.client == i).order_by(table.c.n))).all()
                        assert [tuple(r) for r in rows] == [(n, f"a{i}-{n}") for n in range(k + 1)], (i, k)
                        assert await session.scalar(sa.text("select cast(:a as int) + 1"), {"a": i * 100 + k}) == \
                            i * 100 + k + 1
                    async with engine.connect() as conn:
                        total = await conn.scalar(sa.select(sa.func.sum(table.c.n)).where(table.c.client == i))
                        assert total == k * (k + 1) // 2, (i, k)

            await asyncio.gather(*(worker(i) for i in range(8)))
            async with engine.connect() as conn:
                assert await conn.scalar(sa.select(sa.func.count()).select_from(table)) == 80
            _assert_servers_kept(target, 3)
        finally:
            async with engine.begin() as conn:
                await conn.run_sync(metadata.drop_all)
            await engine.dispose()

    asyncio.run(asyncio.wait_for(main(), 60))


# ---------------------------------------------------------------------------------------------
# 8. Session state across transactions


@pytest.fixture
def search_path_tables(pg: EmbeddedPostgres) -> Iterator[tuple[str, str]]:
    """A schema and a table name that exists both in it ('schema') and in public ('public')."""
    schema, table = f"drv_s_{_uid()}", f"drv_sp_{_uid()}"
    with _admin(pg) as conn:
        conn.execute(f"create schema {schema}")
        conn.execute(f"create table {schema}.{table} as select 'schema'::text as v")
        conn.execute(f"create table public.{table} as select 'public'::text as v")
    yield schema, table
    with _admin(pg) as conn:
        conn.execute(f"drop schema {schema} cascade")
        conn.execute(f"drop table public.{table}")


def test_set_follows_its_client_across_transactions(make_target: Callable[..., Target],
                                                    search_path_tables: tuple[str, str]) -> None:
    target = make_target(pool_size=2)
    schema, table = search_path_tables
    with Churn(target, clients=4) as churn, Holder(target) as holder, \
            psycopg.connect(target.dsn(), autocommit=True) as a, psycopg.connect(target.dsn(), autocommit=True) as b:
        a.execute("SET statement_timeout = '1234ms'")
        a.execute(f"SET search_path = {schema}, public")
        b.execute("SET statement_timeout = '4321ms'")

        def state(conn: psycopg.Connection[Any]) -> tuple[Any, ...]:
            row = conn.execute(f"select current_setting('statement_timeout'), current_setting('search_path'),"
                               f" (select v from {table}), pg_backend_pid()").fetchone()
            assert row is not None
            pids.add(row[3])
            return tuple(row[:3])

        pids: set[int] = set()
        a_state = ("1234ms", f"{schema}, public", "schema")
        b_state = ("4321ms", DEFAULT_SEARCH_PATH, "public")
        for n in range(15):
            if n % 3 == 0:
                assert a.execute("SHOW statement_timeout").fetchone() == ("1234ms",)
                with holder.taken():
                    assert state(a) == a_state, n
            elif n % 3 == 1:
                with a.transaction():
                    assert state(a) == a_state, n
                    assert a.execute("SHOW search_path").fetchone() == (f"{schema}, public",)
            else:
                with a.transaction():
                    a.execute("SET LOCAL statement_timeout = '555ms'")
                    a.execute("SET LOCAL search_path = public")
                    assert state(a) == ("555ms", "public", "public"), n
                assert state(a) == a_state, n  # SET LOCAL ended with its transaction
            assert state(b) == b_state, n
            with b.transaction():
                assert state(b) == b_state, n

        # a SET in a rolled-back transaction is undone; in a committed one it stays
        with pytest.raises(_Rollback), a.transaction():
            a.execute("SET statement_timeout = '2222ms'")
            assert a.execute("SHOW statement_timeout").fetchone() == ("2222ms",)
            raise _Rollback
        for _ in range(3):
            assert state(a) == a_state
        with a.transaction():
            a.execute("SET statement_timeout = '3333ms'")
        for _ in range(3):
            assert state(a) == ("3333ms", f"{schema}, public", "schema")
            assert state(b) == b_state
        a.execute("RESET statement_timeout")
        for _ in range(3):
            assert state(a) == ("0", f"{schema}, public", "schema")
        a.execute("RESET ALL")
        for _ in range(3):
            assert state(a) == ("0", DEFAULT_SEARCH_PATH, "public")
            assert state(b) == b_state
    churn.check()
    if target.pooled:
        assert len(pids) > 1  # the clients really ran on more than one server connection


def test_set_config_follows_its_client(make_target: Callable[..., Target]) -> None:
    """set_config(..., false) is a session-level SET without a SET command tag."""
    target = make_target(pool_size=2)
    with Churn(target, clients=3) as churn, psycopg.connect(target.dsn(), autocommit=True) as conn, \
            Holder(target) as holder:
        assert conn.execute("select set_config('statement_timeout', '777ms', false)").fetchone() == ("777ms",)
        for _ in range(8):
            with holder.taken():
                assert conn.execute("show statement_timeout").fetchone() == ("777ms",)
            with conn.transaction():
                assert conn.execute("select current_setting('statement_timeout')").fetchone() == ("777ms",)
        with conn.transaction():  # is_local = true: ends with the transaction
            conn.execute("select set_config('statement_timeout', '888ms', true)")
        assert conn.execute("show statement_timeout").fetchone() == ("777ms",)
        conn.execute("do $$ begin perform set_config('lock_timeout', '999ms', false); end $$")
        for _ in range(4):
            with holder.taken():
                assert conn.execute("select current_setting('statement_timeout'), current_setting('lock_timeout')"
                                    ).fetchone() == ("777ms", "999ms")
        for k in range(8):  # with a parameter: from the 6th time on, psycopg runs it as a prepared statement
            value = f"{1001 + k}ms"
            assert conn.execute("select set_config('lock_timeout', %s, false)", (value,)).fetchone() == (value,)
            with holder.taken():
                assert conn.execute("show lock_timeout").fetchone() == (value,), k
    churn.check()


def test_setting_changed_inside_a_function_stays_with_its_client(make_target: Callable[..., Target],
                                                                 pg: EmbeddedPostgres,
                                                                 request: pytest.FixtureRequest) -> None:
    """A function that calls set_config(..., false) (an RLS helper, say) changes the caller's session only:
    no other client may run with it, and the caller keeps it."""
    target = make_target(pool_size=2)
    function = f"drv_set_fn_{_uid()}"
    with _admin(pg) as admin:
        admin.execute(f"create function {function}(v text) returns text language sql"
                      f" as $$ select set_config('statement_timeout', v, false) $$")
    try:
        with Churn(target, clients=3) as churn, psycopg.connect(target.dsn(), autocommit=True) as conn, \
                Holder(target) as holder:
            assert conn.execute(f"select {function}('6789ms')").fetchone() == ("6789ms",)
            for k in range(6):
                with holder.taken() if k % 2 else nullcontext():
                    assert conn.execute("show statement_timeout").fetchone() == ("6789ms",), k
            time.sleep(0.05)  # give the churn clients time to run on every server connection
        churn.check()
    finally:
        with _admin(pg) as admin:
            admin.execute(f"drop function {function}(text)")


def test_sql_prepare_execute_deallocate(make_target: Callable[..., Target]) -> None:
    target = make_target(pool_size=1)  # both clients share one server connection: their names collide there
    with Churn(target, clients=2) as churn, \
            psycopg.connect(target.dsn(), autocommit=True) as a, psycopg.connect(target.dsn(), autocommit=True) as b:
        a.execute("PREPARE foo (int) AS SELECT $1 * 2, 'a'::text")
        b.execute("PREPARE foo (text) AS SELECT upper($1), 42, true")
        for n in range(12):
            assert a.execute(f"EXECUTE foo({n})").fetchone() == (n * 2, "a"), n
            assert b.execute(f"EXECUTE foo('x{n}')").fetchone() == (f"X{n}", 42, True), n
            with a.transaction():
                assert a.execute(f"EXECUTE foo({n + 100})").fetchone() == ((n + 100) * 2, "a"), n
            with b.transaction():
                assert b.execute(f"EXECUTE foo('y{n}')").fetchone() == (f"Y{n}", 42, True), n

        with pytest.raises(psycopg.errors.DuplicatePreparedStatement):  # 42P05, as on PostgreSQL
            b.execute("PREPARE foo AS SELECT 1")
        assert b.execute("EXECUTE foo('still')").fetchone() == ("STILL", 42, True)

        a.execute("DEALLOCATE foo")
        with pytest.raises(psycopg.errors.InvalidSqlStatementName) as info:
            a.execute("EXECUTE foo(1)")
        assert info.value.sqlstate == "26000"
        for n in range(3):  # b's foo is untouched
            assert b.execute(f"EXECUTE foo('z{n}')").fetchone() == (f"Z{n}", 42, True)
        a.execute("PREPARE foo AS SELECT 'again'::text")  # the name is free again for a
        for _ in range(3):
            assert a.execute("EXECUTE foo").fetchone() == ("again",)

        a.execute("PREPARE bar AS SELECT 'bar'::text")
        a.execute("DEALLOCATE ALL")  # only a's statements
        for name in ("foo", "bar"):
            with pytest.raises(psycopg.errors.InvalidSqlStatementName):
                a.execute(f"EXECUTE {name}")
        assert b.execute("EXECUTE foo('last')").fetchone() == ("LAST", 42, True)
    churn.check()


def test_sql_prepare_is_not_transactional(make_target: Callable[..., Target]) -> None:
    """PostgreSQL keeps a PREPARE, and a DEALLOCATE, made in a transaction that is rolled back."""
    target = make_target(pool_size=2)
    with Churn(target, clients=3) as churn, psycopg.connect(target.dsn(), autocommit=True) as conn, \
            Holder(target) as holder:
        with pytest.raises(_Rollback), conn.transaction():
            conn.execute("PREPARE kept AS SELECT 'kept'::text")
            raise _Rollback
        conn.execute("PREPARE gone AS SELECT 'gone'::text")
        with pytest.raises(_Rollback), conn.transaction():
            conn.execute("DEALLOCATE gone")
            raise _Rollback
        for _ in range(5):
            with holder.taken():
                assert conn.execute("EXECUTE kept").fetchone() == ("kept",)
            with holder.taken(), pytest.raises(psycopg.errors.InvalidSqlStatementName):
                conn.execute("EXECUTE gone")
    churn.check()


def test_discard_all_clears_only_own_statements(make_target: Callable[..., Target]) -> None:
    target = make_target(pool_size=2)
    with Churn(target, clients=3) as churn, target.raw() as a, target.raw() as b, Holder(target) as holder:
        for sock, who in ((a, "a"), (b, "b")):
            assert _errors(_exchange(sock, query_msg(f"PREPARE foo AS SELECT '{who}-sql'::text"))) == []
            assert _errors(_exchange(sock, _parse("s1", f"select '{who}-proto'::text, $1::int") + SYNC)) == []
        assert _errors(_exchange(a, query_msg("SET statement_timeout = '1234ms'"))) == []
        for n in range(5):  # in separate transactions, interleaved
            for sock, who in ((a, "a"), (b, "b")):
                assert _ok_rows(_exchange(sock, query_msg("EXECUTE foo"))) == [(f"{who}-sql",)]
                with holder.taken():
                    assert _ok_rows(_exchange(sock, _bind_execute("s1", [str(n)]) + SYNC)) == \
                        [(f"{who}-proto", str(n))]
        assert _ok_rows(_exchange(a, query_msg("SHOW statement_timeout"))) == [("1234ms",)]

        msgs = _exchange(a, query_msg("DISCARD ALL"))
        assert _errors(msgs) == [] and (b"C", b"DISCARD ALL\0") in msgs
        for _ in range(3):
            assert _errors(_exchange(a, query_msg("EXECUTE foo"))) == ["26000"]
            with holder.taken():
                assert _errors(_exchange(a, _bind_execute("s1", ["1"]) + SYNC)) == ["26000"]
            assert _ok_rows(_exchange(a, query_msg("SHOW statement_timeout"))) == [("0",)]
            assert _ok_rows(_exchange(b, query_msg("EXECUTE foo"))) == [("b-sql",)]
            assert _ok_rows(_exchange(b, _bind_execute("s1", ["2"]) + SYNC)) == [("b-proto", "2")]
        # the names are free again for a, with new queries
        assert _errors(_exchange(a, _parse("s1", "select 'a-new'::text") + SYNC)) == []
        assert _errors(_exchange(a, query_msg("PREPARE foo AS SELECT 1 + 1"))) == []
        for _ in range(3):
            assert _ok_rows(_exchange(a, _bind_execute("s1") + SYNC)) == [("a-new",)]
            with holder.taken():
                assert _ok_rows(_exchange(a, query_msg("EXECUTE foo"))) == [("2",)]
            assert _ok_rows(_exchange(b, _bind_execute("s1", ["3"]) + SYNC)) == [("b-proto", "3")]
    churn.check()


def test_protocol_prepared_statement_name_reuse(make_target: Callable[..., Target]) -> None:
    """Close of a named statement frees the name; a second Parse of a live name fails with 42P05."""
    target = make_target(pool_size=2)
    with Churn(target, clients=3) as churn, target.raw() as a, Holder(target) as holder:
        assert _errors(_exchange(a, _parse("s1", "select 1") + SYNC)) == []
        assert _ok_rows(_exchange(a, _bind_execute("s1") + SYNC)) == [("1",)]
        with holder.taken():
            assert _errors(_exchange(a, _parse("s1", "select 2") + SYNC)) == ["42P05"]
        assert _ok_rows(_exchange(a, _bind_execute("s1") + SYNC)) == [("1",)]
        close = message(b"C", b"S" + _cstr("s1"))
        msgs = _exchange(a, close + SYNC)
        assert [k for k, _ in msgs] == [b"3", b"Z"]
        with holder.taken():
            assert _errors(_exchange(a, _bind_execute("s1") + SYNC)) == ["26000"]
        assert _errors(_exchange(a, _parse("s1", "select 'two'") + SYNC)) == []
        for _ in range(3):
            with holder.taken():
                assert _ok_rows(_exchange(a, _bind_execute("s1") + SYNC)) == [("two",)]
            with holder.taken():  # Describe of a statement prepared in an earlier transaction
                assert [k for k, _ in _exchange(a, message(b"D", b"S" + _cstr("s1")) + SYNC)] == [b"t", b"T", b"Z"]
        # SQL DEALLOCATE of protocol-level statements, by name and ALL
        for name in ("s2", "s3", "s4"):
            assert _errors(_exchange(a, _parse(name, f"select '{name}'") + SYNC)) == []
        assert _errors(_exchange(a, query_msg("DEALLOCATE s2"))) == []
        with holder.taken():
            assert _errors(_exchange(a, _bind_execute("s2") + SYNC)) == ["26000"]
            assert _ok_rows(_exchange(a, _bind_execute("s3") + SYNC)) == [("s3",)]
        assert _errors(_exchange(a, query_msg("DEALLOCATE ALL"))) == []
        for name in ("s1", "s3", "s4"):
            with holder.taken():
                msgs = _exchange(a, _bind_execute(name) + SYNC)
                assert _errors(msgs) == ["26000"], (name, _rows(msgs))
    churn.check()


def test_state_from_multi_statement_queries(make_target: Callable[..., Target]) -> None:
    """Several statements in one Query run as one implicit transaction: an error undoes its SETs, not its PREPAREs."""
    target = make_target(pool_size=2)
    with Churn(target, clients=3) as churn, target.raw() as a, Holder(target) as holder:
        msgs = _exchange(a, query_msg("PREPARE m1 AS SELECT 'm1'::text; SET lock_timeout = '4444ms'; SELECT 1"))
        assert _ok_rows(msgs) == [("1",)]
        msgs = _exchange(a, query_msg("SET lock_timeout = '5555ms'; PREPARE m2 AS SELECT 'm2'::text; SELECT 1/0"))
        assert _errors(msgs) == ["22012"]
        for _ in range(4):
            with holder.taken():
                assert _ok_rows(_exchange(a, query_msg("SHOW lock_timeout"))) == [("4444ms",)]
                assert _ok_rows(_exchange(a, query_msg("EXECUTE m1; EXECUTE m2"))) == [("m1",), ("m2",)]
        msgs = _exchange(a, query_msg("DEALLOCATE m1; RESET lock_timeout; SELECT 2"))
        assert _ok_rows(msgs) == [("2",)]
        for _ in range(3):
            with holder.taken():
                assert _errors(_exchange(a, query_msg("EXECUTE m1"))) == ["26000"]
                assert _ok_rows(_exchange(a, query_msg("SHOW lock_timeout; EXECUTE m2"))) == [("0",), ("m2",)]
    churn.check()


def test_protocol_error_in_a_pipeline_of_named_statements(make_target: Callable[..., Target]) -> None:
    """An error skips to the Sync, also when hyperpool has to prepare the statements on that server first."""
    target = make_target(pool_size=2)
    with Churn(target, clients=3) as churn, target.raw() as a, Holder(target) as holder:
        prepare = _parse("s1", "select $1::int") + _parse("s2", "select 10 / ($1::int + (random() * 0)::int)")
        assert [k for k, _ in _exchange(a, prepare + SYNC)] == [b"1", b"1", b"Z"]
        for r in range(6):
            with holder.taken() if r % 2 else nullcontext():
                a.sendall(_bind_execute("s1", [str(r)]) + _bind_execute("s2", ["0"]) + _bind_execute("s1", ["99"])
                          + SYNC + _bind_execute("s2", ["5"]) + _bind_execute("s1", [str(r + 1)]) + SYNC)
                msgs = read_messages(a, until=b"Z", count=2)
            # (random() keeps PostgreSQL from folding 10 / 0 into a custom plan at Bind: it fails at Execute)
            assert [k for k, _ in msgs] == [b"2", b"D", b"C", b"2", b"E", b"Z", b"2", b"D", b"C", b"2", b"D", b"C",
                                            b"Z"], r
            assert _rows(msgs) == [(str(r),), ("2",), (str(r + 1),)]
            assert _errors(msgs) == ["22012"]
            # and in an explicit transaction: the error aborts it, the statements survive it
            with holder.taken() if r % 2 == 0 else nullcontext():
                a.sendall(query_msg("begin") + _bind_execute("s1", ["7"]) + _bind_execute("s2", ["0"]) + SYNC
                          + _bind_execute("s1", ["8"]) + SYNC + query_msg("rollback"))
                msgs = read_messages(a, until=b"Z", count=4)
            assert _rows(msgs) == [("7",)]
            assert _errors(msgs) == ["22012", "25P02"]
            assert [p for k, p in msgs if k == b"Z"] == [b"T", b"E", b"E", b"I"]
    churn.check()


@pytest.fixture(scope="module")
def drivers_role(pg: EmbeddedPostgres) -> str:
    pg.execute(f"do $$ begin create role {DRIVERS_ROLE}; exception when duplicate_object then null; end $$;"
               f" grant {DRIVERS_ROLE} to {OWNER}")
    return DRIVERS_ROLE


@pytest.mark.parametrize("state", ["temp_table", "advisory_lock", "with_hold_cursor", "set_role"])
def test_unmovable_state_pins_the_client(make_target: Callable[..., Target], drivers_role: str, state: str) -> None:
    """State that cannot be moved to another server connection keeps the client on its own."""
    target = make_target(pool_size=2)
    key = int(uuid.uuid4().int % 2**30)
    with Churn(target, clients=3) as churn, psycopg.connect(target.dsn(), autocommit=True) as conn, \
            psycopg.connect(target.dsn(), autocommit=True) as other, Holder(target) as holder:
        server_taken = holder.taken
        if state == "temp_table":
            conn.execute("create temp table drv_tmp (v int)")
            for n in range(6):
                with server_taken():
                    conn.execute("insert into drv_tmp values (%s)", (n,))
                with server_taken(), conn.transaction():
                    assert conn.execute("select count(*), sum(v) from drv_tmp").fetchone() == (n + 1, n * (n + 1) // 2)
                assert other.execute("select to_regclass('drv_tmp') is null").fetchone() == (True,)
            # made while pinned, kept after the pin ends
            conn.execute("PREPARE pinned_p AS SELECT 'pp'::text")
            conn.execute("SET lock_timeout = '2345ms'")
            assert conn.execute("select %s::int + 1", (1,), prepare=True).fetchone() == (2,)
            conn.execute("discard temp")  # (a DROP would make psycopg send DEALLOCATE ALL)
            for _ in range(6):
                with server_taken():
                    assert conn.execute("EXECUTE pinned_p").fetchone() == ("pp",)
                    assert conn.execute("select %s::int + 1", (2,), prepare=True).fetchone() == (3,)
                    assert conn.execute("show lock_timeout").fetchone() == ("2345ms",)
                assert other.execute("show lock_timeout").fetchone() == ("0",)
        elif state == "advisory_lock":
            for k in range(8):  # from the 6th time on, psycopg runs these as prepared statements
                assert conn.execute("select pg_advisory_lock(%s)", (key + k + 1,)).fetchone() == ("",)
                with server_taken():
                    assert conn.execute("select count(*) from pg_locks where locktype = 'advisory'"
                                        " and pid = pg_backend_pid()").fetchone() == (1,), k
                assert other.execute("select pg_try_advisory_lock(%s)", (key + k + 1,)).fetchone() == (False,), k
                assert conn.execute("select pg_advisory_unlock(%s)", (key + k + 1,)).fetchone() == (True,), k
            assert conn.execute("select pg_advisory_lock(%s)", (key,)).fetchone() == ("",)
            for _ in range(6):
                assert other.execute("select pg_try_advisory_lock(%s)", (key,)).fetchone() == (False,)
                with server_taken(), conn.transaction():  # the holder can take it again (re-entrant) and release that
                    assert conn.execute("select pg_try_advisory_lock(%s)", (key,)).fetchone() == (True,)
                    assert conn.execute("select pg_advisory_unlock(%s)", (key,)).fetchone() == (True,)
            with server_taken():
                assert conn.execute("select pg_advisory_unlock(%s)", (key,)).fetchone() == (True,)
            assert other.execute("select pg_try_advisory_lock(%s)", (key,)).fetchone() == (True,)
            assert other.execute("select pg_advisory_unlock(%s)", (key,)).fetchone() == (True,)
        elif state == "with_hold_cursor":
            with conn.cursor(name="drv_hold", withhold=True) as cur:
                cur.execute("select g from generate_series(1, 60) g")
                got: list[int] = []
                for _ in range(6):
                    with server_taken():
                        got += [r[0] for r in cur.fetchmany(10)]
                    assert other.execute("select 1").fetchone() == (1,)
                assert got == list(range(1, 61))
        else:
            conn.execute(f"set role {drivers_role}")
            for _ in range(6):
                with server_taken():
                    assert conn.execute("select current_user::text").fetchone() == (drivers_role,)
                with server_taken(), conn.transaction():
                    assert conn.execute("select current_user::text, session_user::text").fetchone() == \
                        (drivers_role, OWNER)
                assert other.execute("select current_user::text").fetchone() == (OWNER,)
            conn.execute("reset role")
            for _ in range(3):
                with server_taken():
                    assert conn.execute("select current_user::text").fetchone() == (OWNER,)
    churn.check()


def test_pinned_client_leaves_nothing_behind(make_target: Callable[..., Target], drivers_role: str,
                                            pg: EmbeddedPostgres) -> None:
    """A pinned client's temp table, lock, LISTEN, role and statements end with it, on whichever connection."""
    target = make_target(pool_size=2)
    name, channel = f"drv_shadow_{_uid()}", f"chan_{_uid()}"
    key = int(uuid.uuid4().int % 2**31)
    query = f"select v from {name}"
    admin = _admin(pg)
    admin.execute(f"create table public.{name} as select 'public'::text as v")
    try:
        with Holder(target) as holder, psycopg.connect(target.dsn(), autocommit=True) as b:
            notified: list[str] = []
            b.add_notify_handler(lambda n: notified.append(n.payload))
            with psycopg.connect(target.dsn(), autocommit=True) as a:
                a.execute(f"create temp table {name} (v text)")  # shadows public.{name} for a only
                a.execute(f"insert into {name} values ('temp')")
                a.execute(f"listen {channel}")
                a.execute("select pg_advisory_lock(%s)", (key,))
                for _ in range(4):  # the same text, prepared by both, means a different table for each
                    assert a.execute(query, prepare=True).fetchone() == ("temp",)
                    assert b.execute(query, prepare=True).fetchone() == ("public",)
                a.execute(f"set role {drivers_role}")
                assert a.execute("select current_user::text").fetchone() == (drivers_role,)
            for k in range(8):  # b now also runs on the connection a had
                with holder.taken() if k % 2 else nullcontext():
                    row = b.execute(f"select ({query}), current_user::text,"
                                    " (select count(*) from pg_listening_channels()),"
                                    " (select count(*) from pg_locks where locktype = 'advisory'"
                                    " and pid = pg_backend_pid())").fetchone()
                    assert row == ("public", OWNER, 0, 0), k
                    assert b.execute(query, prepare=True).fetchone() == ("public",)
                admin.execute(f"notify {channel}, 'after-{k}'")
            assert b.execute("select 1").fetchone() == (1,)
            assert notified == []
            assert admin.execute("select pg_try_advisory_lock(%s), pg_advisory_unlock(%s)", (key, key)).fetchone() \
                == (True, True)
    finally:
        admin.execute(f"drop table public.{name}")
        admin.close()


# ---------------------------------------------------------------------------------------------
# 9. Mixed drivers, the same statement names, different queries, over 3 server connections


def _mixed_psycopg(target: Target, k: int, rounds: int) -> None:
    queries = [(f"select %s::int + {k} as v, 'psy{k}' as who", lambda n: (n,), lambda n: [(n + k, f"psy{k}")]),
               (f"select array[%s::int, {k}] as arr", lambda n: (n,), lambda n: [([n, k],)])]
    if k % 2:
        queries.reverse()  # a different query behind _pg3_0 per client
    with psycopg.connect(target.dsn(), autocommit=k != 1, prepare_threshold=0) as conn:
        for n in range(rounds):
            for sql, params, expected in queries:
                assert conn.execute(sql, params(n)).fetchall() == expected(n), (k, n)
            if k == 1:
                conn.commit()


def _mixed_sql(target: Target, k: int, rounds: int) -> None:
    with psycopg.connect(target.dsn(), autocommit=True) as conn:
        conn.execute(f"PREPARE s1 (int) AS SELECT $1::text || '-sql{k}', {k}")
        conn.execute(f'PREPARE "_pg3_0" AS SELECT {k} * 1000, now() IS NOT NULL, \'sql{k}\'')
        conn.execute(f'PREPARE "__asyncpg_stmt_1__" (text) AS SELECT upper($1), {k}::bigint')
        for n in range(rounds):
            assert conn.execute(f"EXECUTE s1({n})").fetchall() == [(f"{n}-sql{k}", k)], (k, n)
            with conn.transaction():
                assert conn.execute(f'EXECUTE "_pg3_0" /* {n} */').fetchall() == [(k * 1000, True, f"sql{k}")]
                assert conn.execute(f"EXECUTE \"__asyncpg_stmt_1__\"('q{n}')").fetchall() == [(f"Q{n}", k)]


async def _mixed_asyncpg_one(target: Target, k: int, rounds: int) -> None:
    conn = await asyncpg.connect(**target.asyncpg_args(), connection_class=_PerProcessNames)
    try:
        cached = [(f"select $1::int * {k + 2} as v", lambda n: n, lambda n: n * (k + 2)),
                  (f"select $1::text || 'apg{k}', {k}::int, true", lambda n: f"t{n}",
                   lambda n: (f"t{n}apg{k}", k, True))]
        if k % 2:
            cached.reverse()  # a different query behind __asyncpg_stmt_1__ per client
        named = await conn.prepare(f"select 'apg{k}'::text, $1::int", name="s1")  # the SQL users' name too
        for n in range(rounds):
            for sql, arg, expected in cached:
                row = await conn.fetchrow(sql, arg(n))
                assert row is not None
                got = row[0] if len(row) == 1 else tuple(row)
                assert got == expected(n), (k, n)
            async with conn.transaction():
                assert tuple(await named.fetchrow(n)) == (f"apg{k}", n), (k, n)  # type: ignore[arg-type]
    finally:
        await conn.close()


def _mixed_asyncpg(target: Target, rounds: int) -> None:
    async def main() -> None:
        await asyncio.gather(*(_mixed_asyncpg_one(target, k, rounds) for k in range(3)))

    asyncio.run(asyncio.wait_for(main(), 80))


def test_mixed_drivers_share_statement_names(make_target: Callable[..., Target]) -> None:
    target = make_target(pool_size=3)
    rounds = 30
    jobs: list[Callable[[], Any]] = [partial(_mixed_psycopg, target, k, rounds) for k in range(3)]
    jobs += [partial(_mixed_sql, target, k, rounds) for k in range(3)]
    jobs.append(partial(_mixed_asyncpg, target, rounds))
    _run_threads(jobs)
    _assert_servers_kept(target, 3)


# ---------------------------------------------------------------------------------------------
# 10. DDL changes the result shape of a prepared statement


def test_psycopg_prepared_statement_after_alter_table(make_target: Callable[..., Target],
                                                      new_table: Callable[..., str], pg: EmbeddedPostgres) -> None:
    target = make_target(pool_size=2, cache=False)  # the DDL goes straight to PostgreSQL
    table = new_table("a int")
    with _admin(pg) as admin, Churn(target, clients=3) as churn, psycopg.connect(target.dsn()) as conn, \
            Holder(target) as holder:
        admin.execute(f"insert into {table} values (1)")
        for k in range(6):
            with holder.taken() if k % 2 else nullcontext():
                cur = conn.execute(f"select * from {table}", prepare=True)
                assert cur.fetchall() == [(1,)]
                conn.commit()
        columns: list[str] = ["a"]
        row: list[Any] = [1]
        for col in ("b", "c"):
            admin.execute(f"alter table {table} add column {col} text default '{col}-default'")
            columns.append(col)
            row.append(f"{col}-default")
            errors = 0
            for k in range(8):
                try:
                    with holder.taken() if k % 2 else nullcontext():  # on another server connection each time
                        cur = conn.execute(f"select * from {table}", prepare=True)
                        got = cur.fetchall()
                except psycopg.errors.FeatureNotSupported as exc:  # PostgreSQL's own error
                    assert exc.sqlstate == "0A000"
                    assert "cached plan must not change result type" in str(exc)
                    errors += 1
                    conn.rollback()  # which also makes psycopg forget its prepared statements
                    continue
                assert cur.description is not None and [d.name for d in cur.description] == columns
                assert got == [tuple(row)]
                conn.commit()
            assert errors <= 1, f"{errors} errors after adding column {col}"
    churn.check()


def test_asyncpg_prepared_statement_after_alter_table(make_target: Callable[..., Target],
                                                      new_table: Callable[..., str], pg: EmbeddedPostgres) -> None:
    target = make_target(pool_size=2, cache=False)  # the DDL goes straight to PostgreSQL
    table = new_table("a int")

    async def main() -> None:
        admin = await asyncpg.connect(**_direct_target(pg).asyncpg_args())
        conn = await asyncpg.connect(**target.asyncpg_args())
        try:
            await admin.execute(f"insert into {table} values (1)")
            for k in range(6):
                with holder.taken() if k % 2 else nullcontext():
                    assert [dict(r) for r in await conn.fetch(f"select * from {table}")] == [{"a": 1}], k
            expected: dict[str, Any] = {"a": 1}
            for col in ("b", "c"):
                await admin.execute(f"alter table {table} add column {col} text default '{col}-default'")
                expected[col] = f"{col}-default"
                errors = 0
                for k in range(8):
                    try:
                        with holder.taken() if k % 4 >= 2 else nullcontext():  # sometimes on another server
                            if k % 2:
                                async with conn.transaction():
                                    rows = await conn.fetch(f"select * from {table}")
                            else:  # outside a transaction asyncpg re-prepares by itself
                                rows = await conn.fetch(f"select * from {table}")
                    except asyncpg.exceptions.FeatureNotSupportedError as exc:  # PostgreSQL's own error
                        assert exc.sqlstate == "0A000"
                        errors += 1
                        continue
                    assert [dict(r) for r in rows] == [expected], (col, k)
                assert errors <= 1, f"{errors} errors after adding column {col}"
        finally:
            await conn.close()
            await admin.close()

    with Churn(target, clients=3) as churn, Holder(target) as holder:
        asyncio.run(asyncio.wait_for(main(), 60))
    churn.check()


@pytest.mark.parametrize("autocommit", [True, False], ids=["autocommit", "transactions"])
def test_statement_prepared_after_alter_table_has_the_new_shape(request: pytest.FixtureRequest,
                                                                make_target: Callable[..., Target],
                                                                new_table: Callable[..., str], pg: EmbeddedPostgres,
                                                                autocommit: bool) -> None:
    """Other clients prepared the same text before the DDL; a client that prepares it afterwards sees no error."""
    target = make_target(pool_size=2, cache=False)  # the DDL goes straight to PostgreSQL
    if target.proxy is not None:
        request.applymarker(pytest.mark.xfail(strict=True, raises=psycopg.errors.FeatureNotSupported, reason=(
            "known limit (README): the statement is shared with clients that prepared it before the DDL, so "
            "its first execution on such a server connection fails once with 0A000")))
    table = new_table("a int")
    query = f"select * from {table}"
    with _admin(pg) as admin, Holder(target) as holder:
        admin.execute(f"insert into {table} values (1)")
        olds = [psycopg.connect(target.dsn(), autocommit=True) for _ in range(3)]
        try:
            for k in range(6):  # prepared on every server connection
                for old in olds:
                    with holder.taken() if k % 2 else nullcontext():
                        assert old.execute(query, prepare=True).fetchall() == [(1,)]
            admin.execute(f"alter table {table} add column b text default 'new'")
            with psycopg.connect(target.dsn(), autocommit=autocommit) as fresh:
                for k in range(6):
                    with holder.taken() if k % 2 else nullcontext():
                        cur = fresh.execute(query, prepare=True)
                        assert cur.description is not None and [d.name for d in cur.description] == ["a", "b"], k
                        assert cur.fetchall() == [(1, "new")], k
                        if not autocommit:
                            fresh.commit()

            async def fresh_asyncpg() -> None:
                conn = await asyncpg.connect(**target.asyncpg_args())
                try:
                    for k in range(6):
                        with holder.taken() if k % 2 else nullcontext():
                            async with conn.transaction():  # where asyncpg would not retry by itself
                                assert [tuple(r) for r in await conn.fetch(query)] == [(1, "new")], k
                finally:
                    await conn.close()

            asyncio.run(asyncio.wait_for(fresh_asyncpg(), 30))
        finally:
            for old in olds:
                old.close()
