"""Regional topology end to end (issue #6): an edge hyperpool picks among other hyperpool instances
("locations") by measured latency, follows changes and failures, and chains pooling through them.

Everything is real and in this process: the test PostgreSQL, hyperpool instances (ProxyRunner threads) and
latency relays (ThreadedRelay threads). Each pool instance reaches PostgreSQL through a relay whose one-way
delay sets its "distance" to the database; the edge reaches each pool instance through a relay of its own
(no delay), which a test kills to take the location down. All of it shares one interpreter and its GIL, so
delays are far apart (1, 8, 20 ms one way) and nothing asserts a duration: waits are bounded polls.

Pool instances measure their origin only when an edge asks, at most once per their own ``probe_interval``
(0.2 s here, so the figure they report follows a change quickly).
"""

from __future__ import annotations

import asyncio
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import suppress
from dataclasses import dataclass, field
from typing import Any

import asyncpg
import psycopg
import pytest

from hyperpool.config import parse_config
from hyperpool.embedded import EmbeddedPostgres
from hyperpool.errors import ConfigError
from hyperpool.placement import LOCAL
from tests.latency_relay import ThreadedRelay
from tests.support import (
    APP_PASSWORD,
    APP_USER,
    APPDB,
    OWNER,
    OWNER_PASSWORD,
    ProxyRunner,
    base_config,
    message,
    raw_login,
    read_messages,
    start_proxy,
)
from tests.test_metrics import scrape, value

MS = 0.001
# one-way delays between each pool instance and PostgreSQL, listed farthest first: the edge's first listed
# location is where its traffic goes before the first probe round, so the choice is not the default one
DISTANCES = {"far": 20 * MS, "mid": 8 * MS, "near": 1 * MS}
EDGE_PLACEMENT = {"probe_interval": 0.2, "samples": 3, "switch_rounds": 2, "recover_rounds": 2}
POOL_PLACEMENT = {"probe_interval": 0.2, "samples": 3}
NO_CACHE = {"enabled": False}
WAIT = 15.0  # seconds: the bound of every wait for placement to do something


def _uid() -> str:
    return uuid.uuid4().hex[:10]


def wait_until(condition: Callable[[], Any], what: str, timeout: float = WAIT, step: float = 0.05) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        result = condition()
        if result:
            return result
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(step)


def show(proxy: ProxyRunner, command: str) -> list[dict[str, Any]]:
    """A SHOW command on ``proxy``'s admin console, as dicts by column name."""
    with psycopg.connect(proxy.dsn(dbname="hyperpool"), autocommit=True, prepare_threshold=None) as adm:
        cur = psycopg.ClientCursor(adm)
        cur.execute(command)
        assert cur.description is not None
        names = [d.name for d in cur.description]
        return [dict(zip(names, row, strict=True)) for row in cur.fetchall()]


def direct(pg: EmbeddedPostgres) -> psycopg.Connection[Any]:
    return psycopg.connect(f"host=127.0.0.1 port={pg.port} user={OWNER} password={OWNER_PASSWORD} dbname={APPDB}",
                           autocommit=True)


# ---------------------------------------------------------------------------------------------------------
# The topology: pool instances near PostgreSQL (at a distance set by their relay), an edge in front of them


@dataclass
class Site:
    """A pool instance: hyperpool pooling to PostgreSQL through ``db_link``, reached by the edge through
    ``edge_link``."""

    name: str
    db_link: ThreadedRelay
    proxy: ProxyRunner
    edge_link: ThreadedRelay

    def queries(self) -> int:
        """Requests clients (the edge) sent through this instance to PostgreSQL."""
        database = self.proxy.state.databases[APPDB]
        return int(self.proxy.run(lambda: database.stats.queries))


def pool_config(pg_port: int, cache: bool = False, top: dict[str, Any] | None = None, **db: Any) -> dict[str, Any]:
    """A pool instance (no locations): appdb on ``pg_port``, an admin console, its cache off unless asked."""
    return base_config(pg_port, admin={"users": [APP_USER]}, log_level="info", **(top or {}),
                       db={"placement": POOL_PLACEMENT, "pool_size": 4, "min_pool_size": 1,
                           **({} if cache else {"cache": NO_CACHE}), **db})


def edge_config(sites: list[Site], placement: dict[str, Any] | None = None, **db: Any) -> dict[str, Any]:
    """An edge: appdb only through the sites (no origin of its own: no host, no user), an admin console
    and a metrics endpoint."""
    locations = {s.name: {"host": "127.0.0.1", "port": s.edge_link.port, "user": APP_USER,
                          "password": APP_PASSWORD, "sslmode": "disable"} for s in sites}
    return {
        "listen": {"host": "127.0.0.1", "port": 0},
        "users": {APP_USER: {"password": APP_PASSWORD}},
        "admin": {"users": [APP_USER]},
        "metrics": {"host": "127.0.0.1", "port": 0},
        "databases": {APPDB: {"locations": locations, "placement": placement or EDGE_PLACEMENT,
                              "pool_size": 4, "min_pool_size": 1, **db}},
        "log_level": "info",
        "query_wait_timeout": 10,
        "shutdown_timeout": 5,
    }


