"""QueryCache (pure): freshness, stale-while-revalidate, single flight, bounds, and never serving a result
computed before a write it could see."""

from __future__ import annotations

from hyperpool.cache import HIT, MISS, STALE, CacheSettings, QueryCache

T = frozenset({"public.users"})


def filled(cache: QueryCache, key: tuple[object, ...], response: bytes, now: float,
           tables: frozenset[str] = T, max_age: float | None = None) -> None:
    assert cache.lookup(key, now)[0] == MISS
    assert cache.begin_fill(key, tables, max_age).store(response, now)


def test_fresh_then_stale_then_gone() -> None:
    cache = QueryCache(CacheSettings(max_age=10, stale_while_revalidate=5))
    filled(cache, ("q",), b"rows", 100.0)
    status, entry = cache.lookup(("q",), 109.0)
    assert status == HIT and entry is not None and entry.response == b"rows"
    status, entry = cache.lookup(("q",), 112.0)
    assert status == STALE and entry is not None
    assert cache.begin_refresh(("q",), entry) is True
    assert cache.begin_refresh(("q",), entry) is False  # one refresh at a time
    assert cache.lookup(("q",), 116.0) == (MISS, None)  # past max_age + stale_while_revalidate
    assert (cache.stats.hits, cache.stats.stale, cache.stats.misses) == (1, 1, 2)


def test_refresh_replaces_the_entry() -> None:
    cache = QueryCache(CacheSettings(max_age=10, stale_while_revalidate=5))
    filled(cache, ("q",), b"old", 0.0)
    status, entry = cache.lookup(("q",), 12.0)
    assert status == STALE and entry is not None and cache.begin_refresh(("q",), entry)
    assert cache.begin_fill(("q",), T).store(b"new", 12.5)
    status, entry = cache.lookup(("q",), 13.0)
    assert status == HIT and entry is not None and entry.response == b"new" and not entry.refreshing
    assert cache.bytes == 3


def test_per_query_max_age() -> None:
    cache = QueryCache(CacheSettings(max_age=60, stale_while_revalidate=0))
    filled(cache, ("q",), b"r", 0.0, max_age=5)
    assert cache.lookup(("q",), 4.0)[0] == HIT
    assert cache.lookup(("q",), 6.0)[0] == MISS


def test_single_flight() -> None:
    cache = QueryCache(CacheSettings())
    assert cache.lookup(("q",), 0.0)[0] == MISS
    fill = cache.begin_fill(("q",), T)
    got: list[bytes | None] = []
    assert cache.join(("q",), got.append) and cache.join(("q",), got.append)
    assert cache.join(("other",), got.append) is False
    fill.store(b"rows", 1.0)
    assert got == [b"rows", b"rows"]
    assert cache.join(("q",), got.append) is False  # the flight is over


def test_failed_fill_wakes_waiters_with_none_and_stores_nothing() -> None:
    cache = QueryCache(CacheSettings())
    fill = cache.begin_fill(("q",), T)
    got: list[bytes | None] = []
    cache.join(("q",), got.append)
    fill.fail()
    assert got == [None] and cache.lookup(("q",), 0.0)[0] == MISS


def test_write_invalidates_readers_only() -> None:
    cache = QueryCache(CacheSettings())
    filled(cache, ("users",), b"u", 0.0, frozenset({"public.users"}))
    filled(cache, ("orders",), b"o", 0.0, frozenset({"public.orders"}))
    filled(cache, ("join",), b"j", 0.0, frozenset({"public.users", "public.orders"}))
    assert cache.invalidate(["public.users"]) == 2
    assert cache.lookup(("users",), 1.0)[0] == MISS and cache.lookup(("join",), 1.0)[0] == MISS
    assert cache.lookup(("orders",), 1.0)[0] == HIT
    assert cache.bytes == 1 and cache.stats.invalidations == 2


def test_write_during_a_fill_means_the_result_is_not_stored() -> None:
    """The query started before the write: its result may predate the write, so it is served to the
    clients that asked (they overlapped the write) but never stored."""
    cache = QueryCache(CacheSettings())
    fill = cache.begin_fill(("q",), T)
    cache.invalidate(["public.users"])
    assert fill.store(b"maybe old", 1.0) is False
    assert cache.lookup(("q",), 1.0)[0] == MISS and cache.stats.discarded_fills == 1
    fill = cache.begin_fill(("q",), T)  # a fill that starts after the write is stored
    assert fill.store(b"new", 2.0) is True


def test_invalidate_all_and_purge_also_refuse_fills_in_flight() -> None:
    cache = QueryCache(CacheSettings())
    filled(cache, ("a",), b"a", 0.0)
    fill = cache.begin_fill(("b",), frozenset({"public.never_written"}))
    assert cache.invalidate_all() == 1
    assert fill.store(b"b", 1.0) is False
    filled(cache, ("c",), b"c", 2.0)
    assert cache.purge() == 1 and len(cache) == 0 and cache.bytes == 0


def test_bounds_by_bytes_evict_least_recently_used() -> None:
    cache = QueryCache(CacheSettings(max_bytes=10, max_entry_bytes=6))
    filled(cache, ("a",), b"aaaa", 0.0)
    filled(cache, ("b",), b"bbbb", 0.0)
    assert cache.lookup(("a",), 1.0)[0] == HIT  # a is now more recent than b
    filled(cache, ("c",), b"cccc", 1.0)  # 12 bytes > 10: the least recently used (b) goes
    assert cache.lookup(("b",), 2.0)[0] == MISS
    assert cache.lookup(("a",), 2.0)[0] == HIT and cache.lookup(("c",), 2.0)[0] == HIT
    assert cache.bytes == 8 and cache.stats.evictions == 1
    assert cache.begin_fill(("big",), T).store(b"x" * 7, 3.0) is False  # over max_entry_bytes: not stored
    assert cache.stats.too_big == 1 and cache.lookup(("big",), 3.0)[0] == MISS


def test_not_cacheable_reasons_are_counted() -> None:
    cache = QueryCache(CacheSettings())
    cache.count_not_cacheable("volatile")
    cache.count_not_cacheable("volatile")
    cache.count_not_cacheable("write")
    assert cache.stats.not_cacheable == {"volatile": 2, "write": 1}
