"""Prometheus metrics and health checks over HTTP: /metrics, /healthz, /readyz.

Everything is read from the live ServerState at scrape time by a custom collector: pool gauges are
never maintained on the hot path, and counters are the plain totals the relay already keeps
(stats.DatabaseStats, pool.PoolStats). Labels are bounded: database and origin user names from the
config, fixed state and reason names, SQLSTATE classes; never query text or client addresses.

The HTTP side is a deliberately small asyncio server (GET only, one request per connection).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Iterator
from typing import TYPE_CHECKING

from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from prometheus_client.core import CollectorRegistry, CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily
from prometheus_client.registry import Collector

from hyperpool import __version__
from hyperpool.config import HEALTH_PATH, METRICS_PATH, READY_PATH

if TYPE_CHECKING:
    from prometheus_client.metrics_core import Metric

    from hyperpool.cache import QueryCache
    from hyperpool.server import ServerState

log = logging.getLogger("hyperpool.metrics")

CLIENT_STATES = ("active", "waiting", "idle", "pinned")
CACHE_LOOKUPS = ("hit", "stale", "miss")  # hyperpool_cache_requests_total's status, with the not-cacheable reasons
SERVER_STATES = ("active", "idle", "connecting")
_MAX_REQUEST = 8192


class StateCollector(Collector):
    """hyperpool_* metrics, computed from the ServerState when scraped."""

    def __init__(self, state: ServerState) -> None:
        self.state = state

    def collect(self) -> Iterator[Metric]:
        state = self.state
        db_user = ["database", "user"]
        clients = GaugeMetricFamily("hyperpool_clients", "Client connections by state.", labels=[*db_user, "state"])
        servers = GaugeMetricFamily("hyperpool_servers", "Server connections by state.", labels=[*db_user, "state"])
        size = GaugeMetricFamily("hyperpool_pool_size", "Server connections open or opening.", labels=db_user)
        limit = GaugeMetricFamily("hyperpool_pool_max", "pool_size: the most server connections.", labels=db_user)
        counters = {name: CounterMetricFamily(f"hyperpool_{name}", doc, labels=["database"]) for name, doc in (
            ("transactions", "Transactions (a ReadyForQuery 'I' ending a client's requests)."),
            ("queries", "Queries, Syncs and function calls sent to the database."),
            ("bytes_received", "Bytes from clients forwarded to the database."),
            ("bytes_sent", "Bytes from the database forwarded to clients."),
            ("server_connections_opened", "Server connections opened."))}
        closed = CounterMetricFamily("hyperpool_server_connections_closed", "Server connections closed, by why.",
                                     labels=["database", "reason"])
        errors = CounterMetricFamily("hyperpool_errors", "ErrorResponses clients got, by SQLSTATE class.",
                                     labels=["database", "sqlstate_class"])
        wait = HistogramMetricFamily("hyperpool_client_wait_seconds", "Time clients waited for a server connection.",
                                     labels=["database"])
        duration = HistogramMetricFamily("hyperpool_query_duration_seconds",
                                         "Time from a client's request to the database's last answer.",
                                         labels=["database"])
        sessions = [s for s in state.sessions if s.database is not None]
        for name, database in sorted(state.databases.items()):
            user = database.login.user
            mine = [s for s in sessions if s.database is database]
            pinned = sum(1 for s in mine if s.pins)
            waiting = sum(1 for s in mine if s.waiting_since is not None)
            active = sum(1 for s in mine if s.server is not None and not s.pins)
            counts = {"active": active, "waiting": waiting, "pinned": pinned,
                      "idle": len(mine) - active - waiting - pinned}
            for client_state in CLIENT_STATES:
                clients.add_metric([name, user, client_state], counts[client_state])
            pool = database.pool
            for server_state, value in (("active", len(pool.active)), ("idle", len(pool.idle)),
                                        ("connecting", pool.connecting)):
                servers.add_metric([name, user, server_state], value)
            size.add_metric([name, user], pool.size)
            limit.add_metric([name, user], database.config.pool.pool_size)
            st = database.stats
            for key, value in (("transactions", st.transactions), ("queries", st.queries),
                               ("bytes_received", st.received), ("bytes_sent", st.sent),
                               ("server_connections_opened", pool.stats.opened)):
                counters[key].add_metric([name], value)
            for reason, value in sorted(pool.stats.closed_reasons.items()):
                closed.add_metric([name, reason], value)
            for klass, value in sorted(st.errors.items()):
                errors.add_metric([name, klass], value)
            wait.add_metric([name], st.wait_histogram.cumulative(), st.wait_histogram.total)
            duration.add_metric([name], st.query_histogram.cumulative(), st.query_histogram.total)
        pins = GaugeMetricFamily("hyperpool_pinned_clients", "Clients pinned to their server connection, by why.",
                                 labels=["database", "reason"])
        for name, reasons in sorted(state.pinned_clients().items()):
            for reason, value in sorted(reasons.items()):
                pins.add_metric([name, reason], value)
        auth = CounterMetricFamily("hyperpool_auth_failures", "Client logins that failed, by why.",
                                   labels=["reason"])
        for reason, value in sorted(state.login_failures.items()):
            auth.add_metric([reason], value)
        info = GaugeMetricFamily("hyperpool_info", "hyperpool's version.", labels=["version"])
        info.add_metric([__version__], 1)
        yield from (clients, servers, size, limit, *counters.values(), closed, errors, wait, duration, pins, auth,
                    info)
        yield from _cache_metrics(state)
        yield from _placement_metrics(state)


def _placement_metrics(state: ServerState) -> list[Metric]:
    """hyperpool_placement_* for databases with locations; hyperpool_origin_rtt_seconds once measured."""
    chosen = GaugeMetricFamily("hyperpool_placement_chosen", "1 for the location a database's traffic goes to.",
                               labels=["database", "location"])
    rtt = GaugeMetricFamily("hyperpool_placement_rtt_seconds",
                            "Median RTTs per location: edge (here to the location), origin (the location to the "
                            "database, as it reports), expected (their sum).", labels=["database", "location", "path"])
    switches = CounterMetricFamily("hyperpool_placement_switches", "Times placement moved a database's traffic.",
                                   labels=["database"])
    origin = GaugeMetricFamily("hyperpool_origin_rtt_seconds", "Median measured RTT from here to the origin.",
                               labels=["database"])
    for name, database in sorted(state.databases.items()):
        measured = database.origin_rtt()
        if measured is not None:
            origin.add_metric([name], measured)
        placement = database.placement
        if placement is None:
            continue
        switches.add_metric([name], placement.switches)
        for location, loc in placement.locations.items():
            chosen.add_metric([name, location], 1 if location == placement.chosen else 0)
            for path, value in (("edge", loc.edge_rtt()), ("origin", loc.origin_rtt()), ("expected", loc.expected())):
                if value is not None:
                    rtt.add_metric([name, location, path], value)
    return [chosen, rtt, switches, origin]


def _cache_metrics(state: ServerState) -> list[Metric]:
    """hyperpool_cache_*: only databases with a query cache (enabled, transaction pooling) have them."""
    requests = CounterMetricFamily("hyperpool_cache_requests",
                                   "Query cache lookups by status (hit, stale, miss), and statements not cacheable "
                                   "by why.", labels=["database", "status"])
    counters = {name: CounterMetricFamily(f"hyperpool_cache_{name}", doc, labels=["database"]) for name, doc in (
        ("evictions", "Cache entries dropped to stay under max_bytes."),
        ("invalidations", "Cache entries dropped because a table they read was written (or purged)."),
        ("stored", "Responses stored in the cache."),
        ("too_big", "Responses not stored because they were over max_entry_bytes."))}
    size = GaugeMetricFamily("hyperpool_cache_bytes", "Bytes of responses in the cache.", labels=["database"])
    entries = GaugeMetricFamily("hyperpool_cache_entries", "Responses in the cache.", labels=["database"])
    for name, database in sorted(state.databases.items()):
        cache = database.cache
        if cache is None:
            continue
        for status, value in _cache_requests(cache):
            requests.add_metric([name, status], value)
        st = cache.stats
        for key, value in (("evictions", st.evictions), ("invalidations", st.invalidations),
                           ("stored", st.stored), ("too_big", st.too_big)):
            counters[key].add_metric([name], value)
        size.add_metric([name], cache.bytes)
        entries.add_metric([name], len(cache))
    return [requests, *counters.values(), size, entries]


def _cache_requests(cache: QueryCache) -> list[tuple[str, int]]:
    st = cache.stats
    return [*zip(CACHE_LOOKUPS, (st.hits, st.stale, st.misses), strict=True), *sorted(st.not_cacheable.items())]


def registry_for(state: ServerState) -> CollectorRegistry:
    registry = CollectorRegistry(auto_describe=False)
    registry.register(StateCollector(state))
    return registry


class MetricsServer:
    """GET /metrics, /healthz, /readyz on metrics.host:metrics.port."""

    def __init__(self, state: ServerState) -> None:
        self.state = state
        self.registry = registry_for(state)
        self._server: asyncio.Server | None = None

    async def start(self, host: str, port: int) -> None:
        self._server = await asyncio.start_server(self._handle, host, port, reuse_address=True)
        log.info("metrics and health checks on http://%s:%d%s", host, self.port, METRICS_PATH)

    @property
    def port(self) -> int:
        assert self._server is not None
        return int(self._server.sockets[0].getsockname()[1])

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()

    def respond(self, path: str) -> tuple[int, str, bytes]:
        """(status, content type, body) for a GET of ``path``."""
        if path == METRICS_PATH:
            return 200, CONTENT_TYPE_LATEST, generate_latest(self.registry)
        if path == HEALTH_PATH:
            return 200, "text/plain", b"ok\n"
        if path == READY_PATH:
            ready, problems = self.state.readiness()
            if ready:
                return 200, "text/plain", b"ready\n"
            return 503, "text/plain", ("not ready: " + "; ".join(problems) + "\n").encode()
        return 404, "text/plain", b"not found\n"

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            async with asyncio.timeout(5):
                head = await reader.readuntil(b"\r\n\r\n")
        except (TimeoutError, asyncio.IncompleteReadError, asyncio.LimitOverrunError, ConnectionError):
            writer.close()
            return
        request = head[:_MAX_REQUEST].split(b"\r\n", 1)[0].decode("latin-1").split()
        if len(request) != 3 or request[0] not in ("GET", "HEAD"):
            status, kind, body = 405, "text/plain", b"only GET\n"
        else:
            try:
                status, kind, body = self.respond(request[1].split("?", 1)[0])
            except Exception:
                log.exception("metrics request failed")
                status, kind, body = 500, "text/plain", b"internal error\n"
        reason = {200: "OK", 404: "Not Found", 405: "Method Not Allowed", 500: "Internal Server Error",
                  503: "Service Unavailable"}[status]
        writer.write(f"HTTP/1.1 {status} {reason}\r\nContent-Type: {kind}\r\nContent-Length: {len(body)}\r\n"
                     "Connection: close\r\n\r\n".encode() + (body if request[:1] != ["HEAD"] else b""))
        with contextlib.suppress(ConnectionError):
            await writer.drain()
        writer.close()
