"""Unit tests for hyperpool.sql.effects: what a statement does to its session, read with PostgreSQL's grammar."""

from __future__ import annotations

import re
from typing import Any

import pgparse
import pytest

from hyperpool.sql.effects import (
    NO_EFFECTS,
    PIN_REASONS,
    Effects,
    effects,
    prepare_statement,
    refusal_sql,
    worth_parsing,
    worth_parsing_refusing,
)

CHECK = Effects(check_after=True)


def pinned(*reasons: str, statements: int = 1) -> Effects:
    return Effects(pins=reasons, check_after=True, statements=statements)


EFFECT_CASES = [
    # LISTEN / UNLISTEN
    pytest.param("LISTEN chan", pinned("listen"), id="listen"),
    pytest.param("UNLISTEN chan", CHECK, id="unlisten"),
    pytest.param("UNLISTEN *", CHECK, id="unlisten-all"),
    # advisory locks: session-level ones pin, transaction-level ones do not
    pytest.param("SELECT pg_advisory_lock(1)", pinned("advisory_lock"), id="advisory-lock"),
    pytest.param("SELECT pg_advisory_lock_shared(1, 2)", pinned("advisory_lock"), id="advisory-lock-shared"),
    pytest.param("SELECT pg_try_advisory_lock(1)", pinned("advisory_lock"), id="try-advisory-lock"),
    pytest.param("select pg_try_advisory_lock_shared(1, 2)", pinned("advisory_lock"), id="try-advisory-lock-shared"),
    pytest.param("SELECT pg_catalog.pg_advisory_lock(1)", pinned("advisory_lock"), id="advisory-lock-qualified"),
    pytest.param("SELECT pg_advisory_xact_lock(1)", NO_EFFECTS, id="advisory-xact-lock"),
    pytest.param("SELECT pg_try_advisory_xact_lock_shared(1)", NO_EFFECTS, id="try-advisory-xact-lock-shared"),
    pytest.param("SELECT pg_advisory_unlock(1)", CHECK, id="advisory-unlock"),
    pytest.param("SELECT pg_advisory_unlock_shared(1)", CHECK, id="advisory-unlock-shared"),
    pytest.param("SELECT pg_advisory_unlock_all()", CHECK, id="advisory-unlock-all"),
    # roles
    pytest.param("SET ROLE bob", pinned("role"), id="set-role"),
    pytest.param("SET ROLE TO bob", pinned("role"), id="set-role-to"),
    pytest.param("SET role = 'bob'", pinned("role"), id="set-role-equals"),
    pytest.param("SET SESSION ROLE bob", pinned("role"), id="set-session-role"),
    pytest.param("SET SESSION AUTHORIZATION bob", pinned("role"), id="set-session-authorization"),
    pytest.param("SET LOCAL ROLE bob", CHECK, id="set-local-role"),
    pytest.param("SET LOCAL SESSION AUTHORIZATION bob", CHECK, id="set-local-session-authorization"),
    pytest.param("RESET ROLE", CHECK, id="reset-role"),
    pytest.param("RESET SESSION AUTHORIZATION", CHECK, id="reset-session-authorization"),
    pytest.param("SET SESSION AUTHORIZATION DEFAULT", CHECK, id="session-authorization-default"),
    pytest.param("SET search_path = app, public", CHECK, id="set-other"),
    # temporary relations
    pytest.param("CREATE TEMP TABLE t (a int)", pinned("temp_table"), id="create-temp-table"),
    pytest.param("CREATE TEMPORARY TABLE t (a int)", pinned("temp_table"), id="create-temporary-table"),
    pytest.param("CREATE LOCAL TEMP TABLE t (a int)", pinned("temp_table"), id="create-local-temp-table"),
    pytest.param("create temp table t as select 1", pinned("temp_table"), id="create-temp-table-as"),
    pytest.param("SELECT 1 AS a INTO TEMP t", pinned("temp_table"), id="select-into-temp"),
    pytest.param("SELECT 1 AS a INTO TEMPORARY TABLE t", pinned("temp_table"), id="select-into-temporary-table"),
    pytest.param("CREATE TABLE pg_temp.x (a int)", pinned("temp_table"), id="create-table-pg-temp"),
    pytest.param("CREATE TEMP VIEW v AS SELECT 1", pinned("temp_table"), id="create-temp-view"),
    pytest.param("CREATE VIEW pg_temp.v AS SELECT 1", pinned("temp_table"), id="create-view-pg-temp"),
    pytest.param("CREATE TEMP SEQUENCE s", pinned("temp_table"), id="create-temp-sequence"),
    pytest.param("CREATE TABLE t (a int)", NO_EFFECTS, id="create-table"),
    pytest.param("CREATE UNLOGGED TABLE t (a int)", NO_EFFECTS, id="create-unlogged-table"),
    pytest.param("CREATE TABLE t AS SELECT 1", NO_EFFECTS, id="create-table-as"),
    pytest.param("SELECT 1 AS a INTO t", NO_EFFECTS, id="select-into"),
    pytest.param("CREATE VIEW v AS SELECT 1", NO_EFFECTS, id="create-view"),
    pytest.param("CREATE SEQUENCE s", NO_EFFECTS, id="create-sequence"),
    # cursors
    pytest.param("DECLARE c CURSOR WITH HOLD FOR SELECT 1", pinned("hold_cursor"), id="declare-with-hold"),
    pytest.param("DECLARE c SCROLL CURSOR WITH HOLD FOR SELECT 1", pinned("hold_cursor"), id="declare-scroll-hold"),
    pytest.param("DECLARE c CURSOR FOR SELECT 1", CHECK, id="declare"),
    pytest.param("DECLARE c BINARY CURSOR WITHOUT HOLD FOR SELECT 1", CHECK, id="declare-without-hold"),
    # prepared statements
    pytest.param("DEALLOCATE foo", Effects(check_after=True, deallocates=("foo",)), id="deallocate"),
    pytest.param("DEALLOCATE PREPARE foo", Effects(check_after=True, deallocates=("foo",)), id="deallocate-prepare"),
    pytest.param('DEALLOCATE "MyStmt"', Effects(check_after=True, deallocates=("MyStmt",)), id="deallocate-quoted"),
    pytest.param("DEALLOCATE MyStmt", Effects(check_after=True, deallocates=("mystmt",)), id="deallocate-folded"),
    pytest.param("DEALLOCATE ALL", Effects(check_after=True, deallocates_all=True), id="deallocate-all"),
    pytest.param("DEALLOCATE PREPARE ALL", Effects(check_after=True, deallocates_all=True),
                 id="deallocate-prepare-all"),
    pytest.param("DISCARD ALL", Effects(check_after=True, deallocates_all=True), id="discard-all"),
    pytest.param("DISCARD TEMP", CHECK, id="discard-temp"),
    pytest.param("DISCARD PLANS", CHECK, id="discard-plans"),
    pytest.param("PREPARE p AS SELECT 1", CHECK, id="prepare"),
    # other state changes without a telling command tag
    pytest.param("select set_config('a','b',false)", CHECK, id="set-config"),
    pytest.param("SELECT pg_catalog.set_config('search_path', 'x', false)", CHECK, id="set-config-qualified"),
    pytest.param("DO $$BEGIN PERFORM 1; END$$", CHECK, id="do"),
    pytest.param("CALL proc()", CHECK, id="call"),
    # nothing
    pytest.param("SELECT abalance FROM pgbench_accounts WHERE aid = 1", NO_EFFECTS, id="plain-select"),
    pytest.param("UPDATE t SET a = 1 WHERE b = 2", NO_EFFECTS, id="update"),
    pytest.param("BEGIN", NO_EFFECTS, id="begin"),
    pytest.param("SELECT 'pg_advisory_lock(1)', 'temp table'", NO_EFFECTS, id="words-in-strings"),
    # mixed case keywords
    pytest.param("LiStEn chan", pinned("listen"), id="mixed-case-listen"),
    pytest.param("SeLeCt PG_ADVISORY_LOCK(1)", pinned("advisory_lock"), id="mixed-case-advisory"),
    pytest.param("CrEaTe TeMp TaBlE t (a int)", pinned("temp_table"), id="mixed-case-temp"),
    pytest.param("dIsCaRd AlL", Effects(check_after=True, deallocates_all=True), id="mixed-case-discard"),
    pytest.param("sEt RoLe bob", pinned("role"), id="mixed-case-role"),
    # nested statements
    pytest.param("select * from (select pg_advisory_lock(1)) s", pinned("advisory_lock"), id="in-subquery"),
    pytest.param("WITH x AS (SELECT pg_advisory_lock(1)) SELECT * FROM x", pinned("advisory_lock"), id="in-cte"),
    pytest.param("SELECT a FROM t WHERE b IN (SELECT pg_try_advisory_lock(b) FROM u)", pinned("advisory_lock"),
                 id="in-where-subquery"),
    pytest.param("SELECT coalesce(1, (SELECT set_config('a', 'b', false))::int)", CHECK, id="set-config-nested"),
    pytest.param("WITH d AS (DELETE FROM t RETURNING a) SELECT pg_advisory_unlock(a) FROM d", CHECK,
                 id="unlock-after-cte"),
    # syntax errors and empty strings
    pytest.param("SELEC 1", Effects(statements=0), id="syntax-error"),
    pytest.param("LISTEN", Effects(statements=0), id="syntax-error-listen"),
    pytest.param("select 1; select (", Effects(statements=0), id="syntax-error-second-statement"),
    pytest.param("", Effects(statements=0), id="empty"),
    pytest.param("-- just a comment", Effects(statements=0), id="comment-only"),
]


