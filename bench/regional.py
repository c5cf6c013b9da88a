#!/usr/bin/env python3
"""Regional bench (issue #6): connect, one query, close, with the database far away.

    python bench/regional.py [--requests 50] [--delay-ms 25] [--json FILE] [--no-tls] [--scram-iterations 4096]

An application that opens a connection per request (as serverless functions do) pays every round trip of
the connection setup across the distance to its database. This bench puts the database DELAY ms away (one
way) behind a latency relay and times, request by request, connect + one query + close with psycopg over:

  (a) direct:   client -> relay(DELAY) -> PostgreSQL
  (b) uncached: client -> edge hyperpool -> relay(DELAY) -> pool hyperpool -> PostgreSQL, `nocache` hint
  (c) cached:   the same path, the query answered by the edge's query cache

each without and with TLS "to the database" (for (a) the client's own connection, sslmode=require; for (b)
and (c) the cross-region link edge -> pool; client -> edge is same-region and never TLS). PostgreSQL, both
hyperpool instances and both relays are separate processes. It prints the median and p95 per path, the
ratios direct/path, the round trips each path makes (counted, and measured as latency / (2 x DELAY)) and the
issue's targets. --scram-iterations N gives the client's logins (to PostgreSQL directly and to the edge alike)
SCRAM verifiers of N PBKDF2 iterations instead of 4096, so every path's client pays the same, smaller key
derivation (see README "Login cost"). Everything it starts is stopped and removed on exit, also on Ctrl-C or an error.
See bench/README.md.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import shutil
import socket
import ssl
import statistics
import struct
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import psycopg
from psycopg.conninfo import make_conninfo

REPO = Path(__file__).resolve().parent.parent
for _path in (str(REPO), str(Path(__file__).resolve().parent)):
    if _path not in sys.path:
        sys.path.insert(0, _path)

from bench_servers import (  # noqa: E402
    DBNAME,
    HOST,
    PASSWORD,
    USER,
    BenchError,
    Hyperpool,
    LatencyRelayProcess,
    ManagedProcess,
    machine_basics,
    run_as_owner,
    run_bench,
    run_psql,
    write_self_signed_cert,
)
from cache import first_text_line, parse_table  # noqa: E402
from compare import indent  # noqa: E402

from hyperpool.embedded import EmbeddedPostgres  # noqa: E402
from hyperpool.protocol import scram  # noqa: E402

WARMUPS = 3  # untimed requests per path before the measured ones
POOL_SIZE = 4  # pool_size = min_pool_size of both hyperpool instances: warm connections before the first request
EDGE_USER = EDGE_PASSWORD = "edge"  # the edge's login at the pool instance (a user of the pool instance)
LOCATION = "near_db"  # the edge's name for the pool instance
TLS_DB = "bench_tls"  # the edge's second entry for the same database: its link to the pool instance is TLS
CACHE_MAX_AGE = 3600  # the edge's cache.max_age: a cached entry stays fresh for the whole run
READY_TIMEOUT = 60.0  # seconds to wait for placement and warm pools
CACHED_TIMEOUT = 30.0  # seconds to wait until the edge answers the cached path from its cache
UNCACHED_GOAL = 0.9  # uncached: direct/path >= 0.9 x direct's round trips
CACHED_GOAL = 25.0  # cached: direct/path >= 25

TABLE_SETUP = """
CREATE TABLE regional(id int PRIMARY KEY, payload text NOT NULL);
INSERT INTO regional SELECT i, rpad(md5(i::text), 100, md5((-i)::text)) FROM generate_series(1, 100) i;
ANALYZE regional;
"""
QUERY = "SELECT id, payload FROM regional WHERE id = 42"
NOCACHE_QUERY = "/* hyperpool: nocache */ " + QUERY


# ---------------------------------------------------------------------------------------------
# Paths and requests


@dataclass(frozen=True)
class Route:
    """One path a request takes, with or without TLS to the database."""

    kind: str  # "direct", "uncached" or "cached"
    tls: bool

    @property
    def name(self) -> str:
        return f"{self.kind}{' tls' if self.tls else ''}"

    @property
    def label(self) -> str:
        return {"direct": "(a) direct via relay", "uncached": "(b) edge -> pool, uncached",
                "cached": "(c) edge -> pool, cached"}[self.kind]

    @property
    def sql(self) -> str:
        return NOCACHE_QUERY if self.kind == "uncached" else QUERY

    @property
    def tls_where(self) -> str:
        if not self.tls:
            return "no"
        return "client->PG" if self.kind == "direct" else "edge->pool"


@dataclass
class TlsHandshake:
    """How the client's TLS handshake with PostgreSQL goes (the direct TLS path)."""

    protocol: str | None = None  # what libpq negotiated (pg_stat_ssl.version of a warm-up connection)
    hello_retry: bool | None = None  # the server answered the ClientHello with a HelloRetryRequest
    how: str = "not probed"

    @property
    def round_trips(self) -> int:
        """Before the client can send its StartupMessage: TLS 1.3 one, plus one for a HelloRetryRequest
        (the server wants a key share the client did not send); TLS 1.2 two."""
        if self.protocol not in (None, "TLSv1.3"):
            return 2
        return 2 if self.hello_retry else 1


