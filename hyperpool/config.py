"""Configuration: frozen dataclasses, validated once by :func:`load_config`.

Every problem raises :class:`ConfigError` naming the key path and the reason,
so nothing starts half-configured. ``${VAR}`` in any string value is taken
from the environment passed in (a missing variable is an error).
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any

import yaml

from hyperpool.cache import CacheSettings
from hyperpool.errors import ConfigError
from hyperpool.placement import LOCAL, PlacementConfig
from hyperpool.protocol import scram

AUTH_TYPES = ("scram-sha-256", "md5", "password", "trust")
POOL_MODES = ("transaction", "session")
PINNING = ("allow", "refuse")
SSLMODES = ("disable", "allow", "prefer", "require", "verify-ca", "verify-full")
DEFAULT_CONFIG_PATH = "config/hyperpool.yaml"
DEFAULT_METRICS_PORT = 9930
DEFAULT_LISTEN_PORT = 6432
# the HTTP endpoint's paths (metrics: {host, port})
METRICS_PATH, HEALTH_PATH, READY_PATH = "/metrics", "/healthz", "/readyz"
ADMIN_DATABASES = ("hyperpool", "pgbouncer")  # virtual databases of the admin console
LOG_FORMATS = ("text", "json")


@dataclass(frozen=True)
class PoolSettings:
    """Pool sizing and timeouts (seconds); PgBouncer's names and meanings."""

    pool_mode: str = "transaction"
    pool_size: int = 20
    min_pool_size: int = 0
    max_client_conn: int = 1000
    query_wait_timeout: float = 120.0
    server_idle_timeout: float = 600.0
    server_lifetime: float = 3600.0
    server_connect_timeout: float = 15.0
    server_login_retry: float = 1.0
    # protocol-level prepared statements each server connection keeps (least recently used evicted)
    max_prepared_statements: int = 200
    # session state that cannot move between server connections (LISTEN, session advisory locks,
    # temporary tables, WITH HOLD cursors, SET ROLE): "allow" pins the client to its server
    # connection, "refuse" answers such statements with an error instead
    pinning: str = "allow"


@dataclass(frozen=True)
class UserConfig:
    name: str
    password: str  # as written: a SCRAM verifier, an md5 hash, or plain text
    scram: scram.ScramVerifier | None  # derived: from the verifier or from plain text

    @property
    def plaintext(self) -> str | None:
        if scram.is_scram_verifier(self.password) or scram.is_md5_hash(self.password):
            return None
        return self.password


@dataclass(frozen=True)
class DatabaseConfig:
    name: str  # what clients put in their connection string
    host: str
    port: int
    dbname: str  # upstream name
    user: str  # origin user
    password: str | None
    sslmode: str
    sslrootcert: str | None
    pool: PoolSettings
    connect_options: tuple[tuple[str, str], ...] = ()
    cache: CacheSettings = field(default_factory=CacheSettings)
    # Regional topology: other hyperpool instances that pool to this database (and LOCAL: from here), by
    # name; empty = pool to the origin above. A location's config is this one with its address and login.
    locations: tuple[tuple[str, Location], ...] = ()
    placement: PlacementConfig = field(default_factory=PlacementConfig)
    via: str | None = None  # set on a location's config: the name of the hyperpool instance it reaches

    def targets(self) -> dict[str, DatabaseConfig]:
        """Where server connections may go, by location name (just the origin when no locations are set)."""
        if not self.locations:
            return {LOCAL: self}
        return {name: self if loc.local else replace(
            self, host=loc.host, port=loc.port, dbname=loc.dbname or self.dbname, user=loc.user,
            password=loc.password, sslmode=loc.sslmode, sslrootcert=loc.sslrootcert, connect_options=(),
            via=name) for name, loc in self.locations}

    @property
    def origin_key(self) -> frozenset[tuple[str, int, str]]:
        """Where this entry's connections may go: entries with the same key reach the same database, so a
        write through one invalidates the query caches of all (addresses compared as written)."""
        return frozenset((t.host, t.port, t.dbname) for t in self.targets().values())


@dataclass(frozen=True)
class Location:
    """One entry of a database's ``locations:``: another hyperpool instance, or ``local``."""

    local: bool = False
    host: str = "127.0.0.1"
    port: int = DEFAULT_LISTEN_PORT
    user: str = ""
    password: str | None = None
    dbname: str | None = None  # the database's name at that instance (default: the same)
    sslmode: str = "prefer"
    sslrootcert: str | None = None


