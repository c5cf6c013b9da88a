"""What the proxy asks of the query cache, sans I/O: which requests may be answered from it, under which key,
how to run them again for a background refresh, and whether a captured response may be stored.

A cacheable request is one complete request group a client sends while idle, ending in its own Sync:

* a simple Query;
* the extended protocol's ``[Parse unnamed] Bind [Describe portal] Execute(all rows) Sync`` (what psycopg,
  pgbench -M extended and, with a named statement and no Parse, asyncpg and pgbench -M prepared send).

The key holds the settings that change output or name resolution, the statement text, and for the extended
protocol the parameter types, the Bind message after its two names (parameter formats, values, result formats),
the Describe, and the Execute: two requests with the same key get the same bytes from PostgreSQL. The stored
value is exactly those bytes, without the ReadyForQuery, so a hit answers ParseComplete/BindComplete/
RowDescription/DataRows/CommandComplete as the database did, and the ReadyForQuery 'I' that ends it.
"""

from __future__ import annotations

import re
import struct
from collections import OrderedDict
from collections.abc import Mapping
from dataclasses import dataclass

from hyperpool.protocol import messages
from hyperpool.sql.catalog import Catalog, parse_search_path
from hyperpool.sql.classify import Verdict, classify

# Settings that change a result's bytes or what its names mean (the cache key carries them).
OUTPUT_SETTINGS = ("search_path", "timezone", "datestyle", "intervalstyle", "client_encoding",
                   "extra_float_digits", "bytea_output", "standard_conforming_strings")
# Backend messages a storable response may hold: ParseComplete, BindComplete, ParameterDescription,
# NoData, RowDescription, DataRow, CommandComplete, EmptyQueryResponse. A notice, a notification, a
# ParameterStatus or an error means: give it to the client, do not store it.
_STORABLE = frozenset(b"12tnTDCI")
_HEADER = struct.Struct("!cI")
_INT32 = struct.Struct("!I")
_PARSE_COMPLETE_LEN = len(messages.PARSE_COMPLETE)
_EXECUTE_ALL = b"\x00\x00\x00\x00\x00"  # unnamed portal, no row limit
_DESCRIBE_PORTAL = b"P\x00"
_ROLLBACK = re.compile(rb"\s*(?:rollback|abort)(?:\s+(?:work|transaction))?\s*;?\s*", re.IGNORECASE)
_COMMIT_PREPARED = re.compile(rb"\s*commit\s+prepared\b", re.IGNORECASE)
_MEMO_SIZE = 4096
_MEMO_TEXT = 8192

Key = tuple[object, ...]


@dataclass(frozen=True, slots=True)
class Request:
    """One cacheable-looking request group: what to look up, and how to run it again."""

    key: Key
    sql: bytes  # the statement text (to classify)
    replay: bytes  # messages that reproduce the response on a server connection with the key's settings
    strip: int  # bytes of the replay's response the client's request does not get (a ParseComplete)


def settings_key(wanted: Mapping[str, str]) -> tuple[str | None, ...]:
    """The part of the key that comes from the session's settings (lower-case names)."""
    return tuple(wanted.get(name) for name in OUTPUT_SETTINGS)


def simple_request(raw: bytes, settings: tuple[str | None, ...]) -> Request:
    """A simple Query message (``raw``: type, length, text, NUL)."""
    sql = raw[5:-1]
    return Request((b"Q", settings, sql), sql, raw, 0)


def extended_request(first: bytes | None, parse: tuple[bytes, bytes] | None, rest: bytes,
                     settings: tuple[str | None, ...], named: tuple[bytes, bytes] | None = None) -> Request | None:
    """``[Parse] Bind [Describe] Execute Sync``, or None when the group has another shape.

    ``parse`` is an unnamed Parse's (text, parameter types); ``first`` is a Bind the client relay stopped
    at (one naming a statement), whose statement is ``named`` (text, types); ``rest`` is the run of raw
    messages after them, up to and including the Sync.
    """
    parts = _split(rest)
    if parts is None:
        return None
    if first is not None:
        parts.insert(0, (ord("B"), first))
    kinds = bytes(kind for kind, _ in parts)
    if kinds not in (b"BES", b"BDES"):
        return None
    bind = parts[0][1]
    portal, statement, offset = messages.decode_bind_names(bind)
    if portal or parts[-2][1] != _EXECUTE_ALL or (len(parts) == 4 and parts[1][1] != _DESCRIBE_PORTAL):
        return None
    if parse is not None:
        if statement:
            return None  # Parse unnamed, then Bind of another statement: not a shape drivers send
        sql, types = parse
        strip = 0
    elif named is not None and statement:
        sql, types = named
        strip = _PARSE_COMPLETE_LEN
    else:
        return None
    params = bind[offset:]
    key: Key = (b"P" if parse is not None else b"B", settings, sql, types, kinds, params)
    replay = b"".join((messages.parse(b"", sql, types), _message(b"B", b"\x00\x00" + params),
                       messages.describe(b"P", b"") if len(parts) == 4 else b"",
                       _message(b"E", _EXECUTE_ALL), messages.SYNC))
    return Request(key, sql, replay, strip)


def _message(kind: bytes, payload: bytes) -> bytes:
    return kind + _INT32.pack(len(payload) + 4) + payload


def _split(data: bytes) -> list[tuple[int, bytes]] | None:
    """Complete frontend messages in ``data`` as (type, payload); None if it ends mid-message."""
    parts: list[tuple[int, bytes]] = []
    pos, end = 0, len(data)
    while pos < end:
        if end - pos < 5:
            return None
        kind, length = _HEADER.unpack_from(data, pos)
        stop = pos + 1 + length
        if length < 4 or stop > end or len(parts) >= 4:
            return None
        parts.append((kind[0], bytes(data[pos + 5:stop])))
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
