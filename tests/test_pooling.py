"""Transaction pooling over a real PostgreSQL: concurrency, isolation, cancel, failures."""

from __future__ import annotations

import asyncio
import socket
import struct
import threading
import time
from collections.abc import Callable

import asyncpg
import psycopg
import pytest

from hyperpool.embedded import EmbeddedPostgres
from tests.support import (
    APP_PASSWORD,
    APP_USER,
    APPDB,
    OWNER,
    ProxyRunner,
    error_code,
    message,
    query_msg,
    raw_login,
    read_messages,
)

TIMEZONES = ["UTC", "Asia/Tokyo", "America/New_York", "Europe/Berlin", "Australia/Sydney"]


@pytest.fixture(scope="module")
def items_table(pg: EmbeddedPostgres) -> str:
    pg.execute(f"CREATE TABLE IF NOT EXISTS items (client int, n int, note text); ALTER TABLE items OWNER TO {OWNER}",
               dbname=APPDB)
    return "items"


def _owner_backends(pg: EmbeddedPostgres, since: str) -> int:
    out = pg.execute(f"select count(*) from pg_stat_activity where usename = '{OWNER}' and datname = '{APPDB}'"
                     f" and backend_start >= '{since}'")
    return int(out)


async def _client_work(proxy: ProxyRunner, client_id: int, rounds: int) -> list[str]:
    tz = TIMEZONES[client_id % len(TIMEZONES)]
    problems: list[str] = []
    dsn = proxy.dsn(application_name=f"client{client_id}", options=f"-c TimeZone={tz}")
    async with await psycopg.AsyncConnection.connect(dsn) as conn:
        for n in range(rounds):
            async with conn.transaction():
                txid = (await (await conn.execute("select txid_current()")).fetchone())[0]  # type: ignore[index]
                await conn.execute("insert into items values (%s, %s, %s)", (client_id, n, tz))
                row = await (await conn.execute(
                    "select current_setting('TimeZone'), current_setting('application_name'), txid_current(),"
                    " (select count(*) from items where client = %s)", (client_id,))).fetchone()
                assert row is not None
                if row[0] != tz or row[1] != f"client{client_id}":
                    problems.append(f"client {client_id} saw settings {row[:2]}")
                if row[2] != txid:
                    problems.append(f"client {client_id} changed transaction mid-way: {txid} -> {row[2]}")
                if row[3] != n + 1:
                    problems.append(f"client {client_id} round {n} counted {row[3]} own rows")
    return problems


def test_50_clients_over_5_server_connections(make_proxy: Callable[..., ProxyRunner], pg: EmbeddedPostgres,
                                               items_table: str) -> None:
    since = pg.execute("select now()")  # backends of earlier tests' proxies may still be exiting
    proxy = make_proxy(db={"pool_size": 5, "min_pool_size": 0})
    pg.execute("truncate items", dbname=APPDB)
    peak = 0
    stop = threading.Event()

    def watch() -> None:
        nonlocal peak
        while not stop.is_set():
            peak = max(peak, _owner_backends(pg, since))
            time.sleep(0.05)

    watcher = threading.Thread(target=watch)
    watcher.start()

    async def main() -> list[str]:
        results = await asyncio.gather(*(_client_work(proxy, i, 10) for i in range(50)))
        return [p for r in results for p in r]

    try:
        problems = asyncio.run(main())
    finally:
        stop.set()
        watcher.join()
    assert problems == []
    assert pg.execute("select count(*) from items", dbname=APPDB) == "500"
    assert pg.execute("select count(distinct client) from items", dbname=APPDB) == "50"
    pool = proxy.state.databases[APPDB].pool
    assert pool.stats.opened <= 5
    assert 1 <= peak <= 5