def probe_hello_retry(port: int) -> TlsHandshake:
    """One TLS handshake with PostgreSQL from Python's ssl module (OpenSSL's default groups, as libpq's), its
    handshake messages watched: does the server ask for another key share (HelloRetryRequest)?

    PostgreSQL up to 17 offers a single ECDH group, ``ssl_ecdh_curve`` (default prime256v1); OpenSSL 3 clients
    send an X25519 (3.5: also X25519MLKEM768) key share first, so the server must ask again: one more round
    trip. ``SSLContext._msg_callback`` is CPython's (private) debugging hook; without it: unknown.
    """
    seen: list[str] = []

    def watch(_conn: object, direction: str, _version: object, content_type: object, msg_type: object,
              _data: bytes) -> None:
        if getattr(content_type, "name", "") == "HANDSHAKE":
            seen.append(f"{direction}:{getattr(msg_type, 'name', msg_type)}")

    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    try:
        context._msg_callback = watch  # type: ignore[attr-defined]
        with socket.create_connection((HOST, port), timeout=10) as sock:
            sock.sendall(struct.pack("!II", 8, 80877103))  # SSLRequest
            if sock.recv(1) != b"S":
                return TlsHandshake(how="PostgreSQL refused the SSLRequest")
            with context.wrap_socket(sock) as tls:
                version = tls.version()
    except (OSError, AttributeError, ssl.SSLError) as exc:
        return TlsHandshake(how=f"probe failed: {exc}")
    hellos = seen.count("write:CLIENT_HELLO")
    return TlsHandshake(version, hellos > 1, f"Python ssl ({ssl.OPENSSL_VERSION}): {hellos} ClientHello(s)")


def counted_round_trips(route: Route, tls: TlsHandshake) -> tuple[int, int, str]:
    """(connect, query, how) round trips across the delayed link, counted from the protocol."""
    if route.kind == "direct":
        parts = [("TCP handshake", 1)]
        if route.tls:
            handshake = f"{tls.protocol or 'TLSv1.3'} handshake"
            if tls.hello_retry:
                handshake += " with HelloRetryRequest"
            parts += [("SSLRequest", 1), (handshake, tls.round_trips)]
        parts += [("StartupMessage -> AuthenticationSASL", 1), ("SASLInitialResponse -> SASLContinue", 1),
                  ("SASLResponse -> SASLFinal..ReadyForQuery", 1)]
        connect = sum(n for _, n in parts)
        how = " + ".join(f"{what} {n}" for what, n in parts) + " + the query 1"
        return connect, 1, how
    if route.kind == "uncached":
        return 0, 1, ("connect and login at the edge: local; the query on a warm edge->pool connection 1 "
                      "(pool->PostgreSQL: local)")
    return 0, 0, "connect, login and the answer at the edge (its cache): all local"


@dataclass
class Sample:
    total_ms: float | None  # connect + query + close; None when the request failed
    connect_ms: float | None
    query_ms: float | None
    close_ms: float | None
    error: str | None = None


def one_request(conninfo: str, sql: str, expected: list[tuple[Any, ...]],
                inspect: Callable[[psycopg.Connection[Any]], None] | None = None) -> Sample:
    """Connect, run `sql`, fetch, close: timed phase by phase. ``inspect`` (untimed) runs before the close."""
    conn: psycopg.Connection[Any] | None = None
    connect_ms = query_ms = None
    try:
        started = time.perf_counter()
        conn = psycopg.connect(conninfo, autocommit=True)
        connected = time.perf_counter()
        rows = conn.execute(sql).fetchall()
        answered = time.perf_counter()
        connect_ms, query_ms = (connected - started) * 1e3, (answered - connected) * 1e3
        if inspect is not None:
            inspect(conn)
        closing = time.perf_counter()
        conn.close()
        close_ms = (time.perf_counter() - closing) * 1e3
    except (psycopg.Error, OSError) as exc:
        if conn is not None:
            with contextlib.suppress(psycopg.Error, OSError):
                conn.close()
        return Sample(None, connect_ms, query_ms, None, f"{type(exc).__name__}: {str(exc).strip()[:300]}")
    if rows != expected:
        return Sample(None, connect_ms, query_ms, close_ms, f"wrong answer: {str(rows)[:120]}")
    return Sample(connect_ms + query_ms + close_ms, connect_ms, query_ms, close_ms)


def client_scram_ms(dsn: str, times: int = 20) -> float:
    """What libpq's own SCRAM key derivation costs the client (PBKDF2, 4096 iterations; every path's connect
    pays it once): PQencryptPasswordConn with the algorithm given, on an open connection, median of ``times``."""
    with psycopg.connect(dsn, autocommit=True) as conn:
        spent = []
        for _ in range(times):
            started = time.perf_counter()
            conn.pgconn.encrypt_password(PASSWORD.encode(), USER.encode(), b"scram-sha-256")
            spent.append((time.perf_counter() - started) * 1e3)
    return statistics.median(spent)