@dataclass(frozen=True)
class TLSConfig:
    cert: str
    key: str


@dataclass(frozen=True)
class MetricsConfig:
    """The HTTP endpoint for Prometheus (/metrics) and health checks (/healthz, /readyz)."""

    host: str = "127.0.0.1"
    port: int = DEFAULT_METRICS_PORT


@dataclass(frozen=True)
class Config:
    listen_host: str = "127.0.0.1"
    listen_port: int = DEFAULT_LISTEN_PORT
    auth_type: str = "scram-sha-256"
    scram_iterations: int = scram.DEFAULT_ITERATIONS  # for verifiers hyperpool derives from plain text
    allow_cleartext_over_tcp: bool = False
    users: Mapping[str, UserConfig] = field(default_factory=dict)
    databases: Mapping[str, DatabaseConfig] = field(default_factory=dict)
    pool: PoolSettings = field(default_factory=PoolSettings)
    cache: CacheSettings = field(default_factory=CacheSettings)
    tls: TLSConfig | None = None
    shutdown_timeout: float = 30.0
    max_packet_size: int = 256 * 1024 * 1024
    client_login_timeout: float = 60.0
    log_level: str = "info"
    log_format: str = "text"
    log_slow_query_ms: float = 0.0  # 0: off
    metrics: MetricsConfig | None = None  # None: no HTTP endpoint
    admin_users: tuple[str, ...] = ()  # users allowed on the admin console
    source: str = "<defaults>"


# --- small typed readers, each naming the key on failure ------------------------------------

_ENV_REF = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)\}")


def _expand(value: Any, key: str, env: Mapping[str, str]) -> Any:
    if isinstance(value, str):
        def sub(m: re.Match[str]) -> str:
            if m.group(1) not in env:
                raise ConfigError(f"{key}: environment variable {m.group(1)} is not set")
            return env[m.group(1)]
        return _ENV_REF.sub(sub, value)
    if isinstance(value, dict):
        return {k: _expand(v, f"{key}.{k}" if key else str(k), env) for k, v in value.items()}
    if isinstance(value, list):
        return [_expand(v, f"{key}[{i}]", env) for i, v in enumerate(value)]
    return value


def _mapping(value: Any, key: str) -> dict[str, Any]:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise ConfigError(f"{key}: expected a mapping, got {type(value).__name__}")
    return value


def _check_keys(section: Mapping[str, Any], allowed: set[str], key: str) -> None:
    for name in section:
        if name not in allowed:
            where = f"{key}.{name}" if key else str(name)
            raise ConfigError(f"{where}: unknown key (allowed: {', '.join(sorted(allowed))})")


def _str(value: Any, key: str) -> str:
    if isinstance(value, bool) or not isinstance(value, str | int | float):
        raise ConfigError(f"{key}: expected a string")
    return str(value)


