"""Running totals per database: plain integers bumped on paths that run anyway.

Nothing here is computed on the hot path beyond an addition; SHOW STATS and the metrics collector
read the totals when asked (PgBouncer's SHOW STATS columns; times in microseconds there, seconds
here).
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(slots=True)
class DatabaseStats:
    transactions: int = 0  # ReadyForQuery 'I' that ended a client's work on a server connection
    queries: int = 0  # Query / Sync / FunctionCall sent to the database
    received: int = 0  # bytes from clients, forwarded to the database
    sent: int = 0  # bytes from the database, forwarded to clients
    transaction_time: float = 0.0  # seconds clients held a server connection (transaction pooling)
    query_time: float = 0.0  # seconds the database was working for clients
    wait_time: float = 0.0  # seconds clients waited for a server connection
    waits: int = 0  # how often a client had to wait
