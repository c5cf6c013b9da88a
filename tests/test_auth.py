"""Client authentication is done by hyperpool: each method, and how failures look."""

from __future__ import annotations

import asyncio
import base64
import dataclasses
import socket
import struct
import subprocess
from collections.abc import Callable

import asyncpg
import psycopg
import pytest

from hyperpool.config import parse_config
from hyperpool.protocol import scram
from tests.support import APP_PASSWORD, APP_USER, APPDB, ProxyRunner, error_code, read_messages, startup_packet


def _query_one(dsn: str, sql: str) -> object:
    with psycopg.connect(dsn, connect_timeout=10) as conn:
        row = conn.execute(sql).fetchone()
        assert row is not None
        return row[0]


@pytest.mark.parametrize(
    "users",
    [
        {APP_USER: {"password": APP_PASSWORD}},
        {APP_USER: {"password": str(scram.make_verifier(APP_PASSWORD))}},
    ],
    ids=["plaintext", "verifier"],
)
def test_scram_login(make_proxy: Callable[..., ProxyRunner], users: dict[str, object]) -> None:
    proxy = make_proxy(users=users)
    assert _query_one(proxy.dsn(), "select current_database()") == APPDB
    with pytest.raises(psycopg.OperationalError, match="password authentication failed"):
        _query_one(proxy.dsn(password="wrong"), "select 1")


@pytest.mark.parametrize("stored", [APP_PASSWORD, scram.md5_hash(APP_PASSWORD, APP_USER)], ids=["plain", "md5hash"])
def test_md5_login(make_proxy: Callable[..., ProxyRunner], stored: str) -> None:
    proxy = make_proxy(auth_type="md5", users={APP_USER: {"password": stored}})
    assert _query_one(proxy.dsn(), "select 41 + 1") == 42
    with pytest.raises(psycopg.OperationalError, match="password authentication failed"):
        _query_one(proxy.dsn(password="wrong"), "select 1")


def test_md5_with_scram_only_user_uses_scram(make_proxy: Callable[..., ProxyRunner]) -> None:
    proxy = make_proxy(auth_type="md5", users={APP_USER: {"password": str(scram.make_verifier(APP_PASSWORD))}})
    assert _query_one(proxy.dsn(), "select 1") == 1


def test_cleartext_refused_without_tls(make_proxy: Callable[..., ProxyRunner]) -> None:
    proxy = make_proxy(auth_type="password")
    with pytest.raises(psycopg.OperationalError, match="unencrypted connection is not allowed"):
        _query_one(proxy.dsn(), "select 1")


@pytest.mark.parametrize("stored", [APP_PASSWORD, str(scram.make_verifier(APP_PASSWORD, iterations=20_000))],
                         ids=["plain", "verifier"])
def test_cleartext_allowed_when_configured(make_proxy: Callable[..., ProxyRunner], stored: str) -> None:
    # (against a verifier the password is checked by a key derivation, off the event loop)
    proxy = make_proxy(auth_type="password", allow_cleartext_over_tcp=True, users={APP_USER: {"password": stored}})
    assert _query_one(proxy.dsn(), "select 1") == 1
    with pytest.raises(psycopg.OperationalError, match="password authentication failed"):
        _query_one(proxy.dsn(password="nope"), "select 1")


def test_trust(make_proxy: Callable[..., ProxyRunner]) -> None:
    proxy = make_proxy(auth_type="trust")
    assert _query_one(proxy.dsn(password="anything"), "select 1") == 1
    with pytest.raises(psycopg.OperationalError, match='role "ghost" does not exist'):
        _query_one(proxy.dsn(user="ghost"), "select 1")


def _login_error(proxy: ProxyRunner, user: str, password: str, dbname: str) -> asyncpg.PostgresError:
    """The error asyncpg gets at login (asyncpg, unlike libpq, exposes the SQLSTATE of a login failure)."""

    async def attempt() -> None:
        conn = await asyncpg.connect(host="127.0.0.1", port=proxy.port, user=user, password=password,
                                     database=dbname, timeout=10)
        await conn.close()

    with pytest.raises(asyncpg.PostgresError) as info:
        asyncio.run(attempt())
    return info.value


def test_failures_look_like_postgres(proxy: ProxyRunner) -> None:
    wrong = _login_error(proxy, APP_USER, "wrong", APPDB)
    unknown = _login_error(proxy, "nobody", "wrong", APPDB)
    # same SQLSTATE and wording for a wrong password and an unknown user (no user probing)
    assert wrong.sqlstate == unknown.sqlstate == "28P01"
    assert str(unknown) == 'password authentication failed for user "nobody"'
    assert str(wrong) == f'password authentication failed for user "{APP_USER}"'
    nodb = _login_error(proxy, APP_USER, APP_PASSWORD, "nosuchdb")
    assert nodb.sqlstate == "3D000"
    assert str(nodb) == 'database "nosuchdb" does not exist'
    # an unknown database must not be revealed before authentication
    assert _login_error(proxy, APP_USER, "wrong", "nosuchdb").sqlstate == "28P01"


def test_no_upstream_connection_before_auth(make_proxy: Callable[..., ProxyRunner]) -> None:
    proxy = make_proxy(db={"min_pool_size": 0})
    for _ in range(3):
        _login_error(proxy, APP_USER, "wrong", APPDB)
    pool = proxy.state.databases[APPDB].pool
    assert pool.stats.opened == 0


