"""What the proxy asks of the query cache, sans I/O: which requests may be answered from it, under which key,
how to run them again for a background refresh, and whether a captured response may be stored.

A cacheable request is one complete request group a client sends while idle, ending in its own Sync:

* a simple Query;
* an unnamed Parse and the messages after it that use only the unnamed statement (psycopg, pgbench -M
  extended: ``Parse Bind Describe Execute Sync``);
* ``Bind [Describe portal] Execute Sync`` of a named statement (asyncpg, pgbench -M prepared).

The key holds the settings that change output or name resolution, the statement text, and for the extended
protocol the parameter types and the other messages' bytes (parameter formats and values, result formats,
Describe, Execute): two requests with the same key get the same bytes from PostgreSQL. A response that holds
anything but results (CloseComplete, an error, a notice) is not stored. The stored
value is exactly those bytes, without the ReadyForQuery, so a hit answers ParseComplete/BindComplete/
RowDescription/DataRows/CommandComplete as the database did, and the ReadyForQuery 'I' that ends it.
"""

from __future__ import annotations

import re
import struct
from collections import OrderedDict
from collections.abc import Mapping

from hyperpool.protocol import messages
from hyperpool.sql.catalog import Catalog, parse_search_path
from hyperpool.sql.classify import Verdict, classify

# Settings that change a result's bytes or what its names mean (the cache key carries them).
OUTPUT_SETTINGS = ("search_path", "timezone", "datestyle", "intervalstyle", "client_encoding",
                   "extra_float_digits", "bytea_output", "standard_conforming_strings",
                   # ... and the others that change what an immutable expression gives or how it prints
                   "transform_null_equals", "array_nulls", "xmloption", "xmlbinary", "timezone_abbreviations",
                   "lc_monetary", "lc_numeric", "lc_time", "backslash_quote")
# Backend messages a storable response may hold: ParseComplete, BindComplete, ParameterDescription,
# NoData, RowDescription, DataRow, CommandComplete, EmptyQueryResponse, and PortalSuspended (an Execute
# with a row limit, as asyncpg's fetchrow sends: outside a transaction block the portal is gone at the
# Sync, so nobody can ask for the rest). A notice, a notification, a ParameterStatus or an error means:
# give it to the client, do not store it.
_STORABLE = frozenset(b"12tnTDCIs")
_HEADER = struct.Struct("!cI")
_INT32 = struct.Struct("!I")
_PARSE_COMPLETE_LEN = len(messages.PARSE_COMPLETE)
_DESCRIBE_PORTAL = b"P\x00"
_ROLLBACK = re.compile(rb"\s*(?:rollback|abort)(?:\s+(?:work|transaction))?\s*;?\s*", re.IGNORECASE)
_COMMIT_PREPARED = re.compile(rb"\s*commit\s+prepared\b", re.IGNORECASE)
_MEMO_SIZE = 4096
_MEMO_TEXT = 8192

Key = tuple[object, ...]


class Request:
    """One cacheable-looking request group: its key, its statement text, and how to run it again."""

    __slots__ = ("_bind", "_rest", "_types", "key", "sql")

    def __init__(self, key: Key, sql: bytes, types: bytes | None = None, bind: bytes | None = None,
                 rest: bytes = b"") -> None:
        self.key = key
        self.sql = sql
        self._types = types  # None: a simple Query
        self._bind = bind  # a named statement's Bind after its two names (the group had no Parse)
        self._rest = rest

    @property
    def replay(self) -> bytes:
        """Messages that reproduce the response on a server connection with the key's settings (the unnamed
        statement and portal stand for the client's)."""
        if self._types is None:
            return b"Q" + _INT32.pack(len(self.sql) + 5) + self.sql + b"\x00"
        parse = messages.parse(b"", self.sql, self._types)
        if self._bind is None:
            return parse + self._rest
        return parse + _message(b"B", b"\x00\x00" + self._bind) + self._rest

    @property
    def strip(self) -> int:
        """Bytes of the replay's response the client's request does not get (the ParseComplete)."""
        return _PARSE_COMPLETE_LEN if self._bind is not None else 0


def settings_key(wanted: Mapping[str, str]) -> tuple[str | None, ...]:
    """The part of the key that comes from the session's settings (lower-case names)."""
    return tuple(map(wanted.get, OUTPUT_SETTINGS))  # (computed once per change of the session's settings)


