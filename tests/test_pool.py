"""Unit tests for hyperpool.pool: a fake connection, a controllable fake connect, an injected clock.

No PostgreSQL and no sleeping to see an expiry: the pool's own ages (server_lifetime,
server_idle_timeout, server_login_retry) come from the fake clock. The one exception is
query_wait_timeout, which the pool measures with asyncio.timeout (loop time), so those
tests use a timeout of a few hundredths of a second.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Coroutine
from typing import Any, TypeVar

import pytest

from hyperpool.config import PoolSettings
from hyperpool.errors import PoolError, UpstreamError
from hyperpool.pool import Pool

T = TypeVar("T")
BOUND = 1.0  # seconds: no single test may wait longer than this for anything


class FakeClock:
    def __init__(self, now: float = 1000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


class FakeConn:
    """Has what the pool needs; close() calls on_close, as hyperpool.upstream.ServerConnection does."""

    def __init__(self, n: int, now: float) -> None:
        self.n = n
        self.closed = False
        self.created_at = now
        self.last_used = now
        self.on_close: Callable[..., None] | None = None
        self.close_reason: str | None = None

    def close(self, reason: str) -> None:
        if self.closed:
            return
        self.closed = True
        self.close_reason = reason
        if self.on_close is not None:
            self.on_close(self)

    def __repr__(self) -> str:
        return f"FakeConn({self.n}{', closed' if self.closed else ''})"


class FakeConnect:
    """The pool's ``connect``: succeeds, raises ``fail``, or blocks until ``gate`` is set."""

    def __init__(self, clock: FakeClock) -> None:
        self.clock = clock
        self.calls = 0
        self.cancelled = 0
        self.made: list[FakeConn] = []
        self.fail: BaseException | None = None
        self.gate: asyncio.Event | None = None
        self.pool: Pool[FakeConn] | None = None
        self.max_size = 0  # the largest pool.size seen while a connect is in progress

    async def __call__(self) -> FakeConn:
        self.calls += 1
        if self.pool is not None:
            self.max_size = max(self.max_size, self.pool.size)
        try:
            await asyncio.sleep(0)  # a real connect always yields at least once
            if self.gate is not None:
                await self.gate.wait()
        except asyncio.CancelledError:
            self.cancelled += 1
            raise
        if self.fail is not None:
            raise self.fail
        conn = FakeConn(len(self.made) + 1, self.clock())
        self.made.append(conn)
        return conn


def settings(**overrides: Any) -> PoolSettings:
    base = {"pool_size": 2, "min_pool_size": 0, "query_wait_timeout": 5.0, "server_idle_timeout": 60.0,
            "server_lifetime": 3600.0, "server_login_retry": 1.0}
    base.update(overrides)
    return PoolSettings(**base)


def make_pool(**overrides: Any) -> tuple[Pool[FakeConn], FakeClock, FakeConnect]:
    clock = FakeClock()
    connect = FakeConnect(clock)
    pool: Pool[FakeConn] = Pool("appdb", settings(**overrides), connect, clock)
    connect.pool = pool
    return pool, clock, connect


def run(test: Callable[[], Coroutine[Any, Any, None]]) -> None:
    async def bounded() -> None:
        async with asyncio.timeout(BOUND * 2):
            await test()

    asyncio.run(bounded())


async def bounded(aw: Awaitable[T], seconds: float = BOUND) -> T:
    async with asyncio.timeout(seconds):
        return await aw


async def settle(rounds: int = 10) -> None:
    """Let spawned tasks (connects, woken waiters) run; no time passes."""
    for _ in range(rounds):
        await asyncio.sleep(0)


async def acquire(pool: Pool[FakeConn]) -> FakeConn:
    return await bounded(pool.acquire())


def check(pool: Pool[FakeConn]) -> None:
    """Invariants that hold whenever the pool is at rest."""
    assert pool.size <= pool.settings.pool_size
    assert not set(pool.idle) & pool.active
    assert len(set(pool.idle)) == len(pool.idle)
    assert not any(conn.closed for conn in pool.idle)
    assert not any(conn.closed for conn in pool.active)


# --- acquire / release / reuse ----------------------------------------------------------


