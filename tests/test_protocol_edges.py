"""Edge cases found in review of the transaction-pooling change: each failed before its fix.

Hostile or unusual clients (malformed messages, leaving mid-COPY, cancels racing the session-state
read-back, tiny statement timeouts, very many statements) must neither leak a server connection's
state to another client nor starve the pool.
"""

from __future__ import annotations

import socket
import struct
import time
from collections.abc import Callable

from tests.support import (
    APPDB,
    ProxyRunner,
    catalog_read,
    error_code,
    message,
    pure_python_only,
    query_msg,
    raw_login,
    read_messages,
)
from tests.test_statements import SYNC, bind, execute, parse

ONE = {"pool_size": 1, "min_pool_size": 1}


def kinds(msgs: list[tuple[bytes, bytes]]) -> bytes:
    return b"".join(k for k, _ in msgs)


def errors(msgs: list[tuple[bytes, bytes]]) -> list[str]:
    return [error_code(p) for k, p in msgs if k == b"E"]


def test_malformed_message_leaves_no_phantom_request_for_next_client(make_proxy: Callable[..., ProxyRunner]) -> None:
    """Requests recorded before a malformed intercepted message must not stay with the server connection."""
    proxy = make_proxy(db=ONE)
    a = raw_login(proxy.port)
    bad_close = message(b"C", b"Sno-nul")  # intercepted (not 'S\\0'), decode_target raises
    a.sendall(SYNC + bad_close + SYNC)
    assert errors(read_messages(a, until=b"E")) == ["08P01"]
    a.close()
    time.sleep(0.2)
    b = raw_login(proxy.port)  # gets the same (only) server connection
    b.sendall(parse("p1", "select 41 + 1") + SYNC)
    assert kinds(read_messages(b)) == b"1Z"
    b.sendall(bind("p1") + execute() + SYNC)
    assert kinds(read_messages(b)) == b"2DCZ"
    b.sendall(bind("p1") + execute() + SYNC)  # (was 26000: p1 dropped on a phantom Sync)
    msgs = read_messages(b)
    assert errors(msgs) == [], msgs
    b.close()


def test_client_leaving_mid_extended_copy_does_not_release_the_server(make_proxy: Callable[..., ProxyRunner]) -> None:
    proxy = make_proxy(query_wait_timeout=3, db=ONE)
    a = raw_login(proxy.port)
    a.sendall(query_msg("create table if not exists review_copy (a int)"))
    read_messages(a)
    a.sendall(parse("", "copy review_copy from stdin") + bind("") + execute() + SYNC)
    assert kinds(read_messages(a, until=b"G")) == b"12G"
    a.close()  # outstanding is 0 after the ignored Sync: the server goes back to the pool in COPY IN
    time.sleep(0.3)
    b = raw_login(proxy.port)
    b.settimeout(3)
    b.sendall(query_msg("select 1"))
    try:
        msgs = read_messages(b)
    except TimeoutError:
        msgs = [(b"!", b"timeout: server still in COPY")]
    assert kinds(msgs) == b"TDCZ", msgs
    b.close()


def test_answered_deallocate_while_settings_applied_releases_server(make_proxy: Callable[..., ProxyRunner]) -> None:
    """All of a client's requests answered by hyperpool while apply_settings runs: the server is released."""
    proxy = make_proxy(query_wait_timeout=2, db=ONE)
    b = raw_login(proxy.port)
    b.sendall(parse("s1", "select 1") + SYNC)
    assert kinds(read_messages(b)) == b"1Z"
    a = raw_login(proxy.port)
    a.sendall(query_msg("set work_mem = '8MB'"))  # the connection is now dirty for A
    read_messages(a)
    time.sleep(0.2)
    b.sendall(query_msg("deallocate s1"))  # answered by hyperpool; RESET ALL for B runs meanwhile
    assert kinds(read_messages(b)) == b"CZ"
    time.sleep(0.2)
    a.sendall(query_msg("select 1"))
    msgs = read_messages(a, until=b"ZE")
    assert kinds(msgs) == b"TDCZ", msgs  # (was query_wait_timeout: B held the only server)
    a.close()
    b.close()