def client_scram_line(dsn: str, iterations: int) -> str:
    spent = client_scram_ms(dsn)
    line = (f"{spent:.1f} ms per connect at {scram.DEFAULT_ITERATIONS} iterations: libpq's key derivation "
            "(PQencryptPasswordConn), local work in every path's connect")
    if iterations != scram.DEFAULT_ITERATIONS:
        line += (f"; at this run's {iterations} iterations about {spent * iterations / scram.DEFAULT_ITERATIONS:.2f}"
                 " ms (scaled: the derivation is linear in the count)")
    return line


def nearest_rank(values: Sequence[float], fraction: float) -> float:
    ordered = sorted(values)
    return ordered[max(0, math.ceil(fraction * len(ordered)) - 1)]


@dataclass
class Result:
    route: Route
    dsn: str  # what psycopg connects with
    dbname: str  # the database name the client asks for (at the edge: its entry for this path)
    tls: TlsHandshake  # the direct TLS path's handshake (one object shared by every path)
    samples: list[Sample] = field(default_factory=list)
    warmups: list[Sample] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)

    def values(self, attr: str = "total_ms") -> list[float]:
        return [v for s in self.samples if s.error is None and (v := getattr(s, attr)) is not None]

    def median(self, attr: str = "total_ms") -> float | None:
        values = self.values(attr)
        return statistics.median(values) if values else None

    @property
    def p95(self) -> float | None:
        values = self.values()
        return nearest_rank(values, 0.95) if values else None

    @property
    def counted(self) -> tuple[int, int, str]:
        """(connect, query, how): the round trips this path makes across the delayed link, counted."""
        return counted_round_trips(self.route, self.tls)

    @property
    def errors(self) -> list[str]:
        return [s.error for s in self.samples if s.error is not None]

    @property
    def ok(self) -> bool:
        return not self.errors and not self.problems and bool(self.values())


# ---------------------------------------------------------------------------------------------
# The admin consoles


def admin(port: int, command: str) -> list[dict[str, str]]:
    ok, text = run_psql(port, command + ";", dbname="hyperpool", timeout=30)
    if not ok:
        raise BenchError(f"`{command}` on the admin console of port {port} failed: {first_text_line(text)}")
    return parse_table(text)


def wait_until(what: str, check: Callable[[], str | None], timeout: float = READY_TIMEOUT) -> None:
    """Poll ``check`` (None = ready, else what is missing) until ready; BenchError after ``timeout``."""
    deadline = time.monotonic() + timeout
    missing = check()
    while missing is not None:
        if time.monotonic() > deadline:
            raise BenchError(f"{what}: not ready after {timeout:.0f} s: {missing}")
        time.sleep(0.5)
        missing = check()


def placement_missing(edge: ManagedProcess, databases: Sequence[str]) -> str | None:
    rows = {(r.get("database"), r.get("location")): r for r in admin(edge.port, "SHOW PLACEMENT")}
    for name in databases:
        row = rows.get((name, LOCATION))
        if row is None:
            return f"no SHOW PLACEMENT row for {name}/{LOCATION}"
        if row.get("chosen") != "yes" or row.get("status") != "up":
            return f"{name}/{LOCATION}: chosen={row.get('chosen')} status={row.get('status')} ({row.get('reason')})"
    return None


def pools_missing(instance: ManagedProcess, databases: Sequence[str]) -> str | None:
    rows = {r.get("database"): r for r in admin(instance.port, "SHOW POOLS")}
    for name in databases:
        row = rows.get(name)
        if row is None:
            return f"{instance.name}: no SHOW POOLS row for {name}"
        open_ = int(row.get("sv_idle") or 0) + int(row.get("sv_active") or 0)
        if open_ < POOL_SIZE or int(row.get("sv_login") or 0):
            return (f"{instance.name}/{name}: {open_} of {POOL_SIZE} server connections open, "
                    f"{row.get('sv_login')} logging in")
    return None


def cache_rows(edge: ManagedProcess) -> dict[str, dict[str, str]]:
    return {r.get("database", ""): r for r in admin(edge.port, "SHOW CACHE")}


def served(row: dict[str, str]) -> int:
    return int(row.get("hits") or 0) + int(row.get("stale") or 0)


def wait_cached(edge: ManagedProcess, result: Result, expected: list[tuple[Any, ...]]) -> int:
    """Request until the edge answers from its cache (its catalog is read in the background after the first
    login; until then nothing is cached). Returns the requests it took."""
    deadline = time.monotonic() + CACHED_TIMEOUT
    attempts, database = 0, result.dbname
    while True:
        before = served(cache_rows(edge).get(database, {}))
        sample = one_request(result.dsn, result.route.sql, expected)
        attempts += 1
        if sample.error is not None:
            raise BenchError(f"{result.route.name}: request through the edge failed: {sample.error}")
        if served(cache_rows(edge).get(database, {})) > before:
            return attempts
        if time.monotonic() > deadline:
            raise BenchError(f"{result.route.name}: the edge did not answer `{QUERY}` from its cache within "
                             f"{CACHED_TIMEOUT:.0f} s ({attempts} requests); "
                             f"SHOW CACHE: {cache_rows(edge).get(database)}")
        time.sleep(0.2)


