"""A pool of server connections for one (database, origin user).

The pool knows nothing about SQL or the protocol: it opens connections with
the ``connect`` callable it is given, hands them out in FIFO order of the
waiting clients, takes them back, and retires them by age and idleness.
Time comes from an injected clock.
"""

from __future__ import annotations

import asyncio
import logging
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Generic, Protocol, TypeVar

from hyperpool.config import PoolSettings
from hyperpool.errors import PoolError, ProxyError, UpstreamError
from hyperpool.stats import close_category

log = logging.getLogger("hyperpool.pool")


class Pooled(Protocol):
    """What the pool needs from a connection."""

    closed: bool
    generation: int
    created_at: float
    last_used: float
    on_close: Callable[..., None] | None

    def close(self, reason: str) -> None: ...


C = TypeVar("C", bound=Pooled)


@dataclass
class PoolStats:
    opened: int = 0
    closed: int = 0
    connect_failures: int = 0
    wait_timeouts: int = 0
    closed_reasons: dict[str, int] = field(default_factory=dict)  # stats.close_category -> count


class Pool(Generic[C]):
    """Connections for one database; at most ``settings.pool_size`` exist at once."""

    def __init__(self, name: str, settings: PoolSettings, connect: Callable[[], Awaitable[C]],
                 clock: Callable[[], float]) -> None:
        self.name = name
        self.settings = settings
        self._connect = connect
        self._clock = clock
        self.idle: deque[C] = deque()
        self.active: set[C] = set()
        self.connecting = 0
        self.waiters: deque[asyncio.Future[C]] = deque()
        self.stats = PoolStats()
        self.paused = False
        self.closed = False
        self.generation = 0  # bumped when the origin changes; older connections are not reused
        self._last_failure: tuple[float, ProxyError] | None = None
        self._tasks: set[asyncio.Task[None]] = set()

    @property
    def size(self) -> int:
        return len(self.idle) + len(self.active) + self.connecting

    # --- acquire / release --------------------------------------------------------------

    def try_acquire(self) -> C | None:
        """An idle connection right away, without waiting (the hot path); None if there is none."""
        if self.waiters or self.paused or self.closed:
            return None
        conn = self._take_idle()
        if conn is not None:
            self.active.add(conn)
        return conn

    async def acquire(self) -> C:
        """A connection for the caller's exclusive use, waiting FIFO up to query_wait_timeout."""
        while True:
            conn = await self._acquire_once()
            if not conn.closed:
                return conn
            self.discard(conn, "died while being handed over")  # and wait again

    async def _acquire_once(self) -> C:
        if self.closed:
            raise PoolError(f"database {self.name} is shutting down", sqlstate="57P01")
        conn = self.try_acquire()
        if conn is not None:
            return conn
        waiter: asyncio.Future[C] = asyncio.get_running_loop().create_future()
        self.waiters.append(waiter)
        if not self.paused:
            self._grow()
        claimed = False
        try:
            async with asyncio.timeout(self.settings.query_wait_timeout or None):
                conn = await waiter
                claimed = True
        except TimeoutError:
            self.stats.wait_timeouts += 1
            raise PoolError("query_wait_timeout", sqlstate="08P01",
                            detail=f"no server connection for database {self.name} became free in "
                                   f"{self.settings.query_wait_timeout:g} s") from None
        finally:
            if waiter in self.waiters:
                self.waiters.remove(waiter)
            if not claimed and waiter.done() and not waiter.cancelled() and waiter.exception() is None:
                self.release(waiter.result())  # handed over, but the waiter gave up: pass it on
        return conn

    def _take_idle(self) -> C | None:
        idle = self.idle
        lifetime = self.settings.server_lifetime
        while idle:
            conn = idle[-1]  # LIFO: the warmest connection first
            if not conn.closed and conn.generation == self.generation and not (
                    lifetime and self._clock() - conn.created_at > lifetime):
                return idle.pop()
            self._retire(conn, "server_lifetime" if not conn.closed else "closed while idle")
        return None

    def release(self, conn: C) -> None:
        """Take a connection back; it must be idle and clean (the caller guarantees it)."""
        if conn not in self.active:  # e.g. it died and was already dropped
            if not conn.closed:
                conn.close("released twice")
            return
        now = self._clock()
        lifetime = self.settings.server_lifetime
        if (conn.closed or self.closed or conn.generation != self.generation
                or (lifetime and now - conn.created_at > lifetime)
                or len(self.idle) + len(self.active) + self.connecting > self.settings.pool_size):
            self._retire(conn, self._unfit(conn))
            self._grow()
            return
        self.active.discard(conn)
        conn.last_used = now
        if not self.paused:
            while self.waiters:
                waiter = self.waiters.popleft()
                if not waiter.done():
                    waiter.set_result(conn)
                    self.active.add(conn)
                    return
        self.idle.append(conn)

    def _unfit(self, conn: C) -> str:
        """Why a returning connection must not be reused ('' when it may)."""
        if conn.closed:
            return "closed"
        if self.closed:
            return "pool closed"
        if self._expired(conn):
            return "server_lifetime"
        if conn.generation != self.generation:
            return "origin changed"
        if self.size > self.settings.pool_size:
            return "pool resized"
        return ""

    def discard(self, conn: C, reason: str) -> None:
        """Close a connection that is not fit to be reused."""
        self._retire(conn, reason)
        self._grow()

    def _retire(self, conn: C, reason: str) -> None:
        tracked = conn in self.active or conn in self.idle
        if conn in self.idle:
            self.idle.remove(conn)
        self.active.discard(conn)
        if not conn.closed:
            conn.close(reason)
        if tracked:
            self._count_closed(reason)

    def _expired(self, conn: C) -> bool:
        lifetime = self.settings.server_lifetime
        return bool(lifetime) and self._clock() - conn.created_at > lifetime

    def connection_closed(self, conn: C) -> None:
        """Called by a connection that died on its own (e.g. pg_terminate_backend)."""
        if conn in self.idle or conn in self.active:
            self.idle.remove(conn) if conn in self.idle else self.active.discard(conn)
            self._count_closed("server lost")
            self._grow()

    def _count_closed(self, reason: str) -> None:
        self.stats.closed += 1
        category = close_category(reason)
        self.stats.closed_reasons[category] = self.stats.closed_reasons.get(category, 0) + 1

    def warm_up(self) -> None:
        """Open one connection if there is none (readiness wants a warm connection per database)."""
        if self.closed or self.size or self.connecting:
            return
        self.connecting += 1
        self._spawn(self._open_one(self.generation))

    @property
    def last_error(self) -> str:
        return self._last_failure[1].message if self._last_failure else ""

    def retarget(self) -> None:
        """The connections' destination changed (origin or placement): older connections are not reused, and
        the last connect failure (another destination's) no longer holds new connects back."""
        self.generation += 1
        self._last_failure = None
        for conn in list(self.idle):
            self.discard(conn, "destination changed")

    # --- opening connections ------------------------------------------------------------

    def _grow(self) -> None:
        """Open connections for waiting clients and for min_pool_size, within pool_size."""
        if self.closed:
            return
        wanted = max(len([w for w in self.waiters if not w.done()]) - self.connecting,
                     self.settings.min_pool_size - self.size)
        room = self.settings.pool_size - self.size
        for _ in range(min(wanted, room)):
            self.connecting += 1  # counted now, not when the task first runs
            self._spawn(self._open_one(self.generation))

    def _spawn(self, coro: Awaitable[None]) -> None:
        task = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _open_one(self, generation: int) -> None:
        try:
            conn = await self._open_or_fail_fast()
        except ProxyError as exc:
            self._fail_one_waiter(exc)
            return
        finally:
            self.connecting -= 1
        self.stats.opened += 1
        conn.generation = generation
        conn.on_close = self.connection_closed
        self.active.add(conn)  # release() moves it to a waiter or to idle
        self.release(conn)

    async def _open_or_fail_fast(self) -> C:
        now = self._clock()
        if self._last_failure and now - self._last_failure[0] < self.settings.server_login_retry:
            raise self._last_failure[1]
        try:
            conn = await self._connect()
        except ProxyError as exc:
            self.stats.connect_failures += 1
            self._last_failure = (self._clock(), exc)
            log.warning("pool %s: %s", self.name, exc.message)
            raise
        except Exception as unexpected:  # (one name per except: mypyc types each once)
            self.stats.connect_failures += 1
            log.exception("pool %s: unexpected error while connecting", self.name)
            raise UpstreamError(f"could not connect to the database: {type(unexpected).__name__}") from unexpected
        self._last_failure = None
        return conn

    def _fail_one_waiter(self, exc: ProxyError) -> None:
        while self.waiters:
            waiter = self.waiters.popleft()
            if not waiter.done():
                waiter.set_exception(exc)
                return

    # --- upkeep -------------------------------------------------------------------------

    def maintain(self) -> None:
        """Retire idle connections past server_idle_timeout or server_lifetime; keep min_pool_size."""
        now = self._clock()
        idle_timeout = self.settings.server_idle_timeout
        for conn in list(self.idle):
            too_idle = idle_timeout and now - conn.last_used > idle_timeout and \
                self.size > self.settings.min_pool_size
            if conn.closed or self._expired(conn) or too_idle:
                self._retire(conn, "server_idle_timeout" if too_idle else "server_lifetime")
        self._grow()

    def resize(self, settings: PoolSettings) -> None:
        self.settings = settings
        while len(self.idle) and self.size > settings.pool_size:
            self._retire(self.idle[0], "pool resized")
        self._grow()

    def pause(self) -> None:
        self.paused = True

    def resume(self) -> None:
        self.paused = False
        while self.idle and self.waiters:
            conn = self.idle.pop()
            self.active.add(conn)
            self.release(conn)
        self._grow()

    async def close(self) -> None:
        self.closed = True
        for conn in list(self.idle) + list(self.active):
            self._retire(conn, "pool closed")
        for waiter in self.waiters:
            if not waiter.done():
                waiter.set_exception(PoolError("the pool is closing", sqlstate="57P01"))
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self.connecting = 0  # tasks cancelled before their first step never decrement it
