"""Running totals per database: plain integers bumped on paths that run anyway.

Nothing here is computed on the hot path beyond an addition (or a bisect for a histogram); SHOW STATS
and the metrics collector read the totals when asked (PgBouncer's SHOW STATS columns; times in
microseconds there, seconds here).
"""

from __future__ import annotations

from bisect import bisect_left
from dataclasses import dataclass, field

# Histogram bucket upper bounds, seconds.
WAIT_BUCKETS = (0.001, 0.005, 0.01, 0.05, 0.1, 0.5, 1.0, 5.0, 10.0, 30.0)
QUERY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)


class Histogram:
    """Counts per bucket and a sum; cumulative counts are computed when read."""

    __slots__ = ("bounds", "counts", "total")

    def __init__(self, bounds: tuple[float, ...]) -> None:
        self.bounds = bounds
        self.counts = [0] * (len(bounds) + 1)  # the last one is +Inf
        self.total = 0.0

    def observe(self, value: float) -> None:
        self.counts[bisect_left(self.bounds, value)] += 1
        self.total += value

    def cumulative(self) -> list[tuple[str, int]]:
        out, running = [], 0
        for bound, count in zip((*map(str, self.bounds), "+Inf"), self.counts, strict=True):
            running += count
            out.append((bound, running))
        return out


@dataclass(slots=True)
class DatabaseStats:
    transactions: int = 0  # ReadyForQuery 'I' that ended a client's work on a server connection
    queries: int = 0  # Query / Sync / FunctionCall sent to the database
    received: int = 0  # bytes from clients, forwarded to the database
    sent: int = 0  # bytes from the database, forwarded to clients
    transaction_time: float = 0.0  # seconds from a transaction's first request to the ReadyForQuery 'I' ending it
    query_time: float = 0.0  # seconds the database was working for clients
    wait_time: float = 0.0  # seconds clients waited for a server connection
    waits: int = 0  # how often a client had to wait
    wait_histogram: Histogram = field(default_factory=lambda: Histogram(WAIT_BUCKETS))
    query_histogram: Histogram = field(default_factory=lambda: Histogram(QUERY_BUCKETS))
    errors: dict[str, int] = field(default_factory=dict)  # SQLSTATE class -> ErrorResponses clients got


def error_class(payload: bytes) -> str:
    """The SQLSTATE class (two characters) of an ErrorResponse payload, or '??'."""
    index = payload.find(b"\x00C")
    if payload.startswith(b"C"):
        index = -1
    elif index < 0:
        return "??"
    code = payload[index + 2 : index + 4]
    return code.decode("ascii", "replace") if len(code) == 2 else "??"


def count_error(stats: DatabaseStats, sqlstate_class: str) -> None:
    stats.errors[sqlstate_class] = stats.errors.get(sqlstate_class, 0) + 1


# Why server connections were closed, in a few bounded categories (metric labels).
CLOSE_REASONS = ("idle_timeout", "lifetime", "reload", "admin", "client_gone", "reset_failed", "server_gone",
                 "protocol_error", "shutdown", "other")


def close_category(reason: str) -> str:
    text = reason.lower()
    for needle, category in (("idle_timeout", "idle_timeout"), ("lifetime", "lifetime"),
                             ("origin changed", "reload"), ("resized", "reload"), ("admin console", "admin"),
                             ("client disconnected", "client_gone"), ("client error", "client_gone"),
                             ("reset failed", "reset_failed"), ("session state", "reset_failed"),
                             ("settings failed", "reset_failed"), ("protocol violation", "protocol_error"),
                             ("pool closed", "shutdown"), ("lost", "server_gone"), ("server closed", "server_gone"),
                             ("login failed", "server_gone")):
        if needle in text:
            return category
    return "other"


STATS_PERIOD = 15.0  # seconds: SHOW STATS's avg_* columns describe the last complete period, as PgBouncer's do

_TOTALS = ("transactions", "queries", "received", "sent", "transaction_time", "query_time", "wait_time", "waits")


class StatsWindow:
    """Totals at the start of the current period and the differences over the last complete one."""

    __slots__ = ("_mark", "_mark_time", "delta", "period")

    def __init__(self, stats: DatabaseStats, now: float) -> None:
        self._mark = self._totals(stats)
        self._mark_time = now
        self.delta: dict[str, float] = dict.fromkeys(_TOTALS, 0.0)
        self.period = STATS_PERIOD

    @staticmethod
    def _totals(stats: DatabaseStats) -> dict[str, float]:
        return {name: float(getattr(stats, name)) for name in _TOTALS}

    def tick(self, stats: DatabaseStats, now: float) -> None:
        """Called every second or so; closes a period every STATS_PERIOD seconds."""
        if now - self._mark_time < STATS_PERIOD:
            return
        totals = self._totals(stats)
        self.delta = {name: totals[name] - self._mark[name] for name in _TOTALS}
        self.period = now - self._mark_time
        self._mark, self._mark_time = totals, now

    def averages(self) -> tuple[int, int, int, int, int, int, int]:
        """PgBouncer's avg_xact_count, avg_query_count, avg_recv, avg_sent (per second) and avg_xact_time,
        avg_query_time, avg_wait_time (microseconds per transaction / query / wait)."""
        d, period = self.delta, max(self.period, 1e-9)

        def per(total: str, count: str) -> int:
            return int(d[total] / d[count] * 1_000_000) if d[count] else 0

        return (int(d["transactions"] / period), int(d["queries"] / period), int(d["received"] / period),
                int(d["sent"] / period), per("transaction_time", "transactions"), per("query_time", "queries"),
                per("wait_time", "waits"))