# ---------------------------------------------------------------------------------------------
# Setup


@dataclass
class Stack:
    pg: EmbeddedPostgres
    db_relay: LatencyRelayProcess
    pool: Hyperpool
    pool_relay: LatencyRelayProcess
    edge: Hyperpool

    @property
    def processes(self) -> list[ManagedProcess]:
        return [self.db_relay, self.pool, self.pool_relay, self.edge]


def start(stack: contextlib.ExitStack, proc: ManagedProcess, what: str) -> None:
    stack.callback(proc.stop)
    print(f"starting {what} ...", file=sys.stderr, flush=True)
    proc.start()
    print(f"  {proc.name} on {HOST}:{proc.port} (pid {proc.proc.pid if proc.proc else '?'})", file=sys.stderr,
          flush=True)


def subdir(workdir: Path, name: str) -> Path:
    path = workdir / name
    path.mkdir()
    return path


def pool_config(tls: tuple[Path, Path] | None) -> dict[str, Any]:
    """The pool instance near the database: the bench database, no TLS to PostgreSQL (same region)."""
    extra: dict[str, Any] = {"users": {USER: {"password": PASSWORD}, EDGE_USER: {"password": EDGE_PASSWORD}},
                             "admin": {"users": [USER]}}
    if tls is not None:
        extra["tls"] = {"cert": str(tls[0]), "key": str(tls[1])}
    return extra


def edge_config(relay_port: int, tls: bool, iterations: int) -> dict[str, Any]:
    """The edge near the client: its databases are the pool instance, through the relay."""
    def entry(sslmode: str) -> dict[str, Any]:
        location = {"host": HOST, "port": relay_port, "user": EDGE_USER, "password": EDGE_PASSWORD,
                    "dbname": DBNAME, "sslmode": sslmode}
        return {"pool_size": POOL_SIZE, "min_pool_size": POOL_SIZE, "cache": {"max_age": CACHE_MAX_AGE},
                "locations": {LOCATION: location}, "placement": {"mode": "fixed", "location": LOCATION}}

    databases = {DBNAME: entry("disable")}
    if tls:
        databases[TLS_DB] = entry("require")
    return {"users": {USER: {"password": PASSWORD}}, "admin": {"users": [USER]}, "databases": databases,
            "scram_iterations": iterations}


def start_stack(stack: contextlib.ExitStack, workdir: Path, args: argparse.Namespace) -> Stack:
    owner = run_as_owner()
    cert = write_self_signed_cert(subdir(workdir, "tls"), owner) if args.tls else None
    settings = {"max_connections": "100"}
    if cert is not None:
        settings.update(ssl="on", ssl_cert_file=str(cert[0]), ssl_key_file=str(cert[1]))
    pg = EmbeddedPostgres(settings=settings)
    stack.callback(pg.cleanup)
    print("starting a throwaway PostgreSQL ...", file=sys.stderr, flush=True)
    pg.start()
    # the client's login to PostgreSQL directly: a verifier of the same iteration count as its login to the edge
    pg.create_user(USER, str(scram.make_verifier(PASSWORD, iterations=args.scram_iterations)))
    pg.create_database(DBNAME, USER)
    ok, text = run_psql(pg.port, TABLE_SETUP)
    if not ok:
        raise BenchError(f"creating the table failed: {text}")
    delay = args.delay_ms
    db_relay = LatencyRelayProcess(subdir(workdir, "db-relay"), pg.port, delay, name="db-relay")
    start(stack, db_relay, f"the relay in front of PostgreSQL ({delay:g} ms each way)")
    pool = Hyperpool(subdir(workdir, "pool"), pg.port, POOL_SIZE, pool_config(cert), name="pool")
    start(stack, pool, "the pool hyperpool instance (near the database)")
    pool_relay = LatencyRelayProcess(subdir(workdir, "pool-relay"), pool.port, delay, name="pool-relay")
    start(stack, pool_relay, f"the relay in front of the pool instance ({delay:g} ms each way)")
    edge_cfg = edge_config(pool_relay.port, args.tls, args.scram_iterations)
    edge = Hyperpool(subdir(workdir, "edge"), pool_relay.port, POOL_SIZE, edge_cfg, name="edge")
    start(stack, edge, "the edge hyperpool instance (near the client)")
    return Stack(pg, db_relay, pool, pool_relay, edge)


def conninfo(port: int, dbname: str, sslmode: str, password: bool = True) -> str:
    return make_conninfo(host=HOST, port=port, dbname=dbname, user=USER, sslmode=sslmode, gssencmode="disable",
                         connect_timeout=10, **({"password": PASSWORD} if password else {}))


def make_results(servers: Stack, routes: Sequence[Route], tls: TlsHandshake) -> list[Result]:
    results = []
    for route in routes:
        if route.kind == "direct":
            port, dbname, sslmode = servers.db_relay.port, DBNAME, "require" if route.tls else "disable"
        else:
            port, dbname, sslmode = servers.edge.port, TLS_DB if route.tls else DBNAME, "disable"
        results.append(Result(route, conninfo(port, dbname, sslmode), dbname, tls))
    return results


