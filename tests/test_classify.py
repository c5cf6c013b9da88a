"""Tests for hyperpool.sql.classify: the corpus, and our own cases, against a real database's catalog."""

from __future__ import annotations

import uuid
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pgparse
import psycopg
import pytest
import yaml

from hyperpool.embedded import EmbeddedPostgres
from hyperpool.sql.catalog import CATALOG_SQL, Catalog, parse_search_path
from hyperpool.sql.classify import (
    REASONS,
    Verdict,
    classify,
    clear_memo,
    hints,
    shape_key,
    time_sensitive,
)
from tests.support import OWNER, OWNER_PASSWORD

# The shared corpus sits beside the checkout (../shared); a clone elsewhere on the same machine finds it in /work.
_CORPUS_CANDIDATES = (Path(__file__).resolve().parents[2] / "shared" / "corpus" / "cacheable.yaml",
                      Path("/work/shared/corpus/cacheable.yaml"))
CORPUS_PATH = next((p for p in _CORPUS_CANDIDATES if p.is_file()), _CORPUS_CANDIDATES[0])
CORPUS: dict[str, Any] = yaml.safe_load(CORPUS_PATH.read_text()) if CORPUS_PATH.exists() else {"setup": "", "cases": []}

PATH = ("app_owner", "public")  # the owner's default "$user", public
HP = ("hp", "public")

# Needs a superuser: a foreign-data wrapper with no handler (foreign tables on it can be created, not read).
SUPERUSER_SETUP = f"""
CREATE FOREIGN DATA WRAPPER hp_fdw;
CREATE SERVER hp_server FOREIGN DATA WRAPPER hp_fdw;
GRANT USAGE ON FOREIGN SERVER hp_server TO {OWNER};
"""

# Our own objects, in schemas of their own so the corpus (search_path "$user", public) does not see them.
OWN_SETUP = """
CREATE SCHEMA hp;
CREATE SCHEMA hp2;
CREATE TABLE hp.items (id int PRIMARY KEY, name text);
CREATE TABLE hp.things (a int);
CREATE TABLE hp2.things (a int);
CREATE VIEW hp.item_emails AS SELECT i.name, u.email FROM hp.items i JOIN public.users u ON u.id = i.id;
CREATE VIEW hp.item_emails_upper AS SELECT upper(name) AS name FROM hp.item_emails;
CREATE VIEW hp.items_view AS SELECT * FROM hp.items;
CREATE VIEW hp.stamped AS SELECT id, now() AS at FROM hp.items;
CREATE VIEW hp.whoami AS SELECT current_user AS who, id FROM hp.items;
CREATE VIEW hp.classes AS SELECT relname FROM pg_class;
CREATE VIEW hp.scratch_view AS SELECT * FROM public.scratch;
CREATE VIEW hp.locked AS SELECT * FROM hp.items FOR UPDATE;
CREATE VIEW hp.sampled AS SELECT * FROM hp.items TABLESAMPLE SYSTEM (50);
CREATE VIEW hp.constant AS SELECT 1 AS one;
CREATE VIEW hp.bumped AS SELECT public.bump() AS n;
CREATE MATERIALIZED VIEW hp.item_count AS SELECT count(*) AS n FROM hp.items;
CREATE FOREIGN TABLE hp.remote (id int) SERVER hp_server;
CREATE VIEW hp.remote_view AS SELECT * FROM hp.remote;
CREATE TABLE hp.events (id int, at date) PARTITION BY RANGE (at);
CREATE TABLE hp.events_2024 PARTITION OF hp.events FOR VALUES FROM ('2024-01-01') TO ('2025-01-01');
CREATE TABLE hp.events_2025 PARTITION OF hp.events FOR VALUES FROM ('2025-01-01') TO ('2026-01-01')
  PARTITION BY LIST (id);
CREATE TABLE hp.events_2025_a PARTITION OF hp.events_2025 FOR VALUES IN (1);
CREATE VIEW hp.recent_events AS SELECT * FROM hp.events WHERE id > 0;
CREATE TABLE hp.metrics (id int, at date) PARTITION BY RANGE (at);
CREATE TABLE hp.metrics_local PARTITION OF hp.metrics FOR VALUES FROM ('2024-01-01') TO ('2025-01-01');
CREATE FOREIGN TABLE hp.metrics_remote PARTITION OF hp.metrics FOR VALUES FROM ('2025-01-01') TO ('2026-01-01')
  SERVER hp_server;
CREATE TABLE hp.secret (id int);
ALTER TABLE hp.secret ENABLE ROW LEVEL SECURITY;
CREATE FUNCTION hp.f(int) RETURNS int LANGUAGE sql IMMUTABLE AS 'SELECT $1';
CREATE FUNCTION hp.f(text) RETURNS int LANGUAGE sql VOLATILE AS 'SELECT 1';
CREATE FUNCTION hp.g(int) RETURNS int LANGUAGE sql IMMUTABLE AS 'SELECT $1';
CREATE FUNCTION hp.g(int, int) RETURNS int LANGUAGE sql VOLATILE AS 'SELECT $1';
CREATE FUNCTION hp.d(a int, b int DEFAULT 0) RETURNS int LANGUAGE sql IMMUTABLE AS 'SELECT a + b';
CREATE FUNCTION hp.total(VARIADIC int[]) RETURNS int LANGUAGE sql IMMUTABLE AS 'SELECT 0';
CREATE FUNCTION hp.label(hp.items) RETURNS text LANGUAGE sql STABLE AS 'SELECT $1.name';
CREATE FUNCTION hp.roll(int, int) RETURNS int LANGUAGE sql VOLATILE AS 'SELECT $1 + $2';
CREATE OPERATOR hp.#?# (FUNCTION = hp.roll, LEFTARG = int, RIGHTARG = int);
CREATE FUNCTION hp.near(int, int) RETURNS bool LANGUAGE sql STABLE AS 'SELECT $1 = $2';
CREATE OPERATOR hp.#~# (FUNCTION = hp.near, LEFTARG = int, RIGHTARG = int);
CREATE TABLE hp.audit_log (id int);
CREATE TABLE hp.audited (id int);
CREATE FUNCTION hp.log_it() RETURNS trigger LANGUAGE plpgsql AS
  'BEGIN INSERT INTO hp.audit_log VALUES (NEW.id); RETURN NEW; END';
CREATE TRIGGER audited_log AFTER INSERT ON hp.audited FOR EACH ROW EXECUTE FUNCTION hp.log_it();
CREATE TABLE hp.ruled (id int);
CREATE RULE ruled_log AS ON INSERT TO hp.ruled DO ALSO INSERT INTO hp.audit_log VALUES (NEW.id);
CREATE TABLE hp.parent (id int PRIMARY KEY);
CREATE TABLE hp.child (id int, parent_id int REFERENCES hp.parent ON DELETE CASCADE);
CREATE TABLE hp.plain_ref (parent_id int REFERENCES hp.parent);
"""

