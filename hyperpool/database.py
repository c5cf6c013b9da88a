"""One configured database at run time: its pool and what clients of it share.

It owns the pool of server connections, the ParameterStatus values the
database reports at login (shown to every client), and the client setting
combinations already checked against the database (so a bad TimeZone fails
at the client's login, as it would on PostgreSQL, and is checked only once).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from typing import Any

from hyperpool.cache import Fill, QueryCache
from hyperpool.caching import Classifier, Request, storable
from hyperpool.config import DatabaseConfig
from hyperpool.errors import UpstreamErrorResponse
from hyperpool.pool import Pool
from hyperpool.protocol import messages
from hyperpool.sql.catalog import CATALOG_QUERIES, Catalog
from hyperpool.stats import DatabaseStats, StatsWindow
from hyperpool.upstream import TRACKED_REPORTED, Rows, ServerConnection, open_server, set_statements

_MAX_VALIDATED = 1024
# Who a cache refresh's settings are applied for (a server connection compares clients by identity).
_REFRESHER: Any = object()
log = logging.getLogger("hyperpool.database")


class Database:
    def __init__(self, config: DatabaseConfig, clock: Callable[[], float] = time.monotonic) -> None:
        self.config = config
        self.clock = clock
        self.pool: Pool[ServerConnection] = Pool(config.name, config.pool, self._connect, clock)
        self.server_params: dict[str, str] | None = None
        self._validated: dict[frozenset[tuple[str, str]], tuple[bytes, dict[str, str]]] = {}
        self.clients = 0
        self.stats = DatabaseStats()
        self.stats_window = StatsWindow(self.stats, clock())
        self.slow_query = 0.0  # seconds (log_slow_query_ms); set by ServerState
        # what statement classification needs from the database's catalog (see sql/catalog.py); None until read
        self.catalog: Catalog | None = None
        self.catalog_loaded_at = 0.0  # clock time of the last attempt to read it
        self.catalog_reads = 0  # successful reads
        self.catalog_wanted = False  # read once a client has logged in (no server connection before that)
        # the query cache (transaction pooling only) and what judges statements for it, once the catalog is read
        self.cache: QueryCache | None = _new_cache(config)
        self.classifier: Classifier | None = None
        self._catalog_epoch = 0  # bumped by DDL: a read that started before it is not used

    async def _connect(self) -> ServerConnection:
        conn = await open_server(self.config, self.config.pool.server_connect_timeout)
        conn.stats = self.stats
        conn.slow_query = self.slow_query
        return conn

    def reconfigure(self, config: DatabaseConfig) -> None:
        """Apply a reloaded config; an origin change retires the old connections as they come back."""
        old = self.config
        origin_changed = (config.host, config.port, config.dbname, config.user, config.password,
                          config.sslmode, config.sslrootcert, config.connect_options) != (
                          old.host, old.port, old.dbname, old.user, old.password,
                          old.sslmode, old.sslrootcert, old.connect_options)
        self.config = config
        self._reconfigure_cache(config)
        if origin_changed:
            self.server_params = None
            self._validated.clear()
            self.pool.generation += 1  # connections to the old origin are closed as they come back
            for conn in list(self.pool.idle):
                self.pool.discard(conn, "origin changed by reload")
        self.pool.resize(config.pool)

    def _reconfigure_cache(self, config: DatabaseConfig) -> None:
        if _new_cache(config) is None:
            self.cache = None
        elif self.cache is None:
            self.cache = _new_cache(config)
        else:
            self.cache.resize(config.cache)

    def catalog_changed(self) -> None:
        """Forwarded DDL committed: classify nothing (so store nothing) until the catalog is read again."""
        self.catalog = None
        self.classifier = None
        self._catalog_epoch += 1

    async def prepare_client(self, wanted: dict[str, str]) -> tuple[bytes, dict[str, str]]:
        """(ParameterStatus messages for the client, its settings in the database's canonical form).

        Both are computed once per distinct combination of startup settings. Raises
        UpstreamError when the database cannot be reached and UpstreamErrorResponse when
        the database rejects one of the client's settings.
        """
        key = frozenset(wanted.items())
        known = self._validated.get(key)
        if known is None or self.server_params is None:
            canonical = await self._validate(wanted)
            known = (self._parameter_status(canonical), canonical)
            if len(self._validated) >= _MAX_VALIDATED:
                self._validated.clear()
            self._validated[key] = known
        return known[0], dict(known[1])

    def _parameter_status(self, canonical: dict[str, str]) -> bytes:
        assert self.server_params is not None
        shown = dict(self.server_params)
        names = {name.lower(): name for name in shown}
        for key_lower, value in canonical.items():
            if key_lower in TRACKED_REPORTED:
                shown[names.get(key_lower, key_lower)] = value
        return b"".join(messages.parameter_status(k, v) for k, v in shown.items())

    async def _validate(self, wanted: dict[str, str]) -> dict[str, str]:
        conn = await self.pool.acquire()
        try:
            if self.server_params is None:
                self.server_params = dict(conn.startup_params)
            sql = set_statements(wanted, conn.applied)
            if sql:
                await self._run_internal(conn, sql)
                conn.applied = dict(wanted)
            reported = {name.lower(): value for name, value in conn.params.items()}
            return {k: reported.get(k, v) if k in TRACKED_REPORTED else v for k, v in wanted.items()}
        finally:
            self._give_back(conn)

    def _give_back(self, conn: ServerConnection) -> None:
        if conn.closed or conn.busy or conn.tx_status != b"I":
            self.pool.discard(conn, "unclean after settings check")
        else:
            self.pool.release(conn)

    async def load_catalog(self) -> Catalog:
        """Read the catalog classification needs, on a pooled connection, and keep it (at start, on reload)."""
        epoch = self._catalog_epoch
        conn = await self.pool.acquire()
        try:
            results: list[Rows] = []
            path: Rows = []
            await self._run_internal(conn, "SELECT pg_catalog.current_setting('search_path')", path)
            for sql in CATALOG_QUERIES:
                rows: Rows = []
                await self._run_internal(conn, sql, rows)
                results.append(rows)
        finally:
            self._give_back(conn)
        catalog = Catalog.from_rows(*results)
        if epoch != self._catalog_epoch:  # DDL committed while it was read: the read after it counts
            return catalog
        self.catalog = catalog
        default_path = path[0][0] if path and path[0] and path[0][0] is not None else '"$user", public'
        self.classifier = Classifier(catalog, self.config.user, default_path)
        self.catalog_reads += 1
        return catalog

    async def refresh(self, fill: Fill, request: Request, wanted: dict[str, str]) -> None:
        """Run a stale entry's request again on a pooled connection with the client's settings (in the
        background, stale-while-revalidate) and store the new response."""
        try:
            conn = await self.pool.acquire()
        except Exception as exc:
            fill.fail()
            log.info("cache refresh on database %s got no server connection: %s", self.config.name, exc)
            return
        done: asyncio.Future[bytes | None] = asyncio.get_running_loop().create_future()
        raw = bytearray()

        def finished(_conn: ServerConnection, status: bytes, error: dict[str, str] | None) -> None:
            if not done.done():
                done.set_result(None if error is not None or status != b"I" else bytes(raw[request.strip:]))

        response: bytes | None = None
        try:
            conn.apply_settings(_REFRESHER, wanted)
            conn.send_internal(request.replay, finished, raw)
            body = await done
            if body is not None and storable(body):
                response = body
        finally:
            self._give_back(conn)
            if response is None:
                fill.fail()
            else:
                fill.store(response, self.clock())

    @staticmethod
    async def _run_internal(conn: ServerConnection, sql: str, rows: Rows | None = None) -> None:
        done: asyncio.Future[dict[str, str] | None] = asyncio.get_running_loop().create_future()

        def finished(_conn: ServerConnection, _status: bytes, error: dict[str, str] | None) -> None:
            if not done.done():
                done.set_result(error)

        conn.send_internal(sql, finished, rows)
        error = await done
        if error is not None:
            error = {**error, "S": "FATAL", "V": "FATAL"}
            raise UpstreamErrorResponse(error)


def _new_cache(config: DatabaseConfig) -> QueryCache | None:
    """The query cache serves idle clients of transaction pooling (in session mode, nothing tells hyperpool
    about a client's temporary tables)."""
    if not config.cache.enabled or config.pool.pool_mode != "transaction":
        return None
    return QueryCache(config.cache)
