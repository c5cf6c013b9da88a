"""/metrics, /healthz and /readyz against a live pool: the numbers move as the workload does."""

from __future__ import annotations

import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import psycopg
import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

from hyperpool.config import load_config
from hyperpool.embedded import EmbeddedPostgres
from tests.support import (
    APPDB,
    OWNER,
    ProxyRunner,
    base_config,
    catalog_read,
    free_port,
    hold_the_server,
    let_go,
    query_msg,
    raw_login,
    read_messages,
    start_proxy,
)
from tests.test_admin import cache_config, populate_cache


def get(proxy: ProxyRunner, path: str) -> tuple[int, str]:
    port = proxy.server.metrics.port
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=10) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()


def scrape(proxy: ProxyRunner) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    status, text = get(proxy, "/metrics")
    assert status == 200
    samples = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            samples[sample.name, tuple(sorted(sample.labels.items()))] = sample.value
    return samples


def value(samples: dict[tuple[str, tuple[tuple[str, str], ...]], float], name: str, **labels: str) -> float:
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


@pytest.fixture
def metrics_proxy(pg: EmbeddedPostgres) -> Any:
    runner = start_proxy(base_config(pg.port, metrics={"host": "127.0.0.1", "port": 0},
                                     db={"pool_size": 2, "min_pool_size": 1}))
    yield runner
    runner.stop()


def test_a_cache_hit_moves_the_hit_counter(metrics_proxy: ProxyRunner) -> None:
    """Real queries, not the cache's API: a repeated read is a miss, then a hit."""
    with psycopg.connect(metrics_proxy.dsn(), autocommit=True) as conn:
        catalog_read(metrics_proxy)  # (nothing is classified before the catalog is read)
        before = scrape(metrics_proxy)
        assert conn.execute("select 40 + 2 as answer").fetchone() == (42,)
        assert conn.execute("select 40 + 2 as answer").fetchone() == (42,)
    after = scrape(metrics_proxy)

    def moved(status: str) -> float:
        name = "hyperpool_cache_requests_total"
        return value(after, name, database=APPDB, status=status) - value(before, name, database=APPDB, status=status)

    assert (moved("miss"), moved("hit")) == (1, 1)
    assert value(after, "hyperpool_cache_entries", database=APPDB) >= 1


def test_counters_move_with_the_workload(metrics_proxy: ProxyRunner) -> None:
    before = scrape(metrics_proxy)
    with psycopg.connect(metrics_proxy.dsn(), autocommit=True) as conn:
        for _ in range(20):
            conn.execute("/* hyperpool: nocache */ select 1")  # each one to the database
        with pytest.raises(psycopg.errors.DivisionByZero):
            conn.execute("select 1/0")
    after = scrape(metrics_proxy)
    for name in ("hyperpool_transactions_total", "hyperpool_queries_total"):
        assert value(after, name, database=APPDB) - value(before, name, database=APPDB) >= 20, name
    assert value(after, "hyperpool_bytes_sent_total", database=APPDB) > value(before, "hyperpool_bytes_sent_total",
                                                                               database=APPDB)
    assert value(after, "hyperpool_errors_total", database=APPDB, sqlstate_class="22") == 1
    count = "hyperpool_query_duration_seconds_count"
    assert value(after, count, database=APPDB) - value(before, count, database=APPDB) >= 20
    assert value(after, "hyperpool_pool_max", database=APPDB, user=OWNER) == 2
    assert value(after, "hyperpool_info", version=__import__("hyperpool").__version__) == 1


def test_waiting_clients_are_counted(pg: EmbeddedPostgres) -> None:
    proxy = start_proxy(base_config(pg.port, metrics={"port": 0}, db={"pool_size": 1, "min_pool_size": 1}))
    try:
        holder = hold_the_server(proxy.port)
        waiters = [raw_login(proxy.port) for _ in range(10)]
        for i, w in enumerate(waiters):  # distinct texts: identical misses would share one query cache fill
            w.sendall(query_msg(f"select {i}"))
        for _ in range(100):
            samples = scrape(proxy)
            if value(samples, "hyperpool_clients", database=APPDB, user=OWNER, state="waiting") == 10:
                break
            time.sleep(0.05)
        assert value(samples, "hyperpool_clients", database=APPDB, user=OWNER, state="waiting") == 10
        assert value(samples, "hyperpool_clients", database=APPDB, user=OWNER, state="active") == 1
        assert value(samples, "hyperpool_servers", database=APPDB, user=OWNER, state="active") == 1
        let_go(holder)
        for w in waiters:
            assert read_messages(w)[-1][0] == b"Z"
            w.close()
        samples = scrape(proxy)
        assert value(samples, "hyperpool_client_wait_seconds_count", database=APPDB) >= 10
    finally:
        proxy.stop()