# Temporary objects exist only in the session that loads the catalog.
TEMP_SETUP = """
CREATE TEMP TABLE tmp_t (a int);
CREATE TEMP TABLE items (x int);
CREATE VIEW tmp_over AS SELECT * FROM tmp_t;
"""


@dataclass
class Loaded:
    catalog: Catalog
    rows: Sequence[Sequence[Sequence[Any]]]


def load_catalog(conn: psycopg.Connection[Any]) -> list[list[Any]]:
    cur = conn.execute(CATALOG_SQL)
    result_sets = [cur.fetchall()]
    while cur.nextset():
        result_sets.append(cur.fetchall())
    return result_sets


@pytest.fixture(scope="module")
def loaded(pg: EmbeddedPostgres) -> Iterator[Loaded]:
    dbname = f"classify_{uuid.uuid4().hex[:10]}"
    pg.create_database(dbname, OWNER)
    try:
        pg.execute(SUPERUSER_SETUP, dbname=dbname)
        with psycopg.connect(pg.dsn(dbname, OWNER, OWNER_PASSWORD), autocommit=True) as conn:
            conn.execute(CORPUS["setup"] or "SELECT 1")
            conn.execute(OWN_SETUP)
            conn.execute(TEMP_SETUP)
            rows = load_catalog(conn)
        yield Loaded(Catalog.from_rows(*rows), rows)
    finally:
        pg.execute(f'DROP DATABASE IF EXISTS "{dbname}" WITH (FORCE)')


@pytest.fixture
def catalog(loaded: Loaded) -> Catalog:
    return loaded.catalog


# -- the corpus ---------------------------------------------------------------------------------------

def _case_id(index: int, case: dict[str, Any]) -> str:
    return f"{index:02d}-{'yes' if case['cacheable'] else 'no'}-{' '.join(case['sql'].split())[:50]}"


