"""Named prepared statements and unmovable session state through transaction pooling: the edge cases.

tests/test_drivers.py shows that real drivers work; these tests drive the protocol by hand where
hyperpool must answer, inject, evict or refuse something itself, and check what PostgreSQL would say.
"""

from __future__ import annotations

import struct
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import psycopg
import pytest

from hyperpool.protocol import messages
from tests.support import APPDB, ProxyRunner, error_code, message, query_msg, raw_login, read_messages

SYNC = message(b"S")


def parse(name: str, sql: str, types: tuple[int, ...] = ()) -> bytes:
    return message(b"P", name.encode() + b"\0" + sql.encode() + b"\0" + struct.pack("!h", len(types))
                   + b"".join(struct.pack("!i", t) for t in types))


def bind(statement: str, *params: str | None, portal: str = "") -> bytes:
    body = portal.encode() + b"\0" + statement.encode() + b"\0" + struct.pack("!hh", 0, len(params))
    for value in params:
        body += struct.pack("!i", -1) if value is None else struct.pack("!i", len(value)) + value.encode()
    return message(b"B", body + struct.pack("!h", 0))


def execute(portal: str = "") -> bytes:
    return message(b"E", portal.encode() + b"\0" + struct.pack("!i", 0))


def describe_statement(name: str) -> bytes:
    return message(b"D", b"S" + name.encode() + b"\0")


def close_statement(name: str) -> bytes:
    return message(b"C", b"S" + name.encode() + b"\0")


def exchange(sock: object, data: bytes, syncs: int = 1) -> list[tuple[bytes, bytes]]:
    sock.sendall(data)  # type: ignore[attr-defined]
    return read_messages(sock, count=syncs)  # type: ignore[arg-type]


def kinds(msgs: list[tuple[bytes, bytes]]) -> bytes:
    return b"".join(k for k, _ in msgs)


def rows(msgs: list[tuple[bytes, bytes]]) -> list[list[str | None]]:
    return [messages.decode_data_row(p) for k, p in msgs if k == b"D"]


def errors(msgs: list[tuple[bytes, bytes]]) -> list[str]:
    return [error_code(p) for k, p in msgs if k == b"E"]


@contextmanager
def server_taken(proxy: ProxyRunner) -> Iterator[None]:
    """Another client holds a server connection in an open transaction meanwhile."""
    holder = raw_login(proxy.port)
    try:
        assert kinds(exchange(holder, query_msg("begin; select 1"))).endswith(b"Z")
        yield
    finally:
        exchange(holder, query_msg("rollback"))
        holder.close()


def test_statement_follows_its_client_to_a_server_without_it(make_proxy: Callable[..., ProxyRunner]) -> None:
    """Parse on one server connection, Bind on another: hyperpool prepares it there first, unseen."""
    proxy = make_proxy(db={"pool_size": 2, "min_pool_size": 2})
    a = raw_login(proxy.port)
    assert kinds(exchange(a, parse("s1", "select $1::int * 3") + SYNC)) == b"1Z"
    with server_taken(proxy):  # the connection that has s1 is (most likely) the one taken now
        for n in range(4):
            msgs = exchange(a, bind("s1", str(n)) + execute() + SYNC)
            assert kinds(msgs) == b"2DCZ", msgs
            assert rows(msgs) == [[str(n * 3)]]
    a.close()


def test_parse_of_a_name_in_use_fails_as_in_postgres(proxy: ProxyRunner) -> None:
    a = raw_login(proxy.port)
    assert kinds(exchange(a, parse("dup", "select 1") + SYNC)) == b"1Z"
    msgs = exchange(a, parse("dup", "select 2") + bind("dup") + execute() + SYNC)
    assert kinds(msgs) == b"EZ"  # the rest was skipped up to Sync, as PostgreSQL does
    assert errors(msgs) == ["42P05"]
    assert b'prepared statement "dup" already exists' in msgs[0][1]
    msgs = exchange(a, bind("dup") + execute() + SYNC)
    assert rows(msgs) == [["1"]]  # the first definition stands
    a.close()


