"""The query cache wired into hyperpool, end to end (issue #4's proof): real drivers (psycopg, asyncpg, psql,
raw sockets) through hyperpool against a real PostgreSQL. Every answer is checked against PostgreSQL's own
(a direct connection with the same settings), and the cache's counters say what happened (hit, stale, miss,
stored, too big, evicted, invalidated, not cacheable and why).

Time: each proxy's ``Database.clock`` (only the cache reads it) is a hand-moved :class:`Clock`, so nothing
goes stale on a slow machine and TTL / stale-while-revalidate are exact. Concurrency: a cacheable query is
held in PostgreSQL by an IMMUTABLE function that waits for an advisory lock the test holds (a "gate"),
and counts its executions with a sequence, so "PostgreSQL ran it once" is a fact, not a timing.
"""

from __future__ import annotations

import asyncio
import dataclasses
import random
import struct
import subprocess
import threading
import time
import uuid
from collections.abc import Callable, Coroutine, Iterator
from contextlib import contextmanager
from typing import Any

import asyncpg
import psycopg
import pytest
from psycopg.types.string import TextLoader

from hyperpool.cache import CacheSettings, CacheStats, QueryCache
from hyperpool.config import parse_config
from hyperpool.embedded import EmbeddedPostgres, find_pg_bindir
from hyperpool.server import ServerState
from tests.support import (
    APP_PASSWORD,
    APP_USER,
    APPDB,
    OWNER,
    OWNER_PASSWORD,
    ProxyRunner,
    base_config,
    error_code,
    hold_the_server,
    let_go,
    message,
    query_msg,
    raw_login,
    read_messages,
    start_proxy,
    start_test_pg,
)

ADMIN, ADMIN_PASSWORD = "cache_ops", "cacheopspass"
START = 1000.0  # the fake clock's first reading


def _uid() -> str:
    return uuid.uuid4().hex[:10]


# ---------------------------------------------------------------------------------------------------------
# PostgreSQL directly, and the objects a test makes there


def direct_dsn(pg: EmbeddedPostgres, **params: str) -> str:
    extra = "".join(" {}='{}'".format(k, v.replace("\\", "\\\\").replace("'", "\\'")) for k, v in params.items())
    return f"host=127.0.0.1 port={pg.port} user={OWNER} password={OWNER_PASSWORD} dbname={APPDB}{extra}"


def direct(pg: EmbeddedPostgres, **params: str) -> psycopg.Connection[Any]:
    """PostgreSQL itself, as the origin user hyperpool logs in as: the control, and writes behind its back."""
    return psycopg.connect(direct_dsn(pg, **params), autocommit=True)


class Objects:
    """Tables, functions, sequences and schemas with unique names, made directly on PostgreSQL (before the
    proxy reads the catalog) and dropped at teardown."""

    def __init__(self, pg: EmbeddedPostgres) -> None:
        self.pg = pg
        self._drops: list[str] = []

    def run(self, *statements: str) -> None:
        with direct(self.pg) as conn:
            for sql in statements:
                conn.execute(sql)

    def make(self, create: str, drop: str) -> None:
        self.run(create)
        self.drop_later(drop)

    def drop_later(self, drop: str) -> None:
        """For an object a test makes another way (through hyperpool, say)."""
        self._drops.append(drop)

    def table(self, columns: str, *fill: str, prefix: str = "qc") -> str:
        """A new table; each of ``fill`` is run with ``{t}`` replaced by its name."""
        name = f"{prefix}_{_uid()}"
        self.make(f"create table {name} ({columns})", f"drop table if exists {name} cascade")
        self.run(*(sql.replace("{t}", name) for sql in fill))
        return name

    def sequence(self) -> str:
        name = f"qc_seq_{_uid()}"
        self.make(f"create sequence {name}", f"drop sequence if exists {name}")
        return name

    def function(self, signature: str, definition: str) -> str:
        """``signature``: '(x int) returns int language plpgsql immutable' with the name left out."""
        name = f"qc_fn_{_uid()}"
        args = signature[:signature.index(")") + 1]
        self.make(f"create function {name}{signature} as $body${definition}$body$",
                  f"drop function if exists {name}{args} cascade")
        return name

    def schema(self) -> str:
        name = f"qc_schema_{_uid()}"
        self.make(f"create schema {name}", f"drop schema if exists {name} cascade")
        return name

    def cleanup(self) -> None:
        with direct(self.pg) as conn:
            for sql in reversed(self._drops):
                conn.execute(sql)


@pytest.fixture
def objects(pg: EmbeddedPostgres) -> Iterator[Objects]:
    made = Objects(pg)
    yield made
    made.cleanup()


class Gate:
    """An IMMUTABLE (so cacheable) function that waits for an advisory lock the test may hold, then counts
    one execution in a sequence: ``f"{gate.fn}(id)"`` in a query lets the test hold the query inside
    PostgreSQL and count how often PostgreSQL really ran it. (A column argument, so it runs at execution,
    after the statement's snapshot, not when the planner folds constants.)"""

    def __init__(self, objects: Objects) -> None:
        self.pg = objects.pg
        self.key = random.randrange(1, 1 << 40)
        self.seq = objects.sequence()
        self.fn = objects.function(
            "(x int) returns int language plpgsql immutable",
            f" begin perform pg_advisory_lock_shared({self.key}); perform pg_advisory_unlock_shared({self.key});"
            f" perform nextval('{self.seq}'); return x; end ")
        self._holder: psycopg.Connection[Any] | None = None

    def executions(self) -> int:
        with direct(self.pg) as conn:
            row = conn.execute(f"select case when is_called then last_value else 0 end from {self.seq}").fetchone()
        assert row is not None
        return int(row[0])

    @contextmanager
    def closed(self) -> Iterator[None]:
        """The gate is closed in the block (until open() is called there); open after it in any case."""
        self._holder = direct(self.pg)
        self._holder.execute("select pg_advisory_lock(%s)", (self.key,))
        try:
            yield
        finally:
            self.open()

    def open(self) -> None:
        if self._holder is not None:
            self._holder.execute("select pg_advisory_unlock(%s)", (self.key,))
            self._holder.close()
            self._holder = None

    def waiting(self, sql: str) -> int:
        """How many PostgreSQL backends are running ``sql`` now (held at the gate)."""
        with direct(self.pg) as conn:
            row = conn.execute("select count(*) from pg_stat_activity where query = %s and state = 'active'",
                               (sql,)).fetchone()
        assert row is not None
        return int(row[0])


# ---------------------------------------------------------------------------------------------------------
# hyperpool with the cache, a hand-moved clock, and its counters


class Clock:
    """The cache's clock (Database.clock): moves only when a test says so."""

    def __init__(self) -> None:
        self.now = START

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


def _copy_stats(stats: CacheStats) -> CacheStats:
    return dataclasses.replace(stats, not_cacheable=dict(stats.not_cacheable))


@dataclasses.dataclass
class Delta:
    hits: int
    stale: int
    misses: int
    stored: int
    too_big: int
    evictions: int
    invalidations: int
    discarded_fills: int
    not_cacheable: dict[str, int]


class Cached:
    """A running hyperpool with one database (appdb), its cache on a fake clock."""

    def __init__(self, runner: ProxyRunner) -> None:
        self.runner = runner
        self.clock = Clock()
        self.database = runner.state.databases[APPDB]
        runner.run(setattr, self.database, "clock", self.clock)

    @property
    def port(self) -> int:
        return self.runner.port

    @property
    def cache(self) -> QueryCache:
        cache = self.database.cache
        assert isinstance(cache, QueryCache)
        return cache

    def dsn(self, **params: str) -> str:
        return self.runner.dsn(**params)

    def connect(self, autocommit: bool = True, prepare_threshold: int | None = None,
                **params: str) -> psycopg.Connection[Any]:
        """psycopg, by default without its automatic prepared statements (after 5 executions of a text it
        switches to Parse + Bind of a named statement: another key), so the counters are easy to predict."""
        return psycopg.connect(self.dsn(**params), autocommit=autocommit, prepare_threshold=prepare_threshold)

    def asyncpg_args(self, **extra: Any) -> dict[str, Any]:
        return {"host": "127.0.0.1", "port": self.port, "user": APP_USER, "password": APP_PASSWORD,
                "database": APPDB, **extra}

    def stats(self) -> CacheStats:
        return self.runner.run(lambda: _copy_stats(self.cache.stats))  # type: ignore[no-any-return]

    def delta(self, before: CacheStats) -> Delta:
        now = self.stats()
        reasons = {k: v - before.not_cacheable.get(k, 0) for k, v in now.not_cacheable.items()}
        return Delta(now.hits - before.hits, now.stale - before.stale, now.misses - before.misses,
                     now.stored - before.stored, now.too_big - before.too_big, now.evictions - before.evictions,
                     now.invalidations - before.invalidations, now.discarded_fills - before.discarded_fills,
                     {k: v for k, v in reasons.items() if v})

    def key_kinds(self) -> set[object]:
        """How the stored entries were asked: b"Q" simple Query, b"P" Parse+Bind, b"B" Bind of a named statement."""
        return self.runner.run(lambda: {key[0] for key in self.cache._entries})  # type: ignore[no-any-return]

    def entry(self, predicate: Callable[[tuple[object, ...]], bool]) -> Any:
        """(stored_at, response) of the one entry whose key matches."""
        def find() -> list[tuple[float, bytes]]:
            return [(e.stored_at, e.response) for k, e in self.cache._entries.items() if predicate(k)]
        found = self.runner.run(find)
        assert len(found) == 1, found
        return found[0]

    def catalog_reads(self) -> int:
        return self.runner.run(lambda: self.database.catalog_reads)  # type: ignore[no-any-return]

    def wait_for_catalog(self, after: int = 0) -> None:
        """The cache classifies (so stores) nothing until the database's catalog has been read: wait for it
        (for a read after the ``after``-th one, when DDL made it read again)."""
        for _ in range(400):
            ready, reads = self.runner.run(lambda: (self.database.classifier is not None,
                                                    self.database.catalog_reads))
            if ready and reads > after:
                return
            time.sleep(0.025)
        raise AssertionError("the catalog was not read")

    def settle(self, conn: psycopg.Connection[Any]) -> None:
        """After a statement that changed session state (SET, CREATE TEMP TABLE, ...), hyperpool reads the
        state back on the client's server connection before letting it go; a request the client sends
        meanwhile goes to that connection (not cacheable: "transaction"). One uncacheable round trip waits
        for that, so what follows is counted predictably."""
        conn.execute("/* hyperpool: nocache */ select 1")

    def wait_for(self, condition: Callable[[CacheStats], bool], what: str) -> CacheStats:
        for _ in range(400):
            stats = self.stats()
            if condition(stats):
                return stats
            time.sleep(0.025)
        raise AssertionError(f"timed out waiting for {what}: {self.stats()}")

    def show_cache(self) -> dict[str, Any]:
        """This database's SHOW CACHE row, from the admin console."""
        with psycopg.connect(self.runner.dsn(user=ADMIN, password=ADMIN_PASSWORD, dbname="hyperpool"),
                             autocommit=True) as adm:
            cur = psycopg.ClientCursor(adm)
            cur.execute("SHOW CACHE")
            assert cur.description is not None
            names = [d.name for d in cur.description]
            rows = [dict(zip(names, row, strict=True)) for row in cur.fetchall()]
        (row,) = [r for r in rows if r["database"] == APPDB]
        return row


