"""Whether a statement's result may be served from the query cache, read with PostgreSQL's own grammar.

A cached result must be one no reader could tell from the database's answer, so a statement is
cacheable only when it is one SELECT / VALUES / TABLE whose result depends on nothing but rows of
tables the cache watches and the session settings in the cache key:

* no row locks, SELECT INTO, data-modifying CTE, or TABLESAMPLE without REPEATABLE;
* every function it calls is IMMUTABLE, for every overload its name and argument count may mean (types
  are unknown before analysis); no SQL value functions (CURRENT_TIMESTAMP, current_user, ...);
* operators: any volatile implementation of the name refuses; stable ones only in pg_catalog, where
  they depend on TimeZone/DateStyle-style settings (``timestamptz + interval``, ``text || int``) that
  the cache key carries; a stable user operator may read any table. Casts and implicit operators
  (ORDER BY, GROUP BY) are not visible in the tree, except in views' stored definitions;
* every relation resolves (search_path) to a permanent table, partitioned table, materialized view, or a
  view whose definition and base tables pass the same tests: no system catalog, temporary, unlogged or
  foreign table, sequence, or table with row-level security;
* no string literal that date/time input reads as the current time ('now', 'today', ...).

A verdict also names the tables a statement reads (views resolved to base tables, a partition with its
ancestors, a parent with its partitions) and writes (with partitions and ON DELETE/UPDATE actions), or
``writes_all`` when its targets cannot be known (DDL, DO, CALL, EXECUTE, user volatile functions,
triggers, rules), for invalidation.

Verdicts are memoized per (text, search_path, catalog version) and per statement shape
(``pgparse.normalize``), so texts that differ only in literals are parsed once. The only literals a
verdict depends on are those time words: a text with one in a literal (or with escapes that could
spell one) is keyed by its own text instead of its shape.
"""

from __future__ import annotations

import re
from collections import OrderedDict
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, replace
from typing import Any

import pgparse

from hyperpool.sql.catalog import Catalog, Function, Operator, Relation

# Reasons, most important first: a statement with several problems reports the first one.
REASONS: tuple[str, ...] = (
    "parse-error", "too-long", "too-complex", "empty", "multiple-statements",
    "write", "ddl", "not-select",
    "select-into", "data-modifying-cte", "locking", "tablesample",
    "sql-value-function", "unknown-function", "volatile", "stable-function", "unknown-operator", "stable-operator",
    "system-catalog", "temp-or-unlogged", "foreign-table", "sequence", "row-security", "unknown-relation",
    "time-literal",
    "nocache-hint",
)
CACHEABLE = "cacheable"
_RANK = {reason: rank for rank, reason in enumerate(REASONS)}

MAX_PARSED = 65536  # longer texts are not parsed (a 700 KB INSERT takes pgparse 0.6 s): not cacheable
_MEMO_SIZE = 4096
_MEMO_TEXT = 8192  # longer texts (or shapes) are classified every time rather than kept


@dataclass(frozen=True, slots=True)
class Verdict:
    """What the cache may do with a statement, and what it must invalidate after it commits."""

    cacheable: bool
    reason: str  # CACHEABLE, or the first of REASONS that applies
    reads: frozenset[str] = frozenset()  # schema.table the result depends on
    writes: frozenset[str] = frozenset()  # schema.table it may change
    writes_all: bool = False  # it may change tables it does not name: invalidate the whole database
    ddl: bool = False  # it changes the catalog (DDL, SELECT INTO): classification must read it again
    max_age: float | None = None  # from a /* hyperpool: max_age=N */ comment


def classify(sql: str, search_path: tuple[str, ...], catalog: Catalog) -> Verdict:
    """The verdict for one query string (a simple Query, or a Parse's text) in a session.

    ``search_path`` is the session's, as schema names (see :func:`parse_search_path`). Transaction
    state is not looked at: inside an explicit transaction block the caller must not use the cache.
    """
    search_path = tuple(search_path)
    key = (sql, search_path, catalog.version)
    return _remember(_BY_TEXT, key, lambda: _apply_hints(sql, _shape_verdict(sql, search_path, catalog)))