def test_scram_exchange_on_the_wire(proxy: ProxyRunner) -> None:
    """Drive SCRAM by hand with hyperpool's own client side, then check ReadyForQuery and ParameterStatus."""
    client = scram.ScramClient(APP_PASSWORD)
    with socket.create_connection(("127.0.0.1", proxy.port), timeout=10) as sock:
        sock.sendall(startup_packet({"user": APP_USER, "database": APPDB}))
        (kind, payload), = read_messages(sock, until=b"R")
        assert kind == b"R" and struct.unpack("!i", payload[:4])[0] == 10 and b"SCRAM-SHA-256" in payload
        first = client.client_first()
        sock.sendall(b"p" + struct.pack("!i", 4 + 14 + 4 + len(first)) + b"SCRAM-SHA-256\0"
                     + struct.pack("!i", len(first)) + first)
        (kind, payload), = read_messages(sock, until=b"R")
        final = client.server_first(payload[4:])
        sock.sendall(b"p" + struct.pack("!i", 4 + len(final)) + final)
        msgs = read_messages(sock, until=b"Z")
        client.server_final(msgs[0][1][4:])
        kinds = [k for k, _ in msgs]
        assert kinds[1] == b"R" and msgs[1][1] == struct.pack("!i", 0)
        params = dict(p[:-1].split(b"\0") for k, p in msgs if k == b"S")
        assert params[b"server_version"].startswith(b"15")
        assert b"standard_conforming_strings" in params and b"server_encoding" in params
        assert kinds.count(b"K") == 1 and kinds[-1] == b"Z" and msgs[-1][1] == b"I"


def test_bad_password_packet_is_protocol_error(proxy: ProxyRunner) -> None:
    with socket.create_connection(("127.0.0.1", proxy.port), timeout=10) as sock:
        sock.sendall(startup_packet({"user": APP_USER, "database": APPDB}))
        read_messages(sock, until=b"R")
        sock.sendall(b"Q\0\0\0\x0dselect 1\0")  # a query instead of a SASL response
        msgs = read_messages(sock, until=b"E")
        assert msgs[-1][0] == b"E" and error_code(msgs[-1][1]) == "08P01"
        assert sock.recv(100) == b""


def test_psql_client(proxy: ProxyRunner) -> None:
    out = subprocess.run(
        ["psql", "-X", "-A", "-t", "-c", "select 'via ' || current_user", proxy.dsn()],
        capture_output=True, text=True, timeout=30, check=True,
    )
    assert out.stdout.strip() == "via app_owner"


def _server_first(port: int, user: str) -> dict[str, str]:
    """Start a SCRAM exchange by hand and return the attributes of the server-first message (r, s, i)."""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(startup_packet({"user": user, "database": APPDB}))
        (kind, body), = read_messages(sock, until=b"R")
        assert kind == b"R" and struct.unpack("!i", body[:4])[0] == 10, body
        first = b"n,,n=,r=" + b"x" * 24
        sock.sendall(b"p" + struct.pack("!i", 4 + len(b"SCRAM-SHA-256\0") + 4 + len(first))
                     + b"SCRAM-SHA-256\0" + struct.pack("!i", len(first)) + first)
        (kind, body), = read_messages(sock, until=b"RE")
        assert kind == b"R" and struct.unpack("!i", body[:4])[0] == 11, (kind, body)
        return dict(part.split("=", 1) for part in body[4:].decode().split(","))


def test_scram_iterations_low_for_users_and_for_the_unknown(make_proxy: Callable[..., ProxyRunner]) -> None:
    users = {APP_USER: {"password": APP_PASSWORD}, "fn": {"password": "f" * 40, "scram_iterations": 8}}
    proxy = make_proxy(users=users, scram_iterations=64)
    assert _query_one(proxy.dsn(), "select 1") == 1
    assert _query_one(proxy.dsn(user="fn", password="f" * 40), "select 2") == 2
    with pytest.raises(psycopg.OperationalError, match="password authentication failed"):
        _query_one(proxy.dsn(user="fn", password="wrong"), "select 1")
    assert _server_first(proxy.port, APP_USER)["i"] == "64"
    assert _server_first(proxy.port, "fn")["i"] == "8"
    # an unknown user gets the configured count and a salt that stays the same per name (PostgreSQL's
    # mock authentication): nothing in the exchange tells it from a user whose verifier came from the config
    ghost, again, other = (_server_first(proxy.port, name) for name in ("ghost", "ghost", "phantom"))
    assert ghost["i"] == "64" and ghost["s"] == again["s"] != other["s"]
    assert len(base64.b64decode(ghost["s"])) == len(base64.b64decode(_server_first(proxy.port, APP_USER)["s"]))


def test_a_reload_keeps_unchanged_users_salts(make_proxy: Callable[..., ProxyRunner]) -> None:
    """A plain-text password is given a verifier at each load; a reload that leaves it as it was keeps the old
    one, so its salt does not change while an unknown name's mock salt stays put (which would tell them apart)."""
    proxy = make_proxy(users={APP_USER: {"password": APP_PASSWORD}, "other": {"password": "o" * 20}})
    before = {name: _server_first(proxy.port, name)["s"] for name in (APP_USER, "other", "ghost")}

    def reload(users: dict[str, object]) -> None:
        new = dataclasses.replace(proxy.state.config, users=parse_config({"users": users}, {}).users)
        proxy.run(proxy.state.apply_config, new)

    reload({APP_USER: {"password": APP_PASSWORD}, "other": {"password": "changed" * 3}})
    after = {name: _server_first(proxy.port, name)["s"] for name in (APP_USER, "other", "ghost")}
    assert after[APP_USER] == before[APP_USER] and after["ghost"] == before["ghost"]
    assert after["other"] != before["other"]  # a new password: a new verifier
    assert _query_one(proxy.dsn(user="other", password="changed" * 3), "select 1") == 1
    assert _query_one(proxy.dsn(), "select 2") == 2