def overrides(cache: dict[str, Any] | None = None, top: dict[str, Any] | None = None, **db: Any) -> dict[str, Any]:
    """base_config overrides: appdb with ``cache`` (its own section) under the top-level ``top`` section, and
    an admin console."""
    section: dict[str, Any] = dict(db)
    if cache is not None:
        section["cache"] = cache
    result: dict[str, Any] = {
        "db": section,
        "users": {APP_USER: {"password": APP_PASSWORD}, ADMIN: {"password": ADMIN_PASSWORD}},
        "admin": {"users": [ADMIN]},
    }
    if top is not None:
        result["cache"] = top
    return result


def ready(runner: ProxyRunner) -> Cached:
    proxy = Cached(runner)
    if proxy.database.cache is not None:
        psycopg.connect(proxy.dsn()).close()  # the catalog is read once a client has logged in
        proxy.wait_for_catalog()
    return proxy


@pytest.fixture
def start(make_proxy: Callable[..., ProxyRunner]) -> Callable[..., Cached]:
    """start(cache={...}, top={...}, **pool): a hyperpool in front of the test PostgreSQL (see overrides()),
    returned once its cache can work."""

    def start(cache: dict[str, Any] | None = None, top: dict[str, Any] | None = None, **db: Any) -> Cached:
        return ready(make_proxy(**overrides(cache, top, **db)))

    return start


