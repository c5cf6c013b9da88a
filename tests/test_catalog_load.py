"""A database's catalog is read on a pooled connection once a client has logged in, and again on reload."""

from __future__ import annotations

import time
import uuid
from pathlib import Path

import psycopg
import yaml

from hyperpool.config import load_config
from hyperpool.embedded import EmbeddedPostgres
from hyperpool.sql.classify import classify
from tests.support import APPDB, OWNER, OWNER_PASSWORD, ProxyRunner, base_config


def wait_for_catalog(proxy: ProxyRunner, reads: int = 0) -> object:
    """The catalog once it has been read more than ``reads`` times."""
    database = proxy.state.databases[APPDB]
    for _ in range(200):
        catalog, count = proxy.run(lambda: (database.catalog, database.catalog_reads))
        if catalog is not None and count > reads:
            return catalog
        time.sleep(0.05)
    raise AssertionError("the catalog was not read")


def test_catalog_is_read_on_first_use_and_on_reload(pg: EmbeddedPostgres, tmp_path: Path) -> None:
    first, second = f"cat_a_{uuid.uuid4().hex[:8]}", f"cat_b_{uuid.uuid4().hex[:8]}"
    dsn = f"host=127.0.0.1 port={pg.port} user={OWNER} password={OWNER_PASSWORD} dbname={APPDB}"
    with psycopg.connect(dsn, autocommit=True) as admin:
        admin.execute(f"create table {first} (id int)")
    path = tmp_path / "hyperpool.yaml"
    path.write_text(yaml.safe_dump(base_config(pg.port)))
    proxy = ProxyRunner(load_config(path), str(path)).start()
    try:
        assert proxy.run(lambda: proxy.state.databases[APPDB].catalog_reads) == 0  # nobody asked yet
        psycopg.connect(proxy.dsn()).close()
        catalog = wait_for_catalog(proxy)
        verdict = classify(f"select id from {first} where id = 1", ("public",), catalog)  # type: ignore[arg-type]
        assert verdict.cacheable and verdict.reads == {f"public.{first}"}
        assert classify(f"select * from {second}", ("public",), catalog).reason == "unknown-relation"  # type: ignore[arg-type]
        with psycopg.connect(dsn, autocommit=True) as admin:
            admin.execute(f"create table {second} (id int)")
        before = proxy.run(lambda: proxy.state.databases[APPDB].catalog_reads)
        assert proxy.run(proxy.server.reload)
        catalog = wait_for_catalog(proxy, reads=before)
        assert classify(f"select * from {second}", ("public",), catalog).cacheable  # type: ignore[arg-type]
    finally:
        proxy.stop()
        with psycopg.connect(dsn, autocommit=True) as admin:
            admin.execute(f"drop table if exists {first}, {second}")