def test_unknown_statement_gets_postgres_error(proxy: ProxyRunner) -> None:
    a = raw_login(proxy.port)
    for name in ("nope", "_hp_1"):  # also one that looks like hyperpool's own names
        msgs = exchange(a, bind(name) + execute() + SYNC)
        assert errors(msgs) == ["26000"], msgs
    msgs = exchange(a, describe_statement("nope") + SYNC)
    assert errors(msgs) == ["26000"]
    assert kinds(exchange(a, query_msg("select 1"))) == b"TDCZ"  # still usable
    a.close()


def test_close_and_sql_deallocate_of_protocol_statement(proxy: ProxyRunner) -> None:
    """Close and DEALLOCATE of a protocol-level statement are answered by hyperpool, as PostgreSQL would."""
    a = raw_login(proxy.port)
    assert kinds(exchange(a, parse("c1", "select 11") + parse("c2", "select 22") + SYNC)) == b"11Z"
    assert kinds(exchange(a, close_statement("c1") + SYNC)) == b"3Z"
    assert errors(exchange(a, bind("c1") + execute() + SYNC)) == ["26000"]
    msgs = exchange(a, query_msg("DEALLOCATE c2"))
    assert kinds(msgs) == b"CZ" and msgs[0][1] == b"DEALLOCATE\0"
    assert errors(exchange(a, bind("c2") + execute() + SYNC)) == ["26000"]
    # closing a name that does not exist is not an error in PostgreSQL either
    assert kinds(exchange(a, close_statement("never") + SYNC)) == b"3Z"
    # and the name can be used again
    assert kinds(exchange(a, parse("c1", "select 33") + SYNC)) == b"1Z"
    assert rows(exchange(a, bind("c1") + execute() + SYNC)) == [["33"]]
    a.close()


def test_close_inside_pipeline_is_answered_in_order(proxy: ProxyRunner) -> None:
    a = raw_login(proxy.port)
    assert kinds(exchange(a, parse("p1", "select 1") + SYNC)) == b"1Z"
    msgs = exchange(a, bind("p1") + execute() + close_statement("p1") + parse("p1", "select 2")
                    + bind("p1") + execute() + SYNC)
    assert kinds(msgs) == b"2DC312DCZ"
    assert rows(msgs) == [["1"], ["2"]]
    a.close()


def test_error_in_pipeline_skips_hyperpools_own_requests_too(make_proxy: Callable[..., ProxyRunner]) -> None:
    """An error before an injected Parse: the server skips it; hyperpool must not think it ran."""
    proxy = make_proxy(db={"pool_size": 1, "min_pool_size": 1, "max_prepared_statements": 1})
    a = raw_login(proxy.port)
    assert kinds(exchange(a, parse("e1", "select $1::int + 1") + SYNC)) == b"1Z"
    assert kinds(exchange(a, parse("e2", "select $1::int + 2") + SYNC)) == b"1Z"  # evicts e1 on the server
    msgs = exchange(a, bind("e2", "not a number") + execute() + bind("e1", "5") + execute() + SYNC)
    assert kinds(msgs) == b"EZ" and errors(msgs) == ["22P02"]
    for n in range(3):
        assert rows(exchange(a, bind("e1", str(n)) + execute() + SYNC)) == [[str(n + 1)]]
        assert rows(exchange(a, bind("e2", str(n)) + execute() + SYNC)) == [[str(n + 2)]]
    a.close()


def test_eviction_keeps_at_most_max_prepared_statements(make_proxy: Callable[..., ProxyRunner]) -> None:
    proxy = make_proxy(db={"pool_size": 1, "min_pool_size": 1, "max_prepared_statements": 3})
    with psycopg.connect(proxy.dsn(), autocommit=True, prepare_threshold=0) as conn:
        for rnd in range(3):
            for k in range(8):
                got = conn.execute(f"select %s::int + {k}", (rnd,)).fetchone()
                assert got == (rnd + k,)
        # psycopg keeps its own cache of statements; the server connection holds no more than 3 of them
        count = conn.execute("select count(*) from pg_prepared_statements where not from_sql",
                             prepare=False).fetchone()
        assert count is not None and count[0] <= 3