def test_asyncpg_clients_share_few_servers(make_proxy: Callable[..., ProxyRunner]) -> None:
    proxy = make_proxy(db={"pool_size": 2})

    async def one(i: int) -> tuple[int, str]:
        conn = await asyncpg.connect(host="127.0.0.1", port=proxy.port, user=APP_USER, password=APP_PASSWORD,
                                     database=APPDB, server_settings={"application_name": f"apg{i}"})
        try:
            async with conn.transaction():
                value = await conn.fetchval("select $1::int * 2", i)
                name = await conn.fetchval("select current_setting('application_name')")
            return value, name
        finally:
            await conn.close()

    async def main() -> list[tuple[int, str]]:
        return await asyncio.gather(*(one(i) for i in range(20)))

    assert asyncio.run(main()) == [(i * 2, f"apg{i}") for i in range(20)]


def test_settings_do_not_leak_between_clients(make_proxy: Callable[..., ProxyRunner]) -> None:
    proxy = make_proxy(db={"pool_size": 1, "min_pool_size": 1})
    with psycopg.connect(proxy.dsn(options="-c TimeZone=Asia/Tokyo"), autocommit=True) as tokyo, \
            psycopg.connect(proxy.dsn(), autocommit=True) as plain:
        default_tz = plain.execute("show timezone").fetchone()
        for _ in range(3):
            assert tokyo.execute("show timezone").fetchone() == ("Asia/Tokyo",)
            assert plain.execute("show timezone").fetchone() == default_tz
        # a session-level SET of a reported setting follows its client, not the server connection
        tokyo.execute("set datestyle = 'German, DMY'")
        assert plain.execute("show datestyle").fetchone() == ("ISO, MDY",)
        assert tokyo.execute("show datestyle").fetchone() == ("German, DMY",)
    assert proxy.state.databases[APPDB].pool.stats.opened == 1


def test_invalid_startup_setting_is_rejected_at_login(proxy: ProxyRunner) -> None:
    with pytest.raises(psycopg.OperationalError, match='invalid value for parameter "TimeZone"'):
        psycopg.connect(proxy.dsn(options="-c TimeZone=Mars/Olympus"))
    with pytest.raises(psycopg.OperationalError, match="unrecognized configuration parameter"):
        psycopg.connect(proxy.dsn(options="-c no_such_setting=1"))
    with psycopg.connect(proxy.dsn()) as conn:  # and the pool is still healthy
        assert conn.execute("select 1").fetchone() == (1,)


def test_cancel_running_query(proxy: ProxyRunner) -> None:
    # cancel_safe(): psycopg's legacy cancel() holds the GIL while it waits, which would
    # starve the in-process proxy thread in this test (not an issue for real clients).
    with psycopg.connect(proxy.dsn()) as conn:
        # the BackendKeyData the client got is hyperpool's own, not the server connection's
        assert conn.info.backend_pid != conn.execute("select pg_backend_pid()").fetchone()[0]  # type: ignore[index]
        conn.rollback()
        timer = threading.Timer(0.5, conn.cancel_safe)
        timer.start()
        started = time.monotonic()
        with pytest.raises(psycopg.errors.QueryCanceled):
            conn.execute("select pg_sleep(20)")
        assert time.monotonic() - started < 15
        conn.rollback()
        assert conn.execute("select 7").fetchone() == (7,)
        conn.cancel_safe()  # nothing running: must do nothing
        assert conn.execute("select 8").fetchone() == (8,)


def test_cancel_with_wrong_key_does_nothing(proxy: ProxyRunner) -> None:
    with psycopg.connect(proxy.dsn()) as conn:
        pid = conn.info.backend_pid
        done: list[object] = []
        worker = threading.Thread(target=lambda: done.append(conn.execute("select pg_sleep(1.0), 1").fetchone()))
        worker.start()
        time.sleep(0.3)
        with socket.create_connection(("127.0.0.1", proxy.port)) as sock:
            sock.sendall((16).to_bytes(4, "big") + (80877102).to_bytes(4, "big") + pid.to_bytes(4, "big")
                         + b"\x00\x00\x00\x01")
            assert sock.recv(10) == b""
        worker.join(10)
        assert done and done[0] == ("", 1)


