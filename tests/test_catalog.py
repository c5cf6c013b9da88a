"""Unit tests for hyperpool.sql.catalog: building a Catalog from hand-made rows, and name resolution."""

from __future__ import annotations

import pgparse

from hyperpool.sql.catalog import CATALOG_QUERIES, CATALOG_SQL, Catalog, Function, View, function_path, relation_path

# Rows as the simple protocol carries them: every value text, booleans 't'/'f'.
FUNCTIONS = [
    ("pg_catalog", "now", "0", "0", "f", "s"),
    ("pg_catalog", "lower", "1", "0", "f", "i"),
    ("pg_catalog", "concat", "1", "0", "t", "s"),  # concat(VARIADIC "any")
    ("public", "twice", "1", "0", "f", "i"),
    ("app", "twice", "1", "0", "f", "v"),
    ("app", "d", "2", "1", "f", "i"),  # d(a int, b int DEFAULT 0)
    ("pg_temp_3", "tf", "0", "0", "f", "v"),
]
OPERATORS = [("+", "pg_catalog", "i"), ("+", "pg_catalog", "s"), ("#?#", "app", "v")]
RELATIONS = [
    ("pg_catalog", "pg_class", "r", "p", "f", "f", "f"),
    ("public", "users", "r", "p", "f", "f", "f"),
    ("app", "users", "r", "p", "f", "t", "f"),
    ("public", "events", "p", "p", "f", "f", "f"),
    ("public", "events_2024", "r", "p", "f", "f", "f"),
    ("public", "events_2025", "p", "p", "f", "f", "f"),
    ("public", "events_2025_a", "r", "p", "f", "f", "f"),
    ("public", "v_inner", "v", "p", "f", "f", "f"),
    ("public", "v_outer", "v", "p", "f", "f", "f"),
    ("public", "v_const", "v", "p", "f", "f", "f"),
    ("pg_temp_3", "users", "r", "t", "f", "f", "f"),
    ("pg_temp_3", "tmp_view", "v", "t", "f", "f", "f"),
]
INHERITS = [
    ("public", "events_2024", "public", "events"),
    ("public", "events_2025", "public", "events"),
    ("public", "events_2025_a", "public", "events_2025"),
]
VIEW_REFS = [
    ("public", "v_inner", "relation", "public", "users"),
    ("public", "v_inner", "function", "pg_catalog", "s"),
    ("public", "v_outer", "relation", "public", "v_inner"),
    ("public", "v_outer", "relation", "public", "events"),
    ("public", "v_outer", "flag", "", "locking"),
    ("public", "v_outer", "operator", "pg_catalog", "i"),
    ("public", "v_const", "view", "", ""),
    ("pg_temp_3", "tmp_view", "relation", "pg_temp_3", "users"),
]
CASCADES = [("public", "users", "app", "users")]


def build() -> Catalog:
    return Catalog.from_rows(FUNCTIONS, OPERATORS, RELATIONS, INHERITS, VIEW_REFS, CASCADES)


def test_catalog_sql_is_one_statement_per_result_set() -> None:
    assert len(pgparse.parse(CATALOG_SQL)) == len(CATALOG_QUERIES) == 6
    for query in CATALOG_QUERIES:
        assert len(pgparse.parse(query)) == 1


def test_versions_are_unique_and_increasing() -> None:
    first, second = build(), build()
    assert second.version > first.version
    assert Catalog().version > second.version


def test_functions_by_name_and_arity() -> None:
    cat = build()
    assert cat.overloads(None, "now", 0, ("public",)) == (Function("pg_catalog", 0, 0, "s"),)
    assert cat.overloads(None, "now", 1, ("public",)) == ()
    # variadic: any number of arguments from one up (zero too when the array may be passed empty)
    assert [f.volatility for f in cat.overloads(None, "concat", 5, ())] == ["s"]
    # defaults lower the minimum
    assert cat.overloads(None, "d", 1, ("app",)) == cat.overloads(None, "d", 2, ("app",)) != ()
    assert cat.overloads(None, "d", 0, ("app",)) == cat.overloads(None, "d", 3, ("app",)) == ()