@dataclass
class Region:
    sites: dict[str, Site] = field(default_factory=dict)
    edge: ProxyRunner | None = None
    _stoppable: list[ThreadedRelay | ProxyRunner] = field(default_factory=list)

    @property
    def proxy(self) -> ProxyRunner:
        assert self.edge is not None
        return self.edge

    def add_site(self, pg: EmbeddedPostgres, name: str, delay: float, **db: Any) -> Site:
        db_link = self._keep(ThreadedRelay("127.0.0.1", pg.port, delay).start())
        proxy = self._keep(start_proxy(pool_config(db_link.port, **db)))
        edge_link = self._keep(ThreadedRelay("127.0.0.1", proxy.port, 0.0).start())
        site = self.sites[name] = Site(name, db_link, proxy, edge_link)
        return site

    def start_edge(self, placement: dict[str, Any] | None = None, **db: Any) -> ProxyRunner:
        self.edge = self._keep(start_proxy(edge_config(list(self.sites.values()), placement, **db)))
        return self.edge

    def _keep(self, thing: Any) -> Any:
        self._stoppable.append(thing)
        return thing

    def stop(self) -> None:
        """The edge first, then the pool instances, then the relays; every one even when another fails."""
        errors = []
        for thing in reversed(self._stoppable):
            try:
                thing.stop()
            except Exception as exc:  # (report after stopping the rest)
                errors.append(exc)
        self._stoppable.clear()
        if errors:
            raise errors[0]

    # --- the edge's placement ---------------------------------------------------------------------------

    def chosen(self) -> str | None:
        placement = self.proxy.state.databases[APPDB].placement
        return self.proxy.run(lambda: placement.chosen)  # type: ignore[no-any-return]

    def wait_chosen(self, name: str, timeout: float = WAIT) -> None:
        wait_until(lambda: self.chosen() == name, f"placement to choose {name} (chosen: {self.chosen()}, "
                   f"{self.rows()})", timeout)

    def rows(self) -> dict[str, dict[str, Any]]:
        """The edge's SHOW PLACEMENT, by location."""
        return {row["location"]: row for row in show(self.proxy, "SHOW PLACEMENT")}

    def history(self) -> list[tuple[object, ...]]:
        placement = self.proxy.state.databases[APPDB].placement
        return self.proxy.run(lambda: list(placement.history()))  # type: ignore[no-any-return]

    def queries(self) -> dict[str, int]:
        return {name: site.queries() for name, site in self.sites.items()}

    def settle(self) -> None:
        """Until the edge has no server connection to a location it does not use (those made before the
        first decision close as they come back), so per-location counters count only what follows."""
        database = self.proxy.state.databases[APPDB]

        def settled() -> bool:
            target = database.target
            pool = database.pool
            conns = [*pool.idle, *pool.active]
            return target is not None and not pool.connecting and all(c.db is target for c in conns)
        wait_until(lambda: self.proxy.run(settled), "the edge's connections to follow placement")


@pytest.fixture
def region(pg: EmbeddedPostgres) -> Iterator[Callable[..., Region]]:
    """region(distances, edge placement, pool_db=..., **edge db): pool instances at the given one-way
    delays from PostgreSQL and an edge over them; all stopped at teardown."""
    made: list[Region] = []

    def make(distances: dict[str, float] | None = None, placement: dict[str, Any] | None = None,
             pool_db: dict[str, Any] | None = None, **edge_db: Any) -> Region:
        reg = Region()
        made.append(reg)
        for name, delay in (distances or DISTANCES).items():
            reg.add_site(pg, name, delay, **(pool_db or {}))
        reg.start_edge(placement, **edge_db)
        return reg

    try:
        yield make
    finally:
        errors = []
        for reg in made:
            try:
                reg.stop()
            except Exception as exc:
                errors.append(exc)
        if errors:
            raise errors[0]


def run_queries(proxy: ProxyRunner, n: int) -> None:
    with psycopg.connect(proxy.dsn(), autocommit=True) as conn:
        for i in range(n):
            assert conn.execute("select %s::int * 2", (i,)).fetchone() == (i * 2,)


# ---------------------------------------------------------------------------------------------------------
# 1. placement picks the closest location, and the edge's traffic really goes there


def test_placement_picks_the_closest_location(region: Callable[..., Region]) -> None:
    reg = region(cache=NO_CACHE)
    reg.wait_chosen("near")
    rows = reg.rows()
    assert set(rows) == {"far", "mid", "near"}
    assert [name for name, row in rows.items() if row["chosen"] == "yes"] == ["near"]
    for name, row in rows.items():
        assert row["database"] == APPDB
        assert row["status"] == "up", row
        assert row["samples"] >= 1 and row["failures"] == 0 and row["last_error"] in ("", None), row
        assert row["edge_rtt_ms"] is not None and row["origin_rtt_ms"] is not None, row
        assert row["expected_ms"] == pytest.approx(row["edge_rtt_ms"] + row["origin_rtt_ms"], abs=0.01), row
        # the relay holds bytes for its delay each way: a physical lower bound, not a timing expectation
        assert row["origin_rtt_ms"] >= 2 * DISTANCES[name] / MS, row
    assert rows["near"]["expected_ms"] < rows["mid"]["expected_ms"] < rows["far"]["expected_ms"], rows
    assert "near" in rows["near"]["reason"] and rows["mid"]["reason"] == ""

    reg.settle()
    before = reg.queries()
    run_queries(reg.proxy, 30)
    moved = {name: n - before[name] for name, n in reg.queries().items()}
    assert moved["near"] >= 30 and moved["mid"] == 0 and moved["far"] == 0, moved
    # the near instance's pool did the work: SHOW POOLS there has its server connection(s)
    pools = show(reg.sites["near"].proxy, "SHOW POOLS")
    assert any(row["database"] == APPDB and row["sv_idle"] + row["sv_active"] >= 1 for row in pools), pools


