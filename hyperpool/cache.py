"""The query cache: exact response bytes per key, TTL with stale-while-revalidate, LRU by bytes.

Pure (no I/O; time is passed in). The proxy builds keys (database, origin user, the session settings that
change output or name resolution, the statement, and for the extended protocol the parameter values and
formats), asks :meth:`QueryCache.lookup`, and on a miss captures the response while it streams to the first
client and hands it to :meth:`Fill.store`.

Never wrong, not just eventually right: every entry remembers the tables it read, and a write the proxy
forwards bumps those tables' generation. A fill remembers the generations it started with; if a write to one
of its tables was seen while the query ran, the result is returned to its clients but not stored, so a
response computed before a write can never be served after it. Concurrent misses of one key share one fill
(single flight): the first client's query runs, the others wait for its bytes.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

Key = tuple[object, ...]
Waiter = Callable[[bytes | None], None]  # called with the response bytes, or None when the fill failed

HIT, STALE, MISS = "hit", "stale", "miss"


@dataclass(frozen=True)
class CacheSettings:
    """The `cache:` section (top level and per database)."""

    enabled: bool = True
    max_age: float = 60.0  # seconds an entry is fresh
    stale_while_revalidate: float = 15.0  # seconds after that it is served while one refresh runs
    max_bytes: int = 64 * 1024 * 1024  # all entries of one cache
    max_entry_bytes: int = 1024 * 1024  # larger responses are returned, not stored


@dataclass(slots=True)
class Entry:
    response: bytes
    tables: frozenset[str]
    stored_at: float
    max_age: float
    refreshing: bool = False  # one background refresh at a time while stale


@dataclass(slots=True)
class CacheStats:
    hits: int = 0
    stale: int = 0
    misses: int = 0
    stored: int = 0
    too_big: int = 0
    evictions: int = 0
    invalidations: int = 0  # entries dropped because a table they read was written
    discarded_fills: int = 0  # results not stored because a write raced the query
    not_cacheable: dict[str, int] = field(default_factory=dict)  # classifier reason -> count


class Fill:
    """One upstream query filling one key; other clients of the same key wait on it."""

    __slots__ = ("_cache", "_generations", "key", "max_age", "tables", "waiters")

    def __init__(self, cache: QueryCache, key: Key, tables: frozenset[str], max_age: float) -> None:
        self._cache = cache
        self.key = key
        self.tables = tables
        self.max_age = max_age
        self.waiters: list[Waiter] = []
        self._generations = {t: cache.generation(t) for t in tables}

    def store(self, response: bytes, now: float) -> bool:
        """The complete response arrived without an error: store it and give it to the waiters, unless a write
        to a table it read was published meanwhile (then a waiter may have asked after that write committed:
        it runs the query itself)."""
        valid = self._still_valid()
        stored = self._cache._finish(self, response, now, valid)
        for waiter in self.waiters:
            waiter(response if valid else None)
        return stored

    def fail(self) -> None:
        """The query failed or the client went away: waiters must run the query themselves."""
        self._cache._flights.pop(self.key, None)
        entry = self._cache._entries.get(self.key)
        if entry is not None:
            entry.refreshing = False  # the next stale hit tries again
        for waiter in self.waiters:
            waiter(None)

    def _still_valid(self) -> bool:
        return all(self._cache.generation(t) == g for t, g in self._generations.items())


class QueryCache:
    """Entries of one database."""

    def __init__(self, settings: CacheSettings) -> None:
        self.settings = settings
        self.stats = CacheStats()
        self.bytes = 0
        self._entries: OrderedDict[Key, Entry] = OrderedDict()
        self._by_table: dict[str, set[Key]] = {}
        self._generations: dict[str, int] = {}
        self._flights: dict[Key, Fill] = {}

    def __len__(self) -> int:
        return len(self._entries)

    def resize(self, settings: CacheSettings) -> None:
        """New settings (a reload): entries stay; the byte bound applies at once."""
        self.settings = settings
        while self.bytes > settings.max_bytes and self._entries:
            self._drop(next(iter(self._entries)))
            self.stats.evictions += 1

    def generation(self, table: str) -> int:
        return self._generations.get(table, 0)

    def lookup(self, key: Key, now: float) -> tuple[str, Entry | None]:
        """(HIT, entry), (STALE, entry) — serve it; refresh when ``entry.refreshing`` was set for you by
        :meth:`begin_refresh` — or (MISS, None)."""
        found = self.find(key, now)
        if found[1] is None:
            self.stats.misses += 1
        return found

    def find(self, key: Key, now: float) -> tuple[str, Entry | None]:
        """:meth:`lookup` without counting a miss (the caller decides whether the request was cacheable)."""
        entry = self._entries.get(key)
        if entry is not None:
            age = now - entry.stored_at
            if age <= entry.max_age:
                self._entries.move_to_end(key)
                self.stats.hits += 1
                return HIT, entry
            if age <= entry.max_age + self.settings.stale_while_revalidate:
                self._entries.move_to_end(key)
                self.stats.stale += 1
                return STALE, entry
            self._drop(key)
        return MISS, None

    def begin_refresh(self, key: Key, entry: Entry) -> bool:
        """Whether the caller should refresh a stale entry now (only one refresh per entry at a time)."""
        if entry.refreshing or key in self._flights:
            return False
        entry.refreshing = True
        return True

    def join(self, key: Key, waiter: Waiter) -> bool:
        """Wait for a fill already running for ``key`` (single flight); False when there is none."""
        flight = self._flights.get(key)
        if flight is None:
            return False
        flight.waiters.append(waiter)
        return True

    def begin_fill(self, key: Key, tables: Iterable[str], max_age: float | None = None) -> Fill:
        """Start filling ``key`` from the query the caller is about to run."""
        fill = Fill(self, key, frozenset(tables), self.settings.max_age if max_age is None else max_age)
        self._flights[key] = fill
        return fill

    def invalidate(self, tables: Iterable[str]) -> int:
        """A write to ``tables`` was forwarded: drop what read them, and refuse fills that started before."""
        dropped = 0
        for table in tables:
            self._generations[table] = self._generations.get(table, 0) + 1
            for key in list(self._by_table.get(table, ())):
                if key in self._entries:
                    self._drop(key)
                    dropped += 1
        self.stats.invalidations += dropped
        return dropped

    def invalidate_all(self) -> int:
        """A write whose tables are unknown (DDL, a function, a trigger): drop everything."""
        dropped = len(self._entries)
        tables = set(self._generations) | set(self._by_table)
        for flight in self._flights.values():  # tables never written before still get a new generation
            tables |= flight.tables
        for table in tables:
            self._generations[table] = self._generations.get(table, 0) + 1
        self._entries.clear()
        self._by_table.clear()
        self.bytes = 0
        self.stats.invalidations += dropped
        return dropped

    def purge(self) -> int:
        """CACHE PURGE: drop every entry (fills in flight are not stored either)."""
        return self.invalidate_all()

    def _finish(self, fill: Fill, response: bytes, now: float, valid: bool) -> bool:
        if self._flights.get(fill.key) is fill:
            del self._flights[fill.key]
        old = self._entries.get(fill.key)
        if old is not None:
            old.refreshing = False
        if not valid:
            self.stats.discarded_fills += 1
            return False
        if len(response) > self.settings.max_entry_bytes or len(response) > self.settings.max_bytes:
            self.stats.too_big += 1
            return False
        if old is not None:
            self._drop(fill.key)
        self._entries[fill.key] = Entry(response, fill.tables, now, fill.max_age)
        self.bytes += len(response)
        for table in fill.tables:
            self._by_table.setdefault(table, set()).add(fill.key)
        self.stats.stored += 1
        while self.bytes > self.settings.max_bytes and self._entries:
            self._drop(next(iter(self._entries)))
            self.stats.evictions += 1
        return True

    def _drop(self, key: Key) -> None:
        entry = self._entries.pop(key)
        self.bytes -= len(entry.response)
        for table in entry.tables:
            keys = self._by_table.get(table)
            if keys is not None:
                keys.discard(key)
                if not keys:
                    del self._by_table[table]

    def count_not_cacheable(self, reason: str) -> None:
        self.stats.not_cacheable[reason] = self.stats.not_cacheable.get(reason, 0) + 1