def test_acquire_opens_release_returns_and_acquire_reuses() -> None:
    async def body() -> None:
        pool, clock, connect = make_pool()
        conn = await acquire(pool)
        assert connect.calls == 1 and pool.stats.opened == 1
        assert pool.active == {conn} and not pool.idle
        assert conn.on_close == pool.connection_closed
        clock.now += 5
        pool.release(conn)
        assert list(pool.idle) == [conn] and not pool.active
        assert conn.last_used == clock.now
        again = await acquire(pool)
        assert again is conn
        assert pool.stats.opened == 1 and connect.calls == 1
        check(pool)
        await pool.close()

    run(body)


def test_lifo_reuses_the_warmest_idle_connection() -> None:
    async def body() -> None:
        pool, clock, _ = make_pool(pool_size=3)
        first, second, third = [await acquire(pool) for _ in range(3)]
        for conn in (second, third, first):
            clock.now += 1
            pool.release(conn)
        assert await acquire(pool) is first  # released last
        assert await acquire(pool) is third
        assert await acquire(pool) is second
        assert pool.stats.opened == 3
        await pool.close()

    run(body)


def test_excess_waiters_are_served_fifo_without_exceeding_pool_size() -> None:
    async def body() -> None:
        pool, _, connect = make_pool(pool_size=2)
        held = [await acquire(pool), await acquire(pool)]
        served: list[int] = []

        async def client(i: int) -> None:
            conn = await acquire(pool)
            served.append(i)
            assert pool.size <= 2
            await asyncio.sleep(0)
            pool.release(conn)

        tasks = [asyncio.create_task(client(i)) for i in range(8)]
        await settle()
        assert served == [] and len(pool.waiters) == 8
        assert connect.calls == 2  # no room: nothing is opened for the waiters
        for conn in held:
            pool.release(conn)
        await bounded(asyncio.gather(*tasks))
        assert served == list(range(8))
        assert pool.stats.opened == 2 and len(pool.idle) == 2 and not pool.waiters
        check(pool)
        await pool.close()

    run(body)


def test_concurrent_acquires_never_exceed_pool_size() -> None:
    async def body() -> None:
        pool, _, connect = make_pool(pool_size=3)
        sizes: list[int] = []

        async def client() -> None:
            conn = await acquire(pool)
            sizes.append(pool.size)
            await asyncio.sleep(0)
            pool.release(conn)

        await bounded(asyncio.gather(*(client() for _ in range(20))))
        assert max(sizes) <= 3 and connect.max_size <= 3
        assert pool.stats.opened <= 3 and connect.calls <= 3
        assert pool.size <= 3 and len(pool.idle) == pool.stats.opened
        check(pool)
        await pool.close()

    run(body)


def test_concurrent_acquires_with_slow_connects_never_exceed_pool_size() -> None:
    async def body() -> None:
        pool, _, connect = make_pool(pool_size=4)
        connect.gate = asyncio.Event()
        tasks = [asyncio.create_task(pool.acquire()) for _ in range(10)]
        await settle()
        assert pool.connecting == 4 and connect.calls == 4 and pool.size == 4
        connect.gate.set()
        conns = await bounded(asyncio.gather(*tasks[:4]))
        assert len(set(conns)) == 4
        for conn in conns:
            pool.release(conn)
        conns = await bounded(asyncio.gather(*tasks[4:8]))
        assert set(conns) == set(connect.made) and pool.stats.opened == 4
        for conn in conns:
            pool.release(conn)
        await bounded(asyncio.gather(*tasks[8:]))
        assert connect.calls == 4
        await pool.close()

    run(body)


# --- query_wait_timeout and cancellation ------------------------------------------------