class Loop:
    """One asyncio loop for a test's asyncpg connections, driven step by step from synchronous test code."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()

    def __call__(self, coro: Coroutine[Any, Any, Any]) -> Any:
        return self.loop.run_until_complete(asyncio.wait_for(coro, 30))

    def close(self) -> None:
        self.loop.close()


@pytest.fixture
def aloop() -> Iterator[Loop]:
    loop = Loop()
    yield loop
    loop.close()


def as_text(conn: psycopg.Connection[Any], *types: str) -> psycopg.Connection[Any]:
    """Load ``types`` as the text PostgreSQL sent (so settings such as TimeZone and DateStyle are visible)."""
    for name in types:
        conn.adapters.register_loader(name, TextLoader)
    return conn


def raw_exchange(sock: Any, data: bytes, answers: int = 1) -> list[tuple[bytes, bytes]]:
    """Send ``data``; read until ``answers`` ReadyForQuery."""
    sock.sendall(data)
    return read_messages(sock, count=answers)


def wait_until(condition: Callable[[], bool], what: str) -> None:
    for _ in range(400):
        if condition():
            return
        time.sleep(0.025)
    raise AssertionError(f"timed out waiting for {what}")


@contextmanager
def threads(count: int, target: Callable[[int], None], unblock: Callable[[], None] = lambda: None) -> Iterator[None]:
    """Run target(i) for i in range(count) in threads while the block runs; join them after it (calling
    ``unblock`` first, in case the block failed before letting them finish); re-raise their errors."""
    errors: list[BaseException] = []

    def run(i: int) -> None:
        try:
            target(i)
        except BaseException as exc:  # re-raised in the test's thread
            errors.append(exc)

    workers = [threading.Thread(target=run, args=(i,), daemon=True) for i in range(count)]
    for w in workers:
        w.start()
    try:
        yield
    finally:
        unblock()
        deadline = time.monotonic() + 30
        for w in workers:
            w.join(max(0.0, deadline - time.monotonic()))
    assert not any(w.is_alive() for w in workers), "a client thread did not finish"
    if errors:
        raise errors[0]


ROWS_TABLE = ("id int primary key, name text, amount numeric(12, 2), at timestamptz, raw bytea, f float8, "
              "tags text[], doc jsonb, nothing int",
              "insert into {t} select g, 'name ' || g, g * 1.25, timestamptz '2024-03-01 12:00+00' + g * interval "
              "'1 hour 1 second', decode(md5(g::text), 'hex'), g / 3.0, array['a' || g, null, 'b'], "
              "jsonb_build_object('g', g, 'l', jsonb_build_array(g, 'x')), null from generate_series(1, 20) g")


# ---------------------------------------------------------------------------------------------------------
# 1. A hit is the database's answer: simple protocol, extended with text and binary results, asyncpg


def test_simple_protocol_hits_replay_the_databases_bytes(pg: EmbeddedPostgres, objects: Objects,
                                                         start: Callable[..., Cached]) -> None:
    t = objects.table(*ROWS_TABLE)
    proxy = start()
    sql = f"select * from {t} order by id"
    with direct(pg) as d:
        cur = d.execute(sql)
        want = cur.fetchall()
        assert cur.description is not None
        want_columns = [(c.name, c.type_code) for c in cur.description]
    before = proxy.stats()
    with proxy.connect() as a, proxy.connect() as b:
        for conn in (a, b, a, b):  # psycopg without parameters: the simple protocol
            cur = conn.execute(sql)
            assert cur.fetchall() == want
            assert cur.description is not None and [(c.name, c.type_code) for c in cur.description] == want_columns
            assert cur.statusmessage == "SELECT 20"
        for conn in (a, b, a):  # ClientCursor binds parameters itself: still the simple protocol
            ccur = psycopg.ClientCursor(conn)
            ccur.execute(f"select name, tags from {t} where id = %s", (7,))
            assert ccur.fetchall() == [("name 7", ["a7", None, "b"])]
    d1 = proxy.delta(before)
    assert (d1.misses, d1.hits, d1.stored, d1.not_cacheable) == (2, 5, 2, {})
    assert proxy.key_kinds() == {b"Q"}

    # byte for byte: the miss streams PostgreSQL's bytes; hits (on other connections too) are the same bytes
    raw_sql = f"select id, name, raw, doc from {t} where id <= 3 order by id"
    answers = []
    for _ in range(3):
        sock = raw_login(proxy.port)
        try:
            answers.append(raw_exchange(sock, query_msg(raw_sql)))
            answers.append(raw_exchange(sock, query_msg(raw_sql)))
        finally:
            sock.close()
    assert [kind for kind, _ in answers[0]] == [b"T", b"D", b"D", b"D", b"C", b"Z"]
    assert all(answer == answers[0] for answer in answers)
    _, stored = proxy.entry(lambda k: k[0] == b"Q" and k[2] == query_msg(raw_sql))  # (keyed by the whole message)
    assert stored == b"".join(kind + struct.pack("!I", len(body) + 4) + body for kind, body in answers[0])

    # psql prints the same through hyperpool (a hit now) as it does connected to PostgreSQL
    psql = [str(find_pg_bindir() / "psql"), "-X", "-q", "-c", sql]
    via_proxy = subprocess.run([*psql, proxy.dsn()], capture_output=True, text=True, timeout=30, check=True)
    via_pg = subprocess.run([*psql, direct_dsn(pg)], capture_output=True, text=True, timeout=30, check=True)
    assert via_proxy.stdout == via_pg.stdout and "(20 rows)" in via_pg.stdout
    d2 = proxy.delta(before)
    assert (d2.hits, d2.misses) == (d1.hits + 5 + 1, d1.misses + 1)  # raw: 1 miss, 5 hits; psql: a hit


def test_extended_protocol_hits_with_parameters_text_and_binary(pg: EmbeddedPostgres, objects: Objects,
                                                                start: Callable[..., Cached]) -> None:
    t = objects.table(*ROWS_TABLE)
    proxy = start()
    sql = f"select id, name, amount, at, raw, f, tags, doc, nothing from {t} where id > %s order by id"
    with direct(pg) as d:
        want_text = d.execute(sql, (15,)).fetchall()
        want_binary = d.cursor(binary=True).execute(sql, (15,)).fetchall()
        want_other = d.execute(sql, (18,)).fetchall()
    assert len(want_text) == 5 and want_binary == want_text
    before = proxy.stats()
    with proxy.connect(prepare_threshold=5) as a, proxy.connect(prepare_threshold=5) as b:
        # more rounds than psycopg's prepare_threshold (5): it then prepares the statement and binds it by name
        for _ in range(8):
            for conn in (a, b):
                assert conn.execute(sql, (15,)).fetchall() == want_text
                cur = conn.cursor(binary=True)
                assert cur.execute(sql, (15,)).fetchall() == want_binary
                assert cur.pgresult is not None and cur.pgresult.fformat(0) == 1  # binary results indeed
        assert a.execute(sql, (18,)).fetchall() == want_other  # another parameter value: its own entry
        assert b.execute(sql, (18,)).fetchall() == want_other
    d1 = proxy.delta(before)
    # five entries, whichever connection asked first: text and binary results of the unnamed statement
    # (Parse + Bind) and of psycopg's prepared one (Bind by name), and the other value (prepared by then)
    assert (d1.misses, d1.stored, d1.hits) == (5, 5, 8 * 4 + 2 - 5)
    assert len(proxy.cache) == 5 and proxy.key_kinds() == {b"P", b"B"}
    assert d1.not_cacheable == {"pipelined": 2}  # (each connection's Parse of its named statement)


def test_asyncpg_named_statements_hit(pg: EmbeddedPostgres, objects: Objects, start: Callable[..., Cached],
                                      aloop: Loop) -> None:
    t = objects.table(*ROWS_TABLE)
    proxy = start()
    sql = f"select id, name, amount, at, raw, f, tags, doc, nothing from {t} where id > $1 order by id"
    one = f"select name from {t} where id = $1"

    async def direct_rows() -> tuple[list[asyncpg.Record], list[asyncpg.Record]]:
        conn = await asyncpg.connect(host="127.0.0.1", port=pg.port, user=OWNER, password=OWNER_PASSWORD,
                                     database=APPDB)
        try:
            return await conn.fetch(sql, 12), await conn.fetch(sql, 17)
        finally:
            await conn.close()

    want, want_other = aloop(direct_rows())
    assert len(want) == 8

    async def clients() -> None:
        conns = [await asyncpg.connect(**proxy.asyncpg_args()) for _ in range(3)]
        try:
            for _ in range(4):
                for conn in conns:
                    assert await conn.fetch(sql, 12) == want
                    assert await conn.fetch(one, 3) == [("name 3",)]
            for conn in conns:
                assert await conn.fetch(sql, 17) == want_other
            stmt = await conns[0].prepare(one)  # its own prepared statement object, executed again
            assert [await stmt.fetch(i) for i in (3, 4, 3)] == [[("name 3",)], [("name 4",)], [("name 3",)]]
        finally:
            for conn in conns:
                await conn.close()

    before = proxy.stats()
    aloop(clients())
    d1 = proxy.delta(before)
    # (sql, 12), (one, 3), (sql, 17), (one, 4): each asked once of PostgreSQL, whichever connection asked.
    # (A statement's first execution on a connection is not looked up: asyncpg sends its Bind right behind
    # Parse + Describe + Flush, on the server connection that is still attached: 3 x 2 + 1 such.)
    assert d1.stored == d1.misses == 4
    assert d1.hits == 4 * 3 * 2 + 3 + 3 - 7 - 4
    assert d1.not_cacheable == {"pipelined": 7}
    assert proxy.key_kinds() == {b"B"}  # asyncpg binds named statements (its Parse + Describe goes through)


def test_asyncpg_fetchrow_is_cached(pg: EmbeddedPostgres, objects: Objects,
                                    start: Callable[..., Cached], aloop: Loop) -> None:
    """fetchrow/fetchval execute with a row limit of 1: the answer ends in PortalSuspended, and outside a
    transaction block the portal is gone at the Sync, so the answer is stored like any other."""
    t = objects.table(*ROWS_TABLE)
    proxy = start()

    async def client() -> None:
        conn = await asyncpg.connect(**proxy.asyncpg_args())
        try:
            for i in (3, 3, 4, 3):
                assert await conn.fetchval(f"select name from {t} where id = $1", i) == f"name {i}"
                row = await conn.fetchrow(f"select id, tags from {t} where id = $1", i)
                assert row is not None and tuple(row) == (i, [f"a{i}", None, "b"])
        finally:
            await conn.close()

    before = proxy.stats()
    aloop(client())
    d1 = proxy.delta(before)
    # each statement's first execution is pipelined behind its Parse (not looked up); then i=3 and i=4 miss
    # and are stored, and the last i=3 hits for both statements
    assert (d1.hits, d1.stored, d1.misses) == (2, 4, 4)


# ---------------------------------------------------------------------------------------------------------
# 2. Freshness: max_age, stale-while-revalidate (refreshed in the background), expiry; the max_age hint


def test_max_age_then_stale_then_gone(pg: EmbeddedPostgres, objects: Objects, start: Callable[..., Cached],
                                      aloop: Loop) -> None:
    t = objects.table("id int primary key, n int", "insert into {t} values (1, 10), (2, 0)")
    proxy = start(cache={"max_age": 10, "stale_while_revalidate": 5})
    simple = f"select n from {t} where id = 1"
    extended = f"select n from {t} where id = %s"
    named = f"select n from {t} where id = $1"

    async def apg_connect() -> asyncpg.Connection:
        return await asyncpg.connect(**proxy.asyncpg_args())

    apg = aloop(apg_connect())
    aloop(apg.fetch(named, 2))  # asyncpg's first execution of a statement comes with its Parse: not looked up

    def read_all(conn: psycopg.Connection[Any]) -> list[int]:
        return [conn.execute(simple).fetchone()[0],  # type: ignore[index]
                conn.execute(extended, (1,)).fetchone()[0],  # type: ignore[index]
                aloop(apg.fetch(named, 1))[0][0]]

    try:
        with proxy.connect() as conn, direct(pg) as pgconn:
            before = proxy.stats()
            assert read_all(conn) == [10, 10, 10]
            assert proxy.delta(before).stored == 3
            assert proxy.key_kinds() == {b"Q", b"P", b"B"}
            pgconn.execute(f"update {t} set n = 20 where id = 1")  # behind hyperpool's back

            proxy.clock.advance(10)  # age 10 = max_age: fresh
            before = proxy.stats()
            assert read_all(conn) == [10, 10, 10]
            d1 = proxy.delta(before)
            assert (d1.hits, d1.stale, d1.misses) == (3, 0, 0)

            proxy.clock.advance(4)  # age 14: stale, served at once (and a refresh starts)
            before = proxy.stats()
            assert read_all(conn) == [10, 10, 10]
            d1 = proxy.delta(before)
            assert (d1.stale, d1.hits, d1.misses) == (3, 0, 0)
            # the three background refreshes store before the clock moves on (else one stored after the
            # next advance would be fresh then)
            proxy.wait_for(lambda s: s.stored - before.stored >= 3, "the three refreshes stored")

            pgconn.execute(f"update {t} set n = 30 where id = 1")
            proxy.clock.advance(10 + 5 + 0.5)  # past max_age + stale_while_revalidate of any entry: a miss
            before = proxy.stats()
            assert read_all(conn) == [30, 30, 30]
            d1 = proxy.delta(before)
            assert (d1.misses, d1.hits, d1.stale, d1.stored) == (3, 0, 0, 3)
    finally:
        aloop(apg.close())


@pytest.mark.parametrize("protocol", ["simple", "extended", "named"])
def test_stale_entries_are_refreshed_in_the_background(pg: EmbeddedPostgres, objects: Objects,
                                                       start: Callable[..., Cached], aloop: Loop,
                                                       protocol: str) -> None:
    t = objects.table("id int primary key, n int", "insert into {t} values (1, 10)")
    proxy = start(cache={"max_age": 10, "stale_while_revalidate": 5})
    kind = {"simple": b"Q", "extended": b"P", "named": b"B"}[protocol]

    async def apg_connect() -> asyncpg.Connection:
        return await asyncpg.connect(**proxy.asyncpg_args())

    apg = aloop(apg_connect())
    aloop(apg.fetch(f"select n from {t} where id = $1", 2))  # (its first execution is not looked up)

    def read(conn: psycopg.Connection[Any]) -> int:
        if protocol == "simple":
            return conn.execute(f"select n from {t} where id = 1").fetchone()[0]  # type: ignore[index,no-any-return]
        if protocol == "extended":
            return conn.execute(f"select n from {t} where id = %s", (1,)).fetchone()[0]  # type: ignore[index,no-any-return]
        return aloop(apg.fetch(f"select n from {t} where id = $1", 1))[0][0]  # type: ignore[no-any-return]

    def refreshing() -> bool:
        return proxy.runner.run(lambda: any(e.refreshing for e in proxy.cache._entries.values()))  # type: ignore[no-any-return]

    try:
        with proxy.connect() as conn, direct(pg) as pgconn:
            assert read(conn) == 10
            pgconn.execute(f"update {t} set n = 20 where id = 1")  # behind hyperpool's back
            proxy.clock.advance(12)
            before = proxy.stats()
            assert read(conn) == 10  # stale, served at once
            for _ in range(400):  # the background refresh ends (stored, or failed)
                if not refreshing():
                    break
                time.sleep(0.025)
            d1 = proxy.delta(before)
            assert (d1.stale, d1.stored) == (1, 1)
            stored_at, _ = proxy.entry(lambda k: k[0] == kind)
            assert stored_at == START + 12  # the refresh replaced the entry
            before = proxy.stats()
            assert read(conn) == 20  # the refreshed entry: fresh, PostgreSQL's new value
            assert proxy.delta(before).hits == 1
    finally:
        aloop(apg.close())


def test_max_age_hint_shortens_the_lifetime(pg: EmbeddedPostgres, objects: Objects,
                                            start: Callable[..., Cached]) -> None:
    t = objects.table("id int primary key, n int", "insert into {t} values (1, 10)")
    proxy = start(cache={"max_age": 10, "stale_while_revalidate": 0})
    plain = f"select n from {t} where id = 1"
    hinted = f"/* hyperpool: max_age=1 */ select n from {t} where id = 1"
    with proxy.connect() as conn, direct(pg) as pgconn:
        assert conn.execute(plain).fetchone() == conn.execute(hinted).fetchone() == (10,)
        pgconn.execute(f"update {t} set n = 11 where id = 1")  # behind hyperpool's back
        proxy.clock.advance(1)
        before = proxy.stats()
        assert conn.execute(plain).fetchone() == conn.execute(hinted).fetchone() == (10,)
        assert proxy.delta(before).hits == 2
        proxy.clock.advance(0.5)  # 1.5: the hinted entry is gone, the plain one fresh
        before = proxy.stats()
        assert conn.execute(plain).fetchone() == (10,)
        assert conn.execute(hinted).fetchone() == (11,)
        d1 = proxy.delta(before)
        assert (d1.hits, d1.misses, d1.stored) == (1, 1, 1)
        proxy.clock.advance(9)  # 10.5: the plain one too; the hinted one (stored at 1.5) also
        pgconn.execute(f"update {t} set n = 12 where id = 1")
        assert conn.execute(plain).fetchone() == conn.execute(hinted).fetchone() == (12,)


# ---------------------------------------------------------------------------------------------------------
# 3. Single flight


def test_single_flight_50_clients_one_execution(pg: EmbeddedPostgres, objects: Objects,
                                                start: Callable[..., Cached]) -> None:
    t = objects.table("id int primary key, n int", "insert into {t} values (1, 10), (2, 20)")
    gate = Gate(objects)
    proxy = start(pool_size=3)
    sql = f"select n, {gate.fn}(id) as id from {t} where id = 1"
    clients = 50
    conns = [proxy.connect() for _ in range(clients)]
    results: list[Any] = [None] * clients
    try:
        before = proxy.stats()

        def query(i: int) -> None:
            results[i] = conns[i].execute(sql).fetchall()

        with gate.closed(), threads(clients, query, gate.open):
            proxy.wait_for(lambda s: s.misses - before.misses >= clients, "every client's lookup")
            wait_until(lambda: gate.waiting(sql) >= 1, "the query at the gate")
            assert gate.waiting(sql) == 1  # one backend runs it; 49 clients wait for its bytes
            gate.open()
        assert results == [[(10, 1)]] * clients
        assert gate.executions() == 1
        d1 = proxy.delta(before)
        assert (d1.misses, d1.stored, d1.hits, d1.discarded_fills) == (clients, 1, 0, 0)
        # and from now on a hit: PostgreSQL is not asked again
        assert conns[7].execute(sql).fetchall() == [(10, 1)]
        assert gate.executions() == 1 and proxy.delta(before).hits == 1
    finally:
        for conn in conns:
            conn.close()


def test_a_fill_whose_client_leaves_still_answers_the_waiters(pg: EmbeddedPostgres, objects: Objects,
                                                               start: Callable[..., Cached]) -> None:
    """The client whose miss fills the key goes away before the answer: the clients that joined its fill run
    the query themselves and get the right rows."""
    t = objects.table("id int primary key, n int", "insert into {t} values (1, 10)")
    proxy = start(pool_size=1, min_pool_size=0)
    sql = f"select n from {t} where id = 1"
    holder = hold_the_server(proxy.port)  # the one server connection is busy: the filler waits for it
    try:
        filler = raw_login(proxy.port)
        waiters = [raw_login(proxy.port) for _ in range(3)]
        before = proxy.stats()
        filler.sendall(query_msg(sql))
        proxy.wait_for(lambda s: s.misses - before.misses == 1, "the filler's lookup")
        for w in waiters:
            w.sendall(query_msg(sql))
        proxy.wait_for(lambda s: s.misses - before.misses == 4, "the waiters' lookups")
        assert proxy.runner.run(lambda: len(proxy.cache._flights[next(iter(proxy.cache._flights))].waiters)) == 3
        filler.close()
        wait_until(lambda: not proxy.runner.run(lambda: proxy.cache._flights), "the abandoned fill")
    finally:
        let_go(holder)
    for w in waiters:
        answer = read_messages(w)
        assert [k for k, _ in answer] == [b"T", b"D", b"C", b"Z"] and answer[1][1].endswith(b"10")
        w.close()
    d1 = proxy.delta(before)
    assert (d1.stored, d1.hits) == (0, 0)  # the waiters' own queries fill nothing


# ---------------------------------------------------------------------------------------------------------
# 4. Writes through hyperpool invalidate at commit


def test_writes_through_hyperpool_invalidate(pg: EmbeddedPostgres, objects: Objects,
                                             start: Callable[..., Cached]) -> None:
    t = objects.table("id int primary key, n int", "insert into {t} values (1, 10), (2, 20)")
    view = f"{t}_v"
    objects.make(f"create view {view} as select id, n * 2 as twice from {t}", f"drop view if exists {view}")
    parent = f"qc_part_{_uid()}"
    objects.make(f"create table {parent} (id int, region text) partition by list (region)",
                 f"drop table if exists {parent} cascade")
    objects.run(f"create table {parent}_a partition of {parent} for values in ('a')",
                f"create table {parent}_b partition of {parent} for values in ('b')",
                f"insert into {parent} values (1, 'a'), (2, 'b')")
    owner = objects.table("id int primary key", "insert into {t} values (1), (2)")
    child = objects.table(f"id int, owner_id int references {owner} on delete cascade",
                          "insert into {t} values (1, 1), (2, 1), (3, 2)")
    audited = objects.table("id int")
    trigger_fn = objects.function("() returns trigger language plpgsql",
                                  f" begin update {t} set n = n + 1000 where id = 2; return new; end ")
    objects.run(f"create trigger bump after insert on {audited} for each row execute function {trigger_fn}()")
    bump = objects.function("() returns int language sql volatile",
                            f" update {t} set n = n + 1 where id = 1 returning n ")
    plain_view = f"{t}_pv"
    objects.make(f"create view {plain_view} as select id, n from {t}", f"drop view if exists {plain_view}")
    matview = f"{t}_mv"
    objects.make(f"create materialized view {matview} as select count(*) as rows from {t}",
                 f"drop materialized view if exists {matview}")
    procedure = f"qc_proc_{_uid()}"
    objects.make(f"create procedure {procedure}() language sql as $$ update {t} set n = n * 10 where id = 2 $$",
                 f"drop procedure if exists {procedure}()")
    proxy = start()

    def copy_in(conn: psycopg.Connection[Any]) -> None:
        with conn.cursor().copy(f"copy {t} (id, n) from stdin") as copy:
            copy.write_row((40, 400))

    def prepared_update(conn: psycopg.Connection[Any]) -> None:
        conn.execute(f"prepare qc_upd as update {t} set n = n - 1 where id = 1")
        conn.execute("execute qc_upd")

    Write = str | Callable[[psycopg.Connection[Any]], None]
    cases: list[tuple[Write, str]] = [  # (write, what it must change)
        (f"insert into {t} values (3, 30)", f"select * from {t} order by id"),
        (f"update {t} set n = n + 5 where id = 1", f"select count(*), sum(n) from {t}"),
        (f"delete from {t} where id = 3", f"select * from {view} order by id"),
        (f"update {parent}_a set id = 11", f"select * from {parent} order by id"),  # a partition: its parent
        (f"delete from {owner} where id = 1", f"select count(*) from {child}"),  # ON DELETE CASCADE
        (f"insert into {audited} values (1)", f"select n from {t} where id = 2"),  # a trigger writes t
        (f"select {bump}()", f"select n from {t} where id = 1"),  # a volatile function writes t
        (f"truncate {t}", f"select count(*) from {t}"),
        (f"insert into {t} select g, g from generate_series(1, 3) g", f"select * from {view} order by id"),
        (f"with u as (update {t} set n = n + 1 where id = 2 returning n) select * from u",
         f"select n from {t} where id = 2"),  # a data-modifying CTE
        (f"update {plain_view} set n = 100 where id = 3", f"select n from {t} where id = 3"),  # through a view
        (f"insert into {t} values (3, 0) on conflict (id) do update set n = excluded.n",
         f"select n from {t} where id = 3"),
        (f"merge into {t} using (values (1, 5)) v(id, n) on {t}.id = v.id when matched then update set n = v.n",
         f"select n from {t} where id = 1"),
        (copy_in, f"select count(*) from {t}"),  # COPY FROM STDIN
        (f"refresh materialized view {matview}", f"select * from {matview}"),
        (f"call {procedure}()", f"select n from {t} where id = 2"),
        (f"do $$ begin delete from {t} where id = 40; end $$", f"select count(*) from {t}"),
        (prepared_update, f"select n from {t} where id = 1"),  # SQL-level PREPARE / EXECUTE
    ]
    with proxy.connect() as writer, proxy.connect() as reader, direct(pg) as pgconn:
        for write, read in cases:
            old = pgconn.execute(read).fetchall()
            assert reader.execute(read).fetchall() == old
            before = proxy.stats()
            assert reader.execute(read).fetchall() == old
            assert proxy.delta(before).hits == 1, read
            if isinstance(write, str):
                writer.execute(write)
            else:
                write(writer)
            assert proxy.delta(before).invalidations >= 1, write
            # (a volatile function may have run DDL: the catalog is read again, and nothing is cached meanwhile;
            # a statement that may have changed session state is followed by hyperpool's read-back)
            proxy.wait_for_catalog()
            proxy.settle(writer)
            new = pgconn.execute(read).fetchall()
            assert new != old, write
            before = proxy.stats()
            assert reader.execute(read).fetchall() == new, write
            d1 = proxy.delta(before)
            assert (d1.misses, d1.hits, d1.stored) == (1, 0, 1), write
            assert writer.execute(read).fetchall() == new

        # DDL: the whole database's entries go, and the catalog is read again
        read = f"select * from {t} order by id"
        assert reader.execute(read).fetchall() == reader.execute(read).fetchall()
        entries = len(proxy.cache)
        reads = proxy.catalog_reads()
        before = proxy.stats()
        writer.execute(f"alter table {t} add column extra int default 7")
        assert proxy.delta(before).invalidations == entries
        now = pgconn.execute(read).fetchall()
        assert len(now) == 3 and all(len(row) == 3 and row[2] == 7 for row in now)
        assert reader.execute(read).fetchall() == now
        proxy.wait_for_catalog(after=reads)
        before = proxy.stats()
        assert reader.execute(read).fetchall() == reader.execute(read).fetchall() == now
        d1 = proxy.delta(before)
        assert (d1.misses, d1.hits, d1.stored) == (1, 1, 1)


def test_the_unnamed_statement_executed_again_by_bind_alone_invalidates(pg: EmbeddedPostgres, objects: Objects,
                                                                        start: Callable[..., Cached]) -> None:
    """libpq's PQexecPrepared(conn, "", ...) and other clients may execute the unnamed statement again with Bind,
    Execute, Sync and no Parse: each such execution writes too. (In transaction pooling that reaches the same
    server connection only inside a transaction or when the client is pinned, as here by a temporary table.)"""
    t = objects.table("id int primary key, n int", "insert into {t} values (1, 10)")
    proxy = start()
    read = f"select n from {t} where id = 1"
    def bind_execute_sync(portal: bytes = b"") -> bytes:
        return (message(b"B", portal + b"\0\0" + struct.pack("!hhh", 0, 0, 0))
                + message(b"E", portal + b"\0" + struct.pack("!i", 0)) + message(b"S"))

    parse = message(b"P", b"\0" + f"update {t} set n = n + 1 where id = 1".encode() + b"\0" + struct.pack("!h", 0))
    sock = raw_login(proxy.port)
    try:
        assert raw_exchange(sock, query_msg("create temp table pinned_here(i int)"))[-1] == (b"Z", b"I")
        with proxy.connect() as reader:
            for expected in (11, 12, 13):
                answer = raw_exchange(sock, (parse if expected == 11 else b"") + bind_execute_sync())
                assert [kind for kind, _ in answer] == ([b"1"] if expected == 11 else []) + [b"2", b"C", b"Z"]
                assert answer[-2][1] == b"UPDATE 1\0"
                assert reader.execute(read).fetchone() == (expected,)  # (a miss, then stored)
                assert reader.execute(read).fetchone() == (expected,)  # a hit
            # to a named portal (the Bind hyperpool looks at)
            assert [kind for kind, _ in raw_exchange(sock, bind_execute_sync(b"p1"))] == [b"2", b"C", b"Z"]
            assert reader.execute(read).fetchone() == (14,)
            # pipelined with a Parse of a named statement after it, then of the unnamed one (a read)
            later = (message(b"P", b"s1\0select 1\0" + struct.pack("!h", 0)) + message(b"S")
                     + message(b"P", b"\0select 2\0" + struct.pack("!h", 0)) + message(b"S"))
            answer = raw_exchange(sock, bind_execute_sync() + later, answers=3)
            assert [kind for kind, _ in answer] == [b"2", b"C", b"Z", b"1", b"Z", b"1", b"Z"]
            assert reader.execute(read).fetchone() == (15,)
            # the unnamed statement is now a read: executing it again invalidates nothing
            hits = proxy.cache.stats.hits
            assert [kind for kind, _ in raw_exchange(sock, bind_execute_sync())][-2:] == [b"C", b"Z"]
            assert reader.execute(read).fetchone() == (15,) and proxy.cache.stats.hits == hits + 1
    finally:
        sock.close()


def test_explicit_transactions_invalidate_at_commit_not_before_and_not_after_rollback(
        pg: EmbeddedPostgres, objects: Objects, start: Callable[..., Cached]) -> None:
    t = objects.table("id int primary key, n int", "insert into {t} values (1, 10)")
    proxy = start()
    sql = f"select n from {t} where id = 1"
    with proxy.connect() as writer, proxy.connect() as reader, proxy.connect(autocommit=False) as classic:
        assert reader.execute(sql).fetchone() == (10,)

        writer.execute("begin")
        writer.execute(f"update {t} set n = 11 where id = 1")
        before = proxy.stats()
        assert writer.execute(sql).fetchone() == (11,)  # its own uncommitted write, from PostgreSQL
        assert reader.execute(sql).fetchone() == (10,)  # the committed value, still a hit
        d1 = proxy.delta(before)
        assert (d1.hits, d1.invalidations, d1.not_cacheable) == (1, 0, {"transaction": 1})
        writer.execute("commit")
        assert proxy.delta(before).invalidations == 1
        for conn in (reader, writer, classic):
            assert conn.execute(sql).fetchone() == (11,)
        classic.rollback()

        # ROLLBACK: nothing happened, nothing is invalidated
        writer.execute("begin")
        writer.execute(f"update {t} set n = 12 where id = 1")
        writer.execute("rollback")
        before = proxy.stats()
        assert reader.execute(sql).fetchone() == writer.execute(sql).fetchone() == (11,)
        d1 = proxy.delta(before)
        assert (d1.hits, d1.invalidations) == (2, 0)

        # psycopg's own transactions (BEGIN ... COMMIT sent for it), and one that fails to commit
        with writer.transaction():
            writer.execute(f"update {t} set n = 13 where id = 1")
            assert reader.execute(sql).fetchone() == (11,)
        assert reader.execute(sql).fetchone() == (13,)
        classic.execute(f"update {t} set n = 14 where id = 1")  # psycopg's implicit BEGIN
        assert reader.execute(sql).fetchone() == (13,)
        classic.commit()
        assert reader.execute(sql).fetchone() == (14,)
        with pytest.raises(psycopg.errors.DivisionByZero), writer.transaction():
            writer.execute(f"update {t} set n = 15 where id = 1")
            writer.execute("select 1 / (n - n) from " + t)
        assert reader.execute(sql).fetchone() == writer.execute(sql).fetchone() == (14,)


def test_a_client_reads_its_own_committed_writes(pg: EmbeddedPostgres, objects: Objects,
                                                 start: Callable[..., Cached], aloop: Loop) -> None:
    t = objects.table("id int primary key, n int", "insert into {t} values (1, 0)")
    proxy = start()
    read_simple = f"select n from {t} where id = 1"
    read_extended = f"select n from {t} where id = %s"
    read_named = f"select n from {t} where id = $1"

    async def connect() -> asyncpg.Connection:
        return await asyncpg.connect(**proxy.asyncpg_args())

    apg = aloop(connect())
    before = proxy.stats()
    try:
        with proxy.connect() as conn, proxy.connect() as other:
            for i in range(1, 13):
                way = i % 3
                if way == 0:
                    conn.execute(f"update {t} set n = {i} where id = 1")
                elif way == 1:
                    conn.execute(f"update {t} set n = %s where id = %s", (i, 1))
                else:
                    aloop(apg.execute(f"update {t} set n = $1 where id = $2", i, 1))
                got = (conn.execute(read_simple).fetchone(), conn.execute(read_extended, (1,)).fetchone(),
                       aloop(apg.fetch(read_named, 1)), other.execute(read_simple).fetchone())
                assert got == ((i,), (i,), [(i,)], (i,)), i
                # and again (hits now)
                assert conn.execute(read_simple).fetchone() == conn.execute(read_extended, (1,)).fetchone() == (i,)
                assert aloop(apg.fetch(read_named, 1)) == [(i,)]
    finally:
        aloop(apg.close())
    d1 = proxy.delta(before)
    # each round: 3 misses (stored), 4 hits; asyncpg's first read rides on its Parse (not looked up), so its
    # second is the miss; every write after the first drops the 3 entries
    assert (d1.misses, d1.stored, d1.hits, d1.invalidations) == (12 * 3, 12 * 3, 12 * 4 - 1, 11 * 3)


def test_a_read_after_a_committed_write_does_not_join_an_older_fill(pg: EmbeddedPostgres, objects: Objects,
                                                                     start: Callable[..., Cached]) -> None:
    t = objects.table("id int primary key, n int", "insert into {t} values (1, 10)")
    gate = Gate(objects)
    proxy = start(pool_size=3)
    sql = f"select n, {gate.fn}(id) as one from {t} where id = 1"
    early: list[Any] = []
    mine: list[Any] = []
    with proxy.connect() as reader, proxy.connect() as writer:
        before = proxy.stats()
        with gate.closed(), threads(1, lambda _: early.append(reader.execute(sql).fetchall()), gate.open):
            # the reader's query runs in PostgreSQL (its snapshot taken), held at the gate
            wait_until(lambda: gate.waiting(sql) == 1, "the reader's query at the gate")
            writer.execute(f"update {t} set n = 11 where id = 1")  # committed (autocommit)
            with threads(1, lambda _: mine.append(writer.execute(sql).fetchall()), gate.open):
                # the writer's read misses and finds the reader's fill of the same key running
                proxy.wait_for(lambda s: s.misses - before.misses == 2, "the writer's lookup")
                gate.open()
    assert early == [[(10, 1)]]  # computed before the write: right for the reader
    assert mine == [[(11, 1)]]  # the writer's own read after its commit must see its write
    assert gate.executions() == 2  # (so the writer's read ran on its own)
    d1 = proxy.delta(before)
    assert (d1.discarded_fills, d1.stored) == (1, 0)  # and the raced result was not stored


def _bumped_table(pg: EmbeddedPostgres, objects: Objects) -> tuple[str, int]:
    """A table with n = 10 in row 1, and the oid of a volatile function that increments it (for FunctionCall)."""
    t = objects.table("id int primary key, n int", "insert into {t} values (1, 10)")
    bump = objects.function("() returns int language sql volatile", f" update {t} set n = n + 1 returning n ")
    with direct(pg) as pgconn:
        oid = pgconn.execute(f"select '{bump}'::regproc::oid::int").fetchone()[0]  # type: ignore[index]
    return t, oid


def test_function_call_writes_invalidate(pg: EmbeddedPostgres, objects: Objects,
                                         start: Callable[..., Cached]) -> None:
    """The fast-path FunctionCall message may write anything: the whole cache goes when it ends."""
    t, oid = _bumped_table(pg, objects)
    proxy = start()
    sql = f"select n from {t} where id = 1"
    call = message(b"F", struct.pack("!IhhH", oid, 0, 0, 0))  # no arguments, text result
    with proxy.connect() as reader:
        sock = raw_login(proxy.port)
        try:
            for expected in (11, 12):
                assert reader.execute(sql).fetchone() == reader.execute(sql).fetchone() == (expected - 1,)
                answer = raw_exchange(sock, call)
                assert [k for k, _ in answer] == [b"V", b"Z"] and answer[0][1].endswith(str(expected).encode())
                assert reader.execute(sql).fetchone() == (expected,)
        finally:
            sock.close()


def test_function_call_after_a_rollback_invalidates(pg: EmbeddedPostgres, objects: Objects,
                                                    start: Callable[..., Cached]) -> None:
    t, oid = _bumped_table(pg, objects)
    proxy = start()
    sql = f"select n from {t} where id = 1"
    with proxy.connect() as reader:
        assert reader.execute(sql).fetchone() == (10,)
        sock = raw_login(proxy.port)
        try:
            assert [k for k, _ in raw_exchange(sock, query_msg("begin"))] == [b"C", b"Z"]
            assert [k for k, _ in raw_exchange(sock, query_msg("rollback"))] == [b"C", b"Z"]
            answer = raw_exchange(sock, message(b"F", struct.pack("!IhhH", oid, 0, 0, 0)))
            assert [k for k, _ in answer] == [b"V", b"Z"] and answer[0][1].endswith(b"11")
        finally:
            sock.close()
        assert reader.execute(sql).fetchone() == (11,)


def test_a_write_while_the_catalog_is_read_again_invalidates_after_a_rollback(
        pg: EmbeddedPostgres, objects: Objects, start: Callable[..., Cached]) -> None:
    """An ORM's session: every transaction ends in COMMIT or ROLLBACK (SQLAlchemy's pool rolls back on return).
    Another client's DDL makes hyperpool read the catalog again; a write sent meanwhile must still invalidate
    at its commit."""
    t = objects.table("id int primary key, n int", "insert into {t} values (1, 10)")
    made = f"qc_ddl_{_uid()}"
    objects.drop_later(f"drop table if exists {made}")
    proxy = start(pool_size=2, min_pool_size=0)
    sql = f"select n from {t} where id = 1"
    with proxy.connect() as reader, proxy.connect(autocommit=False) as orm:
        assert reader.execute(sql).fetchone() == (10,)
        orm.execute("select 1")
        orm.rollback()
        orm.execute("select 2")  # (BEGIN) its next transaction holds one of the two server connections
        ddl, waiter = raw_login(proxy.port), raw_login(proxy.port)
        try:
            raw_exchange(ddl, query_msg("begin"))
            raw_exchange(ddl, query_msg(f"create table {made} (id int)"))  # ... and this one the other
            waiter.sendall(query_msg("begin"))  # waits for a server connection
            wait_until(lambda: proxy.runner.run(lambda: len(proxy.database.pool.waiters)) == 1, "a waiting client")
            raw_exchange(ddl, query_msg("commit"))  # the catalog is read again: behind the waiting client
            assert [k for k, _ in read_messages(waiter)] == [b"C", b"Z"]
            assert proxy.runner.run(lambda: proxy.database.classifier) is None
            orm.execute(f"update {t} set n = 11 where id = 1")
            raw_exchange(waiter, query_msg("commit"))
            proxy.wait_for_catalog(after=1)
        finally:
            ddl.close()
            waiter.close()
        assert reader.execute(sql).fetchone() == (10,)  # not committed yet
        orm.commit()
        assert reader.execute(sql).fetchone() == (11,)


@pytest.fixture(scope="module")
def pg_2pc() -> Iterator[EmbeddedPostgres]:
    """A PostgreSQL of its own that allows prepared transactions (the shared one does not)."""
    server = start_test_pg(max_prepared_transactions="4")
    try:
        yield server
    finally:
        server.cleanup()


@pytest.mark.parametrize("rolled_back_before", [False, True])
def test_commit_prepared_invalidates(pg_2pc: EmbeddedPostgres, rolled_back_before: bool) -> None:
    gid = f"qc_{_uid()}"
    with direct(pg_2pc) as pgconn:
        t = f"qc_{_uid()}"
        pgconn.execute(f"create table {t} (id int primary key, n int)")
        pgconn.execute(f"insert into {t} values (1, 10)")
    runner = start_proxy(base_config(pg_2pc.port, **overrides()))
    try:
        proxy = ready(runner)
        sql = f"select n from {t} where id = 1"
        with proxy.connect() as reader, proxy.connect() as coordinator:
            assert reader.execute(sql).fetchone() == (10,)
            coordinator.execute("begin")
            coordinator.execute(f"update {t} set n = 11 where id = 1")
            coordinator.execute(f"prepare transaction '{gid}'")
            assert reader.execute(sql).fetchone() == reader.execute(sql).fetchone() == (10,)  # not committed yet
            if rolled_back_before:  # any transaction of this client that ended in ROLLBACK
                coordinator.execute("begin")
                coordinator.execute("select 1")
                coordinator.execute("rollback")
            before = proxy.stats()
            coordinator.execute(f"commit prepared '{gid}'")
            assert reader.execute(sql).fetchone() == (11,)
            assert proxy.delta(before).invalidations >= 1
    finally:
        with direct(pg_2pc) as pgconn:
            if pgconn.execute("select 1 from pg_prepared_xacts where gid = %s", (gid,)).fetchone():
                pgconn.execute(f"rollback prepared '{gid}'")
        runner.stop()


# ---------------------------------------------------------------------------------------------------------
# 5. Session settings are part of the key


TEXT_TYPES = ("timestamptz", "date", "interval", "float8", "bytea")


def test_settings_change_the_key(pg: EmbeddedPostgres, objects: Objects, start: Callable[..., Cached]) -> None:
    t = objects.table("id int, ts timestamptz, d date, iv interval, f float8, b bytea, word text",
                      "insert into {t} values (1, '2024-01-15 12:34:56.789+00', '2024-02-03', '1 day 02:03:04.5',"
                      " 0.1::float8 + 0.2::float8, '\\x00ff41', 'caf\u00e9')")
    proxy = start(pool_size=1, min_pool_size=0)  # every client on the one server connection, one after another
    sql = f"select ts, d, iv, f, b, word from {t}"
    variants: list[dict[str, str]] = [
        {},
        {"options": "-c TimeZone=America/New_York -c DateStyle=SQL,DMY"},
        {"options": "-c TimeZone=Asia/Kolkata -c DateStyle=German -c IntervalStyle=postgres_verbose"},
        {"options": "-c extra_float_digits=0 -c bytea_output=escape -c IntervalStyle=iso_8601"},
        {"options": "-c TimeZone=Australia/Adelaide -c DateStyle=Postgres,MDY -c IntervalStyle=sql_standard"},
        {"client_encoding": "LATIN1"},  # the same text after decoding, but other bytes on the wire
    ]
    wanted = []
    for params in variants:
        with as_text(direct(pg, **params), *TEXT_TYPES) as d:
            wanted.append(d.execute(sql).fetchall())
    assert len({repr(w) for w in wanted[:-1]}) == len(variants) - 1  # each setting really shows
    assert wanted[-1] == wanted[0] and wanted[0][0][-1] == "caf\u00e9"
    before = proxy.stats()
    conns = [as_text(proxy.connect(**params), *TEXT_TYPES) for params in variants]
    try:
        for _ in range(3):
            for conn, want in zip(conns, wanted, strict=True):
                assert conn.execute(sql).fetchall() == want
        # SET through hyperpool: the client's settings (and key) follow it
        conns[0].execute("set timezone to 'Pacific/Auckland'")
        conns[0].execute("set datestyle to 'Postgres, YMD'")
        proxy.settle(conns[0])
        with as_text(direct(pg), *TEXT_TYPES) as d:
            d.execute("set timezone to 'Pacific/Auckland'")
            d.execute("set datestyle to 'Postgres, YMD'")
            auckland = d.execute(sql).fetchall()
        assert auckland not in wanted
        for _ in range(2):
            assert conns[0].execute(sql).fetchall() == auckland
            assert conns[1].execute(sql).fetchall() == wanted[1]
        conns[0].execute("reset all")
        proxy.settle(conns[0])
        assert conns[0].execute(sql).fetchall() == wanted[0]
    finally:
        for conn in conns:
            conn.close()
    d1 = proxy.delta(before)
    assert d1.stored == d1.misses == len(variants) + 1
    assert d1.hits == 2 * len(variants) + 3 + 1


def test_search_path_changes_the_key(pg: EmbeddedPostgres, objects: Objects, start: Callable[..., Cached]) -> None:
    first, second = objects.schema(), objects.schema()
    name = f"qc_same_{_uid()}"
    objects.run(f"create table {first}.{name} (v text)", f"insert into {first}.{name} values ('first')",
                f"create table {second}.{name} (v text)", f"insert into {second}.{name} values ('second')")
    proxy = start(pool_size=1, min_pool_size=0)
    sql = f"select v from {name}"
    before = proxy.stats()
    with proxy.connect(options=f"-c search_path={first}") as a, \
            proxy.connect(options=f"-c search_path={second},public") as b, proxy.connect() as c:
        c.execute(f"set search_path = {second}")
        proxy.settle(c)
        for _ in range(3):
            assert a.execute(sql).fetchall() == [("first",)]
            assert b.execute(sql).fetchall() == [("second",)]
            assert c.execute(sql).fetchall() == [("second",)]
        c.execute(f"set search_path = {first}")
        proxy.settle(c)
        assert c.execute(sql).fetchall() == [("first",)]
        # a name that resolves to no table: PostgreSQL's error, every time
        for _ in range(2):
            with pytest.raises(psycopg.errors.UndefinedTable):
                c.execute(f"select v from public.{name}")
        d1 = proxy.delta(before)
        assert (d1.stored, d1.hits) == (3, 7)  # a, b, c with second; c with first is a's entry

        # a write resolved through the writer's search_path invalidates that schema's table only
        b.execute(f"update {name} set v = 'second, updated'")
        before = proxy.stats()
        assert a.execute(sql).fetchall() == [("first",)]
        assert b.execute(sql).fetchall() == [("second, updated",)]
        d1 = proxy.delta(before)
        assert (d1.hits, d1.misses) == (1, 1)


def test_transform_null_equals_is_not_served_from_another_settings_entry(
        pg: EmbeddedPostgres, objects: Objects, start: Callable[..., Cached]) -> None:
    t = objects.table("id int, note text", "insert into {t} values (1, null), (2, 'x')")
    proxy = start()
    sql = f"select count(*) from {t} where note = null"
    with direct(pg, options="-c transform_null_equals=on") as d:
        assert d.execute(sql).fetchone() == (1,)
    with proxy.connect() as plain, proxy.connect(options="-c transform_null_equals=on") as transformed:
        assert plain.execute(sql).fetchone() == (0,)
        assert transformed.execute(sql).fetchone() == (1,)


# ---------------------------------------------------------------------------------------------------------
# 6. Size bounds; top-level and per-database settings


def test_too_big_entries_and_evictions(pg: EmbeddedPostgres, objects: Objects, start: Callable[..., Cached]) -> None:
    t = objects.table("id int primary key, name text",
                      "insert into {t} select g, repeat('x', 40) || g from generate_series(1, 100) g")
    proxy = start(top={"max_bytes": 1500, "max_entry_bytes": 1000})
    assert proxy.cache.settings == CacheSettings(max_bytes=1500, max_entry_bytes=1000)
    big = f"select * from {t} order by id"
    with proxy.connect() as conn, direct(pg) as d:
        want = d.execute(big).fetchall()
        for _ in range(2):
            before = proxy.stats()
            assert conn.execute(big).fetchall() == want  # returned whole, not stored
            d1 = proxy.delta(before)
            assert (d1.misses, d1.too_big, d1.stored) == (1, 1, 0)
        assert len(proxy.cache) == 0

        before = proxy.stats()
        small = [f"select name from {t} where id = {i}" for i in range(1, 31)]
        for i, sql in enumerate(small, 1):
            assert conn.execute(sql).fetchall() == [("x" * 40 + str(i),)]
        d1 = proxy.delta(before)
        assert d1.stored == 30 and d1.evictions == 30 - len(proxy.cache) and d1.evictions > 0
        assert proxy.runner.run(lambda: proxy.cache.bytes) <= 1500
        before = proxy.stats()
        assert conn.execute(small[-1]).fetchall() == [("x" * 40 + "30",)]
        assert conn.execute(small[0]).fetchall() == [("x" * 40 + "1",)]  # evicted: the least recently used
        d1 = proxy.delta(before)
        assert (d1.hits, d1.misses) == (1, 1)
    row = proxy.show_cache()
    assert (row["max_bytes"], row["max_entry_bytes"], row["too_big"]) == (1500, 1000, 2)
    assert row["evictions"] == proxy.stats().evictions > 0


def test_a_large_result_is_captured_while_the_client_reads_slowly(pg: EmbeddedPostgres,
                                                                  start: Callable[..., Cached]) -> None:
    """About 600 KB (under the default max_entry_bytes of 1 MiB) to a client with a tiny receive buffer: the
    response is captured across many reads and pauses, and a hit replays the same bytes."""
    proxy = start()
    sql = "select g, repeat(md5(g::text), 3) as filler from generate_series(1, 5000) g"
    with direct(pg) as d:
        want = d.execute(sql).fetchall()
    before = proxy.stats()
    slow = raw_login(proxy.port, rcvbuf=4096)
    try:
        slow.sendall(query_msg(sql))
        time.sleep(0.2)  # (let hyperpool fill the small buffer and pause the server; not asserted)
        first = read_messages(slow, limit=100000)
    finally:
        slow.close()
    assert [k for k, _ in first[:2]] == [b"T", b"D"] and len(first) == 5003 and first[-2][1] == b"SELECT 5000\x00"
    d1 = proxy.delta(before)
    assert (d1.misses, d1.stored, d1.too_big) == (1, 1, 0)
    assert proxy.runner.run(lambda: proxy.cache.bytes) > 500_000
    again = raw_login(proxy.port)
    try:
        assert raw_exchange(again, query_msg(sql)) == first
    finally:
        again.close()
    with proxy.connect() as conn:
        assert conn.execute(sql).fetchall() == want
    assert proxy.delta(before).hits == 2


def test_cache_disabled_for_a_database(pg: EmbeddedPostgres, objects: Objects, start: Callable[..., Cached]) -> None:
    t = objects.table("id int primary key, n int", "insert into {t} values (1, 10)")
    proxy = start(top={"max_age": 300}, cache={"enabled": False})
    assert proxy.database.cache is None
    sql = f"select n from {t} where id = 1"
    with proxy.connect() as conn, direct(pg) as d:
        assert conn.execute(sql).fetchone() == (10,)
        d.execute(f"update {t} set n = 11")  # behind hyperpool's back: shows at once without a cache
        assert conn.execute(sql).fetchone() == (11,)
    row = proxy.show_cache()
    assert (row["enabled"], row["entries"], row["hits"], row["misses"]) == ("no", 0, 0, 0)

    # a database's own section over the top-level one
    other = start(top={"enabled": False, "max_age": 7, "max_entry_bytes": 4096},
                  cache={"enabled": True, "stale_while_revalidate": 2})
    assert other.cache.settings == CacheSettings(max_age=7, stale_while_revalidate=2, max_entry_bytes=4096)
    with other.connect() as conn:
        assert conn.execute(sql).fetchone() == conn.execute(sql).fetchone() == (11,)
    assert other.show_cache()["hits"] == 1


def test_a_write_through_one_entry_invalidates_another_for_the_same_database(
        pg: EmbeddedPostgres, objects: Objects, make_proxy: Callable[..., ProxyRunner]) -> None:
    t = objects.table("id int primary key, n int", "insert into {t} values (1, 10)")
    cfg = overrides()
    db = base_config(pg.port, **cfg)["databases"][APPDB]
    other = {**db, "pool_size": 2}  # a second name for the same database (e.g. a smaller pool for a job)
    elsewhere = {**db, "dbname": "postgres"}  # another database on the same server: not a peer
    runner = make_proxy(**cfg, databases={APPDB: db, "appdb_b": other, "appdb_c": elsewhere})
    for name in (APPDB, "appdb_b"):
        psycopg.connect(runner.dsn(dbname=name)).close()  # the catalog is read once a client has logged in
        wait_until(lambda name=name: runner.state.databases[name].catalog is not None, f"{name}'s catalog")
    sql = f"select n from {t} where id = 1"
    b_cache = runner.state.databases["appdb_b"].cache
    assert b_cache is not None
    with psycopg.connect(runner.dsn(dbname="appdb_b"), autocommit=True) as reader, \
            psycopg.connect(runner.dsn(), autocommit=True) as writer:
        assert reader.execute(sql).fetchone() == (10,)
        hits = b_cache.stats.hits
        assert reader.execute(sql).fetchone() == (10,)
        assert b_cache.stats.hits == hits + 1  # served from appdb_b's cache
        writer.execute(f"update {t} set n = 20 where id = 1")
        assert reader.execute(sql).fetchone() == (20,)  # not the stale 10 from appdb_b's cache
        assert b_cache.stats.hits == hits + 1
        with writer.transaction(force_rollback=True):
            writer.execute(f"update {t} set n = 30 where id = 1")
        assert reader.execute(sql).fetchone() == (20,)
        assert b_cache.stats.hits == hits + 2  # a rolled-back write invalidates nothing
        loads = runner.state.databases["appdb_b"].catalog_loaded_at
        writer.execute(f"alter table {t} add column extra int")  # DDL: every peer reads its catalog again
        wait_until(lambda: runner.state.databases["appdb_b"].catalog_loaded_at != loads, "appdb_b's catalog again")
        assert reader.execute(sql).fetchone() == (20,)
    assert runner.state.same_origin(runner.state.databases[APPDB])[1:] == [runner.state.databases["appdb_b"]]


def test_writes_through_an_entry_without_a_cache_invalidate_its_peers(
        pg: EmbeddedPostgres, objects: Objects, make_proxy: Callable[..., ProxyRunner],
        caplog: pytest.LogCaptureFixture) -> None:
    t = objects.table("id int primary key, n int", "insert into {t} values (1, 10)")
    cfg = overrides()
    db = base_config(pg.port, **cfg)["databases"][APPDB]
    plain = {**db, "cache": {"enabled": False}}  # transaction pooling, no cache of its own: its writes are noted
    job = {**db, "pool_mode": "session"}  # session pooling looks at no statement: warned about, documented
    with caplog.at_level("WARNING", logger="hyperpool.server"):
        runner = make_proxy(**cfg, databases={APPDB: db, "plain": plain, "job": job})
    assert any("database job (pool_mode session)" in r.getMessage() and "appdb" in r.getMessage()
               for r in caplog.records)
    for name in (APPDB, "plain"):  # (a cache-less entry with a cached peer reads its catalog too)
        psycopg.connect(runner.dsn(dbname=name)).close()
        wait_until(lambda name=name: runner.state.databases[name].classifier is not None, f"{name}'s catalog")
    sql = f"select n from {t} where id = 1"
    cache = runner.state.databases[APPDB].cache
    assert cache is not None and runner.state.databases["plain"].cache is None
    with psycopg.connect(runner.dsn(), autocommit=True) as reader, \
            psycopg.connect(runner.dsn(dbname="plain"), autocommit=True) as writer:
        assert reader.execute(sql).fetchone() == reader.execute(sql).fetchone() == (10,)
        hits = cache.stats.hits
        assert writer.execute(sql).fetchone() == (10,)  # a read through the peer invalidates nothing
        assert reader.execute(sql).fetchone() == (10,) and cache.stats.hits == hits + 1
        writer.execute(f"update {t} set n = 20 where id = 1")
        assert reader.execute(sql).fetchone() == (20,)
        # psycopg's extended protocol, a named statement after its fifth execution
        for n in range(21, 28):
            writer.execute(f"update {t} set n = %s where id = 1", (n,), prepare=n > 24)
            assert reader.execute(sql).fetchone() == (n,)


def test_entries_with_overlapping_addresses_are_peers() -> None:
    async def peers() -> dict[str, list[str]]:
        cfg = parse_config({"users": {APP_USER: APP_PASSWORD}, "databases": {
            "a": {"host": "10.0.0.1", "dbname": "app", "user": "u"},
            "b": {"host": "10.0.0.1", "dbname": "app", "user": "v", "pool_size": 3},
            "c": {"host": "10.0.0.1", "dbname": "app", "user": "u",  # pools locally or through another instance
                  "locations": {"local": {}, "far": {"host": "10.9.0.1", "user": "e", "dbname": "app"}}},
            "d": {"host": "10.0.0.1", "dbname": "other", "user": "u"},
            "e": {"host": "10.9.0.1", "dbname": "app", "user": "u", "port": 6432}}}, {})
        state = ServerState(cfg)
        return {name: sorted(p.config.name for p in state.same_origin(db)[1:]) for name, db in state.databases.items()}

    assert asyncio.run(peers()) == {"a": ["b", "c"], "b": ["a", "c"], "c": ["a", "b", "e"], "d": [], "e": ["c"]}


# ---------------------------------------------------------------------------------------------------------
# 7. Not cacheable


def test_not_cacheable_statements_go_to_the_database(pg: EmbeddedPostgres, objects: Objects,
                                                     start: Callable[..., Cached]) -> None:
    t = objects.table("id int primary key, n int", "insert into {t} values (1, 10), (2, 20)")
    proxy = start()
    read = f"select n from {t} where id = 1"
    cases = [
        ("select random()", "volatile"),
        ("select now()", "stable-function"),
        ("select current_timestamp", "sql-value-function"),
        (f"select n from {t} where id = 1; select 2", "multiple-statements"),
        (f"/* hyperpool: nocache */ {read}", "nocache-hint"),
        (f"update {t} set n = n where id = 2", "write"),
        (f"select n from {t} where id = 1 for update", "locking"),
        ("select relname from pg_class limit 1", "system-catalog"),
        ("select 'now'::timestamptz > '2000-01-01'", "time-literal"),
    ]
    with proxy.connect() as conn, direct(pg) as d:
        assert conn.execute(read).fetchone() == (10,)
        for sql, reason in cases:
            before = proxy.stats()
            for _ in range(2):
                conn.execute(sql)
            d1 = proxy.delta(before)
            assert (d1.hits, d1.misses, d1.stored, d1.not_cacheable) == (0, 0, 0, {reason: 2}), sql

        first = conn.execute("select random()").fetchone()
        assert conn.execute("select random()").fetchone() != first
        # the nocache comment reads the database while the plain text is served from the cache
        assert conn.execute(read).fetchone() == (10,)  # (cached again: the UPDATE above invalidated it)
        d.execute(f"update {t} set n = 11 where id = 1")
        assert conn.execute(read).fetchone() == (10,)
        assert conn.execute(f"/* hyperpool: nocache */ {read}").fetchone() == (11,)
        # inside a transaction block
        before = proxy.stats()
        with conn.transaction():
            assert conn.execute(read).fetchone() == (11,)
            assert conn.execute(f"select n from {t} where id = %s", (1,)).fetchone() == (11,)
        # (psycopg's BEGIN is not a SELECT; the reads and the COMMIT come while the server is attached)
        assert proxy.delta(before).not_cacheable == {"not-select": 1, "transaction": 3}
    reasons = dict(pair.split("=") for pair in proxy.show_cache()["not_cacheable"].split())
    for _, reason in cases:
        assert int(reasons[reason]) >= 2
    assert int(reasons["transaction"]) >= 2


def test_a_temporary_table_pins_its_client_to_the_database(pg: EmbeddedPostgres, objects: Objects,
                                                           start: Callable[..., Cached]) -> None:
    """A client with a temporary table named like a permanent one reads its own table, never the cached
    result of the permanent one (same text, same settings)."""
    t = objects.table("id int primary key, n int", "insert into {t} values (1, 10)")
    proxy = start()
    sql = f"select n from {t} where id = 1"
    with proxy.connect() as other, proxy.connect() as shadow:
        assert other.execute(sql).fetchone() == other.execute(sql).fetchone() == (10,)
        shadow.execute(f"create temp table {t} (id int, n int)")
        shadow.execute(f"insert into {t} values (1, 99)")
        proxy.wait_for_catalog()
        assert other.execute(sql).fetchone() == (10,)
        before = proxy.stats()
        for _ in range(3):
            assert shadow.execute(sql).fetchone() == (99,)  # its temp table, never the permanent one's entry
            assert shadow.execute(f"select n from {t} where id = %s", (1,)).fetchone() == (99,)
        assert other.execute(sql).fetchone() == (10,)
        d1 = proxy.delta(before)
        assert d1.not_cacheable == {"pinned": 6} and (d1.hits, d1.misses) == (1, 0)
        # the temp table gone, the client is free (and served from the cache) again
        shadow.execute(f"drop table pg_temp.{t}")
        proxy.settle(shadow)
        proxy.wait_for_catalog()
        assert shadow.execute(sql).fetchone() == (10,)
        before = proxy.stats()
        assert shadow.execute(sql).fetchone() == (10,)
        assert proxy.delta(before).hits == 1


# ---------------------------------------------------------------------------------------------------------
# 8. Errors (and notices) are returned, never stored


def test_errors_are_never_stored(pg: EmbeddedPostgres, objects: Objects, start: Callable[..., Cached]) -> None:
    t = objects.table("id int primary key, n int", "insert into {t} values (1, 30), (2, 20), (3, 10)")
    noisy = objects.function("(x int) returns int language plpgsql immutable",
                             " begin raise notice 'noisy %', x; return x; end ")
    proxy = start()
    cases = [
        (f"select * from {t} where id = 'x'", "22P02"),
        ("select 1 / 0", "22012"),
        (f"select 100 / (n - 20) from {t} order by id", "22012"),  # the error after a DataRow
    ]
    with proxy.connect() as conn:
        before = proxy.stats()
        for sql, code in cases:
            for _ in range(3):
                with pytest.raises(psycopg.Error) as info:
                    conn.execute(sql)
                assert info.value.sqlstate == code, sql
                assert conn.execute(f"select count(*) from {t}").fetchone() == (3,)
            for _ in range(2):  # extended protocol
                with pytest.raises(psycopg.Error) as info:
                    conn.execute(f"select * from {t} where id = %s::int", ("x",))
                assert info.value.sqlstate == "22P02"
        d1 = proxy.delta(before)
        assert d1.stored == 1 and d1.misses == 3 * 3 + 3 * 2 + 1  # only the count(*) was stored
        assert len(proxy.cache) == 1

        # the raw protocol: the DataRow before the error, each time
        sock = raw_login(proxy.port)
        try:
            for _ in range(2):
                answer = raw_exchange(sock, query_msg(cases[2][0]))
                assert [k for k, _ in answer] == [b"T", b"D", b"E", b"Z"] and error_code(answer[2][1]) == "22012"
        finally:
            sock.close()

        notices: list[str] = []
        conn.add_notice_handler(lambda diag: notices.append(diag.message_primary or ""))
        before = proxy.stats()
        for _ in range(3):
            assert conn.execute(f"select {noisy}(id) from {t} where id = 2").fetchone() == (2,)
        assert notices == ["noisy 2"] * 3  # a response with a notice is not stored
        assert proxy.delta(before).stored == 0
    assert len(proxy.cache) == 1


# ---------------------------------------------------------------------------------------------------------
# 9. Pipelines


def test_pipelines_get_their_own_answers_in_order(pg: EmbeddedPostgres, objects: Objects,
                                                  start: Callable[..., Cached]) -> None:
    t = objects.table("id int primary key, name text",
                      "insert into {t} select g, 'n' || g from generate_series(1, 10) g")
    proxy = start()
    by_id = f"select name from {t} where id = %s"
    count = f"select count(*) from {t}"
    with proxy.connect() as conn:
        assert conn.execute(by_id, (1,)).fetchone() == ("n1",)  # some of them cached already
        assert conn.execute(count).fetchone() == (10,)
        for _ in range(3):
            with conn.pipeline() as pipe:
                curs = [conn.execute(by_id, (i,)) for i in range(1, 6)]
                counted = conn.execute(count)
                pipe.sync()
                more = [conn.execute(by_id, (i,)) for i in (9, 1, 8)]
                with conn.cursor(binary=True) as binary:
                    binary.execute(by_id, (2,))
                    assert binary.fetchall() == [("n2",)]
            assert [c.fetchone() for c in curs] == [(f"n{i}",) for i in range(1, 6)]
            assert counted.fetchone() == (10,)
            assert [c.fetchone() for c in more] == [("n9",), ("n1",), ("n8",)]
        with conn.pipeline():
            conn.cursor().executemany(f"insert into {t} values (%s, %s)", [(11, "n11"), (12, "n12")])
        assert conn.execute(count).fetchone() == (12,)
        assert conn.execute(by_id, (12,)).fetchone() == ("n12",)

    def names(answer: list[tuple[bytes, bytes]]) -> list[str]:
        """The one text column of each DataRow."""
        return [body[6:].decode() for kind, body in answer if kind == b"D"]

    # raw: several queries in one write, and a hit right behind a miss that is still running
    hit_sql, miss_sql = f"select name from {t} where id = 1", f"select name from {t} where id = 7"
    sock = raw_login(proxy.port)
    try:
        raw_exchange(sock, query_msg(hit_sql))
        answer = raw_exchange(sock, query_msg(hit_sql) + query_msg(miss_sql) + query_msg(hit_sql), answers=3)
        assert names(answer) == ["n1", "n7", "n1"]
        for i in (3, 4, 5):  # a miss (its response being captured), and a hit sent right behind it
            sock.sendall(query_msg(f"select name from {t} where id = {i}"))
            sock.sendall(query_msg(hit_sql))
            assert names(read_messages(sock, count=2)) == [f"n{i}", "n1"]
    finally:
        sock.close()