def clear_memo() -> None:
    """Forget every memoized verdict (tests; a reload needs nothing: the new catalog has a new version)."""
    _BY_TEXT.clear()
    _BY_SHAPE.clear()


_Key = tuple[str, tuple[str, ...], int]  # (text or shape, search_path, catalog version)
_BY_TEXT: OrderedDict[_Key, Verdict] = OrderedDict()
_BY_SHAPE: OrderedDict[_Key, Verdict] = OrderedDict()


def _remember(memo: OrderedDict[_Key, Verdict], key: _Key, judge: Callable[[], Verdict]) -> Verdict:
    """``memo[key]``, judged on a miss; a bounded LRU that does not keep long texts."""
    if len(key[0]) > _MEMO_TEXT:
        return judge()
    verdict = memo.get(key)
    if verdict is not None:
        memo.move_to_end(key)
        return verdict
    verdict = memo[key] = judge()
    if len(memo) > _MEMO_SIZE:
        memo.popitem(last=False)
    return verdict


def _shape_verdict(sql: str, search_path: tuple[str, ...], catalog: Catalog) -> Verdict:
    if len(sql) > MAX_PARSED:
        return Verdict(False, "too-long", writes_all=True)
    key = (shape_key(sql), search_path, catalog.version)
    return _remember(_BY_SHAPE, key, lambda: _judge(sql, search_path, catalog))


# Words date/time input reads as the current time, where no letter touches them ('10:00today' is one).
_TIME_WORD = re.compile(r"(?<![a-z])(?:now|today|tomorrow|yesterday)(?![a-z])", re.IGNORECASE)
_ESCAPES = re.compile(r"\\|[uU]&['\"]")  # E'\x6eow' and U&'\006eow' spell a word the text does not show


def time_sensitive(text: str) -> bool:
    """Whether a literal (or a text-format parameter value) may be read as the current date or time."""
    return _TIME_WORD.search(text) is not None


def shape_key(sql: str) -> str:
    """The memo key of a statement: its normalized text, unless a literal's value may change the verdict."""
    if _ESCAPES.search(sql):
        return sql
    try:
        normalized: str = pgparse.normalize(sql)
    except (pgparse.PGQueryError, RecursionError):
        return sql
    # Normalizing only replaces literals, so a time word lost on the way was inside one.
    if len(_TIME_WORD.findall(sql)) != len(_TIME_WORD.findall(normalized)):
        return sql
    return normalized


# -- hints --------------------------------------------------------------------------------------------

_HINT = re.compile(r"\s*hyperpool\s*:(.*)", re.IGNORECASE | re.DOTALL)
_NOCACHE = re.compile(r"(?<![\w-])nocache(?![\w-])", re.IGNORECASE)
_MAX_AGE = re.compile(r"(?<![\w-])max_age\s*=\s*(\d+(?:\.\d*)?|\.\d+)", re.IGNORECASE)
_COMMENT_OPENER = re.compile(r"\s*(--|/\*)")
_COMMENT_MARK = re.compile(r"/\*|\*/")


def hints(sql: str) -> tuple[bool, float | None]:
    """(nocache, max_age) from ``/* hyperpool: ... */`` (or ``-- hyperpool: ...``) comments before the statement.

    Comments are not in the parse tree, so they are read from the text; only leading ones count.
    ``max_age=0`` means nocache.
    """
    nocache, max_age = False, None
    for body in _leading_comments(sql):
        match = _HINT.match(body)
        if match is None:
            continue
        directives = match.group(1)
        nocache = nocache or _NOCACHE.search(directives) is not None
        age = _MAX_AGE.search(directives)
        if age is not None:
            max_age = float(age.group(1))
    if max_age is not None and max_age <= 0:
        return True, None
    return nocache, max_age


