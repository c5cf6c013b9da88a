"""Bad input, protocol negotiation, TLS, and the database going away and coming back."""

from __future__ import annotations

import socket
import struct
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import psycopg
import pytest

from hyperpool.embedded import EmbeddedPostgres
from tests.support import (
    APP_PASSWORD,
    APP_USER,
    APPDB,
    ProxyRunner,
    base_config,
    error_code,
    query_msg,
    raw_login,
    read_messages,
    start_proxy,
    start_test_pg,
    startup_packet,
)


def _fatal_then_closed(sock: socket.socket) -> str:
    msgs = read_messages(sock, until=b"E")
    assert msgs and msgs[-1][0] == b"E", msgs
    assert b"SFATAL\0" in msgs[-1][1]
    assert b"Traceback" not in msgs[-1][1]
    sock.settimeout(5)
    assert sock.recv(100) == b""
    return error_code(msgs[-1][1])


def _still_serving(proxy: ProxyRunner) -> None:
    with psycopg.connect(proxy.dsn()) as conn:
        assert conn.execute("select 'alive'").fetchone() == ("alive",)


@pytest.mark.parametrize(
    "packet",
    [
        struct.pack("!i", 4),  # length shorter than the header
        struct.pack("!i", 1 << 20) + b"x" * 16,  # startup packet over the limit
        struct.pack("!ii", 12, 196608) + b"ab\0\0",  # name without value / no terminator
        struct.pack("!ii", 8, 196608),  # no user
    ],
    ids=["short", "huge", "unterminated", "no-user"],
)
def test_bad_startup_packets(proxy: ProxyRunner, packet: bytes) -> None:
    with socket.create_connection(("127.0.0.1", proxy.port), timeout=10) as sock:
        sock.sendall(packet)
        code = _fatal_then_closed(sock)
    assert code in ("08P01", "28000")
    _still_serving(proxy)


def test_old_protocol_gets_clear_fatal(proxy: ProxyRunner) -> None:
    with socket.create_connection(("127.0.0.1", proxy.port), timeout=10) as sock:
        sock.sendall(startup_packet({"user": APP_USER}, version=2 << 16))
        msgs = read_messages(sock, until=b"E")
    assert error_code(msgs[-1][1]) == "0A000"
    assert b"unsupported frontend protocol 2.0" in msgs[-1][1]


def test_newer_minor_version_is_negotiated(proxy: ProxyRunner) -> None:
    with socket.create_connection(("127.0.0.1", proxy.port), timeout=10) as sock:
        sock.sendall(startup_packet({"user": APP_USER, "database": APPDB, "_pq_.compression": "on"},
                                    version=(3 << 16) | 2))
        msgs = read_messages(sock, until=b"R")
    kinds = [k for k, _ in msgs]
    assert kinds == [b"v", b"R"]
    minor, count = struct.unpack("!ii", msgs[0][1][:8])
    assert (minor, count) == (0, 1) and msgs[0][1][8:] == b"_pq_.compression\0"


def test_ssl_and_gss_requests_refused_without_tls(proxy: ProxyRunner) -> None:
    with socket.create_connection(("127.0.0.1", proxy.port), timeout=10) as sock:
        sock.sendall(struct.pack("!ii", 8, 80877104))
        assert sock.recv(1) == b"N"
        sock.sendall(struct.pack("!ii", 8, 80877103))
        assert sock.recv(1) == b"N"
        sock.sendall(startup_packet({"user": APP_USER, "database": APPDB}))
        assert read_messages(sock, until=b"R")[0][0] == b"R"


def test_bytes_after_ssl_request_are_refused(make_proxy: Callable[..., ProxyRunner],
                                             tls_files: tuple[str, str]) -> None:
    proxy = make_proxy(tls={"cert": tls_files[0], "key": tls_files[1]})
    with socket.create_connection(("127.0.0.1", proxy.port), timeout=10) as sock:
        # SSLRequest with a pipelined StartupMessage behind it (the CVE-2021-23222 pattern)
        sock.sendall(struct.pack("!ii", 8, 80877103) + startup_packet({"user": APP_USER}))
        assert _fatal_then_closed(sock) == "08P01"


@pytest.mark.parametrize(
    "message",
    [b"z\0\0\0\x04", b"Q\0\0\0\x02", b"Q\x7f\xff\xff\xff" + b"x" * 10, b"T\0\0\0\x06\0\0"],
    ids=["unknown-type", "short-length", "over-max", "backend-type"],
)
def test_bad_messages_after_login(make_proxy: Callable[..., ProxyRunner], message: bytes) -> None:
    proxy = make_proxy(max_packet_size=1 << 20)
    with raw_login(proxy.port) as sock:
        sock.sendall(message)
        assert _fatal_then_closed(sock) == "08P01"
    _still_serving(proxy)


def test_bad_message_mid_transaction_does_not_leak(make_proxy: Callable[..., ProxyRunner]) -> None:
    proxy = make_proxy(db={"pool_size": 1, "min_pool_size": 1})
    with raw_login(proxy.port) as sock:
        sock.sendall(query_msg("begin") + query_msg("create temp table leak (x int)"))
        assert [k for k, _ in read_messages(sock, until=b"Z", count=2) if k == b"Z"] == [b"Z", b"Z"]
        sock.sendall(b"z\0\0\0\x04")
        assert _fatal_then_closed(sock) == "08P01"
    with psycopg.connect(proxy.dsn(), autocommit=True) as conn:
        assert conn.execute("select count(*) from pg_class where relname = 'leak'").fetchone() == (0,)
        assert conn.info.transaction_status == psycopg.pq.TransactionStatus.IDLE