def test_client_disconnect_mid_transaction_rolls_back(make_proxy: Callable[..., ProxyRunner],
                                                      pg: EmbeddedPostgres, items_table: str) -> None:
    proxy = make_proxy(db={"pool_size": 1, "min_pool_size": 1})
    leaver = psycopg.connect(proxy.dsn())
    leaver.execute("insert into items values (-1, -1, 'uncommitted')")
    leaver.execute("lock table items in access exclusive mode")
    leaver.pgconn.finish()  # vanish without Terminate, mid-transaction
    with psycopg.connect(proxy.dsn(), autocommit=True) as other:
        assert other.execute("select pg_current_xact_id_if_assigned() is null").fetchone() == (True,)
        other.execute("set lock_timeout = '2s'")
        assert other.execute("select count(*) from items where client = -1").fetchone() == (0,)
        assert other.info.transaction_status == psycopg.pq.TransactionStatus.IDLE
    assert proxy.state.databases[APPDB].pool.stats.opened == 1  # rolled back and reused, not replaced


def test_client_disconnect_mid_query_closes_server(make_proxy: Callable[..., ProxyRunner]) -> None:
    proxy = make_proxy(db={"pool_size": 1, "min_pool_size": 0})
    sock_client = psycopg.connect(proxy.dsn(), autocommit=True)
    sock_client.pgconn.send_query(b"select pg_sleep(5)")
    time.sleep(0.3)
    sock_client.pgconn.finish()
    with psycopg.connect(proxy.dsn(), autocommit=True) as other:
        assert other.execute("select 'fresh'").fetchone() == ("fresh",)
    assert proxy.state.databases[APPDB].pool.stats.opened == 2


def test_server_killed_mid_transaction(make_proxy: Callable[..., ProxyRunner], pg: EmbeddedPostgres) -> None:
    proxy = make_proxy(db={"pool_size": 2, "min_pool_size": 1})
    victim = psycopg.connect(proxy.dsn())
    bystander = psycopg.connect(proxy.dsn(), autocommit=True)
    backend = victim.execute("select pg_backend_pid()").fetchone()[0]  # type: ignore[index]
    pg.execute(f"select pg_terminate_backend({backend})")
    with pytest.raises(psycopg.OperationalError):
        victim.execute("select 1")
    victim.close()
    assert bystander.execute("select 'still here'").fetchone() == ("still here",)
    bystander.close()
    with psycopg.connect(proxy.dsn()) as again:
        assert again.execute("select 2").fetchone() == (2,)


def test_session_mode_discards_state(make_proxy: Callable[..., ProxyRunner]) -> None:
    proxy = make_proxy(pool_mode="session", db={"pool_size": 1, "min_pool_size": 1})
    with psycopg.connect(proxy.dsn(), autocommit=True) as first:
        first.execute("create temp table scratch (x int)")
        first.execute("set search_path = pg_temp, public")
        backend = first.execute("select pg_backend_pid()").fetchone()
    with psycopg.connect(proxy.dsn(), autocommit=True) as second:
        assert second.execute("select pg_backend_pid()").fetchone() == backend  # same server connection
        assert second.execute("select count(*) from pg_tables where tablename = 'scratch'").fetchone() == (0,)
        assert second.execute("show search_path").fetchone() == ('"$user", public',)


def test_query_wait_timeout(make_proxy: Callable[..., ProxyRunner]) -> None:
    proxy = make_proxy(query_wait_timeout=1, db={"pool_size": 1, "min_pool_size": 1})
    with psycopg.connect(proxy.dsn()) as holder:
        holder.execute("select 1")  # holds the only server connection in a transaction
        with psycopg.connect(proxy.dsn(), autocommit=True) as waiter, \
                pytest.raises(psycopg.OperationalError, match="query_wait_timeout"):
            waiter.execute("select 1")
        holder.rollback()
    with psycopg.connect(proxy.dsn()) as after:
        assert after.execute("select 3").fetchone() == (3,)