def test_function_resolution_follows_the_path() -> None:
    cat = build()
    assert [f.schema for f in cat.overloads(None, "twice", 1, ("public",))] == ["public"]
    assert sorted(f.schema for f in cat.overloads(None, "twice", 1, ("app", "public"))) == ["app", "public"]
    assert cat.overloads(None, "twice", 1, ("other",)) == ()
    assert [f.volatility for f in cat.overloads("app", "twice", 1, ())] == ["v"]
    # functions are never found in the temporary schema unless it is named
    assert cat.overloads(None, "tf", 0, ("pg_temp", "public")) == ()
    assert [f.schema for f in cat.overloads("pg_temp", "tf", 0, ())] == ["pg_temp"]
    assert cat.overloads(None, "lower", 1, ("pg_catalog",)) != ()


def test_paths_add_the_implicit_schemas() -> None:
    assert relation_path(("public",)) == ("pg_temp", "pg_catalog", "public")
    assert relation_path(("public", "pg_temp", "pg_catalog")) == ("public", "pg_temp", "pg_catalog")
    assert function_path(("pg_temp", "public")) == ("pg_catalog", "public")
    assert function_path(("public", "pg_catalog", "pg_temp_3")) == ("public", "pg_catalog")


def test_relation_resolution() -> None:
    cat = build()
    relation = cat.relation
    pg_class = relation(None, "pg_class", ("public",))
    assert pg_class is not None and pg_class.qualified == "pg_catalog.pg_class" and pg_class.system
    # pg_temp comes first unless the path places it: a temporary table shadows public.users
    temp = relation(None, "users", ("public",))
    assert temp is not None and temp.schema == "pg_temp" and temp.persistence == "t"
    found = relation(None, "users", ("app", "pg_temp", "public"))
    assert found is not None and found.qualified == "app.users" and found.triggers
    found = relation(None, "users", ("public", "pg_temp"))
    assert found is not None and found.qualified == "public.users" and not found.triggers
    assert relation("public", "users", ()) == relation(None, "users", ("public", "pg_temp"))
    assert relation(None, "missing", ("public",)) is None
    assert relation("nope", "users", ("public",)) is None
    assert cat.schemas >= {"public", "app", "pg_catalog", "pg_temp", "pg_temp_3"}


def test_partition_families() -> None:
    cat = build()
    assert cat.descendants("public.events") == {"public.events_2024", "public.events_2025", "public.events_2025_a"}
    assert cat.ancestors("public.events_2025_a") == {"public.events_2025", "public.events"}
    assert cat.family("public.events_2025") == {"public.events", "public.events_2025", "public.events_2025_a"}
    assert cat.family("public.users") == {"public.users"}


def test_views_fold_the_views_they_read() -> None:
    cat = build()
    assert cat.views["public.v_inner"] == View(frozenset({"public.users"}),
                                                frozenset({("function", "pg_catalog", "s")}), frozenset())
    outer = cat.views["public.v_outer"]
    assert outer.relations == {"public.v_inner", "public.users", "public.events"}
    assert outer.calls == {("function", "pg_catalog", "s"), ("operator", "pg_catalog", "i")}
    assert outer.flags == {"locking"}
    assert cat.views["public.v_const"] == View()
    assert cat.views["pg_temp.tmp_view"] == cat.views["pg_temp_3.tmp_view"]


def test_operators_and_cascades() -> None:
    cat = build()
    assert sorted(o.volatility for o in cat.operator("+")) == ["i", "s"]
    assert cat.operator("-") == ()
    assert cat.cascades == {"public.users": frozenset({"app.users"})}


def test_typed_rows_work_too() -> None:
    cat = Catalog.from_rows([("public", "f", 2, 1, True, "i")], [], [("public", "t", "r", "u", True, False, True)])
    assert cat.overloads(None, "f", 1, ("public",)) == (Function("public", 0, None, "i"),)
    table = cat.relations["public.t"]
    assert (table.persistence, table.row_security, table.triggers, table.rules) == ("u", True, False, True)