# ---------------------------------------------------------------------------------------------------------
# 2. the distances change: placement follows after its hysteresis


def test_placement_follows_a_change_of_distance(region: Callable[..., Region]) -> None:
    reg = region(cache=NO_CACHE)
    reg.wait_chosen("near")
    switches_before = value(scrape(reg.proxy), "hyperpool_placement_switches_total", database=APPDB)
    # near moves away from the database, far comes close
    reg.sites["near"].db_link.set_delay(30 * MS)
    reg.sites["far"].db_link.set_delay(1 * MS)
    reg.wait_chosen("far")
    rows = reg.rows()
    assert rows["far"]["chosen"] == "yes" and rows["far"]["status"] == "up"
    assert rows["near"]["origin_rtt_ms"] >= 60, rows["near"]  # (the lower bound of its new distance)
    assert rows["far"]["expected_ms"] < rows["near"]["expected_ms"], rows
    # the move went through the hysteresis: a challenger that beat the choice for switch_rounds rounds
    into_far = [h for h in reg.history() if h[2] == "far" and h[4]]
    assert into_far and "for 2 rounds" in str(into_far[-1][5]), reg.history()
    assert rows["far"]["switches"] >= 1
    samples = scrape(reg.proxy)
    assert value(samples, "hyperpool_placement_switches_total", database=APPDB) >= switches_before + 1
    assert value(samples, "hyperpool_placement_chosen", database=APPDB, location="far") == 1
    assert value(samples, "hyperpool_placement_chosen", database=APPDB, location="near") == 0

    reg.settle()
    before = reg.queries()
    run_queries(reg.proxy, 20)
    moved = {name: n - before[name] for name, n in reg.queries().items()}
    assert moved["far"] >= 20 and moved["near"] == 0 and moved["mid"] == 0, moved


# ---------------------------------------------------------------------------------------------------------
# 3. the chosen location goes down under load: traffic moves, clients lose at most what was in flight


class SteadyClient(threading.Thread):
    """One client running a transaction every ~50 ms through the edge; after a failure it reconnects
    (a failed connection attempt counts as a failure too)."""

    def __init__(self, dsn: str, transactions: bool) -> None:
        super().__init__(name="steady-client", daemon=True)
        self.dsn = dsn
        self.transactions = transactions
        self.ok = 0
        self.failures: list[str] = []
        self.problems: list[str] = []  # wrong answers
        self.halt = threading.Event()

    def run(self) -> None:
        conn: psycopg.Connection[Any] | None = None
        deadline = time.monotonic() + 40  # bounded even if the test never says stop
        n = 0
        while not self.halt.is_set() and time.monotonic() < deadline:
            n += 1
            try:
                if conn is None:
                    conn = psycopg.connect(self.dsn, autocommit=True, connect_timeout=10)
                if self.transactions:
                    with conn.transaction():
                        got = conn.execute("select %s::int", (n,)).fetchone()
                        conn.execute("select pg_sleep(0.005)")
                        again = conn.execute("select %s::int + 1", (n,)).fetchone()
                    if (got, again) != ((n,), (n + 1,)):
                        self.problems.append(f"{n}: {got} {again}")
                else:
                    row = conn.execute("select %s::int, pg_sleep(0.005)::text", (n,)).fetchone()
                    if row != (n, ""):
                        self.problems.append(f"{n}: {row}")
                self.ok += 1
            except psycopg.Error as exc:
                self.failures.append(f"{type(exc).__name__}: {exc}")
                if conn is not None:
                    with suppress(Exception):
                        conn.close()
                    conn = None
            time.sleep(0.05)
        if conn is not None:
            conn.close()

    def finish(self) -> None:
        self.halt.set()
        self.join(15)
        assert not self.is_alive()


def test_killed_location_traffic_moves(region: Callable[..., Region]) -> None:
    reg = region(cache=NO_CACHE)
    reg.wait_chosen("near")
    reg.settle()
    clients = [SteadyClient(reg.proxy.dsn(), transactions=t) for t in (False, True)]
    try:
        for client in clients:
            client.start()
        wait_until(lambda: all(c.ok >= 10 for c in clients), "the clients to get going")
        # and one client in the middle of a transaction (on a connection through near) when near goes down
        with psycopg.connect(reg.proxy.dsn()) as held:
            assert held.execute("select 1").fetchone() == (1,)
            near = reg.sites["near"]
            near.edge_link.kill()  # the path from the edge to the near instance goes down
            ok_at_kill = [c.ok for c in clients]
            with pytest.raises(psycopg.OperationalError):  # the transaction in flight is lost ...
                held.execute("select 2")
        with psycopg.connect(reg.proxy.dsn()) as again:  # ... and the client's next one works
            assert again.execute("select 3").fetchone() == (3,)
            again.commit()
        reg.wait_chosen("mid", timeout=5)
        rows = reg.rows()
        assert rows["near"]["status"] == "down" and rows["near"]["failures"] >= 1, rows["near"]
        assert rows["near"]["last_error"], rows["near"]
        assert rows["mid"]["chosen"] == "yes"
        # later queries succeed, through mid
        wait_until(lambda: all(c.ok >= k + 10 for c, k in zip(clients, ok_at_kill, strict=True)),
                   "the clients' queries after the switch")
        reg.settle()
        before = reg.queries()
        wait_until(lambda: all(c.ok >= k + 20 for c, k in zip(clients, ok_at_kill, strict=True)),
                   "more queries after the switch")
        moved = {name: n - before[name] for name, n in reg.queries().items()}
        assert moved["mid"] >= 20 and moved["near"] == 0 and moved["far"] == 0, moved

        # the near path comes back: healthy after recover_rounds good probes, then it wins traffic back
        near.edge_link.revive()
        reg.wait_chosen("near")
        ok_back = [c.ok for c in clients]
        wait_until(lambda: all(c.ok >= k + 5 for c, k in zip(clients, ok_back, strict=True)),
                   "queries after near came back")
    finally:
        for client in clients:
            client.finish()
    for client in clients:
        assert len(client.failures) <= 1, (client.transactions, client.failures)
        assert client.problems == []
    history = reg.history()
    assert any(h[3] == "near" and h[2] == "mid" and "near down" in str(h[5]) for h in history), history


