"""Review reproductions (delete-safe). Each test fails on the reviewed change."""

from __future__ import annotations

import socket
import struct
import time
from collections.abc import Callable

from tests.support import APPDB, ProxyRunner, error_code, message, query_msg, raw_login, read_messages
from tests.test_statements import SYNC, bind, execute, parse

ONE = {"pool_size": 1, "min_pool_size": 1}


def kinds(msgs: list[tuple[bytes, bytes]]) -> bytes:
    return b"".join(k for k, _ in msgs)


def errors(msgs: list[tuple[bytes, bytes]]) -> list[str]:
    return [error_code(p) for k, p in msgs if k == b"E"]


def test_malformed_message_leaves_phantom_request_for_next_client(make_proxy: Callable[..., ProxyRunner]) -> None:
    """Bytes recorded in _send before a malformed intercepted message raises stay in server.requests."""
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
    b.sendall(bind("p1") + execute() + SYNC)  # now: 26000, hyperpool dropped p1 on a phantom Sync
    msgs = read_messages(b)
    assert errors(msgs) == [], msgs
    b.close()


def test_extended_copy_client_leaves_server_released_mid_copy(make_proxy: Callable[..., ProxyRunner]) -> None:
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
    except socket.timeout:
        msgs = [(b"!", b"timeout: server still in COPY")]
    assert kinds(msgs) == b"TDCZ", msgs
    b.close()


def test_fake_deallocate_while_settings_applied_holds_server(make_proxy: Callable[..., ProxyRunner]) -> None:
    """All of a client's requests answered by hyperpool while apply_settings runs: nobody releases."""
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
    assert kinds(msgs) == b"TDCZ", msgs  # now: query_wait_timeout, B holds the only server forever
    a.close()
    b.close()


def test_read_back_re_adds_statement_evicted_meanwhile(make_proxy: Callable[..., ProxyRunner]) -> None:
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


def test_failing_duplicate_parse_can_succeed_and_empty_shared_statement(make_proxy: Callable[..., ProxyRunner]) -> None:
    proxy = make_proxy(db=ONE)
    a = raw_login(proxy.port)
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


def test_fake_deallocate_after_begin_reports_stale_status(proxy: ProxyRunner) -> None:
    a = raw_login(proxy.port)
    a.sendall(parse("s1", "select 1") + SYNC)
    read_messages(a)
    a.sendall(query_msg("begin") + query_msg("deallocate s1"))
    msgs = read_messages(a, count=2)
    statuses = [p for k, p in msgs if k == b"Z"]
    assert statuses == [b"T", b"T"], msgs
    a.close()


def test_close_skipped_after_error_still_forgets_statement(proxy: ProxyRunner) -> None:
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


def test_cancel_in_flight_when_read_back_starts(make_proxy: Callable[..., ProxyRunner]) -> None:
    """The read-back is sent while cancels_in_flight > 0: the cancel can hit it (client gets FATAL)."""
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