@pytest.mark.parametrize(("sql", "result"), EFFECT_CASES)
def test_effects(sql: str, result: Effects) -> None:
    assert effects(sql.encode()) == result


def test_set_role_none_is_a_reset() -> None:
    """SET ROLE NONE sets the current user back to the session user, as RESET ROLE does (PostgreSQL's docs:
    "The NONE and RESET forms reset the current user identifier to be the current session user identifier"):
    it leaves nothing behind to pin for, and ``pinning: refuse`` should not refuse it."""
    assert effects(b"SET ROLE NONE") == effects(b"RESET ROLE") == CHECK


@pytest.mark.parametrize(
    ("sql", "result"),
    [
        pytest.param("LISTEN a; SELECT pg_advisory_lock(1); DEALLOCATE x",
                     Effects(("listen", "advisory_lock"), True, ("x",), False, 3), id="three-kinds"),
        pytest.param("CREATE TEMP TABLE a (x int); CREATE TEMP TABLE b (x int)", pinned("temp_table", statements=2),
                     id="reasons-not-repeated"),
        pytest.param("DEALLOCATE a; DEALLOCATE b; DISCARD ALL", Effects((), True, ("a", "b"), True, 3),
                     id="deallocations"),
        pytest.param("BEGIN; DECLARE c CURSOR WITH HOLD FOR SELECT 1; COMMIT", pinned("hold_cursor", statements=3),
                     id="hold-cursor-in-transaction"),
        pytest.param("SELECT 1; SELECT 2;", Effects(statements=2), id="plain-statements"),
        pytest.param("SELECT 1; SET ROLE bob; SELECT pg_advisory_xact_lock(2)", pinned("role", statements=3),
                     id="role-and-xact-lock"),
        pytest.param("SET LOCAL ROLE bob; SELECT 1", Effects(check_after=True, statements=2),
                     id="check-without-pin"),
    ],
)
def test_effects_of_several_statements(sql: str, result: Effects) -> None:
    assert effects(sql.encode()) == result