# ---------------------------------------------------------------------------------------------------------
# 4. the edge's query cache answers without any location


def test_edge_cache_hits_touch_no_location(pg: EmbeddedPostgres, region: Callable[..., Region]) -> None:
    table = f"rg_cached_{_uid()}"
    with direct(pg) as conn:
        conn.execute(f"create table {table} (id int primary key, v int)")
        conn.execute(f"insert into {table} select g, g * 10 from generate_series(1, 5) g")
    try:
        reg = region({"near": DISTANCES["near"], "far": DISTANCES["far"]})  # the edge's cache is on (default)
        reg.wait_chosen("near")
        database = reg.proxy.state.databases[APPDB]
        sql = f"select count(*), sum(v) from {table}"
        with psycopg.connect(reg.proxy.dsn(), autocommit=True) as conn:
            cur = psycopg.ClientCursor(conn)  # the simple protocol (the cache's fast path) as well
            wait_until(lambda: reg.proxy.run(lambda: database.classifier is not None), "the edge's catalog")
            reg.settle()
            assert conn.execute(sql, prepare=False).fetchone() == (5, 150)  # a miss: stored
            cur.execute(sql)
            assert cur.fetchone() == (5, 150)
            before = reg.queries()
            hits = reg.proxy.run(lambda: database.cache.stats.hits)
            for _ in range(15):
                assert conn.execute(sql, prepare=False).fetchone() == (5, 150)
                cur.execute(sql)
                assert cur.fetchone() == (5, 150)
            assert reg.queries() == before  # no location saw any of them
            assert reg.proxy.run(lambda: database.cache.stats.hits) - hits == 30
        (row,) = [r for r in show(reg.proxy, "SHOW CACHE") if r["database"] == APPDB]
        assert row["hits"] >= 30 and row["entries"] >= 1, row
    finally:
        with direct(pg) as conn:
            conn.execute(f"drop table if exists {table}")


# ---------------------------------------------------------------------------------------------------------
# 5. chained pooling with real drivers: edge -> pool instance -> PostgreSQL


def start_chain(pg: EmbeddedPostgres, **pool_db: Any) -> Region:
    """One pool instance (2 ms one way from PostgreSQL) and an edge over it, both with their query cache on;
    small pools, so clients share server connections at both hops."""
    reg = Region()
    try:
        reg.add_site(pg, "near", 2 * MS, cache=True, **{"pool_size": 2, **pool_db})
        reg.start_edge(pool_size=2)
        reg.wait_chosen("near")
    except BaseException:
        reg.stop()
        raise
    return reg


@pytest.fixture
def chain(pg: EmbeddedPostgres) -> Iterator[Region]:
    reg = start_chain(pg)
    try:
        yield reg
    finally:
        reg.stop()


def test_chain_psycopg(chain: Region) -> None:
    table = f"rg_psy_{_uid()}"
    dsn = chain.proxy.dsn()
    with psycopg.connect(dsn, autocommit=True) as conn, psycopg.connect(dsn, autocommit=True) as other:
        conn.execute(f"create table {table} (id int primary key, note text)")
        try:
            # autocommit with parameters of several types
            row = conn.execute("select %s::int + 1, %s::text || '!', %s::numeric * 2, %s::int[]",
                               (41, "hi", 1.5, [1, 2])).fetchone()
            assert row is not None and row[:2] == (42, "hi!") and float(row[2]) == 3.0 and row[3] == [1, 2]
            # transactions: committed rows stay, rolled-back ones do not; another client sees only commits
            for i in range(6):
                with conn.transaction():
                    conn.execute(f"insert into {table} values (%s, %s)", (i, f"n{i}"))
                    assert conn.execute(f"select count(*) from {table}").fetchone() == (i + 1,)
                    assert other.execute(f"select count(*) from {table}").fetchone() == (i,)
                assert other.execute(f"select count(*) from {table}").fetchone() == (i + 1,)
            with pytest.raises(psycopg.errors.UniqueViolation), conn.transaction():
                conn.execute(f"insert into {table} values (100, 'x')")
                conn.execute(f"insert into {table} values (0, 'dup')")
            assert conn.execute(f"select count(*) from {table} where id = 100").fetchone() == (0,)
            # server-side prepared statements (prepare=True), interleaved with another client's traffic
            for i in range(10):
                got = conn.execute(f"select note from {table} where id = %s", (i % 6,), prepare=True).fetchone()
                assert got == (f"n{i % 6}",), i
                assert other.execute("select %s::int * 3", (i,), prepare=True).fetchone() == (i * 3,)
            # a non-autocommit connection: psycopg's implicit transactions
            with psycopg.connect(dsn) as tx:
                tx.execute(f"update {table} set note = 'changed' where id = 1")
                assert other.execute(f"select note from {table} where id = 1").fetchone() == ("n1",)
                tx.commit()
                tx.execute(f"update {table} set note = 'lost' where id = 2")
                tx.rollback()
            assert other.execute(f"select id, note from {table} where id in (1, 2) order by id").fetchall() == \
                [(1, "changed"), (2, "n2")]
        finally:
            conn.execute(f"drop table {table}")


