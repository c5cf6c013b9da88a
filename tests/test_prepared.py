"""Unit tests for hyperpool.prepared (the hyperpool-wide statement registry) and the protocol messages it and
the session's statement renaming use (hyperpool.protocol.messages: Parse, Bind, Describe, Close, DataRow)."""

from __future__ import annotations

from collections.abc import Callable

import pytest

from hyperpool.prepared import PREFIX, Statement, StatementRegistry
from hyperpool.protocol import messages
from hyperpool.protocol.framing import ProtocolViolation
from tests.protocol.test_messages import i16, i32, only_message


def decoded_parse(raw: bytes) -> tuple[bytes, bytes, bytes]:
    msg = only_message(raw)
    assert msg.type == ord("P")
    return messages.decode_parse(msg.payload)


NO_TYPES = i16(0)
INT4_TEXT = i16(2) + i32(23) + i32(25)
UNSPECIFIED = i16(1) + i32(0)


# --- StatementRegistry --------------------------------------------------------------------------


def test_same_key_same_statement() -> None:
    registry = StatementRegistry()
    a = registry.get(b"SELECT $1", i16(1) + i32(23), "public")
    b = registry.get(b"SELECT $1", i16(1) + i32(23), "public")
    assert a is b
    assert len(registry) == 1


def test_new_statement() -> None:
    registry = StatementRegistry()
    stmt = registry.get(b"SELECT $1::int + $2", INT4_TEXT, None)
    assert isinstance(stmt, Statement)
    assert stmt.sql == b"SELECT $1::int + $2"
    assert stmt.types == INT4_TEXT
    assert stmt.name.startswith(PREFIX)
    assert stmt.name == PREFIX + b"1"
    assert not stmt.verified
    assert stmt.parse == messages.parse(stmt.name, stmt.sql, stmt.types)
    assert decoded_parse(stmt.parse) == (stmt.name, b"SELECT $1::int + $2", INT4_TEXT)


@pytest.mark.parametrize(
    ("key_a", "key_b"),
    [
        pytest.param((b"SELECT 1", NO_TYPES, None), (b"SELECT 2", NO_TYPES, None), id="text"),
        pytest.param((b"SELECT $1", NO_TYPES, None), (b"SELECT $1", UNSPECIFIED, None), id="types"),
        pytest.param((b"SELECT $1", i16(1) + i32(23), None), (b"SELECT $1", i16(1) + i32(25), None), id="type-oid"),
        pytest.param((b"SELECT 1", NO_TYPES, "public"), (b"SELECT 1", NO_TYPES, "app, public"), id="search-path"),
        pytest.param((b"SELECT 1", NO_TYPES, None), (b"SELECT 1", NO_TYPES, "public"), id="no-search-path"),
        pytest.param((b"SELECT 1", NO_TYPES, ""), (b"SELECT 1", NO_TYPES, None), id="empty-search-path"),
    ],
)
def test_different_keys_different_statements(key_a: tuple[bytes, bytes, str | None],
                                             key_b: tuple[bytes, bytes, str | None]) -> None:
    registry = StatementRegistry()
    a, b = registry.get(*key_a), registry.get(*key_b)
    assert a is not b
    assert a.name != b.name
    assert a.name.startswith(PREFIX) and b.name.startswith(PREFIX)
    assert len(registry) == 2
    assert registry.get(*key_a) is a and registry.get(*key_b) is b


def test_names_are_unique_and_never_reused() -> None:
    registry = StatementRegistry()
    stmts = [registry.get(f"SELECT {i}".encode(), NO_TYPES, None) for i in range(50)]
    for stmt in stmts[:10]:
        registry.renew(stmt)
    names = [s.name for s in stmts]
    assert len(set(names)) == 50
    assert all(name.startswith(PREFIX) and name[len(PREFIX):].isdigit() for name in names)
    assert stmts[0].name == PREFIX + b"51"  # renewed after the 50 first names were given


def test_registries_are_independent_but_use_the_same_prefix() -> None:
    a, b = StatementRegistry(), StatementRegistry()
    assert a.get(b"SELECT 1", NO_TYPES, None).name == b.get(b"SELECT 1", NO_TYPES, None).name == PREFIX + b"1"


def test_renew_gives_a_new_name_and_parse() -> None:
    registry = StatementRegistry()
    stmt = registry.get(b"SELECT * FROM t WHERE id = $1", i16(1) + i32(23), "public")
    old_name, old_parse = stmt.name, stmt.parse
    stmt.verified = True
    registry.renew(stmt)
    assert stmt.name != old_name
    assert stmt.name.startswith(PREFIX)
    assert stmt.parse != old_parse
    assert decoded_parse(stmt.parse) == (stmt.name, b"SELECT * FROM t WHERE id = $1", i16(1) + i32(23))
    assert decoded_parse(old_parse) == (old_name, b"SELECT * FROM t WHERE id = $1", i16(1) + i32(23))
    # the shared object is renamed for everyone: the registry still hands out the same one
    assert registry.get(b"SELECT * FROM t WHERE id = $1", i16(1) + i32(23), "public") is stmt
    assert len(registry) == 1
    registry.renew(stmt)
    assert len({old_name, stmt.name}) == 2
    assert decoded_parse(stmt.parse)[0] == stmt.name