def test_prepare_outside_transaction_needs_no_server(make_proxy: Callable[..., ProxyRunner]) -> None:
    """libpq's PQprepare blocks: a Parse + Sync of a statement already known is answered at once."""
    proxy = make_proxy(db={"pool_size": 1, "min_pool_size": 1})
    a = raw_login(proxy.port)
    assert kinds(exchange(a, parse("k1", "select 42") + SYNC)) == b"1Z"
    b = raw_login(proxy.port)
    with server_taken(proxy):  # the only server connection is busy
        b.settimeout(3)
        assert kinds(exchange(b, parse("k1", "select 42") + SYNC)) == b"1Z"
        b.sendall(parse("k2", "select 43") + SYNC)  # a text no server connection has seen: it waits
    assert kinds(read_messages(b)) == b"1Z"
    assert rows(exchange(b, bind("k1") + execute() + bind("k2") + execute() + SYNC)) == [["42"], ["43"]]
    a.close()
    b.close()


REFUSED = [
    ("listen", "LISTEN hp_refused"),
    ("advisory_lock", "SELECT pg_advisory_lock(4242)"),
    ("temp_table", "CREATE TEMP TABLE hp_refused_t (a int)"),
    ("hold_cursor", "DECLARE hp_c CURSOR WITH HOLD FOR SELECT 1"),
    ("role", "SET ROLE app_owner"),
]


@pytest.mark.parametrize(("reason", "sql"), REFUSED, ids=[r for r, _ in REFUSED])
def test_pinning_refuse(make_proxy: Callable[..., ProxyRunner], reason: str, sql: str) -> None:
    proxy = make_proxy(db={"pool_size": 1, "min_pool_size": 1, "pinning": "refuse"})
    with psycopg.connect(proxy.dsn(), autocommit=True) as conn, psycopg.connect(proxy.dsn(), autocommit=True) as other:
        with pytest.raises(psycopg.errors.FeatureNotSupported) as info:
            conn.execute(sql)
        assert "pinning: refuse" in str(info.value)
        assert conn.execute("select 1").fetchone() == (1,)  # the connection stays usable
        # nothing was done and nobody is pinned: the one server connection serves the other client
        assert other.execute("select 2").fetchone() == (2,)
        state = conn.execute("select (select count(*) from pg_listening_channels()),"
                             " (select count(*) from pg_locks where locktype = 'advisory'),"
                             " current_user = session_user").fetchone()
        assert state == (0, 0, True)
        # inside a transaction the refusal aborts it, as a failing statement does
        with pytest.raises(psycopg.errors.FeatureNotSupported), conn.transaction():
            conn.execute("select 1")
            conn.execute(sql)
        assert conn.execute("select 3").fetchone() == (3,)


def test_pinning_refuse_extended_protocol(make_proxy: Callable[..., ProxyRunner]) -> None:
    proxy = make_proxy(db={"pool_size": 1, "min_pool_size": 1, "pinning": "refuse"})
    a = raw_login(proxy.port)
    msgs = exchange(a, parse("", "SELECT pg_try_advisory_lock(7)") + bind("") + execute() + SYNC)
    assert errors(msgs) == ["0A000"]
    msgs = exchange(a, parse("named", "LISTEN x") + bind("named") + execute() + SYNC)
    assert errors(msgs) == ["0A000"]
    assert rows(exchange(a, query_msg("select count(*) from pg_listening_channels()"))) == [["0"]]
    a.close()


def test_pinned_client_keeps_its_server_until_state_is_gone(make_proxy: Callable[..., ProxyRunner]) -> None:
    proxy = make_proxy(db={"pool_size": 2, "min_pool_size": 2})
    database = proxy.state.databases[APPDB]
    with psycopg.connect(proxy.dsn(), autocommit=True) as conn:
        conn.execute("select pg_advisory_lock(99)")
        pid = conn.execute("select pg_backend_pid()").fetchone()
        sessions = proxy.run(lambda: [s for s in proxy.state.sessions if s.database is database])
        assert [s.pins for s in sessions] == [("advisory_lock",)]
        assert proxy.run(proxy.state.pinned_clients) == {APPDB: {"advisory_lock": 1}}
        results: list[tuple[int, ...] | None] = []

        def others() -> None:
            with psycopg.connect(proxy.dsn(), autocommit=True) as o:
                for _ in range(20):
                    results.append(o.execute("select pg_backend_pid()").fetchone())

        thread = threading.Thread(target=others)
        thread.start()
        for _ in range(20):
            assert conn.execute("select pg_backend_pid()").fetchone() == pid
        thread.join(20)
        assert len(results) == 20 and pid not in results  # nobody else ran on the pinned connection
        conn.execute("select pg_advisory_unlock(99)")
        # the state is read back right after the transaction, while the client already has its answer
        for _ in range(100):
            if proxy.run(lambda: [s.pins for s in sessions]) == [()]:
                break
            time.sleep(0.02)
        assert proxy.run(lambda: [s.pins for s in sessions]) == [()]
        assert proxy.run(proxy.state.pinned_clients) == {}


