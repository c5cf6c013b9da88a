"""The admin console: virtual database ``hyperpool`` (alias ``pgbouncer``), simple queries only.

SHOW commands use PgBouncer's column names and order, so tools written for PgBouncer (psql habits,
prometheus-community's pgbouncer_exporter) work unchanged; hyperpool's own additions are separate
commands. Everything is read from the live ServerState when asked. Errors are raised as ProxyError
and become ErrorResponses in the session, the one place that builds them.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import fields
from typing import TYPE_CHECKING, Any

from hyperpool import __version__
from hyperpool.config import Config, PoolSettings
from hyperpool.errors import ProxyError
from hyperpool.protocol import messages

if TYPE_CHECKING:
    from hyperpool.cache import QueryCache
    from hyperpool.database import Database
    from hyperpool.server import ServerState
    from hyperpool.session import ClientSession
    from hyperpool.upstream import ServerConnection

INT8, FLOAT8, TEXT = 20, 701, 25
Row = Sequence[Any]


def result(columns: Sequence[tuple[str, int]], rows: Iterable[Row], tag: str) -> bytes:
    """RowDescription + DataRows + CommandComplete (text format; numbers typed int8)."""
    out = [messages.row_description(columns)]
    count = 0
    for row in rows:
        out.append(messages.data_row(None if v is None else str(v) for v in row))
        count += 1
    out.append(messages.command_complete(f"{tag} {count}" if tag == "SHOW" else tag))
    return b"".join(out)


_TYPES = {"i": INT8, "f": FLOAT8, "t": TEXT}


def _cols(spec: str) -> list[tuple[str, int]]:
    """'name:t count:i age:f' -> [(name, TEXT), (count, INT8), (age, FLOAT8)]."""
    return [(part[:-2], _TYPES[part[-1]]) for part in spec.split()]


POOLS = _cols("database:t user:t cl_active:i cl_waiting:i cl_active_cancel_req:i cl_waiting_cancel_req:i sv_active:i "
              "sv_active_cancel:i sv_being_canceled:i sv_idle:i sv_used:i sv_tested:i sv_login:i maxwait:i "
              "maxwait_us:i pool_mode:t")
STATS = _cols("database:t total_xact_count:i total_query_count:i total_received:i total_sent:i total_xact_time:i "
              "total_query_time:i total_wait_time:i avg_xact_count:i avg_query_count:i avg_recv:i avg_sent:i "
              "avg_xact_time:i avg_query_time:i avg_wait_time:i")
SOCKETS = _cols("type:t user:t database:t state:t addr:t port:i local_addr:t local_port:i connect_time:t "
                "request_time:t wait:i wait_us:i close_needed:i ptr:t link:t remote_pid:i tls:t "
                "application_name:t")
DATABASES = _cols("name:t host:t port:i database:t force_user:t pool_size:i min_pool_size:i reserve_pool:i "
                  "pool_mode:t max_connections:i current_connections:i paused:i disabled:i")
CONFIG = _cols("key:t value:t default:t changeable:t")
LISTS = _cols("list:t items:i")
PINNED = _cols("database:t reason:t clients:i")
PLACEMENT = _cols("database:t location:t chosen:t status:t edge_rtt_ms:f origin_rtt_ms:f expected_ms:f samples:i "
                  "good_probes:i better_rounds:i failures:i last_error:t switches:i reason:t")
CACHE = _cols("database:t enabled:t entries:i bytes:i max_bytes:i max_entry_bytes:i max_age:f "
              "stale_while_revalidate:f hits:i stale:i misses:i stored:i too_big:i evictions:i invalidations:i "
              "discarded_fills:i hit_ratio:t not_cacheable:t")


class AdminConsole:
    """Runs admin commands against the live state."""

    def __init__(self, state: ServerState) -> None:
        self.state = state

    def execute(self, sql: str) -> bytes:
        words = sql.strip().rstrip(";").strip().split()
        if not words:
            return messages.EMPTY_QUERY
        verb = words[0].upper()
        args = words[1:]
        if verb == "SHOW" and len(args) == 1:
            show = self._shows().get(args[0].upper())
            if show is not None:
                return show()
        commands: dict[str, Callable[[list[str]], str]] = {
            "RELOAD": self._reload, "PAUSE": self._pause, "RESUME": self._resume, "RECONNECT": self._reconnect,
            "KILL": self._kill, "SHUTDOWN": self._shutdown, "CACHE": self._cache,
        }
        command = commands.get(verb)
        if command is None:
            raise ProxyError(f'unrecognized admin command "{sql.strip()[:80]}"', sqlstate="42601",
                             hint="SHOW HELP lists the commands")
        return messages.command_complete(command(args))

    def _shows(self) -> dict[str, Callable[[], bytes]]:
        return {"POOLS": self.show_pools, "STATS": self.show_stats, "CLIENTS": self.show_clients,
                "SERVERS": self.show_servers, "DATABASES": self.show_databases, "CONFIG": self.show_config,
                "VERSION": self.show_version, "LISTS": self.show_lists, "PINNED": self.show_pinned,
                "CACHE": self.show_cache, "PLACEMENT": self.show_placement, "HELP": self.show_help}

    # --- SHOW ----------------------------------------------------------------------------

    def _sessions(self, database: Database | None = None) -> list[ClientSession]:
        return [s for s in self.state.sessions if s.database is not None and
                (database is None or s.database is database)]

    def show_pools(self) -> bytes:
        now = time.monotonic()
        rows = []
        for name, db in sorted(self.state.databases.items()):
            sessions = self._sessions(db)
            waiting = [s for s in sessions if s.waiting_since is not None]
            maxwait = max((now - s.waiting_since for s in waiting if s.waiting_since is not None), default=0.0)
            pool = db.pool
            rows.append((name, db.login.user, sum(1 for s in sessions if s.server is not None), len(waiting), 0, 0,
                         len(pool.active), 0, 0, len(pool.idle), 0, 0, pool.connecting, int(maxwait),
                         int((maxwait % 1) * 1_000_000), db.config.pool.pool_mode))
        return result(POOLS, rows, "SHOW")

    def show_stats(self) -> bytes:
        rows = []
        for name, db in sorted(self.state.databases.items()):
            st = db.stats
            rows.append((name, st.transactions, st.queries, st.received, st.sent, _us(st.transaction_time),
                         _us(st.query_time), _us(st.wait_time), *db.stats_window.averages()))
        return result(STATS, rows, "SHOW")

    def show_clients(self) -> bytes:
        rows = []
        for s in sorted(self._sessions(), key=lambda s: s.key):
            assert s.database is not None
            peer = s.peer
            state = "active" if s.server is not None else "waiting" if s.waiting_since is not None else "idle"
            rows.append(("C", s.user, s.database.config.name, state, peer[0], peer[1], s.local[0], s.local[1],
                         _timestamp(s.connected_at), _timestamp(s.connected_at), 0, 0, 0, _ptr(s),
                         _ptr(s.server) if s.server is not None else "", s.key[0], "TLSv1.3" if s.tls else "",
                         s.wanted.get("application_name", "")))
        return result(SOCKETS, rows, "SHOW")

    def show_servers(self) -> bytes:
        rows = []
        now_wall, now = time.time(), time.monotonic()
        for name, db in sorted(self.state.databases.items()):
            pool = db.pool
            for state, conns in (("active", list(pool.active)), ("idle", list(pool.idle))):
                for conn in conns:
                    rows.append(self._server_row(name, db, conn, state, now_wall - (now - conn.created_at)))
        return result(SOCKETS, rows, "SHOW")

    @staticmethod
    def _server_row(name: str, db: Database, conn: ServerConnection, state: str, opened: float) -> Row:
        local = conn.transport.get_extra_info("sockname") if conn.transport is not None else None
        local = local or ("", 0)
        return ("S", conn.db.user, name, state, conn.db.host, conn.db.port, local[0], local[1],
                _timestamp(opened), _timestamp(opened), 0, 0, 0, _ptr(conn),
                _ptr(conn.client) if conn.client is not None else "", conn.backend_key[0],
                "TLS" if conn.transport is not None and conn.transport.get_extra_info("ssl_object") else "",
                conn.params.get("application_name", ""))

    def show_databases(self) -> bytes:
        rows = []
        for name, db in sorted(self.state.databases.items()):
            cfg, pool, login = db.config, db.pool, db.login
            rows.append((name, login.host, login.port, login.dbname, login.user, cfg.pool.pool_size,
                         cfg.pool.min_pool_size, 0, cfg.pool.pool_mode, cfg.pool.max_client_conn, pool.size,
                         int(pool.paused), 0))
        return result(DATABASES, rows, "SHOW")

    def show_config(self) -> bytes:
        config = self.state.config
        defaults = Config()
        rows: list[Row] = [
            ("listen_addr", config.listen_host, defaults.listen_host, "no"),
            ("listen_port", config.listen_port, defaults.listen_port, "no"),
            ("auth_type", config.auth_type, defaults.auth_type, "yes"),
        ]
        for f in fields(PoolSettings):
            rows.append((f.name, getattr(config.pool, f.name), getattr(PoolSettings(), f.name), "yes"))
        for key in ("shutdown_timeout", "max_packet_size", "client_login_timeout", "log_level", "log_format",
                    "log_slow_query_ms"):
            rows.append((key, getattr(config, key), getattr(defaults, key), "yes"))
        rows.append(("admin_users", ",".join(config.admin_users), "", "yes"))
        return result(CONFIG, rows, "SHOW")

    def show_version(self) -> bytes:
        return result([("version", TEXT)], [(f"hyperpool {__version__}",)], "SHOW")

    def show_lists(self) -> bytes:
        sessions = self._sessions()
        pools = [db.pool for db in self.state.databases.values()]
        rows = [("databases", len(self.state.databases)), ("users", len(self.state.config.users)),
                ("pools", len(pools)), ("free_clients", 0), ("used_clients", len(sessions)),
                ("login_clients", len(self.state.sessions) - len(sessions)), ("free_servers", 0),
                ("used_servers", sum(len(p.active) + len(p.idle) for p in pools))]
        return result(LISTS, rows, "SHOW")

    def show_pinned(self) -> bytes:
        pinned = self.state.pinned_clients()
        rows = [(db, reason, count) for db, reasons in sorted(pinned.items())
                for reason, count in sorted(reasons.items())]
        return result(PINNED, rows, "SHOW")

    def show_cache(self) -> bytes:
        rows = [_cache_row(name, db.cache) for name, db in sorted(self.state.databases.items())]
        return result(CACHE, rows, "SHOW")

    def show_placement(self) -> bytes:
        """Per database with locations: each location's health, RTTs and the choice (placement.py); per database
        pooling to its origin directly: the measured RTT to it (what edges are told)."""
        rows: list[Row] = []
        for name, db in sorted(self.state.databases.items()):
            placement = db.placement
            if placement is None:
                rtt = db.origin_rtt()
                ms = None if rtt is None else round(rtt * 1000, 3)
                rows.append((name, "origin", "yes", "measured" if rtt is not None else "unprobed", None, ms, ms,
                             len(db.origin_samples), 0, 0, 0, None, 0, "pools to its origin directly"))
                continue
            reason = placement.last.reason if placement.last is not None else "no probe round yet"
            for row in placement.snapshot():
                rows.append((*row[:2], "yes" if row[2] else "no", *row[3:], reason if row[2] else ""))
        return result(PLACEMENT, rows, "SHOW")

    def show_help(self) -> bytes:
        lines = ["SHOW POOLS | STATS | CLIENTS | SERVERS | DATABASES | CONFIG | VERSION | LISTS | PINNED | CACHE "
                 "| PLACEMENT | HELP", "RELOAD", "PAUSE [db]", "RESUME [db]", "RECONNECT [db]", "KILL db",
                 "CACHE PURGE [db]", "SHUTDOWN"]
        return result([("command", TEXT)], [(line,) for line in lines], "SHOW")

    # --- commands ------------------------------------------------------------------------

    def _databases(self, args: list[str], command: str, required: bool = False) -> list[Database]:
        if len(args) > 1 or (required and not args):
            raise ProxyError(f"usage: {command} {'db' if required else '[db]'}", sqlstate="42601")
        if not args:
            return list(self.state.databases.values())
        database = self.state.databases.get(args[0].strip('"'))
        if database is None:
            raise ProxyError(f'no such database: "{args[0]}"', sqlstate="3D000")
        return [database]

    def _reload(self, args: list[str]) -> str:
        if args:
            raise ProxyError("usage: RELOAD", sqlstate="42601")
        if self.state.reload_hook is None or not self.state.reload_hook():
            raise ProxyError("reload failed: the old configuration is kept (see the log)", sqlstate="F0000")
        return "RELOAD"

    def _pause(self, args: list[str]) -> str:
        for database in self._databases(args, "PAUSE"):
            database.pool.pause()
        return "PAUSE"

    def _resume(self, args: list[str]) -> str:
        for database in self._databases(args, "RESUME"):
            database.pool.resume()
        return "RESUME"

    def _reconnect(self, args: list[str]) -> str:
        for database in self._databases(args, "RECONNECT"):
            database.pool.generation += 1  # connections in use are closed when they come back
            for conn in list(database.pool.idle):
                database.pool.discard(conn, "RECONNECT from the admin console")
        return "RECONNECT"

    def _kill(self, args: list[str]) -> str:
        for database in self._databases(args, "KILL", required=True):
            for session in self._sessions(database):
                session.fail(ProxyError("terminated by KILL from the admin console", sqlstate="57P01",
                                        fatal=True))
            for conn in list(database.pool.idle):
                database.pool.discard(conn, "KILL from the admin console")
        return "KILL"

    def _cache(self, args: list[str]) -> str:
        if not args or args[0].upper() != "PURGE":
            raise ProxyError("usage: CACHE PURGE [db]", sqlstate="42601")
        for database in self._databases(args[1:], "CACHE PURGE"):
            if database.cache is not None:
                database.cache.purge()
        return "CACHE PURGE"

    def _shutdown(self, args: list[str]) -> str:
        if args:
            raise ProxyError("usage: SHUTDOWN", sqlstate="42601")
        if self.state.shutdown_hook is not None:
            self.state.shutdown_hook()
        return "SHUTDOWN"


def _cache_row(name: str, cache: QueryCache | None) -> Row:
    """A SHOW CACHE row; a database without a cache (disabled, or not transaction pooling) shows zeros."""
    if cache is None:
        return (name, "no", *[0] * 14, "", "")
    settings, st = cache.settings, cache.stats
    lookups = st.hits + st.stale + st.misses
    ratio = f"{(st.hits + st.stale) / lookups:.2f}" if lookups else ""  # answered from the cache, fresh or stale
    reasons = " ".join(f"{reason}={count}" for reason, count in sorted(st.not_cacheable.items()))
    return (name, "yes", len(cache), cache.bytes, settings.max_bytes, settings.max_entry_bytes,
            _number(settings.max_age), _number(settings.stale_while_revalidate), st.hits, st.stale, st.misses,
            st.stored, st.too_big, st.evictions, st.invalidations, st.discarded_fills, ratio, reasons)


def _number(value: float) -> str:
    """60.0 -> '60', 0.5 -> '0.5' (a float8 column)."""
    return str(int(value)) if value.is_integer() else str(value)


def _us(seconds: float) -> int:
    return int(seconds * 1_000_000)


def _timestamp(wall: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(wall))


def _ptr(obj: object) -> str:
    return f"0x{id(obj):x}"
