"""Test support: run a hyperpool Server in a background thread on its own uvloop loop."""

from __future__ import annotations

import asyncio
import os
import socket
import struct
import threading
import time
from collections.abc import Coroutine
from typing import Any

import pytest
import uvloop

from hyperpool.config import Config, parse_config
from hyperpool.embedded import EmbeddedPostgres
from hyperpool.server import Server

APP_USER = "app"
APP_PASSWORD = "apppass"
OWNER = "app_owner"
OWNER_PASSWORD = "ownerpass"
APPDB = "appdb"


def base_config(pg_port: int, **overrides: Any) -> dict[str, Any]:
    """A config dict for one database ``appdb`` on the test PostgreSQL."""
    db = {"host": "127.0.0.1", "port": pg_port, "dbname": APPDB, "user": OWNER, "password": OWNER_PASSWORD,
          "sslmode": "disable", "pool_size": 5, "min_pool_size": 1}
    db.update(overrides.pop("db", {}))
    cfg: dict[str, Any] = {
        "listen": {"host": "127.0.0.1", "port": 0},
        "users": {APP_USER: {"password": APP_PASSWORD}},
        "databases": {APPDB: db},
        "log_level": "debug",
        "query_wait_timeout": 10,
        "shutdown_timeout": 5,
    }
    cfg.update(overrides)
    return cfg


class ProxyRunner:
    """A live hyperpool on 127.0.0.1, driven from test code in other threads."""

    def __init__(self, config: Config, config_path: str | None = None) -> None:
        self.config = config
        self.loop = uvloop.new_event_loop()
        self.server = Server(config, config_path)
        self._thread = threading.Thread(target=self.loop.run_forever, name="hyperpool", daemon=True)

    def start(self) -> ProxyRunner:
        self._thread.start()
        self.call(self.server.start())
        return self

    @property
    def port(self) -> int:
        return self.server.port

    @property
    def state(self) -> Any:
        return self.server.state

    def call(self, coro: Coroutine[Any, Any, Any], timeout: float = 30) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def run(self, fn: Any, *args: Any) -> Any:
        """Run a plain function on the proxy's loop thread and return its result."""
        async def wrapper() -> Any:
            return fn(*args)
        return self.call(wrapper())

    def dsn(self, user: str = APP_USER, password: str = APP_PASSWORD, dbname: str = APPDB, **params: str) -> str:
        extra = "".join(" {}='{}'".format(k, v.replace("\\", "\\\\").replace("'", "\\'")) for k, v in params.items())
        return f"host=127.0.0.1 port={self.port} user={user} password={password} dbname={dbname}{extra}"

    def stop(self) -> None:
        if not self.loop.is_running():
            return
        try:
            self.call(self.server.shutdown(), timeout=30)
        finally:
            self.loop.call_soon_threadsafe(self.loop.stop)
            self._thread.join(10)


def catalog_read(proxy: ProxyRunner, dbname: str = APPDB) -> None:
    """Wait (bounded) until the database's catalog has been read: hyperpool reads it on a pooled connection
    after the first login, which tests on a one-connection pool must not race."""
    database = proxy.state.databases[dbname]
    for _ in range(200):
        if proxy.run(lambda: database.classifier is not None and not database.pool.active):
            return
        time.sleep(0.025)
    raise AssertionError("the catalog was not read")


def start_proxy(cfg: dict[str, Any]) -> ProxyRunner:
    return ProxyRunner(parse_config(cfg, os.environ)).start()


def startup_packet(params: dict[str, str], version: int = 196608) -> bytes:
    body = struct.pack("!i", version) + b"".join(k.encode() + b"\0" + v.encode() + b"\0" for k, v in params.items())
    body += b"\0"
    return struct.pack("!i", len(body) + 4) + body


def read_messages(sock: socket.socket, until: bytes = b"Z", limit: int = 500,
                  count: int = 1) -> list[tuple[bytes, bytes]]:
    """Read typed messages until ``count`` messages of a type in ``until`` (or EOF); bounded.

    It reads no further than the last message it returns only when the peer stops there,
    so call it once per exchange.
    """
    out: list[tuple[bytes, bytes]] = []
    buf = b""
    seen = 0
    for _ in range(limit):
        while len(buf) >= 5:
            length = struct.unpack("!i", buf[1:5])[0]
            if len(buf) < length + 1:
                break
            out.append((buf[:1], buf[5 : length + 1]))
            buf = buf[length + 1 :]
            if out[-1][0] in until:
                seen += 1
                if seen >= count:
                    return out
        chunk = sock.recv(65536)
        if not chunk:
            return out
        buf += chunk
    return out


def error_code(payload: bytes) -> str:
    for field in payload.split(b"\0"):
        if field[:1] == b"C":
            return field[1:].decode()
    return ""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class KeyedSocket(socket.socket):
    """A client socket that remembers the BackendKeyData it was given."""

    backend_key = b""


def raw_login(port: int, user: str = APP_USER, password: str = APP_PASSWORD, dbname: str = APPDB,
              rcvbuf: int = 0, **params: str) -> KeyedSocket:
    """A socket logged in to hyperpool with SCRAM, positioned after the first ReadyForQuery."""
    from hyperpool.protocol import scram

    sock = KeyedSocket()
    if rcvbuf:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
    sock.settimeout(10)
    sock.connect(("127.0.0.1", port))
    sock.sendall(startup_packet({"user": user, "database": dbname, **params}))
    read_messages(sock, until=b"R")
    client = scram.ScramClient(password)
    first = client.client_first()
    mech = b"SCRAM-SHA-256\0"
    sock.sendall(b"p" + struct.pack("!i", 4 + len(mech) + 4 + len(first)) + mech
                 + struct.pack("!i", len(first)) + first)
    (_, payload), = read_messages(sock, until=b"R")
    final = client.server_first(payload[4:])
    sock.sendall(b"p" + struct.pack("!i", 4 + len(final)) + final)
    msgs = read_messages(sock, until=b"ZE")
    if msgs[-1][0] != b"Z":
        raise AssertionError(f"login failed: {msgs[-1]}")
    sock.backend_key = next(p for k, p in msgs if k == b"K")
    return sock


def message(type_byte: bytes, body: bytes = b"") -> bytes:
    return type_byte + struct.pack("!i", len(body) + 4) + body


def query_msg(sql: str) -> bytes:
    body = sql.encode() + b"\0"
    return b"Q" + struct.pack("!i", len(body) + 4) + body


def start_test_pg(**settings: str) -> EmbeddedPostgres:
    """A started throwaway PostgreSQL with the origin user and database the tests use."""
    server = EmbeddedPostgres(settings=dict(settings))
    server.start()
    try:
        server.create_user(OWNER, OWNER_PASSWORD)
        server.create_database(APPDB, OWNER)
    except BaseException:
        server.cleanup()
        raise
    return server


def hold_the_server(port: int) -> KeyedSocket:
    """A client in an open transaction: with pool_size 1 every other client now waits for a server."""
    holder = raw_login(port)
    holder.sendall(query_msg("begin"))
    read_messages(holder)
    return holder


def let_go(holder: KeyedSocket) -> None:
    """End the holder's transaction and leave."""
    holder.sendall(query_msg("commit"))
    read_messages(holder)
    holder.close()


def _compiled() -> bool:
    from hyperpool import compiled_modules

    return bool(compiled_modules())


# Tests that replace a function or method the hot modules call: compiled modules call them directly, past
# the replacement (mypyc), so such a test cannot observe anything there; .ci/compiled skips it.
pure_python_only = pytest.mark.skipif(_compiled(), reason="replaces functions compiled modules call directly")