def test_statement_rename() -> None:
    stmt = Statement(b"_hp_x", b"SELECT 1", NO_TYPES)
    stmt.rename(b"_hp_y")
    assert stmt.name == b"_hp_y"
    assert stmt.parse == b"P" + i32(4 + len(b"_hp_y\x00SELECT 1\x00") + 2) + b"_hp_y\x00SELECT 1\x00" + NO_TYPES


def test_limit_evicts_the_oldest_keys() -> None:
    registry = StatementRegistry(limit=2)
    a = registry.get(b"SELECT 'a'", NO_TYPES, None)
    b = registry.get(b"SELECT 'b'", NO_TYPES, None)
    assert len(registry) == 2
    c = registry.get(b"SELECT 'c'", NO_TYPES, None)
    assert len(registry) == 2
    # b and c are kept
    assert registry.get(b"SELECT 'b'", NO_TYPES, None) is b
    assert registry.get(b"SELECT 'c'", NO_TYPES, None) is c
    # a was forgotten: asking again makes a new statement with a new name
    a2 = registry.get(b"SELECT 'a'", NO_TYPES, None)
    assert a2 is not a
    assert a2.name not in (a.name, b.name, c.name)
    assert len(registry) == 2
    assert registry.get(b"SELECT 'b'", NO_TYPES, None) is not b  # evicted by a2
    # the forgotten object still works for the clients holding it
    assert decoded_parse(a.parse) == (a.name, b"SELECT 'a'", NO_TYPES)
    old = a.name
    registry.renew(a)
    assert a.name != old and a.name.startswith(PREFIX)
    assert decoded_parse(a.parse) == (a.name, b"SELECT 'a'", NO_TYPES)


def test_limit_one() -> None:
    registry = StatementRegistry(limit=1)
    stmts = [registry.get(f"SELECT {i}".encode(), NO_TYPES, None) for i in range(5)]
    assert len(registry) == 1
    assert registry.get(b"SELECT 4", NO_TYPES, None) is stmts[-1]
    assert len({s.name for s in stmts}) == 5


# --- Parse --------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "sql", "types"),
    [
        pytest.param(b"", b"SELECT 1", NO_TYPES, id="unnamed"),
        pytest.param(b"s1", b"SELECT $1::int + $2", INT4_TEXT, id="named-with-types"),
        pytest.param(b"_hp_7", b"SELECT $1", UNSPECIFIED, id="unspecified-type"),
        pytest.param(b"", b"", NO_TYPES, id="empty-query"),
        pytest.param("stmt-é".encode(), "SELECT 'ü'".encode(), NO_TYPES, id="utf8"),
    ],
)
def test_parse_round_trip(name: bytes, sql: bytes, types: bytes) -> None:
    raw = messages.parse(name, sql, types)
    assert raw == b"P" + i32(4 + len(name) + 1 + len(sql) + 1 + len(types)) + name + b"\x00" + sql + b"\x00" + types
    assert decoded_parse(raw) == (name, sql, types)


@pytest.mark.parametrize(
    "payload",
    [
        pytest.param(b"", id="empty"),
        pytest.param(b"s1", id="name-not-terminated"),
        pytest.param(b"s1\x00SELECT 1", id="query-not-terminated"),
        pytest.param(b"s1\x00SELECT 1\x00", id="no-parameter-count"),
        pytest.param(b"s1\x00SELECT 1\x00\x00", id="half-parameter-count"),
        pytest.param(b"\x00SELECT $1\x00" + i16(1), id="count-1-without-oid"),
        pytest.param(b"\x00SELECT $1\x00" + i16(1) + b"\x00\x00\x00", id="truncated-oid"),
        pytest.param(b"\x00SELECT $1\x00" + i16(2) + i32(23), id="count-2-with-one-oid"),
        pytest.param(b"\x00SELECT 1\x00" + i16(0) + b"\x00", id="trailing-byte"),
        pytest.param(b"\x00SELECT 1\x00" + i16(0) + i32(23), id="count-0-with-oid"),
        pytest.param(b"\x00SELECT 1\x00" + i16(-1), id="negative-count"),
    ],
)
def test_decode_parse_rejects(payload: bytes) -> None:
    with pytest.raises(ProtocolViolation):
        messages.decode_parse(payload)


# --- Bind ---------------------------------------------------------------------------------------

BIND_REST = i16(1) + i16(0) + i16(2) + i32(-1) + i32(3) + b"abc" + i16(1) + i16(1)


@pytest.mark.parametrize(
    ("portal", "statement"),
    [
        pytest.param(b"", b"", id="unnamed"),
        pytest.param(b"", b"s1", id="named-statement"),
        pytest.param(b"c1", b"s1", id="both-named"),
    ],
)
def test_decode_bind_names(portal: bytes, statement: bytes) -> None:
    payload = portal + b"\x00" + statement + b"\x00" + BIND_REST
    got_portal, got_statement, rest = messages.decode_bind_names(payload)
    assert (got_portal, got_statement) == (portal, statement)
    assert rest == len(portal) + len(statement) + 2
    assert payload[rest:] == BIND_REST


