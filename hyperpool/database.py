"""One configured database at run time: its pool and what clients of it share.

It owns the pool of server connections, the ParameterStatus values the
database reports at login (shown to every client), and the client setting
combinations already checked against the database (so a bad TimeZone fails
at the client's login, as it would on PostgreSQL, and is checked only once).
"""

from __future__ import annotations

import asyncio
import logging
import statistics
import time
from collections import deque
from collections.abc import Callable
from typing import Any

from hyperpool import probes
from hyperpool.cache import Fill, QueryCache
from hyperpool.caching import Classifier, Request, storable
from hyperpool.config import DatabaseConfig
from hyperpool.errors import ProxyError, UpstreamError, UpstreamErrorResponse
from hyperpool.placement import LOCAL, Decision, Placement, Probe
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
        # where server connections go: the origin, or the location placement chose (see placement.py)
        self.targets: dict[str, DatabaseConfig] = config.targets()
        self.placement: Placement | None = None
        self.target: DatabaseConfig | None = config
        self._setup_placement(config)
        self.origin_samples: deque[float] = deque(maxlen=config.placement.samples)  # RTT to the origin, seconds
        self.origin_probed_at = -1e9
        self.origin_probing = False  # one origin probe at a time
        self.probing = False
        self.placement_task: asyncio.Task[None] | None = None  # the probe loop (ServerState runs it)
        self._probers: dict[str, probes.LocationProber] = {}
        self._origin_prober: probes.OriginProber | None = None
        self._catalog_epoch = 0  # bumped by DDL: a read that started before it is not used

    def _setup_placement(self, config: DatabaseConfig) -> None:
        self.targets = config.targets()
        if not config.locations:
            self.placement = None
            self.target = config
            return
        names = [name for name, _ in config.locations]
        self.placement = Placement(config.name, names, config.placement)
        # until the first probe round decides: the fixed location, else here, else the first listed
        first = config.placement.location or (LOCAL if LOCAL in names else names[0])
        self.target = self.targets[first]

    async def _connect(self) -> ServerConnection:
        target = self.target
        timeout = self.config.pool.server_connect_timeout
        if target is None:
            raise UpstreamError(f"no healthy location for database {self.config.name}", detail=self._why_none())
        try:
            conn = await open_server(target, timeout)
        except ProxyError as exc:
            if self.placement is None:
                raise
            # take the location out now (no client waits a probe interval for it), and try the next best once
            self._apply(self.placement.report_failure(target.via or LOCAL, self.clock(), exc.message))
            if self.target is None or self.target is target:
                raise
            conn = await open_server(self.target, timeout)
        conn.stats = self.stats
        conn.slow_query = self.slow_query
        return conn

    def reconfigure(self, config: DatabaseConfig) -> None:
        """Apply a reloaded config; an origin change retires the old connections as they come back."""
        old = self.config
        origin_changed = (config.host, config.port, config.dbname, config.user, config.password,
                          config.sslmode, config.sslrootcert, config.connect_options, config.locations,
                          config.placement) != (
                          old.host, old.port, old.dbname, old.user, old.password,
                          old.sslmode, old.sslrootcert, old.connect_options, old.locations, old.placement)
        self.config = config
        self._reconfigure_cache(config)
        if origin_changed:
            self.close_probes()
            self._setup_placement(config)
        if origin_changed:
            self.server_params = None
            self._validated.clear()
            self.pool.retarget()  # connections to the old origin are closed as they come back
        self.pool.resize(config.pool)

    @property
    def login(self) -> DatabaseConfig:
        """Where new server connections go and as whom: the chosen location's, else the entry's own."""
        return self.target or self.config

    def _why_none(self) -> str:
        last = self.placement.last if self.placement is not None else None
        return last.reason if last is not None else ""

    # --- placement ------------------------------------------------------------------------------

    def origin_rtt(self) -> float | None:
        """The median of the last RTT samples to the origin (seconds), or None before any."""
        return statistics.median(self.origin_samples) if self.origin_samples else None

    def pools_locally(self) -> bool:
        return not self.config.locations or LOCAL in self.targets

    async def probe_origin(self) -> float | None:
        """One RTT sample to the origin (SELECT 1 on the prober's warm connection), kept for the median. A
        failed probe forgets the samples: an instance that cannot reach its origin reports no figure (and the
        edges asking take it out) rather than its last good one."""
        self.origin_probed_at = self.clock()
        if self.origin_probing:  # (another is running: its figure, or the last ones, will do)
            return self.origin_rtt()
        self.origin_probing = True
        if self._origin_prober is None or self._origin_prober.target is not self.config:
            if self._origin_prober is not None:
                self._origin_prober.close()
            self._origin_prober = probes.OriginProber(self.config)
        try:
            sample = await self._origin_prober.sample(max(self.config.pool.server_connect_timeout, 1.0))
        except (OSError, TimeoutError, ProxyError) as exc:
            log.info("probe of the origin of database %s failed: %s", self.config.name,
                     getattr(exc, "message", None) or exc or type(exc).__name__)
            self.origin_samples.clear()
            return None
        finally:
            self.origin_probing = False
        self.origin_samples.append(sample)
        return sample

    async def probe_round(self) -> Decision | None:
        """Edges: probe every location (and the origin when pooling from here too), then let placement decide."""
        placement = self.placement
        if placement is None or self.probing:
            return None
        self.probing = True
        try:
            timeout = max(self.config.pool.server_connect_timeout, 1.0)
            names = [name for name in self.targets if name != LOCAL]
            for name in names:
                if name not in self._probers or self._probers[name].target is not self.targets[name]:
                    self._probers[name] = probes.LocationProber(self.targets[name])
            results = await asyncio.gather(*(self._probers[name].probe(timeout) for name in names))
            round_: dict[str, Probe] = dict(zip(names, results, strict=True))
            if LOCAL in self.targets:
                sample = await self.probe_origin()
                round_[LOCAL] = Probe(edge_rtt=(sample,)) if sample is not None else Probe.failed("origin probe failed")
            decision = placement.observe(self.clock(), round_)
            self._apply(decision)
            return decision
        finally:
            self.probing = False

    def _apply(self, decision: Decision) -> None:
        """Follow a placement decision: a new location gets the new connections; the old ones are retired."""
        previous = self.target
        self.target = self.targets.get(decision.chosen) if decision.chosen is not None else None
        if decision.switched:
            log.warning("placement of database %s: %s -> %s: %s", self.config.name, decision.previous or "none",
                        decision.chosen or "none", decision.reason)
        if self.target is not previous:
            self.pool.retarget()  # connections to the old location close as they come back

    def close_probes(self) -> None:
        for prober in self._probers.values():
            prober.close()
        self._probers.clear()
        if self._origin_prober is not None:
            self._origin_prober.close()
            self._origin_prober = None
        if self.placement_task is not None:
            self.placement_task.cancel()
            self.placement_task = None

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
            await self._run_internal(conn, "SELECT pg_catalog.current_setting('search_path'), current_user", path)
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
        row = path[0] if path and len(path[0]) == 2 else [None, None]
        default_path = row[0] if row[0] is not None else '"$user", public'
        # ("$user" is the role at the database: through another hyperpool instance, not the one logged in here)
        self.classifier = Classifier(catalog, row[1] or self.config.user, default_path)
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