def _leading_comments(sql: str) -> Iterator[str]:
    """The bodies of the comments before the first token (block comments nest, as in PostgreSQL)."""
    pos = 0
    while (opener := _COMMENT_OPENER.match(sql, pos)) is not None:
        start = opener.end()
        if opener.group(1) == "--":
            newline = sql.find("\n", start)
            body_end = stop = len(sql) if newline < 0 else newline
        else:
            depth = 1
            for mark in _COMMENT_MARK.finditer(sql, start):
                depth += 1 if mark.group() == "/*" else -1
                if depth == 0:
                    break
            else:
                return  # unterminated: PostgreSQL rejects the text
            body_end, stop = mark.start(), mark.end()
        yield sql[start:body_end]
        pos = stop


def _apply_hints(sql: str, verdict: Verdict) -> Verdict:
    if "hyperpool" not in sql[:4096].lower():
        return verdict
    nocache, max_age = hints(sql)
    if nocache and verdict.cacheable:
        return replace(verdict, cacheable=False, reason="nocache-hint", max_age=max_age)
    return replace(verdict, max_age=max_age) if max_age is not None else verdict


# -- the judgement ------------------------------------------------------------------------------------

def _judge(sql: str, search_path: tuple[str, ...], catalog: Catalog) -> Verdict:
    """Parse and judge one query string (not memoized)."""
    try:
        tree = pgparse.parse(sql)
        parts = [_statement(raw.get("stmt", {}), search_path, catalog) for raw in tree]
    except pgparse.PGQueryError:
        # Nothing runs if PostgreSQL rejects it too; a newer server may accept what this grammar does not.
        return Verdict(False, "parse-error", writes_all=True)
    except RecursionError:  # deeper than libpg_query's JSON (or our walk) goes; PostgreSQL may accept it
        return Verdict(False, "too-complex", writes_all=True)
    if not parts:
        return Verdict(False, "empty")
    reasons = set().union(*(part.reasons for part in parts))
    if len(parts) > 1:
        reasons.add("multiple-statements")
    reason = min(reasons, key=_RANK.__getitem__) if reasons else CACHEABLE
    return Verdict(not reasons, reason,
                   frozenset().union(*(part.reads for part in parts)),
                   frozenset().union(*(part.writes for part in parts)),
                   any(part.writes_all for part in parts),
                   any(part.ddl for part in parts))


class _Part:
    """The findings about one statement."""

    __slots__ = ("ddl", "reads", "reasons", "writes", "writes_all")

    def __init__(self) -> None:
        self.reasons: set[str] = set()
        self.reads: set[str] = set()
        self.writes: set[str] = set()
        self.writes_all = False
        self.ddl = False

    def merge(self, other: _Part) -> None:
        self.reads |= other.reads
        self.writes |= other.writes
        self.writes_all = self.writes_all or other.writes_all
        self.ddl = self.ddl or other.ddl


_DML = frozenset({"InsertStmt", "UpdateStmt", "DeleteStmt", "MergeStmt"})
# Statements that change no table (their inner query, if any, is judged on its own).
_QUIET = frozenset({
    "TransactionStmt", "VariableSetStmt", "VariableShowStmt", "ListenStmt", "UnlistenStmt", "NotifyStmt",
    "LockStmt", "CheckPointStmt", "DiscardStmt", "DeallocateStmt", "PrepareStmt", "FetchStmt", "ClosePortalStmt",
    "VacuumStmt", "ClusterStmt", "ReindexStmt", "LoadStmt", "ConstraintsSetStmt", "ExplainStmt",
    "DeclareCursorStmt", "CopyStmt",
})
_OPAQUE = frozenset({"DoStmt", "CallStmt", "ExecuteStmt"})  # run code whose targets cannot be known here
_CREATES = {"CreateStmt": "relation", "CreateTableAsStmt": "into", "ViewStmt": "view", "CreateSeqStmt": "sequence"}
_DROPPED_TABLES = frozenset({"OBJECT_TABLE", "OBJECT_VIEW", "OBJECT_MATVIEW", "OBJECT_FOREIGN_TABLE"})