@pytest.mark.parametrize("payload", [b"", b"portal", b"portal\x00stmt"], ids=["empty", "portal", "statement"])
def test_decode_bind_names_rejects(payload: bytes) -> None:
    with pytest.raises(ProtocolViolation):
        messages.decode_bind_names(payload)


@pytest.mark.parametrize(
    ("portal", "statement", "renamed"),
    [
        pytest.param(b"", b"s1", b"_hp_12", id="to-hyperpool-name"),
        pytest.param(b"c1", b"s1", b"_hp_3", id="named-portal-kept"),
        pytest.param(b"", b"_hp_9", b"~_hp_9", id="unknown-hyperpool-name"),
        pytest.param(b"", b"a-very-long-client-statement-name", b"x", id="shorter"),
    ],
)
def test_bind_renamed(portal: bytes, statement: bytes, renamed: bytes) -> None:
    payload = portal + b"\x00" + statement + b"\x00" + BIND_REST
    _, _, rest = messages.decode_bind_names(payload)
    raw = messages.bind_renamed(payload, portal, renamed, rest)
    assert raw == b"B" + i32(4 + len(portal) + len(renamed) + 2 + len(BIND_REST)) + portal + b"\x00" + renamed + \
        b"\x00" + BIND_REST
    msg = only_message(raw)
    assert msg.type == ord("B")
    got_portal, got_statement, got_rest = messages.decode_bind_names(msg.payload)
    assert (got_portal, got_statement, msg.payload[got_rest:]) == (portal, renamed, BIND_REST)


# --- Describe / Close ---------------------------------------------------------------------------


@pytest.mark.parametrize("encode", [messages.describe, messages.close], ids=["describe", "close"])
@pytest.mark.parametrize(
    ("kind", "name"),
    [
        pytest.param(b"S", b"", id="unnamed-statement"),
        pytest.param(b"S", b"_hp_4", id="statement"),
        pytest.param(b"P", b"", id="unnamed-portal"),
        pytest.param(b"P", b"c1", id="portal"),
    ],
)
def test_describe_close_round_trip(encode: Callable[[bytes, bytes], bytes], kind: bytes, name: bytes) -> None:
    raw = encode(kind, name)
    type_byte = b"D" if encode is messages.describe else b"C"
    assert raw == type_byte + i32(4 + 1 + len(name) + 1) + kind + name + b"\x00"
    msg = only_message(raw)
    assert messages.decode_target(msg.payload) == (kind[0], name)


@pytest.mark.parametrize(
    "payload",
    [
        pytest.param(b"", id="empty"),
        pytest.param(b"S", id="kind-only"),
        pytest.param(b"Sname", id="name-not-terminated"),
        pytest.param(b"Sname\x00x", id="trailing-bytes"),
        pytest.param(b"S\x00\x00", id="two-nuls"),
    ],
)
def test_decode_target_rejects(payload: bytes) -> None:
    with pytest.raises(ProtocolViolation):
        messages.decode_target(payload)


# --- DataRow ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "values",
    [
        pytest.param([], id="no-columns"),
        pytest.param(["a"], id="one"),
        pytest.param(["a", None, ""], id="null-and-empty"),
        pytest.param([None, None], id="all-null"),
        pytest.param(["bäckerei", "x" * 1000], id="utf8-and-long"),
    ],
)
def test_decode_data_row_round_trip(values: list[str | None]) -> None:
    msg = only_message(messages.data_row(values))
    assert msg.type == ord("D")
    assert messages.decode_data_row(msg.payload) == values


def test_decode_data_row_exact_payload() -> None:
    payload = i16(3) + i32(1) + b"s" + i32(-1) + i32(0)
    assert messages.decode_data_row(payload) == ["s", None, ""]


def test_decode_data_row_invalid_utf8_is_replaced() -> None:
    assert messages.decode_data_row(i16(1) + i32(2) + b"\xff\xfe") == ["\ufffd\ufffd"]


@pytest.mark.parametrize(
    "payload",
    [
        pytest.param(b"", id="empty"),
        pytest.param(b"\x00", id="half-count"),
        pytest.param(i16(1), id="missing-column"),
        pytest.param(i16(1) + b"\x00\x00", id="truncated-length"),
        pytest.param(i16(1) + i32(5) + b"ab", id="truncated-value"),
        pytest.param(i16(2) + i32(-1), id="second-column-missing"),
        pytest.param(i16(1) + i32(1) + b"ab", id="trailing-bytes"),
        pytest.param(i16(0) + b"x", id="trailing-after-no-columns"),
    ],
)
def test_decode_data_row_rejects(payload: bytes) -> None:
    with pytest.raises(ProtocolViolation):
        messages.decode_data_row(payload)