def test_effects_pin_reasons_are_known() -> None:
    for param in EFFECT_CASES:
        sql, result = param.values
        assert isinstance(result, Effects)
        assert set(result.pins) <= set(PIN_REASONS), sql


def test_effects_of_non_utf8_bytes_does_not_raise() -> None:
    assert effects(b"SELECT '\xff\xfe'") == NO_EFFECTS
    assert effects(b"LISTEN \"\xff\"") == pinned("listen")


def test_effects_is_memoized() -> None:
    sql = b"SELECT pg_advisory_lock(12345678)"
    assert effects(sql) is effects(sql)


# --- the cheap pre-filter ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "allowing", "refusing"),
    [
        pytest.param(b"SELECT abalance FROM pgbench_accounts WHERE aid = 1", False, False, id="plain"),
        pytest.param(b"DEALLOCATE x", True, True, id="deallocate"),
        pytest.param(b"DISCARD ALL", True, True, id="discard"),
        pytest.param(b"SELECT PG_ADVISORY_LOCK(1)", True, True, id="advisory-upper"),
        pytest.param(b"create TEMP table t (a int)", True, True, id="temp"),
        pytest.param(b"SELECT * FROM contemporary", True, True, id="false-positive-temp"),
        pytest.param(b"SELECT Set_Config('a', 'b', false)", True, True, id="set-config"),
        pytest.param(b"LISTEN chan", False, True, id="listen"),
        pytest.param(b"UNLISTEN chan", False, True, id="unlisten"),
        pytest.param(b"DECLARE c CURSOR WITH HOLD FOR SELECT 1", False, True, id="hold"),
        pytest.param(b"SET ROLE bob", False, True, id="role"),
        pytest.param(b"SET SESSION AUTHORIZATION bob", False, True, id="authorization"),
        pytest.param(b"SET search_path = x", False, False, id="set"),
        pytest.param(b"", False, False, id="empty"),
    ],
)
def test_worth_parsing(text: bytes, allowing: bool, refusing: bool) -> None:
    assert worth_parsing(text, 0, len(text)) is allowing
    assert worth_parsing_refusing(text, 0, len(text)) is refusing
    # only the given range is looked at
    framed = b"discard listen " + text + b" temp role"
    start = len(b"discard listen ")
    assert worth_parsing(framed, start, start + len(text)) is allowing
    assert worth_parsing_refusing(framed, start, start + len(text)) is refusing