def _statement(stmt: dict[str, Any], path: tuple[str, ...], catalog: Catalog) -> _Part:
    kind: str = next(iter(stmt), "")  # a statement node has one key: {"SelectStmt": {...}}
    node: dict[str, Any] = stmt.get(kind, {})
    if kind == "SelectStmt":
        part = _examine(stmt, path, catalog)
        if "intoClause" in node:  # SELECT INTO creates a table
            part.writes_all = part.ddl = not _creates_temp("CreateTableAsStmt", {"into": node["intoClause"]})
        return part
    if kind in _DML:
        part = _examine(stmt, path, catalog)
        part.reasons.add("write")
        return part
    if kind in _QUIET:
        return _quiet(kind, node, path, catalog)
    part = _Part()
    if kind in _OPAQUE:
        part.reasons.add("write")
        part.writes_all = True
    elif kind in ("TruncateStmt", "RefreshMatViewStmt"):
        part.reasons.add("write")
        targets = [_range_var(item.get("RangeVar", {})) for item in node.get("relations", [])]
        _add_writes(part, targets or [_range_var(node.get("relation", {}))], path, catalog)
        part.writes_all = part.writes_all or node.get("behavior") == "DROP_CASCADE"
    else:
        part.reasons.add("ddl")
        _add_writes(part, _ddl_targets(kind, node), path, catalog)
        if kind == "CreateTableAsStmt":  # its query runs
            part.merge(_statement(node.get("query", {}), path, catalog))
        part.writes_all = part.writes_all or not _creates_temp(kind, node)
        part.ddl = not _creates_temp(kind, node)
    return part


def _quiet(kind: str, node: dict[str, Any], path: tuple[str, ...], catalog: Catalog) -> _Part:
    part = _Part()
    part.reasons.add("not-select")
    if kind == "CopyStmt" and node.get("is_from"):
        part.reasons.add("write")
        _add_writes(part, [_range_var(node.get("relation", {}))], path, catalog)
    inner = node.get("query")
    runs = kind in ("DeclareCursorStmt", "CopyStmt") or (kind == "ExplainStmt" and _analyzes(node))
    if isinstance(inner, dict) and runs:
        part.merge(_statement(inner, path, catalog))
    return part


def _analyzes(explain: dict[str, Any]) -> bool:
    for option in explain.get("options", []):
        elem = option.get("DefElem", {})
        if elem.get("defname") == "analyze":
            arg = elem.get("arg", {})
            value = arg.get("String", {}).get("sval", arg.get("Boolean", {}).get("boolval", True))
            return value not in ("false", "off", "0", False)
    return False


def _creates_temp(kind: str, node: dict[str, Any]) -> bool:
    """CREATE TEMP TABLE/VIEW/SEQUENCE and CREATE TEMP TABLE AS change no table another session sees."""
    field = _CREATES.get(kind)
    rel = node.get(field, {}) if field else {}
    if kind == "CreateTableAsStmt":
        rel = rel.get("rel", {})
    return rel.get("relpersistence") == "t" or rel.get("schemaname") == "pg_temp"


def _ddl_targets(kind: str, node: dict[str, Any]) -> list[tuple[str | None, str]]:
    """The existing relations a DDL statement names (best effort: the whole database is invalidated anyway)."""
    if kind == "DropStmt":
        if node.get("removeType") not in _DROPPED_TABLES:
            return []
        names = [[s.get("String", {}).get("sval", "") for s in obj.get("List", {}).get("items", [])]
                 for obj in node.get("objects", [])]
        return [(n[-2] if len(n) > 1 else None, n[-1]) for n in names if n]
    if kind in _CREATES:
        return []
    found: list[tuple[str | None, str]] = []
    stack: list[Any] = [node]
    while stack:
        item = stack.pop()
        if isinstance(item, dict):
            if isinstance(item.get("relname"), str):
                found.append(_range_var(item))
            stack.extend(item.values())
        elif isinstance(item, list):
            stack.extend(item)
    return found