def _int(value: Any, key: str, lo: int, hi: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ConfigError(f"{key}: expected an integer, got {value!r}")
    if not lo <= value <= hi:
        raise ConfigError(f"{key}: {value} is out of range [{lo}, {hi}]")
    return value


def _seconds(value: Any, key: str) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or value < 0:
        raise ConfigError(f"{key}: expected a non-negative number of seconds, got {value!r}")
    return float(value)


def _milliseconds(value: Any, key: str) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or value < 0:
        raise ConfigError(f"{key}: expected a non-negative number of milliseconds, got {value!r}")
    return float(value)


def _bool(value: Any, key: str) -> bool:
    if not isinstance(value, bool):
        raise ConfigError(f"{key}: expected true or false, got {value!r}")
    return value


def _choice(value: Any, key: str, choices: tuple[str, ...]) -> str:
    if value not in choices:
        raise ConfigError(f"{key}: {value!r} is not one of {', '.join(choices)}")
    return str(value)


# --- sections -------------------------------------------------------------------------------

_POOL_READERS: dict[str, Callable[[Any, str], Any]] = {
    "pool_mode": lambda v, k: _choice(v, k, POOL_MODES),
    "pool_size": lambda v, k: _int(v, k, 1, 10000),
    "max_prepared_statements": lambda v, k: _int(v, k, 1, 100_000),
    "pinning": lambda v, k: _choice(v, k, PINNING),
    "min_pool_size": lambda v, k: _int(v, k, 0, 10000),
    "max_client_conn": lambda v, k: _int(v, k, 1, 1_000_000),
    "query_wait_timeout": _seconds,
    "server_idle_timeout": _seconds,
    "server_lifetime": _seconds,
    "server_connect_timeout": _seconds,
    "server_login_retry": _seconds,
}
POOL_KEYS = set(_POOL_READERS)


def _pool_settings(section: Mapping[str, Any], base: PoolSettings, key: str) -> PoolSettings:
    changes = {name: _POOL_READERS[name](section[name], f"{key}{name}") for name in POOL_KEYS & set(section)}
    settings = replace(base, **changes)
    if settings.min_pool_size > settings.pool_size:
        raise ConfigError(
            f"{key}min_pool_size: {settings.min_pool_size} is larger than pool_size {settings.pool_size}"
        )
    return settings


def _iterations(value: Any, key: str) -> int:
    return _int(value, key, 1, scram.MAX_ITERATIONS)


def _user(name: str, raw: Any, iterations: int) -> UserConfig:
    key = f"users.{name}"
    if isinstance(raw, str):
        raw = {"password": raw}
    section = _mapping(raw, key)
    _check_keys(section, {"password", "scram_iterations"}, key)
    if "password" not in section:
        raise ConfigError(f"{key}.password: required")
    password = _str(section["password"], f"{key}.password")
    if not password:
        raise ConfigError(f"{key}.password: must not be empty")
    plain = not password.startswith("SCRAM-SHA-256$") and not scram.is_md5_hash(password)
    if "scram_iterations" in section and not plain:
        raise ConfigError(f"{key}.scram_iterations: only for a plain-text password "
                          "(a SCRAM verifier carries its own iteration count; an md5 hash has none)")
    verifier: scram.ScramVerifier | None = None
    if password.startswith("SCRAM-SHA-256$"):
        try:
            verifier = scram.parse_verifier(password)
        except ValueError as exc:
            raise ConfigError(f"{key}.password: {exc}") from None
    elif plain:
        count = _iterations(section.get("scram_iterations", iterations), f"{key}.scram_iterations")
        verifier = scram.make_verifier(password, iterations=count)
    return UserConfig(name=name, password=password, scram=verifier)


_DB_KEYS = {"host", "port", "dbname", "user", "password", "sslmode", "sslrootcert", "connect_options",
            "cache", "locations", "placement"} | POOL_KEYS
_LOCATION_KEYS = {"host", "port", "user", "password", "dbname", "sslmode", "sslrootcert"}
_PLACEMENT_KEYS = {"mode", "location", "probe_interval", "samples", "switch_margin_ms", "switch_margin_fraction",
                   "switch_rounds", "recover_rounds"}


def _locations(raw: Any, key: str) -> tuple[tuple[str, Location], ...]:
    section = _mapping(raw, key)
    out = []
    for name, value in section.items():
        name = str(name)
        where = f"{key}.{name}"
        if name == LOCAL:
            if value not in (None, True, {}):
                raise ConfigError(f"{where}: the local location takes no settings (it is this database's origin)")
            out.append((name, Location(local=True)))
            continue
        loc = _mapping(value, where)
        _check_keys(loc, _LOCATION_KEYS, where)
        if "host" not in loc or "user" not in loc:
            raise ConfigError(f"{where}: host and user are required (the hyperpool instance and its login)")
        sslmode = _choice(loc.get("sslmode", "prefer"), f"{where}.sslmode", SSLMODES)
        password = loc.get("password")
        out.append((name, Location(
            host=_str(loc["host"], f"{where}.host"), port=_int(loc.get("port", DEFAULT_LISTEN_PORT), f"{where}.port",
                                                                 1, 65535),
            user=_str(loc["user"], f"{where}.user"),
            password=None if password is None else _str(password, f"{where}.password"),
            dbname=None if loc.get("dbname") is None else _str(loc["dbname"], f"{where}.dbname"),
            sslmode=sslmode, sslrootcert=None if loc.get("sslrootcert") is None else str(loc["sslrootcert"]))))
    if section and not out:
        raise ConfigError(f"{key}: at least one location")
    return tuple(out)


def _placement(raw: Any, key: str, locations: tuple[tuple[str, Location], ...]) -> PlacementConfig:
    section = _mapping(raw, key)
    _check_keys(section, _PLACEMENT_KEYS, key)
    changes: dict[str, Any] = {}
    if "mode" in section:
        changes["mode"] = _choice(section["mode"], f"{key}.mode", ("auto", "fixed"))
    if "location" in section:
        changes["location"] = _str(section["location"], f"{key}.location")
        if changes["location"] not in dict(locations):
            raise ConfigError(f"{key}.location: {changes['location']!r} is not one of the database's locations")
    for name in ("probe_interval", "switch_margin_ms", "switch_margin_fraction"):
        if name in section:
            changes[name] = _seconds(section[name], f"{key}.{name}")
    for name in ("samples", "switch_rounds", "recover_rounds"):
        if name in section:
            changes[name] = _int(section[name], f"{key}.{name}", 1, 1000)
    try:
        return PlacementConfig(**changes)
    except ValueError as exc:
        raise ConfigError(f"{key}: {exc}") from None
_CACHE_KEYS = {"enabled", "max_age", "stale_while_revalidate", "max_bytes", "max_entry_bytes"}


def _cache_settings(raw: Any, base: CacheSettings, key: str) -> CacheSettings:
    """A `cache:` mapping over ``base`` (the top-level section for a database's own)."""
    section = _mapping(raw, key)
    _check_keys(section, _CACHE_KEYS, key)
    changes: dict[str, Any] = {}
    if "enabled" in section:
        changes["enabled"] = _bool(section["enabled"], f"{key}.enabled")
    for name in ("max_age", "stale_while_revalidate"):
        if name in section:
            changes[name] = _seconds(section[name], f"{key}.{name}")
    for name in ("max_bytes", "max_entry_bytes"):
        if name in section:
            changes[name] = _int(section[name], f"{key}.{name}", 0, 1 << 40)
    return replace(base, **changes)


def _database(name: str, raw: Any, pool: PoolSettings, cache: CacheSettings) -> DatabaseConfig:
    key = f"databases.{name}"
    section = _mapping(raw, key)
    _check_keys(section, _DB_KEYS, key)
    locations = _locations(section.get("locations"), f"{key}.locations")
    if "user" not in section and (not locations or LOCAL in dict(locations)):
        raise ConfigError(f"{key}.user: required (the origin user hyperpool connects as)")
    sslmode = _choice(section.get("sslmode", "prefer"), f"{key}.sslmode", SSLMODES)
    rootcert = section.get("sslrootcert")
    if sslmode in ("verify-ca", "verify-full") and not rootcert:
        raise ConfigError(f"{key}.sslrootcert: required with sslmode {sslmode}")
    if rootcert is not None and not Path(_str(rootcert, f"{key}.sslrootcert")).is_file():
        raise ConfigError(f"{key}.sslrootcert: file {rootcert} does not exist")
    options = _mapping(section.get("connect_options"), f"{key}.connect_options")
    password = section.get("password")
    return DatabaseConfig(
        name=name,
        host=_str(section.get("host", "127.0.0.1"), f"{key}.host"),
        port=_int(section.get("port", 5432), f"{key}.port", 1, 65535),
        dbname=_str(section.get("dbname", name), f"{key}.dbname"),
        user=_str(section.get("user", ""), f"{key}.user"),
        password=None if password is None else _str(password, f"{key}.password"),
        sslmode=sslmode,
        sslrootcert=None if rootcert is None else str(rootcert),
        pool=_pool_settings(section, pool, f"{key}."),
        connect_options=tuple((str(k), _str(v, f"{key}.connect_options.{k}")) for k, v in options.items()),
        cache=_cache_settings(section.get("cache"), cache, f"{key}.cache"),
        locations=locations,
        placement=_placement(section.get("placement"), f"{key}.placement", locations),
    )


def _tls(raw: Any) -> TLSConfig | None:
    if raw is None:
        return None
    section = _mapping(raw, "tls")
    _check_keys(section, {"cert", "key"}, "tls")
    paths = {}
    for name in ("cert", "key"):
        if name not in section:
            raise ConfigError(f"tls.{name}: required when tls is set")
        paths[name] = _str(section[name], f"tls.{name}")
        if not Path(paths[name]).is_file():
            raise ConfigError(f"tls.{name}: file {paths[name]} does not exist")
    return TLSConfig(**paths)


_TOP_KEYS = {f.name for f in fields(Config)} - {"listen_host", "listen_port", "pool", "source", "admin_users"}
_TOP_KEYS |= {"listen", "admin"} | POOL_KEYS


def _metrics(value: Any) -> MetricsConfig | None:
    if value is None:
        return None
    section = _mapping(value, "metrics")
    _check_keys(section, {"host", "port"}, "metrics")
    return MetricsConfig(host=_str(section.get("host", "127.0.0.1"), "metrics.host"),
                         port=_int(section.get("port", DEFAULT_METRICS_PORT), "metrics.port", 0, 65535))


def _admin_users(value: Any, users: Mapping[str, UserConfig]) -> tuple[str, ...]:
    section = _mapping(value, "admin")
    _check_keys(section, {"users"}, "admin")
    names = section.get("users", [])
    if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
        raise ConfigError("admin.users: expected a list of user names")
    for name in names:
        if name not in users:
            raise ConfigError(f"admin.users: {name!r} is not in users")
    return tuple(names)


def parse_config(data: Any, env: Mapping[str, str], source: str = "<memory>") -> Config:
    """Validate an already-parsed YAML document."""
    top = _mapping(_expand(data, "", env), "<top level>")
    _check_keys(top, _TOP_KEYS, "")
    listen = _mapping(top.get("listen"), "listen")
    _check_keys(listen, {"host", "port"}, "listen")
    pool = _pool_settings(top, PoolSettings(), "")
    iterations = _iterations(top.get("scram_iterations", scram.DEFAULT_ITERATIONS), "scram_iterations")
    users = {str(n): _user(str(n), raw, iterations) for n, raw in _mapping(top.get("users"), "users").items()}
    cache = _cache_settings(top.get("cache"), CacheSettings(), "cache")
    dbs = {str(n): _database(str(n), raw, pool, cache)
           for n, raw in _mapping(top.get("databases"), "databases").items()}
    for name in ADMIN_DATABASES:
        if name in dbs:
            raise ConfigError(f"databases.{name}: reserved for the admin console")
    auth_type = _choice(top.get("auth_type", "scram-sha-256"), "auth_type", AUTH_TYPES)
    if auth_type == "md5":
        for user in users.values():
            if user.scram is None and not user.plaintext and not scram.is_md5_hash(user.password):
                raise ConfigError(f"users.{user.name}.password: md5 needs plain text or an md5 hash")
    if auth_type == "scram-sha-256":
        for user in users.values():
            if user.scram is None:
                raise ConfigError(
                    f"users.{user.name}.password: an md5 hash cannot be used with auth_type scram-sha-256"
                )
    return Config(
        listen_host=_str(listen.get("host", "127.0.0.1"), "listen.host"),
        listen_port=_int(listen.get("port", DEFAULT_LISTEN_PORT), "listen.port", 0, 65535),
        auth_type=auth_type,
        scram_iterations=iterations,
        allow_cleartext_over_tcp=_bool(top.get("allow_cleartext_over_tcp", False), "allow_cleartext_over_tcp"),
        users=users,
        databases=dbs,
        pool=pool,
        cache=cache,
        tls=_tls(top.get("tls")),
        shutdown_timeout=_seconds(top.get("shutdown_timeout", 30.0), "shutdown_timeout"),
        max_packet_size=_int(top.get("max_packet_size", 256 * 1024 * 1024), "max_packet_size", 1024, 1 << 30),
        client_login_timeout=_seconds(top.get("client_login_timeout", 60.0), "client_login_timeout"),
        log_level=_choice(top.get("log_level", "info"), "log_level", ("debug", "info", "warning", "error")),
        log_format=_choice(top.get("log_format", "text"), "log_format", LOG_FORMATS),
        log_slow_query_ms=_milliseconds(top.get("log_slow_query_ms", 0), "log_slow_query_ms"),
        metrics=_metrics(top.get("metrics")),
        admin_users=_admin_users(top.get("admin"), users),
        source=source,
    )


def load_config(path: str | os.PathLike[str], env: Mapping[str, str] | None = None) -> Config:
    """Read, expand and validate a YAML config file."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read: {exc.strerror}") from None
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{path}: not valid UTF-8 ({exc.reason} at byte {exc.start})") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: invalid YAML: {exc}") from None
    return parse_config(data, os.environ if env is None else env, source=str(path))