def test_chain_asyncpg(chain: Region) -> None:
    table = f"rg_apg_{_uid()}"

    async def scenario() -> None:
        args = {"host": "127.0.0.1", "port": chain.proxy.port, "user": APP_USER, "password": APP_PASSWORD,
                "database": APPDB}
        conn = await asyncpg.connect(**args)
        other = await asyncpg.connect(**args)
        try:
            await conn.execute(f"create table {table} (id int primary key, v int)")
            double = await conn.prepare("select $1::int * 2")
            insert = await conn.prepare(f"insert into {table} values ($1, $2)")
            for i in range(8):
                assert await double.fetchval(i) == i * 2
                async with conn.transaction():
                    await insert.fetch(i, i * 10)
                    assert await conn.fetchval(f"select sum(v) from {table}") == 10 * i * (i + 1) // 2
                assert await other.fetchval(f"select count(*) from {table}") == i + 1
            with pytest.raises(asyncpg.UniqueViolationError):
                async with conn.transaction():
                    await insert.fetch(100, 1)
                    await insert.fetch(0, 1)
            assert await other.fetchval(f"select count(*) from {table} where id = 100") == 0
            await conn.executemany(f"insert into {table} values ($1, $2)", [(200 + i, i) for i in range(5)])
            rows = await other.fetch(f"select id, v from {table} where id >= $1 order by id", 200)
            assert [tuple(r) for r in rows] == [(200 + i, i) for i in range(5)]
            assert await double.fetchval(21) == 42  # the prepared statement survived all of that
        finally:
            with suppress(Exception):
                await conn.execute(f"drop table if exists {table}")
            await conn.close()
            await other.close()

    asyncio.run(asyncio.wait_for(scenario(), 60))


def test_chain_set_follows_its_client(chain: Region) -> None:
    dsn = chain.proxy.dsn()
    def connect() -> psycopg.Connection[Any]:  # (psycopg prepares a statement it ran 5 times: sql below)
        return psycopg.connect(dsn, autocommit=True)

    with connect() as a, connect() as b, connect() as c:
        a.execute("SET statement_timeout = '1234ms'")
        a.execute("SET TimeZone = 'Asia/Tokyo'")
        b.execute("SET statement_timeout = '4321ms'")
        sql = "select current_setting('statement_timeout'), current_setting('TimeZone'), pg_backend_pid()"
        default_tz = c.execute("select current_setting('TimeZone')").fetchone()
        assert default_tz is not None
        expected = {"a": ("1234ms", "Asia/Tokyo"), "b": ("4321ms", default_tz[0]), "c": ("0", default_tz[0])}
        pids = set()
        for n in range(8):
            for name, conn in (("a", a), ("b", b), ("c", c)):
                if n % 2:
                    with conn.transaction():
                        row = conn.execute(sql).fetchone()
                        assert row is not None and conn.execute("show statement_timeout").fetchone() == \
                            (expected[name][0],)
                else:
                    row = conn.execute(sql).fetchone()
                assert row is not None and row[:2] == expected[name], (n, name, row)
                pids.add(row[2])
        with a.transaction():
            a.execute("SET LOCAL statement_timeout = '555ms'")
            assert a.execute("show statement_timeout").fetchone() == ("555ms",)
        assert a.execute("show statement_timeout").fetchone() == ("1234ms",)
        assert b.execute("show statement_timeout").fetchone() == ("4321ms",)
        a.execute("RESET ALL")
        assert a.execute(sql).fetchone()[:2] == ("0", default_tz[0])  # type: ignore[index]
    assert len(pids) <= 2  # three clients over the pool instance's two server connections