def test_query_wait_timeout_then_release_goes_to_next_waiter_or_idle() -> None:
    async def body() -> None:
        pool, _, _ = make_pool(pool_size=1, query_wait_timeout=0.02)
        conn = await acquire(pool)
        impatient = asyncio.create_task(pool.acquire())
        await settle()
        pool.resize(settings(pool_size=1, query_wait_timeout=5.0))  # later waiters wait longer
        patient = asyncio.create_task(pool.acquire())
        with pytest.raises(PoolError) as info:
            await bounded(impatient)
        assert info.value.sqlstate == "08P01"
        assert info.value.message == "query_wait_timeout" and str(info.value) == "query_wait_timeout"
        assert pool.stats.wait_timeouts == 1
        assert len(pool.waiters) == 1 and not patient.done()
        pool.release(conn)
        assert await bounded(patient) is conn
        pool.release(conn)
        assert list(pool.idle) == [conn] and not pool.active and not pool.waiters
        assert pool.stats.opened == 1
        await pool.close()

    run(body)


def test_query_wait_timeout_with_no_other_waiter_leaves_released_connection_idle() -> None:
    async def body() -> None:
        pool, _, _ = make_pool(pool_size=1, query_wait_timeout=0.02)
        conn = await acquire(pool)
        with pytest.raises(PoolError, match="query_wait_timeout"):
            await acquire(pool)
        assert pool.stats.wait_timeouts == 1 and not pool.waiters
        pool.release(conn)
        assert list(pool.idle) == [conn] and not pool.active
        assert await acquire(pool) is conn
        await pool.close()

    run(body)


def test_waiter_cancelled_while_waiting_is_removed() -> None:
    async def body() -> None:
        pool, _, _ = make_pool(pool_size=1)
        conn = await acquire(pool)
        waiter = asyncio.create_task(pool.acquire())
        await settle()
        waiter.cancel()
        with pytest.raises(asyncio.CancelledError):
            await bounded(waiter)
        assert not pool.waiters
        pool.release(conn)
        assert list(pool.idle) == [conn] and not pool.active
        await pool.close()

    run(body)


def test_waiter_cancelled_after_handover_does_not_leak_the_connection() -> None:
    async def body() -> None:
        pool, _, _ = make_pool(pool_size=1, query_wait_timeout=0.05)
        conn = await acquire(pool)
        waiter = asyncio.create_task(pool.acquire())
        await settle()
        pool.release(conn)  # hands conn to the waiter's future ...
        waiter.cancel()  # ... and the client goes away before its task runs again
        with pytest.raises(asyncio.CancelledError):
            await bounded(waiter)
        assert conn not in pool.active, "nobody holds conn, but the pool counts it as checked out"
        assert list(pool.idle) == [conn]
        assert await acquire(pool) is conn
        await pool.close()

    run(body)


# --- connect failures -------------------------------------------------------------------


def test_connect_failure_fails_fast_for_server_login_retry_then_retries() -> None:
    async def body() -> None:
        pool, clock, connect = make_pool(server_login_retry=1.0)
        error = UpstreamError("could not connect to the database at 127.0.0.1:1: refused")
        connect.fail = error
        with pytest.raises(UpstreamError) as info:
            await acquire(pool)
        assert info.value is error
        assert connect.calls == 1 and pool.stats.connect_failures == 1
        clock.now += 0.5
        with pytest.raises(UpstreamError) as info:
            await acquire(pool)
        assert info.value is error and connect.calls == 1
        connect.fail = None  # the database is back, but the pool does not ask yet
        clock.now += 0.4
        with pytest.raises(UpstreamError):
            await acquire(pool)
        assert connect.calls == 1 and pool.stats.connect_failures == 1
        clock.now += 0.2  # 1.1 s after the failure
        conn = await acquire(pool)
        assert connect.calls == 2 and pool.stats.opened == 1 and pool.active == {conn}
        assert not pool.waiters and pool.connecting == 0
        check(pool)
        await pool.close()

    run(body)


def test_connect_failure_fails_only_the_first_waiter() -> None:
    async def body() -> None:
        pool, _, connect = make_pool(pool_size=1)
        held = await acquire(pool)
        connect.fail = UpstreamError("down")
        first = asyncio.create_task(pool.acquire())
        second = asyncio.create_task(pool.acquire())
        await settle()
        pool.discard(held, "broken")  # room for one connect, which fails
        await settle()
        assert first.done() and isinstance(first.exception(), UpstreamError)
        assert not second.done() and list(pool.waiters) and pool.size == 0
        second.cancel()
        await asyncio.gather(second, return_exceptions=True)
        await pool.close()

    run(body)