def copy_data(text: str) -> bytes:
    return message(b"d", text.encode())


def test_copy_fail_in_both_protocols(proxy: ProxyRunner) -> None:
    a = raw_login(proxy.port)
    assert kinds(exchange(a, query_msg("create temp table if not exists cf (a int)")))[-1:] == b"Z"
    # simple protocol: COPY FROM STDIN, some data, then CopyFail
    a.sendall(query_msg("copy cf from stdin"))
    assert kinds(read_messages(a, until=b"G")) == b"G"
    msgs = exchange(a, copy_data("1\n") + message(b"f", b"client gave up\0"))
    assert errors(msgs) == ["57014"] and kinds(msgs).endswith(b"Z")
    # extended protocol: the same, with the Sync sent before the copy data
    a.sendall(parse("", "copy cf from stdin") + bind("") + execute() + SYNC)
    assert kinds(read_messages(a, until=b"G")) == b"12G"
    # PostgreSQL ignored that Sync during copy-in: after the CopyFail it skips to the next one
    msgs = exchange(a, copy_data("2\n") + message(b"f", b"no\0") + SYNC)
    assert errors(msgs) == ["57014"] and kinds(msgs) == b"EZ"
    # nothing was copied, and the connection goes on in step
    assert rows(exchange(a, query_msg("select count(*) from cf"))) == [["0"]]
    a.sendall(query_msg("copy cf from stdin"))
    read_messages(a, until=b"G")
    assert kinds(exchange(a, copy_data("3\n") + message(b"c"))) == b"CZ"
    assert rows(exchange(a, query_msg("select a from cf"))) == [["3"]]
    a.close()


def test_notices_and_parameter_status_reach_their_client(make_proxy: Callable[..., ProxyRunner]) -> None:
    proxy = make_proxy(db={"pool_size": 1, "min_pool_size": 1})
    a, b = raw_login(proxy.port), raw_login(proxy.port)
    msgs = exchange(a, query_msg("do $$ begin raise notice 'for a only'; end $$"))
    assert [k for k, _ in msgs] == [b"N", b"C", b"Z"] and b"for a only" in msgs[0][1]
    msgs = exchange(a, query_msg("set application_name = 'renamed_a'"))
    assert (b"S", b"application_name\0renamed_a\0") in msgs
    msgs = exchange(b, query_msg("select current_setting('application_name')"))
    assert b"N" not in kinds(msgs) and b"renamed_a" not in b"".join(p for _, p in msgs)
    assert rows(exchange(a, query_msg("select current_setting('application_name')"))) == [["renamed_a"]]
    a.close()
    b.close()


def test_session_mode_keeps_client_statement_names(make_proxy: Callable[..., ProxyRunner]) -> None:
    """In session pooling the client keeps its server connection: statements are not renamed."""
    proxy = make_proxy(pool_mode="session", db={"pool_size": 2})
    with psycopg.connect(proxy.dsn(), autocommit=True, prepare_threshold=0) as conn:
        for k in range(3):
            assert conn.execute("select %s::int + 40", (k,)).fetchone() == (k + 40,)
        names = conn.execute("select name from pg_prepared_statements", prepare=False).fetchall()
        assert names and all(name.startswith("_pg3_") for (name,) in names)


def test_pinning_refuse_does_not_apply_in_session_mode(make_proxy: Callable[..., ProxyRunner]) -> None:
    proxy = make_proxy(pool_mode="session", db={"pool_size": 1, "pinning": "refuse"})
    with psycopg.connect(proxy.dsn(), autocommit=True) as conn:
        conn.execute("listen hp_session_channel")
        assert conn.execute("select count(*) from pg_listening_channels()").fetchone() == (1,)