def test_read_back_does_not_re_add_statement_evicted_meanwhile(make_proxy: Callable[..., ProxyRunner]) -> None:
    proxy = make_proxy(db={"pool_size": 1, "min_pool_size": 1, "max_prepared_statements": 1})
    a = raw_login(proxy.port)
    a.sendall(parse("s1", "select 1") + SYNC)
    assert kinds(read_messages(a)) == b"1Z"
    failures = 0
    for i in range(10):
        a.sendall(query_msg("select set_config('x.y', '1', false)"))
        read_messages(a)  # the read-back (snapshot lists _hp_1) is now in flight; this evicts _hp_1:
        a.sendall(parse(f"t{i}", f"select {i + 2}") + bind(f"t{i}") + execute() + SYNC)
        read_messages(a)
        a.sendall(bind("s1") + execute() + SYNC)  # hyperpool thinks _hp_1 is still there
        failures += bool(errors(read_messages(a)))
    assert failures == 0
    a.close()


def test_malformed_bind_on_fast_path_gets_fatal_08p01(proxy: ProxyRunner) -> None:
    a = raw_login(proxy.port)
    a.sendall(message(b"B", b"\0no-nul-statement") + SYNC)  # _bind_prepared decodes outside any try
    msgs = read_messages(a, until=b"E")
    assert errors(msgs) == ["08P01"], msgs
    a.close()


def test_malformed_parse_sync_without_server_gets_fatal_08p01(make_proxy: Callable[..., ProxyRunner]) -> None:
    proxy = make_proxy(db={"pool_size": 1, "min_pool_size": 1}, query_wait_timeout=3)
    holder = raw_login(proxy.port)
    holder.sendall(query_msg("begin"))
    read_messages(holder)  # no idle server: _prepared_here decodes the Parse outside any try
    a = raw_login(proxy.port)
    a.sendall(message(b"P", b"n\0select 1\0\0\1") + SYNC)
    msgs = read_messages(a, until=b"E")
    assert errors(msgs) == ["08P01"], msgs
    holder.close()
    a.close()


def test_duplicate_parse_cannot_succeed_or_empty_a_shared_statement(make_proxy: Callable[..., ProxyRunner]) -> None:
    proxy = make_proxy(db=ONE)
    a = raw_login(proxy.port)
    catalog_read(proxy)  # (read on the one server connection after the first login)
    a.sendall(parse("s", "select 42") + SYNC)
    assert kinds(read_messages(a)) == b"1Z"
    hp = proxy.run(lambda: next(iter(proxy.state.databases[APPDB].pool.idle)).prepared.copy())
    name = next(iter(hp)).decode()
    a.sendall(query_msg("begin") + query_msg(f"deallocate {name}"))
    read_messages(a, count=2)
    a.sendall(parse("s", "x") + SYNC)  # hyperpool's "must fail" Parse of _hp_N with "" now succeeds
    first = read_messages(a)
    a.sendall(query_msg("commit"))
    read_messages(a)
    a.close()
    time.sleep(0.2)
    b = raw_login(proxy.port)
    b.sendall(parse("q", "select 42") + bind("q") + execute() + SYNC)
    msgs = read_messages(b)
    assert errors(first) == ["42P05"] and kinds(msgs) == b"12DCZ", (first, msgs)
    b.close()


def test_answered_deallocate_after_begin_reports_current_status(proxy: ProxyRunner) -> None:
    a = raw_login(proxy.port)
    a.sendall(parse("s1", "select 1") + SYNC)
    read_messages(a)
    a.sendall(query_msg("begin") + query_msg("deallocate s1"))
    msgs = read_messages(a, count=2)
    statuses = [p for k, p in msgs if k == b"Z"]
    assert statuses == [b"T", b"T"], msgs
    a.close()


