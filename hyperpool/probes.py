"""Round-trip measurements for placement (the I/O half; the decisions are placement.py's).

Every figure is a round trip on an open, logged-in connection, never a TCP connect: anything that terminates
TCP on the way (a load balancer, a proxy, the tests' latency relay) makes connect() return before the far
end has seen a packet.

* Origin: ``SELECT 1`` on a warm connection to the database that the prober keeps.
* A location (another hyperpool instance): a lone Sync on a warm connection logged in to it. hyperpool
  answers a lone Sync itself, without its database, and puts its own median RTT to the origin in a
  ParameterStatus (``ORIGIN_RTT_PARAMETER``, milliseconds) before the ReadyForQuery: one round trip gives
  the edge both figures.
"""

from __future__ import annotations

import asyncio
import time

from hyperpool.config import DatabaseConfig
from hyperpool.errors import ProxyError
from hyperpool.placement import Probe
from hyperpool.protocol import messages
from hyperpool.upstream import ServerConnection, open_server

ORIGIN_RTT_PARAMETER = "hyperpool.origin_rtt_ms"
_REASK = 0.05  # seconds between Syncs while a location has no figure for its origin yet
_FIGURE_WAIT = 1.0  # seconds to wait for that figure before the probe counts as failed


async def timed(conn: ServerConnection, request: str | bytes, timeout: float) -> float:
    """Seconds ``conn`` takes to answer hyperpool's own ``request``; raises ProxyError when it fails."""
    done: asyncio.Future[dict[str, str] | None] = asyncio.get_running_loop().create_future()

    def finished(_conn: ServerConnection, _status: bytes, error: dict[str, str] | None) -> None:
        if not done.done():
            done.set_result(error)

    started = time.monotonic()
    conn.send_internal(request, finished)
    async with asyncio.timeout(timeout):
        error = await done
    if error is not None:
        raise ProxyError(error.get("M", "probe failed"), sqlstate=error.get("C", "08006"))
    return time.monotonic() - started


class OriginProber:
    """Measures the RTT to a database's origin over a warm connection it keeps."""

    def __init__(self, target: DatabaseConfig) -> None:
        self.target = target
        self._conn: ServerConnection | None = None

    async def sample(self, timeout: float) -> float:
        """One RTT sample (seconds); raises OSError, TimeoutError or ProxyError."""
        conn = await _warm(self._conn, self.target, timeout)
        if self._conn is not None and self._conn is not conn:
            self._conn.close("probe connection replaced")
        self._conn = conn
        try:
            return await timed(conn, "SELECT 1", timeout)
        except (OSError, TimeoutError, ProxyError):
            self.close()
            raise

    def close(self) -> None:
        if self._conn is not None:
            self._conn.close("probe connection closed")
            self._conn = None


async def _warm(conn: ServerConnection | None, target: DatabaseConfig, timeout: float) -> ServerConnection:
    if conn is not None and not conn.closed and not conn.busy:
        return conn
    if conn is not None:
        conn.close("probe connection replaced")
    return await open_server(target, timeout)


class LocationProber:
    """Probes one remote location over a warm connection it keeps."""

    def __init__(self, target: DatabaseConfig) -> None:
        self.target = target
        self._conn: ServerConnection | None = None

    async def probe(self, timeout: float) -> Probe:
        try:
            conn = self._conn = await _warm(self._conn, self.target, timeout)
            conn.params.pop(ORIGIN_RTT_PARAMETER, None)  # this round's figure, or none
            first = await timed(conn, messages.SYNC, timeout)
            # an instance asked for the first time (or after a while) starts measuring then: ask again shortly
            waited = 0.0  # (briefly: a location that cannot measure its origin must not hold up the round)
            while ORIGIN_RTT_PARAMETER not in conn.params and waited < min(timeout, _FIGURE_WAIT):
                await asyncio.sleep(_REASK)
                waited += _REASK
                await timed(conn, messages.SYNC, timeout)
            second = await timed(conn, messages.SYNC, timeout)
        except (OSError, TimeoutError, ProxyError) as exc:
            self.close()
            return Probe.failed(getattr(exc, "message", None) or str(exc) or type(exc).__name__)
        reported = conn.params.get(ORIGIN_RTT_PARAMETER)
        origin = float(reported) / 1000.0 if reported not in (None, "") else None  # type: ignore[arg-type]
        return Probe(edge_rtt=(first, second), origin_rtt=origin)

    def close(self) -> None:
        if self._conn is not None:
            self._conn.close("probe connection closed")
            self._conn = None
