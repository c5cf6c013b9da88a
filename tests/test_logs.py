"""Log lines: the events that matter, as text or JSON, never with a secret or a query's values."""

from __future__ import annotations

import io
import json
import logging
import threading
import time
from collections.abc import Iterator

import psycopg
import pytest

from hyperpool import logs
from hyperpool.embedded import EmbeddedPostgres
from hyperpool.protocol import scram
from tests.support import (
    APP_PASSWORD,
    OWNER_PASSWORD,
    base_config,
    free_port,
    hold_the_server,
    let_go,
    start_proxy,
)

WRONG = "wrong-Secret-4711"
LITERAL = "distinctive-literal-9931"


@pytest.fixture
def captured() -> Iterator[tuple[io.StringIO, io.StringIO]]:
    """Every log record of the run, formatted as text and as JSON."""
    text, as_json = io.StringIO(), io.StringIO()
    root = logging.getLogger()
    handlers = [logging.StreamHandler(text), logging.StreamHandler(as_json)]
    handlers[0].setFormatter(logging.Formatter(logs.TEXT_FORMAT))
    handlers[1].setFormatter(logs.JsonFormatter())
    old_level = root.level
    root.setLevel(logging.DEBUG)
    for handler in handlers:
        root.addHandler(handler)
    try:
        yield text, as_json
    finally:
        for handler in handlers:
            root.removeHandler(handler)
        root.setLevel(old_level)


def test_events_are_logged_without_secrets(pg: EmbeddedPostgres, captured: tuple[io.StringIO, io.StringIO]) -> None:
    text, as_json = captured
    cfg = base_config(pg.port, log_slow_query_ms=50, db={"pool_size": 1, "min_pool_size": 1})
    verifier = str(scram.make_verifier(APP_PASSWORD))
    cfg["users"] = {"app": {"password": verifier}}
    cfg["databases"]["down"] = {"host": "127.0.0.1", "port": free_port(), "user": "app_owner",
                                "password": OWNER_PASSWORD, "sslmode": "disable"}
    proxy = start_proxy(cfg)
    try:
        with pytest.raises(psycopg.OperationalError):
            psycopg.connect(proxy.dsn(password=WRONG))
        with pytest.raises(psycopg.OperationalError):
            psycopg.connect(proxy.dsn(dbname="down"))
        with psycopg.connect(proxy.dsn(), autocommit=True) as conn:
            conn.execute(f"select pg_sleep(0.1), '{LITERAL}'")
            conn.execute("select pg_sleep(0.1), %s", (LITERAL,))
            holder = hold_the_server(proxy.port)
            waited: list[object] = []
            thread = threading.Thread(target=lambda: waited.append(conn.execute("select 1").fetchone()))
            thread.start()
            time.sleep(1.3)  # longer than LONG_WAIT
            let_go(holder)
            thread.join(10)
            assert waited == [(1,)]
    finally:
        proxy.stop()
    lines = text.getvalue()
    for needle in ("client authentication failed for user 'app'", "slow query on database appdb",
                   "waited 1.", "could not connect to the database", "hyperpool listening", "hyperpool stopped"):
        assert needle in lines, needle
    for secret in (APP_PASSWORD, OWNER_PASSWORD, WRONG, LITERAL, verifier, verifier.split("$")[-1]):
        assert secret not in lines and secret not in as_json.getvalue(), secret
    entries = [json.loads(line) for line in as_json.getvalue().splitlines()]
    assert entries and all({"ts", "level", "logger", "message"} <= set(e) for e in entries)
    assert any(e["level"] == "warning" and e["message"].startswith("slow query") for e in entries)


def test_setup_json_format() -> None:
    stream = io.StringIO()
    handler = logs.setup("info", "json", stream)
    try:
        logging.getLogger("hyperpool.test").info("hello %s", "world")
        entry = json.loads(stream.getvalue().splitlines()[-1])
        assert (entry["level"], entry["logger"], entry["message"]) == ("info", "hyperpool.test", "hello world")
    finally:
        logging.getLogger().removeHandler(handler)
