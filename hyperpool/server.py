"""The running proxy: listeners, ServerState (every session, pool and task), reload, shutdown.

Lifecycle follows uvicorn's order: stop accepting, ask sessions to finish,
drain with a timeout, cancel what is left.
"""

from __future__ import annotations

import asyncio
import hmac
import logging
import secrets
import signal
import ssl
import time
from collections.abc import Callable, Coroutine
from dataclasses import replace
from typing import Any

from hyperpool import build
from hyperpool.config import Config, UserConfig, load_config
from hyperpool.database import Database
from hyperpool.errors import ConfigError, PoolError
from hyperpool.metrics import MetricsServer
from hyperpool.prepared import StatementRegistry
from hyperpool.session import ClientSession

log = logging.getLogger("hyperpool.server")


def client_tls_context(config: Config) -> ssl.SSLContext | None:
    if config.tls is None:
        return None
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.load_cert_chain(config.tls.cert, config.tls.key)
    return ctx


# Login failures by SQLSTATE, in bounded categories (metric labels).
LOGIN_FAILURES = {"28P01": "password", "28000": "rejected", "42501": "not_admin", "3D000": "no_database",
                  "53300": "too_many_clients", "08P01": "protocol", "0A000": "unsupported", "08006": "connection",
                  "57P03": "shutting_down"}


CATALOG_RETRY = 10.0  # seconds between attempts to read a catalog that could not be read