def test_garbage_then_silence_hits_login_timeout(make_proxy: Callable[..., ProxyRunner]) -> None:
    proxy = make_proxy(client_login_timeout=1)
    with socket.create_connection(("127.0.0.1", proxy.port), timeout=10) as sock:
        sock.sendall(b"\0\0")  # half a length word, then nothing
        assert _fatal_then_closed(sock) == "08006"
    _still_serving(proxy)


# --- TLS -----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tls_files(tmp_path_factory: pytest.TempPathFactory) -> tuple[str, str]:
    folder = tmp_path_factory.mktemp("tls")
    cert, key = folder / "server.crt", folder / "server.key"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2", "-subj",
                    "/CN=localhost", "-keyout", str(key), "-out", str(cert)], check=True, capture_output=True)
    return str(cert), str(key)


def test_tls_with_psql_and_psycopg(make_proxy: Callable[..., ProxyRunner], tls_files: tuple[str, str]) -> None:
    proxy = make_proxy(tls={"cert": tls_files[0], "key": tls_files[1]}, auth_type="password")
    out = subprocess.run(["psql", "-X", "-A", "-t", "-c", "select 40 + 2", proxy.dsn(sslmode="require")],
                         capture_output=True, text=True, timeout=30)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "42"
    with psycopg.connect(proxy.dsn(sslmode="require")) as conn:
        assert conn.pgconn.ssl_in_use
        assert conn.execute("select 1").fetchone() == (1,)
    # cleartext passwords are accepted over TLS, and refused without it
    with pytest.raises(psycopg.OperationalError, match="unencrypted"):
        psycopg.connect(proxy.dsn(sslmode="disable"))


# --- the database going away ---------------------------------------------------------------


@pytest.fixture
def own_pg() -> Iterator[EmbeddedPostgres]:
    server = start_test_pg()
    try:
        yield server
    finally:
        server.cleanup()


def _wait_until_works(proxy: ProxyRunner, seconds: float) -> int:
    deadline = time.monotonic() + seconds
    attempts = 0
    while time.monotonic() < deadline:
        attempts += 1
        try:
            with psycopg.connect(proxy.dsn(), connect_timeout=5) as conn:
                if conn.execute("select 1").fetchone() == (1,):
                    return attempts
        except psycopg.OperationalError:
            time.sleep(0.3)
    raise AssertionError("hyperpool did not recover")


def test_database_down_at_start_then_back(own_pg: EmbeddedPostgres) -> None:
    own_pg.stop()
    proxy = start_proxy(base_config(own_pg.port, db={"min_pool_size": 2, "server_connect_timeout": 2}))
    try:
        with pytest.raises(psycopg.OperationalError, match="could not connect to the database"):
            psycopg.connect(proxy.dsn(), connect_timeout=10)
        own_pg.start_server()
        _wait_until_works(proxy, 20)
    finally:
        proxy.stop()


def test_database_restart_under_idle_pool(own_pg: EmbeddedPostgres) -> None:
    proxy = start_proxy(base_config(own_pg.port, db={"min_pool_size": 2}))
    try:
        _wait_until_works(proxy, 10)
        own_pg.stop()
        own_pg.start_server()
        _wait_until_works(proxy, 20)  # dead idle connections are dropped and replaced
        pool = proxy.state.databases[APPDB].pool
        assert pool.stats.closed >= 2
    finally:
        proxy.stop()


def test_unknown_upstream_database_is_08006(pg: EmbeddedPostgres) -> None:
    proxy = start_proxy(base_config(pg.port, db={"dbname": "no_such_upstream", "min_pool_size": 0}))
    try:
        with pytest.raises(psycopg.OperationalError, match="server login failed"):
            psycopg.connect(proxy.dsn())
    finally:
        proxy.stop()


def test_config_example_path_exists() -> None:
    assert Path(__file__).resolve().parents[1].joinpath("config", "hyperpool.yaml").is_file()


def test_wrong_origin_password_does_not_look_like_client_auth_failure(pg: EmbeddedPostgres) -> None:
    proxy = start_proxy(base_config(pg.port, db={"password": "not-the-password", "min_pool_size": 0}))
    try:
        with pytest.raises(psycopg.OperationalError) as info:
            psycopg.connect(proxy.dsn())
        assert "server login failed" in str(info.value)
        assert APP_PASSWORD not in str(info.value)
    finally:
        proxy.stop()


def test_stalled_tls_handshake_is_closed_at_login_timeout(make_proxy: Callable[..., ProxyRunner],
                                                          tls_files: tuple[str, str]) -> None:
    proxy = make_proxy(tls={"cert": tls_files[0], "key": tls_files[1]}, client_login_timeout=1)
    with socket.create_connection(("127.0.0.1", proxy.port), timeout=10) as sock:
        sock.sendall(struct.pack("!ii", 8, 80877103))
        assert sock.recv(1) == b"S"
        started = time.monotonic()
        assert sock.recv(100) == b""  # closed, with no plaintext ErrorResponse in the TLS stream
        assert time.monotonic() - started < 8
    _still_serving(proxy)