# ---------------------------------------------------------------------------------------------
# The run


def warm_up(servers: Stack, results: list[Result], expected: list[tuple[Any, ...]]) -> None:
    for result in results:
        route = result.route
        if route.kind == "cached":
            took = wait_cached(servers.edge, result, expected)
            print(f"  {route.name}: the edge answered from its cache after {took} request(s)", file=sys.stderr,
                  flush=True)

        def inspect(conn: psycopg.Connection[Any], result: Result = result) -> None:
            if result.route.kind != "direct":
                return
            # PostgreSQL's own view of this connection (untimed: the request's timings end before this)
            row = conn.execute("SELECT ssl, version FROM pg_stat_ssl WHERE pid = pg_backend_pid()").fetchone()
            in_use, protocol = (bool(row[0]), row[1]) if row else (False, None)
            if in_use != result.route.tls or conn.pgconn.ssl_in_use != result.route.tls:
                result.problems.append(f"client connection to PostgreSQL: TLS in use = {in_use} (libpq: "
                                       f"{conn.pgconn.ssl_in_use}), expected {result.route.tls}")
            result.tls.protocol = protocol or None

        for _ in range(WARMUPS):
            sample = one_request(result.dsn, route.sql, expected, inspect)
            result.warmups.append(sample)
            if sample.error is not None:
                result.problems.append(f"warm-up request failed: {sample.error}")


def rotated(items: list[Result], number: int) -> list[Result]:
    shift = number % len(items)
    return items[shift:] + items[:shift]


def measure(results: list[Result], expected: list[tuple[Any, ...]], requests: int) -> None:
    """`requests` rounds; each round makes one request on every path, the order rotating from round to round
    so that a noisy moment does not always hit the same path."""
    started = time.monotonic()
    for number in range(requests):
        for result in rotated(results, number):
            result.samples.append(one_request(result.dsn, result.route.sql, expected))
        if (number + 1) % 10 == 0 or number + 1 == requests:
            print(f"  {number + 1}/{requests} rounds ({time.monotonic() - started:.0f} s)", file=sys.stderr, flush=True)


@dataclass
class Checks:
    """What the bench verified besides the timings."""

    placement: list[dict[str, str]] = field(default_factory=list)  # the edge's SHOW PLACEMENT rows
    placement_after: list[dict[str, str]] = field(default_factory=list)  # the same after the measured requests
    pool_placement: list[dict[str, str]] = field(default_factory=list)  # the pool instance's (its origin RTT)
    cache_before: dict[str, dict[str, str]] = field(default_factory=dict)
    cache_after: dict[str, dict[str, str]] = field(default_factory=dict)
    edge_servers: list[dict[str, str]] = field(default_factory=list)  # the edge's SHOW SERVERS at the end
    problems: list[str] = field(default_factory=list)  # not tied to one path


def counter_delta(checks: Checks, database: str, column: str) -> int:
    after, before = checks.cache_after.get(database, {}), checks.cache_before.get(database, {})
    return int(after.get(column) or 0) - int(before.get(column) or 0)


def not_cacheable(rows: dict[str, dict[str, str]], database: str, reason: str = "nocache-hint") -> int:
    """One reason's count in SHOW CACHE's ``not_cacheable`` column (``reason=count ...``)."""
    for part in (rows.get(database, {}).get("not_cacheable") or "").split():
        name, _, count = part.partition("=")
        if name == reason and count.isdigit():
            return int(count)
    return 0


def verify(servers: Stack, results: list[Result], checks: Checks) -> None:
    """The cached path was answered by the edge's cache, the uncached one was not; the TLS links are TLS."""
    for result in results:
        route, database = result.route, result.dbname
        if route.kind == "direct":
            continue
        count = len(result.samples)
        hits = counter_delta(checks, database, "hits") + counter_delta(checks, database, "stale")
        misses = counter_delta(checks, database, "misses")
        cached = next((r for r in results if r.route == Route("cached", route.tls)), None)
        wanted = len(cached.samples) if cached is not None else 0
        if route.kind == "cached" and (hits != wanted or misses):
            result.problems.append(f"the edge's SHOW CACHE for {database} counted {hits} hits and {misses} misses "
                                   f"over {wanted} cached requests: not every one was answered from the cache")
        if route.kind == "uncached" and count and hits > wanted:
            result.problems.append(f"the edge's cache answered {hits - wanted} more requests than the cached path made")
        forwarded = not_cacheable(checks.cache_after, database) - not_cacheable(checks.cache_before, database)
        if route.kind == "uncached" and forwarded != count:
            result.problems.append(f"the edge's SHOW CACHE for {database} counted {forwarded} nocache-hint "
                                   f"statements over {count} uncached requests")
    by_db: dict[str, set[str]] = {}
    for row in checks.edge_servers:
        by_db.setdefault(row.get("database", ""), set()).add(row.get("tls", ""))
    for result in results:
        route, database = result.route, result.dbname
        if route.kind == "direct":
            continue
        seen = by_db.get(database, set())
        wanted_tls = "TLS" if route.tls else ""
        if seen != {wanted_tls}:
            result.problems.append(f"the edge's SHOW SERVERS for {database} shows tls={sorted(seen)}, "
                                   f"expected {wanted_tls or 'none'}")
    for proc in servers.processes:
        dead = proc.died()
        if dead:
            checks.problems.append(dead)


