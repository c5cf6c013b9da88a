"""A connection from hyperpool to the database (a "server connection").

It logs in (TLS per sslmode, SCRAM-SHA-256 / md5 / cleartext as a client),
then relays the server's bytes to whichever client is attached, watching
only ReadyForQuery, ParameterStatus and ErrorResponse. Queries hyperpool runs
for itself (SET to apply a client's settings, ROLLBACK, DISCARD ALL) are
"internal": their responses are swallowed, never shown to a client.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
import ssl
import time
from collections import OrderedDict, deque
from collections.abc import Callable
from typing import Protocol, cast

from hyperpool.config import DatabaseConfig
from hyperpool.errors import UpstreamError
from hyperpool.protocol import messages, scram
from hyperpool.protocol.framing import FrameBuffer, Message, MessageRelay, ProtocolViolation
from hyperpool.protocol.tracker import FAKE, TERMINATORS, Answer, Outcome, ResponseTracker
from hyperpool.stats import DatabaseStats, count_error, error_class

log = logging.getLogger("hyperpool.upstream")

# Reported (GUC_REPORT) settings a client may change and hyperpool must carry per client.
TRACKED_REPORTED = frozenset(
    {"application_name", "client_encoding", "datestyle", "intervalstyle", "timezone",
     "standard_conforming_strings", "default_transaction_read_only"}
)

# Relaying for a client, ReadyForQuery is only counted (no object built); while hyperpool's own
# queries are in flight every ReadyForQuery and ErrorResponse is a boundary to act on.
# CommandComplete is flagged for the tags of commands that change session state.
# CopyInResponse is watched so an extended-protocol COPY's ignored Sync can be accounted for;
# ErrorResponse so a prepared statement whose result shape changed can be renamed.
# Completions (see protocol.tracker) are tallied so response tracking can start at any point.
_FAST_WATCH, _FAST_COUNT = b"SGE", b"Z"
# NotificationResponse is watched so one arriving while hyperpool's own query runs still reaches the client.
_INTERNAL_WATCH = b"ZSECGDA"
_COMPLETIONS = b"123nTCIs"
# While responses are tracked (see protocol.tracker) every completion is intercepted.
_TRACKED_INTERCEPT = b"123tnTCIsEZ"
_TRACKED_KINDS = frozenset(_TRACKED_INTERCEPT)
_STATUS = tuple(bytes((i,)) for i in range(256))  # ReadyForQuery status byte -> bytes, without allocating
# Command tags after which the session's state is read back from the server (see SNAPSHOT_SQL).
_STATE_TAGS = (b"SET\x00", b"RESET\x00", b"DISCARD", b"PREPARE\x00", b"DEALLOCATE", b"LISTEN\x00",
               b"UNLISTEN\x00", b"DECLARE CURSOR\x00", b"CLOSE CURSOR", b"DO\x00", b"CALL\x00", b"CREATE TABLE",
               b"DROP TABLE", b"CREATE VIEW", b"DROP VIEW", b"CREATE SEQUENCE", b"DROP SEQUENCE")
# What puts a connection back to its login state (RESET ALL leaves the role alone).
_RESET_SESSION = ("RESET ROLE", "RESET SESSION AUTHORIZATION", "RESET ALL")
_PLAN_CHANGED = "cached plan must not change result type"
_IDENT_OK = re.compile(r"^[a-z_][a-z0-9_$]*(\.[a-z_][a-z0-9_$]*)?$")


def snapshot_sql(login_user: str | None) -> str:
    """What hyperpool reads back after a transaction that may have changed session state: session-level
    settings ('s'), SQL-level prepared statements ('p'), protocol-level ones ('q') and every reason
    ('x') the session cannot move to another server connection. ``login_user``: the role the connection
    logged in as (None through another hyperpool instance, which checks its own login role)."""
    role = "current_user <> session_user" + (
        "" if login_user is None else f" OR session_user <> {quote_literal(login_user)}")
    return (
        "SELECT 's', lower(name), setting FROM pg_catalog.pg_settings WHERE source = 'session' "
        "UNION ALL SELECT 'p', name, statement FROM pg_catalog.pg_prepared_statements WHERE from_sql "
        "UNION ALL SELECT 'q', name, NULL FROM pg_catalog.pg_prepared_statements WHERE NOT from_sql "
        "UNION ALL SELECT 'x', reason, NULL FROM (VALUES "
        "('listen', EXISTS (SELECT FROM pg_catalog.pg_listening_channels())), "
        "('advisory_lock', EXISTS (SELECT FROM pg_catalog.pg_locks WHERE locktype = 'advisory' "
        "AND pid = pg_catalog.pg_backend_pid())), "
        "('temp_table', EXISTS (SELECT FROM pg_catalog.pg_class WHERE relnamespace = pg_catalog.pg_my_temp_schema())), "
        "('hold_cursor', EXISTS (SELECT FROM pg_catalog.pg_cursors WHERE is_holdable)), "
        f"('role', {role})"
        ") AS v(reason, held) WHERE held"
    )


def quote_ident(name: str) -> str:
    return name if _IDENT_OK.match(name) else '"' + name.replace('"', '""') + '"'


InternalDone = Callable[["ServerConnection", bytes, dict[str, str] | None], None]
Rows = list[list[str | None]]


class ServerClient(Protocol):
    """What a server connection needs from the client session it serves."""

    def server_data(self, data: bytes | memoryview) -> None: ...
    def server_ready(self, server: ServerConnection, status: bytes) -> None: ...
    def server_parameter(self, name: str, value: str) -> None: ...
    def sync_was_last_counted(self) -> bool: ...
    def server_lost(self, server: ServerConnection, reason: str) -> None: ...
    def server_pause_writing(self) -> None: ...
    def server_resume_writing(self) -> None: ...
    def server_plan_changed(self) -> None: ...


def _settings_applied(conn: ServerConnection, status: bytes, error: dict[str, str] | None) -> None:
    """A client's settings could not be applied (e.g. a cancel hit the SET): never run its query without them."""
    if error is not None:
        conn.close(f"applying client settings failed: {error.get('M', '')}")