# -- walking a statement ---------------------------------------------------------------------------------

class _Scan:
    """What one walk over a statement's tree found, before anything is looked up in the catalog."""

    __slots__ = ("attributes", "calls", "modifies", "operators", "problems", "reads", "strings", "targets")

    def __init__(self) -> None:
        self.reads: list[tuple[str | None, str]] = []  # relations read (CTE references left out)
        self.targets: list[tuple[str | None, str]] = []  # INSERT/UPDATE/DELETE/MERGE targets
        self.calls: list[tuple[str | None, str, int]] = []  # (schema, name, number of arguments)
        self.attributes: list[str] = []  # x.name: a column, or name(x) in attribute notation
        self.operators: list[str] = []
        self.strings: list[str] = []  # string literals
        self.problems: set[str] = set()
        self.modifies = False


Scope = frozenset[str]  # CTE names visible at a point of the tree
_Handler = Callable[[dict[str, Any], Scope, _Scan], None]


def _visit(node: Any, scope: Scope, scan: _Scan) -> None:
    """Walk a parse tree: nodes are {"Type": {fields}}, other dicts are structs whose fields are walked."""
    if isinstance(node, list):
        for item in node:
            _visit(item, scope, scan)
    elif isinstance(node, dict):
        for key, value in node.items():
            handler = _HANDLERS.get(key)
            if handler is not None:
                handler(value, scope, scan)
            elif isinstance(value, (dict, list)):
                _visit(value, scope, scan)


def _fields(node: dict[str, Any], scope: Scope, scan: _Scan, skip: tuple[str, ...] = ()) -> None:
    for key, value in node.items():
        if key not in skip and isinstance(value, (dict, list)):
            _visit(value, scope, scan)


def _with(clause: dict[str, Any] | None, scope: Scope, scan: _Scan) -> Scope:
    """Walk a WITH clause's queries; return the scope of the statement it belongs to.

    A CTE sees the ones before it (all of them, itself included, in WITH RECURSIVE). A name that is
    not visible is a table, and must be watched.
    """
    if not clause:
        return scope
    ctes = [item.get("CommonTableExpr", {}) for item in clause.get("ctes", [])]
    names = [cte.get("ctename", "") for cte in ctes]
    for index, cte in enumerate(ctes):
        visible = scope.union(names if clause.get("recursive") else names[:index])
        _visit(cte.get("ctequery"), visible, scan)
    return scope.union(names)


def _select(node: dict[str, Any], scope: Scope, scan: _Scan) -> None:
    inner = _with(node.get("withClause"), scope, scan)
    if "intoClause" in node:
        scan.problems.add("select-into")
    if node.get("lockingClause"):
        scan.problems.add("locking")
    _fields(node, inner, scan, skip=("withClause", "intoClause", "lockingClause"))


def _modify(node: dict[str, Any], scope: Scope, scan: _Scan) -> None:
    scan.modifies = True
    inner = _with(node.get("withClause"), scope, scan)
    if "relation" in node:
        scan.targets.append(_range_var(node["relation"]))
    _fields(node, inner, scan, skip=("withClause", "relation"))


def _range_var(node: dict[str, Any]) -> tuple[str | None, str]:
    return node.get("schemaname"), node.get("relname", "")


def _relation(node: dict[str, Any], scope: Scope, scan: _Scan) -> None:
    schema, name = _range_var(node)
    if schema is not None or name not in scope:
        scan.reads.append((schema, name))


def _names(items: list[dict[str, Any]]) -> list[str]:
    return [item.get("String", {}).get("sval", "") for item in items]


def _call(node: dict[str, Any], scope: Scope, scan: _Scan) -> None:
    names = _names(node.get("funcname", []))
    args = len(node.get("args", []))
    if node.get("agg_within_group"):  # percentile_cont(0.5) WITHIN GROUP (ORDER BY x) takes two
        args += len(node.get("agg_order", []))
    scan.calls.append((names[-2] if len(names) > 1 else None, names[-1], args))
    _fields(node, scope, scan, skip=("funcname",))