def test_close_skipped_after_error_keeps_statement(proxy: ProxyRunner) -> None:
    a = raw_login(proxy.port)
    a.sendall(parse("s1", "select 1") + SYNC)
    read_messages(a)
    a.sendall(parse("", "select 1/0") + bind("") + execute() + message(b"C", b"Ss1\0") + SYNC)
    msgs = read_messages(a)
    assert b"3" not in kinds(msgs)  # PostgreSQL skipped the Close: s1 still exists for the client
    a.sendall(bind("s1") + execute() + SYNC)
    msgs = read_messages(a)
    assert errors(msgs) == [], msgs
    a.close()


@pure_python_only
def test_read_back_waits_for_cancel_in_flight(make_proxy: Callable[..., ProxyRunner]) -> None:
    """The read-back waits while a cancel is in flight, so the cancel cannot hit it (client would get FATAL)."""
    import hyperpool.session as session_mod
    from hyperpool import upstream

    proxy = make_proxy(db=ONE)
    seen: list[int] = []
    original_send = upstream.ServerConnection.send_internal
    original_cancel = session_mod.send_cancel

    def spy(self: upstream.ServerConnection, sql: object, done: object = None, rows: object = None) -> None:
        if isinstance(sql, str) and sql.startswith("SELECT 's'"):
            seen.append(self.cancels_in_flight)
        original_send(self, sql, done, rows)  # type: ignore[arg-type]

    async def slow_cancel(host: str, port: int, request: bytes) -> None:
        import asyncio
        await asyncio.sleep(0.4)  # a slow network to the database: delivery outlives the query
        await original_cancel(host, port, request)

    upstream.ServerConnection.send_internal = spy  # type: ignore[method-assign]
    session_mod.send_cancel = slow_cancel  # type: ignore[assignment]
    try:
        a = raw_login(proxy.port)
        a.sendall(query_msg("select set_config('x.y', '1', false), pg_sleep(0.2)"))
        time.sleep(0.05)
        with socket.create_connection(("127.0.0.1", proxy.port)) as c:
            c.sendall(struct.pack("!ii", 16, 80877102) + a.backend_key)
        read_messages(a)
        time.sleep(0.5)
        a.close()
    finally:
        upstream.ServerConnection.send_internal = original_send  # type: ignore[method-assign]
        session_mod.send_cancel = original_cancel
    assert seen and all(n == 0 for n in seen), seen


def test_deep_expression_does_not_break_the_connection(proxy: ProxyRunner) -> None:
    """pgparse's JSON decode raises RecursionError (not PGQueryError) for ~600 chained operators: no crash."""
    sql = "select 'temperature' " + "".join(f"|| 'x{i}' " for i in range(600))
    a = raw_login(proxy.port)
    a.sendall(query_msg(sql))
    msgs = read_messages(a, until=b"ZE")
    assert kinds(msgs) == b"TDCZ", msgs  # PostgreSQL runs it; hyperpool drops the connection silently
    a.close()


def test_short_statement_timeout_pins_instead_of_killing_the_client(proxy: ProxyRunner) -> None:
    """The read-back runs under the client's own statement_timeout: when it times out, the client keeps its
    server connection (its state is unknown) instead of getting FATAL."""
    a = raw_login(proxy.port)
    a.sendall(query_msg("set statement_timeout = '1ms'"))
    msgs = read_messages(a, until=b"ZE")
    time.sleep(0.3)
    a.sendall(query_msg("select 1"))
    more = read_messages(a, until=b"ZE")
    assert kinds(msgs) == b"CZ" and kinds(more) == b"TDCZ", (msgs, more)
    a.sendall(query_msg("show statement_timeout"))
    assert [p for k, p in read_messages(a) if k == b"D"] == [b"\x00\x01\x00\x00\x00\x031ms"]
    a.close()