# ---------------------------------------------------------------------------------------------
# Report


@dataclass
class Goal:
    route: Route
    at_least: float
    text: str
    verdict: str = ""
    detail: str = ""
    note: str = ""


def ratio(direct: Result | None, result: Result) -> float | None:
    top, bottom = (direct.median() if direct else None), result.median()
    return top / bottom if top is not None and bottom else None


def direct_of(results: list[Result], tls: bool) -> Result | None:
    return next((r for r in results if r.route == Route("direct", tls)), None)


def goals(results: list[Result], delay_ms: float) -> list[Goal]:
    out = []
    for result in results:
        route = result.route
        if route.kind == "direct":
            continue
        direct = direct_of(results, route.tls)
        tls_text = "TLS   " if route.tls else "no TLS"
        if route.kind == "uncached":
            n = sum(direct.counted[:2]) if direct else 0
            goal = Goal(route, UNCACHED_GOAL * n,
                        f"{route.kind:<8} {tls_text}: direct/path >= {UNCACHED_GOAL} x N = {UNCACHED_GOAL} x {n} "
                        f"= {UNCACHED_GOAL * n:.2f}x")
            if direct is not None and route.tls and direct.tls.hello_retry:
                goal.note = (f"N counts the HelloRetryRequest; without it N = {n - 1}: "
                             f"{UNCACHED_GOAL * (n - 1):.2f}x")
        else:
            goal = Goal(route, CACHED_GOAL, f"{route.kind:<8} {tls_text}: direct/path >= {CACHED_GOAL:.0f}x")
        value = ratio(direct, result)
        if delay_ms <= 0:
            goal.verdict, goal.detail = "n/a", "needs --delay-ms > 0"
        elif value is None:
            goal.verdict, goal.detail = "MISSED", "no successful requests to compare"
        elif not result.ok or direct is None or not direct.ok:
            goal.verdict, goal.detail = "MISSED", f"{value:.2f}x, but requests had errors: see PROBLEMS"
        else:
            goal.verdict, goal.detail = ("met" if value >= goal.at_least else "MISSED"), f"{value:.2f}x"
        out.append(goal)
    return out


def fmt(value: float | None, digits: int = 1) -> str:
    return "n/a" if value is None else f"{value:,.{digits}f}"


def table_rows(results: list[Result], delay_ms: float) -> list[tuple[str, ...]]:
    rtt = 2 * delay_ms
    rows: list[tuple[str, ...]] = []
    for result in results:
        route = result.route
        connect_n, query_n, _ = result.counted
        median = result.median()
        if rtt > 0 and median is not None:
            measured = (f"{median / rtt:.2f} ({fmt(_div(result.median('connect_ms'), rtt), 2)}"
                        f"+{fmt(_div(result.median('query_ms'), rtt), 2)})")
            beyond = fmt(median - (connect_n + query_n) * rtt)
        else:
            measured = beyond = "n/a"
        value = ratio(direct_of(results, route.tls), result)
        rows.append((route.label, route.tls_where, fmt(median) + ("" if result.ok else " !"), fmt(result.p95),
                     fmt(result.median("connect_ms")), fmt(result.median("query_ms")),
                     f"{connect_n + query_n} ({connect_n}+{query_n})", measured, beyond,
                     "n/a" if value is None else f"{value:.2f}x", f"{len(result.values())}/{len(result.samples)}"))
    return rows


def _div(value: float | None, by: float) -> float | None:
    return None if value is None or not by else value / by


def print_table(header: tuple[str, ...], rows: list[tuple[str, ...]]) -> None:
    widths = [max(len(str(row[i])) for row in [header, *rows]) for i in range(len(header))]
    print(" | ".join(f"{h:<{w}}" for h, w in zip(header, widths, strict=True)))
    print("-+-".join("-" * w for w in widths))
    for row in rows:
        cells = [f"{c:<{w}}" if i < 2 else f"{c:>{w}}" for i, (c, w) in enumerate(zip(row, widths, strict=True))]
        print(" | ".join(cells))


HEADER = ("path", "TLS to DB", "median ms", "p95 ms", "connect ms", "query ms", "RTTs counted", "RTTs measured",
          "beyond RTTs ms", "direct/path", "ok/requests")


def placement_line(row: dict[str, str]) -> str:
    return (f"{row.get('database')}/{row.get('location')}: chosen={row.get('chosen')} status={row.get('status')} "
            f"edge_rtt_ms={row.get('edge_rtt_ms') or '-'} origin_rtt_ms={row.get('origin_rtt_ms') or '-'} "
            f"expected_ms={row.get('expected_ms') or '-'} samples={row.get('samples')} ({row.get('reason')})")


