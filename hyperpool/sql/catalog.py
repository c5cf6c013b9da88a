"""What the query classifier needs to know about one database's catalog, as plain frozen data.

Whether a SELECT may be answered from the cache depends on objects the statement only names:
which overloads a function name can mean and how volatile they are, whether a name is a table, a
view (then: which tables it reads, and what it calls), a partition, a foreign, temporary or unlogged
table, or a system catalog. :data:`CATALOG_SQL` reads all of that in one round trip (six result
sets) and :meth:`Catalog.from_rows` turns the rows into a :class:`Catalog`; nothing here does I/O,
so the proxy runs the query on a server connection it already has, and tests build catalogs by hand.

Names follow ``pg_class``/``pg_proc`` exactly (unquoted identifiers are lower case there, as the
parser folds them); relations are keyed ``schema.name``. Every catalog gets a process-unique
``version``, so verdicts memoized against an older catalog are never reused after a reload.

Temporary schemas are per session and the proxy cannot tell which one a client's ``pg_temp``
means, so every ``pg_temp_N`` relation and function is also filed under the schema ``pg_temp``:
a name that is temporary in any session counts as temporary.
"""

from __future__ import annotations

import itertools
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field

SYSTEM_SCHEMAS = frozenset({"pg_catalog", "information_schema"})
TEMP_SCHEMA = "pg_temp"

# Each statement's rows are one argument of Catalog.from_rows, in this order. Only scalar columns
# (text, int, bool), so rows read as text over the wire (simple protocol) work as well as typed ones.
_FUNCTIONS_SQL = """\
SELECT DISTINCT n.nspname, p.proname, p.pronargs, p.pronargdefaults, p.provariadic <> 0, p.provolatile
FROM pg_catalog.pg_proc p JOIN pg_catalog.pg_namespace n ON n.oid = p.pronamespace
WHERE p.prokind <> 'p'"""

_OPERATORS_SQL = """\
SELECT DISTINCT o.oprname, n.nspname, p.provolatile
FROM pg_catalog.pg_operator o JOIN pg_catalog.pg_proc p ON p.oid = o.oprcode
JOIN pg_catalog.pg_namespace n ON n.oid = p.pronamespace"""

_RELATIONS_SQL = """\
SELECT n.nspname, c.relname, c.relkind, c.relpersistence, c.relrowsecurity,
       EXISTS (SELECT 1 FROM pg_catalog.pg_trigger t WHERE t.tgrelid = c.oid AND NOT t.tgisinternal),
       EXISTS (SELECT 1 FROM pg_catalog.pg_rewrite r WHERE r.ev_class = c.oid AND r.ev_type <> '1')
FROM pg_catalog.pg_class c JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace
WHERE c.relkind IN ('r', 'p', 'v', 'm', 'f', 'S')"""

_INHERITS_SQL = """\
SELECT cn.nspname, c.relname, pn.nspname, p.relname
FROM pg_catalog.pg_inherits i
JOIN pg_catalog.pg_class c ON c.oid = i.inhrelid JOIN pg_catalog.pg_namespace cn ON cn.oid = c.relnamespace
JOIN pg_catalog.pg_class p ON p.oid = i.inhparent JOIN pg_catalog.pg_namespace pn ON pn.oid = p.relnamespace
WHERE p.relkind IN ('r', 'p', 'f')"""