def test_max_client_conn(make_proxy: Callable[..., ProxyRunner]) -> None:
    proxy = make_proxy(max_client_conn=3)
    conns = [psycopg.connect(proxy.dsn()) for _ in range(3)]
    try:
        with pytest.raises(psycopg.OperationalError, match="max_client_conn"):
            psycopg.connect(proxy.dsn())

        async def over_limit() -> None:
            await asyncpg.connect(host="127.0.0.1", port=proxy.port, user=APP_USER, password=APP_PASSWORD,
                                  database=APPDB)

        with pytest.raises(asyncpg.TooManyConnectionsError) as info:
            asyncio.run(over_limit())
        assert info.value.sqlstate == "53300"
    finally:
        for conn in conns:
            conn.close()
    with psycopg.connect(proxy.dsn()) as conn:
        assert conn.execute("select 1").fetchone() == (1,)


def test_pipelined_simple_queries_keep_their_server(make_proxy: Callable[..., ProxyRunner]) -> None:
    """Several Query messages in one write: the server must not be released between them."""
    proxy = make_proxy(db={"pool_size": 2})
    with raw_login(proxy.port) as sock:
        sock.sendall(query_msg("begin") + query_msg("select pg_backend_pid()") + query_msg("select 1")
                     + query_msg("select pg_backend_pid()") + query_msg("commit"))
        msgs = read_messages(sock, until=b"Z", count=5)
        pids = [p for k, p in msgs if k == b"D"]
        assert len(pids) == 3 and pids[0] == pids[2]
        assert [p for k, p in msgs if k == b"Z"] == [b"T", b"T", b"T", b"T", b"I"]
    with psycopg.connect(proxy.dsn(), autocommit=True) as conn, conn.pipeline():
        cursors = [conn.execute("select %s::int", (i,)) for i in range(20)]
        conn.execute("select pg_sleep(0.01)")
        values = [c.fetchone() for c in cursors]
    assert values == [(i,) for i in range(20)]


def test_copy_in_and_out(proxy: ProxyRunner, items_table: str) -> None:
    with psycopg.connect(proxy.dsn()) as conn:
        with conn.cursor().copy("copy items (client, n, note) from stdin") as copy:
            for i in range(1000):
                copy.write_row((-7, i, "x" * (i % 50)))
        out = bytearray()
        with conn.cursor().copy("copy (select n from items where client = -7 order by n) to stdout") as copy:
            for chunk in copy:
                out += chunk
        assert out.decode().split() == [str(i) for i in range(1000)]
        conn.rollback()


def test_large_result_streams_through(proxy: ProxyRunner) -> None:
    with psycopg.connect(proxy.dsn()) as conn:
        row = conn.execute("select string_agg(md5(i::text), '') from generate_series(1, 200000) i").fetchone()
        assert row is not None and len(row[0]) == 32 * 200000
        rows = conn.execute("select i, repeat('y', 100) from generate_series(1, 50000) i").fetchall()
        assert len(rows) == 50000 and rows[-1][0] == 50000


def test_unreported_set_does_not_leak_to_the_next_client(make_proxy: Callable[..., ProxyRunner],
                                                         pg: EmbeddedPostgres) -> None:
    pg.execute(f"do $$ begin create role hp_other_role; exception when duplicate_object then null; end $$;"
               f" grant hp_other_role to {OWNER}")
    proxy = make_proxy(db={"pool_size": 1, "min_pool_size": 1})
    with psycopg.connect(proxy.dsn(application_name="setter"), autocommit=True) as setter, \
            psycopg.connect(proxy.dsn(application_name="other"), autocommit=True) as other:
        defaults = other.execute("select current_setting('search_path'), current_setting('statement_timeout'),"
                                 " current_user").fetchone()
        setter.execute("set search_path = pg_catalog")
        setter.execute("set statement_timeout = '1234ms'")
        setter.execute("set role hp_other_role")  # pins the setter to the one server connection...
        setter.execute("reset role")  # ...until it is undone
        assert other.execute("select current_setting('search_path'), current_setting('statement_timeout'),"
                             " current_user").fetchone() == defaults
        assert other.execute("show application_name").fetchone() == ("other",)
        assert setter.execute("show application_name").fetchone() == ("setter",)
        # the setter's own settings follow it to whichever server connection runs its next transaction
        assert setter.execute("select current_setting('search_path'), current_setting('statement_timeout'),"
                              " current_user").fetchone() == ("pg_catalog", "1234ms", OWNER)
    assert proxy.state.databases[APPDB].pool.stats.opened == 1