class ServerState:
    """Everything the running proxy owns; handed to every session (no globals)."""

    def __init__(self, config: Config, clock: Callable[[], float] = time.monotonic) -> None:
        self.config = config
        self.clock = clock
        self.client_tls = client_tls_context(config)
        self.databases: dict[str, Database] = {n: Database(db, clock) for n, db in config.databases.items()}
        self._peers: dict[str, list[Database]] = {}
        self._find_peers()
        for database in self.databases.values():
            database.slow_query = config.log_slow_query_ms / 1000
        self.sessions: set[ClientSession] = set()
        self.cancel_keys: dict[int, tuple[int, ClientSession]] = {}
        self.tasks: set[asyncio.Task[Any]] = set()
        self.statements = StatementRegistry()  # protocol-level prepared statements, hyperpool-wide names
        self.shutting_down = False
        # set by Server: what the admin console's RELOAD and SHUTDOWN do
        self.reload_hook: Callable[[], bool] | None = None
        self.shutdown_hook: Callable[[], None] | None = None
        self.listening = False
        self.login_failures: dict[str, int] = {}  # reason (LOGIN_FAILURES) -> count

    # --- clients ------------------------------------------------------------------------

    def check_client_limit(self, database: Database | None) -> None:
        if self.shutting_down:
            raise PoolError("the database system is shutting down", sqlstate="57P03")
        if database is None:
            if len(self.sessions) > self.config.pool.max_client_conn:
                raise PoolError("no more connections allowed (max_client_conn)", sqlstate="53300")
        elif database.clients >= database.config.pool.max_client_conn:
            raise PoolError(f"no more connections allowed to database {database.config.name} "
                            "(max_client_conn)", sqlstate="53300")

    def count_login_failure(self, sqlstate: str) -> None:
        reason = LOGIN_FAILURES.get(sqlstate, "other")
        self.login_failures[reason] = self.login_failures.get(reason, 0) + 1

    def readiness(self) -> tuple[bool, list[str]]:
        """Ready: listening, not shutting down, and a warm connection to every database (one is opened
        for a database that has none, so a later check can succeed)."""
        problems = []
        if not self.listening or self.shutting_down:
            problems.append("not listening" if not self.shutting_down else "shutting down")
        for name, database in sorted(self.databases.items()):
            pool = database.pool
            if not pool.idle and not pool.active:
                pool.warm_up()
                problems.append(f"{name}: no warm connection" + (f" ({pool.last_error})" if pool.last_error else ""))
        return not problems, problems

    def pinned_clients(self) -> dict[str, dict[str, int]]:
        """Clients pinned to their server connection: database -> reason -> count (read when asked, e.g.
        by SHOW or a metrics scrape; nothing is counted on the hot path)."""
        pinned: dict[str, dict[str, int]] = {}
        for session in self.sessions:
            if session.pins and session.database is not None:
                reasons = pinned.setdefault(session.database.config.name, {})
                for reason in session.pins:
                    reasons[reason] = reasons.get(reason, 0) + 1
        return pinned

    def register_cancel_key(self, session: ClientSession) -> tuple[int, int]:
        while True:  # one urandom call for both halves of the key
            raw = secrets.token_bytes(8)
            pid = int.from_bytes(raw[:4], "big") & 0x7FFFFFFF
            if pid and pid not in self.cancel_keys:
                break
        secret = int.from_bytes(raw[4:], "big", signed=True)
        self.cancel_keys[pid] = (secret, session)
        return pid, secret

    def unregister_cancel_key(self, key: tuple[int, int]) -> None:
        entry = self.cancel_keys.get(key[0])
        if entry is not None and entry[0] == key[1]:
            del self.cancel_keys[key[0]]

    def cancel(self, pid: int, secret: int) -> None:
        entry = self.cancel_keys.get(pid)
        if entry is None:
            return
        expected, session = entry
        if hmac.compare_digest(expected.to_bytes(4, "big", signed=True), secret.to_bytes(4, "big", signed=True)):
            session.cancel_running_query()

    def spawn(self, coro: Coroutine[Any, Any, Any]) -> asyncio.Task[Any]:
        task = asyncio.get_running_loop().create_task(coro)
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)
        return task

    # --- config -------------------------------------------------------------------------

    def apply_config(self, config: Config) -> None:
        """Swap in a new, already validated config without dropping connected clients."""
        config = replace(config, users={name: self._same_verifier(user) for name, user in config.users.items()})
        self.client_tls = client_tls_context(config)
        for name in list(self.databases):
            if name not in config.databases:
                self.spawn(self.databases.pop(name).pool.close())
        caching = {name: database.cache is not None for name, database in self.databases.items()}
        for name, db in config.databases.items():
            if name in self.databases:
                self.databases[name].reconfigure(db)
            else:
                self.databases[name] = Database(db, self.clock)
                self.databases[name].pool.maintain()
        self.config = config
        self._apply_slow_query()
        self._find_peers()
        switched = {database for name, database in self.databases.items()
                    if caching.get(name) is not None and caching[name] != (database.cache is not None)}
        for session in list(self.sessions):
            if session.database in switched or (session.database is not None and self._peers.get(
                    session.database.config.name)):  # (a peer's cache may have been switched)
                session.cache_switched()
        for database in self.databases.values():
            self.refresh_catalog(database)  # DDL may have happened; a new origin surely has another catalog
            # (only for databases clients use: refresh_catalog checks)

    def _same_verifier(self, user: UserConfig) -> UserConfig:
        """A user whose plain-text password and iteration count did not change keeps the verifier (and so the
        salt) it had: a salt that changed at each reload would tell users from unknown names, whose mock salt
        stays the same."""
        old = self.config.users.get(user.name)
        if old is None or old.plaintext is None or old.password != user.password or old.scram is None or \
                user.scram is None or old.scram.iterations != user.scram.iterations:
            return user
        return old

    def _apply_slow_query(self) -> None:
        for database in self.databases.values():
            database.slow_query = self.config.log_slow_query_ms / 1000
            for conn in [*database.pool.idle, *database.pool.active]:
                conn.slow_query = database.slow_query

    def maintain(self) -> None:
        now = self.clock()
        for database in self.databases.values():
            database.pool.maintain()
            database.stats_window.tick(database.stats, now)
            if database.catalog_wanted and database.catalog is None and \
                    now - database.catalog_loaded_at > CATALOG_RETRY:
                self.refresh_catalog(database)
            if database.placement is not None and database.placement_task is None and not self.shutting_down:
                database.placement_task = self.spawn(self._placement_loop(database))

    async def _placement_loop(self, database: Database) -> None:
        """Probe rounds every probe_interval while the database has locations (and is still configured)."""
        try:
            while database.placement is not None and self.databases.get(database.config.name) is database \
                    and not self.shutting_down:
                try:
                    await database.probe_round()
                except Exception:  # a bug must not stop placement for good: the next round tries again
                    log.exception("placement probe round for database %s failed", database.config.name)
                await asyncio.sleep(database.config.placement.probe_interval)
        finally:
            if database.placement_task is asyncio.current_task():  # (a reload may have started another)
                database.placement_task = None

    def origin_rtt(self, database: Database) -> float | None:
        """What this instance reports as its RTT to ``database``'s origin (to an edge that asks); a figure
        older than the probe interval starts a new probe in the background."""
        if database.pools_locally() and not database.origin_probing and \
                self.clock() - database.origin_probed_at >= database.config.placement.probe_interval:
            database.origin_probed_at = self.clock()
            self.spawn(database.probe_origin())
        return database.origin_rtt()

    def want_catalog(self, database: Database) -> None:
        """A client logged in to ``database``: its catalog is read from now on (once, then on reload)."""
        if not database.catalog_wanted:
            database.catalog_wanted = True
            self.refresh_catalog(database)

    def _find_peers(self) -> None:
        """Which entries reach the same database as which (DatabaseConfig.origin_key: their addresses overlap);
        warn about session-mode entries whose writes other entries' caches cannot see."""
        keys = {name: database.config.origin_key for name, database in self.databases.items()}
        self._peers = {name: [self.databases[other] for other, theirs in keys.items()
                              if other != name and mine & theirs] for name, mine in keys.items()}
        for name, database in self.databases.items():
            cached = [peer.config.name for peer in self._peers[name] if peer.cache is not None]
            if cached and database.config.pool.pool_mode != "transaction":
                log.warning("database %s (pool_mode %s) reaches the same database as %s: its writes do not "
                            "invalidate their query cache (entries there expire after max_age)",
                            name, database.config.pool.pool_mode, ", ".join(cached))

    def same_origin(self, database: Database) -> list[Database]:
        """``database`` and the other entries that reach the same database."""
        return [database, *self._peers.get(database.config.name, ())]

    def notes_writes(self, database: Database) -> bool:
        """Whether clients of ``database`` must have their writes noted: a cache of its own or of a peer's."""
        return database.cache is not None or any(peer.cache is not None for peer in self._peers.get(
            database.config.name, ()))

    def refresh_catalog(self, database: Database) -> None:
        """Read a database's catalog again in the background (first use, reload, and after a failure)."""
        if (database.config.cache.enabled or self.notes_writes(database)) and database.catalog_wanted:
            database.catalog_loaded_at = self.clock()
            self.spawn(self._load_catalog(database))

    async def _load_catalog(self, database: Database) -> None:
        started = time.monotonic()
        try:
            catalog = await database.load_catalog()
        except Exception as exc:  # the database may be down: the maintenance tick tries again
            log.warning("could not read the catalog of database %s: %s", database.config.name,
                        getattr(exc, "message", None) or type(exc).__name__)
            return
        log.info("catalog of database %s read in %.0f ms (%d relations, %d function names)",
                 database.config.name, (time.monotonic() - started) * 1000, len(catalog.relations),
                 len(catalog.functions))