def test_pinned_and_auth_failures(metrics_proxy: ProxyRunner) -> None:
    with pytest.raises(psycopg.OperationalError):
        psycopg.connect(metrics_proxy.dsn(password="wrong"))
    with psycopg.connect(metrics_proxy.dsn(), autocommit=True) as conn:
        conn.execute("listen hp_metrics")
        for _ in range(100):
            samples = scrape(metrics_proxy)
            if value(samples, "hyperpool_pinned_clients", database=APPDB, reason="listen") == 1:
                break
            time.sleep(0.02)
        assert value(samples, "hyperpool_pinned_clients", database=APPDB, reason="listen") == 1
        assert value(samples, "hyperpool_clients", database=APPDB, user=OWNER, state="pinned") == 1
    assert value(samples, "hyperpool_auth_failures_total", reason="password") == 1


def test_labels_are_bounded(metrics_proxy: ProxyRunner) -> None:
    with psycopg.connect(metrics_proxy.dsn(), autocommit=True) as conn:
        conn.execute("select 'a very distinctive literal'")
    _, text = get(metrics_proxy, "/metrics")
    assert "distinctive" not in text and "127.0.0.1" not in text


def test_health_and_readiness_follow_the_origin(pg: EmbeddedPostgres, tmp_path: Path) -> None:
    cfg = base_config(pg.port, metrics={"port": 0}, db={"min_pool_size": 0, "server_login_retry": 0})
    cfg["databases"][APPDB]["port"] = free_port()  # nobody listens there: the origin is down
    path = tmp_path / "hyperpool.yaml"
    path.write_text(yaml.safe_dump(cfg))
    proxy = ProxyRunner(load_config(path), str(path)).start()
    try:
        assert get(proxy, "/healthz") == (200, "ok\n")
        status, body = get(proxy, "/readyz")
        assert status == 503 and "appdb: no warm connection" in body
        assert get(proxy, "/nope")[0] == 404
        cfg["databases"][APPDB]["port"] = pg.port  # the origin comes back
        path.write_text(yaml.safe_dump(cfg))
        assert proxy.run(proxy.server.reload)
        for _ in range(100):
            status, body = get(proxy, "/readyz")
            if status == 200:
                break
            time.sleep(0.05)
        assert (status, body) == (200, "ready\n")
    finally:
        proxy.stop()


def test_every_metric_the_deploy_dashboard_uses_is_exposed(metrics_proxy: ProxyRunner) -> None:
    """deploy/grafana's dashboard and tests/test_deploy.py's list against what the collector really serves."""
    from tests.test_deploy import METRICS

    with psycopg.connect(metrics_proxy.dsn(), autocommit=True) as conn:
        conn.execute("select 1")
    _, text = get(metrics_proxy, "/metrics")
    families = {f.name: f for f in text_string_to_metric_families(text)}
    for name, (kind, labels) in METRICS.items():
        family = families.get(name.removesuffix("_total"))
        assert family is not None and family.type == kind, name
        for sample in family.samples:
            assert set(sample.labels) - {"le"} == labels, (name, sample)
    assert {name for name in METRICS if name.startswith("hyperpool_cache_")} == CACHE_METRICS


CACHE_METRICS = {"hyperpool_cache_requests_total", "hyperpool_cache_evictions_total",
                 "hyperpool_cache_invalidations_total", "hyperpool_cache_stored_total",
                 "hyperpool_cache_too_big_total", "hyperpool_cache_bytes", "hyperpool_cache_entries"}


def test_cache_metrics(pg: EmbeddedPostgres) -> None:
    cfg = cache_config(pg, metrics={"host": "127.0.0.1", "port": 0})
    proxy = start_proxy(cfg)
    try:
        cache = proxy.state.databases[APPDB].cache
        assert cache is not None
        empty = scrape(proxy)
        for status in ("hit", "stale", "miss"):  # present from the start, at zero
            assert (("hyperpool_cache_requests_total", (("database", APPDB), ("status", status))) in empty)
        assert value(empty, "hyperpool_cache_entries", database=APPDB) == 0
        assert ("hyperpool_cache_bytes", (("database", APPDB),)) in empty

        proxy.run(populate_cache, cache)
        samples = scrape(proxy)
        requests = {dict(labels)["status"]: v for (name, labels), v in samples.items()
                    if name == "hyperpool_cache_requests_total" and dict(labels)["database"] == APPDB}
        assert requests == {"hit": 2, "stale": 1, "miss": 1, "write": 3, "transaction": 5}
        for name, expected in (("evictions_total", 1), ("invalidations_total", 0), ("stored_total", 3),
                               ("too_big_total", 1), ("bytes", 110), ("entries", 2)):
            assert value(samples, f"hyperpool_cache_{name}", database=APPDB) == expected, name
        # databases without a cache object emit none of them
        cached = {dict(labels)["database"] for (name, labels), _ in samples.items()
                  if name.startswith("hyperpool_cache_")}
        assert cached == {APPDB}
        assert {name for name, _ in samples if name.startswith("hyperpool_cache_")} == CACHE_METRICS

        assert proxy.run(cache.purge) == 2
        samples = scrape(proxy)
        for name, expected in (("invalidations_total", 2), ("bytes", 0), ("entries", 0), ("stored_total", 3)):
            assert value(samples, f"hyperpool_cache_{name}", database=APPDB) == expected, name
    finally:
        proxy.stop()