_BETWEEN = {"BETWEEN": (">=", "<="), "BETWEEN SYMMETRIC": (">=", "<="), "NOT BETWEEN": ("<", ">"),
            "NOT BETWEEN SYMMETRIC": ("<", ">")}


def _expression(node: dict[str, Any], scope: Scope, scan: _Scan) -> None:
    name = _names(node.get("name", []))[-1:]
    scan.operators.extend(_BETWEEN.get(name[0], name) if name else ())
    _fields(node, scope, scan, skip=("name",))


def _sublink(node: dict[str, Any], scope: Scope, scan: _Scan) -> None:
    scan.operators.extend(_names(node.get("operName", []))[-1:])
    _fields(node, scope, scan, skip=("operName",))


def _sort(node: dict[str, Any], scope: Scope, scan: _Scan) -> None:
    scan.operators.extend(_names(node.get("useOp", []))[-1:])
    _fields(node, scope, scan, skip=("useOp",))


def _constant(node: dict[str, Any], scope: Scope, scan: _Scan) -> None:
    if "sval" in node:
        scan.strings.append(node["sval"].get("sval", ""))


def _column(node: dict[str, Any], scope: Scope, scan: _Scan) -> None:
    fields = node.get("fields", [])
    if len(fields) > 1 and "String" in fields[-1]:
        scan.attributes.append(fields[-1]["String"].get("sval", ""))


def _indirection(node: dict[str, Any], scope: Scope, scan: _Scan) -> None:
    for item in node.get("indirection", []):
        if "String" in item:
            scan.attributes.append(item["String"].get("sval", ""))
    _fields(node, scope, scan, skip=("indirection",))


def _sample(node: dict[str, Any], scope: Scope, scan: _Scan) -> None:
    if "repeatable" not in node:
        scan.problems.add("tablesample")
    _fields(node, scope, scan, skip=("method",))


def _value_function(node: dict[str, Any], scope: Scope, scan: _Scan) -> None:
    scan.problems.add("sql-value-function")  # CURRENT_TIMESTAMP, current_user, ... (not in pg_proc)


_HANDLERS: dict[str, _Handler] = {
    "SelectStmt": _select, "InsertStmt": _modify, "UpdateStmt": _modify, "DeleteStmt": _modify,
    "MergeStmt": _modify, "RangeVar": _relation, "FuncCall": _call, "A_Expr": _expression, "SubLink": _sublink,
    "SortBy": _sort, "A_Const": _constant, "ColumnRef": _column, "A_Indirection": _indirection,
    "RangeTableSample": _sample, "SQLValueFunction": _value_function,
}


# -- looking the findings up ----------------------------------------------------------------------------

def _examine(stmt: dict[str, Any], path: tuple[str, ...], catalog: Catalog) -> _Part:
    """Walk a SELECT or DML statement and judge what it names against the catalog."""
    scan = _Scan()
    _visit(stmt, frozenset(), scan)
    part = _Part()
    part.reasons |= scan.problems
    if scan.modifies and "SelectStmt" in stmt:
        part.reasons.add("data-modifying-cte")
    for schema, name, nargs in scan.calls:
        _judge_functions(part, catalog.overloads(schema, name, nargs, path), known_required=True)
    for name in scan.attributes:
        user = tuple(f for f in catalog.overloads(None, name, 1, path) if f.schema != "pg_catalog")
        _judge_functions(part, user, known_required=False)
    for op in scan.operators:
        _judge_operators(part, catalog.operator(op))
    if any(time_sensitive(text) for text in scan.strings):
        part.reasons.add("time-literal")
    for schema, name in scan.reads:
        _add_reads(part, catalog.relation(schema, name, path), catalog)
    _add_writes(part, scan.targets, path, catalog)
    return part