@pytest.mark.skipif(not CORPUS_PATH.exists(), reason=f"{CORPUS_PATH} not found")
@pytest.mark.parametrize("case", [pytest.param(c, id=_case_id(i, c)) for i, c in enumerate(CORPUS["cases"])])
def test_corpus(case: dict[str, Any], catalog: Catalog) -> None:
    verdict = classify(case["sql"], PATH, catalog)
    assert verdict.cacheable == case["cacheable"], (case.get("why"), verdict)
    if "reads" in case:
        assert verdict.reads == frozenset(case["reads"]), verdict
    assert verdict.reason in (*REASONS, "cacheable")


def test_corpus_is_complete() -> None:
    if not CORPUS_PATH.exists():
        pytest.skip(f"{CORPUS_PATH} not found")
    assert len(CORPUS["cases"]) > 50


# -- our own cases ------------------------------------------------------------------------------------

def ok(*reads: str) -> dict[str, Any]:
    return {"cacheable": True, "reason": "cacheable", "reads": frozenset(reads)}


def no(reason: str, **more: Any) -> dict[str, Any]:
    return {"cacheable": False, "reason": reason, **{k: frozenset(v) if k in ("reads", "writes") else v
                                                       for k, v in more.items()}}


OWN_CASES: list[tuple[str, tuple[str, ...], dict[str, Any]]] = [
    # views read their base tables, transitively
    ("SELECT * FROM hp.item_emails", PATH, ok("hp.items", "public.users")),
    ("SELECT * FROM hp.item_emails_upper", PATH, ok("hp.items", "public.users")),
    ("SELECT * FROM item_emails WHERE name = $1", HP, ok("hp.items", "public.users")),
    ("SELECT * FROM hp.constant", PATH, ok()),
    ("SELECT * FROM hp.recent_events", PATH,
     ok("hp.events", "hp.events_2024", "hp.events_2025", "hp.events_2025_a")),
    ("SELECT n FROM hp.item_count", PATH, ok("hp.item_count")),  # a materialized view is its own table
    # ... and carry what their definitions do
    ("SELECT * FROM hp.stamped", PATH, no("stable-function", reads={"hp.items"})),
    ("SELECT * FROM hp.whoami", PATH, no("sql-value-function")),
    ("SELECT * FROM hp.classes", PATH, no("system-catalog")),
    ("SELECT * FROM hp.scratch_view", PATH, no("temp-or-unlogged")),
    ("SELECT * FROM hp.locked", PATH, no("locking")),
    ("SELECT * FROM hp.sampled", PATH, no("tablesample")),
    ("SELECT * FROM hp.bumped", PATH, no("volatile", writes_all=True)),
    ("SELECT * FROM hp.remote_view", PATH, no("foreign-table")),
    ("SELECT * FROM tmp_over", PATH, no("temp-or-unlogged")),
    ("SELECT * FROM tmp_t", PATH, no("temp-or-unlogged")),
    ("SELECT * FROM pg_temp.tmp_t", PATH, no("temp-or-unlogged")),
    ("SELECT * FROM hp.remote", PATH, no("foreign-table")),
    ("SELECT * FROM hp.secret", PATH, no("row-security")),
    ("SELECT last_value FROM order_ids", PATH, no("sequence")),
    ("SELECT * FROM missing_table", PATH, no("unknown-relation")),
    ("SELECT * FROM nope.users", PATH, no("unknown-relation")),
    # partitions: a parent with every partition below it, a partition with its ancestors
    ("SELECT count(*) FROM hp.events", PATH, ok("hp.events", "hp.events_2024", "hp.events_2025", "hp.events_2025_a")),
    ("SELECT * FROM hp.events_2025_a", PATH, ok("hp.events_2025_a", "hp.events_2025", "hp.events")),
    ("SELECT * FROM hp.events_2024", PATH, ok("hp.events_2024", "hp.events")),
    ("SELECT * FROM hp.metrics", PATH, no("foreign-table")),  # one partition is a foreign table
    ("SELECT * FROM hp.metrics_local", PATH, ok("hp.metrics_local", "hp.metrics")),
    # search_path: the first schema that has the name; pg_temp first unless placed
    ("SELECT * FROM things", ("hp", "public"), ok("hp.things")),
    ("SELECT * FROM things", ("hp2", "hp"), ok("hp2.things")),
    ("SELECT * FROM things", ("public",), no("unknown-relation")),
    ("SELECT * FROM items", HP, no("temp-or-unlogged")),  # the temporary "items" shadows hp.items
    ("SELECT * FROM items", ("hp", "pg_temp"), ok("hp.items")),
    ("SELECT * FROM pg_class", ("public", "pg_catalog"), no("system-catalog")),
    # functions: every overload of the name and arity must be immutable
    ("SELECT hp.f(1)", PATH, no("volatile")),
    ("SELECT f(1)", HP, no("volatile")),
    ("SELECT f(1)", PATH, no("unknown-function", writes_all=True)),
    ("SELECT hp.g(1)", PATH, ok()),
    ("SELECT hp.g(1, 2)", PATH, no("volatile", writes_all=True)),  # a volatile user function may write
    ("SELECT hp.d(1), hp.d(1, 2), hp.total(1, 2, 3), hp.total(VARIADIC ARRAY[1])", PATH, ok()),
    ("SELECT hp.d()", PATH, no("unknown-function")),
    ("SELECT i.label FROM hp.items i", HP, no("stable-function")),  # attribute notation: label(i)
    ("SELECT (i).label FROM hp.items i", HP, no("stable-function")),
    ("SELECT i.name FROM hp.items i", HP, ok("hp.items")),
    ("SELECT percentile_cont(0.5) WITHIN GROUP (ORDER BY id) FROM hp.items", PATH, ok("hp.items")),
    ("SELECT string_agg(name, ',' ORDER BY id) FILTER (WHERE id > 1) FROM hp.items", PATH, ok("hp.items")),
    ("SELECT row_number() OVER (PARTITION BY name ORDER BY id) FROM hp.items", PATH, ok("hp.items")),
    ("SELECT * FROM generate_series(1, 3) AS g(n)", PATH, ok()),
    ("SELECT * FROM hp.items, LATERAL (SELECT random()) r", PATH, no("volatile")),
    ("SELECT EXTRACT(year FROM created_at) FROM users", PATH, no("stable-function")),  # one overload is stable
    ("SELECT localtimestamp", PATH, no("sql-value-function")),
    ("SELECT session_user", PATH, no("sql-value-function")),
    ("SELECT CURRENT_SCHEMA", PATH, no("sql-value-function")),
    # operators: volatile anywhere refuses; stable only in pg_catalog
    ("SELECT 1 #?# 2", HP, no("volatile", writes_all=True)),
    ("SELECT 1 OPERATOR(hp.#?#) 2", PATH, no("volatile")),
    ("SELECT 1 #~# 2", HP, no("stable-operator")),
    ("SELECT created_at + interval '1 day', 'a' || 1 FROM users", PATH, ok("public.users")),
    ("SELECT * FROM users WHERE id BETWEEN 1 AND 5 AND name NOT LIKE 'x%' AND id <> ALL ('{1}')", PATH,
     ok("public.users")),
    ("SELECT * FROM users ORDER BY id USING >", PATH, ok("public.users")),
    # literals that date/time input reads as the current time
    ("SELECT * FROM users WHERE created_at > 'now'", PATH, no("time-literal")),
    ("SELECT 'today'::date", PATH, no("time-literal")),
    ("SELECT date 'tomorrow'", PATH, no("time-literal")),
    ("SELECT '10:00 Yesterday'::timestamp", PATH, no("time-literal")),
    (r"SELECT E'n\x6fw'::timestamptz", PATH, no("time-literal")),
    ("SELECT $$now$$::timestamptz", PATH, no("time-literal")),
    ("SELECT '2024-01-01'::date, 'knowledge', 'snow'", PATH, ok()),
    ("SELECT now FROM (SELECT 1 AS now) s", PATH, ok()),
    # CTE names shadow tables only where they are visible
    ("SELECT * FROM (WITH users AS (SELECT 1 AS id) SELECT * FROM users) s JOIN orders o ON o.id = s.id", PATH,
     ok("public.orders")),
    ("SELECT * FROM (WITH users AS (SELECT 1 AS id) SELECT * FROM users) s, users", PATH, ok("public.users")),
    ("WITH a AS (SELECT * FROM users), users AS (SELECT 1) SELECT * FROM a, users", PATH, ok("public.users")),
    ("WITH RECURSIVE r(n) AS (SELECT 1 UNION ALL SELECT n + 1 FROM r WHERE n < 5) SELECT * FROM r", PATH, ok()),
    ("(WITH orders AS (SELECT 1) SELECT * FROM orders) UNION ALL SELECT 1 FROM orders", PATH, ok("public.orders")),
    ("WITH x AS (SELECT * FROM users) SELECT * FROM x, LATERAL (SELECT * FROM x) y", PATH, ok("public.users")),
    # shape
    ("SELECT * FROM (SELECT * FROM users FOR UPDATE) s", PATH, no("locking")),
    ("SELECT * FROM users FOR KEY SHARE", PATH, no("locking")),
    ("SELECT * FROM users TABLESAMPLE SYSTEM (10)", PATH, no("tablesample")),
    ("SELECT * FROM users TABLESAMPLE BERNOULLI (10) REPEATABLE (42)", PATH, ok("public.users")),
    ("SELECT * INTO TEMP tmp_copy FROM users", PATH, no("select-into", writes_all=False)),
    ("WITH n AS (INSERT INTO orders VALUES (9) RETURNING id) SELECT * FROM n", PATH,
     no("data-modifying-cte", writes={"public.orders"})),
    ("SELECT 1;;", PATH, ok()),
    (";", PATH, no("empty")),
    ("", PATH, no("empty")),
    ("/* only a comment */", PATH, no("empty")),
    # writes, for invalidation
    ("INSERT INTO users (id) SELECT id FROM orders", PATH, no("write", writes={"public.users"}, writes_all=False)),
    ("UPDATE orders SET total = 0 FROM users WHERE users.id = orders.user_id", PATH,
     no("write", writes={"public.orders"})),
    ("DELETE FROM users USING orders WHERE orders.user_id = users.id", PATH, no("write", writes={"public.users"})),
    ("MERGE INTO orders o USING users u ON o.user_id = u.id WHEN NOT MATCHED THEN INSERT VALUES (u.id)", PATH,
     no("write", writes={"public.orders"})),
    ("INSERT INTO users VALUES (1) ON CONFLICT (id) DO UPDATE SET name = excluded.name", PATH,
     no("write", writes={"public.users"})),
    ("TRUNCATE users, orders", PATH, no("write", writes={"public.users", "public.orders"}, writes_all=False)),
    ("TRUNCATE orders CASCADE", PATH, no("write", writes_all=True)),
    ("COPY users FROM STDIN", PATH, no("write", writes={"public.users"})),
    ("COPY users (id, name) TO STDOUT", PATH, no("not-select", writes=set(), writes_all=False)),
    ("INSERT INTO hp.events VALUES (1, '2024-05-01')", PATH,
     no("write", writes={"hp.events", "hp.events_2024", "hp.events_2025", "hp.events_2025_a"})),
    ("DELETE FROM hp.events_2024", PATH, no("write", writes={"hp.events_2024", "hp.events"})),
    ("DELETE FROM hp.parent WHERE id = 1", PATH, no("write", writes={"hp.parent", "hp.child"}, writes_all=False)),
    ("INSERT INTO hp.audited VALUES (1)", PATH, no("write", writes_all=True)),  # a trigger may write anything
    ("INSERT INTO hp.ruled VALUES (1)", PATH, no("write", writes_all=True)),  # so may a rule
    ("UPDATE hp.items_view SET name = 'x'", PATH, no("write", writes={"hp.items"}, writes_all=False)),
    ("INSERT INTO not_there VALUES (1)", PATH, no("write", writes_all=True)),
    ("INSERT INTO orders VALUES (hp.g(1, 2))", PATH, no("write", writes={"public.orders"}, writes_all=True)),
    ("REFRESH MATERIALIZED VIEW hp.item_count", PATH, no("write", writes={"hp.item_count"}, writes_all=False)),
    ("EXPLAIN ANALYZE DELETE FROM orders", PATH, no("not-select", writes={"public.orders"})),
    ("EXPLAIN (ANALYZE false) DELETE FROM orders", PATH, no("not-select", writes=set())),
    ("EXPLAIN DELETE FROM orders", PATH, no("not-select", writes=set())),
    ("DO $$BEGIN PERFORM 1; END$$", PATH, no("write", writes_all=True)),
    ("CALL hp.some_procedure()", PATH, no("write", writes_all=True)),
    ("EXECUTE some_statement", PATH, no("write", writes_all=True)),
    ("ALTER TABLE users ADD COLUMN nick text", PATH, no("ddl", writes={"public.users"}, writes_all=True)),
    ("DROP TABLE orders, hp.items", PATH, no("ddl", writes={"public.orders", "hp.items"}, writes_all=True)),
    ("DROP FUNCTION twice(int)", PATH, no("ddl", writes=set(), writes_all=True)),
    ("CREATE INDEX ON users (name)", PATH, no("ddl", writes_all=True)),
    ("CREATE TEMP TABLE scratchpad (a int)", PATH, no("ddl", writes_all=False)),
    ("GRANT SELECT ON users TO PUBLIC", PATH, no("ddl", writes_all=True)),
    ("PREPARE q AS DELETE FROM orders", PATH, no("not-select", writes=set(), writes_all=False)),
    ("DECLARE c CURSOR FOR SELECT hp.g(1, 2)", PATH, no("not-select", writes_all=True)),
    ("LOCK TABLE users", PATH, no("not-select", writes=set(), writes_all=False)),
    # several statements: never cacheable, but every write counts
    ("UPDATE users SET name = 'x'; SELECT 1", PATH,
     no("multiple-statements", writes={"public.users"}, writes_all=False)),
    ("SELECT 1; CREATE TABLE t3 (a int)", PATH, no("multiple-statements", writes_all=True)),
    # parse errors: nothing runs if PostgreSQL agrees, but a newer server might accept it
    ("SELECT FROM WHERE", PATH, no("parse-error", writes_all=True)),
    ("SELECT 'unterminated", PATH, no("parse-error")),
    ("/* unterminated", PATH, no("parse-error")),
    ("SELECT * FROM users WHERE id = 1 FOR", PATH, no("parse-error")),
]