# A view's stored query tree (pg_rewrite.ev_action) names everything it uses by OID. pg_depend is
# not enough: it leaves out pinned built-in objects (pg_class, now(), ...). Casts are FuncExprs
# with funcformat 1 or 2 (explicit or implicit cast); SQL value functions, row locks and a
# TABLESAMPLE without REPEATABLE are node markers in the text.
_VIEW_REFS_SQL = r"""
WITH views AS (
  SELECT v.oid, n.nspname, v.relname, r.ev_action::text AS tree
  FROM pg_catalog.pg_class v JOIN pg_catalog.pg_namespace n ON n.oid = v.relnamespace
  JOIN pg_catalog.pg_rewrite r ON r.ev_class = v.oid AND r.rulename = '_RETURN'
  WHERE v.relkind = 'v' AND n.nspname NOT IN ('pg_catalog', 'information_schema')
)
SELECT DISTINCT w.nspname::text, w.relname::text, 'relation', rn.nspname::text, rc.relname::text
FROM views w CROSS JOIN LATERAL regexp_matches(w.tree, ':relid (\d+)', 'g') AS m(id)
JOIN pg_catalog.pg_class rc ON rc.oid = m.id[1]::oid JOIN pg_catalog.pg_namespace rn ON rn.oid = rc.relnamespace
WHERE rc.oid <> w.oid
UNION ALL
SELECT DISTINCT w.nspname, w.relname, CASE WHEN m.id[3] IN ('1', '2') THEN 'cast' ELSE 'function' END,
       pn.nspname, p.provolatile::text
FROM views w CROSS JOIN LATERAL regexp_matches(w.tree,
  ':(?:funcid|aggfnoid|winfnoid) (\d+)( :funcresulttype \d+ :funcretset \w+ :funcvariadic \w+ :funcformat (\d+))?',
  'g') AS m(id)
JOIN pg_catalog.pg_proc p ON p.oid = m.id[1]::oid JOIN pg_catalog.pg_namespace pn ON pn.oid = p.pronamespace
UNION ALL
SELECT DISTINCT w.nspname, w.relname, 'operator', pn.nspname, p.provolatile::text
FROM views w CROSS JOIN LATERAL regexp_matches(w.tree, ':opno (\d+)', 'g') AS m(id)
JOIN pg_catalog.pg_operator o ON o.oid = m.id[1]::oid
JOIN pg_catalog.pg_proc p ON p.oid = o.oprcode JOIN pg_catalog.pg_namespace pn ON pn.oid = p.pronamespace
UNION ALL
SELECT w.nspname, w.relname, 'view', '', '' FROM views w
UNION ALL
SELECT w.nspname, w.relname, 'flag', '', f.flag
FROM views w JOIN (VALUES ('sql-value-function', '\{SQLVALUEFUNCTION '), ('locking', ':hasForUpdate true'),
                          ('tablesample', ':repeatable <>')) AS f(flag, pattern) ON w.tree ~ f.pattern"""

# Foreign keys whose ON DELETE / ON UPDATE action changes the referencing table.
_CASCADES_SQL = """\
SELECT tn.nspname, t.relname, fn.nspname, f.relname
FROM pg_catalog.pg_constraint k
JOIN pg_catalog.pg_class t ON t.oid = k.confrelid JOIN pg_catalog.pg_namespace tn ON tn.oid = t.relnamespace
JOIN pg_catalog.pg_class f ON f.oid = k.conrelid JOIN pg_catalog.pg_namespace fn ON fn.oid = f.relnamespace
WHERE k.contype = 'f' AND (k.confdeltype IN ('c', 'n', 'd') OR k.confupdtype IN ('c', 'n', 'd'))"""

CATALOG_QUERIES: tuple[str, ...] = (_FUNCTIONS_SQL, _OPERATORS_SQL, _RELATIONS_SQL, _INHERITS_SQL, _VIEW_REFS_SQL,
                                    _CASCADES_SQL)
# All of them as one simple-protocol query string: one result set per statement, in order.
CATALOG_SQL = ";\n".join(q.strip() for q in CATALOG_QUERIES) + ";"

Row = Sequence[object]

_versions = itertools.count(1)  # process-unique catalog versions (memo keys), not configuration


def _next_version() -> int:
    return next(_versions)


@dataclass(frozen=True, slots=True)
class Function:
    """One pg_proc entry: which call arities it accepts and how volatile it is ('i', 's' or 'v')."""

    schema: str
    min_args: int
    max_args: int | None  # None: variadic, no upper bound
    volatility: str

    def accepts(self, nargs: int) -> bool:
        return self.min_args <= nargs and (self.max_args is None or nargs <= self.max_args)


@dataclass(frozen=True, slots=True)
class Operator:
    """One operator's implementing function: its schema and volatility."""

    schema: str
    volatility: str


@dataclass(frozen=True, slots=True)
class Relation:
    """One pg_class entry classification cares about."""

    schema: str
    name: str
    kind: str  # relkind: r table, p partitioned, v view, m materialized view, f foreign, S sequence
    persistence: str  # relpersistence: p permanent, u unlogged, t temporary
    row_security: bool = False  # results depend on policies, which may read settings or other tables
    triggers: bool = False  # user triggers: a write may change anything
    rules: bool = False  # non-SELECT rewrite rules: likewise

    @property
    def qualified(self) -> str:
        return f"{self.schema}.{self.name}"

    @property
    def system(self) -> bool:
        return self.schema in SYSTEM_SCHEMAS or self.schema.startswith("pg_toast")


@dataclass(frozen=True, slots=True)
class View:
    """What selecting from a view does, with the views it uses folded in (transitively)."""

    relations: frozenset[str] = frozenset()  # every relation it reads, nested views included
    calls: frozenset[tuple[str, str, str]] = frozenset()  # (function|cast|operator, schema, volatility)
    flags: frozenset[str] = frozenset()  # sql-value-function, locking, tablesample


