"""A latency-injecting TCP relay on loopback: "regions" on one machine without netem.

``LatencyRelay(target_host, target_port, one_way_delay)`` listens on a loopback port and relays every
connection to the target, holding each direction's bytes for ``one_way_delay`` seconds (order preserved:
a per-direction FIFO of (due time, bytes)). A TCP handshake costs what it would across that distance: the
upstream connect starts one round trip (2 x one way) after the client's, and the client's first bytes leave
no earlier than that, so "connect, then send" pays connect RTT + one way, as on a real link.

Bounded by construction: at most ``max_connections`` relayed connections (more are closed on accept) and at
most ``max_buffer`` bytes queued per direction (beyond that the sending side's reading is paused until the
queue drains to half; a slow receiver pauses the queue in turn). Loopback only: both the listening address
and the target must be 127.0.0.0/8 or ::1 (or ``localhost``), so a test can never relay off the machine.

``kill()`` simulates a location going down: the listener closes (new connections are refused) and every
relayed connection is aborted. ``revive()`` listens on the same port again. ``set_delay()`` applies to
bytes and connections that arrive after the call.

``ThreadedRelay`` runs one on its own event loop in a thread, for synchronous tests (as ``ProxyRunner`` does
for hyperpool itself).
"""

from __future__ import annotations

import asyncio
import ipaddress
import threading
from collections import deque
from collections.abc import Coroutine
from typing import Any

_EOF = b""  # queued marker: the sending side finished


def check_loopback(host: str, what: str) -> str:
    """``host`` as an address literal, or ValueError when it is not loopback (no DNS lookups here)."""
    if host == "localhost":
        return "127.0.0.1"
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        raise ValueError(f"latency relay: {what} {host!r} must be a loopback address literal") from None
    if not address.is_loopback:
        raise ValueError(f"latency relay: {what} {host!r} is not loopback (127.0.0.0/8 or ::1); refusing to relay")
    return host


class _Side(asyncio.Protocol):
    """One socket of a relayed connection: the client's or the upstream's."""

    def __init__(self, conn: _Connection) -> None:
        self.conn = conn
        self.transport: asyncio.Transport | None = None
        self.lost = False
        self.outgoing: _Pipe | None = None  # the pipe this side's bytes go into
        self.incoming: _Pipe | None = None  # the pipe that writes into this side

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport
        self.conn.side_made(self)

    def data_received(self, data: bytes) -> None:
        if self.outgoing is not None:
            self.outgoing.push(data)

    def eof_received(self) -> bool:
        if self.outgoing is not None:
            self.outgoing.push(_EOF)
        return True  # stay half-open: the other direction may still be delivering

    def connection_lost(self, exc: Exception | None) -> None:
        self.lost = True
        if self.outgoing is not None:
            self.outgoing.push(_EOF)
        if self.incoming is not None:
            self.incoming.drop()
        self.conn.side_lost()

    def pause_writing(self) -> None:
        if self.incoming is not None:
            self.incoming.writable = False

    def resume_writing(self) -> None:
        if self.incoming is not None:
            self.incoming.writable = True
            self.incoming.schedule()


class _Pipe:
    """One direction of one connection: a FIFO of (due time, bytes), flushed by a loop timer."""

    def __init__(self, relay: LatencyRelay, src: _Side, dst: _Side, ready_at: float) -> None:
        self.relay = relay
        self.src, self.dst = src, dst
        src.outgoing, dst.incoming = self, self
        self.ready_at = ready_at  # nothing leaves before this (the emulated handshake)
        self.queue: deque[tuple[float, bytes]] = deque()
        self.buffered = 0
        self.paused = False
        self.writable = True
        self.eof = False
        self.timer: asyncio.TimerHandle | None = None

    def push(self, data: bytes) -> None:
        if self.eof:
            return
        self.eof = not data
        loop = self.relay.loop
        due = max(loop.time(), self.ready_at) + self.relay.delay
        if self.queue:
            due = max(due, self.queue[-1][0])  # a shorter new delay must not reorder bytes
        self.queue.append((due, data))
        self.buffered += len(data)
        if self.buffered > self.relay.max_buffer and not self.paused and self.src.transport is not None:
            self.paused = True
            self.src.transport.pause_reading()
        self.schedule()

    def schedule(self) -> None:
        if self.timer is None and self.queue and self.writable and self.dst.transport is not None:
            self.timer = self.relay.loop.call_at(self.queue[0][0], self.flush)

    def flush(self) -> None:
        self.timer = None
        transport = self.dst.transport
        if transport is None or transport.is_closing():
            self.drop()
            return
        now = self.relay.loop.time()
        while self.queue and self.queue[0][0] <= now and self.writable:
            _, data = self.queue.popleft()
            self.buffered -= len(data)
            if not data:  # _EOF
                self._deliver_eof(transport)
                return
            transport.write(data)
        if self.paused and self.buffered <= self.relay.max_buffer // 2 and self.src.transport is not None:
            self.paused = False
            if not self.src.transport.is_closing():
                self.src.transport.resume_reading()
        self.schedule()

    def _deliver_eof(self, transport: asyncio.Transport) -> None:
        if self.src.lost or not transport.can_write_eof():
            transport.close()  # close() still sends what the transport has buffered
        else:
            try:
                transport.write_eof()
            except OSError:  # the other end is already gone
                transport.close()
        self.src.conn.maybe_done()

    def drop(self) -> None:
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
        self.queue.clear()
        self.buffered = 0