def _own_id(index: int, case: tuple[str, tuple[str, ...], dict[str, Any]]) -> str:
    return f"{index:03d}-{' '.join(case[0].split())[:60]}"


@pytest.mark.parametrize(("sql", "path", "expected"), [pytest.param(*c, id=_own_id(i, c))
                                                      for i, c in enumerate(OWN_CASES)])
def test_own_cases(sql: str, path: tuple[str, ...], expected: dict[str, Any], catalog: Catalog) -> None:
    verdict = classify(sql, path, catalog)
    got = {key: getattr(verdict, key) for key in expected}
    assert got == expected, verdict


# -- comment hints ------------------------------------------------------------------------------------

@pytest.mark.parametrize(("sql", "cacheable", "reason", "max_age"), [
    ("/* hyperpool: nocache */ SELECT * FROM users", False, "nocache-hint", None),
    ("/* hyperpool: max_age=5 */ SELECT * FROM users", True, "cacheable", 5.0),
    ("/*hyperpool:max_age = 2.5*/SELECT 1", True, "cacheable", 2.5),
    ("/* HyperPool: max_age=2.5, nocache */ SELECT 1", False, "nocache-hint", 2.5),
    ("-- hyperpool: nocache\nSELECT 1", False, "nocache-hint", None),
    ("/* app: checkout */ /* hyperpool: max_age=7 */ SELECT 1", True, "cacheable", 7.0),
    ("/* outer /* nested */ still a comment */ -- x\n /* hyperpool: max_age=9 */ SELECT 1", True, "cacheable", 9.0),
    ("/* hyperpool: max_age=0 */ SELECT 1", False, "nocache-hint", None),
    ("/* hyperpool: nocache */ SELECT now()", False, "stable-function", None),  # the real reason is kept
    ("/* hyperpool: max_age=5 */ UPDATE users SET name = 'x'", False, "write", 5.0),
    ("SELECT 1 /* hyperpool: nocache */", True, "cacheable", None),  # only leading comments count
    ("SELECT '/* hyperpool: nocache */'", True, "cacheable", None),
    ("/* hyperpool: nocachex, max_age=abc */ SELECT 1", True, "cacheable", None),
])
def test_hints(sql: str, cacheable: bool, reason: str, max_age: float | None, catalog: Catalog) -> None:
    verdict = classify(sql, PATH, catalog)
    assert (verdict.cacheable, verdict.reason, verdict.max_age) == (cacheable, reason, max_age)