class Server:
    """Listens for clients and runs until shut down."""

    def __init__(self, config: Config, config_path: str | None = None) -> None:
        self.state = ServerState(config)
        self.state.reload_hook = self.reload
        self.state.shutdown_hook = self.request_shutdown
        self.config_path = config_path
        self._listener: asyncio.Server | None = None
        self._stopped = asyncio.Event()
        self._maintainer: asyncio.Task[None] | None = None
        self.metrics: MetricsServer | None = None

    @property
    def port(self) -> int:
        assert self._listener is not None
        return int(self._listener.sockets[0].getsockname()[1])

    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        cfg = self.state.config
        self._listener = await loop.create_server(
            lambda: ClientSession(self.state), cfg.listen_host, cfg.listen_port, reuse_address=True, backlog=1024)
        self._maintainer = loop.create_task(self._maintain_forever())
        self.state.listening = True
        if cfg.metrics is not None:
            self.metrics = MetricsServer(self.state)
            await self.metrics.start(cfg.metrics.host, cfg.metrics.port)
        self.state.maintain()
        log.info("hyperpool listening on %s:%d (%d databases, pool_mode %s, %s)", cfg.listen_host, self.port,
                 len(self.state.databases), cfg.pool.pool_mode, build())

    async def _maintain_forever(self) -> None:
        while True:
            await asyncio.sleep(1.0)
            try:
                self.state.maintain()
            except Exception:
                log.exception("pool maintenance failed")

    def reload(self) -> bool:
        """Re-read the config file; keep the old config when the new one is invalid."""
        if self.config_path is None:
            return False
        try:
            config = load_config(self.config_path)
            self.state.apply_config(config)
        except (ConfigError, OSError, ssl.SSLError) as exc:
            log.error("reload failed, keeping the old configuration: %s", exc)
            return False
        log.info("configuration reloaded from %s", self.config_path)
        return True

    def install_signal_handlers(self) -> None:
        loop = asyncio.get_running_loop()
        loop.add_signal_handler(signal.SIGTERM, self.request_shutdown)
        loop.add_signal_handler(signal.SIGINT, self.request_shutdown)
        loop.add_signal_handler(signal.SIGHUP, self.reload)

    def request_shutdown(self) -> None:
        if not self.state.shutting_down:
            log.info("shutdown requested")
            self.state.spawn(self.shutdown())

    async def shutdown(self) -> None:
        state = self.state
        state.shutting_down = True
        if self._listener is not None:
            self._listener.close()
        timeout = state.config.shutdown_timeout
        finishing = [asyncio.ensure_future(s.shutdown()) for s in list(state.sessions)]
        if finishing:
            _, pending = await asyncio.wait(finishing, timeout=timeout or None)
            for task in pending:
                task.cancel()
        for session in list(state.sessions):
            session.fail(PoolError("terminating connection due to administrator command", sqlstate="57P01"))
        if self._maintainer is not None:
            self._maintainer.cancel()
        for db in state.databases.values():
            db.close_probes()
        await asyncio.gather(*(db.pool.close() for db in state.databases.values()))
        state.listening = False
        if self.metrics is not None:
            await self.metrics.close()
        log.info("hyperpool stopped")
        self._stopped.set()

    async def wait_stopped(self) -> None:
        await self._stopped.wait()

    async def run(self) -> None:
        await self.start()
        self.install_signal_handlers()
        await self.wait_stopped()