@dataclass(frozen=True, eq=False)
class Catalog:
    """One database's functions, operators and relations, as classification needs them."""

    functions: Mapping[str, tuple[Function, ...]] = field(default_factory=dict)  # by proname
    operators: Mapping[str, tuple[Operator, ...]] = field(default_factory=dict)  # by oprname
    relations: Mapping[str, Relation] = field(default_factory=dict)  # by schema.name
    views: Mapping[str, View] = field(default_factory=dict)  # by schema.name
    parents: Mapping[str, frozenset[str]] = field(default_factory=dict)  # pg_inherits, child -> parents
    children: Mapping[str, frozenset[str]] = field(default_factory=dict)  # parent -> children
    cascades: Mapping[str, frozenset[str]] = field(default_factory=dict)  # referenced -> referencing
    schemas: frozenset[str] = frozenset()
    version: int = field(default_factory=_next_version)

    # -- name resolution (as PostgreSQL's namespace.c does it) -----------------------------------

    def relation(self, schema: str | None, name: str, search_path: Sequence[str]) -> Relation | None:
        """The relation a (possibly qualified) name means under ``search_path``, or None."""
        if schema is not None:
            return self.relations.get(f"{schema}.{name}")
        for candidate in relation_path(search_path):
            found = self.relations.get(f"{candidate}.{name}")
            if found is not None:
                return found
        return None

    def overloads(self, schema: str | None, name: str, nargs: int, search_path: Sequence[str]) -> tuple[Function, ...]:
        """Every function a call ``name(nargs arguments)`` may resolve to (by arity, not types)."""
        schemas = (schema,) if schema is not None else function_path(search_path)
        return tuple(f for f in self.functions.get(name, ()) if f.schema in schemas and f.accepts(nargs))

    def operator(self, name: str) -> tuple[Operator, ...]:
        """Every implementation of an operator name (argument types are unknown before analysis)."""
        return self.operators.get(name, ())

    # -- relation families -------------------------------------------------------------------------

    def ancestors(self, qualified: str) -> frozenset[str]:
        return _closure(qualified, self.parents)

    def descendants(self, qualified: str) -> frozenset[str]:
        return _closure(qualified, self.children)

    def family(self, qualified: str) -> frozenset[str]:
        """A relation with its ancestors and descendants: a write to any of them may show in the others."""
        return self.ancestors(qualified) | self.descendants(qualified) | {qualified}

    # -- building ----------------------------------------------------------------------------------

    @classmethod
    def from_rows(cls, functions: Iterable[Row] = (), operators: Iterable[Row] = (), relations: Iterable[Row] = (),
                  inherits: Iterable[Row] = (), view_refs: Iterable[Row] = (), cascades: Iterable[Row] = ()) -> Catalog:
        """A catalog from the result sets of :data:`CATALOG_QUERIES`, in that order.

        Values may be typed (psycopg) or the text the wire protocol carries ('t'/'f', digits).
        """
        rels, procs, parents = _relations(relations), _functions(functions), _pairs(inherits)
        schemas = {rel.schema for rel in rels.values()} | {f.schema for fns in procs.values() for f in fns}
        return cls(
            functions=procs,
            operators=_operators(operators),
            relations=rels,
            views=_views(view_refs),
            parents=parents,
            children=_inverse(parents),
            cascades=_pairs(cascades),
            schemas=frozenset(schemas),
        )


def relation_path(search_path: Sequence[str]) -> tuple[str, ...]:
    """Schemas searched for an unqualified relation: pg_temp, then pg_catalog, unless the path places them."""
    implicit = tuple(s for s in (TEMP_SCHEMA, "pg_catalog") if s not in search_path)
    return implicit + tuple(search_path)


def function_path(search_path: Sequence[str]) -> tuple[str, ...]:
    """Schemas searched for an unqualified function: never the temporary schema; pg_catalog first if not placed."""
    implicit = () if "pg_catalog" in search_path else ("pg_catalog",)
    return implicit + tuple(s for s in search_path if not _is_temp(s))


def parse_search_path(setting: str, user: str | None = None) -> tuple[str, ...]:
    """A search_path setting's value as schema names: quotes removed, ``$user`` replaced by ``user`` (or dropped)."""
    names: list[str] = []
    for item in re.findall(r'\s*("(?:[^"]|"")*"|[^,]*)\s*(?:,|$)', setting):
        item = item.strip()
        if not item:
            continue
        name = item[1:-1].replace('""', '"') if item.startswith('"') else item.lower()
        if name == "$user":
            if user:
                names.append(user)
        else:
            names.append(name)
    return tuple(dict.fromkeys(names))


def _is_temp(schema: str) -> bool:
    return schema == TEMP_SCHEMA or schema.startswith("pg_temp_")


def _closure(start: str, edges: Mapping[str, frozenset[str]]) -> frozenset[str]:
    seen: set[str] = set()
    stack = list(edges.get(start, ()))
    while stack:
        item = stack.pop()
        if item not in seen and item != start:
            seen.add(item)
            stack.extend(edges.get(item, ()))
    return frozenset(seen)