def test_unexpected_connect_exception_becomes_upstream_error() -> None:
    async def body() -> None:
        pool, _, connect = make_pool()
        connect.fail = ConnectionRefusedError("refused")
        with pytest.raises(UpstreamError) as info:
            await acquire(pool)
        assert info.value.sqlstate == "08006" and "ConnectionRefusedError" in info.value.message
        assert pool.stats.connect_failures == 1 and pool.size == 0
        await pool.close()

    run(body)


# --- min_pool_size, server_idle_timeout, server_lifetime --------------------------------


def test_maintain_opens_up_to_min_pool_size() -> None:
    async def body() -> None:
        pool, _, connect = make_pool(pool_size=5, min_pool_size=3)
        pool.maintain()
        await settle()
        assert len(pool.idle) == 3 and pool.stats.opened == 3 and connect.calls == 3
        pool.maintain()
        await settle()
        assert connect.calls == 3
        check(pool)
        await pool.close()

    run(body)


def test_idle_timeout_retires_oldest_idle_above_min_pool_size_only() -> None:
    async def body() -> None:
        pool, clock, _ = make_pool(pool_size=5, min_pool_size=2, server_idle_timeout=10.0)
        conns = [await acquire(pool) for _ in range(4)]
        for conn in conns:
            clock.now += 1
            pool.release(conn)  # last_used: t+1 .. t+4
        clock.now += 7.5  # only the first (idle 10.5 s) is past the 10 s timeout
        pool.maintain()
        assert [c.closed for c in conns] == [True, False, False, False]
        assert conns[0].close_reason == "server_idle_timeout"
        clock.now += 100  # all are past the timeout, but two must stay
        pool.maintain()
        await settle()
        assert [c.closed for c in conns] == [True, True, False, False]
        assert conns[1].close_reason == "server_idle_timeout"
        assert pool.size == 2 and list(pool.idle) == conns[2:]
        assert pool.stats.closed == 2 and pool.stats.opened == 4
        clock.now += 100
        pool.maintain()
        await settle()
        assert pool.size == 2 and pool.stats.opened == 4
        check(pool)
        await pool.close()

    run(body)


def test_zero_idle_timeout_and_lifetime_disable_them() -> None:
    async def body() -> None:
        pool, clock, _ = make_pool(server_idle_timeout=0, server_lifetime=0)
        conn = await acquire(pool)
        pool.release(conn)
        clock.now += 1e6
        pool.maintain()
        assert list(pool.idle) == [conn]
        await pool.close()

    run(body)


def test_server_lifetime_retires_at_release_and_replaces_for_a_waiter() -> None:
    async def body() -> None:
        pool, clock, _ = make_pool(pool_size=1, server_lifetime=100.0)
        old = await acquire(pool)
        waiter = asyncio.create_task(pool.acquire())
        await settle()
        clock.now += 101
        pool.release(old)
        assert old.closed and old.close_reason == "server_lifetime"
        new = await bounded(waiter)
        assert new is not old and pool.stats.opened == 2 and pool.stats.closed == 1
        assert pool.active == {new}
        await pool.close()

    run(body)


def test_server_lifetime_retires_idle_in_maintain_and_min_pool_size_is_refilled() -> None:
    async def body() -> None:
        pool, clock, _ = make_pool(pool_size=3, min_pool_size=1, server_lifetime=100.0, server_idle_timeout=0)
        pool.maintain()
        await settle()
        (old,) = pool.idle
        clock.now += 50
        pool.maintain()
        assert not old.closed
        clock.now += 51
        pool.maintain()
        assert old.closed and old.close_reason == "server_lifetime"
        await settle()
        (new,) = pool.idle
        assert new is not old and pool.stats.opened == 2 and pool.stats.closed == 1
        check(pool)
        await pool.close()

    run(body)


def test_expired_idle_connection_is_not_handed_out() -> None:
    async def body() -> None:
        pool, clock, _ = make_pool(server_lifetime=100.0)
        old = await acquire(pool)
        pool.release(old)
        clock.now += 101
        new = await acquire(pool)
        assert new is not old and old.closed and old.close_reason == "server_lifetime"
        assert pool.stats.opened == 2 and pool.stats.closed == 1 and pool.active == {new}
        await pool.close()

    run(body)