class _Connection:
    """A client connection and its upstream connection, opened one emulated round trip later."""

    def __init__(self, relay: LatencyRelay) -> None:
        self.relay = relay
        self.client = _Side(self)
        self.upstream = _Side(self)
        self.task: asyncio.Task[None] | None = None
        self.up: _Pipe | None = None
        self.down: _Pipe | None = None

    def side_made(self, side: _Side) -> None:
        if side is self.client:
            loop = self.relay.loop
            established = loop.time() + 2 * self.relay.delay
            self.up = _Pipe(self.relay, self.client, self.upstream, established)
            self.down = _Pipe(self.relay, self.upstream, self.client, 0.0)
            self.task = loop.create_task(self._connect(2 * self.relay.delay))
        elif self.up is not None:
            self.up.schedule()

    async def _connect(self, handshake: float) -> None:
        try:
            await asyncio.sleep(handshake)
            await self.relay.loop.create_connection(lambda: self.upstream, self.relay.target_host,
                                                    self.relay.target_port)
        except OSError:
            self.abort()

    def side_lost(self) -> None:
        if self.client.lost and (self.upstream.lost or self.upstream.transport is None):
            self.abort()
        self.maybe_done()

    def maybe_done(self) -> None:
        """Forget the connection once both sides are closing or both directions have delivered their EOF."""
        sides = (self.client, self.upstream)
        closing = all(s.lost or s.transport is None or s.transport.is_closing() for s in sides)
        finished = all(p is not None and p.eof and not p.queue for p in (self.up, self.down))
        if not (closing or finished):
            return
        if self.task is not None and not self.task.done() and self.task is not asyncio.current_task():
            self.task.cancel()
        for side in sides:
            if side.transport is not None and not side.transport.is_closing():
                side.transport.close()
        self.relay.connections.discard(self)

    def abort(self) -> None:
        if self.task is not None and not self.task.done() and self.task is not asyncio.current_task():
            self.task.cancel()
        for pipe in (self.up, self.down):
            if pipe is not None:
                pipe.drop()
        for side in (self.client, self.upstream):
            if side.transport is not None:
                side.transport.abort()
        self.relay.connections.discard(self)


class _Refuse(asyncio.Protocol):
    """Accepted beyond max_connections: closed at once."""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        transport.abort()  # type: ignore[attr-defined]


class LatencyRelay:
    """Relay loopback TCP connections to ``target_host:target_port`` with ``one_way_delay`` each way."""

    def __init__(self, target_host: str, target_port: int, one_way_delay: float, listen_host: str = "127.0.0.1",
                 max_connections: int = 64, max_buffer: int = 1 << 20) -> None:
        self.target_host = check_loopback(target_host, "target")
        self.listen_host = check_loopback(listen_host, "listen address")
        self.target_port = target_port
        self.delay = self._checked(one_way_delay)
        self.max_connections = max_connections
        self.max_buffer = max_buffer
        self.port = 0
        self.connections: set[_Connection] = set()
        self.refused = 0  # connections closed for exceeding max_connections
        self._server: asyncio.Server | None = None
        self._loop: asyncio.AbstractEventLoop | None = None

    @staticmethod
    def _checked(delay: float) -> float:
        if not 0 <= delay <= 10:
            raise ValueError(f"latency relay: one-way delay {delay!r} s is outside 0..10 s")
        return float(delay)

    @property
    def loop(self) -> asyncio.AbstractEventLoop:
        assert self._loop is not None, "LatencyRelay not started"
        return self._loop

    @property
    def killed(self) -> bool:
        return self._server is None

    def set_delay(self, one_way_delay: float) -> None:
        """Change the one-way delay for bytes and connections arriving from now on."""
        self.delay = self._checked(one_way_delay)

    def _accept(self) -> asyncio.Protocol:
        if len(self.connections) >= self.max_connections:
            self.refused += 1
            return _Refuse()
        conn = _Connection(self)
        self.connections.add(conn)
        return conn.client

    async def start(self) -> LatencyRelay:
        self._loop = asyncio.get_running_loop()
        await self._listen()
        return self

    async def _listen(self) -> None:
        self._server = await self.loop.create_server(self._accept, self.listen_host, self.port)
        self.port = int(self._server.sockets[0].getsockname()[1])

    def kill(self) -> None:
        """The location goes down: refuse new connections, abort every relayed one."""
        if self._server is not None:
            self._server.close()
            self._server = None
        for conn in list(self.connections):
            conn.abort()

    async def revive(self) -> None:
        """The location is back: listen on the same port again."""
        if self._server is None:
            await self._listen()

    async def stop(self) -> None:
        server = self._server
        self.kill()
        if server is not None:
            await server.wait_closed()


class ThreadedRelay:
    """A LatencyRelay on its own event loop in a daemon thread, driven from synchronous test code."""

    def __init__(self, target_host: str, target_port: int, one_way_delay: float, **kwargs: Any) -> None:
        self.relay = LatencyRelay(target_host, target_port, one_way_delay, **kwargs)
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, name="latency-relay", daemon=True)

    def _call(self, coro: Coroutine[Any, Any, Any], timeout: float = 10) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def start(self) -> ThreadedRelay:
        self._thread.start()
        self._call(self.relay.start())
        return self

    @property
    def port(self) -> int:
        return self.relay.port

    def set_delay(self, one_way_delay: float) -> None:
        self.loop.call_soon_threadsafe(self.relay.set_delay, one_way_delay)
        self._call(asyncio.sleep(0))  # applied before this returns

    def kill(self) -> None:
        async def kill() -> None:
            self.relay.kill()
        self._call(kill())

    def revive(self) -> None:
        self._call(self.relay.revive())

    def stop(self) -> None:
        if not self.loop.is_running():
            return
        try:
            self._call(self.relay.stop())
        finally:
            self.loop.call_soon_threadsafe(self.loop.stop)
            self._thread.join(10)
            self.loop.close()

    def __enter__(self) -> ThreadedRelay:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
