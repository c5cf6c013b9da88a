"""Fixtures: one real PostgreSQL for the whole run, and hyperpool instances in front of it."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import pytest

from hyperpool.embedded import EmbeddedPostgres
from tests.support import ProxyRunner, base_config, start_proxy, start_test_pg


@pytest.fixture(scope="session")
def pg() -> Iterator[EmbeddedPostgres]:
    server = start_test_pg(max_connections="200")
    try:
        yield server
    finally:
        server.cleanup()


@pytest.fixture
def make_proxy(pg: EmbeddedPostgres) -> Iterator[Callable[..., ProxyRunner]]:
    """Start a hyperpool with base_config(pg.port, **overrides); stopped at teardown."""
    runners: list[ProxyRunner] = []

    def make(**overrides: Any) -> ProxyRunner:
        runner = start_proxy(base_config(pg.port, **overrides))
        runners.append(runner)
        return runner

    yield make
    for runner in runners:
        runner.stop()


@pytest.fixture
def proxy(make_proxy: Callable[..., ProxyRunner]) -> ProxyRunner:
    return make_proxy()