def test_hints_without_a_catalog() -> None:
    assert hints("SELECT 1") == (False, None)
    assert hints("/* hyperpool: nocache") == (False, None)  # unterminated: not a comment we read
    assert hints("  \n/* hyperpool:nocache */") == (True, None)


# -- memoization --------------------------------------------------------------------------------------

@pytest.fixture
def parses(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Every text pgparse.parse is called with from now on (the memo starts empty)."""
    clear_memo()
    seen: list[str] = []
    real = pgparse.parse

    def counting(sql: str) -> Any:
        seen.append(sql)
        return real(sql)

    monkeypatch.setattr(pgparse, "parse", counting)
    return seen


def test_a_shape_is_parsed_once(parses: list[str], loaded: Loaded) -> None:
    catalog = loaded.catalog
    first = classify("SELECT name FROM users WHERE id = 1", PATH, catalog)
    assert classify("SELECT name FROM users WHERE id = 2", PATH, catalog) == first
    assert classify("SELECT name FROM users WHERE id = 345", PATH, catalog) == first
    assert classify("SELECT name FROM users WHERE id = 1", PATH, catalog) == first  # the text memo
    assert len(parses) == 1
    # another search_path, or a reloaded catalog, is a new key
    assert classify("SELECT name FROM users WHERE id = 7", ("hp", "public"), catalog).reads == {"public.users"}
    assert len(parses) == 2
    reloaded = Catalog.from_rows(*loaded.rows)
    assert classify("SELECT name FROM users WHERE id = 8", PATH, reloaded) == first
    assert len(parses) == 3


def test_same_text_other_path_other_reads(parses: list[str], catalog: Catalog) -> None:
    assert classify("SELECT a FROM things", ("hp",), catalog).reads == {"hp.things"}
    assert classify("SELECT a FROM things", ("hp2",), catalog).reads == {"hp2.things"}
    assert classify("SELECT a FROM things", ("hp",), catalog).reads == {"hp.things"}
    assert len(parses) == 2


def test_time_words_in_literals_never_share_a_memo_entry(parses: list[str], catalog: Catalog) -> None:
    dated = "SELECT * FROM users WHERE created_at > '2024-01-01'"
    assert classify(dated, PATH, catalog).cacheable
    assert not classify("SELECT * FROM users WHERE created_at > 'now'", PATH, catalog).cacheable
    assert not classify(r"SELECT * FROM users WHERE created_at > E'\x6eow'", PATH, catalog).cacheable
    assert classify("SELECT * FROM users WHERE created_at > '2025-02-02'", PATH, catalog).cacheable
    assert len(parses) == 3  # the time words were parsed on their own


def test_hints_are_not_part_of_the_shape_verdict(parses: list[str], catalog: Catalog) -> None:
    assert not classify("/* hyperpool: nocache */ SELECT 1", PATH, catalog).cacheable
    assert classify("SELECT 1", PATH, catalog).cacheable
    assert classify("/* hyperpool: max_age=3 */ SELECT 2", PATH, catalog).max_age == 3.0


def test_shape_key() -> None:
    assert shape_key("SELECT * FROM t WHERE a = 1 AND b = 'x'") == shape_key("SELECT * FROM t WHERE a = 2 AND b = 'y'")
    assert shape_key("SELECT 'now'") == "SELECT 'now'"
    assert shape_key(r"SELECT E'\x41'") == r"SELECT E'\x41'"
    assert shape_key("SELEC 1") == "SELEC 1"


# -- helpers ------------------------------------------------------------------------------------------

@pytest.mark.parametrize(("setting", "user", "expected"), [
    ('"$user", public', "app", ("app", "public")),
    ('"$user", public', None, ("public",)),
    ("public", "app", ("public",)),
    ('Sales, "Mixed Case", "a""b",pg_temp', None, ("sales", "Mixed Case", 'a"b', "pg_temp")),
    ("", None, ()),
    ("public, public", None, ("public",)),
])
def test_parse_search_path(setting: str, user: str | None, expected: tuple[str, ...]) -> None:
    assert parse_search_path(setting, user) == expected


def test_time_sensitive() -> None:
    assert time_sensitive("now") and time_sensitive(" Today ") and time_sensitive("10:00tomorrow")
    assert not time_sensitive("knowledge") and not time_sensitive("2024-01-01") and not time_sensitive("snow")


def test_an_empty_catalog_caches_only_constants() -> None:
    empty = Catalog()
    assert classify("SELECT 1, 'a', ARRAY[1], (2)", PATH, empty) == Verdict(True, "cacheable")
    assert classify("SELECT 1 + 1", PATH, empty).reason == "unknown-operator"
    assert classify("SELECT lower('A')", PATH, empty).reason == "unknown-function"
    assert classify("SELECT * FROM users", PATH, empty).reason == "unknown-relation"
