"""The latency relay against a real PostgreSQL.

Timing assertions are lower bounds or orderings only (the relay guarantees delays, the shared machine
guarantees nothing about speed), so a slow machine can make these tests slower, never flaky.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator

import psycopg
import pytest

from hyperpool.embedded import EmbeddedPostgres
from tests.latency_relay import LatencyRelay, ThreadedRelay
from tests.support import APPDB, OWNER, OWNER_PASSWORD


def dsn(port: int) -> str:
    return (f"host=127.0.0.1 port={port} user={OWNER} password={OWNER_PASSWORD} dbname={APPDB} "
            "sslmode=disable connect_timeout=5")


def connect_time(port: int) -> tuple[float, psycopg.Connection]:
    start = time.perf_counter()
    conn = psycopg.connect(dsn(port), autocommit=True)
    return time.perf_counter() - start, conn


def query_time(conn: psycopg.Connection, rounds: int = 2) -> float:
    start = time.perf_counter()
    for _ in range(rounds):
        assert conn.execute("select 1").fetchone() == (1,)
    return time.perf_counter() - start


@pytest.fixture
def relays(pg: EmbeddedPostgres) -> Iterator[list[ThreadedRelay]]:
    started: list[ThreadedRelay] = []
    yield started
    for relay in started:
        relay.stop()


def relay_to(pg: EmbeddedPostgres, relays: list[ThreadedRelay], one_way: float) -> ThreadedRelay:
    relay = ThreadedRelay("127.0.0.1", pg.port, one_way).start()
    relays.append(relay)
    return relay


def test_delay_adds_a_round_trip_per_query_and_to_connection_setup(pg: EmbeddedPostgres,
                                                                   relays: list[ThreadedRelay]) -> None:
    relay = relay_to(pg, relays, 0.020)
    setup, conn = connect_time(relay.port)
    with conn:
        # TCP handshake + startup + SCRAM's two exchanges: four round trips of 40 ms at least.
        assert setup >= 4 * 0.040 * 0.95
        elapsed = query_time(conn, rounds=2)
        assert elapsed >= 2 * 0.040 * 0.95


def test_a_farther_location_is_slower(pg: EmbeddedPostgres, relays: list[ThreadedRelay]) -> None:
    near, far = relay_to(pg, relays, 0.005), relay_to(pg, relays, 0.050)
    near_setup, near_conn = connect_time(near.port)
    far_setup, far_conn = connect_time(far.port)
    with near_conn, far_conn:
        assert far_setup - near_setup >= 0.180  # 4 round trips, 90 ms more each: generous
        assert query_time(far_conn) - query_time(near_conn) >= 0.060  # 2 round trips, 90 ms more each


def test_set_delay_applies_to_new_traffic(pg: EmbeddedPostgres, relays: list[ThreadedRelay]) -> None:
    relay = relay_to(pg, relays, 0.0)
    _, conn = connect_time(relay.port)
    with conn:
        relay.set_delay(0.050)
        assert query_time(conn, rounds=1) >= 0.100 * 0.95
        relay.set_delay(0.0)
        assert conn.execute("select 2").fetchone() == (2,)


def test_kill_closes_connections_and_refuses_new_ones_until_revived(pg: EmbeddedPostgres,
                                                                     relays: list[ThreadedRelay]) -> None:
    relay = relay_to(pg, relays, 0.001)
    _, conn = connect_time(relay.port)
    with conn:
        relay.kill()
        with pytest.raises(psycopg.OperationalError):
            conn.execute("select 1")
    with pytest.raises(psycopg.OperationalError):
        psycopg.connect(dsn(relay.port))
    relay.revive()
    _, again = connect_time(relay.port)
    with again:
        assert again.execute("select 3").fetchone() == (3,)


def test_relay_bytes_in_order_with_backpressure(pg: EmbeddedPostgres, relays: list[ThreadedRelay]) -> None:
    relay = ThreadedRelay("127.0.0.1", pg.port, 0.002, max_buffer=4096).start()
    relays.append(relay)
    _, conn = connect_time(relay.port)
    with conn:
        rows = conn.execute("select g, repeat('x', 100) from generate_series(1, 5000) g").fetchall()
        assert [r[0] for r in rows] == list(range(1, 5001))
        big = "y" * 200_000
        assert conn.execute("select length(%s)", (big,)).fetchone() == (200_000,)


def test_max_connections_refuses_extra(pg: EmbeddedPostgres, relays: list[ThreadedRelay]) -> None:
    relay = ThreadedRelay("127.0.0.1", pg.port, 0.0, max_connections=1).start()
    relays.append(relay)
    _, conn = connect_time(relay.port)
    with conn:
        with pytest.raises(psycopg.OperationalError):
            psycopg.connect(dsn(relay.port))
        assert relay.relay.refused == 1
    # The first connection's slot is free again once it has closed.
    deadline = time.monotonic() + 5
    while relay.relay.connections and time.monotonic() < deadline:
        time.sleep(0.01)
    _, again = connect_time(relay.port)
    again.close()


@pytest.mark.parametrize("host", ["10.0.0.1", "192.168.1.10", "example.com", "::2", "0.0.0.0"])
def test_non_loopback_target_refused(host: str) -> None:
    with pytest.raises(ValueError, match="loopback"):
        LatencyRelay(host, 5432, 0.01)
    with pytest.raises(ValueError, match="loopback"):
        LatencyRelay("127.0.0.1", 5432, 0.01, listen_host=host)


def test_async_api_with_an_unreachable_target() -> None:
    """Directly on asyncio: the upstream connect fails after the emulated handshake and the client sees EOF."""
    async def scenario() -> tuple[float, bytes]:
        probe = await asyncio.start_server(lambda r, w: None, "127.0.0.1", 0)
        port = probe.sockets[0].getsockname()[1]
        probe.close()
        await probe.wait_closed()  # nothing listens on port any more
        relay = await LatencyRelay("127.0.0.2", port, 0.030).start()
        try:
            start = time.perf_counter()
            reader, writer = await asyncio.open_connection("127.0.0.1", relay.port)
            data = await asyncio.wait_for(reader.read(), 5)
            writer.close()
            return time.perf_counter() - start, data
        finally:
            await relay.stop()

    elapsed, data = asyncio.run(scenario())
    assert data == b""
    assert elapsed >= 0.060 * 0.95