def quote_literal(value: str) -> str:
    return "E'" + value.replace("\\", "\\\\").replace("'", "''") + "'"


def set_statements(wanted: dict[str, str], applied: dict[str, str]) -> str:
    """SQL that moves a server connection's settings from ``applied`` to ``wanted``.

    Values are set with set_config(), which takes them as PostgreSQL shows them (SET would quote a
    list such as search_path's ``"$user", public`` into one name)."""
    calls = [f"pg_catalog.set_config({quote_literal(name)}, {quote_literal(value)}, false)"
             for name, value in wanted.items() if applied.get(name) != value]
    parts = [f"RESET {quote_ident(name)}" for name in applied if name not in wanted]
    if calls:
        parts.append("SELECT " + ", ".join(calls))
    return ";".join(parts)


def _ssl_context(db: DatabaseConfig) -> ssl.SSLContext:
    if db.sslmode in ("verify-ca", "verify-full"):
        ctx = ssl.create_default_context(cafile=db.sslrootcert)
        ctx.check_hostname = db.sslmode == "verify-full"
        return ctx
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    return ctx


class ServerConnection(asyncio.Protocol):
    """One authenticated connection to the database, relayed to at most one client at a time."""

    def __init__(self, db: DatabaseConfig) -> None:
        self.db = db
        self.transport: asyncio.Transport | None = None
        self.client: ServerClient | None = None
        self.params: dict[str, str] = {}
        self.startup_params: dict[str, str] = {}
        self.applied: dict[str, str] = {}
        self.dirty_for: ServerClient | None = None  # the client whose SET/RESET/DISCARD this connection carries
        self.state_changed = False  # a client's command may have changed session state: read it back
        self.prepared: OrderedDict[bytes, None] = OrderedDict()  # hyperpool's statement names here, LRU first
        self.sql_prepared: dict[str, str] = {}  # SQL-level prepared statements here: name -> PREPARE text
        self.generation = 0  # the pool's origin generation it was opened for
        self.cancels_in_flight = 0
        self._after_cancels: list[Callable[[], None]] = []
        self.backend_key: tuple[int, int] = (0, 0)
        self.outstanding = 0  # client Query/Sync/FunctionCall not yet answered by ReadyForQuery
        self.copy_in = False  # in COPY FROM STDIN until the next ReadyForQuery
        self.tx_status = b"I"
        self.closed = False
        self.close_reason = ""
        self.created_at = time.monotonic()
        self.last_used = self.created_at
        self.on_close: Callable[[ServerConnection], None] | None = None
        self.stats = DatabaseStats()  # the database's totals (Database sets its own)
        self.slow_query = 0.0  # seconds; 0: off (Database sets it from log_slow_query_ms)
        self._busy_since = 0.0
        self._transaction_since = 0.0
        # Fast path: the request types sent and not yet answered by a ReadyForQuery (see protocol.tracker).
        self.requests = bytearray()
        self.tracker: ResponseTracker | None = None  # set while responses are tracked one by one
        # hyperpool's queries in flight: what to call when answered, and where rows go (decoded, or raw bytes)
        self._internal: deque[tuple[InternalDone | None, Rows | bytearray | None]] = deque()
        self._internal_error: dict[str, str] | None = None
        self._internal_drained: list[Callable[[], None]] = []
        self._setup: FrameBuffer | None = FrameBuffer(max_length=1 << 20)
        self._waiter: asyncio.Future[None] | None = None
        self._relay = MessageRelay(watch=_FAST_WATCH, count=_FAST_COUNT, flag=b"C", flag_prefixes=_STATE_TAGS,
                                   tally=_COMPLETIONS, error_type=ord("E"), tally_reset=ord("Z"))

    # --- asyncio.Protocol ---------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)

    def data_received(self, data: bytes) -> None:
        if self._setup is not None:
            self._setup.feed(data)
            self._wake()
            return
        relay = self._relay
        intercepted = relay.intercept  # the kinds these events were scanned with
        try:
            events = relay.feed(data)
        except ProtocolViolation as exc:
            self.close(f"protocol violation from server: {exc}")
            return
        if relay.flagged:  # CommandComplete of a command that may change session state
            relay.flagged = False
            self._state_tag()
        if self._internal or self.tracker is not None:
            self._dispatch(events, intercepted)
            return
        client = self.client
        self.stats.sent += len(data)
        if len(events) == 1 and client is not None and type(events[0]) is not Message:
            client.server_data(events[0])  # type: ignore[arg-type]  # the hot path: one run of bytes
        else:
            self._dispatch(events, intercepted)  # ReadyForQuery is counted, never a Message, in this mode
        count = relay.counted
        if count:  # ReadyForQuery messages were relayed; the last one's status is last_byte
            relay.counted = 0
            self.copy_in = False
            self.tx_status = _STATUS[relay.last_byte]
            self._answered(count)
            self.outstanding -= count
            if self.outstanding <= 0:
                self.outstanding = 0
                self._idle_again()
                client = self.client
                if client is not None:
                    client.server_ready(self, self.tx_status)

    def connection_lost(self, exc: Exception | None) -> None:
        self._mark_closed("server closed the connection" if exc is None else f"server connection lost: {exc}")
        self._wake()

    def pause_writing(self) -> None:
        if self.client is not None:
            self.client.server_pause_writing()

    def resume_writing(self) -> None:
        if self.client is not None:
            self.client.server_resume_writing()

    # --- relay --------------------------------------------------------------------------

    def _state_tag(self) -> None:
        if self.client is not None and not self._internal:
            self.dirty_for = self.client  # the next client must not inherit it
            self.state_changed = True

    def _answered(self, count: int) -> None:
        """``count`` ReadyForQuery messages arrived: forget the requests they answered (fast path)."""
        requests = self.requests
        if len(requests) == 1 and count == 1:
            requests.clear()  # one simple Query
            return
        for _ in range(count):
            for i in range(len(requests)):  # (not enumerate(): mypyc cannot compile it over a bytearray)
                if requests[i] in TERMINATORS:
                    del requests[: i + 1]
                    break
            else:
                requests.clear()
                return

    def _dispatch(self, events: list[memoryview | bytes | Message], intercepted: frozenset[int]) -> None:
        """The slow path: events include messages to act on. An intercepted message's bytes are not in
        the runs around it (``intercepted`` = the types intercepted when these events were scanned)."""
        out: list[memoryview | bytes] = []
        # only hyperpool's queries already in flight can have answers in these events (one sent while
        # they are handled, e.g. the state read-back after a ReadyForQuery, is answered later)
        owed = len(self._internal)
        for ev in events:
            if type(ev) is not Message:
                if not owed:
                    if self.client is not None:
                        out.append(ev)  # type: ignore[arg-type]
                else:
                    sink = self._internal[0][1]
                    if type(sink) is bytearray:  # hyperpool's own query, captured raw (a cache refresh)
                        sink += ev  # type: ignore[arg-type]
                continue
            kind = ev.type
            if owed:
                if kind == 90:
                    owed -= 1
                self._internal_message(kind, ev)
                continue
            tracker = self.tracker
            if kind == 90:
                self.tx_status = ev.payload[:1]  # before the tracker: an answer of hyperpool's may show it
                self.copy_in = False
            if kind in intercepted:
                if tracker is not None:
                    tracker.on_response(kind, ev.raw, out)  # type: ignore[arg-type]
                else:
                    out.append(ev.raw)
            if kind == 83:  # 'S' ParameterStatus
                self._parameter_status(ev.payload)
            elif kind == 71:  # 'G' CopyInResponse
                self._copy_in()
            elif kind == 69:  # 'E'
                self._error(ev.payload)
            elif kind == 67:  # 'C' CommandComplete (flagged in the fast path instead)
                if ev.payload.startswith(_STATE_TAGS):
                    self._state_tag()
            elif kind == 90:  # 'Z' ReadyForQuery
                if tracker is None:
                    self._answered(1)
                self.outstanding -= 1
                if self.outstanding <= 0:
                    self.outstanding = 0
                    self._idle_again()
                    if tracker is not None and not tracker:
                        self._stop_tracking()
                    if self.client is not None:
                        self._flush(out)
                        self.client.server_ready(self, self.tx_status)
        self._flush(out)
        if self.tracker is not None and not self.tracker:
            self._stop_tracking()

    def _internal_message(self, kind: int, ev: Message) -> None:
        """A response to hyperpool's own query: never shown to a client."""
        sink = self._internal[0][1]  # (a raw capture has this message's bytes in the run before it)
        if kind == 90:  # 'Z'
            self.tx_status = ev.payload[:1]
            self._finish_internal()
        elif kind == 69:  # 'E'
            self._internal_error = messages.decode_error_fields(ev.payload)
        elif kind == 68:  # 'D'
            rows = sink
            if type(rows) is list:
                with contextlib.suppress(ProtocolViolation):
                    rows.append(messages.decode_data_row(ev.payload))
        elif kind == 83:  # 'S'
            self._parameter_status(ev.payload)
        elif kind == 65 and self.client is not None:  # 'A' NotificationResponse: the client's, not ours
            self.client.server_data(ev.raw)

    def _error(self, payload: bytes) -> None:
        """An ErrorResponse for the client (counted by class); PostgreSQL may say a prepared statement's
        result shape changed."""
        if self.client is None:
            return
        count_error(self.stats, error_class(payload))
        if b"0A000" not in payload:
            return
        fields = messages.decode_error_fields(payload)
        if fields.get("C") == "0A000" and fields.get("M") == _PLAN_CHANGED:
            self.client.server_plan_changed()

    def _flush(self, out: list[memoryview | bytes]) -> None:
        if not out or self.client is None:
            out.clear()
            return
        self.client.server_data(out[0] if len(out) == 1 else b"".join(out))
        out.clear()

    def _copy_in(self) -> None:
        """COPY FROM STDIN started. PostgreSQL ignores a Sync that reaches it during copy-in, so
        the Sync a client pipelined behind an extended-protocol Execute gets no ReadyForQuery."""
        self.copy_in = True
        if self.client is not None and self.client.sync_was_last_counted() and self.outstanding > 0:
            self.outstanding -= 1
            if self.tracker is not None:
                self.tracker.drop_sync_after_copy_start()
            else:
                index = self.requests.rfind(b"S")
                if index >= 0:
                    del self.requests[index]

    def _parameter_status(self, payload: bytes) -> None:
        try:
            name, value = messages.decode_parameter_status(payload)
        except ProtocolViolation:
            return
        self.params[name] = value
        key = name.lower()
        if self._internal or self.client is None or key not in TRACKED_REPORTED:
            return
        self.applied[key] = value
        self.client.server_parameter(key, value)

    # --- requests from the attached client ----------------------------------------------

    def transmit(self, data: bytes | memoryview, syncs: int) -> None:
        """Send a client's bytes (already recorded with :meth:`record` / :meth:`record_edit`)."""
        if not self._writable():
            return
        stats = self.stats
        if syncs:
            if not self.outstanding:
                self._busy_since = now = time.monotonic()
                if self.tx_status == b"I":
                    self._transaction_since = now  # a transaction (or a single statement) begins
            stats.queries += syncs
        stats.received += len(data)
        self.outstanding += syncs
        self.transport.write(data)  # type: ignore[union-attr]

    def _idle_again(self) -> None:
        """The client's last request is answered."""
        stats = self.stats
        now = time.monotonic()
        elapsed = now - self._busy_since
        stats.query_time += elapsed
        stats.query_histogram.observe(elapsed)
        if self.slow_query and elapsed > self.slow_query:  # the statement itself is never logged
            log.warning("slow query on database %s: %.0f ms (log_slow_query_ms %.0f)", self.db.name,
                        elapsed * 1000, self.slow_query * 1000)
        if self.tx_status == b"I":
            stats.transactions += 1
            stats.transaction_time += now - self._transaction_since

    def record(self, kinds: bytes | bytearray) -> None:
        """Requests forwarded as the client sent them, by type byte, in order."""
        if self.tracker is None:
            self.requests += kinds
        else:
            self.tracker.push_requests(kinds)

    def record_edit(self, kind: int, data: Answer = b"", outcome: Outcome | None = None) -> None:
        """A request whose answer hyperpool must route (see protocol.tracker), in order with :meth:`record`."""
        if kind == FAKE and self.tracker is None and not self.requests:
            if self.client is not None:  # nothing is pending: the answer goes out now
                self.client.server_data(data if isinstance(data, bytes) else data())
            if outcome is not None:
                outcome(True)
            return
        tracker = self.tracker if self.tracker is not None else self._start_tracking()
        tracker.push(kind, data, outcome)
        if kind == FAKE:
            answer: list[bytes] = []
            tracker.ready_fakes(answer)
            if answer and self.client is not None:
                self.client.server_data(b"".join(answer))

    def _start_tracking(self) -> ResponseTracker:
        tracker = self.tracker = ResponseTracker()
        relay = self._relay
        if self._internal:  # hyperpool's own query goes first: nothing of the client's is answered yet
            tracker.start(self.requests, 0, False)
        else:
            tracker.start(self.requests, relay.tallied, relay.errored)
        self.requests.clear()
        self._set_kinds()
        return tracker

    def _stop_tracking(self) -> None:
        """Every tracked request is answered: back to the fast path."""
        self.tracker = None
        self.requests.clear()
        relay = self._relay
        relay.tallied = 0
        relay.errored = False
        self._set_kinds()

    def _set_kinds(self) -> None:
        """What the relay decodes: as little as the current mode allows."""
        relay = self._relay
        if self.tracker is not None:
            # hyperpool's own rows (if any) must then be intercepted, or they would be in the runs
            if self._internal:
                relay.set_types(watch=b"SGA", intercept=_TRACKED_INTERCEPT + b"D")
            else:
                relay.set_types(watch=b"SG", intercept=_TRACKED_INTERCEPT)
        elif self._internal:
            relay.set_types(watch=_INTERNAL_WATCH)
        else:
            relay.set_types(watch=_FAST_WATCH, count=_FAST_COUNT)

    def forget_statements(self) -> None:
        """The server dropped every prepared statement (DISCARD ALL, DEALLOCATE ALL)."""
        self.prepared.clear()
        self.sql_prepared = {}

    # --- hyperpool's own queries ----------------------------------------------------------

    def _finish_internal(self) -> None:
        done, _ = self._internal.popleft()
        if not self._internal:
            self._set_kinds()
        error, self._internal_error = self._internal_error, None
        if error is not None:
            log.warning("internal query on server connection failed: %s", error.get("M"))
        if done is not None:
            done(self, self.tx_status, error)
        if not self._internal and self._internal_drained:
            callbacks, self._internal_drained = self._internal_drained, []
            for callback in callbacks:
                callback()

    def when_internal_done(self, callback: Callable[[], None]) -> None:
        """Run ``callback`` once none of hyperpool's own queries is in flight (not if the connection dies)."""
        if self._internal:
            self._internal_drained.append(callback)
        else:
            callback()

    def send_internal(self, sql: str | bytes, done: InternalDone | None = None,
                      rows: Rows | bytearray | None = None) -> None:
        """Run ``sql`` (or send raw extended-protocol messages ending in Sync) for hyperpool itself;
        its response never reaches a client. DataRows go to ``rows`` when given: decoded into a list, or,
        into a bytearray, every message up to and including the ReadyForQuery as the server sent it."""
        if not self._writable():
            if done is not None:
                done(self, b"", {"S": "FATAL", "C": "08006", "M": "server connection closed"})
            return
        self._internal.append((done, rows))
        if len(self._internal) == 1:
            self._set_kinds()
        self.transport.write(messages.query(sql) if isinstance(sql, str) else sql)  # type: ignore[union-attr]

    def _writable(self) -> bool:
        """False (and the connection marked closed) when the socket is already going away."""
        if self.closed or self.transport is None or self.transport.is_closing():
            self._mark_closed(self.close_reason or "server connection closed")
            return False
        return True

    def apply_settings(self, client: ServerClient, wanted: dict[str, str],
                       sql_prepared: dict[str, str] | None = None) -> None:
        """Pipeline what gives this connection a client's session: its settings and its SQL-level
        prepared statements (hyperpool's own queries; their answers are swallowed).

        A connection on which another client ran SET, RESET or DISCARD is first put back to
        its login defaults with RESET ALL, so no session setting leaks between clients.
        """
        if self.dirty_for is not None and self.dirty_for is not client:
            self.dirty_for = None
            sets = set_statements(wanted, {})
            self.applied = dict(wanted)
            self.send_internal(";".join([*_RESET_SESSION, *([sets] if sets else [])]), _settings_applied)
        elif wanted != self.applied:
            sql = set_statements(wanted, self.applied)
            if sql:
                self.send_internal(sql, _settings_applied)
            self.applied = dict(wanted)
        wanted_sql = sql_prepared or {}
        if wanted_sql != self.sql_prepared:
            self._apply_prepared(wanted_sql)

    def _apply_prepared(self, wanted: dict[str, str]) -> None:
        """Give this connection exactly a client's SQL-level prepared statements (PREPARE texts)."""
        for name, text in self.sql_prepared.items():
            if wanted.get(name) != text:
                self.send_internal(f"DEALLOCATE {quote_ident(name)}")
        for name, text in wanted.items():
            if self.sql_prepared.get(name) != text:
                # a failure (the statement no longer analyses) shows when the client EXECUTEs it
                self.send_internal(text)
        self.sql_prepared = dict(wanted)

    @property
    def busy(self) -> bool:
        return bool(self._internal) or self.outstanding > 0 or self.copy_in

    def pending_requests(self) -> bool:
        """Whether client requests other than Flush still expect answers (a connection to keep or drop)."""
        if self.tracker is not None:
            return bool(self.tracker)
        requests = self.requests
        return bool(requests) and bool(requests.replace(b"H", b""))

    # --- cancel requests ----------------------------------------------------------------

    def cancel_started(self) -> None:
        self.cancels_in_flight += 1

    def cancel_finished(self) -> None:
        self.cancels_in_flight -= 1
        if self.cancels_in_flight <= 0:
            self.cancels_in_flight = 0
            callbacks, self._after_cancels = self._after_cancels, []
            for callback in callbacks:
                callback()

    def after_cancels(self, callback: Callable[[], None]) -> None:
        """Run ``callback`` once no cancel request for this connection is on its way."""
        if self.cancels_in_flight:
            self._after_cancels.append(callback)
        else:
            callback()

    def cancel_request(self) -> bytes:
        return messages.cancel_request(*self.backend_key)

    # --- lifecycle ----------------------------------------------------------------------

    def close(self, reason: str) -> None:
        if not self.closed and self.transport is not None and not self.transport.is_closing():
            with contextlib.suppress(Exception):
                self.transport.write(messages.TERMINATE)
            self.transport.close()
        self._mark_closed(reason)

    def _mark_closed(self, reason: str) -> None:
        if self.closed:
            return
        self.closed = True
        self.close_reason = reason
        client, self.client = self.client, None
        pending, self._internal = list(self._internal), deque()
        for done, _ in pending:
            if done is not None:
                done(self, b"", {"S": "FATAL", "C": "08006", "M": reason})
        if client is not None:
            client.server_lost(self, reason)
        if self.on_close is not None:
            self.on_close(self)

    # --- login --------------------------------------------------------------------------

    def _wake(self) -> None:
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_result(None)

    async def _read_message(self) -> Message:
        assert self._setup is not None
        while True:
            msg = self._setup.next_message()
            if msg is not None:
                return msg
            if self.closed:
                raise UpstreamError(f"server closed the connection during login ({self.close_reason})")
            self._waiter = asyncio.get_running_loop().create_future()
            await self._waiter

    async def _read_raw_byte(self) -> int:
        assert self._setup is not None
        while not self._setup.buf:
            if self.closed:
                raise UpstreamError("server closed the connection during SSL negotiation")
            self._waiter = asyncio.get_running_loop().create_future()
            await self._waiter
        byte = self._setup.buf[0]
        del self._setup.buf[:1]
        return byte

    async def login(self) -> None:
        """TLS (per sslmode), StartupMessage and authentication, up to the first ReadyForQuery."""
        if self.db.sslmode not in ("disable", "allow"):
            await self._negotiate_tls()
        params = {"user": self.db.user, "database": self.db.dbname, **dict(self.db.connect_options)}
        self._send(messages.startup_message(params))
        await self._authenticate()
        await self._read_until_ready()
        assert self._setup is not None
        if self._setup.buf:
            raise UpstreamError("server sent data after ReadyForQuery during login")
        self._setup = None
        self.startup_params = dict(self.params)

    def _send(self, data: bytes) -> None:
        assert self.transport is not None
        self.transport.write(data)

    async def _negotiate_tls(self) -> None:
        self._send(messages.ssl_request())
        answer = await self._read_raw_byte()
        if answer == ord("S"):
            assert self.transport is not None and self._setup is not None
            if self._setup.buf:
                raise UpstreamError("server sent unencrypted data after accepting SSL")
            loop = asyncio.get_running_loop()
            hostname = self.db.host if self.db.sslmode == "verify-full" else None
            new = await loop.start_tls(self.transport, self, _ssl_context(self.db), server_hostname=hostname)
            self.transport = cast(asyncio.Transport, new)
        elif answer == ord("N"):
            if self.db.sslmode not in ("prefer",):
                raise UpstreamError(f"server does not support SSL, but sslmode is {self.db.sslmode}")
        else:
            raise UpstreamError("server answered the SSL request with garbage")

    async def _authenticate(self) -> None:
        client: scram.ScramClient | None = None
        while True:
            msg = await self._read_message()
            if msg.type == ord("E"):
                self._raise_login_error(msg)
            if msg.type != ord("R"):
                raise UpstreamError(f"unexpected message {chr(msg.type)!r} during server login")
            code, data = messages.decode_authentication(msg.payload)
            if code == messages.AUTH_OK:
                return
            client = self._answer_auth(code, data, client)

    def _password(self) -> str:
        if self.db.password is None:
            raise UpstreamError(f"the database asks for a password, but databases.{self.db.name}.password "
                                "is not set")
        return self.db.password

    def _answer_auth(self, code: int, data: bytes, client: scram.ScramClient | None) -> scram.ScramClient | None:
        if code == messages.AUTH_CLEARTEXT:
            self._send(messages.password_message(self._password().encode() + b"\x00"))
        elif code == messages.AUTH_MD5:
            response = scram.md5_client_response(self._password(), self.db.user, data[:4])
            self._send(messages.password_message(response + b"\x00"))
        elif code == messages.AUTH_SASL:
            if scram.MECHANISM not in messages.decode_sasl_mechanisms(data):
                raise UpstreamError("the database offers no SASL mechanism hyperpool supports")
            client = scram.ScramClient(self._password())
            self._send(messages.sasl_initial_response(scram.MECHANISM, client.client_first()))
        elif code == messages.AUTH_SASL_CONTINUE and client is not None:
            self._send(messages.password_message(client.server_first(data)))
        elif code == messages.AUTH_SASL_FINAL and client is not None:
            client.server_final(data)
        else:
            raise UpstreamError(f"unsupported authentication request {code} from the database")
        return client

    def _raise_login_error(self, msg: Message) -> None:
        fields = messages.decode_error_fields(msg.payload)
        raise UpstreamError(f"server login failed: {fields.get('M', 'unknown error')}",
                            detail=f"SQLSTATE {fields.get('C', '?')} from database {self.db.dbname}")

    async def _read_until_ready(self) -> None:
        while True:
            msg = await self._read_message()
            if msg.type == ord("S"):
                name, value = messages.decode_parameter_status(msg.payload)
                self.params[name] = value
            elif msg.type == ord("K"):
                self.backend_key = messages.decode_backend_key_data(msg.payload)
            elif msg.type == ord("Z"):
                self.tx_status = msg.payload[:1]
                return
            elif msg.type == ord("E"):
                self._raise_login_error(msg)