@pure_python_only
def test_late_cancel_completion_keeps_pinned_server(make_proxy: Callable[..., ProxyRunner]) -> None:
    """after_cancels(_release_if_idle) fires after the client got pinned: the server must stay with it."""
    import asyncio

    import hyperpool.session as session_mod

    proxy = make_proxy(query_wait_timeout=2, db=ONE)
    original_cancel = session_mod.send_cancel

    async def slow_cancel(host: str, port: int, request: bytes) -> None:
        await original_cancel(host, port, b"\0\0\0\x10\x04\xd2\x16\x2e" + b"\0" * 8)  # a no-op cancel
        await asyncio.sleep(0.6)  # delivery (e.g. a slow network to the database) outlives the query

    session_mod.send_cancel = slow_cancel  # type: ignore[assignment]
    try:
        a = raw_login(proxy.port)
        a.sendall(query_msg("select pg_sleep(0.2)"))
        time.sleep(0.05)
        with socket.create_connection(("127.0.0.1", proxy.port)) as c:
            c.sendall(struct.pack("!ii", 16, 80877102) + a.backend_key)
        read_messages(a)  # query done; release deferred until the cancel is delivered
        a.sendall(query_msg("select pg_advisory_lock(4242)"))
        read_messages(a)  # A is now pinned (advisory_lock)
        time.sleep(0.8)  # the cancel finishes: _release_if_idle ignores the pin
        b = raw_login(proxy.port)
        b.sendall(query_msg("select count(*) from pg_locks where locktype = 'advisory' and pid = pg_backend_pid()"))
        msgs = read_messages(b, until=b"ZE")
    finally:
        session_mod.send_cancel = original_cancel
    # B must wait for the only server (A is pinned) and time out; it must never see A's lock
    assert kinds(msgs) == b"E", msgs
    a.close()
    b.close()


def test_per_client_statement_map_is_bounded(make_proxy: Callable[..., ProxyRunner]) -> None:
    """Parse of new names for a statement the server has is answered by hyperpool, so no server-side bound
    limits a client's statements: hyperpool refuses more than MAX_CLIENT_STATEMENTS (53400)."""
    proxy = make_proxy(db={"pool_size": 1, "min_pool_size": 1, "max_prepared_statements": 5})
    a = raw_login(proxy.port)
    a.sendall(b"".join(parse(f"n{i}", "select 1") for i in range(12000)) + SYNC)
    msgs = read_messages(a, until=b"E", limit=100000)
    assert errors(msgs) == ["53400"]
    a.close()
    b = raw_login(proxy.port)  # the server connection was not lost for others
    b.sendall(query_msg("select 1"))
    assert kinds(read_messages(b)) == b"TDCZ"
    b.close()


def test_bulk_insert_text_is_not_parsed() -> None:
    """A 1 MB literal INSERT containing 'temp' (e.g. 'temperature', 'attempt') must not be parsed with pgparse
    on the event loop, where every client would wait (the 0.1 s bound is illustrative)."""
    from hyperpool.sql import effects

    sql = b"insert into t values " + b",".join(b"(%d, 'attempt %d')" % (i, i) for i in range(40000))
    assert len(sql) > 900_000 and effects.worth_parsing(sql, 0, len(sql))
    started = time.perf_counter()
    effects.effects(sql)
    assert time.perf_counter() - started < 0.1


def test_look_memo_keeps_no_long_texts() -> None:
    """worth_parsing's memo must not keep long texts: 4096 texts of up to max_packet_size each could stay in
    memory (the 10 MB bound is illustrative)."""
    from hyperpool.sql import effects

    for i in range(50):
        text = b"insert into t values ('" + bytes([97 + i % 26, 97 + i // 26]) * 500_000 + b"')"
        effects.worth_parsing(text, 0, len(text))
    memo = next(c.cell_contents for c in effects.worth_parsing.__closure__ if isinstance(c.cell_contents, dict))
    assert sum(map(len, memo)) < 10_000_000