@pytest.mark.parametrize("mode", ["transaction", "session"])
def test_slow_reader_leaving_mid_transaction_frees_its_server(make_proxy: Callable[..., ProxyRunner],
                                                              mode: str) -> None:
    """A client that stops reading (backpressure pauses its server) and then leaves must not pin the server."""
    proxy = make_proxy(query_wait_timeout=5, pool_mode=mode, db={"pool_size": 1, "min_pool_size": 0})
    sock = raw_login(proxy.port, rcvbuf=4096)
    sock.sendall(query_msg(("begin; " if mode == "transaction" else "") + "select repeat('x', 3000000)"))
    time.sleep(0.7)  # the result fills the client's buffers; hyperpool pauses reading from the server
    sock.close()
    with psycopg.connect(proxy.dsn(), autocommit=True) as conn:
        assert conn.execute("select 'next'").fetchone() == ("next",)
        assert conn.info.transaction_status == psycopg.pq.TransactionStatus.IDLE


def test_copy_from_stdin_releases_the_server(make_proxy: Callable[..., ProxyRunner], items_table: str) -> None:
    proxy = make_proxy(query_wait_timeout=3, db={"pool_size": 1, "min_pool_size": 0})
    with raw_login(proxy.port) as copier:
        copier.sendall(query_msg("copy items (client, n) from stdin"))
        assert [k for k, _ in read_messages(copier, until=b"G")] == [b"G"]
        copier.sendall(message(b"d", b"-9\t1\n") + message(b"c"))
        assert [k for k, _ in read_messages(copier, until=b"Z")] == [b"C", b"Z"]
        with psycopg.connect(proxy.dsn(), autocommit=True) as other:  # gets the only server connection
            assert other.execute("select count(*) from items where client = -9").fetchone() == (1,)
    pool = proxy.state.databases[APPDB].pool
    assert pool.stats.closed == 0  # reused, never closed as "mid-query"


def test_cancel_never_reaches_the_next_client(make_proxy: Callable[..., ProxyRunner]) -> None:
    """A cancel racing the end of A's query must not cancel B's query on the same server connection."""
    proxy = make_proxy(db={"pool_size": 1, "min_pool_size": 0})
    hits = []
    for delta_ms in (-2, -1, 0, 0.5, 1, 2, 3, 5):
        a, b = raw_login(proxy.port), raw_login(proxy.port)
        a.sendall(query_msg("select pg_sleep(0.2)"))
        started = time.perf_counter()
        time.sleep(0.02)
        b.sendall(query_msg("select 'B', pg_sleep(0.3)"))  # waits for A's server connection
        while time.perf_counter() < started + 0.2 - delta_ms / 1000:
            pass
        with socket.create_connection(("127.0.0.1", proxy.port)) as c:
            c.sendall(struct.pack("!ii", 16, 80877102) + a.backend_key)
        read_messages(a, until=b"Z")
        b_errors = [error_code(p) for k, p in read_messages(b, until=b"Z") if k == b"E"]
        if b_errors:
            hits.append((delta_ms, b_errors))
        a.close()
        b.close()
    assert hits == []


def _cstr(text: str) -> bytes:
    return text.encode() + b"\0"