def test_worth_parsing_range_boundaries() -> None:
    data = b"xxtempxx"
    assert worth_parsing(data, 2, 6)
    assert not worth_parsing(data, 3, 8)
    assert not worth_parsing(data, 0, 5)


def test_everything_that_pins_is_worth_parsing_when_refusing() -> None:
    for param in EFFECT_CASES:
        sql, result = param.values
        assert isinstance(sql, str) and isinstance(result, Effects)
        data = sql.encode()
        if result.pins:
            assert worth_parsing_refusing(data, 0, len(data)), sql
        if result != NO_EFFECTS and result.statements and not result.pins and not sql.lower().startswith(
                ("unlisten", "set", "reset", "declare", "prepare", "do", "call")):
            # an effect no command tag shows: the allowing filter must see it too
            assert worth_parsing(data, 0, len(data)), sql


# --- prepare_statement -------------------------------------------------------------------------


def one_prepare(text: str) -> dict[str, Any]:
    tree = pgparse.parse(text)
    assert len(tree) == 1
    return tree[0]["stmt"]["PrepareStmt"]


@pytest.mark.parametrize(
    ("sql", "name", "statement"),
    [
        pytest.param("PREPARE p AS SELECT 1", "p", "PREPARE p AS SELECT 1", id="alone"),
        pytest.param("PREPARE p AS SELECT 1;", "p", "PREPARE p AS SELECT 1", id="alone-semicolon"),
        pytest.param("SELECT 1; PREPARE p AS SELECT 2", "p", "PREPARE p AS SELECT 2", id="last"),
        pytest.param("PREPARE p AS SELECT 1; PREPARE q (int) AS SELECT $1; SELECT 3", "q",
                     "PREPARE q (int) AS SELECT $1", id="middle"),
        pytest.param("PREPARE p AS SELECT 1; PREPARE q AS SELECT 2", "p", "PREPARE p AS SELECT 1", id="first"),
        pytest.param("SELECT 'é'; PREPARE p AS SELECT 'ü'", "p", "PREPARE p AS SELECT 'ü'", id="non-ascii-before"),
        pytest.param('PREPARE "MyStmt" AS SELECT 1', "MyStmt", 'PREPARE "MyStmt" AS SELECT 1', id="quoted-name"),
        pytest.param("PREPARE MyStmt AS SELECT 1", "mystmt", "PREPARE MyStmt AS SELECT 1", id="folded-name"),
    ],
)
def test_prepare_statement(sql: str, name: str, statement: str) -> None:
    result = prepare_statement(sql, name)
    assert result is not None
    assert result.strip() == statement
    assert result in sql
    assert one_prepare(result)["name"] == name