def test_chain_temp_table_pins_its_client(chain: Region) -> None:
    dsn = chain.proxy.dsn()
    with psycopg.connect(dsn, autocommit=True) as conn, psycopg.connect(dsn, autocommit=True) as other:
        conn.execute("create temp table rg_tmp (v int)")
        for n in range(6):
            conn.execute("insert into rg_tmp values (%s)", (n,))
            with conn.transaction():
                assert conn.execute("select count(*), sum(v) from rg_tmp").fetchone() == (n + 1, n * (n + 1) // 2)
            assert other.execute("select to_regclass('rg_tmp') is null").fetchone() == (True,)
            assert other.execute("select %s::int", (n,)).fetchone() == (n,)
        pinned = show(chain.proxy, "SHOW PINNED")
        assert any(r["database"] == APPDB and r["reason"] == "temp_table" and r["clients"] == 1 for r in pinned), \
            pinned
        near = chain.sites["near"].proxy
        assert any(r["database"] == APPDB and r["reason"] == "temp_table" for r in show(near, "SHOW PINNED"))
    # the pinned client is gone: its server connections carry nothing to the next client
    with psycopg.connect(dsn, autocommit=True) as later:
        for _ in range(3):
            assert later.execute("select to_regclass('rg_tmp') is null").fetchone() == (True,)


def test_chain_write_through_the_edge_invalidates_its_cache(chain: Region) -> None:
    table = f"rg_ryw_{_uid()}"
    database = chain.proxy.state.databases[APPDB]
    with psycopg.connect(chain.proxy.dsn(), autocommit=True) as conn:
        conn.execute(f"create table {table} (id int primary key, v int)")
        try:
            conn.execute(f"insert into {table} values (1, 10)")
            # DDL through the edge: it reads its catalog again before it caches anything about the table
            wait_until(lambda: chain.proxy.run(lambda: database.classifier is not None), "the edge's catalog")
            # the INSERT ran while the catalog was being read, so the session state is read back after it, and a
            # request sent meanwhile stays on that connection (not cacheable): one round trip waits that out
            conn.execute("/* hyperpool: nocache */ select 1")
            read = f"select count(*), sum(v) from {table}"
            stats = chain.proxy.run(lambda: (database.cache.stats.hits, database.cache.stats.invalidations))
            for _ in range(3):
                assert conn.execute(read, prepare=False).fetchone() == (1, 10)
            hits = chain.proxy.run(lambda: database.cache.stats.hits)
            assert hits - stats[0] >= 2  # it was cached
            for i in range(2, 6):
                conn.execute(f"insert into {table} values (%s, %s)", (i, i * 10))
                assert conn.execute(read, prepare=False).fetchone() == (i, 10 * i * (i + 1) // 2), i
                assert conn.execute(read, prepare=False).fetchone() == (i, 10 * i * (i + 1) // 2), i
            with conn.transaction():
                conn.execute(f"update {table} set v = 0")
            assert conn.execute(read, prepare=False).fetchone() == (5, 0)
            with psycopg.connect(chain.proxy.dsn(), autocommit=True) as other:  # another client of the edge too
                assert other.execute(read, prepare=False).fetchone() == (5, 0)
            assert chain.proxy.run(lambda: database.cache.stats.invalidations) > stats[1]
        finally:
            conn.execute(f"drop table if exists {table}")


# ---------------------------------------------------------------------------------------------------------
# 6. configuration


def _cfg(**db: Any) -> dict[str, Any]:
    return {"users": {"app": "secret"}, "databases": {"appdb": db}}


REMOTE = {"host": "10.0.0.5", "port": 6432, "user": "edge", "password": "p"}


@pytest.mark.parametrize(("locations", "key"), [
    ({"eu": {"port": 6432, "user": "edge"}}, "databases.appdb.locations.eu"),
    ({"eu": {"host": "10.0.0.5"}}, "databases.appdb.locations.eu"),
    ({"ok": REMOTE, "us": {"host": "10.0.0.6", "password": "p"}}, "databases.appdb.locations.us"),
    ({"eu": {**REMOTE, "bogus": 1}}, "databases.appdb.locations.eu.bogus"),
    ({"eu": {**REMOTE, "sslmode": "sometimes"}}, "databases.appdb.locations.eu.sslmode"),
    ({"eu": {**REMOTE, "port": 70000}}, "databases.appdb.locations.eu.port"),
    ({"local": {"host": "10.0.0.5"}}, "databases.appdb.locations.local"),
    ({"local": {"user": "x"}, "eu": REMOTE}, "databases.appdb.locations.local"),
])
def test_config_rejects_bad_locations(locations: dict[str, Any], key: str) -> None:
    with pytest.raises(ConfigError) as info:
        parse_config(_cfg(user="app", locations=locations), {})
    assert key in str(info.value), str(info.value)


def test_config_placement_location_must_be_a_location() -> None:
    with pytest.raises(ConfigError, match=r"databases\.appdb\.placement\.location") as info:
        parse_config(_cfg(locations={"eu": REMOTE}, placement={"mode": "fixed", "location": "us"}), {})
    assert "'us'" in str(info.value)
    with pytest.raises(ConfigError, match=r"databases\.appdb\.placement"):
        parse_config(_cfg(locations={"eu": REMOTE}, placement={"mode": "fixed"}), {})
    with pytest.raises(ConfigError, match=r"databases\.appdb\.placement\.nope"):
        parse_config(_cfg(locations={"eu": REMOTE}, placement={"nope": 1}), {})
    fixed = parse_config(_cfg(locations={"eu": REMOTE, "local": {}}, user="app",
                              placement={"mode": "fixed", "location": "local"}), {})
    assert fixed.databases["appdb"].placement.location == LOCAL


def test_config_remote_only_needs_no_user() -> None:
    config = parse_config(_cfg(locations={"eu": REMOTE, "us": {**REMOTE, "host": "10.0.0.6", "dbname": "other"}},
                               placement={"probe_interval": 0.2, "switch_rounds": 2}), {})
    db = config.databases["appdb"]
    assert db.user == ""
    assert [name for name, _ in db.locations] == ["eu", "us"]
    targets = db.targets()
    assert set(targets) == {"eu", "us"}
    assert (targets["eu"].host, targets["eu"].port, targets["eu"].user, targets["eu"].dbname, targets["eu"].via) == \
        ("10.0.0.5", 6432, "edge", "appdb", "eu")
    assert targets["us"].dbname == "other"
    assert db.placement.probe_interval == 0.2 and db.placement.switch_rounds == 2
    # with local among them the database pools from here too: then its user is required
    with pytest.raises(ConfigError, match=r"databases\.appdb\.user"):
        parse_config(_cfg(locations={"eu": REMOTE, "local": {}}), {})
    local = parse_config(_cfg(locations={"eu": REMOTE, "local": None}, user="app"), {}).databases["appdb"]
    assert local.targets()[LOCAL] is local
    # no locations: the origin as before
    plain = parse_config(_cfg(user="app"), {}).databases["appdb"]
    assert plain.locations == () and set(plain.targets()) == {LOCAL}


# ---------------------------------------------------------------------------------------------------------
# 7. what a pool instance shows, and the edge's metrics


def test_pool_instance_shows_its_origin_rtt_and_the_edge_exports_metrics(region: Callable[..., Region]) -> None:
    reg = region(cache=NO_CACHE)
    reg.wait_chosen("near")
    for name, site in reg.sites.items():
        (row,) = show(site.proxy, "SHOW PLACEMENT")
        assert (row["database"], row["location"], row["chosen"]) == (APPDB, "origin", "yes"), row
        assert row["status"] == "measured" and row["samples"] >= 1, row
        assert row["origin_rtt_ms"] == row["expected_ms"] and row["origin_rtt_ms"] >= 2 * DISTANCES[name] / MS, row
        assert row["edge_rtt_ms"] is None and row["switches"] == 0
        assert row["reason"] == "pools to its origin directly"
        pool_samples = scrape(site.proxy) if site.proxy.server.metrics is not None else None
        assert pool_samples is None  # (pool instances here run without a metrics endpoint)

    samples = scrape(reg.proxy)
    for location in ("far", "mid", "near"):
        assert value(samples, "hyperpool_placement_chosen", database=APPDB, location=location) == \
            (1 if location == "near" else 0), location
        for path in ("edge", "origin", "expected"):
            assert ("hyperpool_placement_rtt_seconds",
                    (("database", APPDB), ("location", location), ("path", path))) in samples, (location, path)
        expected = value(samples, "hyperpool_placement_rtt_seconds", database=APPDB, location=location,
                         path="expected")
        assert expected >= 2 * DISTANCES[location], location
    assert ("hyperpool_placement_switches_total", (("database", APPDB),)) in samples
    switches = reg.rows()["near"]["switches"]
    assert value(samples, "hyperpool_placement_switches_total", database=APPDB) == switches
    # the edge pools to no origin itself: it reports no RTT of its own
    assert not any(name == "hyperpool_origin_rtt_seconds" for name, _ in samples)


def test_pool_instance_unprobed_until_asked(pg: EmbeddedPostgres) -> None:
    proxy = start_proxy(pool_config(pg.port, top={"metrics": {"host": "127.0.0.1", "port": 0}}))
    try:
        run_queries(proxy, 3)  # clients' traffic measures nothing
        (row,) = show(proxy, "SHOW PLACEMENT")
        assert (row["location"], row["status"], row["origin_rtt_ms"], row["samples"]) == \
            ("origin", "unprobed", None, 0), row
        assert not any(name == "hyperpool_origin_rtt_seconds" for name, _ in scrape(proxy))
        # an edge asks (a lone Sync): the answer carries the figure once measured
        sock = raw_login(proxy.port)
        try:
            def reported() -> str | None:
                sock.sendall(message(b"S"))
                for kind, payload in read_messages(sock):
                    if kind == b"S" and payload.startswith(b"hyperpool.origin_rtt_ms\0"):
                        return payload.split(b"\0")[1].decode()
                return None
            figure = wait_until(reported, "the origin RTT in the answer to a lone Sync", timeout=5)
            assert float(figure) > 0
        finally:
            sock.close()
        (row,) = show(proxy, "SHOW PLACEMENT")
        assert row["status"] == "measured" and row["origin_rtt_ms"] > 0, row
        assert value(scrape(proxy), "hyperpool_origin_rtt_seconds", database=APPDB) > 0
    finally:
        proxy.stop()


# ---------------------------------------------------------------------------------------------------------
# edge cases found while writing these tests (each one failed on f4ea082)

SLOW = 100 * MS  # one way: logging in takes ~8 trips (0.8 s), SELECT 1 one round trip (0.2 s)


class SlowOrigin:
    """A pool instance 100 ms (one way) from PostgreSQL, probe_interval 0.2 s, no warm pool, and a raw client
    logged in to it that asks the way an edge's LocationProber does (a lone Sync)."""

    def __init__(self, pg: EmbeddedPostgres) -> None:
        self.link = ThreadedRelay("127.0.0.1", pg.port, SLOW).start()
        try:
            self.proxy = start_proxy(pool_config(self.link.port, placement={"probe_interval": 0.2, "samples": 3},
                                                 min_pool_size=0))
        except BaseException:
            self.link.stop()
            raise
        self.database = self.proxy.state.databases[APPDB]
        self.sock: Any = None

    def __enter__(self) -> SlowOrigin:
        try:
            self.sock = raw_login(self.proxy.port)  # (the login itself needs one pooled connection)
        except BaseException:
            self.__exit__()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        try:
            if self.sock is not None:
                self.sock.close()
            self.proxy.stop()
        finally:
            self.link.stop()

    def ask(self) -> None:
        self.sock.sendall(message(b"S"))
        assert read_messages(self.sock)[-1][0] == b"Z"

    def samples(self) -> int:
        return int(self.proxy.run(lambda: len(self.database.origin_samples)))

    def probe_selecting(self) -> bool:
        def selecting() -> bool:
            prober = self.database._origin_prober
            conn = prober._conn if prober is not None else None
            return conn is not None and conn.busy
        return bool(self.proxy.run(selecting))


def test_origin_probe_is_not_cut_short_by_the_next_ask(pg: EmbeddedPostgres) -> None:
    """A probe of the origin running longer than probe_interval is not spoiled by the next ask (on f4ea082 the
    next probe closed its busy connection: 'probe connection replaced', and a far origin was never measured)."""
    with SlowOrigin(pg) as slow:
        slow.ask()  # the first ask starts a probe of the origin
        wait_until(slow.probe_selecting, "the probe's SELECT 1 (after its login)", timeout=5, step=0.01)
        slow.ask()  # probe_interval has passed: another probe may start, but must not spoil the running one
        # the running probe's SELECT 1 needs one round trip (0.2 s); a new probe would need 1 s
        wait_until(lambda: slow.samples() >= 1, "the first probe's sample", timeout=0.6, step=0.02)


def test_overlapping_origin_probes_leak_no_connection(pg: EmbeddedPostgres) -> None:
    """Two probes of the origin started during one slow login leave one connection, not two (on f4ea082 the
    second's 'self._conn = conn' dropped the first's connection without closing it)."""
    with SlowOrigin(pg) as slow:
        slow.ask()
        time.sleep(0.3)  # past probe_interval, while the first probe is still logging in (0.8 s)
        slow.ask()

        # no more asks (a probe started while another runs spoils it: the test above); the first probe's sample
        # arrives after ~1 s, the second probe (if one started) logs in meanwhile
        wait_until(lambda: slow.samples() >= 1, "the first probe's sample", timeout=5)

        def relayed_as_kept() -> bool:
            pool = slow.database.pool
            kept = slow.proxy.run(lambda: len(pool.idle) + len(pool.active) + pool.connecting
                                  + (slow.database._origin_prober._conn is not None))
            return len(slow.link.relay.connections) == kept
        wait_until(relayed_as_kept, "as many connections to PostgreSQL as the instance keeps (pool + prober): "
                   f"{len(slow.link.relay.connections)} open", timeout=3)


def test_location_that_lost_its_database_loses_the_traffic(region: Callable[..., Region]) -> None:
    """A location whose instance is up but cannot reach PostgreSQL stops reporting an origin RTT, so the edge
    takes it out (on f4ea082 it kept reporting its last good figure and every transaction failed there)."""
    # (server_connect_timeout 1: how long the edge waits for a location's figure before failing its probe)
    reg = region(cache=NO_CACHE, server_connect_timeout=1)
    reg.wait_chosen("near")
    reg.sites["near"].db_link.kill()  # the near instance is up, but cannot reach PostgreSQL any more
    reg.wait_chosen("mid", timeout=5)
    run_queries(reg.proxy, 5)


def test_a_failed_location_does_not_hold_back_the_next(pg: EmbeddedPostgres) -> None:
    """A connect failure at one location does not make connections to the next chosen one fail fast for
    server_login_retry (on f4ea082 the pool's backoff outlived the placement move)."""
    reg = Region()
    try:
        for name, delay in DISTANCES.items():
            reg.add_site(pg, name, delay)
        # far (listed first: the edge's target before its first probe round) cannot reach PostgreSQL, so the
        # edge's first connection (its min_pool_size warm-up) fails there at once
        reg.sites["far"].db_link.kill()
        reg.start_edge(cache=NO_CACHE, server_login_retry=5)
        reg.wait_chosen("near", timeout=5)
        run_queries(reg.proxy, 5)
    finally:
        reg.stop()


def test_chain_statement_survives_a_state_read_back_on_another_server(pg: EmbeddedPostgres) -> None:
    """The edge's session-state read-back through another instance does not make it forget statements that
    instance still has (on f4ea082 the answer listed the instance's own _hp_ names, the edge dropped its
    own, prepared them again, and the client got 'prepared statement "_hp_1" already exists')."""
    reg = Region()
    try:
        reg.add_site(pg, "near", 1 * MS)
        reg.start_edge(pool_size=1, cache=NO_CACHE)  # one edge connection to the instance: every client shares it
        reg.wait_chosen("near")
        # The instance names statements on its own (_hp_1, _hp_2, ... hyperpool-wide there), the edge too: a
        # client of the instance itself (another edge, an application nearby) makes the two counts differ.
        with psycopg.connect(reg.sites["near"].proxy.dsn(), autocommit=True) as nearby:
            assert nearby.execute("select %s::int + 7", (1,), prepare=True).fetchone() == (8,)  # the instance's _hp_1
            nearby.execute("deallocate all")  # (gone from PostgreSQL again: only the names have moved on)

        async def scenario() -> None:
            conn = await asyncpg.connect(host="127.0.0.1", port=reg.proxy.port, user=APP_USER,
                                         password=APP_PASSWORD, database=APPDB)
            try:
                # a named statement: the edge's _hp_1, which the instance prepares as its _hp_2
                assert await conn.fetchval("select $1::int + 100", 1) == 101
                # a SET: the edge reads its connection's session state back (through the instance)
                await conn.execute("SET application_name = 'rg_read_back'")
                assert await conn.fetchval("select current_setting('application_name')") == "rg_read_back"
                for n in range(2, 5):  # the same statement again (the read-back is over by the second time)
                    assert await conn.fetchval("select $1::int + 100", n) == 100 + n
            finally:
                await conn.close()

        asyncio.run(asyncio.wait_for(scenario(), 30))
    finally:
        reg.stop()


def test_location_that_lost_its_database_is_left_within_a_few_probe_intervals(
        region: Callable[..., Region]) -> None:
    reg = region(cache=NO_CACHE)  # server_connect_timeout: the default (15 s)
    reg.wait_chosen("near")
    reg.sites["near"].db_link.kill()
    reg.wait_chosen("mid", timeout=5)  # 25 probe intervals