def _parse_bind_execute(sql: str) -> bytes:
    return (message(b"P", _cstr("") + _cstr(sql) + struct.pack("!h", 0))
            + message(b"B", _cstr("") + _cstr("") + struct.pack("!hhh", 0, 0, 0))
            + message(b"E", _cstr("") + struct.pack("!i", 0)))


def test_extended_protocol_copy_releases_the_server(make_proxy: Callable[..., ProxyRunner],
                                                    items_table: str) -> None:
    """libpq's PQexecParams COPY: the Sync behind Execute is ignored by PostgreSQL during copy-in."""
    proxy = make_proxy(query_wait_timeout=3, db={"pool_size": 1, "min_pool_size": 0})
    with raw_login(proxy.port) as copier:
        copier.sendall(_parse_bind_execute("copy items (client, n) from stdin") + message(b"S"))
        assert read_messages(copier, until=b"G")[-1][0] == b"G"
        copier.sendall(message(b"d", b"-8\t1\n") + message(b"c") + message(b"S"))
        assert [k for k, _ in read_messages(copier, until=b"Z")] == [b"C", b"Z"]
        with psycopg.connect(proxy.dsn(), autocommit=True) as other:  # gets the only server connection
            assert other.execute("select count(*) from items where client = -8").fetchone() == (1,)


@pytest.mark.parametrize("unsynced", ["set search_path = leaked_by_a", "select 1/0"])
def test_copy_done_outside_copy_does_not_release_an_unsynced_server(make_proxy: Callable[..., ProxyRunner],
                                                                   unsynced: str) -> None:
    """A stray CopyDone must not make hyperpool think a Parse/Bind/Execute without Sync is finished."""
    proxy = make_proxy(query_wait_timeout=2, db={"pool_size": 1, "min_pool_size": 0})
    with raw_login(proxy.port) as a:
        a.sendall(query_msg("select 1") + _parse_bind_execute(unsynced) + message(b"c"))
        assert read_messages(a, until=b"Z")[-1] == (b"Z", b"I")
        time.sleep(0.2)
        with raw_login(proxy.port) as b:
            b.sendall(query_msg("show search_path"))
            got = read_messages(b, until=b"ZE")
    # B either waited for A's server and timed out, or got a clean answer: never A's leftovers
    kinds = [k for k, _ in got]
    assert kinds in ([b"T", b"D", b"C", b"Z"], [b"E"]), got
    assert not any(b"leaked_by_a" in p for _, p in got)


def test_no_state_left_behind_after_many_clients(make_proxy: Callable[..., ProxyRunner]) -> None:
    """Sessions, cancel keys, client counts and checked-out servers all return to zero."""
    proxy = make_proxy(db={"pool_size": 3, "min_pool_size": 1})

    async def churn(i: int) -> None:
        conn = await asyncpg.connect(host="127.0.0.1", port=proxy.port, user=APP_USER, password=APP_PASSWORD,
                                     database=APPDB)
        try:
            if i % 3 == 0:
                tx = conn.transaction()
                await tx.start()
                await conn.execute("select 1")  # leave in the middle of a transaction
            else:
                assert await conn.fetchval("select $1::int", i) == i
        finally:
            if i % 5 == 0:
                conn.terminate()  # no Terminate message, just a dropped socket
            else:
                await conn.close()

    async def main() -> None:
        for start in range(0, 150, 30):
            await asyncio.gather(*(churn(i) for i in range(start, start + 30)))

    asyncio.run(main())

    def leftovers() -> tuple[int, int, int, int]:
        db = proxy.state.databases[APPDB]
        return len(proxy.state.sessions), len(proxy.state.cancel_keys), db.clients, len(db.pool.active)

    deadline = time.monotonic() + 5
    while leftovers() != (0, 0, 0, 0) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert proxy.run(leftovers) == (0, 0, 0, 0)
    pool = proxy.state.databases[APPDB].pool
    assert pool.stats.opened <= 3 + pool.stats.closed
