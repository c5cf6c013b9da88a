"""What a statement does to the session it runs in, read with PostgreSQL's own grammar.

Transaction pooling moves a client between server connections, so hyperpool must know which
statements leave state behind on a connection. Most of that state it reads back from the server
after the transaction (see ``upstream.SNAPSHOT_SQL``); this module answers the questions that need
the statement itself, before it runs:

* would it create state that pins a client to its server connection (for ``pinning: refuse``)?
* might it change session state without a command tag that says so (``set_config()``, advisory
  locks, ``SELECT ... INTO TEMP``), so the server must be asked afterwards?
* does it deallocate prepared statements (``DEALLOCATE name``, ``DEALLOCATE ALL``, ``DISCARD ALL``),
  which hyperpool must apply to the client's protocol-level statements?

Only statements that a cheap byte pattern (:func:`worth_parsing`) flags are parsed, and the verdict
is memoized per statement text.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

import pgparse

# Statements worth parsing, matched on the lower-cased text (a case-insensitive pattern costs Python's
# re several times as much). Without a match a statement has no effect this module reports that the
# server's command tags would not show anyway (SET, LISTEN, DECLARE, PREPARE, DO, CALL are seen in the
# tags); false positives only cost a memoized parse.
_UNTAGGED = re.compile(rb"dealloc|discard|advisory|temp|set_config")
# With ``pinning: refuse`` the statements that would pin must be caught before they run.
_PINNING = re.compile(rb"dealloc|discard|advisory|temp|set_config|listen|hold|role|authoriz")


# (data, start, stop) -> whether data[start:stop] is worth parsing
Predicate = Callable[[bytes, int, int], bool]


_DIGITS = b"0123456789"
_MEMO_SIZE = 4096
_MEMO_TEXT = 2048  # longer texts are checked every time rather than kept
# Longer statements are not parsed: they are assumed to change session state (the read-back after
# the transaction then finds out) and cannot be refused (a bulk INSERT must not stall the event loop).
MAX_PARSED = 65536


def _memoized(pattern: re.Pattern[bytes]) -> Predicate:
    """The pattern's verdict on a statement text, memoized per text without its digits.

    Texts that differ only in numbers (``WHERE id = 42``) share a verdict, so the common case costs
    a translate and a dict lookup instead of a regex scan. Dropping digits can only join letters, so a
    keyword found before is still found after: the memo may say "look" more often, never less.
    """
    memo: dict[bytes, bool] = {}

    def look(data: bytes, start: int, stop: int) -> bool:
        if stop - start > _MEMO_TEXT:
            return pattern.search(data[start:stop].lower()) is not None
        key = data[start:stop].translate(None, _DIGITS)
        verdict = memo.get(key)
        if verdict is None:
            verdict = pattern.search(key.lower()) is not None
            if len(memo) >= _MEMO_SIZE:
                memo.clear()
            memo[key] = verdict
        return verdict

    return look


# Whether the statement text data[start:stop] may have effects (clients allowed to pin) ...
worth_parsing = _memoized(_UNTAGGED)
# ... or may have effects or pin (``pinning: refuse``).
worth_parsing_refusing = _memoized(_PINNING)


PIN_REASONS = ("listen", "advisory_lock", "temp_table", "hold_cursor", "role")

_LOCK_FUNCTIONS = frozenset({"pg_advisory_lock", "pg_advisory_lock_shared", "pg_try_advisory_lock",
                             "pg_try_advisory_lock_shared"})
_STATE_FUNCTIONS = frozenset({"set_config", "pg_advisory_unlock", "pg_advisory_unlock_shared",
                              "pg_advisory_unlock_all"})
_CURSOR_OPT_HOLD = 0x0020


@dataclass(frozen=True, slots=True)
class Effects:
    """What running a query string may do to its session."""

    pins: tuple[str, ...] = ()  # reasons (from PIN_REASONS) it would pin the client
    check_after: bool = False  # may change session state: read the session's state back afterwards
    deallocates: tuple[str, ...] = ()  # DEALLOCATE <name> statements, by name
    deallocates_all: bool = False  # DEALLOCATE ALL or DISCARD ALL
    statements: int = 1  # statements in the string (0 when it does not parse)


NO_EFFECTS = Effects()


def effects(sql: bytes) -> Effects:
    """The effects of one query string (as a client sent it, without the trailing NUL)."""
    if len(sql) > MAX_PARSED:
        return UNKNOWN_EFFECTS
    return _effects(sql) if len(sql) <= _MEMO_TEXT else _effects.__wrapped__(sql)


UNKNOWN_EFFECTS = Effects(check_after=True, statements=0)


@lru_cache(maxsize=4096)
def _effects(sql: bytes) -> Effects:
    try:
        tree = pgparse.parse(sql.decode("utf-8", "replace"))
    except pgparse.PGQueryError:
        return Effects(statements=0)
    except RecursionError:  # deeper than libpg_query's JSON goes; PostgreSQL may accept it
        return UNKNOWN_EFFECTS
    pins: list[str] = []
    check_after = False
    deallocates: list[str] = []
    deallocates_all = False
    for raw in tree:
        stmt = raw.get("stmt", {})
        for kind, node in _walk(stmt):
            reason, check = _judge(kind, node)
            if reason and reason not in pins:
                pins.append(reason)
            check_after = check_after or check or bool(reason)
            if kind == "DeallocateStmt":
                if node.get("isall") or "name" not in node:
                    deallocates_all = True
                else:
                    deallocates.append(node["name"])
            elif kind == "DiscardStmt" and node.get("target") == "DISCARD_ALL":
                deallocates_all = True
    return Effects(tuple(pins), check_after or deallocates_all or bool(deallocates), tuple(deallocates),
                   deallocates_all, len(tree))


def _judge(kind: str, node: dict[str, Any]) -> tuple[str | None, bool]:
    """(pin reason or None, whether the session's state must be read back afterwards)."""
    if kind == "ListenStmt":
        return "listen", True
    if kind == "UnlistenStmt":
        return None, True
    if kind == "VariableSetStmt":
        if node.get("name") in ("role", "session_authorization"):
            args = node.get("args", [])
            to_none = len(args) == 1 and args[0].get("A_Const", {}).get("sval", {}).get("sval") == "none"
            setting = node.get("kind") not in ("VAR_RESET", "VAR_RESET_ALL", "VAR_SET_DEFAULT") and not to_none
            return ("role" if setting and not node.get("is_local") else None), True
        return None, True
    if kind == "DeclareCursorStmt":
        return ("hold_cursor" if node.get("options", 0) & _CURSOR_OPT_HOLD else None), True
    if kind in ("CreateStmt", "CreateTableAsStmt", "SelectStmt", "ViewStmt", "CreateSeqStmt"):
        rel = _created_relation(kind, node)
        if rel is not None and (rel.get("relpersistence") == "t" or rel.get("schemaname") == "pg_temp"):
            return "temp_table", True
        return None, False
    if kind == "FuncCall":
        name = node.get("funcname", [{}])[-1].get("String", {}).get("sval", "")
        if name in _LOCK_FUNCTIONS:
            return "advisory_lock", True
        return None, name in _STATE_FUNCTIONS
    if kind in ("DoStmt", "CallStmt", "PrepareStmt", "DiscardStmt", "DeallocateStmt"):
        return None, True
    return None, False


def _created_relation(kind: str, node: dict[str, Any]) -> dict[str, Any] | None:
    if kind == "CreateStmt":
        return node.get("relation")
    if kind == "CreateTableAsStmt":
        return node.get("into", {}).get("rel")
    if kind == "SelectStmt":
        return node.get("intoClause", {}).get("rel")
    if kind == "ViewStmt":
        return node.get("view")
    return node.get("sequence")


def _walk(node: Any) -> Iterator[tuple[str, dict[str, Any]]]:
    """Every (node type, node) in a parse tree."""
    stack = [node]
    while stack:
        item = stack.pop()
        if isinstance(item, dict):
            for key, value in item.items():
                if key[:1].isupper() and isinstance(value, dict):
                    yield key, value
                stack.append(value)
        elif isinstance(item, list):
            stack.extend(item)


def prepare_statement(sql: str, name: str) -> str | None:
    """The ``PREPARE name ...`` statement of a query string (which may hold several statements)."""
    try:
        tree = pgparse.parse(sql)
    except (pgparse.PGQueryError, RecursionError):
        return None
    encoded = sql.encode()
    for raw in tree:
        prepare = raw.get("stmt", {}).get("PrepareStmt")
        if prepare is not None and prepare.get("name") == name:
            start = raw.get("stmt_location", 0)
            length = raw.get("stmt_len", len(encoded) - start) or len(encoded) - start
            return encoded[start : start + length].decode()
    return None


_REASON_TEXT = {
    "listen": "LISTEN",
    "advisory_lock": "session-level advisory locks",
    "temp_table": "temporary tables",
    "hold_cursor": "WITH HOLD cursors",
    "role": "SET ROLE and SET SESSION AUTHORIZATION",
}


def refusal_sql(reasons: tuple[str, ...], database: str) -> str:
    """A statement that fails, in place of one that ``pinning: refuse`` does not let through.

    PostgreSQL raises the error itself, so it arrives in order, ends the statement and aborts an
    explicit transaction exactly as a failing statement would.
    """
    what = ", ".join(_REASON_TEXT.get(r, r) for r in reasons)
    message = (f"{what} cannot be used through hyperpool's transaction pooling on database \"{database}\" "
               "(pinning: refuse)")
    hint = "Use a session-pooled database entry for this, or set pinning: allow."
    body = f"BEGIN RAISE EXCEPTION USING ERRCODE = '0A000', MESSAGE = {_literal(message)}, HINT = {_literal(hint)}; END"
    tag = "$hyperpool$"
    while tag in body:  # a dollar-quote tag that cannot end the body early
        tag = tag[:-1] + "_$"
    return f"DO {tag}{body}{tag}"


def _literal(text: str) -> str:
    return "'" + text.replace("'", "''") + "'"