def servers_line(rows: list[dict[str, str]]) -> str:
    parts = []
    for database in sorted({r.get("database", "") for r in rows}):
        mine = [r for r in rows if r.get("database") == database]
        tls = ", ".join(sorted({r.get("tls") or "none" for r in mine}))
        parts.append(f"{database}: {len(mine)} (tls: {tls})")
    return ", ".join(parts) or "none"


def cache_line(checks: Checks, database: str) -> str:
    parts = [f"{c} +{counter_delta(checks, database, c)}" for c in ("hits", "stale", "misses", "stored")]
    after = checks.cache_after.get(database, {})
    return f"{database}: " + ", ".join(parts) + f"; not_cacheable (since start): {after.get('not_cacheable') or '-'}"


def print_report(machine: dict[str, Any], results: list[Result], checks: Checks, args: argparse.Namespace) -> None:
    print("\n" + "=" * 100)
    for key, value in machine.items():
        print(f"{key:<18} {value}")
    print(f"\nper request: psycopg.connect(autocommit=True) + execute + fetchall + close, sequential; "
          f"{args.requests} measured requests per path after {WARMUPS} warm-ups, the paths interleaved request by "
          f"request; one-way delay {args.delay_ms:g} ms, round trip {2 * args.delay_ms:g} ms")
    print(f"query: `{QUERY}` (one row); uncached path: `{NOCACHE_QUERY}`")
    print("\nRound trips across the delayed link, counted:")
    for result in results:
        route = result.route
        connect_n, query_n, how = result.counted
        print(f"  {route.label:<27} {'TLS ' + route.tls_where if route.tls else 'no TLS':<15} "
              f"{connect_n + query_n}: {how}")
    print("\nmedian / p95 over successful requests (p95: nearest rank); RTTs measured = median / round trip "
          "(connect+query);\nbeyond RTTs = median - counted round trips x round trip (local work: fork, SCRAM, TLS, "
          "Python, relay timers); '!' = problems, see PROBLEMS\n")
    print_table(HEADER, table_rows(results, args.delay_ms))
    if args.tls:
        print(f"\nTLS handshake client->PostgreSQL: {results[0].tls.protocol or '?'} (pg_stat_ssl of a warm-up "
              f"connection); HelloRetryRequest: {results[0].tls.hello_retry} ({results[0].tls.how})")
    for when, rows in (("before", checks.placement), ("after", checks.placement_after)):
        print(f"\nPlacement at the edge, {when} the measured requests (SHOW PLACEMENT):")
        for row in rows:
            print("  " + placement_line(row))
    print("The pool instance's own (SHOW PLACEMENT there): "
          + "; ".join(placement_line(row) for row in checks.pool_placement))
    print("\nEdge server connections at the end (SHOW SERVERS): " + servers_line(checks.edge_servers))
    print("Edge cache over the measured requests (SHOW CACHE):")
    for database in sorted({r.dbname for r in results if r.route.kind != "direct"}):
        print("  " + cache_line(checks, database))
    print("\nTargets from the issue (ratios of medians; N = direct's counted round trips):")
    for goal in goals(results, args.delay_ms):
        print(f"  {goal.text:<58} {goal.verdict} ({goal.detail})" + (f"  [{goal.note}]" if goal.note else ""))
    problems = [(r.route.name, p) for r in results for p in [*r.problems, *sorted(set(r.errors))]]
    if problems or checks.problems:
        print("\nPROBLEMS")
        for name, problem in problems:
            count = sum(1 for r in results if r.route.name == name for e in r.errors if e == problem)
            print(f"! {name}: {problem}" + (f" (x{count})" if count > 1 else ""))
        for problem in checks.problems:
            print("! " + indent(problem).lstrip())


def to_json(machine: dict[str, Any], results: list[Result], checks: Checks, args: argparse.Namespace) -> dict[str, Any]:
    def result_json(result: Result) -> dict[str, Any]:
        direct = direct_of(results, result.route.tls)
        connect_n, query_n, how = result.counted
        rtt = 2 * args.delay_ms
        return {"path": result.route.kind, "tls": result.route.tls, "label": result.route.label,
                "tls_where": result.route.tls_where, "sql": result.route.sql,
                "conninfo": result.dsn.replace(f"password={PASSWORD}", "password=***"),
                "median_ms": result.median(), "p95_ms": result.p95, "median_connect_ms": result.median("connect_ms"),
                "median_query_ms": result.median("query_ms"), "median_close_ms": result.median("close_ms"),
                "round_trips_counted": {"connect": connect_n, "query": query_n, "total": connect_n + query_n,
                                        "how": how},
                "round_trips_measured": _div(result.median(), rtt),
                "direct_over_path": ratio(direct, result),
                "ok": result.ok, "problems": result.problems, "errors": result.errors,
                "samples": [asdict(s) for s in result.samples], "warmups": [asdict(s) for s in result.warmups]}

    return {"machine": machine,
            "settings": {"requests": args.requests, "delay_ms": args.delay_ms, "tls": args.tls, "warmups": WARMUPS,
                         "scram_iterations": args.scram_iterations,
                         "pool_size": POOL_SIZE, "query": QUERY, "uncached_query": NOCACHE_QUERY},
            "results": [result_json(r) for r in results],
            "goals": [{"path": g.route.kind, "tls": g.route.tls, "at_least": g.at_least, "text": g.text,
                       "verdict": g.verdict, "detail": g.detail, "note": g.note}
                      for g in goals(results, args.delay_ms)],
            "checks": asdict(checks)}