async def open_server(db: DatabaseConfig, timeout: float) -> ServerConnection:
    """Connect and log in to the database; raise UpstreamError (08006) on any failure."""
    loop = asyncio.get_running_loop()
    conn: ServerConnection | None = None
    try:
        async with asyncio.timeout(timeout or None):
            _, conn = await loop.create_connection(lambda: ServerConnection(db), db.host, db.port)
            await conn.login()
        return conn
    except (UpstreamError, asyncio.CancelledError):
        if conn is not None:
            conn.close("login failed")
        raise
    except (OSError, TimeoutError, ssl.SSLError, scram.AuthError, ProtocolViolation) as exc:
        if conn is not None:
            conn.close("login failed")
        what = "timeout" if isinstance(exc, TimeoutError) else (str(exc) or type(exc).__name__)
        raise UpstreamError(f"could not connect to the database at {db.host}:{db.port}: {what}") from None


async def send_cancel(host: str, port: int, request: bytes) -> None:
    """Deliver a CancelRequest on a fresh connection, as PostgreSQL expects."""
    try:
        async with asyncio.timeout(5):
            reader, writer = await asyncio.open_connection(host, port)
            writer.write(request)
            await writer.drain()
            await reader.read(1)  # PostgreSQL closes once it has signalled the backend
            writer.close()
    except (OSError, TimeoutError) as exc:
        log.warning("could not deliver cancel request to %s:%s: %s", host, port, exc)