def simple_key(raw: bytes, settings: tuple[str | None, ...]) -> Key:
    """A simple Query's key: the whole message (type, length, text, NUL), as it arrives."""
    return (b"Q", settings, raw)


def simple_request(raw: bytes, settings: tuple[str | None, ...]) -> Request:
    """A simple Query message (``raw``)."""
    return Request(simple_key(raw, settings), raw[5:-1])


def parsed_request(sql: bytes, types: bytes, rest: bytes, settings: tuple[str | None, ...]) -> Request:
    """An unnamed Parse, then ``rest``: raw messages up to and including one Sync that name no statement
    but the unnamed one (the client relay stops at the others). The response depends on nothing else."""
    return Request((b"P", settings, sql, types, rest), sql, types, None, rest)


def bound_request(bind: bytes, sql: bytes, types: bytes, rest: bytes,
                  settings: tuple[str | None, ...]) -> Request | None:
    """A Bind of a named statement (text ``sql``) to the unnamed portal, then ``rest``: [Describe portal]
    Execute Sync. None for other shapes (``rest`` could name the unnamed statement, unknown here)."""
    parts = _split(rest)
    if parts is None or bytes(kind for kind, _ in parts) not in (b"ES", b"DES") or \
            (len(parts) == 3 and parts[0][1] != _DESCRIBE_PORTAL):
        return None
    portal, _, offset = messages.decode_bind_names(bind)
    if portal:
        return None
    params = bind[offset:]
    return Request((b"B", settings, sql, types, params, rest), sql, types, params, rest)


def _message(kind: bytes, payload: bytes) -> bytes:
    return kind + _INT32.pack(len(payload) + 4) + payload


def _split(data: bytes) -> list[tuple[int, bytes]] | None:
    """Up to three complete frontend messages in ``data`` as (type, payload); None otherwise."""
    parts: list[tuple[int, bytes]] = []
    pos, end = 0, len(data)
    while pos < end:
        if end - pos < 5 or len(parts) >= 3:
            return None
        kind, length = _HEADER.unpack_from(data, pos)
        stop = pos + 1 + length
        if length < 4 or stop > end:
            return None
        parts.append((kind[0], data[pos + 5:stop]))
        pos = stop
    return parts


def storable(response: bytes) -> bool:
    """Whether a captured response (ending in ReadyForQuery 'I') may be replayed to another client: it holds
    only result messages (no notice, notification, ParameterStatus or error)."""
    end = len(response) - 6
    if end < 0 or response[end] != 0x5A or response[-1] != 0x49:  # 'Z' ... 'I'
        return False
    pos = 0
    while pos < end:
        if response[pos] not in _STORABLE or end - pos < 5:
            return False
        pos += 1 + _INT32.unpack_from(response, pos + 1)[0]
    return pos == end


def rolls_back(sql: bytes) -> bool:
    """A plain ROLLBACK / ABORT: the transaction's writes never happened."""
    return _ROLLBACK.fullmatch(sql) is not None


def commits_prepared(sql: bytes) -> bool:
    """COMMIT PREPARED: another transaction's writes (unknown here) become visible."""
    return _COMMIT_PREPARED.match(sql) is not None


class Classifier:
    """Verdicts for one database, by statement bytes and search_path (the catalog's version in the key)."""

    def __init__(self, catalog: Catalog, user: str, default_search_path: str) -> None:
        self.catalog = catalog
        self.user = user
        self.default_search_path = default_search_path
        self._memo: OrderedDict[tuple[bytes, str | None], Verdict] = OrderedDict()
        self._paths: dict[str | None, tuple[str, ...]] = {}

    def verdict(self, sql: bytes, search_path: str | None) -> Verdict:
        key = (sql, search_path)
        memo = self._memo
        verdict = memo.get(key)
        if verdict is not None:
            memo.move_to_end(key)
            return verdict
        path = self._paths.get(search_path)
        if path is None:
            if len(self._paths) > 256:
                self._paths.clear()
            path = self._paths[search_path] = parse_search_path(
                self.default_search_path if search_path is None else search_path, self.user)
        verdict = classify(sql.decode("utf-8", "replace"), path, self.catalog)
        if len(sql) <= _MEMO_TEXT:
            memo[key] = verdict
            if len(memo) > _MEMO_SIZE:
                memo.popitem(last=False)
        return verdict