@pytest.mark.parametrize(
    ("sql", "name"),
    [
        pytest.param("PREPARE p AS SELECT 1", "q", id="other-name"),
        pytest.param("PREPARE MyStmt AS SELECT 1", "MyStmt", id="name-was-folded"),
        pytest.param("SELECT 1", "p", id="no-prepare"),
        pytest.param("EXECUTE p", "p", id="execute"),
        pytest.param("PREPARE p AS SELEC 1", "p", id="syntax-error"),
        pytest.param("", "p", id="empty"),
    ],
)
def test_prepare_statement_absent(sql: str, name: str) -> None:
    assert prepare_statement(sql, name) is None


# --- refusal_sql -------------------------------------------------------------------------------


def raise_options(sql: str) -> dict[str, str]:
    """The RAISE options of refusal_sql's DO block, as the strings PostgreSQL would see."""
    try:
        tree = pgparse.parse(sql)
    except pgparse.PGQueryError as exc:
        pytest.fail(f"refusal_sql gave a statement that does not parse ({exc}): {sql}")
    assert len(tree) == 1
    do = tree[0]["stmt"]["DoStmt"]
    (arg,) = do["args"]
    assert arg["DefElem"]["defname"] == "as"
    body = arg["DefElem"]["arg"]["String"]["sval"]
    function = pgparse.parse_pgsql(f"CREATE FUNCTION f() RETURNS void LANGUAGE plpgsql AS $body${body}$body$")
    statements = function[0]["PLpgSQL_function"]["action"]["PLpgSQL_stmt_block"]["body"]
    raises = [s["PLpgSQL_stmt_raise"] for s in statements if "PLpgSQL_stmt_raise" in s]
    assert len(raises) == 1
    names = {0: "ERRCODE", 1: "MESSAGE", 2: "DETAIL", 3: "HINT"}
    options: dict[str, str] = {}
    for option in raises[0]["options"]:
        opt = option["PLpgSQL_raise_option"]
        expr = opt["expr"]["PLpgSQL_expr"]["query"]
        value = pgparse.parse(f"SELECT {expr}")[0]["stmt"]["SelectStmt"]["targetList"][0]["ResTarget"]["val"]
        options[names[opt.get("opt_type", 0)]] = value["A_Const"]["sval"]["sval"]
    return options


def test_refusal_sql_is_one_do_statement() -> None:
    sql = refusal_sql(("listen",), "app")
    assert sql.startswith("DO ")
    assert "ERRCODE = '0A000'" in sql
    assert raise_options(sql) == {
        "ERRCODE": "0A000",
        "MESSAGE": "LISTEN cannot be used through hyperpool's transaction pooling on database \"app\" "
                   "(pinning: refuse)",
        "HINT": "Use a session-pooled database entry for this, or set pinning: allow.",
    }
    assert effects(sql.encode()) == Effects(check_after=True)  # a DO: no pin, so it is never refused itself


def test_refusal_sql_names_every_reason() -> None:
    options = raise_options(refusal_sql(PIN_REASONS, "app"))
    assert options["MESSAGE"] == (
        "LISTEN, session-level advisory locks, temporary tables, WITH HOLD cursors, "
        "SET ROLE and SET SESSION AUTHORIZATION cannot be used through hyperpool's transaction pooling on "
        "database \"app\" (pinning: refuse)")


def test_refusal_sql_unknown_reason_is_shown_as_is() -> None:
    assert raise_options(refusal_sql(("something",), "app"))["MESSAGE"].startswith("something cannot be used")


@pytest.mark.parametrize(
    "database",
    [
        pytest.param("o'brien", id="single-quote"),
        pytest.param("it''s", id="two-single-quotes"),
        pytest.param("'; DROP TABLE t; --", id="injection-attempt"),
        pytest.param('we"ird', id="double-quote"),
        pytest.param("bäckerei", id="non-ascii"),
        pytest.param("a$$b", id="dollars"),
        pytest.param("a$hyperpool$b", id="dollar-quote-tag"),
    ],
)
def test_refusal_sql_quotes_the_database_name(database: str) -> None:
    sql = refusal_sql(("temp_table",), database)
    options = raise_options(sql)
    assert options["ERRCODE"] == "0A000"
    assert options["MESSAGE"] == (f"temporary tables cannot be used through hyperpool's transaction pooling on "
                                  f"database \"{database}\" (pinning: refuse)")
    assert re.fullmatch(r"DO \$(\w*)\$.*\$\1\$", sql, re.DOTALL)