def _text(value: object) -> str:
    return "" if value is None else str(value)


def _int(value: object) -> int:
    return int(str(value)) if value is not None else 0


def _bool(value: object) -> bool:
    if isinstance(value, str):
        return value.lower() in ("t", "true", "1", "on", "yes")
    return bool(value)


def _aliases(schema: str) -> tuple[str, ...]:
    return (schema, TEMP_SCHEMA) if schema.startswith("pg_temp_") else (schema,)


def _functions(rows: Iterable[Row]) -> dict[str, tuple[Function, ...]]:
    found: dict[str, set[Function]] = {}
    for schema, name, nargs, ndefaults, variadic, volatility in rows:
        total = _int(nargs)
        # A variadic parameter takes one or more arguments; pass it none and defaults may fill it.
        low = max(0, total - _int(ndefaults) - (1 if _bool(variadic) else 0))
        for alias in _aliases(_text(schema)):
            fn = Function(alias, low, None if _bool(variadic) else total, _text(volatility))
            found.setdefault(_text(name), set()).add(fn)
    return {name: tuple(sorted(fns, key=repr)) for name, fns in found.items()}


def _operators(rows: Iterable[Row]) -> dict[str, tuple[Operator, ...]]:
    found: dict[str, set[Operator]] = {}
    for name, schema, volatility in rows:
        found.setdefault(_text(name), set()).add(Operator(_text(schema), _text(volatility)))
    return {name: tuple(sorted(ops, key=repr)) for name, ops in found.items()}


def _relations(rows: Iterable[Row]) -> dict[str, Relation]:
    rels: dict[str, Relation] = {}
    for schema, name, kind, persistence, row_security, triggers, rules in rows:
        for alias in _aliases(_text(schema)):
            rel = Relation(alias, _text(name), _text(kind), _text(persistence), _bool(row_security), _bool(triggers),
                           _bool(rules))
            rels.setdefault(rel.qualified, rel)
    return rels


def _pairs(rows: Iterable[Row]) -> dict[str, frozenset[str]]:
    """(a_schema, a_name, b_schema, b_name) rows -> {a: {b, ...}}."""
    found: dict[str, set[str]] = {}
    for a_schema, a_name, b_schema, b_name in rows:
        found.setdefault(f"{_text(a_schema)}.{_text(a_name)}", set()).add(f"{_text(b_schema)}.{_text(b_name)}")
    return {key: frozenset(values) for key, values in found.items()}


def _inverse(edges: Mapping[str, frozenset[str]]) -> dict[str, frozenset[str]]:
    found: dict[str, set[str]] = {}
    for key, values in edges.items():
        for value in values:
            found.setdefault(value, set()).add(key)
    return {key: frozenset(values) for key, values in found.items()}


def _views(rows: Iterable[Row]) -> dict[str, View]:
    """Each view's direct references, then folded with those of the views it reads."""
    refs: dict[str, set[str]] = {}
    calls: dict[str, set[tuple[str, str, str]]] = {}
    flags: dict[str, set[str]] = {}
    aliases: dict[str, str] = {}
    for view_schema, view_name, kind, schema, value in rows:
        view = f"{_text(view_schema)}.{_text(view_name)}"
        refs.setdefault(view, set())
        if _text(view_schema).startswith("pg_temp_"):
            aliases[view] = f"{TEMP_SCHEMA}.{_text(view_name)}"
        if kind == "relation":
            refs[view].add(f"{_text(schema)}.{_text(value)}")
        elif kind == "flag":
            flags.setdefault(view, set()).add(_text(value))
        elif kind != "view":  # function, cast or operator: (kind, schema, volatility)
            calls.setdefault(view, set()).add((_text(kind), _text(schema), _text(value)))
    done: dict[str, View] = {}
    for view in refs:
        _fold(view, refs, calls, flags, done, set())
    for view, alias in aliases.items():
        done.setdefault(alias, done[view])
    return done


def _fold(view: str, refs: Mapping[str, set[str]], calls: Mapping[str, set[tuple[str, str, str]]],
          flags: Mapping[str, set[str]], done: dict[str, View], active: set[str]) -> View:
    if view in done:
        return done[view]
    active.add(view)
    relations, used, marks = set(refs.get(view, ())), set(calls.get(view, ())), set(flags.get(view, ()))
    for ref in refs.get(view, ()):
        if ref in refs and ref not in active:  # a view with a definition we loaded
            inner = _fold(ref, refs, calls, flags, done, active)
            relations |= inner.relations
            used |= inner.calls
            marks |= inner.flags
    active.discard(view)
    done[view] = View(frozenset(relations), frozenset(used), frozenset(marks))
    return done[view]