def _judge_functions(part: _Part, overloads: Sequence[Function], known_required: bool) -> None:
    if not overloads:
        if known_required:
            part.reasons.add("unknown-function")
            part.writes_all = True  # created since the catalog was loaded, it may write anything
        return
    volatilities = {f.volatility for f in overloads}
    if "v" in volatilities:
        part.reasons.add("volatile")
        # pg_catalog's volatile functions write no user table; any other may.
        part.writes_all = part.writes_all or any(f.volatility == "v" and f.schema != "pg_catalog" for f in overloads)
    elif "s" in volatilities:
        part.reasons.add("stable-function")


def _judge_operators(part: _Part, impls: Sequence[Operator]) -> None:
    """Operators (and, in views, casts): volatile refuses; stable only outside pg_catalog."""
    if not impls:
        part.reasons.add("unknown-operator")
    for impl in impls:
        if impl.volatility == "v":
            part.reasons.add("volatile")
            part.writes_all = part.writes_all or impl.schema != "pg_catalog"
        elif impl.volatility == "s" and impl.schema != "pg_catalog":
            part.reasons.add("stable-operator")


def _relation_reasons(rel: Relation) -> set[str]:
    reasons: set[str] = set()
    if rel.system:
        reasons.add("system-catalog")
    if rel.persistence in ("t", "u"):
        reasons.add("temp-or-unlogged")
    if rel.kind == "f":
        reasons.add("foreign-table")
    elif rel.kind == "S":
        reasons.add("sequence")
    elif rel.kind not in ("r", "p", "v", "m"):
        reasons.add("unknown-relation")
    if rel.row_security:
        reasons.add("row-security")
    return reasons


def _add_reads(part: _Part, rel: Relation | None, catalog: Catalog) -> None:
    """What reading a relation depends on: a table's family, a view's base tables and calls."""
    if rel is None:
        part.reasons.add("unknown-relation")
        return
    if rel.kind != "v":
        _add_family(part, rel.qualified, catalog)
        return
    part.reasons |= _relation_reasons(rel)
    view = catalog.views.get(rel.qualified)
    if view is None:  # a system view (not loaded), or one created after the catalog was loaded
        if not rel.system:
            part.reasons.add("unknown-relation")
        return
    part.reasons |= view.flags
    for kind, schema, volatility in view.calls:
        if kind == "function":
            _judge_functions(part, [Function(schema, 0, None, volatility)], known_required=True)
        else:
            _judge_operators(part, [Operator(schema, volatility)])
    for name in view.relations:
        base = catalog.relations.get(name)
        if base is None:
            part.reasons.add("unknown-relation")
        elif base.kind == "v":
            part.reasons |= _relation_reasons(base)  # its definition is folded into this view's
        else:
            _add_family(part, name, catalog)


def _add_family(part: _Part, qualified: str, catalog: Catalog) -> None:
    for name in catalog.family(qualified):
        part.reads.add(name)
        member = catalog.relations.get(name)
        if member is not None:
            part.reasons |= _relation_reasons(member)


def _add_writes(part: _Part, targets: Iterable[tuple[str | None, str]], path: tuple[str, ...],
                catalog: Catalog) -> None:
    """The tables a write to each target may change: partitions, cascades; triggers and rules mean anything."""
    pending: list[str] = []
    for schema, name in targets:
        rel = catalog.relation(schema, name, path)
        if rel is None:
            part.writes_all = True  # not in the catalog: created since it was loaded
        elif rel.kind == "v":
            view = catalog.views.get(rel.qualified)
            part.writes_all = part.writes_all or rel.triggers or rel.rules or view is None
            bases = (catalog.relations.get(r) for r in (view.relations if view else ()))
            pending.extend(base.qualified for base in bases if base is not None and base.kind != "v")
        else:
            pending.append(rel.qualified)
    while pending:
        name = pending.pop()
        if name in part.writes:
            continue
        for member in catalog.family(name):
            part.writes.add(member)
            rel = catalog.relations.get(member)
            part.writes_all = part.writes_all or (rel is not None and (rel.triggers or rel.rules))
            pending.extend(catalog.cascades.get(member, ()))