# --- connections that die on their own ----------------------------------------------------


def test_connection_dying_while_idle_is_dropped_and_not_handed_out() -> None:
    async def body() -> None:
        pool, _, _ = make_pool(pool_size=1)
        dead = await acquire(pool)
        pool.release(dead)
        dead.closed = True  # pg_terminate_backend: the connection notices and tells the pool
        pool.connection_closed(dead)
        assert not pool.idle and pool.size == 0 and pool.stats.closed == 1
        fresh = await acquire(pool)
        assert fresh is not dead and not fresh.closed and pool.stats.opened == 2
        await pool.close()

    run(body)


def test_connection_dying_via_on_close_while_idle() -> None:
    async def body() -> None:
        pool, _, _ = make_pool(pool_size=2)
        a, b = await acquire(pool), await acquire(pool)
        pool.release(a)
        pool.release(b)
        b.close("server closed the connection")  # calls on_close, like ServerConnection._mark_closed
        assert list(pool.idle) == [a] and pool.stats.closed == 1
        assert await acquire(pool) is a
        await pool.close()

    run(body)


def test_closed_idle_connection_unknown_to_the_pool_is_skipped_by_acquire() -> None:
    async def body() -> None:
        pool, _, _ = make_pool(pool_size=2)
        a, b = await acquire(pool), await acquire(pool)
        pool.release(a)
        pool.release(b)
        b.closed = True  # died, but on_close has not run yet
        assert await acquire(pool) is a
        assert not pool.idle and pool.stats.closed == 1
        await pool.close()

    run(body)


def test_connection_dying_while_active_is_removed_and_frees_room_for_a_waiter() -> None:
    async def body() -> None:
        pool, _, _ = make_pool(pool_size=1)
        dead = await acquire(pool)
        waiter = asyncio.create_task(pool.acquire())
        await settle()
        dead.closed = True
        pool.connection_closed(dead)
        assert dead not in pool.active
        fresh = await bounded(waiter)
        assert fresh is not dead and pool.active == {fresh} and pool.stats.closed == 1
        pool.connection_closed(dead)  # a second notice changes nothing
        assert pool.stats.closed == 1 and pool.active == {fresh}
        await pool.close()

    run(body)


def test_releasing_a_dead_connection_retires_it() -> None:
    async def body() -> None:
        pool, _, _ = make_pool(pool_size=1)
        conn = await acquire(pool)
        conn.closed = True  # closed under the session, on_close not run (yet)
        pool.release(conn)
        assert not pool.idle and not pool.active and pool.stats.closed == 1
        await pool.close()

    run(body)


def test_dead_connection_counted_once_when_the_session_then_discards_it() -> None:
    async def body() -> None:
        pool, _, _ = make_pool(pool_size=1)
        conn = await acquire(pool)
        conn.close("server connection lost: reset by peer")  # on_close -> pool.connection_closed
        assert pool.stats.closed == 1 and not pool.active
        pool.discard(conn, "client disconnected mid-query")  # what session._return_server does then
        assert pool.stats.closed == 1, "one connection closed, counted twice"
        assert pool.stats.closed <= pool.stats.opened
        await pool.close()

    run(body)


# --- discard, pause/resume, resize, close --------------------------------------------------


def test_discard_closes_and_opens_a_new_connection_for_a_waiter() -> None:
    async def body() -> None:
        pool, _, connect = make_pool(pool_size=1)
        broken = await acquire(pool)
        waiter = asyncio.create_task(pool.acquire())
        await settle()
        assert connect.calls == 1
        pool.discard(broken, "reset failed")
        assert broken.closed and broken.close_reason == "reset failed"
        fresh = await bounded(waiter)
        assert fresh is not broken and connect.calls == 2
        assert pool.active == {fresh} and pool.stats.closed == 1 and pool.stats.opened == 2
        await pool.close()

    run(body)


