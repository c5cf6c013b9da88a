"""Protocol-level named prepared statements, shared by every client and server connection.

In transaction pooling a client's next transaction may run on a server connection that never saw
its Parse. hyperpool therefore gives each distinct statement (query text, declared parameter types,
search_path) one hyperpool-wide name, rewrites the client's own statement names to it, and prepares
it lazily on each server connection that lacks it. A :class:`Statement` object is shared by every
client that prepared the same text, so when PostgreSQL reports that a statement's result shape
changed (DDL), renaming it once makes every server connection prepare it afresh.
"""

from __future__ import annotations

import itertools
from collections import OrderedDict

from hyperpool.protocol import messages

PREFIX = b"_hp_"


class Statement:
    """One distinct statement and its current hyperpool-wide name."""

    __slots__ = ("name", "parse", "sql", "stateful", "types", "verified")

    def __init__(self, name: bytes, sql: bytes, types: bytes) -> None:
        self.sql = sql
        self.types = types
        self.name = name
        self.verified = False  # a server connection has accepted its Parse
        self.stateful = False  # running it may change session state (see sql.effects)
        self.parse = messages.parse(name, sql, types)  # the Parse message that prepares it

    def rename(self, name: bytes) -> None:
        self.name = name
        self.parse = messages.parse(name, self.sql, self.types)


class StatementRegistry:
    """Statement key -> shared :class:`Statement`; bounded (the oldest keys are forgotten)."""

    def __init__(self, limit: int = 10_000) -> None:
        self._limit = limit
        self._by_key: OrderedDict[tuple[bytes, bytes, str | None], Statement] = OrderedDict()
        self._ids = itertools.count(1)

    def __len__(self) -> int:
        return len(self._by_key)

    def get(self, sql: bytes, types: bytes, search_path: str | None) -> Statement:
        key = (sql, types, search_path)
        stmt = self._by_key.get(key)
        if stmt is None:
            stmt = self._by_key[key] = Statement(self._new_name(), sql, types)
            if len(self._by_key) > self._limit:
                self._by_key.popitem(last=False)  # clients that hold it keep using it
        return stmt

    def renew(self, stmt: Statement) -> None:
        """Give ``stmt`` a new name: every server connection prepares it again on next use."""
        stmt.rename(self._new_name())

    def _new_name(self) -> bytes:
        return PREFIX + str(next(self._ids)).encode()