# ---------------------------------------------------------------------------------------------
# Main


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--requests", type=int, default=50, help="measured requests per path (default 50)")
    parser.add_argument("--delay-ms", type=float, default=25.0,
                        help="one-way delay between the regions, milliseconds (default 25)")
    parser.add_argument("--json", metavar="FILE", help="also write the results (every request's timings) as JSON")
    parser.add_argument("--no-tls", dest="tls", action="store_false", help="only the paths without TLS")
    parser.add_argument("--scram-iterations", type=int, default=scram.DEFAULT_ITERATIONS, metavar="N",
                        help="PBKDF2 iterations of the client's SCRAM logins, direct and to the edge (default 4096)")
    args = parser.parse_args(argv)
    if args.requests < 1:
        parser.error("--requests must be at least 1")
    if not 1 <= args.scram_iterations <= scram.MAX_ITERATIONS:
        parser.error(f"--scram-iterations must be between 1 and {scram.MAX_ITERATIONS}")
    if not 0 <= args.delay_ms <= 1000:
        parser.error("--delay-ms must be between 0 and 1000")
    return args


def machine_info(servers: Stack, args: argparse.Namespace) -> dict[str, Any]:
    return {
        **machine_basics(servers.pg.execute("show server_version")),
        "client": f"psycopg {psycopg.__version__} ({psycopg.pq.__impl__}), libpq {psycopg.pq.version()}",
        "processes": (f"PostgreSQL :{servers.pg.port}, db-relay :{servers.db_relay.port}, pool :{servers.pool.port}, "
                      f"pool-relay :{servers.pool_relay.port}, edge :{servers.edge.port} (each its own process)"),
        "auth": ("scram-sha-256 everywhere (client->PostgreSQL, client->edge, edge->pool, pool->PostgreSQL); the "
                 f"client's verifiers (direct and at the edge): {args.scram_iterations} iterations"),
        "client SCRAM": client_scram_line(conninfo(servers.pg.port, DBNAME, "disable"), args.scram_iterations),
        "note": f"the client, PostgreSQL, both hyperpool instances and both relays share these {os.cpu_count()} CPUs",
    }


def make_workdir(stack: contextlib.ExitStack) -> Path:
    workdir = Path(tempfile.mkdtemp(prefix="hyperpool-regional-bench-", dir="/tmp"))
    stack.callback(shutil.rmtree, workdir, ignore_errors=True)
    if run_as_owner() is not None:
        workdir.chmod(0o711)  # the postgres user must reach tls/ (PostgreSQL's certificate and key)
    return workdir


def bench(stack: contextlib.ExitStack, args: argparse.Namespace) -> int:
    workdir = make_workdir(stack)
    servers = start_stack(stack, workdir, args)
    with psycopg.connect(conninfo(servers.pg.port, DBNAME, "disable"), autocommit=True) as conn:
        expected = conn.execute(QUERY).fetchall()  # straight to PostgreSQL, no relay: what every path must answer
    databases = [DBNAME, TLS_DB] if args.tls else [DBNAME]
    checks = Checks()
    print("waiting for the edge's placement and warm pools ...", file=sys.stderr, flush=True)
    wait_until("the edge's placement", lambda: placement_missing(servers.edge, databases))
    wait_until("warm pools", lambda: pools_missing(servers.edge, databases) or pools_missing(servers.pool, [DBNAME]))
    checks.placement = [r for r in admin(servers.edge.port, "SHOW PLACEMENT") if r.get("database") in databases]
    routes = [Route(kind, tls) for tls in ([False, True] if args.tls else [False])
              for kind in ("direct", "uncached", "cached")]
    tls = probe_hello_retry(servers.pg.port) if args.tls else TlsHandshake()
    results = make_results(servers, routes, tls)
    print(f"warm-up: {WARMUPS} requests per path", file=sys.stderr, flush=True)
    warm_up(servers, results, expected)
    machine = machine_info(servers, args)
    checks.cache_before = cache_rows(servers.edge)
    print(f"measuring: {args.requests} rounds of one request per path", file=sys.stderr, flush=True)
    measure(results, expected, args.requests)
    checks.cache_after = cache_rows(servers.edge)
    checks.edge_servers = admin(servers.edge.port, "SHOW SERVERS")
    checks.pool_placement = admin(servers.pool.port, "SHOW PLACEMENT")
    checks.placement_after = [r for r in admin(servers.edge.port, "SHOW PLACEMENT") if r.get("database") in databases]
    verify(servers, results, checks)
    print_report(machine, results, checks, args)
    if args.json:
        Path(args.json).write_text(json.dumps(to_json(machine, results, checks, args), indent=2) + "\n")
        print(f"\nJSON written to {args.json}")
    return 0 if all(r.ok for r in results) and not checks.problems else 1


def main(argv: Sequence[str] | None = None) -> int:
    return run_bench(bench, parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