def test_pause_holds_acquires_and_resume_serves_them() -> None:
    async def body() -> None:
        pool, _, connect = make_pool(pool_size=1)
        conn = await acquire(pool)
        pool.release(conn)
        pool.pause()
        waiter = asyncio.create_task(pool.acquire())
        await settle()
        assert not waiter.done() and list(pool.idle) == [conn]
        assert connect.calls == 1
        pool.resume()
        assert await bounded(waiter) is conn
        assert not pool.idle and pool.active == {conn}
        await pool.close()

    run(body)


def test_release_while_paused_goes_idle_until_resume() -> None:
    async def body() -> None:
        pool, _, _ = make_pool(pool_size=1)
        conn = await acquire(pool)
        pool.pause()
        waiter = asyncio.create_task(pool.acquire())
        await settle()
        pool.release(conn)
        await settle()
        assert not waiter.done() and list(pool.idle) == [conn]
        pool.resume()
        assert await bounded(waiter) is conn
        await pool.close()

    run(body)


def test_resize_smaller_closes_idle_excess_oldest_first() -> None:
    async def body() -> None:
        pool, clock, _ = make_pool(pool_size=4)
        conns = [await acquire(pool) for _ in range(4)]
        for conn in conns:
            clock.now += 1
            pool.release(conn)
        pool.resize(settings(pool_size=2))
        assert pool.size == 2 and list(pool.idle) == conns[2:]
        assert [c.close_reason for c in conns[:2]] == ["pool resized", "pool resized"]
        assert pool.stats.closed == 2
        check(pool)
        await pool.close()

    run(body)


def test_resize_larger_opens_for_waiters() -> None:
    async def body() -> None:
        pool, _, _ = make_pool(pool_size=1)
        held = await acquire(pool)
        waiter = asyncio.create_task(pool.acquire())
        await settle()
        assert not waiter.done()
        pool.resize(settings(pool_size=2))
        conn = await bounded(waiter)
        assert conn is not held and pool.stats.opened == 2
        await pool.close()

    run(body)


def test_resize_smaller_shrinks_when_active_connections_come_back() -> None:
    async def body() -> None:
        pool, _, _ = make_pool(pool_size=4, server_idle_timeout=0)
        conns = [await acquire(pool) for _ in range(4)]
        pool.resize(settings(pool_size=2, server_idle_timeout=0))  # all four are busy now
        for conn in conns:
            pool.release(conn)
        pool.maintain()
        assert pool.size <= 2, f"{pool.size} connections kept for pool_size 2"
        await pool.close()

    run(body)


def test_close_fails_waiters_closes_connections_and_cancels_connects() -> None:
    async def body() -> None:
        pool, _, connect = make_pool(pool_size=3)
        active, held = await acquire(pool), await acquire(pool)
        connect.gate = asyncio.Event()
        waiter = asyncio.create_task(pool.acquire())
        await settle()
        assert pool.connecting == 1 and len(pool._tasks) == 1
        await bounded(pool.close())
        assert active.closed and held.closed
        assert active.close_reason == held.close_reason == "pool closed"
        with pytest.raises(PoolError) as info:
            await bounded(waiter)
        assert info.value.sqlstate == "57P01"
        assert connect.cancelled == 1 and not pool._tasks
        assert pool.connecting == 0 and not pool.idle and not pool.active
        with pytest.raises(PoolError) as info:
            await acquire(pool)
        assert info.value.sqlstate == "57P01"
        pool.release(active)  # a session handing its connection back after close
        assert not pool.idle and not pool.active

    run(body)


def test_close_before_a_spawned_connect_has_started() -> None:
    async def body() -> None:
        pool, _, connect = make_pool(pool_size=1)
        waiter = asyncio.create_task(pool.acquire())
        await asyncio.sleep(0)  # the acquire runs and spawns a connect task, which has not run yet
        await bounded(pool.close())
        with pytest.raises(PoolError):
            await bounded(waiter)
        assert connect.calls == 0 and not pool._tasks
        assert pool.connecting == 0 and pool.size == 0

    run(body)


def test_unknown_connection_closed_notice_is_ignored() -> None:
    async def body() -> None:
        pool, clock, _ = make_pool()
        stranger = FakeConn(99, clock())
        stranger.closed = True
        pool.connection_closed(stranger)
        assert pool.stats.closed == 0 and pool.size == 0
        await pool.close()

    run(body)

